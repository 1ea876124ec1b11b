"""First-order baselines from torch.optim: SGD (momentum, Nesterov, weight decay) and Adam."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SGDConfig:
    """torch.optim.SGD settings."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    """torch.optim.Adam settings."""

    name: str = "adam"
    lr: float = 1.0e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1.0e-8
    weight_decay: float = 0.0


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
