"""`arith`: an offline integer-arithmetic task ("What is 23 + 58? Answer with just the number.").

The default (a + b, operands 0-99) is the smoke-test task: SmolLM2-135M-Instruct gets about a quarter
right before training, so GRPO groups have reward variance from step 0.

Held-out split: a fixed set of `heldout_size` distinct problems drawn from `Random(heldout_seed)`;
training sampling rejects those problems (compared as (a, op, b)), so the two never overlap whatever
`rng` the trainer passes. Sampling is stateless: all randomness comes from the `rng` argument.
"""
from __future__ import annotations

import random
from typing import Any

from grpokit.data.task import TASKS, Row

#: Supported operators. "-" may go negative unless allow_negative=False; "/" is exact integer division.
OPS = ("+", "-", "*", "/")
#: Rejection-sampling budget per training row before giving up (only hit when held-out ≈ problem space).
MAX_TRIES_PER_ROW = 1000

Problem = tuple[int, str, int]


class ArithTask:
    """Integer arithmetic problems `a op b` with string-integer answers."""

    def __init__(
        self,
        *,
        ops: tuple[str, ...] | list[str] = ("+",),
        min_digits: int = 1,
        max_digits: int = 2,
        allow_negative: bool = True,
        prompt_template: str = "What is {a} {op} {b}?",
        prompt_suffix: str = " Answer with just the number.",
        heldout_size: int = 500,
        heldout_seed: int = 1234,
    ) -> None:
        ops = tuple(ops)
        bad = [o for o in ops if o not in OPS]
        if not ops or bad:
            raise ValueError(f"arith: ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"arith: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.name = "arith"
        self.ops = ops
        self.lo = 0 if min_digits == 1 else 10 ** (min_digits - 1)  # smallest operand
        self.hi = 10**max_digits - 1  # largest operand
        self.allow_negative = allow_negative
        self.prompt_template = prompt_template
        self.prompt_suffix = prompt_suffix
        self.heldout_size = heldout_size
        space = self.num_problems()
        if heldout_size > space // 2:
            raise ValueError(
                f"arith: heldout_size = {heldout_size} would take over half of the {space} possible "
                f"problems (ops {list(ops)}, operands {self.lo}..{self.hi}); lower heldout_size or "
                f"raise max_digits"
            )
        self._heldout = self._make_heldout(random.Random(heldout_seed), heldout_size)
        self._heldout_keys = set(self._heldout)

    def num_problems(self) -> int:
        """The number of distinct problems the generator can produce."""
        n = self.hi - self.lo + 1  # operand values
        count = 0
        for op in self.ops:
            if op == "-" and not self.allow_negative:
                count += n * (n + 1) // 2  # unordered pairs with a >= b
            elif op == "/":
                count += (self.hi - max(self.lo, 1) + 1) * n  # divisor b != 0, any quotient
            else:
                count += n * n
        return count

    def _draw(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        if op == "/":
            b = rng.randint(max(self.lo, 1), self.hi)
            q = rng.randint(self.lo, self.hi)
            return (b * q, op, b)
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        return (a, op, b)

    def _make_heldout(self, rng: random.Random, size: int) -> list[Problem]:
        seen: dict[Problem, None] = {}  # insertion-ordered set
        for _ in range(size * MAX_TRIES_PER_ROW):
            if len(seen) == size:
                break
            seen.setdefault(self._draw(rng), None)
        return list(seen)

    def row(self, problem: Problem) -> Row:
        """The row for one problem: prompt text and the integer answer as a string."""
        a, op, b = problem
        answer = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
        prompt = self.prompt_template.format(a=a, op=op, b=b) + self.prompt_suffix
        return {"prompt": prompt, "answer": str(answer)}

    def sample(self, n: int, rng: random.Random) -> list[Row]:
        """`n` training problems (independent draws, never a held-out problem)."""
        rows = []
        for _ in range(n):
            for _ in range(MAX_TRIES_PER_ROW):
                problem = self._draw(rng)
                if problem not in self._heldout_keys:
                    break
            else:
                raise RuntimeError("arith: could not draw a problem outside the held-out set; lower heldout_size")
            rows.append(self.row(problem))
        return rows

    def heldout(self, n: int | None = None) -> list[Row]:
        """The first `n` of the `heldout_size` fixed held-out problems (all when None)."""
        if n is not None and n > self.heldout_size:
            raise ValueError(
                f"arith has {self.heldout_size} held-out problems, {n} were asked for; "
                f"set the task option heldout_size = {n}"
            )
        return [self.row(p) for p in self._heldout[:n]]

    def state_dict(self) -> dict[str, Any]:
        """Stateless: all training randomness comes from the rng passed to `sample`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""


@TASKS.register("arith")
def arith(
    target: str = "",
    *,
    ops: tuple[str, ...] | list[str] = ("+",),
    min_digits: int = 1,
    max_digits: int = 2,
    allow_negative: bool = True,
    prompt_template: str = "What is {a} {op} {b}?",
    prompt_suffix: str = " Answer with just the number.",
    heldout_size: int = 500,
    heldout_seed: int = 1234,
) -> ArithTask:
    """Offline integer arithmetic ("What is 23 + 58? Answer with just the number.")."""
    if target:
        raise ValueError(f"task 'arith' takes no ':{target}' part; pass options instead (e.g. ops, max_digits)")
    return ArithTask(
        ops=ops, min_digits=min_digits, max_digits=max_digits, allow_negative=allow_negative,
        prompt_template=prompt_template, prompt_suffix=prompt_suffix,
        heldout_size=heldout_size, heldout_seed=heldout_seed,
    )
