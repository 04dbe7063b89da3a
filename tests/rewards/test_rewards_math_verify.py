"""math_verify: LaTeX and boxed answers, equivalence beyond string match, thread safety."""
import threading

import pytest

from grpokit.rewards import math_verify


def test_latex_equivalences():
    completions = [
        "So the answer is \\boxed{0.5}.",
        "The probability is $\\frac{1}{2}$.",
        "\\boxed{\\frac{2}{4}}",
        "\\boxed{\\frac{1}{3}}",
        "no answer",
    ]
    answers = ["\\frac{1}{2}", "0.5", "$\\frac12$", "\\frac{1}{2}", "\\frac{1}{2}"]
    assert math_verify([""] * 5, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_symbolic_answers_and_boxed_priority():
    out = math_verify(["", ""], ["first $x=3$, finally \\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{8}}"],
                      answer=["\\sqrt{8}", "2\\sqrt{2}"])
    assert out == [1.0, 1.0]


def test_unparseable_reference_raises():
    with pytest.raises(ValueError, match="could not parse the reference answer"):
        math_verify([""], ["\\boxed{1}"], answer=[""])


def test_works_off_the_main_thread():
    # math-verify's own signal.alarm timeout fails off the main thread; the reward must disable it there.
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", math_verify([""], ["\\boxed{4}"], answer=["4"])))
    thread.start()
    thread.join(30)
    assert box["out"] == [1.0]
