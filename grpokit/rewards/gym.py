"""`reasoning_gym`: score with the reasoning-gym dataset's own `score_answer` (rows from `rg:<name>`)."""
from __future__ import annotations

import functools
import json
from typing import Any, Literal, Sequence

from grpokit.rewards.base import REWARDS, correctness
from grpokit.rewards.extract import last_answer_tag, last_boxed

#: Items the scorer dataset is built with (some datasets precompute `size` items at construction).
SCORER_SIZE = 10


@functools.lru_cache(maxsize=128)
def scorer(name: str, config_json: str = "{}") -> Any:
    """The reasoning-gym dataset object whose `score_answer` scores task `name` (cached per name+config)."""
    import reasoning_gym

    config = {**json.loads(config_json), "seed": 0, "size": SCORER_SIZE}
    return reasoning_gym.create_dataset(name, **config)


def extract_rg_answer(text: str, mode: str = "auto") -> str:
    """The answer string handed to `score_answer`.

    "auto": the last `<answer>...</answer>` (reasoning-gym's convention), else the last `\\boxed{...}`,
    else the whole completion stripped. "answer_tag" / "boxed": only that form ("" if absent).
    "none": the whole completion stripped.
    """
    if mode in ("auto", "answer_tag"):
        tag = last_answer_tag(text)
        if tag is not None or mode == "answer_tag":
            return tag or ""
    if mode in ("auto", "boxed"):
        boxed = last_boxed(text)
        if boxed is not None or mode == "boxed":
            return (boxed or "").strip()
    if mode not in ("auto", "none"):
        raise ValueError(f"reasoning_gym: extract must be 'auto', 'answer_tag', 'boxed' or 'none', got {mode!r}")
    return text.strip()


@REWARDS.register("reasoning_gym")
@correctness
def reasoning_gym(
    prompts: list[str],
    completions: list[str],
    *,
    rg_task: Sequence[str | None],
    rg_entry: Sequence[str | None],
    rg_config: Sequence[str | None] | None = None,
    extract: Literal["auto", "answer_tag", "boxed", "none"] = "auto",
) -> list[float | None]:
    """The task's own score in [0, 1] (1.0 = correct; some tasks give partial credit).

    Needs the `rg_task`, `rg_entry` (and `rg_config`) columns that `rg:<name>` rows carry; a sample
    whose row has none (a mixed-task batch) gets None (no score). See `extract_rg_answer` for `extract`.
    """
    configs = rg_config if rg_config is not None else [None] * len(completions)
    out: list[float | None] = []
    for text, task, entry, config in zip(completions, rg_task, rg_entry, configs):
        if not task or not entry:
            out.append(None)
            continue
        record = json.loads(entry) if isinstance(entry, str) else entry
        score = scorer(task, config or "{}").score_answer(extract_rg_answer(text, extract), record)
        out.append(float(score))
    return out
