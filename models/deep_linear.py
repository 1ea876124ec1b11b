"""Deep linear network with BatchNorm: the two-level authors' toy and Koroko et al.'s variant."""

from __future__ import annotations

from torch import Tensor, nn


class DeepLinearNet(nn.Module):
    """Linear(input_dim, width, no bias) -> BN, then ``depth`` x [Linear(width, width, no bias)
    -> BN], then Linear(width, output_dim) with bias; inputs of any shape are flattened.

    Initialisation: PyTorch defaults (nn.Linear's fan-in-scaled uniform, BN weight 1 and bias
    0), as in the two-level authors' script, which builds the layers with nn defaults.
    """

    def __init__(
        self, *, depth: int, width: int, input_dim: int, output_dim: int, batchnorm: bool = True
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        fan_in = input_dim
        for _ in range(depth + 1):
            modules.append(nn.Linear(fan_in, width, bias=False))
            if batchnorm:
                modules.append(nn.BatchNorm1d(width))
            fan_in = width
        modules.append(nn.Linear(width, output_dim))
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (B, output_dim): logits for the binary teacher task or the classes."""
        return self.net(x.reshape(x.shape[0], -1))
