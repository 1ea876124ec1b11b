"""What a run tells its user, and where the figures of each results folder go (never mixed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyze.__main__ import main as analyze_main
from suite.console import end_of_run_lines, format_duration
from suite.figures_layout import curves_figure, figures_command, figures_folder
from suite.store import CHECKPOINT_FILE, RunStatus, read_run
from tests.test_analyze import EPOCHS, loss_curve, write_run

RUN_ID = "20260101-000000_mnist_ae_kfac2_s0_abcdef"


def _summary(status: RunStatus, **extra: object) -> dict[str, object]:
    return {
        "run_id": RUN_ID,
        "status": status.value,
        "model": "mnist_ae",
        "optimizer": "kfac2",
        "seed": 0,
        "epochs_completed": 10.0,
        "steps_completed": 50,
        "wall_clock_s": 95.0,
        "final_train_loss": 63.8125,
        "final_test_loss": 64.5,
        "error": None,
        **extra,
    }


def test_figures_folder_per_results_folder() -> None:
    assert figures_folder(Path("results/reference")) == Path("figures/reference")
    assert figures_folder(Path("results/runs")) == Path("figures/runs")
    assert figures_folder(Path("/scratch/me/sweep7")) == Path("figures/sweep7")
    assert curves_figure(Path("results/runs"), model="mnist_ae") == Path(
        "figures/runs/mnist_ae_curves.png"
    )
    assert figures_command(Path("results/runs")) == "make figures"
    assert figures_command(Path("/scratch/x")) == "python -m analyze --results /scratch/x"


def test_durations_read_like_a_clock() -> None:
    assert format_duration(4.25) == "4.2 s"
    assert format_duration(187.4) == "3 min 07 s"
    assert format_duration(7500.0) == "2 h 05 min"
    assert format_duration(float("nan")) == "unknown"


def test_completed_block_names_losses_folders_sync_command_and_figure(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "runs" / RUN_ID
    offline = folder / "wandb" / f"offline-run-20260101_000001-{RUN_ID}"
    offline.mkdir(parents=True)
    (folder / "wandb" / "offline-run-20260101_000001-another_run").mkdir()
    lines = end_of_run_lines(
        _summary(RunStatus.COMPLETED),
        run_folder=folder,
        results_root=Path("results/runs"),
        elapsed_s=112.0,
    )
    text = "\n".join(lines)
    assert lines[1] == "run completed: mnist_ae · kfac2 · seed 0 · 10 epochs (50 steps)"
    assert "final loss   train 63.81   test 64.5" in text
    assert "wall time    1 min 52 s (1 min 35 s in training steps)" in text
    assert f"run folder   {folder}" in text
    assert f"W&B offline  {offline}" in text
    assert f"upload: wandb sync {offline}\n" in text + "\n"  # this run's folder only
    assert "figure       figures/runs/mnist_ae_curves.png  (built by `make figures`)" in text
    assert len(lines) <= 10  # one short block


def test_other_endings_say_why_and_what_next(tmp_path: Path) -> None:
    folder = tmp_path / RUN_ID
    folder.mkdir()
    args = {"run_folder": folder, "results_root": tmp_path, "elapsed_s": 3.0}
    diverged = "\n".join(
        end_of_run_lines(
            _summary(RunStatus.DIVERGED, error="batch loss nan at step 7"),
            **args,  # type: ignore[arg-type]
        )
    )
    assert "run diverged" in diverged and "reason       batch loss nan at step 7" in diverged
    assert f"python -m analyze --results {tmp_path}" in diverged  # diverged runs are plotted
    assert "W&B" not in diverged  # no offline folder: nothing to sync
    interrupted = _summary(RunStatus.INTERRUPTED, error="stopped by signal 15")
    no_checkpoint = "\n".join(end_of_run_lines(interrupted, **args))  # type: ignore[arg-type]
    assert "resume" not in no_checkpoint and "figure" not in no_checkpoint
    (folder / CHECKPOINT_FILE).write_bytes(b"")
    resumable = "\n".join(end_of_run_lines(interrupted, **args))  # type: ignore[arg-type]
    assert f"resume       add trainer.resume={folder} to the same command" in resumable
    failed = "\n".join(
        end_of_run_lines(
            _summary(RunStatus.FAILED, error="RuntimeError: boom", final_test_loss=None),
            **args,  # type: ignore[arg-type]
        )
    )
    assert "run failed" in failed and "test n/a" in failed and "figure" not in failed


def test_a_run_prints_its_block_and_no_progress_bar_off_a_terminal(
    run_job: Callable[..., tuple[RunStatus, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    status, folder = run_job("optimizer=sgd", "trainer.progress=true")  # the block is the same
    out, err = capsys.readouterr()
    assert status is RunStatus.COMPLETED
    summary = read_run(folder).summary
    block = out[out.index("run completed") :]
    assert f"run folder   {folder}" in block
    assert (
        f"train {summary['final_train_loss']:.4g}   test {summary['final_test_loss']:.4g}" in block
    )
    root = folder.parent
    assert f"figure       {curves_figure(root, model='mnist_ae')}" in block
    assert "W&B" not in block  # logger=none
    assert "step/s" not in err and "s/step" not in err and "%|" not in err  # stderr is not a tty


def _runs(root: Path, prefix: str, finals: tuple[float, ...]) -> None:
    epochs = np.arange(EPOCHS + 1, dtype=float)
    for seed, final in enumerate(finals):
        write_run(
            root,
            f"{prefix}_s{seed}",
            key=("mnist_ae", "mnist-5k", "kfac2", "kfac2"),
            seed=seed,
            status="completed",
            train=loss_curve(final, epochs),
            wall=epochs,
        )


def test_figures_of_reference_and_user_runs_stay_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _runs(Path("results/reference"), "ref", (40.0, 41.0, 42.0))
    _runs(Path("results/runs"), "mine", (55.0,))
    assert analyze_main(["--quiet", "--bootstrap", "20", "--axes", "epoch"]) == 0
    assert analyze_main(["--quiet", "--bootstrap", "20", "--axes", "epoch", "--results",
                         "results/runs"]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("results/reference: 3 runs; wrote ")
    assert printed[1].startswith("results/runs: 1 runs; wrote ")
    assert printed[1].endswith("files into figures/runs/ (start with figures/runs/report.md)")
    reference = pd.read_csv("figures/reference/runs.csv")
    mine = pd.read_csv("figures/runs/runs.csv")
    assert sorted(reference["run_id"]) == ["ref_s0", "ref_s1", "ref_s2"]
    assert list(mine["run_id"]) == ["mine_s0"]
    # The figure the end-of-run block names is the one the build wrote.
    assert curves_figure(Path("results/runs"), model="mnist_ae").is_file()
    assert curves_figure(Path("results/reference"), model="mnist_ae").is_file()
    assert sorted(os.listdir("figures")) == ["reference", "runs"]
