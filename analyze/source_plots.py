"""Counterparts of the source papers' figures, one per author-named preset.

- ``tselepidis_*`` presets: the layout of the authors' ``plot.py`` (KFAC-Pytorch): training
  loss, test loss, training accuracy and test accuracy against epochs, one line per optimizer
  (SGD, Adam, K-FAC one-level, K-FAC two-level) with its mean and confidence band over runs,
  log y on the losses. The authors drew four separate panels; here they share one canvas.
- ``koroko_*`` presets: Koroko et al. (2023) show the training loss against epochs and against
  time; here the two panels side by side.

The training loss is the sources' metric: the running mean of the train-mode mini-batch losses
(``train_running_loss``), recorded by newer runs and computed from the step log for older ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np
from matplotlib.figure import Figure

from analyze.aggregate import Axis, Band, GroupKey, group_runs, groups_of
from analyze.labels import Caption, GroupLabel, short_labels
from analyze.load import ResultsSet
from analyze.plots import (
    MIN_FIGURE_WIDTH_IN,
    PANEL_HEIGHT_IN,
    PANEL_WIDTH_IN,
    Legend,
    Panels,
    capped_groups,
    fit_title,
)
from analyze.running import RUNNING_LOSS
from analyze.style import Palette, figure_palette, figure_style

RUNNING_ACC = "train_running_acc"
FAMILY_NAMES = {
    "sgd": "SGD",
    "adam": "Adam",
    "kfac": "K-FAC (one-level)",
    "kfac2": "K-FAC (two-level)",
    "kfac2_authors": "K-FAC (two-level, authors' accumulating coarse matrix)",
}


class Source(str, Enum):
    """Which paper's figure a preset's counterpart follows."""

    TSELEPIDIS = "tselepidis"
    KOROKO = "koroko"

    @property
    def citation(self) -> str:
        """Short citation of the source figure."""
        if self is Source.TSELEPIDIS:
            return "Tselepidis, Kohler & Orvieto (2020), layout of the authors' plot.py"
        return "Koroko et al. (2023), train loss vs epochs and vs time"


def source_of(preset: str) -> Source | None:
    """The source paper of an author-named preset (``tselepidis_*``, ``koroko_*``), else None."""
    for source in Source:
        if preset.startswith(f"{source.value}_"):
            return source
    return None


def author_presets(results: ResultsSet) -> list[str]:
    """Author-named presets with at least one readable run, sorted."""
    experiments = results.runs["experiment"].dropna().astype(str).unique()
    return sorted(e for e in experiments if source_of(e) is not None)


def _paper_labels(results: ResultsSet, keys: Sequence[GroupKey]) -> dict[GroupKey, GroupLabel]:
    """The sources' optimizer names (by family), plus whatever else tells groups apart."""
    labels = short_labels(keys)
    out = {}
    for key, label in labels.items():
        families = group_runs(results, key)["optimizer_family"].dropna().astype(str)
        family = families.iloc[0] if len(families) else key.optimizer
        short = label.short
        if key.optimizer == family and family in FAMILY_NAMES:  # the sources' names
            short = FAMILY_NAMES[family] + short[len(key.optimizer) :]
        out[key] = GroupLabel(short=short, full=label.full)
    return out


def _has(results: ResultsSet, metric: str) -> bool:
    return metric in results.evals.columns and bool(results.evals[metric].notna().any())


def plot_source(
    results: ResultsSet,
    *,
    preset: str,
    band: Band = Band.CI95,
    palette: Palette | None = None,
    caption: Caption | None = None,
) -> Figure:
    """The source figure's counterpart for one author-named preset (``results`` with running
    losses filled in, see ``analyze.running.with_running_loss``)."""
    source = source_of(preset)
    if source is None:
        raise ValueError(f"preset {preset}: not author-named (tselepidis_* or koroko_*)")
    caption = caption if caption is not None else Caption()
    mine = results.of_experiment(preset)
    keys = [k for b in mine.benchmarks() for k in groups_of(mine, benchmark=b)]
    shown = capped_groups(mine, keys, caption)
    labels = _paper_labels(mine, shown)
    palette = figure_palette(palette, (k.optimizer for k in shown))
    if source is Source.TSELEPIDIS:
        train_acc = RUNNING_ACC if _has(mine, RUNNING_ACC) else "train_acc"
        layout = [[(RUNNING_LOSS, Axis.EPOCH), ("test_loss", Axis.EPOCH)]]
        if _has(mine, train_acc) or _has(mine, "test_acc"):
            layout.append([(train_acc, Axis.EPOCH), ("test_acc", Axis.EPOCH)])
        titles = ["Training Loss", "Test Loss", "Training Accuracy", "Test Accuracy"]
    else:
        layout = [[(RUNNING_LOSS, Axis.EPOCH), (RUNNING_LOSS, Axis.WALL)]]
        titles = ["Training loss vs epochs", "Training loss vs time"]
    legend = Legend()
    rows, cols = len(layout), len(layout[0])
    with figure_style():
        width = max(PANEL_WIDTH_IN * 1.25 * cols, MIN_FIGURE_WIDTH_IN)
        fig = Figure(figsize=(width, PANEL_HEIGHT_IN * 1.2 * rows), layout="constrained")
        grid = fig.subplots(rows, cols, squeeze=False)
        panels = Panels(mine, labels, band, palette, legend, caption)
        for row, cells in enumerate(layout):
            for col, (metric, axis) in enumerate(cells):
                ax = grid[row][col]
                panels.draw(ax, keys=shown, metric=metric, axis=axis)
                ax.set_title(titles[row * cols + col])
        benchmarks = ", ".join(mine.benchmarks())
        title = f"{preset} ({benchmarks}): counterpart of {source.citation}"
        fig.suptitle(fit_title(fig, title))
        caption.title = title
        recorded = _recorded_share(mine)
        caption.note(
            "training loss: running mean of the train-mode mini-batch losses over each epoch "
            f"(the sources' metric); recorded by {recorded} of the runs, computed from "
            "metrics_steps.parquet batch_loss for the rest"
        )
        caption.note(
            "line: geometric mean over completed seeds on log axes (arithmetic on accuracy); "
            f"{band.description}, on log axes computed on the log values"
        )
        legend.attach(fig, band, panels_height_in=PANEL_HEIGHT_IN * 1.2 * rows)
    return fig


def _recorded_share(results: ResultsSet) -> str:
    """How many runs recorded the running loss themselves (``k/n``)."""
    runs = results.runs
    column = f"final_{RUNNING_LOSS}"
    if column not in runs.columns:
        return f"0/{len(runs)}"
    recorded = np.isfinite(np.asarray(runs[column], dtype=float)).sum()
    return f"{int(recorded)}/{len(runs)}"
