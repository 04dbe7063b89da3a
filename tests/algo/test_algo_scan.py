"""The blocked discounted reverse scan vs its loop twins (definition and recursion)."""
import math

import pytest
import torch

from grpokit.algo.scan import DEFAULT_BLOCK, discounted_reverse_cumsum, gamma_from_half_life
import reference as ref

GAMMAS = [0.0, 0.5, gamma_from_half_life(32.0), 1.0]


def test_recursion_twin_matches_definition():
    x = torch.randn(3, 40, dtype=torch.float64)
    for gamma in GAMMAS:
        torch.testing.assert_close(ref.reverse_scan(x, gamma), ref.reverse_scan_direct(x, gamma),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 7, 63, 64, 65, 128, 129, 300, 1000])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("block", [2, 16, DEFAULT_BLOCK])
def test_scan_matches_twin_float64(t, gamma, block):
    x = torch.randn(3, t, dtype=torch.float64)
    out = discounted_reverse_cumsum(x, gamma, block=block)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.reverse_scan(x, gamma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_scan_float32_long(gamma):
    x = torch.randn(2, 20000)
    out = discounted_reverse_cumsum(x, gamma)
    assert out.dtype == torch.float32
    want = ref.reverse_scan(x, gamma)
    scale = ref.reverse_scan(x.abs(), gamma)  # Σ γ^(k−t)|x_k|: the sum's condition number
    err = (out.double() - want).abs()
    assert (err <= 1e-6 * scale + 1e-6).all(), float((err / (scale + 1e-6)).max())


def test_scan_131072_tau32_finite_and_exact():
    """The case the naive cumsum(x·γ^(−t))·γ^t gets wrong (γ^(−t) overflows past t ≈ 4000)."""
    gamma = gamma_from_half_life(32.0)
    x = torch.randn(2, 131072)
    out = discounted_reverse_cumsum(x, gamma)
    assert torch.isfinite(out).all()
    want = ref.reverse_scan(x, gamma)
    assert float((out.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    naive = torch.cumsum(x * gamma ** -torch.arange(131072.0), -1)  # what we must not do
    assert not torch.isfinite(naive).all()


def test_gamma_one_is_flip_cumsum_flip():
    x = torch.randn(4, 5000, dtype=torch.float64)
    torch.testing.assert_close(discounted_reverse_cumsum(x, 1.0), x.flip(-1).cumsum(-1).flip(-1),
                               rtol=1e-12, atol=1e-10)


def test_gamma_zero_is_identity_and_shapes():
    x = torch.randn(2, 3, 70)
    torch.testing.assert_close(discounted_reverse_cumsum(x, 0.0), x, rtol=0, atol=0)
    assert discounted_reverse_cumsum(x, 0.5).shape == (2, 3, 70)
    assert discounted_reverse_cumsum(torch.zeros(0, 5), 0.5).shape == (0, 5)
    assert discounted_reverse_cumsum(torch.zeros(3, 0), 0.5).shape == (3, 0)


def test_scan_is_differentiable():
    x = torch.randn(2, 300, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 300, dtype=torch.float64)
    (discounted_reverse_cumsum(x, 0.9, block=16) * w).sum().backward()
    # dF_t/dx_k = γ^(k−t) for k ≥ t, so grad_k = Σ_{t≤k} γ^(k−t) w_t: a forward scan of w
    want = ref.reverse_scan(w.flip(-1), 0.9).flip(-1)
    torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-10)


def test_gamma_from_half_life():
    assert gamma_from_half_life(32.0) == 2.0 ** (-1 / 32)
    assert gamma_from_half_life(32.0) ** 32 == pytest.approx(0.5, rel=1e-14)
    assert gamma_from_half_life(math.inf) == 1.0
    assert gamma_from_half_life(0.0) == 0.0
    assert gamma_from_half_life(1e-4) == 0.0  # underflows to the γ → 0 limit
    with pytest.raises(ValueError, match="tau"):
        gamma_from_half_life(-1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        discounted_reverse_cumsum(torch.zeros(1, 3), 1.5)
    with pytest.raises(ValueError, match="block"):
        discounted_reverse_cumsum(torch.zeros(1, 3), 0.5, block=1)


def test_non_contiguous_input():
    x = torch.randn(300, 4, dtype=torch.float64).t()  # [4, 300], stride (1, 4)
    torch.testing.assert_close(discounted_reverse_cumsum(x, 0.9, block=16), ref.reverse_scan(x, 0.9),
                               rtol=1e-10, atol=1e-10)
