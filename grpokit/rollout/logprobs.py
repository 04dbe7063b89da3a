"""Teacher-forced log-probs of response tokens: the trainer's policy / old-policy / reference scoring.

Shapes: B sequences, P prompt positions, T response positions, V vocabulary, H hidden size, N scored
(unmasked) response tokens, C vocabulary entries per chunk.

The log-softmax runs over vocabulary chunks (`ChunkedLogprob`, a selective log-softmax): the model's output
head is given the last hidden states [N, H] of the positions that predict response tokens, and the float32
log-probs and entropies come out of an online logsumexp over C-wide slices of the head, so no [B, T, V]
tensor is ever made, in the forward or the backward pass (peak O(N*C) instead of O(N*V)).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

#: Vocabulary entries per chunk of the chunked log-softmax (`ChunkedLogprob`): the scorer's largest temporary
#: is [N, VOCAB_CHUNK] float32. 0 materialises the full [B, T, V] float32 logits instead (the unchunked path).
VOCAB_CHUNK = 4096

#: Attention backends that honour a 4-D (block) attention mask; prompt packing runs only on these.
#: flash_attention_2/3 and flex_attention ignore or rebuild such a mask, so a packed row would attend across
#: sequences and score silently wrong.
BLOCK_MASK_ATTENTION = ("sdpa", "eager")


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
    vocab_chunk: int = VOCAB_CHUNK,
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
            computed without grad (a metric).
        vocab_chunk: vocabulary entries per chunk of the log-softmax (`ChunkedLogprob`); 0 computes the full
            [B, T, V] float32 logits instead. Models whose output head is not a plain linear map of the last
            hidden state (logit soft-capping, a LoRA-adapted head, ...) take the full path automatically.

    Returns:
        ``logp`` [B, T] float32, 0 where ``attention_mask`` is False, with grad when grad is enabled;
        with ``return_entropy``, ``(logp, entropy [B, T] float32)``.

    Only the T positions that predict the response reach the output head (``logits_to_keep=T+1``), so the
    [B, P+T, V] logits of the prompt never exist, and with ``vocab_chunk`` > 0 neither do the [B, T, V] ones;
    the log-softmax is taken in float32 (also under bf16 autocast, whose bf16 head logits it reproduces).
    Call it inside `grpokit.models.autocast_context` for mixed precision.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}; use 1.0 for greedy rollouts")
    if vocab_chunk < 0:
        raise ValueError(f"vocab_chunk must be >= 0 (0 = full logits), got {vocab_chunk}; the default is {VOCAB_CHUNK}")
    total = input_ids.shape[1]
    if not 0 < response_len < total:
        raise ValueError(
            f"response_len must be in [1, {total - 1}] for sequences of length {total}, got {response_len}"
        )
    keep = {"logits_to_keep": response_len + 1} if accepts_logits_to_keep(model) else {}
    call = dict(
        input_ids=input_ids,  # [B, P+T]
        attention_mask=attention_mask,  # [B, P+T]
        position_ids=position_ids_from_mask(attention_mask),  # [B, P+T]
        use_cache=False,
        **keep,
    )
    predictors = lambda x: x[:, -(response_len + 1) : -1]  # noqa: E731  [B, T, *]: position j predicts token j+1
    if vocab_chunk > 0:
        scored = _chunked_scores(model, call, predictors, input_ids, attention_mask, response_len,
                                 temperature=temperature, entropy_grad=entropy_grad, vocab_chunk=vocab_chunk)
        if scored is not None:
            return scored if return_entropy else scored[0]
    logits = predictors(model(**call).logits)  # [B, T, V]
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
    temperature: float = 1.0, return_entropy: bool = False, entropy_grad: bool = False, pad_id: int = 0,
    groups: list[tuple[int, int]] | None = None, vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` with each group's shared prompt run once (one packed sequence per group, a block
    attention mask); same inputs, same outputs (to float rounding), fewer tokens through the model.

    Rows sharing a prompt must be consecutive (a GRPO batch is). Needs a model that takes a 4D attention
    mask and a tensor ``logits_to_keep``, with an attention backend that honours the mask
    (`BLOCK_MASK_ATTENTION`: Hugging Face Llama-family models with sdpa or eager attention).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}; use 1.0 for greedy rollouts")
    impl = attention_implementation(model)
    if impl not in BLOCK_MASK_ATTENTION:
        raise ValueError(
            "prompt packing needs an attention backend that honours a 4-D block mask "
            f"({', '.join(BLOCK_MASK_ATTENTION)}); "
            f"this model uses {impl!r}, which would attend across the packed sequences. Call score_logprobs (it falls "
            "back to unpacked scoring) or set train.pack_prompts = false"
        )
    groups = groups or prompt_groups(input_ids, attention_mask, response_len)
    mask_dtype = None if impl == "sdpa" else next(model.parameters()).dtype
    ids, pos, mask4d, keep, rows = packed_inputs(input_ids, attention_mask, response_len, groups, pad_id, mask_dtype)
    call = dict(input_ids=ids, attention_mask=mask4d, position_ids=pos, use_cache=False, logits_to_keep=keep)
    group_of_row = torch.cat([torch.full((c,), g, device=ids.device) for g, (_, c) in enumerate(groups)])  # [B]
    predictors = lambda x: x[group_of_row[:, None], rows]  # noqa: E731  [B, T, *]: each row's predicting positions
    if vocab_chunk > 0:
        scored = _chunked_scores(model, call, predictors, input_ids, attention_mask, response_len,
                                 temperature=temperature, entropy_grad=entropy_grad, vocab_chunk=vocab_chunk)
        if scored is not None:
            return scored if return_entropy else scored[0]
    sel = predictors(model(**call).logits)  # [B, T, V]
    return _response_logprobs(sel, input_ids, attention_mask, response_len, temperature=temperature,
                              return_entropy=return_entropy, entropy_grad=entropy_grad)


def score_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
    temperature: float = 1.0, return_entropy: bool = False, entropy_grad: bool = False, pack: bool = True,
    pad_id: int = 0, vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The trainer's scoring call: packed (`packed_token_logprobs`) where prompts are shared, packing pays
    (`packing_pays`) and the attention backend honours a block mask (`BLOCK_MASK_ATTENTION`), else
    `token_logprobs`. Same contract as `token_logprobs`; both use the chunked log-softmax (``vocab_chunk``)."""
    opts = dict(temperature=temperature, return_entropy=return_entropy, entropy_grad=entropy_grad,
                vocab_chunk=vocab_chunk)
    if (pack and accepts_logits_to_keep(model) and input_ids.shape[1] > response_len
            and attention_implementation(model) in BLOCK_MASK_ATTENTION):
        groups = prompt_groups(input_ids, attention_mask, response_len)
        if packing_pays(groups, input_ids.shape[1] - response_len, response_len, ratio=attention_width_ratio(model)):
            return packed_token_logprobs(model, input_ids, attention_mask, response_len, pad_id=pad_id, groups=groups,
                                         **opts)
    return token_logprobs(model, input_ids, attention_mask, response_len, **opts)


def _unwrapped(model: Any) -> list[Any]:
    """``model`` and what it wraps: DDP's ``.module``, a reference wrapper's ``.model`` (at most 4 levels)."""
    chain = [model]
    while len(chain) < 4:
        m = chain[-1]
        inner = getattr(m, "module", None) if isinstance(m, torch.nn.Module) else getattr(m, "model", None)
        if not isinstance(inner, torch.nn.Module) or inner is m:
            break
        chain.append(inner)
    return chain


def attention_implementation(model: Any) -> str | None:
    """``config._attn_implementation`` of ``model`` (plain, PEFT, DDP or a reference wrapper), else None."""
    for m in _unwrapped(model):
        cfg = getattr(m, "config", None)
        if cfg is not None:
            return getattr(cfg, "_attn_implementation", None)
    return None


# ---------------------------------------------------------------------------- chunked log-softmax

class ChunkedLogprob(torch.autograd.Function):
    """log p(target) and entropy of softmax((hidden @ weight.T + bias) / temperature), over vocabulary chunks.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N] int64, temperature, chunk, entropy_grad)
    -> (logp [N] float32, entropy [N] float32)``. The forward keeps an online logsumexp (and the running
    sum of p*z for the entropy) over C-wide slices of the vocabulary in float32; the backward recomputes
    each slice's logits and forms d logp/d logits = (onehot - p) / temperature (plus, with ``entropy_grad``,
    dH/d logits = -p (log p + H) / temperature), so no tensor larger than [N, C] ([V, H] for the weight's
    gradient) is made. The logits are computed by ``F.linear`` under the caller's autocast state, as the
    model's own head would, so bf16 autocast gives the same rounded logits as the unchunked path.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, chunk: int, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = hidden.shape[0], weight.shape[0]
        device_type = hidden.device.type
        ctx.autocast = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)
        m = hidden.new_full((N,), float("-inf"), dtype=torch.float32)  # [N] running max of z
        s = hidden.new_zeros(N, dtype=torch.float32)  # [N] running sum of exp(z - m)
        sz = hidden.new_zeros(N, dtype=torch.float32)  # [N] running sum of exp(z - m) * z
        zt = hidden.new_zeros(N, dtype=torch.float32)  # [N] the target's z
        for start in range(0, V, chunk):
            end = min(start + chunk, V)
            z = _chunk_logits(hidden, weight, bias, start, end, temperature)  # [N, C]
            m_new = torch.maximum(m, z.amax(dim=-1))  # [N]
            rescale = torch.exp(m - m_new)  # [N]
            e = torch.exp(z - m_new[:, None])  # [N, C]
            s = s * rescale + e.sum(dim=-1)  # [N]
            sz = sz * rescale + (e * z).sum(dim=-1)  # [N]
            m = m_new
            inside = (targets >= start) & (targets < end)  # [N]
            picked = z.gather(1, (targets - start).clamp(0, end - start - 1)[:, None]).squeeze(1)  # [N]
            zt = torch.where(inside, picked, zt)  # [N]
        lse = m + s.log()  # [N]
        logp = zt - lse  # [N]
        entropy = lse - sz / s  # [N]: H = lse - sum p z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        tau, chunk = ctx.temperature, ctx.chunk
        cdt = ctx.autocast or torch.promote_types(hidden.dtype, weight.dtype)  # the dtype the head's matmul ran in
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        g_logp = hidden.new_zeros(N, dtype=torch.float32) if g_logp is None else g_logp.float()  # [N]
        grad_h = hidden.new_zeros(hidden.shape, dtype=torch.float32) if want_h else None  # [N, H]
        grad_w = torch.zeros_like(weight) if want_w else None  # [V, H]
        grad_b = torch.zeros_like(bias) if want_b else None  # [V]
        h_c = hidden.to(cdt)  # [N, H]
        rows = torch.arange(N, device=hidden.device)  # [N]
        for start in range(0, V, chunk):
            end = min(start + chunk, V)
            with torch.autocast(hidden.device.type, dtype=ctx.autocast or torch.bfloat16,
                                enabled=ctx.autocast is not None):  # the forward's autocast state: the same logits
                z = _chunk_logits(hidden, weight, bias, start, end, tau)  # [N, C]
            p = torch.exp(z - lse[:, None])  # [N, C]
            dz = -p * g_logp[:, None]  # [N, C]: d logp / dz = onehot - p
            inside = (targets >= start) & (targets < end)  # [N]
            cols = (targets - start).clamp(0, end - start - 1)  # [N]
            dz[rows, cols] += torch.where(inside, g_logp, 0.0)  # [N, C]: one entry per row, no index repeats
            if g_ent is not None:
                dz -= p * ((z - lse[:, None]) + entropy[:, None]) * g_ent.float()[:, None]  # [N, C]: dH/dz
            dl = (dz / tau if tau != 1.0 else dz).to(cdt)  # [N, C]: d/d logits
            if want_h:
                grad_h += (dl @ weight[start:end].to(cdt)).float()  # [N, H]
            if want_w:
                grad_w[start:end] = (dl.T @ h_c).to(weight.dtype)  # [C, H]
            if want_b:
                grad_b[start:end] = dl.float().sum(dim=0).to(bias.dtype)  # [C]
        return (grad_h.to(hidden.dtype) if want_h else None), grad_w, grad_b, None, None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, end: int,
                  temperature: float) -> torch.Tensor:
    """float32 logits of vocabulary entries [start, end) divided by the temperature: [N, C]."""
    z = F.linear(hidden, weight[start:end], None if bias is None else bias[start:end]).float()  # [N, C]
    return z / temperature if temperature != 1.0 else z  # [N, C]


def output_head(model: Any) -> torch.nn.Linear | None:
    """The model's output projection when it is a plain ``nn.Linear`` (``get_output_embeddings()``, through
    PEFT, DDP and reference wrappers), else None (a LoRA-adapted or quantized head, a compiled model, ...)."""
    for m in _unwrapped(model):
        if hasattr(m, "_orig_mod"):  # torch.compile: do not patch inside a compiled graph
            return None
        get = getattr(m, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is not None:
            ok = isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            return head if ok and not _fsdp_managed(m) and head not in _UNSPLITTABLE else None
    return None


def _fsdp_managed(model: torch.nn.Module) -> bool:
    """Whether FSDP2 manages the model's parameters. The chunked backward reads the head's weight saved in the
    forward, but the scores leave the model beside its outputs, so FSDP2's pre-backward hooks (on the outputs)
    need not run before it: the root may have resharded that weight. Measured: with LoRA (a frozen root) under
    FSDP2 on 2 ranks the weights then differed from one process by 6e-3. So FSDP2 models score unchunked."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(x, FSDPModule) for x in model.modules())


#: Heads whose model transforms the logits after the head (soft-capping, scaling): scored unchunked.
_UNSPLITTABLE: weakref.WeakSet = weakref.WeakSet()


def _chunked_scores(
    model: Any, call: dict[str, Any], predictors: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
    attention_mask: torch.Tensor, response_len: int, *, temperature: float, entropy_grad: bool, vocab_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``model(**call)`` with the output head's forward replaced by `ChunkedLogprob` on the predicting hidden
    states: ``(logp [B, T], entropy [B, T])``, 0 where masked; None when the head cannot be split off (the
    caller then computes full logits).

    The head runs inside the model's forward, so FSDP2's unsharded weights and DDP's hooks are the ones in use.
    It returns the real logits of the last kept position ([*, 1, V]); the model must return exactly those,
    which proves the head's output is not transformed afterwards (e.g. logit soft-capping), else the head is
    remembered as unsplittable and None is returned.
    """
    head = output_head(model)
    if head is None:
        return None
    targets = input_ids[:, -response_len:]  # [B, T]
    mask = attention_mask[:, -response_len:].bool()  # [B, T]
    found: dict[str, Any] = {}

    def head_forward(x: torch.Tensor) -> torch.Tensor:  # x [*, K, H]: the head's input
        h = predictors(x)[mask]  # [N, H]
        lp, ent = ChunkedLogprob.apply(h, head.weight, head.bias, targets[mask], float(temperature), vocab_chunk,
                                       entropy_grad and torch.is_grad_enabled())  # [N], [N]
        logp = lp.new_zeros(mask.shape).masked_scatter(mask, lp)  # [B, T]
        entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)  # [B, T]
        found["scores"] = (logp, entropy)
        found["probe"] = F.linear(x[..., -1:, :], head.weight, head.bias)  # [*, 1, V]
        return found["probe"]

    own = head.__dict__.get("forward")
    head.forward = head_forward
    try:
        logits = model(**call).logits
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    probe = found.get("probe")
    same = probe is not None and (logits is probe or (logits.shape == probe.shape
                                                       and torch.equal(logits.float(), probe.float())))
    if not same:
        _UNSPLITTABLE.add(head)
        return None
    return found["scores"]
