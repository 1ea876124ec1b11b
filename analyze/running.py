"""The papers' train loss: the running mean of the train-mode mini-batch losses.

Runs record it as ``train_running_loss`` at every evaluation (the mean of the mini-batch losses
since the previous evaluation). Runs recorded before that column existed get it computed here
from ``metrics_steps.parquet``: the mean ``batch_loss`` of the steps in (previous eval step,
this eval step]. The first evaluation (before any step) has none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analyze.load import ResultsSet

RUNNING_LOSS = "train_running_loss"
STEPS_FILE = "metrics_steps.parquet"


def running_means(eval_steps: np.ndarray, step: np.ndarray, batch_loss: np.ndarray) -> np.ndarray:
    """Mean of ``batch_loss`` over the steps after the previous eval step up to each eval step."""
    order = np.argsort(step, kind="stable")
    step, batch_loss = step[order], batch_loss[order]
    out = np.full(len(eval_steps), np.nan)
    previous = -np.inf
    for index, current in enumerate(eval_steps):
        window = batch_loss[(step > previous) & (step <= current)]
        if window.size:
            out[index] = float(window.mean())
        previous = current
    return out


def _steps_of(results: ResultsSet, run_id: str, path: str | None) -> pd.DataFrame | None:
    if not results.steps.empty and "run_id" in results.steps:
        rows = results.steps[results.steps["run_id"] == run_id]
        if not rows.empty:
            return rows
    if not path:
        return None
    try:
        return pd.read_parquet(Path(path) / STEPS_FILE, columns=["step", "batch_loss"])
    except Exception:  # a torn or missing steps file: the run simply has no running loss
        return None


def with_running_loss(results: ResultsSet) -> ResultsSet:
    """``results`` with ``train_running_loss`` filled in for every run that did not record it."""
    evals = results.evals.copy()
    if RUNNING_LOSS not in evals.columns:
        evals[RUNNING_LOSS] = np.nan
    paths = dict(zip(results.runs["run_id"], results.runs["path"], strict=True))
    for run_id, rows in evals.groupby("run_id", sort=False):
        if rows[RUNNING_LOSS].notna().any():
            continue  # recorded by the run itself
        rows = rows.sort_values("step", kind="stable")
        steps = _steps_of(results, str(run_id), paths.get(run_id))
        if steps is None or steps.empty or "batch_loss" not in steps:
            continue
        evals.loc[rows.index, RUNNING_LOSS] = running_means(
            rows["step"].to_numpy(dtype=float),
            steps["step"].to_numpy(dtype=float),
            steps["batch_loss"].to_numpy(dtype=float),
        )
    return ResultsSet(runs=results.runs, evals=evals, steps=results.steps)
