"""A toy task a from-scratch character model can learn in seconds: repeat a two-digit number.

`copy2`: prompt 'Say 47', answer '47'. Training numbers exclude a fixed held-out set. The SFT warm-up
teaches the format (two digits then EOS) with deliberately noisy digits, so the warmed-up model is right
only part of the time and RL has something to improve.
"""
from __future__ import annotations

import random
from typing import Any

from grpokit.data import TASKS
from grpokit.rewards import REWARDS, correctness

HELDOUT = list(range(10, 100, 6))  # 15 numbers never used for training


class CopyTask:
    name = "copy2"

    def __init__(self) -> None:
        self.train_pool = [n for n in range(10, 100) if n not in HELDOUT]

    @staticmethod
    def row(n: int) -> dict[str, Any]:
        return {"prompt": f"Say {n}", "answer": str(n)}

    def sample(self, n: int, rng: random.Random) -> list[dict[str, Any]]:
        return [self.row(rng.choice(self.train_pool)) for _ in range(n)]

    def heldout(self, n: int | None = None) -> list[dict[str, Any]]:
        return [self.row(x) for x in HELDOUT[:n]]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


if "copy2" not in TASKS:
    TASKS.register("copy2")(lambda target="", **options: CopyTask())


@correctness
def copy2_digits(prompts: list[str], completions: list[str], *, answer: list[str]) -> list[float]:
    """Partial credit for copy2: the share of places where the completion has the answer's character.

    Divided by the longer of the two, so only the exact answer scores 1.0 (that is what `acc` counts):
    '47' -> 1.0, '48' or '17' -> 0.5, '471' -> 2/3, '84' -> 0.0. The warmed-up model gets each digit
    right about 40% of the time, so a group of 4 samples almost never has equal rewards (all-equal
    numeric_match rewards are the common case there: about 0.7 of groups), and every step has a gradient.
    """
    out = []
    for text, gold in zip(completions, answer):
        text, gold = text.strip(), str(gold)
        out.append(sum(a == b for a, b in zip(text, gold)) / max(len(text), len(gold), 1))
    return out


if "copy2_digits" not in REWARDS:
    REWARDS.register("copy2_digits")(copy2_digits)


def noisy_pairs(n: int, *, p_digit: float, seed: int) -> list[tuple[str, str]]:
    """SFT pairs whose digits are right with probability p_digit each, else shifted by one (d -> d+1).

    With p_digit < 0.5 the most likely answer is the wrong, shifted one, so a greedy decode is mostly
    wrong while sampling is right about p_digit^2 of the time: RL must flip the mode to win.
    """
    rng = random.Random(seed)
    pool = CopyTask().train_pool
    out = []
    for _ in range(n):
        x = str(rng.choice(pool))
        y = "".join(c if rng.random() < p_digit else str((int(c) + 1) % 10) for c in x)
        out.append((f"Say {x}", y))
    return out
