"""reasoning_gym reward: the rg task's rows round-trip through the dataset's own scorer."""
import json
import random

from grpokit.data import get_task
from grpokit.rewards import extract_rg_answer, reasoning_gym


def _score(rows, completions, **kw):
    cols = {k: [r[k] for r in rows] for k in ("rg_task", "rg_entry", "rg_config")}
    return reasoning_gym([r["prompt"] for r in rows], completions, **cols, **kw)


def test_sample_and_score_round_trip():
    for name in ("basic_arithmetic", "chain_sum"):
        rows = get_task(f"rg:{name}", heldout_size=5).sample(6, random.Random(0))
        right = [r["answer"] for r in rows]
        assert _score(rows, right) == [1.0] * 6
        wrong = [str(int(a) + 1) for a in right]
        assert _score(rows, wrong) == [0.0] * 6
        tagged = [f"<think>...</think><answer>{a}</answer>" for a in right]
        assert _score(rows, tagged) == [1.0] * 6
        assert _score(rows, [f"so \\boxed{{{a}}}" for a in right]) == [1.0] * 6


def test_heldout_rows_score_too_and_mixed_rows_get_none():
    rows = get_task("rg:chain_sum", heldout_size=3).heldout()
    other = {"rg_task": None, "rg_entry": None, "rg_config": None, "prompt": "What is 1 + 1?"}
    out = _score(rows + [other], [r["answer"] for r in rows] + ["2"])
    assert out == [1.0, 1.0, 1.0, None]


def test_extract_modes():
    text = "think \\boxed{3} <answer> 7 </answer>"
    assert extract_rg_answer(text) == "7"
    assert extract_rg_answer(text, "boxed") == "3"
    assert extract_rg_answer("  42 \n", "auto") == "42"
    assert extract_rg_answer("42", "answer_tag") == ""
    assert json.loads(get_task("rg:chain_sum", heldout_size=1).heldout()[0]["rg_config"]) == {}
