"""End-to-end runs through the command line and the in-process loop."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from suite.store import RunStatus, find_run_folders, read_run
from tests.conftest import FAST, run_cli

pytestmark = pytest.mark.slow


def _metrics(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = read_run(folder)
    steps = run.steps.drop(columns=["step_time_s", "wall_time_s"])
    evals = run.evals.drop(columns=["wall_time_s"])
    return steps, evals


def test_cli_adam_writes_complete_run_and_is_deterministic(tmp_path: Path) -> None:
    args = ["optimizer=adam", "model=mnist_ae", "trainer.epochs=1", "logger=none"]
    for _ in range(2):
        proc = run_cli(*args, f"results.root={tmp_path}", "hydra.run.dir=" + str(tmp_path / "h"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = find_run_folders(tmp_path)
    for folder in (first, second):
        run = read_run(folder)
        assert run.summary["status"] == "completed"
        assert run.summary["optimizer"] == "adam" and run.summary["model"] == "mnist_ae"
        assert run.summary["data_variant"] in {"mnist-full", "mnist-5k"}
        assert run.summary["code_version"]
        assert run.environment["torch_threads"] >= 1 and run.environment["packages"]["torch"]
        assert run.evals["step"].iloc[-1] == run.summary["steps_completed"] > 0
        assert (folder / "config.yaml").read_text().count("adam") >= 1
    steps_a, evals_a = _metrics(first)
    steps_b, evals_b = _metrics(second)
    pd.testing.assert_frame_equal(steps_a, steps_b)
    pd.testing.assert_frame_equal(evals_a, evals_b)
    assert evals_a["train_loss"].iloc[-1] < evals_a["train_loss"].iloc[0]


def test_cli_multirun_writes_one_folder_per_job_with_shared_sweep(tmp_path: Path) -> None:
    proc = run_cli(
        "-m",
        "optimizer=sgd,adam",
        "trainer.seed=0,1",
        *[a for a in FAST if not a.startswith("trainer.epochs")],
        "trainer.epochs=1",
        f"results.root={tmp_path / 'results'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    folders = find_run_folders(tmp_path / "results")
    assert len(folders) == 4
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    assert {s["status"] for s in summaries} == {"completed"}
    assert len({s["sweep_id"] for s in summaries}) == 1 and summaries[0]["sweep_id"] == "sweep"
    assert sorted((s["optimizer"], s["seed"]) for s in summaries) == [
        ("adam", 0),
        ("adam", 1),
        ("sgd", 0),
        ("sgd", 1),
    ]


def test_sweep_with_a_diverging_job_completes_the_others(tmp_path: Path) -> None:
    proc = run_cli(
        "-m",
        "optimizer=sgd",
        "optimizer.lr=0.01,1e9",
        *FAST,
        f"results.root={tmp_path / 'results'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = {
        json.loads((f / "summary.json").read_text())["hyperparameters"]["lr"]: read_run(f)
        for f in find_run_folders(tmp_path / "results")
    }
    diverged, fine = summaries[1e9], summaries[0.01]
    assert diverged.summary["status"] == RunStatus.DIVERGED.value
    assert diverged.summary["diverged_step"] >= 1
    assert fine.summary["status"] == RunStatus.COMPLETED.value
    assert fine.summary["steps_completed"] == 8


def test_in_process_run_records_identity_and_per_output_loss(run_job) -> None:  # type: ignore[no-untyped-def]
    status, folder = run_job("optimizer=sgd", "trainer.seed=7")
    assert status is RunStatus.COMPLETED
    run = read_run(folder)
    assert run.summary["seed"] == 7
    assert run.summary["data_variant"].endswith("sub400")  # a subset is never passed off as full
    last = run.evals.iloc[-1]
    assert last["train_loss_per_output"] == pytest.approx(last["train_loss"] / 784)
    assert len(run.steps) == 8 and run.steps["epoch"].iloc[-1] == 2.0


def test_each_epoch_visits_every_example_once_in_a_new_order(tmp_path: Path) -> None:
    from suite.preflight import compose_with_choices
    from suite.train import RunContext, Trainer

    cfg, choices = compose_with_choices([*FAST, "optimizer=sgd", f"results.root={tmp_path}"])
    trainer = Trainer(cfg, RunContext(choices["model"], choices["optimizer"]))
    seen: list[torch.Tensor] = []
    original = trainer._step

    def spy(x: torch.Tensor, target: torch.Tensor) -> float:
        seen.append(x.reshape(x.shape[0], -1).sum(dim=1))
        return original(x, target)

    trainer._step = spy  # type: ignore[method-assign]
    assert trainer.run() is RunStatus.COMPLETED
    train_sums = trainer.data.train.x.reshape(400, -1).sum(dim=1)
    epochs = [torch.cat(seen[:4]), torch.cat(seen[4:])]
    for epoch in epochs:
        assert torch.equal(epoch.sort().values, train_sums.sort().values)
    assert not torch.equal(epochs[0], epochs[1])
