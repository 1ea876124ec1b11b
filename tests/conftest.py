"""Shared fixtures: compose configs in-process and run jobs into a temporary results root."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from suite.config import register_configs
from suite.preflight import compose_with_choices
from suite.store import RunStatus, find_run_folders
from suite.train import RunContext, run

REPO = Path(__file__).resolve().parent.parent
# Small, fast settings for end-to-end runs on the offline MNIST subset.
FAST = [
    "model=mnist_ae",
    "logger=none",
    "trainer.progress=false",
    "trainer.batch_size=100",
    "trainer.epochs=2",
    "trainer.eval_batch_size=1000",
    "data.max_train=400",
]

register_configs()
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def run_job(tmp_path: Path) -> Callable[..., tuple[RunStatus, Path]]:
    """Run one job in-process with FAST settings plus overrides; returns status and run folder."""

    def _run(*overrides: str, root: Path | None = None) -> tuple[RunStatus, Path]:
        root = root or tmp_path / "results"
        cfg, choices = compose_with_choices([*FAST, *overrides, f"results.root={root}"])
        ctx = RunContext(model_preset=choices["model"], optimizer_preset=choices["optimizer"])
        outcome = run(cfg, ctx)
        assert outcome.folder in find_run_folders(root)
        return outcome.status, outcome.folder

    return _run


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python run.py ARGS`` as a user would; returns the completed process."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
