"""The one call site of `grpokit.algo`: advantages once per rollout, then loss per micro-batch.

The loop calls, per rollout batch: `sequence_advantages` (with `valid`), `token_credit`, then for each
of `plan_minibatches(B, k)` (one optimizer step each): `sequence_weights` when `needs_sequence_weights`,
`plan_microbatches`, and `micro_batch_loss` per micro-batch; after the update `cancellation_metrics`.

Shapes: B sequences, T response tokens (right-padded), P prompt tokens (left-padded).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from grpokit.algo import ADV_TRANSFORMS, ADVANTAGES, AGGREGATIONS, CREDIT, DISTILL, KL, KL_WEIGHTS, LOSSES, SEQ_WEIGHTS, TOKEN_MASKS
from grpokit.algo.constants import LOG_RATIO_CLAMP
from grpokit.algo.credit import cancellation_residual
from grpokit.algo.masked import to_f32
from grpokit.config import LOSS_HPARAMS, OFF_AT_ZERO, TOKEN_MASK_HPARAMS, AlgoConfig

CLIP_STATS = {"clipped_low": "clip/low", "clipped_high": "clip/high", "dual_clipped": "clip/dual"}


@dataclass
class Batch:
    """One rollout batch, ready for the update. Every tensor has B rows."""

    input_ids: torch.Tensor        # [B, P+T] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor   # [B, P+T]
    response_mask: torch.Tensor    # [B, T] bool, real response tokens
    loss_mask: torch.Tensor        # [B, T] bool, tokens that enter the loss (overlong filtering may drop rows)
    group_ids: torch.Tensor        # [B] int64
    rewards: torch.Tensor          # [B] f32, after any KL-in-reward shaping
    seq_adv: torch.Tensor          # [B] f32
    token_adv: torch.Tensor        # [B, T] f32, the final per-token advantage (credit)
    old_logp: torch.Tensor         # [B, T] f32
    ref_logp: torch.Tensor | None  # [B, T] f32 or None when beta = 0
    entropy: torch.Tensor          # [B, T] f32, of the sampling policy (metrics only)
    seq_weight: torch.Tensor | None = None  # [B] f32 stop-gradient sequence weights (algo.seq_weight), or None
    teacher_logp: torch.Tensor | None = None  # [B, T] f32 ℓ_T of model.teacher (algo.distill), or None
    distill_coef: torch.Tensor | None = None  # [B] f32 KDRL's per-row coefficient (annealed beta, 0 = untouched)
    kl_weight: torch.Tensor | None = None  # [B] f32 per-sequence KL-in-loss weight (algo.kl_weight, SPEC 11), or None = beta
    rollout_logp: torch.Tensor | None = None  # [B, T] f32 μ, the engine's log-probs (rollout correction, SPEC 12), or None
    is_weight: torch.Tensor | None = None  # [B, T] f32 stop-gradient rollout-correction weight w (SPEC 12), or None
    cov_select: torch.Tensor | None = None  # [B, T] bool Clip-Cov / KL-Cov tokens chosen per optimizer step, or None

    def select(self, idx: torch.Tensor) -> "Batch":
        """Rows `idx`, with columns trimmed to what those rows use (all-pad prompt columns, tail)."""
        sub = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)}
        T = self.response_mask.shape[1]
        P = self.input_ids.shape[1] - T
        t_used = int(sub["response_mask"].sum(1).max().item()) if len(idx) else 0  # longest response
        t_used = max(t_used, 1)
        p_first = int(sub["attention_mask"][:, :P].any(0).float().argmax().item()) if P else 0
        sub["input_ids"] = sub["input_ids"][:, p_first : P + t_used]  # [b, P'+T']
        sub["attention_mask"] = sub["attention_mask"][:, p_first : P + t_used]  # [b, P'+T']
        for name in ("response_mask", "loss_mask", "token_adv", "old_logp", "ref_logp", "entropy", "teacher_logp",
                     "rollout_logp", "is_weight", "cov_select"):
            if sub[name] is not None:
                sub[name] = sub[name][:, :t_used]  # [b, T']
        return Batch(**sub)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]


def plan_microbatches(
    lengths: torch.Tensor, *, micro_batch_size: int, max_tokens: int = 0
) -> list[torch.Tensor]:
    """Split row indices into micro-batches: a fixed count, or packed by a token budget.

    `lengths` [B] are total (prompt + response) token counts. With `max_tokens`, rows are taken in
    order and a micro-batch closes when adding the next row would make (rows x longest row) exceed
    the budget; a single row longer than the budget gets a micro-batch of its own.
    """
    B = lengths.shape[0]
    if max_tokens <= 0:
        return [torch.arange(s, min(s + micro_batch_size, B)) for s in range(0, B, micro_batch_size)]
    out: list[torch.Tensor] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths.tolist()):
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            out.append(torch.tensor(current))
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        out.append(torch.tensor(current))
    return out


def plan_minibatches(B: int, k: int) -> list[torch.Tensor]:
    """Row indices of the `k` optimizer steps of one rollout batch of `B` rows: exactly k contiguous
    mini-batches whose sizes differ by at most one row (the first B mod k hold one more).

    `torch.arange(B).chunk(k)` is not this: chunk sizes are ceil(B/k), so B=12, k=8 gives 6 steps.
    B < k cannot give every step a row and is refused.
    """
    if k < 1:
        raise ValueError(f"train.updates_per_rollout must be >= 1, got {k}")
    if B < k:
        raise ValueError(
            f"a rollout batch of {B} rows cannot be split into train.updates_per_rollout = {k} optimizer steps; "
            f"set train.updates_per_rollout <= {B}, or raise rollout.prompts_per_step x rollout.group_size "
            f"(with dynamic sampling, also algo.max_gen_batches, so that enough groups are kept)"
        )
    return list(torch.tensor_split(torch.arange(B), k))  # k x [B/k or B/k + 1]


def sequence_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, cfg: AlgoConfig, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Group-relative advantages from scalar rewards (SPEC 1). rewards [B], group_ids [B], valid [B] -> [B].

    Rows with `valid` False (a reward function failed with rewards.on_error = 'skip') are left out of
    every statistic (group mean and std, the batch std of batch_std) and get A = 0; the caller masks
    them out of the loss. Their rewards may be anything, NaN included. A group left with one valid
    member is a singleton (A = 0).
    """
    if valid is None:
        return ADVANTAGES.call(cfg.advantage, rewards, group_ids, eps=cfg.adv_eps, std=cfg.std)  # [B]
    valid = valid.bool()  # [B]
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    out = torch.zeros(rewards.shape, dtype=dtype, device=rewards.device)  # [B]
    if valid.any():
        idx = valid.nonzero().squeeze(1)  # [B_valid]
        out[idx] = ADVANTAGES.call(cfg.advantage, rewards[idx], group_ids[idx], eps=cfg.adv_eps, std=cfg.std)  # [B_valid]
    return out  # [B]


def token_credit(
    seq_adv: torch.Tensor, response_mask: torch.Tensor, *, cfg: AlgoConfig,
    old_logp: torch.Tensor, ref_logp: torch.Tensor | None, **inputs: torch.Tensor,
) -> torch.Tensor:
    """The per-token advantage (broadcast, FRPO's A_i - beta * KL-to-go (SPEC 7), or the PRM process credit
    (SPEC 13)): [B, T], no grad. `inputs`: extra tensors a credit declares (the process credit's step rewards,
    see `credit_inputs`); each credit takes only the keywords it declares."""
    return CREDIT.call(
        cfg.credit, seq_adv, response_mask, old_logp=old_logp, ref_logp=ref_logp,
        beta=cfg.beta, divergence=cfg.divergence, eps=cfg.adv_eps, std=cfg.std, **inputs,
    ).float()  # [B, T]


def credit_needs_step_rewards(cfg: AlgoConfig) -> bool:
    """Whether the credit function reads a process reward model's step rewards (SPEC 13)."""
    accepted = CREDIT.accepts(cfg.credit)
    return accepted is not None and "step_rewards" in accepted


def loss_hparams(cfg: AlgoConfig) -> dict[str, object]:
    """The loss hyperparameters the user set (non-None AlgoConfig fields), under the losses' keyword names.

    Unset fields are left out, so the chosen loss applies its own (the paper's) defaults: GSPO's clip is
    3e-4/4e-4 and CISPO has no lower bound unless the user says otherwise. `dual_clip_c = 0` and
    `fipo_safety = 0` mean off (None). The config refuses a set field the chosen loss does not take.
    """
    out: dict[str, object] = {}
    for fname, kw in LOSS_HPARAMS.items():
        value = getattr(cfg, fname)
        if value is not None:
            out[kw] = None if (fname in OFF_AT_ZERO and value == 0) else value
    return out


def resolved_loss_hparams(cfg: AlgoConfig) -> dict[str, object]:
    """Every hyperparameter the chosen loss runs with: its signature's defaults, then `loss_hparams`.
    For the run's record (log it next to the saved config) and for statistics that need the values."""
    return {**LOSSES.defaults(cfg.loss), **loss_hparams(cfg)}


def token_mask_hparams(cfg: AlgoConfig) -> dict[str, object]:
    """The token-mask hyperparameters the user set (non-None AlgoConfig fields), under the masks' keyword names;
    unset ones take the chosen mask's own defaults (SPEC 11)."""
    return {kw: getattr(cfg, f) for f, kw in TOKEN_MASK_HPARAMS.items() if getattr(cfg, f) is not None}


def covariance_selection_kind(cfg: AlgoConfig) -> str | None:
    """'KL-Cov' when the loss takes a step-level `penalised` selection, 'Clip-Cov' when the token mask takes a
    step-level `selected` one, else None (no per-optimizer-step choice is needed)."""
    if "penalised" in (LOSSES.accepts(cfg.loss) or ()):
        return "KL-Cov"
    if "selected" in (TOKEN_MASKS.accepts(cfg.token_mask) or ()):
        return "Clip-Cov"
    return None


def covariance_selection(
    batch: Batch, logp: torch.Tensor | None, global_rows: torch.Tensor, *, cfg: AlgoConfig, seed: int,
    reduce_sum: Callable[[list[float]], torch.Tensor] | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
) -> torch.Tensor:
    """The tokens KL-Cov penalises or Clip-Cov detaches in one optimizer step: [B, T] bool, for `batch.cov_select`.

    `batch` holds this rank's rows of the step (possibly none), `global_rows` [B] their global indices,
    `logp` [B, T] their current log-probs from a no-grad pass (None: the policy has not moved, l = l_old).
    cov = (A - mean A)(l - mean l) with the means over the step's loss tokens on every rank (`reduce_sum`
    sums a list of floats over ranks), N = their count. KL-Cov: the max(floor(kappa*N), 1) largest cov,
    ties by (global row, position). Clip-Cov: candidates are loss tokens that the loss (run here without
    grad) does not already clip, with cov in (lb, ub), ordered by (global row, position) over all ranks
    (`gather` collects one object per rank); max(floor(r*N), 1) of them are drawn by
    torch.randperm under a generator seeded with `seed` (`masks.selection_seed(run seed, step, update)`).
    The choice depends on neither the micro-batch split nor the number of ranks, and repeats on resume.
    With A = the loss's token advantage (FRPO's recomputed one when algo.kl_source = 'current').
    """
    from grpokit.algo.masks import (
        choose_random, choose_top, clip_cov_candidates, clip_cov_count, kl_cov_count, token_covariance,
    )

    reduce_sum = reduce_sum or (lambda v: torch.tensor(v, dtype=torch.float64))
    gather = gather or (lambda obj: [obj])
    kind = covariance_selection_kind(cfg)
    mask = batch.loss_mask  # [B, T]
    lp = to_f32(batch.old_logp if logp is None else logp).detach()  # [B, T]
    adv = batch.token_adv  # [B, T]
    if cfg.kl_source == "current" and mask.shape[0]:
        adv = token_credit(batch.seq_adv, batch.response_mask, cfg=cfg, old_logp=lp, ref_logp=batch.ref_logp)  # [B, T]
    adv = torch.where(mask, to_f32(adv), torch.zeros_like(lp))  # [B, T]
    lpm = torch.where(mask, lp, torch.zeros_like(lp))  # [B, T]
    sums = reduce_sum([float(adv.double().sum()), float(lpm.double().sum()), float(mask.sum())])
    n = int(round(float(sums[2])))
    cov = token_covariance(adv, lp, mask, mean_adv=float(sums[0]) / max(n, 1), mean_logp=float(sums[1]) / max(n, 1))  # [B, T]
    rows = global_rows.tolist()
    where = {r: b for b, r in enumerate(rows)}  # global row -> local row
    out = torch.zeros(mask.shape, dtype=torch.bool)  # [B, T]
    if kind == "KL-Cov":
        k = kl_cov_count(n, float(resolved_loss_hparams(cfg)["kl_cov_ratio"]))
        idx = mask.flatten().nonzero().squeeze(1)  # [N_local]
        top = idx[choose_top(cov.flatten()[idx], k)] if idx.numel() else idx  # local top-k: holds the global one
        T = mask.shape[1]
        mine = [(c, rows[i // T], i % T) for c, i in zip(cov.flatten()[top].tolist(), top.tolist())]
        pool = sorted((c for part in gather(mine) for c in part), key=lambda c: (-c[0], c[1], c[2]))
        chosen = {(r, t) for _, r, t in pool[:k]}
    else:
        hp = loss_hparams(cfg)
        if batch.seq_weight is not None:
            hp["seq_ratio"] = batch.seq_weight  # [B]
        with torch.no_grad():
            _, s = LOSSES.call_strict(cfg.loss, lp, batch.old_logp, adv, mask, **hp)
        clipped = s["clipped_low"] | s["clipped_high"] | s["dual_clipped"]  # [B, T]
        mh = {**TOKEN_MASKS.defaults(cfg.token_mask), **token_mask_hparams(cfg)}
        cand = clip_cov_candidates(cov, mask, clipped, cov_lb=float(mh["cov_lb"]), cov_ub=float(mh["cov_ub"]))  # [B, T]
        # the global candidate order is (global row, position): exchange only each row's candidate count
        counts = cand.sum(1).tolist()  # [B]
        per_row = sorted(rc for part in gather([(rows[b], c) for b, c in enumerate(counts) if c]) for rc in part)
        ends = torch.tensor([c for _, c in per_row], dtype=torch.long).cumsum(0)  # [R] inclusive
        g = torch.Generator().manual_seed(seed)
        picks = choose_random(int(ends[-1]) if len(per_row) else 0, clip_cov_count(n, float(mh["ratio"])), g)  # [k']
        owner = torch.searchsorted(ends, picks, right=True)  # [k'] index into per_row
        chosen = set()
        for p, o in zip(picks.tolist(), owner.tolist()):
            r = per_row[o][0]
            if r in where:
                offset = p - (int(ends[o - 1]) if o else 0)  # the offset-th candidate of row r, by position
                chosen.add((r, int(cand[where[r]].nonzero()[offset, 0])))
    for r, t in chosen:
        if r in where:
            out[where[r], t] = True
    return out  # [B, T]


def needs_sequence_weights(cfg: AlgoConfig) -> bool:
    """Whether each optimizer step needs `sequence_weights` first (algo.seq_weight is not 'none')."""
    return cfg.seq_weight != "none"


def sequence_weights(batch: Batch, logp: torch.Tensor | None, *, cfg: AlgoConfig) -> torch.Tensor:
    """GSPO's sequence ratios s_i over the rows of one optimizer step, transformed by algo.seq_weight
    (SPEC 8: min-replace or advantage-orthogonal, stop-gradient): [B] f32, for `batch.seq_weight`.

    `batch` holds all rows of the optimizer step (a mini-batch), `logp` [B, T] their current log-probs
    from a no-grad pass. The transform needs every member of a group that shares the step, so it runs
    here, ahead of the micro-batches, and `micro_batch_loss` then uses the same weights whatever the
    micro-batch split (the gradient stays split-invariant, SPEC 3). `logp=None` means the policy has not
    moved since `old_logp` (the first optimizer step of a rollout): s_i = 1, no pass needed. Rows with
    no loss token are kept out of their group's transform (weight 1). log s_i is computed as in the
    gspo loss: (1/L_i) sum_t m (l - l_old), clamped to +-LOG_RATIO_CLAMP.
    """
    mask = batch.loss_mask  # [B, T]
    B = mask.shape[0]
    if logp is None:
        s = torch.ones(B, dtype=torch.float32, device=mask.device)  # [B]
    else:
        diff = torch.where(mask, to_f32(logp).detach() - to_f32(batch.old_logp), torch.zeros_like(to_f32(logp)))  # [B, T]
        log_s = (diff.sum(-1) / mask.sum(-1).clamp(min=1)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B]
        s = log_s.exp().float()  # [B]
    used = mask.any(-1)  # [B] rows that enter the loss
    lowest = batch.group_ids.min() if B else batch.group_ids.new_zeros(())  # []
    alone = lowest - 1 - torch.arange(B, device=batch.group_ids.device)  # [B] fresh ids: unused rows are singletons
    gid = torch.where(used, batch.group_ids, alone)  # [B]
    w = SEQ_WEIGHTS.call(cfg.seq_weight, s, batch.seq_adv, gid)  # [B]
    return torch.where(used, w, torch.ones_like(w)).float()  # [B]


def cancellation_metrics(batch: Batch, *, seq_weights: torch.Tensor | None = None) -> dict[str, float]:
    """SPEC 8's diagnostic for one rollout batch: `cancel/residual`, the mean over tokens shared within
    a group (same position, same prefix) of |sum_i A_i w_i| / sum_i |A_i w_i| (0 = they cancel).

    `seq_weights` [B] are the per-sequence weights the update used: None for token-level losses (w = 1),
    GSPO's s_i (after algo.seq_weight) for gspo, collected from `micro_batch_loss`'s stats['seq_ratio'].
    A = batch.seq_adv, tokens = the loss-masked response tokens. Cost, measured on one CPU thread:
    64 x 256 tokens in groups of 8 take 2.5-10 ms (identical responses, the worst case, included);
    64 x 4096 take 9 ms with a shared template, 80 ms if all identical; 512 x 1024 in groups of 16 take
    0.11 s (0.37 s all identical). A step over such a batch takes seconds, so it is logged every step.
    """
    T = batch.response_mask.shape[1]
    ids = batch.input_ids[:, -T:]  # [B, T] response tokens
    w = torch.ones_like(batch.seq_adv, dtype=torch.float32) if seq_weights is None else seq_weights  # [B]
    res = cancellation_residual(ids, batch.loss_mask, batch.group_ids, batch.seq_adv, w)  # []
    return {"cancel/residual": float(res)}


class StatSums:
    """Sums of per-token statistics over micro-batches (and ranks), divided once at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        v = values.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + float((v * mask).sum())
        self.counts[name] = self.counts.get(name, 0.0) + float(mask.sum())

    def add_extreme(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        if mask.any():
            v = values.detach().float()[mask]
            lo, hi = float(v.min()), float(v.max())
            self.sums[name + "/min"] = min(self.sums.get(name + "/min", lo), lo)
            self.sums[name + "/max"] = max(self.sums.get(name + "/max", hi), hi)

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.counts if self.counts[k] > 0}
        out.update({k: v for k, v in self.sums.items() if k.endswith(("/min", "/max"))})
        return out


def micro_batch_loss(
    batch: Batch, logp: torch.Tensor, *, cfg: AlgoConfig, num_tokens: float, num_seqs: float,
    norm_const: float, stats: StatSums,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss (+ KL in the loss) for one micro-batch, aggregated with the global counts.

    `logp` [b, T'] carries the gradient. Summing the returned values over all micro-batches and ranks
    of an optimizer step gives the full-batch loss of SPEC section 3. Also returns the loss's
    per-token statistics (clip flags, FIPO weights, GSPO's `seq_ratio` [b], ...) for this micro-batch,
    and `token_adv` [b, T'], the per-token advantage the loss used: with algo.kl_source = 'current'
    FRPO's credit A_grpo - beta * KL-to-go is recomputed here from the detached `logp` (SPEC 7).
    `batch.seq_weight`, when set (see `sequence_weights`), replaces GSPO's s_i.
    """
    mask = batch.loss_mask  # [b, T']
    token_adv = batch.token_adv  # [b, T']
    if cfg.kl_source == "current":  # FRPO's KL-to-go from the current policy, detached (SPEC 7)
        token_adv = token_credit(batch.seq_adv, batch.response_mask, cfg=cfg, old_logp=logp.detach(), ref_logp=batch.ref_logp)  # [b, T']
    hp = loss_hparams(cfg)
    if needs_sequence_weights(cfg) and batch.seq_weight is None:
        raise ValueError(
            f"algo.seq_weight = '{cfg.seq_weight}' needs the optimizer step's weights before its micro-batches: "
            "the trainer must set batch.seq_weight[rows] = step.sequence_weights(batch.select(rows), logp, cfg=...) "
            "for each mini-batch (see grpokit.train.step)"
        )
    if batch.seq_weight is not None:
        hp["seq_ratio"] = batch.seq_weight  # [b]
    distill_tok = None
    if batch.teacher_logp is not None:  # algo.distill: G-OPD's dense advantage, KDRL's teacher term (docs/catalogue.md)
        token_adv, distill_tok = DISTILL.call(
            cfg.distill, logp, batch.teacher_logp, token_adv, mask, old_logp=batch.old_logp, ref_logp=batch.ref_logp,
            row_coef=batch.distill_coef, lam=cfg.gopd_lambda, outcome_weight=cfg.gopd_outcome_weight)  # [b, T'] x 2
    kind = covariance_selection_kind(cfg)
    if kind is not None and batch.cov_select is None:
        raise ValueError(
            f"{kind} chooses its tokens over a whole optimizer step: the trainer must set batch.cov_select[rows] = "
            "step.covariance_selection(batch.select(rows), logp, ...) for each mini-batch (see grpokit.train.update)"
        )
    if kind == "KL-Cov":
        hp["penalised"] = batch.cov_select  # [b, T']
    per_tok, s = LOSSES.call_strict(cfg.loss, logp, batch.old_logp, token_adv, mask, **hp)  # [b, T']
    clipped = s["clipped_low"] | s["clipped_high"] | s["dual_clipped"]  # [b, T'] gradient already stopped
    keep, ms = TOKEN_MASKS.call(cfg.token_mask, logp, batch.old_logp, token_adv, mask, clipped,
                                **token_mask_hparams(cfg), selected=batch.cov_select)  # [b, T']
    per_tok = torch.where(keep, per_tok, torch.zeros_like(per_tok))  # [b, T'] masked: value and gradient 0 (SPEC 11)
    if batch.is_weight is not None:  # rollout correction (SPEC 12): stop-gradient w on the policy term; N_tok unchanged
        per_tok = per_tok * batch.is_weight.detach().to(per_tok.dtype)  # [b, T']
    if distill_tok is not None:
        per_tok = per_tok + distill_tok  # [b, T'], 0 off mask
    if cfg.beta > 0 and cfg.kl_placement == "loss":
        kl = KL.call(cfg.kl_estimator, logp, batch.ref_logp)  # [b, T']
        beta = cfg.beta if batch.kl_weight is None else batch.kl_weight[:, None]  # [] or [b, 1] (APO, SPEC 11)
        per_tok = per_tok + beta * kl * mask
    loss = AGGREGATIONS.call(
        cfg.aggregation, per_tok, mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_const=norm_const
    )
    s = {**s, "token_adv": token_adv}
    fm = mask.float()
    stats.add("ppo_kl", batch.old_logp - logp, fm)
    if batch.ref_logp is not None:
        stats.add("kl_ref", KL.call("k3", logp, batch.ref_logp), fm)
    if distill_tok is not None:  # reverse KL to the teacher (k3) and the distillation term's mean per token
        stats.add("distill/kl_teacher", KL.call("k3", logp, batch.teacher_logp), fm)
        stats.add("distill/loss_term", distill_tok, fm)
    for key, name in CLIP_STATS.items():
        stats.add(name, s[key].float(), fm)
    if cfg.token_mask != "none":  # the fraction of loss tokens the mask removed
        stats.add(f"mask/{cfg.token_mask}", ms["masked"].float(), fm)
    for key in s:  # SPEC 11 losses' per-token statistics: kl_cov/penalised, sapo/gate
        for prefix in ("kl_cov_", "sapo_"):
            if key.startswith(prefix):
                stats.add(prefix[:-1] + "/" + key[len(prefix):], s[key].float(), fm)
    fipo_keys = [k for k in s if k.startswith("fipo_")]
    if fipo_keys:
        hp_all = resolved_loss_hparams(cfg)
    for key in fipo_keys:
        value = s[key]
        if value.dim() == 2:
            name = "fipo/" + key[5:]
            stats.add(name, value.float(), fm)
            if key == "fipo_weight":
                stats.add_extreme(name, value, mask)
                stats.add("fipo/at_low", (value <= float(hp_all["f_low"]) + 1e-7).float(), fm)
                stats.add("fipo/at_high", (value >= float(hp_all["f_high"]) - 1e-7).float(), fm)
        else:
            stats.add("fipo/" + key[5:], value.float(), torch.ones_like(value, dtype=torch.float32))
    return loss, s


# ---------------------------------------------------------------------------- SPEC 11, the catalogue

def transform_needs_reference(cfg: AlgoConfig) -> bool:
    """Whether the advantage transform reads the reference log-probs (ACE's c_i): the reference model is then
    loaded even with beta = 0 (`grpokit.train.teacher.needs_reference`)."""
    return "ref_logp" in (ADV_TRANSFORMS.accepts(cfg.adv_transform) or ())


def transform_needs_old_logprobs(cfg: AlgoConfig) -> bool:
    """Whether the advantage transform reads ℓ° before the update (ACE's c_i)."""
    return "old_logp" in (ADV_TRANSFORMS.accepts(cfg.adv_transform) or ())


def transformed_advantages(
    seq_adv: torch.Tensor, response_mask: torch.Tensor, *, cfg: AlgoConfig,
    old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
) -> torch.Tensor:
    """The group advantages after algo.adv_transform (SPEC 11: 'none', ACE): [B] -> [B], no grad."""
    return ADV_TRANSFORMS.call(cfg.adv_transform, seq_adv, response_mask, old_logp=old_logp, ref_logp=ref_logp,
                               alpha=cfg.ace_alpha)  # [B]


def sequence_kl_weights(
    seq_adv: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor, *, cfg: AlgoConfig,
) -> torch.Tensor | None:
    """The per-sequence weight of the KL-in-loss term (algo.kl_weight: beta, or APO's, SPEC 11): [B] f32 for
    `Batch.kl_weight`, or None when there is no KL in the loss. `correct`/`valid` [B] bool: task accuracy
    and the rows that count; `group_ids` [B]."""
    if not (cfg.beta > 0 and cfg.kl_placement == "loss"):
        return None
    return KL_WEIGHTS.call(cfg.kl_weight, seq_adv, correct, valid, group_ids, beta=cfg.beta, e=cfg.apo_e).float()  # [B]
