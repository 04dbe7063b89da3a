"""RewardSet: weighted totals, None, on_error raise/zero/skip, bad returns, timeouts, accuracy."""
import math
import threading
import time

import pytest
import torch

from grpokit.rewards import RewardError, RewardSet, columns_from_rows

PROMPTS = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?"]
COMPLETIONS = ["2", "5", "6", "The answer is 8"]
ROWS = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ["2", "4", "6", "8"])]


def _cols(rows=ROWS):
    return columns_from_rows(rows, completion_lengths=torch.tensor([1, 1, 1, 4]), truncated=[False] * len(rows))


def fails_on_six(prompts, completions):
    """Raises on any completion '6'."""
    if "6" in completions:
        raise ValueError("cannot score a six")
    return [0.5] * len(completions)


def test_weighted_total_per_function_and_accuracy():
    rs = RewardSet([("numeric_match", 1.0, {}), ("format", 0.5, {"preset": "number"})])
    result = rs.score(PROMPTS, COMPLETIONS, _cols())
    total, per_function = result  # unpacks as in docs/interfaces.md
    assert total.dtype == torch.float32 and total.tolist() == [1.5, 0.5, 1.5, 1.0]
    assert per_function == {"numeric_match": [1.0, 0.0, 1.0, 1.0], "format": [1.0, 1.0, 1.0, 0.0]}
    assert rs.accuracy_key == "numeric_match" and result.correct.tolist() == [True, False, True, True]
    assert result.valid.all()


def test_columns_from_rows_and_option_passing():
    cols = _cols()
    assert cols == {"answer": ["2", "4", "6", "8"], "completion_lengths": [1, 1, 1, 4], "truncated": [False] * 4}
    rs = RewardSet([("overlong", 1.0, {"max_len": 4, "buffer": 2})])
    assert rs.score(PROMPTS, COMPLETIONS, cols).total.tolist() == [0.0, 0.0, 0.0, -1.0]
    assert rs.accuracy_key is None and rs.score(PROMPTS, COMPLETIONS, cols).correct is None


def test_none_means_no_score_for_that_function():
    def only_even(prompts, completions):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    rs = RewardSet([(only_even, 2.0), ("numeric_match", 1.0)])
    result = rs.score(PROMPTS, COMPLETIONS, _cols())
    assert result.total.tolist() == [3.0, 0.0, 3.0, 1.0]
    assert result.per_function["only_even"][0] == 1.0 and math.isnan(result.per_function["only_even"][1])


def test_on_error_raise_names_function_sample_prompt_and_option():
    rs = RewardSet([fails_on_six])
    with pytest.raises(RewardError) as e:
        rs.score(PROMPTS, COMPLETIONS, _cols())
    msg = str(e.value)
    assert "reward function 'fails_on_six' raised ValueError on sample 2 (prompt 'What is 3 + 3?')" in msg
    assert "cannot score a six" in msg and 'rewards.on_error = "zero"' in msg
    assert isinstance(e.value.__cause__, ValueError)


def test_on_error_zero_scores_only_the_failing_sample_zero():
    rs = RewardSet([(fails_on_six, 1.0), ("numeric_match", 1.0)], on_error="zero")
    result = rs.score(PROMPTS, COMPLETIONS, _cols())
    assert result.total.tolist() == [1.5, 0.5, 1.0, 1.5]  # others keep their 0.5 via per-sample retry
    assert result.per_function["fails_on_six"] == [0.5, 0.5, 0.0, 0.5]
    assert result.valid.all() and result.errors == {"fails_on_six": 1}


def test_on_error_skip_marks_invalid_with_nan_total():
    rs = RewardSet([(fails_on_six, 1.0), ("numeric_match", 1.0)], on_error="skip")
    result = rs.score(PROMPTS, COMPLETIONS, _cols())
    assert result.valid.tolist() == [True, True, False, True]
    assert math.isnan(result.total[2]) and result.total[[0, 1, 3]].tolist() == [1.5, 0.5, 1.5]
    assert math.isnan(result.per_function["fails_on_six"][2])


@pytest.mark.parametrize(
    "returned, match",
    [
        ([1.0, 1.0], r"returned 2 values for 4 completions"),
        ("1111", r"returned str; it must return a list of 4 floats"),
        ([1.0, "yes", 1.0, 1.0], r"returned str 'yes' for sample 1"),
        ([1.0, float("nan"), 1.0, 1.0], r"returned nan for sample 1; return None"),
    ],
)
def test_bad_returns_always_raise(returned, match):
    rs = RewardSet([(lambda p, c: returned, 1.0, {}, "bad")], on_error="zero")
    with pytest.raises(RewardError, match=match):
        rs.score(PROMPTS, COMPLETIONS, _cols())


def test_timeout_per_on_error():
    release = threading.Event()

    def stuck(prompts, completions):
        release.wait(20)  # "hangs" until the test ends
        return [1.0] * len(completions)

    try:
        with pytest.raises(RewardError, match=r"'stuck' did not return within timeout_s = 0.2 s on a batch of 4"):
            RewardSet([stuck], timeout_s=0.2).score(PROMPTS, COMPLETIONS, _cols())
        t0 = time.perf_counter()
        zero = RewardSet([stuck, "numeric_match"], timeout_s=0.2, on_error="zero").score(PROMPTS, COMPLETIONS, _cols())
        assert time.perf_counter() - t0 < 10  # returned without waiting for the stuck call
        assert zero.per_function["stuck"] == [0.0] * 4 and zero.total.tolist() == [1.0, 0.0, 1.0, 1.0]
        skip = RewardSet([stuck], timeout_s=0.2, on_error="skip").score(PROMPTS, COMPLETIONS, _cols())
        assert not skip.valid.any() and skip.errors == {"stuck": 4}
    finally:
        release.set()
    ok = RewardSet([stuck, "numeric_match"], timeout_s=5.0).score(PROMPTS, COMPLETIONS, _cols())
    assert ok.total.tolist() == [2.0, 1.0, 2.0, 2.0]  # calls that return in time run normally in the thread


def test_empty_batch_and_registered_callable_name():
    from grpokit.rewards import format_reward

    rs = RewardSet([format_reward, "numeric_match"])
    assert rs.names == ["format", "numeric_match"]  # a registered callable keeps its registry name
    result = rs.score([], [], {"answer": []})
    assert result.total.shape == (0,) and result.per_function == {"format": [], "numeric_match": []}


def test_configuration_errors_are_clear():
    with pytest.raises(RewardError, match=r"'overlong' needs argument\(s\) 'max_len', 'buffer'.*reward's options"):
        RewardSet(["overlong"]).score(PROMPTS, COMPLETIONS, _cols())
    with pytest.raises(ValueError, match=r"'numeric_match' has no option\(s\) 'tolerance'; it takes: answer, rel_tol"):
        RewardSet([("numeric_match", 1.0, {"tolerance": 0.1})])
    with pytest.raises(ValueError, match="unknown reward function 'numeric_mach'.*did you mean 'numeric_match'"):
        RewardSet(["numeric_mach"])
    with pytest.raises(ValueError, match="column 'answer' has 3 values for 4 completions"):
        RewardSet(["numeric_match"]).score(PROMPTS, COMPLETIONS, {"answer": ["1", "2", "3"]})
    with pytest.raises(ValueError, match="on_error must be"):
        RewardSet(["format"], on_error="ignore")


def test_duplicate_names_and_explicit_accuracy_key():
    rs = RewardSet([("format", 1.0), ("format", 1.0, {"preset": "boxed"}), ("math_verify", 0.0), ("numeric_match", 1.0)],
                   accuracy_key="numeric_match")
    assert rs.names == ["format", "format_2", "math_verify", "numeric_match"]
    assert rs.accuracy_key == "numeric_match"
    assert RewardSet([("format", 1.0), ("math_verify", 0.0), ("numeric_match", 1.0)]).accuracy_key == "math_verify"


def test_concurrent_scoring_overlaps_waiting_scorers_and_gives_the_same_result() -> None:
    """rewards.concurrent: two scorers that each wait 0.3 s finish together in well under 0.6 s, with the
    same totals, per-function values and error handling as in order."""
    import threading
    import time

    running, peak = [0], [0]
    lock = threading.Lock()

    def waiting(value):
        def fn(prompts, completions, **_):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.3)
            with lock:
                running[0] -= 1
            return [value] * len(completions)
        fn.__name__ = f"wait_{value}"
        return fn

    specs = [(waiting(1.0), 1.0), (waiting(2.0), 0.5)]
    seq = RewardSet(specs).score(["p"] * 3, ["a", "b", "c"], {})
    peak[0] = 0
    con = RewardSet(specs, concurrent=True).score(["p"] * 3, ["a", "b", "c"], {})
    assert peak[0] == 2, "the two scorers did not run at the same time"
    assert torch.equal(seq.total, con.total) and seq.per_function == con.per_function
