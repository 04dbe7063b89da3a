"""Reduce per-token losses to the scalar an optimizer step minimises (SPEC section 3).

Every aggregation has the one registry signature

    fn(per_tok[B,T], mask[B,T], *, num_tokens, num_seqs, norm_const) -> scalar

(each accepts all three counts and ignores those it does not use). The counts are GLOBAL: summed over
every micro-batch of the optimizer step and every data-parallel rank (computed by `grpokit.dist`).
Each function is a sum over rows divided by a global constant, so it is additive over any split of
the batch into row subsets: Σ_micro fn(micro) = fn(full batch), and the accumulated gradient does
not depend on micro-batching or the number of ranks (the bug of verl PRs #906/#3332 and TRL's
`loss_type` confusion was dividing by local counts). A count of 0 (an all-masked step) is clamped
to MIN_COUNT, giving 0 rather than NaN.

Counts may be Python numbers or 0-d tensors (the result of an all-reduce); no host sync either way.
Ranks: with global counts each rank's loss is its share of the global mean, so rank gradients must
be SUMMED; under DDP/FSDP, whose all-reduce AVERAGES, multiply the loss by the world size.
"""
from __future__ import annotations

import torch

from grpokit.algo.constants import MIN_COUNT
from grpokit.algo.registry import Registry

__all__ = [
    "AGGREGATIONS",
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
]

AGGREGATIONS = Registry("aggregation")

Count = int | float | torch.Tensor


def _count(n: Count | None, name: str) -> Count:
    """Clamp a global count to ≥ MIN_COUNT; fail loudly if a required count is missing."""
    if n is None:
        raise ValueError(f"this aggregation needs the global `{name}` (whole optimizer step, all ranks)")
    if isinstance(n, torch.Tensor):
        return n.clamp(min=MIN_COUNT)
    return max(n, MIN_COUNT)


def _masked_row_sums(per_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t m·x per row: [B,T] -> [B] (where, so padded garbage cannot leak in)."""
    return torch.where(mask, per_tok, torch.zeros_like(per_tok)).sum(-1)  # [B]


@AGGREGATIONS.register("token_mean")
def token_mean(
    per_tok: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_tokens: Count,
    num_seqs: Count | None = None,
    norm_const: float | None = None,
) -> torch.Tensor:
    """Token mean: Σ_{i,t} m·x / N_tok, N_tok global (DAPO arXiv 2503.14476, FIPO; the default).

    Every token weighs the same, so long responses are not down-weighted (DAPO's fix of GRPO's
    per-sequence mean). Shapes: per_tok [B,T], mask [B,T] bool -> [].
    """
    return _masked_row_sums(per_tok, mask).sum() / _count(num_tokens, "num_tokens")  # []


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(
    per_tok: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count,
    norm_const: float | None = None,
) -> torch.Tensor:
    """Sequence mean of token means: (1/N_seq) Σ_i Σ_t m·x / L_i (original GRPO, GSPO).

    DeepSeekMath arXiv 2402.03300; GSPO arXiv 2507.18071. L_i is the row's own length (a local
    quantity, so this stays additive over row splits); an empty row contributes 0.
    Shapes: per_tok [B,T], mask [B,T] bool -> [].
    """
    length = mask.sum(-1).clamp(min=1).to(per_tok.dtype)  # [B]
    return (_masked_row_sums(per_tok, mask) / length).sum() / _count(num_seqs, "num_seqs")  # []


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(
    per_tok: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count,
    norm_const: float | None = None,
) -> torch.Tensor:
    """Sequence mean of token sums: (1/N_seq) Σ_i Σ_t m·x.

    The sequence-level objective without length normalisation (longer responses weigh more).
    Shapes: per_tok [B,T], mask [B,T] bool -> [].
    """
    return _masked_row_sums(per_tok, mask).sum() / _count(num_seqs, "num_seqs")  # []


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    per_tok: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count,
    norm_const: float,
) -> torch.Tensor:
    """Dr. GRPO: Σ_i Σ_t m·x / (N_seq · C), C a constant (usually max_new_tokens).

    arXiv 2503.20783: a constant normaliser removes GRPO's length bias (per-sequence 1/L_i makes
    short wrong answers cost more than long ones). Shapes: per_tok [B,T], mask [B,T] bool -> [].
    """
    if norm_const is None or not norm_const > 0:
        raise ValueError(f"seq_mean_token_sum_norm needs norm_const > 0 (e.g. max_new_tokens), got {norm_const}")
    denom = _count(num_seqs, "num_seqs") * norm_const
    return _masked_row_sums(per_tok, mask).sum() / denom  # []
