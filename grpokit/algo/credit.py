"""Token-level credit: broadcast, FRPO's KL-to-go, FIPO's future-KL weights, cancellation transforms.

- `CREDIT` registry (SPEC sections 1 and 7): per-sequence advantages -> per-token advantages,
  `fn(seq_adv[B], mask[B,T], *, old_logp, ref_logp, beta, divergence) -> [B,T]` (no grad).
- `fipo` (SPEC section 6), registered in `losses.LOSSES`: it needs the current log-probs, so it is a
  loss, computed per micro-batch.
- Token gradient cancellation (SPEC section 8): `cancellation_residual` (diagnostic), `min_replace`
  and `adv_orthogonal` (stop-gradient transforms of per-sequence weights such as GSPO's s_i), and
  the `SEQ_WEIGHTS` registry that names them for the config: `fn(w[B], adv[B], group_ids[B]) -> [B]`.

Shapes: B sequences, T response tokens, S distinct groups, G group size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from grpokit.algo.constants import LOG_RATIO_CLAMP
from grpokit.algo.losses import LOSSES, Stats, clipped_log_ratio, masked_advantage, ppo_clip
from grpokit.algo.masked import (
    dense_group_ids,
    group_min,
    masked_mean,
    segment_amin,
    segment_sum,
    to_f32,
)
from grpokit.algo.registry import Registry
from grpokit.algo.scan import DEFAULT_BLOCK, discounted_reverse_cumsum, gamma_from_half_life

__all__ = [
    "CREDIT",
    "broadcast",
    "frpo",
    "frpo_regularizer",
    "frpo_metrics",
    "implicit_utility",
    "fipo",
    "fipo_metrics",
    "cancellation_residual",
    "min_replace",
    "adv_orthogonal",
    "SEQ_WEIGHTS",
    "FRPO_DIVERGENCES",
    "FIPO_SAFETY_F_LOW",
    "FIPO_SAFETY_F_HIGH",
]

CREDIT = Registry("credit")
SEQ_WEIGHTS = Registry("seq_weight")

#: FRPO regularisers (SPEC section 7, Theorem 4.1 of arXiv 2601.10201), u = π_ref/π_old.
FRPO_DIVERGENCES = ("k1", "k3", "forward")

#: FIPO's safety reset (official code): for A < 0 and ρ > safety, f is clamped into this range so a
#: negative sample whose ratio already exploded is never pushed harder than the plain PPO term.
FIPO_SAFETY_F_LOW: float = 0.8
FIPO_SAFETY_F_HIGH: float = 1.0

#: Positions per chunk in `cancellation_residual` (bounds its memory to S·G²·chunk floats).
CANCEL_CHUNK: int = 256


# --------------------------------------------------------------------------------------------------
# CREDIT: per-sequence -> per-token advantages
# --------------------------------------------------------------------------------------------------


@CREDIT.register("broadcast")
def broadcast(
    seq_adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    divergence: str = "k1",
) -> torch.Tensor:
    """Broadcast: A[i,t] = A_i · m[i,t], the same credit for every token (GRPO, SPEC section 1).

    The keyword arguments exist for the uniform CREDIT signature and are ignored.
    Shapes: seq_adv [B], mask [B,T] bool -> [B,T] (no grad).
    """
    a = to_f32(seq_adv).detach()[:, None].expand(mask.shape)  # [B,T]
    return torch.where(mask, a, torch.zeros_like(a))  # [B,T]


def frpo_regularizer(
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    divergence: str = "k1",
) -> torch.Tensor:
    """FRPO's KL-to-go reg[i,t] (SPEC section 7), 0 where masked, no grad.

    With δ = (ℓ° − ℓʳ)·m and u = π_ref/π_old = e^{−δ}, Theorem 4.1 gives
    reg_t = Σ_{j≥t} f(u_j) − f′(u_t)·u_t:
      "k1"      (reverse KL, f = −log u):          S_t = Σ_{j≥t} δ_j (the constant +1 dropped);
      "k3"      (reverse k3, f = −log u + u − 1):  δ_t + Σ_{j>t} k3_j, k3 = u − log u − 1;
      "forward" (f = u log u − u + 1):             1 − u_t + Σ_{j>t} (u_j log u_j − u_j + 1).
    Sums run through the exact scan with γ = 1. For "k3" and "forward", δ is clamped to
    ±LOG_RATIO_CLAMP before exp (the "k1" sum needs no exp). Shapes: [B,T] x2, mask [B,T] -> [B,T].
    """
    if divergence not in FRPO_DIVERGENCES:
        raise ValueError(f"unknown FRPO divergence {divergence!r}; valid: {', '.join(FRPO_DIVERGENCES)}")
    delta = to_f32(old_logp).detach() - to_f32(ref_logp).detach()  # [B,T]
    zero = torch.zeros_like(delta)  # [B,T]
    delta = torch.where(mask, delta, zero)  # [B,T]
    if divergence == "k1":
        reg = discounted_reverse_cumsum(delta, 1.0)  # [B,T] S_t
    else:
        dc = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B,T]
        u = torch.exp(-dc)  # [B,T] π_ref/π_old
        if divergence == "k3":
            local = dc  # [B,T] −f′(u_t)u_t + f(u_t) = −log u_t
            future = torch.expm1(-dc) + dc  # [B,T] k3_j = u − log u − 1
        else:
            local = -torch.expm1(-dc)  # [B,T] 1 − u_t
            future = -u * dc - u + 1.0  # [B,T] u log u − u + 1
        future = torch.where(mask, future, zero)  # [B,T]
        incl = discounted_reverse_cumsum(future, 1.0)  # [B,T] Σ_{j≥t}
        reg = local + F.pad(incl[:, 1:], (0, 1))  # [B,T] local_t + Σ_{j>t}
    return torch.where(mask, reg, zero)  # [B,T]


@CREDIT.register("frpo")
def frpo(
    seq_adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    beta: float = 0.01,
    divergence: str = "k1",
) -> torch.Tensor:
    """FRPO: A[i,t] = sg(A_grpo[i] − β·KL-to-go[i,t])·m, the KL regulariser as a reward-to-go.

    arXiv 2601.10201 v2 (SPEC section 7): the KL term belongs in the advantage, per token, not in
    the loss nor in the reward before group normalisation. Pass `old_logp` = rollout log-probs
    (kl_source "old") or detached current ones (kl_source "current"); pass `seq_adv` from grpo with
    std="population" to follow the paper. Groups with all-equal rewards (A_grpo = 0) still receive
    the KL term (−β·reg); with DAPO dynamic sampling on, such groups are dropped before this call
    and receive nothing. β = 0 returns the plain broadcast and never reads `ref_logp` (it may be None).
    Shapes: seq_adv [B], mask [B,T] bool, old_logp/ref_logp [B,T] -> [B,T] (no grad).
    """
    base = broadcast(seq_adv, mask)  # [B,T]
    if beta == 0.0:
        return base
    if ref_logp is None:
        raise ValueError("frpo with beta > 0 needs ref_logp (the reference model's log-probs)")
    reg = frpo_regularizer(old_logp, ref_logp, mask, divergence=divergence)  # [B,T]
    return torch.where(mask, base - beta * reg, torch.zeros_like(base)).detach()  # [B,T]


def implicit_utility(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean over groups of 2·arcsin√p̂, p̂ = group accuracy (binary rewards): the utility group
    normalisation implicitly maximises (arXiv 2601.10201, SPEC section 7). Shapes: [B], [B] -> []."""
    r = to_f32(rewards).detach()  # [B]
    seg, s = dense_group_ids(group_ids)  # [B], S
    p = (segment_sum(r, seg, s) / segment_sum(torch.ones_like(r), seg, s)).clamp(0.0, 1.0)  # [S]
    return (2.0 * torch.asin(p.sqrt())).mean()  # []


def frpo_metrics(
    seq_adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    beta: float,
    divergence: str = "k1",
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """FRPO metrics (SPEC section 7) as 0-d tensors (no host sync):

    `frpo/kl_term_abs_mean` = masked mean |β·reg|, `frpo/frac_kl_dominates` = fraction of tokens with
    |β·reg| > |A_grpo|, and, given binary `rewards` and `group_ids`, `frpo/implicit_utility`.
    Shapes: seq_adv [B], mask [B,T], old_logp/ref_logp [B,T], rewards/group_ids [B].
    """
    term = (beta * frpo_regularizer(old_logp, ref_logp, mask, divergence=divergence)).abs()  # [B,T]
    a = to_f32(seq_adv).detach().abs()[:, None]  # [B,1]
    out = {
        "frpo/kl_term_abs_mean": masked_mean(term, mask),
        "frpo/frac_kl_dominates": masked_mean((term > a).to(term.dtype), mask),
    }
    if rewards is not None and group_ids is not None:
        out["frpo/implicit_utility"] = implicit_utility(rewards, group_ids)
    return out


# --------------------------------------------------------------------------------------------------
# FIPO: future-KL influence weights inside the dual-clip PPO loss
# --------------------------------------------------------------------------------------------------


@LOSSES.register("fipo")
def fipo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip_c: float | None = 10.0,
    tau: float = 32.0,
    f_low: float = 1.0,
    f_high: float = 1.2,
    safety: float | None = 10.0,
    drop_seqs: bool = True,
    scan_block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, Stats]:
    """FIPO: dual-clip PPO with each token's advantage scaled by its detached future-KL weight.

    arXiv 2603.19835, official `compute_policy_loss_future_kl` (SPEC section 6). With
    d = clamp(ℓ − ℓ°, ±20), ρ = e^d and M = m & (d ≤ log c):
      F[i,t] = Σ_{k≥t} γ^(k−t) M·d      (γ = 2^(−1/τ); the exact blocked scan, O(B·T·K))
      f = clamp(e^F, f_low, f_high), then clamp(f, 0.8, 1.0) where A < 0 and ρ > safety; f = sg(f)
      per_tok = ppo_clip(ρ; A·f, ε_low, ε_high, c)   (= f · dual-clip PPO, since f > 0)
    A token whose continuation the policy has made more likely (F > 0) gets more credit. Sequence i
    is dropped (`drop_seqs`, on by default as in the official code) when more than one of its tokens
    is dual-clipped (A < 0 and ρ > c). Defaults are the 32B recipe (τ = 32, c = 10, f in [1, 1.2],
    safety 10, ε = 0.2/0.28); the 7B recipe uses f in [0.8, 1.2], safety 3. `dual_clip_c=None`
    disables the dual clip, the F mask and dropping; `safety=None` disables the reset.

    Deviation from the official code, on purpose: dropped sequences contribute exactly 0 per token,
    but the aggregation still counts their tokens in the global N_tok. The official code renormalises
    over the kept tokens of each micro-batch, which makes the gradient depend on how the batch is
    split into micro-batches and ranks (SPEC section 3); counting them keeps it invariant. Drops are
    rare (the paper: "rarely activated"), so the only effect is a slightly smaller step when they occur.

    FIPO only acts once θ has moved from θ_old (several updates per rollout batch); on the first
    mini-batch f ≡ 1 with the default [1, 1.2] clip.
    Shapes: logp, old_logp, adv [B,T], mask [B,T] bool -> (per_tok [B,T], stats): the ppo_clip stats
    plus `fipo_weight` f32 [B,T] (f, 0 where masked), `fipo_F` f32 [B,T], `fipo_safety_reset` bool
    [B,T], `fipo_dropped` bool [B].
    """
    if not 0.0 <= f_low <= f_high:
        raise ValueError(f"need 0 <= f_low <= f_high, got f_low={f_low}, f_high={f_high}")
    d = clipped_log_ratio(logp, old_logp, mask).detach()  # [B,T]
    ratio = d.exp()  # [B,T]
    a = masked_advantage(adv, mask)  # [B,T]
    zero = torch.zeros_like(d)  # [B,T]
    keep = mask if dual_clip_c is None else mask & (d <= math.log(dual_clip_c))  # [B,T] M
    fut = discounted_reverse_cumsum(torch.where(keep, d, zero), gamma_from_half_life(tau), block=scan_block)  # [B,T]
    f = fut.exp().clamp(f_low, f_high)  # [B,T] exp(F) may be inf: the clamp caps it
    if safety is None:
        reset = torch.zeros_like(mask)  # [B,T]
    else:
        reset = mask & (a < 0) & (ratio > safety)  # [B,T]
    f = torch.where(reset, f.clamp(FIPO_SAFETY_F_LOW, FIPO_SAFETY_F_HIGH), f)  # [B,T]
    f = torch.where(mask, f, zero).detach()  # [B,T] sg(f)
    per_tok, stats = ppo_clip(
        logp, old_logp, a * f, mask, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c
    )  # [B,T]
    if drop_seqs and dual_clip_c is not None:
        dropped = stats["dual_clipped"].sum(-1) > 1  # [B]
    else:
        dropped = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)  # [B]
    per_tok = torch.where(dropped[:, None], torch.zeros_like(per_tok), per_tok)  # [B,T]
    stats.update(
        fipo_weight=f,
        fipo_F=torch.where(mask, fut, zero),
        fipo_safety_reset=reset,
        fipo_dropped=dropped,
    )
    return per_tok, stats


def fipo_metrics(stats: Stats, mask: torch.Tensor, *, f_low: float, f_high: float) -> dict[str, torch.Tensor]:
    """FIPO metrics from `fipo`'s stats (SPEC section 6) as 0-d tensors (no host sync).

    Keys: fipo/weight_mean, weight_min, weight_max (over masked tokens), frac_at_low, frac_at_high,
    safety_reset_frac, dropped_frac (over sequences), F_mean. Shapes: stats [B,T]/[B], mask [B,T].
    """
    f = stats["fipo_weight"]  # [B,T]
    big = torch.finfo(f.dtype).max
    any_tok = mask.any()  # []
    zero = f.new_zeros(())  # []
    fmin = torch.where(mask, f, torch.full_like(f, big)).amin() if f.numel() else zero  # []
    fmax = torch.where(mask, f, torch.full_like(f, -big)).amax() if f.numel() else zero  # []
    return {
        "fipo/weight_mean": masked_mean(f, mask),
        "fipo/weight_min": torch.where(any_tok, fmin, zero),
        "fipo/weight_max": torch.where(any_tok, fmax, zero),
        "fipo/frac_at_low": masked_mean((f <= f_low).to(f.dtype), mask),
        "fipo/frac_at_high": masked_mean((f >= f_high).to(f.dtype), mask),
        "fipo/safety_reset_frac": masked_mean(stats["fipo_safety_reset"].to(f.dtype), mask),
        "fipo/dropped_frac": stats["fipo_dropped"].to(f.dtype).mean() if f.shape[0] else zero,
        "fipo/F_mean": masked_mean(stats["fipo_F"], mask),
    }


# --------------------------------------------------------------------------------------------------
# Token gradient cancellation (arXiv 2604.13088 v1)
# --------------------------------------------------------------------------------------------------


def _pad_groups(seg: torch.Tensor, s: int) -> tuple[torch.Tensor, int]:
    """Rank of each sequence inside its group, for a padded [S, G_max] layout: (rank [B], G_max)."""
    counts = torch.bincount(seg, minlength=s)  # [S]
    g_max = int(counts.max()) if s else 0  # one host sync: the padded group size is a shape
    order = torch.argsort(seg, stable=True)  # [B]
    starts = torch.cumsum(counts, 0) - counts  # [S]
    rank = torch.empty_like(seg)  # [B]
    rank[order] = torch.arange(seg.numel(), device=seg.device) - starts[seg[order]]  # [B]
    return rank, g_max


def cancellation_residual(
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    adv: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Mean |Σ_i A_i·w_i| / Σ_i |A_i·w_i| over tokens shared within a group (0 = perfect cancellation).

    arXiv 2604.13088 (SPEC section 8; the diagnostic is ours). A shared token is a (group, position t,
    prefix ids[0..t]) held by ≥ 2 members with m = 1; each distinct shared token counts once. Tokens
    whose members all have A·w = 0 (e.g. flat groups) have no net gradient and are left out of the
    mean. Returns 0 when no token qualifies. Prefix equality is a running AND along T of the pairwise
    token equality of group members, in chunks of CANCEL_CHUNK positions, stopping once no two members
    share a prefix: O(B·G·T) time at worst, O(S·G²·chunk) memory. It syncs with the host (the padded
    group size, the early stop): a diagnostic, not part of the loss.
    Shapes: response_ids [B,T] int, mask [B,T] bool, group_ids [B], adv [B], weights [B] -> [].
    """
    b, t = response_ids.shape
    coef = (to_f32(adv) * to_f32(weights)).detach().to(torch.float64)  # [B] A_i·w_i
    seg, s = dense_group_ids(group_ids)  # [B], S
    if b == 0 or t == 0:
        return coef.new_zeros((), dtype=torch.float32)
    rank, g = _pad_groups(seg, s)  # [B], G
    ids = response_ids.new_full((s, g, t), -1)  # [S,G,T]
    ids[seg, rank] = response_ids
    m = torch.zeros((s, g, t), dtype=torch.bool, device=mask.device)  # [S,G,T]
    m[seg, rank] = mask
    c = coef.new_zeros((s, g))  # [S,G]
    c[seg, rank] = coef
    c_abs = c.abs()  # [S,G]
    carry = torch.ones((s, g, g), dtype=torch.bool, device=mask.device)  # [S,G,G] prefix equal so far
    eye = torch.eye(g, dtype=torch.bool, device=mask.device)  # [G,G]
    total = coef.new_zeros(())  # [] Σ over shared (i,t) of residual/size
    count = coef.new_zeros(())  # [] Σ over shared (i,t) of 1/size = number of distinct shared tokens
    for start in range(0, t, CANCEL_CHUNK):
        ic, mc = ids[:, :, start : start + CANCEL_CHUNK], m[:, :, start : start + CANCEL_CHUNK]  # [S,G,C]
        same = (ic[:, :, None, :] == ic[:, None, :, :]) & mc[:, :, None, :] & mc[:, None, :, :]  # [S,G,G,C]
        eq = torch.cummin(same.to(torch.uint8), dim=-1).values.bool() & carry[..., None]  # [S,G,G,C]
        carry = eq[..., -1]  # [S,G,G]
        eqf = eq.to(torch.float64)  # [S,G,G,C]
        net = torch.einsum("sijc,sj->sic", eqf, c).abs()  # [S,G,C] |Σ_class A·w|
        gross = torch.einsum("sijc,sj->sic", eqf, c_abs)  # [S,G,C] Σ_class |A·w|
        size = eqf.sum(2)  # [S,G,C] class size (self included when m = 1)
        ok = (size >= 2) & (gross > 0)  # [S,G,C]
        inv = torch.where(ok, 1.0 / size.clamp(min=1.0), torch.zeros_like(size))  # [S,G,C]
        total = total + (inv * net / gross.clamp(min=torch.finfo(torch.float64).tiny)).sum()  # []
        count = count + inv.sum()  # []
        if not bool((carry & ~eye).any()):  # no two members share a prefix any more: done
            break
    return torch.where(count > 0, total / count.clamp(min=1.0), total.new_zeros(())).to(torch.float32)  # []


def min_replace(w: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Min-replace: w̃_i = sg(min_{j in g(i)} w_j), equal weights within a group so shared tokens cancel.

    arXiv 2604.13088 (SPEC section 8): exchangeable weights restore the cancellation that GSPO's s_i
    breaks; the minimum is the conservative choice (never a larger step). Shapes: [B], [B] -> [B].
    """
    return group_min(to_f32(w).detach(), group_ids)  # [B]


def adv_orthogonal(w: torch.Tensor, adv: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Advantage-orthogonal: w̃ = w − (Aᵀw/‖A‖²)·A per group, so Σ_i A_i·w̃_i = 0; sg.

    arXiv 2604.13088 (SPEC section 8): removes exactly the component of w that would leave a net
    coefficient on shared tokens. A group where any w̃ ≤ 0 (an invalid weight) falls back to
    min-replace; a group with ‖A‖ = 0 keeps w (it has no gradient anyway). Shapes: [B] x3 -> [B].
    """
    w = to_f32(w).detach()  # [B]
    a = to_f32(adv).detach()  # [B]
    seg, s = dense_group_ids(group_ids)  # [B], S
    aw = segment_sum(a * w, seg, s)  # [S]
    aa = segment_sum(a * a, seg, s)  # [S]
    proj = torch.where(aa > 0, aw / aa.clamp(min=torch.finfo(aa.dtype).tiny), torch.zeros_like(aa))  # [S]
    wt = w - proj[seg] * a  # [B]
    bad = segment_amin(wt, seg, s) <= 0  # [S]
    return torch.where(bad[seg], group_min(w, group_ids), wt)  # [B]


@SEQ_WEIGHTS.register("none")
def keep_weights(w: torch.Tensor, adv: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """None: the per-sequence weights as they are (GSPO's own s_i, no cancellation fix).

    Shapes: w [B], adv [B], group_ids [B] -> [B] (detached, float32).
    """
    return to_f32(w).detach()  # [B]


@SEQ_WEIGHTS.register("min_replace")
def min_replace_weights(w: torch.Tensor, adv: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Min-replace (arXiv 2604.13088): every member of a group gets the group's smallest weight.

    `min_replace` under the SEQ_WEIGHTS signature; `adv` is ignored. Shapes: [B] x3 -> [B].
    """
    return min_replace(w, group_ids)  # [B]


@SEQ_WEIGHTS.register("adv_orthogonal")
def adv_orthogonal_weights(w: torch.Tensor, adv: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Advantage-orthogonal (arXiv 2604.13088): w minus its projection on A, per group.

    `adv_orthogonal` under the SEQ_WEIGHTS signature. Shapes: [B] x3 -> [B].
    """
    return adv_orthogonal(w, adv, group_ids)  # [B]
