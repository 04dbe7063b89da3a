"""Rollout correction in the trainer (SPEC 12): a bf16 sampler under an fp32 trainer shows mismatch and the
correction engages; the fp32 hf engine agrees with the trainer and leaves it off; bypass skips the ℓ° pass;
the config refuses what cannot work; the report plots the metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpokit.config import ConfigError, load_config
from grpokit.train import update as update_mod
from grpokit.train.collect import collect
from grpokit.train.loop import build_batch, setup, train, update

BASE = {
    "model.name": "tiny-char", "model.precision": "fp32", "data.task": "copy2", "data.heldout_size": 0,
    "rollout.prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 6,
    "train.steps": 2, "train.micro_batch_size": 8, "train.lr": 1e-3, "train.final_eval": False,
    "train.progress": False, "train.report": False, "train.tensorboard": False,
    "rewards.functions": ["copy2_digits"],
}


def cfg_for(run: Path, **extra: object):
    over = {**BASE, "train.run_dir": str(run), **extra}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bf16_sampler_shows_mismatch_and_auto_turns_token_tis_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(cfg_for(run, **{"rollout.precision": "bf16"}))
    rows = metrics(run)
    assert len(rows) == 2
    for r in rows:
        assert r["mismatch/abs_max"] > 1e-3 and r["mismatch/k3"] > 0, r  # μ (bf16) ≠ ℓ° (fp32)
        assert r["correction/weight/min"] < 1 or r["correction/weight/max"] > 1, r  # w engaged
        assert 0 < r["correction/weight/max"] <= 2.0 and r["correction/masked_tokens"] == 0
        for k in ("correction/weight/mean", "correction/truncated_tokens", "correction/truncated_seqs", "loss"):
            assert r[k] == r[k], k  # logged and finite


def test_bf16_sampler_with_a_tight_token_mask_masks_tokens(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(cfg_for(run, **{"rollout.precision": "bf16", "rollout.correction": "token_mask",
                          "rollout.correction_low": 0.999, "rollout.correction_high": 1.001, "train.steps": 1,
                          "train.updates_per_rollout": 2}))  # the recomputed-ℓ° path (the test above: ℓ° from the update)
    (r,) = metrics(run)
    assert 0 < r["correction/masked_tokens"] <= 1 and r["correction/masked_seqs"] > 0
    assert r["correction/weight/min"] == 0.0 and r["correction/truncated_tokens"] == 0
    assert r["tokens/trained"] > 0 and r["loss"] == r["loss"]


def test_fp32_hf_engine_agrees_with_the_trainer_and_leaves_correction_off(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ctx = setup(cfg_for(run, **{"train.steps": 1}))
    assert ctx.engine.exact_logprobs
    train(cfg_for(run, **{"train.steps": 1}))
    (r,) = metrics(run)
    assert r["mismatch/abs_max"] < 1e-4, r["mismatch/abs_max"]
    assert not [k for k in r if k.startswith("correction/")]


def test_engine_says_when_its_logprobs_are_exact() -> None:
    from grpokit.models import make_tiny
    from grpokit.rollout.engine import HFEngine
    from grpokit.train.correction import resolve_mode

    model, tok = make_tiny(seed=0)
    cfg = load_config(None, [])
    assert HFEngine(model, tok, precision="fp32").exact_logprobs
    bf16 = HFEngine(model, tok, precision="bf16")
    assert not bf16.exact_logprobs
    assert resolve_mode(cfg, HFEngine(model, tok, precision="fp32")) == "none"
    assert resolve_mode(cfg, bf16) == "token_tis"
    assert resolve_mode(cfg, object()) == "token_tis"  # an engine that does not say is taken as inexact
    cfg.rollout.correction = "seq_mask"
    assert resolve_mode(cfg, HFEngine(model, tok, precision="fp32")) == "seq_mask"


def test_bypass_skips_the_old_logprob_pass_and_uses_mu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """updates_per_rollout = 2 would need an ℓ° pass; bypass takes ℓ° := μ instead (SPEC 12)."""
    calls = []
    real = update_mod.logprob_pass
    monkeypatch.setattr(update_mod, "logprob_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    for mode, want_calls in (("none", 1), ("bypass", 0)):
        calls.clear()
        ctx = setup(cfg_for(tmp_path / mode, **{"rollout.correction": mode, "train.updates_per_rollout": 2,
                                                "rollout.precision": "bf16"}))
        col = collect(ctx)
        batch = build_batch(ctx, col)
        assert len(calls) == want_calls, mode
        mu = col.batch.rollout.logprobs.float() * batch.response_mask
        assert torch.equal(batch.old_logp, mu) == (mode == "bypass")
        out, _ = update(ctx, batch, col.global_row)
        assert out["loss"] == out["loss"] and out["nonfinite_updates"] == 0
        assert torch.equal(batch.old_logp, mu) == (mode == "bypass")  # the update kept ℓ° = μ
        assert (batch.entropy[batch.response_mask] > 0).all()  # filled from the update's forward
        assert not [k for k in out if k.startswith("correction/")]


@pytest.mark.parametrize("sets,needle", [
    ({"rollout.correction": "token_tiss"}, "did you mean 'token_tis'"),
    ({"rollout.correction": "token_tis", "rollout.correction_low": 0.5}, "rollout.correction_low has no effect"),
    ({"rollout.correction": "none", "rollout.correction_high": 2.0}, "rollout.correction_high has no effect"),
    ({"rollout.correction": "geo_mask", "rollout.correction_high": 0.98}, "correction_low <= correction_high"),
    ({"rollout.correction": "seq_mask", "rollout.correction_high": -1.0}, "positive ratio"),
    ({"rollout.correction": "bypass", "train.old_logprobs": "recompute"}, "train.old_logprobs = 'auto'"),
    ({"rollout.precision": "fp16"}, "rollout.precision"),
])
def test_config_refuses_what_cannot_work(sets: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    assert needle in str(e.value)


def test_report_plots_mismatch_and_correction() -> None:
    from grpokit.report.html import build_panels

    rows = [{"step": s, "mismatch/k1": 0.01 * s, "mismatch/k3": 0.02, "mismatch/abs_max": 0.5,
             "correction/weight/mean": 1.0, "correction/weight/min": 0.6, "correction/weight/max": 2.0,
             "correction/masked_tokens": 0.0, "correction/masked_seqs": 0.0,
             "correction/truncated_tokens": 0.1, "correction/truncated_seqs": 0.3} for s in (1, 2, 3)]
    ids = [p.id for p in build_panels(rows)]
    assert {"plot-mismatch", "plot-correction-weight", "plot-correction-masked"} <= set(ids), ids
