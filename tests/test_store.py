"""Results store: atomic writes, round trips, status lifecycle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest

from suite.store import (
    EVAL_COLUMNS,
    STEP_COLUMNS,
    RunFolder,
    RunRecord,
    RunStatus,
    atomic_write_bytes,
    find_run_folders,
    new_run_id,
    read_run,
)


def _folder(tmp_path: Path) -> RunFolder:
    folder = RunFolder.create(tmp_path, new_run_id(model="m", optimizer="o", seed=0))
    folder.write_config("a: 1\n")
    folder.write_environment({"python": "3.11"})
    return folder


def test_round_trip_keeps_metrics_and_summary(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    record = RunRecord(
        steps=[
            {
                "step": 1,
                "epoch": 0.5,
                "batch_loss": 2.0,
                "lr": 0.1,
                "step_time_s": 0.01,
                "wall_time_s": 0.01,
            }
        ],
        evals=[
            {
                "step": 0,
                "epoch": 0.0,
                "wall_time_s": 0.0,
                "train_loss": 3.0,
                "train_loss_per_output": 1.5,
                "test_loss": 3.5,
                "test_loss_per_output": 1.75,
                "test_acc": 0.25,
            }
        ],
    )
    folder.write_metrics(record)
    folder.write_summary({"status": RunStatus.COMPLETED, "final_train_loss": float("nan")})
    run = read_run(folder.path)
    assert list(run.steps.columns[: len(STEP_COLUMNS)]) == list(STEP_COLUMNS)
    assert list(run.evals.columns[: len(EVAL_COLUMNS)]) == list(EVAL_COLUMNS)
    assert run.evals["test_acc"].tolist() == [0.25]
    assert run.steps["batch_loss"].tolist() == [2.0]
    assert run.summary["status"] == "completed"
    assert run.summary["final_train_loss"] is None  # NaN is stored as null, never invalid JSON
    assert find_run_folders(tmp_path) == [folder.path]


def test_run_folder_is_never_reused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(FileExistsError):
        RunFolder.create(tmp_path, folder.path.name)


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b'{"status": "running"}')

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b'{"status": "compl')
    assert json.loads(target.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_sigkill_during_writes_leaves_a_whole_file(tmp_path: Path) -> None:
    """A writer killed at an arbitrary moment leaves the old or the new file, never a torn one."""
    target = tmp_path / "big.json"
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from suite.store import atomic_write_json
        i = 0
        while True:
            payload = {{"i": i, "pad": "x" * 2_000_000}}
            atomic_write_json(__import__("pathlib").Path({str(target)!r}), payload)
            print(i, flush=True)  # one line per finished write: the test waits on these
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    # Generous deadline for a slow or loaded machine; the watchdog ends a hung writer, which
    # ends the reads below with EOF instead of blocking forever.
    watchdog = threading.Timer(120.0, proc.kill)
    watchdog.start()
    try:
        for _ in range(3):
            finished = proc.stdout.readline()
            assert finished, "the writer stopped before three writes"
            # The next write is under way while we read: old or new, always whole.
            data = json.loads(target.read_text())
            assert data["i"] >= int(finished) and len(data["pad"]) == 2_000_000
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)  # mid-write: the writer never pauses between writes
        proc.wait()
        proc.stdout.close()
    data = json.loads(target.read_text())
    assert len(data["pad"]) == 2_000_000


def test_read_run_rejects_corrupt_parquet(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    folder.write_metrics(RunRecord())
    folder.write_summary({"status": "running"})
    (folder.path / "metrics_evals.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(Exception):  # noqa: B017 - pyarrow raises its own error types
        read_run(folder.path)
    assert isinstance(pd.read_parquet(folder.path / "metrics_steps.parquet"), pd.DataFrame)
