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
    logits = out.logits[:, -(response_len + 1) : -1]  # [B, T, V]: position j predicts token j+1
    return _response_logprobs(logits, input_ids, attention_mask, response_len, temperature=temperature,
                              return_entropy=return_entropy, entropy_grad=entropy_grad)


def _response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
    temperature: float, return_entropy: bool, entropy_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """From the logits [B, T, V] that predict the last T tokens: their float32 log-probs at `temperature`
    (0 where masked) and, optionally, the entropies (without grad unless `entropy_grad`)."""
    logits = logits.float()  # [B, T, V]
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


# ---------------------------------------------------------------------------- shared-prompt packing

def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> list[tuple[int, int]]:
    """Runs of consecutive rows with the same (left-padded) prompt: [(first row, count), ...]."""
    P = input_ids.shape[1] - response_len
    key = torch.where(attention_mask[:, :P].bool(), input_ids[:, :P], -1)  # [B, P]
    same = (key[1:] == key[:-1]).all(dim=1).tolist() if len(key) > 1 else []  # [B-1]
    runs: list[tuple[int, int]] = [(0, 1)]
    for i, s in enumerate(same, start=1):
        runs[-1:] = [(runs[-1][0], runs[-1][1] + 1)] if s else [runs[-1], (i, 1)]
    return runs


#: Longest packed sequence (prompt + M responses): the dense block mask and attention scores grow with Q^2.
MAX_PACKED_LEN = 8192


def attention_width_ratio(model: torch.nn.Module) -> float:
    """R: how many attended keys cost as much as one token's pass through a layer's linear maps
    (multiply-adds per token ~ layer weights; per key ~ 2 x heads x head_dim). 1024 without a Llama-like config."""
    cfg = getattr(model, "config", None)
    try:
        d, ff = cfg.hidden_size, cfg.intermediate_size
        h = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or d // h
        kv = getattr(cfg, "num_key_value_heads", None) or h
        return (2 * d * h * hd + 2 * d * kv * hd + 3 * d * ff) / (2 * h * hd)
    except (AttributeError, TypeError, ZeroDivisionError):
        return 1024.0


def packing_pays(groups: list[tuple[int, int]], prompt_len: int, response_len: int, *, ratio: float = 1024.0) -> bool:
    """Pack only when some prompt is shared and the packed cost is lower. Cost of a sequence of L tokens that
    each attend to L keys (a dense block mask attends to all): L x (R + L), R = `attention_width_ratio`.
    Packed: n groups of Q = P + M*T tokens; unpacked: B rows of P + T. Long responses in big groups stay
    unpacked (their saved prompt tokens are few and the packed attention grows with M^2)."""
    n, b, m = len(groups), sum(c for _, c in groups), max(c for _, c in groups)
    q, length = prompt_len + m * response_len, prompt_len + response_len
    return n < b and q <= MAX_PACKED_LEN and n * q * (ratio + q) < b * length * (ratio + length)


def packed_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, groups: list[tuple[int, int]],
    pad_id: int, mask_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay each group out as one sequence: its prompt once, then its M responses side by side.

    Returns ``(ids [n, Q], position_ids [n, Q], mask4d [n, 1, Q, Q], keep [K], rows [B, T] index into the
    kept positions)``, Q = P + M*T, K = 1 + M*(T-1). A response token sees its prompt's real tokens and the
    earlier tokens of its own response, at the positions it has in the unpacked sequence, so its logits
    equal the unpacked ones. ``mask4d`` is bool (True = attend) or, with ``mask_dtype``, additive.
    """
    B, L = input_ids.shape
    T, P = response_len, L - response_len
    n, M = len(groups), max(c for _, c in groups)
    dev = input_ids.device
    Q = P + M * T
    first = torch.tensor([s for s, _ in groups], device=dev)  # [n]
    counts = torch.tensor([c for _, c in groups], device=dev)  # [n]
    slot = torch.arange(M, device=dev)  # [M]
    row_of = (first[:, None] + slot[None, :]).clamp(max=B - 1)  # [n, M]: the batch row in each slot
    real_slot = slot[None, :] < counts[:, None]  # [n, M]
    prompt_mask = attention_mask[first, :P].bool()  # [n, P]
    resp = input_ids[row_of, P:]  # [n, M, T]
    resp_mask = attention_mask[row_of, P:].bool() & real_slot[..., None]  # [n, M, T]
    ids = torch.cat([input_ids[first, :P], torch.where(resp_mask, resp, pad_id).reshape(n, M * T)], dim=1)  # [n, Q]
    plen = prompt_mask.sum(1)  # [n]
    prompt_pos = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)  # [n, P]
    resp_pos = plen[:, None, None] + torch.arange(T, device=dev)[None, None, :]  # [n, 1, T]
    pos = torch.cat([prompt_pos, resp_pos.expand(n, M, T).reshape(n, M * T)], dim=1)  # [n, Q]
    # block id (-1 prompt, j response slot) and offset of every packed position
    block = torch.cat([torch.full((P,), -1, device=dev), slot.repeat_interleave(T)])  # [Q]
    offset = torch.cat([torch.arange(P, device=dev), torch.arange(T, device=dev).repeat(M)])  # [Q]
    q_blk, k_blk = block[:, None], block[None, :]  # [Q, 1], [1, Q]
    earlier = offset[None, :] <= offset[:, None]  # [Q, Q]
    to_prompt = (k_blk == -1) & ((q_blk >= 0) | earlier)  # [Q, Q]
    own = (k_blk == q_blk) & (q_blk >= 0) & earlier  # [Q, Q]
    key_real = torch.cat([prompt_mask, torch.ones(n, M * T, dtype=torch.bool, device=dev)], dim=1)  # [n, Q]
    allowed = ((to_prompt[None] & key_real[:, None, :]) | own[None]) | torch.eye(Q, dtype=torch.bool, device=dev)[None]  # [n, Q, Q]
    mask4d = allowed[:, None]  # [n, 1, Q, Q]
    if mask_dtype is not None:
        mask4d = torch.zeros(mask4d.shape, dtype=mask_dtype, device=dev).masked_fill(~mask4d, torch.finfo(mask_dtype).min)
    keep = torch.cat([torch.tensor([P - 1], device=dev),
                      (P + slot[:, None] * T + torch.arange(T - 1, device=dev)[None, :]).reshape(-1)])  # [K]
    # kept-position index of each (slot, token): token 0 from the prompt's last position, token k from k-1
    tok = torch.arange(T, device=dev)  # [T]
    slot_idx = torch.where(tok[None, :] == 0, 0, 1 + slot[:, None] * (T - 1) + tok[None, :] - 1)  # [M, T]
    slot_of_row = torch.cat([torch.arange(c, device=dev) for _, c in groups])  # [B]
    rows = slot_idx[slot_of_row]  # [B, T]
    return ids, pos, mask4d, keep, rows


def packed_token_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
    temperature: float = 1.0, return_entropy: bool = False, pad_id: int = 0,
    groups: list[tuple[int, int]] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` with each group's shared prompt run once (one packed sequence per group, a block
    attention mask); same inputs, same outputs (to float rounding), fewer tokens through the model.

    Rows sharing a prompt must be consecutive (a GRPO batch is). Needs a model that takes a 4D attention
    mask and a tensor ``logits_to_keep`` (Hugging Face Llama-family models with sdpa or eager attention).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}; use 1.0 for greedy rollouts")
    groups = groups or prompt_groups(input_ids, attention_mask, response_len)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    mask_dtype = None if impl == "sdpa" else next(model.parameters()).dtype
    ids, pos, mask4d, keep, rows = packed_inputs(input_ids, attention_mask, response_len, groups, pad_id, mask_dtype)
    out = model(input_ids=ids, attention_mask=mask4d, position_ids=pos, use_cache=False, logits_to_keep=keep)
    group_of_row = torch.cat([torch.full((c,), g, device=ids.device) for g, (_, c) in enumerate(groups)])  # [B]
    sel = out.logits[group_of_row[:, None], rows]  # [B, T, V]: each row's predicting positions
    return _response_logprobs(sel, input_ids, attention_mask, response_len, temperature=temperature,
                              return_entropy=return_entropy)


def score_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
    temperature: float = 1.0, return_entropy: bool = False, pack: bool = True, pad_id: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The trainer's scoring call: packed (`packed_token_logprobs`) where prompts are shared and packing
    pays (`packing_pays`), else `token_logprobs`. Same contract as `token_logprobs`."""
    if pack and accepts_logits_to_keep(model) and input_ids.shape[1] > response_len:
        groups = prompt_groups(input_ids, attention_mask, response_len)
        if packing_pays(groups, input_ids.shape[1] - response_len, response_len, ratio=attention_width_ratio(model)):
            return packed_token_logprobs(model, input_ids, attention_mask, response_len, temperature=temperature,
                                         return_entropy=return_entropy, pad_id=pad_id, groups=groups)
    return token_logprobs(model, input_ids, attention_mask, response_len, temperature=temperature,
                          return_entropy=return_entropy)
