"""grpokit.models.lora: PEFT adapters work with the sampler and scoring, and merge back exactly."""

import pytest
import torch

from grpokit.models import make_tiny
from grpokit.models.lora import apply_lora, merged_copy
from grpokit.rollout import Sampler, encode_prompts, token_logprobs


def test_lora_trains_adapters_only_and_merges_back():
    base, tok = make_tiny(seed=0)
    ids = torch.tensor([tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).input_ids])  # [1, L]
    with torch.no_grad():
        ref = base(ids).logits  # [1, L, V]
    model = apply_lora(base, r=4, alpha=8.0, targets=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # B starts at 0; make the adapter change the output
        adapted = model(ids).logits  # [1, L, V]
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=0)
        plain = merged_copy(model)
        assert not hasattr(plain, "peft_config")
        torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-4, rtol=0)
    assert not torch.allclose(adapted, ref, atol=1e-3)

    prompts = encode_prompts(tok, ["hi", "2+2?"])
    rollout = Sampler(model, tok).generate(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    width = rollout.response_ids.shape[1]
    scored = token_logprobs(model, rollout.input_ids(), rollout.attention_mask(), width)  # [B, T]
    torch.testing.assert_close(scored.detach(), rollout.logprobs, atol=1e-4, rtol=0)
    scored.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_lora_rejects_unknown_targets():
    model, _ = make_tiny()
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, r=2, targets=["query_key_value"])
