"""Results store -> one tidy run table plus long-format curve tables, never crashing on bad runs.

Every run folder found under the given roots becomes one row of ``ResultsSet.runs``; a folder
that cannot be read (torn Parquet, invalid JSON, missing identity) becomes a row with status
``corrupt`` and a one-line ``problem``. Only rows with ``usable`` set (completed, readable, with
finite losses, not superseded) enter averages; every other row is listed by ``skipped()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from optimizers.registry import FAMILIES
from suite.store import EVAL_COLUMNS, RunStatus, find_run_folders, read_run


class AnalysisStatus(str, Enum):
    """A run's state for the analysis: the stored ``RunStatus`` values plus ``corrupt``."""

    RUNNING = RunStatus.RUNNING.value
    COMPLETED = RunStatus.COMPLETED.value
    DIVERGED = RunStatus.DIVERGED.value
    FAILED = RunStatus.FAILED.value
    INTERRUPTED = RunStatus.INTERRUPTED.value
    CORRUPT = "corrupt"


# Identity of a curve group: runs that differ only in their seed. Data variants never pool.
GROUP_KEYS = ("benchmark", "data_variant", "optimizer", "setting")
IDENTITY_COLUMNS = (
    "run_id",
    "benchmark",
    "data_variant",
    "optimizer",
    "optimizer_family",
    "setting",
    "seed",
    "status",
    "usable",
)
REQUIRED_SUMMARY_KEYS = ("run_id", "model", "data_variant", "optimizer", "seed", "status")
FIRST_ORDER_FAMILIES = ("sgd", "adam")
KFAC_FAMILY = "kfac"
TWO_LEVEL_FAMILY = "kfac2"
LOSS_SPLITS = ("train", "test", "val")
_MAX_PROBLEM_CHARS = 160


@dataclass(frozen=True)
class SkippedRun:
    """A run left out of averages, with the reason in one line."""

    run_id: str
    path: str
    status: str
    reason: str


@dataclass(frozen=True)
class ResultsSet:
    """All loaded runs: ``runs`` (one row per run) and long-format ``evals`` and ``steps``."""

    runs: pd.DataFrame
    evals: pd.DataFrame
    steps: pd.DataFrame

    def usable_runs(self) -> pd.DataFrame:
        """Rows that enter averages: completed, readable, finite, not superseded."""
        return self.runs[self.runs["usable"]]

    def skipped(self) -> list[SkippedRun]:
        """Every run that does not enter averages, with its reason."""
        rows = self.runs[~self.runs["usable"]]
        return [
            SkippedRun(
                run_id=str(row.run_id),
                path=str(row.path),
                status=str(row.status),
                reason=str(row.problem),
            )
            for row in rows.itertuples()
        ]

    def _readable(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != AnalysisStatus.CORRUPT.value]

    def benchmarks(self) -> list[str]:
        """Benchmarks (model names) with at least one readable run, sorted."""
        return sorted(str(b) for b in self._readable()["benchmark"].dropna().unique())

    def experiments(self, benchmark: str) -> list[str]:
        """Experiment presets of a benchmark's readable runs, sorted (runs without one left out)."""
        readable = self._readable()
        of_benchmark = readable[readable["benchmark"] == benchmark]
        return sorted(str(e) for e in of_benchmark["experiment"].dropna().unique())

    def of_experiment(self, experiment: str) -> ResultsSet:
        """Only the runs of one experiment preset."""
        return self._subset(self.runs["experiment"] == experiment)

    def _subset(self, mask: pd.Series) -> ResultsSet:
        """The runs where ``mask`` holds, with their evals and steps."""
        runs = self.runs[mask].reset_index(drop=True)
        ids = set(runs["run_id"])
        return ResultsSet(
            runs=runs,
            evals=self.evals[self.evals["run_id"].isin(ids)].reset_index(drop=True),
            steps=self.steps[self.steps["run_id"].isin(ids)].reset_index(drop=True),
        )

    def filter(
        self,
        *,
        benchmarks: Sequence[str] | None = None,
        optimizers: Sequence[str] | None = None,
        sweep: str | None = None,
        trials: bool = True,
    ) -> ResultsSet:
        """Keep runs of the named benchmarks/optimizers/sweep; an unknown name raises.

        ``trials=False`` drops tuning trials and pilots (``tuning.stage`` ``tune`` or
        ``pilot``): single-seed grid points that selected or checked a setting, not results to
        average or plot.
        """
        mask = pd.Series(True, index=self.runs.index)
        if not trials and "tuning.stage" in self.runs:
            mask &= ~self.runs["tuning.stage"].astype(str).isin(["tune", "pilot"])
        if benchmarks:
            known = set(self.runs["benchmark"].dropna()) | set(self.runs["experiment"].dropna())
            _check_known("--benchmark", benchmarks, known)
            wanted = set(benchmarks)
            mask &= self.runs["benchmark"].isin(wanted) | self.runs["experiment"].isin(wanted)
        if optimizers:
            known = set(self.runs["optimizer"].dropna()) | set(
                self.runs["optimizer_family"].dropna()
            )
            _check_known("--optimizer", optimizers, known)
            wanted = set(optimizers)
            mask &= self.runs["optimizer"].isin(wanted) | self.runs["optimizer_family"].isin(wanted)
        if sweep is not None:
            _check_known("--sweep", [sweep], set(self.runs["sweep_id"].dropna().astype(str)))
            mask &= self.runs["sweep_id"].astype(str) == sweep
        return self._subset(mask)


def _check_known(option: str, names: Iterable[str], known: set[str]) -> None:
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"{option}: unknown {', '.join(unknown)}; allowed: {', '.join(sorted(known)) or '-'}"
        )


def load_results(roots: Sequence[Path | str], *, with_steps: bool = True) -> ResultsSet:
    """Load every run folder below ``roots`` into a ``ResultsSet``; a missing root raises.

    ``with_steps`` False leaves ``steps`` empty (figures and tables use evaluations only).
    """
    rows: list[dict[str, Any]] = []
    evals: list[pd.DataFrame] = []
    steps: list[pd.DataFrame] = []
    seen_paths: set[Path] = set()
    seen_ids: set[str] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"--results: {root} is not a directory")
        for folder in find_run_folders(root):
            resolved = folder.resolve()
            if resolved in seen_paths:
                continue
            seen_paths.add(resolved)
            row, run_evals, run_steps = _load_one(folder)
            if row["run_id"] in seen_ids:
                row["usable"] = False
                row["problem"] = f"duplicate run_id {row['run_id']} (already loaded elsewhere)"
                row["run_id"] = f"{row['run_id']}@{folder}"
                run_evals = run_steps = None
            seen_ids.add(str(row["run_id"]))
            rows.append(row)
            if run_evals is not None:
                evals.append(_with_identity(run_evals, row))
            if run_steps is not None and with_steps:
                steps.append(_with_identity(run_steps, row))
    runs = _runs_frame(rows)
    _mark_superseded(runs)
    usable = dict(zip(runs["run_id"], runs["usable"], strict=True))
    evals_frame = _concat(evals, IDENTITY_COLUMNS)
    steps_frame = _concat(steps, IDENTITY_COLUMNS)
    for frame in (evals_frame, steps_frame):
        frame["usable"] = frame["run_id"].map(usable).fillna(False).astype(bool)
    return ResultsSet(runs=runs, evals=evals_frame, steps=steps_frame)


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_PROBLEM_CHARS else line[: _MAX_PROBLEM_CHARS - 1] + "…"


def _partial_summary(folder: Path) -> dict[str, Any]:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _load_one(folder: Path) -> tuple[dict[str, Any], pd.DataFrame | None, pd.DataFrame | None]:
    try:
        stored = read_run(folder)
    except Exception as error:  # any unreadable file makes the run corrupt
        row = _row_from_summary(_partial_summary(folder), folder)
        row.update(
            status=AnalysisStatus.CORRUPT.value,
            usable=False,
            problem=_one_line(f"unreadable: {type(error).__name__}: {error}"),
        )
        return row, None, None
    summary = stored.summary
    missing = [key for key in REQUIRED_SUMMARY_KEYS if summary.get(key) is None]
    if missing:
        row = _row_from_summary(summary, folder)
        row.update(
            status=AnalysisStatus.CORRUPT.value,
            usable=False,
            problem=f"summary lacks {', '.join(missing)}",
        )
        return row, None, None
    row = _row_from_summary(summary, folder, budget=budget_of(stored.config_text))
    try:
        row["status"] = AnalysisStatus(str(summary["status"])).value
    except ValueError:
        row.update(
            status=AnalysisStatus.CORRUPT.value,
            usable=False,
            problem=f"unknown status {summary['status']!r}",
        )
        return row, None, None
    evals = stored.evals
    absent = [c for c in EVAL_COLUMNS if c not in evals.columns]
    if absent:
        row.update(
            status=AnalysisStatus.CORRUPT.value,
            usable=False,
            problem=f"{'metrics_evals.parquet'} lacks columns {', '.join(absent)}",
        )
        return row, None, None
    evals = evals.sort_values("step", kind="stable").reset_index(drop=True)
    row.update(_derived_metrics(evals))
    row["n_evals"] = len(evals)
    row["usable"], row["problem"] = _usability(row, evals)
    return row, evals, stored.steps


def _usability(row: dict[str, Any], evals: pd.DataFrame) -> tuple[bool, str | None]:
    status = row["status"]
    if status == AnalysisStatus.DIVERGED.value:
        step = row.get("diverged_step")
        where = f" at step {int(float(step))}" if step is not None and _finite(step) else ""
        return False, f"diverged{where}"
    if status != AnalysisStatus.COMPLETED.value:
        error = row.get("error")
        suffix = f": {_one_line(str(error))}" if error else ""
        return False, f"{status} (incomplete){suffix}"
    if evals.empty:
        return False, "completed but metrics_evals.parquet has no rows"
    last = evals["train_loss"].iloc[-1]
    if not _finite(last):
        return False, "completed but the final train loss is not finite"
    return True, None


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _derived_metrics(evals: pd.DataFrame) -> dict[str, float]:
    """Final and best per-output losses (the per-pixel means some papers report)."""
    derived: dict[str, float] = {}
    for split in LOSS_SPLITS:
        column = f"{split}_loss_per_output"
        if column in evals.columns and evals[column].notna().any():
            values = evals[column].to_numpy(dtype=float)
            derived[f"final_{column}"] = float(values[-1])
            finite = values[np.isfinite(values)]
            derived[f"best_{column}"] = float(finite.min()) if finite.size else math.nan
    return derived


BUDGET_KEYS = ("batch_size", "epochs", "max_steps")


def budget_of(config_text: str) -> dict[str, Any]:
    """Batch size and training budget from a run's resolved config (empty when unreadable)."""
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return {}
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        return {}
    return {key: trainer[key] for key in BUDGET_KEYS if key in trainer}


# Optimizer settings added after committed runs were recorded, whose schema default does what
# those runs did: a run recording the default groups with the runs that predate the setting.
ADDED_LATER = ("grad_accumulation", "coarse_refresh", "coarse_downsample", "fixed_pi")


def schema_default(family: str, name: str) -> Any:
    """The default of optimizer setting ``name`` in ``family``'s schema (enum members as their
    value); ``dataclasses.MISSING`` when the family or setting has none."""
    schema = FAMILIES[family].schema if family in FAMILIES else None
    for f in fields(schema) if schema is not None else ():
        if f.name == name and f.default is not MISSING:
            return getattr(f.default, "value", f.default)
    return MISSING


def setting_of(summary: dict[str, Any], budget: dict[str, Any] | None = None) -> str:
    """Canonical text of what besides the seed defines a run: scale, budget, hyperparameters
    (``ADDED_LATER`` settings left out at their default)."""
    hyper = summary.get("hyperparameters") or {}
    if not isinstance(hyper, dict):
        hyper = {"hyperparameters": str(hyper)}
    family = str(hyper.get("name", summary.get("optimizer")))
    hyper = {
        k: v
        for k, v in hyper.items()
        if not (k in ADDED_LATER and str(schema_default(family, k)) == str(v))
    }
    canonical: dict[str, Any] = {"scale": summary.get("scale")}
    if summary.get("batch_size") is not None:
        canonical["batch_size"] = summary["batch_size"]
    canonical.update(budget or {})
    canonical.update({str(k): v for k, v in hyper.items()})
    return json.dumps(canonical, sort_keys=True, default=str)


def _row_from_summary(
    summary: dict[str, Any], folder: Path, *, budget: dict[str, Any] | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("hyperparameters", "tuning") and isinstance(value, dict):
            for sub, sub_value in value.items():
                row[f"{'hp' if key == 'hyperparameters' else key}.{sub}"] = _scalar(sub_value)
        else:
            row[key] = _scalar(value)
    row["run_id"] = str(summary.get("run_id") or folder.name)
    row["benchmark"] = summary.get("model")
    row["setting"] = setting_of(summary, budget)
    for key, value in (budget or {}).items():
        row.setdefault(key, value)
    row["path"] = str(folder)
    row.setdefault("status", AnalysisStatus.CORRUPT.value)
    row.setdefault("usable", False)
    row.setdefault("problem", None)
    return row


def _scalar(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in (*IDENTITY_COLUMNS, "experiment", "sweep_id", "path", "problem", "model"):
        if column not in frame.columns:
            frame[column] = pd.Series([None] * len(frame), dtype="object")
    frame["usable"] = frame["usable"].fillna(False).astype(bool)
    front = [c for c in (*IDENTITY_COLUMNS, "problem", "path") if c in frame.columns]
    return frame[front + [c for c in frame.columns if c not in front]]


def _mark_superseded(runs: pd.DataFrame) -> None:
    """Keep one completed run per (group, seed): the last finished; mark the others.

    A pilot (``tuning.stage`` ``pilot``) checks a variant on a validation split, so it neither
    replaces nor is replaced by a run of the same group and seed that is not a pilot."""
    usable = runs[runs["usable"]].copy()
    if usable.empty:
        return
    stage = usable.get("tuning.stage", pd.Series(None, index=usable.index, dtype="object"))
    usable["_pilot"] = stage.astype(str) == "pilot"
    order = usable.sort_values(
        [c for c in ("finished_at", "run_id") if c in usable.columns], na_position="first"
    )
    duplicated = order.duplicated([*GROUP_KEYS, "seed", "_pilot"], keep="last")
    for index in order.index[duplicated]:
        runs.loc[index, "usable"] = False
        runs.loc[index, "problem"] = "superseded: a later completed run has the same seed"


def _with_identity(frame: pd.DataFrame, row: dict[str, Any]) -> pd.DataFrame:
    out = frame.copy()
    for column in IDENTITY_COLUMNS:
        out[column] = row.get(column)
    return out[list(IDENTITY_COLUMNS) + [c for c in frame.columns if c not in IDENTITY_COLUMNS]]


def _concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    return pd.concat(frames, ignore_index=True)
