"""Helpers for the data-parallel tests: spawn gloo ranks on CPU and a shared toy problem.

Workers are module-level functions (torch.multiprocessing pickles them by name). Each rank
initialises a gloo process group over TCP on a free local port; the parent waits with a generous
deadline (no fixed sleeps) and re-raises a worker's exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from core.likelihood import Likelihood
from optimizers.distributed import InverseStrategy
from optimizers.kfac import KFAC
from optimizers.twolevel import TwoLevelKFAC
from suite.distributed import free_port

D = torch.float64
GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks
LIKELIHOOD = Likelihood.categorical


def spawn(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` processes; raise if any fails."""
    port = free_port()
    context = mp.start_processes(
        _entry, args=(fn, world, port, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"distributed workers did not finish within {timeout_s:.0f} s")


def _entry(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=90),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- toy problem


def make_model(seed: int = 0) -> nn.Module:
    """Conv2d → Tanh → Flatten → Linear → Tanh → Linear, float64 (two kinds of blocks)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).to(D)


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: inputs (12, 1, 4, 4) and class labels."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 1, 4, 4, generator=gen, dtype=D)
    return x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def shard(batch: tuple[Tensor, Tensor], rank: int, world: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s contiguous slice of a global batch (equal shards)."""
    size = GLOBAL_BATCH // world
    return batch[0][rank * size : (rank + 1) * size], batch[1][rank * size : (rank + 1) * size]


@dataclass(frozen=True)
class Scenario:
    """One optimizer configuration of the tests."""

    family: str  # kfac | kfac2
    fisher: str  # mc | empirical
    mode: str  # eigen | factored
    inverses: InverseStrategy = InverseStrategy.redundant

    @property
    def name(self) -> str:
        return f"{self.family}-{self.fisher}-{self.mode}-{self.inverses.value}"


def make_optimizer(model: nn.Module, scenario: Scenario) -> KFAC:
    """K-FAC or two-level K-FAC with statistics every step and inverses every 2 steps."""
    kwargs: dict[str, Any] = {
        "lr": 0.2,
        "momentum": 0.5,
        "weight_decay": 1e-3,
        "damping": 0.05,
        "damping_mode": scenario.mode,
        "fisher": scenario.fisher,
        "cov_period": 1,
        "inv_period": 2,
        "kl_clip": 1.0e-2,
        "seed": 7,
    }
    cls = TwoLevelKFAC if scenario.family == "kfac2" else KFAC
    opt = cls(model, **kwargs)
    if opt.data_parallel is not None:
        opt.data_parallel.inverses = scenario.inverses
    return opt


def protocol_step(model: nn.Module, opt: KFAC, x: Tensor, y: Tensor) -> None:
    """One step of the suite's plain-loop protocol."""
    opt.zero_grad(set_to_none=True)
    with opt.capture():
        output = model(x)
    loss = LIKELIHOOD.nll(output, y)
    opt.fisher_backward(output, likelihood=LIKELIHOOD, target=y)
    loss.backward()
    opt.step()


def wrap(model: nn.Module) -> DistributedDataParallel:
    """DDP on CPU (gloo)."""
    return DistributedDataParallel(model)


def snapshot(model: nn.Module, opt: KFAC) -> dict[str, Tensor]:
    """Flat parameters, factors and inverses, and the coarse statistics (two-level)."""
    out = {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone(),
        "factors": torch.cat([t.reshape(-1) for b in opt.blocks for t in (b.A, b.G)]).clone(),
    }
    inverses = []
    for block in opt.blocks:
        for name in ("A_inv", "G_inv", "Q_A", "d_A", "Q_G", "d_G", "eigen_scale"):
            value = getattr(block, name)
            if value is not None:
                inverses.append(value.reshape(-1))
    out["inverses"] = torch.cat(inverses).clone()
    if isinstance(opt, TwoLevelKFAC):
        tensors, _ = opt.coarse_running_statistics()
        out["coarse"] = torch.cat([t.reshape(-1) for t in tensors if t is not None]).clone()
    return out


def save(path: Path, value: Any) -> None:
    """torch.save to a path (workers hand results to the parent through files)."""
    torch.save(value, path)
