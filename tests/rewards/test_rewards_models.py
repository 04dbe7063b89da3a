"""ORM and PRM scorers on tiny reward models trained inside the tests (tiny_rm.py)."""
import math
import random

import pytest
import torch

from grpokit.models.tiny import make_tiny_tokenizer
from grpokit.rewards import ORMScorer, PRMScorer, RewardSet, aggregate_steps, split_steps, step_token_ends
from tiny_rm import HELDOUT_TEMPLATES, QUESTION, orm_example, prm_completion


def heldout(n=60, seed=11):
    rng = random.Random(seed)
    return [orm_example(rng, HELDOUT_TEMPLATES) for _ in range(n)]


def test_orm_prefers_the_right_answer_on_unseen_phrasings(tiny_orm):
    ex = heldout()
    orm = ORMScorer(tiny_orm, batch_size=16)
    s = orm([QUESTION] * len(ex), [c for c, _ in ex])
    good = [v for v, (_, y) in zip(s, ex) if y]
    bad = [v for v, (_, y) in zip(s, ex) if not y]
    assert min(good) > max(bad)  # a perfect ranking
    assert sum(good) / len(good) - sum(bad) / len(bad) > 2.0  # logit margin


def test_orm_outputs_batching_and_labels(tiny_orm):
    ex = heldout(10)
    comps = [c for c, _ in ex]
    logit = ORMScorer(tiny_orm, batch_size=3)([QUESTION] * 10, comps)
    one = ORMScorer(tiny_orm, batch_size=1)([QUESTION] * 10, comps)
    assert logit == pytest.approx(one, abs=1e-4)  # padding does not change a score
    sig = ORMScorer(tiny_orm, output="sigmoid", positive_label="good")([QUESTION] * 10, comps)
    assert sig == pytest.approx([1 / (1 + math.exp(-v)) for v in logit], abs=1e-5)
    soft = ORMScorer(tiny_orm, output="softmax")([QUESTION] * 10, comps)
    assert all(0 <= v <= 1 for v in soft) and [v > 0.5 for v in soft] == [y == 1 for _, y in ex]
    neg = ORMScorer(tiny_orm, positive_label=0)([QUESTION] * 10, comps)
    assert [a < b for a, b in zip(neg, logit)] == [y == 1 for _, y in ex]
    with pytest.raises(ValueError, match="label 'great' is not one of"):
        ORMScorer(tiny_orm, positive_label="great")
    with pytest.raises(ValueError, match="output must be one of"):
        ORMScorer(tiny_orm, output="prob")
    with pytest.raises(OSError, match="cannot load"):
        ORMScorer(str(tiny_orm) + "_missing")


def test_orm_running_standardisation(tiny_orm):
    ex = heldout(40)
    comps = [c for c, _ in ex]
    orm = ORMScorer(tiny_orm, standardize=True)
    raw = ORMScorer(tiny_orm).raw_scores([QUESTION] * 40, comps)
    first = orm([QUESTION] * 20, comps[:20])
    mu, sd = sum(raw[:20]) / 20, math.sqrt(sum((x - sum(raw[:20]) / 20) ** 2 for x in raw[:20]) / 19)
    assert first == pytest.approx([(x - mu) / (sd + 1e-6) for x in raw[:20]], abs=1e-4)
    second = orm([QUESTION] * 20, comps[20:])
    mu, sd = sum(raw) / 40, math.sqrt(sum((x - sum(raw) / 40) ** 2 for x in raw) / 39)  # stats over all 40 seen
    assert second == pytest.approx([(x - mu) / (sd + 1e-6) for x in raw[20:]], abs=1e-4)


def test_orm_from_rewardset_options(tiny_orm):
    rs = RewardSet([("orm", 1.0, {"model": tiny_orm, "output": "sigmoid"})])
    res = rs.score([QUESTION] * 2, ["The answer is 7", "The answer is 8"], {"answer": ["7", "7"]})
    assert res.per_function["orm"][0] > 0.8 > 0.2 > res.per_function["orm"][1]


def test_split_steps_and_aggregation():
    c = "a = 1\n\n\n\nb = 2  \n\nc"
    ends = split_steps(c)
    assert [c[:e].split("\n\n")[-1] for e in ends] == ["a = 1", "b = 2", "c"]
    assert split_steps("x;y;", ";") == [1, 3] and split_steps("") == []
    s = [0.9, 0.5, 0.8]
    assert aggregate_steps(s, "min") == 0.5 and aggregate_steps(s, "last") == 0.8
    assert aggregate_steps(s, "prod") == pytest.approx(0.36) and aggregate_steps(s, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps([], "min") is None
    with pytest.raises(ValueError, match="min, last, prod, mean"):
        aggregate_steps(s, "max")


def test_prm_step_scores_follow_the_step_labels(tiny_prm):
    rng = random.Random(3)
    data = [prm_completion(rng, rng.randint(1, 4)) for _ in range(30)]
    prm = PRMScorer(tiny_prm, batch_size=7)
    steps = prm.steps(["Task 5"] * 30, [c for c, _ in data])
    for st, (c, labels) in zip(steps, data):
        assert st.char_ends == split_steps(c) and len(st.scores) == len(labels)
        assert [s > 0.5 for s in st.scores] == [y == 1 for y in labels]
    got = PRMScorer(tiny_prm, aggregation="min")(["Task 5"] * 30, [c for c, _ in data])
    assert got == pytest.approx([min(st.scores) for st in steps], abs=1e-5)
    assert [g > 0.5 for g in got] == [all(y) for _, y in data]
    last = PRMScorer(tiny_prm, aggregation="last")(["Task 5"] * 30, [c for c, _ in data])
    assert [g > 0.5 for g in last] == [y[-1] == 1 for _, y in data]
    assert PRMScorer(tiny_prm)(["Task 1"], ["\n\n"]) == [None]  # no step: no score


def test_step_token_ends_and_process_inputs(tiny_prm):
    tok = make_tiny_tokenizer()
    text = "1*2 gives 4\n\n3*3 gives 9"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert step_token_ends(split_steps(text), ids, tok) == [10, 23]  # one char per token
    prm = PRMScorer(tiny_prm)
    comps = [text, "5*5 gives 2", "\n\n"]
    r = prm(["Task 1"] * 3, comps)
    enc = [tok(c, add_special_tokens=False)["input_ids"] for c in comps]
    T = max(map(len, enc))
    response_ids = torch.tensor([e + [tok.pad_token_id] * (T - len(e)) for e in enc])
    response_mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc]).bool()
    out = prm.process_inputs(["Task 1"] * 3, comps, response_ids, response_mask, tok)
    assert out["step_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert out["step_ends"].tolist()[:2] == [[10, 23], [10, 0]]
    assert out["step_rewards"][0].tolist() == pytest.approx(prm.steps(["Task 1"], [text])[0].scores, abs=1e-6)
    assert out["step_rewards"][1, 0] > 0.5 and r[0] < 0.5  # 2 is even; 9 is odd
