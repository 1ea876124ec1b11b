"""Per-family optimizer settings of experiment presets (suite/optimizer_settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from core.errors import ConfigError
from suite.optimizer_settings import apply_optimizer_settings
from suite.preflight import compose_job


def composed(optimizer: str, settings: dict, *overrides: str):
    cfg = compose_job([f"optimizer={optimizer}", "model=mnist_ae", *overrides])
    cfg.optimizer_settings = settings  # as an experiment preset would set it
    return cfg


SETTINGS = {"sgd": {"lr": 0.5, "nesterov": True}, "kfac": {"lr": 0.2, "damping": 3.0},
            "kfac2": {"coarse_refresh": "accumulate", "lr": 0.7}}  # fmt: skip


@pytest.mark.parametrize(
    ("optimizer", "want"),
    [("sgd", {"lr": 0.5, "nesterov": True}), ("kfac", {"lr": 0.2, "damping": 3.0}),
     ("kfac2_exact", {"lr": 0.7, "coarse_refresh": "accumulate"}), ("adam", {"lr": 1e-3})],
)  # fmt: skip
def test_the_chosen_family_gets_its_settings_and_no_other(optimizer: str, want: dict) -> None:
    cfg = apply_optimizer_settings(composed(optimizer, SETTINGS))
    got = OmegaConf.to_container(cfg.optimizer, enum_to_str=True)
    assert {k: got[k] for k in want} == want
    assert not cfg.optimizer_settings  # applied once; the optimizer block records the values
    if optimizer == "kfac2_exact":  # the preset's own settings survive
        assert got["coarse_fisher"] == "exact"


def test_the_command_line_wins() -> None:
    cfg = composed("kfac", SETTINGS, "optimizer.lr=0.05")
    cfg = apply_optimizer_settings(cfg, ["optimizer=kfac", "optimizer.lr=0.05"])
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.damping == 3.0


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"lbfgs": {"lr": 1.0}}, "optimizer_settings.lbfgs: not an optimizer family; allowed: sgd"),
     ({"sgd": {"damping": 1.0}}, "optimizer_settings.sgd.damping: not a sgd setting"),
     ({"sgd": {"lr": "fast"}}, "optimizer_settings.sgd")],
)  # fmt: skip
def test_bad_settings_name_the_setting(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_optimizer_settings(composed("sgd", settings))


def test_bad_settings_exit_with_one_line_and_record_no_run(tmp_path: Path) -> None:
    from suite.store import find_run_folders
    from tests.conftest import FAST, run_cli

    done = run_cli(
        *FAST, "optimizer=sgd", "++optimizer_settings.sgd.damping=1.0",
        f"results.root={tmp_path}", "logger=none",
    )  # fmt: skip
    assert done.returncode != 0
    assert "optimizer_settings.sgd.damping: not a sgd setting" in done.stderr
    assert not find_run_folders(tmp_path)
