"""`grpokit sample`: rejection sampling, stage 3 of the DeepSeek-R1 recipe (SPEC 10; arXiv 2501.12948).

Sample N completions per prompt from a policy (temperature ~1), keep the correct and clean ones, and
write them as a (prompt, completion) JSONL dataset for the next SFT stage:

    cfg = load_sample_config("recipes/sample/r1_traces.toml", ["model.name=runs/grpo/final", "sample.n=8"])
    jsonl = run_sample(cfg)          # OUT/samples.jsonl; OUT/summary.json and OUT/config.toml beside it

Filters, in this order; a sample is removed (and counted) by the first one it fails:
1. `truncated`:  it hit `rollout.max_new_tokens` without EOS or a stop string (`sample.drop_truncated`).
2. `format`:     the `format` reward with `sample.format` (a preset) or `sample.format_pattern` gives 0.
3. `incorrect`:  its reward (`sample.reward_key`: by default the first correctness reward of
                 `rewards.functions`, e.g. numeric_match) is below `sample.threshold`, or it has no score.
4. `repetition`: repetition(text) > `sample.max_repetition`, where repetition is the fraction of the text's
                 word n-grams (whitespace-separated words, n = `sample.repetition_ngram`) that repeat an
                 earlier n-gram of the same text: 1 - distinct / total, 0 with fewer than n words. A loop
                 ("carry 1 carry 1 carry 1 ...") scores near 1; ordinary prose near 0.
5. `duplicate`:  its text after whitespace normalisation (runs of whitespace -> one space, stripped)
                 equals an earlier survivor's for the same prompt (`sample.dedup`).
6. `over_k`:     its prompt already has `sample.k` survivors: by default the shortest (in tokens; ties
                 by sample order) are kept, or a seeded random choice (`sample.order = "random"`).
The summary also counts, for each check, every sample that fails it (`failing`), whatever came first.

Output rows: prompt, completion, answer (the row's), source_model, reward (the weighted total of
`rewards.functions`), length (response tokens, EOS included), seed (the row's sampling seed), sample (its
index among the prompt's N), plus the task row's other columns.

Reproducibility: prompts come from `Random(sample.seed)`; sample j of prompt i is drawn with its own seed,
a hash of (sample.seed, i, j), so the same config gives the same samples whatever `sample.batch_size`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, get_type_hints

from grpokit.config import (
    ConfigError, DataConfig, ModelConfig, RewardsConfig, RolloutConfig, build, check_registered, doc, read_recipe,
    save_config,
)

__all__ = [
    "SampleConfig", "SampleOptions", "Candidate", "load_sample_config", "validate_sample", "sample_help_text",
    "run_sample", "apply_filters", "repetition", "normalise", "sample_seed", "format_counts", "FILTERS",
]

#: The filters in the order they run (module docstring); the keys of the summary's `removed` counts.
FILTERS = ("truncated", "format", "incorrect", "repetition", "duplicate", "over_k")
#: Rounds of `task.sample` spent looking for `sample.prompts` distinct prompts.
MAX_DRAW_ROUNDS = 20
#: Fields of the shared RL sections that sampling does not read (`--help` says so).
UNUSED_FIELDS = frozenset({
    "model.gradient_checkpointing", "model.lora_r", "model.lora_alpha", "model.lora_dropout", "model.lora_targets",
    "data.heldout_size", "rollout.prompts_per_step", "rollout.group_size", "rewards.overlong_buffer",
})
#: Removed samples kept per filter in summary.json, to show what each filter caught.
EXAMPLES_PER_FILTER = 2


@dataclass
class SampleOptions:
    prompts: int = doc("Distinct prompts to sample from.", 64)
    split: str = doc("'train' (draw the prompts from the task's training stream with Random(sample.seed)) or 'heldout' (its first `prompts` held-out rows).", "train")
    n: int = doc("N: completions sampled per prompt. Temperature, top_p, top_k, max_new_tokens, stop_strings and the engine come from [rollout]; rollout.group_size and rollout.prompts_per_step are not used.", 8)
    k: int = doc("Keep at most k samples per prompt after the other filters (0 = no cap).", 1)
    order: str = doc("Which k samples a prompt keeps: 'shortest' (fewest tokens first, ties by sample order, as R1) or 'random' (seeded).", "shortest")
    reward_key: str = doc("The score compared with sample.threshold: '' = the first correctness reward of rewards.functions (e.g. numeric_match), or the total when there is none; 'total' = the weighted total; or one reward's name.", "")
    threshold: float = doc("A sample is correct when its reward_key score >= threshold (no score = incorrect).", 1.0)
    format: str = doc("Well-formedness check: a preset of the `format` reward (number, think_answer, answer_tag, boxed); '' = none.", "")
    format_pattern: str = doc("A custom regex (DOTALL) the whole completion must match, instead of the preset ('' = use sample.format).", "")
    drop_truncated: bool = doc("Drop samples that hit rollout.max_new_tokens without EOS or a stop string.", True)
    max_repetition: float = doc("Drop samples whose repetition exceeds this: the fraction of their word n-grams that repeat an earlier one, 1 - distinct/total, in [0, 1] (1 = off).", 0.5)
    repetition_ngram: int = doc("n of the repetition measure, in whitespace-separated words.", 3)
    dedup: bool = doc("Drop a sample whose whitespace-normalised text equals an earlier kept sample's of the same prompt.", True)
    batch_size: int = doc("Sequences per engine.generate call, rounded down to whole prompts (at least one prompt's n samples).", 64)
    seed: int = doc("Seed of the prompt draw, the per-sample sampling seeds and order = 'random'.", 0)
    out_dir: str = doc("Output directory ('' = runs/<recipe>-<time>): samples.jsonl, summary.json, config.toml.", "")
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    threads: int = doc("torch CPU threads (0 = torch's default).", 0)
    progress: bool = doc("Print one line per generated batch.", True)


@dataclass
class SampleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    sample: SampleOptions = field(default_factory=SampleOptions)
    recipe: str = doc("Recipe name (set from the TOML file name).", "sample")


# ---------------------------------------------------------------------------- config

def load_sample_config(path: str | Path | None = None, overrides: list[str] | None = None, **sections: Any) -> SampleConfig:
    """Defaults <- TOML recipe <- keyword sections <- `--set` overrides, then validated. The RL sections
    `[model]`, `[data]`, `[rollout]`, `[rewards]` mean what they mean in `grpokit train`; `[sample]` is ours.
    LoRA fields are not used: give a merged model (a run's `final/` is one)."""
    data = read_recipe(path, kind="sample recipe", hint="bundled ones are in recipes/sample/") if path is not None else {}
    cfg = build(SampleConfig(), data, sections, overrides)
    validate_sample(cfg)
    return cfg


def validate_sample(cfg: SampleConfig) -> None:
    """Raise ConfigError, naming the field and the fix, on a config that cannot run."""
    from grpokit.rewards import FORMAT_PRESETS
    from grpokit.rollout.engine import ENGINES

    s, r = cfg.sample, cfg.rollout
    check_registered(ENGINES, r.engine, "rollout.engine")
    choices = {
        "sample.split": (s.split, ("train", "heldout")),
        "sample.order": (s.order, ("shortest", "random")),
        "sample.device": (s.device, ("auto", "cpu", "cuda")),
        "model.precision": (cfg.model.precision, ("auto", "bf16", "fp32")),
        "rewards.on_error": (cfg.rewards.on_error, ("raise", "zero", "skip")),
    }
    for where, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(valid)}")
    for where, value in {"sample.prompts": s.prompts, "sample.n": s.n, "sample.batch_size": s.batch_size,
                         "sample.repetition_ngram": s.repetition_ngram, "rollout.max_new_tokens": r.max_new_tokens}.items():
        if value < 1:
            raise ConfigError(f"{where} must be >= 1, got {value}")
    if s.k < 0:
        raise ConfigError(f"sample.k must be >= 0 (0 = keep every surviving sample), got {s.k}")
    if not math.isfinite(s.threshold):
        raise ConfigError(f"sample.threshold must be a finite number, got {s.threshold}")
    if not 0.0 <= s.max_repetition <= 1.0:
        raise ConfigError(f"sample.max_repetition is a fraction in [0, 1] (1 = off), got {s.max_repetition}")
    if s.format and not s.format_pattern and s.format not in FORMAT_PRESETS:
        raise ConfigError(f"sample.format = {s.format!r} is not a preset ({', '.join(FORMAT_PRESETS)}); use sample.format_pattern for a regex, or '' for no check")
    if r.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {r.temperature}")
    if r.temperature == 0 and s.n > 1:
        raise ConfigError(f"rollout.temperature = 0 (greedy) makes all sample.n = {s.n} samples of a prompt identical; sample at temperature ~1 (R1) or set sample.n = 1")
    weights = cfg.rewards.weights
    if weights and len(weights) != len(cfg.rewards.functions):
        raise ConfigError(f"rewards.weights has {len(weights)} entries for {len(cfg.rewards.functions)} rewards.functions; give one weight per function")


def sample_help_text() -> str:
    """Every field of the sample config with its type, default and documentation."""
    lines = ["configuration fields (set in a TOML recipe or with --set section.field=value):", ""]
    root = SampleConfig()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        lines.append(f"[{sec.name}]")
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
            unused = f"{sec.name}.{f.name}" in UNUSED_FIELDS
            lines.append(f"  {sec.name}.{f.name} ({typ}, default {getattr(obj, f.name)!r})" + (" [not used by sample]" if unused else ""))
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the filters (pure)

def repetition(text: str, n: int = 3) -> float:
    """The fraction of `text`'s word n-grams that repeat an earlier one: 1 - distinct / total (0 when the
    text has fewer than n words). "a b c a b c" with n = 3: 4 trigrams, 3 distinct -> 0.25."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def normalise(text: str) -> str:
    """The text the duplicate filter compares: runs of whitespace become one space, ends stripped."""
    return " ".join(text.split())


def sample_seed(seed: int, prompt_index: int, j: int) -> int:
    """The sampling seed of sample j of prompt i: a hash of (seed, i, j), 63 bits (a valid manual_seed)."""
    digest = hashlib.blake2b(f"sample/{seed}/{prompt_index}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Candidate:
    """One sampled completion and what the filters look at."""

    prompt_index: int         # the prompt's position in the drawn list
    j: int                    # the sample's index among the prompt's N
    row: dict[str, Any]       # the task row (prompt, answer, ...)
    text: str
    length: int               # response tokens, EOS included
    truncated: bool
    seed: int
    reward: float             # the weighted total (NaN: skipped by rewards.on_error = 'skip')
    score: float              # the value compared with sample.threshold (NaN: no score)
    formatted: bool           # passed the format check (True when there is none)


def _verdict(c: Candidate, o: SampleOptions) -> dict[str, bool]:
    """filter name -> whether `c` fails it (the per-sample checks, 1-4)."""
    return {
        "truncated": o.drop_truncated and c.truncated,
        "format": not c.formatted,
        "incorrect": not (c.score >= o.threshold),  # NaN fails
        "repetition": repetition(c.text, o.repetition_ngram) > o.max_repetition,
    }


def apply_filters(cands: Sequence[Candidate], o: SampleOptions) -> tuple[list[Candidate], dict[str, Any]]:
    """The six filters of the module docstring over every candidate -> (kept, report). `report` holds
    `removed` (filter -> samples it removed, each sample counted once, by the first filter it fails),
    `failing` (check -> every sample failing it), and `examples` (filter -> a few removed texts)."""
    removed = {name: 0 for name in FILTERS}
    failing = {name: 0 for name in FILTERS[:4]}
    examples: dict[str, list[str]] = {name: [] for name in FILTERS}

    def drop(name: str, c: Candidate) -> None:
        removed[name] += 1
        if len(examples[name]) < EXAMPLES_PER_FILTER:
            examples[name].append(c.text)

    survivors: dict[str, list[Candidate]] = {}  # prompt text -> survivors, in sample order
    seen: dict[str, set[str]] = {}
    for c in sorted(cands, key=lambda c: (c.prompt_index, c.j)):
        verdict = _verdict(c, o)
        for name, fails in verdict.items():
            failing[name] += fails
        first = next((name for name, fails in verdict.items() if fails), None)
        if first is not None:
            drop(first, c)
            continue
        prompt, key = c.row["prompt"], normalise(c.text)
        texts = seen.setdefault(prompt, set())
        if o.dedup and key in texts:
            drop("duplicate", c)
            continue
        texts.add(key)
        survivors.setdefault(prompt, []).append(c)
    kept: list[Candidate] = []
    rng = random.Random(o.seed)
    for group in survivors.values():
        if o.order == "shortest":
            ranked = sorted(group, key=lambda c: (c.length, c.j))
        else:
            ranked = list(group)
            rng.shuffle(ranked)
        cap = o.k if o.k > 0 else len(ranked)
        kept += ranked[:cap]
        for c in ranked[cap:]:
            drop("over_k", c)
    return kept, {"removed": removed, "failing": failing, "examples": examples}


def format_counts(generated: int, removed: dict[str, int]) -> str:
    """The table `grpokit sample` prints: each filter, the samples it removed, and those left after it."""
    lines = [f"{'filter':<12} {'removed':>8} {'left':>8}", f"{'generated':<12} {'':>8} {generated:>8}"]
    left = generated
    for name in FILTERS:
        left -= removed[name]
        lines.append(f"{name:<12} {removed[name]:>8} {left:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the stage

def _draw_prompts(task: Any, o: SampleOptions) -> list[dict[str, Any]]:
    if o.split == "heldout":
        try:
            rows = task.heldout(o.prompts)
        except ValueError as e:
            raise ConfigError(f"sample.prompts = {o.prompts} held-out rows: {e}") from None
        return rows
    rng = random.Random(o.seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(MAX_DRAW_ROUNDS):
        for row in task.sample(o.prompts - len(rows), rng):
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        if len(rows) == o.prompts:
            break
    return rows


def _score_value(result: Any, scorer: Any, key: str) -> list[float]:
    if key == "total":
        return [float(x) for x in result.total.tolist()]
    name = key or scorer.accuracy_key
    if name is None:
        return [float(x) for x in result.total.tolist()]
    valid = result.valid.tolist()
    return [v if ok else math.nan for v, ok in zip(result.per_function[name], valid)]


def _format_check(o: SampleOptions) -> Callable[[list[str], list[str]], list[float]] | None:
    from grpokit.rewards import format_reward

    if o.format_pattern:
        return lambda p, c: format_reward(p, c, pattern=o.format_pattern, match="fullmatch")
    if o.format:
        return lambda p, c: format_reward(p, c, preset=o.format)
    return None


def _out_dir(cfg: SampleConfig) -> Path:
    if cfg.sample.out_dir:
        return Path(cfg.sample.out_dir)
    return Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def _output_row(c: Candidate, source_model: str) -> dict[str, Any]:
    extra = {k: v for k, v in c.row.items() if k not in ("prompt", "completion")}
    return {
        **extra, "prompt": c.row["prompt"], "completion": c.text, "answer": c.row.get("answer"),
        "source_model": source_model, "reward": None if math.isnan(c.reward) else c.reward,
        "length": c.length, "seed": c.seed, "sample": c.j,
    }


def run_sample(cfg: SampleConfig, *, engine: Any = None, model: Any = None, tokenizer: Any = None,
               task: Any = None, reward_funcs: Sequence[Any] | None = None) -> Path:
    """Generate `sample.n` completions for each of `sample.prompts` prompts, score, filter, write
    OUT/samples.jsonl (returned), OUT/summary.json and OUT/config.toml, and print the filter table.

    engine/model/tokenizer/task/reward_funcs replace what the config names: an engine object (anything with
    `generate(prompt_ids, SamplingParams, seeds) -> Rollout`) needs the tokenizer that encodes its prompts.
    """
    import torch

    from grpokit.data import get_task
    from grpokit.rollout import encode_prompts
    from grpokit.rollout.engine import SamplingParams, build_engine
    from grpokit.train.context import build_scorer, pick_device

    o, r = cfg.sample, cfg.rollout
    t_start = time.perf_counter()
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    scorer = build_scorer(cfg, reward_funcs)  # before any model is loaded: a bad reward fails fast
    if o.reward_key not in ("", "total") and o.reward_key not in scorer.names:
        raise ConfigError(f"sample.reward_key = {o.reward_key!r} is not one of the rewards ({', '.join(scorer.names)}), '' or 'total'")
    fmt = _format_check(o)
    task = task if task is not None else get_task(cfg.data.task, **cfg.data.task_options)
    rows = _draw_prompts(task, o)
    if not rows:
        raise ConfigError(f"task '{cfg.data.task}' gave no prompts for sample.split = '{o.split}'")
    if len(rows) < o.prompts:
        print(f"sample: the task gave {len(rows)} distinct prompts of the {o.prompts} asked for (sample.prompts)", file=sys.stderr)
    own_engine = engine is None
    if own_engine:
        from grpokit.models import load_model
        from grpokit.report.cli import resolve_model

        device = pick_device(o.device)
        if model is None:
            model, tokenizer = load_model(resolve_model(cfg.model.name))
        elif tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=... too")
        model.to(device)
        engine = build_engine(r.engine, model, tokenizer, device=device, precision=cfg.model.precision, shares_weights=True)
    elif tokenizer is None:
        raise ValueError("an engine object needs the tokenizer of its model (to encode the prompts): pass tokenizer=...")

    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, stop_strings=tuple(r.stop_strings))
    prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in rows], system=cfg.data.system_prompt or None,
                                chat=cfg.data.chat_template)
    stats = {"generate": 0.0, "score": 0.0, "tokens": 0, "reward_errors": {}}
    cands: list[Candidate] = []
    per_batch = max(1, o.batch_size // o.n)  # whole prompts: the engine prefills a prompt's n copies once
    try:
        for start in range(0, len(rows), per_batch):
            idx = list(range(start, min(start + per_batch, len(rows))))
            cands += _sample_batch(engine, scorer, fmt, rows, prompt_ids, idx, params, o, stats)
            if o.progress:
                print(f"sample: {len(cands)}/{len(rows) * o.n} generated ({stats['generate']:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if own_engine:
            engine.close()
    kept, report = apply_filters(cands, o)
    return _write(cfg, rows, cands, kept, report, stats, time.perf_counter() - t_start)


def _sample_batch(engine: Any, scorer: Any, fmt: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]],
                  idx: list[int], params: Any, o: SampleOptions, stats: dict[str, Any]) -> list[Candidate]:
    """Generate `o.n` samples for each prompt in `idx` (one engine call) and score them."""
    from grpokit.rewards import columns_from_rows

    pairs = [(i, j) for i in idx for j in range(o.n)]
    b_rows = [rows[i] for i, _ in pairs]
    seeds = [sample_seed(o.seed, i, j) for i, j in pairs]
    t0 = time.perf_counter()
    roll = engine.generate([prompt_ids[i] for i, _ in pairs], params, seeds)
    t1 = time.perf_counter()
    lengths = roll.response_mask.sum(1).tolist()
    truncated = roll.truncated.tolist()
    prompts = [row["prompt"] for row in b_rows]
    result = scorer.score(prompts, roll.texts, columns_from_rows(b_rows, completion_lengths=lengths, truncated=truncated))
    scores = _score_value(result, scorer, o.reward_key)
    formatted = fmt(prompts, roll.texts) if fmt is not None else [1.0] * len(pairs)
    stats["generate"] += t1 - t0
    stats["score"] += time.perf_counter() - t1
    stats["tokens"] += int(sum(lengths))
    for name, count in result.errors.items():
        stats["reward_errors"][name] = stats["reward_errors"].get(name, 0) + count
    return [Candidate(i, j, rows[i], roll.texts[m], int(lengths[m]), bool(truncated[m]), seeds[m],
                      float(result.total[m]), scores[m], formatted[m] >= 1.0) for m, (i, j) in enumerate(pairs)]


def _write(cfg: SampleConfig, rows: list[dict[str, Any]], cands: list[Candidate], kept: list[Candidate],
           report: dict[str, Any], stats: dict[str, Any], seconds: float) -> Path:
    """OUT/config.toml, OUT/samples.jsonl (returned) and OUT/summary.json; print the filter table."""
    o = cfg.sample
    out = _out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")
    jsonl = out / "samples.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for c in kept:
            f.write(json.dumps(_output_row(c, cfg.model.name)) + "\n")
    n_gen = max(len(cands), 1)
    summary = {
        "source_model": cfg.model.name, "task": cfg.data.task, "split": o.split, "prompts": len(rows),
        "n": o.n, "k": o.k, "generated": len(cands), **report, "kept": len(kept),
        "prompts_kept": len({c.prompt_index for c in kept}),
        "correct_rate": sum(c.score >= o.threshold for c in cands) / n_gen,
        "format_rate": sum(c.formatted for c in cands) / n_gen,
        "truncation_rate": sum(c.truncated for c in cands) / n_gen,
        "mean_length_generated": stats["tokens"] / n_gen,
        "mean_length_kept": sum(c.length for c in kept) / len(kept) if kept else 0.0,
        "tokens_generated": stats["tokens"], "reward_errors": stats["reward_errors"],
        "seconds": {"generate": stats["generate"], "score": stats["score"], "total": seconds},
        "samples": str(jsonl),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rejection sampling from {cfg.model.name}: {len(rows)} prompts x {o.n} samples "
          f"({stats['tokens']} tokens, {stats['generate']:.1f} s generating)")
    print(format_counts(len(cands), report["removed"]))
    print(f"kept {len(kept)} samples for {summary['prompts_kept']}/{len(rows)} prompts -> {jsonl}")
    return jsonl
