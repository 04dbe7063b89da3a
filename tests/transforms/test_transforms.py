"""Batch transforms: overlong shaping and filtering, dynamic sampling on task accuracy (SPEC 5)."""
from __future__ import annotations

import types

import torch

from grpokit.rollout import Rollout
from grpokit.transforms import (
    TRANSFORMS, ScoredBatch, Scores, apply_transforms, build_transforms, dynamic_sampling, overlong_filter,
    overlong_shaping,
)


def batch(lengths: list[int], totals: list[float], correct: list[bool], G: int, truncated: list[bool] | None = None) -> ScoredBatch:
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    roll = Rollout(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                   response_ids=torch.ones(B, T, dtype=torch.long), response_mask=mask,
                   logprobs=torch.zeros(B, T), truncated=torch.tensor(truncated or [False] * B),
                   texts=[f"t{i}" for i in range(B)])
    sc = Scores(torch.tensor(totals), {"task": list(totals)}, torch.ones(B, dtype=torch.bool), torch.tensor(correct))
    keys = torch.arange(B) // G
    return ScoredBatch([{"prompt": f"p{i // G}"} for i in range(B)], roll, sc, keys, torch.ones(B, dtype=torch.bool))


def cfg(**algo: object) -> types.SimpleNamespace:
    a = {"dynamic_sampling": False, "overlong_filter": False, "dynamic_sampling_metric": "acc", "transforms": [], **algo}
    return types.SimpleNamespace(rollout=types.SimpleNamespace(max_new_tokens=10),
                                 rewards=types.SimpleNamespace(overlong_buffer=4), algo=types.SimpleNamespace(**a))


def test_overlong_shaping_adds_dapo_penalty() -> None:
    b = batch([5, 6, 8, 10], [1.0, 1.0, 0.0, 0.0], [True, True, False, False], G=2)
    out = overlong_shaping(b, cfg=cfg())
    # L_max 10, L_c 4: free up to 6, then (6 - L)/4
    torch.testing.assert_close(out.scores.total, torch.tensor([1.0, 1.0, -0.5, -1.0]))
    assert out.scores.per_function["overlong"] == [0.0, 0.0, -0.5, -1.0]


def test_overlong_filter_masks_truncated_rows_from_the_loss_only() -> None:
    b = batch([5, 10], [1.0, 0.0], [True, False], G=2, truncated=[False, True])
    out = overlong_filter(b, cfg=cfg())
    assert out.loss_rows.tolist() == [True, False] and len(out) == 2


def test_dynamic_sampling_filters_on_accuracy_not_the_shaped_total() -> None:
    """Group 0: both wrong, but one overlong -> totals differ only by the penalty: dropped on 'acc'
    (DAPO, verl filter_groups.metric=acc), kept on 'reward'. Group 1: one right, one wrong: kept."""
    b = batch([5, 9, 3, 4], [0.0, 0.0, 1.0, 0.0], [False, False, True, False], G=2)
    shaped = overlong_shaping(b, cfg=cfg())
    assert shaped.scores.total[0] != shaped.scores.total[1]
    kept = dynamic_sampling(shaped, cfg=cfg(dynamic_sampling=True))
    assert kept.group_key.tolist() == [1, 1]
    by_reward = dynamic_sampling(shaped, cfg=cfg(dynamic_sampling=True, dynamic_sampling_metric="reward"))
    assert by_reward.group_key.tolist() == [0, 0, 1, 1]


def test_build_transforms_orders_shaping_filter_sampling_then_extras() -> None:
    names = [n for n, _ in build_transforms(cfg(dynamic_sampling=True, overlong_filter=True))]
    assert names == ["overlong_shaping", "overlong_filter", "dynamic_sampling"]
    assert getattr(TRANSFORMS.get("dynamic_sampling"), "drops_groups", False)
    b = batch([5, 9, 3, 4], [0.0, 0.0, 1.0, 0.0], [False, False, True, False], G=2)
    out = apply_transforms(b, build_transforms(cfg(dynamic_sampling=True)), cfg=cfg(dynamic_sampling=True))
    assert len(out) == 2
