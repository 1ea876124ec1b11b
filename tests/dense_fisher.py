"""Dense float64 references for K-FAC tests: explicit forwards, patches, Fisher blocks, inverses.

Conventions (docs/method.md §2-3): a layer's parameters form W = [weight | bias],
d_out × d_in'; vec is column-major, so (A ⊗ G) vec(X) = vec(G X A) with torch.kron(A, G).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.likelihood import Likelihood


def vec(mat: Tensor) -> Tensor:
    """Column-major vec of a matrix."""
    return mat.T.reshape(-1)


def unvec(v: Tensor, shape: tuple[int, int]) -> Tensor:
    """Inverse of `vec`."""
    return v.reshape(shape[1], shape[0]).T


def layer_matrix(weight: Tensor, bias: Tensor | None) -> Tensor:
    """[weight flattened to d_out rows | bias column]."""
    mat = weight.reshape(weight.shape[0], -1)
    return mat if bias is None else torch.cat([mat, bias.reshape(-1, 1)], dim=1)


def conv_patches_loop(
    x: Tensor, *, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    """Patches (B, P, C·kh·kw) by explicit loops over output positions (row-major positions)."""
    kh, kw = kernel
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    height = (xp.shape[2] - kh) // stride[0] + 1
    width = (xp.shape[3] - kw) // stride[1] + 1
    rows = []
    for i in range(height):
        for j in range(width):
            r, c = i * stride[0], j * stride[1]
            rows.append(xp[:, :, r : r + kh, c : c + kw].reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


@dataclass
class LayerRecord:
    """Input, output and (after backward) output gradient of one K-FAC layer."""

    module: nn.Module
    inputs: Tensor
    output: Tensor


def explicit_forward(model: nn.Sequential, x: Tensor) -> tuple[Tensor, list[LayerRecord]]:
    """Run a Sequential child by child, keeping Linear/Conv2d inputs and grad-retaining outputs."""
    records: list[LayerRecord] = []
    h = x
    for child in model:
        out = child(h)
        if isinstance(child, nn.Linear | nn.Conv2d):
            out.retain_grad()
            records.append(LayerRecord(child, h.detach(), out))
        h = out
    return h, records


def homogeneous_rows(record: LayerRecord) -> Tensor:
    """ā rows (B, P, d_in') of one layer from its recorded input (loops for Conv2d)."""
    module, x = record.module, record.inputs
    if isinstance(module, nn.Conv2d):
        pad = module.padding
        assert not isinstance(pad, str)
        rows = conv_patches_loop(
            x,
            kernel=(int(module.kernel_size[0]), int(module.kernel_size[1])),
            stride=(int(module.stride[0]), int(module.stride[1])),
            padding=(int(pad[0]), int(pad[1])),
        )
    else:
        rows = x.reshape(x.shape[0], 1, -1)
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], dim=2)
    return rows


def output_grad_rows(record: LayerRecord, *, scale: float) -> Tensor:
    """scale · ∂loss/∂s as rows (B, P, d_out) (position-major for Conv2d)."""
    grad = record.output.grad
    assert grad is not None
    if grad.dim() == 4:
        grad = grad.flatten(2).transpose(1, 2)
    else:
        grad = grad.reshape(grad.shape[0], 1, -1)
    return grad * scale


def kfc_factors(a_rows: Tensor, g_rows: Tensor) -> tuple[Tensor, Tensor]:
    """A = mean over examples and positions of ā āᵀ; G = Σ_p g gᵀ averaged over examples."""
    batch, positions = a_rows.shape[0], a_rows.shape[1]
    a_hat = torch.einsum("npi,npj->ij", a_rows, a_rows) / (batch * positions)
    g_hat = torch.einsum("npi,npj->ij", g_rows, g_rows) / batch
    return a_hat, g_hat


def per_example_fisher(grad_mats: Tensor) -> Tensor:
    """(1/B) Σ_n vec(∇_n) vec(∇_n)ᵀ from per-example gradient matrices (B, d_out, d_in')."""
    vecs = grad_mats.transpose(1, 2).reshape(grad_mats.shape[0], -1)
    return vecs.T @ vecs / grad_mats.shape[0]


def per_example_grads(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor
) -> dict[str, Tensor]:
    """Per-example gradients ∇_θ loss_fn(model(x_n), t_n) via torch.func (no BatchNorm)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def single(p: dict[str, Tensor], xn: Tensor, tn: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (xn.unsqueeze(0),))
        return loss_fn(out, tn.unsqueeze(0))

    grads: dict[str, Tensor] = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(
        params, x, target
    )
    return grads


def factored_pi(A: Tensor, G: Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G))."""
    return math.sqrt((float(A.trace()) / A.shape[0]) / (float(G.trace()) / G.shape[0]))


def dense_eigen_inverse(A: Tensor, G: Tensor, damping: float) -> Tensor:
    """(A ⊗ G + λ I)^-1 as a dense matrix."""
    kron = torch.kron(A, G)
    return torch.linalg.inv(kron + damping * torch.eye(kron.shape[0], dtype=kron.dtype))


def dense_factored_inverse(A: Tensor, G: Tensor, damping: float) -> Tensor:
    """((A + π√λ I) ⊗ (G + √λ/π I))^-1 as a dense matrix."""
    pi = factored_pi(A, G)
    root = math.sqrt(damping)
    a_d = A + pi * root * torch.eye(A.shape[0], dtype=A.dtype)
    g_d = G + (root / pi) * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.inv(torch.kron(a_d, g_d))


def random_spd(size: int, *, generator: torch.Generator, rank: int | None = None) -> Tensor:
    """A random symmetric positive semi-definite float64 matrix (rank-deficient if rank < size)."""
    cols = size if rank is None else rank
    m = torch.randn(size, cols, generator=generator, dtype=torch.float64)
    return m @ m.T / cols


def protocol_backward(
    optimizer: Any, model: nn.Module, x: Tensor, target: Tensor, likelihood: Likelihood
) -> Tensor:
    """The plain-loop protocol up to `step()` (statistics captured, gradients in); the loss."""
    optimizer.zero_grad(set_to_none=True)
    with optimizer.capture():
        output = model(x)
    loss = likelihood.nll(output, target)
    optimizer.fisher_backward(output, likelihood=likelihood, target=target)
    loss.backward()
    return loss


def protocol_step(
    optimizer: Any,
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    likelihood: Likelihood,
    *,
    closure: bool = False,
) -> Tensor:
    """One step of the suite's plain-loop protocol for a curvature optimizer; returns the loss."""
    loss = protocol_backward(optimizer, model, x, target, likelihood)

    def evaluate() -> Tensor:
        with torch.no_grad():
            return likelihood.nll(model(x), target)

    optimizer.step(evaluate if closure else None)
    return loss.detach()
