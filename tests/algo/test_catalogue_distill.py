"""Distillation inside RL (docs/catalogue.md): KDRL and G-OPD against their loop twins, and their invariants."""
import pytest
import torch

import reference as ref
from grpokit.algo import DISTILL
from grpokit.algo.distill import gopd_reward, kdrl_beta, kdrl_row_coef

SHAPES = [(3, 1), (7, 33), (16, 300)]


def _inputs(b, t, seed, dtype=torch.float64):
    x = ref.make_batch(b, t, seed=seed, dtype=dtype, spread=0.7)
    g = torch.Generator().manual_seed(seed + 1)
    teacher = x["old_logp"] + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype)  # NaN where padded
    correct = torch.rand(b, generator=g) < 0.4
    return x, teacher, correct


@pytest.mark.parametrize("b,t", SHAPES)
@pytest.mark.parametrize("only_failed", [True, False])
def test_kdrl_matches_twin(b, t, only_failed):
    x, teacher, correct = _inputs(b, t, seed=t)
    beta = 3.7e-3
    coef32 = kdrl_row_coef(correct, beta=beta, only_failed=only_failed)  # [B] f32
    assert coef32.dtype == torch.float32
    assert ((coef32 > 0) == (~correct if only_failed else torch.ones_like(correct))).all()
    coef = (coef32 > 0).double() * beta  # the same rows, β in float64 for the 1e-12 comparison
    adv, per_tok = DISTILL.call("kdrl", x["logp"], teacher, x["adv"], x["mask"], row_coef=coef)
    want = ref.kdrl_term(x["logp"], teacher, x["mask"], correct, beta=beta, only_failed=only_failed)
    torch.testing.assert_close(per_tok, want, rtol=1e-12, atol=1e-15)
    assert adv is x["adv"]  # KDRL leaves the advantage alone
    x32, t32 = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}, teacher.float()
    _, per32 = DISTILL.call("kdrl", x32["logp"], t32, x32["adv"], x32["mask"], row_coef=coef32)
    assert per32.dtype == torch.float32
    torch.testing.assert_close(per32.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("b,t", SHAPES)
@pytest.mark.parametrize("lam,w", [(1.25, 0.0), (1.0, 0.0), (0.5, 1.0), (2.0, 0.3)])
def test_gopd_matches_twin(b, t, lam, w):
    x, teacher, _ = _inputs(b, t, seed=t + 5)
    ref_logp = x["ref_logp"] if lam != 1.0 else None
    adv, per_tok = DISTILL.call("gopd", x["logp"], teacher, x["adv"], x["mask"], old_logp=x["old_logp"],
                                ref_logp=ref_logp, lam=lam, outcome_weight=w)
    want = ref.gopd_advantage(teacher, x["old_logp"], ref_logp, x["adv"], x["mask"], lam=lam, outcome_weight=w)
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    assert (per_tok == 0).all()
    f = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    adv32, _ = DISTILL.call("gopd", f["logp"], teacher.float(), f["adv"], f["mask"], old_logp=f["old_logp"],
                            ref_logp=None if ref_logp is None else f["ref_logp"], lam=lam, outcome_weight=w)
    assert adv32.dtype == torch.float32
    torch.testing.assert_close(adv32.double(), want, rtol=1e-5, atol=1e-5)


def test_kdrl_touches_only_failed_responses():
    """The gradient of KDRL's term reaches the tokens of failed responses and no others; it is k2's, (ℓ − ℓ_T)."""
    x, teacher, correct = _inputs(12, 20, seed=3)
    correct[:3] = torch.tensor([True, False, True])  # both kinds present
    logp = x["logp"].clone().requires_grad_(True)
    coef = (kdrl_row_coef(correct, beta=0.01) > 0).double() * 0.01
    _, per_tok = DISTILL.call("kdrl", logp, teacher, x["adv"], x["mask"], row_coef=coef)
    per_tok.sum().backward()
    grad = logp.grad
    failed_tokens = x["mask"] & ~correct[:, None]
    assert (grad[~failed_tokens] == 0).all()
    assert (per_tok[~failed_tokens] == 0).all()
    want = 0.01 * (x["logp"] - teacher)
    torch.testing.assert_close(grad[failed_tokens], want[failed_tokens], rtol=1e-12, atol=1e-15)
    assert failed_tokens.any() and (grad[failed_tokens] != 0).any()


def test_kdrl_teacher_is_detached():
    x, teacher, correct = _inputs(4, 6, seed=2, dtype=torch.float32)
    teacher = torch.nan_to_num(teacher).requires_grad_(True)
    logp = torch.nan_to_num(x["logp"]).requires_grad_(True)
    _, per_tok = DISTILL.call("kdrl", logp, teacher, x["adv"], x["mask"], row_coef=torch.ones(4))
    per_tok.sum().backward()
    assert teacher.grad is None and logp.grad is not None


def test_kdrl_beta_anneals_linearly_between_the_endpoints():
    s = 50
    assert kdrl_beta(1, steps=s) == pytest.approx(5e-3, abs=1e-15)
    assert kdrl_beta(s, steps=s) == pytest.approx(1e-3, abs=1e-15)
    assert kdrl_beta(s + 10, steps=s) == pytest.approx(1e-3, abs=1e-15)  # held after the anneal
    assert kdrl_beta(0, steps=s) == pytest.approx(5e-3, abs=1e-15)
    values = [kdrl_beta(k, steps=s) for k in range(1, s + 1)]
    steps = [a - b for a, b in zip(values, values[1:])]
    assert all(d == pytest.approx(4e-3 / (s - 1), rel=1e-9) for d in steps)  # linear, decreasing
    for k in (1, 7, 26, 50, 80):
        assert kdrl_beta(k, beta_start=0.2, beta_end=0.05, steps=s) == pytest.approx(
            ref.kdrl_beta(k, beta_start=0.2, beta_end=0.05, steps=s), abs=1e-15)
    assert kdrl_beta(1, steps=1) == 5e-3 and kdrl_beta(3, steps=1) == 5e-3


def test_gopd_zero_reward_when_teacher_is_the_policy_and_lambda_is_one():
    x, _, _ = _inputs(9, 17, seed=11)
    adv, _ = DISTILL.call("gopd", x["logp"], x["old_logp"], x["adv"], x["mask"], old_logp=x["old_logp"],
                          ref_logp=None, lam=1.0)
    assert (adv == 0).all()
    # with the outcome advantage on top, what is left is exactly that advantage
    adv, _ = DISTILL.call("gopd", x["logp"], x["old_logp"], x["adv"], x["mask"], old_logp=x["old_logp"],
                          ref_logp=x["ref_logp"], lam=1.0, outcome_weight=1.0)
    torch.testing.assert_close(adv, torch.where(x["mask"], x["adv"], torch.zeros_like(adv)), rtol=0, atol=0)


def test_gopd_lambda_scales_the_teacher_over_reference_reward():
    """r(λ) − r(1) = (λ − 1)(ℓ_T − ℓʳ): extrapolation adds the teacher's implicit reward over the reference."""
    x, teacher, _ = _inputs(6, 25, seed=4)
    r1 = gopd_reward(teacher, x["old_logp"], None, x["mask"], lam=1.0)
    r2 = gopd_reward(teacher, x["old_logp"], x["ref_logp"], x["mask"], lam=1.25)
    m = x["mask"]
    torch.testing.assert_close(r2[m] - r1[m], 0.25 * (teacher - x["ref_logp"])[m], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gopd_lambda = 1.0"):
        gopd_reward(teacher, x["old_logp"], None, x["mask"], lam=1.25)


def test_gopd_advantage_is_detached_and_zero_off_mask():
    x, teacher, _ = _inputs(5, 12, seed=8)
    old = torch.nan_to_num(x["old_logp"]).requires_grad_(True)
    adv, _ = DISTILL.call("gopd", x["logp"], teacher, x["adv"], x["mask"], old_logp=old, ref_logp=x["ref_logp"])
    assert not adv.requires_grad
    assert (adv[~x["mask"]] == 0).all() and torch.isfinite(adv).all()


def test_none_passes_through():
    x, teacher, _ = _inputs(4, 5, seed=1)
    adv, per_tok = DISTILL.call("none", x["logp"], teacher, x["adv"], x["mask"])
    assert adv is x["adv"] and (per_tok == 0).all()
