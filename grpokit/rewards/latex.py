"""`math_verify`: symbolic answer checking with Hugging Face math-verify (LaTeX, `\\boxed{}`, plain numbers).

Timeout safety: math-verify bounds each parse/compare with `signal.alarm`, which only works in the main
thread. On the main thread this reward passes `timeout_s` to it; on any other thread (e.g. under
`RewardSet(timeout_s=...)`, which runs each call in a worker thread) it disables math-verify's own alarm
and relies on the caller's timeout instead. A math-verify timeout counts as "not verified" (0.0).
"""
from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any, Sequence

from grpokit.rewards.base import REWARDS, correctness


class _NoTimeoutWarning(logging.Filter):
    """Hide math-verify's "Timeout is disabled" warning: we disable it on purpose off the main thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def _alarm_seconds(timeout_s: float | None) -> int | None:
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(timeout_s))  # signal.alarm takes whole seconds


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, alarm: int | None) -> tuple[Any, ...]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # A bare reference ("2\sqrt{2}", "\frac12") parses best as LaTeX math: wrap it in $...$ first.
    delimited = "$" in gold or "\\boxed" in gold
    for text in (gold, f"${gold}$") if delimited else (f"${gold}$", gold):
        parsed = parse(text, extraction_config=config, parsing_timeout=alarm)
        if parsed:
            return tuple(parsed)
    return ()


@REWARDS.register("math_verify")
@correctness
def math_verify(
    prompts: list[str],
    completions: list[str],
    *,
    answer: Sequence[str],
    timeout_s: float | None = 5.0,
) -> list[float]:
    """1.0 if math-verify finds the completion's answer equivalent to `answer` (e.g. \\frac{1}{2} = 0.5).

    The completion's answer is its last `\\boxed{}` if any (boxed_match_priority=0), else the last LaTeX
    or plain expression. A reference that math-verify cannot parse raises (a data error).
    `timeout_s`: per parse/compare bound on the main thread (see the module docstring).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    alarm = _alarm_seconds(timeout_s)
    pred_config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    out = []
    for i, (text, gold_text) in enumerate(zip(completions, answer)):
        gold = _parse_gold(str(gold_text), alarm)
        if not gold:
            raise ValueError(
                f"math-verify could not parse the reference answer {str(gold_text)[:60]!r} of sample {i}; "
                f"write it as LaTeX (e.g. '\\frac{{1}}{{2}}') or a plain number"
            )
        pred = parse(text, extraction_config=pred_config, parsing_timeout=alarm)
        ok = bool(pred) and verify(list(gold), pred, timeout_seconds=alarm)
        out.append(1.0 if ok else 0.0)
    return out
