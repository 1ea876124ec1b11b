"""In-memory dataset splits and the bundle ``load_dataset`` returns, plus split/subset helpers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.errors import ConfigError


@dataclass
class Split:
    """Inputs ``x`` (N, ...) and targets ``y`` (None for autoencoders, whose target is x)."""

    x: Tensor
    y: Tensor | None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: Tensor) -> Split:
        """The examples at ``index`` (a 1-D index tensor on the split's device or the CPU)."""
        index = index.to(self.x.device)
        return Split(self.x[index], None if self.y is None else self.y[index])

    def to(self, device: torch.device) -> Split:
        """The same split on ``device``."""
        return Split(self.x.to(device), None if self.y is None else self.y.to(device))


@dataclass
class DataBundle:
    """A loaded dataset: splits already on the training device and an honest description."""

    name: str  # the requested dataset name, e.g. "mnist"
    variant: str  # what was actually loaded, e.g. "mnist-full", "mnist-5k", "curves-surrogate"
    description: str  # one line: what was loaded from where
    train: Split
    val: Split | None
    test: Split | None
    input_shape: tuple[int, ...]  # shape of one example, e.g. (1, 28, 28)
    num_classes: int | None  # None for autoencoders; 1 for a binary target in (N, 1)


def images_from_uint8(array: np.ndarray) -> Tensor:
    """uint8 (or 0-255 valued) images as float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / 255.0)


def permutation(count: int, *, seed: int) -> Tensor:
    """A deterministic permutation of ``range(count)`` (CPU generator, independent of torch's)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)


def hold_out(train: Split, *, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Split off a deterministic validation part of ``train``; (train, None) when fraction is 0."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError("data.val_fraction", f"got {fraction}; allowed: a number in [0, 1)")
    count = round(fraction * len(train))
    if count == 0:
        return train, None
    if count >= len(train):
        raise ConfigError("data.val_fraction", f"got {fraction}; leaves no training examples")
    order = permutation(len(train), seed=seed)
    return train.take(order[count:].sort().values), train.take(order[:count].sort().values)


def subset(train: Split, *, max_train: int | None, seed: int) -> Split:
    """A deterministic subset of ``max_train`` training examples (all when None)."""
    if max_train is None:
        return train
    if not 1 <= max_train <= len(train):
        raise ConfigError(
            "data.max_train", f"got {max_train}; allowed: null or 1..{len(train)} (this dataset)"
        )
    order = permutation(len(train), seed=seed + 1)
    return train.take(order[:max_train].sort().values)
