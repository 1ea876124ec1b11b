"""KFAC optimizer: update rule vs explicit kron matrices, MC Fisher, schedules, state, config."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.testing import assert_close

from core.likelihood import Likelihood
from optimizers.enums import DampingMode, FisherType
from optimizers.kfac import KFAC, KFACConfig, build_kfac
from suite.config import register_configs
from suite.preflight import compose_job
from tests.dense_fisher import (
    dense_eigen_inverse,
    dense_factored_inverse,
    explicit_forward,
    homogeneous_rows,
    kfc_factors,
    layer_matrix,
    output_grad_rows,
    protocol_backward,
    protocol_step,
    unvec,
    vec,
)
from tests.roundoff import assert_roundoff_close

D = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def mixed_net(seed: int = 0) -> nn.Sequential:
    """Conv2d → BatchNorm2d → Tanh → Flatten → Linear, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
    ).to(D)


def mlp(seed: int = 0, *, out: int = 3) -> nn.Sequential:
    """Linear → Tanh → Linear, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(D)


def batch(
    seed: int, n: int = 6, *, lik: Likelihood = Likelihood.bernoulli
) -> tuple[Tensor, Tensor]:
    """Inputs (n, 4) and data targets for ``lik`` with 3 outputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=D)
    if lik is Likelihood.categorical:
        return x, torch.randint(0, 3, (n,), generator=gen)
    if lik is Likelihood.gaussian:
        return x, torch.randn(n, 3, generator=gen, dtype=D)
    return x, torch.bernoulli(torch.full((n, 3), 0.5, dtype=D), generator=gen)


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- update rule


@pytest.mark.parametrize("mode", list(DampingMode))
def test_first_step_equals_explicit_kron_preconditioner(mode: DampingMode) -> None:
    model = mixed_net()
    damping = 0.05
    opt = KFAC(
        model, lr=1.0, momentum=0.0, weight_decay=0.0, kl_clip=None, damping=damping,
        damping_mode=mode, fisher="empirical",
    )  # fmt: skip
    assert [b.kind for b in opt.blocks] == ["conv2d", "linear"]
    bn = model[1]
    assert {id(p) for p in opt.plain_params} == {id(bn.weight), id(bn.bias)}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 4, 4, generator=gen, dtype=D)
    target = torch.bernoulli(torch.full((4, 5), 0.5, dtype=D), generator=gen)
    lik = Likelihood.bernoulli

    out, records = explicit_forward(model, x)
    lik.nll(out, target).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    expected: dict[int, Tensor] = {id(bn.weight): -grads[id(bn.weight)]}
    expected[id(bn.bias)] = -grads[id(bn.bias)]
    for record in records:
        module = record.module
        a_hat, g_hat = kfc_factors(homogeneous_rows(record), output_grad_rows(record, scale=4.0))
        if mode is DampingMode.factored_unit:  # (A + √λ I) ⊗ (G + √λ I), π = 1
            root = damping**0.5
            eye_a = torch.eye(a_hat.shape[0], dtype=a_hat.dtype)
            eye_g = torch.eye(g_hat.shape[0], dtype=g_hat.dtype)
            inverse = torch.linalg.inv(torch.kron(a_hat + root * eye_a, g_hat + root * eye_g))
        else:
            dense = dense_eigen_inverse if mode is DampingMode.eigen else dense_factored_inverse
            inverse = dense(a_hat, g_hat, damping)
        grad = layer_matrix(grads[id(module.weight)], grads[id(module.bias)])
        step = -unvec(inverse @ vec(grad), tuple(grad.shape))
        expected[id(module.weight)] = step[:, :-1].reshape(module.weight.shape)
        expected[id(module.bias)] = step[:, -1]
    model.zero_grad(set_to_none=True)

    before = {id(p): p.detach().clone() for p in model.parameters()}
    protocol_step(opt, model, x, target, lik)
    for p in model.parameters():
        assert_close(p.detach() - before[id(p)], expected[id(p)], rtol=1e-9, atol=1e-12)
    conv_w = model[0].weight
    assert not torch.allclose(expected[id(conv_w)], -grads[id(conv_w)])  # really preconditioned


def test_momentum_weight_decay_and_kl_clip_follow_the_update_rule() -> None:
    model = mlp()
    lr, mu, wd, kappa = 0.3, 0.9, 0.01, 1e-3
    opt = KFAC(
        model, lr=lr, momentum=mu, weight_decay=wd, kl_clip=kappa, damping=0.1,
        fisher="empirical", cov_period=10, inv_period=10,
    )  # fmt: skip
    lik = Likelihood.bernoulli
    buffers: dict[int, Tensor] = {}
    for step in range(2):
        x, target = batch(10 + step)
        theta = {id(p): p.detach().clone() for p in model.parameters()}
        protocol_step(opt, model, x, target, lik)
        grads = [b.grad_matrix() for b in opt.blocks]
        deltas = [b.multiply_inverse(g) for b, g in zip(opt.blocks, grads, strict=True)]
        vg = sum(float((d * g).sum()) for d, g in zip(deltas, grads, strict=True)) * lr**2
        nu = min(1.0, math.sqrt(kappa / vg))
        assert nu < 1.0  # the clip is active
        assert opt.last_nu is not None and math.isclose(float(opt.last_nu), nu, rel_tol=1e-12)
        for block, delta in zip(opt.blocks, deltas, strict=True):
            for p, u in zip(block.params, block.matrix_to_param_updates(nu * delta), strict=True):
                d = u + wd * theta[id(p)]
                buffers[id(p)] = d if step == 0 else mu * buffers[id(p)] + d
                assert_roundoff_close(p.detach(), theta[id(p)] - lr * buffers[id(p)])


def test_precondition_is_the_subclass_hook() -> None:
    class Identity(KFAC):
        def precondition(self, grads: list[Tensor]) -> list[Tensor]:
            self.seen = [g.clone() for g in grads]
            return [2.0 * g for g in super().precondition(grads)]

    model = mlp()
    reference = mlp()
    opt = Identity(model, lr=0.5, momentum=0.0, kl_clip=None, fisher="empirical")
    ref = KFAC(reference, lr=1.0, momentum=0.0, kl_clip=None, fisher="empirical")
    x, target = batch(3)
    protocol_step(opt, model, x, target, Likelihood.bernoulli)
    protocol_step(ref, reference, x, target, Likelihood.bernoulli)
    assert [tuple(g.shape) for g in opt.seen] == [(5, 5), (3, 6)]
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_roundoff_close(p, q)


def test_lr_is_read_from_param_groups_by_step_lr() -> None:
    model = mlp()
    opt = KFAC(model, lr=0.4, momentum=0.0, kl_clip=None, fisher="empirical", cov_period=5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    lik = Likelihood.bernoulli
    for step, lr in enumerate([0.4, 0.1, 0.025]):
        assert math.isclose(opt.param_groups[0]["lr"], lr)
        x, target = batch(20 + step)
        before = params_of(model)
        protocol_step(opt, model, x, target, lik)
        block = opt.blocks[1]
        update = block.multiply_inverse(block.grad_matrix())
        expected = before[2] - lr * block.matrix_to_param_updates(update)[0]
        assert_roundoff_close(model[2].weight.detach(), expected)
        scheduler.step()


# ----------------------------------------------------------------------------- MC Fisher


@pytest.mark.parametrize("lik", list(Likelihood))
def test_mc_factors_match_explicit_sampled_targets(lik: Likelihood) -> None:
    model = mlp(out=3)
    opt = KFAC(model, lr=0.0, momentum=0.0, fisher="mc", seed=123, stats_fraction=0.5)
    x, target = batch(5, n=5, lik=lik)
    rows = 3  # ⌈0.5 · 5⌉

    opt.zero_grad(set_to_none=True)
    with opt.capture():
        output = model(x)
    loss = lik.nll(output, target)
    opt.fisher_backward(output, likelihood=lik, target=target)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients touched
    assert all(b.a is not None and b.a.shape[0] == rows for b in opt.blocks)
    loss.backward()
    opt.step()
    assert all(b.a is None and b.g is None for b in opt.blocks)  # released once folded in

    out, records = explicit_forward(model, x)
    sampled = lik.sample(out[:rows].detach(), generator=torch.Generator().manual_seed(123))
    lik.per_example_nll(out[:rows], sampled).sum().backward()
    for block, record in zip(opt.blocks, records, strict=True):
        a_rows = homogeneous_rows(record)[:rows]
        g_rows = output_grad_rows(record, scale=1.0)[:rows]
        a_hat, g_hat = kfc_factors(a_rows, g_rows)
        assert_roundoff_close(block.A, a_hat)
        assert_roundoff_close(block.G, g_hat)


def test_mc_sampling_is_seeded() -> None:
    lik = Likelihood.bernoulli
    factors = []
    for seed in (7, 7, 8):
        model = mlp()
        opt = KFAC(model, lr=0.1, fisher=FisherType.mc, seed=seed, cov_period=1)
        for step in range(3):
            protocol_step(opt, model, *batch(step), lik)
        factors.append(torch.cat([b.G.flatten() for b in opt.blocks]))
    assert torch.equal(factors[0], factors[1])
    assert not torch.allclose(factors[0], factors[2])


def test_mc_and_empirical_fisher_differ() -> None:
    lik = Likelihood.bernoulli
    x, target = batch(1)
    gs = []
    for fisher in FisherType:
        model = mlp()
        opt = KFAC(model, lr=0.0, fisher=fisher, seed=1)
        protocol_step(opt, model, x, target, lik)
        gs.append(opt.blocks[1].G.clone())
    assert not torch.allclose(gs[0], gs[1])


# ----------------------------------------------------------------------------- schedules


def test_running_average_schedule() -> None:
    model = mlp()
    ema_max = 0.6
    opt = KFAC(model, lr=0.01, fisher="empirical", cov_period=1, ema_max=ema_max)
    lik = Likelihood.bernoulli
    block = opt.blocks[0]
    running_a, running_g = torch.zeros_like(block.A), torch.zeros_like(block.G)
    decays = []
    for step in range(4):
        x, target = batch(30 + step)
        opt.zero_grad(set_to_none=True)
        with opt.capture():
            out = model(x)
        lik.nll(out, target).backward()
        a_hat, g_hat = block.batch_factors()
        eps = min(1 - 1 / (step + 1), ema_max)
        decays.append(eps)
        running_a = eps * running_a + (1 - eps) * a_hat
        running_g = eps * running_g + (1 - eps) * g_hat
        opt.step()
        assert_roundoff_close(block.A, running_a)
        assert_roundoff_close(block.G, running_g)
        if step == 0:
            # First update: the batch statistics alone, up to the rounding of scaling by 1/n
            # (a few round-offs; the summation order depends on the CPU and thread count).
            assert_roundoff_close(block.A, a_hat, units=16)
    assert decays == [0.0, 0.5, 0.6, 0.6]


@pytest.mark.parametrize("mode", list(DampingMode))
def test_statistics_and_inverses_only_change_on_their_steps(mode: DampingMode) -> None:
    model = mlp()
    opt = KFAC(model, lr=0.05, fisher="mc", cov_period=2, inv_period=3, damping_mode=mode)
    lik = Likelihood.bernoulli
    block = opt.blocks[1]

    def inverse() -> Tensor:
        parts = [block.Q_A, block.d_A] if mode is DampingMode.eigen else [block.A_inv]
        return torch.cat([t.flatten() for t in parts if t is not None])

    factor_changes, inverse_changes = [], []
    prev_a, prev_inv = block.A.clone(), None
    for step in range(7):
        assert opt.is_stats_step == (step % 2 == 0)
        protocol_backward(opt, model, *batch(40 + step), lik)
        assert (block.a is not None) == (step % 2 == 0)  # no capture off the statistics steps
        opt.step()
        if not torch.equal(block.A, prev_a):
            factor_changes.append(step)
        if prev_inv is None or not torch.equal(inverse(), prev_inv):
            inverse_changes.append(step)
        prev_a, prev_inv = block.A.clone(), inverse().clone()
    assert factor_changes == [0, 2, 4, 6]
    assert inverse_changes == [0, 3, 6]
    assert opt.counters.stats_updates == 4 and opt.counters.inverse_updates == 3


def test_non_statistics_steps_need_no_capture_but_statistics_steps_do() -> None:
    model = mlp()
    opt = KFAC(model, lr=0.05, fisher="mc", cov_period=2)
    lik = Likelihood.bernoulli
    x, target = batch(0)
    loss = lik.nll(model(x), target)
    loss.backward()
    with pytest.raises(RuntimeError, match="capture"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    with opt.capture():
        out = model(x)
    lik.nll(out, target).backward()
    with pytest.raises(RuntimeError, match="fisher_backward"):
        opt.step()
    protocol_step(opt, model, x, target, lik)  # step 0 done properly
    opt.zero_grad(set_to_none=True)
    lik.nll(model(x), target).backward()
    opt.step()  # step 1 is not a statistics step
    assert opt.counters.steps == 2


# ----------------------------------------------------------------------------- state


def _run(opt: KFAC, model: nn.Module, steps: range) -> list[Tensor]:
    lik = Likelihood.bernoulli
    for step in steps:
        protocol_step(opt, model, *batch(50 + step), lik, closure=True)
    return params_of(model)


@pytest.mark.parametrize("mode", list(DampingMode))
def test_state_dict_round_trip_continues_bitwise(mode: DampingMode) -> None:
    settings = {
        "lr": 0.05, "fisher": "mc", "cov_period": 2, "inv_period": 3, "damping_mode": mode,
        "adaptive_damping": True, "damping_period": 2, "seed": 11, "weight_decay": 1e-3,
    }  # fmt: skip
    model = mlp()
    opt = KFAC(model, **settings)  # type: ignore[arg-type]
    _run(opt, model, range(0, 5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    final = _run(opt, model, range(5, 11))

    resumed = mlp(seed=99)
    opt2 = KFAC(resumed, **{**settings, "seed": 0})  # type: ignore[arg-type]
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.counters.steps == 5 and opt2.seed == 11
    again = _run(opt2, resumed, range(5, 11))
    for p, q in zip(final, again, strict=True):
        assert torch.equal(p, q)
    assert opt2.damping == opt.damping
    assert opt.counters == opt2.counters


def test_state_dict_rejects_other_architectures() -> None:
    opt = KFAC(mlp(), lr=0.1)
    other = KFAC(nn.Sequential(nn.Linear(4, 3)).to(D), lr=0.1)
    state = opt.state_dict()
    with pytest.raises(ValueError):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- adaptive damping


def test_adaptive_damping_decreases_after_good_steps_and_increases_after_bad() -> None:
    lik = Likelihood.gaussian
    omega = 0.95**5
    for lr, expected_factor in ((1e-4, omega), (50.0, 1 / omega)):
        model = mlp()
        opt = KFAC(
            model, lr=lr, momentum=0.0, kl_clip=None, damping=0.1, adaptive_damping=True,
            fisher="mc", damping_mode="eigen",
        )  # fmt: skip
        x, target = batch(60, lik=lik)
        protocol_step(opt, model, x, target, lik, closure=True)
        assert math.isclose(opt.damping, 0.1 * expected_factor, rel_tol=1e-12)
        assert all(b.damping == opt.damping for b in opt.blocks)  # inverses re-damped
        block = opt.blocks[0]
        assert block.d_A is not None and block.d_G is not None and block.eigen_scale is not None
        assert_close(block.eigen_scale, 1 / (torch.outer(block.d_G, block.d_A) + opt.damping))
        assert opt.last_rho is not None
        assert (opt.last_rho > 0.75) if expected_factor < 1 else (opt.last_rho < 0.25)


def test_adaptive_damping_reduction_ratio_uses_the_kfac_quadratic_model() -> None:
    lik = Likelihood.gaussian
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(D)
    lr, wd, damping = 0.3, 0.05, 0.2
    opt = KFAC(
        model, lr=lr, momentum=0.0, weight_decay=wd, kl_clip=None, damping=damping,
        adaptive_damping=True, fisher="empirical", damping_mode="factored",
    )  # fmt: skip
    x, target = batch(61, lik=lik)
    layer = model[0]
    theta = layer_matrix(layer.weight.detach(), layer.bias.detach()).clone()
    with torch.no_grad():
        loss_before = float(lik.nll(model(x), target))
    protocol_step(opt, model, x, target, lik, closure=True)
    with torch.no_grad():
        loss_after = float(lik.nll(model(x), target))
    block = opt.blocks[0]
    delta = layer_matrix(layer.weight.detach(), layer.bias.detach()) - theta
    grad = block.grad_matrix()
    curvature = torch.kron(block.A, block.G) + damping * torch.eye(15, dtype=D)
    wd_change = wd * float((theta * delta).sum() + 0.5 * (delta * delta).sum())
    predicted = float((grad * delta).sum()) + 0.5 * float(vec(delta) @ curvature @ vec(delta))
    rho = (loss_after - loss_before + wd_change) / (predicted + wd_change)
    assert opt.last_rho is not None and math.isclose(opt.last_rho, rho, rel_tol=1e-9)


def test_adaptive_damping_needs_the_closure() -> None:
    model = mlp()
    opt = KFAC(model, lr=0.1, adaptive_damping=True)
    with pytest.raises(ValueError, match="closure"):
        protocol_step(opt, model, *batch(0), Likelihood.bernoulli)


# ----------------------------------------------------------------------------- config


def test_yaml_preset_matches_schema_and_authors_defaults() -> None:
    register_configs()
    merged = compose_job(["logger=none", "optimizer=kfac"]).optimizer
    schema = OmegaConf.structured(KFACConfig)
    assert set(merged.keys()) == set(schema.keys())
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, KFACConfig)
    assert (cfg.cov_period, cfg.inv_period, cfg.damping, cfg.kl_clip, cfg.momentum) == (
        10, 100, 1e-3, 1e-2, 0.9,
    )  # fmt: skip
    assert cfg.fisher is FisherType.mc and cfg.damping_mode is DampingMode.eigen
    text = (ROOT / "conf" / "optimizer" / "base" / "kfac.yaml").read_text()
    stated = OmegaConf.create(text)
    assert set(stated.keys()) == set(schema.keys()) - {"name"}  # the whole block, once
    for line in text.splitlines()[1:]:
        assert "#" in line, line
    dumped = OmegaConf.to_yaml(merged)  # what a run folder's config.yaml holds
    assert "damping_mode: eigen" in dumped and "fisher: mc" in dumped
    assert OmegaConf.merge(schema, OmegaConf.create(dumped)) == merged
    opt = build_kfac(mlp(), merged)  # a DictConfig works too
    assert opt.inv_period == 100 and opt.fisher is FisherType.mc


def test_schema_rejects_unknown_enum_values() -> None:
    schema = OmegaConf.structured(KFACConfig)
    with pytest.raises(Exception, match="damping_mode"):
        OmegaConf.merge(schema, {"damping_mode": "cholesky"})


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lr", -1.0), ("momentum", 1.0), ("damping", 0.0), ("ema_max", 1.0), ("cov_period", 0),
        ("inv_period", 0), ("stats_fraction", 0.0), ("stats_fraction", 1.5), ("kl_clip", 0.0),
        ("damping_mode", "cholesky"), ("fisher", "true"), ("damping_decay", 1.0),
    ],
)  # fmt: skip
def test_bad_settings_fail_with_a_message_naming_them(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{setting}: got"):
        KFAC(mlp(), **{setting: value})  # type: ignore[arg-type]


def test_describe_and_stats_rows() -> None:
    opt = KFAC(mixed_net(), stats_fraction=0.1)
    assert opt.stats_rows(30) == 3 and opt.stats_rows(31) == 4 and opt.stats_rows(5) == 1
    line = opt.describe()
    assert "1 conv2d, 1 linear" in line and "2 plain" in line and "fisher=mc" in line
