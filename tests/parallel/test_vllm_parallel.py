"""The in-process `vllm` engine under torchrun with FSDP2 (2 gloo ranks): every rank runs its own vLLM on the
gathered full weights, re-synced after each optimizer step. Marked `vllm` (`make test-vllm` runs it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_data_parallel import REWARD, overrides, run

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
    args = overrides(tmp_path, out, **{"rollout.engine": "vllm", "rollout.vllm": {"max_model_len": 256},
                                        "rollout.max_new_tokens": 8, "train.lr": 1e-2, "train.updates_per_rollout": 1,
                                        "train.micro_batch_size": 8, "dist.strategy": "fsdp2"})
    run(tmp_path, args, nproc=2, timeout=420)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # steps 2 and 3 sample with the weights after an lr-0.01 update: μ equals ℓ° only if every rank's vLLM
    # received the gathered full state (a stale or partial engine is off by far more than 1e-4)
    assert all(r["mismatch/abs_max"] < 1e-4 for r in rows), [r["mismatch/abs_max"] for r in rows]
    assert all(r["time/weight_sync"] > 0 for r in rows)
    after = load_file(str(out / "final" / "model.safetensors"))
    assert max(float((after[k] - start[k]).abs().max()) for k in start) > 1e-3, "the policy did not move"
