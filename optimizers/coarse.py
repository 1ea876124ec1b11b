"""Coarse spaces, coarse Fisher matrices and the coarse solve of two-level K-FAC.

The method: docs/method.md §4.

Pure tensor functions; `optimizers/twolevel.py` wires them into the optimizer.

Conventions (the suite's K-FAC contract, docs/method.md §2–3):

- Layer i has a weight matrix W_i of shape d_out × d_in' (d_in' = d_in + 1 with a bias, the
  bias being the last column); a layer's parameter vector is W_i flattened row-major.
- `LayerStats` holds the captured per-example statistics of one statistics batch: `a` (B, P, d_in')
  inputs with the homogeneous 1, `g` (B, P, d_out) per-example output gradients (already
  multiplied by B), P = 1 for Linear and the number of output positions for Conv2d. The
  per-example gradient is ∇_i ℓ_n = Σ_p g_{n,p} ā_{n,p}^T and the mini-batch Fisher is
  F = (1/B) Σ_n vec ∇ℓ_n vec ∇ℓ_n^T. No per-example gradient is ever materialised here.
- A coarse basis vector is supported on one layer; `LayerBasis` keeps an optional scaled all-ones
  vector (Nicolaides) apart from dense vectors so that the all-ones work stays O(B·P·d).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

# Relative tolerance under which factor eigenvalues count as equal to the smallest one.
EIGEN_TIE_RTOL = 1.0e-5
# Coarse eigenvalues below this fraction of the largest are treated as zero (pseudo-inverse).
COARSE_PINV_RTOL = 1.0e-12


class CoarseSpace(str, Enum):
    """Which vectors span the coarse space of each layer (strategies: optimizers/coarse_spaces)."""

    nicolaides = "nicolaides"  # one all-ones vector per layer (paper reconstruction)
    spectral = "spectral"  # q_G q_A^T at the smallest factor eigenvalues (Koroko et al.)
    residual = "residual"  # K_i^-1 res_i, res = g − (F + λI) K^-1 g (Koroko et al.)
    krylov_nicolaides = "krylov_nicolaides"  # {1, K_i^-1 1} (Koroko et al.)
    krylov_residual = "krylov_residual"  # {r_i, K_i^-1 r_i}, r = residual (Koroko et al.)
    enriched = "enriched"  # 1 plus top K-FAC eigenvectors by gradient projection (2022)


class BasisNorm(str, Enum):
    """Scaling applied to every coarse basis vector."""

    none = "none"  # raw vectors (paper reconstruction: all-ones, not normalised)
    unit = "unit"  # Euclidean norm 1
    max = "max"  # largest absolute entry 1 (Koroko et al.)


class CoarseFisher(str, Enum):
    """How the coarse matrix F_c ≈ R0 F R0^T is estimated."""

    kron = "kron"  # cross-layer Kronecker blocks Ā_ij ⊗ G_ij (paper reconstruction)
    exact = "exact"  # (1/B) Σ_n ⟨r_i, ∇_i ℓ_n⟩⟨r_j, ∇_j ℓ_n⟩ (Koroko et al.)


class CoarseDownsample(str, Enum):
    """How a larger conv map is sampled onto a smaller one in the cross-layer kron blocks."""

    centre = "centre"  # nearest-exact (centre) samples, cross blocks scaled by max(P_i, P_j)
    nearest = "nearest"  # authors' F.interpolate(mode='nearest'): top-left samples, min(P_i, P_j)²


class CoarseRefresh(str, Enum):
    """How the Nicolaides coarse matrix is refreshed on inverse steps."""

    rebuild = "rebuild"  # F_c from the current running statistics (REFERENCE §3)
    accumulate = "accumulate"  # authors' paper-time gkfac.py: off-diagonals summed over refreshes


class CoarseDamping(str, Enum):
    """Damping D_c added to the coarse matrix."""

    diagonal = "diagonal"  # λ I_m (paper reconstruction)
    projected = "projected"  # λ R0 R0^T, the projection of λ I (Koroko et al.: λ N_i for ones)


@dataclass(frozen=True)
class LayerStats:
    """Per-example statistics of one K-FAC layer from one statistics batch."""

    a: Tensor  # (B, P, d_in') layer inputs, homogeneous 1 appended with a bias
    g: Tensor  # (B, P, d_out) per-example output gradients (multiplied by B)
    grid: tuple[int, int] = (1, 1)  # (h, w) of the P positions; (1, 1) for Linear

    def __post_init__(self) -> None:
        if self.a.dim() != 3 or self.g.dim() != 3 or self.a.shape[:2] != self.g.shape[:2]:
            raise ValueError(
                f"LayerStats: a {tuple(self.a.shape)} and g {tuple(self.g.shape)} must be (B, P, d)"
            )
        if self.grid[0] * self.grid[1] != self.a.shape[1]:
            raise ValueError(f"LayerStats: grid {self.grid} does not hold P={self.a.shape[1]}")

    @property
    def shape(self) -> tuple[int, int]:
        """Shape d_out × d_in' of the layer's weight matrix."""
        return int(self.g.shape[2]), int(self.a.shape[2])

    @property
    def positions(self) -> int:
        """Number of spatial positions P."""
        return int(self.a.shape[1])


@dataclass(frozen=True)
class LayerBasis:
    """Coarse basis vectors supported on one layer: optional scaled all-ones first, then dense."""

    shape: tuple[int, int]  # d_out × d_in'
    ones_scale: float | None = None  # the vector ones_scale · 1, or None
    vectors: Tensor | None = None  # (k, d_out, d_in')

    @property
    def size(self) -> int:
        """Number of basis vectors on this layer."""
        dense = 0 if self.vectors is None else int(self.vectors.shape[0])
        return dense + (0 if self.ones_scale is None else 1)

    @property
    def numel(self) -> int:
        """Number of parameters of the layer."""
        return self.shape[0] * self.shape[1]

    def dense(self, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """All basis vectors as one (size, d_out, d_in') tensor."""
        parts = []
        if self.ones_scale is not None:
            parts.append(torch.full((1, *self.shape), self.ones_scale, dtype=dtype, device=device))
        if self.vectors is not None:
            parts.append(self.vectors.to(dtype=dtype, device=device))
        if not parts:
            return torch.zeros((0, *self.shape), dtype=dtype, device=device)
        return torch.cat(parts)


# --------------------------------------------------------------------------- coarse bases


def nicolaides_basis(shape: tuple[int, int]) -> LayerBasis:
    """The all-ones vector of one layer (Nicolaides; not normalised)."""
    return LayerBasis(shape=shape, ones_scale=1.0)


def dense_basis(vectors: Tensor, *, with_ones: bool = False) -> LayerBasis:
    """A layer basis from dense vectors (k, d_out, d_in'), optionally after the all-ones vector."""
    shape = (int(vectors.shape[1]), int(vectors.shape[2]))
    return LayerBasis(shape=shape, ones_scale=1.0 if with_ones else None, vectors=vectors)


def _fix_sign(vectors: Tensor) -> Tensor:
    """Flip columns so each has a positive sum (or, if the sum is ~0, a positive largest entry)."""
    sums = vectors.sum(dim=0)
    peak = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    scale = vectors.abs().sum(dim=0).clamp_min(torch.finfo(vectors.dtype).tiny)
    key = torch.where(sums.abs() > 1e-6 * scale, sums, peak)
    return vectors * torch.where(key < 0, -1.0, 1.0).to(vectors.dtype)


def _reflect_first(space: Tensor, coords: Tensor) -> Tensor:
    """``space`` (orthonormal columns) times the Householder reflection H with H e1 = coords
    (a unit vector): orthonormal columns spanning the same space, the first ``space @ coords``.
    """
    v = coords.clone()
    v[0] -= 1.0
    vv = float(v @ v)
    if vv <= torch.finfo(v.dtype).eps:  # coords is already e1
        return space
    return space - (2.0 / vv) * (space @ v)[:, None] * v[None, :]


def aligned_eigenpairs(
    evals: Tensor, evecs: Tensor, *, rtol: float = EIGEN_TIE_RTOL
) -> tuple[Tensor, Tensor]:
    """Ascending eigenpairs with a deterministic basis of the smallest eigenspace.

    Tie-break: eigenvalues within rtol·max|λ| of the smallest form one eigenspace (a repeated
    smallest eigenvalue is common: A is rank-deficient). Its first vector is the normalised
    projection of the all-ones vector onto that eigenspace (basis-independent); the others
    complete it orthonormally by one Householder reflection of eigh's basis of the eigenspace
    (closed form: an SVD here failed to converge on a real 1001 × 625 factor eigenspace in
    float32). If 1 is orthogonal to the eigenspace, eigh's order is kept.
    Signs: every column gets a positive sum (or a positive largest entry when the sum is ~0).
    """
    order = torch.argsort(evals, stable=True)
    evals, evecs = evals[order], evecs[:, order]
    top = float(evals.abs().max()) if evals.numel() else 0.0
    count = int((evals <= evals[0] + rtol * max(top, torch.finfo(evals.dtype).tiny)).sum())
    if count > 1:
        space = evecs[:, :count]
        ones = torch.ones(space.shape[0], dtype=space.dtype, device=space.device)
        proj = space @ (space.T @ ones)
        norm = float(proj.norm())
        if norm > 1e-6 * float(ones.norm()):
            first = proj / norm
            rotated = _reflect_first(space, space.T @ first)
            rotated = torch.cat([first[:, None], rotated[:, 1:]], dim=1)
            evecs = torch.cat([rotated, evecs[:, count:]], dim=1)
    return evals, _fix_sign(evecs)


def spectral_basis(
    *, eig_a: tuple[Tensor, Tensor], eig_g: tuple[Tensor, Tensor], nbasis: int = 1
) -> LayerBasis:
    """Kronecker eigenvectors q_G q_A^T of one layer at the smallest factor eigenvalues.

    The first vector pairs the smallest eigenvectors of A and G (damping shifts the eigenvalues,
    not the eigenvectors), with the tie-break of `aligned_eigenpairs`. This is the intended
    q_G q_A^T, not the row-major reshape of kron(q_A, q_G) found in Koroko et al.'s code. Further
    vectors (nbasis > 1, a suite extension) follow the products d_G,k · d_A,l (eigenvalues
    clamped at 0) in increasing order, ties by (k + l, k).
    """
    if nbasis < 1:
        raise ValueError(f"nbasis: must be >= 1 for the spectral coarse space, got {nbasis}")
    d_a, q_a = aligned_eigenpairs(*eig_a)
    d_g, q_g = aligned_eigenpairs(*eig_g)
    ka, kg = min(nbasis, d_a.numel()), min(nbasis, d_g.numel())
    prod = d_g[:kg].clamp_min(0)[:, None] * d_a[:ka].clamp_min(0)[None, :]
    pairs = sorted(
        ((float(prod[k, m]), k + m, k, m) for k in range(kg) for m in range(ka)),
        key=lambda item: item[:3],
    )[:nbasis]
    vectors = torch.stack([torch.outer(q_g[:, k], q_a[:, m]) for *_, k, m in pairs])
    return dense_basis(vectors)


def enriched_basis(
    *, grad: Tensor, eig_a: tuple[Tensor, Tensor], eig_g: tuple[Tensor, Tensor], nbasis: int
) -> LayerBasis:
    """All-ones vector plus the nbasis − 1 K-FAC eigenvectors with the largest gradient projection.

    The eigenvectors are q_G,k q_A,l^T ranked by |q_G,k^T ∇W q_A,l|; ties keep the row-major (k, l)
    order (stable sort).
    """
    if nbasis < 1:
        raise ValueError(f"nbasis: must be >= 1 for the enriched coarse space, got {nbasis}")
    shape = (int(grad.shape[0]), int(grad.shape[1]))
    extra = min(nbasis - 1, grad.numel())
    if extra == 0:
        return nicolaides_basis(shape)
    q_a, q_g = eig_a[1].to(grad.dtype), eig_g[1].to(grad.dtype)
    coef = (q_g.T @ grad @ q_a).reshape(-1).abs()
    top = torch.argsort(coef, descending=True, stable=True)[:extra]
    rows, cols = top // shape[1], top % shape[1]
    vectors = q_g.T[rows][:, :, None] * q_a.T[cols][:, None, :]
    return LayerBasis(shape=shape, ones_scale=1.0, vectors=vectors)


def normalise_basis(basis: LayerBasis, norm: BasisNorm) -> LayerBasis:
    """Scale every vector of a layer basis to unit 2-norm or unit max-norm (zero vectors stay)."""
    if norm is BasisNorm.none:
        return basis
    ones_scale = basis.ones_scale
    if ones_scale is not None:
        ones_scale = 1.0 / basis.numel**0.5 if norm is BasisNorm.unit else 1.0
    vectors = basis.vectors
    if vectors is not None:
        flat = vectors.reshape(vectors.shape[0], -1)
        size = flat.norm(dim=1) if norm is BasisNorm.unit else flat.abs().amax(dim=1)
        size = torch.where(size > 0, size, torch.ones_like(size))
        vectors = vectors / size[:, None, None]
    return LayerBasis(shape=basis.shape, ones_scale=ones_scale, vectors=vectors)


# ------------------------------------------------------------- restriction and prolongation


def restrict(bases: Sequence[LayerBasis], mats: Sequence[Tensor]) -> Tensor:
    """R0 v: inner products of every basis vector with its layer's matrix, shape (m,)."""
    parts: list[Tensor] = []
    for basis, mat in zip(bases, mats, strict=True):
        if basis.ones_scale is not None:
            parts.append((basis.ones_scale * mat.sum()).reshape(1))
        if basis.vectors is not None:
            parts.append(torch.einsum("koi,oi->k", basis.vectors.to(mat.dtype), mat))
    return torch.cat(parts)


def prolong(bases: Sequence[LayerBasis], coeffs: Tensor, *, dense: bool = True) -> list[Tensor]:
    """R0^T c: per-layer matrices Σ_k c_k r_k.

    With ``dense=False`` a layer spanned by the all-ones vector alone gets a broadcastable
    (1, 1) tensor instead of a full matrix (no d_out × d_in' allocation).
    """
    out: list[Tensor] = []
    start = 0
    for basis in bases:
        if basis.vectors is None and basis.ones_scale is not None and not dense:
            out.append((basis.ones_scale * coeffs[start]).reshape(1, 1))
            start += 1
            continue
        mat = torch.zeros(basis.shape, dtype=coeffs.dtype, device=coeffs.device)
        if basis.ones_scale is not None:
            mat = mat + basis.ones_scale * coeffs[start]
            start += 1
        if basis.vectors is not None:
            k = int(basis.vectors.shape[0])
            mat = mat + torch.einsum("k,koi->oi", coeffs[start : start + k], basis.vectors)
            start += k
        out.append(mat)
    return out


def basis_gram(bases: Sequence[LayerBasis], *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """R0 R0^T: block diagonal (bases on different layers are orthogonal)."""
    blocks = []
    for basis in bases:
        if basis.vectors is None:
            scale = float(basis.ones_scale or 0.0)
            blocks.append(
                torch.full((1, 1), scale * scale * basis.numel, dtype=dtype, device=device)
            )
            continue
        flat = basis.dense(dtype=dtype, device=device).reshape(basis.size, -1)
        blocks.append(flat @ flat.T)
    return torch.block_diag(*blocks)


# ------------------------------------------------------------- Fisher-vector products


def per_example_projections(stats: Sequence[LayerStats], bases: Sequence[LayerBasis]) -> Tensor:
    """⟨r_k, ∇_i ℓ_n⟩ for every example n and basis vector k, shape (B, m).

    For one position ⟨R, g ā^T⟩ = g^T R ā; conv layers sum over positions.
    """
    cols: list[Tensor] = []
    for st, basis in zip(stats, bases, strict=True):
        if basis.ones_scale is not None:
            sums = (st.g.sum(dim=2) * st.a.sum(dim=2)).sum(dim=1)
            cols.append(basis.ones_scale * sums[:, None])
        if basis.vectors is not None:
            for vec in basis.vectors.to(st.g.dtype):
                cols.append(((st.g @ vec) * st.a).sum(dim=(1, 2))[:, None])
    return torch.cat(cols, dim=1)


def gradient_projections(stats: Sequence[LayerStats], mats: Sequence[Tensor]) -> Tensor:
    """⟨∇ℓ_n, v⟩ summed over layers for a vector v given as per-layer matrices, shape (B,)."""
    total: Tensor | None = None
    for st, mat in zip(stats, mats, strict=True):
        proj = ((st.g @ mat.to(st.g.dtype)) * st.a).sum(dim=(1, 2))
        total = proj if total is None else total + proj
    if total is None:
        raise ValueError("gradient_projections: no layers")
    return total


def fisher_vector_product(stats: Sequence[LayerStats], mats: Sequence[Tensor]) -> list[Tensor]:
    """F v with the mini-batch Fisher F = (1/B) Σ_n ∇ℓ_n ∇ℓ_n^T (undamped), per layer."""
    coef = gradient_projections(stats, mats)
    batch = coef.shape[0]
    out = []
    for st, mat in zip(stats, mats, strict=True):
        weighted = (st.g * (coef / batch)[:, None, None]).reshape(-1, st.g.shape[2])
        out.append((weighted.T @ st.a.reshape(-1, st.a.shape[2])).to(mat.dtype))
    return out


# ------------------------------------------------------------- coarse Fisher matrices


def _grid_indices(
    src: tuple[int, int],
    dst: tuple[int, int],
    device: torch.device,
    downsample: CoarseDownsample = CoarseDownsample.centre,
) -> Tensor:
    """Flat indices of the src positions sampled onto the dst grid.

    ``centre``: nearest-exact, source index ⌊(k + ½)·src/dst⌋; ``nearest``: torch's legacy
    'nearest' (the authors' F.interpolate default), ⌊k·src/dst⌋, the top-left sample of each cell.
    """
    if downsample is CoarseDownsample.nearest:
        rows = torch.arange(dst[0], device=device) * src[0] // dst[0]
        cols = torch.arange(dst[1], device=device) * src[1] // dst[1]
    else:
        rows = (2 * torch.arange(dst[0], device=device) + 1) * src[0] // (2 * dst[0])
        cols = (2 * torch.arange(dst[1], device=device) + 1) * src[1] // (2 * dst[1])
    return (rows[:, None] * src[1] + cols[None, :]).reshape(-1)


def _common_grid(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The grid two maps share: the smaller size along each axis."""
    return min(a[0], b[0]), min(a[1], b[1])


def kron_scale(
    stats: Sequence[LayerStats], downsample: CoarseDownsample = CoarseDownsample.centre
) -> Tensor:
    """Position factor c_ij of the cross-layer Kronecker blocks, L × L; c_ii = P_i either way.

    ``centre``: c_ij = max(P_i, P_j). With spatially uncorrelated statistics (KFC),
    Σ_p E[ā_p ā_p^T] ⊗ E[g_p g_p^T] ≈ P · Ā ⊗ Ḡ with position-averaged factors; between maps of
    different size every position of the larger map pairs with the one of the smaller map it
    falls into, so the sum has max(P_i, P_j) terms.

    ``nearest`` (authors' gkfac.py): their conv rows are ā/P_i and g·P_i (g per example, already
    ×B), and a cross block is rows_iᵀ rows_j / B over the Q = min(P_i, P_j) common positions, so
    the Ā_ij and G_ij blocks carry Q/(P_i P_j) and Q·P_i·P_j: c_ij = Q² for i ≠ j (also between
    two maps of equal size), while their diagonal blocks (the K-FAC factors) carry P_i.
    """
    counts = torch.tensor([float(st.positions) for st in stats], dtype=stats[0].a.dtype)
    if downsample is CoarseDownsample.nearest:
        scale = torch.minimum(counts[:, None], counts[None, :]) ** 2
        scale.diagonal().copy_(counts)
    else:
        scale = torch.maximum(counts[:, None], counts[None, :])
    return scale.to(stats[0].a.device)


def _group_by_grid(stats: Sequence[LayerStats]) -> dict[tuple[int, int], list[int]]:
    """Layer indices grouped by their spatial grid, in layer order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, st in enumerate(stats):
        groups.setdefault(st.grid, []).append(index)
    return groups


def nicolaides_moments(
    stats: Sequence[LayerStats], downsample: CoarseDownsample = CoarseDownsample.centre
) -> tuple[Tensor, Tensor]:
    """Position-averaged second moments of per-example sums, M^a_ij and M^g_ij (L × L each).

    M^a_ij = mean_{n,q} s^a_i s^a_j with s^a_i = 1^T ā_i at position q of the common grid (the
    larger map down-sampled to the smaller one by ``downsample``), M^g likewise with s^g = 1^T g.
    The kron Nicolaides coarse Fisher is kron_scale ⊙ M^a ⊙ M^g. Cost O(L·B·P·d) + O(L²·B·P).
    """
    sums_a = [st.a.sum(dim=2) for st in stats]
    sums_g = [st.g.sum(dim=2) for st in stats]
    size = len(stats)
    ref = stats[0].a
    moment_a = torch.zeros(size, size, dtype=ref.dtype, device=ref.device)
    moment_g = torch.zeros_like(moment_a)
    groups = list(_group_by_grid(stats).items())
    for gi, (grid_i, layers_i) in enumerate(groups):
        for grid_j, layers_j in groups[gi:]:
            common = _common_grid(grid_i, grid_j)
            idx_i = _grid_indices(grid_i, common, ref.device, downsample)
            idx_j = _grid_indices(grid_j, common, ref.device, downsample)
            rows, cols = torch.tensor(layers_i), torch.tensor(layers_j)
            for sums, moment in ((sums_a, moment_a), (sums_g, moment_g)):
                left = torch.stack([sums[i][:, idx_i] for i in layers_i], dim=2).flatten(0, 1)
                right = torch.stack([sums[j][:, idx_j] for j in layers_j], dim=2).flatten(0, 1)
                block = left.T @ right / left.shape[0]
                moment[rows[:, None], cols[None, :]] = block
                moment[cols[:, None], rows[None, :]] = block.T
    return moment_a, moment_g


def ones_scales(bases: Sequence[LayerBasis], *, dtype: torch.dtype) -> Tensor:
    """The all-ones scale of each layer's (pure Nicolaides) basis, shape (L,)."""
    if any(b.vectors is not None or b.ones_scale is None for b in bases):
        raise ValueError("ones_scales: every layer basis must be a single all-ones vector")
    return torch.tensor([float(b.ones_scale or 0.0) for b in bases], dtype=dtype)


def kron_nicolaides_fisher(
    moment_a: Tensor, moment_g: Tensor, scale: Tensor, scales: Tensor
) -> Tensor:
    """kron coarse Fisher for all-ones bases from (running) moments: c ⊙ M^a ⊙ M^g ⊙ s s^T."""
    scales = scales.to(moment_a)
    return scale.to(moment_a) * moment_a * moment_g * torch.outer(scales, scales)


def _pair_rows(
    st: LayerStats, grid: tuple[int, int], downsample: CoarseDownsample
) -> tuple[Tensor, Tensor]:
    """A layer's (ā, g) rows on a grid: (B·Q, d_in') and (B·Q, d_out)."""
    if grid == st.grid:
        return st.a.flatten(0, 1), st.g.flatten(0, 1)
    idx = _grid_indices(st.grid, grid, st.a.device, downsample)
    return st.a[:, idx].flatten(0, 1), st.g[:, idx].flatten(0, 1)


def kron_coarse_fisher(
    stats: Sequence[LayerStats],
    bases: Sequence[LayerBasis],
    downsample: CoarseDownsample = CoarseDownsample.centre,
) -> Tensor:
    """kron coarse Fisher (F_c)_{(i,k),(j,l)} = c_ij ⟨R_ik, G_ij R_jl Ā_ij^T⟩, m × m.

    F_ij ≈ Ā_ij ⊗ G_ij with Ā_ij = mean_{n,q} ā_i ā_j^T, G_ij = mean_{n,q} g_i g_j^T over the common
    grid, and c_ij = `kron_scale`; (Ā ⊗ G) vec(X) = vec(G X Ā^T) for column-major vec. Evaluated
    as c_ij/N Σ_n (g_i,n^T R_ik) Ā_ij (R_jl^T g_j,n) with N = B·Q rows. Pure all-ones bases take
    the O(L·B) moment route. General bases cost O(B·Q·d_i·d_j) per layer pair.
    """
    ref = stats[0].a
    if all(b.vectors is None and b.ones_scale is not None for b in bases):
        moment_a, moment_g = nicolaides_moments(stats, downsample)
        return kron_nicolaides_fisher(
            moment_a, moment_g, kron_scale(stats, downsample), ones_scales(bases, dtype=ref.dtype)
        )
    dense = [b.dense(dtype=ref.dtype, device=ref.device) for b in bases]
    offsets = [0]
    for basis in bases:
        offsets.append(offsets[-1] + basis.size)
    out = torch.zeros(offsets[-1], offsets[-1], dtype=ref.dtype, device=ref.device)
    scale = kron_scale(stats, downsample)
    for i, st_i in enumerate(stats):
        for j in range(i, len(stats)):
            st_j = stats[j]
            if dense[i].shape[0] == 0 or dense[j].shape[0] == 0:
                continue
            grid = _common_grid(st_i.grid, st_j.grid)
            a_i, g_i = _pair_rows(st_i, grid, downsample)
            a_j, g_j = _pair_rows(st_j, grid, downsample)
            rows = a_i.shape[0]
            cross_a = a_i.T @ a_j / rows  # Ā_ij, d_in_i × d_in_j
            u_i = torch.einsum("no,koi->kni", g_i, dense[i])  # g_i^T R_ik per row
            u_j = torch.einsum("no,koi->kni", g_j, dense[j])
            block = torch.einsum("kni,lni->kl", u_i, u_j @ cross_a.T) * (scale[i, j] / rows)
            out[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = block
            out[offsets[j] : offsets[j + 1], offsets[i] : offsets[i + 1]] = block.T
    return out


def accumulate_coarse(total_offdiag: Tensor | None, fresh: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' paper-time in-place refresh of the coarse matrix; returns (used F_c, sum).

    Their gkfac.py allocates F_c once, then on each refresh writes the lower triangle, sets
    F ← F + Fᵀ and rewrites the diagonal. The upper triangle still holds the previous (summed)
    off-diagonals, so after k refreshes every off-diagonal entry is the sum of the k fresh
    values while the diagonal is the current one. ``total_offdiag`` is that running sum
    (zero diagonal; None before the first refresh).
    """
    off = fresh - torch.diag_embed(fresh.diagonal())
    total = off if total_offdiag is None else total_offdiag + off
    return total + torch.diag_embed(fresh.diagonal()), total


def exact_coarse_fisher(projections: Tensor) -> Tensor:
    """Exact mini-batch coarse Fisher (1/B) Σ_n p_n p_n^T from per-example projections (B, m)."""
    return projections.T @ projections / projections.shape[0]


def coarse_fisher(
    kind: CoarseFisher,
    stats: Sequence[LayerStats],
    bases: Sequence[LayerBasis],
    downsample: CoarseDownsample = CoarseDownsample.centre,
) -> Tensor:
    """The coarse Fisher of one statistics batch for the given bases (``downsample``: kron only)."""
    if kind is CoarseFisher.kron:
        return kron_coarse_fisher(stats, bases, downsample)
    return exact_coarse_fisher(per_example_projections(stats, bases))


def coarse_damping(
    kind: CoarseDamping,
    bases: Sequence[LayerBasis],
    damping: float,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """D_c: λ I_m (diagonal) or λ R0 R0^T (projected)."""
    size = sum(b.size for b in bases)
    if kind is CoarseDamping.diagonal:
        return damping * torch.eye(size, dtype=dtype, device=device)
    return damping * basis_gram(bases, dtype=dtype, device=device)


# ------------------------------------------------------------------- coarse solve


@dataclass(frozen=True)
class CoarseSolver:
    """Eigen-factorised coarse matrix C = psd(F_c) + D_c (float64): solves and conditioning."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    pseudo_inverse: Tensor  # C^+ (m × m): eigenvalues under COARSE_PINV_RTOL·max count as 0

    @classmethod
    def from_eigen(cls, eigenvalues: Tensor, eigenvectors: Tensor) -> CoarseSolver:
        """A solver from the eigenpairs of C; its pseudo-inverse is formed once here."""
        vals = eigenvalues
        cutoff = COARSE_PINV_RTOL * vals.abs().max().clamp_min(torch.finfo(vals.dtype).tiny)
        keep = vals > cutoff
        inv = torch.where(keep, 1.0 / torch.where(keep, vals, torch.ones_like(vals)), 0.0)
        pinv = (eigenvectors * inv) @ eigenvectors.T
        return cls(eigenvalues=vals, eigenvectors=eigenvectors, pseudo_inverse=pinv)

    def solve(self, rhs: Tensor) -> Tensor:
        """C^+ rhs for a vector or a matrix of columns."""
        return (self.pseudo_inverse @ rhs.to(self.pseudo_inverse.dtype)).to(rhs.dtype)

    def matrix(self) -> Tensor:
        """The dense coarse matrix C."""
        vecs = self.eigenvectors
        return (vecs * self.eigenvalues) @ vecs.T

    def condition_number(self) -> float:
        """λ_max(C) / λ_min(C) (inf when C is singular)."""
        low = float(self.eigenvalues.min())
        return float(self.eigenvalues.max()) / low if low > 0 else float("inf")


def psd_part(mat: Tensor) -> Tensor:
    """Symmetric positive semi-definite part of a square matrix: negative eigenvalues clipped.

    A no-op up to round-off unless the kron coarse Fisher mixes maps of different spatial size,
    the only case where it can be indefinite.
    """
    sym = 0.5 * (mat + mat.T)
    vals, vecs = torch.linalg.eigh(sym)
    return (vecs * vals.clamp_min(0)) @ vecs.T


def factor_coarse(fisher: Tensor, damping: Tensor) -> CoarseSolver:
    """Factor C = psd(F_c) + D_c in float64."""
    mat = psd_part(fisher.double()) + 0.5 * (damping.double() + damping.double().T)
    vals, vecs = torch.linalg.eigh(0.5 * (mat + mat.T))
    return CoarseSolver.from_eigen(vals, vecs)
