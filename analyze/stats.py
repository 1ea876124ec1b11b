"""Statistics over seeds: mean ± std, time-to-target with bootstrap CIs, paired tests, profiles.

Conventions (also stated in the report):
- std is the sample standard deviation (ddof = 1) over seeds; undefined for one seed.
- Time-to-target is read off the seed-mean train-loss curve (seeds aligned on their shared
  evaluation steps): the first evaluation at which the mean is at or below the target. Its
  wall-clock is the seed-mean wall-clock of that evaluation, its epochs that evaluation's epoch.
  A curve that never gets there has time ``inf``.
- Default target: the mean over seeds of the final train loss of the strongest first-order
  baseline (the sgd/adam optimizer with the lowest such mean) on the same benchmark and data
  variant. That baseline therefore reaches it at its last evaluation at the latest.
- Confidence intervals of times and speed-ups: percentile bootstrap over seeds (2,000
  resamples, seeds resampled independently per optimizer, the target recomputed from each
  resample of the baseline), so the CI carries the target's own uncertainty.
- Two-level minus K-FAC: paired by seed, two-sided paired t-test (scipy.stats.ttest_rel).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pandas as pd
from scipy import stats

from analyze.aggregate import AlignedSeeds

N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0
ALPHA = 0.05
R_MAX = 4.0
_TARGET_RTOL = 1e-12


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation over ``n`` seeds."""

    mean: float
    std: float
    n: int


def mean_std(values: Sequence[float] | np.ndarray) -> MeanStd:
    """Mean and sample std (ddof = 1; NaN below two values) of the finite values."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return MeanStd(float(array.mean()), std, int(array.size))


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class TargetResult:
    """Time-to-target of one optimizer group on one problem."""

    wall_s: Interval
    epochs: Interval
    speedup_wall: Interval  # baseline time / this time (> 1: faster than the baseline)
    speedup_epochs: Interval
    seeds_reaching: int
    n_seeds: int


def _reach_index(means: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First column at or below target per row, and whether any column got there."""
    reached = means <= (target + _TARGET_RTOL * np.abs(target))[:, None]
    return reached.argmax(axis=1), reached.any(axis=1)


def _times(
    aligned: AlignedSeeds, metric: str, idx: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and epochs to target of the mean curves of the resamples ``idx``."""
    means = aligned.columns[metric][idx].mean(axis=1)
    walls = aligned.columns["wall_time_s"][idx].mean(axis=1)
    epochs = aligned.columns["epoch"][idx].mean(axis=1)
    first, any_reached = _reach_index(means, target)
    rows = np.arange(idx.shape[0])
    wall = np.where(any_reached, walls[rows, first], np.inf)
    epoch = np.where(any_reached, epochs[rows, first], np.inf)
    return wall, epoch


def _quantiles(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(samples, [0.025, 0.975], method="inverted_cdf")
    return float(low), float(high)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(numerator / denominator, dtype=float)


def baseline_target(aligned: AlignedSeeds, metric: str) -> float:
    """Mean over seeds of the final (last shared evaluation) value of ``metric``."""
    return float(aligned.columns[metric][:, -1].mean())


def times_to_target(
    groups: Mapping[str, AlignedSeeds],
    *,
    baseline: str,
    metric: str,
    target: float | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, dict[str, TargetResult]]:
    """Target and each group's time-to-target with bootstrap CIs and speed-up vs ``baseline``.

    ``target`` None: the baseline's mean final ``metric`` (recomputed in every resample).
    """
    rng = np.random.default_rng(seed)
    base = groups[baseline]
    fixed_target = target is not None
    point_target = float(target) if target is not None else baseline_target(base, metric)
    point_idx = {name: np.arange(len(g.seeds))[None, :] for name, g in groups.items()}
    boot_idx = {
        name: rng.integers(0, len(g.seeds), size=(n_bootstrap, len(g.seeds)))
        for name, g in groups.items()
    }
    if fixed_target:
        boot_target = np.full(n_bootstrap, point_target)
    else:
        boot_target = base.columns[metric][boot_idx[baseline], -1].mean(axis=1)
    point = {
        name: _times(g, metric, point_idx[name], np.array([point_target]))
        for name, g in groups.items()
    }
    boot = {name: _times(g, metric, boot_idx[name], boot_target) for name, g in groups.items()}
    results: dict[str, TargetResult] = {}
    for name, group in groups.items():
        wall, epoch = point[name][0][0], point[name][1][0]
        base_wall, base_epoch = point[baseline][0][0], point[baseline][1][0]
        finals = group.columns[metric]
        reaching = int(np.sum(np.any(finals <= point_target * (1 + _TARGET_RTOL), axis=1)))
        results[name] = TargetResult(
            wall_s=Interval(float(wall), *_quantiles(boot[name][0])),
            epochs=Interval(float(epoch), *_quantiles(boot[name][1])),
            speedup_wall=Interval(
                float(_ratio(np.array(base_wall), np.array(wall))),
                *_quantiles(_ratio(boot[baseline][0], boot[name][0])),
            ),
            speedup_epochs=Interval(
                float(_ratio(np.array(base_epoch), np.array(epoch))),
                *_quantiles(_ratio(boot[baseline][1], boot[name][1])),
            ),
            seeds_reaching=reaching,
            n_seeds=len(group.seeds),
        )
    return point_target, results


class Verdict(str, Enum):
    """Outcome of the paired two-level vs K-FAC comparison (lower loss is better)."""

    TWO_LEVEL_BETTER = "two-level better"
    KFAC_BETTER = "K-FAC better"
    NO_DIFFERENCE = "no significant difference"
    TOO_FEW = "too few paired seeds"


@dataclass(frozen=True)
class PairedResult:
    """Two-level minus K-FAC over seeds both completed, with a paired t-test."""

    n: int
    seeds: tuple[int, ...]
    two_level_mean: float
    kfac_mean: float
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    t_stat: float
    p_value: float
    verdict: Verdict

    @property
    def relative_diff(self) -> float:
        """Mean difference as a fraction of K-FAC's mean."""
        return self.mean_diff / self.kfac_mean if self.kfac_mean else math.nan


def paired_difference(
    two_level: Mapping[int, float], kfac: Mapping[int, float], *, alpha: float = ALPHA
) -> PairedResult:
    """Pair by seed (finite values in both), test the mean difference against zero."""
    seeds = tuple(
        sorted(
            s
            for s in set(two_level) & set(kfac)
            if math.isfinite(two_level[s]) and math.isfinite(kfac[s])
        )
    )
    a = np.array([two_level[s] for s in seeds], dtype=float)
    b = np.array([kfac[s] for s in seeds], dtype=float)
    n = len(seeds)
    if n < 2:
        nan = math.nan
        diff = float(a[0] - b[0]) if n == 1 else nan
        return PairedResult(
            n,
            seeds,
            float(a.mean()) if n else nan,
            float(b.mean()) if n else nan,
            diff,
            nan,
            nan,
            nan,
            nan,
            nan,
            Verdict.TOO_FEW,
        )
    d = a - b
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * std / math.sqrt(n))
    if std == 0.0:
        t_stat, p_value = math.nan, math.nan
    else:
        test = stats.ttest_rel(a, b)
        t_stat, p_value = float(test.statistic), float(test.pvalue)
    if math.isfinite(p_value) and p_value < alpha:
        verdict = Verdict.TWO_LEVEL_BETTER if d.mean() < 0 else Verdict.KFAC_BETTER
    else:
        verdict = Verdict.NO_DIFFERENCE
    mean_diff = float(d.mean())
    return PairedResult(
        n,
        seeds,
        float(a.mean()),
        float(b.mean()),
        mean_diff,
        std,
        mean_diff - half,
        mean_diff + half,
        t_stat,
        p_value,
        verdict,
    )


@dataclass(frozen=True)
class Profile:
    """Performance profile: fraction of problems each optimizer solves within τ × the best."""

    tau: np.ndarray
    fractions: dict[str, np.ndarray]
    ratios: pd.DataFrame  # problems × optimizers, time / best time (inf: not solved)
    r_max: float


def performance_profile(times: pd.DataFrame, *, r_max: float = R_MAX, points: int = 400) -> Profile:
    """AlgoPerf-style profile of ``times`` (rows: problems, columns: optimizers; NaN/inf: unsolved).

    A problem's ratio is an optimizer's time over the fastest time on it; ratios above ``r_max``
    count as unsolved; ρ(τ) is the fraction of all problems with ratio ≤ τ, τ in [1, r_max].
    """
    clean = times.astype(float).replace([np.inf, -np.inf], np.nan)
    best = clean.min(axis=1, skipna=True)
    ratios = clean.div(best, axis=0).fillna(np.inf)
    ratios = ratios.where(ratios <= r_max, np.inf)
    tau = np.linspace(1.0, r_max, points)
    n_problems = max(len(ratios), 1)
    fractions = {
        str(name): np.array([(ratios[name] <= t).sum() / n_problems for t in tau])
        for name in ratios.columns
    }
    return Profile(tau=tau, fractions=fractions, ratios=ratios, r_max=r_max)
