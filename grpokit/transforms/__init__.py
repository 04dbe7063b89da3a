"""Batch transforms: `ScoredBatch -> ScoredBatch` steps between scoring and advantages (DESIGN "seams").

A variant that edits the batch (reward shaping, filtering rows or groups, rollout surgery) is a transform
registered here, not a branch in the loop. Every transform has one signature,

    fn(batch: ScoredBatch, *, cfg: Config) -> ScoredBatch     (or with `ctx`, the trainer context, as well)

and runs on this rank's rows (whole groups). A transform that drops groups (dynamic sampling) sets the
attribute `drops_groups = True` on its function; the trainer then assembles the global batch in a rank-invariant order and, when
too few groups survive, samples another round (`algo.max_gen_batches`).

`build_transforms(cfg)` lists the transforms a config asks for, in order: DAPO overlong shaping
(`rewards.overlong_buffer > 0`), overlong filtering (`algo.overlong_filter`), dynamic sampling
(`algo.dynamic_sampling`), then the names in `algo.transforms`, sorted by each function's `order` attribute
(SPEC 11's DOT, truncation penalty and GRPO-λ run before dynamic sampling; see `transforms.catalogue`).
"""
from __future__ import annotations

import inspect
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


#: Where a transform runs when it has no `order` attribute: after the built-in ones (see `build_transforms`).
DEFAULT_ORDER = 100


def build_transforms(cfg: Any) -> list[tuple[str, Transform]]:
    """(name, fn) of every transform `cfg` asks for, in the order they run: by each function's `order`
    attribute (overlong shaping 10, overlong filtering 40, dynamic sampling 50, others DEFAULT_ORDER unless
    they set one, as SPEC 11's DOT, truncation penalty and GRPO-λ do), then as listed."""
    names: list[str] = []
    if cfg.rewards.overlong_buffer > 0:
        names.append("overlong_shaping")
    if cfg.algo.overlong_filter:
        names.append("overlong_filter")
    if cfg.algo.dynamic_sampling:
        names.append("dynamic_sampling")
    names += [n for n in cfg.algo.transforms if n not in names]
    chosen = [(n, TRANSFORMS.get(n)) for n in names]
    return sorted(chosen, key=lambda nf: getattr(nf[1], "order", DEFAULT_ORDER))  # stable: ties keep list order


def apply_transforms(batch: ScoredBatch, transforms: list[tuple[str, Transform]], *, cfg: Any, ctx: Any = None) -> ScoredBatch:
    """Run `transforms` in order. `ctx` (the trainer context) goes to the transforms that declare it (DOT
    re-scores with the trainer's scorer and tokenizer)."""
    for _, fn in transforms:
        batch = fn(batch, cfg=cfg, ctx=ctx) if "ctx" in inspect.signature(fn).parameters else fn(batch, cfg=cfg)
    return batch


overlong_shaping.order = 10  # type: ignore[attr-defined]
overlong_filter.order = 40  # type: ignore[attr-defined]
dynamic_sampling.order = 50  # type: ignore[attr-defined]

from grpokit.transforms import catalogue as _catalogue  # noqa: E402  (SPEC 11's transforms)

TRANSFORMS.register("dot")(_catalogue.dot)
TRANSFORMS.register("truncation_penalty")(_catalogue.truncation_penalty)
TRANSFORMS.register("grpo_lambda")(_catalogue.grpo_lambda)


__all__ = ["DEFAULT_ORDER", "TRANSFORMS", "ScoredBatch", "Scores", "apply_transforms", "build_transforms", "concat_rollouts",
           "dynamic_sampling", "group_metric", "overlong_filter", "overlong_shaping"]
