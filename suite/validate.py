"""Checks of a composed config before any work starts; each failure is one ConfigError line."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError

UNKNOWN_SETTING = "unknown setting (misspelled? `python run.py --cfg job` lists all settings)"
# Integer settings where every value is meaningful (seeds); every other number has a range.
UNBOUNDED = ("trainer.seed", "data.data_seed", "optimizer.seed")

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
    ("optimizer.damping_period", lambda v: v >= 1, "an integer >= 1"),
    ("optimizer.damping_decay", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("model.sparse_connections", lambda v: v >= 1, "an integer >= 1"),
    ("model.depth", lambda v: v >= 1, "an integer >= 1"),
    ("model.width", lambda v: v >= 1, "an integer >= 1"),
    ("model.input_dim", lambda v: v >= 1, "an integer >= 1"),
    ("model.output_dim", lambda v: v >= 1, "an integer >= 1"),
    ("model.in_channels", lambda v: v >= 1, "an integer >= 1"),
    ("model.num_classes", lambda v: v >= 2, "an integer >= 2"),
    ("model.image_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("trainer.max_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.eval_every_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.threads", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.lr_gamma", lambda v: v > 0, "a positive number"),
    ("trainer.checkpoint_every_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("trainer.checkpoint_every_minutes", lambda v: v is None or v > 0, "null or a number > 0"),
    ("trainer.diverge_loss", lambda v: v > 0, "a positive number"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("data.max_train", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("logger.step_every", lambda v: v >= 1, "an integer >= 1"),
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
        blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            reason = f"'{blocker}' is a file, not a folder; allowed: a folder path"
        raise ConfigError(setting, f"cannot write run folders under '{root}' ({reason})") from None
    if not os.access(root, os.W_OK):
        raise ConfigError(setting, f"cannot write run folders under '{root}'")


def check_known_and_finite(node: DictConfig, prefix: str = "") -> None:
    """Every key is declared by its node's schema (no ``+trainer.foo=1``), every float finite."""
    schema = OmegaConf.get_type(node)
    declared = (
        {f.name for f in dataclasses.fields(schema)}
        if isinstance(schema, type) and dataclasses.is_dataclass(schema)
        else None
    )
    for key in [str(k) for k in node]:
        setting = f"{prefix}{key}"
        if declared is not None and key not in declared:
            raise ConfigError(setting, UNKNOWN_SETTING)
        value = node[key]
        if isinstance(value, DictConfig):
            check_known_and_finite(value, f"{setting}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(setting, f"got {value}; allowed: a finite number")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid setting of a composed config."""
    check_known_and_finite(cfg)
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
