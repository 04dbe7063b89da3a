"""The in-process `vllm` engine under torchrun with FSDP2 (2 gloo ranks): every rank runs its own vLLM on the
gathered full weights, re-synced after each optimizer step. Marked `vllm` (`make test-vllm` runs it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_data_parallel import REWARD, run

#: vLLM's CPU attention takes head sizes 32, 64, 80, ...: the tiny model's is 24, so vLLM gets hidden 128
VLLM_SHAPE = {"hidden_size": 128}


@pytest.mark.vllm
def test_fsdp2_ranks_sample_with_vllm_on_the_gathered_weights(tmp_path: Path) -> None:
    from grpokit.models import make_tiny

    model, tok = make_tiny(seed=0, **VLLM_SHAPE)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "dist_reward.py").write_text(REWARD)
    start = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    out = tmp_path / "run"
    sets = {"model.name": str(tmp_path / "tiny"), "model.precision": "fp32", "data.task": "arith",
            "data.task_options": {"max_digits": 1, "heldout_size": 10}, "data.heldout_size": 0,
            "train.final_eval": False, "rollout.engine": "vllm", "rollout.vllm": {"max_model_len": 256},
            "rollout.prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
            "rewards.functions": ["dist_reward:digit_share"], "train.steps": 3, "train.lr": 1e-2,
            "train.updates_per_rollout": 1, "train.micro_batch_size": 8, "train.progress": False,
            "train.report": False, "train.tensorboard": False, "train.device": "cpu", "train.threads": 1,
            "dist.strategy": "fsdp2", "train.run_dir": str(out)}
    args = []
    for k, v in sets.items():
        text = ("{" + ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items()) + "}") if isinstance(v, dict) else json.dumps(v)
        args += ["--set", f"{k}={text}"]
    run(tmp_path, args, nproc=2, timeout=420)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # steps 2 and 3 sample with the weights after an lr-0.01 update: μ equals ℓ° only if every rank's vLLM
    # received the gathered full state (a stale or partial engine is off by far more than 1e-4)
    assert all(r["mismatch/abs_max"] < 1e-4 for r in rows), [r["mismatch/abs_max"] for r in rows]
    assert all(r["time/weight_sync"] > 0 for r in rows)
    after = load_file(str(out / "final" / "model.safetensors"))
    assert max(float((after[k] - start[k]).abs().max()) for k in start) > 1e-3, "the policy did not move"
