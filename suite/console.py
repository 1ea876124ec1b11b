"""What a run tells its user at the end: one short block (status, losses, time, where to look)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

from suite.figures_layout import curves_figure, figures_command
from suite.store import CHECKPOINT_FILE, RunStatus

RULE = "─" * 64
# Statuses whose run folder shows up in the figures (interrupted/failed runs are left out).
PLOTTED = (RunStatus.COMPLETED, RunStatus.DIVERGED)


def format_duration(seconds: float) -> str:
    """``42.1 s``, ``3 min 07 s`` or ``2 h 05 min``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _loss(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def wandb_offline_runs(run_folder: Path, run_id: str) -> list[Path]:
    """This run's offline W&B folders under the run folder (one per start; none when online)."""
    return sorted((run_folder / "wandb").glob(f"offline-run-*-{run_id}"))


def end_of_run_lines(
    summary: dict[str, Any], *, run_folder: Path, results_root: Path, elapsed_s: float
) -> list[str]:
    """The lines of the end-of-run block (see ``print_end_of_run``)."""
    status = RunStatus(summary["status"])
    steps = int(summary.get("steps_completed") or 0)
    epochs = float(summary.get("epochs_completed") or 0.0)
    what = " · ".join(
        str(x) for x in (summary.get("model"), summary.get("optimizer")) if x is not None
    )
    head = f"run {status.value}: {what} · seed {summary.get('seed')} · "
    head += f"{epochs:g} epochs ({steps} steps)"
    lines = [RULE, head]
    if summary.get("error"):
        lines.append(f"  reason       {summary['error']}")
    loss = (
        f"train {_loss(summary.get('final_train_loss'))}   "
        f"test {_loss(summary.get('final_test_loss'))}"
    )
    baseline = summary.get("baseline_train_loss")
    if isinstance(baseline, int | float):
        loss += f"   (constant predictor: train {_loss(baseline)})"
    lines.append(f"  final loss   {loss}")
    lines.append(
        f"  wall time    {format_duration(elapsed_s)} "
        f"({format_duration(float(summary.get('wall_clock_s') or 0.0))} in training steps)"
    )
    lines.append(f"  run folder   {run_folder}")
    offline = wandb_offline_runs(run_folder, str(summary.get("run_id", run_folder.name)))
    if offline:
        lines.append(f"  W&B offline  {offline[-1]}")
        lines.append(f"               upload: wandb sync {' '.join(str(p) for p in offline)}")
    if status in PLOTTED and summary.get("model"):
        figure = curves_figure(results_root, model=str(summary["model"]))
        lines.append(f"  figure       {figure}  (built by `{figures_command(results_root)}`)")
    elif status is RunStatus.INTERRUPTED and (run_folder / CHECKPOINT_FILE).exists():
        lines.append(f"  resume       add trainer.resume={run_folder} to the same command")
    lines.append(RULE)
    return lines


def print_end_of_run(
    summary: dict[str, Any],
    *,
    run_folder: Path,
    results_root: Path,
    elapsed_s: float,
    file: TextIO | None = None,
) -> None:
    """Print the end-of-run block (to stdout unless ``file`` is given)."""
    lines = end_of_run_lines(
        summary, run_folder=run_folder, results_root=results_root, elapsed_s=elapsed_s
    )
    print("\n".join(lines), file=file or sys.stdout, flush=True)
