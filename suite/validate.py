"""Checks of a composed config before any work starts; each failure is one ConfigError line."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from core.errors import ConfigError

# (setting, predicate, what is allowed); applied when the setting exists in the config.
Rule = tuple[str, Callable[[Any], bool], str]

RULES: list[Rule] = [
    ("optimizer.lr", lambda v: v > 0, "a positive number"),
    ("optimizer.momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("optimizer.beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.beta2", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.eps", lambda v: v > 0, "a positive number"),
    ("optimizer.damping", lambda v: v > 0, "a positive number"),
    ("optimizer.ema_max", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.cov_period", lambda v: v >= 1, "an integer >= 1"),
    ("optimizer.inv_period", lambda v: v >= 1, "an integer >= 1"),
    ("optimizer.stats_fraction", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("optimizer.kl_clip", lambda v: v is None or v > 0, "null (off) or a positive number"),
    ("optimizer.omega1", lambda v: v >= 0, "a number >= 0"),
    ("optimizer.omega2", lambda v: v >= 0, "a number >= 0"),
    ("optimizer.nbasis", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("trainer.max_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.eval_every_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.threads", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.lr_gamma", lambda v: v > 0, "a positive number"),
    ("trainer.lr_plateau_patience", lambda v: v is None or v >= 0, "null or an integer >= 0"),
    ("trainer.lr_min", lambda v: v >= 0, "a number >= 0"),
    ("trainer.checkpoint_every_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.checkpoint_every_minutes", lambda v: v is None or v > 0, "null or a number > 0"),
    ("trainer.diverge_loss", lambda v: v > 0, "a positive number"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("logger.backend", lambda v: v in ("wandb", "none"), "one of: wandb, none"),
]


def _get(cfg: DictConfig, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_writable(root: Path) -> None:
    """Fail unless run folders can be created under ``root``."""
    setting = "results.root"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(setting, f"cannot write run folders under '{root}' ({reason})") from None
    if not os.access(root, os.W_OK):
        raise ConfigError(setting, f"cannot write run folders under '{root}'")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid setting of a composed config."""
    for setting, allowed, description in RULES:
        present, value = _get(cfg, setting)
        if not present:
            continue
        ok = False
        try:
            ok = bool(allowed(value))
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(setting, f"got {value!r}; allowed: {description}")
    milestones = list(cfg.trainer.lr_milestones)
    if milestones != sorted(set(milestones)) or any(m < 1 for m in milestones):
        raise ConfigError(
            "trainer.lr_milestones", f"got {milestones}; allowed: increasing epochs >= 1"
        )
    if milestones and cfg.trainer.get("lr_plateau_patience") is not None:
        raise ConfigError(
            "trainer.lr_plateau_patience",
            "cannot combine with trainer.lr_milestones; allowed: one learning-rate schedule",
        )
    if cfg.trainer.epochs == 0 and cfg.trainer.max_steps is None:
        raise ConfigError("trainer.epochs", "is 0 and trainer.max_steps is null; nothing to train")
    present, cov = _get(cfg, "optimizer.cov_period")
    if present:
        inv = cfg.optimizer.inv_period
        if inv % cov != 0:
            raise ConfigError(
                "optimizer.inv_period",
                f"got {inv}; allowed: a multiple of optimizer.cov_period ({cov})",
            )
    device = str(
        cfg.trainer.device.value if hasattr(cfg.trainer.device, "value") else cfg.trainer.device
    )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device", "cuda requested but no CUDA device is available; allowed: auto, cpu"
        )
    task = str(getattr(cfg.model.task, "value", cfg.model.task))
    likelihood = str(getattr(cfg.model.likelihood, "value", cfg.model.likelihood))
    if task == "autoencoder" and likelihood == "categorical":
        raise ConfigError(
            "model.likelihood",
            "categorical does not fit task=autoencoder; allowed: bernoulli, gaussian",
        )
