"""SPEC section 11 (catalogue): Clip-Cov, KL-Cov, SAPO and the DPPO / IcePop mask.

Loop twins (tests/reference.py) on random ragged batches, the invariants each rule promises, and the
step-level choice the trainer makes (one per optimizer step, the same for any micro-batch split or
number of ranks).
"""
from __future__ import annotations

import math
import threading

import pytest
import torch

import reference as ref
from grpokit.algo import TOKEN_MASKS
from grpokit.algo.losses import kl_cov, ppo_clip, sapo
from grpokit.algo.masks import (
    clip_cov_candidates, clip_cov_count, clip_cov_select, kl_cov_count, kl_cov_select, selection_seed, token_covariance,
)

SHAPES = [(6, 1), (9, 17), (12, 40), (4, 300), (3, 5, "all_masked")]
DAPO = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=None)


def _batch(shape, **kw):
    b, t, *flag = shape
    return ref.make_batch(b, t, all_masked=bool(flag), **kw)


def _grad(fn, x):
    """d(sum per_tok)/d logp with NaN padding zeroed."""
    logp = x["logp"].clone().requires_grad_(True)
    per_tok = fn(logp)
    per_tok.sum().backward()
    return per_tok.detach(), logp.grad


# ---------------------------------------------------------------------------- SAPO


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sapo_matches_twin_value_and_gradient(shape, taus, dtype):
    x = _batch(shape, seed=11 * shape[0] + shape[1], dtype=dtype, spread=0.6)
    tau_pos, tau_neg = taus
    per_tok, grad = _grad(lambda lp: sapo(lp, x["old_logp"], x["adv"], x["mask"], tau_pos=tau_pos, tau_neg=tau_neg)[0], x)
    want, want_grad = ref.sapo(x["logp"].double(), x["old_logp"].double(), x["adv"].double(), x["mask"], tau_pos=tau_pos, tau_neg=tau_neg)
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    torch.testing.assert_close(per_tok.double(), want, rtol=tol, atol=tol)
    # float32: σ(1 − σ) underflows to 0 far off-policy (ρ ≈ 20), where the exact weight is ~1e-6
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol if dtype == torch.float64 else 1e-5)
    assert (per_tok[~x["mask"]] == 0).all() and (grad[~x["mask"]] == 0).all()


def test_sapo_gradient_equals_unclipped_policy_gradient_at_ratio_one():
    """At ρ = 1 the gate's weight 4σ(0)(1 − σ(0)) = 1: SAPO's gradient is −A·∇ℓ, PPO's unclipped one
    (the loss value is −2A/τ, not −A: only the gradient coincides)."""
    x = ref.make_batch(8, 12, seed=5)
    x["logp"] = torch.where(x["mask"], x["old_logp"], x["logp"])  # ρ = 1 on every loss token
    s_val, s_grad = _grad(lambda lp: sapo(lp, x["old_logp"], x["adv"], x["mask"], tau_pos=1.0, tau_neg=1.05)[0], x)
    _, p_grad = _grad(lambda lp: ppo_clip(lp, x["old_logp"], x["adv"], x["mask"], **DAPO)[0], x)
    m, a = x["mask"], x["adv"]
    assert m.sum() > 20
    torch.testing.assert_close(s_grad, p_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_grad[m], -a[m], rtol=1e-12, atol=1e-12)
    tau = torch.where(a > 0, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.05, dtype=torch.float64))
    torch.testing.assert_close(s_val[m], (-2.0 * a / tau)[m], rtol=1e-12, atol=1e-12)


def test_sapo_gate_is_smooth_bounded_and_decays_faster_for_negative_advantages():
    rho = torch.linspace(0.05, 4.0, 4001, dtype=torch.float64)
    lp = rho.log()[None, :].expand(2, -1).clone()
    old = torch.zeros_like(lp)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64).expand_as(lp)
    mask = torch.ones_like(lp, dtype=torch.bool)
    _, stats = sapo(lp, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    gate = stats["sapo_gate"].double()  # [2, n] gradient weight relative to −A·ρ·∇ℓ
    assert (gate > 0).all() and (gate <= 1 + 1e-12).all()
    one = int((rho - 1).abs().argmin())
    assert abs(float(gate[0, one]) - 1) < 1e-6 and abs(float(gate[1, one]) - 1) < 1e-6
    # smooth: no jump between neighbouring ratios (a hard clip jumps from 1 to 0 at 1 + ε)
    assert float(gate.diff(dim=1).abs().max()) < 1e-3
    # monotone away from ρ = 1 on both sides
    assert (gate[:, : one + 1].diff(dim=1) >= -1e-12).all() and (gate[:, one:].diff(dim=1) <= 1e-12).all()
    # τ_neg > τ_pos: a negative-advantage token loses weight faster off-policy
    off = (rho - 1).abs() > 0.1
    assert (gate[1, off] < gate[0, off]).all()
    # sign convention: A = 0 takes τ_neg (TRL's `advantages > 0` for τ_pos)
    _, s0 = sapo(lp[:1, :5], old[:1, :5] + 0.3, torch.zeros(1, 5, dtype=torch.float64), mask[:1, :5], tau_pos=1.0, tau_neg=3.0)
    sig = torch.sigmoid(3.0 * ((lp[:1, :5] - 0.3).exp() - 1))
    torch.testing.assert_close(s0["sapo_gate"].double(), 4 * sig * (1 - sig))


# ---------------------------------------------------------------------------- KL-Cov


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kappa,coef", [(2e-3, 1.0), (0.1, 0.5), (1.0, 2.0)])
def test_kl_cov_matches_twin(shape, kappa, coef):
    x = _batch(shape, seed=3 * shape[0] + shape[1] + 1)
    (per_tok, grad) = _grad(lambda lp: kl_cov(lp, x["old_logp"], x["adv"], x["mask"], kl_cov_ratio=kappa, kl_cov_coef=coef)[0], x)
    _, stats = kl_cov(x["logp"], x["old_logp"], x["adv"], x["mask"], kl_cov_ratio=kappa, kl_cov_coef=coef)
    want, pen = ref.kl_cov(x["logp"], x["old_logp"], x["adv"], x["mask"], kl_cov_ratio=kappa, kl_cov_coef=coef)
    assert torch.equal(stats["kl_cov_penalised"], pen)
    torch.testing.assert_close(per_tok, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(grad).all() and (grad[~x["mask"]] == 0).all()


def test_kl_cov_float32_matches_twin_given_the_selection():
    x = ref.make_batch(9, 33, seed=4, dtype=torch.float32)
    pen = ref.kl_cov_select(x["adv"].double(), x["logp"].double(), x["mask"], ratio=0.05)
    got, _ = kl_cov(x["logp"], x["old_logp"], x["adv"], x["mask"], kl_cov_coef=1.0, penalised=pen)
    want, _ = ref.kl_cov(x["logp"].double(), x["old_logp"].double(), x["adv"].double(), x["mask"], kl_cov_ratio=0.05, kl_cov_coef=1.0, penalised=pen)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_kl_cov_penalises_exactly_the_top_k_by_covariance_and_only_them():
    x = ref.make_batch(16, 40, seed=8)
    m = x["mask"]
    kappa, coef = 0.03, 1.0
    per_tok, grad = _grad(lambda lp: kl_cov(lp, x["old_logp"], x["adv"], m, kl_cov_ratio=kappa, kl_cov_coef=coef)[0], x)
    pen = kl_cov_select(x["adv"], x["logp"], m, ratio=kappa)
    n = int(m.sum())
    assert int(pen.sum()) == max(int(kappa * n), 1) == kl_cov_count(n, kappa) > 1
    cov = token_covariance(x["adv"], x["logp"], m)
    assert float(cov[pen].min()) > float(cov[m & ~pen].max())  # the top-k, nothing else
    d = (x["logp"] - x["old_logp"])
    rho = d.exp()
    a = torch.nan_to_num(x["adv"])
    torch.testing.assert_close(grad[m & ~pen], (-a * rho)[m & ~pen])  # unpenalised: the plain −A·ρ gradient
    torch.testing.assert_close(grad[pen], (-a * rho + coef * d.sign())[pen])  # + coef·sign(ℓ − ℓ°)
    # no clipping anywhere: a ratio far outside any trust region still carries −A·ρ
    assert (rho[m] > 2).any()


# ---------------------------------------------------------------------------- Clip-Cov


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r,band", [(2e-4, (1.0, 5.0)), (0.05, (0.2, 5.0)), (0.5, (-1.0, 100.0))])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_cov_with_dapo_matches_twin(shape, r, band, seed):
    """Clip-Cov composed with DAPO's clip-higher PPO loss (token mask after the loss), against verl's rule."""
    x = _batch(shape, seed=5 * shape[0] + shape[1])
    lb, ub = band
    per_tok, stats = ppo_clip(x["logp"], x["old_logp"], x["adv"], x["mask"], **DAPO)
    clipped = stats["clipped_low"] | stats["clipped_high"] | stats["dual_clipped"]
    keep, ms = TOKEN_MASKS.call("clip_cov", x["logp"], x["old_logp"], x["adv"], x["mask"], clipped, ratio=r, cov_lb=lb,
                                cov_ub=ub, generator=torch.Generator().manual_seed(seed))
    got = torch.where(keep, per_tok, torch.zeros_like(per_tok))
    want, chosen = ref.clip_cov(x["logp"], x["old_logp"], x["adv"], x["mask"], **DAPO, ratio=r, cov_lb=lb, cov_ub=ub,
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ms["masked"], chosen)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_clip_cov_touches_only_unclipped_band_tokens_and_zeroes_exactly_their_gradient():
    x = ref.make_batch(16, 40, seed=2, spread=0.3)
    m = x["mask"]
    r, lb, ub = 0.02, 0.3, 4.0
    _, stats = ppo_clip(x["logp"], x["old_logp"], x["adv"], m, **DAPO)
    clipped = stats["clipped_low"] | stats["clipped_high"] | stats["dual_clipped"]
    assert clipped.any()
    sel = clip_cov_select(x["adv"], x["logp"], m, clipped, ratio=r, cov_lb=lb, cov_ub=ub, generator=torch.Generator().manual_seed(3))
    cov = token_covariance(x["adv"], x["logp"], m)
    cand = clip_cov_candidates(cov, m, clipped, cov_lb=lb, cov_ub=ub)
    n = int(m.sum())
    assert int(cand.sum()) > clip_cov_count(n, r) > 1  # more candidates than picks: the choice is a real one
    assert int(sel.sum()) == max(int(r * n), 1)
    assert not (sel & ~m).any() and not (sel & clipped).any()
    assert ((cov[sel] > lb) & (cov[sel] < ub)).all()

    def loss(lp):
        per_tok, _ = ppo_clip(lp, x["old_logp"], x["adv"], m, **DAPO)
        return torch.where(m & ~sel, per_tok, torch.zeros_like(per_tok))

    _, g_masked = _grad(loss, x)
    _, g_plain = _grad(lambda lp: ppo_clip(lp, x["old_logp"], x["adv"], m, **DAPO)[0], x)
    assert (g_masked[sel] == 0).all() and (g_plain[sel] != 0).all()
    assert torch.equal(g_masked[~sel], g_plain[~sel])
    # too few candidates: all of them, never a clipped or out-of-band token
    few = clip_cov_select(x["adv"], x["logp"], m, clipped, ratio=0.9, cov_lb=lb, cov_ub=ub, generator=torch.Generator().manual_seed(3))
    assert torch.equal(few, cand)


def test_clip_cov_choice_is_seeded():
    x = ref.make_batch(16, 40, seed=6)
    none = torch.zeros_like(x["mask"])

    def pick(seed):
        return clip_cov_select(x["adv"], x["logp"], x["mask"], none, ratio=0.02, cov_lb=0.2, cov_ub=5.0,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(pick(1), pick(1))
    assert not torch.equal(pick(1), pick(2))
    assert selection_seed(0, 3, 1, "cov") == selection_seed(0, 3, 1, "cov") != selection_seed(0, 3, 0, "cov")


# ---------------------------------------------------------------------------- DPPO / IcePop mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("delta", [1.5, 8.0])
def test_dppo_mask_matches_twin_for_both_signs(shape, delta):
    x = _batch(shape, seed=17 + shape[1], spread=1.0)
    per_tok, stats = ppo_clip(x["logp"], x["old_logp"], x["adv"], x["mask"], **DAPO)
    clipped = stats["clipped_low"] | stats["clipped_high"]
    keep, ms = TOKEN_MASKS.call("dppo", x["logp"], x["old_logp"], x["adv"], x["mask"], clipped, delta=delta)
    want = ref.dppo_mask(x["logp"], x["old_logp"], x["mask"], delta=delta)
    assert torch.equal(ms["masked"], want) and torch.equal(keep, x["mask"] & ~want)
    if shape[1] >= 17:
        a = x["adv"]
        assert (want & (a > 0)).any() and (want & (a < 0)).any()  # both signs of A are masked


def test_dppo_mask_removes_the_gradient_outside_the_band_and_keeps_it_inside():
    x = ref.make_batch(12, 30, seed=9, spread=1.0)
    m = x["mask"]
    delta = 2.0
    cispo_like = dict(clip_low=1.0, clip_high=1e6, dual_clip_c=None)  # no clip: every token has a gradient

    def loss(lp):
        per_tok, stats = ppo_clip(lp, x["old_logp"], x["adv"], m, **cispo_like)
        keep, _ = TOKEN_MASKS.call("dppo", lp, x["old_logp"], x["adv"], m, stats["clipped_low"], delta=delta)
        return torch.where(keep, per_tok, torch.zeros_like(per_tok))

    _, g = _grad(loss, x)
    _, g_plain = _grad(lambda lp: ppo_clip(lp, x["old_logp"], x["adv"], m, **cispo_like)[0], x)
    rho = (x["logp"] - x["old_logp"]).exp()
    out = m & ((rho < 1 / delta) | (rho > delta))
    assert out.any() and (m & ~out).any()
    assert (g[out] == 0).all() and (g_plain[out] != 0).all()
    assert torch.equal(g[m & ~out], g_plain[m & ~out])
    # the band's ends are kept
    lp = torch.tensor([[math.log(2.0), -math.log(2.0)]], dtype=torch.float64)
    keep, _ = TOKEN_MASKS.call("dppo", lp, torch.zeros_like(lp), torch.ones_like(lp), torch.ones_like(lp, dtype=torch.bool),
                               torch.zeros_like(lp, dtype=torch.bool), delta=2.0 + 1e-12)
    assert keep.all()


# ---------------------------------------------------------------------------- the step-level choice (trainer)


def _step_batch(b: int, t: int, seed: int):
    from grpokit.train.step import Batch

    x = ref.make_batch(b, t, seed=seed, dtype=torch.float32, spread=0.3)
    m = x["mask"]
    z = torch.zeros(b, t)
    return Batch(
        input_ids=torch.zeros(b, 2 + t, dtype=torch.long), attention_mask=torch.ones(b, 2 + t, dtype=torch.long),
        response_mask=m, loss_mask=m, group_ids=x["group_ids"], rewards=x["rewards"].float(), seq_adv=x["seq_adv"].float(),
        token_adv=torch.nan_to_num(x["adv"]).float(), old_logp=torch.nan_to_num(x["old_logp"]).float(), ref_logp=None, entropy=z,
    ), torch.nan_to_num(x["logp"]).float()


def _algo(**kw):
    from grpokit.config import AlgoConfig

    return AlgoConfig(**kw)


CASES = {
    "kl_cov": dict(loss="kl_cov", kl_cov_ratio=0.02),
    "clip_cov": dict(loss="ppo_clip", clip_low=0.2, clip_high=0.28, token_mask="clip_cov", clip_cov_ratio=0.01,
                     clip_cov_lb=0.2, clip_cov_ub=5.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_choice_equals_the_twin_over_the_whole_step(case):
    from grpokit.train.step import covariance_selection

    batch, logp = _step_batch(20, 24, seed=1)
    cfg = _algo(**CASES[case])
    seed = selection_seed(0, 1, 0, "cov")
    got = covariance_selection(batch, logp, torch.arange(20), cfg=cfg, seed=seed)
    adv, lp, m = batch.token_adv.double(), logp.double(), batch.loss_mask
    if case == "kl_cov":
        want = ref.kl_cov_select(adv, lp, m, ratio=0.02)
    else:
        _, lo, hi, du = ref.ppo_clip(lp, batch.old_logp.double(), adv, m, clip_low=0.2, clip_high=0.28)
        want = ref.clip_cov_select(adv, lp, m, lo | hi | du, ratio=0.01, cov_lb=0.2, cov_ub=5.0,
                                   generator=torch.Generator().manual_seed(seed))
    assert int(want.sum()) > 1
    assert torch.equal(got, want)


class _FakeRanks:
    """In-process collectives for `n` threads: all_reduce_sum and all_gather_objects, in rank order."""

    def __init__(self, n: int) -> None:
        self.n, self.barrier, self.box = n, threading.Barrier(n), {}

    def _exchange(self, rank: int, obj):
        self.barrier.wait()
        self.box[rank] = obj
        self.barrier.wait()
        out = [self.box[r] for r in range(self.n)]
        self.barrier.wait()
        return out

    def comm(self, rank: int):
        def reduce_sum(values):
            return torch.tensor([sum(col) for col in zip(*self._exchange(rank, list(values)))], dtype=torch.float64)

        return reduce_sum, (lambda obj: self._exchange(rank, obj))


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_choice_does_not_depend_on_ranks_or_row_split(case):
    """Two simulated ranks holding interleaved rows choose exactly the tokens one rank chooses."""
    from grpokit.train.step import covariance_selection

    B = 20
    batch, logp = _step_batch(B, 24, seed=2)
    cfg = _algo(**CASES[case])
    seed = selection_seed(7, 4, 1, "cov")
    whole = covariance_selection(batch, logp, torch.arange(B), cfg=cfg, seed=seed)
    assert int(whole.sum()) > 1
    parts = [torch.arange(0, B, 2), torch.arange(1, B, 2)]  # rank r holds rows r, r+2, ...
    ranks, results = _FakeRanks(2), {}

    def run(r):
        red, gat = ranks.comm(r)
        rows = parts[r]
        results[r] = covariance_selection(batch.select(rows), logp[rows][:, : batch.select(rows).response_len], rows,
                                          cfg=cfg, seed=seed, reduce_sum=red, gather=gat)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    merged = torch.zeros_like(whole)
    for r, rows in enumerate(parts):
        merged[rows, : results[r].shape[1]] = results[r]
    assert torch.equal(merged, whole)
