"""Generated datasets: the deep-linear teacher task, a CURVES surrogate, synthetic images.

All generators draw from their own ``torch.Generator`` seeded by the caller, so a dataset is a
pure function of its seed and never touches torch's global random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CURVES_SIDE = 28
CURVE_SAMPLES = 64  # points sampled along each curve when rendering
CURVE_WIDTH = 0.7  # Gaussian stroke width (pixels) of a rendered curve
CURVE_MARGIN = 2.0  # the three points lie at least this many pixels inside the image border
SPLAT_RADIUS = 2  # pixels within this many rows/columns of a curve sample get its intensity


@dataclass
class TeacherData:
    """The teacher task's splits and the teacher's weight vector (dim, 1)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    weight: Tensor


def teacher_task(*, train: int, test: int, dim: int = 10, seed: int) -> TeacherData:
    """Deep-linear toy of the two-level authors: x ~ N(0, I), y = 1[w^T x > 0] as float (N, 1).

    The teacher is one linear map ``dim -> 1`` without bias with weights w ~ N(0, I) (only its
    direction matters for the labels).
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, 1, generator=generator)
    x = torch.randn(train + test, dim, generator=generator)
    y = (x @ weight > 0).to(torch.float32)
    return TeacherData(x[:train], y[:train], x[train:], y[train:], weight)


def curves_surrogate(count: int, *, seed: int) -> Tensor:
    """SURROGATE of CURVES: (count, 1, 28, 28) images in [0, 1] of a curve through 3 random points.

    Our own construction, not Hinton & Salakhutdinov's generator: three points uniform in the
    image (``CURVE_MARGIN`` px inside the border) are joined by the quadratic that passes through
    them at t = 0, 1/2, 1; a pixel's intensity is exp(-d^2 / (2 w^2)) with d its distance to the
    curve (sampled at ``CURVE_SAMPLES`` points, pixels within ``SPLAT_RADIUS``) and w =
    ``CURVE_WIDTH``.
    """
    generator = torch.Generator().manual_seed(seed)
    span = CURVES_SIDE - 1 - 2 * CURVE_MARGIN
    points = CURVE_MARGIN + span * torch.rand(count, 3, 2, generator=generator)
    t = torch.linspace(0.0, 1.0, CURVE_SAMPLES)
    basis = torch.stack([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)], dim=1)
    offsets = torch.arange(-SPLAT_RADIUS, SPLAT_RADIUS + 1)
    d_row, d_col = (o.reshape(-1) for o in torch.meshgrid(offsets, offsets, indexing="ij"))
    pixels = CURVES_SIDE * CURVES_SIDE
    images = torch.zeros(count * pixels)
    chunk = 2048
    for start in range(0, count, chunk):
        curve = basis @ points[start : start + chunk]  # (n, samples, 2)
        n = curve.shape[0]
        near = curve.round().unsqueeze(-2)  # (n, samples, 1, 2): the nearest pixel of a sample
        row = near[..., 0] + d_row  # (n, samples, window) pixels around each sample
        col = near[..., 1] + d_col
        dist2 = (row - curve[..., :1]).pow(2) + (col - curve[..., 1:]).pow(2)
        value = torch.exp(-dist2 / (2 * CURVE_WIDTH**2))
        inside = (row >= 0) & (row < CURVES_SIDE) & (col >= 0) & (col < CURVES_SIDE)
        value = torch.where(inside, value, torch.zeros(()))
        flat = row.clamp(0, CURVES_SIDE - 1) * CURVES_SIDE + col.clamp(0, CURVES_SIDE - 1)
        image = (torch.arange(start, start + n) * pixels).reshape(n, 1, 1)
        index = (flat.long() + image).reshape(-1)
        images.scatter_reduce_(0, index, value.reshape(-1), reduce="amax")
    return images.reshape(count, 1, CURVES_SIDE, CURVES_SIDE)


def synthetic_images(
    count: int, *, num_classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32), seed: int
) -> tuple[Tensor, Tensor]:
    """Labelled images in [0, 1] for CNN tests: a smooth random prototype per class plus noise.

    Each class prototype is a 4x4 random pattern per channel, upsampled bilinearly to the image
    size; an image is its class prototype plus N(0, 0.15^2) pixel noise, clipped to [0, 1].
    Returns ``(x, y)`` with y int64 class indices. Not a benchmark: for tests and smoke runs.
    """
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)
    prototypes = torch.nn.functional.interpolate(
        coarse, size=(height, width), mode="bilinear", align_corners=False
    )
    labels = torch.randint(num_classes, (count,), generator=generator)
    noise = 0.15 * torch.randn(count, channels, height, width, generator=generator)
    return (prototypes[labels] + noise).clamp_(0.0, 1.0), labels
