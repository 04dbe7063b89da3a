"""SPEC 11's catalogue under torchrun (2 gloo ranks): GRPO-λ picks its top-λ groups over every rank's groups and
ACE reads the reference on every rank, so 2 ranks train what one process trains (docs/catalogue.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_data_parallel import one_and_two_ranks, setup_dir, start  # noqa: F401  (fixtures)

CASES = {
    # the top half of the groups by accuracy, chosen over the global batch; 3 prompts on 2 ranks: uneven rows;
    # a binary reward (correct = reward 1), right about half the time
    "grpo_lambda-ddp": {"dist.strategy": "ddp", "algo.transforms": ["grpo_lambda"], "algo.grpo_lambda_frac": 0.5,
                        "rollout.prompts_per_step": 3, "rewards.functions": ["dist_reward:starts_with_digit"]},
    # ACE with beta = 0: the reference is loaded for c_i; FSDP2
    "ace-fsdp2": {"dist.strategy": "fsdp2", "algo.adv_transform": "ace", "algo.ace_alpha": 2.0},
}


@pytest.mark.slow  # about 20-25 s a case on 2 cores (two training runs)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_two_ranks_with_catalogue_options_match_one_process(setup_dir: Path, start: dict, case: str) -> None:
    rows, ref = one_and_two_ranks(setup_dir, start, case, CASES[case])
    if case.startswith("grpo_lambda"):
        assert any(r["reward/length_penalty/mean"] < 0 for r in ref), "no answer was penalised: the check would be vacuous"
        for a, b in zip(rows, ref):
            assert a["reward/length_penalty/mean"] == pytest.approx(b["reward/length_penalty/mean"], rel=1e-5, abs=1e-7)
