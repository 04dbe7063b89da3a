"""Group-relative advantages (SPEC section 1) vs their loop twins, plus properties."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.algo.advantages import ADVANTAGES
from grpokit.algo.masked import (
    group_count,
    group_max,
    group_mean,
    group_min,
    group_std,
    group_sum,
    masked_mean,
    masked_sum,
)
import reference as ref

NAMES = ["grpo", "dr_grpo", "batch_std", "rloo"]


def _ragged(seed: int, b: int = 23):
    """Non-contiguous ragged groups (sizes 1..9), mixed binary/continuous rewards, a flat group."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 5, 9, 3]
    ids = torch.tensor([uid for uid, n in zip([41, 7, 1000, 3, 88, 5], sizes) for _ in range(n)])
    perm = torch.randperm(len(ids), generator=g)
    ids = ids[perm]
    rewards = torch.randn(len(ids), generator=g)
    rewards = torch.where(ids == 88, (rewards > 0).float(), rewards)  # a binary group
    rewards = torch.where(ids == 5, torch.full_like(rewards, 0.1), rewards)  # a flat group of 3
    return rewards, ids


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("std", ["unbiased", "population"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_twin_on_ragged_groups(name, std, seed):
    rewards, ids = _ragged(seed)
    out = ADVANTAGES.call(name, rewards, ids, eps=1e-6, std=std)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    torch.testing.assert_close(out.double(), ref.advantages(name, rewards, ids, std=std), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_flat_and_singleton_groups_are_exactly_zero(name):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 1.0, 0.0, 1.0])
    ids = torch.tensor([5, 5, 5, 9, 2, 2, 2])  # 5: flat (0.1 is not exact in float32), 9: singleton
    out = ADVANTAGES.call(name, rewards, ids)
    assert (out[:4] == 0).all()
    assert (out[4:] != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_empty_and_single(name):
    assert ADVANTAGES.call(name, torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert ADVANTAGES.call(name, torch.ones(1), torch.zeros(1, dtype=torch.long)).tolist() == [0.0]


def test_std_convention_and_values():
    rewards, ids = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long)
    # mean 0.25; unbiased std = sqrt(0.75/3) = 0.5; population = sqrt(0.75/4)
    unb = ADVANTAGES.call("grpo", rewards, ids, std="unbiased", eps=0.0)
    pop = ADVANTAGES.call("grpo", rewards, ids, std="population", eps=0.0)
    torch.testing.assert_close(unb, torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pop, torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.1875**0.5, rtol=1e-6, atol=1e-6)
    rl = ADVANTAGES.call("rloo", rewards, ids)
    torch.testing.assert_close(rl, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="population"):
        ADVANTAGES.call("grpo", rewards, ids, std="sample")


def test_no_grad_flows():
    rewards = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    for name in NAMES:
        assert not ADVANTAGES.call(name, rewards, torch.zeros(3, dtype=torch.long)).requires_grad


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.floats(-5, 5, width=32)), min_size=1, max_size=30),
    st.sampled_from(["grpo", "dr_grpo", "rloo"]),
    st.sampled_from(["unbiased", "population"]),
)
def test_property_sum_to_zero_per_group(pairs, name, std):
    ids = torch.tensor([p[0] for p in pairs])
    rewards = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    out = ADVANTAGES.call(name, rewards, ids, std=std).double()
    for g in ids.unique():
        sel = ids == g
        scale = 1.0 + float(out[sel].abs().sum())
        assert abs(float(out[sel].sum())) <= 1e-5 * scale


def test_masked_group_helpers_match_loops():
    rewards, ids = _ragged(3)
    r = rewards.double()
    for i in range(len(ids)):
        members = r[ids == ids[i]].tolist()
        assert group_sum(r, ids)[i] == pytest.approx(sum(members), rel=1e-12)
        assert group_mean(r, ids)[i] == pytest.approx(sum(members) / len(members), rel=1e-12)
        assert group_count(ids)[i] == len(members)
        assert group_min(r, ids)[i] == min(members) and group_max(r, ids)[i] == max(members)
        assert group_std(r, ids, unbiased=True)[i] == pytest.approx(ref._std(members, True), rel=1e-10, abs=1e-12)
        assert group_std(r, ids, unbiased=False)[i] == pytest.approx(ref._std(members, False), rel=1e-10, abs=1e-12)


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 2.0, 4.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert float(masked_sum(x, mask)) == 10.0
    assert masked_mean(x, mask, dim=-1).tolist() == [2.0, 3.0]
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0
