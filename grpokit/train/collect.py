"""Steps 1-3 of an RL step: sample prompts, generate with the engine, score, transform; repeated in rounds
while a filtering transform (dynamic sampling) leaves fewer than `rollout.prompts_per_step` groups.

Rank invariance: every rank draws the same global prompt list and takes prompts rank, rank+W, ...; each
row's sampling seed comes from its global index; which groups are kept is decided on the global list
(the first groups by (round, global prompt index)). So 1 rank and N ranks train on the same global batch,
whatever `prompts_per_step % W` is, and every rank runs the same number of rounds.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from grpokit import dist
from grpokit.rollout.engine import SamplingParams
from grpokit.transforms import ScoredBatch, Scores, apply_transforms

#: group_key = round << ROUND_SHIFT | global prompt index
ROUND_SHIFT = 32


def row_seed(seed: int, step: int, round_: int, row: int) -> int:
    """The sampling seed of one global rollout row: a hash of (run seed, step, dynamic-sampling round, row)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{round_}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid manual_seed


def sampling_params(cfg: Any) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, stop_strings=tuple(r.stop_strings))


def encode(ctx: Any, rows: list[dict[str, Any]]) -> list[list[int]]:
    from grpokit.rollout import encode_prompts

    return encode_prompts(ctx.tokenizer, [r["prompt"] for r in rows],
                          system=ctx.cfg.data.system_prompt or None, chat=ctx.cfg.data.chat_template)


def score(ctx: Any, rows: list[dict[str, Any]], roll: Any) -> Scores:
    from grpokit.rewards.rewardset import columns_from_rows

    cols = columns_from_rows(rows, completion_lengths=roll.response_mask.sum(1).tolist(), truncated=roll.truncated.tolist())
    return Scores.of(ctx.scorer.score([r["prompt"] for r in rows], roll.texts, cols))


@dataclass
class Collected:
    """This rank's share of the step's global batch.

    global_row [B]: each row's index in the global batch (groups ordered by (round, prompt index));
    -1 marks a placeholder row (a rank left with no group keeps one of its groups so that its forward passes
    stay in lockstep with the other ranks; a placeholder enters no loss, statistic or metric)."""

    batch: ScoredBatch
    global_row: torch.Tensor  # [B] int64
    info: dict[str, float]


def sample_round(ctx: Any, round_: int) -> tuple[ScoredBatch, float, float]:
    """One round: this rank's prompts of a fresh global draw, generated and scored (before transforms).
    Returns the batch and the seconds spent generating and scoring."""
    from grpokit.data import expand_groups

    c, G, W, r = ctx.cfg, ctx.cfg.rollout.group_size, dist.world_size(), dist.rank()
    prompts = ctx.task.sample(c.rollout.prompts_per_step, ctx.data_rng)  # the same global list on every rank
    mine = list(range(r, len(prompts), W))
    rows, _ = expand_groups([prompts[i] for i in mine], G)
    seeds = [row_seed(c.train.seed, ctx.state["step"], round_, i * G + j) for i in mine for j in range(G)]
    t0 = time.perf_counter()
    roll = ctx.engine.generate(encode(ctx, rows), sampling_params(c), seeds)
    t1 = time.perf_counter()
    keys = torch.tensor([(round_ << ROUND_SHIFT) | i for i in mine for _ in range(G)], dtype=torch.long)  # [B]
    sb = ScoredBatch(rows, roll, score(ctx, rows, roll), keys, torch.ones(len(rows), dtype=torch.bool))
    return sb, t1 - t0, time.perf_counter() - t1


def first_groups(sb: ScoredBatch, n: int) -> tuple[ScoredBatch, list[int]]:
    """This rank's rows among the first `n` groups of the global batch (by group key), and those n keys."""
    mine = sorted(set(sb.group_key.tolist()))
    chosen = sorted(k for part in dist.all_gather_objects(mine) for k in part)[: max(n, 0)]
    take = set(chosen)
    return sb.select([i for i, k in enumerate(sb.group_key.tolist()) if k in take]), chosen


def collect(ctx: Any) -> Collected:
    """Rounds of `sample_round` + the batch transforms until `prompts_per_step` groups are kept (globally)
    or `algo.max_gen_batches` rounds are spent; with no group kept at all, the last round is used whole
    (transformed by every transform that does not drop groups)."""
    c, G = ctx.cfg, ctx.cfg.rollout.group_size
    want = c.rollout.prompts_per_step
    dropping = any(getattr(fn, "drops_groups", False) for _, fn in ctx.transforms)
    info = {"time/rollout": 0.0, "time/reward": 0.0, "dynamic/rounds": 0.0, "tokens/generated": 0.0}
    kept: list[ScoredBatch] = []
    keys: list[int] = []  # the kept groups' keys, in global batch order
    for round_ in range(c.algo.max_gen_batches if dropping else 1):
        raw, t_gen, t_score = sample_round(ctx, round_)
        t0 = time.perf_counter()
        sb = apply_transforms(raw, ctx.transforms, cfg=c, ctx=ctx)
        info["time/rollout"] += t_gen
        info["time/reward"] += t_score + time.perf_counter() - t0
        info["dynamic/rounds"] += 1
        info["tokens/generated"] += float(dist.all_reduce_sum([float(raw.rollout.response_mask.sum())])[0])
        part, chosen = first_groups(sb, want - len(keys))
        kept.append(part)
        keys += chosen
        if len(keys) >= want:
            break
    if dropping:
        info["dynamic/kept_groups"] = float(len(keys))
    if not keys:  # nothing survived the filters
        keep = [(n, fn) for n, fn in ctx.transforms if not getattr(fn, "drops_groups", False)]
        part, keys = first_groups(apply_transforms(raw, keep, cfg=c, ctx=ctx), want)
        kept = [part]
    batch = ScoredBatch.cat(kept, ctx.tokenizer.pad_token_id)
    if len(batch) == 0:  # this rank kept no group: a placeholder keeps its forwards in step with the others
        return Collected(raw.select(list(range(G))), torch.full((G,), -1, dtype=torch.long), info)
    pos = {k: n for n, k in enumerate(keys)}
    global_row = torch.tensor([pos[k] * G for k in batch.group_key.tolist()], dtype=torch.long)  # [B]
    return Collected(batch, global_row + group_member_index(batch.group_key), info)


def group_member_index(group_key: torch.Tensor) -> torch.Tensor:
    """[B] int64: each row's position inside its (contiguous) group."""
    out = torch.zeros_like(group_key)
    for i in range(1, len(group_key)):
        if group_key[i] == group_key[i - 1]:
            out[i] = out[i - 1] + 1
    return out
