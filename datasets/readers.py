"""File-format readers: IDX (MNIST family), MATLAB .mat, CSV digit tables, CIFAR pickle batches.

Each reader takes a path and returns numpy arrays; none of them knows where files live.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np

# IDX type codes (LeCun's format description): code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class FormatError(ValueError):
    """A data file whose content does not match its format."""


def _open(path: Path) -> BinaryIO:
    """Open a file for binary reading, transparently gunzipping ``*.gz``."""
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path, "rb"))
    return path.open("rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its stored shape and type."""
    with _open(path) as stream:
        data = stream.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise FormatError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise FormatError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    dtype = np.dtype(IDX_DTYPES[code])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise FormatError(f"{path}: IDX payload does not match its header shape {shape}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape).copy()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte array as an IDX file (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


def read_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the named variables of a MATLAB .mat file (v4-v7.2, via scipy.io.loadmat)."""
    from scipy.io import loadmat  # lazy: optional heavy dependency, loaded only when used

    try:
        content = loadmat(str(path), variable_names=list(keys))
    except (ValueError, TypeError, OSError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise FormatError(f"{path}: not a readable MATLAB file ({first})") from None
    missing = [key for key in keys if key not in content]
    if missing:
        raise FormatError(f"{path}: variables {missing} missing (expected {list(keys)})")
    return {key: np.asarray(content[key]) for key in keys}


def read_digit_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV of digit images (optionally gzipped): pixel columns, then the label column."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] < 2:
        raise FormatError(f"{path}: expected pixel columns and a label column")
    pixels, labels = table[:, :-1], table[:, -1]
    if not np.all(labels == np.round(labels)):
        raise FormatError(f"{path}: the last column holds non-integer labels")
    return pixels.astype(np.float32), labels.astype(np.int64)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python pickle batch: uint8 images (N, 3, 32, 32) and int64 labels."""
    with path.open("rb") as stream:
        try:
            batch = pickle.load(stream, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise FormatError(f"{path}: not a CIFAR pickle batch ({err})") from None
    if not isinstance(batch, dict):
        raise FormatError(f"{path}: not a CIFAR pickle batch (no dictionary)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise FormatError(f"{path}: CIFAR batch lacks 'data' or 'labels'")
    images = np.asarray(data, dtype=np.uint8)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise FormatError(f"{path}: CIFAR data has shape {images.shape}, expected (N, 3072)")
    targets = np.asarray(labels, dtype=np.int64)
    if targets.shape != (images.shape[0],):
        raise FormatError(f"{path}: {targets.shape[0]} labels for {images.shape[0]} images")
    return images.reshape(-1, 3, 32, 32), targets
