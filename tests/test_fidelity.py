"""Settings that follow the authors' scripts: loss-scale rescaling, the authors' init.

The authors average their losses over output dimensions (BCEWithLogitsLoss() on 784 pixels);
the suite sums them. With D outputs the mean-reduced loss is L/D, its gradient g/D and its
Fisher F/D², so K-FAC on the mean loss with (λ, η, κ, wd) takes exactly the steps of K-FAC on
the summed loss with (λ·D², η·D, κ·D², wd/D) in eigen and factored damping (docs/fidelity.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from core.likelihood import Likelihood
from models.autoencoder import DeepAutoencoder
from models.config import Activation, Init
from optimizers.kfac import KFAC
from optimizers.twolevel import TwoLevelKFAC
from suite.store import RunStatus, read_run
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


def test_plateau_schedule_cuts_the_lr_when_the_test_loss_stalls(
    run_job: Callable[..., tuple[RunStatus, Path]],
) -> None:
    # lr 1e-7, 2 steps an epoch, no BatchNorm (its running statistics move the eval loss): the
    # test loss cannot improve by torch's relative threshold 1e-4,
    # so with patience 0 every epoch after the first halves the lr (authors' toy: 0.1 and 10).
    status, folder = run_job(
        "model=deep_linear", "model.depth=2", "model.batchnorm=false", "optimizer=sgd",
        "optimizer.lr=1e-7", "optimizer.momentum=0",
        "trainer.batch_size=500", "trainer.epochs=4", "data.max_train=1000",
        "trainer.lr_plateau_patience=0", "trainer.lr_gamma=0.5", "trainer.lr_min=0",
    )  # fmt: skip
    assert status is RunStatus.COMPLETED
    steps = read_run(folder).steps
    per_epoch = steps.groupby(steps["epoch"].apply(math.ceil))["lr"].first().tolist()
    assert per_epoch == pytest.approx([1e-7, 1e-7, 5e-8, 2.5e-8], rel=1e-12)


def test_plateau_and_milestones_do_not_combine() -> None:
    from core.errors import ConfigError
    from suite.preflight import compose_job
    from suite.validate import validate_config

    cfg = compose_job(
        ["model=deep_linear", "optimizer=sgd", "trainer.lr_plateau_patience=3",
         "trainer.lr_milestones=[2]"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="lr_plateau_patience"):
        validate_config(cfg)


def test_koroko_damping_on_the_mean_loss_equals_fixed_pi_on_the_summed_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Koroko et al.'s (A + √λ I) ⊗ (G + √λ I) on a per-output-mean loss is factored_unit with
    π = 1/D, λ·D², η·D, κ·D², wd/D on the summed loss (docs/fidelity.md); π = 1 is not."""
    lam, lr, kappa, wd = 1.0, 1e-2, 1e-6, 1e-3  # Koroko's λ and wd; κ small so the clip acts
    koroko = {"damping_mode": "factored_unit", "damping": lam, "lr": lr, "kl_clip": kappa,
              "weight_decay": wd}  # fmt: skip
    rescaled = {"damping": lam * OUTPUTS**2, "lr": lr * OUTPUTS, "kl_clip": kappa * OUTPUTS**2,
                "weight_decay": wd / OUTPUTS, "damping_mode": "factored_unit"}  # fmt: skip
    summed = trajectory(KFAC, {**rescaled, "fixed_pi": 1.0 / OUTPUTS})
    unit_pi = trajectory(KFAC, rescaled)
    two_level = trajectory(TwoLevelKFAC, {**rescaled, "fixed_pi": 1.0 / OUTPUTS})
    mean_reduced(monkeypatch)
    mean = trajectory(KFAC, koroko)
    mean_two_level = trajectory(TwoLevelKFAC, koroko)
    eps = torch.finfo(D).eps
    for got, want in ((summed, mean), (two_level, mean_two_level)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e3 * eps, atol=1e3 * eps * scale)
    assert not torch.allclose(unit_pi, mean)  # π = 1 on the summed loss is another optimizer


def test_fixed_pi_needs_factored_unit_damping() -> None:
    from core.errors import ConfigError
    from optimizers.kfac import KFACConfig

    assert KFACConfig(damping_mode="factored_unit", fixed_pi=0.5).fixed_pi == 0.5  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"fixed_pi.*factored_unit"):
        KFACConfig(damping_mode="factored", fixed_pi=0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fixed_pi"):
        KFACConfig(damping_mode="factored_unit", fixed_pi=0.0)  # type: ignore[arg-type]


def test_early_stopping_ends_a_run_whose_running_loss_stops_improving(
    run_job: Callable[..., tuple[RunStatus, Path]],
) -> None:
    # lr 0: the weights never move, so every epoch's running loss is the same up to batch order;
    # with patience 2 the run stops at an epoch end within a few epochs, as completed.
    status, folder = run_job(
        "optimizer=sgd", "optimizer.lr=0", "trainer.epochs=20",
        "trainer.early_stop_patience=2",
    )  # fmt: skip
    run = read_run(folder)
    assert status is RunStatus.COMPLETED
    stopped = run.summary["stopped_early_epoch"]
    steps = run.steps
    spe = round(1 / float(steps["epoch"].iloc[0]))  # steps an epoch
    means = steps.groupby((steps["step"] - 1) // spe)["batch_loss"].mean().tolist()
    assert len(means) == stopped < 20
    best = means.index(min(means))
    assert len(means) - 1 - best == 2  # exactly the patience after the best epoch
    assert run.summary["final_train_running_loss"] is not None
    assert int(run.evals["step"].iloc[-1]) == len(steps)  # evaluated where it stopped


def test_without_early_stopping_every_epoch_runs(
    run_job: Callable[..., tuple[RunStatus, Path]],
) -> None:
    status, folder = run_job("optimizer=sgd", "optimizer.lr=0", "trainer.epochs=4")
    run = read_run(folder)
    assert status is RunStatus.COMPLETED and run.summary["stopped_early_epoch"] is None
    assert run.summary["epochs_completed"] == 4


def test_koroko_init_is_unit_gain_xavier_with_biases_at_one_hundredth() -> None:
    from models.config import DeepLinearInit
    from models.deep_linear import DeepLinearNet

    torch.manual_seed(0)
    nets = [
        DeepAutoencoder([784, 1000, 500, 30, 784], activation=Activation.relu,
                        init=Init.xavier_unit),
        DeepLinearNet(depth=3, width=200, input_dim=784, output_dim=10,
                      init=DeepLinearInit.xavier_unit),
    ]  # fmt: skip
    for net in nets:
        layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        for layer in layers:
            fan_out, fan_in = layer.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # gain 1, whatever the activation
            w = layer.weight.detach()
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.98 * bound
            if layer.bias is not None:
                assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, 0.01))
        assert any(layer.bias is not None for layer in layers)
