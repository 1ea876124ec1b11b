"""K-FAC on the models researchers bring: coverage said out loud, torch.optim semantics, gradient
accumulation, sequence outputs, weight tying, torch.compile, a small transformer, two-level
refusals and safety warnings (ResNet-18 in a slow test)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from core.likelihood import Likelihood, PositionReduction
from models.cnn import resnet18
from optimizers.kfac import KFAC, KFACCoverageWarning
from optimizers.twolevel import CoarseSafetyWarning, TwoLevelKFAC
from tests.dense_fisher import protocol_backward, protocol_step

D = torch.float64
EPS = torch.finfo(D).eps


def quiet_kfac(model: nn.Module, **kwargs: object) -> KFAC:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACCoverageWarning)
        return KFAC(model, **kwargs)  # type: ignore[arg-type]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def data(seed: int, n: int = 8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=D), torch.randn(n, 3, generator=gen, dtype=D)


# ----------------------------------------------------------------------------- coverage


class Mixed(nn.Module):
    """Layers K-FAC covers, layers that fall back, and one it cannot see run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.bias_only = nn.Linear(4, 4)
        self.bias_only.weight.requires_grad_(False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.fc(x))
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.bias_only(h)).mean(dim=1)


def test_one_warning_lists_every_fallback_parameter_and_why() -> None:
    with pytest.warns(KFACCoverageWarning) as record:
        opt = KFAC(Mixed())
    assert len(record) == 1
    text = str(record[0].message)
    for name in ("norm.weight", "norm.bias", "attn.in_proj_weight", "attn.out_proj.weight",
                 "bias_only.bias"):  # fmt: skip
        assert name in text
    assert "normalisation" in text and "functionally" in text and "weight frozen" in text
    assert opt.block_names == ["fc", "head"]
    assert "fc.weight" not in text and "head.weight" not in text


class Bypassed(nn.Module):
    """A Linear whose weights are used functionally: its forward hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.bypassed = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(torch.tanh(self.used(x)), self.bypassed.weight)


def test_blocks_whose_hooks_never_fired_are_an_error_naming_them() -> None:
    model = Bypassed().to(D)
    opt = quiet_kfac(model)
    x, target = data(0)
    with pytest.raises(RuntimeError, match=r"'bypassed' \(Linear\): no input"):
        protocol_step(opt, model, x, target, Likelihood.gaussian)


def test_a_layer_whose_output_misses_the_loss_is_named() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.live, self.dead = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            self.dead(x)
            return self.live(x)

    model = Dead().to(D)
    opt = quiet_kfac(model, fisher="empirical")
    with pytest.raises(RuntimeError, match=r"'dead' \(Linear\): no output gradient"):
        protocol_step(opt, model, *data(0), Likelihood.gaussian)


def test_weight_tying_is_refused_and_the_shared_weight_moves_once() -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head).to(D)
    with pytest.warns(KFACCoverageWarning, match="weight tying") as record:
        opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
    assert "0.weight" in str(record[0].message) and opt.blocks == []
    x, target = torch.randint(0, 6, (5, 3)), torch.randint(0, 6, (5, 3))
    before = emb.weight.detach().clone()
    opt.zero_grad()
    out = model(x)
    Likelihood.categorical.nll(out, target, positions="mean").backward()
    assert emb.weight.grad is not None
    expected = before - 0.1 * emb.weight.grad
    opt.step()
    assert_close(emb.weight.detach(), expected, rtol=10 * EPS, atol=10 * EPS)


# ----------------------------------------------------------------------------- torch.optim


def test_parameters_without_gradient_stay_still_momentum_included() -> None:
    model = mlp()
    opt = quiet_kfac(model, lr=0.05, momentum=0.9, weight_decay=1e-2, cov_period=1)
    for step in range(2):
        protocol_step(opt, model, *data(step), Likelihood.gaussian)
    frozen = model[0]
    frozen.requires_grad_(False)  # frozen after construction, as users do
    weight, bias = frozen.weight.detach().clone(), frozen.bias.detach().clone()
    buffer = opt.state[frozen.weight]["momentum_buffer"].clone()
    other = model[2].weight.detach().clone()
    for step in range(2, 4):
        protocol_step(opt, model, *data(step), Likelihood.gaussian)
    assert torch.equal(frozen.weight, weight) and torch.equal(frozen.bias, bias)
    assert torch.equal(opt.state[frozen.weight]["momentum_buffer"], buffer)
    assert not torch.equal(model[2].weight, other)


def test_per_group_lr_momentum_weight_decay_are_honoured() -> None:
    settings = {"momentum": 0.0, "kl_clip": None, "cov_period": 1, "damping": 1e-2}
    grouped_model, plain_model = mlp(1), mlp(1)
    groups = [
        {"params": list(grouped_model[0].parameters()), "lr": 0.0},
        {"params": list(grouped_model[2].parameters()), "lr": 0.2, "weight_decay": 0.1},
    ]
    grouped = quiet_kfac(grouped_model, param_groups=groups, **settings)
    plain = quiet_kfac(plain_model, lr=0.2, weight_decay=0.1, **settings)
    first = grouped_model[0].weight.detach().clone()
    x, target = data(3)
    protocol_step(grouped, grouped_model, x, target, Likelihood.gaussian)
    protocol_step(plain, plain_model, x, target, Likelihood.gaussian)
    assert torch.equal(grouped_model[0].weight, first)  # lr 0: still
    assert_close(grouped_model[2].weight, plain_model[2].weight, rtol=1e3 * EPS, atol=0.0)
    assert_close(grouped_model[2].bias, plain_model[2].bias, rtol=1e3 * EPS, atol=0.0)


def test_group_settings_that_cannot_work_are_refused_clearly() -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"must be the nn\.Module"):
        KFAC([{"params": list(model.parameters())}])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="damping is a global setting"):
        quiet_kfac(model, param_groups=[{"params": list(model.parameters()), "damping": 0.1}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['betas'\]"):
        quiet_kfac(model, param_groups=[{"params": list(model.parameters()), "betas": 0.9}])
    split = [{"params": [model[0].weight]}, {"params": [model[0].bias, *model[2].parameters()]}]
    with pytest.raises(ValueError, match="'0' has its weight and bias in different groups"):
        quiet_kfac(model, param_groups=split)
    with pytest.raises(ValueError, match=r"param_groups\.lr"):
        quiet_kfac(model, param_groups=[{"params": list(model.parameters()), "lr": -1.0}])


def test_add_param_group_parameters_are_updated_plainly_with_a_warning() -> None:
    model = mlp()
    opt = quiet_kfac(model, lr=0.1, momentum=0.0, cov_period=1)
    extra = nn.Parameter(torch.ones(3, dtype=D))
    with pytest.warns(KFACCoverageWarning, match="added after construction"):
        opt.add_param_group({"params": [extra], "lr": 0.5})
    x, target = data(4)
    opt.zero_grad(set_to_none=True)
    with opt.capture():
        out = model(x) + extra
    loss = Likelihood.gaussian.nll(out, target)
    opt.fisher_backward(out, likelihood=Likelihood.gaussian, target=target)
    loss.backward()
    assert extra.grad is not None
    expected = 1.0 - 0.5 * extra.grad
    opt.step()
    assert_close(extra.detach(), expected, rtol=10 * EPS, atol=10 * EPS)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_gradient_accumulation_equals_the_single_batch_step(fisher: str) -> None:
    settings = {"lr": 0.1, "cov_period": 1, "fisher": fisher, "seed": 0, "kl_clip": 1e-2}
    whole_model, micro_model = mlp(2), mlp(2)
    whole = quiet_kfac(whole_model, **settings)
    micro = quiet_kfac(micro_model, grad_accumulation=2, **settings)
    lik = Likelihood.gaussian
    x, target = data(5, n=8)
    protocol_step(whole, whole_model, x, target, lik)
    micro.zero_grad(set_to_none=True)
    for part in (slice(0, 4), slice(4, 8)):
        with micro.capture():
            out = micro_model(x[part])
        loss = lik.nll(out, target[part]) / 2  # the usual accumulation recipe
        micro.fisher_backward(out, likelihood=lik, target=target[part])
        loss.backward()
    micro.step()
    for a, b in zip(whole.blocks, micro.blocks, strict=True):
        if fisher == "empirical":  # identical statistics up to round-off
            assert_close(b.A, a.A, rtol=1e3 * EPS, atol=1e3 * EPS)
            assert_close(b.G, a.G, rtol=1e3 * EPS, atol=1e3 * EPS)
        else:  # same inputs; sampled G of the same scale (other draws)
            assert_close(b.A, a.A, rtol=1e3 * EPS, atol=1e3 * EPS)
            ratio = float(b.G.trace() / a.G.trace())
            assert 0.3 < ratio < 3.0
    if fisher == "empirical":
        for p, q in zip(whole_model.parameters(), micro_model.parameters(), strict=True):
            assert_close(q, p, rtol=1e3 * EPS, atol=1e3 * EPS)


def test_captures_other_than_grad_accumulation_are_an_error() -> None:
    model = mlp()
    opt = quiet_kfac(model)
    with opt.capture():
        model(data(0)[0])
    with pytest.raises(RuntimeError, match="grad_accumulation=1"), opt.capture():
        model(data(0)[0])
    two = quiet_kfac(model, grad_accumulation=2)
    protocol_backward(two, model, *data(0), Likelihood.gaussian)
    with pytest.raises(RuntimeError, match=r"1 captured micro-batch.* grad_accumulation=2"):
        two.step()


# ----------------------------------------------------------------------------- sequences


def test_sequence_logits_need_an_explicit_position_reduction() -> None:
    lik = Likelihood.categorical
    logits = torch.randn(2, 5, 5, dtype=D)  # T == V: the case that used to train silently wrong
    target = torch.randint(0, 5, (2, 5))
    with pytest.raises(ValueError, match="positions='sum' or 'mean'"):
        lik.nll(logits, target)
    per = -torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    assert_close(lik.per_example_nll(logits, target, positions="sum"), per.sum(1))
    masked = target.clone()
    masked[0, :2] = -100
    keep = (masked != -100).to(D)
    expected = (per * keep).sum(1) / keep.sum(1)
    got = lik.per_example_nll(logits, masked, positions=PositionReduction.mean)
    assert_close(got, expected, rtol=1e3 * EPS, atol=1e3 * EPS)
    with pytest.raises(ValueError, match="categorical likelihood only"):
        Likelihood.gaussian.nll(logits, logits, positions="mean")


def test_mc_and_empirical_fisher_agree_in_scale_for_sequences() -> None:
    """Targets drawn from the model itself: both Fishers estimate the same G (T = 12, 9 kept)."""
    torch.manual_seed(3)
    steps, vocab, batch = 12, 5, 400
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, vocab)).to(D)
    x = torch.randn(batch, steps, 3, dtype=D)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1).reshape(-1, vocab)
    draw = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))
    target = draw.reshape(batch, steps)
    target[:, -3:] = -100  # ignored positions: T_n = 9
    lik = Likelihood.categorical
    traces = {}
    for positions in ("sum", "mean"):
        for fisher in ("mc", "empirical"):
            opt = quiet_kfac(model, lr=0.0, fisher=fisher, seed=0)
            opt.zero_grad(set_to_none=True)
            with opt.capture():
                out = model(x)
            loss = lik.nll(out, target, positions=positions)
            opt.fisher_backward(out, likelihood=lik, target=target, positions=positions)
            loss.backward()
            opt.step()
            traces[positions, fisher] = float(opt.blocks[1].G.trace())
    for positions in ("sum", "mean"):  # was T² = 144 apart for the per-position mean
        ratio = traces[positions, "mc"] / traces[positions, "empirical"]
        assert 0.85 < ratio < 1.15, traces
    # the mean's Gauss-Newton is the sum's over T_n: the same draws, scaled by 1/T_n = 1/9
    assert math.isclose(9 * traces["mean", "mc"], traces["sum", "mc"], rel_tol=1e3 * EPS)


# ----------------------------------------------------------------------------- transformer


class TinyTransformer(nn.Module):
    """Embedding → TransformerEncoderLayer → Linear head on (B, T, V) logits."""

    def __init__(self, vocab: int = 7, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(tokens)))


def test_small_transformer_trains_with_every_fallback_named() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    with pytest.warns(KFACCoverageWarning) as record:
        opt = KFAC(model, lr=0.05, cov_period=1, inv_period=5, damping=1e-2)
    text = str(record[0].message)
    assert "layer.self_attn.in_proj_weight" in text and "layer.self_attn.out_proj.weight" in text
    assert "layer.norm1.weight" in text
    assert opt.block_names == ["embed", "layer.linear1", "layer.linear2", "head"]
    tokens = torch.randint(0, 7, (16, 6))
    target = torch.roll(tokens, 1, dims=1)
    target[:, 0] = -100
    lik = Likelihood.categorical
    losses = []
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        with opt.capture():
            out = model(tokens)
        loss = lik.nll(out, target, positions="mean")
        opt.fisher_backward(out, likelihood=lik, target=target, positions="mean")
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(b.num_updates == 15 for b in opt.blocks)
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_statistics_equal_the_eager_ones() -> None:
    lik = Likelihood.gaussian
    x, target = data(6)
    factors = []
    for compiled in (False, True):
        model = mlp(4)
        opt = quiet_kfac(model, fisher="mc", seed=0, lr=0.0)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        protocol_step(opt, run, x, target, lik)  # type: ignore[arg-type]
        factors.append([(b.A.clone(), b.G.clone()) for b in opt.blocks])
    for (a0, g0), (a1, g1) in zip(*factors, strict=True):
        assert_close(a1, a0, rtol=1e3 * EPS, atol=1e3 * EPS)
        assert_close(g1, g0, rtol=1e3 * EPS, atol=1e3 * EPS)


# ----------------------------------------------------------------------------- two-level


def test_two_level_refuses_layers_without_a_coarse_level() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no coarse level for layers '0' \(grouped_conv2d\)"):
        TwoLevelKFAC(model)


class Sometimes(nn.Module):
    """A Linear that the forward skips when asked (as stochastic depth would)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.optional, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.skip = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.head(h if self.skip else torch.tanh(self.optional(h)))


def test_two_level_refuses_to_run_without_its_coarse_level() -> None:
    model = Sometimes().to(D)
    opt = TwoLevelKFAC(model, cov_period=1)
    protocol_step(opt, model, *data(0), Likelihood.gaussian)
    model.skip = True
    with (
        pytest.raises(RuntimeError, match=r"coarse level needs .* none for \['optional'\]"),
        pytest.warns(RuntimeWarning, match="no statistics for 'optional'"),
    ):
        protocol_step(opt, model, *data(1), Likelihood.gaussian)
    kfac_model = Sometimes().to(D)
    kfac = KFAC(kfac_model, cov_period=1)  # K-FAC alone warns and counts, then goes on
    protocol_step(kfac, kfac_model, *data(0), Likelihood.gaussian)
    kfac_model.skip = True
    with pytest.warns(RuntimeWarning, match="no statistics for 'optional'"):
        protocol_step(kfac, kfac_model, *data(1), Likelihood.gaussian)
    assert kfac.diagnostics()["missing_stats"] == 1.0


@pytest.mark.parametrize(
    ("settings", "hint"),
    [
        (
            {},
            "safer: coarse_fisher=exact, coarse_damping=projected, basis_norm=max (Koroko et al.)",
        ),
        (
            {"coarse_fisher": "exact"},
            "safer: coarse_damping=projected, basis_norm=max (Koroko et al.)",
        ),
        (
            {"coarse_fisher": "exact", "coarse_damping": "projected", "basis_norm": "max"},
            "already at Koroko et al.'s coarse settings",
        ),
    ],
)
def test_coarse_safety_warning_names_only_settings_not_in_use(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], hint: str
) -> None:
    """Every coarse matrix trips the condition limit here; the warning suggests what differs."""
    monkeypatch.setattr("optimizers.twolevel.COARSE_COND_MAX", 1.0)
    model = mlp()
    opt = TwoLevelKFAC(model, lr=0.1, damping=1e-3, cov_period=1, **settings)  # type: ignore[arg-type]
    with pytest.warns(CoarseSafetyWarning, match="condition number") as caught:
        protocol_step(opt, model, *data(0), Likelihood.gaussian)
    messages = [str(w.message) for w in caught if "condition number" in str(w.message)]
    assert len(messages) == 1 and messages[0].endswith(f"({hint})"), messages
    assert opt.diagnostics()["coarse_extreme_cond"] == 1.0


@pytest.mark.slow
def test_resnet18_trains_with_the_documented_two_level_settings() -> None:
    """torchvision ResNet-18 (the cifar10_resnet18 network), 16 synthetic 32×32 images.

    Paper settings: the coarse step dwarfs K-FAC's (warned, counted); Koroko et al.'s settings
    (exact coarse Fisher, projected damping, max-normalised basis): the loss falls.
    """
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    common = {"lr": 0.01, "damping": 1e-3, "damping_mode": "factored", "cov_period": 1}
    lik = Likelihood.categorical
    torch.manual_seed(0)
    model = resnet18(in_channels=3, num_classes=10, image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACCoverageWarning)
        paper = TwoLevelKFAC(model, **common)  # type: ignore[arg-type]
    with pytest.warns(CoarseSafetyWarning, match="coarse correction"):
        protocol_step(paper, model, x, y, lik)
    assert paper.diagnostics()["coarse_extreme_share"] == 1.0
    torch.manual_seed(0)
    model = resnet18(in_channels=3, num_classes=10, image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACCoverageWarning)
        safe = TwoLevelKFAC(
            model,
            coarse_fisher="exact",
            coarse_damping="projected",
            basis_norm="max",
            **common,  # type: ignore[arg-type]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoarseSafetyWarning)
        losses = [float(protocol_step(safe, model, x, y, lik)) for _ in range(3)]
    assert losses[-1] < 0.5 * losses[0] and math.isfinite(losses[-1]), losses
    assert safe.diagnostics()["coarse_extreme_share"] == 0.0
