"""Two-level K-FAC (optimizers/twolevel.py) against dense float64 formulas on a tiny network.

The network has two Conv2d layers (3×3 and 2×2 output maps), two Linear layers and a BatchNorm
whose parameters are not preconditioned. Dense references use autograd per-example gradients for
F, the blocks' own factors for K, and explicit R0 matrices built from each coarse space's formula.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.testing import assert_close

from core.likelihood import Likelihood
from optimizers.coarse import (
    BasisNorm,
    CoarseDamping,
    CoarseDownsample,
    CoarseFisher,
    CoarseRefresh,
    CoarseSpace,
)
from optimizers.kfac import KFAC
from optimizers.twolevel import (
    Combination,
    TwoLevelKFAC,
    TwoLevelKFACConfig,
    build_kfac2,
)
from tests.dense_fisher import protocol_step as dense_protocol_step
from tests.test_coarse_support import (
    capture_stats,
    dense_restriction,
    explicit_kron_fisher,
    flat,
    make_batch,
    make_net,
    per_example_jacobian,
    unflat,
)

D = torch.float64
BATCH = 5
LAMBDA = 0.05
OMEGA = (0.7, 1.3)
ROOT = Path(__file__).resolve().parents[1]


def protocol_step(opt: KFAC, net: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One step of the plain-loop protocol with the Gaussian likelihood."""
    return dense_protocol_step(opt, net, x, y, Likelihood.gaussian)


def prepared(**settings: object) -> tuple[TwoLevelKFAC, torch.nn.Module, Tensor, Tensor]:
    """An optimizer after one statistics + inverse step with lr 0 (parameters unchanged)."""
    net = make_net()
    x, y = make_batch(BATCH)
    kwargs: dict[str, object] = {
        "lr": 0.0,
        "momentum": 0.0,
        "kl_clip": None,
        "damping": LAMBDA,
        "cov_period": 1,
        "inv_period": 1,
        "fisher": "empirical",
        "omega1": OMEGA[0],
        "omega2": OMEGA[1],
    }
    kwargs.update(settings)
    opt = TwoLevelKFAC(net, **kwargs)  # type: ignore[arg-type]
    protocol_step(opt, net, x, y)
    return opt, net, x, y


# ------------------------------------------------------------------------- dense references


def dense_kinv(opt: TwoLevelKFAC) -> list[Tensor]:
    """Per-layer (G ⊗ A + λI)^-1 in row-major vec (eigen-mode K-FAC) from the blocks' factors."""
    out = []
    for block in opt.blocks:
        kron = torch.kron(block.G, block.A)
        out.append(torch.linalg.inv(kron + opt.damping * torch.eye(kron.shape[0], dtype=D)))
    return out


def normalised(vec: Tensor, norm: BasisNorm) -> Tensor:
    """A basis vector scaled as `basis_norm` says."""
    if norm is BasisNorm.unit:
        return vec / vec.norm()
    if norm is BasisNorm.max:
        return vec / vec.abs().max()
    return vec


def dense_r0(
    opt: TwoLevelKFAC, grad: Tensor, fisher: Tensor, kinv: list[Tensor], norm: BasisNorm
) -> Tensor:
    """Explicit R0 (m × N) from each coarse space's defining formula."""
    sizes = [b.shape[0] * b.shape[1] for b in opt.blocks]
    bounds = list(itertools.accumulate([0, *sizes]))
    kinv_full = torch.block_diag(*kinv)
    residual = grad - (fisher + opt.damping * torch.eye(len(grad), dtype=D)) @ kinv_full @ grad
    space, rows = opt.coarse_space, []
    for i, block in enumerate(opt.blocks):
        lo, hi = bounds[i], bounds[i + 1]
        ones = torch.ones(sizes[i], dtype=D)
        if space is CoarseSpace.nicolaides:
            vecs = [ones]
        elif space is CoarseSpace.krylov_nicolaides:
            vecs = [ones, kinv[i] @ ones]
        elif space is CoarseSpace.residual:
            vecs = [kinv[i] @ residual[lo:hi]]
        elif space is CoarseSpace.krylov_residual:
            r = kinv[i] @ residual[lo:hi]
            vecs = [r, kinv[i] @ r]
        elif space is CoarseSpace.enriched:
            eig = torch.kron(block.Q_G, block.Q_A)  # columns: vec_r(q_G,k q_A,l^T)
            coef = (eig.T @ grad[lo:hi]).abs()
            top = torch.argsort(coef, descending=True, stable=True)[: opt.nbasis - 1]
            vecs = [ones, *[eig[:, k] for k in top]]
        else:  # spectral: the optimizer's vectors, checked against their defining property
            assert opt._operator is not None
            kron = torch.kron(block.G, block.A)
            lowest = torch.linalg.eigvalsh(kron)[0]
            basis = opt._operator.bases[i]
            assert basis.vectors is not None
            vecs = []
            for k, v in enumerate(basis.vectors):
                v = v.reshape(-1) / v.norm()
                value = v @ kron @ v  # a Kronecker eigenvector; the first at the lowest
                assert_close(kron @ v, value * v, atol=1e-10, rtol=1e-8)
                if k == 0:
                    assert_close(value, lowest, atol=1e-12, rtol=1e-8)
                vecs.append(v)
        for v in vecs:
            row = torch.zeros(bounds[-1], dtype=D)
            row[lo:hi] = normalised(v, norm)
            rows.append(row)
    return torch.stack(rows)


def psd(mat: Tensor) -> Tensor:
    """Symmetric PSD part (negative eigenvalues clipped)."""
    vals, vecs = torch.linalg.eigh(0.5 * (mat + mat.T))
    return (vecs * vals.clamp_min(0)) @ vecs.T


def dense_update(opt: TwoLevelKFAC, net: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """P^-1 g from explicit matrices: K^-1, F, R0, F_c, D_c, Q and the combination formula."""
    jac = per_example_jacobian(net, x, y)
    fisher = jac.T @ jac / jac.shape[0]
    size = fisher.shape[0]
    eye = torch.eye(size, dtype=D)
    grad = jac.mean(dim=0)  # gradient of the batch-mean loss
    kinv = dense_kinv(opt)
    kinv_full = torch.block_diag(*kinv)
    r0 = dense_r0(opt, grad, fisher, kinv, opt.basis_norm)
    if opt.coarse_fisher is CoarseFisher.exact:
        coarse = r0 @ fisher @ r0.T
    else:
        coarse = r0 @ explicit_kron_fisher(capture_stats(net, x, y)) @ r0.T
    if opt.coarse_damping is CoarseDamping.diagonal:
        damp = opt.damping * torch.eye(r0.shape[0], dtype=D)
    else:
        damp = opt.damping * r0 @ r0.T
    q = opt.omega2 * r0.T @ torch.linalg.inv(psd(coarse) + damp) @ r0
    f_lam = fisher + opt.damping * eye
    fine = opt.omega1 * kinv_full
    if opt.combination is Combination.additive:
        prec = fine + q
    elif opt.combination is Combination.deflated:
        prec = (eye - q @ f_lam) @ fine + q
    else:
        prec = (eye - q @ f_lam) @ fine @ (eye - f_lam @ q) + q
    return prec @ grad


def current_update(opt: TwoLevelKFAC) -> Tensor:
    """The optimizer's update for the gradients it holds, flattened."""
    return flat(opt.precondition([b.grad_matrix() for b in opt.blocks]))


def test_latest_statistics_are_kept_for_the_coarse_level() -> None:
    """Plain K-FAC releases (ā, g) after folding them in; the two-level step still reads them."""
    opt, net, x, y = prepared(cov_period=2)
    captured = [(b.a, b.g) for b in opt.blocks]
    assert all(a is not None and g is not None for a, g in captured)
    protocol_step(opt, net, x, y)  # not a statistics step: the same tensors are used
    assert all(b.a is a and b.g is g for b, (a, g) in zip(opt.blocks, captured, strict=True))


# ------------------------------------------------------------------------- dense formulas


@pytest.mark.parametrize("combination", list(Combination))
@pytest.mark.parametrize("damping", list(CoarseDamping))
@pytest.mark.parametrize("fisher", list(CoarseFisher))
@pytest.mark.parametrize("space", list(CoarseSpace))
def test_update_equals_dense_formula(
    space: CoarseSpace, fisher: CoarseFisher, damping: CoarseDamping, combination: Combination
) -> None:
    opt, net, x, y = prepared(
        coarse_space=space, coarse_fisher=fisher, coarse_damping=damping, combination=combination
    )
    assert_close(current_update(opt), dense_update(opt, net, x, y), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("norm", [BasisNorm.unit, BasisNorm.max])
@pytest.mark.parametrize("space", list(CoarseSpace))
def test_basis_normalisation_equals_dense_formula(space: CoarseSpace, norm: BasisNorm) -> None:
    opt, net, x, y = prepared(
        coarse_space=space, basis_norm=norm, coarse_damping=CoarseDamping.projected
    )
    assert_close(current_update(opt), dense_update(opt, net, x, y), atol=1e-9, rtol=1e-7)


def test_spectral_with_more_vectors_and_factored_damping_runs_dense() -> None:
    opt, net, x, y = prepared(coarse_space=CoarseSpace.spectral, nbasis=2)
    assert opt._operator is not None and all(b.size == 2 for b in opt._operator.bases)
    assert_close(current_update(opt), dense_update(opt, net, x, y), atol=1e-9, rtol=1e-7)
    factored, *_ = prepared(coarse_space=CoarseSpace.enriched, damping_mode="factored")
    assert torch.isfinite(current_update(factored)).all()


@pytest.mark.parametrize("combination", [Combination.deflated, Combination.balanced])
def test_exact_projected_coarse_matrix_makes_the_coarse_residual_vanish(
    combination: Combination,
) -> None:
    # C = R0 (F + λI) R0^T exactly, so (I − Q F_λ) is an F_λ-orthogonal projector: R0 F_λ d = R0 g.
    opt, net, x, y = prepared(
        coarse_space=CoarseSpace.krylov_nicolaides,
        coarse_fisher=CoarseFisher.exact,
        coarse_damping=CoarseDamping.projected,
        combination=combination,
        omega1=1.0,
        omega2=1.0,
    )
    jac = per_example_jacobian(net, x, y)
    f_lam = jac.T @ jac / BATCH + LAMBDA * torch.eye(jac.shape[1], dtype=D)
    grad = jac.mean(dim=0)
    assert opt._operator is not None
    r0 = dense_restriction(opt._operator.bases)
    update = current_update(opt)
    assert_close(r0 @ f_lam @ update, r0 @ grad, atol=1e-10, rtol=1e-8)
    fine = flat(KFAC.precondition(opt, [b.grad_matrix() for b in opt.blocks]))
    assert not torch.allclose(r0 @ f_lam @ fine, r0 @ grad)  # K-FAC alone does not


# ------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("space", "fisher", "damping"),
    [
        (CoarseSpace.nicolaides, CoarseFisher.kron, CoarseDamping.diagonal),
        (CoarseSpace.nicolaides, CoarseFisher.exact, CoarseDamping.projected),
        (CoarseSpace.spectral, CoarseFisher.kron, CoarseDamping.projected),
        (CoarseSpace.krylov_nicolaides, CoarseFisher.exact, CoarseDamping.diagonal),
    ],
)
def test_additive_preconditioner_is_symmetric_positive_definite(
    space: CoarseSpace, fisher: CoarseFisher, damping: CoarseDamping
) -> None:
    opt, *_ = prepared(coarse_space=space, coarse_fisher=fisher, coarse_damping=damping)
    shapes = [b.shape for b in opt.blocks]
    size = sum(r * c for r, c in shapes)
    columns = [current_update_of(opt, unflat(e, shapes)) for e in torch.eye(size, dtype=D)]
    prec = torch.stack(columns, dim=1)
    assert_close(prec, prec.T, atol=1e-10, rtol=1e-8)
    assert float(torch.linalg.eigvalsh(0.5 * (prec + prec.T))[0]) > 0


def current_update_of(opt: TwoLevelKFAC, mats: list[Tensor]) -> Tensor:
    """The optimizer's update for given gradient matrices, flattened."""
    return flat(opt.precondition(mats))


@pytest.mark.parametrize("combination", list(Combination))
def test_omega2_zero_is_exactly_kfac(combination: Combination) -> None:
    x, y = make_batch(8, seed=3)
    settings = {"lr": 0.05, "damping": 0.01, "cov_period": 1, "inv_period": 2, "seed": 7}
    net_k, net_2 = make_net().train(), make_net().train()
    kfac = KFAC(net_k, **settings)  # type: ignore[arg-type]
    two = TwoLevelKFAC(net_2, omega2=0.0, combination=combination, **settings)  # type: ignore[arg-type]
    for _ in range(4):
        protocol_step(kfac, net_k, x, y)
        protocol_step(two, net_2, x, y)
    for p, q in zip(net_k.parameters(), net_2.parameters(), strict=True):
        assert torch.equal(p, q)
    net_c = make_net().train()
    coarse = TwoLevelKFAC(net_c, **settings)  # type: ignore[arg-type]
    for _ in range(4):
        protocol_step(coarse, net_c, x, y)
    assert not torch.equal(net_c.fc2.weight, net_k.fc2.weight)  # the coarse level does act


def test_batchnorm_parameters_take_the_plain_gradient() -> None:
    opt, net, *_ = prepared()
    bn = {id(net.bn.weight), id(net.bn.bias)}
    assert bn == {id(p) for p in opt.plain_params}
    assert not any(id(p) in bn for b in opt.blocks for p in b.params)


def test_nicolaides_running_averages_and_rebuild_only_on_inverse_steps() -> None:
    net = make_net()
    opt = TwoLevelKFAC(net, lr=0.0, momentum=0.0, fisher="empirical", cov_period=1, inv_period=2)
    batches = [make_batch(BATCH, seed=s) for s in (1, 2)]
    from optimizers.coarse import kron_scale, nicolaides_moments

    moments = [nicolaides_moments(capture_stats(net, x, y)) for x, y in batches]
    scale = kron_scale(capture_stats(net, *batches[0]))
    protocol_step(opt, net, *batches[0])
    assert opt._operator is not None
    first = scale * moments[0][0] * moments[0][1]
    assert_close(opt._operator.fisher, first)  # ε_0 = 0: the first batch exactly
    protocol_step(opt, net, *batches[1])  # statistics step, not an inverse step
    assert opt._moments is not None
    for run, m0, m1 in zip(opt._moments, *moments, strict=True):
        assert_close(run, 0.5 * m0 + 0.5 * m1)  # ε_1 = 1/2
    assert_close(opt._operator.fisher, first)  # the operator was not rebuilt
    protocol_step(opt, net, *batches[0])  # inverse step: rebuilt from the running moments
    assert not torch.allclose(opt._operator.fisher, first)


@pytest.mark.parametrize("fisher", [CoarseFisher.kron, CoarseFisher.exact])
def test_accumulate_sums_off_diagonals_over_k_refreshes(fisher: CoarseFisher) -> None:
    """k inverse refreshes: F_c used = Σ_r offdiag(F_r) + diag(F_k), F_r the rebuild operator's."""
    batches = [make_batch(BATCH, seed=s) for s in (1, 2, 3, 4)]
    settings = {"lr": 0.0, "momentum": 0.0, "fisher": "empirical", "damping": LAMBDA}
    settings.update(cov_period=1, inv_period=1, coarse_fisher=fisher)
    net = make_net()
    rebuild = TwoLevelKFAC(net, **settings)  # type: ignore[arg-type]
    accumulate = TwoLevelKFAC(net, coarse_refresh="accumulate", **settings)  # type: ignore[arg-type]
    fresh = []
    for k, (x, y) in enumerate(batches):
        protocol_step(rebuild, net, x, y)
        protocol_step(accumulate, net, x, y)
        assert rebuild._operator is not None and accumulate._operator is not None
        fresh.append(rebuild._operator.fisher.clone())  # exact: the running average itself
        off = sum(f - torch.diag_embed(f.diagonal()) for f in fresh)
        expected = off + torch.diag_embed(fresh[-1].diagonal())
        assert_close(accumulate._operator.fisher, expected)
        damped = psd(expected) + LAMBDA * torch.eye(expected.shape[0], dtype=D)
        assert_close(accumulate._operator.solver.matrix(), damped)
        if k > 0:  # the setting changes the matrix
            assert not torch.allclose(accumulate._operator.fisher, fresh[-1])
    accumulate.param_groups[0]["damping"] = 2 * LAMBDA  # λ changes, no inverse step: not summed
    accumulate.refresh_damping()
    accumulate.coarse_operator([], [], accumulate.layer_stats())  # type: ignore[arg-type]
    assert_close(accumulate._operator.fisher, expected)
    redamped = psd(expected) + 2 * LAMBDA * torch.eye(expected.shape[0], dtype=D)
    assert_close(accumulate._operator.solver.matrix(), redamped)


def test_accumulate_needs_the_fixed_nicolaides_basis() -> None:
    with pytest.raises(ValueError, match=r"^coarse_refresh: accumulate needs coarse_space"):
        TwoLevelKFAC(make_net(), coarse_space="spectral", coarse_refresh="accumulate")


def test_authors_preset_accumulates_and_samples_top_left() -> None:
    cfg = load_preset(ROOT / "conf" / "optimizer" / "kfac2_authors.yaml")
    assert cfg.coarse_refresh is CoarseRefresh.accumulate
    assert cfg.coarse_downsample is CoarseDownsample.nearest
    paper = load_preset(ROOT / "conf" / "optimizer" / "kfac2.yaml")
    assert paper.coarse_refresh is CoarseRefresh.rebuild
    assert paper.coarse_downsample is CoarseDownsample.centre
    opt = build_kfac2(make_net(), OmegaConf.structured(cfg))
    assert "refresh=accumulate, downsample=nearest" in opt.describe()


def test_diagnostics_match_dense_natural_gradient() -> None:
    opt, net, x, y = prepared(coarse_fisher=CoarseFisher.exact, omega1=1.0, omega2=1.0)
    current_update(opt)
    jac = per_example_jacobian(net, x, y)
    fisher = jac.T @ jac / BATCH
    grad = jac.mean(dim=0)
    natural = torch.linalg.solve(fisher + LAMBDA * torch.eye(len(grad), dtype=D), grad)
    fine = torch.block_diag(*dense_kinv(opt)) @ grad
    diag = opt.diagnostics()
    dense = opt.diagnostics(dense_fisher=fisher)
    for key in ("cos_kfac", "cos_twolevel", "energy_err_kfac", "energy_err_twolevel"):
        assert diag[key] == pytest.approx(dense[key], rel=1e-8, abs=1e-10)
    cos = torch.nn.functional.cosine_similarity(fine, natural, dim=0)
    assert diag["cos_kfac"] == pytest.approx(float(cos), rel=1e-8)
    assert 0 < diag["coarse_cond"] < float("inf")
    assert diag["coarse_fisher_rel_err"] == pytest.approx(0.0, abs=1e-10)  # exact F_c, one batch
    assert "damping" in diag  # K-FAC's own scalars are kept


# ------------------------------------------------------------------------- state and config


@pytest.mark.parametrize(
    ("space", "refresh"),
    [
        (CoarseSpace.nicolaides, CoarseRefresh.rebuild),
        (CoarseSpace.nicolaides, CoarseRefresh.accumulate),
        (CoarseSpace.spectral, CoarseRefresh.rebuild),
    ],
)
def test_state_dict_round_trip_continues_bitwise(
    space: CoarseSpace, refresh: CoarseRefresh
) -> None:
    batches = [make_batch(6, seed=s) for s in range(6)]
    settings = {"lr": 0.05, "cov_period": 1, "inv_period": 2, "seed": 3, "coarse_space": space}
    settings["coarse_refresh"] = refresh
    net = make_net().train()
    opt = TwoLevelKFAC(net, **settings)  # type: ignore[arg-type]
    for x, y in batches[:3]:
        protocol_step(opt, net, x, y)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    for x, y in batches[3:]:
        protocol_step(opt, net, x, y)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    net2 = make_net(seed=5).train()
    net2.load_state_dict(saved["model"])
    opt2 = TwoLevelKFAC(net2, **settings)  # type: ignore[arg-type]
    opt2.load_state_dict(saved["opt"])
    for x, y in batches[3:]:
        protocol_step(opt2, net2, x, y)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("space", list(CoarseSpace))
@pytest.mark.parametrize("combination", list(Combination))
def test_training_steps_stay_finite(space: CoarseSpace, combination: Combination) -> None:
    net = make_net().train()  # BatchNorm on batch statistics
    x, y = make_batch(8, seed=4)
    opt = TwoLevelKFAC(
        net,
        coarse_space=space,
        combination=combination,
        coarse_fisher="exact",
        coarse_damping="projected",
        basis_norm="max",
        cov_period=1,
        inv_period=2,
        lr=0.05,
        damping=0.1,
    )
    losses = torch.stack([protocol_step(opt, net, x, y) for _ in range(4)])
    assert bool(torch.isfinite(losses).all())
    if combination is Combination.additive:
        assert bool((losses[1:] < losses[:-1]).all())


def test_non_descent_steps_are_counted() -> None:
    # Deflation is not symmetric: with a small λ and an 8-example Fisher, ⟨Δ, g⟩ can be < 0 (the
    # KL clip then does not act). Additive two-level K-FAC is SPD, so it never happens there.
    x, y = make_batch(8, seed=4)
    counts = {}
    for combination in (Combination.additive, Combination.deflated):
        net = make_net()
        opt = TwoLevelKFAC(
            net,
            combination=combination,
            coarse_fisher="exact",
            coarse_damping="projected",
            cov_period=1,
            inv_period=2,
            lr=0.05,
            damping=1e-3,
        )
        for _ in range(2):
            protocol_step(opt, net, x, y)
        counts[combination] = opt.diagnostics()["nondescent_steps"]
        last = opt._last
        assert last is not None
        vg = sum(float((u * g).sum()) for u, g in zip(last["update"], last["grads"]))
        assert (vg <= 0) == (counts[combination] > 0)
    assert counts == {Combination.additive: 0.0, Combination.deflated: 1.0}


PRESETS = sorted((ROOT / "conf" / "optimizer").glob("kfac2*.yaml"))


def test_paper_preset_is_the_reconstruction() -> None:
    cfg = load_preset(ROOT / "conf" / "optimizer" / "kfac2.yaml")
    assert cfg.name == "kfac2" and cfg.coarse_space is CoarseSpace.nicolaides
    assert cfg.basis_norm is BasisNorm.none and cfg.coarse_fisher is CoarseFisher.kron
    assert cfg.coarse_damping is CoarseDamping.diagonal
    assert cfg.combination is Combination.additive and (cfg.omega1, cfg.omega2) == (1.0, 1.0)
    assert len(PRESETS) >= 6


def load_preset(path: Path) -> TwoLevelKFACConfig:
    """A preset merged onto its schema, as Hydra composes it."""
    preset = OmegaConf.create(path.read_text())
    assert list(preset.defaults) == ["schema_kfac2", "_self_"]
    del preset["defaults"]
    schema = OmegaConf.structured(TwoLevelKFACConfig)
    assert set(preset.keys()) <= set(schema.keys())
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, preset))
    assert isinstance(cfg, TwoLevelKFACConfig)
    return cfg


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_compose_document_and_build(path: Path) -> None:
    cfg = load_preset(path)
    for line in path.read_text().splitlines()[4:]:
        assert "#" in line or line.startswith("name:") or line.startswith("  - "), line
    merged = OmegaConf.merge(OmegaConf.structured(TwoLevelKFACConfig), OmegaConf.structured(cfg))
    opt = build_kfac2(make_net(), merged)  # a DictConfig works too
    assert opt.coarse_space is cfg.coarse_space and opt.combination is cfg.combination


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("coarse_space", "coarse"), ("basis_norm", "l1"), ("coarse_fisher", "full"),
        ("coarse_damping", "none"), ("combination", "multiplicative"), ("omega1", -1.0),
        ("omega2", -1.0), ("nbasis", 0), ("coarse_refresh", "sum"),
        ("coarse_downsample", "bilinear"),
    ],
)  # fmt: skip
def test_bad_settings_fail_with_a_message_naming_them(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{setting}: "):
        TwoLevelKFAC(make_net(), **{setting: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^nbasis: nicolaides"):
        TwoLevelKFAC(make_net(), nbasis=2)
    with pytest.raises(ValueError, match=r"^nbasis: krylov_residual"):
        TwoLevelKFAC(make_net(), coarse_space="krylov_residual", nbasis=1)


def test_describe_names_the_two_level_settings() -> None:
    line = TwoLevelKFAC(make_net()).describe()
    assert "2 conv2d, 2 linear" in line and "nicolaides ×1" in line and "additive" in line
