"""Built-in rewards that need nothing beyond the standard library: numeric_match, format, overlong."""
from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Literal, Sequence

from grpokit.rewards.base import REWARDS, correctness
from grpokit.rewards.extract import extract_number, last_boxed

#: Built-in `format` patterns: (regex, how it must match).
FORMAT_PRESETS: dict[str, tuple[str, str]] = {
    # The whole completion is one number, optionally boxed, optionally ending in a period: "81", "\boxed{81}."
    "number": (r"\s*(?:\\boxed\{\s*)?[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*\})?\s*\.?\s*", "fullmatch"),
    # DeepSeek-R1 style: <think>...</think> then <answer>...</answer> and nothing else.
    "think_answer": (r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", "fullmatch"),
    # An <answer>...</answer> block somewhere.
    "answer_tag": (r"<answer>.*?</answer>", "search"),
    # A \boxed{...} somewhere (checked with balanced braces, not this regex).
    "boxed": (r"\\boxed\{", "search"),
}


@REWARDS.register("numeric_match")
@correctness
def numeric_match(
    prompts: list[str],
    completions: list[str],
    *,
    answer: Sequence[str],
    rel_tol: float = 0.0,
) -> list[float]:
    """1.0 if the completion's answer number equals the `answer` column's number, else 0.0.

    The completion's number is the content of its last `\\boxed{...}` (nested braces fine, `\\frac{a}{b}`
    read exactly) if it has one, else its last number; commas, negatives and decimals are read
    ("1,234.50" = 1234.5). The reference goes through the same extraction, so "#### 72" works. No number
    in the completion scores 0.0; no number in the reference raises (a data error). `rel_tol` > 0
    accepts |pred - gold| <= rel_tol * |gold|.
    """
    out = []
    for i, (text, gold_text) in enumerate(zip(completions, answer)):
        gold = extract_number(str(gold_text))
        if gold is None:
            raise ValueError(
                f"reference answer {str(gold_text)[:60]!r} of sample {i} has no number; numeric_match needs "
                f"numeric answers (use math_verify for LaTeX expressions or a custom reward)"
            )
        pred = extract_number(text)
        out.append(float(pred is not None and _close(pred, gold, rel_tol)))
    return out


def _close(pred: Fraction, gold: Fraction, rel_tol: float) -> bool:
    if rel_tol == 0.0:
        return pred == gold
    return abs(float(pred - gold)) <= rel_tol * abs(float(gold))


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


@REWARDS.register("format")
def format_reward(
    prompts: list[str],
    completions: list[str],
    *,
    preset: str = "number",
    pattern: str | None = None,
    match: Literal["fullmatch", "search"] = "fullmatch",
) -> list[float]:
    """1.0 if the completion has the wanted format, else 0.0.

    preset: "number" (default: the completion is just a number, e.g. "81", "\\boxed{81}."),
    "think_answer" (`<think>...</think><answer>...</answer>`, DeepSeek-R1), "answer_tag" (an
    `<answer>...</answer>` anywhere) or "boxed" (a balanced `\\boxed{...}` anywhere).
    pattern: a custom regex (DOTALL) that overrides `preset`; `match` says whether the whole
    completion must match ("fullmatch") or any part ("search").
    """
    if pattern is None:
        if preset not in FORMAT_PRESETS:
            raise ValueError(f"format: unknown preset {preset!r}; valid: {', '.join(FORMAT_PRESETS)}, or pass pattern=")
        if preset == "boxed":
            return [float(last_boxed(c) is not None) for c in completions]
        pattern, match = FORMAT_PRESETS[preset]
    if match not in ("fullmatch", "search"):
        raise ValueError(f"format: match must be 'fullmatch' or 'search', got {match!r}")
    regex = _compile(pattern)
    test = regex.fullmatch if match == "fullmatch" else regex.search
    return [float(test(c) is not None) for c in completions]


@REWARDS.register("overlong")
def overlong(
    prompts: list[str],
    completions: list[str],
    *,
    completion_lengths: Sequence[int],
    max_len: int,
    buffer: int,
) -> list[float]:
    """DAPO soft overlong punishment (arXiv 2503.14476; SPEC section 5), added to the task reward.

    With L = completion length in tokens, L_max = `max_len` (set it to the rollout's max_new_tokens)
    and L_c = `buffer`:  0 if L <= L_max - L_c;  ((L_max - L_c) - L) / L_c if L_max - L_c < L <= L_max;
    -1 if L > L_max. Use weight 1.0 to add it as in the paper.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    start = max_len - buffer  # lengths up to here are free
    out = []
    for length in completion_lengths:
        length = int(length)
        if length <= start:
            out.append(0.0)
        elif length <= max_len:
            out.append((start - length) / buffer)
        else:
            out.append(-1.0)
    return out
