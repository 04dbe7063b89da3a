"""KL estimators (SPEC section 4): twins, hand-derived gradients, the clamp."""
import pytest
import torch

from grpokit.algo.kl import KL
import reference as ref


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
@pytest.mark.parametrize("b,t", [(3, 1), (5, 40)])
def test_matches_twin(name, b, t):
    x = ref.make_batch(b, t, seed=t, garbage=False, spread=1.0)
    torch.testing.assert_close(KL.call(name, x["logp"], x["ref_logp"]), ref.kl(name, x["logp"], x["ref_logp"]),
                               rtol=1e-12, atol=1e-12)
    out32 = KL.call(name, x["logp"].float(), x["ref_logp"].float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref.kl(name, x["logp"], x["ref_logp"]), rtol=1e-5, atol=1e-6)


def _grad(name, delta):
    ref_logp = torch.full_like(delta, -1.0)
    logp = (ref_logp + delta).requires_grad_(True)
    KL.call(name, logp, ref_logp.requires_grad_(True)).sum().backward()
    return logp.grad


def test_hand_gradients():
    delta = torch.linspace(-3, 3, 13, dtype=torch.float64)[None, :]
    torch.testing.assert_close(_grad("k1", delta), torch.ones_like(delta), rtol=0, atol=0)
    torch.testing.assert_close(_grad("k2", delta), delta, rtol=1e-12, atol=1e-12)  # δ: reverse-KL grad
    torch.testing.assert_close(_grad("k3", delta), 1 - torch.exp(-delta), rtol=1e-12, atol=1e-12)


def test_k3_nonnegative_and_clamped():
    delta = torch.tensor([[-200.0, -25.0, -1e-8, 0.0, 1e-8, 25.0, 200.0]])
    out = KL.call("k3", delta, torch.zeros_like(delta))
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert out[0, 3] == 0.0
    g = _grad("k3", delta.double())
    assert g[0, 0] == 0.0 and g[0, -1] == 0.0  # outside the ±20 clamp the value is frozen


def test_reference_is_detached():
    logp = torch.randn(2, 3, requires_grad=True)
    ref_logp = torch.randn(2, 3, requires_grad=True)
    KL.call("k3", logp, ref_logp).sum().backward()
    assert ref_logp.grad is None and logp.grad is not None
