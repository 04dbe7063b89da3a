"""`add_trace`: arithmetic worked digit by digit, for the SFT stage of the R1 demo (SPEC 10, stage 1).

Each row carries `prompt`, `answer` (the true result) and `completion`: a short step-by-step trace inside
`<think>...</think>`, then `<answer>N</answer>`, the format the `format` reward's `think_answer` preset
checks and whose last number `numeric_match` reads as the answer:

    What is 47 + 85? ...
    <think>units 7+5=12 write 2 carry 1; tens 4+8+1=13 write 3 carry 1; hundreds 1</think>
    <answer>132</answer>

One step per column, right to left: the column's digits (plus the carry in, when it is not 0), their sum,
the digit written and the carry out; a final carry is a last step of its own. `*` multiplies a multi-digit
number by one digit (2..9) the same way: "tens 4*6+4=28 write 8 carry 2". In SmolLM2 tokens (EOS included) a
trace of two-digit addition is about 48 long, three-digit 64 (at most 70), four-digit 82 (at most 91).

Imperfect traces (`error_rate`): with that probability a training trace contains one slip: one column's
result is off by one (4+8+1=14), and everything after follows from the slip, so the trace is consistent
but its `<answer>` is wrong. The `answer` column is always the true result, so an SFT model trained on such
traces is imperfect in a way a correctness reward can fix. Held-out rows are always exact.

Held-out split: a fixed set of `heldout_size` distinct problems drawn from `Random(heldout_seed)`; the
training stream rejects them (compared as (a, op, b)), as `grpokit.data.arith` does. Sampling is
stateless: all randomness comes from the `rng` argument.

SFT data (prompt, completion JSONL, rows drawn from the training stream only):

    python -m grpokit.data.traces --n 2000 --out data/traces.jsonl --min-digits 2 --max-digits 3 --error-rate 0.1
"""
from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # `python -m grpokit.data.traces`: run the copy the package imported (and registered)
    from grpokit.data.traces import main

    raise SystemExit(main())

from grpokit.data.task import TASKS, Row

# `python -m` imports the package, which imports (and registers) this module, before running it as __main__;
# runpy warns about that, but the guard above makes it harmless
warnings.filterwarnings("ignore", message=r"'grpokit\.data\.traces' found in sys\.modules", category=RuntimeWarning)

#: Supported operators: "+" (multi-digit addition) and "*" (a multi-digit number times one digit).
OPS = ("+", "*")
#: The one-digit factor of "*" (0 and 1 would make trivial traces).
MULTIPLIERS = tuple(range(2, 10))
#: Column names, right to left; columns past these are called "10^k".
PLACES = ("units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")
#: Rejection-sampling budget per training row before giving up (only hit when held-out ≈ problem space).
MAX_TRIES_PER_ROW = 1000
#: Default prompt suffix: says which format to use (the SFT stage teaches it; the base model sees it too).
PROMPT_SUFFIX = " Show your work in <think></think>, then the answer in <answer></answer>."

Problem = tuple[int, str, int]


def place(i: int) -> str:
    """The name of column `i` (0 = units)."""
    return PLACES[i] if i < len(PLACES) else f"10^{i}"


def trace(a: int, op: str, b: int, *, slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """The completion for `a op b` and the result it states.

    slip: (column, delta) makes that column's result off by `delta` (+1 or -1; -1 on a result of 0 becomes
    +1); the written digit and the carry follow from the wrong result, so the stated answer is wrong too.
    A column past the last one is ignored (no slip).
    """
    if op not in OPS:
        raise ValueError(f"traces: op must be one of {list(OPS)}, got {op!r}")
    if a < 0 or b < 0:
        raise ValueError(f"traces: operands must be non-negative, got {a}, {b}")
    if op == "*" and not 0 <= b <= 9:
        raise ValueError(f"traces: '*' multiplies by one digit, got {b}")
    da = [int(c) for c in reversed(str(a))]
    db = [int(c) for c in reversed(str(b))]
    cols = len(da) if op == "*" else max(len(da), len(db))
    steps, written, carry = [], [], 0
    for i in range(cols):
        x = da[i] if i < len(da) else 0
        if op == "+":
            y = db[i] if i < len(db) else 0
            expr, value = f"{x}+{y}", x + y + carry
        else:
            expr, value = f"{x}*{b}", x * b + carry
        if carry:
            expr += f"+{carry}"
        if slip is not None and slip[0] == i:
            value = value + slip[1] if value + slip[1] >= 0 else value + 1
        digit, carry = value % 10, value // 10
        written.append(digit)
        steps.append(f"{place(i)} {expr}={value} write {digit} carry {carry}")
    if carry:
        steps.append(f"{place(cols)} {carry}")
        written.extend(int(c) for c in reversed(str(carry)))
    result = int("".join(str(d) for d in reversed(written)))
    return f"<think>{'; '.join(steps)}</think>\n<answer>{result}</answer>", result


def _count(digits: int) -> int:
    """How many non-negative integers have exactly `digits` digits (0 counts as one digit)."""
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


class TraceTask:
    """Multi-digit addition (and one-digit multiplication) rows with step-by-step trace completions."""

    def __init__(
        self,
        *,
        ops: Sequence[str] = ("+",),
        min_digits: int = 2,
        max_digits: int = 3,
        error_rate: float = 0.0,
        prompt_template: str = "What is {a} {op} {b}?",
        prompt_suffix: str = PROMPT_SUFFIX,
        heldout_size: int = 200,
        heldout_seed: int = 1234,
    ) -> None:
        ops = tuple(ops)
        bad = [o for o in ops if o not in OPS]
        if not ops or bad:
            raise ValueError(f"add_trace: ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"add_trace: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"add_trace: error_rate is a probability in [0, 1], got {error_rate}")
        self.name = "add_trace"
        self.ops = ops
        self.min_digits, self.max_digits = min_digits, max_digits
        self.error_rate = error_rate
        self.prompt_template = prompt_template
        self.prompt_suffix = prompt_suffix
        self.heldout_size = heldout_size
        space = self.num_problems()
        if heldout_size > space // 2:
            raise ValueError(
                f"add_trace: heldout_size = {heldout_size} would take over half of the {space} possible problems "
                f"(ops {list(ops)}, {min_digits}..{max_digits} digits); lower heldout_size or raise max_digits"
            )
        self._heldout = self._make_heldout(random.Random(heldout_seed), heldout_size)
        self._heldout_keys = set(self._heldout)

    def num_problems(self) -> int:
        """The number of distinct problems the generator can produce."""
        n = sum(_count(d) for d in range(self.min_digits, self.max_digits + 1))  # operand values
        return sum(n * n if op == "+" else n * len(MULTIPLIERS) for op in self.ops)

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)  # every length equally often
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(lo, 10**digits - 1)

    def _draw(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a = self._operand(rng)
        b = self._operand(rng) if op == "+" else rng.choice(MULTIPLIERS)
        return (a, op, b)

    def _make_heldout(self, rng: random.Random, size: int) -> list[Problem]:
        seen: dict[Problem, None] = {}  # insertion-ordered set
        for _ in range(size * MAX_TRIES_PER_ROW):
            if len(seen) == size:
                break
            seen.setdefault(self._draw(rng), None)
        return list(seen)

    def row(self, problem: Problem, *, slip: tuple[int, int] | None = None) -> Row:
        """The row of one problem: prompt, true answer, and its trace (with `slip`, see `trace`)."""
        a, op, b = problem
        completion, _ = trace(a, op, b, slip=slip)
        prompt = self.prompt_template.format(a=a, op=op, b=b) + self.prompt_suffix
        return {"prompt": prompt, "answer": str(a + b if op == "+" else a * b), "completion": completion}

    def _slip(self, problem: Problem, rng: random.Random) -> tuple[int, int] | None:
        if self.error_rate <= 0.0 or rng.random() >= self.error_rate:
            return None
        a, op, b = problem
        cols = len(str(a)) if op == "*" else max(len(str(a)), len(str(b)))
        return rng.randrange(cols), rng.choice((-1, 1))

    def sample(self, n: int, rng: random.Random) -> list[Row]:
        """`n` training rows (independent draws, never a held-out problem); each trace has a slip with
        probability `error_rate`."""
        rows = []
        for _ in range(n):
            for _ in range(MAX_TRIES_PER_ROW):
                problem = self._draw(rng)
                if problem not in self._heldout_keys:
                    break
            else:
                raise RuntimeError("add_trace: could not draw a problem outside the held-out set; lower heldout_size")
            rows.append(self.row(problem, slip=self._slip(problem, rng)))
        return rows

    def heldout(self, n: int | None = None) -> list[Row]:
        """The first `n` of the `heldout_size` fixed held-out problems (all when None), with exact traces."""
        if n is not None and n > self.heldout_size:
            raise ValueError(
                f"add_trace has {self.heldout_size} held-out problems, {n} were asked for; "
                f"set the task option heldout_size = {n}"
            )
        return [self.row(p) for p in self._heldout[:n]]

    def state_dict(self) -> dict[str, Any]:
        """Stateless: all training randomness comes from the rng passed to `sample`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""


@TASKS.register("add_trace")
def add_trace(
    target: str = "",
    *,
    ops: Sequence[str] = ("+",),
    min_digits: int = 2,
    max_digits: int = 3,
    error_rate: float = 0.0,
    prompt_template: str = "What is {a} {op} {b}?",
    prompt_suffix: str = PROMPT_SUFFIX,
    heldout_size: int = 200,
    heldout_seed: int = 1234,
) -> TraceTask:
    """Arithmetic with digit-by-digit <think> traces and an <answer> tag (the R1 demo's SFT data)."""
    if target:
        raise ValueError(f"task 'add_trace' takes no ':{target}' part; pass options instead (e.g. ops, max_digits)")
    return TraceTask(
        ops=ops, min_digits=min_digits, max_digits=max_digits, error_rate=error_rate,
        prompt_template=prompt_template, prompt_suffix=prompt_suffix,
        heldout_size=heldout_size, heldout_seed=heldout_seed,
    )


def write_traces(path: str | Path, n: int, *, seed: int = 0, **options: Any) -> Path:
    """Write `n` training rows of `add_trace` (built with `options`) as JSONL with the columns prompt,
    completion and answer, drawn from `Random(seed)`; the SFT stage reads prompt and completion."""
    if n < 1:
        raise ValueError(f"write_traces: n must be >= 1, got {n}")
    task = add_trace(**options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in task.sample(n, random.Random(seed)):
            f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"], "answer": row["answer"]}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m grpokit.data.traces --n N --out F.jsonl [options]`."""
    p = argparse.ArgumentParser(prog="python -m grpokit.data.traces",
                                description="Write add_trace rows (prompt, completion, answer) as a JSONL SFT dataset.")
    p.add_argument("--n", type=int, required=True, help="rows to write")
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--ops", default="+", help="operators, e.g. '+' or '+*' (default '+')")
    p.add_argument("--min-digits", type=int, default=2)
    p.add_argument("--max-digits", type=int, default=3)
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of traces with one slip (default 0)")
    p.add_argument("--heldout-size", type=int, default=200, help="problems reserved for the held-out split (never written)")
    p.add_argument("--heldout-seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        out = write_traces(args.out, args.n, seed=args.seed, ops=tuple(args.ops), min_digits=args.min_digits,
                           max_digits=args.max_digits, error_rate=args.error_rate,
                           heldout_size=args.heldout_size, heldout_seed=args.heldout_seed)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {args.n} rows to {out}")
    return 0

