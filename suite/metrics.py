"""The papers' training metric and the trivial baselines every run is judged against.

- Running train loss: both papers plot, per epoch, the mean of the train-mode mini-batch losses
  of that epoch (what the optimizer saw, BatchNorm on batch statistics), not a full pass in eval
  mode. The trainer records it per evaluation as `train_running_loss` (and `train_running_acc`
  for classifiers): the mean over the steps since the previous evaluation, so at epoch-boundary
  evaluations the epoch's running mean. Runs recorded before the column existed get the same
  numbers from metrics_steps.parquet with `running_means_from_steps`.
- Trivial baseline: the loss of the best constant predictor under the run's likelihood, fitted
  on the training targets (the per-output mean for Bernoulli and Gaussian outputs: the mean image
  of an autoencoder, the label mean of a binary classifier; the class prior for categorical).
  It is evaluated with the likelihood's own loss, so it has the run's loss reduction.
- A run *learned* when its final running train loss is at least `LEARNED_MARGIN` (5 %) below the
  baseline's train loss. This is the one definition the trainer, the report and the tests use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from core.likelihood import Likelihood

# A run learned when final train_running_loss <= (1 − LEARNED_MARGIN) · baseline_train_loss.
LEARNED_MARGIN = 0.05
# Constant probabilities are kept in [PROB_FLOOR, 1 − PROB_FLOOR] so that an output that is
# constant on the training set (MNIST's border pixels) has a finite loss on other splits.
PROB_FLOOR = 1.0e-6
# Examples per chunk when the constant predictor is scored (bounds memory on 60,000 × 784).
CHUNK = 10_000


@dataclass(frozen=True)
class Baseline:
    """The best constant predictor of a task: what it is, its raw output and its losses."""

    predictor: str  # short description, e.g. "mean image (Bernoulli)"
    output: Tensor  # the constant model output (logits or means) for one example
    losses: dict[str, float]  # split name -> mean per-example loss


def constant_output(likelihood: Likelihood, train_targets: Tensor, *, classes: int) -> Tensor:
    """The loss-minimising constant output (one example's worth) from the training targets."""
    if likelihood is Likelihood.categorical:
        counts = torch.bincount(train_targets.reshape(-1).long(), minlength=classes)
        prior = counts.to(torch.float64) / counts.sum()
        return prior.clamp_min(PROB_FLOOR).log()
    mean = train_targets.to(torch.float64).mean(dim=0)
    if likelihood is Likelihood.gaussian:
        return mean
    prob = mean.clamp(PROB_FLOOR, 1.0 - PROB_FLOOR)
    return prob.log() - (-prob).log1p()  # logit(p)


def constant_loss(likelihood: Likelihood, output: Tensor, targets: Tensor) -> float:
    """Mean per-example loss of a constant output on ``targets`` (the likelihood's reduction)."""
    total, count = 0.0, int(targets.shape[0])
    for start in range(0, count, CHUNK):
        target = targets[start : start + CHUNK]
        if target.is_floating_point():
            target = target.to(torch.float64)
        expanded = output.to(target.device).expand(target.shape[0], *output.shape)
        total += float(likelihood.per_example_nll(expanded, target).sum())
    return total / max(count, 1)


def describe_predictor(likelihood: Likelihood, *, autoencoder: bool) -> str:
    """A short name for the constant predictor of a task."""
    if likelihood is Likelihood.categorical:
        return "class prior"
    if autoencoder:
        return f"mean image ({likelihood.value})"
    return f"label mean ({likelihood.value})"


def trivial_baseline(
    likelihood: Likelihood,
    targets: dict[str, Tensor],
    *,
    autoencoder: bool,
    classes: int = 0,
) -> Baseline:
    """The best constant predictor fitted on ``targets['train']``, scored on every split given.

    ``classes`` is the number of categories (categorical only; labels beyond the training
    set's largest one still get the floor probability).
    """
    train = targets["train"]
    if likelihood is Likelihood.categorical:
        classes = max(classes, int(train.max()) + 1)
    output = constant_output(likelihood, train, classes=classes)
    losses = {name: constant_loss(likelihood, output, t) for name, t in targets.items()}
    return Baseline(describe_predictor(likelihood, autoencoder=autoencoder), output, losses)


def learned(final_running_loss: float | None, baseline_loss: float | None) -> bool | None:
    """Whether a finished run got clearly below the baseline (None when either is unknown)."""
    if final_running_loss is None or baseline_loss is None:
        return None
    if not math.isfinite(final_running_loss):
        return False
    return final_running_loss <= (1.0 - LEARNED_MARGIN) * baseline_loss


def batch_accuracy(likelihood: Likelihood, output: Tensor, target: Tensor) -> float:
    """Fraction of correct predictions in a batch: argmax for categorical, logit > 0 for binary."""
    with torch.no_grad():
        if likelihood is Likelihood.categorical:
            return float((output.argmax(dim=-1) == target).to(torch.float64).mean())
        return float(((output > 0) == (target > 0.5)).to(torch.float64).mean())


def window_mean(rows: Sequence[dict[str, float]], key: str, *, after_step: int) -> float:
    """Mean of ``key`` over the step rows with step > ``after_step`` (NaN when there are none)."""
    values = []
    for row in reversed(rows):  # rows are in step order: stop at the window's start
        if row["step"] <= after_step:
            break
        if key in row:
            values.append(row[key])
    return sum(values) / len(values) if values else math.nan


def running_means_from_steps(
    steps: pd.DataFrame, eval_steps: Sequence[int], *, key: str = "batch_loss"
) -> list[float]:
    """`train_running_loss` (or `_acc` with key="batch_acc") for runs that predate the column.

    For every evaluation step s (in order) the mean of ``key`` over the steps in (previous s, s];
    NaN for the evaluation at step 0 and for windows without steps.
    """
    out, previous = [], 0
    step, values = steps["step"].to_numpy(), steps[key].to_numpy()
    for current in eval_steps:
        mask = (step > previous) & (step <= current)
        out.append(float(values[mask].mean()) if mask.any() else math.nan)
        previous = int(current)
    return out
