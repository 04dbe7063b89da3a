"""SPEC 11's catalogue math (ACE, GRPO-λ, DOT, DLER, APO, RAPO): loop twins on random ragged inputs, and
the invariants each rule promises (what it may touch, and what it must leave alone)."""
from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from grpokit.algo import ADV_TRANSFORMS, KL, KL_WEIGHTS
from grpokit.algo.catalogue import (
    ace, apo_kl_weight, confidence_shift, dot_cut_lengths, grpo_lambda_penalty, truncation_penalized,
)

SEEDS = [0, 1, 2, 3]


def rows(b: int, *, seed: int, n_groups: int = 5, t_max: int = 300, p_correct: float = 0.6) -> dict[str, torch.Tensor]:
    """Ragged lengths (0 .. t_max), ragged non-contiguous groups, binary correctness, a few invalid rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([40, 3, 17, 9, 100, 55, 8][:n_groups])[torch.randint(0, n_groups, (b,), generator=g)]
    lengths = torch.randint(0, t_max + 1, (b,), generator=g)
    correct = torch.rand(b, generator=g) < p_correct
    valid = torch.rand(b, generator=g) > 0.1
    truncated = torch.rand(b, generator=g) < 0.2
    return dict(group_ids=ids, lengths=lengths, correct=correct, valid=valid, truncated=truncated)


# ---------------------------------------------------------------------------- ACE

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", [1, 7, 300])
def test_ace_matches_loop_twin(seed: int, t: int) -> None:
    x = ref.make_batch(23, t, seed=seed, spread=0.5)
    for alpha in (0.3, 1.0, 4.0):
        got = ace(x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], alpha=alpha)
        want = ref.ace(x["seq_adv"], x["mask"], x["old_logp"].nan_to_num(0.0), x["ref_logp"].nan_to_num(0.0), alpha=alpha)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        got32 = ace(x["seq_adv"].float(), x["mask"], old_logp=x["old_logp"].float(), ref_logp=x["ref_logp"].float(), alpha=alpha)
        torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_ace_leaves_nonnegative_advantages_and_only_amplifies_negative_ones() -> None:
    x = ref.make_batch(64, 50, seed=5, spread=1.0)
    a = x["seq_adv"].clone()
    a[:8] = 0.0
    out = ace(a, x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], alpha=2.0)
    assert torch.equal(out[a >= 0], a[a >= 0])  # exactly unchanged
    neg = a < 0
    assert neg.sum() > 5
    assert (out[neg] < a[neg]).all()  # strictly more negative: softplus > 0
    c = confidence_shift(x["old_logp"], x["ref_logp"], x["mask"])
    ratio = out[neg] / a[neg]
    torch.testing.assert_close(ratio, 1 + 2.0 * torch.nn.functional.softplus(c[neg]))
    # more confident errors are pushed harder: the scale is increasing in c
    order = torch.argsort(c[neg])
    assert (ratio[order][1:] >= ratio[order][:-1]).all()


def test_ace_c_is_a_masked_sum_not_a_mean() -> None:
    old = torch.tensor([[-1.0, -1.0, -1.0, float("nan")]])
    rf = torch.tensor([[-2.0, -2.0, -2.0, float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    assert float(confidence_shift(old, rf, mask)) == 3.0
    out = ace(torch.tensor([-1.0]), mask, old_logp=old, ref_logp=rf, alpha=1.0)
    torch.testing.assert_close(out, torch.tensor([-(1 + math.log1p(math.exp(3.0)))]))


def test_ace_needs_reference_and_registry_routes_alpha() -> None:
    x = ref.make_batch(4, 3, seed=0, garbage=False)
    with pytest.raises(ValueError, match="ref_logp"):
        ace(x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=None)
    assert ADV_TRANSFORMS.accepts("none") == frozenset()  # reads no log-probs: no reference is loaded for it
    assert {"old_logp", "ref_logp", "alpha"} <= ADV_TRANSFORMS.accepts("ace")
    same = ADV_TRANSFORMS.call("none", x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=None, alpha=3.0)
    assert same is x["seq_adv"]


def test_ace_composes_with_fipo() -> None:
    """ACE acts on the advantage, FIPO on the loss: FIPO's loss with ACE's advantages equals FIPO's loss
    with advantages transformed by hand, and FIPO's weights do not depend on the advantages' scale."""
    from grpokit.algo import LOSSES

    x = ref.make_batch(12, 20, seed=4, garbage=False)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, tau=4.0, f_low=0.8, f_high=1.2, safety=None, drop_seqs=False)
    a = ace(x["seq_adv"], x["mask"], old_logp=x["old_logp"], ref_logp=x["ref_logp"], alpha=1.5)
    tok = a[:, None] * x["mask"]
    per_tok, s = LOSSES.call("fipo", x["logp"], x["old_logp"], tok, x["mask"], **kw)
    want = ref.fipo(x["logp"], x["old_logp"], tok, x["mask"], **kw)
    torch.testing.assert_close(per_tok.double() * x["mask"], want["per_tok"] * x["mask"], rtol=1e-9, atol=1e-9)
    plain, s0 = LOSSES.call("fipo", x["logp"], x["old_logp"], x["seq_adv"][:, None] * x["mask"], x["mask"], **kw)
    torch.testing.assert_close(s["fipo_weight"], s0["fipo_weight"])  # FIPO's weights do not see ACE
    pos, neg = x["seq_adv"] >= 0, (x["seq_adv"] < 0) & x["mask"].any(1)
    assert torch.equal(per_tok[pos], plain[pos]) and neg.any()
    assert not torch.allclose(per_tok[neg], plain[neg])


# ---------------------------------------------------------------------------- APO / DADS

@pytest.mark.parametrize("seed", SEEDS)
def test_apo_weight_matches_loop_twin(seed: int) -> None:
    r = rows(41, seed=seed)
    adv = torch.randn(41, generator=torch.Generator().manual_seed(seed))
    for beta, e in [(0.04, math.e), (1.0, 0.5)]:
        got = apo_kl_weight(adv, r["correct"], r["valid"], r["group_ids"], beta=beta, e=e)
        want = ref.apo_kl_weight(r["correct"], r["valid"], r["group_ids"], beta=beta, e=e)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
        const = KL_WEIGHTS.call("constant", adv, r["correct"], r["valid"], r["group_ids"], beta=beta, e=e)
        assert torch.equal(const, torch.full((41,), beta, dtype=torch.float32))


def test_apo_weight_properties() -> None:
    """Wrong rows keep β; a fully solved group's correct rows get 0; weights lie in [0, β] and fall with d."""
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    correct = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    valid = torch.ones(10, dtype=torch.bool)
    w = apo_kl_weight(torch.zeros(10), correct, valid, g, beta=0.1)
    assert torch.equal(w[~correct], torch.full((3,), 0.1))
    assert torch.equal(w[:4], torch.zeros(4)) and torch.equal(w[8:], torch.zeros(2))  # d = 1
    torch.testing.assert_close(w[4], torch.tensor(0.1 * (1 - math.exp(-math.e * 0.75))))  # d = 1/4
    assert ((w >= 0) & (w <= 0.1)).all()


# ---------------------------------------------------------------------------- GRPO-λ

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("frac", [0.2, 0.5, 1.0, 0.01])
def test_grpo_lambda_matches_loop_twin(seed: int, frac: float) -> None:
    r = rows(60, seed=seed, n_groups=7)
    got = grpo_lambda_penalty(r["lengths"], r["correct"], r["valid"], r["group_ids"], frac=frac, alpha=0.6)
    want = ref.grpo_lambda_penalty(r["lengths"], r["correct"], r["valid"], r["group_ids"], frac=frac, alpha=0.6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_grpo_lambda_touches_only_correct_rows_of_the_top_groups() -> None:
    # accuracies: g5 1.0, g1 0.75, g2 0.5 (twice, tie), g9 0.0; S = 5 groups, λ = 0.4 -> ⌈2⌉ = 2 groups
    g = torch.tensor([5, 5, 1, 1, 1, 1, 2, 2, 3, 3, 9, 9])
    correct = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    lengths = torch.tensor([10, 30, 5, 7, 9, 100, 4, 4, 4, 4, 50, 60])
    valid = torch.ones(12, dtype=torch.bool)
    pen = grpo_lambda_penalty(lengths, correct, valid, g, frac=0.4, alpha=0.6)
    touched = pen != 0
    assert touched.tolist() == [True, True, True, True, True] + [False] * 7  # g5 and g1's correct rows
    # the z-score is over the correct rows only: the wrong 100-token row of g1 does not move g1's mean
    torch.testing.assert_close(pen[2:5], 0.6 * torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.sqrt(1.5)))
    assert pen[1] > pen[0]  # the longer correct answer is penalised more
    # ties at the cut go to the group that comes first (smaller key, the batch order)
    pen3 = grpo_lambda_penalty(lengths, correct, valid, g, frac=0.6, alpha=0.6)  # 3 groups: g5, g1, then g2 (before g3)
    assert (pen3[6:8] != 0).tolist() == [True, False] and (pen3[8:10] == 0).all()
    # 0.2 x 15 = 3.0000000000000004 must select 3 groups, not 4
    g15 = torch.arange(15).repeat_interleave(2)
    c15 = torch.ones(30, dtype=torch.bool)
    p15 = grpo_lambda_penalty(torch.arange(30), c15, torch.ones(30, dtype=torch.bool), g15, frac=0.2, alpha=1.0)
    assert int((p15 != 0).sum()) == 6


def test_grpo_lambda_penalty_is_bounded_and_zero_std_gives_half() -> None:
    g = torch.tensor([0, 0, 0, 1, 1])
    correct = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    pen = grpo_lambda_penalty(torch.tensor([8, 8, 8, 3, 9]), correct, torch.ones(5, dtype=torch.bool), g, frac=1.0, alpha=0.6)
    torch.testing.assert_close(pen, torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0], dtype=torch.float64))
    r = rows(200, seed=9)
    p = grpo_lambda_penalty(r["lengths"], r["correct"], r["valid"], r["group_ids"], frac=1.0, alpha=0.6)
    assert ((p >= 0) & (p < 0.6)).all()


# ---------------------------------------------------------------------------- DOT

def outlier_groups(seed: int, G: int = 16, n_groups: int = 6) -> dict[str, torch.Tensor]:
    """Groups of G where some are all-correct and some members are far-out long responses."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_groups).repeat_interleave(G)[torch.randperm(n_groups * G, generator=g)] * 7 + 3
    lengths = torch.randint(20, 60, (n_groups * G,), generator=g)
    far = torch.rand(n_groups * G, generator=g) < 0.08
    lengths = torch.where(far, lengths + torch.randint(150, 900, lengths.shape, generator=g), lengths)
    good_group = torch.rand(n_groups, generator=g) < 0.6
    correct = good_group[(ids - 3) // 7] | (torch.rand(n_groups * G, generator=g) < 0.5)
    return dict(group_ids=ids, lengths=lengths, correct=correct, valid=torch.ones(n_groups * G, dtype=torch.bool))


@pytest.mark.parametrize("seed", SEEDS + [4, 5, 6, 7])
def test_dot_matches_loop_twin(seed: int) -> None:
    r = outlier_groups(seed)
    for k, m in [(3.0, 32), (1.0, 5), (0.0, 1)]:
        got = dot_cut_lengths(r["lengths"], r["correct"], r["valid"], r["group_ids"], std_mult=k, margin=m)
        want = ref.dot_cut_lengths(r["lengths"], r["correct"], r["valid"], r["group_ids"], std_mult=k, margin=m)
        assert torch.equal(got, want), (seed, k, m)
    r = rows(50, seed=seed, p_correct=0.9)  # ragged groups, invalid rows
    got = dot_cut_lengths(r["lengths"], r["correct"], r["valid"], r["group_ids"], std_mult=0.5, margin=3)
    assert torch.equal(got, ref.dot_cut_lengths(r["lengths"], r["correct"], r["valid"], r["group_ids"], std_mult=0.5, margin=3))


def test_dot_cuts_at_least_once_in_the_random_cases() -> None:
    """The precondition of the twin test: the inputs do exercise cuts (with the paper's k = 3, m = 32)."""
    n = 0
    for seed in SEEDS + [4, 5, 6, 7]:
        r = outlier_groups(seed)
        n += int((dot_cut_lengths(r["lengths"], r["correct"], r["valid"], r["group_ids"]) < r["lengths"]).sum())
    assert n >= 3


def test_dot_touches_only_all_correct_groups_and_only_rows_past_the_margin() -> None:
    for seed in range(8):
        r = outlier_groups(seed)
        L, gid = r["lengths"], r["group_ids"]
        new = dot_cut_lengths(L, r["correct"], r["valid"], gid)
        cut = new < L
        assert (new <= L).all()
        for i in cut.nonzero().flatten().tolist():
            members = gid == gid[i]
            assert r["correct"][members].all(), "a cut row's group must be all-correct"
            xs = L[members].double()
            cut_at = math.floor(float(xs.mean() + 3 * xs.std()))
            assert int(new[i]) == cut_at and int(L[i]) - cut_at >= 32
        not_all = torch.tensor([not bool(r["correct"][gid == x].all()) for x in gid.tolist()])
        assert not cut[not_all].any()
    # a group with one wrong member is never cut; a singleton (std 0) cuts nothing (L − T = 0)
    L = torch.tensor([10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10_000])
    ok = torch.ones(12, dtype=torch.bool)
    g = torch.zeros(12, dtype=torch.long)
    assert dot_cut_lengths(L, ok, ok, g).tolist()[-1] < 10_000  # 11 short + 1 long in 12: z = 3.18 > 3
    ok2 = ok.clone()
    ok2[0] = False
    assert torch.equal(dot_cut_lengths(L, ok2, ok, g), L)
    assert torch.equal(dot_cut_lengths(torch.tensor([500]), ok[:1], ok[:1], g[:1]), torch.tensor([500]))


def test_dot_needs_groups_of_eleven_for_three_sigma() -> None:
    """With the unbiased std the largest z-score in a group of G is (G − 1)/√G: below 3 for G ≤ 10, so the
    paper's rule can cut nothing in groups of 8 however long the outlier (a documented limit)."""
    for G in (8, 10, 11, 16):
        L = torch.tensor([10] * (G - 1) + [10_000])
        ok = torch.ones(G, dtype=torch.bool)
        cut = bool((dot_cut_lengths(L, ok, ok, torch.zeros(G, dtype=torch.long)) < L).any())
        assert cut == ((G - 1) / math.sqrt(G) > 3), G


# ---------------------------------------------------------------------------- DLER truncation penalty

@pytest.mark.parametrize("seed", SEEDS)
def test_truncation_penalty_matches_loop_twin(seed: int) -> None:
    r = rows(40, seed=seed)
    for cap in (0, 1, 150, 300):
        got = truncation_penalized(r["lengths"], r["truncated"], cap=cap)
        assert torch.equal(got, ref.truncation_penalized(r["lengths"], r["truncated"], cap=cap))
    assert torch.equal(truncation_penalized(r["lengths"], r["truncated"], cap=0), r["truncated"])


# ---------------------------------------------------------------------------- RAPO forward KL

@pytest.mark.parametrize("seed", SEEDS)
def test_forward_kl_matches_loop_twin_and_is_nonnegative(seed: int) -> None:
    x = ref.make_batch(9, 33, seed=seed, spread=2.0, garbage=False)
    got = KL.call("forward_kl", x["logp"], x["ref_logp"])
    want = ref.forward_kl(x["logp"], x["ref_logp"])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got32 = KL.call("forward_kl", x["logp"].float(), x["ref_logp"].float())
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-5)
    assert (got >= 0).all()


def test_forward_kl_direction_gradient_and_clamp() -> None:
    """w = π_ref/π_θ: the gradient in ℓ is w·δ (forward KL), not δ (reverse); the mean over samples of
    π_θ is KL(π_ref ‖ π_θ) exactly for a categorical."""
    d = torch.linspace(-3, 3, 13, dtype=torch.float64)
    lp = d.clone().requires_grad_(True)
    KL.call("forward_kl", lp, torch.zeros_like(d)).sum().backward()
    torch.testing.assert_close(lp.grad, torch.exp(-d) * d)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)  # π_ref
    est = (p * KL.call("forward_kl", p.log(), q.log())).sum()
    torch.testing.assert_close(est, (q * (q / p).log()).sum())
    big = KL.call("forward_kl", torch.tensor([[-1e4]]), torch.tensor([[0.0]]))  # δ clamped at −20: finite
    assert torch.isfinite(big).all()
