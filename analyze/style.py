"""One figure style: Okabe–Ito colours fixed per optimizer, line styles, rc settings, labels."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import matplotlib

# Okabe & Ito (2008), "Color Universal Design": distinguishable under common colour blindness.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
# The four families keep these colours in every figure; other presets take the rest in order.
FIXED_COLOURS = {
    "sgd": OKABE_ITO["black"],
    "adam": OKABE_ITO["orange"],
    "kfac": OKABE_ITO["blue"],
    "kfac2": OKABE_ITO["vermillion"],
}
SPARE_COLOURS = (
    OKABE_ITO["bluish_green"],
    OKABE_ITO["reddish_purple"],
    OKABE_ITO["sky_blue"],
    OKABE_ITO["yellow"],
)
VARIANT_LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))
DIVERGED_LINESTYLE: Any = (0, (1, 1.5))
BASELINE_COLOUR = "0.45"
BASELINE_LINESTYLE: Any = (0, (6, 3))
BAND_ALPHA = 0.2
FIGURE_FORMATS = ("png", "pdf")
PNG_DPI = 150

RC: dict[Any, Any] = {
    "font.size": 8,
    "axes.titlesize": 9,
    "figure.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "legend.frameon": False,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.dpi": PNG_DPI,
    "figure.dpi": 100,
}


@contextmanager
def figure_style() -> Iterator[None]:
    """Apply the suite's rc settings for the figures built inside the block."""
    with matplotlib.rc_context(RC):
        yield


@dataclass(frozen=True)
class Palette:
    """A fixed colour per optimizer for every figure of one analysis."""

    colours: dict[str, str]

    @classmethod
    def for_optimizers(cls, names: Iterable[str]) -> Palette:
        """Fixed colours for the known families; spare colours to the rest in sorted order."""
        colours = dict(FIXED_COLOURS)
        others = sorted(set(names) - set(colours))
        for index, name in enumerate(others):
            colours[name] = SPARE_COLOURS[index % len(SPARE_COLOURS)]
        return cls(colours)

    def colour(self, optimizer: str) -> str:
        """The optimizer's colour (a name never seen gets black rather than failing)."""
        return self.colours.get(optimizer, OKABE_ITO["black"])


def figure_palette(palette: Palette | None, names: Iterable[str]) -> Palette:
    """The colours of one figure's optimizers: the analysis-wide ``palette`` when it gives each
    of them a colour of its own, else fresh ones for just these (the four families keep theirs).
    An analysis with more presets than spare colours must not draw two lines of a figure alike."""
    shown = sorted(set(names))
    if palette is not None:
        colours = [palette.colours.get(name) for name in shown]
        if None not in colours and len(set(colours)) == len(colours):
            return palette
    return Palette.for_optimizers(shown)


METRIC_LABELS = {
    "train_loss": "train loss",
    "train_running_loss": "train loss (running mean)",
    "train_running_acc": "train accuracy (running mean)",
    "test_loss": "test loss",
    "val_loss": "validation loss",
    "train_loss_per_output": "train loss per output",
    "test_loss_per_output": "test loss per output",
    "val_loss_per_output": "validation loss per output",
    "train_acc": "train accuracy",
    "val_acc": "validation accuracy",
    "test_acc": "test accuracy",
}
LOSS_NOTE = {
    "sum": "losses: NLL summed over outputs, mean over examples (nats)",
    "per_output": "losses: per-output mean NLL (the per-pixel mean papers report; nats)",
}


def metric_label(metric: str, *, percent: bool = False) -> str:
    """Axis label of a metric, with its unit (nats per example, or accuracy as % / fraction)."""
    label = METRIC_LABELS.get(metric, metric.replace("_", " "))
    if metric.endswith("_acc"):
        return f"{label} ({'%' if percent else 'fraction'})"
    return f"{label} (nats)"


def is_loss(metric: str) -> bool:
    """Whether a metric is a loss (drawn on a log scale)."""
    return "_loss" in metric
