"""token_logprobs against a slow, obviously-correct twin: one unpadded sequence at a time, full logits."""

import pytest
import torch

from grpokit.models import make_tiny
from grpokit.rollout import left_pad, position_ids_from_mask, token_logprobs


def reference_logprobs(model, prompt: list[int], response: list[int], temperature: float):
    """Score one sequence without any padding: full logits, float64 log-softmax. ([T], [T] entropy)."""
    ids = torch.tensor([prompt + response])  # [1, P+T]
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature  # [T, V]
    logp_all = logits.log_softmax(-1)  # [T, V]
    logp = logp_all.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)  # [T]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [T]
    return logp.float(), entropy.float()


def padded_batch(prompts, responses, pad_id):
    """Left-padded prompts, right-padded responses: ids [B, P+T], mask [B, P+T], T."""
    p_ids, p_mask = left_pad(prompts, pad_id=pad_id)  # [B, P]
    width = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), width), pad_id)  # [B, T]
    r_mask = torch.zeros((len(responses), width), dtype=torch.bool)  # [B, T]
    for i, r in enumerate(responses):
        r_ids[i, : len(r)] = torch.tensor(r)
        r_mask[i, : len(r)] = True
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), width


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_unpadded_reference(tiny, temperature):
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    lens = [(3, 9), (17, 1), (8, 14), (1, 5)]  # (prompt, response) lengths: ragged both ways
    prompts = [torch.randint(6, len(tok), (p,), generator=gen).tolist() for p, _ in lens]
    responses = [torch.randint(6, len(tok), (r,), generator=gen).tolist() for _, r in lens]
    ids, mask, width = padded_batch(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, ids, mask, width, temperature=temperature, return_entropy=True)
        assert logp.shape == entropy.shape == (4, width) and logp.dtype == torch.float32
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ref_logp, ref_ent = reference_logprobs(model, p, r, temperature)
            torch.testing.assert_close(logp[i, : len(r)], ref_logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[i, : len(r)], ref_ent, atol=1e-5, rtol=1e-5)
            assert (logp[i, len(r) :] == 0).all() and (entropy[i, len(r) :] == 0).all()


def test_gradients_flow_and_entropy_is_detached_by_default(tiny):
    model, tok = tiny
    ids, mask, width = padded_batch([[7, 8, 9], [10]], [[11, 12], [13, 14, 15]], tok.pad_token_id)
    logp, entropy = token_logprobs(model, ids, mask, width, return_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad
    logp.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    _, entropy = token_logprobs(model, ids, mask, width, return_entropy=True, entropy_grad=True)
    assert entropy.requires_grad


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # [2, 6]
    expected = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_rejects_bad_arguments(tiny):
    model, _ = tiny
    ids = torch.ones((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, ids.bool(), 2, temperature=0.0)
    with pytest.raises(ValueError, match="response_len"):
        token_logprobs(model, ids, ids.bool(), 4)
    with pytest.raises(ValueError, match="vocab_chunk"):
        token_logprobs(model, ids, ids.bool(), 2, vocab_chunk=-1)


# ---------------------------------------------------------------------------- shared-prompt packing

def grouped_batch(tok, sizes: list[int], seed: int = 0):
    """Groups of `sizes` rows sharing a prompt, responses of ragged random lengths (some 1 token)."""
    from grpokit.rollout import encode_prompts

    g = torch.Generator().manual_seed(seed)
    prompts = encode_prompts(tok, ["hi", "What is 2 + 2?", "Say 47", "x"])
    rows, resp = [], []
    for k, n in enumerate(sizes):
        for _ in range(n):
            rows.append(prompts[k % len(prompts)])
            length = int(torch.randint(1, 9, (1,), generator=g))
            resp.append(torch.randint(6, 90, (length,), generator=g).tolist())
    return padded_batch(rows, resp, tok.pad_token_id)


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 1, 4, 2], [5]], ids=["equal", "ragged", "one-group"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scoring_equals_unpacked(sizes, attn):
    """One packed sequence per group (prompt once, block mask): same log-probs, entropies and gradients."""
    from grpokit.rollout.logprobs import packed_token_logprobs, prompt_groups

    model, tok = make_tiny(seed=1)
    model.config._attn_implementation = attn
    ids, mask, T = grouped_batch(tok, sizes)
    assert [c for _, c in prompt_groups(ids, mask, T)] == sizes
    w = torch.randn(ids.shape[0], T, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (token_logprobs, lambda *a, **k: packed_token_logprobs(*a, pad_id=tok.pad_token_id, **k)):
        model.zero_grad()
        logp, ent = fn(model, ids, mask, T, temperature=0.7, return_entropy=True)
        (logp * w).sum().backward()
        results.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=0)
    assert (lp_b[~mask[:, -T:]] == 0).all()
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()) + 1e-8, rtol=1e-4)


def test_packing_is_used_only_where_it_pays():
    from grpokit.models import make_tiny
    from grpokit.rollout.logprobs import attention_width_ratio, packing_pays

    model, _ = make_tiny(seed=0)
    r = attention_width_ratio(model)  # hidden 96, 4 heads x 24, 2 kv heads, ff 256: (18432 + 9216 + 73728) / 192
    assert r == pytest.approx(528.0)
    assert packing_pays([(0, 4), (4, 4)], prompt_len=45, response_len=8, ratio=r)  # short answers, long shared prompt
    assert packing_pays([(0, 8)] * 4, prompt_len=46, response_len=32, ratio=3072)  # SmolLM2-sized, G = 8
    assert not packing_pays([(0, 1), (1, 1)], prompt_len=45, response_len=8, ratio=r)  # nothing shared
    assert not packing_pays([(0, 8)], prompt_len=100, response_len=2000, ratio=r)  # long responses: attention grows M^2
    assert not packing_pays([(0, 16)], prompt_len=500, response_len=600, ratio=1e9)  # past MAX_PACKED_LEN


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3", "flex_attention", None])
def test_packing_only_with_a_backend_that_honours_block_masks(monkeypatch, attn):
    """flash-attention ignores a 4-D mask (packed rows would attend across sequences): such a model must be
    scored unpacked, even where packing pays; packed_token_logprobs itself refuses it."""
    from grpokit.rollout import logprobs

    model, tok = make_tiny(seed=0)
    ids, mask, T = grouped_batch(tok, [4, 4, 4])
    calls = []
    monkeypatch.setattr(logprobs, "token_logprobs", lambda *a, **k: calls.append("unpacked") or torch.zeros(12, T))
    monkeypatch.setattr(logprobs, "packed_token_logprobs", lambda *a, **k: calls.append("packed") or torch.zeros(12, T))
    groups = logprobs.prompt_groups(ids, mask, T)
    assert logprobs.packing_pays(groups, ids.shape[1] - T, T, ratio=logprobs.attention_width_ratio(model))
    logprobs.score_logprobs(model, ids, mask, T, pad_id=tok.pad_token_id)
    assert calls == ["packed"]  # sdpa (the tiny model's default): packed
    model.config._attn_implementation = attn
    logprobs.score_logprobs(model, ids, mask, T, pad_id=tok.pad_token_id)
    assert calls == ["packed", "unpacked"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="block mask"):
        logprobs.packed_token_logprobs(model, ids, mask, T, pad_id=tok.pad_token_id)
