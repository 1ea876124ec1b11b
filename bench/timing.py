"""Interleaved step timing: every method steps in turn, so machine drift hits all alike.

The timed step is `suite.train.Trainer._step` itself, called on a Trainer that holds only the
model, optimizer, likelihood and family (`trainer_step`), and timed as the training loop times
it (`time.perf_counter` around the call).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from bench.floors import Periods
from bench.methods import Method
from bench.problems import Problem
from core.likelihood import Likelihood
from optimizers.registry import Family, family_of
from suite.checkpoint import Progress
from suite.distributed import Ranks
from suite.train import RunDiverged, StopRequested, Trainer


class StepClass(str, Enum):
    """What a K-FAC-family step does beyond forward/backward/precondition."""

    PLAIN = "plain"  # no statistics, no inverse
    STATISTICS = "statistics"  # statistics update (every T_cov steps)
    INVERSE = "inverse"  # inverse refresh (every T_inv steps; also a statistics step)


def trainer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    likelihood: Likelihood,
    *,
    family: Family,
) -> Callable[[Tensor, Tensor], float]:
    """`Trainer._step` bound to a Trainer holding just what the step reads."""
    trainer = Trainer.__new__(Trainer)
    trainer.model = model
    trainer.train_model = model  # one process: the model itself (no DDP wrapper)
    trainer.ranks = Ranks()
    trainer.stop = StopRequested()
    trainer.optimizer = optimizer
    trainer.likelihood = likelihood
    trainer.family = family
    trainer.cfg = OmegaConf.create({"trainer": {"diverge_loss": math.inf}})
    trainer.progress = Progress()
    return trainer._step


def step_class(optimizer: torch.optim.Optimizer) -> StepClass:
    """The class of the optimizer's coming step (from its own schedule properties)."""
    if getattr(optimizer, "is_inverse_step", False):
        return StepClass.INVERSE
    if getattr(optimizer, "is_stats_step", False):
        return StepClass.STATISTICS
    return StepClass.PLAIN


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contender:
    """One method on one problem: its own model and optimizer, stepping through the batch pool."""

    method: Method
    problem: Problem
    seed: int = 0
    model: nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    step_fn: Callable[[Tensor, Tensor], float] = field(init=False)
    cursor: int = 0
    divergences: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Fresh model and optimizer (initially, and after a divergence)."""
        self.model = self.problem.new_model(seed=self.seed)
        self.optimizer = self.method.build(self.model)
        self.step_fn = trainer_step(
            self.model,
            self.optimizer,
            self.problem.likelihood,
            family=family_of(self.method.config()),
        )

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next batch of the pool."""
        batch = self.problem.batches[self.cursor % len(self.problem.batches)]
        self.cursor += 1
        return batch

    def step(self) -> tuple[float, StepClass]:
        """One timed `Trainer._step`; returns seconds and the step's class."""
        kind = step_class(self.optimizer)
        x, target = self.next_batch()
        device = self.problem.device
        sync(device)
        start = time.perf_counter()
        try:
            self.step_fn(x, target)
        except RunDiverged:
            self.divergences += 1
            diverged = True
        else:
            diverged = False
        sync(device)
        elapsed = time.perf_counter() - start
        if diverged:
            self.reset()
        return elapsed, kind


def denormal_fraction(model: nn.Module) -> float:
    """Fraction of gradient entries that are subnormal floats (slow arithmetic on x86 CPUs)."""
    total, tiny = 0, 0
    for param in model.parameters():
        grad = param.grad
        if grad is None or not grad.is_floating_point():
            continue
        smallest = torch.finfo(grad.dtype).tiny
        tiny += int(((grad.abs() < smallest) & (grad != 0)).sum())
        total += grad.numel()
    return tiny / total if total else 0.0


@dataclass
class StepTimes:
    """Per-step seconds and classes of one method: one list per repeat."""

    seconds: list[list[float]] = field(default_factory=list)
    classes: list[list[StepClass]] = field(default_factory=list)


def interleave(
    contenders: Sequence[Contender],
    *,
    warmup: int,
    repeats: int,
    steps: int,
    probe: Callable[[], float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, StepTimes]:
    """Round-robin timing: each repeat runs ``steps`` steps of every contender, one at a time.

    The order rotates every step so no method always follows the same one. ``probe`` (the
    matmul of the floors) runs once per round, so the floors see the same machine state.
    """
    for contender in contenders:
        for _ in range(warmup):
            contender.step()
    out = {c.method.label: StepTimes() for c in contenders}
    count = len(contenders)
    for repeat in range(repeats):
        seconds: dict[str, list[float]] = {c.method.label: [] for c in contenders}
        classes: dict[str, list[StepClass]] = {c.method.label: [] for c in contenders}
        for index in range(steps):
            shift = (repeat * steps + index) % count
            for contender in [*contenders[shift:], *contenders[:shift]]:
                elapsed, kind = contender.step()
                seconds[contender.method.label].append(elapsed)
                classes[contender.method.label].append(kind)
            if probe is not None:
                probe()
        for label in out:
            out[label].seconds.append(seconds[label])
            out[label].classes.append(classes[label])
        if progress is not None:
            progress(f"repeat {repeat + 1}/{repeats} done")
    return out


def class_weights(periods: Periods | None) -> dict[StepClass, float]:
    """Fraction of steps of each class over a full cycle of T_inv steps."""
    if periods is None:
        return {StepClass.PLAIN: 1.0}
    inverse = 1.0 / periods.inv
    stats = 1.0 / periods.cov - inverse
    return {
        StepClass.INVERSE: inverse,
        StepClass.STATISTICS: stats,
        StepClass.PLAIN: 1 - inverse - stats,
    }


def summarise(times: StepTimes, periods: Periods | None) -> dict[str, Any]:
    """Median over repeats of each repeat's mean step (the amortised cost) and the cross-check.

    A repeat spans whole cycles of T_inv steps, so its mean is the honest amortised step. The
    cross-check weights the median step of each class by its frequency.
    """
    cycle_means = [statistics.fmean(rep) for rep in times.seconds]
    by_class: dict[StepClass, list[float]] = {}
    for rep_s, rep_c in zip(times.seconds, times.classes, strict=True):
        for sec, kind in zip(rep_s, rep_c, strict=True):
            by_class.setdefault(kind, []).append(sec)
    medians = {k.value: statistics.median(v) for k, v in by_class.items()}
    weights = class_weights(periods)
    if periods is None:
        # first-order steps are all alike: every step counts as plain
        medians = {
            StepClass.PLAIN.value: statistics.median([t for rep in times.seconds for t in rep])
        }
    weighted = (
        sum(w * medians[k.value] for k, w in weights.items() if w > 0)
        if all(k.value in medians for k, w in weights.items() if w > 0)
        else None
    )
    amortised = statistics.median(cycle_means)
    return {
        "cycle_means_s": cycle_means,
        "amortised_s": amortised,
        "class_medians_s": medians,
        "class_counts": {k.value: len(v) for k, v in by_class.items()},
        "class_weighted_s": weighted,
        "crosscheck": None if weighted is None else weighted / amortised,
    }


def steps_per_repeat(periods: Periods | None, *, min_steps: int) -> int:
    """Whole cycles of T_inv steps, at least ``min_steps`` steps."""
    cycle = 1 if periods is None else periods.inv
    return cycle * max(1, math.ceil(min_steps / cycle))
