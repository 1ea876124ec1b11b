"""Figures (PNG and PDF): per-benchmark curves, a multi-benchmark main figure, profiles.

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI); saving renders
them with the Agg canvas (PNG) and the PDF backend, whatever the session's backend is.

Layout rules every figure keeps, whatever the runs:

- at most ``MAX_GROUPS_PER_AXIS`` groups per panel (more: one group per optimizer, the one with
  the most seeds, and the caption says so; ``group_pages`` splits the rest over more figures);
- short legend labels (``analyze.labels``), the full settings in the figure's caption file;
- the legend sits below the panels in rows the figure grows by, so panels keep their size;
- the y-range comes from completed runs' finite values (Tukey fences on the quartiles, widened
  to the curves' starts and the baseline); a curve leaving it gets a triangle on the edge where
  it leaves; diverged runs are drawn dotted and end in × when they stay inside;
- on log axes the mean is geometric and the band is computed on the log values; accuracy
  bands are clipped to [0, 1] (or [0, 100] %); no band reaches outside the y-range.

Every mean line carries ``gid = "mean:<legend label>"``, every band ``"band:<label>"``, every
diverged run ``"diverged:<run_id>"``, the edge markers ``"edge:<label>"`` and
``"diverged-edge:<run_id>"``, and the
best constant predictor's line ``"baseline:<data variant>"``.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
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
    group_runs,
    groups_of,
    seed_mean,
)
from analyze.labels import Caption, GroupLabel, short_labels, shorten_names
from analyze.load import ResultsSet, schema_default
from analyze.stats import Profile
from analyze.style import (
    BAND_ALPHA,
    BASELINE_COLOUR,
    BASELINE_LINESTYLE,
    DIVERGED_LINESTYLE,
    FIGURE_FORMATS,
    LOSS_NOTE,
    PNG_DPI,
    VARIANT_LINESTYLES,
    Palette,
    figure_palette,
    figure_style,
    is_loss,
    metric_label,
)

PANEL_WIDTH_IN = 2.7
PANEL_HEIGHT_IN = 2.1
MIN_FIGURE_WIDTH_IN = 6.0  # room for a legend of two columns under one or two panels
LEGEND_ROW_IN = 0.19
LEGEND_PAD_IN = 0.2
TITLE_LINE_IN = 0.2
LEGEND_HANDLE_IN = 0.55
MAX_GROUPS_PER_AXIS = 8
ROBUST_QUANTILES = (0.25, 0.75)
TUKEY_REACH = 1.5  # the range reaches this many interquartile ranges beyond the quartiles
EDGE_INSET = 0.03  # edge markers sit this share of the axis height inside the edge
RANGE_PAD = 0.04  # fraction of the (log) range added on each side
AXIS_TITLES = {Axis.EPOCH: "vs epochs", Axis.STEP: "vs optimizer steps", Axis.WALL: "vs wall-clock"}
BASELINE_LABEL = "best constant predictor"


@dataclass
class Legend:
    """Legend entries collected over a figure's panels, in first-seen order."""

    handles: dict[str, Line2D | Patch] = field(default_factory=dict)
    diverged: bool = False
    edge: bool = False
    baseline: str | None = None

    def add_group(self, label: str, colour: str, linestyle: Any) -> None:
        self.handles.setdefault(label, Line2D([], [], color=colour, linestyle=linestyle))

    def entries(self, band: Band) -> dict[str, Line2D | Patch]:
        handles = dict(self.handles)
        if self.baseline is not None:
            handles[self.baseline] = Line2D(
                [], [], color=BASELINE_COLOUR, linestyle=BASELINE_LINESTYLE, linewidth=1.0
            )
        if self.diverged:
            handles["diverged run (× last value)"] = Line2D(
                [], [], color="0.4", linestyle=DIVERGED_LINESTYLE, marker="x", linewidth=0.9
            )
        if self.edge:
            handles["▲ ▼ curve leaves the y-range here"] = Line2D(
                [], [], color="0.4", linestyle="none", marker="^", markersize=5
            )
        handles[band.description] = Patch(facecolor="0.5", alpha=BAND_ALPHA * 1.5)
        return handles

    def attach(self, fig: Figure, band: Band, *, panels_height_in: float) -> None:
        """Put the legend below the panels and grow the figure by the legend's rows."""
        handles = self.entries(band)
        ncols = legend_columns(fig, list(handles))
        rows = math.ceil(len(handles) / ncols)
        title_lines = len(fig.get_suptitle().splitlines())
        fig.set_figheight(
            panels_height_in + rows * LEGEND_ROW_IN + LEGEND_PAD_IN + title_lines * TITLE_LINE_IN
        )
        fig.legend(
            list(handles.values()), list(handles.keys()), loc="outside lower center", ncols=ncols
        )


def fit_title(fig: Figure, text: str) -> str:
    """Wrap a figure title onto as many lines as the figure's width needs."""
    font_pt = float(matplotlib.rcParams["figure.titlesize"])
    per_line = max(20, int(fig.get_figwidth() * 0.9 * 72 / (0.6 * font_pt)))
    return "\n".join(textwrap.wrap(text, per_line))


def legend_columns(fig: Figure, labels: Sequence[str]) -> int:
    """As many legend columns as fit the figure's width (estimated from the longest label)."""
    font_pt = float(matplotlib.rcParams["legend.fontsize"])
    column_in = max(len(label) for label in labels) * 0.6 * font_pt / 72 + LEGEND_HANDLE_IN
    fitting = int(fig.get_figwidth() * 0.92 // column_in)
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


class PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label, written as plain numbers (0.6, 3000)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_ticks(ax: Axes) -> None:
    """Plain-number tick labels on a log y-axis (minor ticks labelled when under a decade)."""
    for setter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        setter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def settings_off_default(key: GroupKey) -> int:
    """How many of a group's optimizer settings differ from its family's schema defaults."""
    mine = json.loads(key.setting)
    family = str(mine.get("name", key.optimizer))
    defaults = {name: schema_default(family, name) for name in mine}
    return sum(
        1
        for name, value in mine.items()
        if defaults[name] is not MISSING and str(defaults[name]) != str(value)
    )


def headline_groups(results: ResultsSet, keys: Sequence[GroupKey]) -> list[GroupKey]:
    """One group per (benchmark, data variant, optimizer): the one with the most usable seeds,
    among those the one with the fewest settings off the optimizer's defaults (e.g. the
    two-level default ``coarse_refresh=rebuild`` over the authors' ``accumulate``), then the
    first in ``groups_of`` order. The choice never looks at the losses.
    """
    best: dict[tuple[str, str, str], tuple[tuple[int, int], GroupKey]] = {}
    for key in keys:
        rank = (int(group_runs(results, key)["usable"].sum()), -settings_off_default(key))
        if key[:3] not in best or rank > best[key[:3]][0]:
            best[key[:3]] = (rank, key)
    chosen = {key for _, key in best.values()}
    return [key for key in keys if key in chosen]


def capped_groups(
    results: ResultsSet, keys: Sequence[GroupKey], caption: Caption
) -> list[GroupKey]:
    """``keys`` when there are at most ``MAX_GROUPS_PER_AXIS``, else the headline groups."""
    if len(keys) <= MAX_GROUPS_PER_AXIS:
        return list(keys)
    chosen = headline_groups(results, keys)[:MAX_GROUPS_PER_AXIS]
    caption.note(
        f"{len(keys)} groups are too many for one axis: shown is one setting per optimizer "
        "(the one with the most seeds, then the fewest settings off the optimizer's defaults); "
        "the per-preset figures show every setting."
    )
    return chosen


def group_pages(
    results: ResultsSet, keys: Sequence[GroupKey], *, cap: int = MAX_GROUPS_PER_AXIS
) -> list[list[GroupKey]]:
    """Split ``keys`` into pages of at most ``cap`` groups, keeping each optimizer together."""
    pages: list[list[GroupKey]] = [[]]
    for optimizer in dict.fromkeys(k.optimizer for k in keys):
        mine = [k for k in keys if k.optimizer == optimizer]
        for start in range(0, len(mine), cap):
            chunk = mine[start : start + cap]
            if len(pages[-1]) + len(chunk) > cap:
                pages.append([])
            pages[-1].extend(chunk)
    return [page for page in pages if page]


def baseline_value(results: ResultsSet, key: GroupKey, metric: str) -> float | None:
    """The recorded best-constant-predictor loss for ``metric``'s split (None: not recorded)."""
    split = metric.split("_", 1)[0]
    column = f"baseline_{split}_loss"
    runs = results.runs
    if column not in runs.columns:
        return None
    same = runs[(runs["benchmark"] == key.benchmark) & (runs["data_variant"] == key.data_variant)]
    values = pd.to_numeric(same[column], errors="coerce")
    if metric.endswith("_per_output"):
        per_output = pd.to_numeric(same.get(f"final_{split}_loss_per_output"), errors="coerce")
        summed = pd.to_numeric(same.get(f"final_{split}_loss"), errors="coerce")
        values = values * per_output / summed
    finite = values[np.isfinite(values)]
    return float(finite.median()) if len(finite) else None


def baseline_predictor(results: ResultsSet, key: GroupKey) -> str | None:
    """The recorded baseline predictor's short description, if any."""
    if "baseline_predictor" not in results.runs.columns:
        return None
    runs = results.runs
    names = runs[(runs["benchmark"] == key.benchmark)]["baseline_predictor"].dropna()
    return str(names.iloc[0]) if len(names) else None


def robust_range(
    values: np.ndarray, *, log: bool, keep: Sequence[float] = ()
) -> tuple[float, float] | None:
    """A y-range over the data's bulk: Tukey fences (quartiles ± 1.5 IQR, on log values for a
    log axis), widened to the values in ``keep`` (curves' starts, baselines), never beyond the
    data. Values outside are drawn clipped and marked where they leave."""
    finite = values[np.isfinite(values)]
    kept = np.asarray(keep, dtype=float)
    kept = kept[np.isfinite(kept)]
    if log:
        finite, kept = np.log(finite[finite > 0]), np.log(kept[kept > 0])
    if finite.size == 0:
        return None
    q1, q3 = np.quantile(finite, ROBUST_QUANTILES)
    spread = float(q3 - q1)
    low = max(float(finite.min()), q1 - TUKEY_REACH * spread)
    high = min(float(finite.max()), q3 + TUKEY_REACH * spread)
    if kept.size:
        low, high = min(low, float(kept.min())), max(high, float(kept.max()))
    pad = RANGE_PAD * max(high - low, 1e-3 * max(abs(high), 1e-12), 1e-12)
    low, high = low - pad, high + pad
    return (math.exp(low), math.exp(high)) if log else (low, high)


def _accuracy_limits(percent: bool) -> tuple[float, float]:
    return (0.0, 100.0) if percent else (0.0, 1.0)


@dataclass
class Panels:
    """What every panel of one figure shares: runs, labels, band, colours, legend, caption."""

    results: ResultsSet
    labels: dict[GroupKey, GroupLabel]
    band: Band
    palette: Palette
    legend: Legend
    caption: Caption

    def draw(self, ax: Axes, *, keys: Sequence[GroupKey], metric: str, axis: Axis) -> bool:
        """Draw one panel (see ``draw_panel``)."""
        return draw_panel(ax, self, keys=keys, metric=metric, axis=axis)


def draw_panel(
    ax: Axes,
    panels: Panels,
    *,
    keys: Sequence[GroupKey],
    metric: str,
    axis: Axis,
) -> bool:
    """Draw each group's seed mean, band and diverged runs; False when nothing was drawn."""
    results, labels, band = panels.results, panels.labels, panels.band
    palette, legend, caption = panels.palette, panels.legend, panels.caption
    styles = _linestyles(keys)
    usable = [group_evals(results, key, usable=True) for key in keys]
    diverged = [
        diverged_curves(group_evals(results, key, usable=False), metric=metric, axis=axis)
        for key in keys
    ]
    raw = [e[metric].to_numpy(dtype=float) for e in usable if metric in e.columns]
    raw += [y for runs in diverged for _, _, y in runs]
    everything = np.concatenate(raw) if raw else np.array([])
    finite = everything[np.isfinite(everything)]
    log = is_loss(metric) and finite.size > 0 and bool(np.all(finite > 0))
    curves = [
        seed_mean(evals, key=key, metric=metric, axis=axis, band=band, log=log)
        for key, evals in zip(keys, usable, strict=True)
    ]
    kept = [c.values.ravel() for c in curves if c is not None]
    lost = [y for runs in diverged for _, _, y in runs]
    if not kept and not lost:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return False
    percent = bool(finite.size and np.nanmax(finite) > 1.0) and metric.endswith("_acc")
    baselines = {}
    if is_loss(metric):
        for key in keys:
            value = baseline_value(results, key, metric)
            if value is not None and (value > 0 or not log):
                baselines[key.data_variant] = (value, baseline_predictor(results, key))
    range_values = np.concatenate(kept) if kept else np.concatenate(lost)
    starts = [float(c.mean[0]) for c in curves if c is not None and c.mean.size]
    limits = robust_range(range_values, log=log, keep=starts + [v for v, _ in baselines.values()])
    if metric.endswith("_acc"):
        bounds = _accuracy_limits(percent)
        if limits is None:
            limits = bounds
        else:
            pad = RANGE_PAD * (bounds[1] - bounds[0])
            limits = (max(limits[0], bounds[0] - pad), min(limits[1], bounds[1] + pad))
    for key, curve, runs in zip(keys, curves, diverged, strict=True):
        colour = palette.colour(key.optimizer)
        n_seeds = int(group_runs(results, key)["usable"].sum())
        label = f"{labels[key].short} (n={n_seeds})"
        caption.legend[label] = labels[key].full
        if curve is not None:
            lower, upper = curve.lower, curve.upper
            if metric.endswith("_acc"):
                lower, upper = (np.clip(b, *_accuracy_limits(percent)) for b in (lower, upper))
            if limits is not None:
                lower, upper = (np.clip(b, *limits) for b in (lower, upper))
            ax.fill_between(
                curve.x,
                lower,
                upper,
                color=colour,
                alpha=BAND_ALPHA,
                linewidth=0,
                gid=f"band:{labels[key].short}",
            )
            ax.plot(
                curve.x,
                curve.mean,
                color=colour,
                linestyle=styles[key],
                label=label,
                gid=f"mean:{labels[key].short}",
            )
            if limits is not None:
                _mark_exit(
                    ax,
                    f"edge:{labels[key].short}",
                    curve.x,
                    curve.mean,
                    limits=limits,
                    log=log,
                    colour=colour,
                    legend=legend,
                )
        for run_id, x, y in runs:
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
            if not _mark_exit(
                ax,
                f"diverged-edge:{run_id}",
                x,
                y,
                limits=limits,
                log=log,
                colour=colour,
                legend=legend,
            ):
                ax.plot(
                    x[-1:],
                    y[-1:],
                    color=colour,
                    marker="x",
                    linestyle="none",
                    label="_nolegend_",
                )
            legend.diverged = True
            caption.note(f"diverged run {run_id} ({labels[key].short}): dotted, never averaged")
        if curve is not None or runs:
            legend.add_group(label, colour, styles[key])
    for variant, (value, predictor) in baselines.items():
        ax.axhline(
            value,
            color=BASELINE_COLOUR,
            linestyle=BASELINE_LINESTYLE,
            linewidth=1.0,
            gid=f"baseline:{variant}",
        )
        legend.baseline = BASELINE_LABEL + (f" ({predictor})" if predictor else "")
        caption.note(
            f"grey dashed line: loss of the best constant predictor"
            f"{f' ({predictor})' if predictor else ''} on {variant}, from the runs' summaries"
        )
    if is_loss(metric) and not baselines:
        caption.note(
            f"no baseline line on {metric}: the runs' summaries do not record "
            f"baseline_{metric.split('_', 1)[0]}_loss (runs recorded before it existed)"
        )
    if log:
        ax.set_yscale("log")
        _log_ticks(ax)
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_ylabel(metric_label(metric, percent=percent))
    ax.set_xlabel(axis.label)
    return True


def _mark_exit(
    ax: Axes,
    gid: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    limits: tuple[float, float] | None,
    log: bool,
    colour: str,
    legend: Legend,
) -> bool:
    """A triangle on the axes' edge where a curve first leaves ``limits``; False if it never
    does."""
    if limits is None:
        return False
    outside = np.flatnonzero((y < limits[0]) | (y > limits[1]))
    if not outside.size:
        return False
    index = int(outside[0])
    above = bool(y[index] > limits[1])
    ax.plot(
        x[index : index + 1],
        [_inside_edge(limits, above=above, log=log)],
        color=colour,
        marker="^" if above else "v",
        markersize=6,
        linestyle="none",
        clip_on=False,
        label="_nolegend_",
        gid=gid,
    )
    legend.edge = True
    return True


def _inside_edge(limits: tuple[float, float], *, above: bool, log: bool) -> float:
    """A y just inside the top (or bottom) edge, so an edge marker never touches the title."""
    share = 1.0 - EDGE_INSET if above else EDGE_INSET
    if log:
        low, high = math.log(limits[0]), math.log(limits[1])
        return math.exp(low + share * (high - low))
    return limits[0] + share * (limits[1] - limits[0])


def benchmark_metrics(results: ResultsSet, *, benchmark: str, loss_kind: LossKind) -> list[str]:
    """Metrics with data on a benchmark: train loss, test loss, accuracy where present."""
    evals = results.evals[results.evals["benchmark"] == benchmark]
    candidates = [loss_kind.column("train"), loss_kind.column("test"), "test_acc"]
    return [m for m in candidates if m in evals.columns and evals[m].notna().any()]


def _standard_notes(caption: Caption, band: Band, loss_kind: LossKind) -> None:
    caption.note(
        "line: mean over completed seeds (geometric mean on log axes); "
        f"{band.description} (on log axes computed on the log values)"
    )
    caption.note(
        "y-range: the completed runs' finite values within Tukey fences (quartiles ± 1.5 IQR, "
        "on log values for log axes), widened to every curve's start and the baseline; a "
        "triangle on the edge marks where a curve leaves it; running, failed and diverged "
        "runs never enter means or range"
    )
    caption.note(LOSS_NOTE[loss_kind.value])


def plot_benchmark(
    results: ResultsSet,
    *,
    benchmark: str,
    axes: Sequence[Axis] = (Axis.EPOCH, Axis.STEP, Axis.WALL),
    band: Band = Band.CI95,
    loss_kind: LossKind = LossKind.SUM,
    palette: Palette | None = None,
    subtitle: str | None = None,
    keys: Sequence[GroupKey] | None = None,
    caption: Caption | None = None,
) -> Figure:
    """One benchmark: rows train loss / test loss / accuracy, columns the chosen x-axes.

    ``keys`` restricts the groups drawn (e.g. one page of ``group_pages``); more than
    ``MAX_GROUPS_PER_AXIS`` fall back to one group per optimizer (said in ``caption``).
    """
    caption = caption if caption is not None else Caption()
    all_keys = list(keys) if keys is not None else groups_of(results, benchmark=benchmark)
    shown = capped_groups(results, all_keys, caption)
    labels = short_labels(shown)
    palette = figure_palette(palette, (k.optimizer for k in shown))
    metrics = benchmark_metrics(results, benchmark=benchmark, loss_kind=loss_kind) or [
        loss_kind.column("train")
    ]
    legend = Legend()
    with figure_style():
        width = max(PANEL_WIDTH_IN * len(axes), MIN_FIGURE_WIDTH_IN)
        fig = Figure(figsize=(width, PANEL_HEIGHT_IN * len(metrics)), layout="constrained")
        grid = fig.subplots(len(metrics), len(axes), squeeze=False)
        panels = Panels(results, labels, band, palette, legend, caption)
        for row, metric in enumerate(metrics):
            for col, axis in enumerate(axes):
                panels.draw(grid[row][col], keys=shown, metric=metric, axis=axis)
        for col, axis in enumerate(axes):
            grid[0][col].set_title(AXIS_TITLES[axis])
        name = benchmark if subtitle is None else f"{benchmark} ({subtitle})"
        title = f"{name}: mean over seeds; {LOSS_NOTE[loss_kind.value]}"
        fig.suptitle(fit_title(fig, title))
        caption.title = title
        _standard_notes(caption, band, loss_kind)
        legend.attach(fig, band, panels_height_in=PANEL_HEIGHT_IN * len(metrics))
    return fig


def plot_main(
    results: ResultsSet,
    *,
    benchmarks: Sequence[str],
    axes: Sequence[Axis] = (Axis.EPOCH, Axis.WALL),
    band: Band = Band.CI95,
    loss_kind: LossKind = LossKind.SUM,
    palette: Palette | None = None,
    caption: Caption | None = None,
) -> Figure:
    """Main figure: train loss, one column per benchmark, one row per x-axis.

    Each benchmark shows one group per optimizer (and data variant): the one with the most
    seeds; the caption names the setting each line stands for.
    """
    caption = caption if caption is not None else Caption()
    per_benchmark = {
        b: headline_groups(results, groups_of(results, benchmark=b)) for b in benchmarks
    }
    all_keys = [k for keys in per_benchmark.values() for k in keys]
    labels = {}
    for keys in per_benchmark.values():
        labels.update(short_labels(keys))
    palette = figure_palette(palette, (k.optimizer for k in all_keys))
    metric = loss_kind.column("train")
    legend = Legend()
    with figure_style():
        width = max(PANEL_WIDTH_IN * len(benchmarks), MIN_FIGURE_WIDTH_IN)
        fig = Figure(figsize=(width, PANEL_HEIGHT_IN * len(axes)), layout="constrained")
        grid = fig.subplots(len(axes), max(len(benchmarks), 1), squeeze=False)
        panels = Panels(results, labels, band, palette, legend, caption)
        for col, benchmark in enumerate(benchmarks):
            for row, axis in enumerate(axes):
                panels.draw(grid[row][col], keys=per_benchmark[benchmark], metric=metric, axis=axis)
        for col, benchmark in enumerate(benchmarks):
            grid[0][col].set_title(benchmark)
        title = f"Train loss, mean over seeds; {LOSS_NOTE[loss_kind.value]}"
        fig.suptitle(fit_title(fig, title))
        caption.title = title
        caption.note(
            "one setting per optimizer and benchmark: the one with the most completed seeds, then "
            "the fewest settings off the optimizer's defaults; "
            "legend n= counts differ by benchmark, the table below gives each line's setting"
        )
        caption.legend = {f"{k.benchmark}: {labels[k].short}": labels[k].full for k in all_keys}
        _standard_notes(caption, band, loss_kind)
        legend.handles = {
            label.rsplit(" (n=", 1)[0]: handle for label, handle in legend.handles.items()
        }
        legend.attach(fig, band, panels_height_in=PANEL_HEIGHT_IN * len(axes))
    return fig


def plot_profile(
    profiles: dict[str, Profile],
    *,
    optimizer_of: dict[str, str],
    palette: Palette,
    caption: Caption | None = None,
) -> Figure:
    """Performance profiles, one panel per time measure (e.g. wall-clock, epochs)."""
    caption = caption if caption is not None else Caption()
    names = list(dict.fromkeys(n for p in profiles.values() for n in p.fractions))
    short = shorten_names(names)
    caption.legend = {short[n]: n for n in names}
    with figure_style():
        width = max(PANEL_WIDTH_IN * 1.3 * len(profiles), MIN_FIGURE_WIDTH_IN)
        height = PANEL_HEIGHT_IN * 1.3
        fig = Figure(figsize=(width, height), layout="constrained")
        grid = fig.subplots(1, max(len(profiles), 1), squeeze=False)
        legend = Legend()
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
                    label=short[label],
                    gid=f"profile:{label}",
                )
                legend.add_group(short[label], colour, style)
            ax.set_xlim(1.0, profile.r_max)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(f"τ (time-to-target / fastest, {measure})")
            ax.set_ylabel("fraction of problems solved")
            ax.set_title(f"{measure}, r_max = {profile.r_max:g}")
        title = "Performance profiles over benchmarks (AlgoPerf style)"
        fig.suptitle(fit_title(fig, title))
        caption.title = title
        if legend.handles:
            handles = legend.handles
            ncols = legend_columns(fig, list(handles))
            rows = math.ceil(len(handles) / ncols)
            fig.set_figheight(height + rows * LEGEND_ROW_IN + LEGEND_PAD_IN + TITLE_LINE_IN)
            fig.legend(
                list(handles.values()),
                list(handles.keys()),
                loc="outside lower center",
                ncols=ncols,
            )
    return fig


def save_figure(
    fig: Figure, out_dir: Path, stem: str, *, caption: Caption | None = None
) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` (and ``<stem>.caption.md``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with figure_style():
        for extension in FIGURE_FORMATS:
            path = out_dir / f"{stem}.{extension}"
            fig.savefig(path, dpi=PNG_DPI if extension == "png" else None)
            paths.append(path)
    if caption is not None:
        paths.append(caption.write(out_dir, stem))
    return paths
