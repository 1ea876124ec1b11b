"""Optimizer presets hold only what differs: each composes to its schema's defaults plus the
settings stated in the preset files it is built from (its own and those it includes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from optimizers.registry import family_of
from suite.config import register_configs
from suite.preflight import compose_job

CONF = Path(__file__).resolve().parents[1] / "conf" / "optimizer"
PRESETS = sorted(CONF.glob("*.yaml"))


def stated(path: Path) -> dict[str, Any]:
    """Settings a preset file states, after those of the files its defaults list includes."""
    node = OmegaConf.create(path.read_text())
    values: dict[str, Any] = {}
    for entry in node.get("defaults", []):
        name = str(entry).split("@")[0]
        if name != "_self_" and not name.startswith("schema_"):
            values.update(stated(CONF / f"{name}.yaml"))
    own = OmegaConf.to_container(node)
    assert isinstance(own, dict)
    values.update({k: v for k, v in own.items() if k != "defaults"})
    return values


def inherited(path: Path) -> dict[str, Any]:
    """Settings of the files a preset includes (what it would get without stating anything)."""
    node = OmegaConf.create(path.read_text())
    values: dict[str, Any] = {}
    for entry in node.get("defaults", []):
        name = str(entry).split("@")[0]
        if name != "_self_" and not name.startswith("schema_"):
            values.update(stated(CONF / f"{name}.yaml"))
    return values


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_schema_defaults_plus_what_it_states(path: Path) -> None:
    register_configs()
    composed = compose_job(["logger=none", f"optimizer={path.stem}"]).optimizer
    schema = family_of(composed).schema
    expected = OmegaConf.to_container(OmegaConf.structured(schema))
    assert isinstance(expected, dict)
    expected.update(stated(path))
    assert OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), expected)) == (
        OmegaConf.to_container(composed)
    )


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_states_only_what_differs_from_what_it_includes(path: Path) -> None:
    base = inherited(path)
    own = OmegaConf.to_container(OmegaConf.create(path.read_text()))
    assert isinstance(own, dict)
    repeated = {k for k, v in own.items() if k in base and base[k] == v}
    assert not repeated, f"{path.name} restates {sorted(repeated)}"
