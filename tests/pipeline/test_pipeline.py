"""`grpokit pipeline`: stages in order, the summary table, skip-on-resume, mid-stage resume, config errors.

Everything runs the SFT-warmed tiny model on the toy task copy2 (tests/toy.py), a few steps per stage.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import toy
from grpokit.config import ConfigError
from grpokit.pipeline.runner import load_pipeline, run_pipeline
from grpokit.pipeline.stages import DONE_MARKER

TESTS = Path(__file__).resolve().parent.parent
QUIET = {"progress": False, "report": False, "tensorboard": False, "threads": 1, "deterministic": True}


def sft_data(tmp_path: Path) -> str:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for p, c in toy.noisy_pairs(64, p_digit=0.9, seed=1):
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    return str(path)


def recipe(base: str, data: str, *, rl_steps: int = 2, eval_stage: bool = False) -> dict[str, Any]:
    """sft (on `data`) -> rl -> sample -> sft from the base on the kept samples [-> eval]."""
    sft_train = {"steps": 2, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "save_every": 1, **QUIET}
    stages: list[dict[str, Any]] = [
        {"kind": "sft", "name": "sft", "model": {"precision": "fp32"}, "data": {"path": data}, "train": sft_train},
        {"kind": "rl", "name": "grpo", "model": {"precision": "fp32"},
         "data": {"task": "copy2", "heldout_size": 0},
         "rollout": {"prompts_per_step": 3, "group_size": 3, "max_new_tokens": 4},
         "rewards": {"functions": ["numeric_match"]},
         "train": {"steps": rl_steps, "save_every": 1, "lr": 1e-3, "micro_batch_size": 9, "final_eval": False, **QUIET}},
        {"kind": "sample", "name": "rs", "model": {"precision": "fp32"}, "data": {"task": "copy2"},
         "rollout": {"max_new_tokens": 4, "temperature": 1.0}, "rewards": {"functions": ["numeric_match"]},
         "sample": {"prompts": 8, "n": 4, "k": 1, "format": "number", "progress": False, "threads": 1}},
        {"kind": "sft", "name": "rs-sft", "model": "base", "data": "previous", "train": sft_train},
    ]
    stages[3]["train"] = {**sft_train}
    if eval_stage:
        stages.append({"kind": "eval", "name": "final", "k": 2, "temperature": 1.0})
    return {
        "recipe": "tiny-r1",
        "pipeline": {"base": base, "threads": 1},
        "eval": {"format": "number", "device": "cpu", "threads": 1, "data": {"task": "copy2", "heldout_size": 15},
                 "rollout": {"max_new_tokens": 4}, "rewards": {"functions": ["numeric_match"]}},
        "stages": stages,
    }


def table(pipe: Path) -> list[dict[str, Any]]:
    return json.loads((pipe / "summary.json").read_text())["rows"]


def test_four_stage_pipeline_writes_one_row_per_model_and_skips_finished_stages(warm_tiny: str, tmp_path: Path, capsys) -> None:
    pipe = tmp_path / "pipe"
    data = recipe(warm_tiny, sft_data(tmp_path), eval_stage=True)
    data["pipeline"]["keep_checkpoints"] = False
    cfg = load_pipeline(data=data, dir=pipe)
    run_pipeline(cfg)
    rows = table(pipe)
    for d in ("01-sft", "02-grpo", "04-rs-sft"):  # checkpoints of finished stages deleted, final/ kept
        assert not (pipe / d / "checkpoints").exists() and (pipe / d / "final" / "model.safetensors").exists()
    assert [r["model"] for r in rows] == ["base", "sft", "grpo", "rs-sft"]  # one row per model state
    for r in rows:
        assert r["n"] == 15 and 0.0 <= r["ci"][0] <= r["acc"] <= r["ci"][1] <= 1.0
        assert 1.0 <= r["length"] <= 4.0 and 0.0 <= r["format_rate"] <= 1.0 and 0.0 <= r["truncation_rate"] <= 1.0
    summary = json.loads((pipe / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"] * 5
    assert summary["evals"][0]["k"] == 2 and summary["evals"][0]["stage"] == "final"
    for d in ("01-sft", "02-grpo", "03-rs", "04-rs-sft", "05-final"):
        assert (pipe / d / DONE_MARKER).exists()
    assert (pipe / "02-grpo" / "final" / "model.safetensors").exists()
    rs = [json.loads(x) for x in (pipe / "03-rs" / "samples.jsonl").read_text().splitlines()]
    assert rs and all(r["source_model"].endswith("02-grpo/final") for r in rs)
    sft2 = (pipe / "04-rs-sft" / "config.toml").read_text()
    assert "03-rs/samples.jsonl" in sft2 and f'name = "{warm_tiny}"' in sft2  # the kept samples, from the base
    md = (pipe / "summary.md").read_text()
    assert "| grpo | rl |" in md and "held-out acc [95% CI]" in md
    assert (pipe / "report.html").exists() and "rs-sft" in (pipe / "report.html").read_text()

    # resume: every stage is finished, nothing runs again, the table is the same
    mtime = (pipe / "02-grpo" / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    run_pipeline(load_pipeline(data=json.loads((pipe / "pipeline.json").read_text()), dir=pipe))
    out = capsys.readouterr().out
    assert out.count("already finished; skipped") == 5
    assert (pipe / "02-grpo" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    assert table(pipe) == rows


def _cli(pipe: Path, *extra: str) -> list[str]:
    """`grpokit pipeline --resume PIPE` in a subprocess that registers copy2; PIPE/pipeline.json holds the recipe."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import toy; from grpokit.cli import main; "
            "raise SystemExit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(TESTS), "pipeline", "--resume", str(pipe), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_mid_rl_stage_then_resume_gives_the_same_table(warm_tiny: str, tmp_path: Path) -> None:
    """A real interruption: the pipeline process is killed inside the RL stage (after its second
    checkpoint); `--resume` continues that stage from the checkpoint and ends with the same table."""
    r = recipe(warm_tiny, sft_data(tmp_path), rl_steps=4)
    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in (full, cut):  # the recipe a resumed pipeline reads back
        d.mkdir()
        (d / "pipeline.json").write_text(json.dumps(r))
    done = subprocess.run(_cli(full), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(_cli(cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not (cut / "02-grpo" / "checkpoints" / "step_000002" / "state.json").exists():
        assert proc.poll() is None, "the pipeline exited before the RL stage's second checkpoint"
        assert time.time() < deadline, "no second RL checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "02-grpo" / DONE_MARKER).exists() and (cut / "01-sft" / DONE_MARKER).exists()
    resumed = subprocess.run(_cli(cut), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 1 sft (sft) already finished; skipped" in resumed.stdout
    assert "grpo (rl) reads" in resumed.stdout and ", resuming" in resumed.stdout
    assert table(cut) == table(full)


def test_interrupted_stage_resumes_from_its_checkpoint(warm_tiny: str, tmp_path: Path, monkeypatch) -> None:
    """In-process interruption: the RL stage dies after its first checkpoint; the resumed pipeline skips
    the finished SFT stage, continues RL from step 1 (not from scratch) and gives the uninterrupted table."""
    from grpokit.train import loop

    data = sft_data(tmp_path)
    r = recipe(warm_tiny, data, rl_steps=2)
    r["stages"] = r["stages"][:2]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_pipeline(load_pipeline(data=r, dir=full))

    real_step = loop.train_step
    calls = {"n": 0}

    def dying_step(ctx: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_step(ctx)

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline(data=r, dir=cut))
    assert (cut / "01-sft" / DONE_MARKER).exists() and not (cut / "02-grpo" / DONE_MARKER).exists()
    assert [p.name for p in (cut / "02-grpo" / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_000001"]
    monkeypatch.setattr(loop, "train_step", real_step)
    sft_mtime = (cut / "01-sft" / "final" / "model.safetensors").stat().st_mtime_ns

    seen: list[int] = []

    def counting_step(ctx: Any) -> Any:
        seen.append(ctx.state["step"])
        return real_step(ctx)

    monkeypatch.setattr(loop, "train_step", counting_step)
    run_pipeline(load_pipeline(data=json.loads((cut / "pipeline.json").read_text()), dir=cut))
    assert seen == [2]  # only the missing step ran
    assert (cut / "01-sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_mtime
    assert table(cut) == table(full)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["stages"][1].update(kind="grpo"), "stages[1].kind = 'grpo' is not a stage kind"),
    (lambda r: r["stages"][1]["train"].update(stpes=3), "stages[1] (rl 'grpo'): unknown config field 'train.stpes'; did you mean 'train.steps'?"),
    (lambda r: r["stages"][0]["train"].update(lr="fast"), "stages[0] (sft 'sft'): train.lr must be a number"),
    (lambda r: r.update(stage=[]), "unknown pipeline field 'stage'; did you mean 'stages'?"),
    (lambda r: r["eval"].update(heldout=5), "eval: unknown config field 'heldout'"),
    (lambda r: r["stages"][3].update(model="rs-sft2"), None),  # a path-like name: accepted (checked when loaded)
    (lambda r: r["stages"][0].update(data="previous"), "stages[0].data = 'previous' but no earlier stage writes a dataset"),
    (lambda r: r["stages"][1].update(data="previous"), "only an sft stage takes a dataset link"),
    (lambda r: r["stages"][2].update(name="sft"), "stages[2].name = 'sft' is used twice"),
    (lambda r: r["stages"][0].update(model="grpo"), "names a later stage"),
])
def test_bad_recipe_gives_a_clear_config_error(tmp_path: Path, edit: Any, message: str | None) -> None:
    r = recipe("tiny-char", "pairs.jsonl")
    edit(r)
    if message is None:
        load_pipeline(data=r, dir=tmp_path)
        return
    with pytest.raises(ConfigError) as e:
        load_pipeline(data=r, dir=tmp_path)
    assert message in str(e.value)


def test_overrides_address_a_stage_by_index_or_name(tmp_path: Path) -> None:
    r = recipe("tiny-char", "pairs.jsonl")
    cfg = load_pipeline(data=r, overrides=["stages.1.train.steps=7", "stages.rs.sample.n=3", "eval.data.heldout_size=5"], dir=tmp_path)
    assert cfg.stages[1].settings["train"]["steps"] == 7 and cfg.stages[2].settings["sample"]["n"] == 3
    assert cfg.eval.data.heldout_size == 5
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        load_pipeline(data=r, overrides=["stages.nope.train.steps=1"], dir=tmp_path)


def test_cli_unknown_kind_is_one_line_error(tmp_path: Path, capsys) -> None:
    from grpokit.cli import main

    path = tmp_path / "bad.toml"
    path.write_text('[pipeline]\nbase = "tiny-char"\n[[stages]]\nkind = "sfft"\n')
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpokit: error: stages[0].kind = 'sfft' is not a stage kind (did you mean 'sft'?)")
