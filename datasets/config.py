"""Structured config of the data settings (`data.*` in conf/config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from core.settings import bounded, check_settings


class DataSource(str, Enum):
    """Where a dataset comes from; ``auto`` tries folder, system, download, offline in order."""

    auto = "auto"
    folder = "folder"  # the data folder (``data.root``)
    system = "system"  # a copy installed system-wide (Debian's dataset-fashion-mnist)
    download = "download"  # torchvision's download into ``data.root`` (needs a network)
    offline = "offline"  # a stand-in shipped with the environment: subset or labelled surrogate


@dataclass
class DataConfig:
    """How datasets are found, split and subset; every choice shows in the bundle's variant."""

    source: DataSource = DataSource.auto
    root: str = "data"  # the data folder
    val_fraction: float = bounded(0.0, ge=0, lt=1)  # deterministic held-out part of training
    max_train: int | None = bounded(  # explicit training subset; the variant gets "-sub<N>"
        None, ge=1, integer=True, null="all"
    )
    data_seed: int | None = bounded(  # seed of generated data, splits and subsets
        0, ge=0, integer=True, null="the run seed"
    )

    def __post_init__(self) -> None:
        check_settings(self)
