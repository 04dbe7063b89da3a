"""The chunked log-softmax (`ChunkedLogprob`) and the scoring paths that use it: the same log-probs, entropies
and gradients as the full [B, T, V] float32 logits, and no tensor of N x V elements in the forward or backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from grpokit.models import make_tiny
from grpokit.rollout.logprobs import (
    VOCAB_CHUNK,
    ChunkedLogprob,
    _response_logprobs,
    output_head,
    packed_token_logprobs,
    score_logprobs,
    token_logprobs,
)
from reference import selective_logprob_loop
from test_logprobs import grouped_batch, padded_batch


def full_path(hidden, weight, bias, targets, temperature):
    """The unchunked scorer on the same inputs: full [1, N, V] logits through `_response_logprobs`."""
    N = hidden.shape[0]
    logits = F.linear(hidden, weight, bias)[None]  # [1, N, V]
    logp, ent = _response_logprobs(logits, targets[None], torch.ones(1, N, dtype=torch.bool), N,
                                   temperature=temperature, return_entropy=True, entropy_grad=True)
    return logp[0], ent[0]  # [N], [N]


def random_case(N=37, H=16, V=1000, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (0.5 * torch.randn(N, H, generator=g)).requires_grad_()  # [N, H]
    weight = torch.randn(V, H, generator=g).requires_grad_()  # [V, H]
    b = (0.3 * torch.randn(V, generator=g)).requires_grad_() if bias else None  # [V]
    targets = torch.randint(0, V, (N,), generator=g)  # [N]
    targets[:3] = torch.tensor([0, V - 1, V // 2])  # the first and last vocabulary entries and a chunk edge
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)  # [N], [N]
    return hidden, weight, b, targets, w_lp, w_ent


def grads_of(fn, hidden, weight, bias, targets, temperature, w_lp, w_ent):
    """Values and gradients (hidden, weight, bias) of sum(w_lp * logp + w_ent * entropy)."""
    leaves = [x for x in (hidden, weight, bias) if x is not None]
    lp, ent = fn(hidden, weight, bias, targets, temperature)
    grads = torch.autograd.grad((w_lp * lp).sum() + (w_ent * ent).sum(), leaves)
    return lp.detach(), ent.detach(), grads


def chunked(chunk):
    return lambda h, w, b, t, tau: ChunkedLogprob.apply(h, w, b, t, tau, chunk, True)


@pytest.mark.parametrize("chunk", [64, 333, 1000, VOCAB_CHUNK])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_full_logits_and_float64_twin(chunk, bias):
    case = random_case(bias=bias)
    want = grads_of(full_path, *case[:4], 0.7, *case[4:])
    got = grads_of(chunked(chunk), *case[:4], 0.7, *case[4:])
    twin = grads_of(selective_logprob_loop, *case[:4], 0.7, *case[4:])
    for a, b, t in zip(got[:2], want[:2], twin[:2]):  # logp, entropy
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.double(), t.double(), atol=1e-5, rtol=1e-6)
    for a, b, t in zip(got[2], want[2], twin[2]):  # d/d hidden, weight, bias
        scale = float(t.abs().max())
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(a.double(), t.double(), atol=1e-5 * scale, rtol=1e-5)


def test_entropy_is_detached_unless_asked():
    h, w, b, t, _, _ = random_case()
    lp, ent = ChunkedLogprob.apply(h, w, b, t, 1.0, 128, False)
    assert lp.requires_grad and not ent.requires_grad
    lp, ent = ChunkedLogprob.apply(h, w, b, t, 1.0, 128, True)
    assert ent.requires_grad


def test_bf16_autocast_keeps_the_rounded_logits_and_gradients():
    """Under bf16 autocast both paths compute the same bf16 head logits: log-probs agree to 1e-5. The gradients
    differ by bf16 rounding only (the unchunked path rounds d hidden to bf16 once, the chunked one per chunk):
    against the float64 gradient of the same (bf16-rounded) operands, the chunked error is no larger."""
    h, w, b, t, w_lp, w_ent = random_case(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads_of(full_path, h, w, None, t, 0.7, w_lp, w_ent)
        got = grads_of(chunked(256), h, w, None, t, 0.7, w_lp, w_ent)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)
    hb, wb = h.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    twin = grads_of(selective_logprob_loop, hb, wb, None, t, 0.7, w_lp, w_ent)
    for name, a, b, ref in zip(("hidden", "weight"), got[2], want[2], twin[2]):
        scale = float(ref.abs().max())
        err_chunked, err_full = (float((x.double() - ref).abs().max()) / scale for x in (a, b))
        assert err_chunked <= 1.1 * err_full + 1e-4, (name, err_chunked, err_full)
        torch.testing.assert_close(a, b, atol=2 ** -6 * scale, rtol=0, msg=f"d{name}")


# ---------------------------------------------------------------------------- through the model

def model_grads(model, fn, ids, mask, T, **kw):
    """(logp, entropy, {param: grad}) of a weighted sum of log-probs and entropies (entropy with grad)."""
    model.zero_grad(set_to_none=True)
    logp, ent = fn(model, ids, mask, T, return_entropy=True, entropy_grad=True, **kw)
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(logp.shape, generator=g), torch.randn(logp.shape, generator=g)  # [B, T]
    ((w1 * logp).sum() + 0.1 * (w2 * ent).sum()).backward()
    if kw.get("vocab_chunk"):
        assert output_head(model) is not None, "the chunked path fell back to full logits"
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, atol=1e-5):
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=1e-5)
    assert got[2].keys() == want[2].keys() and "lm_head.weight" in want[2]
    for n in want[2]:
        scale = float(want[2][n].abs().max())
        torch.testing.assert_close(got[2][n], want[2][n], atol=atol * scale + 1e-8, rtol=1e-4, msg=n)


def tiny_ragged(seed=1):
    model, tok = make_tiny(seed=seed)
    g = torch.Generator().manual_seed(0)
    lens = [(3, 9), (17, 1), (8, 14), (1, 5)]  # (prompt, response) lengths: ragged both ways
    prompts = [torch.randint(6, len(tok), (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(6, len(tok), (r,), generator=g).tolist() for _, r in lens]
    return (model, tok, *padded_batch(prompts, responses, tok.pad_token_id))


@pytest.mark.parametrize("chunk", [16, 37])
def test_tiny_model_unpacked_equals_full_logits(chunk):
    model, _, ids, mask, T = tiny_ragged()
    want = model_grads(model, token_logprobs, ids, mask, T, temperature=0.7, vocab_chunk=0)
    got = model_grads(model, token_logprobs, ids, mask, T, temperature=0.7, vocab_chunk=chunk)
    assert_same(got, want)
    assert (got[0][~mask[:, -T:]] == 0).all() and (got[1][~mask[:, -T:]] == 0).all()


def test_tiny_model_packed_equals_full_logits():
    model, tok = make_tiny(seed=1)
    ids, mask, T = grouped_batch(tok, [3, 1, 4, 2])
    pack = lambda *a, **k: packed_token_logprobs(*a, pad_id=tok.pad_token_id, **k)  # noqa: E731
    want = model_grads(model, pack, ids, mask, T, temperature=0.7, vocab_chunk=0)
    got = model_grads(model, pack, ids, mask, T, temperature=0.7, vocab_chunk=16)
    assert_same(got, want)
    unpacked = model_grads(model, token_logprobs, ids, mask, T, temperature=0.7, vocab_chunk=0)
    assert_same(got, unpacked)


def test_tiny_model_under_bf16_autocast():
    model, _, ids, mask, T = tiny_ragged()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model_grads(model, token_logprobs, ids, mask, T, temperature=0.7, vocab_chunk=0)
        got = model_grads(model, token_logprobs, ids, mask, T, temperature=0.7, vocab_chunk=16)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # the same bf16 head logits
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)
    for n in want[2]:  # bf16 rounding of the backward differs: within bf16 precision
        scale = float(want[2][n].abs().max())
        torch.testing.assert_close(got[2][n], want[2][n], atol=2 ** -6 * scale, rtol=0, msg=n)


def test_tied_embeddings_get_both_gradients():
    model, _, ids, mask, T = tiny_ragged()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    want = model_grads(model, token_logprobs, ids, mask, T, vocab_chunk=0)
    got = model_grads(model, token_logprobs, ids, mask, T, vocab_chunk=16)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    name = next(n for n in want[2] if "embed_tokens" in n)
    torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5 * float(want[2][name].abs().max()), rtol=1e-4)


def test_lora_model_and_its_reference_are_chunked():
    from grpokit.models.lora import apply_lora

    base, _, ids, mask, T = tiny_ragged()
    model = apply_lora(base, r=4, alpha=8.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    assert output_head(model) is base.lm_head
    want = model_grads(model, token_logprobs, ids, mask, T, vocab_chunk=0)
    got = model_grads(model, token_logprobs, ids, mask, T, vocab_chunk=16)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], atol=1e-5 * float(want[2][n].abs().max()), rtol=1e-4)

    class AdapterOff:  # the trainer's LoRA reference: the same module, adapters disabled (not an nn.Module)
        def __init__(self, model):
            self.model, self.config = model, model.config

        def __call__(self, *args, **kwargs):
            with self.model.disable_adapter():
                return self.model(*args, **kwargs)

        forward = __call__

    ref = AdapterOff(model)
    assert output_head(ref) is base.lm_head
    with torch.no_grad():
        got = score_logprobs(ref, ids, mask, T, vocab_chunk=16)
        with model.disable_adapter():
            want = token_logprobs(model, ids, mask, T, vocab_chunk=0)
        adapted = token_logprobs(model, ids, mask, T, vocab_chunk=0)
    assert output_head(ref) is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, adapted, atol=1e-3)


class SoftCapped(torch.nn.Module):
    """A model that transforms the head's logits (Gemma-2 style soft-capping): the head cannot be split off."""

    def __init__(self, inner, cap=2.0):
        super().__init__()
        self.inner, self.cap, self.config = inner, cap, inner.config

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = self.cap * torch.tanh(out.logits / self.cap)
        return out


def test_logit_soft_capping_falls_back_to_full_logits():
    model, _, ids, mask, T = tiny_ragged()
    capped = SoftCapped(model)
    with torch.no_grad():
        want = token_logprobs(capped, ids, mask, T, vocab_chunk=0)
        got = token_logprobs(capped, ids, mask, T, vocab_chunk=16)  # detects the transform, recomputes
        assert output_head(capped) is None  # remembered: later calls go straight to the full path
        again = token_logprobs(capped, ids, mask, T, vocab_chunk=16)
        plain = token_logprobs(model, ids, mask, T, vocab_chunk=0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)
    assert not torch.allclose(plain, want, atol=1e-3)


# ---------------------------------------------------------------------------- memory

class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_function_never_creates_an_n_by_v_tensor():
    N, H, V = 64, 8, 5000
    h, w, _, t, _, _ = random_case(N=N, H=H, V=V, bias=False)
    for chunk, bound in [(512, V * H), (0, N * V)]:
        h.grad = w.grad = None
        with LargestTensor() as seen:
            if chunk:
                lp, ent = ChunkedLogprob.apply(h, w, None, t, 0.7, chunk, False)
            else:
                lp, ent = full_path(h, w, None, t, 0.7)
            lp.sum().backward()
        if chunk:  # [N, chunk] temporaries, the [V, H] weight gradient; never [N, V]
            assert seen.largest == max(N * chunk, V * H) < N * V // 4
        else:  # the unchunked path: [N, V] logits (shows the check can fail)
            assert seen.largest >= N * V


def test_scoring_a_model_never_creates_a_b_t_v_tensor():
    """A 1-layer Llama with a 4096-word vocabulary: the unchunked scorer makes [B, T, V] logits; the chunked
    one's largest tensor is the [V, H] head gradient, 8 times smaller."""
    cfg = LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    B, P, T = 4, 8, 32
    ids = torch.randint(0, 4096, (B, P + T), generator=g)  # [B, P+T]
    mask = torch.ones(B, P + T, dtype=torch.bool)  # [B, P+T]
    sizes = {}
    for chunk in (256, 0):
        model.zero_grad(set_to_none=True)
        with LargestTensor() as seen:
            logp, ent = score_logprobs(model, ids, mask, T, temperature=0.7, return_entropy=True, vocab_chunk=chunk)
            logp.sum().backward()
        sizes[chunk] = seen.largest
    assert sizes[0] >= B * T * 4096
    assert sizes[256] == 4096 * 16 <= B * T * 4096 // 8


DATA_PARALLEL_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path[:0] = [{tests!r}, {rollout!r}]
from grpokit.models import enable_gradient_checkpointing, make_tiny
from grpokit.rollout.logprobs import output_head, score_logprobs
from test_logprobs import grouped_batch
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
plain, tok = make_tiny(seed=1)
model, _ = make_tiny(seed=1)
enable_gradient_checkpointing(model)
if {strategy!r} == "fsdp2":
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    wrapped = model
else:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
ids, mask, T = grouped_batch(tok, [3, 1, 4, 2], seed=rank)
w = torch.randn(ids.shape[0], T, generator=torch.Generator().manual_seed(rank))
for m, chunk in ((plain, 0), (wrapped, 16)):
    logp, ent = score_logprobs(m, ids, mask, T, temperature=0.7, return_entropy=True, pad_id=tok.pad_token_id,
                               vocab_chunk=chunk)
    ((logp * w).sum() + 0.1 * (ent * w).sum()).backward()
# FSDP2 scores unchunked (its pre-backward hooks need not run before the chunked backward); DDP chunked
assert (output_head(wrapped) is None) == ({strategy!r} == "fsdp2"), "wrong scoring path"
for (n, p), q in zip(plain.named_parameters(), model.parameters()):
    want = p.grad.clone()
    dist.all_reduce(want)  # FSDP2 averages over ranks
    want /= dist.get_world_size()
    got = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()) + 1e-8, rtol=1e-4, msg=n)
dist.destroy_process_group()
print("DP-CHUNKED-OK", rank)
"""


@pytest.mark.parametrize("strategy,nproc", [("fsdp2", 1), pytest.param("fsdp2", 2, marks=pytest.mark.slow),
                                            pytest.param("ddp", 2, marks=pytest.mark.slow)])
def test_data_parallel_model_scores_chunked_with_equal_gradients(tmp_path, strategy, nproc):
    """Under FSDP2 (layers and root sharded, gradient checkpointing on) scoring falls back to full logits, under
    DDP the chunked head runs inside the wrapped module: either way packed scoring gives the plain model's
    rank-averaged gradients."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    script = tmp_path / "fsdp2_chunked.py"
    script.write_text(DATA_PARALLEL_SCRIPT.format(tests=str(here.parent), rollout=str(here), strategy=strategy))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    root = str(here.parent.parent)  # this checkout's grpokit, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    if nproc == 1:  # one process needs no launcher: the env:// rendezvous variables suffice
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(script)]
    else:
        cmd = [torchrun, f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.count("DP-CHUNKED-OK") == nproc, proc.stderr[-4000:]


def test_fully_masked_rows_and_no_scored_token():
    model, _, ids, mask, T = tiny_ragged()
    mask = mask.clone()
    mask[1, -T:] = False  # a row without response tokens
    want = model_grads(model, token_logprobs, ids, mask, T, vocab_chunk=0)
    got = model_grads(model, token_logprobs, ids, mask, T, vocab_chunk=16)
    assert_same(got, want)
    assert (got[0][1] == 0).all() and (got[1][1] == 0).all()
    mask[:, -T:] = False  # nothing to score: N = 0
    logp, ent = token_logprobs(model, ids, mask, T, return_entropy=True, vocab_chunk=16)
    assert logp.shape == ent.shape == (4, T) and (logp == 0).all() and (ent == 0).all()
    logp.sum().backward()  # a graph without scored tokens still backpropagates (zero gradients)
