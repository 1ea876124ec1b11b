"""Sweep ids carry the date and are unique; a failed job is one line in the sweep's summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from suite.preflight import CONF_DIR
from suite.store import find_run_folders
from suite.sweep import SUMMARY_FILE
from tests.conftest import FAST, run_cli

SWEEP_ID = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[0-9a-f]{4}$")


def default_sweep_id() -> str:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        cfg = compose(config_name="config", return_hydra_config=True)
    return Path(str(cfg.hydra.sweep.dir)).name


def test_default_sweep_ids_carry_the_date_and_differ() -> None:
    ids = [default_sweep_id() for _ in range(5)]
    assert all(SWEEP_ID.match(i) for i in ids), ids
    assert len(set(ids)) >= 2, ids  # same second: the random tag still tells them apart


@pytest.mark.slow
def test_failed_job_is_one_line_in_the_sweep_summary(tmp_path: Path) -> None:
    root = tmp_path / "results"
    proc = run_cli(
        "-m",
        *FAST,
        "optimizer=sgd",
        "trainer.max_steps=2",
        "trainer.batch_size=100,100000",  # the second job fails at run time (400 examples)
        f"results.root={root}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    assert SWEEP_ID.match(sweep_dir.name), sweep_dir.name
    lines = (sweep_dir / SUMMARY_FILE).read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("job 0: completed: ")
    assert lines[1].startswith("job 1: failed: ") and "trainer.batch_size: got 100000" in lines[1]
    failures = [line for line in proc.stderr.splitlines() if line.startswith("error: job 1:")]
    assert len(failures) == 1 and str(sweep_dir / "1") in failures[0], proc.stderr[-3000:]
    (folder,) = find_run_folders(root)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["sweep_id"] == sweep_dir.name
