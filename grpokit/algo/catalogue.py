"""SPEC section 11, the catalogue: ACE, GRPO-λ, DOT, DLER's truncation penalty, APO/DADS, (RAPO's KL is
`kl.forward_kl`). Pure math: tensors and keyword hyperparameters in, tensors out; no gradient flows.

Two registries live here:

    ADV_TRANSFORMS: fn(seq_adv[B], mask[B,T], *, old_logp[B,T], ref_logp[B,T] | None, alpha) -> [B]
        a transform of the group-relative advantages before token credit ('none', 'ace');
    KL_WEIGHTS:     fn(seq_adv[B], correct[B], valid[B], group_ids[B], *, beta, e) -> [B]
        the per-sequence weight of the KL-in-loss term ('constant' = beta, 'apo').

The batch-level rules (GRPO-λ's shaped reward, DOT's cut lengths, DLER's truncation penalty) are plain
functions that `grpokit.transforms.catalogue` wraps as batch transforms.

Shapes: B sequences, T response tokens, S groups. docs/catalogue.md has each rule with its source.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from grpokit.algo.masked import dense_group_ids, masked_sum, segment_sum, to_f32
from grpokit.algo.registry import Registry

__all__ = [
    "ADV_TRANSFORMS", "KL_WEIGHTS", "ace", "apo_kl_weight", "confidence_shift", "dot_cut_lengths",
    "grpo_lambda_penalty", "truncation_penalized",
]

ADV_TRANSFORMS = Registry("advantage transform")
KL_WEIGHTS = Registry("kl weight")

#: GRPO-λ: k = ceil(λ·S) groups get the length penalty; λ·S is rounded down by this much first, so that a
#: product such as 0.2 x 15 = 3.0000000000000004 gives 3 groups, not 4.
TOP_FRACTION_SLACK: float = 1e-9


# ---------------------------------------------------------------------------- ACE (arXiv 2602.21420)

def confidence_shift(old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ACE's c_i = log π_old(y_i|x) − log π_ref(y_i|x) = Σ_t m·(ℓ° − ℓʳ): [B,T] x3 -> [B] (a sum, not a mean)."""
    return masked_sum(to_f32(old_logp) - to_f32(ref_logp), mask.bool(), dim=-1)  # [B]


@ADV_TRANSFORMS.register("none", ignores=("old_logp", "ref_logp", "alpha"))
def no_transform(seq_adv: torch.Tensor, mask: torch.Tensor, *, old_logp: torch.Tensor | None = None,
                 ref_logp: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """The advantages unchanged (no transform).

    Shapes: seq_adv [B] -> [B].
    """
    return seq_adv


@ADV_TRANSFORMS.register("ace")
def ace(seq_adv: torch.Tensor, mask: torch.Tensor, *, old_logp: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """ACE: for A_i < 0, A_i·(1 + α·softplus(c_i)), c_i = Σ_t m(ℓ° − ℓʳ); A_i ≥ 0 unchanged.

    Asymmetric Confidence-aware Error Penalty, arXiv 2602.21420: an incorrect rollout the policy has
    become more confident in than the reference (c_i > 0, an "overconfident error") is pushed down harder.
    c_i is the sequence-level log-ratio (the paper's log π_θ(y|x)/π_ref(y|x)), taken from the rollout
    policy's ℓ° once per rollout, so the transformed advantage is a constant of the update.
    Shapes: seq_adv [B], mask/old_logp/ref_logp [B,T] -> [B] (dtype of seq_adv).
    """
    if old_logp is None or ref_logp is None:
        raise ValueError("ace needs old_logp and ref_logp (the reference model's log-probs)")
    c = confidence_shift(old_logp, ref_logp, mask)  # [B]
    a = to_f32(seq_adv)  # [B]
    scale = 1.0 + alpha * F.softplus(c.to(a.dtype))  # [B] >= 1
    return torch.where(a < 0, a * scale, a)  # [B]


# ---------------------------------------------------------------------------- APO / DADS (View-R1)

def group_accuracy(correct: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """d_g = (correct valid members) / (valid members) of each row's group, broadcast: [B] -> [B] f32
    (0 for a group with no valid member)."""
    seg, s = dense_group_ids(group_ids)  # [B], S
    ok = (correct.bool() & valid.bool()).float()  # [B]
    n = segment_sum(valid.bool().float(), seg, s).clamp(min=1.0)  # [S]
    return (segment_sum(ok, seg, s) / n)[seg]  # [B]


@KL_WEIGHTS.register("constant", ignores=("e",))
def constant_kl_weight(seq_adv: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                       *, beta: float, e: float = math.e) -> torch.Tensor:
    """β on every sequence: GRPO's KL-in-loss weight.

    Shapes: seq_adv, correct, valid, group_ids [B] -> [B] f32.
    """
    return torch.full(seq_adv.shape, float(beta), dtype=torch.float32, device=seq_adv.device)  # [B]


@KL_WEIGHTS.register("apo")
def apo_kl_weight(seq_adv: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                  *, beta: float, e: float = math.e) -> torch.Tensor:
    """APO / DADS: β_i = β·(1 − exp(−e·(1 − d))) for positive (correct) samples, β for the others.

    View-R1's difficulty-aware KL weight (SPEC 11): d = the group's accuracy, so a correct answer to an easy
    prompt (d -> 1) is released from the KL, one to a hard prompt keeps most of it. `e` defaults to Euler's
    number, as SPEC writes the rule. Shapes: seq_adv, correct, valid, group_ids [B] -> [B] f32.
    """
    d = group_accuracy(correct, valid, group_ids)  # [B]
    pos = correct.bool() & valid.bool()  # [B]
    w = beta * (1.0 - torch.exp(-e * (1.0 - d)))  # [B]
    return torch.where(pos, w, torch.full_like(w, float(beta))).float()  # [B]


# ---------------------------------------------------------------------------- GRPO-λ (arXiv 2505.18086)

def grpo_lambda_penalty(lengths: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                        *, frac: float, alpha: float) -> torch.Tensor:
    """GRPO-λ's length penalty: α·σ((L_i − mean_c L)/std_c L) on the correct members of the top ⌈λ·S⌉ groups
    by accuracy, 0 elsewhere. The shaped reward is R_i − penalty_i (1 − α·σ(z) for a 0/1 reward).

    Groups are ranked by accuracy over valid members, ties broken by ascending group id (the batch order).
    mean_c and std_c (population) are over the group's correct members; std_c = 0 gives z = 0.
    Shapes: lengths, correct, valid, group_ids [B] -> [B] f64 (float64 for the statistics: exact twins).
    """
    L = lengths.double()  # [B]
    seg, s = dense_group_ids(group_ids)  # [B], S; dense order = ascending group id
    if s == 0:
        return torch.zeros_like(L)
    acc = segment_sum((correct.bool() & valid.bool()).double(), seg, s) / segment_sum(valid.bool().double(), seg, s).clamp(min=1.0)  # [S]
    k = min(max(math.ceil(frac * s - TOP_FRACTION_SLACK), 1), s)
    order = torch.sort(-acc, stable=True).indices  # [S] highest accuracy first, ties by group id
    top = torch.zeros(s, dtype=torch.bool, device=L.device)  # [S]
    top[order[:k]] = True
    ok = correct.bool() & valid.bool()  # [B]
    okf = ok.double()  # [B]
    n_c = segment_sum(okf, seg, s)  # [S]
    mean_c = segment_sum(L * okf, seg, s) / n_c.clamp(min=1.0)  # [S]
    var_c = segment_sum((L - mean_c[seg]).square() * okf, seg, s) / n_c.clamp(min=1.0)  # [S] population
    sd = var_c.sqrt()[seg]  # [B]
    z = torch.where(sd > 0, (L - mean_c[seg]) / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(L))  # [B]
    return torch.where(top[seg] & ok, alpha * torch.sigmoid(z), torch.zeros_like(L))  # [B]


# ---------------------------------------------------------------------------- DOT (arXiv 2601.03969)

def dot_cut_lengths(lengths: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                    *, std_mult: float = 3.0, margin: int = 32) -> torch.Tensor:
    """Dynamic Outlier Truncation: the new response length of each row ([B] int64; unchanged where not cut).

    In a group whose members are all valid and correct, T = floor(mean L + std_mult·std L) (unbiased std,
    0 for a singleton, as the official code's `statistics.stdev`), and a member with L − T ≥ margin is cut
    to T tokens. Other groups are untouched. Shapes: [B] each -> [B] int64.
    """
    L = lengths.long()  # [B]
    Lf = L.double()  # [B]
    seg, s = dense_group_ids(group_ids)  # [B], S
    if s == 0:
        return L.clone()
    bad = (~(correct.bool() & valid.bool())).double()  # [B]
    all_ok = segment_sum(bad, seg, s) == 0  # [S]
    n = segment_sum(torch.ones_like(Lf), seg, s)  # [S]
    mean = segment_sum(Lf, seg, s) / n  # [S]
    var = segment_sum((Lf - mean[seg]).square(), seg, s) / (n - 1.0).clamp(min=1.0)  # [S] unbiased
    cut_at = torch.floor(mean + std_mult * var.sqrt()).long()[seg]  # [B] T(q)
    cut = all_ok[seg] & (L - cut_at >= margin)  # [B]
    return torch.where(cut, cut_at, L)  # [B]


# ---------------------------------------------------------------------------- DLER (arXiv 2510.15110)

def truncation_penalized(lengths: torch.Tensor, truncated: torch.Tensor, *, cap: int) -> torch.Tensor:
    """DLER's truncation penalty: which rows get reward 0, [B] bool. A row is penalised when it did not
    finish (hit the generation limit without EOS) or, with cap > 0, when it is longer than `cap` tokens."""
    over = lengths.long() > cap if cap > 0 else torch.zeros_like(truncated, dtype=torch.bool)  # [B]
    return truncated.bool() | over  # [B]
