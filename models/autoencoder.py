"""Deep autoencoders of Hinton & Salakhutdinov (2006) as used by Martens (2010) and K-FAC (2015)."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import Tensor, nn

from models.config import KOROKO_BIAS, Activation, Init

ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.logistic: nn.Sigmoid,
    Activation.tanh: nn.Tanh,
    Activation.relu: nn.ReLU,
}


@torch.no_grad()
def sparse_init_(layer: nn.Linear, *, connections: int, scale: float) -> None:
    """Sparse initialisation (Martens 2010): each unit gets ``connections`` nonzero incoming
    weights drawn from N(0, scale^2) at random positions; the bias is zero."""
    out_features, in_features = layer.weight.shape
    count = min(connections, in_features)
    positions = torch.rand(out_features, in_features).topk(count, dim=1).indices
    values = scale * torch.randn(out_features, count)
    layer.weight.zero_().scatter_(1, positions, values.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.zero_()


def code_layer_index(layers: list[int]) -> int:
    """Index in ``layers`` of the code layer: the first narrowest hidden layer."""
    hidden = layers[1:-1]
    return 1 + hidden.index(min(hidden))


# torch's calculate_gain name of each activation (the authors apply it to every layer).
XAVIER_GAIN: dict[Activation, Literal["sigmoid", "tanh", "relu"]] = {
    Activation.logistic: "sigmoid",
    Activation.tanh: "tanh",
    Activation.relu: "relu",
}


class DeepAutoencoder(nn.Module):
    """Fully connected autoencoder; flattens any input shape and returns (B, D) logits/means.

    Layer widths ``layers`` run from input to output. Hidden layers use ``activation``, except
    the narrowest (the code layer) which is linear; the output layer is linear.

    Initialisation: ``init=sparse`` (default) is Martens' (2010) sparse init used by the HF,
    K-FAC (Martens & Grosse 2015) and SGD-momentum (Sutskever et al. 2013) autoencoder papers:
    15 nonzero incoming weights per unit, N(0, 1) for logistic and tanh units, zero biases. For
    ReLU units the nonzero weights are N(0, 2/15) instead (our choice: He-style variance for 15
    inputs, since N(0, 1) would grow activations ~7.5x per layer). ``init=pytorch`` keeps
    torch.nn.Linear's default initialisation. ``init=xavier`` is the two-level authors'
    (KFAC-Pytorch models/mnist/deep_autoencoder.py): Xavier-uniform weights with
    ``nn.init.calculate_gain`` of the activation (5/3 for tanh) on every layer, zero biases.
    """

    def __init__(
        self,
        layers: list[int],
        *,
        activation: Activation = Activation.logistic,
        init: Init = Init.sparse,
        sparse_connections: int = 15,
    ) -> None:
        super().__init__()
        self.widths = list(layers)
        self.code_index = code_layer_index(self.widths)
        modules: list[nn.Module] = []
        last = len(self.widths) - 2
        relu = activation is Activation.relu
        scale = math.sqrt(2.0 / sparse_connections) if relu else 1.0
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(self.widths)):
            linear = nn.Linear(fan_in, fan_out)
            if init is Init.sparse:
                sparse_init_(linear, connections=sparse_connections, scale=scale)
            elif init is Init.xavier:
                gain = nn.init.calculate_gain(XAVIER_GAIN[activation])
                nn.init.xavier_uniform_(linear.weight, gain=gain)
                nn.init.zeros_(linear.bias)
            elif init is Init.xavier_unit:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.constant_(linear.bias, KOROKO_BIAS)
            modules.append(linear)
            if i != last and i + 1 != self.code_index:
                modules.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits/means of shape (B, D) for inputs of any shape (B, ...)."""
        return self.net(x.reshape(x.shape[0], -1))
