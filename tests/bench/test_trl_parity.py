"""First-step loss parity with TRL's GRPOTrainer (trl 1.16.0) on the tiny model, fp32.

TRL's own loss code path (`GRPOTrainer.compute_loss` on an `inputs` dict laid out as
`_generate_and_score_completions` returns it) and `grpokit.train.step.micro_batch_loss` see the same
sampled completions, advantages, old and reference log-probs (perturbed so the clip is active). Every
setting the two libraries share must agree to 1e-5 relative on the loss; the settings that differ by
definition (TRL's bnpo over several micro-batches, TRL's default IS-corrected KL) must differ.
The comparison itself lives in benchmarks/vs_trl.py (`run_parity`), which also prints it as a table.
"""
from __future__ import annotations


import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402


@pytest.fixture(scope="module")
def parity_rows(vs_trl):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to gain from threads (and lose on a busy machine)
    try:
        yield vs_trl.run_parity("tiny", n_prompts=4, G=4, max_new_tokens=16, seed=0)
    finally:
        torch.set_num_threads(prev)


def test_shared_settings_agree(vs_trl, parity_rows):
    shared = [r for r in parity_rows if r["expect_equal"]]
    assert len(shared) >= 12
    bad = {r["name"]: (r["trl_loss"], r["grpokit_loss"], r["rel_diff"]) for r in shared if not r["rel_diff"] <= 1e-5}
    assert not bad, f"loss differs from TRL beyond 1e-5 relative: {bad}"
    # the gradients follow (same graph up to float rounding); a loose bound that still catches a wrong term
    bad = {r["name"]: r["grad_rel_diff"] for r in shared if not r["grad_rel_diff"] <= 1e-4}
    assert not bad, f"gradient differs from TRL: {bad}"


def test_every_shared_family_is_covered(parity_rows):
    seen = {(r["trl"]["loss_type"], r["trl"].get("importance_sampling_level", "token"), r["trl"]["beta"] > 0, r["split"])
            for r in parity_rows if r["expect_equal"]}
    for loss_type in ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "luspo"):
        assert any(s[0] == loss_type for s in seen), loss_type
    assert any(s[2] for s in seen), "no beta > 0 setting"
    assert any(s[1] == "sequence" for s in seen), "no sequence-level (GSPO) setting"
    assert any(s[3] > 1 for s in seen), "no multi-micro-batch setting"
    assert any(r["trl"].get("delta") for r in parity_rows if r["expect_equal"]), "no delta / dual-clip setting"


def test_clipping_is_active(parity_rows):
    """The comparison is only meaningful if the clip (and the dual clip / delta) actually bites."""
    for r in parity_rows:
        assert r["clip_frac"] > 0.05, r["name"]
        if r["trl"].get("delta"):
            assert r["dual_frac"] > 0.0, r["name"]


def test_different_definitions_differ(parity_rows):
    """bnpo over 2 micro-batches (local token counts) and TRL's default IS-weighted KL are not SPEC 3/4."""
    diff = [r for r in parity_rows if not r["expect_equal"]]
    assert {r["name"] for r in diff} >= {"bnpo, 2 micro-batches", "dapo, beta 0.04, TRL default KL"}
    for r in diff:
        assert r["rel_diff"] > 1e-4, (r["name"], r["rel_diff"])
