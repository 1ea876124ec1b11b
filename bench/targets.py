"""The performance targets of issue 9, checked against a benchmark result (JSON dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.floors import Stage

AUTHORS = "T10/100"  # the two-level authors' periods
SCRIPT = "T1/5"  # the authors' MNIST script's periods
# Stages of K-FAC that have a floor and a target of 1.3× it.
KFAC_STAGES = (
    Stage.FORWARD,
    Stage.BACKWARD,
    Stage.FISHER,
    Stage.FACTORS,
    Stage.INVERSION,
    Stage.PRECONDITION,
)
PAPER_PRESET = "kfac2"  # the two-level preset with the paper's settings
EXACT_PRESET = "kfac2_exact"  # the paper's space with the exact coarse Fisher


@dataclass(frozen=True)
class Target:
    """One target: what is compared, the measured value, the limit and whether it is met."""

    problem: str
    name: str
    value: float | None
    limit: float
    met: bool | None  # None: not measured in this run

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return asdict(self)


def _amortised(problem: dict[str, Any], group: str, label: str) -> float | None:
    methods = problem.get("groups", {}).get(group, {}).get("methods", {})
    entry = methods.get(label)
    return None if entry is None else float(entry["amortised_s"])


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def _target(problem: str, name: str, value: float | None, limit: float) -> Target:
    return Target(problem, name, value, limit, None if value is None else value <= limit)


def _mode_of(problem: dict[str, Any], group: str, label: str) -> str | None:
    entry = problem.get("groups", {}).get(group, {}).get("methods", {}).get(label)
    if entry is None:
        return None
    mode = entry["settings"].get("damping_mode")
    return None if mode is None else str(mode)


def _exact_preset(problem: dict[str, Any], group: str) -> str | None:
    """The two-level preset with an exact coarse Fisher closest in settings to the paper's."""
    methods = problem.get("groups", {}).get(group, {}).get("methods", {})
    paper = methods.get(PAPER_PRESET, {}).get("settings", {})
    candidates = [
        label
        for label, entry in methods.items()
        if label.startswith(PAPER_PRESET) and entry["settings"].get("coarse_fisher") == "exact"
    ]

    def distance(label: str) -> tuple[int, bool]:
        other = methods[label]["settings"]
        keys = set(paper) | set(other)
        return sum(paper.get(k) != other.get(k) for k in keys), label != EXACT_PRESET

    return min(candidates, key=distance) if candidates else None


def problem_targets(name: str, problem: dict[str, Any]) -> list[Target]:
    """Every target for one problem's results."""
    out: list[Target] = []
    for group, mode, limit in ((AUTHORS, "factored", 1.7), (AUTHORS, "eigen", 2.3)):
        value = _ratio(
            _amortised(problem, group, f"kfac[{mode}]"), _amortised(problem, group, "sgd")
        )
        out.append(_target(name, f"K-FAC {mode} step ÷ SGD at {group}", value, limit))
    for mode in ("factored", "eigen"):
        value = _ratio(
            _amortised(problem, SCRIPT, f"kfac[{mode}]"), _amortised(problem, SCRIPT, "sgd")
        )
        out.append(_target(name, f"K-FAC {mode} step ÷ SGD at {SCRIPT}", value, 3.0))
    for mode in ("factored", "eigen"):
        rows = problem.get("stages", {}).get(f"kfac[{mode}]", {}).get("stages", {})
        for stage in KFAC_STAGES:
            row = rows.get(stage.value)
            value = None if row is None else row.get("over_floor")
            out.append(_target(name, f"K-FAC {mode} {stage.value} ÷ floor", value, 1.3))
    paper_mode = _mode_of(problem, AUTHORS, PAPER_PRESET)
    base = f"kfac[{paper_mode}]" if paper_mode else "kfac[eigen]"
    value = _ratio(_amortised(problem, AUTHORS, PAPER_PRESET), _amortised(problem, AUTHORS, base))
    out.append(_target(name, f"kfac2 (paper settings) ÷ {base} at {AUTHORS}", value, 1.05))
    exact = _exact_preset(problem, AUTHORS)
    exact_mode = None if exact is None else _mode_of(problem, AUTHORS, exact)
    exact_base = f"kfac[{exact_mode}]" if exact_mode else base
    value = None
    if exact is not None:
        value = _ratio(
            _amortised(problem, AUTHORS, exact), _amortised(problem, AUTHORS, exact_base)
        )
    label = exact or "kfac2 exact coarse Fisher"
    out.append(_target(name, f"{label} ÷ {exact_base} at {AUTHORS}", value, 1.15))
    memory = problem.get("memory", {})
    sgd = memory.get("sgd")
    for mode in ("factored", "eigen"):
        entry = memory.get(f"kfac[{mode}]")
        for measure, text in (("peak_bytes", "peak"), ("increment_bytes", "peak above baseline")):
            value = None
            if entry is not None and sgd is not None:
                value = _ratio(float(entry[measure]), float(sgd[measure]))
            out.append(_target(name, f"K-FAC {mode} memory {text} ÷ SGD", value, 1.5))
    return out


def all_targets(result: dict[str, Any]) -> list[Target]:
    """Targets of every problem in a result."""
    return [t for name, p in result["problems"].items() for t in problem_targets(name, p)]
