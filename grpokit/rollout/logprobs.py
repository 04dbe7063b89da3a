"""Teacher-forced log-probs of response tokens: the trainer's policy / old-policy / reference scoring.

Shapes: B sequences, P prompt positions, T response positions, V vocabulary.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] int64 position ids that count only real tokens (left padding gets position 0).

    Matches the sampler, so a response token has the same position when sampled and when scored.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, L]


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (explicitly or through ``**kwargs``, as PEFT and
    ``torch.compile`` wrappers do). Without it, callers compute all logits and slice."""
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the last ``response_len`` tokens of each row under ``model``, teacher-forced.

    Args:
        model: a causal LM (plain, PEFT- or FSDP-wrapped: only its own ``forward`` is called).
        input_ids: [B, P+T] int64, prompt then response (``Rollout.input_ids()``).
        attention_mask: [B, P+T] bool/int, False on left and right padding (``Rollout.attention_mask()``).
        response_len: T, the number of trailing positions to score (``Rollout.response_ids.shape[1]``).
        temperature: the logits are divided by it, as in the sampler (must be > 0; use 1 for greedy
            rollouts).
        return_entropy: also return the per-token entropy of that distribution.
        entropy_grad: keep the entropy in the autograd graph (for an entropy bonus); by default it is
            computed without grad (a metric), which saves a [B, T, V] activation.

    Returns:
        ``logp`` [B, T] float32, 0 where ``attention_mask`` is False, with grad when grad is enabled;
        with ``return_entropy``, ``(logp, entropy [B, T] float32)``.

    Only the logits of the T positions that predict the response are computed (``logits_to_keep=T+1``),
    so the [B, P+T, V] logits of the prompt never exist; the log-softmax is taken in float32 (also under
    bf16 autocast). Call it inside `grpokit.models.autocast_context` for mixed precision.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}; use 1.0 for greedy rollouts")
    total = input_ids.shape[1]
    if not 0 < response_len < total:
        raise ValueError(
            f"response_len must be in [1, {total - 1}] for sequences of length {total}, got {response_len}"
        )
    keep = {"logits_to_keep": response_len + 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,  # [B, P+T]
        attention_mask=attention_mask,  # [B, P+T]
        position_ids=position_ids_from_mask(attention_mask),  # [B, P+T]
        use_cache=False,
        **keep,
    )
    logits = out.logits[:, -(response_len + 1) : -1].float()  # [B, T, V]: position j predicts token j+1
    if temperature != 1.0:
        logits = logits / temperature  # [B, T, V]
    targets = input_ids[:, -response_len:]  # [B, T]
    mask = attention_mask[:, -response_len:].bool()  # [B, T]
    lse = logits.logsumexp(dim=-1)  # [B, T]
    logp = (logits.gather(-1, targets[..., None]).squeeze(-1) - lse) * mask  # [B, T]
    if not return_entropy:
        return logp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        probs = (logits - lse[..., None]).exp()  # [B, T, V]
        entropy = (lse - (probs * logits).sum(dim=-1)) * mask  # [B, T]
    return logp, entropy
