"""Per-token policy losses, unreduced (SPEC section 2); reduction is `aggregate` (SPEC section 3).

Every loss has the one registry signature

    fn(logp[B,T], old_logp[B,T], adv[B,T], mask[B,T], *, clip_low, clip_high, dual_clip_c, ...)
        -> (per_tok[B,T] f32, stats: dict[str, Tensor])

`logp` carries the gradient; `old_logp` and `adv` are treated as constants (detached here). `per_tok`
is exactly 0 where `mask` is False (selected with `where`, so padded garbage cannot leak in), and the
gradient there is exactly 0. `stats` always holds bool [B,T] masks `clipped_low`, `clipped_high` and
`dual_clipped` (False outside `mask`); the trainer turns them into clip fractions. `dual_clip_c=None`
switches the dual clip off. A keyword a loss declares only for the uniform signature (CISPO's
`dual_clip_c`) is registered as ignored, so `Registry.accepts` leaves it out and the config refuses it. Arithmetic is float32 (float64 inputs stay float64, for tests).
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import LOG_RATIO_CLAMP
from grpokit.algo.masked import to_f32
from grpokit.algo.registry import Registry

__all__ = ["LOSSES", "ppo_clip", "gspo", "cispo", "sapo", "kl_cov", "ppo_kl", "clipped_log_ratio", "masked_advantage"]

LOSSES = Registry("loss")

Stats = dict[str, torch.Tensor]


def masked_advantage(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached float32 advantages, 0 where masked (so padded garbage cannot turn a 0 gradient into NaN)."""
    adv = to_f32(adv).detach()  # [B,T]
    return torch.where(mask, adv, torch.zeros_like(adv))  # [B,T]


def clipped_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d = clamp(ℓ − sg(ℓ°), ±LOG_RATIO_CLAMP), 0 where masked: [B,T] -> [B,T] (grad flows to logp)."""
    logp = to_f32(logp)  # [B,T]
    diff = logp - to_f32(old_logp).detach()  # [B,T]
    diff = torch.where(mask, diff, torch.zeros_like(diff))  # [B,T] padded garbage -> 0
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B,T]


def _check_dual_clip(dual_clip_c: float | None) -> None:
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (or None to disable), got {dual_clip_c}")


def _clip_surrogate(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, Stats]:
    """max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), then min(·, −A·c) for A < 0; zero where masked.

    Shapes: ratio [B,T] (with grad), adv [B,T] (constant), mask [B,T] bool -> ([B,T], stats).
    """
    pg_unclipped = -adv * ratio  # [B,T]
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B,T]
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [B,T]
    clipped_low = mask & (adv < 0) & (ratio < 1.0 - clip_low)  # [B,T] gradient stopped below
    clipped_high = mask & (adv > 0) & (ratio > 1.0 + clip_high)  # [B,T] gradient stopped above
    if dual_clip_c is None:
        dual_clipped = torch.zeros_like(mask)  # [B,T]
    else:
        pg_cap = -adv * dual_clip_c  # [B,T] constant cap for negative advantages
        dual_clipped = mask & (adv < 0) & (pg > pg_cap)  # [B,T]
        pg = torch.where(adv < 0, torch.minimum(pg, pg_cap), pg)  # [B,T]
    per_tok = torch.where(mask, pg, torch.zeros_like(pg))  # [B,T]
    stats = {"clipped_low": clipped_low, "clipped_high": clipped_high, "dual_clipped": dual_clipped}
    return per_tok, stats


@LOSSES.register("ppo_clip")
def ppo_clip(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate with clip-higher (ε_low ≠ ε_high) and optional dual clip.

    ℓ_pg = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), ρ = exp(clamp(ℓ − ℓ°, ±20)); with dual clip
    (Ye et al. 2020, arXiv 1912.09729) ℓ_pg = min(ℓ_pg, −A·c) where A < 0, which bounds the loss of a
    negative-advantage token whose ratio exploded. Clip-higher is DAPO's (arXiv 2503.14476: ε = 0.2/0.28);
    GRPO uses 0.2/0.2. Stats: `clipped_low` = A<0 and ρ<1−ε_low, `clipped_high` = A>0 and ρ>1+ε_high
    (the tokens whose gradient the clip stops), `dual_clipped` = the cap is active (A<0, ρ>c).
    Shapes: logp, old_logp, adv [B,T], mask [B,T] bool -> (per_tok [B,T], stats).
    """
    _check_dual_clip(dual_clip_c)
    ratio = clipped_log_ratio(logp, old_logp, mask).exp()  # [B,T]
    adv = masked_advantage(adv, mask)  # [B,T]
    return _clip_surrogate(
        ratio, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c
    )


@LOSSES.register("gspo")
def gspo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip_c: float | None = None,
    seq_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """GSPO, token form: a sequence-level ratio s_i clipped like PPO, with a per-token gradient path.

    arXiv 2507.18071. log s_i = (1/L_i) Σ_t m·(ℓ − ℓ°) (the length-normalised sequence ratio),
    s_{i,t} = exp(sg(log s_i) + ℓ − sg(ℓ)) (value s_i, gradient s_i·∇ℓ_t), then the PPO clip (and dual
    clip, if c is given) on s_{i,t}. Aggregate with `seq_mean_token_mean` to get the paper's objective.
    The default ε = 3e-4/4e-4 are the paper's recipe values (sequence ratios are far tighter than
    token ratios). sg(log s_i) is clamped to ±LOG_RATIO_CLAMP before exp. Empty rows (L_i = 0) give 0.
    `seq_ratio` [B] (> 0, detached) replaces s_i: the stop-gradient weights of min-replace or
    advantage-orthogonal (SPEC section 8, `credit.SEQ_WEIGHTS`), computed by the caller over a whole
    optimizer batch, since the minimum over a group must not depend on how the batch is split.
    Shapes: logp, old_logp, adv [B,T], mask [B,T] bool, seq_ratio [B] -> (per_tok [B,T], stats with
    `seq_ratio` f32 [B], the s_i in use, 0 for empty rows).
    """
    _check_dual_clip(dual_clip_c)
    logp = to_f32(logp)  # [B,T]
    if seq_ratio is None:
        diff = torch.where(mask, logp - to_f32(old_logp).detach(), torch.zeros_like(logp))  # [B,T]
        length = mask.sum(-1).clamp(min=1).to(logp.dtype)  # [B]
        log_s = diff.sum(-1) / length  # [B]
    else:
        log_s = to_f32(seq_ratio).to(logp.dtype).log()  # [B]
    log_s = log_s.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B]
    log_s_tok = log_s[:, None] + logp - logp.detach()  # [B,T] value log s_i, gradient ∇ℓ_t
    log_s_tok = torch.where(mask, log_s_tok, torch.zeros_like(log_s_tok))  # [B,T]
    adv = masked_advantage(adv, mask)  # [B,T]
    per_tok, stats = _clip_surrogate(
        log_s_tok.exp(), adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c
    )
    stats["seq_ratio"] = torch.where(mask.any(-1), log_s.exp(), torch.zeros_like(log_s)).float()  # [B] 0 if empty
    return per_tok, stats


@LOSSES.register("cispo", ignores=("dual_clip_c",))
def cispo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, Stats]:
    """CISPO: REINFORCE weighted by a clipped, stop-gradient IS ratio; no token loses its gradient.

    MiniMax-M1, arXiv 2506.13585: ℓ_pg = −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·ℓ. Clipping the weight
    instead of the surrogate keeps the gradient of rare "fork" tokens that PPO would clip away. The
    paper sets no lower bound (default ε_low = 1, i.e. clip at 0). `dual_clip_c` is accepted for the
    uniform signature and has no effect (the weight is already capped at 1+ε_high); `dual_clipped`
    is all False. Stats: `clipped_low` = ρ<1−ε_low, `clipped_high` = ρ>1+ε_high, any sign of A.
    Shapes: logp, old_logp, adv [B,T], mask [B,T] bool -> (per_tok [B,T], stats).
    """
    logp = to_f32(logp)  # [B,T]
    ratio = clipped_log_ratio(logp, old_logp, mask).detach().exp()  # [B,T]
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B,T] constant
    adv = masked_advantage(adv, mask)  # [B,T]
    pg = -weight * adv * logp  # [B,T]
    per_tok = torch.where(mask, pg, torch.zeros_like(pg))  # [B,T]
    stats = {
        "clipped_low": mask & (ratio < 1.0 - clip_low),  # [B,T]
        "clipped_high": mask & (ratio > 1.0 + clip_high),  # [B,T]
        "dual_clipped": torch.zeros_like(mask),  # [B,T]
    }
    return per_tok, stats


def ppo_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token ℓ° − ℓ (0 where masked, no grad): its masked mean is the `ppo_kl` metric (SPEC section 2).

    Shapes: logp, old_logp [B,T], mask [B,T] bool -> [B,T].
    """
    diff = to_f32(old_logp).detach() - to_f32(logp).detach()  # [B,T]
    return torch.where(mask, diff, torch.zeros_like(diff))  # [B,T]


# ---------------------------------------------------------------------------- SPEC section 11 (catalogue)


@LOSSES.register("sapo", ignores=("clip_low", "clip_high", "dual_clip_c"))
def sapo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip_c: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, Stats]:
    """SAPO: a smooth, temperature-controlled gate on the ratio instead of the hard clip.

    Soft Adaptive Policy Optimization (Qwen, arXiv 2511.20347); TRL `loss_type="sapo"` (grpo_trainer.py):
    per_tok = −A·σ(τ·(ρ − 1))·4/τ, ρ = exp(clamp(ℓ − ℓ°, ±20)), τ = τ_pos where A > 0 and τ_neg where
    A ≤ 0 (TRL's `advantages > 0`). The 4/τ is part of the gate f(ρ) = σ(τ(ρ−1))·4/τ, so its gradient is
    −A·w·ρ·∇ℓ with w = 4σ(1−σ) ∈ (0, 1]: at ρ = 1, w = 1 and the gradient is the unclipped policy
    gradient −A·∇ℓ (the loss value there is −2A/τ, not −A). Far from ρ = 1 the weight decays smoothly
    (faster for τ_neg > τ_pos). No token is hard-clipped: the clip flags are all False, and the clip
    keywords are declared only for the uniform signature (registered as ignored, so the config refuses them).
    Aggregate with `seq_mean_token_mean` for the paper's (and TRL's) objective.
    Shapes: logp, old_logp, adv [B,T], mask [B,T] bool -> (per_tok [B,T], stats with `sapo_gate` f32
    [B,T], the weight w, 0 where masked).
    """
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"SAPO temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    ratio = clipped_log_ratio(logp, old_logp, mask).exp()  # [B,T]
    adv = masked_advantage(adv, mask)  # [B,T]
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # [B,T]
    sig = torch.sigmoid(tau * (ratio - 1.0))  # [B,T]
    pg = -adv * sig * (4.0 / tau)  # [B,T]
    per_tok = torch.where(mask, pg, torch.zeros_like(pg))  # [B,T]
    gate = (4.0 * sig * (1.0 - sig)).detach()  # [B,T] gradient weight relative to -A·ρ·∇ℓ
    none = torch.zeros_like(mask)  # [B,T]
    stats = {"clipped_low": none, "clipped_high": none, "dual_clipped": none,
             "sapo_gate": torch.where(mask, gate, torch.zeros_like(gate)).float()}
    return per_tok, stats


@LOSSES.register("kl_cov", ignores=("clip_low", "clip_high", "dual_clip_c"))
def kl_cov(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip_c: float | None = None,
    kl_cov_ratio: float = 2e-3,
    kl_cov_coef: float = 1.0,
    penalised: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """KL-Cov: no clipping; the max(⌊κ·N⌋, 1) tokens of largest covariance get + coef·|ℓ − ℓ°|.

    arXiv 2505.22617 (The Entropy Mechanism of RL for Reasoning LMs), verl `compute_policy_loss_kl_cov`
    (verl/trainer/ppo/core_algos.py): per_tok = −A·ρ, plus kl_cov_coef·|ℓ − ℓ°| on the selected tokens
    (d = clamp(ℓ − ℓ°, ±20), ρ = e^d; the gradient of |d| is sign(d)·∇ℓ, 0 at d = 0). Selection
    (`grpokit.algo.masks.kl_cov_select`): cov = (A − mean A)(sg ℓ − mean sg ℓ) over the loss tokens,
    the k = max(⌊κ·N⌋, 1) largest. `penalised` [B,T] bool, when given, is that selection made by the
    caller over a whole optimizer step (the trainer does, so the choice does not depend on the
    micro-batch split); None selects over this call's tokens (verl's per-micro-batch rule).
    κ = 2e-3 is the paper's recipe value (verl's recipes for 7B and 32B; verl's fallback is 2e-4). The clip
    keywords are declared only for the uniform signature (registered as ignored: KL-Cov does not clip).
    Shapes: logp, old_logp, adv [B,T], mask [B,T] bool, penalised [B,T] bool -> (per_tok [B,T], stats
    with `kl_cov_penalised` bool [B,T]; the clip flags are all False).
    """
    from grpokit.algo.masks import kl_cov_select

    d = clipped_log_ratio(logp, old_logp, mask)  # [B,T] with grad
    adv = masked_advantage(adv, mask)  # [B,T]
    if penalised is None:
        penalised = kl_cov_select(adv, logp, mask, ratio=kl_cov_ratio)  # [B,T]
    penalised = penalised.to(mask.device).bool() & mask  # [B,T]
    pg = -adv * d.exp() + torch.where(penalised, kl_cov_coef * d.abs(), torch.zeros_like(d))  # [B,T]
    per_tok = torch.where(mask, pg, torch.zeros_like(pg))  # [B,T]
    none = torch.zeros_like(mask)  # [B,T]
    return per_tok, {"clipped_low": none, "clipped_high": none, "dual_clipped": none, "kl_cov_penalised": penalised}
