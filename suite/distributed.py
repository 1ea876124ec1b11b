"""One run over several processes: process-group setup, the batch split and who writes.

`trainer.distributed` picks how the ranks learn who they are:

- `none` (default): one process. Launched as several (torchrun's WORLD_SIZE > 1, or a SLURM
  step with SLURM_NTASKS > 1) it is refused rather than run N times into N folders.
- `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from torchrun (or any
  launcher that sets them).
- `slurm`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID from srun / submitit
  (`hydra.launcher.tasks_per_node=N`); the rendezvous is the first host of SLURM_JOB_NODELIST
  (or MASTER_ADDR) on port MASTER_PORT (default 20000 + SLURM_JOB_ID mod 20000).
- `auto`: torchrun's variables if set, else SLURM's with several tasks, else one process.

Backend: NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU.

Conventions. `trainer.batch_size` is the global batch: every rank draws the same batch order and
takes its contiguous slice of B / world rows (B must divide), so the ranks together see exactly
the single-process batch. The model is wrapped in DistributedDataParallel (gradients averaged);
K-FAC averages its statistics itself (`optimizers.distributed`). The reported batch loss is the
mean over ranks (= the global batch loss). Only rank 0 writes the run folder, checkpoints and
W&B; every rank reads the checkpoint on resume, which must be on the same number of ranks. Stop
signals are agreed on every step (one small all-reduce), so every rank stops at the same step; a
lost rank (killed, crashed) makes the others' next collective fail, and the run is recorded as
interrupted (resumable from its last checkpoint), never completed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.errors import ConfigError
from optimizers.distributed import InverseStrategy

# How long a collective waits for a peer before failing (a crashed peer usually fails faster).
COLLECTIVE_TIMEOUT_S = 600
_STARTED = False  # whether `start` initialised the process group of this process


class Launch(str, Enum):
    """How a run is spread over processes (`trainer.distributed`)."""

    none = "none"
    auto = "auto"
    torchrun = "torchrun"
    slurm = "slurm"


def free_port() -> int:
    """A local TCP port nobody listens on right now (for single-machine process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    return default if value in (None, "") else int(str(value))


def launched_world(env: Mapping[str, str]) -> tuple[Launch, int]:
    """The launcher the environment shows and its number of processes (none, 1 when neither)."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return Launch.torchrun, _int(env, "WORLD_SIZE", 1)
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        return Launch.slurm, _int(env, "SLURM_NTASKS", 1)
    return Launch.none, 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('n[01-04,07],m1' → 'n01'); scontrol when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.fullmatch(r"([^\[]+)\[([^\],-]+)[^\]]*\]", head)
    return match.group(1) + match.group(2) if match else head


@dataclass
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launch: Launch = Launch.none

    @property
    def is_main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether several processes share the run."""
        return self.world > 1


def resolve_ranks(choice: Launch | str, env: Mapping[str, str] | None = None) -> Ranks:
    """This process's rank, world size and local rank for `trainer.distributed` = ``choice``."""
    env = os.environ if env is None else env
    launch = Launch(getattr(choice, "value", choice))
    seen, world = launched_world(env)
    if launch is Launch.none:
        if world > 1:
            raise ConfigError(
                "trainer.distributed",
                f"got none but this process is one of {world} started by {seen.value}; "
                f"allowed: {seen.value} or auto (one run over the processes)",
            )
        return Ranks()
    if launch is Launch.auto:
        launch = seen
        if launch is Launch.none:
            return Ranks()
    if launch is Launch.torchrun:
        if "WORLD_SIZE" not in env or "RANK" not in env:
            raise ConfigError(
                "trainer.distributed",
                "got torchrun but RANK/WORLD_SIZE are not set; launch with "
                "`torchrun --nproc_per_node=N run.py ...`",
            )
        return Ranks(
            rank=_int(env, "RANK", 0),
            world=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK", 0),
            launch=launch,
        )
    if "SLURM_PROCID" not in env:
        raise ConfigError(
            "trainer.distributed",
            "got slurm but SLURM_PROCID is not set; launch through srun or "
            "launcher=slurm with hydra.launcher.tasks_per_node=N",
        )
    return Ranks(
        rank=_int(env, "SLURM_PROCID", 0),
        world=_int(env, "SLURM_NTASKS", 1),
        local_rank=_int(env, "SLURM_LOCALID", 0),
        launch=launch,
    )


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Initialise the process group (if several ranks); returns this rank's device."""
    if not ranks.active:
        return device
    if dist.is_initialized():
        raise ConfigError(
            "trainer.distributed", "a process group is already initialised in this process"
        )
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if ranks.launch is Launch.slurm:
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_slurm_host(
                os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
            )
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(20000 + _int(os.environ, "SLURM_JOB_ID", 0) % 20000)
    global _STARTED
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    _STARTED = True
    return device


def stop() -> None:
    """Tear down the process group `start` created (one created by the caller is left alone)."""
    global _STARTED
    if _STARTED and dist.is_initialized():
        dist.destroy_process_group()
    _STARTED = False


def check_batch(ranks: Ranks, batch_size: int) -> int:
    """Rows per rank of the global batch; refuses a batch the ranks cannot split evenly."""
    if batch_size % ranks.world:
        raise ConfigError(
            "trainer.batch_size",
            f"got {batch_size} (the global batch); allowed: a multiple of the {ranks.world} ranks",
        )
    return batch_size // ranks.world


def local_slice(ranks: Ranks, batch_size: int) -> slice:
    """This rank's contiguous rows of a global batch."""
    rows = check_batch(ranks, batch_size)
    return slice(ranks.rank * rows, (ranks.rank + 1) * rows)


def wrap_model(ranks: Ranks, model: nn.Module) -> nn.Module:
    """DistributedDataParallel around ``model`` when several ranks share the run."""
    if not ranks.active:
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU when it has none)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def set_inverse_strategy(optimizer: Any, choice: InverseStrategy | str) -> None:
    """Apply `trainer.distributed_inverses` to a data-parallel K-FAC optimizer (if any)."""
    strategy = getattr(optimizer, "data_parallel", None)
    if strategy is not None:
        strategy.inverses = choice


def agree(ranks: Ranks, loss: float, stop: bool) -> tuple[float, bool]:
    """The mean batch loss over the ranks and whether any rank was asked to stop."""
    if not ranks.active:
        return loss, stop
    buffer = torch.tensor([loss, float(stop)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        buffer = buffer.cuda()
    dist.all_reduce(buffer)
    return float(buffer[0]) / ranks.world, bool(buffer[1] > 0)


def share(ranks: Ranks, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    if not ranks.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_peer_failure(ranks: Ranks, err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank went away."""
    if not ranks.active:
        return False
    backend_error = getattr(dist, "DistBackendError", ())
    if backend_error and isinstance(err, backend_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        key in text for key in ("gloo", "nccl", "connection closed", "connection reset", "peer")
    )


def params_agree(ranks: Ranks, model: nn.Module) -> bool | None:
    """Whether every rank holds the same parameters (a collective; None with one process).

    Compares a float64 fingerprint (sum, position-weighted sum, max |θ|) of the parameters.
    """
    if not ranks.active:
        return None
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    mine = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().max()])
    gathered = [torch.zeros_like(mine) for _ in range(ranks.world)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def check_resume_ranks(summary: Mapping[str, Any], ranks: Ranks) -> None:
    """Refuse to resume a run recorded over a different number of ranks."""
    saved = int(summary.get("world_size") or 1)
    if saved != ranks.world:
        raise ConfigError(
            "trainer.resume",
            f"the checkpoint was written by a run over {saved} rank(s), this run has "
            f"{ranks.world}; allowed: resume on {saved} rank(s)",
        )
