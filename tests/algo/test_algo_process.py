"""credit = "process" (SPEC 13, DeepSeekMath §4.1.3): vectorised vs the loop twin, and hand cases."""
import pytest
import torch

from grpokit.algo import CREDIT
from grpokit.algo.process import process, process_step_advantages
from reference import process_credit


def ragged(b: int, t: int, k: int, *, seed: int, n_groups: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[torch.rand(b, generator=g) < 0.3] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B,T]
    n_steps = torch.randint(0, k + 1, (b,), generator=g)
    step_mask = torch.arange(k)[None, :] < n_steps[:, None]  # [B,K]
    ends = torch.sort(torch.randint(0, max(t, 1), (b, k), generator=g), dim=1).values
    ends = torch.minimum(ends, (lengths[:, None] - 1).clamp(min=0))  # steps end inside the response
    rewards = torch.rand(b, k, generator=g, dtype=torch.float64)
    rewards[~step_mask] = float("nan")  # padding must not leak
    group_ids = torch.tensor([100, 7, 55, 3, 12][:n_groups])[torch.randint(0, n_groups, (b,), generator=g)]
    return rewards, ends, step_mask, group_ids, mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(12, 9, 4), (7, 40, 6), (30, 3, 2), (1, 5, 3)])
@pytest.mark.parametrize("std", ["unbiased", "population"])
def test_process_matches_loop_twin(seed, shape, std):
    b, t, k = shape
    r, ends, sm, gid, mask = ragged(b, t, k, seed=seed)
    got = CREDIT.call("process", torch.randn(b), mask, step_rewards=r, step_ends=ends, step_mask=sm,
                      group_ids=gid, std=std, old_logp=None, ref_logp=None, beta=0.0, divergence="k1")
    want = process_credit(r, ends, sm, gid, mask, std=std)
    assert got.dtype == torch.float64 and got.shape == (b, t)  # float64 kept (to_f32), for exactness
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_hand_case():
    # one group, two sequences; steps: seq0 ends at tokens 1 and 3 (r=1, 0), seq1 ends at 2 (r=0.5)
    r = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    sm = torch.tensor([[True, True], [True, False]])
    ends = torch.tensor([[1, 3], [2, 0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    a = process(torch.zeros(2), mask, step_rewards=r, step_ends=ends, step_mask=sm, group_ids=torch.tensor([0, 0]))
    mu, sd = 0.5, 0.5  # mean of 1, 0, 0.5; unbiased std = sqrt(0.5/2)
    n1, n0, nh = (1 - mu) / (sd + 1e-6), (0 - mu) / (sd + 1e-6), 0.0
    want = torch.tensor([[n1 + n0, n1 + n0, n0, n0], [nh, nh, nh, 0.0]])
    torch.testing.assert_close(a, want, atol=1e-6, rtol=0)


def test_flat_and_singleton_groups_are_zero():
    sm = torch.tensor([[True, True], [True, False], [True, False]])
    r = torch.tensor([[0.5, 0.5], [0.5, 0.0], [0.9, 0.0]])
    a = process_step_advantages(r, sm, torch.tensor([0, 0, 1]))
    assert torch.equal(a, torch.zeros(3, 2))


def test_missing_step_rewards_says_what_to_do():
    with pytest.raises(ValueError, match="rewards.functions = \\['prm'\\]"):
        process(torch.zeros(2), torch.ones(2, 3, dtype=torch.bool))
