"""The training step, written down once: the curvature-optimizer contract and `train_step`.

Every caller that trains (the training loop `suite.train`, the benchmarks in `bench/`, tests)
takes a step through `train_step`, so timing and tests measure what a run does.

A *curvature optimizer* (the K-FAC family) needs the forward pass recorded and, for the MC
Fisher, a backward pass of sampled targets before the loss's own backward; the order is fixed:

    optimizer.zero_grad(set_to_none=True)
    with optimizer.capture():                      # records layer inputs/outputs (stats steps)
        output = model(x)
    loss = likelihood.nll(output, target)          # mean over the batch of per-example NLLs
    optimizer.fisher_backward(output, likelihood=likelihood, target=target)
    loss.backward()
    optimizer.step(closure)                        # closure() -> batch loss (adaptive damping)

Any other torch optimizer takes the plain zero_grad / forward / backward / step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from core.likelihood import Likelihood


class RunDiverged(Exception):
    """The batch loss became non-finite or exceeded the divergence threshold."""


@runtime_checkable
class CurvatureOptimizer(Protocol):
    """What the training step needs from a curvature optimizer (see the module docstring)."""

    @property
    def is_stats_step(self) -> bool:
        """Whether the coming step updates the curvature statistics."""
        ...

    @property
    def is_inverse_step(self) -> bool:
        """Whether the coming step refreshes the curvature inverses."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameter gradients."""
        ...

    def capture(self) -> AbstractContextManager[None]:
        """Record the layer inputs/outputs of the forward pass run inside (stats steps only)."""
        ...

    def fisher_backward(
        self, output: Tensor, *, likelihood: Likelihood | str, target: Tensor
    ) -> None:
        """The curvature's own backward pass (MC Fisher: sampled targets), before the loss's."""
        ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update the parameters; ``closure()`` returns the batch loss when one is needed."""
        ...


_KEEPS_CONTRACT: dict[type, bool] = {}


def is_curvature_optimizer(optimizer: object) -> bool:
    """Whether ``optimizer`` keeps the curvature-optimizer contract (decided once per class)."""
    kind = type(optimizer)
    if kind not in _KEEPS_CONTRACT:
        _KEEPS_CONTRACT[kind] = isinstance(optimizer, CurvatureOptimizer)
    return _KEEPS_CONTRACT[kind]


class StepOutcome(NamedTuple):
    """What one step saw: the train-mode batch loss before the update and the model output."""

    loss: float
    output: Tensor  # detached; e.g. for the train-mode batch accuracy


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    likelihood: Likelihood,
    x: Tensor,
    target: Tensor,
    *,
    diverge_loss: float = math.inf,
) -> float:
    """One optimizer step on the batch (x, target); returns the batch loss before the update.

    Raises RunDiverged when the loss is not finite or above ``diverge_loss``.
    """
    return take_step(model, optimizer, likelihood, x, target, diverge_loss=diverge_loss).loss


def take_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    likelihood: Likelihood,
    x: Tensor,
    target: Tensor,
    *,
    diverge_loss: float | None = math.inf,
) -> StepOutcome:
    """`train_step`, also returning the (detached) model output of the step's forward pass;
    ``diverge_loss=None`` leaves the divergence check to the caller (e.g. after ranks agree)."""
    if is_curvature_optimizer(optimizer):
        assert isinstance(optimizer, CurvatureOptimizer)
        optimizer.zero_grad(set_to_none=True)
        with optimizer.capture():
            output = model(x)
        loss = likelihood.nll(output, target)
        optimizer.fisher_backward(output, likelihood=likelihood, target=target)
        loss.backward()

        def closure() -> Tensor:
            with torch.no_grad():
                return likelihood.nll(model(x), target)

        optimizer.step(closure)
    else:
        optimizer.zero_grad(set_to_none=True)
        output = model(x)
        loss = likelihood.nll(output, target)
        loss.backward()
        optimizer.step()
    value = float(loss.detach())
    if diverge_loss is not None and (not math.isfinite(value) or value > diverge_loss):
        raise RunDiverged(f"batch loss {value:g}")
    return StepOutcome(value, output.detach())
