"""Evaluation metrics (SPEC section 9): pure functions of per-sample correctness, answers and lengths.

Glossary: a *problem* is one held-out row; it gets k sampled completions. Every accuracy is first
computed per problem, then averaged, so `bootstrap_ci` can resample problems (the unit of variation:
the k samples of one problem are not independent).

Only numpy and the standard library; no torch, no I/O.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

# Resamples x problems drawn at once by `bootstrap_ci`; bounds its memory to ~8 MB of int64 indices.
BOOTSTRAP_CHUNK_ELEMS = 1_000_000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374).

    pass@k = 1 - C(n-c, k) / C(n, k), the probability that a random size-k subset of the n samples
    holds at least one correct one. Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which
    never forms the (huge) binomials, so it is exact to float rounding for any n.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n (draw at least k samples per problem), got n={n}, k={k}")
    if n - c < k:  # every size-k subset holds a correct sample
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)  # [c]
    return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_per_problem(correct: Sequence[Sequence[bool]], k: int) -> list[float]:
    """pass@k of each problem, with n = its number of samples and c = its number of correct ones."""
    return [pass_at_k(len(row), int(sum(bool(x) for x in row)), k) for row in correct]


def avg_at_k_per_problem(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Fraction of each problem's samples that are correct (rows may have different lengths)."""
    out = []
    for i, row in enumerate(correct):
        if len(row) == 0:
            raise ValueError(f"problem {i} has no samples; avg@k needs k >= 1 samples per problem")
        out.append(sum(bool(x) for x in row) / len(row))
    return out


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """avg@k: mean over problems of the fraction of its k samples that are correct."""
    per = avg_at_k_per_problem(correct)
    if not per:
        raise ValueError("avg@k of zero problems is undefined; pass at least one problem")
    return float(np.mean(per))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    `None` answers (extraction failed) do not vote. Ties go to the answer that appears FIRST in sample
    order, and the returned index is that answer's first occurrence: deterministic, independent of
    hashing and of how the answers sort.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, a in enumerate(answers):
        if a is not None and counts[a] == best:
            return i
    raise AssertionError("unreachable")


def cons_at_k_per_problem(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]] | Sequence[str | None],
) -> list[float]:
    """cons@k of each problem: 1.0 when the majority-voted answer is correct, else 0.0.

    `correct` is either per-sample correctness (a list of bool lists parallel to `answers`; the voted
    answer takes the correctness of its first occurrence, so the reward function stays the judge of
    equivalence), or one reference answer per problem (compared by string equality after `strip()`).
    A problem where no sample has an answer scores 0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"cons@k got {len(answers)} answer lists but {len(correct)} correctness entries")
    out = []
    for i, (ans, ref) in enumerate(zip(answers, correct)):
        j = majority_vote(ans)
        if j is None:
            out.append(0.0)
        elif ref is None or isinstance(ref, str):
            out.append(float(ref is not None and ans[j].strip() == ref.strip()))
        else:
            if len(ref) != len(ans):
                raise ValueError(f"problem {i}: {len(ans)} answers but {len(ref)} correctness flags")
            out.append(float(bool(ref[j])))
    return out


def cons_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]] | Sequence[str | None],
) -> float:
    """cons@k (majority vote accuracy): mean of `cons_at_k_per_problem` over problems."""
    per = cons_at_k_per_problem(answers, correct)
    if not per:
        raise ValueError("cons@k of zero problems is undefined; pass at least one problem")
    return float(np.mean(per))


def length_stats(lengths: Sequence[int | float], truncated: Sequence[bool]) -> dict[str, float]:
    """Response-length distribution: min, q25, mean, median, q75, max (in tokens) and truncation_rate.

    Quartiles use numpy's default (linear interpolation between order statistics).
    """
    x = np.asarray(lengths, dtype=np.float64)  # [N]
    t = np.asarray(truncated, dtype=bool)  # [N]
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"length_stats needs a non-empty 1-D list of lengths, got shape {x.shape}")
    if t.shape != x.shape:
        raise ValueError(f"length_stats got {x.size} lengths but {t.size} truncated flags")
    q25, median, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    return {
        "min": float(x.min()),
        "q25": float(q25),
        "mean": float(x.mean()),
        "median": float(median),
        "q75": float(q75),
        "max": float(x.max()),
        "truncation_rate": float(t.mean()),
    }


def bootstrap_ci(
    per_problem_values: Sequence[float],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean over problems: returns (mean, lo, hi), a 1-alpha interval.

    Resamples problems with replacement `n_resamples` times (SPEC section 9: 1000) with
    `numpy.random.default_rng(seed)`, so the interval is reproducible. `mean` is the plain sample mean.
    """
    x = np.asarray(per_problem_values, dtype=np.float64)  # [N]
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs at least one per-problem value")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMS // n)
    means = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))  # [R, N]
        means.append(x[idx].mean(axis=1))  # [R]
    lo, hi = np.quantile(np.concatenate(means), [alpha / 2, 1 - alpha / 2])
    mean = float(x.mean())
    # The percentile interval of a mean contains the sample mean except in float rounding; clamp so
    # callers can rely on lo <= mean <= hi.
    return mean, float(min(lo, mean)), float(max(hi, mean))

