"""Data-parallel K-FAC on torch.distributed: how statistics and inverses are shared across ranks.

Every rank runs the same model on its own shard of the global batch. Three things must then stay
identical on all ranks, or the ranks drift apart silently:

- **Gradients**: averaged by `torch.nn.parallel.DistributedDataParallel` (required: K-FAC built on
  a model that is not wrapped while a process group of several ranks is up is refused). With
  equal shards the average of the shard means is the mean over the global batch.
- **Curvature statistics** (`DataParallel.update_statistics`): each rank folds its own batch
  statistics into the running averages with the optimizer's own code, then the running
  statistics (every block's A and G, the coarse level's running statistics) are averaged over
  the ranks, weighted by the number of statistics rows of each rank, in ONE bucketed all-reduce
  (one flat buffer in the widest factor dtype). Because every fold is affine in the batch statistics
  (S' = ε S + (1 − ε) Ŝ) and every rank starts from the same S, the average of the folded S'_r
  is exactly ε S + (1 − ε) Σ_r w_r Ŝ_r: the running statistics of the global batch (up to
  round-off). The same buffer carries one flag per (rank, block/coarse level) saying whether the
  fold happened; when a rank skipped a non-finite batch, the ranks adopt that rank's unchanged
  statistics for the affected parts (a rare broadcast), as a single process would have skipped
  the whole global batch.
- **Inverses** (`InverseStrategy`): `redundant` (default): every rank inverts every block from
  the identical factors (no communication, every rank holds every inverse);
  `distributed`: blocks are assigned to ranks by cost (greedy on d_in'^3 + d_out^3), each rank
  inverts its own and broadcasts the result (KAISA's memory-optimal end: less compute per rank,
  more communication).

MC Fisher sampling: each rank draws from its own stream, a generator seeded afresh on every
statistics step from (seed, rank, statistics step). The streams differ per rank, are
reproducible, and a resumed run continues them without any saved generator state.

Two-level K-FAC: supported with the Nicolaides coarse space and the additive combination (the
paper's method), whose coarse operator depends only on the running coarse statistics. Other
coarse spaces and the deflated/balanced combinations read the per-example statistics of the
latest batch, which stay on their rank: refused. Adaptive damping (its ρ compares rank-local
losses) is refused as well.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from optimizers.enums import DampingMode

if TYPE_CHECKING:  # the optimizers import this module; annotations only
    from optimizers.kfac import KFAC


class InverseStrategy(str, Enum):
    """Where the damped inverses are computed."""

    redundant = "redundant"  # every rank inverts every block (no communication)
    distributed = "distributed"  # blocks assigned to ranks, results broadcast


# Backends whose all_reduce/broadcast handle the float32/float64 buffers used here.
SUPPORTED_BACKENDS = ("gloo", "nccl")
# Large odd constants that mix (seed, rank, statistics step) into one MC seed.
_SEED_MIX = (1_000_003, 998_244_353)


def distributed_world() -> int:
    """Number of ranks of the default process group (1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


@dataclass
class CommStats:
    """Communication so far on this rank (what bench reports)."""

    calls: int = 0  # collective calls
    bytes: int = 0  # bytes of the buffers passed to the collectives
    seconds: float = 0.0  # wall time inside the collectives (including waiting for peers)


def mc_seed(seed: int, rank: int, step: int) -> int:
    """The MC sampling seed of ``rank`` on statistics step ``step`` (a pure function)."""
    return ((seed * _SEED_MIX[0] + rank) * _SEED_MIX[1] + step) % (2**63 - 1)


class DataParallel:
    """The data-parallel strategy a K-FAC optimizer delegates to (see the module docstring)."""

    def __init__(
        self,
        *,
        group: Any = None,
        inverses: InverseStrategy | str = InverseStrategy.redundant,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "data-parallel K-FAC: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first"
            )
        backend = str(dist.get_backend(group))
        if backend not in SUPPORTED_BACKENDS:
            raise RuntimeError(
                f"data-parallel K-FAC: process-group backend '{backend}' is not supported; "
                f"allowed: {', '.join(SUPPORTED_BACKENDS)}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise RuntimeError("data-parallel K-FAC: this process is not a member of the group")
        self.group = group
        self.rank = int(rank)
        self.world = int(dist.get_world_size(group))
        self._inverses = InverseStrategy(inverses)
        self.comm = CommStats()

    @property
    def inverses(self) -> InverseStrategy:
        """Where the damped inverses are computed (set with an InverseStrategy or its name)."""
        return self._inverses

    @inverses.setter
    def inverses(self, value: InverseStrategy | str) -> None:
        try:
            self._inverses = InverseStrategy(getattr(value, "value", value))
        except ValueError:
            allowed = ", ".join(s.value for s in InverseStrategy)
            raise ValueError(f"inverses: got {value!r}; allowed: {allowed}") from None

    def describe(self) -> str:
        """One line for run descriptions."""
        return f"data-parallel over {self.world} ranks, inverses {self.inverses.value}"

    # ------------------------------------------------------------------ collectives
    def _global(self, rank: int) -> int:
        """The global rank of ``rank`` in this group (collectives take global ranks)."""
        return rank if self.group is None else int(dist.get_global_rank(self.group, rank))

    def _all_reduce(self, buffer: Tensor) -> None:
        start = time.perf_counter()
        dist.all_reduce(buffer, group=self.group)
        self.comm.seconds += time.perf_counter() - start
        self.comm.calls += 1
        self.comm.bytes += buffer.numel() * buffer.element_size()

    def _broadcast(self, buffer: Tensor, src: int) -> None:
        start = time.perf_counter()
        dist.broadcast(buffer, src=self._global(src), group=self.group)
        self.comm.seconds += time.perf_counter() - start
        self.comm.calls += 1
        self.comm.bytes += buffer.numel() * buffer.element_size()

    # ------------------------------------------------------------------ MC sampling
    def mc_generator(self, optimizer: KFAC, device: torch.device) -> torch.Generator:
        """This rank's generator for the coming statistics step (seeded by rank and step)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(mc_seed(optimizer.seed, self.rank, optimizer.counters.stats_updates))
        return gen

    # ------------------------------------------------------------------ statistics
    def _units(self, optimizer: KFAC) -> list[tuple[list[Tensor | None], list[tuple[int, ...]]]]:
        """Running statistics per unit (each block, then the coarse level): tensors and shapes."""
        units: list[tuple[list[Tensor | None], list[tuple[int, ...]]]] = []
        for block in optimizer.blocks:  # a block's factors and those of its parts (groups)
            tensors = [t for b in (block, *getattr(block, "parts", ())) for t in (b.A, b.G)]
            units.append((list(tensors), [tuple(t.shape) for t in tensors]))
        coarse = getattr(optimizer, "coarse_running_statistics", None)
        if callable(coarse):
            tensors, shapes = coarse()
            units.append((tensors, shapes))
        return units

    @staticmethod
    def _counts(optimizer: KFAC) -> list[int]:
        counts = [block.num_updates for block in optimizer.blocks]
        if hasattr(optimizer, "coarse_running_statistics"):
            counts.append(int(optimizer.coarse_updates))  # type: ignore[attr-defined]
        return counts

    def update_statistics(self, optimizer: KFAC) -> None:
        """Fold this rank's statistics locally, then average the running statistics over ranks."""
        before = self._counts(optimizer)
        optimizer.update_statistics()
        folded = [int(a != b) for a, b in zip(self._counts(optimizer), before, strict=True)]
        rows = self._rows(optimizer)
        units = self._units(optimizer)
        wide = any(block.factor_dtype == torch.float64 for block in optimizer.blocks)
        dtype = torch.float64 if wide else torch.float32  # the widest factor dtype
        device = optimizer.blocks[0].A.device if optimizer.blocks else torch.device("cpu")
        sizes = [sum(math.prod(s) for s in shapes) for _, shapes in units]
        total = sum(sizes)
        n_units = len(units)
        buffer = torch.zeros(total + self.world * n_units + 1, dtype=dtype, device=device)
        offset = 0
        for (tensors, shapes), flag in zip(units, folded, strict=True):
            for tensor, shape in zip(tensors, shapes, strict=True):
                size = math.prod(shape)
                if tensor is not None and flag:
                    buffer[offset : offset + size].copy_(tensor.reshape(-1)).mul_(rows)
                offset += size
        flags = buffer[total : total + self.world * n_units].view(self.world, n_units)
        flags[self.rank] = torch.tensor(folded, dtype=dtype, device=device)
        buffer[-1] = rows
        self._all_reduce(buffer)
        total_rows = float(buffer[-1])
        everywhere = flags.sum(dim=0)
        offset = 0
        for index, (tensors, shapes) in enumerate(units):
            if int(everywhere[index]) == self.world and total_rows > 0:
                for tensor, shape in zip(tensors, shapes, strict=True):
                    size = math.prod(shape)
                    assert tensor is not None
                    tensor.copy_(buffer[offset : offset + size].view(shape)).div_(total_rows)
                    offset += size
            else:
                offset += sizes[index]
        mixed = [i for i in range(n_units) if 0 < int(everywhere[i]) < self.world]
        if mixed:
            skipped_by = [int((flags[:, i] == 0).nonzero()[0]) for i in mixed]
            self._adopt_skipped(optimizer, mixed, skipped_by, folded)

    def _rows(self, optimizer: KFAC) -> float:
        """Statistics rows (examples) this rank contributed: the weight of its statistics."""
        for block in optimizer.blocks:
            if block.inputs is not None:
                return float(block.inputs.shape[0])
        return 0.0

    def _adopt_skipped(
        self, optimizer: KFAC, mixed: list[int], sources: list[int], folded: list[int]
    ) -> None:
        """Units some ranks skipped (non-finite statistics): take a skipping rank's state."""
        n_blocks = len(optimizer.blocks)
        state = optimizer.curvature_state_dict()
        for unit, src in zip(mixed, sources, strict=True):
            box: list[Any] = [state["blocks"][unit] if unit < n_blocks else state.get("coarse")]
            dist.broadcast_object_list(box, src=self._global(src), group=self.group)
            if unit < n_blocks:
                optimizer.blocks[unit].load_state_dict(box[0])
                if folded[unit]:
                    optimizer.counters.nonfinite_stats += 1
            else:
                own = optimizer.curvature_state_dict()
                own["coarse"] = box[0]
                own["generator"] = state["generator"]
                optimizer.load_curvature_state_dict(own)
        warnings.warn(
            f"data-parallel K-FAC: non-finite statistics on some rank at step "
            f"{optimizer.counters.steps} (units {mixed}); those statistics were left unchanged "
            "on every rank",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ inverses
    def update_inverses(self, optimizer: KFAC) -> int:
        """Refresh every block's damped inverse (by `inverses`); returns the retries."""
        todo = [i for i, block in enumerate(optimizer.blocks) if block.num_updates > 0]
        shared = [i for i in todo if _dense(optimizer.blocks[i])]
        if self.inverses is InverseStrategy.redundant or self.world == 1:
            shared = []
        retries = sum(  # every rank: the blocks not shared (grouped, embedding: always)
            optimizer.blocks[i].update_inverse(
                damping=optimizer.damping, mode=optimizer.damping_mode, fixed_pi=optimizer.fixed_pi
            )
            for i in todo
            if i not in shared
        )
        if not shared:
            return retries
        todo = shared
        owners = assign_blocks([optimizer.blocks[i].shape for i in todo], ranks=self.world)
        for i, owner in zip(todo, owners, strict=True):
            if owner == self.rank:
                retries += optimizer.blocks[i].update_inverse(
                    damping=optimizer.damping,
                    mode=optimizer.damping_mode,
                    fixed_pi=optimizer.fixed_pi,
                )
        for src in range(self.world):
            mine = [i for i, owner in zip(todo, owners, strict=True) if owner == src]
            if mine:
                self._share_inverses(optimizer, mine, src)
        return retries

    def _share_inverses(self, optimizer: KFAC, indices: list[int], src: int) -> None:
        """Broadcast the inverses of ``indices`` from ``src`` (one flat buffer)."""
        mode = optimizer.damping_mode
        names = ("Q_A", "d_A", "Q_G", "d_G") if mode is DampingMode.eigen else ("A_inv", "G_inv")
        blocks = [optimizer.blocks[i] for i in indices]
        shapes = []
        for block in blocks:
            d_out, d_in = block.shape
            if mode is DampingMode.eigen:
                shapes.append([(d_in, d_in), (d_in,), (d_out, d_out), (d_out,)])
            else:
                shapes.append([(d_in, d_in), (d_out, d_out)])
        total = sum(math.prod(s) for per in shapes for s in per) + len(blocks)
        ref = blocks[0].A
        buffer = torch.empty(total, dtype=ref.dtype, device=ref.device)
        if self.rank == src:
            parts = [getattr(b, n).reshape(-1) for b in blocks for n in names]
            parts.append(torch.tensor([b.pi for b in blocks], dtype=ref.dtype, device=ref.device))
            torch.cat(parts, out=buffer)
        self._broadcast(buffer, src)
        # every rank (the owner too) takes the tensors from the buffer: the same memory layout
        # on every rank, so the products with them round identically
        offset = 0
        for block, per in zip(blocks, shapes, strict=True):
            for name, shape in zip(names, per, strict=True):
                size = math.prod(shape)
                setattr(block, name, buffer[offset : offset + size].view(shape).clone())
                offset += size
        pis = buffer[offset:].tolist()
        for block, pi in zip(blocks, pis, strict=True):
            block.mode = mode
            if mode is DampingMode.eigen:
                block.A_inv = block.G_inv = None
                block.set_damping(optimizer.damping)  # eigen: rescaling only
            else:
                block.Q_A = block.d_A = block.Q_G = block.d_G = block.eigen_scale = None
                block.pi = float(pi)
                block.damping = optimizer.damping


def _dense(block: Any) -> bool:
    """Whether a block is one dense Kronecker pair (its inverse can be shared as such)."""
    d_out, d_in = block.shape
    return (
        not getattr(block, "parts", None)
        and tuple(block.A.shape) == (d_in, d_in)
        and tuple(block.G.shape) == (d_out, d_out)
    )


def assign_blocks(shapes: list[tuple[int, int]], *, ranks: int) -> list[int]:
    """Owner rank per block: greedy longest-processing-time on the cost d_in'^3 + d_out^3."""
    costs = [(d_in**3 + d_out**3, i) for i, (d_out, d_in) in enumerate(shapes)]
    load = [0] * ranks
    owner = [0] * len(shapes)
    for cost, index in sorted(costs, reverse=True):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += cost
    return owner


def data_parallel_for(
    model: nn.Module, *, what: str, unsupported: list[str]
) -> DataParallel | None:
    """The strategy a K-FAC optimizer over ``model`` needs, or None; refuses what cannot work.

    None when no process group of several ranks is up. With one, the model must be wrapped in
    DistributedDataParallel (which averages the gradients) and nothing in ``unsupported`` (the
    optimizer's settings that read rank-local data) may be set.
    """
    if distributed_world() <= 1:
        return None
    if not isinstance(model, DistributedDataParallel):
        raise RuntimeError(
            f"{what}: torch.distributed runs {distributed_world()} ranks but the model is not "
            "wrapped in torch.nn.parallel.DistributedDataParallel; wrap it before building the "
            "optimizer (its gradients would differ per rank)"
        )
    if unsupported:
        raise RuntimeError(
            f"{what}: not supported with data-parallel training: {'; '.join(unsupported)}"
        )
    return DataParallel(group=model.process_group)
