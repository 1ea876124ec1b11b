"""K-FAC curvature blocks against dense float64 references (exact Fisher blocks, explicit kron)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from core.likelihood import Likelihood
from optimizers.curvature import (
    Conv2dBlock,
    GroupedConvBlock,
    LinearBlock,
    all_finite,
    classify,
    make_block,
    robust_eigh,
    squares_finite,
)
from optimizers.enums import DampingMode
from optimizers.kfac import KFAC
from tests.dense_fisher import (
    conv_patches_loop,
    dense_eigen_inverse,
    dense_factored_inverse,
    explicit_forward,
    homogeneous_rows,
    kfc_factors,
    layer_matrix,
    output_grad_rows,
    per_example_fisher,
    per_example_grads,
    protocol_backward,
    protocol_step,
    random_spd,
    unvec,
    vec,
)

D = torch.float64


def _statistics_only(model: nn.Module, **kwargs: object) -> KFAC:
    """A K-FAC that only gathers statistics (lr 0)."""
    settings: dict[str, object] = {"lr": 0.0, "momentum": 0.0, "kl_clip": None}
    settings.update(kwargs)
    return KFAC(model, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_single_example_kron_is_exact_fisher_block(bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias)).to(D)
    opt = _statistics_only(model, fisher="empirical")
    x, target = torch.randn(1, 3, dtype=D), torch.randn(1, 2, dtype=D)
    lik = Likelihood.gaussian
    protocol_step(opt, model, x, target, lik)
    grads = per_example_grads(model, lik.nll, x, target)
    assert len(opt.blocks) == 2
    for block, name in zip(opt.blocks, ["0", "2"], strict=True):
        grad = layer_matrix(grads[f"{name}.weight"][0], grads[f"{name}.bias"][0] if bias else None)
        exact = per_example_fisher(grad[None])
        assert block.shape == grad.shape
        assert_close(block.dense_factor_kron(), exact, rtol=1e-10, atol=1e-12)
        assert float(exact.abs().max()) > 1e-3  # a non-trivial block


def test_conv_covering_its_input_kron_is_exact_fisher_block() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)
    ).to(D)
    opt = _statistics_only(model, fisher="empirical")
    x = torch.randn(1, 2, 3, 3, dtype=D)
    target = torch.bernoulli(torch.full((1, 4), 0.5, dtype=D))
    lik = Likelihood.bernoulli
    protocol_step(opt, model, x, target, lik)
    grads = per_example_grads(model, lik.nll, x, target)
    conv_block = opt.blocks[0]
    assert isinstance(conv_block, Conv2dBlock) and conv_block.grid == (1, 1)
    for block, name in zip(opt.blocks, ["0", "3"], strict=True):
        grad = layer_matrix(grads[f"{name}.weight"][0], grads[f"{name}.bias"][0])
        assert_close(block.dense_factor_kron(), per_example_fisher(grad[None]), rtol=1e-10, atol=0)


def test_conv_factors_average_a_over_positions_and_sum_g() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).to(D)
    opt = _statistics_only(model, fisher="empirical")
    batch = 3
    x = torch.randn(batch, 2, 6, 5, dtype=D)
    target = torch.randn(batch, 4, dtype=D)
    lik = Likelihood.gaussian
    out, records = explicit_forward(model, x)
    lik.nll(out, target).backward()
    model.zero_grad(set_to_none=True)
    protocol_backward(opt, model, x, target, lik)
    block = opt.blocks[0]
    a_rows = homogeneous_rows(records[0])
    g_rows = output_grad_rows(records[0], scale=float(batch))
    positions = a_rows.shape[1]
    assert block.grid == (3, 3) and positions == 9
    assert block.a is not None and block.g is not None
    assert_close(block.a, a_rows)
    assert_close(block.g, g_rows)
    opt.step()
    assert block.a is None and block.g is None  # released once folded into the factors
    a_mean = torch.einsum("npi,npj->ij", a_rows, a_rows) / (batch * positions)
    g_mean = torch.einsum("npi,npj->ij", g_rows, g_rows) / (batch * positions)
    assert_close(block.A, a_mean)
    assert_close(block.G, positions * g_mean)
    # KFC: A ⊗ G = Σ_p E[ā āᵀ] ⊗ E[g gᵀ] with position-homogeneous statistics = P · Ā ⊗ Ḡ
    assert_close(block.dense_factor_kron(), positions * torch.kron(a_mean, g_mean))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=1),
        nn.Conv2d(2, 3, kernel_size=3, padding="same", bias=False),
        nn.Conv2d(2, 3, kernel_size=3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 3, kernel_size=2, dilation=2),
    ],
)
def test_conv_patches_reproduce_the_convolution(conv: nn.Conv2d) -> None:
    conv = conv.to(D)
    block = Conv2dBlock(conv)
    x = torch.randn(2, 2, 5, 6, dtype=D)
    out = conv(x)
    block.save_input(x, rows=2)
    block.save_output(out)
    assert block.a is not None
    weight = block.params_to_matrix([p.detach() for p in block.params])
    assert_close(block.a @ weight.T, out.detach().flatten(2).transpose(1, 2))
    assert block.grid == tuple(out.shape[-2:])


def test_conv_patches_match_explicit_loops() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).to(D)
    block = Conv2dBlock(conv)
    x = torch.randn(2, 2, 5, 6, dtype=D)
    block.save_input(x, rows=1)
    loops = conv_patches_loop(x[:1], kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    assert block.a is not None
    assert_close(block.a[..., :-1], loops)
    assert torch.equal(block.a[..., -1], torch.ones_like(block.a[..., -1]))


def test_linear_on_sequences_treats_positions_like_conv() -> None:
    layer = nn.Linear(3, 2).to(D)
    block = LinearBlock(layer)
    x = torch.randn(4, 5, 3, dtype=D)
    out = layer(x)
    block.save_input(x, rows=4)
    block.save_output(out)
    block.save_output_grad(torch.ones_like(out), rows=4, scale=2.0)
    assert block.grid == (1, 5)
    a_hat, g_hat = block.batch_factors()
    rows = torch.cat([x, torch.ones(4, 5, 1, dtype=D)], dim=2)
    ref_a, ref_g = kfc_factors(rows, 2.0 * torch.ones(4, 5, 2, dtype=D))
    assert_close(a_hat, ref_a)
    assert_close(g_hat, ref_g)


def _block_with_factors(seed: int, *, rank_a: int | None = None) -> LinearBlock:
    gen = torch.Generator().manual_seed(seed)
    block = LinearBlock(nn.Linear(4, 3).to(D))
    block.A = random_spd(5, generator=gen, rank=rank_a)
    block.G = random_spd(3, generator=gen)
    block.num_updates = 1
    return block


@pytest.mark.parametrize("mode", list(DampingMode))
def test_multiply_inverse_matches_dense_kron(mode: DampingMode) -> None:
    block = _block_with_factors(3, rank_a=2)
    damping = 0.3
    block.update_inverse(damping=damping, mode=mode)
    mat = torch.randn(3, 5, dtype=D)
    if mode is DampingMode.eigen:
        dense = dense_eigen_inverse(block.A, block.G, damping)
        assert block.Q_A is not None and block.d_A is not None
        assert_close((block.Q_A * block.d_A) @ block.Q_A.T, block.A)
    else:
        dense = dense_factored_inverse(block.A, block.G, damping)
    assert_close(block.multiply_inverse(mat), unvec(dense @ vec(mat), (3, 5)))
    kron = torch.kron(block.A, block.G)
    assert_close(block.multiply_factors(mat), unvec(kron @ vec(mat), (3, 5)))


@pytest.mark.parametrize("mode", list(DampingMode))
def test_set_damping_equals_a_fresh_inverse(mode: DampingMode) -> None:
    block = _block_with_factors(4)
    fresh = _block_with_factors(4)
    block.update_inverse(damping=0.1, mode=mode)
    block.set_damping(0.7)
    fresh.update_inverse(damping=0.7, mode=mode)
    mat = torch.randn(3, 5, dtype=D)
    assert block.damping == 0.7
    assert_close(block.multiply_inverse(mat), fresh.multiply_inverse(mat))


def test_param_layout_round_trip() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=2).to(D)
    block = Conv2dBlock(conv)
    mat = torch.randn(3, 2 * 2 * 2 + 1, dtype=D)
    weight, bias = block.matrix_to_param_updates(mat)
    assert weight.shape == conv.weight.shape and bias.shape == (3,)
    assert torch.equal(bias, mat[:, -1])
    assert torch.equal(block.params_to_matrix([weight, bias]), mat)
    conv.weight.grad, conv.bias.grad = weight.clone(), bias.clone()
    assert torch.equal(block.grad_matrix(), mat)


def test_unsupported_layers_get_no_block_and_a_reason() -> None:
    assert isinstance(make_block(nn.Conv2d(4, 4, 3, groups=2)), GroupedConvBlock)
    block, why = classify(nn.BatchNorm1d(3))
    assert block is None and why is not None and "normalisation" in why
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    block, why = classify(frozen)
    assert block is None and why is not None and "weight frozen" in why
    frozen.requires_grad_(False)
    assert classify(frozen) == (None, None)  # nothing to train, nothing to report
    half = nn.Linear(2, 3)
    half.bias.requires_grad_(False)
    block = make_block(half)
    assert block is not None and not block.has_bias and block.shape == (3, 2)


class _FailingOnce:
    """Wraps a torch.linalg function so that its first call fails."""

    def __init__(self, fn: object, *, how: str) -> None:
        self.fn, self.how, self.calls = fn, how, 0

    def __call__(self, mat: torch.Tensor, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.calls == 1:
            if self.how == "raise":
                raise torch.linalg.LinAlgError("forced failure")
            chol, _ = self.fn(mat, *args, **kwargs)  # type: ignore[operator]
            return chol, torch.ones((), dtype=torch.int32)
        return self.fn(mat, *args, **kwargs)  # type: ignore[operator]


def test_eigh_failure_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _block_with_factors(5)
    reference.update_inverse(damping=0.1, mode=DampingMode.eigen)
    block = _block_with_factors(5)
    block.A = block.A.float()
    block.G = block.G.float()
    failing = _FailingOnce(torch.linalg.eigh, how="raise")
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    retries = block.update_inverse(damping=0.1, mode=DampingMode.eigen)
    assert retries == 1 and failing.calls == 3  # failed, retried in float64, then G
    assert block.d_A is not None and block.d_A.dtype == torch.float32
    mat = torch.randn(3, 5, dtype=D)
    expected = reference.multiply_inverse(mat)
    assert_close(block.multiply_inverse(mat.float()).double(), expected, rtol=1e-4, atol=1e-5)


def test_cholesky_failure_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _block_with_factors(6)
    reference.update_inverse(damping=0.1, mode=DampingMode.factored)
    block = _block_with_factors(6)
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", _FailingOnce(torch.linalg.cholesky_ex, how="info")
    )
    assert block.update_inverse(damping=0.1, mode=DampingMode.factored) == 1
    mat = torch.randn(3, 5, dtype=D)
    assert_close(block.multiply_inverse(mat), reference.multiply_inverse(mat))


def test_hopeless_factorisation_keeps_previous_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    block = _block_with_factors(7)
    block.update_inverse(damping=0.1, mode=DampingMode.eigen)
    mat = torch.randn(3, 5, dtype=D)
    before = block.multiply_inverse(mat)

    def broken(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("always")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    block.A = block.A * 2
    assert block.update_inverse(damping=0.1, mode=DampingMode.eigen) > 0
    assert torch.equal(block.multiply_inverse(mat), before)
    fresh = _block_with_factors(8)
    with pytest.raises(RuntimeError, match="eigendecomposition failed"):
        fresh.update_inverse(damping=0.1, mode=DampingMode.eigen)
    assert robust_eigh(torch.eye(2, dtype=D)) is None


def test_optimizer_counts_linalg_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    opt = _statistics_only(model, fisher="empirical", damping_mode="eigen")
    monkeypatch.setattr(torch.linalg, "eigh", _FailingOnce(torch.linalg.eigh, how="raise"))
    x, target = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    with pytest.warns(RuntimeWarning, match="retried in float64"):
        protocol_step(opt, model, x, target, Likelihood.gaussian)
    assert opt.counters.linalg_retries == 1
    assert opt.diagnostics()["linalg_retries"] == 1.0
    assert opt.state_dict()["curvature"]["counters"]["linalg_retries"] == 1


def test_nonfinite_statistics_are_reported_not_folded_in() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    opt = KFAC(model, lr=0.1, fisher="empirical", cov_period=1, kl_clip=None)
    lik = Likelihood.gaussian
    x, target = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    protocol_step(opt, model, x, target, lik)
    factors = [(b.A.clone(), b.G.clone()) for b in opt.blocks]
    opt.zero_grad(set_to_none=True)
    with opt.capture():
        out = model(x)
    lik.nll(out, target).backward()
    assert opt.blocks[0].g is not None
    opt.blocks[0].g[0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite statistics"):
        opt.step()
    assert opt.counters.nonfinite_stats == 1
    assert torch.equal(opt.blocks[0].A, factors[0][0])
    assert torch.equal(opt.blocks[0].G, factors[0][1])
    assert opt.blocks[0].num_updates == 1 and opt.blocks[1].num_updates == 2
    assert not torch.equal(opt.blocks[1].A, factors[1][0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflowing_statistics_are_skipped_like_nonfinite_ones() -> None:
    torch.manual_seed(6)
    layer = nn.Linear(3, 2).float()
    block = make_block(layer)
    assert block is not None
    block.save_input(torch.randn(4, 3), rows=4)
    block.save_output_grad(torch.randn(4, 2), rows=4)
    assert block.update_factors(decay=0.0)
    before = block.A.clone()
    block.save_input(torch.full((4, 3), 1.0e20), rows=4)  # finite, but aᵀa overflows float32
    block.save_output_grad(torch.randn(4, 2), rows=4)
    assert not block.update_factors(decay=0.5)
    assert torch.equal(block.A, before) and block.num_updates == 1
    assert all_finite(block.A, block.G)
    assert not all_finite(torch.tensor([1.0, float("inf")]))
    assert not squares_finite(torch.full((3, 3), 1.0e20).T)  # non-contiguous path
    assert squares_finite(torch.full((3, 3), 1.0e18))


def test_factor_math_is_float32_for_low_precision_models() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(torch.bfloat16)
    opt = KFAC(model, lr=0.1, fisher="mc")
    x = torch.randn(6, 3, dtype=torch.bfloat16)
    target = torch.randn(6, 2, dtype=torch.bfloat16)
    protocol_step(opt, model, x, target, Likelihood.gaussian)
    for block in opt.blocks:
        assert block.A.dtype == torch.float32 and block.G.dtype == torch.float32
        assert block.Q_A is not None and block.Q_A.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
