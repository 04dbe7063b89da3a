"""Group-relative advantages, computed once per rollout without gradient (SPEC section 1).

Every estimator has the one registry signature

    fn(rewards[B] f32, group_ids[B] i64, *, eps=1e-6, std="unbiased" | "population") -> A[B] f32

(estimators that do not divide by a std accept and ignore `eps` and `std`, so the caller never branches
on a name). Groups are given by group ids and may be ragged; members need not be contiguous.
Arithmetic is float32 (float64 rewards stay float64, for exactness tests). No gradient flows.

Two rules hold for every estimator, exactly (not up to rounding):
  - a group whose rewards are all equal gets A = 0 (it carries no relative signal, and a float32
    mean of equal values need not reproduce the value, so it is zeroed explicitly);
  - a singleton group (G = 1) gets A = 0: with a single sample there is no baseline to compare to.
    Callers that want a signal from singletons must use a global baseline instead.

Broadcasting to tokens (A[i,t] = A_i · m[i,t]) is `credit.CREDIT["broadcast"]`.
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import MIN_COUNT, STD_EPS
from grpokit.algo.masked import dense_group_ids, segment_amax, segment_amin, segment_sum, to_f32
from grpokit.algo.registry import Registry

__all__ = ["ADVANTAGES", "grpo", "dr_grpo", "batch_std", "rloo", "STD_CONVENTIONS"]

ADVANTAGES = Registry("advantage")

#: Accepted values of the `std` keyword: "unbiased" divides by G − 1, "population" by G.
STD_CONVENTIONS = ("unbiased", "population")


def _check_std(std: str) -> bool:
    """Validate the std convention; return True for unbiased."""
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std must be one of {STD_CONVENTIONS}, got {std!r}")
    return std == "unbiased"


def _group_centered(
    rewards: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """R_i − mean_g R with exact zeros for flat (all-equal, including singleton) groups.

    Returns (centered [B] f32, dense ids [B], group sizes [S] f32, centered squares summed per group [S]).
    """
    r = to_f32(rewards).detach()  # [B]
    seg, s = dense_group_ids(group_ids)  # [B], S
    count = segment_sum(torch.ones_like(r), seg, s)  # [S]
    mean = segment_sum(r, seg, s) / count  # [S]
    flat = segment_amax(r, seg, s) == segment_amin(r, seg, s)  # [S] all equal (singletons too)
    centered = torch.where(flat[seg], torch.zeros_like(r), r - mean[seg])  # [B]
    sq_sum = segment_sum(centered.square(), seg, s)  # [S]
    return centered, seg, count, sq_sum


@ADVANTAGES.register("grpo")
def grpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = STD_EPS,
    std: str = "unbiased",
) -> torch.Tensor:
    """GRPO: (R − group mean) / (group std + eps); flat and singleton groups get exactly 0.

    DeepSeekMath, arXiv 2402.03300. `std="unbiased"` (1/(G−1)) matches torch, verl and TRL and is the
    default; `std="population"` (1/G) is the FRPO paper's convention (arXiv 2601.10201).
    Shapes: rewards [B], group_ids [B] -> [B] float32.
    """
    unbiased = _check_std(std)
    centered, seg, count, sq_sum = _group_centered(rewards, group_ids)  # [B], [B], [S], [S]
    denom = (count - 1.0).clamp(min=MIN_COUNT) if unbiased else count  # [S]
    sd = (sq_sum / denom).sqrt()  # [S]
    return centered / (sd[seg] + eps)  # [B]


@ADVANTAGES.register("dr_grpo")
def dr_grpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = STD_EPS,
    std: str = "unbiased",
) -> torch.Tensor:
    """Dr. GRPO: R − group mean, no std division (pair with seq_mean_token_sum_norm).

    arXiv 2503.20783: dividing by the group std up-weights easy/hard prompts; dropping it (and the
    per-sequence length normalisation) removes both biases. `eps` and `std` are accepted and ignored.
    Shapes: rewards [B], group_ids [B] -> [B] float32.
    """
    _check_std(std)
    centered, _, _, _ = _group_centered(rewards, group_ids)  # [B]
    return centered  # [B]


@ADVANTAGES.register("batch_std")
def batch_std(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = STD_EPS,
    std: str = "unbiased",
) -> torch.Tensor:
    """Batch-std: (R − group mean) / (std of R over the whole batch + eps).

    LitePPO / REINFORCE++-baseline / DLER (arXiv 2510.15110): a group-local baseline with a global
    scale, which does not blow up nearly-flat groups. `std` picks the convention of the batch std.
    The batch is this call's rewards: pass the whole rollout batch, not a micro-batch.
    Shapes: rewards [B], group_ids [B] -> [B] float32.
    """
    unbiased = _check_std(std)
    centered, _, _, _ = _group_centered(rewards, group_ids)  # [B]
    r = to_f32(rewards).detach()  # [B]
    n = float(r.numel())
    denom = max(n - 1.0, MIN_COUNT) if unbiased else max(n, MIN_COUNT)
    sd = ((r - r.mean()).square().sum() / denom).sqrt() if r.numel() else r.new_zeros(())  # []
    return centered / (sd + eps)  # [B]


@ADVANTAGES.register("rloo")
def rloo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = STD_EPS,
    std: str = "unbiased",
) -> torch.Tensor:
    """RLOO: R_i − mean of the other members = G/(G−1) · (R_i − group mean); singletons get 0.

    arXiv 2402.14740: the leave-one-out baseline is independent of the sample it scores, so the
    estimator is unbiased. `eps` and `std` are accepted and ignored.
    Shapes: rewards [B], group_ids [B] -> [B] float32.
    """
    _check_std(std)
    centered, seg, count, _ = _group_centered(rewards, group_ids)  # [B], [B], [S]
    scale = count / (count - 1.0).clamp(min=MIN_COUNT)  # [S] G/(G−1); singletons have centered = 0
    return centered * scale[seg]  # [B]
