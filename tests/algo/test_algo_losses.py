"""Policy losses (SPEC section 2): twins on random ragged batches and hand-derived gradients."""
import math

import pytest
import torch

from grpokit.algo.aggregate import seq_mean_token_mean, token_mean
from grpokit.algo.losses import LOSSES, cispo, gspo, ppo_clip, ppo_kl
import reference as ref

SHAPES = [(6, 1), (9, 17), (4, 300), (3, 5, "all_masked")]


def _batch(shape, **kw):
    b, t, *flag = shape
    return ref.make_batch(b, t, all_masked=bool(flag), **kw)
CLIPS = [dict(clip_low=0.2, clip_high=0.28, dual_clip_c=None), dict(clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)]


def _nan_free(x):
    return torch.nan_to_num(x, nan=0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ppo_clip_matches_twin(shape, clip, dtype):
    x = _batch(shape, seed=shape[0] * shape[1], dtype=dtype)
    per_tok, stats = ppo_clip(x["logp"], x["old_logp"], x["adv"], x["mask"], **clip)
    want, lo, hi, du = ref.ppo_clip(x["logp"].double(), x["old_logp"].double(), x["adv"].double(), x["mask"], **clip)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(per_tok.double(), want, rtol=tol, atol=tol)
    assert torch.equal(stats["clipped_low"], lo) and torch.equal(stats["clipped_high"], hi)
    assert torch.equal(stats["dual_clipped"], du)
    assert (per_tok[~x["mask"]] == 0).all() and torch.isfinite(per_tok).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [dict(clip_low=3e-4, clip_high=4e-4, dual_clip_c=None),
                                  dict(clip_low=0.05, clip_high=0.1, dual_clip_c=1.2)])
def test_gspo_matches_twin(shape, clip):
    x = _batch(shape, seed=7 + shape[1], spread=0.05)
    per_tok, _ = gspo(x["logp"], x["old_logp"], x["adv"], x["mask"], **clip)
    want = ref.gspo(x["logp"], x["old_logp"], x["adv"], x["mask"], **clip)
    torch.testing.assert_close(per_tok, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_cispo_matches_twin(shape):
    x = _batch(shape, seed=3 + shape[1])
    per_tok, stats = cispo(x["logp"], x["old_logp"], x["adv"], x["mask"], clip_low=0.5, clip_high=0.28)
    want = ref.cispo(x["logp"], x["old_logp"], x["adv"], x["mask"], clip_low=0.5, clip_high=0.28)
    torch.testing.assert_close(per_tok, want, rtol=1e-12, atol=1e-12)
    assert not stats["dual_clipped"].any()


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
def test_all_masked_and_nan_padding_give_zero_loss_and_zero_grad(name):
    x = ref.make_batch(5, 8, seed=1)
    mask = torch.zeros(5, 8, dtype=torch.bool)
    logp = x["logp"].clone().requires_grad_(True)  # NaN everywhere padded; here all padded
    logp.data.fill_(float("nan"))
    per_tok, stats = LOSSES.call(name, logp, x["old_logp"], x["adv"], mask, clip_low=0.2, clip_high=0.2,
                                 dual_clip_c=3.0)
    assert (per_tok == 0).all() and not any(s.any() for s in stats.values())
    token_mean(per_tok, mask, num_tokens=0).backward()
    assert (logp.grad == 0).all()


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
def test_padded_garbage_gets_zero_grad(name):
    x = ref.make_batch(7, 12, seed=2)
    logp = x["logp"].clone().requires_grad_(True)
    per_tok, _ = LOSSES.call(name, logp, x["old_logp"], x["adv"], x["mask"], clip_low=0.2, clip_high=0.28,
                             dual_clip_c=3.0)
    token_mean(per_tok, x["mask"], num_tokens=x["mask"].sum()).backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~x["mask"]] == 0).all()
    assert (logp.grad[x["mask"]] != 0).any()


def _grad_of_single_token(loss_fn, d, a, **kw):
    """Loss and dloss/dℓ of one token with ℓ − ℓ° = d, advantage a (float64)."""
    old = torch.tensor([[-1.3]], dtype=torch.float64)
    logp = (old + d).clone().requires_grad_(True)
    adv = torch.tensor([[a]], dtype=torch.float64)
    per_tok, stats = loss_fn(logp, old, adv, torch.ones(1, 1, dtype=torch.bool), **kw)
    per_tok.sum().backward()
    return float(per_tok.detach()), float(logp.grad), {k: bool(v) for k, v in stats.items()}


@pytest.mark.parametrize(
    "rho,a,expect_grad_zero,flag",
    [
        (1.1, 2.0, False, None),  # inside the clip, A > 0: grad −Aρ
        (0.9, -1.5, False, None),  # inside, A < 0
        (1.5, 2.0, True, "clipped_high"),  # A > 0 above 1+ε_high: clipped
        (0.5, -1.5, True, "clipped_low"),  # A < 0 below 1−ε_low: clipped
        (0.5, 2.0, False, None),  # A > 0 below: not clipped (the min picks the ratio)
        (1.5, -1.5, False, None),  # A < 0 above, below c: not clipped
        (5.0, -1.5, True, "dual_clipped"),  # A < 0 above c = 3: dual clip caps the loss at −A·c
    ],
)
def test_ppo_clip_hand_gradients(rho, a, expect_grad_zero, flag):
    loss, grad, stats = _grad_of_single_token(ppo_clip, math.log(rho), a, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)
    if expect_grad_zero:
        assert grad == 0.0
        capped = {"clipped_high": 1.28, "clipped_low": 0.8, "dual_clipped": 3.0}[flag]
        assert loss == pytest.approx(-a * capped, rel=1e-12)
    else:
        assert grad == pytest.approx(-a * rho, rel=1e-12)  # d(−Aρ)/dℓ = −Aρ
        assert loss == pytest.approx(-a * rho, rel=1e-12)
    assert {k for k, v in stats.items() if v} == ({flag} if flag else set())


def test_dual_clip_off_keeps_unbounded_loss():
    loss, grad, stats = _grad_of_single_token(ppo_clip, math.log(5.0), -1.5, clip_low=0.2, clip_high=0.28,
                                              dual_clip_c=None)
    assert loss == pytest.approx(7.5, rel=1e-12) and grad == pytest.approx(7.5, rel=1e-12)
    assert not stats["dual_clipped"]
    with pytest.raises(ValueError, match="dual_clip_c"):
        z = torch.zeros(1, 1)
        ppo_clip(z, z, z, torch.ones(1, 1, dtype=torch.bool), dual_clip_c=0.5)


def test_log_ratio_clamp():
    loss, grad, _ = _grad_of_single_token(ppo_clip, 50.0, 1.0, clip_low=0.2, clip_high=1e9, dual_clip_c=None)
    assert loss == pytest.approx(-math.exp(20.0), rel=1e-12) and grad == 0.0


def test_cispo_hand_gradient():
    for rho, a, w in [(1.1, 2.0, 1.1), (2.0, 2.0, 1.28), (0.3, -1.0, 0.5), (3.0, -1.0, 1.28)]:
        loss, grad, _ = _grad_of_single_token(cispo, math.log(rho), a, clip_low=0.5, clip_high=0.28)
        assert grad == pytest.approx(-w * a, rel=1e-12)  # −sg(clip ρ)·A·∇ℓ: never zero
        assert loss == pytest.approx(-w * a * (-1.3 + math.log(rho)), rel=1e-12)


def test_gspo_hand_gradient():
    """With seq_mean_token_mean, dL/dℓ_{i,t} = −A_i·s_i/(L_i·N_seq) where unclipped, 0 where clipped."""
    old = -torch.rand(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    d = torch.tensor([[1e-4, -2e-4, 3e-4, 9.0], [0.01, 0.02, 0.0, 0.03], [0.01, 0.02, 0.0, 0.03]],
                     dtype=torch.float64)
    adv = torch.tensor([[1.5] * 4, [0.7] * 4, [-0.7] * 4], dtype=torch.float64)
    logp = (old + d).requires_grad_(True)
    per_tok, stats = gspo(logp, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    seq_mean_token_mean(per_tok, mask, num_seqs=3).backward()
    s0, s1 = math.exp(2e-4 / 3), math.exp(0.06 / 4)  # s0 inside [1−3e-4, 1+4e-4], s1 above
    want = torch.tensor([[-1.5 * s0 / 3 / 3] * 3 + [0.0], [0.0] * 4, [0.7 * s1 / 4 / 3] * 4], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=1e-12, atol=1e-15)
    assert stats["clipped_high"].tolist() == [[False] * 4, [True] * 4, [False] * 4]
    torch.testing.assert_close(per_tok[2], torch.full((4,), 0.7 * s1, dtype=torch.float64), rtol=1e-12, atol=0)


def test_ppo_kl():
    x = ref.make_batch(5, 9, seed=4)
    out = ppo_kl(x["logp"], x["old_logp"], x["mask"])
    want = torch.where(x["mask"], x["old_logp"] - x["logp"], torch.zeros(()))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
