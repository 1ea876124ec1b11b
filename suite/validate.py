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
from core.settings import settings_from
from datasets.config import DataConfig
from optimizers.registry import family_of
from suite.config import LoggerConfig, TrainerConfig, TuningConfig

UNKNOWN_SETTING = "unknown setting (misspelled? `python run.py --cfg job` lists all settings)"
# Model settings: their schemas (models/config.py) declare no ranges yet.
MODEL_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.sparse_connections", lambda v: v >= 1, "an integer >= 1"),
    ("model.depth", lambda v: v >= 1, "an integer >= 1"),
    ("model.width", lambda v: v >= 1, "an integer >= 1"),
    ("model.input_dim", lambda v: v >= 1, "an integer >= 1"),
    ("model.output_dim", lambda v: v >= 1, "an integer >= 1"),
    ("model.in_channels", lambda v: v >= 1, "an integer >= 1"),
    ("model.num_classes", lambda v: v >= 2, "an integer >= 2"),
    ("model.image_size", lambda v: v >= 1, "an integer >= 1"),
]
# Config nodes checked against their schema's ranges (`core.settings`), in this order.
NODES: tuple[tuple[str, type | None], ...] = (
    ("optimizer", None),  # the schema of the optimizer's family
    ("trainer", TrainerConfig),
    ("data", DataConfig),
    ("logger", LoggerConfig),
    ("tuning", TuningConfig),
)


def _get(cfg: DictConfig, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_node(prefix: str, schema: type, node: Any) -> None:
    """Build ``schema`` from ``node`` (its checks run); errors name ``prefix.setting``."""
    try:
        settings_from(schema, node)
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err.setting}", err.problem) from None


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
    """Raise ConfigError for the first invalid setting of a composed config.

    Every key must be declared and every float finite; single settings are checked by their
    schema (ranges declared with the field); the rules below are the ones across settings.
    """
    check_known_and_finite(cfg)
    for setting, allowed, description in MODEL_RULES:
        present, value = _get(cfg, setting)
        if present and not allowed(value):
            raise ConfigError(setting, f"got {value!r}; allowed: {description}")
    for prefix, schema in NODES:
        if prefix not in cfg or cfg[prefix] is None:
            continue
        node = cfg[prefix]
        check_node(prefix, family_of(node).schema if schema is None else schema, node)
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
