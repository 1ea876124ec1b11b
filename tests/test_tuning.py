"""Tuning protocol: selection on validation loss, budget checks, rerun commands (suite.tuning)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.errors import ConfigError
from suite import tuning
from suite.preflight import compose_job
from suite.store import RunFolder, RunRecord
from suite.train import POINTER_FILE

SWEEP = "tune_x-20260101-000000"
GRID = {"sgd": {"lr": [0.01, 0.1]}, "kfac": {"lr": [0.01, 0.1], "damping": [0.001]}}
RECORD = {"protocol": "equal-budget grid", "stage": "tune", "budget": 2, "grid": GRID}


def write_run(
    root: Path,
    name: str,
    *,
    optimizer: str,
    status: str = "completed",
    val_loss: float | None = 1.0,
    hp: dict[str, Any] | None = None,
    sweep: str = SWEEP,
    experiment: str | None = "tune_x",
    seed: int = 0,
    record: dict[str, Any] | None = RECORD,
    multirun: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """A run folder as suite.train writes it (and, optionally, its Hydra job dir)."""
    folder = RunFolder.create(root, name)
    folder.write_config("{}\n")
    folder.write_environment({})
    record_metrics = RunRecord(evals=[{"step": 1, "val_loss": val_loss or math.nan}])
    folder.write_metrics(record_metrics)
    folder.write_summary(
        {
            "run_id": name,
            "sweep_id": sweep,
            "experiment": experiment,
            "status": status,
            "model": "mnist_ae",
            "optimizer": optimizer,
            "seed": seed,
            "final_val_loss": val_loss,
            "hyperparameters": {"name": optimizer, "momentum": 0.9, **(hp or {})},
            "tuning": record,
        }
    )
    if multirun is not None:
        job = multirun / sweep / name
        (job / ".hydra").mkdir(parents=True)
        (job / POINTER_FILE).write_text(str(folder.path.resolve()) + "\n")
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    return folder.path


def full_grid(root: Path, **kwargs: Any) -> None:
    """Two trials per optimizer; sgd lr=0.1 and kfac lr=0.01 are the best completed trials."""
    write_run(root, "a_sgd_lr0.01", optimizer="sgd", val_loss=0.50, hp={"lr": 0.01}, **kwargs)
    write_run(root, "b_sgd_lr0.1", optimizer="sgd", val_loss=0.40, hp={"lr": 0.1}, **kwargs)
    hp = {"damping": 0.001}
    write_run(root, "c_kfac_lr0.01", optimizer="kfac", val_loss=0.30, hp={"lr": 0.01, **hp})
    diverged = {"status": "diverged", "val_loss": 0.10}
    write_run(root, "d_kfac_lr0.1", optimizer="kfac", hp={"lr": 0.1, **hp}, **diverged)


def by_optimizer(selections: list[tuning.Selection]) -> dict[str, tuning.Selection]:
    return {s.optimizer: s for s in selections}


def test_lowest_final_val_loss_wins_and_diverged_runs_lose(tmp_path: Path) -> None:
    full_grid(tmp_path)
    chosen = by_optimizer(tuning.select_best(tuning.collect_trials(tmp_path, [SWEEP])))
    assert chosen["sgd"].best_run == "b_sgd_lr0.1" and chosen["sgd"].best_val_loss == 0.40
    assert chosen["sgd"].hyperparameters == {"lr": 0.1}
    # the diverged trial had the lower last validation loss but must lose
    assert chosen["kfac"].best_run == "c_kfac_lr0.01"
    assert chosen["kfac"].hyperparameters == {"damping": 0.001, "lr": 0.01}
    assert chosen["kfac"].statuses == {"completed": 1, "diverged": 1}
    assert chosen["kfac"].budget == 2 and chosen["kfac"].trials == 2


def test_other_sweeps_final_reruns_edge_checks_and_pilots_are_ignored(tmp_path: Path) -> None:
    full_grid(tmp_path)
    write_run(tmp_path, "e_other", optimizer="sgd", val_loss=0.01, hp={"lr": 1.0}, sweep="other")
    final = {**RECORD, "stage": "final"}
    write_run(tmp_path, "f_final", optimizer="sgd", val_loss=0.01, hp={"lr": 1.0}, record=final)
    edge = {**RECORD, "stage": "extension"}  # a grid-edge check: reported, never selected
    write_run(tmp_path, "g_edge", optimizer="sgd", val_loss=0.01, hp={"lr": 2.0}, record=edge)
    pilot = {**RECORD, "stage": "pilot"}  # checks a design choice: reported, never selected
    write_run(tmp_path, "h_pilot", optimizer="sgd", val_loss=0.01, hp={"lr": 0.3}, record=pilot)
    chosen = by_optimizer(tuning.select_best(tuning.collect_trials(tmp_path, [SWEEP])))
    assert chosen["sgd"].best_run == "b_sgd_lr0.1" and chosen["sgd"].trials == 2


def test_unequal_or_unfinished_budget_is_refused_unless_allowed(tmp_path: Path) -> None:
    full_grid(tmp_path)
    write_run(tmp_path, "g_extra", optimizer="sgd", val_loss=0.2, hp={"lr": 1.0})
    trials = tuning.collect_trials(tmp_path, [SWEEP])
    with pytest.raises(ConfigError, match="sgd: 3 trial"):
        tuning.select_best(trials)
    chosen = by_optimizer(tuning.select_best(trials, allow_incomplete=True))
    assert chosen["sgd"].best_run == "g_extra"
    assert any("budget is 2" in note for note in chosen["sgd"].notes)


def test_running_trial_makes_the_budget_unfinished(tmp_path: Path) -> None:
    write_run(tmp_path, "a", optimizer="sgd", val_loss=0.5, hp={"lr": 0.01})
    write_run(tmp_path, "b", optimizer="sgd", status="running", val_loss=0.1, hp={"lr": 0.1})
    trials = tuning.collect_trials(tmp_path, [SWEEP])
    with pytest.raises(ConfigError, match="unfinished"):
        tuning.select_best(trials)
    (chosen,) = tuning.select_best(trials, allow_incomplete=True)
    assert chosen.best_run == "a"


def test_all_trials_lost_gives_no_winner_and_no_command(tmp_path: Path) -> None:
    write_run(tmp_path, "a", optimizer="sgd", status="diverged", val_loss=None, hp={"lr": 1.0})
    write_run(tmp_path, "b", optimizer="sgd", status="failed", val_loss=None, hp={"lr": 10.0})
    write_run(tmp_path, "c", optimizer="adam", val_loss=0.3, hp={"lr": 1e-3})
    write_run(tmp_path, "d", optimizer="adam", val_loss=0.2, hp={"lr": 1e-2})
    trials = tuning.collect_trials(tmp_path, [SWEEP])
    selections = tuning.select_best(trials)
    tuning.plan_reruns(
        selections, trials, results=tmp_path, seeds=5, multirun_root=tmp_path / "m", launcher=None
    )
    chosen = by_optimizer(selections)
    assert chosen["sgd"].best_run is None and chosen["sgd"].command == []
    assert chosen["adam"].best_run == "d" and chosen["adam"].command


def test_missing_validation_loss_names_the_setting(tmp_path: Path) -> None:
    write_run(tmp_path, "a", optimizer="sgd", val_loss=None, hp={"lr": 0.01})
    with pytest.raises(ConfigError, match=r"^data\.val_fraction"):
        tuning.select_best(tuning.collect_trials(tmp_path, [SWEEP]))
    with pytest.raises(ConfigError, match="no runs of sweep"):
        tuning.collect_trials(tmp_path, ["nope"])


def test_without_a_recorded_grid_the_varying_settings_are_swept(tmp_path: Path) -> None:
    for name, lr, loss in (("a", 0.01, 0.3), ("b", 0.1, 0.2)):
        write_run(tmp_path, name, optimizer="sgd", val_loss=loss, hp={"lr": lr}, record=None)
    (chosen,) = tuning.select_best(tuning.collect_trials(tmp_path, [SWEEP]))
    assert chosen.hyperparameters == {"lr": 0.1} and chosen.budget is None


def test_rerun_keeps_the_winners_overrides_with_fresh_seeds(tmp_path: Path) -> None:
    multirun = tmp_path / "multirun"
    base = ["experiment=tune_x", "optimizer=sgd", "trainer.epochs=3", "trainer.seed=0"]
    for name, lr, loss in (("a", 0.01, 0.3), ("b", 0.1, 0.2)):
        write_run(
            tmp_path / "results",
            name,
            optimizer="sgd",
            val_loss=loss,
            hp={"lr": lr},
            seed=2,
            multirun=multirun,
            overrides=[*base, f"optimizer.lr={lr}", "launcher=joblib"],
        )
    trials = tuning.collect_trials(tmp_path / "results", [SWEEP])
    selections = tuning.select_best(trials)
    tuning.plan_reruns(
        selections,
        trials,
        results=tmp_path / "results",
        seeds=5,
        multirun_root=multirun,
        launcher="slurm",
    )
    (chosen,) = selections
    assert chosen.rerun_seeds == [3, 4, 5, 6, 7]  # after the tuning seed 2
    args = chosen.command[chosen.command.index("-m") + 1 :]
    assert "optimizer.lr=0.1" in args and "trainer.epochs=3" in args
    assert "trainer.seed=3,4,5,6,7" in args and "trainer.seed=0" not in args
    assert "launcher=slurm" in args and "launcher=joblib" not in args
    assert "tuning.stage=final" in args and f"tuning.source_sweep={SWEEP}" in args
    assert f"hydra.sweep.dir={multirun / (SWEEP + '-final')}" in args
    assert not chosen.notes


def test_rerun_without_job_dir_is_rebuilt_from_the_summary(tmp_path: Path) -> None:
    full_grid(tmp_path)
    trials = tuning.collect_trials(tmp_path, [SWEEP])
    selections = tuning.select_best(trials)
    tuning.plan_reruns(
        selections,
        trials,
        results=tmp_path,
        seeds=None,
        multirun_root=tmp_path / "m",
        launcher=None,
    )
    kfac = by_optimizer(selections)["kfac"]
    args = kfac.command[kfac.command.index("-m") + 1 :]
    assert args[:2] == ["experiment=tune_x", "optimizer=kfac"]
    assert "optimizer.lr=0.01" in args and "optimizer.damping=0.001" in args
    assert "trainer.seed=1,2,3,4,5" in args  # default: 5 seeds
    assert any("job dir not found" in note for note in kfac.notes)


ROUND2 = "tune_x-20260102-000000"


def round_two(root: Path, *, sgd_loss: float) -> None:
    """A second tuning round (budget 1, one new point per optimizer) of the same experiment."""
    record = {**RECORD, "budget": 1, "round": 2, "grid": {"sgd": {"lr": [1.0]}}}
    write_run(
        root,
        "r2_sgd",
        optimizer="sgd",
        val_loss=sgd_loss,
        hp={"lr": 1.0},
        sweep=ROUND2,
        record=record,
    )
    kfac = {**record, "grid": {"kfac": {"lr": [1.0], "damping": [0.001]}}}
    write_run(
        root, "r2_kfac", optimizer="kfac", val_loss=0.9, hp={"lr": 1.0, "damping": 0.001},
        sweep=ROUND2, record=kfac,
    )  # fmt: skip


def test_a_second_round_adds_its_budget_and_can_change_the_winner(tmp_path: Path) -> None:
    full_grid(tmp_path)
    round_two(tmp_path, sgd_loss=0.05)
    chosen = by_optimizer(tuning.select_best(tuning.collect_trials(tmp_path, [ROUND2, SWEEP])))
    assert chosen["sgd"].budget == 3 and chosen["sgd"].trials == 3
    assert chosen["sgd"].best_run == "r2_sgd" and chosen["sgd"].hyperparameters == {"lr": 1.0}
    assert chosen["kfac"].best_run == "c_kfac_lr0.01"  # round 2 did worse: the winner stays
    # one round alone is an incomplete budget only when its own count is short
    assert (
        by_optimizer(tuning.select_best(tuning.collect_trials(tmp_path, [ROUND2])))["sgd"].budget
        == 1
    )


def test_a_round_that_repeats_a_point_is_refused(tmp_path: Path) -> None:
    full_grid(tmp_path)
    record = {**RECORD, "budget": 1, "round": 2, "grid": {"sgd": {"lr": [0.1]}}}
    write_run(tmp_path, "r2", optimizer="sgd", val_loss=0.3, hp={"lr": 0.1}, sweep=ROUND2,
              record=record)  # fmt: skip
    trials = [t for t in tuning.collect_trials(tmp_path, [ROUND2, SWEEP]) if t.optimizer == "sgd"]
    with pytest.raises(ConfigError, match=r"1 trial\(s\) repeat another trial's settings"):
        tuning.select_best(trials)


def test_stored_reruns_of_an_unchanged_winner_are_not_run_again(tmp_path: Path) -> None:
    full_grid(tmp_path)
    round_two(tmp_path, sgd_loss=0.05)
    final = {**RECORD, "stage": "final", "source_sweep": SWEEP}
    for seed in (1, 2, 3):  # kfac's round-1 winner was rerun on seeds 1-3 already
        write_run(
            tmp_path, f"f_kfac_{seed}", optimizer="kfac", hp={"lr": 0.01, "damping": 0.001},
            seed=seed, record=final,
        )  # fmt: skip
    # a rerun of another setting, or selected from another sweep, does not count
    write_run(tmp_path, "f_other", optimizer="kfac", hp={"lr": 0.1, "damping": 0.001}, seed=4,
              record=final)  # fmt: skip
    elsewhere = {**final, "source_sweep": "other"}
    write_run(tmp_path, "f_else", optimizer="kfac", hp={"lr": 0.01, "damping": 0.001}, seed=5,
              record=elsewhere)  # fmt: skip
    trials = tuning.collect_trials(tmp_path, [ROUND2, SWEEP])
    selections = tuning.select_best(trials)
    multirun = tmp_path / "m"
    tuning.plan_reruns(
        selections, trials, results=tmp_path, seeds=5, multirun_root=multirun, launcher=None
    )
    chosen = by_optimizer(selections)
    kfac, sgd = chosen["kfac"], chosen["sgd"]
    assert kfac.rerun_seeds == [1, 2, 3, 4, 5] and kfac.stored_seeds == [1, 2, 3]
    args = kfac.command[kfac.command.index("-m") + 1 :]
    assert "trainer.seed=4,5" in args and f"tuning.source_sweep={SWEEP}" in args
    assert f"hydra.sweep.dir={multirun / (SWEEP + '-final')}" in args
    # sgd's winner comes from round 2: its reruns go to that round's final folder
    args = sgd.command[sgd.command.index("-m") + 1 :]
    assert f"hydra.sweep.dir={multirun / (ROUND2 + '-final')}" in args
    assert "trainer.seed=1,2,3,4,5" in args
    # once every seed is stored, nothing is run
    for seed in (4, 5):
        write_run(
            tmp_path, f"f_kfac_{seed}", optimizer="kfac", hp={"lr": 0.01, "damping": 0.001},
            seed=seed, record=final,
        )  # fmt: skip
    selections = tuning.select_best(trials)
    tuning.plan_reruns(
        selections, trials, results=tmp_path, seeds=5, multirun_root=multirun, launcher=None
    )
    kfac = by_optimizer(selections)["kfac"]
    assert kfac.command == [] and kfac.stored_seeds == [1, 2, 3, 4, 5]
    assert any("already stored" in note for note in kfac.notes)


def test_grid_budget_must_be_equal_for_every_optimizer() -> None:
    tuning.check_record(RECORD)
    unequal = {**RECORD, "grid": {**GRID, "adam": {"lr": [1e-3, 1e-2, 1e-1]}}}
    with pytest.raises(ConfigError, match=r"^tuning\.grid\.adam: has 3 points but the budget is 2"):
        tuning.check_record(unequal)
    with pytest.raises(ConfigError, match=r"^tuning\.budget"):
        tuning.check_record({**RECORD, "budget": 0})
    with pytest.raises(ConfigError, match=r"^--seeds"):
        tuning.rerun_seeds([0], 0)


def test_tune_commands_share_one_sweep_and_cover_each_grid(tmp_path: Path) -> None:
    commands = tuning.tune_commands("tune_x", RECORD, sweep_dir=tmp_path / "s", overrides=["a=1"])
    assert len(commands) == len(GRID)
    for command, (optimizer, grid) in zip(commands, GRID.items(), strict=True):
        assert f"optimizer={optimizer}" in command and "a=1" in command
        assert f"hydra.sweep.dir={tmp_path / 's'}" in command
        for key, values in grid.items():
            assert f"optimizer.{key}=" + ",".join(repr(v) for v in values) in command


def test_cli_select_writes_the_selection_and_prints_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full_grid(tmp_path / "results")
    out = tmp_path / "sel.json"
    argv = ["select", "--results", str(tmp_path / "results"), "--sweep", SWEEP, "--out", str(out)]
    assert tuning.main([*argv, "--multirun", str(tmp_path / "m")]) == 0
    stored = json.loads(out.read_text())
    assert stored["sweeps"] == [SWEEP] and "validation loss" in stored["rule"]
    winners = {s["optimizer"]: s["best_run"] for s in stored["selections"]}
    assert winners == {"kfac": "c_kfac_lr0.01", "sgd": "b_sgd_lr0.1"}
    printed = capsys.readouterr().out
    assert "optimizer=kfac" in printed and "trainer.seed=1,2,3,4,5" in printed
    assert tuning.main(["select", "--results", str(tmp_path / "results"), "--sweep", "x"]) == 2


ROUND2_PRESETS = sorted(
    p.stem for p in (tuning.REPO / "conf" / "experiment").glob("study_*_round2.yaml")
)


@pytest.mark.parametrize("preset", ROUND2_PRESETS)
def test_a_round_two_preset_extends_its_round_one_with_new_points_only(preset: str) -> None:
    """A round-2 preset keeps round 1's experiment name (its trials must join round 1's
    selection) and adds only points round 1 did not spend."""
    first = preset.removesuffix("_round2")
    later, earlier = tuning.tuning_record(preset), tuning.tuning_record(first)
    assert later["round"] == 2 and earlier["round"] == 1
    assert compose_job([f"experiment={preset}"]).experiment == first
    assert later["grid"].keys() == earlier["grid"].keys()
    for optimizer, grid in later["grid"].items():
        old = {repr(p) for p in tuning.grid_combinations(earlier["grid"][optimizer])}
        new = {repr(p) for p in tuning.grid_combinations(grid)}
        assert not old & new, f"{preset}: {optimizer} repeats round-1 points {old & new}"


def test_every_arm_of_a_study_gets_the_same_round_two_budget() -> None:
    budgets: dict[str, set[int]] = {}
    for preset in ROUND2_PRESETS:
        record = tuning.tuning_record(preset)
        budgets.setdefault(str(record["study"]), set()).add(int(record["budget"]))
    assert budgets and all(len(b) == 1 for b in budgets.values()), budgets
