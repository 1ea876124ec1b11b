"""Time-to-target at small scale: the real training loop (suite.train) on mnist_ae, offline data.

Every optimizer gets the same budget: a grid of settings, each trained once on the tuning seed;
the setting that reaches the target loss in the least wall-clock (or, if none does, the one
with the lowest final loss) is rerun on fresh seeds, and those reruns are what is reported.
Wall-clock is the results store's ``wall_time_s`` (summed step times, evaluations excluded) of
the first evaluation whose full training-set loss is at or below the target.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from suite.config import register_configs
from suite.environment import collect_environment
from suite.preflight import compose_with_choices
from suite.store import atomic_write_json, atomic_write_text, read_run
from suite.train import RunContext, run

# Per-example Bernoulli NLL summed over the 784 pixels (nats), on the 4,000 offline training digits.
TARGET_LOSS = 150.0
EXTRA_TARGETS = (125.0, 110.0)  # reported too, not used for selection
TRAIN_EXAMPLES = 4000  # mnist-5k: the offline real subset's training part

Grid = dict[str, list[float]]

# Equal budget: 4 points per optimizer. First-order methods: a log grid of learning rates
# around their usual values; the K-FAC family: 2 learning rates × 2 dampings.
_KFAC_GRID: Grid = {"lr": [0.1, 0.3], "damping": [0.01, 0.1]}
DEFAULT_GRID: dict[str, Grid] = {
    "sgd": {"lr": [0.003, 0.01, 0.03, 0.1]},
    "adam": {"lr": [0.0003, 0.001, 0.003, 0.01]},
    "kfac": _KFAC_GRID,
    "kfac2": _KFAC_GRID,
}


@dataclass
class TTTSettings:
    """Settings of the time-to-target runs (documented in docs/performance.md)."""

    optimizers: list[str] = field(default_factory=lambda: ["sgd", "adam", "kfac", "kfac2"])
    grid: dict[str, Grid] = field(default_factory=lambda: dict(DEFAULT_GRID))
    target_loss: float = TARGET_LOSS
    extra_targets: tuple[float, ...] = EXTRA_TARGETS
    batch: int = 1000
    epochs: int = 40
    cov_period: int = 10  # the authors' periods for the curvature methods
    inv_period: int = 100
    threads: int = 2
    tuning_seed: int = 0
    rerun_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    quick: bool = False

    def __post_init__(self) -> None:
        if self.quick:  # a smoke run: one grid point each, one rerun, a few epochs
            self.epochs = min(self.epochs, 3)
            self.grid = {name: {k: v[:1] for k, v in g.items()} for name, g in self.grid.items()}
            self.rerun_seeds = self.rerun_seeds[:1]
        missing = [name for name in self.optimizers if name not in self.grid]
        if missing:
            raise ValueError(f"time-to-target grid: no grid for optimizer(s) {missing}")


def target_labels(target_loss: float, extra_targets: tuple[float, ...] | list[float]) -> list[str]:
    """Keys of the targets in results: the primary first."""
    return [f"{t:g}" for t in (target_loss, *extra_targets)]


def grid_points(grid: Grid) -> list[dict[str, float]]:
    """Every combination of a grid's values, in a stable order."""
    keys = sorted(grid)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def overrides(
    optimizer: str, settings: TTTSettings, root: Path, *, point: dict[str, float], seed: int
) -> list[str]:
    """Hydra overrides of one job."""
    steps_per_epoch = TRAIN_EXAMPLES // settings.batch
    out = [
        "model=mnist_ae",
        f"optimizer={optimizer}",
        "logger=none",
        "data.source=offline",
        "trainer.device=cpu",
        "trainer.progress=false",
        f"trainer.batch_size={settings.batch}",
        f"trainer.epochs={settings.epochs}",
        f"trainer.threads={settings.threads}",
        f"trainer.seed={seed}",
        f"trainer.eval_every_steps={steps_per_epoch}",
        "trainer.checkpoint_every_minutes=null",
        f"results.root={root}",
    ]
    out += [f"optimizer.{key}={value}" for key, value in point.items()]
    if optimizer.startswith("kfac"):
        out += [
            f"optimizer.cov_period={settings.cov_period}",
            f"optimizer.inv_period={settings.inv_period}",
        ]
    return out


def first_reaching(evals: Any, target: float) -> dict[str, float] | None:
    """Step and wall-clock of the first evaluation with train_loss <= target (None if never)."""
    reached = evals[evals["train_loss"] <= target]
    if reached.empty:
        return None
    row = reached.iloc[0]
    return {"step": int(row["step"]), "wall_time_s": float(row["wall_time_s"])}


def run_one(
    optimizer: str, settings: TTTSettings, root: Path, *, point: dict[str, float], seed: int
) -> dict[str, Any]:
    """Train one setting through suite.train and read its result back from the store."""
    register_configs()
    cfg, choices = compose_with_choices(
        overrides(optimizer, settings, root, point=point, seed=seed)
    )
    ctx = RunContext(model_preset=choices["model"], optimizer_preset=choices["optimizer"])
    outcome = run(cfg, ctx)
    status, folder = outcome.status, outcome.folder
    stored = read_run(folder)
    final = stored.evals["train_loss"].iloc[-1]
    values = (settings.target_loss, *settings.extra_targets)
    labels = target_labels(settings.target_loss, settings.extra_targets)
    targets = {
        label: first_reaching(stored.evals, value)
        for label, value in zip(labels, values, strict=True)
    }
    primary = targets[labels[0]]
    return {
        "optimizer": optimizer,
        "point": point,
        "seed": seed,
        "status": status.value,
        "run_folder": str(folder),
        "data_variant": stored.summary.get("data_variant"),
        "steps_to_target": None if primary is None else primary["step"],
        "wall_to_target_s": None if primary is None else primary["wall_time_s"],
        "targets": targets,
        "final_train_loss": None if not math.isfinite(final) else float(final),
        "steps_total": int(stored.summary["steps_completed"]),
        "wall_total_s": float(stored.summary["wall_clock_s"]),
        "hyperparameters": stored.summary.get("hyperparameters"),
    }


def selection_key(row: dict[str, Any]) -> tuple[int, float]:
    """Reached the target first (least wall-clock), else the lowest final loss; failures last."""
    if row["wall_to_target_s"] is not None:
        return (0, row["wall_to_target_s"])
    final = row["final_train_loss"]
    return (1, final) if final is not None else (2, 0.0)


def summarise(reruns: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """Median and range over the reruns of the wall-clock and steps to one target."""
    hits = [r["targets"][target] for r in reruns if r["targets"][target] is not None]
    n = len(reruns)
    if len(hits) < n:  # a seed that never reached it makes the median undefined
        return {"reached": len(hits), "of": n, "median_s": None, "median_steps": None}
    walls = [h["wall_time_s"] for h in hits]
    return {
        "reached": n,
        "of": n,
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "median_steps": statistics.median(h["step"] for h in hits),
    }


def verdict(summary: dict[str, dict[str, Any]], target: str) -> dict[str, Any] | None:
    """Does K-FAC reach the target in less median wall-clock than every first-order method?"""
    if "kfac" not in summary:
        return None
    kfac = summary["kfac"][target]["median_s"]
    others = {
        name: summary[name][target]["median_s"] for name in ("sgd", "adam") if name in summary
    }
    if kfac is None:
        return {"met": False, "kfac_s": None, "others_s": others}
    met = all(other is None or kfac < other for other in others.values())
    return {"met": met, "kfac_s": kfac, "others_s": others}


def run_time_to_target(settings: TTTSettings, *, root: Path) -> dict[str, Any]:
    """Tune each optimizer on the equal budget, rerun the winners; the JSON-ready result."""
    root.mkdir(parents=True, exist_ok=True)
    tuning: dict[str, list[dict[str, Any]]] = {}
    winners: dict[str, dict[str, float]] = {}
    reruns: dict[str, list[dict[str, Any]]] = {}
    for name in settings.optimizers:
        trials = [
            run_one(name, settings, root, point=point, seed=settings.tuning_seed)
            for point in grid_points(settings.grid[name])
        ]
        tuning[name] = trials
        winners[name] = min(trials, key=selection_key)["point"]
        reruns[name] = [
            run_one(name, settings, root, point=winners[name], seed=seed)
            for seed in settings.rerun_seeds
        ]
    targets = target_labels(settings.target_loss, settings.extra_targets)
    summary = {
        name: {t: summarise(reruns[name], t) for t in targets} for name in settings.optimizers
    }
    return {
        "environment": collect_environment(torch.device("cpu")),
        "settings": asdict(settings),
        "target": f"train_loss <= {settings.target_loss:g} (nats per example, summed over pixels)",
        "torch_threads": torch.get_num_threads(),
        "winners": winners,
        "summary": summary,
        "verdict": verdict(summary, targets[0]),
        "tuning_runs": tuning,
        "runs": [row for name in settings.optimizers for row in reruns[name]],
    }


def _cell(s: dict[str, Any]) -> str:
    if s["median_s"] is None:
        return f"{s['reached']}/{s['of']} seeds reached"
    return (
        f"{s['median_s']:.1f} s [{s['min_s']:.1f}, {s['max_s']:.1f}], {s['median_steps']:g} steps"
    )


def _machine(env: dict[str, Any] | None) -> str:
    if not env:
        return "Machine: not recorded."
    code = env.get("code", {})
    return (
        f"Machine: {env.get('cpu')} ({env.get('cpu_count')} logical CPUs), torch "
        f"{env.get('packages', {}).get('torch')}, commit {str(code.get('commit'))[:10]}"
        + (" (dirty)" if code.get("dirty") else "")
        + "."
    )


def markdown(result: dict[str, Any]) -> str:
    """The time-to-target table."""
    s = result["settings"]
    targets = target_labels(s["target_loss"], s["extra_targets"])
    lines = [
        "# Time to target: mnist_ae, offline data" + (" (quick)" if s["quick"] else ""),
        "",
        f"Target: {result['target']}; also {', '.join(targets[1:])}. Batch {s['batch']}, at most "
        f"{s['epochs']} epochs (evaluation every epoch), K-FAC family at T_cov={s['cov_period']}, "
        f"T_inv={s['inv_period']}, {s['threads']} threads. Each optimizer: its grid on seed "
        f"{s['tuning_seed']} (selection: least wall-clock to {targets[0]}, else lowest final "
        f"loss), the winner rerun on seeds {s['rerun_seeds']}. Wall-clock = summed step times "
        "from the results store (evaluations excluded); median [min, max] over the reruns.",
        "",
        _machine(result.get("environment")),
        "",
        "| optimizer | grid | selected | "
        + " | ".join(f"to {t}" for t in targets)
        + " | final train loss |",
        "|---|---|---|" + "---|" * len(targets) + "---|",
    ]
    for name, winner in result["winners"].items():
        grid = ", ".join(f"{k} {v}" for k, v in sorted(s["grid"][name].items()))
        chosen = ", ".join(f"{k} {v:g}" for k, v in winner.items())
        finals = [r["final_train_loss"] for r in result["runs"] if r["optimizer"] == name]
        final = "–" if None in finals else f"{statistics.median(finals):.1f}"
        cells = " | ".join(_cell(result["summary"][name][t]) for t in targets)
        lines.append(f"| {name} | {grid} | {chosen} | {cells} | {final} |")
    v = result.get("verdict")
    if v is not None:
        others = ", ".join(
            f"{k} {'not reached' if x is None else f'{x:.1f} s'}" for k, x in v["others_s"].items()
        )
        kfac = "not reached" if v["kfac_s"] is None else f"{v['kfac_s']:.1f} s"
        lines += [
            "",
            f"Target (K-FAC reaches {targets[0]} in less wall-clock than SGD and Adam): "
            f"{'met' if v['met'] else 'missed'} (K-FAC {kfac}; {others}).",
        ]
    return "\n".join(lines) + "\n"


def write_ttt(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ttt.json and ttt.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "ttt.json", out / "ttt.md"
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, markdown(result))
    return json_path, md_path
