"""Rollout correction (SPEC 12): stop-gradient importance weights that correct the sampler's log-probs μ
towards the trainer's recomputation ℓ° (decoupled mode, as verl names it).

Each registered mode takes the per-token log-ratio d = ℓ° − μ [B, T] and the loss mask [B, T] and returns

    w [B, T]          the weight that multiplies the per-token policy loss (1 outside the mask; 0 = masked)
    masked [B, T]     bool: tokens the mode removed from the loss (they still count in N_tok, SPEC 3)
    truncated [B, T]  bool: tokens whose ratio was cut down to C (the TIS modes)

Ratios are exp of d (or of its masked sum / mean), with the log clamped to ±LOG_RATIO_CLAMP first (SPEC 0).
`low = None` means 1/high (verl's and TRL's convention). 'none' and 'bypass' are no weight at all and are
handled by the trainer (`grpokit.train.correction`).
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import LOG_RATIO_CLAMP
from grpokit.algo.registry import Registry

#: Rollout-correction modes by name (`rollout.correction`); each is fn(log_ratio, mask, *, low, high).
CORRECTIONS = Registry("rollout correction")

Out = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


def _seq_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """Σ_t m·d per row, or (1/L_i) Σ_t m·d with `mean` (0 for an empty row): [B]."""
    d = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))  # [B, T] (garbage at padding ignored)
    s = d.sum(-1)  # [B]
    return s / mask.sum(-1).clamp(min=1).to(s.dtype) if mean else s


def _finish(w: torch.Tensor, masked: torch.Tensor, truncated: torch.Tensor, mask: torch.Tensor) -> Out:
    one = torch.ones_like(w)
    return (torch.where(mask, w, one).detach(), masked & mask, truncated & mask)


def _bounds(low: float | None, high: float) -> tuple[float, float]:
    return (1.0 / high if low is None else low), high


@CORRECTIONS.register("token_tis", ignores=("low",))
def token_tis(log_ratio: torch.Tensor, mask: torch.Tensor, *, low: float | None = None, high: float = 2.0) -> Out:
    """Token-level truncated IS: w = min(exp(ℓ° − μ), C), C = high (default 2).

    Shapes: log_ratio [B, T], mask [B, T] bool -> w [B, T], masked [B, T], truncated [B, T].
    """
    r = _ratio(log_ratio)  # [B, T]
    return _finish(r.clamp(max=high), torch.zeros_like(mask), r > high, mask)


@CORRECTIONS.register("seq_tis", ignores=("low",))
def seq_tis(log_ratio: torch.Tensor, mask: torch.Tensor, *, low: float | None = None, high: float = 3.0) -> Out:
    """Sequence-level truncated IS: w_i = min(exp(Σ_t m·(ℓ° − μ)), C), C = high (default 3), per row.

    Shapes: log_ratio [B, T], mask [B, T] bool -> w [B, T], masked [B, T], truncated [B, T].
    """
    r = _ratio(_seq_log_ratio(log_ratio, mask, mean=False))[:, None].expand_as(log_ratio)  # [B, T]
    return _finish(r.clamp(max=high), torch.zeros_like(mask), r > high, mask)


def _keep(r: torch.Tensor, low: float | None, high: float, mask: torch.Tensor) -> Out:
    lo, hi = _bounds(low, high)
    keep = (r >= lo) & (r <= hi)  # [B, T]
    return _finish(keep.to(r.dtype), ~keep, torch.zeros_like(mask), mask)


@CORRECTIONS.register("token_mask")
def token_mask(log_ratio: torch.Tensor, mask: torch.Tensor, *, low: float | None = None, high: float = 2.0) -> Out:
    """Token-level rejection (IcePop): w = 1 if exp(ℓ° − μ) ∈ [low, high] = [0.5, 2], else 0.

    Shapes: log_ratio [B, T], mask [B, T] bool -> w [B, T], masked [B, T], truncated [B, T].
    """
    return _keep(_ratio(log_ratio), low, high, mask)


@CORRECTIONS.register("seq_mask")
def seq_mask(log_ratio: torch.Tensor, mask: torch.Tensor, *, low: float | None = None, high: float = 3.0) -> Out:
    """Sequence rejection (TRL's default): keep row i if exp(Σ_t m·(ℓ° − μ)) ∈ [1/C, C], C = 3.

    Shapes: log_ratio [B, T], mask [B, T] bool -> w [B, T], masked [B, T], truncated [B, T].
    """
    r = _ratio(_seq_log_ratio(log_ratio, mask, mean=False))[:, None].expand_as(log_ratio)  # [B, T]
    return _keep(r, low, high, mask)


@CORRECTIONS.register("geo_mask")
def geo_mask(log_ratio: torch.Tensor, mask: torch.Tensor, *, low: float | None = 0.99, high: float = 1.01) -> Out:
    """Geometric-mean rejection: keep row i if exp((1/L_i) Σ_t m·(ℓ° − μ)) ∈ [0.99, 1.01].

    Shapes: log_ratio [B, T], mask [B, T] bool -> w [B, T], masked [B, T], truncated [B, T].
    """
    r = _ratio(_seq_log_ratio(log_ratio, mask, mean=True))[:, None].expand_as(log_ratio)  # [B, T]
    return _keep(r, low, high, mask)
