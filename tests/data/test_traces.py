"""The add_trace task: traces are correct arithmetic, pass the think_answer format, numeric_match reads
their answer; slips are consistent and counted; the held-out split is disjoint; the JSONL writer."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpokit.data import TASKS, get_task
from grpokit.data.traces import PLACES, trace, write_traces
from grpokit.rewards import format_reward, last_answer_tag, numeric_match

STEP = re.compile(r"^(?P<place>\S+) (?P<x>\d)(?P<op>[+*])(?P<y>\d)(?:\+(?P<c>\d))?=(?P<v>\d+) write (?P<d>\d) carry (?P<co>\d)$")


def replay(completion: str) -> tuple[int, int]:
    """Re-check every step of a trace: -> (the number its steps spell, how many steps are wrong arithmetic).
    Raises AssertionError when the trace is malformed or not self-consistent."""
    m = re.fullmatch(r"<think>(.*)</think>\n<answer>(\d+)</answer>", completion)
    assert m, completion
    steps, stated = m.group(1).split("; "), int(m.group(2))
    digits, carry, wrong = [], 0, 0
    for i, step in enumerate(steps):
        last = re.fullmatch(r"(\S+) (\d)", step)
        if last and i == len(steps) - 1:
            assert last.group(1) == PLACES[i] and int(last.group(2)) == carry and carry > 0, step
            digits.append(carry)
            carry = 0
            continue
        s = STEP.match(step)
        assert s and s["place"] == PLACES[i], step
        assert int(s["c"] or 0) == carry, f"step {step!r} does not use the carry {carry}"
        x, y = int(s["x"]), int(s["y"])
        true = (x + y if s["op"] == "+" else x * y) + carry
        value = int(s["v"])
        wrong += value != true
        assert int(s["d"]) == value % 10 and int(s["co"]) == value // 10, f"write/carry do not follow from {step!r}"
        digits.append(int(s["d"]))
        carry = value // 10
    assert carry == 0, "a final carry must get a step of its own"
    spelt = int("".join(map(str, reversed(digits))))
    assert spelt == stated, f"the answer {stated} is not what the steps wrote ({spelt})"
    return spelt, wrong


def operands(prompt: str) -> tuple[int, str, int]:
    a, op, b = prompt.removeprefix("What is ").split("?")[0].split(" ")
    return int(a), op, int(b)


def test_traces_are_correct_arithmetic_and_pass_the_format_and_numeric_match() -> None:
    task = get_task("add_trace", ops=["+", "*"], min_digits=1, max_digits=5)
    rows = task.sample(400, random.Random(0)) + task.heldout(100)
    for row in rows:
        a, op, b = operands(row["prompt"])
        expected = a + b if op == "+" else a * b
        assert row["answer"] == str(expected)
        spelt, wrong = replay(row["completion"])
        assert spelt == expected and wrong == 0
        assert last_answer_tag(row["completion"]) == str(expected)
    completions = [r["completion"] for r in rows]
    assert format_reward([""] * len(rows), completions, preset="think_answer") == [1.0] * len(rows)
    assert numeric_match([""] * len(rows), completions, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)
    # the checks can fail: a wrong answer and a broken tag are caught
    bad = completions[0].replace("</answer>", "")
    assert format_reward([""], [bad], preset="think_answer") == [0.0]
    assert numeric_match([""], [completions[0].replace(f">{rows[0]['answer']}<", ">7<")], answer=[rows[0]["answer"]]) == [0.0]
    assert {operands(r["prompt"])[1] for r in rows} == {"+", "*"}


def test_known_traces() -> None:
    text, result = trace(47, "+", 85)
    assert result == 132
    assert text == "<think>units 7+5=12 write 2 carry 1; tens 4+8+1=13 write 3 carry 1; hundreds 1</think>\n<answer>132</answer>"
    text, result = trace(347, "*", 6)
    assert result == 2082
    assert text == ("<think>units 7*6=42 write 2 carry 4; tens 4*6+4=28 write 8 carry 2; "
                    "hundreds 3*6+2=20 write 0 carry 2; thousands 2</think>\n<answer>2082</answer>")
    assert trace(5, "+", 1234)[1] == 1239 and trace(0, "+", 0)[1] == 0


def test_a_slip_is_one_wrong_step_carried_through_consistently() -> None:
    text, result = trace(47, "+", 85, slip=(0, 1))
    assert text.startswith("<think>units 7+5=13 write 3 carry 1;") and result == 133
    spelt, wrong = replay(text)
    assert spelt == 133 and wrong == 1
    assert trace(10, "+", 0, slip=(0, -1))[1] == 11  # a column result of 0 slips upwards
    task = get_task("add_trace", error_rate=0.3, max_digits=4)
    rows = task.sample(2000, random.Random(3))
    n_wrong = 0
    for row in rows:
        spelt, wrong = replay(row["completion"])
        assert wrong <= 1 and (spelt != int(row["answer"])) == (wrong == 1)
        n_wrong += wrong
    assert 0.25 < n_wrong / len(rows) < 0.35  # about error_rate of the traces carry one slip
    assert all(replay(r["completion"])[1] == 0 for r in get_task("add_trace", error_rate=1.0).heldout())


def test_heldout_is_fixed_and_disjoint_from_training() -> None:
    task = get_task("add_trace", min_digits=1, max_digits=2, heldout_size=1000)
    held = task.heldout()
    assert len(held) == 1000 and len({r["prompt"] for r in held}) == 1000
    assert get_task("add_trace", min_digits=1, max_digits=2, heldout_size=1000).heldout() == held
    train = {r["prompt"] for r in task.sample(5000, random.Random(0))}
    assert not train & {r["prompt"] for r in held}
    assert len(train) > 1000  # the stream still covers the rest of the 10,000 problems
    assert task.state_dict() == {}


def test_digit_range_and_options() -> None:
    task = get_task("add_trace", min_digits=3, max_digits=4)
    ops = [operands(r["prompt"]) for r in task.sample(300, random.Random(1))]
    assert all(100 <= a <= 9999 and 100 <= b <= 9999 for a, _, b in ops)
    assert {len(str(a)) for a, _, _ in ops} == {3, 4}
    mul = [operands(r["prompt"]) for r in get_task("add_trace", ops=["*"]).sample(200, random.Random(2))]
    assert all(op == "*" and 2 <= b <= 9 for _, op, b in mul)
    assert "add_trace" in TASKS
    with pytest.raises(ValueError, match="subset of"):
        get_task("add_trace", ops=["-"])
    with pytest.raises(ValueError, match="over half"):
        get_task("add_trace", min_digits=1, max_digits=1, heldout_size=60)
    with pytest.raises(ValueError, match="unknown option"):
        get_task("add_trace", digits=3)


def test_write_traces_jsonl_and_module_entry(tmp_path: Path) -> None:
    path = write_traces(tmp_path / "t.jsonl", 50, seed=1, error_rate=0.0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) == {"prompt", "completion", "answer"} for r in rows)
    held = {r["prompt"] for r in get_task("add_trace").heldout()}
    assert not held & {r["prompt"] for r in rows}
    out = tmp_path / "cli.jsonl"
    proc = subprocess.run([sys.executable, "-m", "grpokit.data.traces", "--n", "7", "--out", str(out), "--seed", "1"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "wrote 7 rows" in proc.stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows[:7]  # same seed, same rows
