"""Models: layer sizes and parameter counts from the literature, inits, presets that train."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from core.errors import ConfigError
from core.likelihood import Likelihood
from datasets import CATALOG
from models import as_model_config, build_model, count_parameters
from models.autoencoder import DeepAutoencoder, sparse_init_
from models.cnn import SamePadMaxPool2d, cifar10_3c3d, fmnist_2c2d, resnet18, simple_cnn
from models.config import SCHEMAS, Activation, AutoencoderConfig, Init, ModelConfig, Task
from models.deep_linear import DeepLinearNet
from tests.roundoff import assert_roundoff_close

torch.set_num_threads(1)
PRESETS = sorted((Path(__file__).resolve().parent.parent / "conf" / "model").glob("*.yaml"))

# Widths from Hinton & Salakhutdinov (2006), also used by Martens (2010) and K-FAC (2015).
MNIST_AE = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
CURVES_AE = [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
FACES_AE = [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]


def dense_params(widths: list[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def conv_params(c_in: int, c_out: int, k: int, *, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------- autoencoders
@pytest.mark.parametrize(
    "widths", [MNIST_AE, CURVES_AE, FACES_AE], ids=["mnist", "curves", "faces"]
)
def test_autoencoder_sizes_code_layer_and_count(widths: list[int]) -> None:
    model = DeepAutoencoder(widths, activation=Activation.logistic)
    shapes = [(m.in_features, m.out_features) for m in linear_layers(model)]
    assert shapes == list(itertools.pairwise(widths))
    assert count_parameters(model) == dense_params(widths)
    # activations follow every hidden layer except the code layer; the output is linear
    kinds = [type(m) for m in model.net]
    code = widths.index(min(widths[1:-1]))
    expected: list[type[nn.Module]] = []
    for i in range(len(widths) - 1):
        expected.append(nn.Linear)
        if i + 1 not in (code, len(widths) - 1):
            expected.append(nn.Sigmoid)
    assert kinds == expected
    side = math.isqrt(widths[0])
    out = model(torch.rand(3, 1, side, side))
    assert out.shape == (3, widths[-1])


def test_autoencoder_activation_setting() -> None:
    for activation, module in [
        (Activation.tanh, nn.Tanh),
        (Activation.relu, nn.ReLU),
        (Activation.logistic, nn.Sigmoid),
    ]:
        model = DeepAutoencoder(MNIST_AE, activation=activation)
        acts = [m for m in model.net if not isinstance(m, nn.Linear)]
        assert len(acts) == len(MNIST_AE) - 3 and all(type(a) is module for a in acts)


def test_sparse_init_has_15_gaussian_weights_per_unit() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(784, 1000)
    sparse_init_(layer, connections=15, scale=1.0)
    nonzero = (layer.weight != 0).sum(dim=1)
    assert torch.all(nonzero == 15) and torch.all(layer.bias == 0)
    values = layer.weight[layer.weight != 0]
    assert abs(values.std().item() - 1.0) < 0.05 and abs(values.mean().item()) < 0.05
    small = nn.Linear(6, 25)  # fewer inputs than connections: all of them are used
    sparse_init_(small, connections=15, scale=1.0)
    assert torch.all((small.weight != 0).sum(dim=1) == 6)


def test_relu_sparse_init_is_scaled_and_pytorch_init_is_dense() -> None:
    torch.manual_seed(0)
    relu = DeepAutoencoder(MNIST_AE, activation=Activation.relu, init=Init.sparse)
    values = relu.net[0].weight[relu.net[0].weight != 0]
    assert abs(values.std().item() - math.sqrt(2 / 15)) < 0.02
    dense = DeepAutoencoder(MNIST_AE, init=Init.pytorch)
    first = dense.net[0]
    assert (first.weight == 0).float().mean() < 0.01
    assert first.weight.abs().max() <= 1 / math.sqrt(784) + 1e-6  # nn.Linear's U(±1/sqrt(fan_in))


# ----------------------------------------------------------------------------- deep linear
def test_deep_linear_structure_and_count() -> None:
    depth, width, d_in, d_out = 16, 10, 10, 1
    model = DeepLinearNet(depth=depth, width=width, input_dim=d_in, output_dim=d_out)
    linears = linear_layers(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == depth + 2 and len(bns) == depth + 1
    assert all(m.bias is None for m in linears[:-1]) and linears[-1].bias is not None
    assert [type(m) for m in model.net[:4]] == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.Linear,
        nn.BatchNorm1d,
    ]
    expected = (
        d_in * width + depth * width * width + 2 * width * (depth + 1) + width * d_out + d_out
    )
    assert count_parameters(model) == expected


def test_deep_linear_without_bn_is_the_product_of_its_matrices() -> None:
    torch.manual_seed(0)
    model = DeepLinearNet(depth=5, width=7, input_dim=4, output_dim=3, batchnorm=False).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    product = torch.eye(4, dtype=torch.float64)
    for layer in linear_layers(model):
        product = layer.weight @ product
    expected = x @ product.T + linear_layers(model)[-1].bias
    torch.testing.assert_close(model(x), expected)


# ------------------------------------------------------------------------------------ CNNs
def test_simple_cnn_sizes() -> None:
    model = simple_cnn(in_channels=3, num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    assert [(m.in_features, m.out_features) for m in linear_layers(model)] == [
        (16 * 5 * 5, 120),
        (120, 84),
        (84, 10),
    ]
    expected = conv_params(3, 6, 5) + conv_params(6, 16, 5) + dense_params([400, 120, 84, 10])
    assert count_parameters(model) == expected
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_fmnist_2c2d_sizes_and_deepobs_init() -> None:
    torch.manual_seed(0)
    model = fmnist_2c2d(in_channels=1, num_classes=10, image_size=28)
    assert [(m.in_features, m.out_features) for m in linear_layers(model)] == [
        (7 * 7 * 64, 1024),
        (1024, 10),
    ]
    expected = conv_params(1, 32, 5) + conv_params(32, 64, 5) + dense_params([3136, 1024, 10])
    assert count_parameters(model) == expected
    weight = linear_layers(model)[0].weight
    assert weight.abs().max() <= 0.1 + 1e-6 and abs(weight.std().item() - 0.05 * 0.88) < 0.003
    assert all(torch.all(m.bias == 0.05) for m in linear_layers(model))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_cifar10_3c3d_sizes() -> None:
    model = cifar10_3c3d(in_channels=3, num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (64, 5, 0),
        (96, 3, 0),
        (128, 3, 1),
    ]
    assert linear_layers(model)[0].in_features == 3 * 3 * 128
    expected = (
        conv_params(3, 64, 5)
        + conv_params(64, 96, 3)
        + conv_params(96, 128, 3)
        + dense_params([1152, 512, 256, 10])
    )
    assert count_parameters(model) == expected
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def resnet18_expected_params(num_classes: int) -> int:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]) with a 3x3 stem, counted from its layer sizes."""
    bn = 2  # weight and bias per channel
    total = conv_params(3, 64, 3, bias=False) + bn * 64
    c_in = 64
    for c_out in (64, 128, 256, 512):
        for block in range(2):
            total += conv_params(c_in, c_out, 3, bias=False) + bn * c_out
            total += conv_params(c_out, c_out, 3, bias=False) + bn * c_out
            if block == 0 and c_in != c_out:
                total += conv_params(c_in, c_out, 1, bias=False) + bn * c_out
            c_in = c_out
    return total + 512 * num_classes + num_classes


def test_resnet18_cifar_stem_and_count() -> None:
    model = resnet18(in_channels=3, num_classes=10, image_size=32)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert count_parameters(model) == resnet18_expected_params(10) == 11_173_962
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("size", "kernel", "stride"), [(6, 3, 2), (7, 3, 2), (12, 3, 2), (7, 2, 2)]
)
def test_same_pad_max_pool_matches_tensorflow_definition(
    size: int, kernel: int, stride: int
) -> None:
    x = torch.randn(2, 3, size, size)
    out = SamePadMaxPool2d(kernel, stride)(x)
    n_out = math.ceil(size / stride)
    pad = max((n_out - 1) * stride + kernel - size, 0) // 2  # TF: the smaller half on top/left
    expected = torch.empty(2, 3, n_out, n_out)
    for i in range(n_out):
        for j in range(n_out):
            r0, c0 = i * stride - pad, j * stride - pad
            rows = slice(max(r0, 0), min(r0 + kernel, size))
            cols = slice(max(c0, 0), min(c0 + kernel, size))
            expected[:, :, i, j] = x[:, :, rows, cols].amax(dim=(-2, -1))
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------- presets
def load_preset(path: Path) -> tuple[ModelConfig, object]:
    raw = OmegaConf.load(path)
    schema = SCHEMAS[str(raw.defaults[0])]
    body = {key: value for key, value in raw.items() if key != "defaults"}
    node = OmegaConf.merge(OmegaConf.structured(schema), body)
    return as_model_config(node), node


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds_and_takes_a_finite_training_step(path: Path) -> None:
    torch.manual_seed(0)
    cfg, node = load_preset(path)
    assert cfg.name == path.stem
    model = build_model(node)  # straight from the composed node, as the trainer does
    shape = CATALOG[cfg.dataset].input_shape
    x = torch.rand(4, *shape)
    likelihood = Likelihood(cfg.likelihood.value)
    if cfg.task is Task.autoencoder:
        target = x.reshape(4, -1)
    elif likelihood is Likelihood.categorical:
        target = torch.tensor([0, 1, 2, 3])
    else:
        target = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    output = model(x)
    loss = likelihood.nll(output, target)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_presets_name_known_datasets_and_literature_sizes() -> None:
    by_name = {p.stem: load_preset(p)[0] for p in PRESETS}
    for cfg in by_name.values():
        assert cfg.dataset in CATALOG
    layers = {name: getattr(cfg, "layers", None) for name, cfg in by_name.items()}
    assert layers["mnist_ae"] == MNIST_AE and layers["fmnist_ae"] == MNIST_AE
    assert layers["curves_ae"] == CURVES_AE and layers["faces_ae"] == FACES_AE
    assert by_name["faces_ae"].likelihood is Likelihood.gaussian
    # Koroko et al.'s DeepLinear (natural-gradients@97105b6 apps/mlp_cnn/models.py:9-27): 64
    # Linear layers, 63 of them followed by BatchNorm
    deep = DeepLinearNet(**{k: getattr(by_name["fmnist_deep_linear"], k) for k in
                            ("depth", "width", "input_dim", "output_dim")})  # fmt: skip
    assert sum(isinstance(m, nn.Linear) for m in deep.modules()) == 64
    assert sum(isinstance(m, nn.BatchNorm1d) for m in deep.modules()) == 63


# ---------------------------------------------------------------------------- build errors
def test_schemaless_mapping_is_recognised() -> None:
    cfg = as_model_config(
        {
            "name": "tiny",
            "dataset": "mnist",
            "likelihood": "bernoulli",
            "task": "autoencoder",
            "layers": [4, 2, 4],
        }
    )
    assert isinstance(cfg, AutoencoderConfig)
    assert count_parameters(build_model(cfg)) == dense_params([4, 2, 4])


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"layers": [784, 30, 100]}, "model.layers"),
        ({"layers": [784]}, "model.layers"),
        ({"task": "classification"}, "model.task"),
        ({"activation": "softplus"}, "model.activation"),
    ],
)
def test_bad_settings_give_one_line_errors(changes: dict[str, object], setting: str) -> None:
    base = {
        "name": "ae",
        "dataset": "mnist",
        "likelihood": "bernoulli",
        "task": "autoencoder",
        "layers": [784, 30, 784],
    }
    with pytest.raises(ConfigError) as info:
        build_model({**base, **changes})
    assert str(info.value).startswith(setting) and "\n" not in str(info.value)


def test_unrecognisable_config_is_rejected() -> None:
    with pytest.raises(ConfigError, match="cannot tell the architecture"):
        build_model({"name": "x", "dataset": "mnist"})


def test_count_parameters_skips_frozen() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 2 + 3
    assert count_parameters(model, trainable_only=False) == 11


@pytest.mark.parametrize("likelihood", list(Likelihood))
def test_sampled_nll_grad_is_the_autograd_gradient_at_the_same_sample(
    likelihood: Likelihood,
) -> None:
    """The MC Fisher's closed-form output gradient equals autograd's, on the same random stream."""
    shape = (6, 5) if likelihood is Likelihood.categorical else (6, 2, 3)
    output = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sample = likelihood.sample(output, generator=torch.Generator().manual_seed(11))
    leaf = output.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(likelihood.per_example_nll(leaf, sample).sum(), leaf)
    got = likelihood.sampled_nll_grad(output, generator=torch.Generator().manual_seed(11))
    assert_roundoff_close(got, expected)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("likelihood", list(Likelihood))
def test_samples_follow_the_predictive_distribution(likelihood: Likelihood) -> None:
    """Empirical moments of many draws match the model's predictive mean (5 standard errors)."""
    draws = 20_000
    if likelihood is Likelihood.categorical:
        logits = torch.tensor([[2.0, 0.0, -1.0, -6.0]], dtype=torch.float64)
        output = logits.expand(draws, -1)
        mean = torch.softmax(logits[0], dim=0)
    else:
        logits = torch.tensor([-6.0, -1.0, 0.0, 3.0], dtype=torch.float64)
        output = logits.expand(draws, -1)
        mean = torch.sigmoid(logits) if likelihood is Likelihood.bernoulli else logits
    sample = likelihood.sample(output, generator=torch.Generator().manual_seed(5))
    if likelihood is Likelihood.categorical:
        sample = torch.nn.functional.one_hot(sample, num_classes=4).to(torch.float64)
    if likelihood is Likelihood.gaussian:
        std = torch.ones_like(mean)
        assert torch.allclose(sample.std(dim=0), std, rtol=0.05)
    else:
        assert set(sample.unique().tolist()) <= {0.0, 1.0}
        std = (mean * (1 - mean)).sqrt()
    err = (sample.mean(dim=0) - mean).abs()
    assert bool((err <= 5 * std / draws**0.5 + 1e-12).all()), (sample.mean(dim=0), mean)
