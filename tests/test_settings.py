"""Settings declared once: every numeric field of every schema carries its range, and the
optimizer, the dataclass and the run-config validation reject the same values with the same line."""

from __future__ import annotations

import math
import typing
from dataclasses import fields, replace

import pytest
import torch
from omegaconf import OmegaConf

from core.errors import ConfigError
from core.settings import Range, numeric_fields
from datasets.config import DataConfig
from optimizers.registry import FAMILIES
from optimizers.twolevel import TwoLevelKFAC
from suite.config import TrainerConfig, register_configs
from suite.preflight import compose_job
from suite.validate import validate_config

SCHEMAS: list[type] = [f.schema for f in FAMILIES.values()] + [TrainerConfig, DataConfig]
CASES = [
    (schema, nf.name, bad)
    for schema in SCHEMAS
    for nf in numeric_fields(schema)
    for bad in nf.range.invalid_examples()
]


def _numeric(annotation: object) -> bool:
    if typing.get_origin(annotation) is list:
        return False
    args = typing.get_args(annotation) or (annotation,)
    return any(a in (int, float) for a in args)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_numeric_field_declares_its_range(schema: type) -> None:
    hints = typing.get_type_hints(schema)
    numeric = {f.name for f in fields(schema) if _numeric(hints[f.name])}
    assert numeric == {nf.name for nf in numeric_fields(schema)}
    for nf in numeric_fields(schema):
        assert nf.range.admits(nf.default), nf


@pytest.mark.parametrize(("schema", "name", "bad"), CASES, ids=str)
def test_schema_rejects_each_invalid_value_naming_the_setting(
    schema: type, name: str, bad: object
) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: got ") as info:
        schema(**{name: bad})
    assert "\n" not in str(info.value)


def test_range_description_and_edges() -> None:
    rng = Range(ge=0, lt=1)
    assert rng.describe() == "a number in [0, 1)"
    assert rng.admits(0.0) and not rng.admits(1.0) and not rng.admits(math.nan)
    assert Range(gt=0, null="off").describe() == "null (off) or a number > 0"
    assert Range(ge=1, integer=True).describe() == "an integer >= 1"
    assert not Range(ge=1, integer=True).admits(1.5) and not Range(ge=0).admits(True)


def _composed(*overrides: str) -> object:
    register_configs()
    return compose_job(["logger=none", *overrides])


@pytest.mark.parametrize(("optimizer", "name"), [("kfac2", "omega2"), ("kfac", "damping")])
def test_optimizer_and_run_config_give_the_same_line(optimizer: str, name: str) -> None:
    """One source: the optimizer and validate_config report a bad value identically."""
    cfg = _composed(f"optimizer={optimizer}", f"optimizer.{name}=-1")
    with pytest.raises(ConfigError) as from_config:
        validate_config(cfg)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as from_optimizer:
        TwoLevelKFAC(torch.nn.Linear(2, 2), **{name: -1.0})
    assert str(from_config.value) == f"optimizer.{from_optimizer.value}"


def test_lr_zero_is_one_rule_everywhere() -> None:
    """lr = 0 (parameters frozen) is accepted by the optimizer and the run config alike."""
    validate_config(_composed("optimizer=kfac", "optimizer.lr=0"))  # type: ignore[arg-type]
    TwoLevelKFAC(torch.nn.Linear(2, 2), lr=0.0)


def test_from_config_builds_from_dataclass_and_dictconfig() -> None:
    cfg = FAMILIES["kfac2"].schema(coarse_space="krylov_residual", damping=0.1)
    assert cfg.coarse_space.value == "krylov_residual"  # parsed once, in the dataclass
    for source in (cfg, OmegaConf.structured(cfg)):
        opt = TwoLevelKFAC.from_config(torch.nn.Linear(3, 2), source)
        assert opt.nbasis == 2 and opt.damping == 0.1 and opt.config == cfg
    with pytest.raises(ConfigError, match=r"^nbasis: krylov_residual needs >= 2"):
        replace(cfg, nbasis=1)
