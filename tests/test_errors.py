"""Bad input: one line naming the setting and what is allowed, exit 2, no completed run."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.settings import numeric_fields
from datasets.config import DataConfig
from models.config import SCHEMAS as MODEL_SCHEMAS
from optimizers.registry import FAMILIES
from suite.config import LoggerConfig, TrainerConfig
from suite.preflight import compose_job, group_options, preflight
from suite.store import find_run_folders, read_run
from suite.validate import validate_config
from tests.conftest import FAST, run_cli

# (overrides, text the one-line message must contain)
PREFLIGHT_CASES = [
    (["optimizer=nope"], "optimizer: unknown option 'nope'; allowed: adam,"),
    (["model=nope"], "model: unknown option 'nope'; allowed:"),
    (["logger=nope"], "logger: unknown option 'nope'; allowed: none, wandb"),
    (["trainer.epoch=3"], "trainer.epoch: unknown setting"),
    (["trainer.epochs=abc"], "trainer.epochs: Value 'abc'"),
    (["trainer.device=tpu"], "trainer.device: Invalid value 'tpu'"),
    (["optimizer=sgd", "optimizer.lr=-0.1"], "optimizer.lr: got -0.1; allowed: a number >= 0"),
    (
        ["optimizer=sgd", "optimizer.momentum=1.5"],
        "optimizer.momentum: got 1.5; allowed: a number in [0, 1)",
    ),
    (["optimizer=adam", "optimizer.beta2=1.0"], "optimizer.beta2: got 1.0"),
    (["trainer.batch_size=0"], "trainer.batch_size: got 0; allowed: an integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs: is 0 and trainer.max_steps is null"),
    (["trainer.lr_milestones=[5,3]"], "trainer.lr_milestones: got [5, 3]"),
    (["data.val_fraction=1.0"], "data.val_fraction: got 1.0; allowed: a number in [0, 1)"),
    (["optimizer=kfac", "optimizer.damping=0"], "optimizer.damping: got 0"),
    (["optimizer=kfac", "optimizer.cov_period=0"], "optimizer.cov_period: got 0"),
    (["optimizer=kfac", "optimizer.stats_fraction=1.5"], "optimizer.stats_fraction: got 1.5"),
    (["optimizer=kfac", "optimizer.kl_clip=-1"], "optimizer.kl_clip: got -1"),
    (
        ["optimizer=kfac", "optimizer.cov_period=10", "optimizer.inv_period=15"],
        "optimizer.inv_period: got 15; allowed: a multiple of optimizer.cov_period (10)",
    ),
    (
        ["optimizer=kfac", "optimizer.damping_mode=cholesky"],
        "optimizer.damping_mode: Invalid value",
    ),
    (["optimizer=kfac2", "optimizer.coarse_space=foo"], "optimizer.coarse_space: Invalid value"),
    (
        ["model.likelihood=categorical"],
        "model.likelihood: categorical does not fit task=autoencoder",
    ),
    (["-m", "optimizer=sgd,adam", "optimizer.lr=0.1,-1"], "optimizer.lr: got -1"),
    # input gaps of issue 21: additions, schemas as presets, non-finite and out-of-range numbers
    (["+trainer.foo=1"], "trainer.foo: unknown setting"),
    (["++optimizer.foo=1"], "optimizer.foo: unknown setting"),
    (["+foo=1"], "foo: unknown setting"),
    (["optimizer=schema_kfac2"], "optimizer: unknown option 'schema_kfac2'; allowed: adam,"),
    (["model=schema_cnn"], "model: unknown option 'schema_cnn'"),
    (["logger=schema_logger"], "logger: unknown option 'schema_logger'"),
    (["-m", "optimizer=sgd,schema_sgd"], "optimizer: unknown option 'sgd,schema_sgd'"),
    (["optimizer=kfac", "optimizer.damping_period=0"], "optimizer.damping_period: got 0"),
    (["optimizer=kfac", "optimizer.damping_decay=-0.5"], "optimizer.damping_decay: got -0.5"),
    (["optimizer=kfac", "optimizer.lr=inf"], "optimizer.lr: got inf; allowed: a finite"),
    (
        ["results.root=/etc/passwd"],
        "results.root: cannot write run folders under '/etc/passwd' ('/etc/passwd' is a file",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), PREFLIGHT_CASES)
def test_preflight_rejects_with_one_line(
    overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        preflight(overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: ") and expected in err, err


def test_preflight_accepts_valid_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    preflight(["-m", "optimizer=sgd,adam,kfac,kfac2", "trainer.seed=0,1", "model=mnist_ae"])
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        preflight(["trainer.device=cuda"])
    assert "trainer.device: cuda requested but no CUDA device" in capsys.readouterr().err


def test_unwritable_results_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        preflight([f"results.root={blocker / 'results'}"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.root: cannot write run folders under" in err


RUNTIME_CASES = [
    (["trainer.batch_size=100000"], "trainer.batch_size: got 100000; allowed: at most the 400"),
    (["model.dataset=synthetic_images"], "model.dataset: model 'mnist_ae' does not fit dataset"),
    (["trainer.resume=/nonexistent/run"], "trainer.resume: no checkpoint in '/nonexistent/run'"),
]


@pytest.mark.parametrize(("overrides", "expected"), RUNTIME_CASES)
def test_runtime_errors_leave_no_completed_run(
    overrides: list[str],
    expected: str,
    run_job,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(ConfigError) as info:
        run_job(*overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)
    root = tmp_path / "results"
    completed = [f for f in find_run_folders(root)] if root.exists() else []
    assert all(read_run(f).summary["status"] != "completed" for f in completed)


def test_missing_curves_files_name_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    proc = run_cli(
        "model=curves_ae",
        "data.source=folder",
        f"data.root={empty}",
        *FAST[1:],
        f"results.root={tmp_path / 'results'}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(empty) in last and "digs3pts_1.mat" in last
    assert not (tmp_path / "results").exists() or not find_run_folders(tmp_path / "results")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optimizer=nope"], "optimizer: unknown option 'nope'"),
        (["optimizer.lr=-1"], "optimizer.lr: got -1"),
        (["trainer.epoch=1"], "trainer.epoch: unknown setting"),
    ],
)
def test_cli_errors_exit_2_with_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    proc = run_cli(*args, f"results.root={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not find_run_folders(tmp_path)


# ------------------------------------------- every numeric setting of every schema, generated
def _numeric_fields(schema: type) -> list[tuple[str, type]]:
    """(name, int or float) of each numeric field of a schema dataclass (optional ones too)."""
    hints = typing.get_type_hints(schema)
    found = []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if typing.get_origin(hint) not in (None, typing.Union, types.UnionType):
            continue  # lists
        kinds = {t for t in (*typing.get_args(hint), hint) if t in (int, float)}
        if kinds:
            found.append((f.name, float if float in kinds else int))
    return found


def _numeric_settings() -> list[tuple[str, str, type]]:
    """(preset override, setting, int|float) for every numeric field of every config schema."""
    sections = (("trainer", TrainerConfig), ("data", DataConfig), ("logger", LoggerConfig))
    cases = [
        ("model=mnist_ae", f"{prefix}.{name}", kind)
        for prefix, schema in sections
        for name, kind in _numeric_fields(schema)
    ]
    model_presets: dict[type, str] = {}
    for preset in group_options("model"):
        model = OmegaConf.to_object(compose_job([f"model={preset}"]).model)
        model_presets.setdefault(type(model), preset)
    for schema in MODEL_SCHEMAS.values():
        preset = model_presets[schema]
        cases += [(f"model={preset}", f"model.{n}", k) for n, k in _numeric_fields(schema)]
    for name, family in FAMILIES.items():
        fields = _numeric_fields(family.schema)
        cases += [(f"optimizer={name}", f"optimizer.{n}", k) for n, k in fields]
    return cases


NUMERIC = _numeric_settings()
SEEDS = ("trainer.seed", "data.data_seed", "optimizer.seed")  # every integer is a seed
NON_FINITE = [math.inf, -math.inf, math.nan]
BAD_NUMBERS = [
    (preset, setting, value)
    for preset, setting, kind in NUMERIC
    for value in (NON_FINITE if kind is float else []) + ([] if setting in SEEDS else [-1.0])
]


def test_every_numeric_setting_declares_its_range() -> None:
    """The schemas with ranges (core.settings) leave no numeric setting unbounded."""
    schemas = [TrainerConfig, DataConfig, LoggerConfig, *(f.schema for f in FAMILIES.values())]
    for schema in schemas:
        bounded = {f.name for f in numeric_fields(schema)}
        assert bounded == {name for name, _ in _numeric_fields(schema)}, schema.__name__


def test_every_numeric_setting_is_covered() -> None:
    settings = {s for _, s, _ in NUMERIC}
    assert {"optimizer.lr", "optimizer.damping_period", "optimizer.damping_decay"} <= settings
    assert {"trainer.lr_gamma", "model.depth", "optimizer.omega1"} <= settings
    assert len(BAD_NUMBERS) > 80


@functools.cache
def _composed(preset: str) -> DictConfig:
    return compose_job([preset])


@pytest.mark.parametrize(("preset", "setting", "value"), BAD_NUMBERS)
def test_non_finite_and_out_of_range_numbers_are_refused(
    preset: str, setting: str, value: float
) -> None:
    cfg = _composed(preset).copy()
    OmegaConf.update(cfg, setting, int(value) if value == -1 else value)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{setting}: got "), message


def test_sweep_with_missing_data_is_refused_before_submission(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        preflight(
            [
                "-m",
                "model=curves_ae",
                "data.source=folder",
                f"data.root={empty}",
                "optimizer=sgd,adam",
                "launcher=slurm",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err and "digs3pts_1.mat" in err, err


@pytest.mark.slow
def test_help_lists_presets_but_not_schemas() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Config ==")[0]
    assert "optimizer: adam, kfac, kfac2" in groups and "model: " in groups
    assert "schema_" not in groups
