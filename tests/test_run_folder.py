"""A run folder owns its config, its job and its lock; finished runs are tidy and shareable."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

import suite.train
from core.errors import ConfigError
from suite.preflight import compose_with_choices
from suite.store import RunStatus, read_run
from suite.train import RunContext, run
from suite.wandb_logger import NullLogger, SafeLogger
from tests.conftest import FAST, REPO, run_cli

STEPS_PER_EPOCH = 4  # data.max_train=400, batch 100


class StopAt(NullLogger):
    """A logger that sends the process SIGTERM when step ``at`` is logged (step_every=1)."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.rows: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        self.rows.append({**metrics, "step": step})
        if step == self.at and "batch_loss" in metrics:
            signal.raise_signal(signal.SIGTERM)


def job(
    *overrides: str,
    root: Path,
    job_dir: Path | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
    stop_at: int | None = None,
) -> tuple[RunStatus, RunContext]:
    """Run one job in-process as run.py would (the CLI overrides recorded in its context)."""
    given = [*FAST, "logger.step_every=1", *overrides]
    if monkeypatch is not None:
        logger = StopAt(stop_at)
        monkeypatch.setattr(suite.train, "make_logger", lambda *a, **k: logger)
    cfg, choices = compose_with_choices([*given, f"results.root={root}"])
    ctx = RunContext(
        model_preset=choices["model"],
        optimizer_preset=choices["optimizer"],
        job_dir=job_dir,
        overrides=given,
    )
    return run(cfg, ctx).status, ctx


def comparable(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    stored = read_run(folder)
    return (
        stored.steps.drop(columns=["step_time_s", "wall_time_s"]),
        stored.evals.drop(columns=["wall_time_s"]),
    )


def assert_same_metrics(ours: Path, reference: Path) -> None:
    for a, b in zip(comparable(ours), comparable(reference), strict=True):
        pd.testing.assert_frame_equal(a, b)


def stored_config(folder: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((folder / "config.yaml").read_text()))


@pytest.fixture(scope="module")
def interrupted_kfac(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K-FAC run stopped by SIGTERM after 3 of its 8 steps (checkpoint, status interrupted)."""
    root = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as mp:
        status, ctx = job("optimizer=kfac", root=root, monkeypatch=mp, stop_at=3)
    assert status is RunStatus.INTERRUPTED and ctx.run_folder is not None
    assert read_run(ctx.run_folder).summary["steps_completed"] == 3
    return ctx.run_folder


@pytest.fixture(scope="module")
def reference_kfac(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted K-FAC runs of 2 and 3 epochs."""
    root = tmp_path_factory.mktemp("reference")
    folders = {}
    for epochs in (2, 3):
        status, ctx = job("optimizer=kfac", f"trainer.epochs={epochs}", root=root)
        assert status is RunStatus.COMPLETED and ctx.run_folder is not None
        folders[epochs] = ctx.run_folder
    return folders


def copy_run(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / folder.name
    shutil.copytree(folder, target)
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------ 1. a run folder owns its config
def test_resume_continues_with_the_runs_own_config(
    interrupted_kfac: Path, reference_kfac: dict[int, Path], tmp_path: Path
) -> None:
    folder = copy_run(interrupted_kfac, tmp_path)
    # No optimizer named: the composed config is the default two-level K-FAC, the run's is K-FAC.
    status, ctx = job(f"trainer.resume={folder}", root=tmp_path / "unused")
    assert status is RunStatus.COMPLETED and ctx.run_folder == folder
    summary = read_run(folder).summary
    config = stored_config(folder)
    assert summary["optimizer"] == "kfac" and summary["optimizer_family"] == "kfac"
    assert summary["hyperparameters"] == config["optimizer"]
    assert summary["steps_completed"] == 2 * STEPS_PER_EPOCH
    assert config["trainer"]["resume"] is None
    assert_same_metrics(folder, reference_kfac[2])
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    "override",
    [
        "optimizer=adam",  # another family
        "optimizer=kfac2",  # another preset
        "optimizer.lr=0.5",  # a hyperparameter
        "trainer.epochs=1",  # fewer epochs
        "trainer.max_steps=2",  # fewer steps
        "model=deep_linear",  # another model
        "trainer.seed=3",
        "data.max_train=300",
    ],
)
def test_resume_refuses_overrides_that_change_the_run(
    override: str, interrupted_kfac: Path, tmp_path: Path
) -> None:
    folder = copy_run(interrupted_kfac, tmp_path)
    before = snapshot(folder)
    with pytest.raises(ConfigError) as info:
        job(f"trainer.resume={folder}", override, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("trainer.resume: ")
    assert override in message and "owns its config" in message
    assert snapshot(folder) == before  # summary, config, metrics and checkpoint untouched


def test_resume_with_more_epochs_extends_config_summary_and_metrics_together(
    interrupted_kfac: Path, reference_kfac: dict[int, Path], tmp_path: Path
) -> None:
    folder = copy_run(interrupted_kfac, tmp_path)
    status, _ = job("optimizer=kfac", f"trainer.resume={folder}", "trainer.epochs=3", root=tmp_path)
    assert status is RunStatus.COMPLETED
    stored = read_run(folder)
    assert stored_config(folder)["trainer"]["epochs"] == 3
    assert stored.summary["steps_completed"] == 3 * STEPS_PER_EPOCH
    assert stored.summary["epochs_completed"] == 3.0
    assert stored.steps["step"].tolist() == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert_same_metrics(folder, reference_kfac[3])


def test_completed_run_extends_only_with_its_kept_checkpoint(tmp_path: Path) -> None:
    status, ctx = job("optimizer=sgd", "trainer.keep_checkpoint=true", root=tmp_path)
    assert status is RunStatus.COMPLETED and ctx.run_folder is not None
    folder = ctx.run_folder
    with pytest.raises(ConfigError, match="already completed"):
        job("optimizer=sgd", f"trainer.resume={folder}", root=tmp_path)
    status, _ = job(f"trainer.resume={folder}", "trainer.epochs=3", root=tmp_path)
    assert status is RunStatus.COMPLETED
    assert read_run(folder).summary["steps_completed"] == 3 * STEPS_PER_EPOCH
    assert stored_config(folder)["trainer"]["epochs"] == 3


@pytest.mark.slow
def test_cli_resume_with_a_changed_setting_exits_2_with_one_line(
    interrupted_kfac: Path, tmp_path: Path
) -> None:
    folder = copy_run(interrupted_kfac, tmp_path)
    before = snapshot(folder)
    proc = run_cli(f"trainer.resume={folder}", "optimizer.lr=0.5", f"hydra.run.dir={tmp_path}/h")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.resume: ") and "optimizer.lr=0.5" in last
    assert snapshot(folder) == before


# ------------------------------------------------ 2. automatic resume of the job's own run only
def test_fixed_job_dir_resumes_only_the_same_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_dir, root = tmp_path / "hydra", tmp_path / "results"
    first = ["optimizer=kfac2", "optimizer.cov_period=1", "optimizer.inv_period=1"]
    status, ctx = job(*first, root=root, job_dir=job_dir, monkeypatch=monkeypatch, stop_at=2)
    assert status is RunStatus.INTERRUPTED and ctx.run_folder is not None
    interrupted = ctx.run_folder
    before = snapshot(interrupted)
    # Another configuration in the same Hydra folder starts a fresh run.
    other = ["optimizer=sgd", "optimizer.lr=0.05", "trainer.seed=7"]
    status, ctx = job(*other, root=root, job_dir=job_dir, monkeypatch=monkeypatch)
    assert status is RunStatus.COMPLETED and ctx.run_folder not in (None, interrupted)
    assert read_run(ctx.run_folder).summary["optimizer"] == "sgd"  # type: ignore[arg-type]
    assert snapshot(interrupted) == before
    # The same configuration again (a requeue) continues its own run.
    status, ctx = job(*first, root=root, job_dir=job_dir, monkeypatch=monkeypatch)
    assert status is RunStatus.COMPLETED and ctx.run_folder == interrupted
    assert read_run(interrupted).summary["steps_completed"] == 2 * STEPS_PER_EPOCH


# ------------------------------------------------------------------- 4. one writer per folder
HOLD_LOCK = """
import sys
from suite.store import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
"""


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(
    interrupted_kfac: Path, tmp_path: Path
) -> None:
    folder = copy_run(interrupted_kfac, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(folder)
        with pytest.raises(ConfigError) as info:
            job("optimizer=kfac", f"trainer.resume={folder}", root=tmp_path)
        message = str(info.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "in use" in message
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert (folder / ".lock").exists()  # left behind by the killed holder
    status, _ = job("optimizer=kfac", f"trainer.resume={folder}", root=tmp_path)
    assert status is RunStatus.COMPLETED
    assert not (folder / ".lock").exists()


# ------------------------------------------------------------- 5. tidy and shareable folders
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_files_follow_the_umask_and_completed_runs_drop_their_checkpoint(
    umask: int, tmp_path: Path
) -> None:
    previous = os.umask(umask)
    try:
        status, ctx = job("optimizer=kfac", "trainer.max_steps=2", root=tmp_path)
    finally:
        os.umask(previous)
    assert status is RunStatus.COMPLETED and ctx.run_folder is not None
    names = sorted(p.name for p in ctx.run_folder.iterdir())
    assert "checkpoint.pt" not in names and ".lock" not in names
    assert "summary.json" in names and "metrics_steps.parquet" in names
    for path in ctx.run_folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert stat.S_IMODE(ctx.run_folder.stat().st_mode) == 0o777 & ~umask


def test_keep_checkpoint_keeps_it(tmp_path: Path) -> None:
    status, ctx = job(
        "optimizer=sgd", "trainer.max_steps=2", "trainer.keep_checkpoint=true", root=tmp_path
    )
    assert status is RunStatus.COMPLETED and ctx.run_folder is not None
    assert (ctx.run_folder / "checkpoint.pt").is_file()


# --------------------------------------------------------------------------- 3. W&B mirror
class Broken(NullLogger):
    def __init__(self) -> None:
        self.calls = 0

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        self.calls += 1
        if self.calls >= 3:
            raise ConnectionResetError("Connection lost")

    def finish(self, summary: dict[str, Any]) -> None:
        raise ConnectionResetError("Connection lost")


def test_a_failing_logger_never_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = Broken()
    monkeypatch.setattr(suite.train, "make_logger", lambda *a, **k: SafeLogger(broken))
    status, ctx = job("optimizer=sgd", root=tmp_path)
    assert status is RunStatus.COMPLETED and ctx.run_folder is not None
    assert read_run(ctx.run_folder).summary["status"] == "completed"
    assert broken.calls == 3  # dropped after its first failure
    err = capsys.readouterr().err
    assert err.count("warning: W&B") == 1 and "ConnectionResetError" in err


def test_logger_gets_throttled_step_rows_and_the_history_on_resume(
    interrupted_kfac: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_run(interrupted_kfac, tmp_path)
    received: dict[str, Any] = {}

    class Recorder(NullLogger):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def log(self, metrics: dict[str, Any], *, step: int) -> None:
            self.rows.append({**metrics, "step": step})

        def resumed(self, history: Any) -> None:
            received["history"] = list(history)

    recorder = Recorder()
    monkeypatch.setattr(suite.train, "make_logger", lambda *a, **k: recorder)
    job("optimizer=kfac", f"trainer.resume={folder}", "logger.step_every=2", root=tmp_path)
    steps = [r for r in recorder.rows if "batch_loss" in r]
    assert [r["step"] for r in steps] == [4, 6, 8]
    assert all({"lr", "step_time_s", "batch_loss"} <= set(r) for r in steps)
    history = received["history"]
    assert [r["step"] for r in history if "batch_loss" in r] == [2]
    assert [r["step"] for r in history if "train_loss" in r] == [0]
