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
