"""Token-level credit: FIPO (SPEC section 6), FRPO (section 7), cancellation (section 8)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.algo.credit import (
    CREDIT,
    adv_orthogonal,
    cancellation_residual,
    fipo,
    fipo_metrics,
    frpo_metrics,
    implicit_utility,
    min_replace,
)
from grpokit.algo.losses import LOSSES, ppo_clip
import reference as ref

RECIPE_32B = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, tau=32.0, f_low=1.0, f_high=1.2, safety=10.0)
RECIPE_7B = dict(RECIPE_32B, f_low=0.8, safety=3.0)

# ----------------------------------------------------------------------------------------- FIPO


def _check_fipo(x, tol, **kw):
    per_tok, stats = fipo(x["logp"], x["old_logp"], x["adv"], x["mask"], **kw)
    want = ref.fipo(x["logp"].double(), x["old_logp"].double(), x["adv"].double(), x["mask"], **kw)
    torch.testing.assert_close(per_tok.double(), want["per_tok"], rtol=tol, atol=tol)
    torch.testing.assert_close(stats["fipo_weight"].double(), want["weight"], rtol=tol, atol=tol)
    torch.testing.assert_close(stats["fipo_F"].double(), want["F"], rtol=tol, atol=tol)
    assert torch.equal(stats["fipo_safety_reset"], want["reset"])
    assert torch.equal(stats["fipo_dropped"], want["dropped"])
    return stats


@pytest.mark.parametrize("b,t,all_masked", [(6, 1, False), (9, 37, False), (5, 700, False), (4, 9, True)])
@pytest.mark.parametrize("kw", [RECIPE_32B, RECIPE_7B, dict(RECIPE_7B, drop_seqs=False, tau=4.0),
                                dict(RECIPE_32B, dual_clip_c=None, safety=None, tau=math.inf)])
def test_fipo_matches_twin(b, t, all_masked, kw):
    x = ref.make_batch(b, t, seed=b * 31 + t, spread=0.4, all_masked=all_masked)
    _check_fipo(x, 1e-10, **kw)


def test_fipo_matches_twin_long_float32():
    x = ref.make_batch(2, 20000, seed=9, spread=0.05, dtype=torch.float32)
    stats = _check_fipo(x, 2e-5, **RECIPE_7B)
    assert (stats["fipo_weight"][x["mask"]] != 1.0).any()  # the weights actually vary


def test_fipo_registered_and_first_minibatch_is_ppo():
    """With logp == old_logp and the [1, 1.2] clip, f ≡ 1 and FIPO is exactly dual-clip PPO."""
    x = ref.make_batch(8, 30, seed=2)
    per_tok, stats = LOSSES.call("fipo", x["old_logp"], x["old_logp"], x["adv"], x["mask"], **RECIPE_32B)
    ppo, _ = ppo_clip(x["old_logp"], x["old_logp"], x["adv"], x["mask"], clip_low=0.2, clip_high=0.28, dual_clip_c=10.0)
    assert (stats["fipo_weight"][x["mask"]] == 1.0).all()
    torch.testing.assert_close(per_tok, ppo, rtol=0, atol=0)


def _one_row(d, a, **kw):
    d = torch.tensor([d], dtype=torch.float64)
    old = torch.full_like(d, -2.0)
    logp = (old + d).requires_grad_(True)
    adv = torch.full_like(d, float(a)) if not isinstance(a, list) else torch.tensor([a], dtype=torch.float64)
    mask = torch.ones_like(d, dtype=torch.bool)
    per_tok, stats = fipo(logp, old, adv, mask, **kw)
    per_tok.sum().backward()
    return per_tok.detach()[0], stats, logp.grad[0]


def test_fipo_safety_reset():
    """7B recipe: A < 0 and ρ > safety = 3 → f clamped to [0.8, 1.0] (it would be 1.2 otherwise)."""
    d = [1.0, math.log(4.0), 1.0]  # ρ = 4 > 3 on token 1; all below log c
    _, neg, _ = _one_row(d, -1.0, **RECIPE_7B)
    _, pos, _ = _one_row(d, +1.0, **RECIPE_7B)
    assert neg["fipo_safety_reset"][0].tolist() == [False, True, False]
    assert not pos["fipo_safety_reset"].any()
    assert neg["fipo_weight"][0].tolist() == pytest.approx([1.2, 1.0, 1.2], abs=0)
    assert pos["fipo_weight"][0].tolist() == pytest.approx([1.2, 1.2, 1.2], abs=0)
    # F < 0 with the reset: f = clamp(clamp(e^F, 0.8, 1.2), 0.8, 1.0)
    _, low, _ = _one_row([-0.5, math.log(4.0) - 3.0, -0.5], -1.0, **dict(RECIPE_7B, safety=0.01))
    assert low["fipo_weight"][0].tolist() == pytest.approx([0.8, 0.8, 0.8], abs=0)


def test_fipo_dual_clip_mask_excludes_tokens_from_F():
    """A token with d > log c contributes nothing to F (any sign of A); with c off it does."""
    gamma = 2 ** (-1 / 32)
    d = [0.0, math.log(20.0), 0.01]
    _, on, _ = _one_row(d, +1.0, **RECIPE_32B)
    _, off, _ = _one_row(d, +1.0, **dict(RECIPE_32B, dual_clip_c=None))
    want_on = torch.tensor([gamma**2 * 0.01, gamma * 0.01, 0.01], dtype=torch.float64)
    torch.testing.assert_close(on["fipo_F"][0], want_on, rtol=1e-12, atol=0)
    torch.testing.assert_close(off["fipo_F"][0], torch.tensor(
        [gamma * math.log(20) + gamma**2 * 0.01, math.log(20) + gamma * 0.01, 0.01], dtype=torch.float64),
        rtol=1e-12, atol=0)


def test_fipo_drops_sequences_with_two_dual_clipped_tokens():
    big = math.log(12.0)  # ρ = 12 > c = 10
    two, s2, g2 = _one_row([big, 0.1, big], -1.0, **RECIPE_32B)
    one, s1, g1 = _one_row([big, 0.1, 0.2], -1.0, **RECIPE_32B)
    pos, sp, _ = _one_row([big, 0.1, big], +1.0, **RECIPE_32B)  # A > 0: never dual-clipped
    assert s2["fipo_dropped"].tolist() == [True] and (two == 0).all() and (g2 == 0).all()
    assert s1["fipo_dropped"].tolist() == [False] and (one != 0).all()
    assert s1["dual_clipped"][0].tolist() == [True, False, False]
    assert one[0] == pytest.approx(10.0 * 1.0, rel=1e-12)  # −A·c·f, f = 1 (clamped from below)
    assert sp["fipo_dropped"].tolist() == [False] and (pos != 0).all()
    kept, sk, gk = _one_row([big, 0.1, big], -1.0, **dict(RECIPE_32B, drop_seqs=False))
    assert sk["fipo_dropped"].tolist() == [False]
    assert kept[0] == pytest.approx(10.0, rel=1e-12) and kept[2] == pytest.approx(10.0, rel=1e-12)
    assert gk[0] == 0 and gk[2] == 0 and gk[1] != 0  # the dual clip stops those tokens' gradient


def test_fipo_weight_is_detached():
    x = ref.make_batch(4, 25, seed=3, spread=0.3)
    logp = x["logp"].clone().requires_grad_(True)
    per_tok, stats = fipo(logp, x["old_logp"], x["adv"], x["mask"], **RECIPE_7B)
    assert not stats["fipo_weight"].requires_grad and not stats["fipo_F"].requires_grad
    per_tok.sum().backward()
    # the gradient equals that of PPO with the constant advantage A·f (f carries no gradient)
    logp2 = x["logp"].clone().requires_grad_(True)
    ppo, _ = ppo_clip(logp2, x["old_logp"], torch.nan_to_num(x["adv"]) * stats["fipo_weight"], x["mask"],
                      clip_low=0.2, clip_high=0.28, dual_clip_c=10.0)
    torch.where(stats["fipo_dropped"][:, None], torch.zeros_like(ppo), ppo).sum().backward()
    torch.testing.assert_close(logp.grad, logp2.grad, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10_000),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.8),
    st.floats(0.5, 200.0),
    st.booleans(),
)
def test_property_fipo_weights_in_bounds(seed, f_low, width, tau, recipe_safety):
    f_high = f_low + width
    x = ref.make_batch(6, 40, seed=seed, spread=0.5)
    if recipe_safety:  # the safety reset keeps f in [f_low, f_high] for recipe-like ranges
        f_low, f_high = max(f_low, 0.8), max(f_high, 1.0)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, tau=tau, f_low=f_low, f_high=f_high,
              safety=3.0 if recipe_safety else None)
    _, stats = fipo(x["logp"], x["old_logp"], x["adv"], x["mask"], **kw)
    w = stats["fipo_weight"][x["mask"]]
    assert ((w >= f_low) & (w <= f_high)).all()
    _, same = fipo(x["old_logp"], x["old_logp"], x["adv"], x["mask"], **dict(kw, f_low=1.0, f_high=1.2))
    assert (same["fipo_weight"][x["mask"]] == 1.0).all()


def test_fipo_metrics():
    x = ref.make_batch(6, 30, seed=4, spread=0.5)
    _, stats = fipo(x["logp"], x["old_logp"], x["adv"], x["mask"], **RECIPE_7B)
    m = fipo_metrics(stats, x["mask"], f_low=0.8, f_high=1.2)
    w = stats["fipo_weight"][x["mask"]]
    assert float(m["fipo/weight_mean"]) == pytest.approx(float(w.mean()), rel=1e-12)
    assert float(m["fipo/weight_min"]) == float(w.min()) and float(m["fipo/weight_max"]) == float(w.max())
    assert float(m["fipo/frac_at_high"]) == pytest.approx(float((w >= 1.2).double().mean()), rel=1e-12)
    empty = fipo_metrics(stats, torch.zeros_like(x["mask"]), f_low=0.8, f_high=1.2)
    assert all(torch.isfinite(v) for v in empty.values())


# ----------------------------------------------------------------------------------------- FRPO


@pytest.mark.parametrize("divergence", ["k1", "k3", "forward"])
@pytest.mark.parametrize("b,t,all_masked", [(5, 1, False), (8, 45, False), (3, 6, True)])
def test_frpo_matches_twin(divergence, b, t, all_masked):
    x = ref.make_batch(b, t, seed=t + 1, spread=0.7, all_masked=all_masked)
    out = CREDIT.call("frpo", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], beta=0.05,
                      divergence=divergence)
    want = ref.frpo(x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], beta=0.05,
                    divergence=divergence)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["k1", "k3", "forward"])
def test_frpo_long_float32(divergence):
    x = ref.make_batch(3, 20000, seed=1, spread=0.1, dtype=torch.float32)
    out = CREDIT.call("frpo", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], beta=0.01,
                      divergence=divergence)
    assert out.dtype == torch.float32
    want = ref.frpo(x["seq_adv"].double(), x["mask"], old_logp=x["old_logp"].double(),
                    ref_logp=x["ref_logp"].double(), beta=0.01, divergence=divergence)
    # β·(a sum of 20000 terms): absolute error relative to the largest β·|reg|
    scale = float((want - x["seq_adv"].double()[:, None]).abs().max())
    assert float((out.double() - want).abs().max()) <= 1e-5 * scale + 1e-6


def test_frpo_k1_is_the_undiscounted_kl_to_go():
    old = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[-1.5, -1.0, -3.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    out = CREDIT.call("frpo", torch.tensor([2.0], dtype=torch.float64), mask, old_logp=old, ref_logp=ref_logp,
                      beta=0.1, divergence="k1")
    # δ = [0.5, −1, 0.5]; S = [0, −0.5, 0.5]
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.05, 1.95, 0.0]], dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_frpo_beta_zero_needs_no_reference_and_broadcast():
    x = ref.make_batch(4, 6, seed=0)
    a = CREDIT.call("frpo", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=None, beta=0.0)
    b = CREDIT.call("broadcast", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=None, beta=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(b, torch.where(x["mask"], x["seq_adv"][:, None], torch.zeros(())).expand(4, 6),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="ref_logp"):
        CREDIT.call("frpo", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=None, beta=0.01)
    with pytest.raises(ValueError, match="forward"):
        CREDIT.call("frpo", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], beta=0.01,
                    divergence="js")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["k1", "k3", "forward"]), st.floats(0.0, 1.0))
def test_property_frpo_is_detached(seed, divergence, beta):
    x = ref.make_batch(5, 12, seed=seed, garbage=False)
    old = x["old_logp"].clone().requires_grad_(True)
    refl = x["ref_logp"].clone().requires_grad_(True)
    seq = x["seq_adv"].clone().requires_grad_(True)
    out = CREDIT.call("frpo", seq, x["mask"], old_logp=old, ref_logp=refl, beta=beta, divergence=divergence)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.isfinite(out).all() and (out[~x["mask"]] == 0).all()


def test_frpo_metrics():
    x = ref.make_batch(6, 20, seed=5, garbage=False, spread=1.0)
    m = frpo_metrics(x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], beta=0.5,
                     rewards=x["rewards"], group_ids=x["group_ids"])
    reg = (ref.frpo(torch.zeros(6, dtype=torch.float64), x["mask"], old_logp=x["old_logp"],
                    ref_logp=x["ref_logp"], beta=0.5)).abs()  # |β·S| (with A = 0)
    sel = x["mask"]
    assert float(m["frpo/kl_term_abs_mean"]) == pytest.approx(float(reg[sel].mean()), rel=1e-10)
    dominates = (reg > x["seq_adv"].abs()[:, None])[sel].double().mean()
    assert float(m["frpo/frac_kl_dominates"]) == pytest.approx(float(dominates), rel=1e-12)
    assert float(m["frpo/implicit_utility"]) == pytest.approx(ref.implicit_utility(x["rewards"], x["group_ids"]),
                                                             rel=1e-12)
    assert float(implicit_utility(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))) == \
        pytest.approx(math.pi / 2, rel=1e-6)


# --------------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("seed", range(4))
def test_cancellation_residual_matches_twin(seed):
    x = ref.make_batch(14, 9, seed=seed, n_groups=3)
    w = torch.rand(14, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    out = cancellation_residual(x["ids"], x["mask"], x["group_ids"], x["seq_adv"], w)
    want = ref.cancellation_residual(x["ids"], x["mask"], x["group_ids"], x["seq_adv"], w)
    assert want > 0
    assert float(out) == pytest.approx(want, rel=1e-6)


def test_cancellation_residual_long_chunked():
    """T above the chunk size: prefix equality must carry across chunks."""
    b, t = 6, 600
    ids = torch.ones(b, t, dtype=torch.long)
    ids[3:, 590:] = 2  # rows 3..5 diverge from 0..2 at t = 590
    ids[5, 595:] = 3
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 598:] = False
    g = torch.zeros(b, dtype=torch.long)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.3, 0.7], dtype=torch.float64)
    out = cancellation_residual(ids, mask, g, adv, w)
    assert float(out) == pytest.approx(ref.cancellation_residual(ids, mask, g, adv, w), rel=1e-6)


def test_cancellation_exact_with_equal_weights_and_zero_when_nothing_shared():
    x = ref.make_batch(10, 8, seed=1, n_groups=2, garbage=False)
    adv = torch.tensor([1.0, -1.0] * 5)
    ids = torch.zeros(10, 8, dtype=torch.long)
    g = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2])  # each group: A sums to 0
    assert float(cancellation_residual(ids, torch.ones(10, 8, dtype=torch.bool), g, adv, torch.ones(10))) == 0.0
    unique_ids = torch.arange(80).reshape(10, 8)
    assert float(cancellation_residual(unique_ids, x["mask"], g, adv, torch.rand(10) + 0.5)) == 0.0
    assert float(cancellation_residual(ids, x["mask"], g, torch.zeros(10), torch.ones(10))) == 0.0


def test_min_replace_and_adv_orthogonal_match_twins():
    x = ref.make_batch(16, 2, seed=8, n_groups=4)
    w = 1.0 + 0.2 * torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = x["seq_adv"]
    torch.testing.assert_close(min_replace(w, x["group_ids"]).double(), ref.min_replace(w, x["group_ids"]),
                               rtol=0, atol=0)
    out = adv_orthogonal(w, a, x["group_ids"])
    torch.testing.assert_close(out, ref.adv_orthogonal(w, a, x["group_ids"]), rtol=1e-12, atol=1e-12)
    for gid in x["group_ids"].unique():  # Σ_i A_i·w̃_i = 0 per group (or min-replace fallback)
        sel = x["group_ids"] == gid
        if out[sel].min() > 0 and not torch.allclose(out[sel], out[sel].min().expand(int(sel.sum()))):
            assert abs(float((a[sel] * out[sel]).sum())) < 1e-12


def test_adv_orthogonal_fallback_to_min_replace():
    w = torch.tensor([1.0, 0.2, 1.0, 1.0], dtype=torch.float64)
    a = torch.tensor([-5.0, 5.0, 1.0, -1.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 1, 1])
    out = adv_orthogonal(w, a, g)
    # group 0: Aᵀw/‖A‖² = −4/50 → w̃ = [1 − 0.4, 0.2 + 0.4] > 0: kept;
    torch.testing.assert_close(out[:2], torch.tensor([0.6, 0.6], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    w2 = torch.tensor([3.0, 0.1], dtype=torch.float64)
    a2 = torch.tensor([1.0, 0.05], dtype=torch.float64)  # w̃ = w − (Aᵀw/‖A‖²)·A has w̃_2 ≤ 0
    out2 = adv_orthogonal(w2, a2, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out2, torch.tensor([0.1, 0.1], dtype=torch.float64), rtol=0, atol=0)
    assert not min_replace(w.requires_grad_(True), g).requires_grad
