"""numeric_match extraction, the format reward and DAPO overlong shaping (SPEC section 5)."""
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.rewards import extract_number, format_reward, numeric_match, overlong


def _nm(completions, answers):
    return numeric_match([""] * len(completions), completions, answer=answers)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("81", "81"),
        ("The answer is 81.", "81"),
        ("23 + 58 = 81", "81"),  # the last number, not the operands
        ("first 12, then \\boxed{81}, finally 99", "81"),  # a box beats the last number
        ("\\boxed{\\text{x}=\\frac{1}{2}} and \\boxed{{81}}", "81"),  # nested braces; the last box
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("It is -17.", "-17"),
        ("x = \u221217", "-17"),  # unicode minus
        ("Total: 1,234,567 apples", "1234567"),  # thousands separators
        ("about 3.50", "3.5"),  # decimals compare by value
        ("42", "The sum is 42. #### 42"),  # the reference goes through the same extraction
    ],
)
def test_numeric_match_correct(completion, answer):
    assert _nm([completion], [answer]) == [1.0]


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("no number here", "81"),  # nothing extracted -> 0
        ("", "81"),
        ("81 is wrong, it's 80", "81"),
        ("5-3", "-3"),  # a minus glued to a digit is subtraction, not a sign
        ("\\boxed{80} though 81", "81"),
        ("\\boxed{81", "18"),  # unbalanced box ignored -> last number 81
    ],
)
def test_numeric_match_wrong(completion, answer):
    assert _nm([completion], [answer]) == [0.0]


def test_extract_number_values():
    assert extract_number("\\boxed{-2.50}.") == -2.5
    assert extract_number("1,2,3") == 3  # a list, not a thousands-separated number
    assert extract_number("\\boxed{}") is None
    assert extract_number("v2") is None  # glued to a word


def test_numeric_match_reference_without_number_raises():
    with pytest.raises(ValueError, match="reference answer 'abc' of sample 0 has no number"):
        _nm(["1"], ["abc"])


def test_numeric_match_relative_tolerance():
    out = numeric_match(["", ""], ["100.4", "101"], answer=["100", "100"], rel_tol=0.005)
    assert out == [1.0, 0.0]


def test_format_default_wants_a_bare_number():
    completions = ["81", " 81.\n", "\\boxed{81}", "-1,200", "The answer is 81", "81 apples", ""]
    assert format_reward([""] * 7, completions) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_presets_and_custom_pattern():
    think = ["<think>hmm\nok</think>\n<answer>5</answer>", "<answer>5</answer>", "<think>a</think><answer>5</answer> extra"]
    assert format_reward([""] * 3, think, preset="think_answer") == [1.0, 0.0, 0.0]
    assert format_reward([""] * 3, think, preset="answer_tag") == [1.0, 1.0, 1.0]
    assert format_reward([""] * 2, ["so \\boxed{x^{2}}", "\\boxed{x"], preset="boxed") == [1.0, 0.0]
    assert format_reward([""] * 2, ["Answer: 7", "7"], pattern=r"Answer: \d+") == [1.0, 0.0]
    assert format_reward([""] * 2, ["so Answer: 7 ok", "7"], pattern=r"Answer: \d+", match="search") == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown preset 'xml'"):
        format_reward([""], ["x"], preset="xml")


def test_overlong_three_regimes():
    # L_max = 100, L_c = 20: free up to 80; linear from 0 to -1 over (80, 100]; -1 beyond 100.
    lengths = [0, 50, 80, 81, 90, 95, 100, 101, 500]
    out = overlong([""] * len(lengths), [""] * len(lengths), completion_lengths=lengths, max_len=100, buffer=20)
    assert out == pytest.approx([0.0, 0.0, 0.0, -1 / 20, -0.5, -0.75, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer <= max_len"):
        overlong([""], [""], completion_lengths=[1], max_len=10, buffer=20)


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**9, 10**9), st.integers(0, 99), st.booleans(), st.booleans())
def test_extraction_reads_any_formatted_number(whole, cents, commas, boxed):
    value = Fraction(whole) + (Fraction(cents, 100) if whole >= 0 else -Fraction(cents, 100))
    text = f"{abs(whole):,}" if commas else str(abs(whole))
    text = ("-" if whole < 0 else "") + text + f".{cents:02d}"
    text = f"\\boxed{{{text}}}" if boxed else text
    assert extract_number(f"We add 2 and 3, so the result is {text}.") == value


def test_answer_key_writes_the_extracted_number_canonically():
    from fractions import Fraction

    from grpokit.rewards.extract import answer_key, format_number

    assert [format_number(Fraction(x)) for x in ("3", "-3", "1000.50", "-0.05", "1/3", "-7/6", "0")] == [
        "3", "-3", "1000.5", "-0.05", "1/3", "-7/6", "0"]
    assert answer_key("5-3") == "3" and answer_key("x = -3") == "-3"  # the sign rule of extract_number
    assert answer_key("\\boxed{ x^2 }") == "2" and answer_key("\\boxed{\\pi}") == "\\pi" and answer_key("none") is None
