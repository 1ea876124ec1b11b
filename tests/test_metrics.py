"""The papers' running train loss and the trivial baselines (suite/metrics.py, the trainer)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.likelihood import Likelihood
from datasets import load_dataset
from datasets.config import DataConfig
from suite.metrics import (
    LEARNED_MARGIN,
    batch_accuracy,
    learned,
    running_means_from_steps,
    trivial_baseline,
    window_mean,
)
from suite.store import RunStatus, read_run

D = torch.float64
RTOL = 1e3 * torch.finfo(D).eps


def entropy(p: float) -> float:
    """Binary entropy in nats."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_bernoulli_baseline_is_the_per_output_entropy_of_the_mean() -> None:
    # 8 examples, 3 outputs with means 1/4, 1/2 and 3/4 (binary targets)
    column = torch.tensor([1, 0, 0, 0, 1, 0, 0, 0], dtype=D)
    targets = torch.stack([column, column.roll(1) + column.roll(2), 1 - column], dim=1)
    base = trivial_baseline(Likelihood.bernoulli, {"train": targets}, autoencoder=True)
    expected = entropy(0.25) + entropy(0.5) + entropy(0.75)
    assert base.losses["train"] == pytest.approx(expected, rel=RTOL)
    assert base.predictor == "mean image (bernoulli)"
    assert torch.sigmoid(base.output).tolist() == pytest.approx([0.25, 0.5, 0.75], rel=RTOL)


def test_soft_targets_and_constant_pixels_keep_a_finite_loss_elsewhere() -> None:
    train = torch.tensor([[0.2, 0.0], [0.6, 0.0]], dtype=D)  # pixel 2 is always 0 in training
    test = torch.tensor([[0.4, 1.0]], dtype=D)
    base = trivial_baseline(Likelihood.bernoulli, {"train": train, "test": test}, autoencoder=True)
    p = 0.4  # cross-entropy with soft targets is minimised by their mean
    assert base.losses["train"] == pytest.approx(entropy(p) + 1e-6, rel=1e-3)
    assert math.isfinite(base.losses["test"]) and base.losses["test"] > 10


def test_categorical_baseline_is_the_prior_entropy_and_a_minimum() -> None:
    labels = torch.tensor([0, 0, 1, 2, 0, 1, 0, 2])  # prior 1/2, 1/4, 1/4
    base = trivial_baseline(Likelihood.categorical, {"train": labels}, autoencoder=False)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert base.losses["train"] == pytest.approx(expected, rel=RTOL)
    assert base.predictor == "class prior"
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # any other constant logits do worse
        other = base.output + 0.1 * torch.randn(base.output.shape, generator=gen, dtype=D)
        worse = Likelihood.categorical.nll(other.expand(8, 3), labels)
        assert float(worse) > base.losses["train"]


def test_gaussian_baseline_is_half_the_summed_variance() -> None:
    gen = torch.Generator().manual_seed(1)
    targets = torch.randn(50, 4, generator=gen, dtype=D) * torch.tensor(
        [1.0, 2.0, 0.5, 3.0], dtype=D
    )
    base = trivial_baseline(Likelihood.gaussian, {"train": targets}, autoencoder=False)
    expected = 0.5 * float(targets.var(dim=0, unbiased=False).sum())
    assert base.losses["train"] == pytest.approx(expected, rel=RTOL)
    assert base.predictor == "label mean (gaussian)"


def test_binary_label_mean_and_accuracy() -> None:
    labels = torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=D)
    base = trivial_baseline(Likelihood.bernoulli, {"train": labels}, autoencoder=False)
    assert base.losses["train"] == pytest.approx(entropy(0.75), rel=RTOL)
    assert base.predictor == "label mean (bernoulli)"
    logits = torch.tensor([[2.0], [0.5], [-1.0], [3.0]], dtype=D)
    assert batch_accuracy(Likelihood.bernoulli, logits, labels) == 0.5
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert batch_accuracy(Likelihood.categorical, scores, torch.tensor([1, 1, 1])) == 2 / 3


def test_learned_means_clearly_below_the_baseline() -> None:
    assert learned((1 - LEARNED_MARGIN) * 100.0, 100.0) is True
    assert learned((1 - LEARNED_MARGIN) * 100.0 + 1e-6, 100.0) is False
    assert learned(math.nan, 100.0) is False
    assert learned(None, 100.0) is None and learned(1.0, None) is None


def test_window_means_match_the_analysis_fallback() -> None:
    rows = [{"step": s, "batch_loss": float(s * s), "epoch": s / 4} for s in range(1, 13)]
    evals = [0, 4, 8, 12]
    # the trainer's view at an evaluation: the rows up to that step, the previous evaluation
    trainer_side = [window_mean(rows[:e], "batch_loss", after_step=e - 4) for e in (4, 8, 12)]
    fallback = running_means_from_steps(pd.DataFrame(rows), evals)
    assert math.isnan(fallback[0])
    assert fallback[1:] == trainer_side == [7.5, 43.5, 111.5]  # means of s² over each epoch


def test_run_records_running_loss_accuracy_and_baseline(
    run_job: Callable[..., tuple[RunStatus, Path]],
) -> None:
    status, folder = run_job(
        "model=deep_linear", "model.depth=2", "optimizer=sgd", "trainer.batch_size=500",
        "trainer.epochs=2", "data.max_train=2000",
    )  # fmt: skip
    assert status is RunStatus.COMPLETED
    run = read_run(folder)
    steps, evals = run.steps, run.evals
    per_epoch = steps.groupby(steps["epoch"].apply(math.ceil))
    assert evals["train_running_loss"].iloc[1:].tolist() == pytest.approx(
        per_epoch["batch_loss"].mean().tolist(), rel=1e-12
    )
    assert evals["train_running_acc"].iloc[1:].tolist() == pytest.approx(
        per_epoch["batch_acc"].mean().tolist(), rel=1e-12
    )
    assert math.isnan(evals["train_running_loss"].iloc[0])  # nothing trained before step 0
    assert evals["test_acc"].between(0, 1).all()  # binary accuracy of the toy, eval mode
    summary = run.summary
    data = load_dataset("teacher", DataConfig(max_train=2000), device=torch.device("cpu"), seed=0)
    labels = data.train.y.double().mean()  # the label mean of the run's training split
    assert summary["baseline_train_loss"] == pytest.approx(entropy(float(labels)), rel=1e-6)
    assert summary["baseline_predictor"] == "label mean (bernoulli)"
    assert summary["final_train_running_loss"] == evals["train_running_loss"].iloc[-1]
    expected = summary["final_train_running_loss"] <= 0.95 * summary["baseline_train_loss"]
    assert summary["learned"] is expected
