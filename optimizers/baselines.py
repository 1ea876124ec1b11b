"""First-order baselines from torch.optim: SGD (momentum, Nesterov, weight decay) and Adam."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.settings import bounded, check_settings


@dataclass
class SGDConfig:
    """torch.optim.SGD settings."""

    name: str = "sgd"
    lr: float = bounded(0.01, ge=0)  # learning rate
    momentum: float = bounded(0.9, ge=0, lt=1)  # heavy-ball momentum
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = bounded(0.0, ge=0)  # L2 penalty added to the gradient

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class AdamConfig:
    """torch.optim.Adam settings."""

    name: str = "adam"
    lr: float = bounded(1.0e-3, ge=0)  # learning rate
    beta1: float = bounded(0.9, ge=0, lt=1)  # first-moment decay
    beta2: float = bounded(0.999, ge=0, lt=1)  # second-moment decay
    eps: float = bounded(1.0e-8, gt=0)  # denominator guard
    weight_decay: float = bounded(0.0, ge=0)  # L2 penalty added to the gradient

    def __post_init__(self) -> None:
        check_settings(self)


def build_sgd(model: nn.Module, cfg: SGDConfig) -> torch.optim.SGD:
    """SGD over all parameters of ``model``."""
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def build_adam(model: nn.Module, cfg: AdamConfig) -> torch.optim.Adam:
    """Adam over all parameters of ``model``."""
    return torch.optim.Adam(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
