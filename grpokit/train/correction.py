"""Rollout correction in the trainer (SPEC 12): which mode a run uses, and each micro-batch's weights.

Three log-prob streams: μ (the engine's, `Rollout.logprobs`), ℓ° (the trainer's at the sampling weights,
`Batch.old_logp`) and ℓ (current). The modes:

- 'none': the loss sees ℓ and ℓ° only (right when the engine's μ equals ℓ° to rounding: hf in fp32);
- a decoupled mode (`grpokit.algo.correction.CORRECTIONS`): ratio exp(ℓ − ℓ°), and the per-token policy
  loss is multiplied by the stop-gradient weight w(ℓ° − μ) (truncated IS or a rejection mask);
- 'bypass': no ℓ° pass at all, ℓ° := μ (ratio exp(ℓ − μ)); also skips the recomputation that
  train.updates_per_rollout > 1 or a credit reading ℓ° would otherwise need.

With rollout.async_rollouts, 'auto' is always `AUTO_MODE` (μ lags the trainer by an update). Otherwise
'auto' resolves per engine: an engine whose log-probs can differ from the trainer's gets `AUTO_MODE`. An
engine says it reports the trainer's own log-probs with a true `exact_logprobs` attribute (the hf engine
in fp32); an engine without the attribute (vLLM, a server) is taken as inexact.
"""
from __future__ import annotations

from typing import Any

import torch

from grpokit.algo.correction import CORRECTIONS

#: The mode 'auto' turns on: token-level TIS (C = 2) keeps every sample and bounds each token's weight.
#: Sequence-level weights multiply T per-token ratios: at the ~0.3 nats per token measured under bf16
#: (SPEC 12), exp(Σ) leaves [1/3, 3] within a few tokens, so seq_mask would drop most long responses.
AUTO_MODE = "token_tis"


def engine_is_exact(engine: Any) -> bool:
    """Whether the engine reports the trainer's own log-probs (to float rounding): its `exact_logprobs`."""
    return bool(getattr(engine, "exact_logprobs", False))


def resolve_mode(cfg: Any, engine: Any) -> str:
    """rollout.correction with 'auto' resolved: 'none', 'bypass' or a registered decoupled mode."""
    mode = cfg.rollout.correction
    if mode != "auto":
        return mode
    if cfg.rollout.async_rollouts:  # μ is one update old (grpokit.train.async_rollout)
        return AUTO_MODE
    return "none" if engine_is_exact(engine) else AUTO_MODE


def is_bypass(cfg: Any) -> bool:
    """Bypass mode: ℓ° := μ, no log-prob pass before the update ('auto' never picks it)."""
    return cfg.rollout.correction == "bypass"


def weighted(mode: str) -> bool:
    """Whether `mode` multiplies the loss by a weight (a decoupled mode)."""
    return mode in CORRECTIONS


def hparams(cfg: Any) -> dict[str, float]:
    """The bounds the user set (unset ones are left to the mode's defaults)."""
    r = cfg.rollout
    return {kw: v for kw, v in (("low", r.correction_low), ("high", r.correction_high)) if v is not None}


def correction_weights(mode: str, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       cfg: Any, stats: Any) -> torch.Tensor:
    """The stop-gradient weight w [b, T'] of one micro-batch (ℓ° `old_logp`, μ `rollout_logp`, loss `mask`,
    all [b, T']), with its statistics added to `stats` (a StatSums; summed over micro-batches and ranks):
    correction/weight/mean|min|max over loss tokens, correction/masked_tokens|truncated_tokens (token
    fractions) and correction/masked_seqs|truncated_seqs (fractions of rows with a loss token that had
    any token masked / truncated)."""
    mask = mask.bool()
    d = old_logp.detach().float() - rollout_logp.detach().float()  # [b, T'] ℓ° − μ
    w, masked, truncated = CORRECTIONS.call_strict(mode, d, mask, **hparams(cfg))
    fm = mask.float()  # [b, T']
    stats.add("correction/weight/mean", w, fm)
    stats.add_extreme("correction/weight", w, mask)
    stats.add("correction/masked_tokens", masked.float(), fm)
    stats.add("correction/truncated_tokens", truncated.float(), fm)
    rows = mask.any(-1).float()  # [b]
    stats.add("correction/masked_seqs", masked.any(-1).float(), rows)
    stats.add("correction/truncated_seqs", truncated.any(-1).float(), rows)
    return w.detach()
