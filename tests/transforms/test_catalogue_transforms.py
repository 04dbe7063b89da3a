"""SPEC 11's batch transforms on a ScoredBatch: DOT's surgery and re-scoring, DLER's truncation penalty,
GRPO-λ's shaped reward, and where they run relative to DAPO's transforms."""
from __future__ import annotations

import types

import torch

from grpokit.algo.catalogue import grpo_lambda_penalty
from grpokit.rewards import RewardSet
from grpokit.rollout import Rollout
from grpokit.transforms import TRANSFORMS, ScoredBatch, Scores, apply_transforms, build_transforms

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """ids 1..26 are letters a..z, 0 is padding."""

    pad_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i - 1] for i in ids if i > 0)

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ALPHABET.index(c) + 1 for c in text]


def ends_with_z(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """The toy task: an answer is right when it ends with 'z'."""
    return [1.0 if c.endswith("z") else 0.0 for c in completions]


def scored(texts: list[str], G: int, truncated: list[bool] | None = None) -> ScoredBatch:
    tok = CharTokenizer()
    B, T = len(texts), max(len(t) for t in texts)
    ids = torch.zeros(B, T, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(tok.encode(t))
    mask = ids > 0
    roll = Rollout(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                   response_ids=ids, response_mask=mask, logprobs=-0.5 * mask.float(),
                   truncated=torch.tensor(truncated or [False] * B), texts=list(texts))
    rs = RewardSet([(ends_with_z, 1.0, {})])
    rows = [{"prompt": f"p{i // G}"} for i in range(B)]
    sc = Scores.of(rs.score([r["prompt"] for r in rows], texts, {}))
    return ScoredBatch(rows, roll, sc, torch.arange(B) // G, torch.ones(B, dtype=torch.bool))


def cfg(**algo: object) -> types.SimpleNamespace:
    a = {"dynamic_sampling": False, "overlong_filter": False, "dynamic_sampling_metric": "acc", "transforms": [],
         "dot_std_mult": 3.0, "dot_margin": 32, "length_cap": 0, "grpo_lambda_frac": 0.2, "grpo_lambda_alpha": 0.6, **algo}
    return types.SimpleNamespace(rollout=types.SimpleNamespace(max_new_tokens=400),
                                 rewards=types.SimpleNamespace(overlong_buffer=0), algo=types.SimpleNamespace(**a))


def trainer_ctx() -> types.SimpleNamespace:
    return types.SimpleNamespace(tokenizer=CharTokenizer(), scorer=RewardSet([(ends_with_z, 1.0, {})]))


def test_dot_cuts_the_outlier_of_an_all_correct_group_and_rescores_it() -> None:
    # group 0: 11 short right answers and one 1200-token right answer (z = 3.18 > 3): cut, loses its 'z'
    # group 1: the same lengths but one wrong answer: untouched
    long = "a" * 1199 + "z"
    g0 = ["abcz"] * 11 + [long]
    g1 = ["abcz"] * 10 + ["abca", long]
    b = scored(g0 + g1, G=12)
    assert b.scores.correct[:12].all() and not b.scores.correct[12:].all()
    out = apply_transforms(b, [("dot", TRANSFORMS.get("dot"))], cfg=cfg(), ctx=trainer_ctx())
    lengths = out.rollout.response_mask.sum(1)
    L = torch.tensor([4.0] * 11 + [1200.0], dtype=torch.float64)
    cut_at = int(torch.floor(L.mean() + 3 * L.std()))
    assert lengths[11] == cut_at and 1200 - cut_at >= 32
    assert torch.equal(lengths[:11], torch.full((11,), 4)) and torch.equal(lengths[12:], b.rollout.response_mask.sum(1)[12:])
    assert out.rollout.texts[11] == "a" * cut_at and out.rollout.texts[:11] == b.rollout.texts[:11]
    assert (out.rollout.response_ids[11, cut_at:] == 0).all() and (out.rollout.logprobs[11, cut_at:] == 0).all()
    assert float(out.scores.total[11]) == 0.0 and not bool(out.scores.correct[11])  # re-scored: the answer was cut off
    assert torch.equal(out.scores.total[:11], b.scores.total[:11]) and torch.equal(out.scores.total[12:], b.scores.total[12:])
    assert out.scores.per_function["ends_with_z"][11] == 0.0
    assert out.scores.per_function["dot_cut_tokens"] == [0.0] * 11 + [1200.0 - cut_at] + [0.0] * 12
    assert bool(out.rollout.truncated[11]) is False and out.loss_rows.all()


def test_dot_without_cuts_adds_its_metric_and_needs_no_context() -> None:
    b = scored(["abcz", "abz", "az", "abca"], G=2)
    out = TRANSFORMS.get("dot")(b, cfg=cfg())
    assert out.scores.per_function["dot_cut_tokens"] == [0.0] * 4
    assert torch.equal(out.rollout.response_mask, b.rollout.response_mask) and torch.equal(out.scores.total, b.scores.total)


def test_truncation_penalty_zeroes_unfinished_or_overlong_answers() -> None:
    b = scored(["abcz", "abcdefz", "az", "abca"], G=2, truncated=[False, False, True, False])
    out = TRANSFORMS.get("truncation_penalty")(b, cfg=cfg())
    assert out.scores.total.tolist() == [1.0, 1.0, 0.0, 0.0] and out.scores.correct.tolist() == [True, True, False, False]
    assert out.scores.per_function["truncation"] == [0.0, 0.0, -1.0, 0.0]
    capped = TRANSFORMS.get("truncation_penalty")(b, cfg=cfg(length_cap=5))
    assert capped.scores.total.tolist() == [1.0, 0.0, 0.0, 0.0] and capped.scores.correct.tolist() == [True, False, False, False]


def test_grpo_lambda_transform_subtracts_the_penalty_from_the_top_groups() -> None:
    # group 0 all right (acc 1), group 1 half right, group 2 all wrong; λ = 0.2 of 3 groups -> 1 group
    b = scored(["abz", "abcdefz", "az", "abcz", "abca", "aa"], G=2)
    out = TRANSFORMS.get("grpo_lambda")(b, cfg=cfg())
    pen = grpo_lambda_penalty(b.rollout.response_mask.sum(1), b.scores.correct, b.scores.valid, b.group_key, frac=0.2, alpha=0.6)
    torch.testing.assert_close(out.scores.total, b.scores.total - pen.float())
    assert (pen[:2] > 0).all() and (pen[2:] == 0).all() and pen[1] > pen[0]
    assert out.scores.per_function["length_penalty"] == [-float(p) for p in pen.float().tolist()]
    assert torch.equal(out.scores.correct, b.scores.correct)  # a shaped reward, accuracy unchanged


def test_catalogue_transforms_run_before_dynamic_sampling() -> None:
    """DOT and GRPO-λ act on all-correct groups, which dynamic sampling would drop: they run first."""
    c = cfg(dynamic_sampling=True, overlong_filter=True, transforms=["grpo_lambda", "dot", "truncation_penalty"])
    c.rewards.overlong_buffer = 8
    names = [n for n, _ in build_transforms(c)]
    assert names == ["dot", "overlong_shaping", "truncation_penalty", "grpo_lambda", "overlong_filter", "dynamic_sampling"]
    # DOT turns an all-correct group (dropped by dynamic sampling) into one with signal (kept)
    b = scored(["abcz"] * 11 + ["a" * 1199 + "z"], G=12)
    kept = apply_transforms(b, build_transforms(cfg(dynamic_sampling=True, transforms=["dot"])), cfg=cfg(dynamic_sampling=True), ctx=trainer_ctx())
    assert len(kept) == 12
    assert len(apply_transforms(b, build_transforms(cfg(dynamic_sampling=True)), cfg=cfg(dynamic_sampling=True))) == 0
