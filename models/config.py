"""Structured config schemas of the model presets (conf/model/*.yaml start from one of these).

Enum members are spelled as their values, so YAML and command lines read ``activation=tanh``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from core.likelihood import Likelihood


class Task(str, Enum):
    """What the model learns: to reconstruct its input, or to predict a label."""

    autoencoder = "autoencoder"
    classification = "classification"


class Activation(str, Enum):
    """Hidden-unit nonlinearity of the autoencoders."""

    logistic = "logistic"
    tanh = "tanh"
    relu = "relu"


# Koroko et al.'s constant bias init (natural-gradients@97105b6 apps/mlp_cnn/initializations.py:11).
KOROKO_BIAS = 0.01


class Init(str, Enum):
    """Weight initialisation of the autoencoders."""

    sparse = "sparse"  # Martens 2010: 15 nonzero N(0, 1) incoming weights per unit, zero biases
    pytorch = "pytorch"  # torch.nn.Linear's default (uniform, fan-in scaled)
    xavier = "xavier"  # Xavier-uniform with the activation's gain, zero biases (Tselepidis' AE)
    xavier_unit = "xavier_unit"  # Xavier-uniform, gain 1, biases KOROKO_BIAS (Koroko et al.)


class CNNArch(str, Enum):
    """The convolutional benchmark networks."""

    simple_cnn = "simple_cnn"  # LeNet-like: conv 6@5x5, pool, conv 16@5x5, pool, fc 120-84-10
    fmnist_2c2d = "fmnist_2c2d"  # DeepOBS: 2 conv (32, 64 @5x5 same) + fc 1024 + output
    cifar10_3c3d = "cifar10_3c3d"  # DeepOBS: 3 conv (64@5x5, 96@3x3, 128@3x3) + fc 512-256 + out
    resnet18 = "resnet18"  # torchvision ResNet-18 with a 3x3 stem and no max-pool (32x32 input)


@dataclass
class ModelConfig:
    """Fields every model preset has."""

    name: str = MISSING  # preset name, e.g. mnist_ae
    dataset: str = MISSING  # a `datasets` name: mnist, fmnist, cifar10, curves, faces, teacher, ...
    likelihood: Likelihood = MISSING  # output distribution: fixes the loss and the MC Fisher
    task: Task = MISSING


@dataclass
class AutoencoderConfig(ModelConfig):
    """Deep autoencoder: ``layers`` lists every width from input to output (input == output).

    The narrowest hidden layer is the code layer and is linear, as is the output layer (logits
    for Bernoulli, means for Gaussian); every other hidden layer uses ``activation``.
    """

    layers: list[int] = field(default_factory=list)
    activation: Activation = Activation.logistic
    init: Init = Init.sparse
    sparse_connections: int = 15  # nonzero incoming weights per unit under init=sparse


class DeepLinearInit(str, Enum):
    """Weight initialisation of the deep linear network."""

    pytorch = "pytorch"  # torch.nn.Linear's default
    kaiming = "kaiming"  # kaiming_uniform_(fan_in, relu): the authors' SimpleMLP (toy)
    xavier_unit = "xavier_unit"  # Xavier-uniform, gain 1, biases KOROKO_BIAS (Koroko et al.)


@dataclass
class DeepLinearConfig(ModelConfig):
    """Deep linear network with BatchNorm of the two-level authors' toy problem.

    Linear(input_dim, width, no bias) -> BN, then ``depth`` x [Linear(width, width, no bias) ->
    BN], then Linear(width, output_dim) with bias. ``batchnorm=false`` drops every BN layer.
    """

    depth: int = 64
    width: int = 10
    input_dim: int = 10
    output_dim: int = 1
    batchnorm: bool = True
    output_bias: bool = True  # the authors' toy (SimpleMLP(bias=False)): false
    init: DeepLinearInit = DeepLinearInit.pytorch  # the authors' toy: kaiming


@dataclass
class CNNConfig(ModelConfig):
    """Convolutional classifier; ``image_size`` is the side of the square input images."""

    arch: CNNArch = MISSING
    in_channels: int = 3
    num_classes: int = 10
    image_size: int = 32


# Hydra ConfigStore entries in group `model`: conf/model/<preset>.yaml names one in its defaults.
SCHEMAS: dict[str, type[ModelConfig]] = {
    "schema_autoencoder": AutoencoderConfig,
    "schema_deep_linear": DeepLinearConfig,
    "schema_cnn": CNNConfig,
}
