"""Per-token estimators of KL(π_θ ‖ π_ref) (SPEC section 4), after Schulman's "Approximating KL".

Registry signature: fn(logp[B,T], ref_logp[B,T]) -> [B,T] float32, with δ = ℓ − ℓʳ and r = π_ref/π_θ
= e^{−δ}. `logp` carries the gradient; `ref_logp` is detached. No mask: the aggregation masks (with
`where`), and the values at padded positions are finite for finite inputs. Placement (in the loss
or in the reward) is the trainer's choice; β = 0 must skip the reference model entirely.
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import LOG_RATIO_CLAMP
from grpokit.algo.masked import to_f32
from grpokit.algo.registry import Registry

__all__ = ["KL", "k1", "k2", "k3", "forward_kl"]

KL = Registry("kl")


def _delta(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """δ = ℓ − sg(ℓʳ) in float32 (float64 kept): [B,T] -> [B,T]."""
    return to_f32(logp) - to_f32(ref_logp).detach()  # [B,T]


@KL.register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = δ: unbiased KL value; as a loss term its expected gradient is 0 (use it in the reward).

    Shapes: logp, ref_logp [B,T] -> [B,T].
    """
    return _delta(logp, ref_logp)  # [B,T]


@KL.register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½δ²: biased value, but its gradient δ·∇ℓ is the exact reverse-KL gradient.

    Shapes: logp, ref_logp [B,T] -> [B,T].
    """
    return 0.5 * _delta(logp, ref_logp).square()  # [B,T]


@KL.register("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = r − log r − 1 = e^{−δ} + δ − 1: unbiased, ≥ 0, low variance (GRPO's in-loss KL).

    DeepSeekMath arXiv 2402.03300. As a loss its gradient (1 − e^{−δ})·∇ℓ is the forward-KL gradient.
    δ is clamped to ±LOG_RATIO_CLAMP first (e^{−δ} would overflow float32 for δ < −88); outside the
    clamp the value is frozen and the gradient is 0, as for the PPO ratio.
    Shapes: logp, ref_logp [B,T] -> [B,T].
    """
    d = _delta(logp, ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B,T]
    return torch.expm1(-d) + d  # [B,T] e^{−δ} − 1 + δ, expm1 for accuracy at small δ


@KL.register("forward_kl")
def forward_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL(π_ref ‖ π_θ) per token, w·log w − w + 1 with w = π_ref/π_θ (RAPO, arXiv 2510.03865).

    Sampled from π_θ, E[w log w] is the forward KL and E[w] = 1, so the estimator is unbiased and ≥ 0
    (f(w) = w log w − w + 1 ≥ 0). Its gradient is w·δ·∇ℓ: mass-covering, it pulls up tokens the
    reference likes more than the policy does. δ is clamped to ±LOG_RATIO_CLAMP first, as in k3.
    Shapes: logp, ref_logp [B,T] -> [B,T].
    """
    d = _delta(logp, ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B,T]
    w = torch.exp(-d)  # [B,T] π_ref/π_θ
    return -w * d - torch.expm1(-d)  # [B,T] w·log w − (w − 1), log w = −δ
