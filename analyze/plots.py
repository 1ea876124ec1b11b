"""Figures (PNG and PDF): per-benchmark curves, a multi-benchmark main figure, profiles.

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI); saving renders
them with the Agg canvas (PNG) and the PDF backend, whatever the session's backend is.

Every mean line carries ``gid = "mean:<legend label>"``, every band ``"band:<label>"`` and every
diverged run ``"diverged:<run_id>"``, so tests and users can find them on the Axes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter

from analyze.aggregate import (
    Axis,
    Band,
    GroupKey,
    LossKind,
    diverged_curves,
    group_evals,
    group_labels,
    group_runs,
    groups_of,
    seed_mean,
)
from analyze.load import ResultsSet
from analyze.stats import Profile
from analyze.style import (
    BAND_ALPHA,
    DIVERGED_LINESTYLE,
    FIGURE_FORMATS,
    LOSS_NOTE,
    PNG_DPI,
    VARIANT_LINESTYLES,
    Palette,
    figure_style,
    is_loss,
    metric_label,
)

PANEL_WIDTH_IN = 2.7
PANEL_HEIGHT_IN = 2.1
LEGEND_HEIGHT_IN = 0.5
LEGEND_HANDLE_IN = 0.55
MIN_MAIN_COLUMNS = 3  # the main figure is at least this many panels wide (room for the legend)
AXIS_TITLES = {Axis.EPOCH: "vs epochs", Axis.STEP: "vs optimizer steps", Axis.WALL: "vs wall-clock"}


@dataclass
class _Legend:
    """Legend entries collected over a figure's panels, in first-seen order."""

    handles: dict[str, Line2D | Patch]
    diverged: bool = False

    def add_group(self, label: str, colour: str, linestyle: Any) -> None:
        self.handles.setdefault(label, Line2D([], [], color=colour, linestyle=linestyle))

    def attach(self, fig: Figure, band: Band) -> None:
        handles = dict(self.handles)
        if self.diverged:
            handles["diverged run (× last value)"] = Line2D(
                [], [], color="0.4", linestyle=DIVERGED_LINESTYLE, marker="x", linewidth=0.9
            )
        handles[band.description] = Patch(facecolor="0.5", alpha=BAND_ALPHA * 1.5)
        fig.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="outside lower center",
            ncols=legend_columns(fig, list(handles)),
        )


def fit_title(fig: Figure, text: str) -> str:
    """Wrap a figure title onto as many lines as the figure's width needs."""
    font_pt = float(matplotlib.rcParams["figure.titlesize"])
    per_line = max(20, int(fig.get_figwidth() * 0.95 * 72 / (0.55 * font_pt)))
    return "\n".join(textwrap.wrap(text, per_line))


def legend_columns(fig: Figure, labels: Sequence[str]) -> int:
    """As many legend columns as fit the figure's width (estimated from the longest label)."""
    font_pt = float(matplotlib.rcParams["legend.fontsize"])
    column_in = max(len(label) for label in labels) * 0.55 * font_pt / 72 + LEGEND_HANDLE_IN
    fitting = int(fig.get_figwidth() * 0.95 // column_in)
    return max(1, min(len(labels), fitting))


def _linestyles(keys: Sequence[GroupKey]) -> dict[GroupKey, Any]:
    """Line style per group: one per data variant (the most used first), then per setting."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key.data_variant] = counts.get(key.data_variant, 0) + 1
    variants = sorted(counts, key=lambda v: (-counts[v], v))
    settings: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        siblings = settings.setdefault((key.optimizer, key.data_variant), [])
        if key.setting not in siblings:
            siblings.append(key.setting)
    return {
        key: VARIANT_LINESTYLES[
            (variants.index(key.data_variant) + settings[key[2], key[1]].index(key.setting))
            % len(VARIANT_LINESTYLES)
        ]
        for key in keys
    }


def _log_ticks(ax: Axes) -> None:
    """Plain-number tick labels on a log y-axis (minor ticks labelled when under a decade)."""
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_panel(
    ax: Axes,
    results: ResultsSet,
    *,
    keys: Sequence[GroupKey],
    labels: dict[GroupKey, str],
    metric: str,
    axis: Axis,
    band: Band,
    palette: Palette,
    legend: _Legend,
) -> bool:
    """Draw each group's seed mean, band and diverged runs; False when nothing was drawn."""
    styles = _linestyles(keys)
    drawn_values: list[np.ndarray] = []
    for key in keys:
        colour = palette.colour(key.optimizer)
        n_seeds = int(group_runs(results, key)["usable"].sum())
        label = f"{labels[key]} (n={n_seeds})"
        curve = seed_mean(
            group_evals(results, key, usable=True), key=key, metric=metric, axis=axis, band=band
        )
        if curve is not None:
            lower = curve.lower
            if is_loss(metric):
                lower = np.where(lower > 0, lower, curve.values.min(axis=0))
            ax.fill_between(
                curve.x,
                lower,
                curve.upper,
                color=colour,
                alpha=BAND_ALPHA,
                linewidth=0,
                gid=f"band:{labels[key]}",
            )
            ax.plot(
                curve.x,
                curve.mean,
                color=colour,
                linestyle=styles[key],
                label=label,
                gid=f"mean:{labels[key]}",
            )
            drawn_values.append(curve.values.ravel())
        diverged = diverged_curves(
            group_evals(results, key, usable=False), metric=metric, axis=axis
        )
        for run_id, x, y in diverged:
            ax.plot(
                x,
                y,
                color=colour,
                linestyle=DIVERGED_LINESTYLE,
                linewidth=0.9,
                alpha=0.8,
                label="_nolegend_",
                gid=f"diverged:{run_id}",
            )
            ax.plot(x[-1:], y[-1:], color=colour, marker="x", linestyle="none", label="_nolegend_")
            drawn_values.append(y)
            legend.diverged = True
        if curve is not None or diverged:
            legend.add_group(label, colour, styles[key])
    if not drawn_values:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return False
    values = np.concatenate(drawn_values)
    if is_loss(metric) and np.all(values > 0):
        ax.set_yscale("log")
        _log_ticks(ax)
    ax.set_ylabel(metric_label(metric, percent=bool(np.nanmax(values) > 1.0)))
    ax.set_xlabel(axis.label)
    return True


def benchmark_metrics(results: ResultsSet, *, benchmark: str, loss_kind: LossKind) -> list[str]:
    """Metrics with data on a benchmark: train loss, test loss, accuracy where present."""
    evals = results.evals[results.evals["benchmark"] == benchmark]
    candidates = [loss_kind.column("train"), loss_kind.column("test"), "test_acc"]
    return [m for m in candidates if m in evals.columns and evals[m].notna().any()]


def plot_benchmark(
    results: ResultsSet,
    *,
    benchmark: str,
    axes: Sequence[Axis] = (Axis.EPOCH, Axis.STEP, Axis.WALL),
    band: Band = Band.CI95,
    loss_kind: LossKind = LossKind.SUM,
    palette: Palette | None = None,
    subtitle: str | None = None,
) -> Figure:
    """One benchmark: rows train loss / test loss / accuracy, columns the chosen x-axes."""
    keys = groups_of(results, benchmark=benchmark)
    labels = group_labels(results, keys)
    palette = palette or Palette.for_optimizers(k.optimizer for k in keys)
    metrics = benchmark_metrics(results, benchmark=benchmark, loss_kind=loss_kind) or [
        loss_kind.column("train")
    ]
    legend = _Legend({})
    with figure_style():
        fig = Figure(
            figsize=(
                PANEL_WIDTH_IN * len(axes),
                PANEL_HEIGHT_IN * len(metrics) + LEGEND_HEIGHT_IN,
            ),
            layout="constrained",
        )
        grid = fig.subplots(len(metrics), len(axes), squeeze=False)
        for row, metric in enumerate(metrics):
            for col, axis in enumerate(axes):
                ax = grid[row][col]
                _draw_panel(
                    ax,
                    results,
                    keys=keys,
                    labels=labels,
                    metric=metric,
                    axis=axis,
                    band=band,
                    palette=palette,
                    legend=legend,
                )
                if row == 0:
                    ax.set_title(AXIS_TITLES[axis])
        name = benchmark if subtitle is None else f"{benchmark} ({subtitle})"
        fig.suptitle(fit_title(fig, f"{name}: mean over seeds; {LOSS_NOTE[loss_kind.value]}"))
        legend.attach(fig, band)
    return fig


def plot_main(
    results: ResultsSet,
    *,
    benchmarks: Sequence[str],
    axes: Sequence[Axis] = (Axis.EPOCH, Axis.WALL),
    band: Band = Band.CI95,
    loss_kind: LossKind = LossKind.SUM,
    palette: Palette | None = None,
) -> Figure:
    """Main figure: train loss, one column per benchmark, one row per x-axis."""
    all_keys = [k for b in benchmarks for k in groups_of(results, benchmark=b)]
    labels = group_labels(results, all_keys)
    palette = palette or Palette.for_optimizers(k.optimizer for k in all_keys)
    metric = loss_kind.column("train")
    legend = _Legend({})
    with figure_style():
        fig = Figure(
            figsize=(
                PANEL_WIDTH_IN * max(len(benchmarks), MIN_MAIN_COLUMNS),
                PANEL_HEIGHT_IN * len(axes) + LEGEND_HEIGHT_IN,
            ),
            layout="constrained",
        )
        grid = fig.subplots(len(axes), max(len(benchmarks), 1), squeeze=False)
        for col, benchmark in enumerate(benchmarks):
            keys = [k for k in all_keys if k.benchmark == benchmark]
            for row, axis in enumerate(axes):
                ax = grid[row][col]
                _draw_panel(
                    ax,
                    results,
                    keys=keys,
                    labels=labels,
                    metric=metric,
                    axis=axis,
                    band=band,
                    palette=palette,
                    legend=legend,
                )
                if row == 0:
                    ax.set_title(benchmark)
        fig.suptitle(fit_title(fig, f"Train loss, mean over seeds; {LOSS_NOTE[loss_kind.value]}"))
        legend.attach(fig, band)
    return fig


def plot_profile(
    profiles: dict[str, Profile],
    *,
    optimizer_of: dict[str, str],
    palette: Palette,
) -> Figure:
    """Performance profiles, one panel per time measure (e.g. wall-clock, epochs)."""
    with figure_style():
        fig = Figure(
            figsize=(PANEL_WIDTH_IN * 1.3 * len(profiles), PANEL_HEIGHT_IN * 1.3 + 0.4),
            layout="constrained",
        )
        grid = fig.subplots(1, max(len(profiles), 1), squeeze=False)
        handles: dict[str, Line2D] = {}
        for col, (measure, profile) in enumerate(profiles.items()):
            ax = grid[0][col]
            seen: dict[str, int] = {}
            for label, fractions in profile.fractions.items():
                optimizer = optimizer_of.get(label, label)
                style = VARIANT_LINESTYLES[seen.get(optimizer, 0) % len(VARIANT_LINESTYLES)]
                seen[optimizer] = seen.get(optimizer, 0) + 1
                colour = palette.colour(optimizer)
                ax.step(
                    profile.tau,
                    fractions,
                    where="post",
                    color=colour,
                    linestyle=style,
                    label=label,
                    gid=f"profile:{label}",
                )
                handles.setdefault(label, Line2D([], [], color=colour, linestyle=style))
            ax.set_xlim(1.0, profile.r_max)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(f"τ (time-to-target / fastest, {measure})")
            ax.set_ylabel("fraction of problems solved")
            ax.set_title(f"{measure}, r_max = {profile.r_max:g}")
        fig.suptitle(fit_title(fig, "Performance profiles over benchmarks (AlgoPerf style)"))
        if handles:
            fig.legend(
                list(handles.values()),
                list(handles.keys()),
                loc="outside lower center",
                ncols=legend_columns(fig, list(handles)),
            )
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with figure_style():
        for extension in FIGURE_FORMATS:
            path = out_dir / f"{stem}.{extension}"
            fig.savefig(path, dpi=PNG_DPI if extension == "png" else None)
            paths.append(path)
    return paths
