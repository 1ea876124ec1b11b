"""Checkpoints: everything needed to continue a run bitwise-identically on CPU."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from suite.store import RunRecord, atomic_write_bytes


@dataclass
class Progress:
    """Position of a run in its data order, and its clocks."""

    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # next batch index within that epoch
    step: int = 0  # optimizer steps taken
    wall_time_s: float = 0.0  # training time so far (steps only, no evaluation)
    best: dict[str, float] = field(default_factory=dict)


def save_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    record: RunRecord,
) -> None:
    """Atomically write a checkpoint (model, optimizer incl. curvature, RNG, position, metrics)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "progress": progress.__dict__,
        "record": {"steps": record.steps, "evals": record.evals},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
) -> tuple[Progress, RunRecord]:
    """Restore a checkpoint into the given objects; returns the position and metrics so far."""
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    record = RunRecord(steps=list(state["record"]["steps"]), evals=list(state["record"]["evals"]))
    return Progress(**state["progress"]), record
