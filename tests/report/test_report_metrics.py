"""grpokit.report.metrics against brute force and numpy."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from grpokit.report.metrics import (
    avg_at_k,
    avg_at_k_per_problem,
    bootstrap_ci,
    cons_at_k,
    cons_at_k_per_problem,
    length_stats,
    majority_vote,
    pass_at_k,
    pass_at_k_per_problem,
)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all size-k subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("c", range(6))
@pytest.mark.parametrize("k", range(1, 6))
def test_pass_at_k_matches_brute_force_n5(c, k):
    assert pass_at_k(5, c, k) == pytest.approx(brute_pass_at_k(5, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 0, 8) == 0.0  # nothing correct
    assert pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 8, 8) == 1.0  # everything correct
    assert pass_at_k(8, 6, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the plain accuracy
    for n, c, k in [(5, 2, 6), (5, 6, 1), (5, -1, 1), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows float64; the product form must not.
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(200, 1000)
        c, k = rng.randint(0, n), rng.randint(1, 50)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 1.0
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-12)


def test_pass_and_avg_per_problem():
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    assert avg_at_k_per_problem(correct) == [0.25, 0.0, 1.0]
    assert avg_at_k(correct) == pytest.approx(1.25 / 3)
    assert pass_at_k_per_problem(correct, 1) == pytest.approx([0.25, 0.0, 1.0])
    assert pass_at_k_per_problem(correct, 4) == pytest.approx([1.0, 0.0, 1.0])
    # ragged: problems may have different sample counts
    assert avg_at_k([[True], [True, False]]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        avg_at_k([[True], []])
    with pytest.raises(ValueError):
        avg_at_k([])


def test_majority_vote_ties_go_to_first_seen_answer():
    assert majority_vote(["b", "a", "a", "b"]) == 0  # a/b tie: "b" appears first
    assert majority_vote(["a", "b", "b", "a"]) == 0
    assert majority_vote(["c", "a", "b", "b", "a"]) == 1  # a/b tie at 2; "a" first seen at index 1
    assert majority_vote([None, "x", None, "y", "y"]) == 3  # None does not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_cons_at_k_with_correctness_flags_and_references():
    answers = [
        ["4", "5", "5", "4"],  # tie -> "4" (first seen), which is correct
        ["7", "7", "3", None],  # majority "7", wrong
        [None, None, None, None],  # no answer -> 0
        ["1", "2", "2", "3"],  # majority "2", correct
    ]
    flags = [
        [True, False, False, True],
        [False, False, True, False],
        [False] * 4,
        [False, True, True, False],
    ]
    assert cons_at_k_per_problem(answers, flags) == [1.0, 0.0, 0.0, 1.0]
    assert cons_at_k(answers, flags) == 0.5
    refs = ["4", "3", "9", " 2 "]
    assert cons_at_k_per_problem(answers, refs) == [1.0, 0.0, 0.0, 1.0]
    # the tie-break is order-dependent by design: swapping the order flips the vote to "5"
    assert cons_at_k_per_problem([["5", "4", "4", "5"]], ["4"]) == [0.0]
    with pytest.raises(ValueError):
        cons_at_k(answers, flags[:2])


def test_length_stats_matches_numpy():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 500, size=101).tolist()
    truncated = (rng.random(101) < 0.2).tolist()
    s = length_stats(lengths, truncated)
    x = np.asarray(lengths, dtype=float)
    assert s["min"] == x.min() and s["max"] == x.max()
    assert s["q25"] == pytest.approx(np.percentile(x, 25))
    assert s["median"] == pytest.approx(np.median(x))
    assert s["q75"] == pytest.approx(np.percentile(x, 75))
    assert s["mean"] == pytest.approx(x.mean())
    assert s["truncation_rate"] == pytest.approx(sum(truncated) / 101)
    assert set(s) == {"min", "q25", "mean", "median", "q75", "max", "truncation_rate"}
    assert length_stats([1, 2, 3, 4], [False] * 4)["q25"] == pytest.approx(1.75)  # linear interpolation
    with pytest.raises(ValueError):
        length_stats([], [])
    with pytest.raises(ValueError):
        length_stats([1, 2], [True])


def test_bootstrap_ci_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.4).astype(float)
    large = (rng.random(2000) < 0.4).astype(float)
    m_s, lo_s, hi_s = bootstrap_ci(small)
    m_l, lo_l, hi_l = bootstrap_ci(large)
    assert m_s == pytest.approx(small.mean()) and m_l == pytest.approx(large.mean())
    assert lo_s < m_s < hi_s and lo_l < m_l < hi_l
    # width ~ 2 * 1.96 * sqrt(p(1-p)/n): ~0.27 at n=50, ~0.043 at n=2000 (ratio sqrt(40) ~ 6.3)
    assert 0.18 < hi_s - lo_s < 0.36
    assert (hi_s - lo_s) > 4 * (hi_l - lo_l)
    assert bootstrap_ci(small, seed=0) == (m_s, lo_s, hi_s)  # reproducible
    assert bootstrap_ci(small, seed=1) != (m_s, lo_s, hi_s)
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)  # no variation, no width
    assert bootstrap_ci(small, alpha=0.5)[2] - bootstrap_ci(small, alpha=0.5)[1] < hi_s - lo_s
    with pytest.raises(ValueError):
        bootstrap_ci([])
