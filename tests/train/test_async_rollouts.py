"""Asynchronous rollouts (rollout.async_rollouts): 3 training steps with the lag visible and corrected, and
an exact resume (the in-flight batch is regenerated from the checkpoint's engine weights and prompt state);
with rollout.max_staleness = 2 the schedule's lag, a batch equal to the synchronous collect at the scheduled
weights, an exact resume with two batches in flight, and the config errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpokit.config import ConfigError, load_config
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


def stopped_before_step(step: int, cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train `cfg` until `step` begins (its batch is then in flight), as a crash there would stop it."""
    real = loop.train_step

    def stop_at(ctx):
        if ctx.state["step"] == step:
            raise Stop
        return real(ctx)

    monkeypatch.setattr(loop, "train_step", stop_at)
    with pytest.raises(Stop):
        loop.train(cfg)
    monkeypatch.setattr(loop, "train_step", real)


def test_stopped_and_resumed_async_run_equals_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 2's checkpoint (step 3's batch in flight), then resumed: the same metrics and weights."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    sets = {"train.steps": 4, "train.save_every": 1}
    loop.train(cfg_for(full, **sets))
    stopped_before_step(3, cfg_for(cut, **sets), monkeypatch)
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


# ---------------------------------------------------------------------------- rollout.max_staleness = 2
# Schedule (grpokit/train/async_rollout.py): step t's batch is sampled with w_max(t-1-s, 0), the weights after
# that update (w_0: the initial ones). With s = 2 and 4 steps: batches 1-3 from w_0, batch 4 from w_1.

S2 = {"rollout.max_staleness": 2, "train.steps": 4, "train.save_every": 1}


@pytest.fixture(scope="module")
def stale2(warm_tiny: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, object]]:
    """A 4-step run with s = 2 on the SFT-warmed model (mixed rewards: every update moves the policy), with
    the batch each step trained on."""
    from grpokit.train.async_rollout import AsyncRollouts

    run, batches = tmp_path_factory.mktemp("stale2") / "run", {}
    real = AsyncRollouts.next_batch

    def record(self):
        col, extra = real(self)
        batches[self.ctx.state["step"]] = col
        return col, extra

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AsyncRollouts, "next_batch", record)
        loop.train(cfg_for(run, **{"model.name": warm_tiny, **S2}))
    return run, batches


def test_max_staleness_2_trains_on_batches_up_to_two_updates_old(stale2: tuple[Path, dict]) -> None:
    run, _ = stale2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["async/staleness"] for r in rows] == [0, 1, 2, 2]  # (t-1) - max(t-3, 0)
    assert rows[0]["mismatch/abs_max"] < 1e-4  # batch 1 from w_0, trained at w_0
    for r in rows[:3]:
        assert r["frac_zero_var_groups"] < 1, (
            f"step {r['step']} had no group with mixed rewards, so its update did not move the policy and the "
            "later batches have no lag to show")
    for r in rows[1:]:  # batch 2 (w_0) at w_1, batch 3 (w_0) at w_2, batch 4 (w_1) at w_3
        assert r["mismatch/abs_max"] > 1e-3 and r["mismatch/k3"] > 0, r
        assert r["correction/weight/min"] < 1 or r["correction/weight/max"] > 1
        assert 0 <= r["async/overlap"] <= 1 and r["async/wait"] >= 0 and r["loss"] == r["loss"]
    # checkpoint after step 2: batches 3 (w_0) and 4 (w_1) in flight, each with its own weights
    ck = run / "checkpoints" / "step_000002"
    state = json.loads((ck / "state.json").read_text())
    assert state["async_max_staleness"] == 2
    assert state["async_pending"] == [{"step": 3, "version": 0, "file": "sampler"},
                                      {"step": 4, "version": 1, "file": "sampler_w1"}]
    w1 = load_file(str(run / "checkpoints" / "step_000001" / "model.safetensors"))
    saved = load_file(str(ck / "sampler_w1.safetensors"))
    assert saved.keys() == w1.keys() and all(torch.equal(saved[k], w1[k]) for k in w1)
    w0 = load_file(str(ck / "sampler.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w1)


def test_a_batch_under_max_staleness_2_is_the_synchronous_collect_at_the_scheduled_weights(
        stale2: tuple[Path, dict], warm_tiny: str, tmp_path: Path) -> None:
    """Replay the run's draws synchronously, loading w_max(t-3, 0) before each step t's collect: the same tokens
    and the same behaviour log-probs μ (to fp32 rounding); the weights the trainer held then give other μ."""
    from grpokit.train.collect import collect
    from grpokit.train.context import setup

    run, batches = stale2
    assert sorted(batches) == [1, 2, 3, 4]
    ckpts = run / "checkpoints"
    weights = {v: load_file(str(ckpts / f"step_{v:06d}" / "model.safetensors")) for v in (1, 2, 3)}
    ctx = setup(cfg_for(tmp_path / "sync", **{"model.name": warm_tiny, "rollout.async_rollouts": False, "train.steps": 4}))
    try:
        assert ctx.engine.shares_weights  # the synchronous engine samples the trained module itself
        weights[0] = {k: v.detach().clone() for k, v in ctx.base.state_dict().items()}
        for t in (1, 2, 3, 4):
            ctx.base.load_state_dict(weights[max(t - 3, 0)])
            ctx.state["step"] = t
            before = ctx.data_rng.getstate()
            ref, got = collect(ctx).batch.rollout, batches[t].batch.rollout
            assert torch.equal(ref.response_ids, got.response_ids) and torch.equal(ref.prompt_ids, got.prompt_ids)
            assert torch.equal(ref.response_mask, got.response_mask)
            # fp32 rounding only: the engine's copy and the trained module order some sums differently
            assert (ref.logprobs - got.logprobs).abs().max() <= 1e-5, (t, (ref.logprobs - got.logprobs).abs().max())
        # the check is sharp: batch 4's prompts and seeds sampled with w_3 (the trainer's weights at step 4) or
        # w_2 (the s = 1 schedule) give other tokens or log-probs far outside that tolerance
        got = batches[4].batch.rollout
        for v in (2, 3):
            ctx.base.load_state_dict(weights[v])
            ctx.data_rng.setstate(before)
            other = collect(ctx).batch.rollout
            assert not torch.equal(other.response_ids, got.response_ids) or (other.logprobs - got.logprobs).abs().max() > 1e-3
    finally:
        ctx.engine.close()


def test_stopped_and_resumed_max_staleness_2_run_equals_the_uninterrupted_one(
        stale2: tuple[Path, dict], warm_tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 3's checkpoint (batches 4 from w_1 and 5 from w_2 in flight), then resumed: the same
    metrics and weights as the uninterrupted 5-step run; a finished 3-step run extended to 5 steps too."""
    full, cut, short = tmp_path / "full", tmp_path / "cut", tmp_path / "short"
    sets = {"model.name": warm_tiny, **S2, "train.steps": 5}
    loop.train(cfg_for(full, **sets))
    stopped_before_step(4, cfg_for(cut, **sets), monkeypatch)
    state = json.loads((cut / "checkpoints" / "step_000003" / "state.json").read_text())
    assert [(p["step"], p["version"]) for p in state["async_pending"]] == [(4, 1), (5, 2)]
    with pytest.raises(ConfigError, match="max_staleness = 2"):  # another schedule cannot resume these batches
        loop.train(cfg_for(cut, **{**sets, "rollout.max_staleness": 3}), resume=cut)
    loop.train(cfg_for(cut, **sets), resume=cut)
    assert metrics(cut) == metrics(full)
    assert [r["step"] for r in metrics(full)] == [1, 2, 3, 4, 5]
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loop.train(cfg_for(short, **{**sets, "train.steps": 3}))
    loop.train(cfg_for(short, **sets), resume=short)
    assert metrics(short) == metrics(full)


def test_max_staleness_config_errors_and_the_async_alias(tmp_path: Path) -> None:
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=r"rollout.max_staleness must be an integer >= 1"):
            load_config(None, [f"rollout.max_staleness={bad}"])
    with pytest.raises(ConfigError, match="only applies to asynchronous rollouts; set rollout.async_rollouts = true"):
        load_config(None, ["rollout.max_staleness=2"])
    assert load_config(None, ["rollout.async_rollouts=true", "rollout.max_staleness=3"]).rollout.max_staleness == 3
    assert load_config(None).rollout.max_staleness == 1
    # `async` is a Python keyword; recipes and --set may still spell the switch rollout.async
    assert load_config(None, ["rollout.async=true", "rollout.max_staleness=2"]).rollout.async_rollouts is True
    recipe = tmp_path / "r.toml"
    recipe.write_text("[rollout]\nasync = true\nmax_staleness = 2\n")
    assert load_config(recipe).rollout.async_rollouts is True
    assert load_config(recipe, ["rollout.async_rollouts=false", "rollout.max_staleness=1"]).rollout.async_rollouts is False
    with pytest.raises(ConfigError, match="sets both rollout.async and rollout.async_rollouts"):
        load_config(None, ["rollout.async=true", "rollout.async_rollouts=true"])
    sections = {"async": True}
    assert load_config(None, rollout=sections).rollout.async_rollouts is True and sections == {"async": True}


def test_a_checkpoint_written_before_max_staleness_resumes_as_staleness_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint without `async_pending`/`async_max_staleness` (the s = 1 format before them: sampler.safetensors
    and async_data_rng only) resumes with the default rollout.max_staleness = 1 to the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    sets = {"train.steps": 3, "train.save_every": 1}
    loop.train(cfg_for(full, **sets))
    stopped_before_step(3, cfg_for(cut, **sets), monkeypatch)
    ck = cut / "checkpoints" / "step_000002"
    state = json.loads((ck / "state.json").read_text())
    assert state.pop("async_pending") == [{"step": 3, "version": 1, "file": "sampler"}] and state.pop("async_max_staleness") == 1
    (ck / "state.json").write_text(json.dumps(state))
    assert sorted(p.name for p in ck.glob("sampler*")) == ["sampler.safetensors"]
    loop.train(cfg_for(cut, **sets), resume=cut)
    assert metrics(cut) == metrics(full)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- the vLLM engines, asynchronous

def _length_reward(prompts, completions, **_):
    return [min(len(c), 8) / 8 for c in completions]  # varied from the first step: every group has a signal


@pytest.mark.vllm
@pytest.mark.parametrize("engine,lora", [("vllm", False), ("vllm_server", False), ("vllm", True)],
                         ids=["vllm", "vllm_server", "vllm-lora-adapter"])
def test_async_rollouts_with_a_vllm_engine_lag_one_update_and_resume_exactly(engine: str, lora: bool,
                                                                             tmp_path: Path) -> None:
    """The vLLM engines in async mode (snapshots loaded by the worker): step 1 samples the initial weights,
    steps 2-3 a policy one update old (the lag shows in μ − ℓ°), and a run stopped after step 2 with step 3's
    batch in flight, resumed, ends with the uninterrupted run's weights."""
    import grpokit
    from grpokit.models import make_tiny

    def run(out: Path, steps: int, resume: Path | None = None) -> Path:
        model, tok = make_tiny(seed=0, hidden_size=128)  # vLLM's CPU attention needs head size 32, 64, ...
        return grpokit.train(
            None, model=model, tokenizer=tok, dataset="copy2", reward_funcs=[_length_reward], resume=resume,
            overrides=[f"rollout.engine='{engine}'", "rollout.async_rollouts=true", "model.precision='fp32'",
                       "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=8",
                       f"train.steps={steps}", "train.lr=0.01", "train.micro_batch_size=16", "train.keep_last=10",
                       f"train.run_dir='{out}'", "train.progress=false", "train.report=false",
                       "train.tensorboard=false", "data.heldout_size=0", "train.final_eval=false",
                       *(["model.lora_r=4", "model.lora_alpha=8.0", "rollout.vllm.lora_sync='adapter'"] if lora else [])])

    full = run(tmp_path / "full", 3)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness"] for r in rows] == [0, 1, 1]
    assert rows[0]["mismatch/abs_max"] < 1e-4  # vLLM's μ at the trainer's own weights: rounding only
    for r in rows[1:]:  # one lr-0.01 update behind: far beyond rounding, and the correction weighs it
        assert r["mismatch/abs_max"] > 1e-3, r["mismatch/abs_max"]
        assert r["correction/weight/min"] < 1 or r["correction/weight/max"] > 1
    part = run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume=part)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
