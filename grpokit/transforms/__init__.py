"""Batch transforms: `ScoredBatch -> ScoredBatch` steps between scoring and advantages (DESIGN "seams").

A variant that edits the batch (reward shaping, filtering rows or groups, rollout surgery) is a transform
registered here, not a branch in the loop. Every transform has one signature,

    fn(batch: ScoredBatch, *, cfg: Config) -> ScoredBatch

and runs on this rank's rows (whole groups). A transform that drops groups (dynamic sampling) sets the
attribute `drops_groups = True` on its function; the trainer then assembles the global batch in a rank-invariant order and, when
too few groups survive, samples another round (`algo.max_gen_batches`).

`build_transforms(cfg)` lists the transforms a config asks for, in order: DAPO overlong shaping
(`rewards.overlong_buffer > 0`), overlong filtering (`algo.overlong_filter`), dynamic sampling
(`algo.dynamic_sampling`), then the names in `algo.transforms`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from grpokit.algo.registry import Registry
from grpokit.transforms.batch import ScoredBatch, Scores, concat_rollouts

Transform = Callable[..., ScoredBatch]

#: Batch transforms by name; each is `fn(batch, *, cfg) -> batch`.
TRANSFORMS = Registry("batch transform")


@TRANSFORMS.register("overlong_shaping")
def overlong_shaping(batch: ScoredBatch, *, cfg: Any) -> ScoredBatch:
    """DAPO soft overlong punishment (arXiv 2503.14476, SPEC 5) added to each sample's reward.

    L_max = rollout.max_new_tokens, L_c = rewards.overlong_buffer. Logged as reward/overlong/mean.
    """
    from grpokit.rewards.builtin import overlong

    lengths = batch.rollout.response_mask.sum(1).tolist()  # [B]
    pen = overlong([], [], completion_lengths=lengths, max_len=cfg.rollout.max_new_tokens,
                   buffer=cfg.rewards.overlong_buffer)
    s = batch.scores
    pen_t = torch.tensor(pen, dtype=torch.float32)  # [B]
    total = torch.where(s.valid, s.total + pen_t, s.total)  # [B]
    per = {**s.per_function, "overlong": [float(p) for p in pen]}
    return batch.with_scores(Scores(total, per, s.valid, s.correct))


@TRANSFORMS.register("overlong_filter")
def overlong_filter(batch: ScoredBatch, *, cfg: Any) -> ScoredBatch:
    """DAPO overlong filtering (SPEC 5): truncated responses are masked out of the loss (they still count
    in their group's advantage statistics)."""
    return replace(batch, loss_rows=batch.loss_rows & ~batch.rollout.truncated.bool())


def group_metric(batch: ScoredBatch, metric: str) -> torch.Tensor:
    """[B] f32: the per-sample value dynamic sampling compares within a group: 'acc' (task correctness,
    as DAPO and verl's filter_groups.metric=acc) or 'reward' (the shaped total)."""
    if metric == "acc":
        return batch.scores.correct.float()  # [B]
    if metric == "reward":
        return batch.scores.total  # [B]
    raise ValueError(f"algo.dynamic_sampling_metric must be 'acc' or 'reward', got {metric!r}")


@TRANSFORMS.register("dynamic_sampling")
def dynamic_sampling(batch: ScoredBatch, *, cfg: Any) -> ScoredBatch:
    """DAPO dynamic sampling (SPEC 5): keep only groups whose members differ in task accuracy
    (`algo.dynamic_sampling_metric = 'acc'`, the paper's rule) or in total reward ('reward').
    The trainer samples more rounds until `rollout.prompts_per_step` groups are kept."""
    v = group_metric(batch, cfg.algo.dynamic_sampling_metric)  # [B]
    keep = [i for g in batch.groups() if float(v[g].max()) > float(v[g].min()) for i in g]
    return batch.select(keep)


dynamic_sampling.drops_groups = True  # type: ignore[attr-defined]  # the trainer samples more rounds after it


def build_transforms(cfg: Any) -> list[tuple[str, Transform]]:
    """(name, fn) of every transform `cfg` asks for, in the order they run."""
    names: list[str] = []
    if cfg.rewards.overlong_buffer > 0:
        names.append("overlong_shaping")
    if cfg.algo.overlong_filter:
        names.append("overlong_filter")
    if cfg.algo.dynamic_sampling:
        names.append("dynamic_sampling")
    names += [n for n in cfg.algo.transforms if n not in names]
    return [(n, TRANSFORMS.get(n)) for n in names]


def apply_transforms(batch: ScoredBatch, transforms: list[tuple[str, Transform]], *, cfg: Any) -> ScoredBatch:
    for _, fn in transforms:
        batch = fn(batch, cfg=cfg)
    return batch


__all__ = ["TRANSFORMS", "ScoredBatch", "Scores", "apply_transforms", "build_transforms", "concat_rollouts",
           "dynamic_sampling", "group_metric", "overlong_filter", "overlong_shaping"]
