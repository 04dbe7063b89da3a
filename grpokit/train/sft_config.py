"""The typed configuration of the SFT stage (SPEC 10, stage 1): `grpokit sft RECIPE`.

A recipe is a TOML file with the tables `[model]`, `[data]`, `[train]`, `[dist]` (`[model]` and `[dist]`
are the RL config's own sections). Overrides use dotted paths: `--set train.lr=1e-4`. A misspelt field
fails with the nearest valid name; the resolved config is saved as `config.toml` in the run directory.
Bundled SFT recipes live in `recipes/sft/` (apart from the RL recipes in `recipes/`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from grpokit.config import ConfigError, DistConfig, ModelConfig, build, doc, read_recipe, save_config

__all__ = ["SFTConfig", "SFTDataConfig", "SFTTrainConfig", "load_sft_config", "save_sft_config", "sft_help_text", "validate_sft"]


@dataclass
class SFTDataConfig:
    path: str = doc("Training data: a .jsonl or .parquet file of (prompt, completion) rows, or 'hf:<dataset dir or id>'. A relative path is looked up from the working directory, then from the grpokit checkout.", "")
    column_map: dict[str, str] = doc("Source column of each row key, e.g. {prompt = 'question', completion = 'response'}; unmapped keys use columns of the same name.", factory=dict)
    split: str = doc("Split of an 'hf:' dataset.", "train")
    heldout_path: str = doc("A separate held-out file (or, for 'hf:', a split name) whose completion loss is evaluated ('' = use heldout_fraction).", "")
    heldout_fraction: float = doc("Fraction of the rows held out for the evaluation loss when no heldout_path is given (0 = no held-out evaluation).", 0.0)
    split_seed: int = doc("Seed of the held-out split.", 0)
    system_prompt: str = doc("System message for the chat template ('' = none); use the RL run's value so SFT and rollouts see the same prompts.", "")
    chat_template: bool = doc("Wrap prompts in the tokenizer's chat template with a generation prompt, exactly as rollouts do (grpokit.rollout.encode_prompts).", True)
    max_length: int = doc("Longest example (prompt + completion + EOS) in tokens; longer rows are handled by on_too_long.", 2048)
    on_too_long: str = doc("A row over max_length: 'skip' (dropped and counted) or 'raise' (stop, naming the row).", "skip")


@dataclass
class SFTTrainConfig:
    steps: int = doc("Optimizer steps.", 100)
    batch_size: int = doc("Examples per optimizer step, over all ranks (the loss is the token mean over all their completion tokens, SPEC 3).", 32)
    micro_batch_size: int = doc("Examples per forward/backward micro-batch on one rank (gradient accumulation).", 8)
    max_tokens_per_microbatch: int = doc("Plan micro-batches by a token budget instead of micro_batch_size (0 = off): packed, the sum of the examples' lengths; unpacked, rows x longest row.", 0)
    pack: bool = doc("Pack each micro-batch's examples into one row with per-example position ids and a block-diagonal causal mask (no attention across examples). Only with sdpa or eager attention; other implementations train unpacked, padded.", True)
    lr: float = doc("AdamW peak learning rate.", 1e-5)
    lr_schedule: str = doc("After warm-up: 'constant' or 'cosine' (to min_lr_ratio x lr at train.steps).", "constant")
    min_lr_ratio: float = doc("Final learning rate of the cosine schedule, as a fraction of lr.", 0.1)
    warmup_steps: int = doc("Linear learning-rate warm-up, in optimizer steps.", 0)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    betas: list[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.999])
    grad_clip: float = doc("Gradient-norm clip (0 = off).", 1.0)
    seed: int = doc("Seed of the data order and initialisation.", 0)
    run_dir: str = doc("Run directory ('' = runs/<recipe>-<time>).", "")
    save_every: int = doc("Checkpoint every N steps (0 = only at the end).", 0)
    keep_last: int = doc("Checkpoints kept.", 2)
    eval_every: int = doc("Held-out loss every N steps (0 = only before and after training); needs a held-out split.", 0)
    eval_batch_size: int = doc("Examples per held-out evaluation forward pass.", 16)
    threads: int = doc("torch CPU threads (0 = torch's default).", 0)
    tensorboard: bool = doc("Write TensorBoard event files.", True)
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    progress: bool = doc("Show a progress bar.", True)
    report: bool = doc("Write report.html at the end.", True)
    deterministic: bool = doc("torch deterministic algorithms.", False)


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    recipe: str = doc("Recipe name (set from the TOML file name).", "sft")


def load_sft_config(path: str | Path | None = None, overrides: list[str] | None = None, **sections: Any) -> SFTConfig:
    """Defaults <- TOML recipe <- keyword sections <- `--set` overrides, then validated (`validate_sft`)."""
    data = read_recipe(path, kind="recipe", hint="bundled SFT recipes are in recipes/sft/ (e.g. `grpokit sft demo`)") if path is not None else {}
    cfg = build(SFTConfig(), data, sections, overrides)
    validate_sft(cfg)
    return cfg


def validate_sft(cfg: SFTConfig) -> None:
    """Raise ConfigError on a config that cannot run, naming the field and the fix."""
    t, d = cfg.train, cfg.data
    choices = {
        "train.lr_schedule": (t.lr_schedule, ("constant", "cosine")),
        "data.on_too_long": (d.on_too_long, ("skip", "raise")),
        "model.precision": (cfg.model.precision, ("auto", "bf16", "fp32")),
        "dist.strategy": (cfg.dist.strategy, ("none", "ddp", "fsdp2")),
        "train.device": (t.device, ("auto", "cpu", "cuda")),
    }
    for where, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(valid)}")
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.micro_batch_size": t.micro_batch_size,
                "train.eval_batch_size": t.eval_batch_size, "data.max_length": d.max_length}
    for where, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where} must be >= 1, got {value}")
    if not math.isfinite(t.lr) or t.lr <= 0:
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
    if not 0.0 <= d.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction must be in [0, 1), got {d.heldout_fraction}")
    if d.heldout_path and d.heldout_fraction:
        raise ConfigError("set either data.heldout_path or data.heldout_fraction, not both")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas must have two entries (beta1, beta2), got {t.betas}")
    bad = sorted(set(d.column_map) - {"prompt", "completion"})
    if bad:
        raise ConfigError(f"data.column_map keys {bad} are not row keys; map 'prompt' and/or 'completion' to source columns")
    if t.max_tokens_per_microbatch and t.max_tokens_per_microbatch < 1:
        raise ConfigError(f"train.max_tokens_per_microbatch must be >= 1 or 0 (off), got {t.max_tokens_per_microbatch}")


def save_sft_config(cfg: SFTConfig, path: str | Path) -> None:
    """Write the resolved config as TOML (loadable by `load_sft_config`)."""
    save_config(cfg, path)  # type: ignore[arg-type]  (it only needs a dataclass with a `recipe` field)


def sft_help_text() -> str:
    """Every SFT field with its type, default and documentation, section by section (`grpokit sft --help`)."""
    lines = ["SFT configuration fields (set in a TOML recipe or with --set section.field=value):", ""]
    root = SFTConfig()
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
