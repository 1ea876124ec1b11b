"""Short legend labels for curve groups, and the caption file that maps them to full settings.

A legend shows only what tells groups apart (optimizer, data variant where a benchmark has
several, the settings that differ, abbreviated). A label that would still be long becomes the
optimizer and a number (``kfac #2``); the caption file next to the figure spells every label out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analyze.aggregate import GroupKey

MAX_LABEL_CHARS = 30
CAPTION_SUFFIX = ".caption.md"
SETTING_ABBREVIATIONS = {
    "batch_size": "bs",
    "epochs": "ep",
    "max_steps": "steps",
    "damping": "damp",
    "cov_period": "Tcov",
    "inv_period": "Tinv",
    "momentum": "mom",
    "weight_decay": "wd",
    "coarse_refresh": "coarse",
    "coarse_downsample": "down",
    "learning_rate": "lr",
}


@dataclass(frozen=True)
class GroupLabel:
    """A group's legend label and its full description (every setting)."""

    short: str
    full: str


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pairs(setting: str) -> dict[str, object]:
    try:
        parsed = json.loads(setting)
    except ValueError:
        return {"setting": setting}
    return parsed if isinstance(parsed, dict) else {"setting": setting}


def abbreviate(pairs: dict[str, object], keys: Sequence[str]) -> str:
    """``k=v`` for the given keys, names abbreviated, numbers in their shortest form."""
    return ", ".join(f"{SETTING_ABBREVIATIONS.get(k, k)}={_value(pairs[k])}" for k in keys)


def short_labels(keys: Sequence[GroupKey]) -> dict[GroupKey, GroupLabel]:
    """Legend labels telling ``keys`` apart, each at most ``MAX_LABEL_CHARS`` characters."""
    variants: dict[str, set[str]] = {}
    siblings: dict[tuple[str, str, str], list[GroupKey]] = {}
    for key in keys:
        variants.setdefault(key.benchmark, set()).add(key.data_variant)
        siblings.setdefault((key.benchmark, key.data_variant, key.optimizer), []).append(key)
    numbered: dict[str, list[GroupKey]] = {}
    labels: dict[GroupKey, GroupLabel] = {}
    for key in keys:
        mine = _pairs(key.setting)
        parts = [key.optimizer]
        if len(variants[key.benchmark]) > 1:
            parts.append(key.data_variant)
        others = [_pairs(k.setting) for k in siblings[key[:3]] if k != key]
        varying = sorted(k for k in mine if any(o.get(k) != mine[k] for o in others))
        if varying:
            parts.append(abbreviate(mine, varying))
        short = " · ".join(parts)
        if len(short) > MAX_LABEL_CHARS:
            same = numbered.setdefault(key.optimizer, [])
            same.append(key)
            short = f"{_clip(key.optimizer, MAX_LABEL_CHARS - 4)} #{len(same)}"
        full = f"{key.optimizer} · {key.data_variant} · {abbreviate(mine, sorted(mine))}"
        labels[key] = GroupLabel(short=short, full=full)
    return labels


def shorten_names(names: Sequence[str]) -> dict[str, str]:
    """Legend text for free-form names (e.g. profile solvers): long ones numbered per prefix."""
    out: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name in names:
        text = name
        for long, short in SETTING_ABBREVIATIONS.items():
            text = text.replace(f"{long}=", f"{short}=")
        if len(text) > MAX_LABEL_CHARS:
            prefix = _clip(text.split(" ", 1)[0], MAX_LABEL_CHARS - 4)
            counts[prefix] = counts.get(prefix, 0) + 1
            text = f"{prefix} #{counts[prefix]}"
        out[name] = text
    return out


@dataclass
class Caption:
    """What a figure shows, in Markdown, saved next to it as ``<stem>.caption.md``."""

    title: str = ""
    notes: list[str] = field(default_factory=list)
    legend: dict[str, str] = field(default_factory=dict)  # legend text -> full description

    def note(self, text: str) -> None:
        """Add one line (kept once)."""
        if text not in self.notes:
            self.notes.append(text)

    def markdown(self) -> str:
        """The caption as Markdown: title, notes, and the legend's full mapping."""
        lines = [f"**{self.title}**", ""] if self.title else []
        lines += [f"- {note}" for note in self.notes]
        if self.legend:
            lines += ["", "| legend | full setting |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in self.legend.items()]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path, stem: str) -> Path:
        """Write ``<stem>.caption.md`` into ``out_dir``."""
        path = Path(out_dir) / f"{stem}{CAPTION_SUFFIX}"
        path.write_text(self.markdown())
        return path
