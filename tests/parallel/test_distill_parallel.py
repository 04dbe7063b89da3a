"""Distillation under torchrun (2 gloo ranks): the teacher is held whole on every rank, like the reference,
and its scoring pass stays in lockstep, so 2 ranks train what one process trains (docs/catalogue.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_data_parallel import one_and_two_ranks, setup_dir, start  # noqa: F401  (fixtures)

CASES = {
    # G-OPD with lambda != 1 reads the teacher and the reference; 3 prompts on 2 ranks: uneven row counts
    "gopd-fsdp2": {"dist.strategy": "fsdp2", "algo.distill": "gopd", "algo.gopd_lambda": 1.25, "rollout.prompts_per_step": 3},
    # KDRL's teacher term in the loss, DDP
    "kdrl-ddp": {"dist.strategy": "ddp", "algo.distill": "kdrl", "algo.kdrl_beta_start": 0.5, "algo.kdrl_responses": "all"},
}


@pytest.fixture(scope="module")
def teacher_dir(setup_dir: Path) -> Path:
    """A differently seeded tiny-char model: the same tokenizer, other log-probs."""
    from grpokit.models import make_tiny

    model, tok = make_tiny(seed=1)
    model.save_pretrained(setup_dir / "teacher")
    tok.save_pretrained(setup_dir / "teacher")
    return setup_dir / "teacher"


@pytest.mark.slow  # about 20-25 s a case on 2 cores (two training runs)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_two_ranks_with_a_teacher_match_one_process(setup_dir: Path, start: dict, teacher_dir: Path, case: str) -> None:
    rows, ref = one_and_two_ranks(setup_dir, start, case, {"model.teacher": str(teacher_dir), **CASES[case]})
    for a, b in zip(rows, ref):
        assert a["distill/kl_teacher"] > 0
        assert a["distill/kl_teacher"] == pytest.approx(b["distill/kl_teacher"], rel=1e-4, abs=1e-6)
