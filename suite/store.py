"""Results store: one folder per run, written atomically; the single source of every figure.

Layout of a run folder ``<root>/<run_id>/``:

- ``config.yaml``            resolved Hydra config of the run
- ``summary.json``           status, identity (model, optimizer, seed, data variant, ...), final
                             and best metrics, wall-clock; rewritten at every evaluation
- ``metrics_steps.parquet``  one row per optimizer step (``STEP_COLUMNS``)
- ``metrics_evals.parquet``  one row per evaluation (``EVAL_COLUMNS`` plus optional columns)
- ``environment.json``       package versions, git commit, CPU/GPU, threads
- ``checkpoint.pt``          latest checkpoint while the run can continue; removed when it
                             completes or diverges (``trainer.keep_checkpoint=true`` keeps it)
- ``.lock``                  held (``flock``) by the one process writing the folder

Files are created with the user's umask (group-readable under the usual 022/002), so that
colleagues on a shared cluster can read the results.

Losses follow docs/method.md §2: ``*_loss`` is the negative log-likelihood summed over output
dimensions and averaged over examples; ``*_loss_per_output`` divides it by the number of output
dimensions (the per-pixel mean some papers report).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
POINTER_FILE = "run_folder.txt"  # in a Hydra job dir: the run folder a requeued job resumes
STEPS_FILE = "metrics_steps.parquet"
EVALS_FILE = "metrics_evals.parquet"
ENVIRONMENT_FILE = "environment.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".lock"

STEP_COLUMNS = ("step", "epoch", "batch_loss", "lr", "step_time_s", "wall_time_s")
EVAL_COLUMNS = (
    "step",
    "epoch",
    "wall_time_s",
    "train_loss",
    "train_loss_per_output",
    "test_loss",
    "test_loss_per_output",
)
OPTIONAL_EVAL_COLUMNS = ("val_loss", "val_loss_per_output", "train_acc", "val_acc", "test_acc")


class RunStatus(str, Enum):
    """Lifecycle of a run; only ``completed`` counts as a finished run."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id(*, model: str, optimizer: str, seed: int) -> str:
    """A unique, sortable, human-readable run id."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{model}_{optimizer}_s{seed}_{uuid.uuid4().hex[:6]}"


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one.

    The file gets the permissions a plain ``open`` would give (0666 less the umask), not the
    0600 of a temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write JSON (sorted keys, NaN/inf written as null)."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=True) + "\n")


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """Atomically write a DataFrame as Parquet."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Enum):
        return obj.value
    return obj


@dataclass
class RunRecord:
    """Metrics accumulated by a run; serialised to the two Parquet files."""

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    def steps_frame(self) -> pd.DataFrame:
        """Per-step metrics as a DataFrame with the canonical columns first."""
        return _frame(self.steps, STEP_COLUMNS)

    def evals_frame(self) -> pd.DataFrame:
        """Per-evaluation metrics as a DataFrame with the canonical columns first."""
        return _frame(self.evals, EVAL_COLUMNS)


def _frame(rows: list[dict[str, float]], columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="float64")
    extra = [c for c in frame.columns if c not in columns]
    return frame[list(columns) + sorted(extra)]


class FolderLocked(Exception):
    """Another live process holds the run folder's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"run folder '{path}' is in use by {holder}")


class FolderLock:
    """Exclusive ``flock`` on ``<run folder>/.lock`` for as long as one process writes the folder.

    The kernel drops the lock when its holder dies, so a lock file left by a killed process is
    simply taken over; the file records the holder (host, pid) for the error message only, and
    is removed when the holder finishes.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise FolderLocked naming the holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderLocked(self.path.parent, self._holder()) from None
            try:  # the file we locked must still be the one at the path (no unlink race)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} pid {os.getpid()}\n".encode())
        self._fd = fd

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process"

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a taker that opened the removed file sees
        that it is no longer at the path and retries on a fresh one)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunFolder:
    """Writer for one run folder; every file it writes is replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, root: Path, run_id: str) -> RunFolder:
        """Create a fresh run folder under ``root``; fails if it already exists."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / run_id
        path.mkdir(exist_ok=False)
        return cls(path)

    def write_config(self, yaml_text: str) -> None:
        """Store the resolved config."""
        atomic_write_text(self.path / CONFIG_FILE, yaml_text)

    def write_environment(self, environment: dict[str, Any]) -> None:
        """Store what produced the run (versions, commit, hardware)."""
        atomic_write_json(self.path / ENVIRONMENT_FILE, environment)

    def write_metrics(self, record: RunRecord) -> None:
        """Store all metrics so far."""
        atomic_write_parquet(self.path / STEPS_FILE, record.steps_frame())
        atomic_write_parquet(self.path / EVALS_FILE, record.evals_frame())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Store the summary (status, identity, final/best metrics)."""
        atomic_write_json(self.path / SUMMARY_FILE, {**summary, "updated_at": utc_now()})

    def read_summary(self) -> dict[str, Any]:
        """Read the stored summary."""
        return dict(json.loads((self.path / SUMMARY_FILE).read_text()))

    def read_config(self) -> str:
        """The stored resolved config (YAML text)."""
        return (self.path / CONFIG_FILE).read_text()

    @property
    def checkpoint_path(self) -> Path:
        """Where this run's checkpoint lives."""
        return self.path / CHECKPOINT_FILE

    def lock(self) -> FolderLock:
        """The folder's writer lock (use as a context manager or acquire/release)."""
        return FolderLock(self.path)


@dataclass
class StoredRun:
    """A run read back from the store."""

    path: Path
    summary: dict[str, Any]
    config_text: str
    steps: pd.DataFrame
    evals: pd.DataFrame
    environment: dict[str, Any]


def read_run(path: Path) -> StoredRun:
    """Read one run folder; raises on missing or corrupt files."""
    path = Path(path)
    summary = json.loads((path / SUMMARY_FILE).read_text())
    if not isinstance(summary, dict) or "status" not in summary:
        raise ValueError(f"{path / SUMMARY_FILE}: not a run summary (no 'status')")
    return StoredRun(
        path=path,
        summary=summary,
        config_text=(path / CONFIG_FILE).read_text(),
        steps=pd.read_parquet(path / STEPS_FILE),
        evals=pd.read_parquet(path / EVALS_FILE),
        environment=json.loads((path / ENVIRONMENT_FILE).read_text()),
    )


def find_run_folders(root: Path) -> list[Path]:
    """All folders below ``root`` that hold a run summary, sorted."""
    return sorted(p.parent for p in Path(root).rglob(SUMMARY_FILE))
