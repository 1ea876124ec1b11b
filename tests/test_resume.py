"""Checkpoint and resume: killed or preempted runs continue to identical metrics."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from suite.store import find_run_folders, read_run
from tests.conftest import REPO

pytestmark = pytest.mark.slow

ARGS = [
    "model=mnist_ae",
    "optimizer=kfac2",
    "optimizer.cov_period=1",
    "optimizer.inv_period=3",
    "logger=none",
    "trainer.progress=false",
    "trainer.batch_size=100",
    "trainer.epochs=3",
    "trainer.eval_every_steps=7",
    "data.max_train=1000",
    "trainer.checkpoint_every_steps=1",
]


def _start(*extra: str, root: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *ARGS, f"results.root={root}", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _steps_done(root: Path) -> int:
    folders = find_run_folders(root)
    if not folders:
        return 0
    try:
        return int(json.loads((folders[0] / "summary.json").read_text())["steps_completed"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after(proc: subprocess.Popen[str], root: Path, *, steps: int, sig: int) -> None:
    deadline = time.monotonic() + 120
    while _steps_done(root) < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.communicate(timeout=120)


def _comparable(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = read_run(folder)
    return (
        run.steps.drop(columns=["step_time_s", "wall_time_s"]),
        run.evals.drop(columns=["wall_time_s"]),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    proc = _start(root=root)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    (folder,) = find_run_folders(root)
    assert read_run(folder).summary["status"] == "completed"
    return folder


def _resume_to_end(folder: Path, root: Path) -> None:
    proc = _start(f"trainer.resume={folder}", root=root)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def test_sigterm_checkpoints_marks_interrupted_and_resumes_identically(
    reference: Path, tmp_path: Path
) -> None:
    proc = _start(root=tmp_path)
    _kill_after(proc, tmp_path, steps=9, sig=signal.SIGTERM)
    assert proc.returncode != 0
    (folder,) = find_run_folders(tmp_path)
    summary = read_run(folder).summary
    assert summary["status"] == "interrupted" and 9 <= summary["steps_completed"] < 30
    _resume_to_end(folder, tmp_path)
    assert read_run(folder).summary["status"] == "completed"
    for ours, theirs in zip(_comparable(folder), _comparable(reference), strict=True):
        pd.testing.assert_frame_equal(ours, theirs)


def test_sigkill_at_random_steps_then_resume_matches(reference: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    first, second = sorted(rng.sample(range(2, 28), 2))
    proc = _start(root=tmp_path)
    _kill_after(proc, tmp_path, steps=first, sig=signal.SIGKILL)
    (folder,) = find_run_folders(tmp_path)
    assert read_run(folder).summary["status"] == "running"  # killed: never marked completed
    proc = _start(f"trainer.resume={folder}", root=tmp_path)
    _kill_after(proc, tmp_path, steps=second, sig=signal.SIGKILL)
    _resume_to_end(folder, tmp_path)
    assert read_run(folder).summary["status"] == "completed"
    for ours, theirs in zip(_comparable(folder), _comparable(reference), strict=True):
        pd.testing.assert_frame_equal(ours, theirs)


def _start_wandb(*extra: str, root: Path) -> subprocess.Popen[str]:
    """A run that mirrors to W&B offline, in its own process group (like a SLURM job step)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [a for a in ARGS if a != "logger=none"]
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "run.py"),
            *args,
            "logger=wandb",
            f"results.root={root}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigterm_to_the_process_group_with_wandb_stops_cleanly_and_resumes_identically(
    reference: Path, tmp_path: Path
) -> None:
    proc = _start_wandb(root=tmp_path)
    deadline = time.monotonic() + 300
    while _steps_done(tmp_path) < 9 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and W&B's service alike
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (folder,) = find_run_folders(tmp_path)
    summary = read_run(folder).summary
    assert summary["status"] == "interrupted" and (folder / "checkpoint.pt").is_file()
    proc = _start_wandb(f"trainer.resume={folder}", root=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert read_run(folder).summary["status"] == "completed"
    for ours, theirs in zip(_comparable(folder), _comparable(reference), strict=True):
        pd.testing.assert_frame_equal(ours, theirs)
    offline = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(folder.name), offline
