"""K-FAC curvature blocks: one object per preconditioned layer (Linear, Conv1d/2d, Embedding).

Conventions (docs/method.md §2-3). Layer i computes s = W ā with ā the input (a homogeneous 1
appended when the layer has a bias) and W of shape d_out × d_in' (d_in' = d_in [+1]), the bias being
the last column; a Conv2d weight is flattened to C_out × (C_in·kh·kw) in the order of `F.unfold`.
Kronecker products use column-major vec: (A ⊗ G) vec(X) = vec(G X A).

Stages of a block, called by `optimizers.kfac.KFAC` in this order:

1. `save_input(x, rows=m)`   forward hook: the first m examples of the input, as (m, P, d_in)
   (`inputs`; `a` adds the homogeneous 1 on demand: (m, P, d_in')).
2. `save_output_grad(gs, rows=m, scale=c)`   g ← c · ∂(loss)/∂s for those examples, (m, P, d_out);
   c makes g per-example: c = B for the batch-mean loss, 1 for a summed loss.
3. `update_factors(decay=ε)`   A ← ε A + (1 − ε) Â, G ← ε G + (1 − ε) Ĝ (skipped if ‖a‖² or ‖g‖² is
   not finite).
4. `update_inverse(damping=λ, mode=...)`   damped inverse (Cholesky or eigendecomposition).
5. `multiply_inverse(mat)`   the damped inverse applied to a d_out × d_in' matrix.

Batch factors and their scaling. With P positions per example (P = 1 for Linear on (B, d_in)
inputs; P = H_out·W_out for Conv2d; P = the product of the extra dimensions for a Linear on
(B, ..., d_in) inputs):

    Â = 1/(B·P) Σ_{n,p} ā_np ā_npᵀ      (averaged over examples and positions)
    Ĝ = 1/B     Σ_{n,p} g_np g_npᵀ      (summed over positions, averaged over examples)

so that A ⊗ G = P · Ā ⊗ Ḡ with Ā, Ḡ both position averages: the KFC approximation (Grosse &
Martens 2016) Σ_p E[ā_p ā_pᵀ] ⊗ E[g_p g_pᵀ] of the Fisher block under spatially uncorrelated
derivatives and spatial homogeneity. For P = 1 (Linear; Conv2d whose kernel covers its input) it
is the plain K-FAC block, exact for a single example.

Block API (stable; two-level K-FAC builds on it):

- `module`, `params` ([weight, bias] or [weight]), `has_bias`, `shape` (d_out, d_in'), `grid`
  ((H_out, W_out) for Conv2d, (1, P) for Linear) and `factor_dtype`.
- `a`, `g`: statistics of the latest statistics step (None before the first), kept until the next;
  `inputs` is `a` without the homogeneous column (what the factor update reads).
- `A`, `G`: running factors; `num_updates`: how many statistics updates they hold.
- Factored mode: `pi`, `A_inv` = (A + π√λ I)^-1, `G_inv` = (G + √λ/π I)^-1.
  Eigen mode: `Q_A`, `d_A`, `Q_G`, `d_G` (eigenvalues clamped at 0) and `eigen_scale` =
  1 / (d_G d_Aᵀ + λ). `damping`, `mode`: the λ and mode of the current inverse.
- `grad_matrix()`, `params_to_matrix(tensors)`, `matrix_to_param_updates(mat)`,
  `multiply_inverse(mat)`, `multiply_factors(mat)` (= G mat A, the undamped K-FAC block times
  mat), `set_damping(λ)` (re-damp the current inverse), `dense_factor_kron()` (= A ⊗ G) and
  `state_dict()` / `load_state_dict()`.

A layer called several times in one forward stores each call's rows as extra positions, and the
micro-batches of one step (gradient accumulation) as extra examples (`save_input(..., call=,
micro=)`), so its statistics are summed over calls (KFAC-expand) and averaged over all examples.

Numerics: factor math in float32 (float64 when the layer is float64), whatever the model dtype.
A failed Cholesky/eigh retries in float64 with growing jitter; if every retry fails the previous
inverse is kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimizers.enums import DampingMode

# Jitters (relative to the mean diagonal) of the float64 retries of a failed factorisation.
RETRY_JITTERS = (0.0, 1.0e-10, 1.0e-7, 1.0e-4)


def factor_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the factor math for a layer of the given dtype: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ema_decay(updates: int, ema_max: float) -> float:
    """Running-average weight ε_k = min(1 − 1/(k+1), ε_max) after k statistics updates."""
    return min(1.0 - 1.0 / (updates + 1), ema_max)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry is finite: one reduction per tensor, not an elementwise mask.

    A sum that overflows counts as non-finite (conservative: such values are unusable anyway).
    """
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def squares_finite(*tensors: Tensor) -> bool:
    """Whether ‖t‖² is finite for each tensor, so that every entry of tᵀt is finite too."""
    for t in tensors:
        if t.is_contiguous():
            flat = t.reshape(-1)
            total = torch.dot(flat, flat)  # one BLAS call, ~3x faster than vector_norm
        else:
            total = torch.linalg.vector_norm(t)
        if not bool(torch.isfinite(total)):
            return False
    return True


def _plus_diagonal(mat: Tensor, shift: float) -> Tensor:
    """mat + shift·I as a new matrix (one copy; no identity matrix is built)."""
    out = mat.clone()
    out.diagonal().add_(shift)
    return out


def _mean_diag(mat: Tensor) -> float:
    value = float(mat.diagonal().abs().mean()) if mat.numel() else 0.0
    return value if math.isfinite(value) and value > 0 else 1.0


def robust_eigh(mat: Tensor) -> tuple[Tensor, Tensor, bool] | None:
    """Eigenpairs of a symmetric matrix; float64 retries with jitter on failure.

    Returns (eigenvalues, eigenvectors, retried) in mat's dtype, or None if every retry failed.
    """
    try:
        vals, vecs = torch.linalg.eigh(mat)
        if all_finite(vals, vecs):
            return vals, vecs, False
    except RuntimeError:
        pass
    wide = mat.double()
    scale = _mean_diag(wide)
    for jitter in RETRY_JITTERS:
        shift = jitter * scale
        try:
            vals, vecs = torch.linalg.eigh(_plus_diagonal(wide, shift))
        except RuntimeError:
            continue
        if all_finite(vals, vecs):
            return (vals - shift).to(mat.dtype), vecs.to(mat.dtype), True
    return None


def robust_spd_inverse(mat: Tensor) -> tuple[Tensor, bool] | None:
    """Inverse of a symmetric positive definite matrix by Cholesky; float64 retries with jitter.

    Returns (inverse, retried) in mat's dtype, or None if every retry failed.
    """
    try:
        chol, info = torch.linalg.cholesky_ex(mat)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            if all_finite(inv):
                return inv, False
    except RuntimeError:
        pass
    wide = mat.double()
    scale = _mean_diag(wide)
    for jitter in RETRY_JITTERS:
        try:
            chol, info = torch.linalg.cholesky_ex(_plus_diagonal(wide, jitter * scale))
        except RuntimeError:
            continue
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            if all_finite(inv):
                return inv.to(mat.dtype), True
    return None


def factored_pi(A: Tensor, G: Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)); 1 when a trace is not positive and finite."""
    ratio_a = float(A.diagonal().sum()) / A.shape[0]
    ratio_g = float(G.diagonal().sum()) / G.shape[0]
    if not (math.isfinite(ratio_a) and math.isfinite(ratio_g)) or ratio_a <= 0 or ratio_g <= 0:
        return 1.0
    return math.sqrt(ratio_a / ratio_g)


class KFACBlock:
    """Kronecker-factored curvature of one layer (see the module docstring for the API)."""

    kind = "block"
    coarse_supported = True  # two-level K-FAC can build its coarse level on this block

    def __init__(
        self,
        module: nn.Module,
        *,
        weight: Tensor,
        bias: Tensor | None,
        d_in: int,
        d_out: int,
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        self.module = module
        self.has_bias = bias is not None
        self.params: list[Tensor] = [weight] if bias is None else [weight, bias]
        self.weight = weight
        self.bias = bias
        self.factor_dtype = factor_dtype or factor_dtype_for(weight.dtype)
        self.shape = (d_out, d_in + (1 if self.has_bias else 0))
        self.grid: tuple[int, int] = (1, 1)
        self.calls = 0  # how many times the layer ran in the latest captured forward
        self._call_grid: tuple[int, int] = (1, 1)
        # statistics keyed by (micro-batch, call): concatenated over calls (positions, dim 1)
        # and micro-batches (examples, dim 0) when read
        self._input_parts: dict[tuple[int, int], Tensor] = {}
        self._grad_parts: dict[tuple[int, int], Tensor] = {}
        self._inputs: Tensor | None = None
        self._g: Tensor | None = None
        self._a_aug: Tensor | None = None
        dev = weight.device
        self.A = torch.zeros(self.shape[1], self.shape[1], dtype=self.factor_dtype, device=dev)
        self.G = torch.zeros(self.shape[0], self.shape[0], dtype=self.factor_dtype, device=dev)
        self.num_updates = 0
        self.mode: DampingMode | None = None
        self.damping: float | None = None
        self.pi: float = 1.0
        self.A_inv: Tensor | None = None
        self.G_inv: Tensor | None = None
        self.Q_A: Tensor | None = None
        self.d_A: Tensor | None = None
        self.Q_G: Tensor | None = None
        self.d_G: Tensor | None = None
        self.eigen_scale: Tensor | None = None

    # ------------------------------------------------------------------ layer-specific
    def _input_rows(self, x: Tensor) -> Tensor:
        """Layer input as (B, P, d_in) rows (without the homogeneous 1)."""
        raise NotImplementedError

    def _output_rows(self, gs: Tensor) -> Tensor:
        """Output gradient as (B, P, d_out) rows."""
        raise NotImplementedError

    def _output_grid(self, output: Tensor) -> tuple[int, int]:
        """Spatial grid of the layer output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ stages 1–2
    @property
    def positions(self) -> int:
        """Number of positions P per example."""
        return self.grid[0] * self.grid[1]

    def save_input(self, x: Tensor, *, rows: int, micro: int = 0, call: int = 0) -> None:
        """Stage 1: keep the input rows of the first ``rows`` examples, (rows, P, d_in).

        In factor dtype; a view of the input when the dtype matches (autograd keeps the input
        alive anyway), so capturing costs no copy for Linear layers. ``call`` counts the calls of
        the layer in one forward, ``micro`` the micro-batches of one step (gradient accumulation):
        their rows are concatenated along the positions and the examples respectively.
        """
        self._input_parts[(micro, call)] = self._input_rows(x[:rows].detach().to(self.factor_dtype))
        self._inputs = None
        self._a_aug = None

    @staticmethod
    def _joined(parts: dict[tuple[int, int], Tensor]) -> Tensor:
        if len(parts) == 1:
            return next(iter(parts.values()))
        micros = sorted({m for m, _ in parts})
        per_micro = []
        for micro in micros:
            calls = sorted(c for m, c in parts if m == micro)
            per_micro.append(torch.cat([parts[(micro, c)] for c in calls], dim=1))
        return torch.cat(per_micro, dim=0)

    @property
    def inputs(self) -> Tensor | None:
        """Input rows (rows, P, d_in) of every call and micro-batch captured; None before."""
        if not self._input_parts:
            return None
        if self._inputs is None:
            self._inputs = self._joined(self._input_parts)
        return self._inputs

    @property
    def g(self) -> Tensor | None:
        """Output-gradient rows (rows, P, d_out); None until every captured call has them."""
        if not self._grad_parts or self._grad_parts.keys() != self._input_parts.keys():
            return None
        if self._g is None:
            self._g = self._joined(self._grad_parts)
        return self._g

    @property
    def has_stats(self) -> bool:
        """Whether inputs and output gradients of every captured call are there."""
        return bool(self._input_parts) and self.g is not None

    @property
    def a(self) -> Tensor | None:
        """ā = [input rows, 1] as (rows, P, d_in'), built on first use (K-FAC never needs it)."""
        inputs = self.inputs
        if inputs is None or not self.has_bias:
            return inputs
        if self._a_aug is None:
            x = inputs
            self._a_aug = torch.cat([x, x.new_ones(x.shape[0], x.shape[1], 1)], dim=2)
        return self._a_aug

    def save_output(self, output: Tensor, *, call: int = 0) -> None:
        """Record the spatial grid of the layer output (positions of all calls: (1, ΣP))."""
        grid = self._output_grid(output)
        if call == 0:
            self._call_grid, self.calls = grid, 1
            self.grid = grid
            return
        self.calls = max(self.calls, call + 1)
        self.grid = (1, self.grid[0] * self.grid[1] + grid[0] * grid[1])

    def save_output_grad(
        self, gs: Tensor, *, rows: int, scale: float | Tensor = 1.0, micro: int = 0, call: int = 0
    ) -> None:
        """Stage 2: keep g = scale · ∂loss/∂s of the first ``rows`` examples, (rows, P, d_out).

        ``scale`` is a number or one factor per example (shape (rows,)).
        """
        g = self._output_rows(gs[:rows].detach().to(self.factor_dtype))
        if isinstance(scale, Tensor):
            g = g * scale.to(g.dtype).reshape(-1, 1, 1)
        elif scale != 1.0:
            g = g * scale
        self._grad_parts[(micro, call)] = g
        self._g = None

    def clear_stats(self) -> None:
        """Forget the captured statistics."""
        self._input_parts = {}
        self._grad_parts = {}
        self._inputs = None
        self._g = None
        self._a_aug = None

    # ------------------------------------------------------------------ stage 3
    def batch_factors(self) -> tuple[Tensor, Tensor]:
        """Â and Ĝ of the captured statistics (see the module docstring for the scaling)."""
        a_rows, g_rows = self.a, self.g
        if a_rows is None or g_rows is None:
            raise RuntimeError(f"{self.kind} block: no captured statistics")
        batch = a_rows.shape[0]
        a = a_rows.reshape(-1, a_rows.shape[2])
        g = g_rows.reshape(-1, g_rows.shape[2])
        return a.T @ a / a.shape[0], g.T @ g / batch

    def update_factors(self, *, decay: float) -> bool:
        """Stage 3: A ← ε A + (1 − ε) Â (same for G), one fused GEMM per factor.

        Statistics whose squared norm is not finite (so Â or Ĝ could hold inf or NaN) are not
        folded in: the factors stay unchanged and False is returned.
        """
        inputs, g_rows = self.inputs, self.g
        if inputs is None or g_rows is None:
            raise RuntimeError(f"{self.kind} block: no captured statistics")
        x = inputs.reshape(-1, inputs.shape[2])
        g = g_rows.reshape(-1, g_rows.shape[2])
        if not squares_finite(x, g):
            return False
        weight = 1.0 - decay
        alpha = weight / x.shape[0]
        if self.has_bias:  # ā = [x, 1]: āᵀā = [[xᵀx, xᵀ1], [1ᵀx, n]] without building ā
            d = x.shape[1]
            self.A[:d, :d].addmm_(x.T, x, beta=decay, alpha=alpha)
            col = x.sum(dim=0)
            self.A[:d, d].mul_(decay).add_(col, alpha=alpha)
            self.A[d, :d].mul_(decay).add_(col, alpha=alpha)
            self.A[d, d].mul_(decay).add_(weight)
        else:
            self.A.addmm_(x.T, x, beta=decay, alpha=alpha)
        self.G.addmm_(g.T, g, beta=decay, alpha=weight / g_rows.shape[0])
        self.num_updates += 1
        return True

    # ------------------------------------------------------------------ stage 4
    @property
    def has_inverse(self) -> bool:
        """Whether a damped inverse has been computed."""
        return self.mode is not None

    def update_inverse(self, *, damping: float, mode: DampingMode, fixed_pi: float = 1.0) -> int:
        """Stage 4: damped inverse of the current factors; returns how many factorisations retried.

        ``fixed_pi``: the π of ``factored_unit`` damping (ignored by the other modes). If every
        retry fails, the previous inverse is kept and RuntimeError is raised when there is none.
        """
        if mode is DampingMode.eigen:
            return self._update_eigen(damping)
        unit = mode is DampingMode.factored_unit
        return self._update_factored(damping, fixed_pi=fixed_pi if unit else None)

    def factor_eigenpairs(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(d_A, Q_A), (d_G, Q_G) of the current factors (eigenvalues clamped at 0).

        In eigen mode the inverse's own decomposition; otherwise computed now (callers cache).
        """
        if self.mode is DampingMode.eigen:
            assert self.d_A is not None and self.Q_A is not None
            assert self.d_G is not None and self.Q_G is not None
            return (self.d_A, self.Q_A), (self.d_G, self.Q_G)
        eig_a, eig_g = robust_eigh(self.A), robust_eigh(self.G)
        if eig_a is None or eig_g is None:
            raise RuntimeError("two-level K-FAC: eigendecomposition of a factor failed")
        return (eig_a[0].clamp_min(0), eig_a[1]), (eig_g[0].clamp_min(0), eig_g[1])

    def _update_eigen(self, damping: float) -> int:
        eig_a = robust_eigh(self.A)
        eig_g = robust_eigh(self.G)
        if eig_a is None or eig_g is None:
            if self.mode is None:
                raise RuntimeError(f"{self.kind} block: eigendecomposition failed in float64")
            return 2
        self.d_A, self.Q_A = eig_a[0].clamp_min(0), eig_a[1]
        self.d_G, self.Q_G = eig_g[0].clamp_min(0), eig_g[1]
        self.A_inv = self.G_inv = None
        self.mode = DampingMode.eigen
        self._set_eigen_scale(damping)
        return int(eig_a[2]) + int(eig_g[2])

    def _set_eigen_scale(self, damping: float) -> None:
        assert self.d_A is not None and self.d_G is not None
        self.eigen_scale = 1.0 / (torch.outer(self.d_G, self.d_A) + damping)
        self.damping = damping

    def _update_factored(self, damping: float, *, fixed_pi: float | None = None) -> int:
        """Factored damping; π from the factor traces, or ``fixed_pi`` (factored_unit mode)."""
        unit = fixed_pi is not None
        pi = fixed_pi if fixed_pi is not None else factored_pi(self.A, self.G)
        root = math.sqrt(damping)
        inv_a = robust_spd_inverse(_plus_diagonal(self.A, pi * root))
        inv_g = robust_spd_inverse(_plus_diagonal(self.G, root / pi))
        if inv_a is None or inv_g is None:
            if self.mode is None:
                raise RuntimeError(f"{self.kind} block: Cholesky failed in float64")
            return 2
        self.A_inv, self.G_inv, self.pi = inv_a[0], inv_g[0], pi
        self.Q_A = self.d_A = self.Q_G = self.d_G = self.eigen_scale = None
        self.mode = DampingMode.factored_unit if unit else DampingMode.factored
        self.damping = damping
        return int(inv_a[1]) + int(inv_g[1])

    def set_damping(self, damping: float) -> int:
        """Re-damp the current inverse with a new λ (eigen: rescale only; factored: refactor)."""
        if self.mode is DampingMode.eigen:
            self._set_eigen_scale(damping)
            return 0
        if self.mode in (DampingMode.factored, DampingMode.factored_unit):
            unit = self.mode is DampingMode.factored_unit
            return self._update_factored(damping, fixed_pi=self.pi if unit else None)
        return 0

    # ------------------------------------------------------------------ stage 5
    def multiply_inverse(self, mat: Tensor) -> Tensor:
        """Stage 5: the damped inverse applied to a d_out × d_in' matrix (factor dtype)."""
        if self.mode in (DampingMode.factored, DampingMode.factored_unit):
            assert self.A_inv is not None and self.G_inv is not None
            return self.G_inv @ mat @ self.A_inv
        if self.mode is DampingMode.eigen:
            assert self.Q_A is not None and self.Q_G is not None and self.eigen_scale is not None
            rotated = self.Q_G.T @ mat @ self.Q_A
            return self.Q_G @ (rotated * self.eigen_scale) @ self.Q_A.T
        raise RuntimeError(f"{self.kind} block: no inverse yet (call update_inverse first)")

    def multiply_factors(self, mat: Tensor) -> Tensor:
        """The undamped K-FAC block applied to a matrix: (A ⊗ G) vec(X) = vec(G X A)."""
        return self.G @ mat @ self.A

    # ------------------------------------------------------------------ parameter layout
    def params_to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """[weight-shaped, bias-shaped] tensors as one d_out × d_in' matrix in factor dtype."""
        mat = tensors[0].reshape(self.shape[0], -1).to(self.factor_dtype)
        if self.has_bias:
            mat = torch.cat([mat, tensors[1].reshape(-1, 1).to(self.factor_dtype)], dim=1)
        return mat

    def grad_matrix(self) -> Tensor:
        """∇W as a d_out × d_in' matrix (bias gradient last); a missing .grad counts as zero."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return self.params_to_matrix(grads)

    def matrix_to_param_updates(self, mat: Tensor) -> list[Tensor]:
        """Split a d_out × d_in' matrix into tensors shaped (and typed) like the parameters."""
        weight = self.weight
        if not self.has_bias:
            return [mat.reshape(weight.shape).to(weight.dtype)]
        assert self.bias is not None
        return [
            mat[:, :-1].reshape(weight.shape).to(weight.dtype),
            mat[:, -1].reshape(self.bias.shape).to(self.bias.dtype),
        ]

    def dense_factor_kron(self) -> Tensor:
        """A ⊗ G as a dense matrix (column-major vec convention; for tests on tiny layers)."""
        return torch.kron(self.A, self.G)

    # ------------------------------------------------------------------ state
    _TENSORS = ("A", "G", "A_inv", "G_inv", "Q_A", "d_A", "Q_G", "d_G", "eigen_scale")

    def state_dict(self) -> dict[str, Any]:
        """Factors, inverses and counters (cloned)."""
        state: dict[str, Any] = {
            "kind": self.kind,
            "shape": self.shape,
            "num_updates": self.num_updates,
            "mode": None if self.mode is None else self.mode.value,
            "damping": self.damping,
            "pi": self.pi,
            "grid": self.grid,
        }
        for name in self._TENSORS:
            value = getattr(self, name)
            state[name] = None if value is None else value.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (moved to this block's device and factor dtype)."""
        if tuple(state["shape"]) != self.shape or state["kind"] != self.kind:
            raise ValueError(
                f"K-FAC state: a {state['kind']} block of shape {tuple(state['shape'])} does not "
                f"fit the {self.kind} block of shape {self.shape}"
            )
        self.num_updates = int(state["num_updates"])
        self.mode = None if state["mode"] is None else DampingMode(state["mode"])
        self.damping = None if state["damping"] is None else float(state["damping"])
        self.pi = float(state["pi"])
        self.grid = (int(state["grid"][0]), int(state["grid"][1]))
        dev = self.weight.device
        for name in self._TENSORS:
            value = state[name]
            setattr(
                self,
                name,
                None if value is None else value.to(device=dev, dtype=self.factor_dtype).clone(),
            )


def trainable_bias(module: nn.Module) -> Tensor | None:
    """The layer's bias when it is trained; a frozen bias is a constant outside the block."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) and bias.requires_grad else None


class LinearBlock(KFACBlock):
    """nn.Linear: ā = [x, 1]; inputs with extra dimensions (B, ..., d_in) give P = their product."""

    kind = "linear"

    def __init__(self, module: nn.Linear, *, factor_dtype: torch.dtype | None = None) -> None:
        super().__init__(
            module,
            weight=module.weight,
            bias=trainable_bias(module),
            d_in=module.in_features,
            d_out=module.out_features,
            factor_dtype=factor_dtype,
        )

    def _input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _output_rows(self, gs: Tensor) -> Tensor:
        return gs.reshape(gs.shape[0], -1, gs.shape[-1])

    def _output_grid(self, output: Tensor) -> tuple[int, int]:
        return 1, int(math.prod(output.shape[1:-1]))


def conv_patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches (B, P, C_in·k) of a Conv1d/Conv2d, in the order of its weight."""
    padding: Any = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    kernel: Any
    dilation: Any
    stride: Any
    if isinstance(conv, nn.Conv1d):  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, dilation = (1, conv.kernel_size[0]), (1, conv.dilation[0])
        stride, padding = (1, conv.stride[0]), (0, padding[0])
    else:
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


class ConvBlock(KFACBlock):
    """nn.Conv1d / nn.Conv2d with groups = 1: ā = [unfolded patch, 1] at each output position.

    P = H_out·W_out for Conv2d, L_out for Conv1d (grid (1, L_out)).
    """

    kind = "conv"

    def __init__(
        self, module: nn.Conv1d | nn.Conv2d, *, factor_dtype: torch.dtype | None = None
    ) -> None:
        if module.groups != 1:
            raise ValueError(f"{type(self).__name__}: groups = 1 only (GroupedConvBlock)")
        super().__init__(
            module,
            weight=module.weight,
            bias=trainable_bias(module),
            d_in=module.in_channels * math.prod(module.kernel_size),
            d_out=module.out_channels,
            factor_dtype=factor_dtype,
        )
        self.kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"

    def _input_rows(self, x: Tensor) -> Tensor:
        conv = self.module
        assert isinstance(conv, nn.Conv1d | nn.Conv2d)
        return conv_patches(conv, x)

    def _output_rows(self, gs: Tensor) -> Tensor:
        return gs.flatten(2).transpose(1, 2)

    def _output_grid(self, output: Tensor) -> tuple[int, int]:
        if output.dim() == 3:
            return 1, int(output.shape[-1])
        return int(output.shape[-2]), int(output.shape[-1])


Conv2dBlock = ConvBlock  # the historical name


class GroupedConvBlock(ConvBlock):
    """Conv1d/Conv2d with groups > 1 (depthwise included): block-diagonal over the groups.

    Group j maps input channels j·C_in/g … to output channels j·C_out/g …; its weight rows are
    rows j·C_out/g … of the d_out × d_in' matrix (d_in' = C_in/g·k [+1]), so the layer's K-FAC
    block is the direct sum of one Kronecker block per group, each built from that group's patches
    and output gradients (`parts`, plain `KFACBlock`s). `A`, `G` of the layer itself are empty.
    """

    coarse_supported = False

    def __init__(
        self, module: nn.Conv1d | nn.Conv2d, *, factor_dtype: torch.dtype | None = None
    ) -> None:
        groups = module.groups
        KFACBlock.__init__(
            self,
            module,
            weight=module.weight,
            bias=trainable_bias(module),
            d_in=module.in_channels // groups * math.prod(module.kernel_size),
            d_out=module.out_channels,
            factor_dtype=factor_dtype,
        )
        self.kind = "grouped_conv1d" if isinstance(module, nn.Conv1d) else "grouped_conv2d"
        self.groups = groups
        self.A = self.A.new_zeros(0, 0)
        self.G = self.G.new_zeros(0, 0)
        rows = module.out_channels // groups
        bias = trainable_bias(module)
        self.parts = [
            KFACBlock(
                module,
                weight=module.weight[j * rows : (j + 1) * rows],
                bias=None if bias is None else bias[j * rows : (j + 1) * rows],
                d_in=self.shape[1] - int(self.has_bias),
                d_out=rows,
                factor_dtype=self.factor_dtype,
            )
            for j in range(groups)
        ]

    def _split(self, mat: Tensor) -> list[Tensor]:
        return list(mat.reshape(self.groups, -1, mat.shape[1]).unbind(0))

    def update_factors(self, *, decay: float) -> bool:
        """Each group's factors from its slice of the patches and output gradients."""
        inputs, g_rows = self.inputs, self.g
        if inputs is None or g_rows is None:
            raise RuntimeError(f"{self.kind} block: no captured statistics")
        if not squares_finite(inputs.reshape(-1), g_rows.reshape(-1)):
            return False
        cols, rows = inputs.shape[2] // self.groups, g_rows.shape[2] // self.groups
        for j, part in enumerate(self.parts):
            part._input_parts = {(0, 0): inputs[:, :, j * cols : (j + 1) * cols]}
            part._grad_parts = {(0, 0): g_rows[:, :, j * rows : (j + 1) * rows]}
            part._inputs = part._g = part._a_aug = None
            part.update_factors(decay=decay)
            part.clear_stats()
        self.num_updates += 1
        return True

    def update_inverse(self, *, damping: float, mode: DampingMode, fixed_pi: float = 1.0) -> int:
        """Every group's damped inverse."""
        retries = sum(
            part.update_inverse(damping=damping, mode=mode, fixed_pi=fixed_pi)
            for part in self.parts
        )
        self.mode, self.damping = mode, damping
        return retries

    def set_damping(self, damping: float) -> int:
        """Re-damp every group's inverse."""
        retries = sum(part.set_damping(damping) for part in self.parts)
        self.damping = damping
        return retries

    def multiply_inverse(self, mat: Tensor) -> Tensor:
        """Each group's damped inverse on its rows."""
        if self.mode is None:
            raise RuntimeError(f"{self.kind} block: no inverse yet (call update_inverse first)")
        pieces = self._split(mat)
        return torch.cat([p.multiply_inverse(m) for p, m in zip(self.parts, pieces, strict=True)])

    def multiply_factors(self, mat: Tensor) -> Tensor:
        """The undamped block-diagonal K-FAC block applied to a d_out × d_in' matrix."""
        pieces = self._split(mat)
        return torch.cat([p.multiply_factors(m) for p, m in zip(self.parts, pieces, strict=True)])

    def dense_factor_kron(self) -> Tensor:
        """The block-diagonal K-FAC block as a dense matrix (column-major vec of d_out × d_in')."""
        size = self.shape[0] * self.shape[1]
        eye = torch.eye(size, dtype=self.factor_dtype, device=self.weight.device)
        columns = [self.multiply_factors(e.reshape(self.shape[1], self.shape[0]).T) for e in eye]
        return torch.stack([c.T.reshape(-1) for c in columns], dim=1)

    def state_dict(self) -> dict[str, Any]:
        """The layer's counters plus every group's factors and inverses."""
        state = super().state_dict()
        state["parts"] = [part.state_dict() for part in self.parts]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        super().load_state_dict(state)
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


class EmbeddingBlock(KFACBlock):
    """nn.Embedding: ā is the one-hot token, so A is diagonal (token frequencies).

    With the weight as the d_out × d_in matrix W = weightᵀ (embedding_dim × num_embeddings),
    A = diag(counts)/(B·P) is held as a vector; tokens equal to padding_idx have ā = 0 (their row
    gets no gradient). `inputs` holds the token indices (rows, P); `a` builds the dense one-hot
    (only for diagnostics on small vocabularies).
    """

    kind = "embedding"
    coarse_supported = False

    def __init__(self, module: nn.Embedding, *, factor_dtype: torch.dtype | None = None) -> None:
        super().__init__(
            module,
            weight=module.weight,
            bias=None,
            d_in=module.num_embeddings,
            d_out=module.embedding_dim,
            factor_dtype=factor_dtype,
        )
        self.A = self.A.new_zeros(module.num_embeddings)
        self.padding_idx = module.padding_idx

    def save_input(self, x: Tensor, *, rows: int, micro: int = 0, call: int = 0) -> None:
        """Keep the token indices of the first ``rows`` examples as (rows, P)."""
        self._input_parts[(micro, call)] = x[:rows].detach().reshape(min(rows, x.shape[0]), -1)
        self._inputs = None
        self._a_aug = None

    def _output_rows(self, gs: Tensor) -> Tensor:
        return gs.reshape(gs.shape[0], -1, gs.shape[-1])

    def _output_grid(self, output: Tensor) -> tuple[int, int]:
        return 1, int(math.prod(output.shape[1:-1]))

    def _one_hot_weights(self, tokens: Tensor) -> Tensor:
        weights = torch.ones(tokens.shape, dtype=self.factor_dtype, device=tokens.device)
        if self.padding_idx is not None:
            weights = weights.masked_fill(tokens == self.padding_idx, 0.0)
        return weights

    @property
    def a(self) -> Tensor | None:
        """Dense one-hot rows (rows, P, num_embeddings)."""
        tokens = self.inputs
        if tokens is None:
            return None
        if self._a_aug is None:
            hot = F.one_hot(tokens, self.shape[1]).to(self.factor_dtype)
            self._a_aug = hot * self._one_hot_weights(tokens).unsqueeze(-1)
        return self._a_aug

    def batch_factors(self) -> tuple[Tensor, Tensor]:
        """Â as the diagonal vector and Ĝ (see the class docstring)."""
        tokens, g_rows = self.inputs, self.g
        if tokens is None or g_rows is None:
            raise RuntimeError("embedding block: no captured statistics")
        counts = torch.zeros(self.shape[1], dtype=self.factor_dtype, device=tokens.device)
        counts.index_add_(0, tokens.reshape(-1), self._one_hot_weights(tokens).reshape(-1))
        g = g_rows.reshape(-1, g_rows.shape[2])
        return counts / tokens.numel(), g.T @ g / g_rows.shape[0]

    def update_factors(self, *, decay: float) -> bool:
        """A ← ε A + (1 − ε) Â on the diagonal, G as for every block."""
        g_rows = self.g
        if g_rows is None:
            raise RuntimeError("embedding block: no captured statistics")
        if not squares_finite(g_rows.reshape(-1)):
            return False
        a_hat, g_hat = self.batch_factors()
        self.A.mul_(decay).add_(a_hat, alpha=1.0 - decay)
        self.G.mul_(decay).add_(g_hat, alpha=1.0 - decay)
        self.num_updates += 1
        return True

    def _update_eigen(self, damping: float) -> int:
        eig_g = robust_eigh(self.G)
        if eig_g is None:
            if self.mode is None:
                raise RuntimeError("embedding block: eigendecomposition failed in float64")
            return 1
        self.d_A, self.Q_A = self.A.clamp_min(0), None
        self.d_G, self.Q_G = eig_g[0].clamp_min(0), eig_g[1]
        self.A_inv = self.G_inv = None
        self.mode = DampingMode.eigen
        self._set_eigen_scale(damping)
        return int(eig_g[2])

    def _update_factored(self, damping: float, *, fixed_pi: float | None = None) -> int:
        unit = fixed_pi is not None
        ratio_a = float(self.A.sum()) / self.A.shape[0]
        ratio_g = float(self.G.diagonal().sum()) / self.G.shape[0]
        ok = math.isfinite(ratio_a) and math.isfinite(ratio_g) and ratio_a > 0 and ratio_g > 0
        traced = math.sqrt(ratio_a / ratio_g) if ok else 1.0
        pi = fixed_pi if fixed_pi is not None else traced
        root = math.sqrt(damping)
        inv_g = robust_spd_inverse(_plus_diagonal(self.G, root / pi))
        if inv_g is None:
            if self.mode is None:
                raise RuntimeError("embedding block: Cholesky failed in float64")
            return 1
        self.A_inv, self.G_inv, self.pi = 1.0 / (self.A + pi * root), inv_g[0], pi
        self.Q_A = self.d_A = self.Q_G = self.d_G = self.eigen_scale = None
        self.mode = DampingMode.factored_unit if unit else DampingMode.factored
        self.damping = damping
        return int(inv_g[1])

    def multiply_inverse(self, mat: Tensor) -> Tensor:
        """The damped inverse on a embedding_dim × num_embeddings matrix (A diagonal)."""
        if self.mode in (DampingMode.factored, DampingMode.factored_unit):
            assert self.A_inv is not None and self.G_inv is not None
            return (self.G_inv @ mat) * self.A_inv
        if self.mode is DampingMode.eigen:
            assert self.Q_G is not None and self.eigen_scale is not None
            return self.Q_G @ ((self.Q_G.T @ mat) * self.eigen_scale)
        raise RuntimeError("embedding block: no inverse yet (call update_inverse first)")

    def multiply_factors(self, mat: Tensor) -> Tensor:
        """(diag(A) ⊗ G) vec(X) = vec(G X diag(A))."""
        return (self.G @ mat) * self.A

    def params_to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """The weight-shaped tensor transposed: embedding_dim × num_embeddings."""
        return tensors[0].T.to(self.factor_dtype)

    def matrix_to_param_updates(self, mat: Tensor) -> list[Tensor]:
        """Back to the weight's (num_embeddings, embedding_dim) layout."""
        return [mat.T.to(self.weight.dtype)]

    def dense_factor_kron(self) -> Tensor:
        """diag(A) ⊗ G as a dense matrix."""
        return torch.kron(torch.diag(self.A), self.G)


def _direct_params(module: nn.Module) -> list[Tensor]:
    return list(module.parameters(recurse=False))


def classify(
    module: nn.Module, *, factor_dtype: torch.dtype | None = None
) -> tuple[KFACBlock | None, str | None]:
    """(block, None) for a supported layer, (None, why) when its trainable parameters fall back
    to the plain update, (None, None) when it has no trainable parameters of its own.

    Supported: nn.Linear, nn.Conv1d/nn.Conv2d (any groups), nn.Embedding (dense gradients, no
    max_norm, no scale_grad_by_freq). A frozen bias is left out of the block (the weight's
    curvature block does not depend on it); a frozen weight with a trainable bias falls back.
    """
    params = [p for p in _direct_params(module) if p.requires_grad]
    if not params:
        return None, None
    weight = getattr(module, "weight", None)
    layers = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding
    if isinstance(module, layers) and not (isinstance(weight, Tensor) and weight.requires_grad):
        return None, "weight frozen, bias trainable: no Kronecker block for a bias alone"
    if isinstance(module, nn.Linear):
        return LinearBlock(module, factor_dtype=factor_dtype), None
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        kind = GroupedConvBlock if module.groups > 1 else ConvBlock
        return kind(module, factor_dtype=factor_dtype), None
    if isinstance(module, nn.Embedding):
        if module.sparse or module.max_norm is not None or module.scale_grad_by_freq:
            return None, "sparse / max_norm / scale_grad_by_freq embeddings are not supported"
        return EmbeddingBlock(module, factor_dtype=factor_dtype), None
    if isinstance(module, nn.MultiheadAttention):
        return None, "attention projections are applied functionally (no layer forward to hook)"
    norms = (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.RMSNorm,
    )
    if isinstance(module, norms):
        return None, "normalisation layers have no Kronecker block"
    return None, "no K-FAC block for this layer type"


def make_block(module: nn.Module, *, factor_dtype: torch.dtype | None = None) -> KFACBlock | None:
    """The curvature block of a supported, trainable layer; None for anything else (`classify`)."""
    return classify(module, factor_dtype=factor_dtype)[0]
