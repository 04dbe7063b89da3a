"""The built-in arith task: answers, options, and a held-out split disjoint from training."""
import random

import pytest

from grpokit.data import ArithTask, get_task


def _key(row):
    return row["prompt"]


def test_rows_have_correct_integer_answers():
    task = get_task("arith", ops=["+", "-", "*", "/"], max_digits=2)
    for row in task.sample(300, random.Random(0)) + task.heldout(100):
        question = row["prompt"].removeprefix("What is ").split("?")[0]
        a, op, b = question.split(" ")
        a, b = int(a), int(b)
        if op == "/":
            assert b != 0 and a % b == 0  # exact division only
            expected = a // b
        else:
            expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert row["answer"] == str(expected)
        assert row["prompt"].endswith("Answer with just the number.")


def test_default_is_addition_of_one_to_two_digit_operands():
    rows = get_task("arith").sample(500, random.Random(1))
    operands = [int(x) for r in rows for x in r["prompt"].split("?")[0].split(" ")[2::2]]
    assert all(" + " in r["prompt"] for r in rows)
    assert min(operands) >= 0 and max(operands) <= 99
    assert any(x < 10 for x in operands) and any(x >= 10 for x in operands)


def test_heldout_is_fixed_and_disjoint_from_training():
    task = get_task("arith", heldout_size=400)
    held = task.heldout()
    assert len(held) == 400 and len({_key(r) for r in held}) == 400  # distinct problems
    assert get_task("arith", heldout_size=400).heldout() == held  # same on every construction
    assert task.heldout(10) == held[:10]
    train = task.sample(20_000, random.Random(2))
    assert not ({_key(r) for r in train} & {_key(r) for r in held})


def test_sampling_is_reproducible_from_the_rng_state():
    task = get_task("arith")
    rng = random.Random(3)
    task.sample(5, rng)
    state = rng.getstate()
    first = task.sample(8, rng)
    rng2 = random.Random()
    rng2.setstate(state)
    assert get_task("arith").sample(8, rng2) == first
    assert task.state_dict() == {}


def test_no_negative_subtraction_and_custom_suffix():
    task = get_task("arith", ops=["-"], allow_negative=False, prompt_suffix=" Reply with a number.")
    rows = task.sample(200, random.Random(4))
    assert all(int(r["answer"]) >= 0 for r in rows)
    assert all(r["prompt"].endswith("? Reply with a number.") for r in rows)


def test_option_errors_say_what_to_change():
    with pytest.raises(ValueError, match="heldout_size"):
        ArithTask(max_digits=1, heldout_size=90)  # 100 one-digit sums: too many held out
    with pytest.raises(ValueError, match="set the task option heldout_size = 600"):
        get_task("arith").heldout(600)
    with pytest.raises(ValueError, match="subset of"):
        get_task("arith", ops=["^"])
