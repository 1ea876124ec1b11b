"""The public training step: the curvature-optimizer contract and `train_step`."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from core.likelihood import Likelihood
from optimizers.kfac import KFAC
from optimizers.twolevel import TwoLevelKFAC
from suite.step import CurvatureOptimizer, RunDiverged, is_curvature_optimizer, train_step
from tests.dense_fisher import protocol_step


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6)).double()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 6, generator=gen, dtype=torch.float64)
    return x, (x > 0.5).double()


def test_the_k_fac_family_keeps_the_contract_and_sgd_does_not() -> None:
    model = mlp()
    assert isinstance(KFAC(model), CurvatureOptimizer)
    assert is_curvature_optimizer(TwoLevelKFAC(model))
    assert not is_curvature_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("optimizer", [KFAC, TwoLevelKFAC])
def test_train_step_is_the_written_protocol(optimizer: type[KFAC]) -> None:
    """Bitwise the documented step order (adaptive damping: the closure is passed)."""
    ours, theirs = mlp(), mlp()
    settings = {"cov_period": 1, "inv_period": 2, "adaptive_damping": True, "damping_period": 1}
    opt_ours, opt_theirs = optimizer(ours, **settings), optimizer(theirs, **settings)
    for step in range(4):
        x, y = batch(step)
        loss = train_step(ours, opt_ours, Likelihood.bernoulli, x, y)
        ref = protocol_step(opt_theirs, theirs, x, y, Likelihood.bernoulli, closure=True)
        assert loss == float(ref)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt_ours.damping == opt_theirs.damping


def test_plain_optimizers_take_the_plain_step() -> None:
    model = mlp()
    reference = copy.deepcopy(model)
    x, y = batch(0)
    loss = train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), Likelihood.bernoulli, x, y
    )
    expected = Likelihood.bernoulli.nll(reference(x), y)
    expected.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(p.grad, alpha=-0.1)  # torch.optim.SGD's update without momentum
    assert loss == float(expected)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_divergence_is_raised_above_the_threshold_or_when_not_finite() -> None:
    model = mlp()
    x, y = batch(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(RunDiverged, match="batch loss"):
        train_step(model, opt, Likelihood.bernoulli, x, y, diverge_loss=1e-6)
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    with pytest.raises(RunDiverged, match="nan"):
        train_step(model, opt, Likelihood.bernoulli, x, y)
