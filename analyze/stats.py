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
- Paired comparisons (two-level vs K-FAC, the study's comparisons): paired by seed, exact
  sign-flip p, Holm over the comparisons reported together, sign-flip TOST; see below.
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


# ------------------------------------------------------------------- study comparisons (#17)
# The study's verdict for one comparison "A vs B" (lower loss is better), stated up front:
# paired by seed, d = A - B; exact two-sided sign-flip permutation p of the mean difference;
# Holm's step-down correction across every comparison reported together; exact sign-flip TOST
# with margin ±m, m = EQUIVALENCE_MARGIN_REL × mean(B) (B is the reference of the comparison),
# its p also Holm-corrected over the same family. Verdict: `equivalent within ±m` when the
# adjusted TOST p < ALPHA; else `better`/`worse` when the adjusted difference p < ALPHA (by the
# sign of the mean difference); else `inconclusive`.
EQUIVALENCE_MARGIN_REL = 0.01
MAX_EXACT_PAIRS = 20  # 2^20 sign patterns; beyond this the exact test is refused


class StudyVerdict(str, Enum):
    """The only four words a study comparison may end in."""

    BETTER = "better"
    WORSE = "worse"
    EQUIVALENT = "equivalent"
    INCONCLUSIVE = "inconclusive"


def _sign_patterns(n: int) -> np.ndarray:
    """All 2^n vectors of ±1 (rows), the first row all +1."""
    if n > MAX_EXACT_PAIRS:
        raise ValueError(f"exact sign-flip test refused for n = {n} > {MAX_EXACT_PAIRS} pairs")
    codes = np.arange(2**n, dtype=np.int64)[:, None]
    bits = (codes >> np.arange(n, dtype=np.int64)[None, :]) & 1
    return np.asarray(1 - 2 * bits, dtype=float)


def _flip_sums(d: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Sums of every sign pattern of ``d``, the observed sum and a round-off tolerance."""
    sums = _sign_patterns(d.size) @ d
    tol = 64 * np.finfo(float).eps * float(np.abs(d).sum())
    return sums, float(d.sum()), tol


def sign_flip_p(differences: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided permutation p of paired differences against a zero mean.

    Under H0 each difference is symmetric about 0, so all 2^n sign patterns are equally likely;
    p is the fraction whose |sum| is at least the observed |sum| (the observed pattern counts).
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan
    sums, observed, tol = _flip_sums(d)
    return float(np.mean(np.abs(sums) >= abs(observed) - tol))


def sign_flip_p_one_sided(differences: Sequence[float] | np.ndarray, *, greater: bool) -> float:
    """Exact one-sided sign-flip p: H1 mean > 0 (``greater``) or mean < 0."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan
    sums, observed, tol = _flip_sums(d)
    hits = sums >= observed - tol if greater else sums <= observed + tol
    return float(np.mean(hits))


def wilcoxon_exact_p(differences: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided Wilcoxon signed-rank p (zero differences dropped; NaN when none left)."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return math.nan
    return float(stats.wilcoxon(d, method="exact").pvalue)


def tost_p(differences: Sequence[float] | np.ndarray, *, margin: float) -> float:
    """Exact sign-flip TOST p for |mean difference| < ``margin`` (max of the two one-sided p).

    Lower test: H0 mean ≤ -margin, statistic d + margin; upper: H0 mean ≥ margin, d - margin.
    A margin ≤ 0 cannot be shown, p = 1.
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0 or not math.isfinite(margin):
        return math.nan
    if margin <= 0:
        return 1.0
    lower = sign_flip_p_one_sided(d + margin, greater=True)
    upper = sign_flip_p_one_sided(d - margin, greater=False)
    return max(lower, upper)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given; NaN stays NaN, not counted)."""
    values = [float(p) for p in p_values]
    finite = [i for i, p in enumerate(values) if math.isfinite(p)]
    m = len(finite)
    order = sorted(finite, key=lambda i: values[i])
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """One paired comparison A vs B over the seeds both arms have usable runs for."""

    label: str
    a: str
    b: str
    seeds: tuple[int, ...]
    a_mean: float
    b_mean: float
    mean_diff: float
    ci_low: float  # 95 % t-interval of the mean paired difference
    ci_high: float
    margin: float
    p_diff: float  # exact sign-flip, unadjusted
    p_wilcoxon: float
    p_tost: float

    @property
    def n(self) -> int:
        """Number of seed pairs."""
        return len(self.seeds)

    @property
    def relative_diff(self) -> float:
        """Mean difference as a fraction of B's mean."""
        return self.mean_diff / self.b_mean if self.b_mean else math.nan


def compare_paired(
    label: str,
    a: str,
    b: str,
    a_values: Mapping[int, float],
    b_values: Mapping[int, float],
    *,
    margin_rel: float = EQUIVALENCE_MARGIN_REL,
    alpha: float = ALPHA,
) -> Comparison:
    """Pair ``a_values`` and ``b_values`` by seed (finite in both) and test them."""
    seeds = tuple(
        sorted(
            s
            for s in set(a_values) & set(b_values)
            if math.isfinite(a_values[s]) and math.isfinite(b_values[s])
        )
    )
    x = np.array([a_values[s] for s in seeds], dtype=float)
    y = np.array([b_values[s] for s in seeds], dtype=float)
    d = x - y
    n = len(seeds)
    nan = math.nan
    b_mean = float(y.mean()) if n else nan
    mean_diff = float(d.mean()) if n else nan
    if n >= 2:
        half = float(stats.t.ppf(1 - alpha / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
        low, high = mean_diff - half, mean_diff + half
    else:
        low = high = nan
    margin = abs(margin_rel * b_mean) if n else nan
    return Comparison(
        label=label,
        a=a,
        b=b,
        seeds=seeds,
        a_mean=float(x.mean()) if n else nan,
        b_mean=b_mean,
        mean_diff=mean_diff,
        ci_low=low,
        ci_high=high,
        margin=margin,
        p_diff=sign_flip_p(d) if n else nan,
        p_wilcoxon=wilcoxon_exact_p(d) if n else nan,
        p_tost=tost_p(d, margin=margin) if n else nan,
    )


@dataclass(frozen=True)
class Judged:
    """A comparison with its Holm-adjusted p-values and verdict."""

    comparison: Comparison
    p_diff_holm: float
    p_tost_holm: float
    verdict: StudyVerdict

    def verdict_text(self) -> str:
        """The verdict word, the margin spelled out for `equivalent`."""
        if self.verdict is StudyVerdict.EQUIVALENT:
            return f"equivalent within ±{fmt_number(self.comparison.margin)}"
        return self.verdict.value


def fmt_number(value: float) -> str:
    """Four significant digits (the report's precision for losses and margins)."""
    return f"{value:.4g}"


def verdict_of(
    mean_diff: float, p_diff_holm: float, p_tost_holm: float, *, alpha: float = ALPHA
) -> StudyVerdict:
    """The decision rule (lower is better): equivalence first, then a difference.

    A difference shown to lie inside ±m is called equivalent even when its sign is also
    significant: the margin is, by its definition, the smallest difference that matters.
    """
    if math.isfinite(p_tost_holm) and p_tost_holm < alpha:
        return StudyVerdict.EQUIVALENT
    if math.isfinite(p_diff_holm) and p_diff_holm < alpha and mean_diff != 0:
        return StudyVerdict.BETTER if mean_diff < 0 else StudyVerdict.WORSE
    return StudyVerdict.INCONCLUSIVE


def judge(comparisons: Sequence[Comparison], *, alpha: float = ALPHA) -> list[Judged]:
    """Holm-correct the family of comparisons reported together and give each its verdict."""
    p_diff = holm([c.p_diff for c in comparisons])
    p_tost = holm([c.p_tost for c in comparisons])
    return [
        Judged(c, pd_, pt, verdict_of(c.mean_diff, pd_, pt, alpha=alpha))
        for c, pd_, pt in zip(comparisons, p_diff, p_tost, strict=True)
    ]


def min_exact_p(n: int) -> float:
    """Smallest two-sided sign-flip p attainable with ``n`` pairs (2 / 2^n)."""
    return min(1.0, 2.0 / 2**n)


def pairs_for_family(family: int, *, alpha: float = ALPHA) -> int:
    """Fewest pairs with which every comparison of a Holm family of ``family`` can still reach
    p Holm < ``alpha``: the smallest n with (2 / 2^n) · family < alpha (Holm's first multiplier is
    the family size, so with fewer pairs a family of comparisons all at their floor rejects none).
    """
    if family < 1:
        return 0
    n = 1
    while min_exact_p(n) * family >= alpha:
        n += 1
    return n
