"""Per-stage breakdown of a K-FAC-family step, with explicit timers and exclusive times.

`instrumented_step` replicates `suite.step.train_step` (the plain-loop protocol, same calls
in the same order) with a timer around each protocol call, and `instrument` wraps the curvature
blocks' stage methods and the optimizer's stage methods on the instances, so the stages the
optimizer runs inside `capture`, `fisher_backward` and `step` are timed where they happen. Each
stage's time is exclusive: a stage nested in another is subtracted from its parent, so the stages
of a step add up to the step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bench.floors import STAGE_SCHEDULE, Periods, Schedule, Stage
from bench.timing import Contender, StepClass, class_weights, step_class, sync

# Stage methods of every curvature block (optimizers/curvature.py block API).
BLOCK_STAGES: dict[str, Stage] = {
    "save_input": Stage.CAPTURE,
    "save_output": Stage.CAPTURE,
    "save_output_grad": Stage.CAPTURE,
    "update_factors": Stage.FACTORS,
    "update_inverse": Stage.INVERSION,
    "set_damping": Stage.INVERSION,
    "grad_matrix": Stage.PRECONDITION,
    "multiply_inverse": Stage.PRECONDITION,
    "matrix_to_param_updates": Stage.PRECONDITION,
}
# Stage methods of the optimizer (optimizers/kfac.py extension points). Their exclusive time is
# the loop around the block calls above.
OPTIMIZER_STAGES: dict[str, Stage] = {
    "update_statistics": Stage.FACTORS,
    "update_inverses": Stage.INVERSION,
    "refresh_damping": Stage.INVERSION,
    "precondition": Stage.PRECONDITION,
}
# On a two-level optimizer the exclusive time of these methods is the coarse level's work: its
# statistics (after K-FAC's factor updates) and its operator build, solve and combination (around
# the fine-level solves).
TWO_LEVEL_STAGES: dict[str, Stage] = {
    "update_statistics": Stage.COARSE,
    "update_inverses": Stage.INVERSION,
    "refresh_damping": Stage.INVERSION,
    "precondition": Stage.COARSE,
}


def is_two_level(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer adds a coarse correction (optimizers.twolevel.TwoLevelKFAC)."""
    return hasattr(optimizer, "coarse_operator")


class Stopwatch:
    """Accumulates exclusive seconds per stage for the current step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: dict[Stage, float] = {}
        self._stack: list[list[Any]] = []

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        """Time the block as ``stage``, excluding nested stages."""
        sync(self.device)
        start = time.perf_counter()
        self._stack.append([stage, 0.0])
        try:
            yield
        finally:
            sync(self.device)
            elapsed = time.perf_counter() - start
            name, nested = self._stack.pop()
            self.current[name] = self.current.get(name, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1][1] += elapsed

    def take(self) -> dict[Stage, float]:
        """The current step's stage times; starts a new step."""
        out, self.current = self.current, {}
        return out


def _wrap(obj: Any, name: str, stage: Stage, watch: Stopwatch) -> None:
    original = getattr(obj, name, None)
    if original is None or not callable(original):
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        with watch.stage(stage):
            return original(*args, **kwargs)

    setattr(obj, name, timed)


def instrument(optimizer: torch.optim.Optimizer, watch: Stopwatch) -> None:
    """Wrap the stage methods of the optimizer and its blocks (on the instances)."""
    for block in getattr(optimizer, "blocks", []):
        for name, stage in BLOCK_STAGES.items():
            _wrap(block, name, stage, watch)
    stages = TWO_LEVEL_STAGES if is_two_level(optimizer) else OPTIMIZER_STAGES
    for name, stage in stages.items():
        _wrap(optimizer, name, stage, watch)


def instrumented_step(contender: Contender, watch: Stopwatch) -> float:
    """One step of the plain-loop protocol (a replica of train_step) with stage timers."""
    model, optimizer = contender.model, contender.optimizer
    likelihood = contender.problem.likelihood
    x, target = contender.next_batch()
    with watch.stage(Stage.OTHER):
        optimizer.zero_grad(set_to_none=True)
    if contender.method.curvature:
        with watch.stage(Stage.FORWARD), optimizer.capture():  # type: ignore[attr-defined]
            output = model(x)
        with watch.stage(Stage.LOSS):
            loss = likelihood.nll(output, target)
        with watch.stage(Stage.FISHER):
            optimizer.fisher_backward(output, likelihood=likelihood, target=target)  # type: ignore[attr-defined]
        with watch.stage(Stage.BACKWARD):
            loss.backward()

        def closure() -> Tensor:
            with torch.no_grad():
                return likelihood.nll(model(x), target)

        with watch.stage(Stage.UPDATE):
            optimizer.step(closure)  # type: ignore[arg-type]
    else:
        with watch.stage(Stage.FORWARD):
            output = model(x)
        with watch.stage(Stage.LOSS):
            loss = likelihood.nll(output, target)
        with watch.stage(Stage.BACKWARD):
            loss.backward()
        with watch.stage(Stage.UPDATE):
            optimizer.step()
    with watch.stage(Stage.OTHER):
        value = float(loss.detach())
    return value


@dataclass
class StageTimes:
    """Per-step stage seconds of one method, with each step's class."""

    steps: list[dict[Stage, float]] = field(default_factory=list)
    classes: list[StepClass] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)


def measure_stages(
    contender: Contender,
    *,
    warmup: int,
    steps: int,
    device: torch.device,
    probe: Callable[[], float] | None = None,
) -> StageTimes:
    """Run ``warmup`` then ``steps`` instrumented steps of one contender (``probe`` after each)."""
    watch = Stopwatch(device)
    instrument(contender.optimizer, watch)
    out = StageTimes()
    for index in range(warmup + steps):
        kind = step_class(contender.optimizer)
        start = time.perf_counter()
        instrumented_step(contender, watch)
        total = time.perf_counter() - start
        times = watch.take()
        if index >= warmup:
            out.steps.append(times)
            out.classes.append(kind)
            out.totals.append(total)
            if probe is not None:
                probe()
    return out


def runs_on(stage: Stage, kind: StepClass) -> bool:
    """Whether a stage does its work on a step of this class."""
    schedule = STAGE_SCHEDULE[stage]
    if schedule is Schedule.STATISTICS:
        return kind in (StepClass.STATISTICS, StepClass.INVERSE)
    if schedule is Schedule.INVERSE:
        return kind is StepClass.INVERSE
    return True


def stage_medians(times: StageTimes) -> dict[Stage, dict[str, Any]]:
    """Per stage: median seconds over the steps it runs on, their count, medians per step class."""
    out: dict[Stage, dict[str, Any]] = {}
    stages = {s for step in times.steps for s in step}
    for stage in stages:
        pairs = list(zip(times.steps, times.classes, strict=True))
        running = [step.get(stage, 0.0) for step, kind in pairs if runs_on(stage, kind)]
        by_class = {}
        for kind in StepClass:
            values = [step.get(stage, 0.0) for step, k in pairs if k is kind]
            if values:
                by_class[kind.value] = statistics.median(values)
        if running:
            out[stage] = {
                "median_s": statistics.median(running),
                "occurrences": len(running),
                "by_class_s": by_class,
            }
    return out


def amortised_from_stages(medians: dict[Stage, dict[str, Any]], periods: Periods) -> float:
    """Step time predicted from the stage medians of each step class, weighted by frequency.

    A class not seen in the breakdown run falls back to the stage's median where it runs.
    """
    total = 0.0
    for stage, entry in medians.items():
        for kind, weight in class_weights(periods).items():
            if weight <= 0:
                continue
            value = entry["by_class_s"].get(kind.value)
            if value is None:
                value = entry["median_s"] if runs_on(stage, kind) else 0.0
            total += weight * value
    return total


def breakdown(
    medians: dict[Stage, dict[str, Any]],
    floors_s: dict[Stage, float],
) -> dict[str, dict[str, Any]]:
    """JSON rows: per stage its median, occurrences, floor and measured ÷ floor."""
    rows: dict[str, dict[str, Any]] = {}
    for stage in Stage:
        if stage not in medians and stage not in floors_s:
            continue
        entry = medians.get(stage, {"median_s": 0.0, "occurrences": 0, "by_class_s": {}})
        median = float(entry["median_s"])
        floor = floors_s.get(stage)
        rows[stage.value] = {
            "median_s": median,
            "occurrences": entry["occurrences"],
            "by_class_s": entry["by_class_s"],
            "schedule": STAGE_SCHEDULE[stage].value,
            "floor_s": floor,
            "over_floor": None if not floor else median / floor,
        }
    return rows
