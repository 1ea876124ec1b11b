"""One benchmark run: throughput, interleaved step timing, stage breakdown, memory, floors."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.floors import (
    LayerShape,
    MatmulProbe,
    Periods,
    Stage,
    StageFlops,
    Throughput,
    amortised_flops,
    matmul_throughput,
    stage_floor_flops,
    stage_flops,
)
from bench.memory import measure as measure_memory
from bench.methods import Method, methods_for
from bench.problems import SPECS, Problem, ProblemName, build_problem
from bench.settings import BenchSettings
from bench.stages import amortised_from_stages, breakdown, measure_stages, stage_medians
from bench.targets import all_targets
from bench.timing import Contender, denormal_fraction, interleave, steps_per_repeat, summarise
from suite.environment import collect_environment
from suite.seeding import seed_everything

Log = Callable[[str], None]


_START = time.monotonic()


def _log(message: str) -> None:
    print(f"[bench {time.monotonic() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def batch_for(name: ProblemName, settings: BenchSettings) -> int:
    """The batch size a problem is timed at."""
    if name.value in settings.batches:
        return settings.batches[name.value]
    spec = SPECS[name]
    return spec.quick_batch if settings.quick else spec.batch


def stats_rows(method: Method, batch: int) -> int:
    """Statistics rows ⌈stats_fraction·B⌉ of a curvature method (B for first-order ones)."""
    fraction = float(method.settings().get("stats_fraction", 1.0))
    return min(batch, max(1, math.ceil(round(fraction * batch, 6))))


def method_flops(method: Method, layers: list[LayerShape], batch: int) -> StageFlops:
    """Stage flop counts for a method on a problem."""
    return stage_flops(layers, batch=batch, stats_rows=stats_rows(method, batch))


def floor_seconds(
    method: Method, layers: list[LayerShape], batch: int, throughput: float
) -> dict[Stage, float]:
    """Floor seconds per occurrence of each stage the method runs."""
    flops = stage_floor_flops(
        method_flops(method, layers, batch), kind=method.kind, coarse=method.coarse
    )
    return {stage: value / throughput for stage, value in flops.items()}


def _selected(methods: list[Method], settings: BenchSettings) -> list[Method]:
    if settings.methods is None:
        return methods
    keep = set(settings.methods) | {"sgd"}
    return [m for m in methods if m.label in keep]


def time_group(
    problem: Problem,
    periods: Periods,
    settings: BenchSettings,
    *,
    layers: list[LayerShape],
    log: Log,
) -> dict[str, Any]:
    """Interleaved timing of every method at one pair of periods, with the matmul probe."""
    methods = _selected(methods_for(periods), settings)
    steps = steps_per_repeat(periods, min_steps=settings.min_steps)
    log(
        f"{problem.spec.name.value} {periods.label}: {len(methods)} methods, "
        f"{settings.repeats} repeats × {steps} steps"
    )
    contenders = [Contender(method=m, problem=problem, seed=settings.seed) for m in methods]
    probe = MatmulProbe(device=problem.device)
    times = interleave(
        contenders,
        warmup=settings.warmup,
        repeats=settings.repeats,
        steps=steps,
        probe=probe.run,
        progress=lambda text: log(f"  {periods.label} {text}"),
    )
    measured = probe.result()
    throughput = measured.flops_per_s
    entries: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        method = contender.method
        summary = summarise(times[method.label], method.periods)
        floors = floor_seconds(method, layers, problem.batch, throughput)
        floor = amortised_flops(floors, method.periods)
        entries[method.label] = {
            "preset": method.preset,
            "settings": method.settings(),
            "kind": method.kind.value,
            "coarse": method.coarse,
            "divergences": contender.divergences,
            "denormal_grad_fraction": denormal_fraction(contender.model),
            **summary,
            "floor_s": floor,
            "over_floor": summary["amortised_s"] / floor if floor > 0 else None,
        }
    sgd = entries["sgd"]
    for entry in entries.values():
        entry["ratio_vs_sgd"] = entry["amortised_s"] / sgd["amortised_s"]
        entry["floor_ratio_vs_sgd"] = entry["floor_s"] / sgd["floor_s"]
    return {
        "periods": {"cov": periods.cov, "inv": periods.inv},
        "steps_per_repeat": steps,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "throughput": vars(measured),
        "methods": entries,
    }


def stage_group(
    problem: Problem,
    settings: BenchSettings,
    *,
    layers: list[LayerShape],
    groups: dict[str, Any],
    log: Log,
) -> dict[str, Any]:
    """Per-stage breakdown of SGD and every curvature method, with floors and cross-checks."""
    out: dict[str, Any] = {}
    methods = _selected(methods_for(settings.stage_periods), settings)
    methods = [m for m in methods if m.label != "adam"]
    for method in methods:
        log(f"{problem.spec.name.value} stages: {method.label}")
        contender = Contender(method=method, problem=problem, seed=settings.seed)
        probe = MatmulProbe(device=problem.device)
        times = measure_stages(
            contender,
            warmup=settings.warmup,
            steps=settings.stage_steps,
            device=problem.device,
            probe=probe.run,
        )
        measured = probe.result()
        medians = stage_medians(times)
        floors = floor_seconds(method, layers, problem.batch, measured.flops_per_s)
        predicted: dict[str, Any] = {}
        for label, group in groups.items():
            timed = group["methods"].get(method.label)
            periods = Periods(**group["periods"])
            estimate = amortised_from_stages(medians, periods)
            predicted[label] = {
                "from_stages_s": estimate,
                "measured_s": None if timed is None else timed["amortised_s"],
                "crosscheck": None if timed is None else estimate / timed["amortised_s"],
            }
        out[method.label] = {
            "periods": settings.stage_periods.label,
            "steps": len(times.steps),
            "throughput": vars(measured),
            "stages": breakdown(medians, floors),
            "amortised": predicted,
        }
    return out


def memory_group(
    problem: Problem, settings: BenchSettings, *, log: Log
) -> dict[str, dict[str, Any]]:
    """Peak memory of every method (one fresh subprocess each)."""
    out: dict[str, dict[str, Any]] = {}
    for method in _selected(methods_for(settings.periods[0]), settings):
        log(f"{problem.spec.name.value} memory: {method.label}")
        out[method.label] = measure_memory(
            problem=problem.spec.name.value,
            batch=problem.batch,
            method_json=method.to_json(),
            steps=settings.memory_steps,
            threads=settings.threads,
            device=settings.device,
            flush_denormal=settings.flush_denormal,
        )
    sgd = out.get("sgd")
    for entry in out.values():
        if sgd is not None:
            entry["peak_ratio_vs_sgd"] = entry["peak_bytes"] / sgd["peak_bytes"]
            entry["increment_ratio_vs_sgd"] = (
                entry["increment_bytes"] / sgd["increment_bytes"]
                if sgd["increment_bytes"] > 0
                else None
            )
    return out


def _throughput(settings: BenchSettings) -> Throughput:
    return matmul_throughput(device=torch.device(settings.device))


def benchmark(settings: BenchSettings, *, log: Log = _log) -> dict[str, Any]:
    """Run everything the settings ask for and return the result (JSON-ready)."""
    if settings.flush_denormal is not None:
        # before any parallel op: OpenMP workers copy the FTZ/DAZ bits when the pool starts
        torch.set_flush_denormal(settings.flush_denormal)
    torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)  # the training loop's global settings (deterministic kernels)
    device = torch.device(settings.device)
    started = time.time()
    before = _throughput(settings)
    log(f"matmul {before.size}³ float32: {before.flops_per_s / 1e9:.1f} GFLOP/s")
    problems: dict[str, Any] = {}
    for name in settings.problems:
        batch = batch_for(name, settings)
        problem = build_problem(name, batch=batch, device=device, seed=settings.seed)
        layers = problem.layers()
        groups = {
            periods.label: time_group(problem, periods, settings, layers=layers, log=log)
            for periods in settings.periods
        }
        entry: dict[str, Any] = {
            "batch": batch,
            "data": problem.data_description,
            "model": problem.model_source,
            "layers": [
                {**vars(layer), "kind": layer.kind.value, "d_in_aug": layer.d_in_aug}
                for layer in layers
            ],
            "flops_full_batch_stats": stage_flops(layers, batch=batch, stats_rows=batch).as_dict(),
            "groups": groups,
        }
        if settings.stages:
            entry["stages"] = stage_group(problem, settings, layers=layers, groups=groups, log=log)
        if settings.memory:
            entry["memory"] = memory_group(problem, settings, log=log)
        problems[name.value] = entry
    after = _throughput(settings)
    result: dict[str, Any] = {
        "meta": {
            "environment": collect_environment(device),
            "threads": settings.threads,
            "flush_denormal": settings.flush_denormal,
            "settings": settings.as_dict(),
            "started_unix": started,
            "elapsed_s": time.time() - started,
            "timed_step": "suite.step.train_step (stage breakdown: bench.stages replica)",
        },
        "throughput": {
            "before": vars(before),
            "after": vars(after),
            "drift": after.flops_per_s / before.flops_per_s,
            "floors_use": "the probe interleaved with each group's (and stage run's) steps",
        },
        "problems": problems,
    }
    result["targets"] = [t.as_dict() for t in all_targets(result)]
    return result
