"""Floating-point floors: the matrix work of each step stage, counted from the layer sizes.

A stage's floor is its floating-point operation count divided by the matrix-multiply throughput
measured on the spot (`matmul_throughput`). Only matrix products and factorisations are counted;
elementwise work (activations, the loss, sampling, momentum and the parameter write) is not,
so measured ÷ floor also exposes memory-bound and Python overheads.

Counts (B examples, P positions per example, m statistics rows, d_in' = d_in + 1 with a bias):

- forward        Σ 2·B·P·d_in'·d_out                       (bias folded in as a column)
- backward       Σ 2·B·P·d_in'·d_out (weight gradient) + Σ_{not first} 2·B·P·d_in·d_out (input)
- Fisher pass    Σ_{not first} 2·F·P·d_in·d_out: the sampled-target backward to the layer
                 outputs (F rows), no weight gradients
- factor update  Σ 2·m·P·(d_in'² + d_out²)                  (Â = āᵀā, Ĝ = gᵀg as GEMMs)
- inversion      factored: Σ c_chol·(d_in'³ + d_out³), c_chol = 1 (LAPACK potrf n³/3 + potri
                 2n³/3); eigen: Σ c_eigh·(d_in'³ + d_out³), c_eigh = 4 (syevd: 4n³/3 tridiagonal
                 reduction + 2n³ back-transformation + ≈ 2n³/3 divide-and-conquer merges)
- precondition   factored: Σ 2·d_out·d_in'·(d_out + d_in')  (G⁻¹ M A⁻¹); eigen: twice that
                 (rotate in, rotate back)
- coarse         per step, one vector per layer (Nicolaides): Σ 2·d_out·d_in' (restrict: the sum
                 of the gradient; prolong: add a constant) + 2·L² (solve with the factored L × L
                 coarse matrix); L = number of layers. The coarse statistics (O(m·P·d) per
                 statistics step) and the operator build (O(L³) per inverse step) are left out:
                 they are timed (per step class) but not floored
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

# Flop constants of the dense factorisations (n×n), stated in the module docstring.
CHOLESKY_INVERSE_FLOPS = 1.0  # × n³: potrf (n³/3) + potri (2n³/3)
EIGH_FLOPS = 4.0  # × n³: syevd with eigenvectors
MATMUL_SIZE = 1000  # the n of the n×n×n float32 matmul whose throughput defines the floors


class Stage(str, Enum):
    """Stages of one training step, in the order the plain-loop protocol runs them."""

    FORWARD = "forward"
    LOSS = "loss"
    FISHER = "fisher_pass"
    BACKWARD = "backward"
    CAPTURE = "statistics_capture"
    FACTORS = "factor_update"
    INVERSION = "inversion"
    PRECONDITION = "precondition"
    COARSE = "coarse_correction"
    UPDATE = "update"
    OTHER = "other"


class Schedule(str, Enum):
    """How often a stage runs: every step, every T_cov steps or every T_inv steps."""

    EVERY_STEP = "every_step"
    STATISTICS = "statistics"
    INVERSE = "inverse"


STAGE_SCHEDULE: dict[Stage, Schedule] = {
    Stage.FORWARD: Schedule.EVERY_STEP,
    Stage.LOSS: Schedule.EVERY_STEP,
    Stage.FISHER: Schedule.STATISTICS,
    Stage.BACKWARD: Schedule.EVERY_STEP,
    Stage.CAPTURE: Schedule.STATISTICS,
    Stage.FACTORS: Schedule.STATISTICS,
    Stage.INVERSION: Schedule.INVERSE,
    Stage.PRECONDITION: Schedule.EVERY_STEP,
    Stage.COARSE: Schedule.EVERY_STEP,
    Stage.UPDATE: Schedule.EVERY_STEP,
    Stage.OTHER: Schedule.EVERY_STEP,
}


class LayerKind(str, Enum):
    """Layer types K-FAC preconditions."""

    LINEAR = "linear"
    CONV2D = "conv2d"


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one preconditioned layer as K-FAC sees it."""

    name: str
    kind: LayerKind
    d_in: int  # input features (C_in·kh·kw for Conv2d), without the homogeneous 1
    d_out: int
    bias: bool
    positions: int  # P: output positions per example (1 for Linear on (B, d_in) inputs)
    first: bool  # the first layer needs no input gradient

    @property
    def d_in_aug(self) -> int:
        """d_in' = d_in + 1 with a bias."""
        return self.d_in + (1 if self.bias else 0)


def layer_shapes(model: nn.Module, example: Tensor) -> list[LayerShape]:
    """The Linear/Conv2d layers of ``model`` in call order, sized by a forward of ``example``."""
    seen: list[tuple[str, nn.Module, int]] = []
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            seen.append((name, module, int(output[0].numel() // channels)))

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    shapes = []
    for index, (name, module, positions) in enumerate(seen):
        if isinstance(module, nn.Linear):
            kind, d_in, d_out = LayerKind.LINEAR, module.in_features, module.out_features
        else:
            assert isinstance(module, nn.Conv2d)
            kh, kw = module.kernel_size
            kind = LayerKind.CONV2D
            d_in, d_out = module.in_channels * kh * kw // module.groups, module.out_channels
        shapes.append(
            LayerShape(
                name=name,
                kind=kind,
                d_in=d_in,
                d_out=d_out,
                bias=module.bias is not None,
                positions=positions,
                first=index == 0,
            )
        )
    return shapes


@dataclass(frozen=True)
class StageFlops:
    """Floating-point operations of each stage, once per occurrence."""

    forward: float
    backward: float
    fisher_pass: float
    factor_update: float
    inversion_factored: float
    inversion_eigen: float
    precondition_factored: float
    precondition_eigen: float
    coarse_correction: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict (JSON)."""
        return asdict(self)


def stage_flops(
    layers: Sequence[LayerShape], *, batch: int, stats_rows: int, fisher_rows: int | None = None
) -> StageFlops:
    """Flop counts of each stage for a batch of ``batch`` with ``stats_rows`` statistics rows."""
    fisher_rows = batch if fisher_rows is None else fisher_rows
    forward = backward = fisher = factors = inv_chol = inv_eigh = precond = coarse = 0.0
    for layer in layers:
        p, d_in, d_aug, d_out = layer.positions, layer.d_in, layer.d_in_aug, layer.d_out
        forward += 2.0 * batch * p * d_aug * d_out
        backward += 2.0 * batch * p * d_aug * d_out
        if not layer.first:
            backward += 2.0 * batch * p * d_in * d_out
            fisher += 2.0 * fisher_rows * p * d_in * d_out
        factors += 2.0 * stats_rows * p * (d_aug**2 + d_out**2)
        inv_chol += CHOLESKY_INVERSE_FLOPS * (d_aug**3 + d_out**3)
        inv_eigh += EIGH_FLOPS * (d_aug**3 + d_out**3)
        precond += 2.0 * d_out * d_aug * (d_out + d_aug)
        coarse += 2.0 * d_out * d_aug
    count = len(layers)
    coarse += 2.0 * count**2
    return StageFlops(
        forward=forward,
        backward=backward,
        fisher_pass=fisher,
        factor_update=factors,
        inversion_factored=inv_chol,
        inversion_eigen=inv_eigh,
        precondition_factored=precond,
        precondition_eigen=2.0 * precond,
        coarse_correction=coarse,
    )


@dataclass(frozen=True)
class Periods:
    """Statistics every ``cov`` steps, inverses every ``inv`` steps."""

    cov: int
    inv: int

    def __post_init__(self) -> None:
        if self.cov < 1 or self.inv < 1 or self.inv % self.cov != 0:
            raise ValueError(
                f"periods: got T_cov={self.cov}, T_inv={self.inv}; allowed: positive, "
                "T_inv a multiple of T_cov"
            )

    @property
    def label(self) -> str:
        """Short label, e.g. ``T10/100``."""
        return f"T{self.cov}/{self.inv}"

    def frequency(self, schedule: Schedule) -> float:
        """Occurrences per step of a stage with this schedule."""
        if schedule is Schedule.STATISTICS:
            return 1.0 / self.cov
        if schedule is Schedule.INVERSE:
            return 1.0 / self.inv
        return 1.0


class StepKind(str, Enum):
    """What a method's step computes, for its amortised floor."""

    FIRST_ORDER = "first_order"
    KFAC_FACTORED = "kfac_factored"
    KFAC_EIGEN = "kfac_eigen"


def stage_floor_flops(flops: StageFlops, *, kind: StepKind, coarse: bool) -> dict[Stage, float]:
    """Flops per occurrence of each stage a method runs."""
    out = {Stage.FORWARD: flops.forward, Stage.BACKWARD: flops.backward}
    if kind is StepKind.FIRST_ORDER:
        return out
    eigen = kind is StepKind.KFAC_EIGEN
    out[Stage.FISHER] = flops.fisher_pass
    out[Stage.FACTORS] = flops.factor_update
    out[Stage.INVERSION] = flops.inversion_eigen if eigen else flops.inversion_factored
    out[Stage.PRECONDITION] = flops.precondition_eigen if eigen else flops.precondition_factored
    if coarse:
        out[Stage.COARSE] = flops.coarse_correction
    return out


def amortised_flops(per_stage: dict[Stage, float], periods: Periods | None) -> float:
    """Flops per step, each stage weighted by how often it runs."""
    if periods is None:
        return sum(per_stage.values())
    return sum(v * periods.frequency(STAGE_SCHEDULE[s]) for s, v in per_stage.items())


@dataclass(frozen=True)
class Throughput:
    """Measured matrix-multiply throughput."""

    size: int
    dtype: str
    seconds: float  # median over the repeats
    flops_per_s: float
    repeats: int


class MatmulProbe:
    """A preallocated n×n×n float32 matmul, timed on demand (interleaved with the steps)."""

    def __init__(
        self,
        *,
        size: int = MATMUL_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.size = size
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(size, size, generator=gen, dtype=dtype).to(self.device)
        self.b = torch.randn(size, size, generator=gen, dtype=dtype).to(self.device)
        self.out = torch.empty(size, size, dtype=dtype, device=self.device)
        self.times: list[float] = []
        torch.matmul(self.a, self.b, out=self.out)

    def run(self) -> float:
        """Time one product; the time is also kept in ``times``."""
        _sync(self.device)
        start = time.perf_counter()
        torch.matmul(self.a, self.b, out=self.out)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        return elapsed

    def result(self) -> Throughput:
        """Median throughput over the products timed so far."""
        seconds = statistics.median(self.times)
        return Throughput(
            size=self.size,
            dtype=str(self.dtype).removeprefix("torch."),
            seconds=seconds,
            flops_per_s=2.0 * self.size**3 / seconds,
            repeats=len(self.times),
        )


def matmul_throughput(
    *,
    size: int = MATMUL_SIZE,
    repeats: int = 7,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Throughput:
    """Median throughput of an n×n×n matmul (after one warm-up product)."""
    probe = MatmulProbe(size=size, dtype=dtype, device=device)
    for _ in range(repeats):
        probe.run()
    return probe.result()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
