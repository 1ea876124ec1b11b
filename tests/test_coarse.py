"""Coarse spaces and coarse Fisher matrices (optimizers/coarse.py) against dense float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.coarse import (
    BasisNorm,
    CoarseDamping,
    CoarseDownsample,
    CoarseFisher,
    LayerBasis,
    LayerStats,
    accumulate_coarse,
    aligned_eigenpairs,
    coarse_damping,
    coarse_fisher,
    dense_basis,
    enriched_basis,
    factor_coarse,
    fisher_vector_product,
    kron_nicolaides_fisher,
    kron_scale,
    nicolaides_basis,
    nicolaides_moments,
    normalise_basis,
    per_example_projections,
    prolong,
    restrict,
    spectral_basis,
)
from tests.test_coarse_support import (
    capture_stats,
    dense_restriction,
    explicit_kron_fisher,
    flat,
    grid_index_reference,
    make_batch,
    make_net,
    per_example_jacobian,
    unflat,
)

BATCH = 5


@pytest.fixture(scope="module")
def setup() -> tuple[list[LayerStats], Tensor]:
    """Captured statistics and autograd per-example gradients (B, N) of the tiny network."""
    net = make_net()
    x, y = make_batch(BATCH)
    return capture_stats(net, x, y), per_example_jacobian(net, x, y)


def random_bases(stats: list[LayerStats], *, seed: int, ones: bool) -> list[LayerBasis]:
    """Random dense bases (1–2 vectors per layer), optionally after an all-ones vector."""
    gen = torch.Generator().manual_seed(seed)
    bases = []
    for index, st in enumerate(stats):
        k = 1 + index % 2
        vecs = torch.randn(k, *st.shape, generator=gen, dtype=torch.float64)
        bases.append(dense_basis(vecs, with_ones=ones))
    return bases


def bases_of_kind(stats: list[LayerStats], kind: str, *, seed: int) -> list[LayerBasis]:
    """All-ones ("nicolaides"), random dense ("dense") or all-ones plus dense ("mixed") bases."""
    if kind == "nicolaides":
        return [nicolaides_basis(st.shape) for st in stats]
    return random_bases(stats, seed=seed, ones=kind == "mixed")


def test_stats_reproduce_autograd_per_example_gradients(setup: tuple) -> None:
    stats, jac = setup
    mine = torch.cat([torch.einsum("bpo,bpi->boi", st.g, st.a).flatten(1) for st in stats], dim=1)
    torch.testing.assert_close(mine, jac)


def test_fisher_vector_product_matches_dense_fisher(setup: tuple) -> None:
    stats, jac = setup
    fisher = jac.T @ jac / jac.shape[0]
    vec = torch.randn(jac.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    shapes = [st.shape for st in stats]
    out = flat(fisher_vector_product(stats, unflat(vec, shapes)))
    torch.testing.assert_close(out, fisher @ vec)


@pytest.mark.parametrize("ones", [True, False])
def test_restrict_prolong_projections_match_dense_r0(setup: tuple, ones: bool) -> None:
    stats, jac = setup
    bases = random_bases(stats, seed=4, ones=ones)
    r0 = dense_restriction(bases)
    vec = torch.randn(jac.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    coeffs = torch.randn(r0.shape[0], dtype=torch.float64)
    shapes = [st.shape for st in stats]
    torch.testing.assert_close(restrict(bases, unflat(vec, shapes)), r0 @ vec)
    torch.testing.assert_close(flat(prolong(bases, coeffs)), r0.T @ coeffs)
    torch.testing.assert_close(per_example_projections(stats, bases), jac @ r0.T)


@pytest.mark.parametrize("kind", ["nicolaides", "dense", "mixed"])
def test_exact_coarse_fisher_is_projected_fisher(setup: tuple, kind: str) -> None:
    stats, jac = setup
    bases = bases_of_kind(stats, kind, seed=6)
    r0 = dense_restriction(bases)
    fisher = jac.T @ jac / jac.shape[0]
    torch.testing.assert_close(coarse_fisher(CoarseFisher.exact, stats, bases), r0 @ fisher @ r0.T)


def test_grid_downsampling_is_nearest_exact() -> None:
    from optimizers.coarse import _grid_indices

    for src, dst in [((3, 3), (2, 2)), ((7, 5), (3, 2)), ((4, 4), (1, 1)), ((2, 3), (2, 3))]:
        mine = _grid_indices(src, dst, torch.device("cpu"))
        torch.testing.assert_close(mine, grid_index_reference(src, dst))


def test_grid_downsampling_nearest_is_torch_nearest() -> None:
    from optimizers.coarse import _grid_indices

    sizes = [(s, d) for s in range(1, 17) for d in range(1, s + 1)]
    for (src, dst), other in zip(sizes, reversed(sizes), strict=True):
        shape_src, shape_dst = (src, other[0]), (dst, other[1])
        index = torch.arange(src * other[0], dtype=torch.float64).reshape(1, 1, *shape_src)
        expected = F.interpolate(index, size=shape_dst, mode="nearest").reshape(-1).long()
        mine = _grid_indices(shape_src, shape_dst, torch.device("cpu"), CoarseDownsample.nearest)
        torch.testing.assert_close(mine, expected)


def authors_rows(st: LayerStats) -> tuple[Tensor, Tensor]:
    """The rows (B, h, w, d) the authors' kfac_utils hooks keep: ā / P and g · P (g already ×B)."""
    shape = (st.a.shape[0], *st.grid)
    return (st.a / st.positions).reshape(*shape, -1), (st.g * st.positions).reshape(*shape, -1)


def authors_cross(left: Tensor, right: Tensor) -> Tensor:
    """Their cross block: the larger map interpolated (nearest) to the smaller; rowsᵀ rows / B."""
    batch = left.shape[0]

    def down(rows: Tensor, size: tuple[int, int]) -> Tensor:
        if rows.shape[1:3] == size:
            return rows.reshape(-1, rows.shape[-1])
        maps = F.interpolate(rows.permute(0, 3, 1, 2), size=size, mode="nearest")
        return maps.permute(0, 2, 3, 1).reshape(-1, rows.shape[-1])

    size = (min(left.shape[1], right.shape[1]), min(left.shape[2], right.shape[2]))
    return down(left, size).T @ down(right, size) / batch


def authors_kron_fisher(stats: list[LayerStats]) -> Tensor:
    """Full cross-layer Fisher G_ij ⊗ A_ij (row-major vec) with the authors' gkfac.py blocks.

    Diagonal blocks are their K-FAC factors A = rowsᵀ rows / B, G = rowsᵀ rows / (B·P); cross
    blocks come from `authors_cross` (independent of the suite's kron_scale and grid indices).
    """
    rows = [authors_rows(st) for st in stats]
    out = []
    for i, (a_i, g_i) in enumerate(rows):
        line = []
        for j, (a_j, g_j) in enumerate(rows):
            cross_a, cross_g = authors_cross(a_i, a_j), authors_cross(g_i, g_j)
            if i == j:
                cross_g = cross_g / stats[i].positions
            line.append(torch.kron(cross_g, cross_a))
        out.append(torch.cat(line, dim=1))
    return torch.cat(out, dim=0)


@pytest.mark.parametrize("kind", ["nicolaides", "dense", "mixed"])
def test_kron_nearest_equals_authors_blocks(setup: tuple, kind: str) -> None:
    stats, _ = setup
    bases = bases_of_kind(stats, kind, seed=8)
    r0 = dense_restriction(bases)
    expected = r0 @ authors_kron_fisher(stats) @ r0.T
    mine = coarse_fisher(CoarseFisher.kron, stats, bases, CoarseDownsample.nearest)
    torch.testing.assert_close(mine, expected)
    if kind == "nicolaides":  # the O(L·B) route through the moments agrees
        moments = nicolaides_moments(stats, CoarseDownsample.nearest)
        scale = kron_scale(stats, CoarseDownsample.nearest)
        ones = torch.ones(len(stats), dtype=torch.float64)
        torch.testing.assert_close(kron_nicolaides_fisher(*moments, scale, ones), expected)
        centre = coarse_fisher(CoarseFisher.kron, stats, bases)
        assert not torch.allclose(centre, expected)  # the two settings differ on this network
        torch.testing.assert_close(centre.diagonal(), expected.diagonal())  # K-FAC's blocks


def authors_in_place_refreshes(fresh: list[Tensor]) -> list[Tensor]:
    """Replays gkfac.py@74b6c7d `_update_coarse_fisher_inv` (before damping) on fresh F_c's."""
    size = fresh[0].shape[0]
    mat = torch.zeros(size, size, dtype=fresh[0].dtype)
    used = []
    for new in fresh:
        for i in range(size):
            for j in range(i):
                mat[i, j] = new[i, j]  # lower triangle rewritten
        mat = mat + mat.T  # upper triangle still holds the previous sum
        for i in range(size):
            mat[i, i] = new[i, i]  # diagonal rewritten
        used.append(mat.clone())
    return used


def test_accumulate_coarse_replays_the_authors_in_place_update() -> None:
    gen = torch.Generator().manual_seed(9)
    fresh = []
    for _ in range(4):
        half = torch.randn(5, 5, generator=gen, dtype=torch.float64)
        fresh.append(half @ half.T)
    total = None
    for k, expected in enumerate(authors_in_place_refreshes(fresh)):
        used, total = accumulate_coarse(total, fresh[k])
        torch.testing.assert_close(used, expected)
        offdiag = sum(f - torch.diag_embed(f.diagonal()) for f in fresh[: k + 1])
        torch.testing.assert_close(used, offdiag + torch.diag_embed(fresh[k].diagonal()))


def test_kron_nicolaides_from_sums_equals_explicit_blocks(setup: tuple) -> None:
    stats, _ = setup
    bases = [nicolaides_basis(st.shape) for st in stats]
    r0 = dense_restriction(bases)
    explicit = r0 @ explicit_kron_fisher(stats) @ r0.T  # 1^T (Ā_ij ⊗ G_ij) 1, scaled
    moment_a, moment_g = nicolaides_moments(stats)
    scales = torch.ones(len(stats), dtype=torch.float64)
    cheap = kron_nicolaides_fisher(moment_a, moment_g, kron_scale(stats), scales)
    torch.testing.assert_close(cheap, explicit)
    torch.testing.assert_close(coarse_fisher(CoarseFisher.kron, stats, bases), explicit)


@pytest.mark.parametrize("ones", [True, False])
def test_kron_general_bases_equal_explicit_blocks(setup: tuple, ones: bool) -> None:
    stats, _ = setup
    bases = [normalise_basis(b, BasisNorm.unit) for b in random_bases(stats, seed=7, ones=ones)]
    r0 = dense_restriction(bases)
    explicit = r0 @ explicit_kron_fisher(stats) @ r0.T
    torch.testing.assert_close(coarse_fisher(CoarseFisher.kron, stats, bases), explicit)


def test_kron_diagonal_block_is_kfc_factor_product(setup: tuple) -> None:
    stats, _ = setup
    st = stats[0]  # conv with 9 positions: P · mean_p(ā ā^T) ⊗ mean_p(g g^T)
    rows_a, rows_g = st.a.flatten(0, 1), st.g.flatten(0, 1)
    factor_a, factor_g = rows_a.T @ rows_a / len(rows_a), rows_g.T @ rows_g / len(rows_g)
    expected = st.positions * factor_a.sum() * factor_g.sum()
    got = coarse_fisher(CoarseFisher.kron, stats, [nicolaides_basis(s.shape) for s in stats])
    torch.testing.assert_close(got[0, 0], expected)


def test_kron_and_exact_agree_for_one_example_and_differ_for_a_batch() -> None:
    net = make_net()
    for batch, agree in ((1, True), (6, False)):
        x, y = make_batch(batch)
        stats = capture_stats(net, x, y)[2:]  # the Linear layers (one position)
        bases = [nicolaides_basis(st.shape) for st in stats]
        kron = coarse_fisher(CoarseFisher.kron, stats, bases)
        exact = coarse_fisher(CoarseFisher.exact, stats, bases)
        assert torch.allclose(kron, exact) == agree


def test_spectral_vector_is_smallest_kronecker_eigenvector() -> None:
    gen = torch.Generator().manual_seed(8)
    xa = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    xg = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    fa, fg = xa.T @ xa / 20, xg.T @ xg / 20
    basis = spectral_basis(eig_a=torch.linalg.eigh(fa), eig_g=torch.linalg.eigh(fg))
    assert basis.vectors is not None and basis.size == 1
    vec = basis.vectors[0].reshape(-1)
    kron = torch.kron(fg, fa)  # row-major vec of G X A
    lowest = torch.linalg.eigvalsh(kron)[0]
    torch.testing.assert_close(kron @ vec, lowest * vec)
    torch.testing.assert_close(vec.norm(), torch.tensor(1.0, dtype=torch.float64))


def test_spectral_tie_break_is_basis_independent() -> None:
    gen = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    evals = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)  # rank-deficient A
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q_other = torch.cat([q[:, :3] @ rot, q[:, 3:]], dim=1)  # another eigenbasis of the same A
    _, first = aligned_eigenpairs(evals, q)
    _, second = aligned_eigenpairs(evals, q_other)
    torch.testing.assert_close(first[:, 0], second[:, 0])
    ones = torch.ones(6, dtype=torch.float64)
    proj = q[:, :3] @ (q[:, :3].T @ ones)
    torch.testing.assert_close(first[:, 0], proj / proj.norm())  # projection of 1
    torch.testing.assert_close(first.T @ first, torch.eye(6, dtype=torch.float64))
    fa = (q * evals) @ q.T
    torch.testing.assert_close(fa @ first[:, :3], torch.zeros(6, 3, dtype=torch.float64))


def test_spectral_tie_break_needs_no_iterative_decomposition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LAPACK's SVD failed to converge on a real 1001 × 625 tied eigenspace of a G factor in
    float32 (a kfac2_spectral run stopped with LinAlgError): the completion of the tie-broken
    basis is closed-form, so it holds with every SVD failing, at that size and in float32."""

    def no_svd(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    gen = torch.Generator().manual_seed(3)
    n, tied = 1001, 625
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.cat([torch.full((tied,), 1e-3), torch.linspace(1.0, 2.0, n - tied)])
    evals32, q32 = evals.float(), q.float()
    _, basis = aligned_eigenpairs(evals32, q32)
    space = q[:, :tied]
    ones = torch.ones(n, dtype=torch.float64)
    proj = space @ (space.T @ ones)
    first = basis[:, :tied].double()
    torch.testing.assert_close(first[:, 0], proj / proj.norm(), atol=1e-5, rtol=0)
    gram = first.T @ first  # orthonormal ...
    torch.testing.assert_close(gram, torch.eye(tied, dtype=torch.float64), atol=1e-4, rtol=0)
    inside = space.T @ first  # ... and spanning the tied eigenspace: no component outside it
    torch.testing.assert_close(
        (first - space @ inside).norm(dim=0),
        torch.zeros(tied, dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )


def test_spectral_nbasis_orders_by_eigenvalue_product() -> None:
    da = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    dg = torch.tensor([5.0, 0.5], dtype=torch.float64)
    qa, qg = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    basis = spectral_basis(eig_a=(da, qa), eig_g=(dg, qg), nbasis=3)
    assert basis.vectors is not None
    # products in increasing order: 0.5·1, 0.5·2, 0.5·3 → all with the G eigenvector 1
    picked = [tuple(int(i) for i in torch.nonzero(v.abs() > 0.5)[0]) for v in basis.vectors]
    assert picked == [(1, 1), (1, 2), (1, 0)]


def test_enriched_picks_largest_gradient_projections() -> None:
    gen = torch.Generator().manual_seed(10)
    qa, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    qg, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    grad = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    da, dg = torch.rand(4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    basis = enriched_basis(grad=grad, eig_a=(da, qa), eig_g=(dg, qg), nbasis=4)
    assert basis.ones_scale == 1.0 and basis.vectors is not None and basis.size == 4
    coef = {(k, m): float((qg[:, k] @ grad @ qa[:, m]).abs()) for k in range(3) for m in range(4)}
    best = sorted(coef, key=lambda km: -coef[km])[:3]
    expected = torch.stack([torch.outer(qg[:, k], qa[:, m]) for k, m in best])
    torch.testing.assert_close(basis.vectors, expected)


@pytest.mark.parametrize("norm", list(BasisNorm))
def test_normalise_basis(norm: BasisNorm) -> None:
    vecs = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    basis = normalise_basis(dense_basis(vecs, with_ones=True), norm)
    rows = basis.dense(dtype=torch.float64, device=torch.device("cpu")).flatten(1)
    if norm is BasisNorm.none:
        torch.testing.assert_close(rows[1:], vecs.flatten(1))
        assert basis.ones_scale == 1.0
        return
    size = rows.norm(dim=1) if norm is BasisNorm.unit else rows.abs().amax(dim=1)
    torch.testing.assert_close(size, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rows[1:] / rows[1:, :1], vecs.flatten(1) / vecs.flatten(1)[:, :1])


@pytest.mark.parametrize("kind", list(CoarseDamping))
def test_coarse_damping_matrix(setup: tuple, kind: CoarseDamping) -> None:
    stats, _ = setup
    bases = random_bases(stats, seed=12, ones=True)
    r0 = dense_restriction(bases)
    got = coarse_damping(kind, bases, 0.3, dtype=torch.float64, device=torch.device("cpu"))
    expected = 0.3 * (
        torch.eye(r0.shape[0], dtype=torch.float64) if kind is CoarseDamping.diagonal else r0 @ r0.T
    )
    torch.testing.assert_close(got, expected)
    nicol = [nicolaides_basis(st.shape) for st in stats]
    got = coarse_damping(kind, nicol, 0.3, dtype=torch.float64, device=torch.device("cpu"))
    sizes = torch.tensor([float(st.shape[0] * st.shape[1]) for st in stats], dtype=torch.float64)
    diag = sizes if kind is CoarseDamping.projected else torch.ones_like(sizes)
    torch.testing.assert_close(got, 0.3 * torch.diag(diag))  # Koroko: λ N_i for ones


def test_factor_coarse_solves_and_clips_indefinite_part() -> None:
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    fisher, damping = x.T @ x, 0.1 * torch.eye(4, dtype=torch.float64)
    solver = factor_coarse(fisher, damping)
    rhs = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(solver.solve(rhs), torch.linalg.solve(fisher + damping, rhs))
    cond = torch.linalg.cond(fisher + damping)
    assert solver.condition_number() == pytest.approx(float(cond), rel=1e-8)
    indefinite = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    clipped = factor_coarse(indefinite, 0.5 * torch.eye(2, dtype=torch.float64)).matrix()
    torch.testing.assert_close(clipped, torch.diag(torch.tensor([2.5, 0.5], dtype=torch.float64)))


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="nbasis"):
        spectral_basis(
            eig_a=(torch.ones(2), torch.eye(2)), eig_g=(torch.ones(2), torch.eye(2)), nbasis=0
        )
    with pytest.raises(ValueError, match="grid"):
        LayerStats(a=torch.zeros(2, 4, 3), g=torch.zeros(2, 4, 1), grid=(3, 3))
