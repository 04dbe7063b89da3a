"""Asynchronous rollouts (rollout.async_rollouts): 3 training steps with the lag visible and corrected, and
an exact resume (the in-flight batch is regenerated from the checkpoint's engine weights and prompt state)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpokit.config import load_config
from grpokit.train import loop

BASE = {
    "model.name": "tiny-char", "model.precision": "fp32", "data.task": "copy2", "data.heldout_size": 0,
    "rollout.prompts_per_step": 3, "rollout.group_size": 3, "rollout.max_new_tokens": 5,
    "rollout.async_rollouts": True, "train.micro_batch_size": 4, "train.lr": 1e-2, "train.final_eval": False,
    "train.progress": False, "train.report": False, "train.tensorboard": False, "train.keep_last": 10,
    "train.threads": 1, "train.deterministic": True, "rewards.functions": ["copy2_digits"],
}
NOT_COMPARED = ("time/", "async/")  # wall-clock numbers


def cfg_for(run: Path, **extra: object):
    over = {**BASE, "train.run_dir": str(run), **extra}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in rows]


def test_three_async_steps_train_on_batches_one_update_old(warm_tiny: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # the SFT-warmed model: its groups have mixed rewards, so every update moves the policy and the lag is real
    loop.train(cfg_for(run, **{"model.name": warm_tiny, "train.steps": 3, "data.heldout_size": 3,
                               "train.final_eval": True}))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # step 1's batch comes from the initial weights, which the trainer still has: μ = ℓ° to fp32 rounding;
    # steps 2 and 3 train on a batch sampled before the previous update: the lag shows, and 'auto' corrects it
    assert rows[0]["mismatch/abs_max"] < 1e-4
    for prev, r in zip(rows, rows[1:]):
        assert prev["frac_zero_var_groups"] < 1, (
            f"step {prev['step']} had no group with mixed rewards, so its update did not move the policy and "
            "the next batch has no lag to show")
        assert r["mismatch/abs_max"] > 1e-3 and r["mismatch/k3"] > 0, r
        assert r["correction/weight/min"] < 1 or r["correction/weight/max"] > 1
    for r in rows:
        assert 0 <= r["async/overlap"] <= 1 and r["async/wait"] >= 0 and r["loss"] == r["loss"]
    assert "correction/weight/mean" in rows[0]  # on from the start in async mode
    final = load_file(str(run / "final" / "model.safetensors"))
    ckpt = load_file(str(run / "checkpoints" / "step_000003" / "sampler.safetensors"))
    assert any(not torch.equal(final[k], ckpt[k]) for k in ckpt if k in final)  # the engine held older weights
    ev = json.loads((run / "eval.json").read_text())
    assert ev["before"]["n"] == ev["after"]["n"] == 3  # held-out evaluation runs on the idle engine


class Stop(Exception):
    pass


def test_stopped_and_resumed_async_run_equals_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 2's checkpoint (step 3's batch in flight), then resumed: the same metrics and weights."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    sets = {"train.steps": 4, "train.save_every": 1}
    loop.train(cfg_for(full, **sets))

    real = loop.train_step

    def stop_at_3(ctx):
        if ctx.state["step"] == 3:
            raise Stop
        return real(ctx)

    monkeypatch.setattr(loop, "train_step", stop_at_3)
    with pytest.raises(Stop):
        loop.train(cfg_for(cut, **sets))
    monkeypatch.setattr(loop, "train_step", real)
    assert (cut / "checkpoints" / "step_000002" / "sampler.safetensors").exists()
    loop.train(cfg_for(cut, **sets), resume=cut)

    assert metrics(cut) == metrics(full)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run extended by more steps also matches the longer run
    short = tmp_path / "short"
    loop.train(cfg_for(short, **{"train.steps": 2, "train.save_every": 1}))
    loop.train(cfg_for(short, **sets), resume=short)
    assert metrics(short) == metrics(full)
