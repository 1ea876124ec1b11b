"""A real SLURM round trip: one-node cluster on localhost, a sweep, requeues (SIGUSR2, and
``scontrol requeue`` of a W&B-logging job), bitwise-exact resumes, and one data-parallel K-FAC
run over 2 SLURM tasks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MISSING = [d for d in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(d) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"SLURM not installed ({', '.join(MISSING)} missing)")
@pytest.mark.skipif(os.geteuid() != 0, reason="a local SLURM needs root (SlurmUser=root)")
def test_sweep_and_requeue_through_a_local_slurm() -> None:
    env = {**os.environ, "PY": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_test.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sweep ok: 2 run folders completed" in done.stderr
    assert "requeue ok: resumed" in done.stderr
    assert "wandb requeue ok:" in done.stderr
    assert "data-parallel ok:" in done.stderr
