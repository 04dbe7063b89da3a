"""Exact resume after SIGKILL, atomic checkpoints, and the non-finite guard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpokit.algo import LOSSES
from grpokit.config import load_config
from grpokit.train import checkpoint as ckpt
from grpokit.train.loop import TrainingStopped, train

TIMING = ("time/", "tokens/s")


def cli_args(model_dir: str, run_dir: Path, steps: int) -> list[str]:
    sets = {
        # copy2 with its partial-credit reward: every step has groups with mixed rewards, so the weights move
        "model.name": model_dir, "model.precision": "fp32", "data.task": "copy2", "data.heldout_size": 0,
        "rewards.functions": [f"{Path(__file__).parents[1] / 'toy.py'}:copy2_digits"],
        "rollout.prompts_per_step": 3, "rollout.group_size": 3, "rollout.max_new_tokens": 5,
        "train.steps": steps, "train.save_every": 1, "train.keep_last": 10, "train.lr": 1e-3,
        "train.micro_batch_size": 4, "train.updates_per_rollout": 2, "train.run_dir": str(run_dir),
        "train.progress": False, "train.report": False, "train.tensorboard": False, "train.final_eval": False,
        "train.threads": 1, "train.deterministic": True, "algo.loss": "fipo", "algo.beta": 0.01,
    }
    out = [sys.executable, "-m", "grpokit", "train"]
    for k, v in sets.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_sigkill_then_resume_matches_uninterrupted_run(warm_tiny: str, tmp_path: Path) -> None:
    steps = 4
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(cli_args(warm_tiny, full, steps), env=env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(cli_args(warm_tiny, cut, steps), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step_000002" / "state.json").exists():
        assert proc.poll() is None, "training exited before its second checkpoint"
        assert time.time() < deadline, "no second checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "final").exists()
    done = [p.name for p in ckpt.list_checkpoints(cut)]
    assert "step_000002" in done and len(done) < steps

    resumed = subprocess.run(cli_args(warm_tiny, cut, steps) + ["--resume", str(cut)], env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    start = load_file(str(Path(warm_tiny) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4, "training did not move: the test would be vacuous"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert metrics(full) == metrics(cut)


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    kw = dict(model_state=model.state_dict(), optim_state=opt.state_dict(), generator=None, keep_last=3)
    good = ckpt.save_checkpoint(tmp_path, 1, state={"note": "good"}, **kw)

    real = ckpt._write_json

    def crash(path: Path, obj: object) -> None:
        if path.name == "state.json":
            raise KeyboardInterrupt("killed mid-save")
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, state={"note": "bad"}, **kw)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    m, o, state = ckpt.load_checkpoint(good, None)
    assert state["note"] == "good"
    torch.testing.assert_close(m["weight"], model.state_dict()["weight"], rtol=0, atol=0)
    assert o["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_checkpoint_files_are_not_pickles(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(tmp_path, 1, model_state=model.state_dict(), optim_state=opt.state_dict(),
                                generator=torch.Generator().manual_seed(3), state={}, keep_last=1)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, model_state=model.state_dict(), optim_state=opt.state_dict(),
                             generator=None, state={}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def nan_for_test(logp, old_logp, adv, mask, **_):
    """A loss that is always NaN (tests the non-finite guard)."""
    per_tok = logp * float("nan")
    flags = torch.zeros_like(mask, dtype=torch.bool)
    return per_tok, {"clipped_low": flags, "clipped_high": flags, "dual_clipped": flags}


def test_nonfinite_steps_are_skipped_then_stop_with_checkpoint(warm_tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LOSSES._fns, "nan_for_test", nan_for_test)  # registered for this test only
    run = tmp_path / "run"
    sets = [a for a in cli_args(warm_tiny, run, 10)[4:] if a != "--set"]
    sets = [s for s in sets if not s.startswith(("algo.loss", "train.save_every"))] + ["algo.loss=nan_for_test", "train.max_nonfinite=3"]
    cfg = load_config(None, sets)
    with pytest.raises(TrainingStopped, match=r"step 3: 3 steps in a row had a non-finite loss.*last good state is saved"):
        train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_updates"] for r in rows] == [2.0, 2.0, 2.0]
    assert rows[-1]["nonfinite_total"] == 6.0
    saved = load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))
    start = load_file(str(Path(warm_tiny) / "model.safetensors"))
    for k in start:
        assert torch.equal(saved[k], start[k]), "a skipped step changed the weights"
