"""Process-supervised credit: per-step rewards of a PRM -> per-token advantages (`credit = "process"`).

DeepSeekMath §4.1.3 (arXiv 2402.03300), SPEC section 13. Every step reward of a group is normalised
by the mean and std of all step rewards of that group, r̃ = (r − mean_g)/(std_g + ε); the advantage of
token t of sequence i is the sum of the normalised rewards of the steps of i that end at or after t:

    A[i,t] = Σ_{steps j of i with end[i,j] ≥ t} r̃[i,j] · m[i,t]

Shapes: B sequences, T response tokens, K = the most steps any sequence has (rows padded on the
right; `step_mask` marks the real steps). `step_ends[i,j]` is the response-token index (0-based,
in [0, T)) of the last token of step j of sequence i, as `PRMScorer.step_ends` gives it.
A group with fewer than two steps in all, or whose step rewards are all equal, gets A = 0 (as GRPO's
flat and singleton groups do, SPEC section 1).
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import MIN_COUNT, STD_EPS
from grpokit.algo.credit import CREDIT
from grpokit.algo.masked import dense_group_ids, segment_sum, to_f32

__all__ = ["process", "process_step_advantages"]


def process_step_advantages(
    step_rewards: torch.Tensor,
    step_mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = STD_EPS,
    std: str = "unbiased",
) -> torch.Tensor:
    """Normalised step rewards r̃ = (r − mean_g)/(std_g + ε) over all real steps of each group.

    DeepSeekMath §4.1.3 (arXiv 2402.03300). `std`: "unbiased" (1/(n−1), the GRPO default) or
    "population" (1/n), n = the group's number of steps. Groups with one step or all-equal step
    rewards give exactly 0. Shapes: step_rewards [B,K], step_mask [B,K] bool, group_ids [B] -> [B,K]
    float32 (float64 kept), 0 where step_mask is False.
    """
    if std not in ("unbiased", "population"):
        raise ValueError(f"std must be 'unbiased' or 'population', got {std!r}")
    if step_rewards.shape != step_mask.shape:
        raise ValueError(f"step_rewards {tuple(step_rewards.shape)} and step_mask {tuple(step_mask.shape)} must have one shape [B, K]")
    r = to_f32(step_rewards).detach()  # [B,K]
    zero = torch.zeros_like(r)  # [B,K]
    r = torch.where(step_mask, r, zero)  # [B,K] padding may hold NaN
    w = step_mask.to(r.dtype)  # [B,K]
    seg, s = dense_group_ids(group_ids)  # [B], S
    count = segment_sum(w.sum(1), seg, s)  # [S] steps per group
    mean = segment_sum(r.sum(1), seg, s) / count.clamp(min=MIN_COUNT)  # [S]
    centered = torch.where(step_mask, r - mean[seg][:, None], zero)  # [B,K]
    sq = segment_sum((centered * centered).sum(1), seg, s)  # [S]
    denom = (count - 1.0).clamp(min=MIN_COUNT) if std == "unbiased" else count.clamp(min=MIN_COUNT)  # [S]
    sd = (sq / denom).sqrt()  # [S]
    ok = (count >= 2)[seg][:, None] & step_mask  # [B,K]
    return torch.where(ok, centered / (sd[seg][:, None] + eps), zero)  # [B,K]


@CREDIT.register("process")
def process(
    seq_adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    divergence: str = "k1",
    step_rewards: torch.Tensor | None = None,
    step_ends: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = STD_EPS,
    std: str = "unbiased",
) -> torch.Tensor:
    """Process supervision: A[i,t] = Σ of group-normalised step rewards of steps ending at or after t.

    DeepSeekMath §4.1.3, arXiv 2402.03300 (SPEC section 13). `seq_adv` is ignored (the outcome
    advantage is replaced, not added); old_logp/ref_logp/beta/divergence exist for the uniform CREDIT
    signature and are ignored. The PRM's step rewards come in as keywords: `step_rewards` [B,K] f32,
    `step_ends` [B,K] int64 (response-token index of each step's last token; clamped into [0, T−1]),
    `step_mask` [B,K] bool (real steps), `group_ids` [B] int64. Steps and tokens outside `mask` add
    nothing. Shapes: seq_adv [B], mask [B,T] bool -> [B,T] float32 (float64 input stays float64; no grad).
    """
    if step_rewards is None or step_ends is None or step_mask is None or group_ids is None:
        raise ValueError(
            "credit 'process' needs the PRM's step_rewards, step_ends, step_mask [B, K] and group_ids [B]; "
            "use rewards.functions = ['prm'] and let the trainer pass its step scores to the credit function"
        )
    b, t = mask.shape
    if step_rewards.shape[0] != b or step_ends.shape != step_rewards.shape:
        raise ValueError(
            f"process credit: step_rewards {tuple(step_rewards.shape)} and step_ends {tuple(step_ends.shape)} "
            f"must both be [B={b}, K]"
        )
    r = process_step_advantages(step_rewards, step_mask, group_ids, eps=eps, std=std)  # [B,K]
    if t == 0:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # [B,0]
    ends = step_ends.long().clamp(0, t - 1)  # [B,K]
    at_end = torch.zeros((b, t), dtype=r.dtype, device=r.device)  # [B,T]
    at_end.scatter_add_(1, ends, r)  # [B,T] r̃ placed at each step's last token
    togo = at_end.flip(1).cumsum(1).flip(1)  # [B,T] Σ_{end ≥ t} r̃
    return torch.where(mask, togo, torch.zeros_like(togo)).detach()  # [B,T]
