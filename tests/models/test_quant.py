"""grpokit.models.quant: int8/int4 weight-only quantization and the quantized frozen reference."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from grpokit.models import make_tiny, module_nbytes, quantized_ref_model
from grpokit.models.quant import (
    INT4_QMAX,
    INT8_QMAX,
    QuantEmbedding,
    WeightOnlyLinear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from grpokit.models.tiny import TINY_SHAPE
from grpokit.rollout import Sampler, encode_prompts, token_logprobs
from grpokit.rollout.logprobs import score_logprobs
from reference import quantize_int4_loop

FP16_EPS = 2.0**-10  # float16 relative spacing (2^-10 between 1 and 2; rounding error is half of it)


def _weights(n=33, k=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05  # [N, K]
    w[3] = 0.0  # an all-zero row
    w[5, :] = 0.2  # a constant row
    w[7, 11] = 1.5  # an outlier
    return w


# ---------------------------------------------------------------------------- round trips

def test_int8_round_trip_within_half_a_step_per_row():
    w = _weights()
    buf = quantize_int8(w)
    assert buf["qweight"].dtype == torch.int8 and buf["qweight"].shape == w.shape
    assert buf["scale"].dtype == torch.float32 and buf["scale"].shape == (w.shape[0],)
    assert buf["qweight"].abs().max() == INT8_QMAX  # every non-zero row uses the full grid
    back = dequantize_int8(buf, w.shape[1], torch.float32)  # [N, K]
    err = (back - w).abs()  # [N, K]
    step = w.abs().amax(dim=1) / INT8_QMAX  # [N]
    assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-9).all()
    assert torch.equal(back[3], w[3])  # zero row exact
    torch.testing.assert_close(back[5], w[5], atol=1e-7, rtol=0)  # constant row: the max itself is on the grid
    assert err.max() > 0  # it is lossy: a test of nothing would pass with an identity


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step_per_group(group_size):
    w = _weights(k=97)  # K not a multiple of the group: the last group is zero-padded
    buf = quantize_int4(w, group_size)
    groups = math.ceil(97 / group_size)
    assert buf["qweight"].dtype == torch.uint8 and buf["qweight"].shape == (33, groups * group_size // 2)
    assert buf["scale"].shape == buf["offset"].shape == (33, groups)
    back = dequantize_int4(buf, 97, torch.float32)  # [N, K]
    assert back.shape == w.shape
    padded = torch.nn.functional.pad(w, (0, groups * group_size - 97)).view(33, groups, group_size)  # [N, G, g]
    lo, hi = padded.amin(-1), padded.amax(-1)  # [N, G]
    step = (hi - lo) / INT4_QMAX  # [N, G]
    # half a step, plus float16 rounding of the scale (at most 15 steps' worth) and of the offset
    bound = step / 2 + INT4_QMAX * step * FP16_EPS / 2 + lo.abs() * FP16_EPS / 2 + 1e-7  # [N, G]
    err = (back - w).abs()  # [N, K]
    err = torch.nn.functional.pad(err, (0, groups * group_size - 97)).view(33, groups, group_size)  # [N, G, g]
    assert (err <= bound[..., None]).all()
    assert err.max() > 1e-4
    torch.testing.assert_close(back[5], w[5], atol=0.2 * FP16_EPS, rtol=0)  # a constant group is its offset


def test_int4_matches_the_loop_twin_bit_for_bit():
    w = _weights(n=9, k=45, seed=3)
    fast, slow = quantize_int4(w, 16), quantize_int4_loop(w, 16)
    for name in ("qweight", "scale", "offset"):
        assert torch.equal(fast[name], slow[name]), name


def test_exactly_representable_weights_survive_both_schemes():
    g = torch.Generator().manual_seed(1)
    q8 = torch.randint(-INT8_QMAX, INT8_QMAX + 1, (6, 40), generator=g)
    q8[:, 0] = INT8_QMAX  # the row max is on the grid
    w8 = q8.float() * 2.0**-9  # [6, 40]
    assert torch.equal(dequantize_int8(quantize_int8(w8), 40, torch.float32), w8)
    q4 = torch.randint(0, INT4_QMAX + 1, (6, 64), generator=g)
    q4[:, 0::32], q4[:, 1::32] = 0, INT4_QMAX  # every group of 32 spans the whole grid
    w4 = q4.float() * 2.0**-6 - 0.125  # [6, 64]
    assert torch.equal(dequantize_int4(quantize_int4(w4, 32), 64, torch.float32), w4)


def test_bad_group_size_and_unknown_scheme_are_refused():
    with pytest.raises(ValueError, match="even number"):
        quantize_int4(torch.randn(4, 8), 3)
    model, _ = make_tiny()
    with pytest.raises(ValueError, match="did you mean 'int8'.*none, int4, int8.*model.ref_quantization"):
        quantized_ref_model(model, "int5")


def test_weight_only_linear_is_linear_with_the_dequantized_weight():
    lin = nn.Linear(97, 33, bias=True)
    x = torch.randn(2, 5, 97)  # [B, L, K]
    for scheme, tol in (("int8", 0.01), ("int4", 0.2)):  # |y| ~ 1; int4's step is 1/15 of a group's range
        q = WeightOnlyLinear.from_linear(lin, scheme, group_size=32)
        assert not list(q.parameters())
        want = torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias)  # [B, L, N]
        torch.testing.assert_close(q(x), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(q(x), lin(x), atol=tol, rtol=0)  # and close to the original


# ---------------------------------------------------------------------------- the reference model

def _rollout(model, tok, n=6, new=24, seed=0):
    prompts = encode_prompts(tok, ["2+3=?", "hello", "7*8", "Say hi", "12-5", "q"][:n])
    return Sampler(model, tok).generate(prompts, max_new_tokens=new, generator=torch.Generator().manual_seed(seed))


# mean / max |Δ log-prob| per token against the fp32 reference on the tiny model, asserted with a 2x margin.
# The tiny model has random weights (init std 0.1); SmolLM2-135M's errors, measured by
# benchmarks/quant_ref.py, are larger for int8 (mean 0.063, 30 layers accumulate) and about twice as large
# for int4 at group 64 (mean 0.61).
#   measured, model and rollout seeds 0..5 (~125 tokens each):
#   int8: mean 0.018-0.024, max 0.070-0.112    int4 (group 64): mean 0.21-0.29, max 0.91-1.39
TOL = {"int8": (0.05, 0.3), "int4": (0.5, 3.0)}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_reference_logprobs_are_close_to_fp32(scheme):
    model, tok = make_tiny(seed=0)
    rollout = _rollout(model, tok)
    args = (rollout.input_ids(), rollout.attention_mask(), rollout.response_ids.shape[1])
    mask = rollout.response_mask  # [B, T]
    ref = quantized_ref_model(model, "none")
    qref = quantized_ref_model(model, scheme)
    with torch.no_grad():
        exact = token_logprobs(ref, *args)  # [B, T]
        approx = token_logprobs(qref, *args)  # [B, T]
        packed = score_logprobs(qref, *args, pad_id=tok.pad_token_id)  # [B, T]
    torch.testing.assert_close(exact, rollout.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed, approx, atol=1e-4, rtol=0)  # packed and unpacked scoring agree
    diff = (approx - exact).abs()[mask]  # [n tokens]
    mean_tol, max_tol = TOL[scheme]
    assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())
    assert diff.mean() > 1e-4  # the quantized model really is a different model


def test_int4_errs_more_than_int8_and_embeddings_add_error():
    model, tok = make_tiny(seed=1)
    rollout = _rollout(model, tok, seed=1)
    args = (rollout.input_ids(), rollout.attention_mask(), rollout.response_ids.shape[1])
    mask = rollout.response_mask
    err = {}
    with torch.no_grad():
        exact = token_logprobs(model, *args)
        for scheme in ("int8", "int4"):
            for emb in (False, True):
                approx = token_logprobs(quantized_ref_model(model, scheme, embeddings=emb), *args)
                err[scheme, emb] = (approx - exact).abs()[mask].mean()
    assert err["int4", False] > 3 * err["int8", False]
    assert err["int8", True] >= err["int8", False] * 0.9  # quantizing embeddings and head does not help


def test_quantized_reference_is_frozen_and_leaves_the_policy_alone():
    model, tok = make_tiny()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = quantized_ref_model(model, "int4")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # the policy keeps its modules
    assert not ref.training and not any(m.training for m in ref.modules())
    assert not any(p.requires_grad for p in ref.parameters())
    assert isinstance(ref.lm_head, nn.Linear) and not isinstance(ref.lm_head, WeightOnlyLinear)  # default
    rollout = _rollout(model, tok, n=3, new=8)
    logp = token_logprobs(ref, rollout.input_ids(), rollout.attention_mask(), rollout.response_ids.shape[1])
    assert not logp.requires_grad  # grad enabled, yet nothing in the reference can take one
    policy_logp = token_logprobs(model, rollout.input_ids(), rollout.attention_mask(), rollout.response_ids.shape[1])
    policy_logp.sum().backward()
    assert model.lm_head.weight.grad is not None


def _expected_nbytes(model, scheme, group_size, embeddings):
    """Bytes the quantized copy must hold: everything not quantized at its own size, plus the codes and
    scales (int8: 1 byte per weight + fp32 per row; int4: half a byte per padded weight + 2 fp16 per group)."""
    head = model.get_output_embeddings()
    modules = [m for m in model.modules() if isinstance(m, nn.Linear) and (embeddings or m is not head)]
    if embeddings:
        modules.append(model.get_input_embeddings())
    weights = list({id(m.weight): m.weight for m in modules}.values())  # a tied pair is one weight
    total = module_nbytes(model) - sum(w.numel() * 4 for w in weights)
    for w in weights:
        n, k = w.shape
        if scheme == "int8":
            total += n * k + 4 * n
        else:
            groups = math.ceil(k / group_size)
            total += n * groups * group_size // 2 + 2 * 2 * n * groups
    return total


@pytest.mark.parametrize("scheme,group_size,embeddings", [("int8", 0, False), ("int8", 0, True),
                                                          ("int4", 64, False), ("int4", 32, True)])
def test_quantized_weights_take_the_expected_bytes(scheme, group_size, embeddings):
    model, _ = make_tiny()
    ref = quantized_ref_model(model, scheme, group_size=group_size or 64, embeddings=embeddings)
    assert module_nbytes(ref) == _expected_nbytes(model, scheme, group_size or 64, embeddings)
    n_linear = sum(isinstance(m, WeightOnlyLinear) for m in ref.modules())
    assert n_linear == 7 * TINY_SHAPE["num_hidden_layers"] + embeddings
    assert module_nbytes(ref) < module_nbytes(model) / (3 if scheme == "int8" else 4)


def test_tied_embedding_and_head_share_one_quantized_copy():
    _, tok = make_tiny()
    config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, pad_token_id=0, **TINY_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = quantized_ref_model(model, "int8", embeddings=True)
    assert isinstance(ref.model.embed_tokens, QuantEmbedding) and isinstance(ref.lm_head, WeightOnlyLinear)
    assert ref.model.embed_tokens.qweight is ref.lm_head.qweight
    assert module_nbytes(ref) == _expected_nbytes(model, "int8", 64, True)
    assert module_nbytes(ref) < module_nbytes(model) / 3.5
    ids = torch.tensor([[5, 17, 40, 2, 9]])  # [1, L]
    want = model.model.embed_tokens(ids).detach()  # [1, L, D]
    got = ref.model.embed_tokens(ids)  # [1, L, D]
    torch.testing.assert_close(got, want, atol=float(want.abs().max()) / INT8_QMAX, rtol=0)
    kept = quantized_ref_model(model, "int4")  # default: embedding and head stay full precision, still tied
    assert kept.lm_head.weight is kept.model.embed_tokens.weight


def test_quantized_reference_under_bf16_autocast():
    from grpokit.models import autocast_context

    model, tok = make_tiny()
    rollout = _rollout(model, tok, n=3, new=12)
    args = (rollout.input_ids(), rollout.attention_mask(), rollout.response_ids.shape[1])
    ref = quantized_ref_model(model, "int8")
    with torch.no_grad():
        exact = token_logprobs(model, *args)
        with autocast_context("cpu", "bf16"):
            approx = token_logprobs(ref, *args)
    assert approx.dtype == torch.float32
    diff = (approx - exact).abs()[rollout.response_mask]
    assert diff.mean() < 0.15, diff.mean()  # bf16 rounding on top of int8
