"""The optimizers the harness times: conf/optimizer presets with period and damping overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.floors import Periods, StepKind
from optimizers.registry import build_optimizer, family_of
from suite.config import register_configs
from suite.preflight import compose_job

CONF_OPTIMIZER = Path(__file__).resolve().parent.parent / "conf" / "optimizer"
BASELINES = ("sgd", "adam")
KFAC_PRESET = "kfac"
TWO_LEVEL_PREFIX = "kfac2"


@dataclass(frozen=True)
class Method:
    """One optimizer setting: a conf/optimizer preset plus overrides."""

    label: str  # e.g. "sgd", "kfac[factored]", "kfac2_exact"
    preset: str  # conf/optimizer/<preset>.yaml
    overrides: dict[str, Any] = field(default_factory=dict)
    periods: Periods | None = None  # None: first-order (no periodic work)

    def config(self) -> DictConfig:
        """The preset merged into its schema, with the overrides applied (as Hydra composes it)."""
        return preset_config(self.preset, self.overrides)

    @property
    def family(self) -> str:
        """The optimizer family name (``cfg.name``)."""
        return str(self.config().name)

    @property
    def curvature(self) -> bool:
        """Whether the step follows the capture / fisher_backward protocol."""
        return self.family not in BASELINES

    @property
    def coarse(self) -> bool:
        """Whether the method adds a two-level coarse correction."""
        return self.family == TWO_LEVEL_PREFIX

    @property
    def kind(self) -> StepKind:
        """What the step computes, for its floor."""
        if not self.curvature:
            return StepKind.FIRST_ORDER
        mode = getattr(self.config().damping_mode, "value", self.config().damping_mode)
        return StepKind.KFAC_EIGEN if str(mode) == "eigen" else StepKind.KFAC_FACTORED

    def settings(self) -> dict[str, Any]:
        """The resolved optimizer settings (JSON-ready)."""
        resolved = OmegaConf.to_container(self.config(), resolve=True, enum_to_str=True)
        assert isinstance(resolved, dict)
        return {str(k): v for k, v in resolved.items()}

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``, through the suite's registry."""
        return build_optimizer(model, self.config())

    def to_json(self) -> str:
        """Serialise (for the memory subprocess)."""
        periods = None if self.periods is None else [self.periods.cov, self.periods.inv]
        return json.dumps(
            {
                "label": self.label,
                "preset": self.preset,
                "overrides": self.overrides,
                "periods": periods,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Method:
        """Inverse of `to_json`."""
        raw = json.loads(text)
        periods = None if raw["periods"] is None else Periods(*raw["periods"])
        return cls(
            label=raw["label"], preset=raw["preset"], overrides=raw["overrides"], periods=periods
        )


def available_presets() -> list[str]:
    """The conf/optimizer presets."""
    return sorted(p.stem for p in CONF_OPTIMIZER.glob("*.yaml"))


def two_level_presets() -> list[str]:
    """Every conf/optimizer/kfac2*.yaml preset."""
    return [p for p in available_presets() if p.startswith(TWO_LEVEL_PREFIX)]


_CACHE: dict[str, DictConfig] = {}


def preset_config(preset: str, overrides: dict[str, Any] | None = None) -> DictConfig:
    """A conf/optimizer preset merged into its family's schema, plus overrides (a copy)."""
    key = json.dumps([preset, overrides or {}], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _compose(preset, overrides or {})
    return _CACHE[key].copy()


def _compose(preset: str, overrides: dict[str, Any]) -> DictConfig:
    path = CONF_OPTIMIZER / f"{preset}.yaml"
    if not path.is_file():
        allowed = ", ".join(available_presets())
        raise ValueError(f"optimizer preset: got {preset!r}; allowed: {allowed}")
    register_configs()
    composed = compose_job([f"optimizer={preset}", "logger=none"]).optimizer
    cfg = OmegaConf.merge(OmegaConf.structured(family_of(composed).schema), composed)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    assert isinstance(cfg, DictConfig)
    return cfg


def period_overrides(periods: Periods) -> dict[str, Any]:
    """Overrides that set T_cov and T_inv."""
    return {"cov_period": periods.cov, "inv_period": periods.inv}


def methods_for(periods: Periods, *, two_level: list[str] | None = None) -> list[Method]:
    """SGD, Adam, K-FAC (factored and eigen damping) and each two-level preset at ``periods``."""
    presets = two_level_presets() if two_level is None else two_level
    methods = [Method(label=name, preset=name) for name in BASELINES]
    for mode in ("factored", "eigen"):
        methods.append(
            Method(
                label=f"kfac[{mode}]",
                preset=KFAC_PRESET,
                overrides={**period_overrides(periods), "damping_mode": mode},
                periods=periods,
            )
        )
    for preset in presets:
        methods.append(
            Method(
                label=preset, preset=preset, overrides=period_overrides(periods), periods=periods
            )
        )
    return methods
