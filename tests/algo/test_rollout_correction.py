"""Rollout correction (SPEC 12): each decoupled mode against its loop twin on random ragged inputs, the
invariants (weights <= C, mask bounds, stop-gradient, N_tok unchanged), and bypass == decoupled at ℓ° = μ."""
import math

import pytest
import torch

from grpokit.algo.correction import CORRECTIONS
from grpokit.config import AlgoConfig
from grpokit.train.step import Batch, StatSums, micro_batch_loss
import reference as ref

MODES = ["token_tis", "seq_tis", "token_mask", "seq_mask", "geo_mask"]
BOUNDS = [{}, {"high": 1.5}, {"low": 0.8, "high": 1.3}]


def _inputs(b, t, seed, spread, dtype=torch.float64):
    """d = ℓ° − μ with ragged rows, NaN at padding, outliers (tests/reference.make_batch)."""
    x = ref.make_batch(b, t, seed=seed, spread=spread, dtype=dtype)
    return x["old_logp"] - x["logp"], x["mask"]


def _kwargs(mode, bounds):
    return {k: v for k, v in bounds.items() if k in CORRECTIONS.accepts(mode)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("b,t,seed,spread", [(3, 1, 0, 0.3), (9, 23, 1, 0.3), (16, 40, 2, 0.05), (12, 7, 3, 0.004)])
def test_matches_twin_float64(mode, bounds, b, t, seed, spread):
    d, mask = _inputs(b, t, seed, spread)
    kw = _kwargs(mode, bounds)
    w, masked, trunc = CORRECTIONS.call(mode, d, mask, **kw)
    rw, rmasked, rtrunc = ref.rollout_correction(mode, d, mask, **kw)
    assert w.dtype == torch.float64 and torch.isfinite(w).all()
    torch.testing.assert_close(w, rw, rtol=1e-12, atol=1e-12)
    assert torch.equal(masked, rmasked) and torch.equal(trunc, rtrunc)


def _near_bound(mode, d, mask, kw):
    """Rows/tokens whose float64 ratio lies within 1e-4 (relative) of a bound, where float32 rounding of the
    sum may decide the other way: [B, T] bool."""
    lo, hi = kw.get("low"), kw.get("high", CORRECTIONS.defaults(mode)["high"])
    lo = lo if lo is not None else (CORRECTIONS.defaults(mode).get("low") or 1 / hi)
    dz = torch.where(mask, d.double(), torch.zeros_like(d.double()))
    if mode.startswith("token"):
        r = dz.clamp(-20, 20).exp()
    else:
        s = dz.sum(-1) / (mask.sum(-1).clamp(min=1) if mode == "geo_mask" else 1)
        r = s.clamp(-20, 20).exp()[:, None].expand_as(dz)
    return ((r / lo - 1).abs() < 1e-4) | ((r / hi - 1).abs() < 1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,t,seed,spread", [(9, 23, 5, 0.3), (16, 40, 6, 0.01)])
def test_matches_twin_float32(mode, b, t, seed, spread):
    d, mask = _inputs(b, t, seed, spread, dtype=torch.float32)
    w, masked, trunc = CORRECTIONS.call(mode, d, mask)
    assert w.dtype == torch.float32
    rw, rmasked, rtrunc = ref.rollout_correction(mode, d.double(), mask)
    near = _near_bound(mode, d, mask, {})
    assert near.float().mean() < 0.05  # the comparison below covers nearly every token
    ok = ~near
    torch.testing.assert_close(w.double()[ok], rw[ok], rtol=1e-5, atol=1e-6)
    assert torch.equal(masked[ok], rmasked[ok]) and torch.equal(trunc[ok], rtrunc[ok])


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis"])
def test_tis_weights_are_at_most_c_and_truncation_is_exactly_the_cut(mode):
    d, mask = _inputs(32, 30, 7, 0.5)
    for c in (1.2, 2.0, 3.0):
        w, masked, trunc = CORRECTIONS.call(mode, d, mask, high=c)
        assert (w[mask] > 0).all() and (w[mask] <= c).all()
        assert not masked.any()
        assert trunc.any() and (~trunc[mask]).any()  # the inputs exercise both sides of C
        assert torch.equal(trunc[mask], (w[mask] == c) & trunc[mask])
        assert (w[~mask] == 1).all() and not trunc[~mask].any()


@pytest.mark.parametrize("mode", ["token_mask", "seq_mask", "geo_mask"])
def test_masks_keep_exactly_the_ratios_inside_the_bounds(mode):
    d, mask = _inputs(32, 30, 8, 0.02 if mode == "geo_mask" else 0.4)
    w, masked, trunc = CORRECTIONS.call(mode, d, mask)
    assert set(w[mask].unique().tolist()) == {0.0, 1.0}  # both kept and masked tokens occur
    assert torch.equal(masked, (w == 0) & mask) and not trunc.any()
    lo, hi = {"token_mask": (0.5, 2.0), "seq_mask": (1 / 3, 3.0), "geo_mask": (0.99, 1.01)}[mode]
    dz = torch.where(mask, d, torch.zeros_like(d))
    if mode == "token_mask":
        r = dz.exp()
    else:
        r = (dz.sum(-1) / (mask.sum(-1).clamp(min=1) if mode == "geo_mask" else 1)).exp()[:, None].expand_as(d)
        rows = mask.any(-1)
        for i in rows.nonzero().flatten().tolist():  # one decision per sequence
            assert masked[i][mask[i]].all() or not masked[i].any()
    assert torch.equal(masked[mask], ~((r[mask] >= lo) & (r[mask] <= hi)))


def test_sequence_modes_ignore_padding_garbage_and_extreme_logs_stay_finite():
    d = torch.tensor([[0.1, 0.2, float("nan")], [500.0, -500.0, 0.0], [60.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    for mode in MODES:
        w, _, _ = CORRECTIONS.call(mode, d, mask)
        assert torch.isfinite(w).all(), mode
    w, _, trunc = CORRECTIONS.call("seq_tis", d, mask)
    torch.testing.assert_close(w[0, :2], torch.full((2,), math.exp(0.3), dtype=torch.float64))
    assert w[2, 0] == 3.0 and trunc[2, 0]  # exp(60) is clamped to exp(20) then cut to C


def test_weights_are_stop_gradient():
    old = torch.randn(4, 6, requires_grad=True)
    mu = torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for mode in MODES:
        w, _, _ = CORRECTIONS.call(mode, old - mu, mask)
        assert not w.requires_grad, mode


def _loss_batch(b, t, seed):
    x = ref.make_batch(b, t, seed=seed, garbage=False, dtype=torch.float32)
    mask = x["mask"]
    zeros = torch.zeros(b, t)
    batch = Batch(
        input_ids=torch.zeros(b, t + 2, dtype=torch.long), attention_mask=torch.ones(b, t + 2, dtype=torch.long),
        response_mask=mask, loss_mask=mask, group_ids=x["group_ids"], rewards=x["rewards"].float(),
        seq_adv=x["seq_adv"].float(), token_adv=x["adv"], old_logp=x["old_logp"], ref_logp=None, entropy=zeros,
    )
    return batch, x["logp"], x


def _loss(batch, logp, n_tok, weight=None):
    batch.is_weight = weight
    cfg = AlgoConfig()
    return micro_batch_loss(batch, logp, cfg=cfg, num_tokens=n_tok, num_seqs=float(len(logp)), norm_const=1.0,
                            stats=StatSums())[0]


@pytest.mark.parametrize("mode", MODES)
def test_weighted_loss_matches_twin_and_keeps_the_token_count(mode):
    """The trainer's loss with w equals Σ m·w·loss / N_tok, N_tok counting masked tokens too (SPEC 12)."""
    batch, logp, x = _loss_batch(10, 12, 3)
    mu = batch.old_logp + 0.3 * torch.randn(batch.old_logp.shape, generator=torch.Generator().manual_seed(1))
    w, masked, _ = CORRECTIONS.call(mode, batch.old_logp - mu, batch.loss_mask)
    n_tok = float(batch.loss_mask.sum())
    per_tok = ref.ppo_clip(x["logp"].double(), x["old_logp"].double(), x["adv"].double(), batch.loss_mask,
                           clip_low=0.2, clip_high=0.2)[0]
    want = ref.corrected_loss(per_tok, w.double(), batch.loss_mask, num_tokens=n_tok)
    got = _loss(batch, logp.clone(), n_tok, w)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # a masked token adds nothing to the gradient; an unmasked one keeps its unweighted size x w
    lp = logp.clone().requires_grad_(True)
    _loss(batch, lp, n_tok, w).backward()
    lp0 = logp.clone().requires_grad_(True)
    _loss(batch, lp0, n_tok, None).backward()
    m = batch.loss_mask
    torch.testing.assert_close(lp.grad[m], lp0.grad[m] * w[m], rtol=1e-5, atol=1e-7)
    if masked.any():
        assert (lp.grad[masked] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_bypass_equals_decoupled_when_old_equals_mu(mode):
    """At ℓ° = μ every weight is exactly 1, so the decoupled loss is the bypass loss (ratio exp(ℓ − μ))."""
    batch, logp, _ = _loss_batch(10, 12, 4)
    mu = batch.old_logp.clone()
    w, masked, trunc = CORRECTIONS.call(mode, batch.old_logp - mu, batch.loss_mask)
    assert (w == 1).all() and not masked.any() and not trunc.any()
    n_tok = float(batch.loss_mask.sum())
    assert torch.equal(_loss(batch, logp.clone(), n_tok, w), _loss(batch, logp.clone(), n_tok, None))
