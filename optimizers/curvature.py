"""K-FAC curvature blocks: one object per preconditioned layer (nn.Linear, nn.Conv2d).

Conventions (REFERENCE §2). Layer i computes s = W ā with ā the input (a homogeneous 1 appended
when the layer has a bias) and W of shape d_out × d_in' (d_in' = d_in [+1]), the bias being the
last column; a Conv2d weight is flattened to C_out × (C_in·kh·kw) in the order of `F.unfold`.
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
        self.inputs: Tensor | None = None
        self._a_aug: Tensor | None = None
        self.g: Tensor | None = None
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

    def save_input(self, x: Tensor, *, rows: int) -> None:
        """Stage 1: keep the input rows of the first ``rows`` examples, (rows, P, d_in).

        In factor dtype; a view of the input when the dtype matches (autograd keeps the input
        alive anyway), so capturing costs no copy for Linear layers.
        """
        self.inputs = self._input_rows(x[:rows].detach().to(self.factor_dtype))
        self._a_aug = None
        self.g = None

    @property
    def a(self) -> Tensor | None:
        """ā = [input rows, 1] as (rows, P, d_in'), built on first use (K-FAC never needs it)."""
        if self.inputs is None or not self.has_bias:
            return self.inputs
        if self._a_aug is None:
            x = self.inputs
            self._a_aug = torch.cat([x, x.new_ones(x.shape[0], x.shape[1], 1)], dim=2)
        return self._a_aug

    def save_output(self, output: Tensor) -> None:
        """Record the spatial grid of the layer output."""
        self.grid = self._output_grid(output)

    def save_output_grad(self, gs: Tensor, *, rows: int, scale: float = 1.0) -> None:
        """Stage 2: keep g = scale · ∂loss/∂s of the first ``rows`` examples, (rows, P, d_out)."""
        g = self._output_rows(gs[:rows].detach().to(self.factor_dtype))
        self.g = g * scale if scale != 1.0 else g

    def clear_stats(self) -> None:
        """Forget the captured statistics."""
        self.inputs = None
        self._a_aug = None
        self.g = None

    # ------------------------------------------------------------------ stage 3
    def batch_factors(self) -> tuple[Tensor, Tensor]:
        """Â and Ĝ of the captured statistics (see the module docstring for the scaling)."""
        if self.a is None or self.g is None:
            raise RuntimeError(f"{self.kind} block: no captured statistics")
        batch = self.a.shape[0]
        a = self.a.reshape(-1, self.a.shape[2])
        g = self.g.reshape(-1, self.g.shape[2])
        return a.T @ a / a.shape[0], g.T @ g / batch

    def update_factors(self, *, decay: float) -> bool:
        """Stage 3: A ← ε A + (1 − ε) Â (same for G), one fused GEMM per factor.

        Statistics whose squared norm is not finite (so Â or Ĝ could hold inf or NaN) are not
        folded in: the factors stay unchanged and False is returned.
        """
        if self.inputs is None or self.g is None:
            raise RuntimeError(f"{self.kind} block: no captured statistics")
        x = self.inputs.reshape(-1, self.inputs.shape[2])
        g = self.g.reshape(-1, self.g.shape[2])
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
        self.G.addmm_(g.T, g, beta=decay, alpha=weight / self.g.shape[0])
        self.num_updates += 1
        return True

    # ------------------------------------------------------------------ stage 4
    @property
    def has_inverse(self) -> bool:
        """Whether a damped inverse has been computed."""
        return self.mode is not None

    def update_inverse(self, *, damping: float, mode: DampingMode) -> int:
        """Stage 4: damped inverse of the current factors; returns how many factorisations retried.

        If every retry fails, the previous inverse is kept and RuntimeError is raised when there
        is none.
        """
        if mode is DampingMode.eigen:
            return self._update_eigen(damping)
        return self._update_factored(damping, unit=mode is DampingMode.factored_unit)

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

    def _update_factored(self, damping: float, *, unit: bool = False) -> int:
        pi = 1.0 if unit else factored_pi(self.A, self.G)
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
            return self._update_factored(damping, unit=self.mode is DampingMode.factored_unit)
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


class LinearBlock(KFACBlock):
    """nn.Linear: ā = [x, 1]; inputs with extra dimensions (B, ..., d_in) give P = their product."""

    kind = "linear"

    def __init__(self, module: nn.Linear, *, factor_dtype: torch.dtype | None = None) -> None:
        super().__init__(
            module,
            weight=module.weight,
            bias=module.bias,
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


class Conv2dBlock(KFACBlock):
    """nn.Conv2d (groups = 1): ā = [unfolded patch, 1] at each of the P = H_out·W_out positions."""

    kind = "conv2d"

    def __init__(self, module: nn.Conv2d, *, factor_dtype: torch.dtype | None = None) -> None:
        if module.groups != 1:
            raise ValueError("Conv2dBlock: grouped convolutions are not supported")
        kh, kw = module.kernel_size
        super().__init__(
            module,
            weight=module.weight,
            bias=module.bias,
            d_in=module.in_channels * kh * kw,
            d_out=module.out_channels,
            factor_dtype=factor_dtype,
        )

    def _input_rows(self, x: Tensor) -> Tensor:
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        padding: Any = conv.padding
        if isinstance(padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        patches = F.unfold(
            x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
        )
        return patches.transpose(1, 2)

    def _output_rows(self, gs: Tensor) -> Tensor:
        return gs.flatten(2).transpose(1, 2)

    def _output_grid(self, output: Tensor) -> tuple[int, int]:
        return int(output.shape[-2]), int(output.shape[-1])


def make_block(module: nn.Module, *, factor_dtype: torch.dtype | None = None) -> KFACBlock | None:
    """The curvature block of a supported, trainable layer; None for anything else.

    Supported: nn.Linear, nn.Conv2d with groups = 1, all of whose parameters require gradients.
    """
    params = list(module.parameters(recurse=False))
    if not params or not all(p.requires_grad for p in params):
        return None
    if isinstance(module, nn.Linear):
        return LinearBlock(module, factor_dtype=factor_dtype)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return Conv2dBlock(module, factor_dtype=factor_dtype)
    return None
