"""Shared helpers for the coarse-space and two-level tests (no tests here).

A tiny float64 network with two Conv2d layers of different spatial size, a BatchNorm (never
preconditioned) and two Linear layers; exact per-example statistics and per-example gradients
by autograd, laid out as the K-FAC contract does (d_out × d_in', bias last, row-major).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.likelihood import Likelihood
from optimizers.coarse import LayerBasis, LayerStats, kron_scale

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """conv 2→3 (3×3 map) → tanh → conv 3→2 no bias (2×2) → BN → tanh → fc 8→4 → tanh → fc 4→6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, kernel_size=3)
        self.conv2 = nn.Conv2d(3, 2, kernel_size=2, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 6)

    def forward(self, x: Tensor) -> Tensor:
        """Forward pass; input (B, 2, 5, 5), output (B, 6)."""
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.bn(self.conv2(h)))
        h = torch.tanh(self.fc1(h.flatten(1)))
        return self.fc2(h)


def make_net(seed: int = 0) -> TinyNet:
    """A float64 TinyNet in eval mode (BatchNorm on fixed random running statistics)."""
    torch.manual_seed(seed)
    net = TinyNet().double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 1.5)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def make_batch(batch: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random inputs (B, 2, 5, 5) and Gaussian targets (B, 6)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    return x, y


def kfac_layers(model: nn.Module) -> list[nn.Module]:
    """Linear and Conv2d modules in forward order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _unfold(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input as (B, P, d_in') rows, homogeneous 1 appended when the layer has a bias."""
    if isinstance(module, nn.Conv2d):
        rows = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]
            stride=module.stride,
        ).transpose(1, 2)
    else:
        rows = x[:, None, :]
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=2)
    return rows


def capture_stats(
    model: nn.Module, x: Tensor, y: Tensor, *, likelihood: Likelihood = Likelihood.gaussian
) -> list[LayerStats]:
    """Exact per-example (ā, g) of every K-FAC layer for the per-example losses ℓ_n(x, y)."""
    layers = kfac_layers(model)
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        inputs[module] = args[0].detach()
        out.retain_grad()
        outputs[module] = out

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        out = model(x)
        likelihood.per_example_nll(out, y).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    stats = []
    for layer in layers:
        s = outputs[layer]
        assert s.grad is not None
        g = s.grad.reshape(s.shape[0], s.shape[1], -1).transpose(1, 2)
        grid = (int(s.shape[2]), int(s.shape[3])) if s.dim() == 4 else (1, 1)
        stats.append(LayerStats(a=_unfold(layer, inputs[layer]), g=g.detach(), grid=grid))
    model.zero_grad(set_to_none=True)
    return stats


def layer_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A layer's parameters (or their gradients) as the d_out × d_in' matrix, bias last."""
    mat = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        mat = torch.cat([mat, bias[:, None]], dim=1)
    return mat


def per_example_jacobian(
    model: nn.Module, x: Tensor, y: Tensor, *, likelihood: Likelihood = Likelihood.gaussian
) -> Tensor:
    """Per-example gradients of ℓ_n over the K-FAC parameters, (B, N), by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = torch.func.functional_call(model, (p, buffers), (xn[None],))
        return likelihood.per_example_nll(out, yn[None]).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    names = {m: n for n, m in model.named_modules()}
    cols = []
    for layer in kfac_layers(model):
        name = names[layer]
        bias = grads.get(f"{name}.bias")
        weight = grads[f"{name}.weight"]
        rows = [
            layer_matrix(layer, weight[n], None if bias is None else bias[n]) for n in range(len(x))
        ]
        cols.append(torch.stack(rows).flatten(1))
    return torch.cat(cols, dim=1)


def flat(mats: list[Tensor]) -> Tensor:
    """Concatenate per-layer matrices row-major into one vector."""
    return torch.cat([m.reshape(-1) for m in mats])


def unflat(vec: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Split a vector into per-layer matrices of the given shapes."""
    out, start = [], 0
    for rows, cols in shapes:
        out.append(vec[start : start + rows * cols].reshape(rows, cols))
        start += rows * cols
    return out


def dense_restriction(bases: list[LayerBasis]) -> Tensor:
    """Explicit R0 (m × N) from per-layer bases."""
    sizes = [b.numel for b in bases]
    rows = []
    offset = 0
    for basis, size in zip(bases, sizes, strict=True):
        for vec in basis.dense(dtype=torch.float64, device=torch.device("cpu")):
            row = torch.zeros(sum(sizes), dtype=torch.float64)
            row[offset : offset + size] = vec.reshape(-1)
            rows.append(row)
        offset += size
    return torch.stack(rows)


def grid_index_reference(src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Source positions picked by torch's nearest-exact down-sampling, flattened."""
    index = torch.arange(src[0] * src[1], dtype=torch.float64).reshape(1, 1, *src)
    return F.interpolate(index, size=dst, mode="nearest-exact").reshape(-1).long()


def explicit_kron_fisher(stats: list[LayerStats]) -> Tensor:
    """Full cross-layer Kronecker Fisher c_ij (G_ij ⊗ Ā_ij) (row-major vec) from explicit blocks."""
    scale = kron_scale(stats)
    rows = []
    for i, si in enumerate(stats):
        row = []
        for j, sj in enumerate(stats):
            grid = (min(si.grid[0], sj.grid[0]), min(si.grid[1], sj.grid[1]))
            ii, jj = grid_index_reference(si.grid, grid), grid_index_reference(sj.grid, grid)
            a_i, a_j = si.a[:, ii].flatten(0, 1), sj.a[:, jj].flatten(0, 1)
            g_i, g_j = si.g[:, ii].flatten(0, 1), sj.g[:, jj].flatten(0, 1)
            cross_a = a_i.T @ a_j / a_i.shape[0]
            cross_g = g_i.T @ g_j / g_i.shape[0]
            row.append(scale[i, j] * torch.kron(cross_g, cross_a))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)
