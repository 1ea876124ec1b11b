"""Seed aggregation: align seeds' curves, take their mean and a stated band, label groups."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from analyze.load import GROUP_KEYS, AnalysisStatus, ResultsSet

WALL_GRID_POINTS = 200


class Axis(str, Enum):
    """The x-axis of a curve."""

    EPOCH = "epoch"
    STEP = "step"
    WALL = "wall"

    @property
    def column(self) -> str:
        """Column of the evals table holding this axis."""
        return {"epoch": "epoch", "step": "step", "wall": "wall_time_s"}[self.value]

    @property
    def label(self) -> str:
        """Axis label with its unit."""
        return {
            "epoch": "epoch (passes over the training set)",
            "step": "optimizer step (updates)",
            "wall": "wall-clock time (s)",
        }[self.value]


class Band(str, Enum):
    """What the shaded band around a seed mean shows."""

    CI95 = "ci95"
    MINMAX = "minmax"

    @property
    def description(self) -> str:
        """One line stating the band's meaning (used in legends and captions)."""
        if self is Band.CI95:
            return "band: 95 % t-CI of the mean over seeds"
        return "band: min–max over seeds"


class LossKind(str, Enum):
    """Which loss columns to show: summed over outputs (the suite's) or the per-output mean."""

    SUM = "sum"
    PER_OUTPUT = "per_output"

    def column(self, split: str) -> str:
        """Evals column of ``split`` (train/test/val) for this kind."""
        return f"{split}_loss" if self is LossKind.SUM else f"{split}_loss_per_output"


class GroupKey(NamedTuple):
    """Runs that differ only in their seed."""

    benchmark: str
    data_variant: str
    optimizer: str
    setting: str


@dataclass(frozen=True)
class SeedMean:
    """A group's curve: seeds aligned on ``x``, their mean and band."""

    key: GroupKey
    metric: str
    axis: Axis
    x: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    values: np.ndarray  # (n_seeds, len(x)), aligned per-seed values
    seeds: tuple[int, ...]

    @property
    def n_seeds(self) -> int:
        """Number of seeds averaged."""
        return len(self.seeds)


def group_key(row: pd.Series | dict[str, object]) -> GroupKey:
    """The group of a run row."""
    return GroupKey(*(str(row[k]) for k in GROUP_KEYS))


def groups_of(results: ResultsSet, *, benchmark: str) -> list[GroupKey]:
    """Groups of a benchmark with at least one readable run, in a stable order."""
    runs = results.runs[
        (results.runs["benchmark"] == benchmark)
        & (results.runs["status"] != AnalysisStatus.CORRUPT.value)
    ]
    keys = {group_key(row) for _, row in runs.iterrows()}
    return sorted(keys, key=lambda k: (optimizer_order(k.optimizer), k.data_variant, k.setting))


_OPTIMIZER_RANK = {"sgd": 0, "adam": 1, "kfac": 2, "kfac2": 3}


def optimizer_order(name: str) -> tuple[int, str]:
    """Sort key putting first-order baselines first, then K-FAC, then two-level variants."""
    if name in _OPTIMIZER_RANK:
        return (_OPTIMIZER_RANK[name], name)
    return (4 if name.startswith("kfac2") else 5, name)


def group_labels(
    results: ResultsSet, keys: list[GroupKey], *, with_variant: bool = True
) -> dict[GroupKey, str]:
    """Legend labels: optimizer, plus data variant and differing settings only when needed.

    ``with_variant`` False leaves the variant out (for tables over problems that name it).
    """
    variants_per_benchmark: dict[str, set[str]] = {}
    settings: dict[tuple[str, str, str], set[str]] = {}
    for key in keys:
        variants_per_benchmark.setdefault(key.benchmark, set()).add(key.data_variant)
        settings.setdefault(key[:3], set()).add(key.setting)
    labels: dict[GroupKey, str] = {}
    for key in keys:
        parts = [key.optimizer]
        if with_variant and len(variants_per_benchmark[key.benchmark]) > 1:
            parts.append(key.data_variant)
        siblings = settings[key[:3]]
        if len(siblings) > 1:
            parts.append(_setting_difference(key.setting, siblings))
        labels[key] = " · ".join(parts)
    return labels


def _setting_difference(setting: str, siblings: set[str]) -> str:
    mine = json.loads(setting)
    others = [json.loads(s) for s in siblings]
    varying = sorted(k for k in mine if any(o.get(k) != mine[k] for o in others))
    return ", ".join(f"{k}={mine[k]}" for k in varying) or "same setting"


def group_runs(results: ResultsSet, key: GroupKey) -> pd.DataFrame:
    """All run rows of a group (any status)."""
    runs = results.runs
    mask = pd.Series(True, index=runs.index)
    for column, value in zip(GROUP_KEYS, key, strict=True):
        mask &= runs[column].astype(str) == value
    return runs[mask]


def group_evals(results: ResultsSet, key: GroupKey, *, usable: bool) -> pd.DataFrame:
    """Eval rows of a group's usable (or of its diverged) runs."""
    evals = results.evals
    mask = evals["usable"] if usable else evals["status"] == AnalysisStatus.DIVERGED.value
    for column, value in zip(GROUP_KEYS, key, strict=True):
        mask &= evals[column].astype(str) == value
    return evals[mask]


def seed_mean(
    evals: pd.DataFrame,
    *,
    key: GroupKey,
    metric: str,
    axis: Axis,
    band: Band,
    log: bool = False,
) -> SeedMean | None:
    """Mean over seeds with a band; None when no seed has finite values of ``metric``.

    Epoch and step axes align seeds on the evaluation steps all of them share; the wall-clock
    axis interpolates each seed linearly onto a common grid over the time span all seeds cover.
    ``log`` (for curves drawn on a log axis, all values positive): the geometric mean and the
    band of the log values, so the band is symmetric on the axis and never reaches zero.
    """
    if metric not in evals.columns:
        return None
    per_run = [
        (int(run["seed"].iloc[0]), run.sort_values("step"))
        for _, run in evals.groupby("run_id", sort=True)
        if run[metric].notna().any()
    ]
    if not per_run:
        return None
    per_run.sort(key=lambda item: item[0])
    seeds = tuple(seed for seed, _ in per_run)
    if axis is Axis.WALL:
        aligned = _align_wall(per_run, metric)
        if aligned is None:
            return None
        x, values = aligned
    else:
        on_steps = _align_steps(per_run, (metric, axis.column))
        if on_steps is None:
            return None
        x = on_steps.columns[axis.column].mean(axis=0)
        values = on_steps.columns[metric]
    if log and np.all(values > 0):
        logs = np.log(values)
        mean = np.exp(logs.mean(axis=0))
        lower, upper = (np.exp(limit) for limit in band_limits(logs, band))
    else:
        mean = values.mean(axis=0)
        lower, upper = band_limits(values, band)
    return SeedMean(key, metric, axis, x, mean, lower, upper, values, seeds)


@dataclass(frozen=True)
class AlignedSeeds:
    """Seeds' eval rows aligned on the steps all of them evaluated (columns: seeds × steps)."""

    seeds: tuple[int, ...]
    steps: np.ndarray
    columns: dict[str, np.ndarray]


def align_on_steps(evals: pd.DataFrame, columns: tuple[str, ...]) -> AlignedSeeds | None:
    """Align the runs in ``evals`` on shared eval steps where every column is finite."""
    if any(c not in evals.columns for c in columns) or evals.empty:
        return None
    runs = sorted(
        ((int(run["seed"].iloc[0]), run) for _, run in evals.groupby("run_id", sort=True)),
        key=lambda item: item[0],
    )
    return _align_steps(runs, columns)


def _align_steps(
    per_run: list[tuple[int, pd.DataFrame]], columns: tuple[str, ...]
) -> AlignedSeeds | None:
    common = set(per_run[0][1]["step"])
    for _, run in per_run[1:]:
        common &= set(run["step"])
    steps = np.array(sorted(common))
    if steps.size == 0:
        return None
    rows = [
        run.drop_duplicates("step", keep="last").set_index("step", drop=False).loc[steps]
        for _, run in per_run
    ]
    data = {c: np.vstack([r[c].to_numpy(dtype=float) for r in rows]) for c in columns}
    keep = np.all([np.all(np.isfinite(v), axis=0) for v in data.values()], axis=0)
    if not keep.any():
        return None
    return AlignedSeeds(
        seeds=tuple(seed for seed, _ in per_run),
        steps=steps[keep],
        columns={c: v[:, keep] for c, v in data.items()},
    )


def _align_wall(
    per_run: list[tuple[int, pd.DataFrame]], metric: str
) -> tuple[np.ndarray, np.ndarray] | None:
    curves = []
    for _, run in per_run:
        run = run[np.isfinite(run[metric].to_numpy(dtype=float))]
        t = run["wall_time_s"].to_numpy(dtype=float)
        order = np.argsort(t, kind="stable")
        curves.append((t[order], run[metric].to_numpy(dtype=float)[order]))
    if len(curves) == 1:
        t, y = curves[0]
        return (t, y[None, :]) if t.size else None
    start = max(t[0] for t, _ in curves if t.size)
    stop = min(t[-1] for t, _ in curves if t.size)
    if any(t.size == 0 for t, _ in curves) or stop < start:
        return None
    grid = np.linspace(start, stop, WALL_GRID_POINTS) if stop > start else np.array([start])
    values = np.vstack([np.interp(grid, t, y) for t, y in curves])
    return grid, values


def band_limits(values: np.ndarray, band: Band) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper band over seeds (rows); a single seed gives a zero-width band."""
    mean = values.mean(axis=0)
    n = values.shape[0]
    if n < 2:
        return mean.copy(), mean.copy()
    if band is Band.MINMAX:
        return values.min(axis=0), values.max(axis=0)
    half = stats.t.ppf(0.975, n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n)
    return mean - half, mean + half


def diverged_curves(
    evals: pd.DataFrame, *, metric: str, axis: Axis
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Each diverged run's finite values up to divergence: (run_id, x, y)."""
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    if metric not in evals.columns:
        return curves
    for run_id, run in evals.groupby("run_id", sort=True):
        run = run.sort_values("step")
        y = run[metric].to_numpy(dtype=float)
        finite = np.isfinite(y)
        if finite.any():
            curves.append((str(run_id), run[axis.column].to_numpy(dtype=float)[finite], y[finite]))
    return curves
