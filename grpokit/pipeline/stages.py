"""The stages of a pipeline (SPEC 10, the DeepSeek-R1 recipe, arXiv:2501.12948): one small class per `kind`.

A stage reads a model (`model_in`: a directory or a built-in name) and writes its own run directory; it
returns the model the next stage reads (`model_out`). Each stage's settings are the tables of its own
stage config, so a `[[stages]]` entry reads like the recipe of the matching command:

    kind     config (its sections)                                   command it runs          model_out
    sft      SFTConfig: model, data, train, dist                      run_sft(cfg, resume=)    RUN/final
    rl       Config: model, data, rollout, rewards, algo, train, dist train(cfg, resume=)      RUN/final
    sample   SampleConfig: model, data, rollout, rewards, sample      run_sample(cfg)          model_in
    eval     EvalConfig: model, data, rollout, rewards + k, ...       evaluate(...)            model_in

The runner (grpokit.pipeline.runner) fills what links the stages: `model.name` (= model_in), the run
directory (`train.run_dir` / `sample.out_dir`) and, for an sft stage, `data.path` (a dataset a `sample`
stage wrote, or traces generated into the stage's directory). A stage whose directory holds a checkpoint
continues from it (`resume=`); one without starts clean. Register a new kind with `@STAGES.register(name)`
on a class satisfying `Stage`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from grpokit.algo.registry import Registry
from grpokit.config import (
    ConfigError, DataConfig, ModelConfig, RewardsConfig, RolloutConfig, _deep_update, _merge, doc,
)

__all__ = [
    "Stage", "StageSpec", "STAGES", "SftStage", "RlStage", "SampleStage", "EvalStage", "EvalConfig",
    "load_eval_config", "evaluate_model", "eval_row", "stage_config", "DONE_MARKER",
]

#: Written (atomically) into a stage's directory once the stage has finished; a resumed pipeline skips it.
DONE_MARKER = "stage_done.json"

#: name -> Stage class; `kind` of a `[[stages]]` entry picks one.
STAGES = Registry("stage")


@dataclass
class StageSpec:
    """One `[[stages]]` entry, resolved: its config (the kind's own config type) and its links."""

    index: int                 # 0-based position in the pipeline
    name: str                  # unique; the run directory is PIPE/<index+1:02d>-<name>
    kind: str
    settings: dict[str, Any]   # the entry's config tables (without kind/name/model/data references/traces)
    model: str = "previous"    # "base", "previous", a stage name, or a model path / built-in name
    data: str = ""             # sft: "previous", a stage name, a path ('' = data.path or traces)
    traces: dict[str, Any] = field(default_factory=dict)  # sft: {n, seed, **add_trace options} -> RUN/traces.jsonl
    data_path: str = ""        # filled by the runner: the dataset an sft stage trains on
    eval_defaults: dict[str, Any] = field(default_factory=dict)  # the pipeline's [eval] table (eval stages start from it)


class Stage(Protocol):
    """A pipeline stage. `produces_model`: the runner evaluates `model_out` (a new model state, one row of
    the summary). `dataset`: the file name, inside the run directory, of the dataset it writes (or None)."""

    produces_model: bool
    dataset: str | None

    def run(self, spec: StageSpec, model_in: Path, run_dir: Path) -> Path:
        """Run (or continue) the stage into `run_dir`; return the model the next stage reads."""
        ...


# ---------------------------------------------------------------------------- eval config

@dataclass
class EvalConfig:
    """The held-out evaluation after every model-producing stage (and of the base model), and of `eval`
    stages: greedy by default, the task's first `data.heldout_size` held-out rows."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    k: int = doc("Samples per problem (1 with temperature 0 = greedy accuracy).", 1)
    temperature: float = doc("Sampling temperature of the evaluation (0 = greedy).", 0.0)
    batch_size: int = doc("Sequences per generate call.", 64)
    seed: int = doc("Seed of the evaluation's sampling and bootstrap.", 0)
    format: str = doc("`format` reward preset whose pass rate is the table's format rate (think_answer, number, answer_tag, boxed; '' = no format column unless rewards.functions has 'format').", "")
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    threads: int = doc("torch CPU threads (0 = torch's default).", 0)


def load_eval_config(*tables: dict[str, Any], where: str = "eval") -> EvalConfig:
    """Defaults <- each table in turn (deep-merged), validated; errors name `where`."""
    data: dict[str, Any] = {}
    for t in tables:
        _deep_update(data, json.loads(json.dumps(t)))
    cfg = EvalConfig()
    try:
        _merge(cfg, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.k < 1 or cfg.batch_size < 1 or cfg.rollout.max_new_tokens < 1:
        raise ConfigError(f"{where}: k, batch_size and rollout.max_new_tokens must be >= 1")
    if cfg.temperature < 0:
        raise ConfigError(f"{where}: temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.data.heldout_size < 1:
        raise ConfigError(f"{where}: data.heldout_size must be >= 1 (the held-out rows every model is evaluated on)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: device = {cfg.device!r} is not one of auto, cpu, cuda")
    from grpokit.rewards import FORMAT_PRESETS

    if cfg.format and cfg.format not in FORMAT_PRESETS:
        raise ConfigError(f"{where}: format = {cfg.format!r} is not a preset ({', '.join(FORMAT_PRESETS)}) or ''")
    return cfg


def _eval_scorer(cfg: EvalConfig) -> Any:
    """The RewardSet of `rewards.functions`, plus the format check (weight 0) when `format` names a preset
    and the functions have no `format` reward of their own."""
    from grpokit.rewards import RewardSet

    r = cfg.rewards
    weights = r.weights or [1.0] * len(r.functions)
    if len(weights) != len(r.functions):
        raise ConfigError("eval: rewards.weights needs one weight per rewards.functions entry")
    specs = [(fn, w, dict(r.options.get(fn, {}))) for fn, w in zip(r.functions, weights)]
    if cfg.format and "format" not in r.functions:
        specs.append(("format", 0.0, {"preset": cfg.format}))
    return RewardSet(specs, on_error=r.on_error, timeout_s=r.timeout_s or None)


def evaluate_model(model_in: str | Path, cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate the model at `model_in` (a directory or a built-in name) on the task's first
    `data.heldout_size` held-out rows; the result of `grpokit.report.evaluate.evaluate`."""
    import torch

    from grpokit.data import get_task
    from grpokit.models import load_model
    from grpokit.report.evaluate import evaluate
    from grpokit.rollout import encode_prompts
    from grpokit.train.context import pick_device

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    scorer = _eval_scorer(cfg)
    rows = get_task(cfg.data.task, **cfg.data.task_options).heldout(cfg.data.heldout_size)
    device = pick_device(cfg.device)
    model, tokenizer = load_model(str(model_in))
    model.to(device)
    d = cfg.data

    def encode(tok: Any, prompts: list[str]) -> list[list[int]]:
        return encode_prompts(tok, prompts, system=d.system_prompt or None, chat=d.chat_template)

    try:
        return evaluate(model, tokenizer, rows, reward_set=scorer, k=cfg.k, temperature=cfg.temperature,
                        max_new_tokens=cfg.rollout.max_new_tokens, top_p=cfg.rollout.top_p, batch_size=cfg.batch_size,
                        seed=cfg.seed, stop_strings=tuple(cfg.rollout.stop_strings), device=device, encode=encode)
    finally:
        del model


def eval_row(label: str, result: dict[str, Any]) -> dict[str, Any]:
    """One row of the summary table from an evaluation result."""
    fmt = result.get("rewards", {}).get("format")
    length = result.get("length", {})
    return {
        "model": label, "n": result["n"], "k": result["k"], "acc": result["avg@k"],
        "ci": list(result["ci"]["avg@k"]), "length": length.get("mean"),
        "format_rate": fmt, "truncation_rate": length.get("truncation_rate"),
    }


# ---------------------------------------------------------------------------- helpers

def stage_config(spec: StageSpec, model_in: str | Path, run_dir: Path) -> Any:
    """The stage's own config with the runner's links filled in (model, run directory, data)."""
    forced: dict[str, Any] = {"recipe": spec.name, "model": {"name": str(model_in)}}
    if spec.kind == "sft":
        forced["train"] = {"run_dir": str(run_dir)}
        if spec.data_path:
            forced["data"] = {"path": spec.data_path}
        from grpokit.train.sft_config import load_sft_config

        load, tables = load_sft_config, spec.settings
    elif spec.kind == "rl":
        forced["train"] = {"run_dir": str(run_dir)}
        from grpokit.config import load_config

        load, tables = load_config, spec.settings
    elif spec.kind == "sample":
        forced["sample"] = {"out_dir": str(run_dir)}
        from grpokit.pipeline.sample import load_sample_config

        load, tables = load_sample_config, spec.settings
    elif spec.kind == "eval":
        return load_eval_config(spec.eval_defaults, spec.settings, {"model": {"name": str(model_in)}},
                                where=f"stages[{spec.index}] ({spec.name})")
    else:
        raise ConfigError(f"stages[{spec.index}]: kind {spec.kind!r} has no config type")
    data = _deep_update(json.loads(json.dumps(spec.settings)), forced)
    try:
        return load(None, None, **data)
    except ConfigError as e:
        raise ConfigError(f"stages[{spec.index}] ({spec.kind} '{spec.name}'): {e}") from None


def _fresh(run_dir: Path) -> bool:
    """True when `run_dir` holds a complete checkpoint to continue from; otherwise empty it (a stage
    interrupted before its first checkpoint starts over) and return False."""
    from grpokit.train.checkpoint import latest_checkpoint

    if run_dir.exists() and latest_checkpoint(run_dir) is not None:
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return False


def write_marker(run_dir: Path, info: dict[str, Any]) -> None:
    """Write DONE_MARKER atomically (a crash leaves either no marker or a whole one)."""
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{DONE_MARKER}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    os.replace(tmp, run_dir / DONE_MARKER)


# ---------------------------------------------------------------------------- the stages

@STAGES.register("sft")
class SftStage:
    """Supervised fine-tuning (R1 stage 1, and stage 3's SFT on the kept samples): `run_sft`."""

    produces_model = True
    dataset = None

    def run(self, spec: StageSpec, model_in: Path, run_dir: Path) -> Path:
        from grpokit.train.sft_stage import run_sft

        resume = _fresh(run_dir)
        if spec.traces and not spec.data_path:
            from grpokit.data.traces import write_traces

            opts = dict(spec.traces)
            n, seed = int(opts.pop("n", 1000)), int(opts.pop("seed", 0))
            spec.data_path = str(run_dir / "traces.jsonl")
            if not Path(spec.data_path).exists():
                tmp = run_dir / ".traces.jsonl.tmp"
                write_traces(tmp, n, seed=seed, **opts)
                os.replace(tmp, spec.data_path)
        cfg = stage_config(spec, model_in, run_dir)
        return Path(run_sft(cfg, resume=run_dir if resume else None)) / "final"


@STAGES.register("rl")
class RlStage:
    """RL with verifiable rewards (R1 stage 2, GRPO or any loss of the catalogue): `train`."""

    produces_model = True
    dataset = None

    def run(self, spec: StageSpec, model_in: Path, run_dir: Path) -> Path:
        from grpokit.train.loop import train

        resume = _fresh(run_dir)
        cfg = stage_config(spec, model_in, run_dir)
        return Path(train(cfg, resume=run_dir if resume else None)) / "final"


@STAGES.register("sample")
class SampleStage:
    """Rejection sampling from the current policy (R1 stage 3): `run_sample` writes RUN/samples.jsonl, the
    dataset of the next sft stage; the model passes through unchanged."""

    produces_model = False
    dataset = "samples.jsonl"

    def run(self, spec: StageSpec, model_in: Path, run_dir: Path) -> Path:
        from grpokit.pipeline.sample import run_sample

        _fresh(run_dir)  # no checkpoints: an interrupted sampling starts over (it is seeded)
        run_sample(stage_config(spec, model_in, run_dir))
        return model_in


@STAGES.register("eval")
class EvalStage:
    """An evaluation with its own settings (e.g. k = 8 samples at temperature 1 for pass@k/cons@k),
    written to RUN/eval.json; the model passes through unchanged."""

    produces_model = False
    dataset = None

    def run(self, spec: StageSpec, model_in: Path, run_dir: Path) -> Path:
        from grpokit.report.evaluate import format_table, write_json

        run_dir.mkdir(parents=True, exist_ok=True)
        result = evaluate_model(model_in, stage_config(spec, model_in, run_dir))
        write_json(result, run_dir / "eval.json")
        print(format_table(result))
        return model_in


def stage_kinds() -> list[str]:
    return STAGES.names()

