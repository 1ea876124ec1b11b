"""Settings of one benchmark run, and the full and quick presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.floors import Periods
from bench.problems import ProblemName

AUTHORS_PERIODS = Periods(cov=10, inv=100)
SCRIPT_PERIODS = Periods(cov=1, inv=5)


@dataclass
class BenchSettings:
    """What to time and how often."""

    problems: list[ProblemName] = field(
        default_factory=lambda: [ProblemName.MNIST_AE, ProblemName.CNN]
    )
    periods: list[Periods] = field(default_factory=lambda: [AUTHORS_PERIODS, SCRIPT_PERIODS])
    batches: dict[str, int] = field(default_factory=dict)  # problem -> batch (default: spec)
    methods: list[str] | None = None  # only these labels (None: all); sgd is always kept
    threads: int = 2
    device: str = "cpu"
    repeats: int = 3  # timed repeats per group, each whole cycles of T_inv steps
    min_steps: int = 20  # a repeat has at least this many steps
    warmup: int = 3  # untimed steps per method before the first repeat
    # periods of the per-stage breakdown runs: every step class (plain, statistics, inverse) occurs
    stage_periods: Periods = field(default_factory=lambda: Periods(cov=2, inv=4))
    stage_steps: int = 24  # instrumented steps per method (after the warm-up)
    memory: bool = True
    memory_steps: int = 3
    stages: bool = True
    quick: bool = False
    seed: int = 0
    # torch.set_flush_denormal: None leaves it as suite.seeding.seed_everything sets it (the
    # training loop's behaviour); True/False force it
    flush_denormal: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        raw = asdict(self)
        raw["problems"] = [p.value for p in self.problems]
        raw["periods"] = [p.label for p in self.periods]
        raw["stage_periods"] = self.stage_periods.label
        return raw


def quick_settings(**overrides: Any) -> BenchSettings:
    """A smoke run: small batches, two repeats, short stage and memory runs."""
    base: dict[str, Any] = {
        "repeats": 2,
        "min_steps": 5,
        "warmup": 2,
        "stage_steps": 12,
        "memory_steps": 2,
        "quick": True,
    }
    base.update(overrides)
    return BenchSettings(**base)
