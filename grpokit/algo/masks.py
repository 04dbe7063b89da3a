"""Token masks (SPEC section 11): which loss tokens keep their policy gradient; they compose with any loss.

The trainer applies a mask after the loss: per_tok = where(keep, per_tok, 0), so a removed token has
loss value 0 and gradient exactly 0 (verl's Clip-Cov multiplies by its `corr` = 0 the same way). Removed
tokens still count in the aggregation's N_tok (SPEC 3), so a mask never rescales the other tokens'
gradients. The KL-in-loss term (SPEC 4) is not masked.

Registry signature:

    fn(logp[B,T], old_logp[B,T], adv[B,T], mask[B,T], clipped[B,T], *, <hyperparameters>, ...)
        -> (keep[B,T] bool, stats: {"masked": bool [B,T]})

`clipped` holds the tokens whose gradient the loss's own clip already stops (its `clipped_low |
clipped_high | dual_clipped`); `masked` = mask & ~keep, the tokens this mask removed.

Also here: the covariance selections of Clip-Cov and KL-Cov (arXiv 2505.22617), written so that the
trainer can make them over a whole optimizer step on every rank (`token_covariance` with given means,
then a choice over globally ordered candidates), which keeps the choice independent of the micro-batch
split and of the number of ranks.
"""
from __future__ import annotations

import hashlib

import torch

from grpokit.algo.losses import clipped_log_ratio, masked_advantage
from grpokit.algo.masked import masked_mean, to_f32
from grpokit.algo.registry import Registry

__all__ = [
    "TOKEN_MASKS", "token_covariance", "clip_cov_count", "kl_cov_count", "clip_cov_candidates",
    "clip_cov_select", "kl_cov_select", "choose_random", "choose_top", "selection_seed",
]

TOKEN_MASKS = Registry("token_mask")

Stats = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- covariance selection


def token_covariance(
    adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, *,
    mean_adv: float | torch.Tensor | None = None, mean_logp: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """cov = (A − mean A)·(sg ℓ − mean sg ℓ) per token, 0 outside `mask`: [B,T] -> [B,T], no grad.

    The means are over the `mask` tokens of these inputs unless given (the trainer passes the means over
    a whole optimizer step, all ranks). verl computes them over the micro-batch's response tokens.
    """
    a = masked_advantage(adv, mask)  # [B,T]
    lp = to_f32(logp).detach()  # [B,T]
    lp = torch.where(mask, lp, torch.zeros_like(lp))  # [B,T]
    ma = masked_mean(a, mask) if mean_adv is None else mean_adv
    ml = masked_mean(lp, mask) if mean_logp is None else mean_logp
    cov = (a - ma) * (lp - ml)  # [B,T]
    return torch.where(mask, cov, torch.zeros_like(cov))  # [B,T]


def clip_cov_count(n_tokens: int, ratio: float) -> int:
    """How many tokens Clip-Cov detaches: max(⌊ratio·N⌋, 1), as verl (`max(int(clip_ratio * N), 1)`)."""
    return max(int(ratio * n_tokens), 1)


def kl_cov_count(n_tokens: int, ratio: float) -> int:
    """How many tokens KL-Cov penalises: max(⌊ratio·N⌋, 1), as verl (`max(1, int(N * kl_cov_ratio))`)."""
    return max(int(n_tokens * ratio), 1)


def clip_cov_candidates(cov: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor, *, cov_lb: float, cov_ub: float) -> torch.Tensor:
    """Tokens Clip-Cov may detach: in `mask`, not already clipped, cov_lb < cov < cov_ub: [B,T] bool."""
    return mask & ~clipped.bool() & (cov > cov_lb) & (cov < cov_ub)  # [B,T]


def selection_seed(seed: int, step: int, update: int, name: str) -> int:
    """The seed of one optimizer step's random choice: a hash of (run seed, step, update index, name), so a
    resumed run repeats it and every rank draws the same permutation."""
    digest = hashlib.blake2b(f"{seed}/{step}/{update}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid manual_seed


def choose_random(n_candidates: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of min(k, n) of `n_candidates` ordered candidates, chosen uniformly at random:
    torch.randperm(n, generator)[:k] on the CPU, as verl (int64 [min(k, n)])."""
    if n_candidates == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.randperm(n_candidates, generator=generator)[: min(k, n_candidates)]  # [k']


def choose_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the min(k, n) largest of `values` [n] (ties: the earlier index first, so the choice is
    deterministic; verl's `torch.topk` leaves ties unspecified): int64 [min(k, n)]."""
    order = torch.argsort(values, descending=True, stable=True)  # [n]
    return order[: min(k, values.numel())]


def clip_cov_select(
    adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor, *,
    ratio: float, cov_lb: float, cov_ub: float, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip-Cov's choice over these inputs: max(⌊ratio·N⌋, 1) of the candidates (`clip_cov_candidates`,
    N = the `mask` token count), taken in row-major order and chosen by `choose_random`: [B,T] bool."""
    cov = token_covariance(adv, logp, mask)  # [B,T]
    cand = clip_cov_candidates(cov, mask, clipped, cov_lb=cov_lb, cov_ub=cov_ub).flatten()  # [B*T]
    idx = cand.nonzero().squeeze(1).cpu()  # [n] row-major
    pick = idx[choose_random(idx.numel(), clip_cov_count(int(mask.sum()), ratio), generator)]  # [k']
    out = torch.zeros(cand.numel(), dtype=torch.bool)  # [B*T]
    out[pick] = True
    return out.view(mask.shape).to(mask.device)  # [B,T]


def kl_cov_select(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, *, ratio: float) -> torch.Tensor:
    """KL-Cov's choice over these inputs: the max(⌊ratio·N⌋, 1) `mask` tokens of largest covariance
    (`choose_top`, candidates in row-major order): [B,T] bool (all False when `mask` is empty)."""
    cov = token_covariance(adv, logp, mask).flatten()  # [B*T]
    idx = mask.flatten().nonzero().squeeze(1)  # [N] row-major
    out = torch.zeros(cov.numel(), dtype=torch.bool, device=mask.device)  # [B*T]
    if idx.numel():
        out[idx[choose_top(cov[idx], kl_cov_count(idx.numel(), ratio))]] = True
    return out.view(mask.shape)  # [B,T]


# ---------------------------------------------------------------------------- the masks


@TOKEN_MASKS.register("none")
def no_mask(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor,
) -> tuple[torch.Tensor, Stats]:
    """No token mask: every loss token keeps its gradient (the default).

    Shapes: logp, old_logp, adv, mask, clipped [B,T] -> (keep = mask [B,T] bool, {"masked": all False [B,T]}).
    """
    return mask, {"masked": torch.zeros_like(mask)}


@TOKEN_MASKS.register("dppo")
def dppo_mask(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor,
    *, delta: float = 8.0,
) -> tuple[torch.Tensor, Stats]:
    """DPPO / IcePop ratio mask: a token whose ratio ρ leaves [1/δ, δ] loses its gradient, any sign of A.

    ρ = exp(clamp(ℓ − ℓ°, ±20)), the loss's own ratio. prime-rl's double-sided token mask (PR #1101,
    `mask_ratio_low` = 0.125, `mask_ratio_high` = 8: δ = 8 here) and IcePop (Ant Group, Ring-1T report)
    drop such tokens outright instead of clipping them; unlike PPO's clip, the mask acts for both signs
    of A and on both sides. Bounds are kept (ρ = δ keeps its gradient).
    Shapes: logp, old_logp, adv, mask, clipped [B,T] -> (keep [B,T] bool, {"masked": [B,T] bool}).
    """
    if not delta > 1.0:
        raise ValueError(f"the DPPO mask needs delta > 1 (the band [1/delta, delta]), got {delta}")
    ratio = clipped_log_ratio(logp, old_logp, mask).detach().exp()  # [B,T]
    out = mask & ((ratio < 1.0 / delta) | (ratio > delta))  # [B,T]
    return mask & ~out, {"masked": out}


@TOKEN_MASKS.register("clip_cov")
def clip_cov_mask(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor,
    *, ratio: float = 2e-4, cov_lb: float = 1.0, cov_ub: float = 5.0,
    selected: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Clip-Cov: detach max(⌊r·N⌋, 1) random unclipped tokens with covariance in (cov_lb, cov_ub).

    arXiv 2505.22617, verl `compute_policy_loss_clip_cov` (verl/trainer/ppo/core_algos.py): cov =
    (A − mean A)(sg ℓ − mean sg ℓ) over the loss tokens; candidates are loss tokens not already clipped
    by the loss (`clipped`) with cov_lb < cov < cov_ub; min(max(⌊r·N⌋, 1), #candidates) of them, drawn
    uniformly at random (torch.randperm), get loss and gradient 0. `selected` [B,T] bool, when given, is
    that choice made by the caller over a whole optimizer step (the trainer does, seeded by run seed,
    step and update, the same on every rank); None chooses over this call's tokens with `generator`
    (verl's per-micro-batch rule). Defaults are the paper's: r = 2e-4, band (1, 5).
    Shapes: logp, old_logp, adv, mask, clipped [B,T] -> (keep [B,T] bool, {"masked": [B,T] bool}).
    """
    if selected is None:
        selected = clip_cov_select(adv, logp, mask, clipped, ratio=ratio, cov_lb=cov_lb, cov_ub=cov_ub, generator=generator)
    out = selected.to(mask.device).bool() & mask  # [B,T]
    return mask & ~out, {"masked": out}
