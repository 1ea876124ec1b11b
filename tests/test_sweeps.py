"""Experiment presets, launcher presets and a parallel sweep through the joblib launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from suite import tuning
from suite.preflight import CONF_DIR, compose_job, group_options, optimizer_family
from suite.store import find_run_folders
from suite.validate import validate_config
from tests.conftest import FAST, run_cli

EXPERIMENTS = group_options("experiment")
TUNING_PRESETS = [e for e in EXPERIMENTS if e.startswith("tune_")]
# The arms of a study campaign (docs/study.md): tuning presets of one benchmark each.
STUDY_PRESETS = [e for e in EXPERIMENTS if e.startswith("study_")]
BENCHMARK_PRESETS = [e for e in EXPERIMENTS if not e.startswith(("tune_", "study_"))]
# Pilots (docs/study.md): a source's variant over a study arm's grid, in their own folder.
PILOT_PRESETS = sorted(
    f"pilot/{p.stem}" for p in (CONF_DIR / "experiment" / "pilot").glob("*.yaml")
)
# Reproductions of a paper carry its first author's name; the others are the suite's own studies.
PAPER_PRESETS = [e for e in BENCHMARK_PRESETS if e.startswith(("tselepidis_", "koroko_"))]


def recorded_experiment(preset: str) -> str:
    """The experiment a preset's runs record (its own name: one preset sweeps every optimizer,
    per-optimizer settings in ``optimizer_settings``, suite/optimizer_settings.py)."""
    return preset


def compose_full(overrides: list[str]) -> DictConfig:
    """Compose with the ``hydra`` node (launcher, sweeper) kept."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def sweep_optimizers(cfg: DictConfig) -> list[str]:
    """Optimizer presets a preset's own sweep runs (its default optimizer when it sweeps none)."""
    params = cfg.hydra.sweeper.params or {}
    return str(params.get("optimizer", cfg.hydra.runtime.choices.optimizer)).split(",")


def test_every_paper_preset_has_full_and_small_scale() -> None:
    assert len(PAPER_PRESETS) >= 16
    for name in map(recorded_experiment, PAPER_PRESETS):
        base = name.removesuffix("_small")
        assert base in PAPER_PRESETS and f"{base}_small" in PAPER_PRESETS, name


def test_every_benchmark_preset_has_a_tuning_preset() -> None:
    for name in BENCHMARK_PRESETS:
        assert f"tune_{recorded_experiment(name)}" in TUNING_PRESETS, f"no tuning preset for {name}"
    for name in TUNING_PRESETS:
        assert name.removeprefix("tune_") in BENCHMARK_PRESETS, f"{name} tunes no benchmark"


def names_its_benchmark(cfg: DictConfig) -> bool:
    """The campaign is named after its benchmark preset; a campaign at another training length
    than its benchmark's says so in a suffix (mnist_ae_small_10ep: 10 epochs)."""
    length = f"_{cfg.trainer.epochs}ep"
    return cfg.tuning.study in set(BENCHMARK_PRESETS) | {b + length for b in BENCHMARK_PRESETS}


@pytest.mark.parametrize("name", STUDY_PRESETS)
def test_study_arm_presets_compose_with_their_campaign(name: str) -> None:
    cfg = compose_full([f"experiment={name}"])
    # a later tuning round records its round-1 preset's name, so that their trials join
    first = name.removesuffix("_round2")
    assert cfg.tuning.round == (1 if first == name else 2)
    assert cfg.experiment == first and names_its_benchmark(cfg)
    assert cfg.tuning.arm and cfg.data.val_fraction > 0 and cfg.tuning.stage == "tune"
    validate_config(compose_job([f"experiment={name}"]))  # equal budget: every grid has `budget`


@pytest.mark.parametrize("name", PILOT_PRESETS)
def test_pilot_presets_compose_as_pilots_of_a_study(name: str) -> None:
    record = tuning.tuning_record(name)  # equal budget: the grid has `budget` points
    cfg = compose_job([f"experiment={name}"])
    assert record["stage"] == "pilot" and list(record["grid"]) == [record["arm"]]
    assert names_its_benchmark(cfg)
    assert optimizer_family(record["arm"]) == cfg.optimizer.name == "kfac2"


def family(optimizer: str) -> str:
    """The family (schema ``name``) of an optimizer preset."""
    return optimizer_family(optimizer)


@pytest.mark.parametrize("name", BENCHMARK_PRESETS)
def test_paper_preset_composes_for_every_swept_optimizer(name: str) -> None:
    cfg = compose_full([f"experiment={name}"])
    assert cfg.experiment == recorded_experiment(name)
    assert cfg.scale.value == ("small" if cfg.experiment.endswith("_small") else "full")
    seeds = str(cfg.hydra.sweeper.params["trainer.seed"]).split(",")
    assert len(seeds) >= 3 and len(set(seeds)) == len(seeds)
    optimizers = sweep_optimizers(cfg)
    assert set(optimizers) <= set(group_options("optimizer")), optimizers
    one_per_family = {family(o): o for o in optimizers}  # presets of a family share settings
    for optimizer in one_per_family.values():
        job = compose_job([f"experiment={name}", f"optimizer={optimizer}"])
        validate_config(job)
        assert job.optimizer.name == family(optimizer) and job.scale == cfg.scale


def test_preset_trainer_settings_take_effect() -> None:
    raw = yaml.safe_load((CONF_DIR / "experiment" / "koroko_mnist_ae.yaml").read_text())
    cfg = compose_job(["experiment=koroko_mnist_ae_small"])
    assert cfg.trainer.batch_size == raw["trainer"]["batch_size"] == 512
    assert cfg.trainer.epochs == 15 and cfg.model.activation.value == "relu"


@pytest.mark.parametrize("name", TUNING_PRESETS)
def test_tuning_preset_states_an_equal_budget(name: str) -> None:
    record = tuning.tuning_record(name)
    assert record["stage"] == "tune" and record["rerun_seeds"] >= 5
    swept = sweep_optimizers(compose_full([f"experiment={name.removeprefix('tune_')}"]))
    assert {"sgd", "adam", "kfac", *swept} <= set(record["grid"]), swept
    points = {opt: tuning.grid_points(grid) for opt, grid in record["grid"].items()}
    assert set(points.values()) == {record["budget"]}, points
    assert all("lr" in grid for grid in record["grid"].values())


@pytest.mark.parametrize("name", TUNING_PRESETS)
def test_tuning_preset_matches_its_benchmark(name: str) -> None:
    """Same model, data (but the validation split) and trainer settings as the paper preset."""
    base = name.removeprefix("tune_")
    tuned = compose_job([f"experiment={name}", "optimizer=kfac2"])
    paper = compose_job([f"experiment={base}", "optimizer=kfac2"])
    assert tuned.model == paper.model and tuned.trainer == paper.trainer
    assert tuned.scale == paper.scale and tuned.data.val_fraction > 0
    tuned_data = OmegaConf.to_container(tuned.data)
    paper_data = OmegaConf.to_container(paper.data)
    assert isinstance(tuned_data, dict) and isinstance(paper_data, dict)
    tuned_data.pop("val_fraction")
    paper_data.pop("val_fraction")
    assert tuned_data == paper_data


def test_launcher_presets_select_their_hydra_launcher() -> None:
    local = compose_full(["launcher=local"])
    assert local.hydra.launcher._target_.endswith("BasicLauncher")
    joblib = compose_full(["launcher=joblib"])
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
    assert joblib.hydra.launcher.n_jobs == 2 and joblib.trainer.threads == 1
    slurm = compose_full(["launcher=slurm", "trainer.threads=3"])
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task == 3 and launcher.max_num_timeout >= 1
    assert launcher.signal_delay_s > 0 and launcher.timeout_min > 0
    assert compose_full(["launcher=slurm"]).hydra.launcher.cpus_per_task == 4


@pytest.mark.slow
def test_joblib_sweep_writes_four_completed_runs_with_one_sweep_id(tmp_path: Path) -> None:
    proc = run_cli(
        "-m",
        "launcher=joblib",
        "optimizer=sgd,adam",
        "trainer.seed=0,1",
        *[a for a in FAST if not a.startswith("trainer.epochs")],
        "trainer.epochs=1",
        f"results.root={tmp_path / 'results'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Joblib" in proc.stdout + proc.stderr
    summaries = [json.loads((f / "summary.json").read_text()) for f in find_run_folders(tmp_path)]
    assert sorted((s["optimizer"], s["seed"], s["status"]) for s in summaries) == [
        ("adam", 0, "completed"),
        ("adam", 1, "completed"),
        ("sgd", 0, "completed"),
        ("sgd", 1, "completed"),
    ]
    assert {s["sweep_id"] for s in summaries} == {"sweep"}
    environments = [
        json.loads((f / "environment.json").read_text()) for f in find_run_folders(tmp_path)
    ]
    assert {e["torch_threads"] for e in environments} == {1}  # launcher=joblib: one thread a job
