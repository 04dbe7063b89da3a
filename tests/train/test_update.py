"""The update's bookkeeping: advantages that leave skipped rows
out of their group's statistics, and which configs need the old-log-prob pass."""
from __future__ import annotations

import types

import pytest
import torch

from grpokit.config import load_config
from grpokit.train.update import global_advantages, recompute_old_logprobs


def test_skipped_rows_are_left_out_of_the_group_statistics() -> None:
    """rewards.on_error = 'skip': the skipped row neither pulls its group's mean to 0 nor gets an advantage."""
    ctx = types.SimpleNamespace(cfg=load_config(None, []))
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    counted = torch.tensor([True, True, False, True, True, True])  # row 2 was skipped (its 0 is a stand-in)
    adv = global_advantages(ctx, rewards, groups, counted)
    assert adv[2] == 0
    # group 0 has two real members: rewards 1, 0 -> mean 0.5, unbiased std 0.7071 -> +-0.7071
    torch.testing.assert_close(adv[:2], torch.tensor([0.70710576, -0.70710576]), rtol=1e-5, atol=1e-6)
    full = global_advantages(ctx, rewards, groups, torch.ones(6, dtype=torch.bool))
    torch.testing.assert_close(adv[3:], full[3:])  # other groups are untouched
    assert not torch.allclose(adv[:2], full[:2])  # counting the stand-in 0 would move group 0


def test_old_logprob_pass_runs_whenever_something_reads_it_before_the_update() -> None:
    base = ["train.updates_per_rollout=1", "train.old_logprobs='auto'"]
    assert not recompute_old_logprobs(load_config(None, base))
    assert recompute_old_logprobs(load_config(None, base + ["train.old_logprobs='recompute'"]))
    assert recompute_old_logprobs(load_config(None, ["train.updates_per_rollout=2"]))
    frpo = ["algo.credit='frpo'", "algo.kl_placement='advantage'", "algo.beta=0.01"]
    assert recompute_old_logprobs(load_config(None, base + frpo))
    assert recompute_old_logprobs(load_config(None, base + ["algo.beta=0.01", "algo.kl_placement='reward'"]))


def test_gradient_checkpointing_recomputes_layers_in_the_trainer(warm_tiny: str, tmp_path) -> None:
    """model.gradient_checkpointing = true: the update's backward re-runs every decoder layer's forward
    (counted with pre-hooks on each layer's MLP), and sampling still works in eval mode."""
    import json

    from grpokit.models.checkpointing import decoder_layers
    from grpokit.train.loop import setup, train_step

    def run(gc: bool) -> int:
        overrides = {"model.name": warm_tiny, "model.precision": "fp32", "data.task": "copy2", "data.heldout_size": 0,
                     "rollout.prompts_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 6,
                     "train.progress": False, "train.report": False, "train.tensorboard": False,
                     "train.final_eval": False, "train.run_dir": str(tmp_path / f"gc{gc}"),
                     "model.gradient_checkpointing": gc, "train.micro_batch_size": 8}
        ctx = setup(load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
        calls = [0]
        for layer in decoder_layers(ctx.base):
            layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        ctx.state["step"] = 1
        train_step(ctx)
        return calls[0]

    plain, checkpointed = run(False), run(True)
    # the same sampling and scoring forwards, plus one recomputation per layer per update forward
    assert checkpointed > plain, (plain, checkpointed)


def test_int8_reference_trains_a_step_with_its_kl(warm_tiny: str, tmp_path) -> None:
    """model.ref_quantization = 'int8': the frozen reference is weight-only quantized, and its KL enters the loss."""
    import json

    from grpokit.models.quant import WeightOnlyLinear
    from grpokit.train.loop import setup, train_step

    overrides = {"model.name": warm_tiny, "model.precision": "fp32", "data.task": "copy2", "data.heldout_size": 0,
                 "rollout.prompts_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 6,
                 "train.progress": False, "train.report": False, "train.tensorboard": False, "train.final_eval": False,
                 "train.run_dir": str(tmp_path / "q"), "algo.beta": 0.04, "model.ref_quantization": "int8"}
    ctx = setup(load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    assert any(isinstance(m, WeightOnlyLinear) for m in ctx.ref.modules())
    ctx.state["step"] = 1
    m = train_step(ctx)
    assert m["kl_ref"] > 0 and m["loss"] == m["loss"]  # quantization error alone makes the KL non-zero


def test_quantized_reference_with_lora_is_refused() -> None:
    from grpokit.config import ConfigError

    with pytest.raises(ConfigError, match="ref_quantization needs full fine-tuning"):
        load_config(None, ["model.lora_r=4", "model.ref_quantization='int8'"])
