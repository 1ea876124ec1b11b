"""Deep linear network with BatchNorm: the two-level authors' toy and Koroko et al.'s variant."""

from __future__ import annotations

import math

from torch import Tensor, nn

from models.config import KOROKO_BIAS, DeepLinearInit


class DeepLinearNet(nn.Module):
    """Linear(input_dim, width, no bias) -> BN, then ``depth`` x [Linear(width, width, no bias)
    -> BN], then Linear(width, output_dim) with bias; inputs of any shape are flattened.

    Initialisation (``init``): PyTorch defaults (nn.Linear's fan-in-scaled uniform, BN weight 1
    and bias 0); ``kaiming``: the two-level authors' SimpleMLP init (KFAC-Pytorch@74b6c7d
    models/cifar/simple_mlp.py:49): kaiming_uniform_(fan_in, relu) weights, biases
    U(±1/√fan_in); ``xavier_unit``: Koroko et al.'s (natural-gradients@97105b6
    apps/mlp_cnn/initializations.py:7-12): xavier_uniform_ (gain 1) weights, biases 0.01.
    ``output_bias=False`` drops the output layer's bias (their toy has none).
    """

    def __init__(
        self,
        *,
        depth: int,
        width: int,
        input_dim: int,
        output_dim: int,
        batchnorm: bool = True,
        output_bias: bool = True,
        init: DeepLinearInit = DeepLinearInit.pytorch,
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        fan_in = input_dim
        for _ in range(depth + 1):
            modules.append(nn.Linear(fan_in, width, bias=False))
            if batchnorm:
                modules.append(nn.BatchNorm1d(width))
            fan_in = width
        modules.append(nn.Linear(width, output_dim, bias=output_bias))
        self.net = nn.Sequential(*modules)
        for layer in self.net:
            if not isinstance(layer, nn.Linear) or init is DeepLinearInit.pytorch:
                continue
            if init is DeepLinearInit.kaiming:
                nn.init.kaiming_uniform_(layer.weight, mode="fan_in", nonlinearity="relu")
                if layer.bias is not None:
                    bound = 1.0 / math.sqrt(layer.weight.shape[1])
                    nn.init.uniform_(layer.bias, -bound, bound)
            else:
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, KOROKO_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (B, output_dim): logits for the binary teacher task or the classes."""
        return self.net(x.reshape(x.shape[0], -1))
