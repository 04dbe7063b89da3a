"""The KV-cache Sampler on the tiny-char model: log-probs, masks, EOS, stop strings, padding, determinism."""

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from grpokit.models import make_tiny
from grpokit.rollout import Rollout, Sampler, encode_prompts, token_logprobs
from grpokit.rollout import sampler as sampler_module
from grpokit.rollout import sampling

QUESTIONS = ["hi", "What is 2 + 2?", "Write a long story about a cat.", "x"]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(seed=0)


@pytest.fixture
def eos_bias(tiny):
    """Add a constant to the EOS logit (set `.value`); removed after the test."""
    model, tok = tiny

    class Bias:
        value = 0.0

    def hook(module, inputs, logits):
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)  # [V]
        bias[tok.eos_token_id] = Bias.value
        return logits + bias

    handle = model.lm_head.register_forward_hook(hook)
    yield Bias
    handle.remove()


def prompts_for(tok, n_repeat=1):
    return encode_prompts(tok, QUESTIONS) * n_repeat


def check_invariants(rollout: Rollout, tok, max_new_tokens):
    """Masks are prefixes; EOS ends exactly the finished rows; padding after; texts decode the kept tokens."""
    lengths = rollout.response_lengths()  # [B]
    width = rollout.response_ids.shape[1]
    assert width == int(lengths.max()) <= max_new_tokens
    assert torch.equal(rollout.response_mask, torch.arange(width)[None, :] < lengths[:, None])
    assert (rollout.response_ids[~rollout.response_mask] == tok.pad_token_id).all()
    assert (rollout.logprobs[~rollout.response_mask] == 0).all()
    assert (rollout.logprobs[rollout.response_mask] <= 0).all()
    for i in range(len(rollout)):
        kept = rollout.response_ids[i, : lengths[i]].tolist()
        assert tok.eos_token_id not in kept[:-1], "no EOS inside a response"
        if rollout.truncated[i]:
            assert lengths[i] == max_new_tokens and kept[-1] != tok.eos_token_id
    full = (len(rollout), rollout.prompt_ids.shape[1] + width)
    assert rollout.input_ids().shape == rollout.attention_mask().shape == full


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=30, top_p=0.9),
    ],
)
def test_logprobs_match_teacher_forced_scoring(tiny, eos_bias, settings):
    model, tok = tiny
    eos_bias.value = 1.0  # about half the rows end early, the others run to max_new_tokens
    prompts = prompts_for(tok, n_repeat=3)  # repeated prompts: the deduplicated prefill path
    gen = torch.Generator().manual_seed(1)
    rollout = Sampler(model, tok).generate(prompts, max_new_tokens=24, generator=gen, **settings)
    check_invariants(rollout, tok, 24)
    assert rollout.truncated.any() and not rollout.truncated.all(), "test needs both finished and truncated rows"
    with torch.no_grad():
        scored = token_logprobs(
            model, rollout.input_ids(), rollout.attention_mask(), rollout.response_ids.shape[1],
            temperature=settings["temperature"],
        )  # [B, T]
    torch.testing.assert_close(rollout.logprobs, scored, atol=1e-4, rtol=0)


def test_eos_ends_rows_and_is_kept_in_the_mask(tiny, eos_bias):
    model, tok = tiny
    eos_bias.value = 6.0
    rollout = Sampler(model, tok).generate(
        prompts_for(tok, 4), max_new_tokens=40, generator=torch.Generator().manual_seed(0)
    )
    check_invariants(rollout, tok, 40)
    lengths = rollout.response_lengths()
    finished = ~rollout.truncated
    assert finished.sum() >= 12
    last = rollout.response_ids[torch.arange(len(rollout)), lengths - 1]  # [B]
    assert (last[finished] == tok.eos_token_id).all()
    for i in range(len(rollout)):
        kept = rollout.response_ids[i, : lengths[i]].tolist()
        assert rollout.texts[i] == tok.decode(kept, skip_special_tokens=True)
        assert "<|im_end|>" not in rollout.texts[i]


def test_truncation_flags_when_no_eos(tiny, eos_bias):
    model, tok = tiny
    eos_bias.value = -1e4
    gen = torch.Generator().manual_seed(0)
    rollout = Sampler(model, tok).generate(prompts_for(tok), max_new_tokens=7, generator=gen)
    assert rollout.truncated.all()
    assert rollout.response_ids.shape == (4, 7) and rollout.response_mask.all()


def test_stop_strings_end_rows_and_cut_texts(tiny, eos_bias):
    model, tok = tiny
    eos_bias.value = -1e4
    sampler = Sampler(model, tok)
    prompts = prompts_for(tok)
    free = sampler.generate(prompts, max_new_tokens=30, temperature=0.0)
    text = free.texts[2]
    stop = text[6:8]
    assert len(stop) == 2
    cut = sampler.generate(prompts, max_new_tokens=30, temperature=0.0, stop_strings=[stop, "@@never@@"])
    check_invariants(cut, tok, 30)
    for i in range(len(prompts)):
        at = free.texts[i].find(stop)
        if at < 0:
            assert cut.truncated[i] and cut.texts[i] == free.texts[i]
            continue
        assert not cut.truncated[i]
        assert cut.texts[i] == free.texts[i][:at], "text is cut before the stop string"
        kept = cut.response_ids[i, : cut.response_lengths()[i]].tolist()
        assert tok.decode(kept, skip_special_tokens=True).endswith(stop), "the completing token stays in the mask"
        assert torch.equal(cut.response_ids[i, : len(kept)], free.response_ids[i, : len(kept)])


def test_seeded_generator_is_deterministic(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    runs = [
        sampler.generate(prompts_for(tok, 2), max_new_tokens=16, top_p=0.95, generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids)


def test_per_row_generators_make_a_row_independent_of_its_batch(tiny):
    """With one generator per row, a row samples the same tokens alone, in another batch or in another
    order: what makes the trainer's rollouts identical on 1 rank and on N."""
    model, tok = tiny
    sampler = Sampler(model, tok)
    prompts = prompts_for(tok, 2)  # 8 rows, ragged prompt lengths

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    full = sampler.generate(prompts, max_new_tokens=16, top_p=0.95, generator=gens(range(8)))
    order = [5, 2, 7]
    part = sampler.generate([prompts[i] for i in order], max_new_tokens=16, top_p=0.95, generator=gens(order))
    for j, i in enumerate(order):
        n = int(full.response_mask[i].sum())
        assert int(part.response_mask[j].sum()) == n
        assert torch.equal(part.response_ids[j, :n], full.response_ids[i, :n])
        torch.testing.assert_close(part.logprobs[j, :n], full.logprobs[i, :n], atol=1e-5, rtol=0)
    other = sampler.generate(prompts, max_new_tokens=16, top_p=0.95, generator=gens(range(100, 108)))
    assert not torch.equal(other.response_ids, full.response_ids), "different row seeds must sample differently"
    with pytest.raises(ValueError, match="per-row generators"):
        sampler.generate(prompts, max_new_tokens=4, generator=gens(range(3)))


def test_top_k_1_is_greedy(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    greedy = sampler.generate(prompts_for(tok), max_new_tokens=20, temperature=0.0)
    top1 = sampler.generate(prompts_for(tok), max_new_tokens=20, temperature=1.0, top_k=1,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy.response_ids, top1.response_ids)


def test_left_padding_does_not_change_outputs(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    prompts = prompts_for(tok, 2)  # lengths 1..~45 chat tokens, each twice
    batch = sampler.generate(prompts, max_new_tokens=20, temperature=0.0)
    assert batch.prompt_mask.sum(1).unique().numel() > 1, "prompts must need padding"
    for i, prompt in enumerate(prompts[:4]):
        alone = sampler.generate([prompt], max_new_tokens=20, temperature=0.0)
        width = alone.response_ids.shape[1]
        assert torch.equal(batch.response_ids[i, :width], alone.response_ids[0])
        torch.testing.assert_close(batch.logprobs[i, :width], alone.logprobs[0], atol=1e-5, rtol=0)


def test_preallocated_cache_equals_dynamic_cache(tiny, monkeypatch):
    model, tok = tiny
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    ours = Sampler(model, tok).generate(prompts_for(tok), max_new_tokens=12, generator=gen())
    monkeypatch.setattr(sampler_module, "make_rollout_cache", lambda model, capacity: DynamicCache(config=model.config))
    hf = Sampler(model, tok).generate(prompts_for(tok), max_new_tokens=12, generator=gen())
    assert torch.equal(ours.response_ids, hf.response_ids)
    torch.testing.assert_close(ours.logprobs, hf.logprobs, atol=1e-6, rtol=0)


def test_rollout_tensors_work_in_autograd(tiny):
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    rollout = Sampler(model, tok).generate(prompts_for(tok), max_new_tokens=4, generator=gen)
    assert not any(t.is_inference() for t in (rollout.response_mask, rollout.logprobs, rollout.response_ids))
    logp = torch.zeros_like(rollout.logprobs, requires_grad=True)  # [B, T]
    ((logp - rollout.logprobs).exp() * rollout.response_mask).sum().backward()  # the PPO ratio pattern
    rollout.logprobs.mul_(1.0)  # in-place is allowed too
    assert logp.grad is not None


def test_model_mode_is_restored(tiny):
    model, tok = tiny
    model.train()
    try:
        Sampler(model, tok).generate(prompts_for(tok)[:1], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_argument_errors(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([[5], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate([[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate([[5]], max_new_tokens=2, top_p=0.0)


def test_encode_prompts(tiny):
    _, tok = tiny
    chat = encode_prompts(tok, ["ab"], system="be brief")[0]
    expected = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(chat) == expected
    assert encode_prompts(tok, ["ab"], chat=False) == [tok("ab").input_ids]


# ----------------------------------------------------------------------------------- sampling primitives


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (7, 0.6), (0, 0.3), (0, 0.999)])
@pytest.mark.parametrize("candidates", [8, 256])
def test_filter_probs_keeps_the_same_tokens_as_hf(monkeypatch, top_k, top_p, candidates):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)  # 8 < V forces the full-sort fallback
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 2  # [b, V]
    weights, idx = sampling.filter_probs(logits.softmax(-1), top_k=top_k, top_p=top_p)  # [b, k]
    ours = torch.zeros_like(logits).scatter(-1, idx, weights) > 0  # [b, V] kept tokens
    scores = logits.clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    assert torch.equal(ours, torch.isfinite(scores))


def test_sample_from_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.5, 0.4, 0.0]]).expand(40_000, 5)  # [b, 5]
    draws = sampling.sample_from(probs, torch.Generator().manual_seed(0))  # [b]
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    assert freq[1] == 0 and freq[4] == 0
