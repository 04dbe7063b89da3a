"""GRPO, Dr. GRPO, DAPO, FIPO and FRPO at equal compute: do they deliver what their papers claim, here?

Every method runs from its bundled recipe (`recipes/<method>.toml`: advantage, loss, aggregation, clip
range, KL, dynamic sampling, overlong shaping, FIPO/FRPO settings), with the compute settings overridden
to one common value for all methods: the same SFT-warmed model, prompts per step, group size, new-token
budget, temperature, steps, learning rate, updates per rollout (2: FIPO needs >= 2 to act, so all get 2)
and micro-batch size. Two length-dependent recipe constants are rescaled to the shorter budget and said
so in the results (Dr. GRPO's norm_const = max_new_tokens, DAPO's overlong buffer = 1/4 of it, as in
the recipes). DAPO's dynamic sampling still draws up to `max_gen_batches` rollout rounds per step; the
tokens every method actually generated are counted and reported.

Model and tasks. The policy is grpokit's from-scratch character-level Llama (`grpokit.models.make_tiny`,
~0.3M parameters), warmed up by a short SFT on deliberately noisy answers: every answer digit is right
with probability `--p-digit` (0.4), else shifted by one (d -> d+1 mod 10), as in tests/toy.py. The
warmed-up model is right only part of the time and RL has signal. The two tasks are built-in `arith`
configurations with single-digit operands (100 problems each; the task keeps 50 as its held-out split):
`add1` (a + b) and `mul1` (a * b). The SFT data covers all 100 problems, held-out ones included, with
the same noisy answers; RL never sees a held-out problem. So the held-out gain measures whether what RL
fixes on the training problems carries over to problems that got no reward, not whether the model
learns arithmetic facts it never saw (a 0.3M character model cannot in a few minutes). The warm model is
cached under ~/.cache/grpokit/bench/ keyed by task and SFT settings.

All runs happen in this one Python process (grpokit is imported once): `grpokit.config.load_config(recipe,
overrides)` then `grpokit.train.loop.train(cfg)`. Per run: greedy held-out accuracy before and after
(eval.json), plus a per-problem re-evaluation of `final/` (needed for the bootstrap), held-out avg@8 at
T = 1, training-batch accuracy, length, entropy, KL to the reference (metrics.jsonl). The benchmark wraps
three trainer functions (`Sampler.generate`, `collect.score`, `loop.train_step`) read-only to count every
generated token and the accuracy of each step's first, unfiltered rollout round (DAPO's `acc` is measured
on the kept, mixed-reward groups only, which is not comparable).

    .venv/bin/python benchmarks/algorithms.py                      # the full default (~10-15 min, 1 thread)
    .venv/bin/python benchmarks/algorithms.py --quick              # smoke: 1 seed, 2 steps, 1 task (< 1 min)
    .venv/bin/python benchmarks/algorithms.py --seeds 0 1 2 3 --tasks add1 --methods grpo fipo --steps 60

Writes benchmarks/results/algorithms.md (tables + settings), algorithms.json (every per-run number) and
algorithms_<task>.png (training accuracy vs step; held-out gain with 95% intervals). `--update-readme`
also replaces the "## Algorithms at equal compute" section of benchmarks/README.md.

Long-response mode (`--tasks trace2`): answers of one or two tokens give FIPO's future-KL weights and FRPO's
KL-to-go nothing to act on, so this mode uses the built-in `add_trace` task: two-digit addition worked column
by column, "<think>units 7+5=12 write 2 carry 1; tens 4+8+1=13 write 3 carry 1; hundreds 1</think>\n<answer>
132</answer>", 80-100 characters = tokens for the character model, where the units column (the first tokens)
decides everything after it. The warm model is SFT'd on the task's training stream with `error_rate` 0.5 (half
the traces carry one slip, consistent thereafter, so the answer is wrong), which leaves it right part of the
time; reward `numeric_match` (the <answer>). Its own compute settings (COMMON_LONG: 128 new tokens), SFT
(SFT_LONG), steps (LONG_STEPS) and nine methods by default: GRPO, Dr. GRPO, DAPO, FIPO, FRPO, GSPO, GSPO with
min-replace (`algo.seq_weight = "min_replace"`), Clip-Cov and ACE. Besides accuracy, length and entropy it
records the cancellation residual (`cancel/residual`, logged by the trainer for every method) and how far
FIPO's weights (`fipo/weight_mean`, `fipo/weight_max`, `fipo/frac_at_high`) and FRPO's shifts
(`credit/shift_abs_mean`, `frpo/kl_term_abs_mean`) depart from 1 and 0. Writes algorithms_long.md,
algorithms_long.json and algorithms_long_trace2.png (accuracy with a band over seeds, held-out accuracy with
95% intervals, length, entropy, cancellation residual); `--update-readme` replaces the "## Long responses:
credit assignment at equal compute" section.

    .venv/bin/python benchmarks/algorithms.py --tasks trace2 --update-readme     # 9 methods x 3 seeds
    .venv/bin/python benchmarks/algorithms.py --tasks trace2 --quick             # smoke (< 1 min with a cached warm model)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, offline_env  # noqa: E402

offline_env(HF_HUB_DISABLE_PROGRESS_BARS="1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
README = REPO / "benchmarks" / "README.md"
README_SECTION = "## Algorithms at equal compute"

#: method -> (recipe file, one-line description of what the recipe sets)
METHODS: dict[str, tuple[str, str]] = {
    "grpo": ("grpo.toml", "grpo adv (unbiased std), ppo_clip 0.2/0.2, seq_mean_token_mean, k3 KL in loss beta 0.04"),
    "dr_grpo": ("dr_grpo.toml", "dr_grpo adv (no std), ppo_clip 0.2/0.2, seq_mean_token_sum_norm, beta 0"),
    "dapo": ("dapo.toml", "grpo adv, ppo_clip 0.2/0.28, token_mean, dynamic sampling (max_gen_batches 3), overlong shaping, beta 0"),
    "fipo": ("fipo.toml", "grpo adv, fipo loss 0.2/0.28, dual-clip 10, tau 32, f in [1, 1.2], token_mean, beta 0"),
    "frpo": ("frpo.toml", "grpo adv (population std), frpo credit k1 KL-to-go beta 0.01, ppo_clip 0.2/0.28, token_mean"),
    "gspo": ("gspo.toml", "grpo adv, gspo loss (sequence-level ratio, clip 3e-4/4e-4), seq_mean_token_mean, beta 0"),
    "gspo_mr": ("gspo.toml", "gspo.toml + algo.seq_weight = min_replace (group-min sequence weights, arXiv 2604.13088)"),
    "clip_cov": ("clip_cov.toml", "grpo adv, ppo_clip 1.0/1.0, token_mean, clip_cov token mask (ratio 2e-4, cov in [1, 5]), dynamic sampling (max_gen_batches 3), beta 0"),
    "ace": ("ace.toml", "grpo adv + ace transform (alpha 1, c_i vs the reference), ppo_clip 0.2/0.28, token_mean, beta 0"),
}
#: Settings a method adds on top of its recipe (several methods share one recipe file).
METHOD_EXTRA: dict[str, dict[str, Any]] = {"gspo_mr": {"algo.seq_weight": "min_replace"}}
LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO", "fipo": "FIPO", "frpo": "FRPO", "gspo": "GSPO",
          "gspo_mr": "GSPO+min-replace", "clip_cov": "Clip-Cov", "ace": "ACE"}
COLORS = {"grpo": "#1f77b4", "dr_grpo": "#ff7f0e", "dapo": "#2ca02c", "fipo": "#d62728", "frpo": "#9467bd",
          "gspo": "#8c564b", "gspo_mr": "#e377c2", "clip_cov": "#7f7f7f", "ace": "#bcbd22"}
#: The short mode's methods (its default) and the long-response mode's (its default).
SHORT_METHODS = ["grpo", "dr_grpo", "dapo", "fipo", "frpo"]
LONG_METHODS = ["grpo", "dr_grpo", "dapo", "fipo", "frpo", "gspo", "gspo_mr", "clip_cov", "ace"]

#: Built-in grpokit tasks: name -> (task spec, task options). Single-digit operands: 100 problems, the
#: largest held-out split ArithTask allows is half of them.
TASK_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "add1": ("arith", {"ops": ["+"], "min_digits": 1, "max_digits": 1, "heldout_size": 50}),
    "mul1": ("arith", {"ops": ["*"], "min_digits": 1, "max_digits": 1, "heldout_size": 50}),
    "sub1": ("arith", {"ops": ["-"], "min_digits": 1, "max_digits": 1, "heldout_size": 50}),
    # the long-response mode: two-digit addition worked column by column (~90 characters = tokens)
    "trace2": ("add_trace", {"ops": ["+"], "min_digits": 2, "max_digits": 2, "error_rate": 0.5, "prompt_suffix": "",
                             "heldout_size": 100}),
}
DEFAULT_TASKS = ["add1", "mul1"]
#: Tasks of the long-response mode (its own settings, outputs and README section; not mixed with short ones).
LONG_TASKS = {"trace2"}

#: The compute settings every method shares (the recipes' own values are overridden).
COMMON = {
    "prompts_per_step": 8,
    "group_size": 8,
    "max_new_tokens": 8,
    "temperature": 1.0,
    "lr": 1e-3,
    "updates_per_rollout": 2,
    "micro_batch_size": 64,
}
#: The SFT warm-up (cached per task and these settings).
SFT = {"p_digit": 0.4, "copies": 40, "steps": 800, "batch_size": 32, "lr": 3e-3, "seed": 0, "model_seed": 0}
QUICK_SFT_STEPS = 100
#: The long-response mode's shared compute settings and SFT warm-up (see the module docstring).
COMMON_LONG = {
    "prompts_per_step": 8,
    "group_size": 8,
    "max_new_tokens": 128,
    "temperature": 1.0,
    "lr": 1e-4,
    "updates_per_rollout": 2,
    "micro_batch_size": 64,
}
SFT_LONG = {"n_rows": 20000, "steps": 1500, "batch_size": 32, "lr": 3e-3, "seed": 0, "model_seed": 0}
LONG_STEPS = 30
LONG_PREFIX = "algorithms_long"
LONG_README_SECTION = "## Long responses: credit assignment at equal compute"
BOOT_RESAMPLES = 1000  # as grpokit.report.evaluate
EVAL_K = 8  # held-out avg@k at temperature 1 (a lower-variance companion of the greedy accuracy)
LAST = 10  # "end of training" = mean over the last LAST steps


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================ environment

def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"


def machine_info() -> dict[str, Any]:
    import transformers

    cpu = cpu_model()
    git = ""
    with contextlib.suppress(Exception):
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "git_head": git,
        # the trainer was being edited while this ran: record exactly which files this process imported
        "sha256_12": {p: sha256_file(REPO / p) for p in ("grpokit/train/loop.py", "grpokit/train/step.py",
                                                           "grpokit/rollout/sampler.py", "grpokit/algo/losses.py")},
        "loadavg_start": os.getloadavg(),
    }


# ============================================================================ tasks and the warm model

def all_problems(task: Any) -> list[tuple[int, str, int]]:
    """Every problem of a small ArithTask (+, -, * only)."""
    out = []
    for op in task.ops:
        if op == "/":
            raise ValueError("this benchmark enumerates +, -, * problems only")
        for a in range(task.lo, task.hi + 1):
            for b in range(task.lo, task.hi + 1):
                if op == "-" and not task.allow_negative and a < b:
                    continue
                out.append((a, op, b))
    return out


def noisy(answer: str, p: float, rng: random.Random) -> str:
    """Each digit right with probability p, else shifted by one (d -> d+1 mod 10); signs kept."""
    return "".join(c if not c.isdigit() or rng.random() < p else str((int(c) + 1) % 10) for c in answer)


def warm_model(task_name: str, sft_cfg: dict[str, Any], cache: Path) -> tuple[str, dict[str, Any]]:
    """The SFT-warmed tiny model for a task: a cached save_pretrained directory (built on first use)."""
    from grpokit.data import get_task
    from grpokit.models import make_tiny
    from grpokit.models.tiny import TINY_INIT_STD, TINY_SHAPE
    from grpokit.train.sft import sft

    spec, options = TASK_SPECS[task_name]
    long = spec == "add_trace"
    key = {"task": spec, "options": options, "sft": sft_cfg, "shape": TINY_SHAPE, "init_std": TINY_INIT_STD,
           "noise": ("the task's own error_rate slips; training stream only" if long else
                     "digit right w.p. p else d+1 mod 10; all problems incl. held-out"), "version": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"{task_name}-{digest}"
    meta_path = path / "bench_meta.json"
    if meta_path.exists():
        meta = {**json.loads(meta_path.read_text()), "cached": True}
        log(f"warm model {task_name}: cached {path}")
        return str(path), meta
    task = get_task(spec, **options)
    rng = random.Random(sft_cfg["seed"])
    if long:  # traces from the training stream (never a held-out problem); error_rate of them have one slip
        from grpokit.rewards.extract import extract_number

        rows = task.sample(sft_cfg["n_rows"], rng)
        pairs = [(r["prompt"], r["completion"]) for r in rows]
        right = sum(extract_number(c) == extract_number(r["answer"]) for (_, c), r in zip(pairs, rows))
    else:
        rows = [task.row(p) for p in all_problems(task)]
        pairs = [(r["prompt"], noisy(r["answer"], sft_cfg["p_digit"], rng)) for r in rows for _ in range(sft_cfg["copies"])]
        right = sum(a == r["answer"] for (_, a), r in zip(pairs, [r for r in rows for _ in range(sft_cfg["copies"])]))
    log(f"warm model {task_name}: SFT {sft_cfg['steps']} steps on {len(pairs)} noisy pairs "
        f"({right / len(pairs):.2f} of them right), caching in {path}")
    t0 = time.perf_counter()
    torch.manual_seed(sft_cfg["seed"])
    model, tok = make_tiny(seed=sft_cfg["model_seed"])
    losses = sft(model, tok, pairs, steps=sft_cfg["steps"], batch_size=sft_cfg["batch_size"], lr=sft_cfg["lr"],
                 seed=sft_cfg["seed"])
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=cache))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    meta = {"key": key, "sft_time_s": time.perf_counter() - t0, "sft_loss_first": losses[0],
            "sft_loss_last20": float(np.mean(losses[-20:])), "frac_sft_answers_right": right / len(pairs),
            "n_problems": len(rows), "n_pairs": len(pairs)}
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    log(f"warm model {task_name}: done in {meta['sft_time_s']:.0f}s, loss {losses[0]:.2f} -> {meta['sft_loss_last20']:.3f}")
    return str(path), meta


# ============================================================================ instrumentation

class Tally:
    """Per-step counts gathered by read-only wrappers around three trainer functions."""

    def __init__(self) -> None:
        self.active = False
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.ok = {"generate": False, "score": False, "train_step": False}

    def install(self) -> None:
        from grpokit.rollout import sampler as sampler_mod
        from grpokit.train import collect, loop

        tally = self
        if hasattr(sampler_mod.Sampler, "generate"):
            orig_generate = sampler_mod.Sampler.generate

            def generate(self_: Any, *args: Any, **kwargs: Any) -> Any:
                out = orig_generate(self_, *args, **kwargs)
                if tally.active:  # inside a training step: rollouts only, never the held-out eval
                    with contextlib.suppress(Exception):
                        tally.cur["gen_tokens"] = tally.cur.get("gen_tokens", 0.0) + float(out.response_mask.sum())
                        tally.cur["gen_seqs"] = tally.cur.get("gen_seqs", 0.0) + float(out.response_mask.shape[0])
                return out

            sampler_mod.Sampler.generate = generate
            self.ok["generate"] = True
        if hasattr(collect, "score"):
            orig_score = collect.score

            def score(*args: Any, **kwargs: Any) -> Any:
                sc = orig_score(*args, **kwargs)
                if tally.active:
                    with contextlib.suppress(Exception):
                        c = sc.correct.float()
                        if "acc_first" not in tally.cur:  # the first, unfiltered rollout round of the step
                            tally.cur["acc_first"] = float(c.mean())
                        tally.cur["correct_all"] = tally.cur.get("correct_all", 0.0) + float(c.sum())
                        tally.cur["scored_all"] = tally.cur.get("scored_all", 0.0) + float(c.numel())
                return sc

            collect.score = score
            self.ok["score"] = True
        if hasattr(loop, "train_step"):
            orig_step = loop.train_step

            def train_step(*args: Any, **kwargs: Any) -> Any:
                tally.active, tally.cur = True, {}
                try:
                    return orig_step(*args, **kwargs)
                finally:
                    tally.active = False
                    tally.steps.append(tally.cur)

            loop.train_step = train_step
            self.ok["train_step"] = True

    def start_run(self) -> None:
        self.steps = []


# ============================================================================ one run

def toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_literal(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    return json.dumps(v)


def method_overrides(method: str, recipe: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """The per-method settings that must follow the shared token budget (see the module docstring)."""
    ov: dict[str, Any] = {}
    rmax = recipe.get("rollout", {}).get("max_new_tokens", 32)
    if recipe.get("algo", {}).get("aggregation") == "seq_mean_token_sum_norm":
        ov["algo.norm_const"] = c["max_new_tokens"]  # Dr. GRPO's constant = the generation budget
    buf = recipe.get("rewards", {}).get("overlong_buffer", 0)
    if buf:
        ov["rewards.overlong_buffer"] = max(1, round(buf * c["max_new_tokens"] / rmax))  # keep L_c / L_max
    return ov


def overrides_for(method: str, task_name: str, model_dir: str, seed: int, steps: int, run_dir: Path,
                  c: dict[str, Any]) -> dict[str, Any]:
    import tomllib

    recipe = tomllib.loads((RECIPES / METHODS[method][0]).read_text())
    spec, options = TASK_SPECS[task_name]
    ov: dict[str, Any] = {
        "model.name": model_dir, "model.precision": "fp32",
        "data.task": spec, "data.task_options": options, "data.heldout_size": options["heldout_size"],
        "rollout.prompts_per_step": c["prompts_per_step"], "rollout.group_size": c["group_size"],
        "rollout.max_new_tokens": c["max_new_tokens"], "rollout.temperature": c["temperature"],
        "train.steps": steps, "train.lr": c["lr"], "train.updates_per_rollout": c["updates_per_rollout"],
        "train.micro_batch_size": c["micro_batch_size"], "train.seed": seed, "train.run_dir": str(run_dir),
        "train.progress": False, "train.report": False, "train.tensorboard": False, "train.threads": 1,
        "train.device": "cpu", "train.log_samples": 1,
    }
    ov.update(method_overrides(method, recipe, c))
    ov.update(METHOD_EXTRA.get(method, {}))
    return ov


def evaluate_dir(model_dir: str | Path, cfg: Any, rows: list[dict[str, Any]], *, k: int, temperature: float,
                 seed: int) -> tuple[list[float], dict[str, Any]]:
    """Per-problem accuracy (mean of k samples) of a saved model on `rows`, with the run's reward set."""
    from grpokit.models import load_model
    from grpokit.report.evaluate import default_correct, evaluate
    from grpokit.train.loop import build_scorer

    model, tok = load_model(str(model_dir))
    model.eval()
    flags: list[bool] = []

    def capture(scores: Any) -> list[bool]:
        c = default_correct(scores)
        flags.extend(bool(x) for x in c)
        return c

    res = evaluate(model, tok, rows, reward_set=build_scorer(cfg), k=k, temperature=temperature,
                   max_new_tokens=cfg.rollout.max_new_tokens, batch_size=512, seed=seed, correct_fn=capture,
                   device="cpu")
    per = [float(np.mean(flags[i * k:(i + 1) * k])) for i in range(len(rows))]
    return per, res


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mean_last(rows: list[dict[str, Any]], key: str, n: int = LAST) -> float | None:
    vals = [r[key] for r in rows[-n:] if key in r and r[key] is not None and math.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def run_one(method: str, task_name: str, seed: int, steps: int, model_dir: str, runs_root: Path,
            c: dict[str, Any], tally: Tally, before_pp: dict[str, list[float]]) -> dict[str, Any]:
    from grpokit.config import load_config
    from grpokit.data import get_task
    from grpokit.train.loop import train

    run_dir = runs_root / f"{task_name}-{method}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    ov = overrides_for(method, task_name, model_dir, seed, steps, run_dir, c)
    items = [f"{k}={toml_literal(v)}" for k, v in ov.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(RECIPES / METHODS[method][0], items)
    tally.start_run()
    t0 = time.perf_counter()
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore")
        train(cfg)
    wall = time.perf_counter() - t0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    ev = json.loads((run_dir / "eval.json").read_text())
    heldout = get_task(cfg.data.task, **cfg.data.task_options).heldout(cfg.data.heldout_size)
    after_pp, _ = evaluate_dir(run_dir / "final", cfg, heldout, k=1, temperature=0.0, seed=seed)
    after_k_pp, res_k = evaluate_dir(run_dir / "final", cfg, heldout, k=EVAL_K, temperature=c["temperature"], seed=seed)
    steps_t = tally.steps if len(tally.steps) == len(metrics) else [{} for _ in metrics]
    acc_first = [s.get("acc_first", m.get("acc")) for s, m in zip(steps_t, metrics)]
    gen_tokens = [s.get("gen_tokens") for s in steps_t]
    before, after = ev["before"]["acc"], ev["after"]["acc"]
    rec = {
        "method": method, "task": task_name, "seed": seed, "steps": len(metrics), "run_dir": str(run_dir),
        "overrides": items,
        "heldout_before": before, "heldout_after": after, "heldout_gain": after - before,
        "heldout_after_ci_problems": ev["after"].get("ci", {}).get("avg@k"),
        "heldout_after_recheck": float(np.mean(after_pp)),
        "heldout_before_per_problem": before_pp["greedy"], "heldout_after_per_problem": after_pp,
        "heldout_before_avg_at_k": float(np.mean(before_pp["sampled"])), "heldout_after_avg_at_k": float(np.mean(after_k_pp)),
        "heldout_after_avg_at_k_per_problem": after_k_pp,
        "heldout_before_avg_at_k_per_problem": before_pp["sampled"],
        "heldout_len_after": ev["after"].get("length", {}).get("mean"),
        "train_acc": acc_first, "train_acc_kept": [m.get("acc") for m in metrics],
        "train_acc_first5": float(np.mean(acc_first[:5])), "train_acc_last": float(np.mean(acc_first[-LAST:])),
        "len_mean": [m.get("len/mean") for m in metrics], "entropy": [m.get("entropy") for m in metrics],
        "kl_ref": [m.get("kl_ref") for m in metrics],
        "len_last": mean_last(metrics, "len/mean"), "entropy_first": metrics[0].get("entropy"),
        "entropy_last": mean_last(metrics, "entropy"), "kl_ref_last": mean_last(metrics, "kl_ref"),
        "frac_zero_var_groups": mean_last(metrics, "frac_zero_var_groups", len(metrics)),
        "dynamic_rounds_mean": mean_last(metrics, "dynamic/rounds", len(metrics)),
        "tokens_generated_total": float(sum(gen_tokens)) if all(g is not None for g in gen_tokens) else None,
        "tokens_trained_total": float(sum(m.get("tokens/trained", m.get("tokens/generated", 0.0)) for m in metrics)),
        "seqs_generated_total": float(sum(s.get("gen_seqs", 0.0) for s in steps_t)) or None,
        "time_step_total_s": float(sum(m.get("time/step", 0.0) for m in metrics)),
        "wall_s": wall,
        "fipo_weight_mean": mean_last(metrics, "fipo/weight", len(metrics)),
        "fipo_weight_max_mean": mean_last(metrics, "fipo/weight/max", len(metrics)),
        "fipo_frac_at_high": mean_last(metrics, "fipo/at_high", len(metrics)),
        "frpo_shift_abs_mean": mean_last(metrics, "credit/shift_abs_mean", len(metrics)),
        "frpo_shift_gt_adv_frac": mean_last(metrics, "credit/shift_gt_adv_frac", len(metrics)),
        "cancel_residual": [m.get("cancel/residual") for m in metrics],
        "cancel_residual_mean": mean_last(metrics, "cancel/residual", len(metrics)),
        "cancel_residual_last": mean_last(metrics, "cancel/residual"),
        "adv_abs_mean": mean_last(metrics, "adv/abs_mean", len(metrics)),
        "clip_frac": mean_last(metrics, "clip/high", len(metrics)),
        "sample": ev["after"].get("samples", [])[:3],
    }
    if abs(rec["heldout_after_recheck"] - after) > 1e-9:
        log(f"  note: re-evaluated held-out accuracy {rec['heldout_after_recheck']:.3f} != eval.json {after:.3f}")
    if abs(np.mean(before_pp["greedy"]) - before) > 1e-9:
        log(f"  note: warm-model held-out accuracy {np.mean(before_pp['greedy']):.3f} != eval.json before {before:.3f}")
    return rec


# ============================================================================ statistics

def crossed_bootstrap(d: np.ndarray, *, n: int = BOOT_RESAMPLES, seed: int = 0,
                      ref: np.ndarray | None = None) -> tuple[float, float, float]:
    """Percentile bootstrap of mean(d) over a [seeds, problems] array: resample seeds and problems.

    With `ref` (another [seeds', problems] array on the same problems) the statistic is
    mean(d) - mean(ref): seeds are resampled independently per array, problems jointly (paired).
    """
    rng = np.random.default_rng(seed)
    S, P = d.shape
    stats = np.empty(n)
    for b in range(n):
        s = rng.integers(0, S, S)
        p = rng.integers(0, P, P)
        v = d[s][:, p].mean()
        if ref is not None:
            v -= ref[rng.integers(0, ref.shape[0], ref.shape[0])][:, p].mean()
        stats[b] = v
    m = float(d.mean() - (ref.mean() if ref is not None else 0.0))
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return m, float(min(lo, m)), float(max(hi, m))


def aggregate(runs: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for t in tasks:
        agg[t] = {}
        gains = {}
        for m in methods:
            rs = [r for r in runs if r["task"] == t and r["method"] == m]
            if not rs:
                continue
            d = np.array([np.array(r["heldout_after_per_problem"]) - np.array(r["heldout_before_per_problem"]) for r in rs])
            gains[m] = d
            dk = np.array([np.array(r["heldout_after_avg_at_k_per_problem"]) for r in rs])
            g, lo, hi = crossed_bootstrap(d)
            ak, aklo, akhi = crossed_bootstrap(dk)

            def mean_of(key: str) -> float | None:
                v = [r[key] for r in rs if r.get(key) is not None]
                return float(np.mean(v)) if v else None

            agg[t][m] = {
                "n_seeds": len(rs), "seeds": [r["seed"] for r in rs],
                "heldout_before": mean_of("heldout_before"), "heldout_after": mean_of("heldout_after"),
                "gain": g, "gain_ci": [lo, hi], "gain_per_seed": [r["heldout_gain"] for r in rs],
                "avg_at_k_before": mean_of("heldout_before_avg_at_k"),
                "avg_at_k_after": ak, "avg_at_k_after_ci": [aklo, akhi],
                **{k: mean_of(k) for k in ("train_acc_first5", "train_acc_last", "len_last", "entropy_first",
                                           "entropy_last", "kl_ref_last", "tokens_generated_total",
                                           "tokens_trained_total", "seqs_generated_total", "time_step_total_s",
                                           "wall_s", "dynamic_rounds_mean", "frac_zero_var_groups",
                                           "heldout_len_after", "fipo_weight_mean", "frpo_shift_abs_mean",
                                           "fipo_weight_max_mean", "fipo_frac_at_high", "frpo_shift_gt_adv_frac", "cancel_residual_mean", "cancel_residual_last")},
            }
            if all("heldout_before_avg_at_k_per_problem" in r for r in rs):  # gain in avg@k (T=1)
                dgk = dk - np.array([np.array(r["heldout_before_avg_at_k_per_problem"]) for r in rs])
                gk, gklo, gkhi = crossed_bootstrap(dgk, seed=3)
                agg[t][m]["gain_k"], agg[t][m]["gain_k_ci"] = gk, [gklo, gkhi]
                gains_k = agg[t].setdefault("_gains_k", {})
                gains_k[m] = dgk
            da = np.array([np.array(r["heldout_after_per_problem"]) for r in rs])
            _, alo, ahi = crossed_bootstrap(da, seed=2)
            agg[t][m]["heldout_after_ci"] = [alo, ahi]
            for key in ("len_mean", "entropy", "cancel_residual"):
                first = [r[key][0] for r in rs if r.get(key) and r[key][0] is not None]
                agg[t][m][f"{key}_first"] = float(np.mean(first)) if first else None
        if "grpo" in gains:
            for m in methods:
                if m in gains and m != "grpo":
                    dm, dlo, dhi = crossed_bootstrap(gains[m], ref=gains["grpo"], seed=1)
                    a, b = agg[t][m], agg[t]["grpo"]
                    overlap = not (a["gain_ci"][0] > b["gain_ci"][1] or a["gain_ci"][1] < b["gain_ci"][0])
                    a["delta_vs_grpo"], a["delta_vs_grpo_ci"] = dm, [dlo, dhi]
                    a["verdict_vs_grpo"] = ("no measurable difference" if overlap else
                                            "better than GRPO" if a["gain_ci"][0] > b["gain_ci"][1] else "worse than GRPO")
                    if "gain_k" in a and "gain_k" in b:
                        gk = agg[t]["_gains_k"]
                        dm, dlo, dhi = crossed_bootstrap(gk[m], ref=gk["grpo"], seed=4)
                        ok = not (a["gain_k_ci"][0] > b["gain_k_ci"][1] or a["gain_k_ci"][1] < b["gain_k_ci"][0])
                        a["delta_k_vs_grpo"], a["delta_k_vs_grpo_ci"] = dm, [dlo, dhi]
                        a["verdict_k_vs_grpo"] = ("no measurable difference" if ok else "better than GRPO"
                                                  if a["gain_k_ci"][0] > b["gain_k_ci"][1] else "worse than GRPO")
        agg[t].pop("_gains_k", None)
    return agg


# ============================================================================ output

def fmt(x: Any, d: int = 2, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{100 * x:+.1f}" if pct else f"{x:.{d}f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def table(agg: dict[str, Any], tasks: list[str], methods: list[str]) -> str:
    head = ("| task | method | held-out greedy acc before -> after | gain (points) [95% CI] | vs GRPO: gain diff [95% CI] | "
            "held-out avg@8 (T=1) before -> after | train acc first 5 -> last 10 steps | mean length (tokens) | "
            "entropy first -> last | KL to ref (k3) | tokens generated (used) / run | wall s / run |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for t in tasks:
        for m in methods:
            a = agg.get(t, {}).get(m)
            if a is None:
                continue
            vs = vs_text(a, m, bold=True)
            tok = fmt(a["tokens_generated_total"], 0)
            if a["tokens_trained_total"] is not None and a["tokens_generated_total"] is not None and \
                    abs(a["tokens_generated_total"] - a["tokens_trained_total"]) > 0.5:
                tok += f" ({fmt(a['tokens_trained_total'], 0)})"
            lines.append(
                f"| {t} | {LABELS[m]} | {fmt(a['heldout_before'])} -> {fmt(a['heldout_after'])} | "
                f"{pts(a['gain'])} [{pts(a['gain_ci'][0])}, {pts(a['gain_ci'][1])}] | {vs} | "
                f"{fmt(a['avg_at_k_before'])} -> {fmt(a['avg_at_k_after'])} | "
                f"{fmt(a['train_acc_first5'])} -> {fmt(a['train_acc_last'])} | {fmt(a['len_last'], 2)} | "
                f"{fmt(a['entropy_first'], 3)} -> {fmt(a['entropy_last'], 3)} | {fmt(a['kl_ref_last'], 4)} | "
                f"{tok} | {fmt(a['wall_s'], 1)} |")
    return "\n".join(lines)


def verdict_lines(agg: dict[str, Any], tasks: list[str], methods: list[str]) -> list[str]:
    out = []
    for m in ("fipo", "frpo", "dapo", "dr_grpo"):
        if m not in methods:
            continue
        for t in tasks:
            a = agg.get(t, {}).get(m)
            if a is None or "verdict_vs_grpo" not in a:
                continue
            g = agg[t]["grpo"]
            v = a["verdict_vs_grpo"]
            line = (f"- {LABELS[m]} on {t}: gain {pts(a['gain'])} points [{pts(a['gain_ci'][0])}, {pts(a['gain_ci'][1])}] "
                    f"vs GRPO {pts(g['gain'])} [{pts(g['gain_ci'][0])}, {pts(g['gain_ci'][1])}]: ")
            if v == "no measurable difference":
                line += f"the intervals overlap, so {LABELS[m]} does **not** beat GRPO here (no measurable difference)."
            elif v == "worse than GRPO":
                line += f"{LABELS[m]} does **not** beat GRPO here; it is measurably worse."
            else:
                line += f"{LABELS[m]} beats GRPO here (non-overlapping intervals)."
            out.append(line)
    return out


def settings_block(steps: int, c: dict[str, Any], sft_cfg: dict[str, Any], runs: list[dict[str, Any]],
                   methods: list[str], tasks: list[str]) -> list[str]:
    lines = ["Shared by every method (overriding the recipes): "
             + ", ".join(f"{k} = {v}" for k, v in c.items())
             + f", steps = {steps}, model.precision = fp32, train.threads = 1, device = cpu, "
               f"grad_clip = 1.0 (default), AdamW betas (0.9, 0.99), no warm-up.", "",
             "Per method, from its recipe (recipes/<method>.toml), with the length-dependent constants rescaled:", ""]
    for m in methods:
        extra = [x for x in next((r["overrides"] for r in runs if r["method"] == m), [])
                 if x.startswith(("algo.norm_const", "rewards.overlong_buffer"))]
        lines.append(f"- {LABELS[m]} (`recipes/{METHODS[m][0]}`): {METHODS[m][1]}"
                     + (f"; rescaled here: {', '.join('`' + e + '`' for e in extra)}" if extra else ""))
    lines += ["", "Tasks (built-in `arith`, operands 0-9, 100 problems each, 50 held out by the task itself):", ""]
    for t in tasks:
        spec, opt = TASK_SPECS[t]
        lines.append(f"- `{t}`: `data.task = \"{spec}\"`, `data.task_options = {toml_literal(opt)}`")
    lines += ["", f"Warm-up: `make_tiny(seed={sft_cfg['model_seed']})` + `grpokit.train.sft.sft` for {sft_cfg['steps']} "
              f"steps (batch {sft_cfg['batch_size']}, lr {sft_cfg['lr']}) on {sft_cfg['copies']} noisy copies of each of "
              f"the 100 problems (held-out ones included; RL never sees them): each answer digit right with "
              f"probability {sft_cfg['p_digit']}, else d -> d+1 mod 10. The same warm model starts every run of a "
              f"task; the seed changes the RL prompts and samples."]
    return lines


def wall_text(result: dict[str, Any]) -> str:
    sft = result.get("sft_build_s", 0.0)
    return (f"{result['wall_s'] / 60:.1f} min" + (f", of which {sft / 60:.1f} min built the SFT warm models, cached for reruns"
                                                  if sft > 0 else ", warm models from the cache"))


def limits_lines(result: dict[str, Any]) -> list[str]:
    """What this setting can and cannot test, with the measured numbers that show it."""
    agg, tasks = result["aggregate"], result["task_names"]

    def vals(m: str, key: str) -> str:
        return ", ".join(f"{t} {agg[t][m][key]:.4f}" for t in tasks if m in agg.get(t, {}) and agg[t][m].get(key) is not None)

    lens = [a["len_last"] for t in tasks for a in agg.get(t, {}).values() if a.get("len_last") is not None]
    span = f" (mean rollout length {min(lens):.1f}-{max(lens):.1f} tokens)" if lens else ""
    out = [f"What this can and cannot test: answers here are 1-2 digits plus EOS{span}, so every mechanism that "
           "acts along long responses has almost nothing to act on."]
    if vals("fipo", "fipo_weight_mean"):
        out[-1] += (f" FIPO's Future-KL weights (clipped to [1, 1.2], half-life 32 tokens) averaged "
                    f"{vals('fipo', 'fipo_weight_mean')} (mean `fipo/weight`): FIPO acted, but only barely, so this is "
                    f"no test of its long-reasoning claim.")
    if vals("frpo", "frpo_shift_abs_mean"):
        out[-1] += (f" FRPO's KL-to-go moved the token advantages by {vals('frpo', 'frpo_shift_abs_mean')} on average "
                    f"(`credit/shift_abs_mean`, against advantages of order 1).")
    out[-1] += (" Dr. GRPO's length-bias fix and DAPO's overlong shaping need varied lengths, and the lengths here "
                "barely vary. What the table does test is each recipe as a drop-in replacement for GRPO on short "
                "verifiable answers at equal steps; DAPO's extra rollout rounds are extra compute, shown in the "
                "tokens column.")
    return out


def write_markdown(path: Path, result: dict[str, Any]) -> str:
    tasks, methods, runs, agg = result["task_names"], result["method_names"], result["runs"], result["aggregate"]
    c, sft_cfg, warm, info, command = result["common"], result["sft"], result["warm_models"], result["machine"], result["command"]
    seeds, steps = result["seeds"], result["steps"]
    tbl = table(agg, tasks, methods)
    lines = [
        "# Algorithms at equal compute", "",
        f"Command: `{command}` (wall time {wall_text(result)}; every run in one process).", "",
        f"Machine: {info['cores']}-core {info['cpu']} ({info['platform']}), Python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, 1 torch thread, fp32, CPU. The machine was "
        f"shared with another engineer's test runs (load average {info['loadavg_start'][0]:.1f} at the start, "
        f"{info.get('loadavg_end', [float('nan')])[0]:.1f} at the end), so times are indicative only. grpokit at "
        f"git {info['git_head']} with the working tree as imported at the start (sha256/12 of "
        + ", ".join(f"{k}: {v}" for k, v in info["sha256_12"].items()) + ").", "",
        f"Seeds: {seeds}. Tasks: {tasks}. Methods: {[LABELS[m] for m in methods]}. Steps: {steps}.", "",
        tbl, "",
        "Reading the table:", "",
        "- held-out: greedy accuracy on the task's 50 held-out problems before (the warm model) and after "
        "training, mean over seeds. gain: after - before in percentage points, mean over seeds x problems, with a "
        f"95% percentile bootstrap interval ({BOOT_RESAMPLES} resamples) that resamples both seeds and problems "
        "(grpokit.report.metrics.bootstrap_ci resamples one axis only; with 3 seeds the seed axis must be in the "
        "interval too). vs GRPO: the method's gain minus GRPO's, same bootstrap (problems paired, seeds "
        "independent). The verdict follows the rule: overlapping gain intervals = no measurable difference.",
        f"- avg@{EVAL_K} (T=1): fraction of {EVAL_K} sampled answers per held-out problem that are right (lower variance "
        "than greedy on 50 problems).",
        f"- train acc: accuracy of each step's first, unfiltered rollout batch (for DAPO the trainer's own `acc` "
        f"is measured after dynamic sampling dropped the all-equal groups; it is in algorithms.json as "
        f"`train_acc_kept`), mean of the first 5 and of the last {LAST} steps. mean length: `len/mean` of the "
        f"training rollouts (tokens, EOS included), last {LAST} steps. entropy: `entropy` (nats/token) at step 1 "
        f"-> mean of the last {LAST} steps. KL: `kl_ref` (k3, current policy vs the frozen warm model) over the "
        f"last {LAST} steps, only where beta > 0.",
        "- tokens generated: every rollout token sampled in training (all dynamic-sampling rounds), summed over "
        "the run, mean over seeds; in parentheses, where different, the tokens that reached the update "
        "(the trainer's `tokens/trained`). wall: the whole run including the before/after held-out evals.", "",
        "Verdicts (FIPO and FRPO are the ones with claims beyond GRPO):", "",
        *verdict_lines(agg, tasks, methods), "",
        *limits_lines(result), "",
        "## Settings", "",
        *settings_block(steps, c, sft_cfg, runs, methods, tasks), "",
        "Warm models: " + "; ".join(f"{t}: SFT loss {w['sft_loss_first']:.2f} -> {w['sft_loss_last20']:.3f} "
                                     f"(mean of last 20 steps), {w['frac_sft_answers_right']:.2f} of the SFT answers right"
                                     for t, w in warm.items()) + ".", "",
        "Equivalent CLI for one run (the benchmark calls `load_config(recipe, overrides)` + `train(cfg)` in-process):", "",
        "```",
        f"grpokit train recipes/{METHODS[runs[0]['method']][0]} " + " ".join(
            f"--set {shlex.quote(o)}" for o in runs[0]["overrides"] if not o.startswith("train.run_dir")),
        "```", "",
        "## Per run", "",
        "| task | method | seed | held-out before -> after | avg@8 after | train acc last 10 | entropy last | KL last | tokens generated | DAPO rounds/step | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['task']} | {LABELS[r['method']]} | {r['seed']} | {r['heldout_before']:.2f} -> {r['heldout_after']:.2f} | "
                     f"{r['heldout_after_avg_at_k']:.2f} | {r['train_acc_last']:.2f} | {fmt(r['entropy_last'], 3)} | "
                     f"{fmt(r['kl_ref_last'], 4)} | {fmt(r['tokens_generated_total'], 0)} | {fmt(r['dynamic_rounds_mean'], 2)} | "
                     f"{r['wall_s']:.1f} |")
    lines += ["", "Plots: " + ", ".join(f"`algorithms_{t}.png`" for t in tasks) + ". Raw numbers: `algorithms.json`.", ""]
    path.write_text("\n".join(lines))
    return tbl


def plot(path: Path, task: str, runs: list[dict[str, Any]], agg: dict[str, Any], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.6, 1]})
    for m in methods:
        rs = [r for r in runs if r["task"] == task and r["method"] == m]
        if not rs:
            continue
        n = min(len(r["train_acc"]) for r in rs)
        acc = np.array([r["train_acc"][:n] for r in rs], dtype=float)  # [seeds, steps]
        mean = acc.mean(0)
        steps = np.arange(1, n + 1)
        ax1.plot(steps, mean, color=COLORS[m], alpha=0.25, lw=1)
        w = min(5, n)
        smooth = np.convolve(mean, np.ones(w) / w, mode="valid") if n >= w else mean
        ax1.plot(steps[w - 1:] if n >= w else steps, smooth, color=COLORS[m], lw=2, label=f"{LABELS[m]} (n={len(rs)})")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training-batch accuracy (first rollout round)")
    ax1.set_title(f"{task}: training-batch accuracy, mean over seeds (thin), 5-step mean (thick)", fontsize=10)
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ms = [m for m in methods if m in agg.get(task, {})]
    g = [100 * agg[task][m]["gain"] for m in ms]
    lo = [100 * (agg[task][m]["gain"] - agg[task][m]["gain_ci"][0]) for m in ms]
    hi = [100 * (agg[task][m]["gain_ci"][1] - agg[task][m]["gain"]) for m in ms]
    x = np.arange(len(ms))
    ax2.bar(x, g, yerr=[lo, hi], capsize=5, color=[COLORS[m] for m in ms], alpha=0.8)
    for i, m in enumerate(ms):
        per = [100 * v for v in agg[task][m]["gain_per_seed"]]
        ax2.scatter([i] * len(per), per, color="k", s=12, zorder=3)
    if "grpo" in ms:
        ax2.axhspan(100 * agg[task]["grpo"]["gain_ci"][0], 100 * agg[task]["grpo"]["gain_ci"][1], color=COLORS["grpo"], alpha=0.12)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(x, [LABELS[m] for m in ms])
    ax2.set_ylabel("held-out greedy accuracy gain (points)")
    ax2.set_title("gain, 95% bootstrap CI (seeds x problems); dots: seeds", fontsize=9)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(section_body: str, section: str = README_SECTION) -> None:
    """Replace `section` (its heading up to the next "## " heading, or the end) of benchmarks/README.md, or append it."""
    text = README.read_text()
    new = section + "\n\n" + section_body.strip("\n") + "\n"
    i = text.find("\n" + section + "\n")
    if i < 0:
        README.write_text(text.rstrip("\n") + "\n\n" + new)
        return
    j = text.find("\n## ", i + len(section) + 2)
    rest = "" if j < 0 else "\n" + text[j + 1:]
    README.write_text(text[:i].rstrip("\n") + "\n\n" + new + rest)


# ============================================================================ main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASK_SPECS))
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"default: {' '.join(SHORT_METHODS)}; with a long task ({', '.join(sorted(LONG_TASKS))}): all nine")
    p.add_argument("--steps", type=int, default=None, help=f"default 40; long mode {LONG_STEPS}")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 seed, 2 steps, 1 task, short SFT, output in a temp dir")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; --quick: a temp dir)")
    p.add_argument("--runs-dir", type=Path, default=None, help="keep the run directories here (default: a temp dir, deleted)")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="override the shared learning rate (calibration)")
    p.add_argument("--cache", type=Path, default=None, help="warm-model cache (default ~/.cache/grpokit/bench)")
    p.add_argument("--update-readme", action="store_true", help=f"replace the '{README_SECTION}' section of benchmarks/README.md")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only re-render algorithms.md / the plots (and --update-readme) from an existing algorithms.json")
    args = p.parse_args(argv)
    if args.render is not None:
        out = args.out or args.render.parent
        result = json.loads(args.render.read_text())
        full = [s for s in result["seeds"] if all(any(r["seed"] == s and r["method"] == m and r["task"] == t
                                                         for r in result["runs"])
                                                     for m in result["method_names"] for t in result["task_names"])]
        if full != result["seeds"]:  # a cut-short run (`.partial.json`): keep the seeds every method completed
            log(f"keeping seeds {full} (complete for every method) of {result['seeds']}")
            result["seeds"], result["runs"] = full, [r for r in result["runs"] if r["seed"] in full]
            result["aggregate"] = aggregate(result["runs"], result["task_names"], result["method_names"])
        if args.render.name.endswith(".partial.json"):
            (out / args.render.name.replace(".partial", "")).write_text(json.dumps(result, indent=1, default=float))
        render(result, out, args.update_readme)
        return 0
    long = bool(args.tasks) and any(t in LONG_TASKS for t in args.tasks)
    if long and not all(t in LONG_TASKS for t in args.tasks):
        p.error(f"long-response tasks ({', '.join(sorted(LONG_TASKS))}) run in their own mode; do not mix them with short ones")
    if args.steps is None:
        args.steps = LONG_STEPS if long else 40
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 2
        args.tasks = (args.tasks or DEFAULT_TASKS)[:1]
    tasks = args.tasks or DEFAULT_TASKS
    methods = args.methods or (LONG_METHODS if long else SHORT_METHODS)
    sft_cfg = dict(SFT_LONG if long else SFT)
    sft_cfg["steps"] = args.sft_steps or (QUICK_SFT_STEPS if args.quick else sft_cfg["steps"])
    out = args.out or (Path(tempfile.gettempdir()) / ("grpokit-bench-quick-long" if long else "grpokit-bench-quick")
                       if args.quick else REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or (Path(os.environ.get("GRPOKIT_CACHE") or Path.home() / ".cache" / "grpokit") / "bench")
    cache.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python benchmarks/algorithms.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values deprecation notice
    import transformers

    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    info = machine_info()
    c = dict(COMMON_LONG if long else COMMON)
    if args.lr is not None:
        c["lr"] = args.lr
    tally = Tally()
    tally.install()
    log(f"tasks {tasks}, methods {methods}, seeds {args.seeds}, steps {args.steps}; instrumentation {tally.ok}")

    t_all = time.perf_counter()
    tmp_runs = None
    runs_root = args.runs_dir
    if runs_root is None:
        tmp_runs = tempfile.mkdtemp(prefix="grpokit-bench-runs-")
        runs_root = Path(tmp_runs)
    runs_root.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    warm: dict[str, Any] = {}
    try:
        for t in tasks:
            t_w = time.perf_counter()
            model_dir, meta = warm_model(t, sft_cfg, cache)
            warm[t] = {**meta, "path": model_dir, "built_s": 0.0 if meta.get("cached") else time.perf_counter() - t_w}
            # the warm model's per-problem held-out accuracy (greedy; and avg@k at T=1), shared by every run
            from grpokit.config import load_config
            from grpokit.data import get_task

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg0 = load_config(RECIPES / "grpo.toml", [f"{k}={toml_literal(v)}" for k, v in overrides_for(
                    "grpo", t, model_dir, 0, 1, runs_root / "unused", c).items()])
            held = get_task(cfg0.data.task, **cfg0.data.task_options).heldout(cfg0.data.heldout_size)
            before_g, _ = evaluate_dir(model_dir, cfg0, held, k=1, temperature=0.0, seed=0)
            before_s, _ = evaluate_dir(model_dir, cfg0, held, k=EVAL_K, temperature=c["temperature"], seed=0)
            warm[t]["heldout_greedy"] = float(np.mean(before_g))
            warm[t]["heldout_avg_at_k"] = float(np.mean(before_s))
            log(f"{t}: warm model held-out greedy {np.mean(before_g):.2f}, avg@{EVAL_K} {np.mean(before_s):.2f}")
            for seed in args.seeds:
                for m in methods:
                    rec = run_one(m, t, seed, args.steps, model_dir, runs_root, c, tally,
                                  {"greedy": before_g, "sampled": before_s})
                    runs.append(rec)
                    log(f"{t} {LABELS[m]:8s} seed {seed}: held-out {rec['heldout_before']:.2f} -> {rec['heldout_after']:.2f}, "
                        f"avg@{EVAL_K} {rec['heldout_after_avg_at_k']:.2f}, train acc {rec['train_acc_first5']:.2f} -> "
                        f"{rec['train_acc_last']:.2f}, tokens {fmt(rec['tokens_generated_total'], 0)}, {rec['wall_s']:.1f}s")
                    if args.runs_dir is None:
                        shutil.rmtree(rec["run_dir"], ignore_errors=True)
                    if long:  # the runs so far, for `--render` should the whole run be cut short
                        part = results_dict(runs, warm, tasks, methods, args, c, sft_cfg, info, tally, command, long, t_all)
                        (out / f"{part['prefix']}.partial.json").write_text(json.dumps(part, indent=1, default=float))
    finally:
        if tmp_runs:
            shutil.rmtree(tmp_runs, ignore_errors=True)
    result = results_dict(runs, warm, tasks, methods, args, c, sft_cfg, info, tally, command, long, t_all)
    (out / f"{result['prefix']}.json").write_text(json.dumps(result, indent=1, default=float))
    render(result, out, args.update_readme)
    return 0


def results_dict(runs: list[dict[str, Any]], warm: dict[str, Any], tasks: list[str], methods: list[str], args: Any,
                 c: dict[str, Any], sft_cfg: dict[str, Any], info: dict[str, Any], tally: Tally, command: str,
                 long: bool, t_all: float) -> dict[str, Any]:
    wall = time.perf_counter() - t_all
    info["loadavg_end"] = os.getloadavg()
    return {
        "mode": "long" if long else "short", "prefix": LONG_PREFIX if long else "algorithms",
        "command": command, "wall_s": wall, "sft_build_s": sum(w.get("built_s", 0.0) for w in warm.values()),
        "machine": info, "common": c, "steps": args.steps, "task_names": tasks,
        "seeds": [s for s in args.seeds if any(r["seed"] == s for r in runs)] or args.seeds,
        "method_names": methods, "tasks": {t: TASK_SPECS[t] for t in tasks}, "methods": {m: METHODS[m] for m in methods},
        "sft": sft_cfg, "warm_models": warm, "instrumentation": tally.ok,
        "aggregate": aggregate(runs, tasks, methods), "runs": runs,
    }


def render(result: dict[str, Any], out: Path, readme: bool) -> None:
    """algorithms.md, the plots and (optionally) the README section, from the algorithms.json content."""
    if result.get("mode") == "long":
        render_long(result, out, readme)
        return
    tasks, methods, runs, agg = result["task_names"], result["method_names"], result["runs"], result["aggregate"]
    c, wall, command, info = result["common"], result["wall_s"], result["command"], result["machine"]
    tbl = write_markdown(out / "algorithms.md", result)
    for t in tasks:
        plot(out / f"algorithms_{t}.png", t, runs, agg, methods)
    print(tbl)
    print("\n".join(verdict_lines(agg, tasks, methods)))
    log(f"wrote {out / 'algorithms.md'}, algorithms.json, " + ", ".join(f"algorithms_{t}.png" for t in tasks)
        + f" (benchmark wall time {wall / 60:.1f} min)")
    if readme:
        body = [f"`benchmarks/algorithms.py` trains GRPO, Dr. GRPO, DAPO, FIPO and FRPO from their bundled recipes at "
                f"equal compute (same SFT-warmed tiny character model, {c['prompts_per_step']} prompts x G = "
                f"{c['group_size']}, {c['max_new_tokens']} new tokens, {result['steps']} steps, lr {c['lr']}, "
                f"{c['updates_per_rollout']} updates per rollout) on two built-in tasks (single-digit `arith` "
                f"addition and multiplication), seeds {result['seeds']}, and compares held-out greedy accuracy gains "
                f"with 95% bootstrap intervals (seeds x problems). Full settings, per-run numbers and plots: "
                f"`benchmarks/results/algorithms.md`, `algorithms.json`, `algorithms_<task>.png`.", "",
                f"Command: `{command}` ({wall_text(result)}). Machine: {info['cores']}-core {info['cpu']}, torch "
                f"{info['torch']}, transformers {info['transformers']}, 1 torch thread, fp32; shared with another "
                f"engineer's test runs while it ran.", "", tbl, "", *verdict_lines(agg, tasks, methods), "",
                *limits_lines(result)]
        update_readme("\n".join(body))
        log(f"updated {README}")

# ============================================================================ the long-response mode's output

def band(ax: Any, rs: list[dict[str, Any]], key: str, color: str, label: str, w: int = 5, fill: bool = True) -> None:
    """Mean over seeds of a per-step series (w-step running mean), with a min-max band over seeds."""
    n = min(len(r[key]) for r in rs)
    a = np.array([[np.nan if v is None else v for v in r[key][:n]] for r in rs], dtype=float)  # [seeds, steps]
    if n == 0 or np.isnan(a).all():
        return
    if n >= w:
        k = np.ones(w) / w
        a = np.array([np.convolve(row, k, mode="valid") for row in a])
    x = np.arange(1, a.shape[1] + 1) + (w - 1 if n >= w else 0)
    ax.plot(x, np.nanmean(a, 0), color=color, lw=1.6, label=label)
    if fill and len(rs) > 1:
        ax.fill_between(x, np.nanmin(a, 0), np.nanmax(a, 0), color=color, alpha=0.10, lw=0)


def plot_long(path: Path, task: str, runs: list[dict[str, Any]], agg: dict[str, Any], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ms = [m for m in methods if m in agg.get(task, {})]
    panels = [(axes[0, 0], "train_acc", "training-batch accuracy (first rollout round)", True),
              (axes[1, 0], "len_mean", "mean response length (tokens, EOS incl.)", False),
              (axes[1, 1], "entropy", "entropy (nats/token)", False),
              (axes[1, 2], "cancel_residual", "cancellation residual `cancel/residual`", False)]
    for ax, key, ylabel, fill in panels:
        for m in ms:
            rs = [r for r in runs if r["task"] == task and r["method"] == m]
            band(ax, rs, key, COLORS[m], f"{LABELS[m]} (n={len(rs)})", fill=fill)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("mean over seeds, 5-step running mean; band: min-max over seeds", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=2, loc="best")
    x = np.arange(len(ms))
    for ax, key, ci, title in ((axes[0, 1], "heldout_after", "heldout_after_ci", "held-out greedy accuracy after training"),
                               (axes[0, 2], "avg_at_k_after", "avg_at_k_after_ci", f"held-out avg@{EVAL_K} (T=1) after training")):
        v = [agg[task][m][key] for m in ms]
        lo = [agg[task][m][key] - agg[task][m][ci][0] for m in ms]
        hi = [agg[task][m][ci][1] - agg[task][m][key] for m in ms]
        ax.bar(x, v, yerr=[lo, hi], capsize=4, color=[COLORS[m] for m in ms], alpha=0.85)
        before = agg[task][ms[0]]["heldout_before" if key == "heldout_after" else "avg_at_k_before"] if ms else None
        if before is not None:
            ax.axhline(before, color="k", ls="--", lw=1, label=f"warm model {before:.2f}")
            ax.legend(fontsize=8, loc="lower right")
        if key == "heldout_after":
            for i, m in enumerate(ms):
                per = [r["heldout_after"] for r in runs if r["task"] == task and r["method"] == m]
                ax.scatter([i] * len(per), per, color="k", s=10, zorder=3)
        ax.set_xticks(x, [LABELS[m] for m in ms], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title + ", 95% bootstrap CI (seeds x problems)" + ("; dots: seeds" if key == "heldout_after" else ""),
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{task}: long responses (two-digit addition traces), equal steps and compute", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table_long(agg: dict[str, Any], task: str, methods: list[str]) -> str:
    head = ("| method | held-out greedy after [95% CI] | gain (points) [95% CI] | vs GRPO: gain diff [95% CI] | "
            f"held-out avg@{EVAL_K} (T=1) after [95% CI] | avg@{EVAL_K} gain (points) [95% CI] | avg@{EVAL_K} vs GRPO [95% CI] | train acc first 5 -> last {LAST} | length first -> last {LAST} | "
            f"entropy first -> last {LAST} | cancel residual first -> last {LAST} (run mean) | tokens generated / run | wall s / run |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for m in methods:
        a = agg.get(task, {}).get(m)
        if a is None:
            continue
        vs = vs_text(a, m)
        lines.append(
            f"| {LABELS[m]} | {fmt(a['heldout_after'])} [{fmt(a['heldout_after_ci'][0])}, {fmt(a['heldout_after_ci'][1])}] | "
            f"{pts(a['gain'])} [{pts(a['gain_ci'][0])}, {pts(a['gain_ci'][1])}] | {vs} | "
            f"{fmt(a['avg_at_k_after'])} [{fmt(a['avg_at_k_after_ci'][0])}, {fmt(a['avg_at_k_after_ci'][1])}] | "
            f"{gain_text(a, 'gain_k')} | {vs_text(a, m, 'k_')} | "
            f"{fmt(a['train_acc_first5'])} -> {fmt(a['train_acc_last'])} | {fmt(a.get('len_mean_first'), 1)} -> "
            f"{fmt(a['len_last'], 1)} | {fmt(a['entropy_first'], 3)} -> {fmt(a['entropy_last'], 3)} | "
            f"{fmt(a.get('cancel_residual_first'), 3)} -> {fmt(a['cancel_residual_last'], 3)} ({fmt(a['cancel_residual_mean'], 3)}) | "
            f"{fmt(a['tokens_generated_total'], 0)} | {fmt(a['wall_s'], 1)} |")
    return "\n".join(lines)


def gain_text(a: dict[str, Any], key: str) -> str:
    return f"{pts(a[key])} [{pts(a[key + '_ci'][0])}, {pts(a[key + '_ci'][1])}]" if key in a else "-"


def vs_text(a: dict[str, Any], m: str, k: str = "", *, bold: bool = False) -> str:
    """The table cell comparing method m's gain (k: '' greedy, 'k_' avg@k) with GRPO's: difference [95% CI]: verdict."""
    if m == "grpo":
        return "reference"
    d = f"delta_{k}vs_grpo"
    if d not in a:
        return "-"
    verdict = a[f"verdict_{k}vs_grpo"]
    return f"{pts(a[d])} [{pts(a[d + '_ci'][0])}, {pts(a[d + '_ci'][1])}]: " + (f"**{verdict}**" if bold else verdict)


def credit_lines(agg: dict[str, Any], task: str, runs: list[dict[str, Any]]) -> list[str]:
    """How far FIPO's weights and FRPO's shifts depart from 1 and 0 here (means over all steps, then seeds)."""
    out = []
    f = agg.get(task, {}).get("fipo")
    if f and f.get("fipo_weight_mean") is not None:
        per = [r["fipo_weight_mean"] for r in runs if r["task"] == task and r["method"] == "fipo"]
        out.append(f"- FIPO (`fipo/weight`, f clipped to [1, 1.2]): mean token weight {f['fipo_weight_mean']:.4f} "
                   f"(seeds: {', '.join(f'{v:.4f}' for v in per)}), mean per-step maximum {fmt(f['fipo_weight_max_mean'], 4)} "
                   f"(`fipo/weight/max`), fraction of tokens at the 1.2 cap {fmt(f['fipo_frac_at_high'], 4)} "
                   f"(`fipo/at_high`). On the short task the mean was 1.005.")
    r_ = agg.get(task, {}).get("frpo")
    if r_ and r_.get("frpo_shift_abs_mean") is not None:
        per = [r["frpo_shift_abs_mean"] for r in runs if r["task"] == task and r["method"] == "frpo"]
        out.append(f"- FRPO (`credit/shift_abs_mean`, mean |token advantage - sequence advantage|): "
                   f"{r_['frpo_shift_abs_mean']:.4f} (seeds: {', '.join(f'{v:.4f}' for v in per)}); fraction of tokens "
                   f"whose shift exceeds |A| {fmt(r_['frpo_shift_gt_adv_frac'], 4)} (`credit/shift_gt_adv_frac`). "
                   f"On the short task the shift was 0.009.")
    return out


def long_verdicts(agg: dict[str, Any], task: str, methods: list[str]) -> list[str]:
    a = agg.get(task, {})
    if "grpo" not in a:
        return []
    g = a["grpo"]
    out = []
    for name, gk, vk in (("greedy", "gain", "verdict_vs_grpo"), (f"avg@{EVAL_K} (T=1)", "gain_k", "verdict_k_vs_grpo")):
        if gk not in g:
            continue
        out.append(f"- Held-out {name}: GRPO's gain {gain_text(g, gk)} points.")
        for verdict, words in (("no measurable difference", "no measurable difference from GRPO (gain intervals overlap)"),
                               ("better than GRPO", "measurably better than GRPO (non-overlapping gain intervals)"),
                               ("worse than GRPO", "measurably worse than GRPO (non-overlapping gain intervals)")):
            ms = [m for m in methods if a.get(m, {}).get(vk) == verdict]
            if ms:
                out.append(f"  - {words}: " + ", ".join(f"{LABELS[m]} {gain_text(a[m], gk)}" for m in ms) + ".")
    return out


def long_settings(result: dict[str, Any]) -> list[str]:
    c, sft_cfg, steps, runs, methods = result["common"], result["sft"], result["steps"], result["runs"], result["method_names"]
    t = result["task_names"][0]
    spec, opt = TASK_SPECS[t]
    lines = ["Shared by every method (overriding the recipes): " + ", ".join(f"{k} = {v}" for k, v in c.items())
             + f", steps = {steps}, model.precision = fp32, train.threads = 1, device = cpu, grad_clip = 1.0 (default).", "",
             f"Task `{t}`: `data.task = \"{spec}\"`, `data.task_options = {toml_literal(opt)}`: two-digit addition "
             "worked column by column, e.g. `<think>units 7+5=12 write 2 carry 1; tens 4+8+1=13 write 3 carry 1; "
             "hundreds 1</think>\\n<answer>132</answer>` (one token per character: 80-100 tokens with EOS). "
             "Reward `numeric_match` (the recipes' own): the last number of the response, i.e. the `<answer>`. "
             "The units column's sum and carry come first and decide the rest: a slip there makes a consistent but "
             f"wrong trace. Held-out: the task's own {opt['heldout_size']} fixed problems, never in training or SFT.", "",
             f"Warm-up: `make_tiny(seed={sft_cfg['model_seed']})` + `grpokit.train.sft.sft` for {sft_cfg['steps']} steps "
             f"(batch {sft_cfg['batch_size']}, lr {sft_cfg['lr']}) on {sft_cfg.get('n_rows')} rows of the task's training "
             f"stream with error_rate {opt['error_rate']}: that fraction of the SFT traces carries one slip (one column's "
             "sum off by one, everything after consistent with it, wrong answer). The same warm model starts every run; "
             "the seed changes the RL prompts and samples.", "",
             "Per method, from its recipe (recipes/<method>.toml), with the length-dependent constants rescaled:", ""]
    for m in methods:
        extra = [x for x in next((r["overrides"] for r in runs if r["method"] == m), [])
                 if x.startswith(("algo.norm_const", "rewards.overlong_buffer", "algo.seq_weight"))]
        lines.append(f"- {LABELS[m]} (`recipes/{METHODS[m][0]}`): {METHODS[m][1]}"
                     + (f"; set here: {', '.join('`' + e + '`' for e in extra)}" if extra else ""))
    return lines


def render_long(result: dict[str, Any], out: Path, readme: bool) -> None:
    """The long-response mode's markdown, plot and README section."""
    task, methods, runs, agg = result["task_names"][0], result["method_names"], result["runs"], result["aggregate"]
    info, prefix, command = result["machine"], result["prefix"], result["command"]
    w = result["warm_models"][task]
    tbl = table_long(agg, task, methods)
    plot_long(out / f"{prefix}_{task}.png", task, runs, agg, methods)
    lens = [x for r in runs for x in r["len_mean"] if x is not None]
    machine = (f"{info['cores']}-core {info['cpu']} ({info['platform']}), Python {info['python']}, torch {info['torch']}, "
               f"transformers {info['transformers']}, 1 torch thread, fp32, CPU; grpokit at git {info['git_head']}; "
               f"load average {info['loadavg_start'][0]:.1f} at the start, {info.get('loadavg_end', [float('nan')])[0]:.1f} "
               "at the end (machine shared with another engineer's light jobs, so times are indicative).")
    head = [f"Command: `{command}` ({wall_text(result)}; every run in one process).", "",
            f"Machine: {machine}", "",
            f"Seeds: {result['seeds']}. Methods: {', '.join(LABELS[m] for m in methods)}. Steps: {result['steps']} "
            f"(equal for all). Warm model: SFT loss {w['sft_loss_first']:.2f} -> {w['sft_loss_last20']:.3f}, "
            f"{w['frac_sft_answers_right']:.2f} of the SFT traces right; held-out greedy {w['heldout_greedy']:.2f}, "
            f"avg@{EVAL_K} (T=1) {w['heldout_avg_at_k']:.2f}. Training responses: "
            + (f"{min(lens):.0f}-{max(lens):.0f} tokens per-step mean." if lens else "-"), ""]
    reading = [
        "Columns: held-out greedy accuracy on the 100 held-out problems after training, mean over seeds, 95% "
        f"percentile bootstrap ({BOOT_RESAMPLES} resamples) over seeds x problems; gain = after - before (warm model); "
        "vs GRPO: paired on problems, seeds independent; the verdict is the interval-overlap rule "
        "(overlapping gain intervals = no measurable difference). train acc: each step's first, unfiltered "
        f"rollout round. length (`len/mean`), entropy (`entropy`) and the cancellation residual (`cancel/residual`: "
        "mean over tokens shared within a group of |sum_i A_i w_i| / sum_i |A_i w_i|, 0 = they cancel) are the "
        f"trainer's per-step metrics: step 1 -> mean of the last {LAST} steps (and the mean over the run).",
    ]
    notes = out / f"{prefix}_reading.md"  # the written reading of these numbers, kept beside them
    body = [*head, tbl, "", *reading, "", "Verdicts (interval-overlap rule):", "", *long_verdicts(agg, task, methods), "",
            "Do FIPO and FRPO act on this task? (means over all steps and seeds)", "", *credit_lines(agg, task, runs), "",
            f"![{task}](results/{prefix}_{task}.png)", "",
            *([notes.read_text().strip("\n"), ""] if notes.exists() else [])]
    md = ["# Long responses: credit assignment at equal compute", "", *[x.replace("](results/", "](") for x in body],
          "## Settings", "", *long_settings(result), "", "## Per run", "",
          "| method | seed | held-out before -> after | avg@8 after | train acc last 10 | length last | entropy last | "
          "cancel residual last | FIPO w / FRPO shift | tokens generated | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        extra = fmt(r.get("fipo_weight_mean"), 4) if r["method"] == "fipo" else (
            fmt(r.get("frpo_shift_abs_mean"), 4) if r["method"] == "frpo" else "-")
        md.append(f"| {LABELS[r['method']]} | {r['seed']} | {r['heldout_before']:.2f} -> {r['heldout_after']:.2f} | "
                  f"{r['heldout_after_avg_at_k']:.2f} | {r['train_acc_last']:.2f} | {fmt(r['len_last'], 1)} | "
                  f"{fmt(r['entropy_last'], 3)} | {fmt(r.get('cancel_residual_last'), 3)} | {extra} | "
                  f"{fmt(r['tokens_generated_total'], 0)} | {r['wall_s']:.1f} |")
    md += ["", f"Raw numbers: `{prefix}.json`.", ""]
    (out / f"{prefix}.md").write_text("\n".join(md))
    print(tbl)
    print("\n".join(long_verdicts(agg, task, methods) + credit_lines(agg, task, runs)))
    log(f"wrote {out / (prefix + '.md')}, {prefix}.json, {prefix}_{task}.png (benchmark wall time {result['wall_s'] / 60:.1f} min)")
    if readme:
        intro = (f"`benchmarks/algorithms.py --tasks {task}` trains {len(methods)} methods from their bundled recipes at equal "
                 "steps and compute on responses of 80-100 tokens whose correctness is decided by their first column "
                 f"(the short-answer comparison above cannot exercise FIPO or FRPO). Full settings, per-run numbers: "
                 f"`benchmarks/results/{prefix}.md`, `{prefix}.json`.")
        update_readme("\n".join([intro, "", *body, *long_settings(result)]), LONG_README_SECTION)
        log(f"updated {README}")


if __name__ == "__main__":
    sys.exit(main())
