"""New K-FAC layer types against dense float64 references: Conv1d, grouped/depthwise convolutions,
Embedding, a layer called several times in one forward (statistics summed over its calls).

Two checks per layer: the captured rows reproduce every example's exact gradient
(Σ_p g_np ā_npᵀ = ∇_θ l_n, torch.func), and, where K-FAC is exact (one example, one position per
call), the Kronecker block equals the dense Fisher block vec(∇)vec(∇)ᵀ (within groups for
grouped convolutions, whose block-diagonal form drops the cross-group terms).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from core.likelihood import Likelihood
from optimizers.curvature import ConvBlock, EmbeddingBlock, GroupedConvBlock, KFACBlock
from optimizers.enums import DampingMode
from optimizers.kfac import KFAC
from tests.dense_fisher import (
    dense_eigen_inverse,
    kfc_factors,
    per_example_fisher,
    per_example_grads,
    protocol_step,
    unvec,
    vec,
)

D = torch.float64
EPS = torch.finfo(D).eps
TOL = {"rtol": 1e3 * EPS, "atol": 1e3 * EPS}


def _statistics_only(model: nn.Module, **kwargs: object) -> KFAC:
    settings: dict[str, object] = {"lr": 0.0, "momentum": 0.0, "kl_clip": None}
    settings.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KFAC(model, **settings)  # type: ignore[arg-type]


def _grad_matrix(block: KFACBlock, grads: dict[str, Tensor], name: str, n: int) -> Tensor:
    """Example n's gradient of a layer as the block's d_out × d_in' matrix."""
    tensors = [grads[f"{name}.weight"][n]]
    if block.has_bias:
        tensors.append(grads[f"{name}.bias"][n])
    return block.params_to_matrix(tensors)


def _rows_gradient(block: KFACBlock) -> Tensor:
    """Σ_p g_np ā_npᵀ per example (B, d_out, d_in') from the captured rows."""
    assert block.a is not None and block.g is not None
    return torch.einsum("bpo,bpi->boi", block.g, block.a)


def _capture(opt: KFAC, model: nn.Module, x: Tensor, target: Tensor, lik: Likelihood) -> None:
    opt.zero_grad(set_to_none=True)
    with opt.capture():
        out = model(x)
    lik.nll(out, target).backward()


def _check_rows(
    model: nn.Module, names: list[str], x: Tensor, target: Tensor, lik: Likelihood
) -> KFAC:
    """Captured (empirical) rows reproduce each example's exact gradient; returns the K-FAC."""
    opt = _statistics_only(model, fisher="empirical")
    _capture(opt, model, x, target, lik)
    grads = per_example_grads(model, lik.nll, x, target)
    assert opt.block_names == names
    for block, name in zip(opt.blocks, names, strict=True):
        exact = torch.stack([_grad_matrix(block, grads, name, n) for n in range(x.shape[0])])
        assert float(exact.abs().max()) > 1e-3
        assert_close(_rows_gradient(block), exact, **TOL)
    return opt


# ----------------------------------------------------------------------------- Conv1d


def test_conv1d_rows_reproduce_per_example_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(3, 2, kernel_size=2, dilation=2, padding="same", bias=False),
        nn.Flatten(),
        nn.Linear(2 * 4, 3),
    ).to(D)
    x, target = torch.randn(3, 2, 8, dtype=D), torch.randn(3, 3, dtype=D)
    opt = _check_rows(model, ["0", "2", "4"], x, target, Likelihood.gaussian)
    assert isinstance(opt.blocks[0], ConvBlock) and opt.blocks[0].kind == "conv1d"
    assert opt.blocks[0].grid == (1, 4)


def test_conv1d_covering_its_input_is_the_exact_fisher_block() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=4), nn.Tanh(), nn.Flatten()).to(D)
    _check_exact_block(model, torch.randn(1, 2, 4, dtype=D), torch.randn(1, 3, dtype=D))


def _check_exact_block(model: nn.Module, x: Tensor, target: Tensor) -> None:
    """One example: layer '0''s Kronecker block equals its dense Fisher block vec(∇)vec(∇)ᵀ."""
    opt = _statistics_only(model, fisher="empirical")
    protocol_step(opt, model, x, target, Likelihood.gaussian)
    grads = per_example_grads(model, Likelihood.gaussian.nll, x, target)
    block = opt.blocks[0]
    exact = per_example_fisher(_grad_matrix(block, grads, "0", 0)[None])
    assert float(exact.abs().max()) > 1e-3
    assert_close(block.dense_factor_kron(), exact, **TOL)


# ----------------------------------------------------------------------------- grouped conv


@pytest.mark.parametrize(
    ("groups", "channels"),
    [(2, (4, 6)), (3, (3, 3))],  # grouped; depthwise (groups = C_in = C_out)
)
def test_grouped_conv_rows_reproduce_per_example_gradients(
    groups: int, channels: tuple[int, int]
) -> None:
    torch.manual_seed(2)
    c_in, c_out = channels
    model = nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, groups=groups),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c_out * 9, 2),
    ).to(D)
    x, target = torch.randn(3, c_in, 3, 3, dtype=D), torch.randn(3, 2, dtype=D)
    opt = _check_rows_grouped(model, x, target)
    block = opt.blocks[0]
    assert isinstance(block, GroupedConvBlock) and len(block.parts) == groups


def _check_rows_grouped(model: nn.Module, x: Tensor, target: Tensor) -> KFAC:
    """Grouped conv: rows of group j reproduce rows j of each example's gradient matrix."""
    lik = Likelihood.gaussian
    opt = _statistics_only(model, fisher="empirical")
    _capture(opt, model, x, target, lik)
    grads = per_example_grads(model, lik.nll, x, target)
    block = opt.blocks[0]
    assert isinstance(block, GroupedConvBlock) and block.a is not None and block.g is not None
    exact = torch.stack([_grad_matrix(block, grads, "0", n) for n in range(x.shape[0])])
    cols = block.shape[1] - 1
    rows = block.shape[0] // block.groups
    for j in range(block.groups):
        a = block.inputs[:, :, j * cols : (j + 1) * cols]  # type: ignore[index]
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        g = block.g[:, :, j * rows : (j + 1) * rows]
        assert_close(torch.einsum("bpo,bpi->boi", g, a), exact[:, j * rows : (j + 1) * rows], **TOL)
    return opt


def test_grouped_conv_block_is_the_within_group_part_of_the_exact_fisher() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, kernel_size=2, groups=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).to(D)
    x, target = torch.randn(1, 4, 2, 2, dtype=D), torch.randn(1, 3, dtype=D)
    opt = _statistics_only(model, fisher="empirical")
    protocol_step(opt, model, x, target, Likelihood.gaussian)
    grads = per_example_grads(model, Likelihood.gaussian.nll, x, target)
    block = opt.blocks[0]
    grad = _grad_matrix(block, grads, "0", 0)
    exact = per_example_fisher(grad[None])
    group = torch.arange(block.shape[0]).repeat(block.shape[1]) // (block.shape[0] // 2)
    within = (group[:, None] == group[None, :]).to(D)  # vec index -> output row -> group
    assert_close(block.dense_factor_kron(), exact * within, **TOL)
    assert float((exact * (1 - within)).abs().max()) > 1e-4  # the dropped terms exist


@pytest.mark.parametrize("mode", list(DampingMode))
def test_grouped_conv_inverse_is_the_block_diagonal_inverse(mode: DampingMode) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten()).to(D)
    x, target = torch.randn(5, 4, 3, 3, dtype=D), torch.randn(5, 54, dtype=D)
    opt = _statistics_only(model, fisher="empirical", damping_mode=mode, damping=1e-2)
    protocol_step(opt, model, x, target, Likelihood.gaussian)
    block = opt.blocks[0]
    mat = torch.randn(block.shape, dtype=D)
    if mode is DampingMode.eigen:
        dense = torch.linalg.inv(block.dense_factor_kron() + 1e-2 * torch.eye(mat.numel(), dtype=D))
        assert_close(block.multiply_inverse(mat), unvec(dense @ vec(mat), block.shape), **TOL)
    else:
        assert isinstance(block, GroupedConvBlock)
        rows = block.shape[0] // 2
        for j, part in enumerate(block.parts):
            piece = mat[j * rows : (j + 1) * rows]
            expected = part.G_inv @ piece @ part.A_inv  # type: ignore[operator]
            assert_close(block.multiply_inverse(mat)[j * rows : (j + 1) * rows], expected)
    state = block.state_dict()
    fresh = KFAC(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten()).to(D))
    fresh.blocks[0].load_state_dict(state)
    assert torch.equal(fresh.blocks[0].multiply_inverse(mat), block.multiply_inverse(mat))


# ----------------------------------------------------------------------------- Embedding


def test_embedding_rows_reproduce_per_example_gradients() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Tanh(), nn.Linear(3, 2)).to(D)
    x = torch.tensor([[1, 4, 0], [6, 6, 2]])  # a padding token and a repeated token
    target = torch.randn(2, 3, 2, dtype=D)
    opt = _check_rows(model, ["0", "2"], x, target, Likelihood.gaussian)
    block = opt.blocks[0]
    assert isinstance(block, EmbeddingBlock) and block.shape == (3, 7)
    opt.step()
    counts = torch.tensor([0, 1, 1, 0, 1, 0, 2], dtype=D)  # padding_idx 0 not counted
    assert_close(block.A, counts / 6, **TOL)  # diagonal A: token frequencies over B·P


def test_embedding_single_token_is_the_exact_fisher_block() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 2)).to(D)
    _check_exact_block(model, torch.tensor([3]), torch.randn(1, 2, dtype=D))


@pytest.mark.parametrize("mode", list(DampingMode))
def test_embedding_inverse_matches_the_dense_kron(mode: DampingMode) -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2)).to(D)
    x, target = torch.randint(0, 6, (8, 4)), torch.randn(8, 4, 2, dtype=D)
    opt = _statistics_only(model, fisher="empirical", damping_mode=mode, damping=1e-2)
    protocol_step(opt, model, x, target, Likelihood.gaussian)
    block = opt.blocks[0]
    mat = torch.randn(block.shape, dtype=D)
    if mode is DampingMode.eigen:
        dense = dense_eigen_inverse(torch.diag(block.A), block.G, 1e-2)
    else:
        pi = float((block.A.mean() / block.G.diagonal().mean()).sqrt())
        root = 1e-2**0.5
        a_d = torch.diag(block.A + pi * root)
        g_d = block.G + root / pi * torch.eye(3, dtype=D)
        dense = torch.linalg.inv(torch.kron(a_d, g_d))
    assert_close(block.multiply_inverse(mat), unvec(dense @ vec(mat), block.shape), **TOL)
    update = block.matrix_to_param_updates(mat)[0]
    assert update.shape == block.weight.shape and torch.equal(update.T, mat)


# ----------------------------------------------------------------------------- repeated calls


class TwiceApplied(nn.Module):
    """One Linear applied twice in a forward (weight sharing across calls), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_layer_called_twice_sums_its_statistics_over_the_calls() -> None:
    torch.manual_seed(8)
    model = TwiceApplied().to(D)
    x, target = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    opt = _check_rows(model, ["shared", "head"], x, target, Likelihood.gaussian)
    block = opt.blocks[0]
    assert block.calls == 2 and block.a is not None and block.g is not None
    assert block.a.shape[1] == 2 and block.grid == (1, 2)  # calls as positions (KFAC-expand)
    a_hat, g_hat = kfc_factors(block.a, block.g)
    opt.step()
    assert_close(block.A, a_hat, **TOL)
    assert_close(block.G, g_hat, **TOL)


def test_layer_called_twice_with_the_mc_fisher() -> None:
    torch.manual_seed(9)
    model = TwiceApplied().to(D)
    x, target = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    opt = _statistics_only(model, fisher="mc")
    protocol_step(opt, model, x, target, Likelihood.gaussian)
    assert opt.blocks[0].num_updates == 1 and float(opt.blocks[0].G.trace()) > 0
