"""The study's statistics against hand-computed cases (analyze/stats.py, issue 17)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from analyze.stats import (
    StudyVerdict,
    compare_paired,
    holm,
    judge,
    min_exact_p,
    pairs_for_family,
    sign_flip_p,
    sign_flip_p_one_sided,
    tost_p,
    verdict_of,
    wilcoxon_exact_p,
)


def brute_force_p(d: list[float]) -> float:
    """Two-sided sign-flip p by listing the patterns one by one (independent of numpy tricks)."""
    observed = abs(sum(d))
    hits = 0
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    for signs in patterns:
        if abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed - 1e-12:
            hits += 1
    return hits / len(patterns)


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # only all-plus and all-minus reach |6|
        ([3.0, 1.0, 1.0], 2 / 8),  # sums ±5, ±3 (twice), ±1: |s| ≥ 5 twice
        ([3.0, -1.0, 1.0], 6 / 8),  # |s| ≥ 3: 5, 3, 3 and their negatives
        ([1.0, -1.0], 1.0),  # observed sum 0: every pattern counts
        ([0.5], 1.0),  # one pair: both signs reach |0.5|
    ],
)
def test_sign_flip_p_hand_cases(d: list[float], expected: float) -> None:
    assert sign_flip_p(d) == pytest.approx(expected, rel=1e3 * np.finfo(float).eps)
    assert sign_flip_p(d) == pytest.approx(brute_force_p(d), rel=1e3 * np.finfo(float).eps)


def test_sign_flip_p_matches_brute_force_on_random_differences() -> None:
    rng = np.random.default_rng(3)
    for n in range(1, 9):
        d = list(rng.normal(0.3, 1.0, size=n))
        assert sign_flip_p(d) == pytest.approx(brute_force_p(d), abs=1e-12)


def test_smallest_attainable_p_is_two_over_two_to_the_n() -> None:
    for n in range(1, 11):
        assert sign_flip_p(np.ones(n)) == pytest.approx(min_exact_p(n))
    # With 4 comparisons at alpha 0.05 Holm needs 0.0125: n = 7 pairs cannot, n = 8 can.
    assert min_exact_p(7) > 0.05 / 4 > min_exact_p(8)


def test_pairs_for_family_is_where_holm_starts_rejecting_a_family_at_its_floor() -> None:
    """With n pairs, a family of m comparisons each at its floor p: Holm rejects all of them
    exactly when n >= pairs_for_family(m), and none of them with one pair fewer."""
    for m in (1, 4, 23, 25, 26, 28, 51, 52):
        n = pairs_for_family(m)
        assert all(p < 0.05 for p in holm([sign_flip_p(np.ones(n))] * m)), (m, n)
        assert not any(p < 0.05 for p in holm([sign_flip_p(np.ones(n - 1))] * m)), (m, n)
    assert pairs_for_family(25) == 10 < pairs_for_family(26) == 11 == pairs_for_family(51)


def test_one_sided_p() -> None:
    assert sign_flip_p_one_sided([1.0, 2.0, 3.0], greater=True) == pytest.approx(1 / 8)
    assert sign_flip_p_one_sided([1.0, 2.0, 3.0], greater=False) == pytest.approx(1.0)


def test_exact_wilcoxon_matches_the_signed_rank_count() -> None:
    # all three positive: W+ = 6 is the most extreme of 8 equally likely rank-sign patterns
    assert wilcoxon_exact_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert wilcoxon_exact_p([0.0, 0.0]) != wilcoxon_exact_p([0.0, 0.0])  # NaN: nothing to rank


def test_holm_ordering_monotonicity_and_cap() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # step-down keeps order monotone
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan, 0.01])
    assert math.isnan(adjusted[1])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)  # m = 2


def test_tost_edge_cases() -> None:
    assert tost_p([0.0, 0.0, 0.0], margin=0.0) == 1.0  # a zero margin can never be shown
    assert tost_p([0.0, 0.0, 0.0], margin=1.0) == pytest.approx(1 / 8)  # each side: 1 of 8
    assert tost_p([0.0] * 5, margin=1.0) == pytest.approx(1 / 32)
    assert tost_p([0.0], margin=1.0) == pytest.approx(0.5)  # one pair never shows equivalence
    assert tost_p([2.0, 2.0, 2.0], margin=1.0) == pytest.approx(1.0)  # all beyond the margin
    # exactly on the margin: d - m = 0 on the upper side, every pattern ties, p = 1
    assert tost_p([1.0, 1.0, 1.0], margin=1.0) == pytest.approx(1.0)


def test_compare_pairs_by_seed_and_drops_unpaired_or_non_finite() -> None:
    a = {1: 10.0, 2: 11.0, 3: 12.0, 4: math.inf, 5: 1.0}
    b = {1: 11.0, 2: 12.0, 3: 13.5, 4: 10.0}
    c = compare_paired("a vs b", "a", "b", a, b)
    assert c.seeds == (1, 2, 3)
    assert c.mean_diff == pytest.approx((-1 - 1 - 1.5) / 3)
    assert c.b_mean == pytest.approx(12.166666666666666)
    assert c.margin == pytest.approx(0.01 * 12.166666666666666)
    assert c.p_diff == pytest.approx(2 / 8)
    assert c.ci_low < c.mean_diff < c.ci_high


def test_verdicts_follow_the_stated_rule() -> None:
    assert verdict_of(-1.0, 0.01, 0.9) is StudyVerdict.BETTER
    assert verdict_of(+1.0, 0.01, 0.9) is StudyVerdict.WORSE
    assert verdict_of(0.001, 0.6, 0.01) is StudyVerdict.EQUIVALENT
    assert verdict_of(-1.0, 0.06, 0.2) is StudyVerdict.INCONCLUSIVE
    assert verdict_of(0.0, 0.0, 0.9) is StudyVerdict.INCONCLUSIVE
    # a consistent difference inside the margin is equivalent, not better
    assert verdict_of(-0.001, 0.01, 0.01) is StudyVerdict.EQUIVALENT


def test_holm_turns_a_lone_raw_significance_into_inconclusive() -> None:
    # 6 pairs all improving: raw p = 2/64 = 0.03125 < 0.05; with a second comparison in the
    # family Holm doubles it to 0.0625 and the verdict is no longer `better`.
    seeds = range(6)
    better = compare_paired("x", "a", "b", {s: 1.0 for s in seeds}, {s: 2.0 + s for s in seeds})
    noise = compare_paired("y", "c", "d", {s: float(s % 2) for s in seeds}, {s: 0.5 for s in seeds})
    alone = judge([better])[0]
    assert alone.verdict is StudyVerdict.BETTER
    family = judge([better, noise])
    assert family[0].p_diff_holm == pytest.approx(2 * 2 / 64)
    assert family[0].verdict is StudyVerdict.INCONCLUSIVE


def test_equivalence_verdict_names_the_margin() -> None:
    seeds = range(8)
    a = {s: 100.0 + 0.01 * (s % 3) for s in seeds}
    b = {s: 100.0 for s in seeds}
    judged = judge([compare_paired("eq", "a", "b", a, b)])[0]
    assert judged.verdict is StudyVerdict.EQUIVALENT
    assert judged.verdict_text() == "equivalent within ±1"
