"""grpokit.models.enable_gradient_checkpointing: decoder layers are really recomputed in the backward pass of
a model kept in eval mode (plain, LoRA, FSDP2), gradients are unchanged, and no-grad sampling is untouched."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grpokit.models import enable_gradient_checkpointing, make_tiny, ref_model
from grpokit.models.checkpointing import decoder_layers, disable_gradient_checkpointing
from grpokit.models.lora import apply_lora


def batch(tok):
    """Two left-padded rows: ids [2, L], mask [2, L]."""
    a = tok("<|im_start|>user\nwhat is 12+30?<|im_end|>\n", add_special_tokens=False).input_ids
    b = tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).input_ids
    L = max(len(a), len(b))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in (a, b)])  # [2, L]
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in (a, b)])  # [2, L]
    return ids, mask


class SublayerCalls:
    """Counts forward calls of every decoder layer's attention and MLP: 1 per forward, 2 when the backward
    pass recomputes the layer. Pre-hooks: the non-reentrant replay stops as soon as the last saved tensor
    is rebuilt, before the MLP's forward returns, so a post-forward hook would miss it."""

    def __init__(self, model):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self.hook) for layer in decoder_layers(model)
                        for m in (layer.self_attn, layer.mlp)]
        self.n_sub = len(self.handles)

    def hook(self, *_):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def forward_backward(model, ids, mask):
    """Run a weighted loss over all logits; return the {name: grad} of trainable parameters and the calls seen."""
    model.zero_grad(set_to_none=True)
    counter = SublayerCalls(model)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [2, L, V]
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))  # [2, L, V]
    (logits * w).sum().backward()
    counter.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, counter.calls / counter.n_sub


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_eval_mode_model_recomputes_every_layer_with_equal_gradients():
    model, tok = make_tiny(seed=0)
    assert not model.training  # load_model/make_tiny return eval mode: HF's own flag would do nothing here
    ids, mask = batch(tok)
    want, calls = forward_backward(model, ids, mask)
    assert calls == 1  # no checkpointing: each sub-layer runs once
    assert enable_gradient_checkpointing(model) == 3
    got, calls = forward_backward(model, ids, mask)
    assert calls == 2, "every decoder layer must run again in the backward pass"
    assert_same_grads(got, want)
    assert not model.training
    assert enable_gradient_checkpointing(model) == 3  # idempotent: still recomputed once, not twice
    assert forward_backward(model, ids, mask)[1] == 2
    disable_gradient_checkpointing(model)
    assert forward_backward(model, ids, mask)[1] == 1


def test_no_grad_sampling_and_cache_are_untouched():
    model, tok = make_tiny(seed=0)
    ids, mask = batch(tok)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=True)
    enable_gradient_checkpointing(model)
    counter = SublayerCalls(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert counter.calls == counter.n_sub
    assert got.past_key_values is not None and got.past_key_values.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # KV-cache decoding
    assert out.shape == (2, ids.shape[1] + 4)


def test_a_grad_forward_with_use_cache_still_recomputes():
    model, tok = make_tiny(seed=0)
    ids, mask = batch(tok)
    enable_gradient_checkpointing(model)
    counter = SublayerCalls(model)
    with pytest.warns(UserWarning, match="use_cache=False"):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    out.logits.sum().backward()
    assert counter.calls == 2 * counter.n_sub


def test_train_mode_and_deep_copies():
    model, tok = make_tiny(seed=0)
    ids, mask = batch(tok)
    model.train()  # train mode (no dropout in the tiny Llama): still recomputed, not twice by HF's own flag
    want, _ = forward_backward(model, ids, mask)
    enable_gradient_checkpointing(model)
    got, calls = forward_backward(model, ids, mask)
    assert calls == 2
    assert_same_grads(got, want)
    model.eval()
    ref = ref_model(model)  # a deep copy: its wrapped forward runs the copy's weights, not the original's
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
        a = model(input_ids=ids, attention_mask=mask).logits  # [2, L, V]
        b = ref(input_ids=ids, attention_mask=mask).logits  # [2, L, V]
    assert not torch.allclose(a, b, atol=1e-3)
    copied = copy.deepcopy(model)
    assert all(layer.forward.__self__ is layer for layer in decoder_layers(copied))


def test_lora_model_recomputes_with_equal_adapter_gradients():
    base, tok = make_tiny(seed=0)
    model = apply_lora(base, r=4, alpha=8.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    ids, mask = batch(tok)
    want, _ = forward_backward(model, ids, mask)
    assert enable_gradient_checkpointing(model) == 3
    got, calls = forward_backward(model, ids, mask)
    assert calls == 2
    assert want and all("lora_" in n for n in want)
    assert_same_grads(got, want)


def test_rejects_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="gradient_checkpointing = false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


FSDP2_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from grpokit.models import enable_gradient_checkpointing, make_tiny
    from grpokit.models.checkpointing import decoder_layers
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.set_num_threads(1)
    plain, tok = make_tiny(seed=0)
    model, _ = make_tiny(seed=0)
    enable_gradient_checkpointing(model)  # before sharding, as the trainer does
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    calls = []
    for layer in decoder_layers(model):
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.tensor([tok("<|im_start|>user\\nwhat is 12+30?<|im_end|>", add_special_tokens=False).input_ids])
    w = torch.randn(1, ids.shape[1], len(tok), generator=torch.Generator().manual_seed(0))
    for m in (plain, model):
        (m(input_ids=ids, use_cache=False).logits * w).sum().backward()
    assert len(calls) == 6, calls  # 3 layers, each run twice
    for (n, p), q in zip(plain.named_parameters(), model.parameters()):
        g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=0, msg=n)
    dist.destroy_process_group()
    print("FSDP2-OK")
""")


def test_fsdp2_wrapped_model_recomputes_with_equal_gradients():
    """One gloo process with FSDP2 applied after `enable_gradient_checkpointing`, as `grpokit.dist.wrap` does."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's grpokit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FSDP2_SCRIPT.format(port=port)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "FSDP2-OK" in proc.stdout, proc.stderr[-4000:]
