"""Settings that follow the authors' scripts: loss-scale rescaling, the authors' init.

The authors average their losses over output dimensions (BCEWithLogitsLoss() on 784 pixels);
the suite sums them. With D outputs the mean-reduced loss is L/D, its gradient g/D and its
Fisher F/D², so K-FAC on the mean loss with (λ, η, κ, wd) takes exactly the steps of K-FAC on
the summed loss with (λ·D², η·D, κ·D², wd/D) in eigen and factored damping (docs/fidelity.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from core.likelihood import Likelihood
from models.autoencoder import DeepAutoencoder
from models.config import Activation, Init
from optimizers.kfac import KFAC
from optimizers.twolevel import TwoLevelKFAC
from tests.dense_fisher import protocol_step

D = torch.float64
OUTPUTS = 12


def mean_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the likelihood's loss and MC output gradient the per-output mean (÷ D)."""
    nll, grad = Likelihood.nll, Likelihood.sampled_nll_grad

    def mean_nll(self: Likelihood, output: Tensor, target: Tensor) -> Tensor:
        return nll(self, output, target) / output[0].numel()

    def mean_grad(self: Likelihood, output: Tensor, **kwargs: object) -> Tensor:
        return grad(self, output, **kwargs) / output[0].numel()  # type: ignore[arg-type]

    monkeypatch.setattr(Likelihood, "nll", mean_nll)
    monkeypatch.setattr(Likelihood, "sampled_nll_grad", mean_grad)


def trajectory(cls: type[KFAC], settings: dict[str, object], *, steps: int = 6) -> Tensor:
    """Parameters after ``steps`` K-FAC steps on a small float64 autoencoder (MC Fisher)."""
    torch.manual_seed(0)
    net = DeepAutoencoder([OUTPUTS, 8, 3, 8, OUTPUTS], activation=Activation.tanh).double()
    opt = cls(net, cov_period=1, inv_period=2, seed=5, **settings)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, OUTPUTS, generator=gen, dtype=D)
    for _ in range(steps):
        protocol_step(opt, net, x, x, Likelihood.bernoulli)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("cls", [KFAC, TwoLevelKFAC])
@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_mean_loss_equals_rescaled_sum_loss(
    monkeypatch: pytest.MonkeyPatch, cls: type[KFAC], mode: str
) -> None:
    lam, lr, kappa, wd = 1e-3, 0.05, 1e-4, 1e-3  # κ small enough that the KL clip acts
    summed = trajectory(
        cls,
        {"damping": lam * OUTPUTS**2, "lr": lr * OUTPUTS, "kl_clip": kappa * OUTPUTS**2,
         "weight_decay": wd / OUTPUTS, "damping_mode": mode},
    )  # fmt: skip
    plain = trajectory(
        cls, {"damping": lam, "lr": lr, "kl_clip": kappa, "weight_decay": wd, "damping_mode": mode}
    )
    mean_reduced(monkeypatch)
    mean = trajectory(
        cls, {"damping": lam, "lr": lr, "kl_clip": kappa, "weight_decay": wd, "damping_mode": mode}
    )
    eps = torch.finfo(D).eps  # round-off relative to the largest parameter
    torch.testing.assert_close(
        summed, mean, rtol=1e3 * eps, atol=1e3 * eps * float(summed.abs().max())
    )
    assert not torch.allclose(plain, mean)  # unscaled settings are a different optimizer


def test_xavier_init_uses_the_activation_gain() -> None:
    torch.manual_seed(0)
    net = DeepAutoencoder([784, 1000, 500, 30, 784], activation=Activation.tanh, init=Init.xavier)
    gain = 5.0 / 3.0
    for layer in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
        fan_out, fan_in = layer.weight.shape
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        assert float(layer.weight.abs().max()) <= bound
        assert float(layer.weight.abs().max()) > 0.99 * bound  # uniform on [−bound, bound]
        assert float(layer.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert not layer.bias.any()
