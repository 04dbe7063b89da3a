"""Distillation inside RL: a frozen teacher's per-token log-probs ℓ_T as a fourth stream beside ℓ, ℓ° and ℓʳ
(SPEC 11; docs/catalogue.md has each method's full rule, its source and our choices).

Registry signature, one call site (`grpokit.train.step.micro_batch_loss`):

    fn(logp[B,T], teacher_logp[B,T], token_adv[B,T], mask[B,T] bool, *, <keywords it declares>)
        -> (token_adv[B,T], per_tok[B,T])

`logp` is ℓ and carries the gradient; every other stream is detached. The returned `token_adv` is the
per-token advantage the policy loss then uses (G-OPD rewrites it; KDRL passes it through) and `per_tok`
is a term added to the policy loss per token before aggregation (KDRL's β·k2; 0 for G-OPD), already 0
off `mask`. The keywords a method may declare: `old_logp` (ℓ°), `ref_logp` (ℓʳ or None), `row_coef`
([B], KDRL's β_step per row, 0 on rows it leaves alone), `lam` and `outcome_weight` (G-OPD).

Helpers the trainer calls once per rollout batch: `kdrl_beta` (the annealed coefficient of a step) and
`kdrl_row_coef` (which rows KDRL regularises, and how strongly).
"""
from __future__ import annotations

import torch

from grpokit.algo.masked import to_f32
from grpokit.algo.registry import Registry

__all__ = ["DISTILL", "gopd_reward", "kdrl_beta", "kdrl_row_coef"]

DISTILL = Registry("distill")

#: KDRL's coefficient schedule (arXiv 2506.02208): β anneals linearly from 5e-3 to 1e-3.
KDRL_BETA_START = 5e-3
KDRL_BETA_END = 1e-3
#: ExOPD's reward scaling factor λ (arXiv 2602.12125): λ > 1 extrapolates past the teacher.
GOPD_LAMBDA = 1.25


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on real tokens, exactly 0 elsewhere (padded positions may hold garbage, NaN included): [B,T]."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # [B,T]


@DISTILL.register("none")
def none(logp: torch.Tensor, teacher_logp: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """No distillation: the advantage passes through and nothing is added to the loss.

    Shapes: logp, teacher_logp, token_adv, mask [B,T] -> ([B,T], [B,T]).
    """
    return token_adv, torch.zeros_like(to_f32(logp))  # [B,T], [B,T]


@DISTILL.register("kdrl")
def kdrl(logp: torch.Tensor, teacher_logp: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor, *,
         row_coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KDRL (arXiv 2506.02208): + c_i·½(ℓ − sg ℓ_T)² per token (k2), a reverse-KL pull to the teacher.

    c_i = `row_coef[i]`: the annealed β of the step on the responses KDRL regularises (the failed ones by
    default, `kdrl_row_coef`), 0 on the others. k2's gradient (ℓ − ℓ_T)·∇ℓ is the exact gradient of the
    reverse KL(π_θ ‖ π_T) on the sampled tokens (SPEC 4). The advantage passes through unchanged, so
    KDRL composes with any advantage, credit and loss.
    Shapes: logp, teacher_logp, token_adv, mask [B,T], row_coef [B] -> ([B,T], [B,T]).
    """
    d = _masked(to_f32(logp) - to_f32(teacher_logp).detach(), mask)  # [B,T] δ_T = ℓ − ℓ_T, 0 off mask
    coef = to_f32(row_coef).detach()[:, None]  # [B,1]
    return token_adv, coef * 0.5 * d.square()  # [B,T], [B,T]


def gopd_reward(teacher_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                mask: torch.Tensor, *, lam: float = GOPD_LAMBDA) -> torch.Tensor:
    """G-OPD's dense per-token reward (arXiv 2602.12125), detached:

        r_t = λ·(ℓ_T − ℓʳ) − (ℓ° − ℓʳ) = (ℓ_T − ℓ°) + (λ − 1)·(ℓ_T − ℓʳ)

    The second form is computed (the ℓʳ term drops out exactly at λ = 1, standard OPD, and `ref_logp`
    may then be None). ℓ° is the policy that sampled the rollout, as the official code uses.
    Shapes: teacher_logp, old_logp, ref_logp, mask [B,T] -> [B,T], 0 off mask.
    """
    t = to_f32(teacher_logp).detach()  # [B,T]
    r = t - to_f32(old_logp).detach()  # [B,T] ℓ_T − ℓ°
    if lam != 1.0:
        if ref_logp is None:
            raise ValueError(
                f"G-OPD with lambda = {lam} needs the reference log-probs l_ref (its (lambda - 1)(l_T - l_ref) term); "
                "the trainer loads the reference model for it, or set algo.gopd_lambda = 1.0 (standard OPD)"
            )
        r = r + (lam - 1.0) * (t - to_f32(ref_logp).detach())  # [B,T]
    return _masked(r, mask)  # [B,T]


@DISTILL.register("gopd")
def gopd(logp: torch.Tensor, teacher_logp: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor, *,
         old_logp: torch.Tensor, ref_logp: torch.Tensor | None, lam: float = GOPD_LAMBDA,
         outcome_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """G-OPD/ExOPD (arXiv 2602.12125): A[i,t] = w·A_out[i,t] + r_t, r_t = (ℓ_T − ℓ°) + (λ−1)(ℓ_T − ℓʳ).

    The dense reward is each token's own advantage (no reward-to-go, no group normalisation, detached), as
    the official code (verl, `only_reverse_kl_advantages`) sets advantages = −(ℓ° − ℓʳ − λ(ℓ_T − ℓʳ)).
    w = `outcome_weight` = 0 is the paper's pure distillation; w = 1 adds the group-relative outcome
    advantage (or any credit) on top. λ = 1 is standard on-policy distillation; λ = 1.25 is ExOPD.
    Shapes: logp, teacher_logp, token_adv, old_logp, ref_logp, mask [B,T] -> ([B,T], [B,T]).
    """
    r = gopd_reward(teacher_logp, old_logp, ref_logp, mask, lam=lam)  # [B,T]
    adv = _masked(outcome_weight * to_f32(token_adv), mask) + r if outcome_weight else r  # [B,T]
    return adv, torch.zeros_like(to_f32(logp))  # [B,T], [B,T]


def kdrl_beta(step: int, *, beta_start: float = KDRL_BETA_START, beta_end: float = KDRL_BETA_END,
              steps: int) -> float:
    """KDRL's annealed coefficient at RL step `step` (1-based): linear from `beta_start` at step 1 to
    `beta_end` at step `steps`, held at `beta_end` after (and at `beta_start` before step 1)."""
    frac = 0.0 if steps <= 1 else min(max((step - 1) / (steps - 1), 0.0), 1.0)
    return beta_start + (beta_end - beta_start) * frac


def kdrl_row_coef(correct: torch.Tensor, *, beta: float, only_failed: bool = True) -> torch.Tensor:
    """KDRL's per-row coefficient c_i: β on failed responses (not `correct`: the task's correctness reward
    below 1), 0 on correct ones (the paper's reward-guided masking); β on every row with `only_failed`
    False. Shapes: correct [B] bool -> [B] float32."""
    rows = ~correct.bool() if only_failed else torch.ones_like(correct, dtype=torch.bool)  # [B]
    return rows.float() * beta  # [B]
