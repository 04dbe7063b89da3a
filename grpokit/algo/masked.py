"""Masked and segment (by group id) reductions: the building blocks of every estimator in `grpokit.algo`.

Groups are given by a group id per sequence (the prompt uid), so groups may be ragged (different sizes)
and their members need not be contiguous. Ids are densified with `torch.unique` and reduced with
`index_add_` / `scatter_reduce_`: O(B) work, no Python loop over groups, no host sync.

Shapes: B sequences, T tokens, S number of distinct group ids (S ≤ B).
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import MIN_COUNT

__all__ = [
    "to_f32",
    "dense_group_ids",
    "segment_sum",
    "segment_amax",
    "segment_amin",
    "group_count",
    "group_sum",
    "group_mean",
    "group_std",
    "group_min",
    "group_max",
    "masked_sum",
    "masked_mean",
]


def to_f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (bf16/fp16 model outputs, int rewards); float64 is kept, for exactness tests."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def dense_group_ids(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary int64 group ids [B] to dense ids in [0, S) and return (dense [B], S)."""
    uniq, dense = torch.unique(group_ids, return_inverse=True)  # [S], [B]
    return dense, uniq.numel()


def segment_sum(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum x [B, ...] into num_segments buckets by dense segment id seg [B] -> [S, ...]."""
    out = x.new_zeros((num_segments, *x.shape[1:]))  # [S, ...]
    return out.index_add_(0, seg, x)  # [S, ...]


def segment_amax(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Max of x [B] per dense segment seg [B] -> [S] (−inf for an empty segment)."""
    out = x.new_full((num_segments,), float("-inf"))  # [S]
    return out.scatter_reduce_(0, seg, x, reduce="amax", include_self=False)  # [S]


def segment_amin(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Min of x [B] per dense segment seg [B] -> [S] (+inf for an empty segment)."""
    out = x.new_full((num_segments,), float("inf"))  # [S]
    return out.scatter_reduce_(0, seg, x, reduce="amin", include_self=False)  # [S]


def group_count(group_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Size of each sequence's group, broadcast back to members: [B] -> [B]."""
    seg, s = dense_group_ids(group_ids)  # [B], S
    ones = torch.ones(seg.shape, dtype=dtype, device=seg.device)  # [B]
    return segment_sum(ones, seg, s)[seg]  # [B]


def group_sum(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Sum of x over each sequence's group, broadcast back to members: [B] -> [B]."""
    seg, s = dense_group_ids(group_ids)  # [B], S
    return segment_sum(x, seg, s)[seg]  # [B]


def group_mean(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean of x over each sequence's group, broadcast back to members: [B] -> [B]."""
    seg, s = dense_group_ids(group_ids)  # [B], S
    total = segment_sum(x, seg, s)  # [S]
    count = segment_sum(torch.ones_like(x), seg, s)  # [S]
    return (total / count)[seg]  # [B]


def group_std(x: torch.Tensor, group_ids: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Standard deviation of x over each sequence's group, broadcast back: [B] -> [B].

    Two-pass (mean, then squared deviations) for accuracy. `unbiased=True` divides by G − 1 (torch,
    verl, TRL); `unbiased=False` divides by G (population). A singleton group has std 0 under both
    conventions (its single deviation is exactly 0; the G − 1 = 0 denominator is clamped to 1).
    """
    seg, s = dense_group_ids(group_ids)  # [B], S
    count = segment_sum(torch.ones_like(x), seg, s)  # [S]
    mean = segment_sum(x, seg, s) / count  # [S]
    sq = (x - mean[seg]).square()  # [B]
    denom = (count - 1.0).clamp(min=MIN_COUNT) if unbiased else count  # [S]
    return (segment_sum(sq, seg, s) / denom).sqrt()[seg]  # [B]


def group_min(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Min of x over each sequence's group, broadcast back to members: [B] -> [B]."""
    seg, s = dense_group_ids(group_ids)  # [B], S
    return segment_amin(x, seg, s)[seg]  # [B]


def group_max(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Max of x over each sequence's group, broadcast back to members: [B] -> [B]."""
    seg, s = dense_group_ids(group_ids)  # [B], S
    return segment_amax(x, seg, s)[seg]  # [B]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over positions where mask is True (all dims, or along `dim`).

    Uses `where`, not `x * mask`, so NaN/inf garbage at padded positions cannot leak into the sum.
    """
    xm = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # like x
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is True; 0 where there are none (never NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)  # [] or reduced shape
    return masked_sum(x, mask, dim) / count.to(x.dtype).clamp(min=MIN_COUNT)
