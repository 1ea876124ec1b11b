"""The study's figure per tuned benchmark: what the verdicts are computed from, drawn.

One figure per tuned study (``tuning.study``; the source-settings studies have their source
figure instead): the final-stage runs of every arm (winners on fresh seeds), with

- the claims' metric, the per-epoch running mean of the train-mode mini-batch losses, against
  epochs and against wall-clock (line: mean over the arm's usable runs; band: their range);
- the final running loss of every usable run, one dot per seed, with the arm's mean.

The trivial baseline (best constant predictor) is drawn dashed on the curves; runs left out of
claims (not completed, did not learn) are not drawn and the caption lists them per arm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, ScalarFormatter

from analyze.labels import Caption
from analyze.plots import PANEL_HEIGHT_IN, PANEL_WIDTH_IN
from analyze.study import (
    ARM_NAMES,
    FINAL_STAGE,
    SOURCE_STUDIES,
    ArmOutcome,
    StudyRun,
    arm_outcomes,
)
from analyze.style import BAND_ALPHA, BASELINE_COLOUR, BASELINE_LINESTYLE, Palette, figure_style

# the arms the palette does not fix take these families' colours with their own line style (a
# matplotlib line style: a name or an (offset, on-off pattern) pair)
LineStyle = str | tuple[int, tuple[int, ...]]
ARM_STYLE: dict[str, tuple[str, LineStyle]] = {
    "sgd": ("sgd", "-"),
    "adam": ("adam", "-"),
    "kfac": ("kfac", "-"),
    "kfac2": ("kfac2", "-"),
    "kfac2_exact": ("kfac2", "--"),
    "kfac2_krylov": ("kfac2", "-."),
    "kfac2_krylov_residual": ("kfac2", (0, (5, 1, 1, 1, 1, 1))),
    "kfac2_spectral": ("kfac2", (0, (8, 2))),
    "kfac2_residual": ("kfac2", (0, (1, 3))),
    "kfac2_accumulate": ("kfac2", ":"),
    "kfac2_authors": ("kfac2", ":"),
}


def tuned_studies(runs: Sequence[StudyRun]) -> list[str]:
    """Tuned studies (not source-settings ones) with at least one usable final-stage run."""
    finals = [r for r in runs if r.stage == FINAL_STAGE and r.usable]
    return sorted({r.study for r in finals if r.study not in SOURCE_STUDIES})


def _style(arm: str, palette: Palette) -> tuple[str, LineStyle]:
    family, linestyle = ARM_STYLE.get(arm, (arm, "-"))
    return palette.colour(family), linestyle


def _mean_curve(outcome: ArmOutcome) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean wall-clock, mean/min/max running loss over the usable runs' common epochs."""
    curves = [r.curve for r in outcome.usable]
    length = min(len(c.epochs) for c in curves)
    losses = np.stack([c.running_loss[:length] for c in curves])
    walls = np.stack([c.wall_s[:length] for c in curves])
    return (
        curves[0].epochs[:length],
        walls.mean(axis=0),
        losses.mean(axis=0),
        np.stack([losses.min(axis=0), losses.max(axis=0)]),
    )


def _curves(
    ax: Axes, outcomes: dict[str, ArmOutcome], palette: Palette, *, wall: bool, baseline: float
) -> None:
    for arm, outcome in outcomes.items():
        if not outcome.usable:
            continue
        epochs, walls, mean, band = _mean_curve(outcome)
        x = walls if wall else epochs
        colour, linestyle = _style(arm, palette)
        ax.plot(x, mean, color=colour, linestyle=linestyle, marker="o", markersize=2.5, label=arm)
        ax.fill_between(x, band[0], band[1], color=colour, alpha=BAND_ALPHA, linewidth=0)
    if np.isfinite(baseline):
        ax.axhline(baseline, color=BASELINE_COLOUR, linestyle=BASELINE_LINESTYLE, linewidth=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter() if _narrow(ax) else "")
    ax.set_xlabel("wall-clock time (s)" if wall else "epoch (passes over the training set)")
    if not wall:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss, running mean (nats)")
    ax.grid(True, which="both", alpha=0.3)


def _narrow(ax: Axes) -> bool:
    """Whether the y range spans less than a factor 3 (label the minor ticks too)."""
    low, high = ax.get_ylim()
    return low > 0 and high / low < 3


def _finals(ax: Axes, outcomes: dict[str, ArmOutcome], palette: Palette) -> None:
    arms = [a for a, o in outcomes.items() if o.usable]
    rng = np.random.default_rng(0)  # jitter only: positions carry no information
    for index, arm in enumerate(arms):
        values = np.array([r.final_running_loss for r in outcomes[arm].usable])
        colour, _ = _style(arm, palette)
        jitter = rng.uniform(-0.15, 0.15, size=values.size)
        ax.scatter(index + jitter, values, s=9, color=colour, alpha=0.8, linewidths=0)
        ax.hlines(values.mean(), index - 0.3, index + 0.3, color=colour, linewidth=1.5)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel("final running train loss (nats)")
    ax.grid(True, axis="y", alpha=0.3)


def plot_study(
    runs: Sequence[StudyRun],
    *,
    study: str,
    palette: Palette | None = None,
    caption: Caption | None = None,
) -> Figure:
    """The study figure of one tuned benchmark (see the module docstring)."""
    outcomes = arm_outcomes(runs, study)
    if not any(o.usable for o in outcomes.values()):
        raise ValueError(f"study {study}: no usable final run to draw")
    caption = caption if caption is not None else Caption()
    palette = palette or Palette.for_optimizers(ARM_STYLE[a][0] for a in outcomes if a in ARM_STYLE)
    finals = [r for o in outcomes.values() for r in o.runs]
    baselines = {round(r.baseline_train_loss, 6) for r in finals}
    baseline = finals[0].baseline_train_loss if len(baselines) == 1 else float("nan")
    with figure_style():
        fig = Figure(figsize=(PANEL_WIDTH_IN * 3.4, PANEL_HEIGHT_IN * 1.25), layout="constrained")
        by_epoch, by_wall, by_seed = fig.subplots(1, 3)
        _curves(by_epoch, outcomes, palette, wall=False, baseline=baseline)
        _curves(by_wall, outcomes, palette, wall=True, baseline=baseline)
        _finals(by_seed, outcomes, palette)
        by_epoch.set_title("vs epochs")
        cpus = {arm: sorted({r.cpu for r in o.usable}) for arm, o in outcomes.items() if o.usable}
        mixed = len({cpu for names in cpus.values() for cpu in names}) > 1
        by_wall.set_title("vs wall-clock (CPUs differ: see caption)" if mixed else "vs wall-clock")
        by_seed.set_title("final running loss per seed")
        handles, labels = by_epoch.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
        variants = sorted({r.data_variant for r in finals})
        title = f"study {study} ({', '.join(variants)}): final runs of every arm after equal tuning"
        fig.suptitle(title)
    caption.title = title
    caption.note(
        "metric of every claim: the running mean of the train-mode mini-batch losses over each "
        "epoch (NLL summed over outputs, mean over examples, nats)"
    )
    caption.note("line: mean over the arm's usable final runs; band: their min-max range")
    if np.isfinite(baseline):
        predictor = finals[0].baseline_predictor or "best constant predictor"
        caption.note(f"dashed: trivial baseline ({predictor}), {baseline:.4g} nats")
    if mixed:
        caption.note(
            "wall-clock compares only between arms on the same CPU; the arms ran on "
            + "; ".join(f"{arm}: {', '.join(names)}" for arm, names in cpus.items())
        )
    for arm, outcome in outcomes.items():
        seeds = sorted(r.seed for r in outcome.usable)
        line = f"{arm} = {ARM_NAMES.get(arm, arm)}: {len(seeds)} usable runs (seeds {seeds})"
        reasons: dict[str, list[int]] = {}
        for run in outcome.excluded:  # grouped by the reason's kind, its numbers dropped
            reasons.setdefault(str(run.exclusion_reason()).split(":")[0], []).append(run.seed)
        left = [f"{why} (seeds {sorted(seeds)})" for why, seeds in reasons.items()]
        caption.note(line + (f"; not drawn: {'; '.join(left)}" if left else ""))
        caption.legend[arm] = ARM_NAMES.get(arm, arm)
    return fig
