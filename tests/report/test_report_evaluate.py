"""grpokit.report.evaluate with an injected fake sampler (no model), plus a smoke test on the real pieces."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from grpokit.report.evaluate import (
    Scores,
    by_reward,
    by_total,
    default_extract_answer,
    evaluate,
    format_comparison,
    format_table,
    write_json,
)

# 3 problems x k=4 scripted completions. Expected (numeric_match correct flags, majority vote):
#   p0 [T,T,F,F]  votes 2,2,3,None -> "2" right    avg .5  pass@4 1  cons 1
#   p1 [F,F,T,T]  votes 4,4,5,5 tie -> "4" (first) avg .5  pass@4 1  cons 0
#   p2 [F,F,F,F]  votes 1 x4 -> wrong              avg 0   pass@4 0  cons 0
ROWS = [
    {"prompt": "1+1", "answer": "2", "level": 1},
    {"prompt": "2+3", "answer": "5", "level": 2},
    {"prompt": "9-9", "answer": "0", "level": 3},
]
SCRIPT = {
    "1+1": ["2", "it is 2", "3", "xxxxxxxxxx"],
    "2+3": ["4", "4.0", "5", "\\boxed{5}"],
    "9-9": ["1", "1", "1", "1"],
}


def encode(tokenizer, prompts):
    assert tokenizer == "tok"
    return [[ord(ch) for ch in p] for p in prompts]


class FakeSampler:
    """Returns the scripted completions in order, per prompt; records every generate call."""

    def __init__(self):
        self.calls = []
        self.next = {p: 0 for p in SCRIPT}

    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_strings=(),
                 generator=None):
        self.calls.append(dict(n=len(prompt_ids), temperature=temperature, top_p=top_p, top_k=top_k,
                               max_new_tokens=max_new_tokens, generator=generator))
        texts = []
        for ids in prompt_ids:
            p = "".join(map(chr, ids))
            texts.append(SCRIPT[p][self.next[p]])
            self.next[p] += 1
        lengths = [len(t) for t in texts]
        T = max(lengths)
        mask = torch.tensor([[j < n for j in range(T)] for n in lengths])  # [B, T]
        truncated = torch.tensor([n >= max_new_tokens for n in lengths])  # [B]
        return SimpleNamespace(texts=texts, response_mask=mask, truncated=truncated)


class FakeRewardSet:
    """numeric_match (answer == extracted answer) + 0.5 * format (boxed); checks the column contract."""

    def __init__(self, as_object=False):
        self.as_object = as_object
        self.seen_columns = []

    def score(self, prompts, completions, columns):
        assert len(columns["answer"]) == len(prompts) == len(completions)
        assert len(columns["completion_lengths"]) == len(completions)
        assert "prompt" not in columns
        self.seen_columns.append(columns)
        num = [float(default_extract_answer(c) == a) for c, a in zip(completions, columns["answer"])]
        fmt = [float("\\boxed" in c) for c in completions]
        total = torch.tensor([n + 0.5 * f for n, f in zip(num, fmt)])  # [B]
        per_fn = {"numeric_match": num, "format": fmt}
        return SimpleNamespace(total=total, per_function=per_fn) if self.as_object else (total, per_fn)


def run(**kw):
    args = dict(reward_set=FakeRewardSet(), k=4, temperature=0.8, max_new_tokens=10, batch_size=5, seed=0,
                sampler=FakeSampler(), encode=encode)
    args.update(kw)
    return evaluate(None, "tok", ROWS, **args), args


def test_evaluate_metrics_match_hand_computation():
    res, args = run()
    assert res["n"] == 3 and res["k"] == 4
    assert res["avg@k"] == pytest.approx(1 / 3) and res["acc"] == res["avg@k"]
    assert res["pass@k"] == pytest.approx({"1": 1 / 3, "4": 2 / 3})
    assert res["cons@k"] == pytest.approx(1 / 3)
    for name, value in [("avg@k", res["avg@k"]), ("pass@1", 1 / 3), ("pass@4", 2 / 3), ("cons@k", 1 / 3)]:
        lo, hi = res["ci"][name]
        assert 0.0 <= lo <= value <= hi <= 1.0
    # lengths are the scripted texts' lengths; "xxxxxxxxxx" hits max_new_tokens=10
    lens = [len(t) for p in SCRIPT for t in SCRIPT[p]]
    assert res["length"]["max"] == max(lens) and res["length"]["min"] == min(lens)
    assert res["length"]["truncation_rate"] == pytest.approx(1 / 12)
    assert res["rewards"] == pytest.approx({"numeric_match": 4 / 12, "format": 1 / 12})
    assert res["samples"][0] == {"prompt": "1+1", "answer": "2", "completion": "2", "extracted": "2",
                                 "reward": 1.0, "correct": True, "length": 1, "truncated": False}
    # batching: 12 sequences in calls of at most 5, one shared seeded generator; columns pass through
    sampler = args["sampler"]
    assert [c["n"] for c in sampler.calls] == [5, 5, 2]
    assert len({id(c["generator"]) for c in sampler.calls}) == 1
    assert all(c["temperature"] == 0.8 and c["top_k"] == 0 for c in sampler.calls)
    cols = args["reward_set"].seen_columns
    assert sum(cols[0]["level"] + cols[1]["level"] + cols[2]["level"], 0) == 4 * (1 + 2 + 3)


def test_greedy_maps_to_top_k_1():
    _, args = run(temperature=0.0, top_p=0.5)
    assert all(c["temperature"] == 1.0 and c["top_k"] == 1 and c["top_p"] == 1.0 for c in args["sampler"].calls)
    with pytest.raises(ValueError):
        run(temperature=-1.0)


def test_correctness_is_pluggable():
    res, _ = run(reward_set=FakeRewardSet(as_object=True))  # .total/.per_function result object works too
    assert res["avg@k"] == pytest.approx(1 / 3)
    res, _ = run(correct_fn=by_reward("format"))  # only the one boxed completion counts
    assert res["avg@k"] == pytest.approx(1 / 12)
    res, _ = run(correct_fn=by_total(1.5))  # total 1.5 only for the correct boxed completion
    assert res["avg@k"] == pytest.approx(1 / 12)
    with pytest.raises(KeyError, match="numeric_match"):
        run(correct_fn=by_reward("nope"))
    assert by_total()(Scores(total=[0.9999995, 0.99, 2.0], per_function={})) == [True, False, True]
    assert by_total()(Scores(total=[float("nan")], per_function={})) == [False]  # a skipped sample


def test_reward_sets_own_correctness_is_the_default():
    class WithCorrect(FakeRewardSet):
        def score(self, prompts, completions, columns):
            total, per_fn = super().score(prompts, completions, columns)
            # the verdict of a correctness reward: here, "boxed" only, to tell it apart from total >= 1
            correct = torch.tensor([f >= 1 for f in per_fn["format"]])
            return SimpleNamespace(total=total, per_function=per_fn, correct=correct)

    res, _ = run(reward_set=WithCorrect())
    assert res["avg@k"] == pytest.approx(1 / 12)
    res, _ = run(reward_set=WithCorrect(), correct_fn=by_total())  # an explicit rule still wins
    assert res["avg@k"] == pytest.approx(1 / 3)


def test_extract_answer_default_and_custom():
    assert default_extract_answer("so 1,000.50 then \\boxed{\\frac{1}{2}}") == "0.5"
    assert default_extract_answer("then \\boxed{\\frac{1}{3}}") == "1/3"
    assert default_extract_answer("it is \\boxed{\\pi}") == "\\pi"  # no number: the boxed text votes
    assert default_extract_answer("first 3 then 1,000.50") == "1000.5"
    assert default_extract_answer("\\boxed{4.0}") == "4"
    assert default_extract_answer("no digits") is None
    # voting on the first character instead: p1 votes "4","4","5","\\" -> "4" still wins
    res, _ = run(extract_answer=lambda t: t[:1])
    assert res["cons@k"] == pytest.approx(1 / 3)


def test_format_table_and_json(tmp_path):
    res, _ = run()
    table = format_table(res)
    for needle in ("avg@4", "pass@1", "pass@4", "cons@4", "0.333", "0.667", "95% CI", "truncation rate"):
        assert needle in table, needle
    assert re.search(r"avg@4\s+0\.333\s+\[0\.\d{3}, 0\.\d{3}\]", table)
    both = format_comparison({"before": res, "after": {**res, "avg@k": 0.5}})
    assert "before" in both and "after" in both and "0.500" in both
    path = write_json({"before": res, "after": {**res, "cons@k": math.nan}}, tmp_path / "eval.json")
    back = json.loads(path.read_text())  # strict JSON: NaN written as null
    assert back["after"]["cons@k"] is None
    assert back["before"]["pass@k"] == pytest.approx(res["pass@k"])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow  # > 15 s alone: importing transformers (grpokit.models) dominates
def test_evaluate_with_real_pieces_if_present():
    rollout = pytest.importorskip("grpokit.rollout")
    rewards = pytest.importorskip("grpokit.rewards")
    missing = [n for m, n in [(rollout, "Sampler"), (rollout, "encode_prompts"),
                              (rewards, "RewardSet"), (rewards, "load_reward")] if not hasattr(m, n)]
    if missing:  # checked before importing grpokit.models, which pulls in transformers (seconds)
        pytest.skip(f"real pieces not written yet: {', '.join(missing)}")
    models = pytest.importorskip("grpokit.models")
    model, tok = models.load_model("tiny-char")
    rs = rewards.RewardSet([(rewards.load_reward("numeric_match"), 1.0)])
    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 7-4?", "answer": "3"}]
    kw = dict(reward_set=rs, k=2, max_new_tokens=4, batch_size=4, seed=0)
    a = evaluate(model, tok, rows, temperature=1.0, **kw)
    assert a["n"] == 2 and 0.0 <= a["avg@k"] <= a["pass@k"]["2"] <= 1.0
    assert 1 <= a["length"]["min"] <= a["length"]["max"] <= 4
    assert all(isinstance(s["completion"], str) for s in a["samples"]) and len(a["samples"]) == 2
    g = evaluate(model, tok, rows, temperature=0.0, **kw)  # greedy (top_k=1): the k samples agree
    assert g["pass@k"]["1"] == g["pass@k"]["2"] == g["avg@k"] and g["cons@k"] == g["avg@k"]


# ------------------------------------------------- one extractor: cons@k votes what numeric_match reads

#: (completion, the number numeric_match reads in it). "5-3" is a subtraction: its last number is 3, not -3.
AGREEMENT_CASES = [
    ("5-3", "3"), ("x = -3", "-3"), ("x=-3", "-3"), ("\u22123 apples", "-3"), ("so 10-7=3", "3"),
    ("1,234.50 dollars", "1234.5"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("answer: 4.0", "4"), ("\\boxed{4}.", "4"),
    ("#### 72", "72"), ("from 2 to 5-3", "3"), ("3.", "3"), ("-0.5", "-0.5"), ("v1.5 is 2", "2"),
]


@pytest.mark.parametrize("completion,number", AGREEMENT_CASES)
def test_cons_vote_key_is_the_number_numeric_match_grades(completion, number):
    from grpokit.rewards import numeric_match

    assert default_extract_answer(completion) == number
    for _, other in AGREEMENT_CASES:  # same vote key <=> numeric_match counts them equal
        same_key = default_extract_answer(completion) == default_extract_answer(other)
        assert same_key == (numeric_match([""], [completion], answer=[other]) == [1.0]), (completion, other)


def test_cons_at_k_with_numeric_match_votes_5_minus_3_as_3():
    """Majority says 3 ("5-3" three times, read as 3 by numeric_match); one sample says -3. The vote must go to 3
    (cons@k = 1); a separate number regex that reads "5-3" as -3 votes -3 and gets cons@k = 0."""
    from grpokit.rewards import RewardSet

    script = {"5-3=?": ["-3", "5-3", "the answer: 5-3", "so 5-3"]}

    class Script(FakeSampler):
        def __init__(self):
            self.calls, self.next = [], {p: 0 for p in script}

        def generate(self, prompt_ids, **kw):
            global SCRIPT
            saved, SCRIPT = SCRIPT, script
            try:
                return super().generate(prompt_ids, **kw)
            finally:
                SCRIPT = saved

    rows = [{"prompt": "5-3=?", "answer": "3"}]
    res = evaluate(None, "tok", rows, reward_set=RewardSet([("numeric_match", 1.0)]), k=4, temperature=1.0,
                   max_new_tokens=20, sampler=Script(), encode=encode)
    assert res["avg@k"] == pytest.approx(3 / 4)
    assert res["cons@k"] == 1.0
