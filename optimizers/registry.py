"""Optimizer families by name: their config schema and builder (one place per fact)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optimizers.baselines import AdamConfig, SGDConfig, build_adam, build_sgd
from optimizers.kfac import KFACConfig, build_kfac
from optimizers.twolevel import TwoLevelKFACConfig, build_kfac2


@dataclass(frozen=True)
class Family:
    """An optimizer family: its schema and how to build it from a model and a config."""

    schema: type
    build: Callable[[nn.Module, Any], torch.optim.Optimizer]
    curvature: bool  # uses the capture / fisher_backward protocol


FAMILIES: dict[str, Family] = {
    "sgd": Family(SGDConfig, build_sgd, curvature=False),
    "adam": Family(AdamConfig, build_adam, curvature=False),
    "kfac": Family(KFACConfig, build_kfac, curvature=True),
    "kfac2": Family(TwoLevelKFACConfig, build_kfac2, curvature=True),
}

# Hydra ConfigStore entries in group `optimizer`: conf/optimizer/<preset>.yaml names one.
SCHEMAS: dict[str, type] = {f"schema_{name}": family.schema for name, family in FAMILIES.items()}


def family_of(cfg: Any) -> Family:
    """The family a composed optimizer config belongs to (by its schema's ``name`` field)."""
    name = str(cfg.name)
    if name not in FAMILIES:
        raise ValueError(f"optimizer.name: unknown '{name}'; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """Build the optimizer that ``cfg`` describes for ``model``."""
    return family_of(cfg).build(model, cfg)
