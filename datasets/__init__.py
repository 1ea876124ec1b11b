"""Datasets as in-memory tensors on the training device, with an honest ``variant``.

``load_dataset(name, cfg, device=..., seed=...)`` tries the sources ``cfg.source`` allows
(``auto``: data folder -> system copy -> download (only with SUITE_ALLOW_DOWNLOAD=1) -> offline
stand-in), logs one line whenever it falls back, and raises a one-line ``DataNotFoundError``
naming the folders searched and where to get the files when nothing is found.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from datasets.bundle import DataBundle, Split, hold_out, subset
from datasets.catalog import CATALOG, DatasetSpec, RawData
from datasets.config import DataConfig, DataSource
from datasets.errors import DataNotFoundError
from datasets.readers import FormatError
from datasets.sources import SourceUnavailable, downloads_allowed_in_auto

__all__ = [
    "CATALOG",
    "DataBundle",
    "DataConfig",
    "DataNotFoundError",
    "DataSource",
    "Split",
    "load_dataset",
]

log = logging.getLogger("datasets")
AUTO_ORDER = (DataSource.folder, DataSource.system, DataSource.download, DataSource.offline)


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def _try(spec: DatasetSpec, source: DataSource, root: Path, seed: int) -> RawData:
    try:
        return spec.loaders[source](root, seed)
    except FormatError as err:
        raise DataNotFoundError(f"{spec.title}: unreadable file: {err}") from None


def _resolve(spec: DatasetSpec, source: DataSource, root: Path, seed: int) -> RawData:
    """Load from the requested source (or the auto chain), logging one line on a fallback."""
    if spec.generated:
        return _try(spec, DataSource.offline, root, seed)
    if source is not DataSource.auto:
        if source not in spec.loaders:
            allowed = ", ".join(["auto", *(s.value for s in AUTO_ORDER if s in spec.loaders)])
            raise DataNotFoundError(
                f"{spec.title} has no '{source.value}' source; allowed: {allowed}",
                setting="data.source",
            )
        try:
            raw = _try(spec, source, root, seed)
        except SourceUnavailable as err:
            raise DataNotFoundError(f"{spec.title} not found: {err}; {_hint(spec, root)}") from None
        if "surrogate" in raw.variant:
            log.warning(
                "data: using %s (variant %s), as data.source=%s",
                raw.description,
                raw.variant,
                source.value,
            )
        return raw
    reasons: list[str] = []
    for candidate in AUTO_ORDER:
        if candidate not in spec.loaders:
            continue
        if candidate is DataSource.download and not downloads_allowed_in_auto():
            reasons.append("download: off in auto mode (SUITE_ALLOW_DOWNLOAD=1 turns it on)")
            continue
        try:
            raw = _try(spec, candidate, root, seed)
        except SourceUnavailable as err:
            reasons.append(f"{candidate.value}: {err}")
            continue
        if reasons:
            log.warning(
                "data: falling back to %s (variant %s) because %s",
                raw.description,
                raw.variant,
                "; ".join(reasons),
            )
        return raw
    raise DataNotFoundError(f"{spec.title} not found ({'; '.join(reasons)}); {_hint(spec, root)}")


def _hint(spec: DatasetSpec, root: Path) -> str:
    return spec.how_to_get.replace("<root>", str(root))


def load_dataset(
    name: str,
    cfg: DataConfig | Any,
    *,
    device: torch.device,
    seed: int,
    task: str | Enum | None = None,
) -> DataBundle:
    """Load dataset ``name`` onto ``device``; ``task='autoencoder'`` drops labels (y = None).

    ``seed`` (the run seed) is used for generated data, validation split and subset only when
    ``cfg.data_seed`` is null; by default (data_seed 0) every run sees the same data.
    """
    if name not in CATALOG:
        allowed = ", ".join(CATALOG)
        raise ConfigError("model.dataset", f"unknown dataset '{name}'; allowed: {allowed}")
    spec = CATALOG[name]
    try:
        source = DataSource(_value(cfg.source))
    except ValueError:
        allowed = ", ".join(s.value for s in DataSource)
        raise ConfigError("data.source", f"got {cfg.source!r}; allowed: {allowed}") from None
    data_seed = int(seed if cfg.data_seed is None else cfg.data_seed)
    root = Path(str(cfg.root)).expanduser()
    raw = _resolve(spec, source, root, data_seed)

    train, val = hold_out(raw.train, fraction=float(cfg.val_fraction), seed=data_seed)
    max_train = None if cfg.max_train is None else int(cfg.max_train)
    train = subset(train, max_train=max_train, seed=data_seed)
    variant = raw.variant if max_train is None else f"{raw.variant}-sub{max_train}"
    description = raw.description
    if val is not None:
        description += f"; {len(val):,} train examples held out for validation"
    if max_train is not None:
        description += f"; training subset of {max_train:,} (data seed {data_seed})"

    autoencoder = _value(task) == "autoencoder"
    test = raw.test

    def place(split: Split | None) -> Split | None:
        if split is None:
            return None
        return Split(split.x, None if autoencoder else split.y).to(device)

    placed_train = place(train)
    assert placed_train is not None
    return DataBundle(
        name=name,
        variant=variant,
        description=description,
        train=placed_train,
        val=place(val),
        test=place(test),
        input_shape=tuple(spec.input_shape),
        num_classes=None if autoencoder else spec.num_classes,
    )
