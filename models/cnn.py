"""Convolutional classifiers: LeNet-like simple_cnn, DeepOBS 2c2d and 3c3d, CIFAR ResNet-18.

Each builder states its initialisation and where it comes from. Only nn.Conv2d, nn.Linear,
nn.BatchNorm2d, activations and parameter-free pooling/reshaping are used, so K-FAC can hook
every weight-bearing layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SamePadMaxPool2d(nn.Module):
    """Max-pooling with TensorFlow's ``padding='same'`` (output ceil(n / stride), extra padding
    at the bottom/right, padded cells never win), as DeepOBS's TF-defined networks use."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _pads(self, size: int) -> tuple[int, int]:
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        """Pad with -inf as TF does, then pool."""
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


def _flat_features(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of features after ``features`` for one image (a dry run on zeros)."""
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, image_size, image_size)).numel())


def simple_cnn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Sequential:
    """LeNet-like CNN of the two-level authors' CIFAR grid (the PyTorch CIFAR-10 tutorial net):
    conv 6@5x5 -> ReLU -> max-pool 2 -> conv 16@5x5 -> ReLU -> max-pool 2 -> fc 120 -> ReLU ->
    fc 84 -> ReLU -> fc classes. Initialisation: PyTorch defaults."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = _flat_features(features, in_channels, image_size)
    return nn.Sequential(
        *features,
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def fmnist_2c2d(*, in_channels: int, num_classes: int, image_size: int) -> nn.Sequential:
    """DeepOBS ``fmnist_2c2d`` (net_mnist_2c2d): conv 32@5x5 same -> ReLU -> max-pool 2 (same)
    -> conv 64@5x5 same -> ReLU -> max-pool 2 (same) -> fc 1024 -> ReLU -> fc classes.
    Initialisation as DeepOBS: weights truncated normal (std 0.05, cut at 2 std), biases 0.05."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2),
        nn.ReLU(),
        SamePadMaxPool2d(2, 2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        SamePadMaxPool2d(2, 2),
        nn.Flatten(),
    )
    flat = _flat_features(features, in_channels, image_size)
    net = nn.Sequential(*features, nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, num_classes))
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.05, a=-0.1, b=0.1)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0.05)
    return net


def cifar10_3c3d(*, in_channels: int, num_classes: int, image_size: int) -> nn.Sequential:
    """DeepOBS ``cifar10_3c3d``: conv 64@5x5 valid -> ReLU -> max-pool 3/2 (same) -> conv 96@3x3
    valid -> ReLU -> max-pool 3/2 (same) -> conv 128@3x3 same -> ReLU -> max-pool 3/2 (same) ->
    fc 512 -> ReLU -> fc 256 -> ReLU -> fc classes (3x3x128 = 1152 features at 32x32).
    Initialisation as DeepOBS's PyTorch port: conv Xavier-normal, fc Xavier-uniform, biases 0.
    (DeepOBS adds L2 weight decay 0.002 on the weights: an optimizer setting, not part of it.)"""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 64, 5),
        nn.ReLU(),
        SamePadMaxPool2d(3, 2),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        SamePadMaxPool2d(3, 2),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        SamePadMaxPool2d(3, 2),
        nn.Flatten(),
    )
    flat = _flat_features(features, in_channels, image_size)
    net = nn.Sequential(
        *features,
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return net


def resnet18(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-18 from torchvision.models.resnet18, adapted to 32x32 inputs: the 7x7/2 stem
    conv becomes 3x3/1 (padding 1, no bias) and the stem max-pool is removed (the usual CIFAR
    variant of ResNet-18). Initialisation: torchvision's
    (Kaiming-normal fan-out convs, BN weight 1 / bias 0, default fc), the new stem likewise."""
    from torchvision.models import (
        resnet18 as torchvision_resnet18,  # lazy: optional heavy dependency, loaded only when used
    )

    net = torchvision_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()  # type: ignore[assignment]
    return net
