"""Steps 4-5 of an RL step: the trainer's log-prob passes and advantages (`build_batch`), then the
optimizer steps (`update`).

Lockstep: under FSDP2 every forward is a collective, so every rank runs the same number of forwards in
each pass: a rank with fewer micro-batches (uneven prompts, dynamic sampling, token budgets, a
placeholder) runs padding forwards at weight 0 (`dist.lockstep`). Mini-batches are cut from the *global*
batch by each row's global index, so 1 rank and N ranks take the same optimizer steps.

Shapes: B rows on this rank, T response tokens, P prompt tokens.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from grpokit import dist
from grpokit.train.collect import Collected
from grpokit.train.correction import correction_weights, is_bypass, resolve_mode, weighted
from grpokit.train.step import (
    Batch, StatSums, cancellation_metrics, credit_needs_step_rewards, micro_batch_loss, needs_sequence_weights, plan_microbatches, plan_minibatches,
    sequence_advantages, sequence_kl_weights, sequence_weights, token_credit, transform_needs_old_logprobs,
    transformed_advantages,
)
from grpokit.train.step import covariance_selection, covariance_selection_kind


def score_tokens(ctx: Any, module: Any, sub: Batch, *, entropy: bool = False) -> Any:
    """Teacher-forced log-probs [b, T'] (and entropies) of a micro-batch's responses under `module`."""
    from grpokit.rollout.logprobs import score_logprobs

    with ctx.autocast:
        return score_logprobs(module, sub.input_ids.to(ctx.device), sub.attention_mask.to(ctx.device), sub.response_len,
                              temperature=ctx.cfg.rollout.temperature, return_entropy=entropy,
                              pack=ctx.cfg.train.pack_prompts, pad_id=ctx.tokenizer.pad_token_id)


def recompute_old_logprobs(cfg: Any) -> bool:
    """Whether ℓ° needs its own pass before the update (SPEC 0, 12). Not when the only update of a rollout
    starts from the sampling weights and nothing before the update reads ℓ°: the loss then uses the
    detached current log-probs, which are ℓ° exactly. Credit other than 'broadcast' (FRPO's KL-to-go) and
    KL-in-reward read ℓ° before the update, so they always get the pass, and so do Clip-Cov and KL-Cov, whose
    step-level choice (SPEC 11) reads ℓ° before the first micro-batch."""
    t, a = cfg.train, cfg.algo
    if is_bypass(cfg):  # rollout correction 'bypass' (SPEC 12): ℓ° := μ, never recomputed
        return False
    return (t.old_logprobs == "recompute" or t.updates_per_rollout > 1 or a.credit != "broadcast"
            or (a.beta > 0 and a.kl_placement == "reward") or transform_needs_old_logprobs(a)
            or covariance_selection_kind(a) is not None)


def padded_plan(micro: list[torch.Tensor], rows: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """(row indices, weight) for each forward of a lockstepped pass: this rank's micro-batches, then
    padding forwards of one row at weight 0 up to the largest count over ranks."""
    n = dist.lockstep(len(micro))
    return [(rows[micro[k]], 1.0) if k < len(micro) else (rows[:1], 0.0) for k in range(n)]


def logprob_pass(ctx: Any, module: Any, batch: Batch, micro: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies of all response tokens, no grad: [B, T] each."""
    B, T = batch.response_mask.shape
    logp = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    ent = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    with torch.no_grad():
        for idx, weight in padded_plan(micro, torch.arange(B)):
            sub = batch.select(idx)
            lp, en = score_tokens(ctx, module, sub, entropy=True)
            if weight:
                t = sub.response_len
                logp[idx, :t] = lp.float().cpu() * sub.response_mask  # [b, T']
                ent[idx, :t] = en.float().cpu() * sub.response_mask  # [b, T']
    return logp, ent


def global_advantages(ctx: Any, rewards: torch.Tensor, group_ids: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Advantages over every rank's rows (batch-wide estimators see the whole batch); a row not counted (a
    skipped reward error, a placeholder) is left out of its group's statistics and gets 0.
    rewards [B], group_ids [B] (global), counted [B] bool -> [B]."""
    (all_r, all_g, all_v), start = dist.gather_rows(rewards.float(), group_ids.long(), counted.bool())  # [N] each
    adv = sequence_advantages(all_r, all_g, cfg=ctx.cfg.algo, valid=all_v)  # [N]
    return adv[start : start + len(rewards)]  # [B]


def build_batch(ctx: Any, col: Collected, micro_size: int | None = None) -> Batch:
    """ℓ° and ℓʳ (recomputed by the trainer, SPEC 0), KL-in-reward, advantages, credit."""
    a, G = ctx.cfg.algo, ctx.cfg.rollout.group_size
    sb, real = col.batch, col.global_row >= 0  # [B]
    roll, sc = sb.rollout, sb.scores
    resp_mask = roll.response_mask.bool()  # [B, T]
    counted = sc.valid & real  # [B] rows in the advantage statistics
    loss_mask = resp_mask & (counted & sb.loss_rows)[:, None]  # [B, T]
    zeros = torch.zeros(resp_mask.shape, dtype=torch.float32)  # [B, T]
    batch = Batch(
        input_ids=roll.input_ids(), attention_mask=roll.attention_mask(), response_mask=resp_mask,
        loss_mask=loss_mask, group_ids=torch.where(real, col.global_row // G, -1), rewards=sc.total.clone(),
        seq_adv=torch.zeros_like(sc.total), token_adv=zeros, old_logp=zeros, ref_logp=None, entropy=zeros.clone(),
    )
    micro = plan_microbatches(batch.attention_mask.sum(1), micro_batch_size=micro_size or ctx.cfg.train.micro_batch_size,
                              max_tokens=ctx.cfg.train.max_tokens_per_microbatch)
    if recompute_old_logprobs(ctx.cfg):
        batch.old_logp, batch.entropy = logprob_pass(ctx, ctx.model, batch, micro)
    else:  # filled in by the update's own forward (the policy has not moved: ℓ° = detached ℓ there)
        batch.old_logp = roll.logprobs.float() * resp_mask  # [B, T] μ until then
    if ctx.ref is not None:
        batch.ref_logp, _ = logprob_pass(ctx, ctx.ref, batch, micro)
        if a.kl_placement == "reward":  # R_i -= beta * sum_t k1 (SPEC 4)
            batch.rewards = batch.rewards - a.beta * ((batch.old_logp - batch.ref_logp) * resp_mask).sum(1)
    if ctx.teacher is not None:  # ℓ_T, the fourth stream (algo.distill), and KDRL's per-row coefficient
        from grpokit.train.teacher import distill_row_coef

        batch.teacher_logp, _ = logprob_pass(ctx, ctx.teacher, batch, micro)
        batch.distill_coef = distill_row_coef(ctx.cfg, step=ctx.state["step"], correct=sc.correct)  # [B]
    if weighted(resolve_mode(ctx.cfg, ctx.engine)):  # μ for the rollout-correction weights (SPEC 12)
        batch.rollout_logp = roll.logprobs.float() * resp_mask  # [B, T]
    batch.seq_adv = global_advantages(ctx, batch.rewards, batch.group_ids, counted)  # [B]
    batch.seq_adv = transformed_advantages(batch.seq_adv, resp_mask, cfg=a, old_logp=batch.old_logp,
                                           ref_logp=batch.ref_logp)  # [B] ACE (SPEC 11)
    batch.kl_weight = sequence_kl_weights(batch.seq_adv, sc.correct, counted, batch.group_ids, cfg=a)  # [B] APO or None
    inputs: dict[str, torch.Tensor] = {}
    if credit_needs_step_rewards(a):  # the PRM's step rewards and where each step ends (SPEC 13)
        from grpokit.rewards import process_credit_inputs

        inputs = process_credit_inputs(ctx.scorer, [r["prompt"] for r in sb.rows], roll.texts, roll.response_ids,
                                       resp_mask, ctx.tokenizer, batch.group_ids)
    batch.token_adv = token_credit(batch.seq_adv, resp_mask, cfg=a, old_logp=batch.old_logp,
                                   ref_logp=batch.ref_logp, **inputs)
    return batch


def reduce_stats(stats: StatSums) -> dict[str, float]:
    """The means of per-token statistics over every rank (sums and counts added, extremes combined)."""
    parts = dist.all_gather_objects((stats.sums, stats.counts))
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for s, c in parts:
        for k, v in s.items():
            if k.endswith("/min"):
                sums[k] = min(sums.get(k, v), v)
            elif k.endswith("/max"):
                sums[k] = max(sums.get(k, v), v)
            else:
                sums[k] = sums.get(k, 0.0) + v
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + v
    merged = StatSums()
    merged.sums, merged.counts = sums, counts
    return merged.means()


def update(ctx: Any, batch: Batch, global_row: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """`updates_per_rollout` optimizer steps over contiguous mini-batches of the global batch, each with
    gradient accumulation over micro-batches (gradients reduced over ranks on the last one). Returns
    metrics and the effective per-token credit [B, T] (advantage x FIPO weight where the loss reports one)."""
    c = ctx.cfg
    stats, sink = StatSums(), StatSums()
    credit = batch.token_adv.clone()  # [B, T]
    norm_const = float(c.algo.norm_const or c.rollout.max_new_tokens)
    lengths = batch.attention_mask.sum(1)  # [B]
    real = global_row >= 0  # [B]
    n_global = int(dist.all_reduce_sum([float(real.sum())])[0])
    grad_norms, skipped, losses = [], 0, []
    # the optimizer's own list: under FSDP2, model.parameters() lists the root's unsharded tensors between a
    # forward and its backward, which never receive the (sharded) gradients
    params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
    bypass = is_bypass(c)  # ℓ° := μ (SPEC 12): old_logp keeps μ, entropy from the update's forward
    fresh = not recompute_old_logprobs(c) and not bypass
    mode = resolve_mode(c, ctx.engine)
    seq_w = torch.ones(len(global_row)) if c.algo.loss == "gspo" else None  # [B] the weights GSPO used (SPEC 8)
    for j, span in enumerate(plan_minibatches(n_global, c.train.updates_per_rollout)):
        lo, hi = int(span[0]), int(span[-1]) + 1  # global rows [lo, hi)
        mb = ((global_row >= lo) & (global_row < hi)).nonzero().flatten()  # [b] this rank's rows of it
        counts = dist.all_reduce_sum([float(batch.loss_mask[mb].sum()), float(len(mb))])
        n_tok, n_seq = max(float(counts[0]), 1.0), float(counts[1])
        micro = plan_microbatches(lengths[mb], micro_batch_size=c.train.micro_batch_size,
                                  max_tokens=c.train.max_tokens_per_microbatch) if len(mb) else []
        plan = padded_plan(micro, mb if len(mb) else torch.arange(1))
        step_level = needs_sequence_weights(c.algo), covariance_selection_kind(c.algo) is not None
        if any(step_level):  # step-level choices read ℓ at the step's weights: one no-grad pass serves both
            step_rows = batch.select(mb if len(mb) else torch.arange(1))
            cur = None if j == 0 else logprob_pass(ctx, ctx.model, step_rows, micro if len(mb) else [])[0]
        if step_level[0]:  # GSPO's transformed s_i over the whole step, before its micro-batches
            if batch.seq_weight is None:
                batch.seq_weight = torch.ones(len(global_row))  # [B]
            if len(mb):
                batch.seq_weight[mb] = sequence_weights(step_rows, cur, cfg=c.algo).cpu()
        if step_level[1]:  # Clip-Cov / KL-Cov: one choice per optimizer step (SPEC 11)
            from grpokit.algo.masks import selection_seed

            mine = batch.select(mb)  # this rank's rows of the step (possibly none)
            seed = selection_seed(c.train.seed, int(ctx.state["step"]), j, "cov")
            sel = covariance_selection(mine, cur if len(mb) else None, global_row[mb], cfg=c.algo, seed=seed,
                                       reduce_sum=dist.all_reduce_sum, gather=dist.all_gather_objects)  # [b, T']
            if batch.cov_select is None:
                batch.cov_select = torch.zeros(batch.loss_mask.shape, dtype=torch.bool)  # [B, T]
            if len(mb):
                batch.cov_select[mb] = False
                batch.cov_select[mb, : sel.shape[1]] = sel
        ctx.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for k, (idx, weight) in enumerate(plan):
            sub = batch.select(idx)
            with dist.grad_sync(ctx.model, enabled=k == len(plan) - 1):
                if fresh or bypass:  # fresh: ℓ° = the detached current log-probs (ratio 1); entropy from this forward
                    logp, ent = score_tokens(ctx, ctx.model, sub, entropy=True)
                    if weight:
                        batch.entropy[idx, : sub.response_len] = ent.float().cpu()
                    if fresh:
                        sub.old_logp = logp.detach().float()
                        if weight:
                            batch.old_logp[idx, : sub.response_len] = sub.old_logp.cpu() * sub.response_mask
                else:
                    logp = score_tokens(ctx, ctx.model, sub)
                sub = _to(sub, logp.device)
                if weighted(mode):  # rollout correction (SPEC 12): w(ℓ° − μ), stop-gradient, on the policy loss
                    sub.is_weight = correction_weights(mode, sub.old_logp, sub.rollout_logp, sub.loss_mask, cfg=c,
                                                       stats=stats if weight else sink)
                loss, s = micro_batch_loss(sub, logp.float(), cfg=c.algo, num_tokens=n_tok, num_seqs=n_seq,
                                           norm_const=norm_const, stats=stats if weight else sink)
                (loss * weight * dist.world_size()).backward()
            total += loss.detach().double().cpu() * weight
            if weight:  # the credit the loss used (FRPO kl_source = 'current' recomputes it), x FIPO's weight
                used = s.get("token_adv", sub.token_adv) * s.get("fipo_weight", 1.0)  # [b, T']
                credit[idx, : sub.response_len] = used.cpu()
                if seq_w is not None and "seq_ratio" in s:
                    seq_w[idx] = s["seq_ratio"].detach().float().cpu()
        loss_sum = float(dist.all_reduce_sum([float(total)])[0])
        gn = torch.nn.utils.clip_grad_norm_(params, c.train.grad_clip if c.train.grad_clip > 0 else float("inf"))
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if not (math.isfinite(loss_sum) and math.isfinite(gn)):
            skipped += 1
            ctx.optimizer.zero_grad(set_to_none=True)
            continue
        ctx.optimizer.step()
        ctx.scheduler.step()
        grad_norms.append(gn)
        losses.append(loss_sum)
    out = reduce_stats(stats)
    res = cancellation_metrics(batch, seq_weights=seq_w)["cancel/residual"]  # this rank's groups
    out["cancel/residual"] = float(np.mean([r for r in dist.all_gather_objects(res)]))  # mean over ranks
    out.update({"loss": float(np.mean(losses)) if losses else float("nan"),
                "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
                "lr": ctx.scheduler.get_last_lr()[0], "nonfinite_updates": float(skipped)})
    return out, credit


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    from dataclasses import fields as dc_fields

    return Batch(**{f.name: (None if getattr(batch, f.name) is None else getattr(batch, f.name).to(device)) for f in dc_fields(batch)})
