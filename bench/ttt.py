"""Time-to-target at small scale: the real training loop (suite.train) on mnist_ae, offline data.

Each optimizer runs as a normal job into a results root; the first evaluation whose full
training-set loss is at or below the target gives the steps and the wall-clock (the store's
``wall_time_s``: summed step times, evaluations excluded).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from suite.store import atomic_write_json, atomic_write_text, find_run_folders, read_run

# Per-example Bernoulli NLL summed over the 784 pixels (nats), on the 4,000 offline training digits.
TARGET_LOSS = 150.0
TRAIN_EXAMPLES = 4000  # mnist-5k: the offline real subset's training part


@dataclass
class TTTSettings:
    """Settings of the time-to-target runs (documented in docs/performance.md)."""

    optimizers: list[str] = field(default_factory=lambda: ["sgd", "adam", "kfac", "kfac2"])
    target_loss: float = TARGET_LOSS
    batch: int = 500
    epochs: int = 30
    cov_period: int = 1  # the authors' MNIST script's periods for the curvature methods
    inv_period: int = 5
    threads: int = 2
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        if self.quick:
            self.epochs = min(self.epochs, 3)


def overrides(optimizer: str, settings: TTTSettings, root: Path) -> list[str]:
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
        f"trainer.seed={settings.seed}",
        f"trainer.eval_every_steps={steps_per_epoch}",
        "trainer.checkpoint_every_minutes=null",
        f"results.root={root}",
    ]
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


def run_one(optimizer: str, settings: TTTSettings, root: Path) -> dict[str, Any]:
    """Train one optimizer through suite.train and read its result back from the store."""
    from suite.config import register_configs
    from suite.preflight import compose_with_choices
    from suite.train import RunContext, run

    register_configs()
    before = set(find_run_folders(root)) if root.exists() else set()
    cfg, choices = compose_with_choices(overrides(optimizer, settings, root))
    ctx = RunContext(model_preset=choices["model"], optimizer_preset=choices["optimizer"])
    status = run(cfg, ctx)
    (folder,) = set(find_run_folders(root)) - before
    stored = read_run(folder)
    reached = first_reaching(stored.evals, settings.target_loss)
    final = stored.evals["train_loss"].iloc[-1]
    return {
        "optimizer": optimizer,
        "status": status.value,
        "run_folder": str(folder),
        "data_variant": stored.summary.get("data_variant"),
        "steps_to_target": None if reached is None else reached["step"],
        "wall_to_target_s": None if reached is None else reached["wall_time_s"],
        "final_train_loss": None if not math.isfinite(final) else float(final),
        "steps_total": int(stored.summary["steps_completed"]),
        "wall_total_s": float(stored.summary["wall_clock_s"]),
        "hyperparameters": stored.summary.get("hyperparameters"),
    }


def run_time_to_target(settings: TTTSettings, *, root: Path) -> dict[str, Any]:
    """Every optimizer in turn; returns the JSON-ready result."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [run_one(name, settings, root) for name in settings.optimizers]
    return {
        "settings": asdict(settings),
        "target": f"train_loss <= {settings.target_loss:g} (nats per example, summed over pixels)",
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The time-to-target table."""
    s = result["settings"]
    lines = [
        "# Time to target: mnist_ae, offline data" + (" (quick)" if s["quick"] else ""),
        "",
        f"Target: {result['target']}. Batch {s['batch']}, at most {s['epochs']} epochs, "
        f"K-FAC family at T_cov={s['cov_period']}, T_inv={s['inv_period']}, preset "
        f"hyperparameters otherwise, seed {s['seed']}, {s['threads']} threads. Wall-clock = "
        "summed step times from the results store (evaluations excluded).",
        "",
        "| optimizer | status | steps to target | seconds to target | final train loss |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        steps = "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"])
        wall = "–" if r["wall_to_target_s"] is None else f"{r['wall_to_target_s']:.1f}"
        final = "–" if r["final_train_loss"] is None else f"{r['final_train_loss']:.1f}"
        lines.append(f"| {r['optimizer']} | {r['status']} | {steps} | {wall} | {final} |")
    return "\n".join(lines) + "\n"


def write_ttt(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ttt.json and ttt.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "ttt.json", out / "ttt.md"
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, markdown(result))
    return json_path, md_path
