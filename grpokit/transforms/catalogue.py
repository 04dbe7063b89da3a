"""SPEC 11's batch transforms: DOT (rollout surgery), DLER's truncation penalty and GRPO-λ (reward shapers).

Each is `fn(batch, *, cfg[, ctx]) -> batch`, enabled by name in `algo.transforms`; the math is in
`grpokit.algo.catalogue`. Their `order` puts them where their papers need them, ahead of dynamic sampling
(which would otherwise drop the all-correct groups they act on):

    dot (0) -> overlong_shaping (10) -> truncation_penalty (20) -> grpo_lambda (30) -> overlong_filter (40)
    -> dynamic_sampling (50) -> any other transform (100)

Each adds one entry to `scores.per_function` on every row (0 where it did nothing), so rollout metrics log
`reward/<entry>/mean` and rounds concatenate. Shapes: B rows on this rank (whole groups), T response tokens.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from grpokit import dist
from grpokit.algo.catalogue import dot_cut_lengths, grpo_lambda_penalty, truncation_penalized
from grpokit.transforms.batch import ScoredBatch, Scores


def dot(batch: ScoredBatch, *, cfg: Any, ctx: Any = None) -> ScoredBatch:
    """DOT (arXiv 2601.03969): in all-correct groups, cut responses ≥ dot_margin tokens past mean + k·std, re-score.

    The cut rows keep their first T tokens (ids, mask and sampler log-probs past T are cleared), their text is
    the decoded prefix, and the task's scorers score them again (`ctx.scorer`, as when they were sampled), so
    a cut that removes the answer becomes a wrong answer in a group that had no signal. Their `truncated`
    flag is unchanged (a DOT cut is not the generation limit). Logged as reward/dot_cut_tokens/mean.
    """
    a, roll, sc = cfg.algo, batch.rollout, batch.scores
    lengths = roll.response_mask.sum(1)  # [B]
    new = dot_cut_lengths(lengths, sc.correct, sc.valid, batch.group_key, std_mult=a.dot_std_mult, margin=a.dot_margin)  # [B]
    cut = (new < lengths).nonzero().flatten().tolist()
    per = {**sc.per_function, "dot_cut_tokens": [float(x) for x in (lengths - new).tolist()]}
    if not cut:
        return batch.with_scores(Scores(sc.total, per, sc.valid, sc.correct))
    if ctx is None:
        raise ValueError("transform 'dot' re-scores the responses it cuts and needs the trainer context (ctx=...)")
    keep = torch.arange(roll.response_ids.shape[1])[None, :] < new[:, None]  # [B, T]
    texts = list(roll.texts)
    for i in cut:
        texts[i] = ctx.tokenizer.decode(roll.response_ids[i, : int(new[i])].tolist(), skip_special_tokens=True)
    pad = ctx.tokenizer.pad_token_id
    roll = replace(roll, response_ids=torch.where(keep, roll.response_ids, torch.full_like(roll.response_ids, pad)),
                   response_mask=roll.response_mask & keep, logprobs=torch.where(keep, roll.logprobs, torch.zeros_like(roll.logprobs)),
                   texts=texts)
    from grpokit.train.collect import score  # the trainer's own scoring call (columns, lengths, truncated)

    part = replace(batch, rollout=roll).select(cut).rollout  # the cut rows only
    again = score(ctx, [batch.rows[i] for i in cut], part)
    total, valid, correct = sc.total.clone(), sc.valid.clone(), sc.correct.clone()
    idx = torch.tensor(cut)
    total[idx], valid[idx], correct[idx] = again.total, again.valid, again.correct
    for k, v in again.per_function.items():
        if k in per:
            per[k] = list(per[k])
            for j, i in enumerate(cut):
                per[k][i] = v[j]
    return replace(batch, rollout=roll, scores=Scores(total, per, valid, correct))


def truncation_penalty(batch: ScoredBatch, *, cfg: Any) -> ScoredBatch:
    """DLER's truncation penalty (arXiv 2510.15110): a response past algo.length_cap, or unfinished, gets reward 0.

    The row also stops counting as correct (dynamic sampling and the accuracy metrics see the penalty).
    algo.length_cap = 0 means rollout.max_new_tokens: then exactly the responses that hit the generation
    limit without EOS are zeroed. Logged as reward/truncation/mean (the change of each reward).
    """
    sc, roll = batch.scores, batch.rollout
    hit = truncation_penalized(roll.response_mask.sum(1), roll.truncated, cap=cfg.algo.length_cap) & sc.valid  # [B]
    total = torch.where(hit, torch.zeros_like(sc.total), sc.total)  # [B]
    per = {**sc.per_function, "truncation": [float(x) for x in (total - sc.total).tolist()]}
    return batch.with_scores(Scores(total, per, sc.valid, sc.correct & ~hit))


def grpo_lambda(batch: ScoredBatch, *, cfg: Any) -> ScoredBatch:
    """GRPO-λ (arXiv 2505.18086): length penalty only on the correct answers of the top-λ groups by accuracy.

    The top ⌈λ·S⌉ groups are chosen over the round's whole global batch (every rank's groups, ordered by
    group key, so the choice does not depend on the number of ranks); in them a correct answer's reward
    drops by α·σ(z), z its length z-score among the group's correct answers (1 − α·σ(z) for a 0/1 reward).
    Logged as reward/length_penalty/mean.
    """
    a, sc = cfg.algo, batch.scores
    lengths = batch.rollout.response_mask.sum(1)  # [B]
    (keys, L, ok, valid), start = dist.gather_rows(batch.group_key.long(), lengths.long(), sc.correct.bool(), sc.valid.bool())  # [N] each
    pen = grpo_lambda_penalty(L, ok, valid, keys, frac=a.grpo_lambda_frac, alpha=a.grpo_lambda_alpha)[start : start + len(batch)]  # [B]
    pen = pen.to(sc.total.dtype)  # [B]
    per = {**sc.per_function, "length_penalty": [float(-x) for x in pen.tolist()]}
    return batch.with_scores(Scores(sc.total - pen, per, sc.valid, sc.correct))


dot.order = 0  # type: ignore[attr-defined]
truncation_penalty.order = 20  # type: ignore[attr-defined]
grpo_lambda.order = 30  # type: ignore[attr-defined]
