"""The one typed configuration tree. Every field is documented once, here; `grpokit train --help` shows it.

A recipe is a TOML file whose tables mirror the sections below (`[model]`, `[data]`, `[rollout]`,
`[rewards]`, `[algo]`, `[train]`, `[dist]`). Overrides use dotted paths: `--set algo.beta=0.01`.
A misspelt field fails with the nearest valid name; the resolved config is saved in the run directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached (shown by `grpokit train --help`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = doc("Policy model: a built-in name (smollm2-135m, tiny-char), a local HF directory or a hub id.", "smollm2-135m")
    precision: str = doc("Compute precision: 'auto' (bf16 autocast where the device supports it), 'bf16' or 'fp32'. Weights and optimizer stay fp32.", "auto")
    gradient_checkpointing: bool = doc("Recompute activations in the backward pass to save memory.", False)
    lora_r: int = doc("LoRA rank (0 = full fine-tuning). With LoRA the reference log-probs come from the same model with adapters disabled.", 0)
    lora_alpha: float = doc("LoRA scaling alpha.", 16.0)
    lora_dropout: float = doc("LoRA dropout.", 0.0)
    lora_targets: list[str] = doc("Module names LoRA adapts.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig:
    task: str = doc("Training task: 'arith', 'rg:<reasoning-gym task>', a .jsonl/.parquet path, or 'hf:<dataset>'.", "arith")
    task_options: dict[str, Any] = doc("Keyword options passed to the task (e.g. column mapping, digit range).", factory=dict)
    heldout_size: int = doc("Held-out problems evaluated greedily before and after training (0 = skip).", 100)
    system_prompt: str = doc("System message for the chat template ('' = the tokenizer's default).", "")
    chat_template: bool = doc("Wrap prompts in the tokenizer's chat template.", True)


@dataclass
class RolloutConfig:
    prompts_per_step: int = doc("Prompts sampled per training step (each gets group_size completions).", 8)
    group_size: int = doc("G: completions sampled per prompt.", 8)
    max_new_tokens: int = doc("Maximum response length in tokens.", 64)
    temperature: float = doc("Sampling temperature (also applied to the trainer's log-probs, as verl and TRL do).", 1.0)
    top_p: float = doc("Nucleus sampling threshold (1.0 = off).", 1.0)
    top_k: int = doc("Top-k sampling (0 = off).", 0)
    stop_strings: list[str] = doc("Strings that end a response (besides EOS).", factory=list)
    engine: str = doc("Rollout engine (`grpokit list engine`): 'hf', the in-process KV-cache sampler.", "hf")


@dataclass
class RewardsConfig:
    functions: list[str] = doc("Reward functions: registered names or 'module:function'. Each is (prompts, completions, **columns) -> list[float|None].", factory=lambda: ["numeric_match"])
    weights: list[float] = doc("Weight of each reward function (default 1 each).", factory=list)
    options: dict[str, dict[str, Any]] = doc("Per-function keyword options, keyed by function name.", factory=dict)
    on_error: str = doc("When a reward function raises or times out: 'raise' (stop, naming the sample), 'zero' or 'skip' (drop the sample).", "raise")
    timeout_s: float = doc("Per-call time limit for a reward function in seconds (0 = none).", 0.0)
    overlong_buffer: int = doc("DAPO overlong shaping buffer L_c in tokens (0 = off); L_max is rollout.max_new_tokens.", 0)


@dataclass
class AlgoConfig:
    advantage: str = doc("Advantage estimator (SPEC 1): grpo, dr_grpo, batch_std, rloo.", "grpo")
    std: str = doc("Std convention of grpo: 'unbiased' (torch/verl/TRL) or 'population' (the FRPO paper).", "unbiased")
    adv_eps: float = doc("epsilon added to the group std.", 1e-6)
    credit: str = doc("Token credit (SPEC 7): 'broadcast' (A_i on every token) or 'frpo' (A_i - beta * KL-to-go).", "broadcast")
    divergence: str = doc("FRPO generator: 'k1' (reverse KL), 'k3' (reverse k3) or 'forward'.", "k1")
    loss: str = doc("Policy loss (SPEC 2, 6): ppo_clip, gspo, cispo, fipo.", "ppo_clip")
    aggregation: str = doc("Loss aggregation (SPEC 3): token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm.", "token_mean")
    norm_const: int = doc("C of seq_mean_token_sum_norm (0 = rollout.max_new_tokens).", 0)
    clip_low: float = doc("epsilon_low of the ratio clip.", 0.2)
    clip_high: float = doc("epsilon_high of the ratio clip (DAPO clip-higher: 0.28).", 0.2)
    dual_clip_c: float = doc("Dual-clip constant c > 1 for A < 0 (0 = off; verl uses 3, FIPO 10).", 0.0)
    beta: float = doc("KL coefficient to the reference model (0 = no reference model is loaded).", 0.0)
    kl_estimator: str = doc("KL estimator for kl_placement='loss': k1, k2, k3.", "k3")
    kl_placement: str = doc("Where the KL goes: 'loss' (beta*k per token), 'reward' (R -= beta*sum k1) or 'advantage' (FRPO, needs credit='frpo').", "loss")
    fipo_tau: float = doc("FIPO half-life tau of the future-KL discount, in tokens (gamma = 2^(-1/tau)).", 32.0)
    fipo_f_low: float = doc("FIPO lower clip of the influence weight f.", 1.0)
    fipo_f_high: float = doc("FIPO upper clip of the influence weight f.", 1.2)
    fipo_safety: float = doc("FIPO safety threshold: for A<0 and ratio > safety, f is clamped to [0.8, 1].", 10.0)
    fipo_drop_seqs: bool = doc("FIPO: drop a sequence with more than one negative-advantage token past the dual-clip threshold (official code).", True)
    dynamic_sampling: bool = doc("DAPO dynamic sampling: drop groups with all-equal rewards and sample more prompts.", False)
    max_gen_batches: int = doc("Dynamic sampling: at most this many rollout rounds per step.", 3)
    overlong_filter: bool = doc("DAPO overlong filtering: truncated responses are masked out of the loss.", False)
    dynamic_sampling_metric: str = doc("What dynamic sampling compares within a group: 'acc' (task correctness, as DAPO and verl's filter_groups.metric=acc) or 'reward' (the shaped total).", "acc")
    transforms: list[str] = doc("Extra batch transforms (`grpokit list transform`), run after overlong shaping/filtering and dynamic sampling.", factory=list)


@dataclass
class TrainConfig:
    steps: int = doc("Training steps (one rollout batch each).", 20)
    updates_per_rollout: int = doc("Optimizer steps (mini-batches) per rollout batch. FIPO needs >= 2 to act.", 1)
    micro_batch_size: int = doc("Sequences per forward/backward micro-batch (gradient accumulation).", 16)
    max_tokens_per_microbatch: int = doc("Pack micro-batches by token count instead of micro_batch_size (0 = off).", 0)
    pack_prompts: bool = doc("Score each group's shared prompt once (one packed sequence per group with a block attention mask) where it costs less than scoring every row; same log-probs to float rounding.", True)
    old_logprobs: str = doc("Old-policy log-probs: 'auto' (with updates_per_rollout = 1 the policy has not moved since sampling, so no separate pass: the ratio uses the detached current log-probs, as TRL does) or 'recompute' (always a separate forward pass, verl's default).", "auto")
    lr: float = doc("AdamW learning rate.", 1e-6)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    betas: list[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.99])
    warmup_steps: int = doc("Linear learning-rate warm-up, in optimizer steps.", 0)
    grad_clip: float = doc("Gradient-norm clip (0 = off).", 1.0)
    seed: int = doc("Seed for data, sampling and initialisation.", 0)
    run_dir: str = doc("Run directory ('' = runs/<recipe>-<time>).", "")
    save_every: int = doc("Checkpoint every N steps (0 = only at the end).", 0)
    keep_last: int = doc("Checkpoints kept.", 2)
    log_samples: int = doc("Sample completions written to samples.jsonl per step.", 2)
    threads: int = doc("torch CPU threads (0 = torch's default).", 0)
    max_nonfinite: int = doc("Stop after this many non-finite steps in a row (each is skipped).", 3)
    tensorboard: bool = doc("Write TensorBoard event files.", True)
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    progress: bool = doc("Show a progress bar.", True)
    report: bool = doc("Write report.html at the end.", True)
    final_eval: bool = doc("Evaluate the held-out set before and after training.", True)
    deterministic: bool = doc("torch deterministic algorithms (for exact resume tests).", False)


@dataclass
class DistConfig:
    strategy: str = doc("Data parallelism under torchrun: 'none', 'ddp' or 'fsdp2'.", "none")
    backend: str = doc("Process-group backend ('' = nccl on CUDA, gloo on CPU).", "")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    recipe: str = doc("Recipe name (set from the TOML file name).", "custom")


# ---------------------------------------------------------------------------- building and checking

def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(typ)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config field '{where}'{hint} (valid: {', '.join(prefix + n for n in names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; set its fields, e.g. {where}.{dataclasses.fields(current)[0].name}=...")
            _merge(current, value, f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['algo.beta=0.01', ...] -> nested dict. Values are TOML literals; bare words are strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value, e.g. algo.beta=0.01")
        path, text = item.split("=", 1)
        node = out
        keys = path.strip().split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = _parse_value(text.strip())
    return out


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **sections: Any) -> Config:
    """Defaults <- TOML recipe <- keyword sections <- `--set` overrides, then validated."""
    data: dict[str, Any] = {}
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"recipe '{path}' not found; `grpokit list recipes` shows the bundled ones")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe '{path}' is not valid TOML: {e}") from None
        data.setdefault("recipe", path.stem)
    _deep_update(data, sections)
    _deep_update(data, parse_overrides(overrides or []))
    _merge(cfg, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Raise ConfigError on impossible combinations; return (and emit) warnings for useless ones."""
    a, r, t = cfg.algo, cfg.rollout, cfg.train
    from grpokit.algo import ADVANTAGES, AGGREGATIONS, CREDIT, KL, LOSSES

    from grpokit.rollout.engine import ENGINES
    from grpokit.transforms import TRANSFORMS

    for reg, name, where in [
        (ENGINES, r.engine, "rollout.engine"), *[(TRANSFORMS, n, "algo.transforms") for n in a.transforms],
        (ADVANTAGES, a.advantage, "algo.advantage"), (LOSSES, a.loss, "algo.loss"),
        (AGGREGATIONS, a.aggregation, "algo.aggregation"), (CREDIT, a.credit, "algo.credit"),
        (KL, a.kl_estimator, "algo.kl_estimator"),
    ]:
        if name not in reg:
            try:
                reg.get(name)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
    choices = {
        "algo.std": (a.std, ("unbiased", "population")),
        "algo.kl_placement": (a.kl_placement, ("loss", "reward", "advantage")),
        "algo.divergence": (a.divergence, ("k1", "k3", "forward")),
        "rewards.on_error": (cfg.rewards.on_error, ("raise", "zero", "skip")),
        "model.precision": (cfg.model.precision, ("auto", "bf16", "fp32")),
        "dist.strategy": (cfg.dist.strategy, ("none", "ddp", "fsdp2")),
        "train.device": (t.device, ("auto", "cpu", "cuda")),
        "train.old_logprobs": (t.old_logprobs, ("auto", "recompute")),
        "algo.dynamic_sampling_metric": (a.dynamic_sampling_metric, ("acc", "reward")),
    }
    for where, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(valid)}")
    positive = {
        "rollout.prompts_per_step": r.prompts_per_step, "rollout.max_new_tokens": r.max_new_tokens,
        "train.steps": t.steps, "train.updates_per_rollout": t.updates_per_rollout,
        "train.micro_batch_size": t.micro_batch_size, "rollout.group_size": r.group_size,
    }
    for where, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where} must be >= 1, got {value}")
    if r.group_size < 2 and a.advantage in {"grpo", "dr_grpo", "rloo", "batch_std"}:
        raise ConfigError(
            f"rollout.group_size = {r.group_size} gives every group a single member, so the group-relative "
            f"advantage '{a.advantage}' is 0 everywhere and nothing trains; set rollout.group_size >= 2"
        )
    if (a.credit == "frpo") != (a.kl_placement == "advantage"):
        raise ConfigError("FRPO puts the KL in the advantage: set algo.credit = 'frpo' together with algo.kl_placement = 'advantage'")
    if a.credit == "frpo" and a.beta <= 0:
        raise ConfigError("algo.credit = 'frpo' needs algo.beta > 0 (the paper uses 0.01)")
    if a.dual_clip_c and a.dual_clip_c <= 1:
        raise ConfigError(f"algo.dual_clip_c must be > 1 (or 0 = off), got {a.dual_clip_c}")
    if not math.isfinite(t.lr) or t.lr <= 0:
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
    n_rewards = len(cfg.rewards.functions)
    if cfg.rewards.weights and len(cfg.rewards.weights) != n_rewards:
        raise ConfigError(f"rewards.weights has {len(cfg.rewards.weights)} entries for {n_rewards} rewards.functions; give one weight per function")
    if cfg.rewards.overlong_buffer and not 0 < cfg.rewards.overlong_buffer < r.max_new_tokens:
        raise ConfigError(
            f"rewards.overlong_buffer = {cfg.rewards.overlong_buffer} must be between 1 and rollout.max_new_tokens - 1 "
            f"= {r.max_new_tokens - 1} (DAPO's L_c is a buffer before L_max)"
        )
    batch = r.prompts_per_step * r.group_size
    if t.updates_per_rollout > batch:
        raise ConfigError(f"train.updates_per_rollout = {t.updates_per_rollout} exceeds the {batch} sequences of a rollout batch")
    notes = []
    if a.loss == "fipo" and t.updates_per_rollout < 2:
        notes.append(
            "algo.loss = 'fipo' with train.updates_per_rollout = 1: the policy equals the sampling policy in "
            "the only update, so every FIPO weight is exactly 1 and FIPO reduces to DAPO; set "
            "train.updates_per_rollout >= 2 (the paper uses 8)"
        )
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=2)
    return notes


# ---------------------------------------------------------------------------- saving and help

def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    import tomli_w

    data = to_dict(cfg)
    recipe = data.pop("recipe")
    Path(path).write_text(tomli_w.dumps({"recipe": recipe, **data}))


def help_text() -> str:
    """Every field with its type, default and documentation, section by section."""
    lines = ["configuration fields (set in a TOML recipe or with --set section.field=value):", ""]
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        lines.append(f"[{sec.name}]")
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"  {sec.name}.{f.name} ({typ}, default {getattr(obj, f.name)!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
