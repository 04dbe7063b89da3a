"""grpokit side by side with TRL's GRPOTrainer (trl 1.16.0): first-step loss parity, then training speed.

Part 1, parity. On identical inputs (the same prompt + completion token ids, the same advantages, the same
old and reference log-probs, perturbed so that the clip is active), the loss of TRL's own loss code path
(``GRPOTrainer.compute_loss`` with an ``inputs`` dict laid out as ``_generate_and_score_completions`` returns
it) is compared with ``grpokit.train.step.micro_batch_loss`` on the same fp32 policy, for every loss setting
the two libraries share. The gradients of the two losses are compared too. Acceptance: relative difference
of the loss <= 1e-5 for every shared setting.

Part 2, speed. TRL's ``GRPOTrainer.train()`` and grpokit's ``setup`` + ``train_step`` loop, each in a fresh
subprocess (so peak RSS is that trainer's alone), alternated TRL, grpokit, TRL, ... when ``--repeats`` > 1,
on the same model, prompts (grpokit's ``arith`` rows), G, max_new_tokens, temperature, DAPO loss, beta,
epsilons, learning rate, steps, prompts per step, CPU threads and reward function (grpokit's
``numeric_match``). Reports seconds per step (median and min/max over the steps after the warm-up), generated
tokens/s, peak RSS and the ratio TRL/grpokit.

    python benchmarks/vs_trl.py                       # SmolLM2-135M-Instruct, parity on tiny + speed
    python benchmarks/vs_trl.py --quick               # fewer, smaller steps (development)
    python benchmarks/vs_trl.py --model tiny          # the tiny test model for both parts
    python benchmarks/vs_trl.py --parity-only         # part 1 only
    python benchmarks/vs_trl.py --speed-only --repeats 2

Writes the tables to benchmarks/results/vs_trl.md (``--out`` to change, ``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, offline_env  # noqa: E402

offline_env()

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "vs_trl.md"
PARITY_TOL = 1e-5


# ============================================================================ shared helpers

def smollm2_dir() -> str:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct (converted once by grpokit)."""
    from grpokit.models.loading import smollm2_dir as _dir

    return str(_dir())


def model_dir_for(name: str, tmp: Path) -> str:
    """A directory both trainers load: SmolLM2's cached dir, a tiny-char model saved to `tmp`, or a path."""
    if name in ("smollm2", "smollm2-135m"):
        return smollm2_dir()
    if name in ("tiny", "tiny-char"):
        from grpokit.models import save_tiny

        path = tmp / "tiny-char"
        if not (path / "config.json").exists():
            save_tiny(path, seed=0)
        return str(path)
    return name


def load_dir(path: str):
    """(model fp32 eval, tokenizer) through grpokit's loader (normalised tokenizer: pad id, chat template)."""
    from grpokit.models import load_model

    return load_model(path, dtype="float32")


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def trl_numeric_match(prompts, completions, answer, **kwargs) -> list[float]:
    """grpokit's `numeric_match` as a TRL reward function (conversational completions are message lists)."""
    from grpokit.rewards.builtin import numeric_match

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return numeric_match(prompts, texts, answer=answer)


def versions() -> dict[str, str]:
    import transformers
    import trl

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "trl": trl.__version__}
    for mod in ("accelerate", "datasets"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    with contextlib.suppress(Exception):
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    load = ""
    with contextlib.suppress(OSError):
        load = f", load average at start {os.getloadavg()[0]:.1f}"
    return f"{cpu}, {cores} cores available{mem}{load}, {platform.system()} {platform.release()}"


# ============================================================================ part 1: loss parity

@dataclass
class Setting:
    """One loss setting expressed in both libraries."""

    name: str
    trl: dict[str, Any]          # GRPOConfig fields
    algo: dict[str, Any]         # grpokit AlgoConfig fields
    temperature: float = 1.0
    split: int = 1               # gradient-accumulation micro-batches (TRL) / micro-batches (grpokit)
    expect_equal: bool = True
    note: str = ""


def parity_settings(max_completion_length: int) -> list[Setting]:
    C = max_completion_length
    S = Setting
    grpo = dict(loss="ppo_clip", aggregation="seq_mean_token_mean")
    tm = dict(loss="ppo_clip", aggregation="token_mean")
    dr = dict(loss="ppo_clip", aggregation="seq_mean_token_sum_norm", norm_const=C)
    kl = dict(beta=0.04, kl_estimator="k3", kl_placement="loss")
    return [
        S("grpo, eps 0.2/0.2", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.0),
          dict(**grpo, clip_low=0.2, clip_high=0.2, beta=0.0), note="seq_mean_token_mean"),
        S("grpo, beta 0.04", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.04, use_bias_correction_kl=False),
          dict(**grpo, clip_low=0.2, clip_high=0.2, **kl), note="seq_mean_token_mean + 0.04 k3"),
        S("dapo, eps 0.2/0.28", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0),
          dict(**tm, clip_low=0.2, clip_high=0.28, beta=0.0), note="token_mean (global count)"),
        S("dapo, beta 0.04", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04, use_bias_correction_kl=False),
          dict(**tm, clip_low=0.2, clip_high=0.28, **kl), note="token_mean + 0.04 k3"),
        S("dapo, eps 0.1/0.5, T 0.7", dict(loss_type="dapo", epsilon=0.1, epsilon_high=0.5, beta=0.0),
          dict(**tm, clip_low=0.1, clip_high=0.5, beta=0.0), temperature=0.7, note="token_mean, temperature 0.7"),
        S("dapo + delta 3 (two-sided clip)", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, delta=3.0),
          dict(**tm, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, beta=0.0),
          note="TRL delta = grpokit dual_clip_c (same value and gradient when delta > 1+eps_high)"),
        S(f"dr_grpo, C={C}", dict(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.2, beta=0.0),
          dict(**dr, clip_low=0.2, clip_high=0.2, beta=0.0), note="seq_mean_token_sum_norm, C = max_completion_length"),
        S(f"dr_grpo, C={C}, beta 0.04", dict(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.2, beta=0.04, use_bias_correction_kl=False),
          dict(**dr, clip_low=0.2, clip_high=0.2, **kl), note="seq_mean_token_sum_norm + 0.04 k3"),
        S("bnpo, eps 0.2/0.2", dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.2, beta=0.0),
          dict(**tm, clip_low=0.2, clip_high=0.2, beta=0.0), note="token_mean; equal on one micro-batch only"),
        S("cispo, eps_high 1.28", dict(loss_type="cispo", epsilon=0.2, epsilon_high=1.28, beta=0.0),
          dict(loss="cispo", aggregation="token_mean", clip_low=1.0, clip_high=0.28, beta=0.0),
          note="TRL caps the IS weight at eps_high (absolute) = grpokit clip_high 0.28, clip_low 1 (no floor)"),
        S("gspo (sequence IS), eps 3e-4/4e-4", dict(loss_type="grpo", importance_sampling_level="sequence",
                                                   epsilon=3e-4, epsilon_high=4e-4, beta=0.0),
          dict(loss="gspo", aggregation="seq_mean_token_mean", clip_low=3e-4, clip_high=4e-4, beta=0.0),
          note="TRL importance_sampling_level='sequence' = grpokit gspo"),
        S("gspo, beta 0.04", dict(loss_type="grpo", importance_sampling_level="sequence",
                                  epsilon=3e-4, epsilon_high=4e-4, beta=0.04, use_bias_correction_kl=False),
          dict(loss="gspo", aggregation="seq_mean_token_mean", clip_low=3e-4, clip_high=4e-4, **kl), note="gspo + 0.04 k3"),
        S("luspo (token IS)", dict(loss_type="luspo", epsilon=0.2, epsilon_high=0.28, beta=0.0),
          dict(loss="ppo_clip", aggregation="seq_mean_token_sum", clip_low=0.2, clip_high=0.28, beta=0.0),
          note="seq_mean_token_sum"),
        S("luspo (sequence IS)", dict(loss_type="luspo", importance_sampling_level="sequence",
                                      epsilon=3e-4, epsilon_high=4e-4, beta=0.0),
          dict(loss="gspo", aggregation="seq_mean_token_sum", clip_low=3e-4, clip_high=4e-4, beta=0.0),
          note="gspo + seq_mean_token_sum"),
        S("dapo, beta 0.04, TRL default KL", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04),
          dict(**tm, clip_low=0.2, clip_high=0.28, **kl), expect_equal=False,
          note="differs by definition: TRL's default use_bias_correction_kl=True multiplies k3 by the IS ratio "
               "pi/pi_old (DeepSeek-V3.2); SPEC 4 k3 has no ratio. Same value on-policy (ratio 1), different gradient"),
        # the same losses over 2 gradient-accumulation micro-batches (global vs local normalisers)
        S("dapo, 2 micro-batches", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04, use_bias_correction_kl=False),
          dict(**tm, clip_low=0.2, clip_high=0.28, **kl), split=2, note="TRL divides by the generation batch's token count"),
        S("grpo, 2 micro-batches", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.04, use_bias_correction_kl=False),
          dict(**grpo, clip_low=0.2, clip_high=0.2, **kl), split=2, note="equal-size micro-batches"),
        S(f"dr_grpo, 2 micro-batches", dict(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.2, beta=0.0),
          dict(**dr, clip_low=0.2, clip_high=0.2, beta=0.0), split=2, note="equal-size micro-batches"),
        S("bnpo, 2 micro-batches", dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.2, beta=0.0),
          dict(**tm, clip_low=0.2, clip_high=0.2, beta=0.0), split=2, expect_equal=False,
          note="differs by definition: TRL bnpo divides each micro-batch by its OWN token count (then by the "
               "accumulation steps); SPEC 3 token_mean divides by the optimizer step's global count (TRL 'dapo')"),
    ]


#: TRL loss types with no grpokit counterpart (reported, not compared).
NOT_SHARED = {
    "sapo": "soft sigmoid gate on the ratio (SAPO); grpokit has no such loss",
    "vespo": "gamma-function sequence weights (VESPO); grpokit has no such loss",
}


@dataclass
class ParityInputs:
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_mask: torch.Tensor      # [B, P] int
    completion_ids: torch.Tensor   # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T] int
    advantages: torch.Tensor       # [B]
    rewards: torch.Tensor          # [B]
    group_ids: torch.Tensor        # [B]
    old_delta: torch.Tensor        # [B, T] old = current - old_delta (per temperature)
    ref_delta: torch.Tensor        # [B, T]


def make_parity_inputs(model, tokenizer, *, n_prompts: int, G: int, max_new_tokens: int, seed: int = 0) -> ParityInputs:
    """Real sampled completions of arith prompts (grpokit's sampler), synthetic rewards with variance in every
    group, TRL's advantage formula (group mean/std, std + 1e-4), and log-prob perturbations that make the
    clip (and the delta / dual clip) active on a good share of tokens."""
    import random

    from grpokit.data import expand_groups, get_task
    from grpokit.rollout import Sampler, encode_prompts

    task = get_task("arith")
    rows, group_ids = expand_groups(task.sample(n_prompts, random.Random(seed)), G)
    ids = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    gen = torch.Generator().manual_seed(seed)
    roll = Sampler(model, tokenizer, device="cpu").generate(ids, max_new_tokens=max_new_tokens, temperature=1.0, generator=gen)
    B, T = roll.response_ids.shape
    g = torch.Generator().manual_seed(seed + 1)
    rewards = (torch.rand(B, generator=g) < 0.5).float()  # [B]
    rewards.view(-1, G)[:, 0] = 1.0
    rewards.view(-1, G)[:, 1] = 0.0  # every group has reward variance
    grouped = rewards.view(-1, G)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)  # TRL's formula
    old_delta = 0.3 * torch.randn(B, T, generator=g)  # [B, T]
    spikes = torch.rand(B, T, generator=g) < 0.08
    old_delta = torch.where(spikes, torch.full_like(old_delta, 1.6), old_delta)  # ratio e^1.6 ~ 5 > delta/dual clip 3
    ref_delta = 0.2 * torch.randn(B, T, generator=g)
    return ParityInputs(
        prompt_ids=roll.prompt_ids, prompt_mask=roll.prompt_mask.long(), completion_ids=roll.response_ids,
        completion_mask=roll.response_mask.long(), advantages=adv, rewards=rewards, group_ids=group_ids,
        old_delta=old_delta, ref_delta=ref_delta,
    )


def _grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def _trl_trainer(model_dir: str, tokenizer, setting: Setting, *, B: int, G: int, C: int, out_dir: str):
    """A real GRPOTrainer (policy loaded from `model_dir` in fp32, so a reference model is created the way
    TRL does it when beta > 0)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=B // setting.split, gradient_accumulation_steps=setting.split,
        num_generations=G, max_completion_length=C, temperature=setting.temperature, bf16=False, fp16=False,
        **no_checkpointing(GRPOConfig), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_dropout=True, num_iterations=1, model_init_kwargs={"dtype": torch.float32}, **setting.trl,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1"}]] * B, "answer": ["2"] * B})
    with contextlib.redirect_stderr(io.StringIO()):
        trainer = GRPOTrainer(model=model, reward_funcs=trl_numeric_match, args=args, train_dataset=data,
                              processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = setting.split  # what Trainer's loop sets before compute_loss
    return trainer


def _current_logp(model, inp: ParityInputs, temperature: float) -> torch.Tensor:
    from grpokit.rollout.logprobs import token_logprobs

    ids = torch.cat([inp.prompt_ids, inp.completion_ids], 1)
    att = torch.cat([inp.prompt_mask, inp.completion_mask], 1).bool()
    with torch.no_grad():
        return token_logprobs(model, ids, att, inp.completion_ids.shape[1], temperature=temperature)  # [B, T]


def parity_one(model_dir: str, setting: Setting, inp: ParityInputs, *, G: int, C: int, tmp: str) -> dict[str, Any]:
    from grpokit.config import AlgoConfig
    from grpokit.rollout.logprobs import token_logprobs
    from grpokit.train.step import Batch, StatSums, micro_batch_loss

    model, tokenizer = load_dir(model_dir)
    B, T = inp.completion_ids.shape
    mask = inp.completion_mask.bool()  # [B, T]
    cur = _current_logp(model, inp, setting.temperature)  # [B, T] (no grad)
    old = (cur - inp.old_delta) * mask  # [B, T]
    ref = (cur - inp.ref_delta) * mask  # [B, T]
    beta = setting.trl.get("beta", 0.0)

    # ---- TRL: compute_loss on each accumulation slice, inputs laid out as _generate_and_score_completions returns them
    trainer = _trl_trainer(model_dir, tokenizer, setting, B=B, G=G, C=C, out_dir=tmp)
    tmodel = trainer.model
    tmodel.zero_grad(set_to_none=True)
    trl_loss = 0.0
    num_items = inp.completion_mask.sum()
    for sl in torch.arange(B).chunk(setting.split):
        sub = {
            "prompt_ids": inp.prompt_ids[sl], "prompt_mask": inp.prompt_mask[sl],
            "completion_ids": inp.completion_ids[sl], "completion_mask": inp.completion_mask[sl],
            "advantages": inp.advantages[sl], "num_items_in_batch": num_items,
            "old_per_token_logps": old[sl],
        }
        if beta > 0:
            sub["ref_per_token_logps"] = ref[sl]
        loss = trainer.compute_loss(tmodel, sub)
        loss.backward()
        trl_loss += float(loss.detach())
    trl_grad = _grads(tmodel)
    clip_trl = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("clip_ratio/") and k.endswith("mean") and v}

    # ---- grpokit: micro_batch_loss with the global counts, summed over micro-batches
    algo = AlgoConfig(**setting.algo)
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.cat([inp.prompt_ids, inp.completion_ids], 1)
    att = torch.cat([inp.prompt_mask, inp.completion_mask], 1).bool()
    full = Batch(
        input_ids=ids, attention_mask=att, response_mask=mask, loss_mask=mask, group_ids=inp.group_ids,
        rewards=inp.rewards, seq_adv=inp.advantages, token_adv=inp.advantages[:, None] * mask, old_logp=old,
        ref_logp=ref if beta > 0 else None, entropy=torch.zeros(B, T),
    )
    stats = StatSums()
    gk_loss = 0.0
    for sl in torch.arange(B).chunk(setting.split):
        sub = full.select(sl)
        logp = token_logprobs(model, sub.input_ids, sub.attention_mask, sub.response_len, temperature=setting.temperature)
        loss, _ = micro_batch_loss(sub, logp, cfg=algo, num_tokens=float(mask.sum()), num_seqs=float(B),
                                   norm_const=float(algo.norm_const or C), stats=stats)
        loss.backward()
        gk_loss += float(loss.detach())
    gk_grad = _grads(model)
    means = stats.means()
    d = rel_diff(trl_loss, gk_loss)
    gd = float((trl_grad - gk_grad).norm() / max(float(trl_grad.norm()), float(gk_grad.norm()), 1e-30))
    ok = d <= PARITY_TOL if setting.expect_equal else d > PARITY_TOL
    return {
        "name": setting.name, "trl": setting.trl, "algo": setting.algo, "note": setting.note, "split": setting.split,
        "expect_equal": setting.expect_equal, "trl_loss": trl_loss, "grpokit_loss": gk_loss, "rel_diff": d,
        "grad_rel_diff": gd, "ok": ok,
        "clip_frac": means.get("clip/low", 0.0) + means.get("clip/high", 0.0), "dual_frac": means.get("clip/dual", 0.0),
        "clip_trl": clip_trl,
    }


def run_parity(model_name: str = "tiny", *, n_prompts: int = 4, G: int = 4, max_new_tokens: int = 16,
               settings: list[Setting] | None = None, seed: int = 0, quiet: bool = True) -> list[dict[str, Any]]:
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_for(model_name, Path(tmp))
        model, tokenizer = load_dir(model_dir)
        inp = make_parity_inputs(model, tokenizer, n_prompts=n_prompts, G=G, max_new_tokens=max_new_tokens, seed=seed)
        rows = []
        for s in settings or parity_settings(max_new_tokens):
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                rows.append(parity_one(model_dir, s, inp, G=G, C=max_new_tokens, tmp=tmp))
    return rows


def parity_markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| setting | TRL loss | grpokit loss | rel. diff | grad rel. diff | clipped tokens | result |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["expect_equal"]:
            res = "agree" if r["ok"] else "**DISAGREE**"
        else:
            res = "differ, as expected" if r["ok"] else "**unexpectedly equal**"
        clip = f"{100 * r['clip_frac']:.0f}%" + (f" (+{100 * r['dual_frac']:.0f}% dual)" if r["dual_frac"] else "")
        lines.append(f"| {r['name']} | {r['trl_loss']:.8f} | {r['grpokit_loss']:.8f} | {r['rel_diff']:.1e} | "
                     f"{r['grad_rel_diff']:.1e} | {clip} | {res}: {r['note']} |")
    for k, why in NOT_SHARED.items():
        lines.append(f"| {k} | | | | | | not compared: {why} |")
    return "\n".join(lines)


# ============================================================================ part 2: speed

@dataclass
class SpeedSpec:
    """The settings both trainers run with (DAPO loss: token_mean + clip-higher, one update per rollout)."""

    model_dir: str
    prompts: int = 4            # prompts per step (TRL: per_device_train_batch_size = prompts * G)
    G: int = 8                  # completions per prompt (TRL: num_generations)
    max_new_tokens: int = 32    # TRL: max_completion_length
    temperature: float = 1.0
    lr: float = 1e-6
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    warmup: int = 1             # steps not timed
    steps: int = 5              # timed steps after the warm-up
    threads: int = 2
    seed: int = 0
    profile: str = ""           # write a cProfile of this worker's training steps here
    engine: str = "default"     # "vllm": TRL use_vllm=True (colocate) / grpokit rollout.engine = "vllm"
    async_rollouts: bool = False  # grpokit only: rollout.async_rollouts
    reward_latency: float = 0.0   # grpokit only: seconds the reward takes per batch (a remote verifier or judge)


def arith_rows(spec: SpeedSpec, n_steps: int) -> list[dict[str, Any]]:
    """The prompts grpokit's trainer draws, in its order: task.sample(prompts, Random(seed)) once per step."""
    import random

    from grpokit.data import get_task

    task, rng = get_task("arith"), random.Random(spec.seed)
    return [row for _ in range(n_steps) for row in task.sample(spec.prompts, rng)]


def no_checkpointing(config_cls: type) -> dict[str, bool]:
    """Gradient checkpointing off, by the field name this transformers has (activation_checkpointing since 5.20)."""
    from dataclasses import fields

    names = {f.name for f in fields(config_cls)}
    return {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_trl(spec: SpeedSpec) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpokit.models import normalize_tokenizer

    torch.set_num_threads(spec.threads)
    n_steps = spec.warmup + spec.steps
    rows = arith_rows(spec, n_steps)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                              "answer": [r["answer"] for r in rows]})
    tokenizer = normalize_tokenizer(AutoTokenizer.from_pretrained(spec.model_dir))
    B = spec.prompts * spec.G
    out_dir = tempfile.mkdtemp(prefix="vs_trl_")
    args = GRPOConfig(
        output_dir=out_dir, max_steps=n_steps, per_device_train_batch_size=B, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=spec.G, max_completion_length=spec.max_new_tokens,
        temperature=spec.temperature, top_p=1.0, top_k=0, loss_type="dapo", epsilon=spec.eps_low,
        epsilon_high=spec.eps_high, beta=spec.beta, use_bias_correction_kl=False, scale_rewards="group",
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
        **no_checkpointing(GRPOConfig), use_cpu=True, model_init_kwargs={"dtype": torch.float32}, disable_dropout=True,
        shuffle_dataset=False, seed=spec.seed, report_to="none", save_strategy="no", logging_steps=1,
        log_completions=False, dataloader_num_workers=0, disable_tqdm=True,
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 512} if spec.engine == "vllm" else {}),
    )
    marks: list[float] = []
    step_logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                step_logs.append({**logs, "_t": time.perf_counter()})

    trainer = GRPOTrainer(model=spec.model_dir, reward_funcs=trl_numeric_match, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    # phase clocks around TRL's own methods (instance attributes shadow the bound methods it calls)
    phase: dict[str, list[float]] = {"generate": [], "reward": [], "prepare": []}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase[name].append(time.perf_counter() - t)
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("prepare", trainer._generate_and_score_completions)
    prof = None
    if spec.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    assert not trainer.args.gradient_checkpointing and not getattr(trainer.model, "is_gradient_checkpointing", False)
    assert not trainer.args.bf16 and trainer.model.dtype == torch.float32
    trainer.train()
    if prof is not None:
        prof.disable()
        prof.dump_stats(spec.profile)
    # the time of step k is from the end of step k-1 (or the start of training) to the end of step k, so it
    # holds everything: data loading, generation, scoring, the loss forward/backward, the optimizer, logging.
    # The on_log of step k runs after its on_step_end: move each boundary past that step's logging.
    ends = [lg["_t"] for lg in step_logs] if len(step_logs) == n_steps else marks[1:]
    times = [b - a for a, b in zip([marks[0]] + ends[:-1], ends)]
    gen = [lg["completions/mean_length"] * B for lg in step_logs]
    return {"trainer": "TRL", "step_s": times, "gen_tokens": gen, "rss_mib": _rss_mib(),
            "reward": [lg.get("reward", float("nan")) for lg in step_logs],
            "trl_step_time": [lg.get("step_time", float("nan")) for lg in step_logs],
            # rollout = generate; logprobs = the rest of _generate_and_score_completions (old/ref log-probs when
            # needed, padding, advantages) minus rewards; update = everything else of the step
            "phases": [{"time/rollout": g, "time/reward": r, "time/logprobs": p - g - r, "time/update": t - p}
                       for g, r, p, t in zip(phase["generate"], phase["reward"], phase["prepare"], times)]}


def worker_grpokit(spec: SpeedSpec) -> dict[str, Any]:
    from grpokit.config import load_config
    from grpokit.train.loop import setup, train_step

    n_steps = spec.warmup + spec.steps
    B = spec.prompts * spec.G
    run_dir = tempfile.mkdtemp(prefix="vs_grpokit_")
    cfg = load_config(None, [
        f"model.name={json.dumps(spec.model_dir)}", "model.precision=\"fp32\"", "data.task=\"arith\"",
        "data.heldout_size=0", f"rollout.prompts_per_step={spec.prompts}", f"rollout.group_size={spec.G}",
        f"rollout.max_new_tokens={spec.max_new_tokens}", f"rollout.temperature={spec.temperature}",
        "rollout.top_p=1.0", "rollout.top_k=0", "rewards.functions=[\"numeric_match\"]", "algo.advantage=\"grpo\"",
        "algo.std=\"unbiased\"", "algo.adv_eps=1e-4", "algo.loss=\"ppo_clip\"", "algo.aggregation=\"token_mean\"",
        f"algo.clip_low={spec.eps_low}", f"algo.clip_high={spec.eps_high}", f"algo.beta={spec.beta}",
        "algo.kl_estimator=\"k3\"", "algo.kl_placement=\"loss\"", f"train.steps={n_steps}",
        "train.updates_per_rollout=1", f"train.micro_batch_size={B}", f"train.lr={spec.lr}",
        "train.weight_decay=0.0", "train.betas=[0.9, 0.99]", "train.grad_clip=1.0", f"train.seed={spec.seed}",
        f"train.run_dir={json.dumps(run_dir)}", f"train.threads={spec.threads}", "train.tensorboard=false",
        "train.progress=false", "train.report=false", "train.final_eval=false", "train.device=\"cpu\"",
        *(["rollout.engine=\"vllm\"", "rollout.vllm.max_model_len=512"] if spec.engine == "vllm" else []),
        *(["rollout.async_rollouts=true"] if spec.async_rollouts else []),
    ])
    funcs = None
    if spec.reward_latency > 0:  # a remote verifier or judge: the same reward, answered after a delay
        from grpokit.rewards.builtin import numeric_match

        def slow_numeric_match(prompts, completions, **columns):
            time.sleep(spec.reward_latency)
            return numeric_match(prompts, completions, answer=columns["answer"])

        funcs = [slow_numeric_match]
    ctx = setup(cfg, reward_funcs=funcs)
    torch.set_num_threads(spec.threads)
    if spec.async_rollouts:  # as grpokit.train.loop.train starts it
        from grpokit.train.async_rollout import AsyncRollouts

        ctx.rollouts = AsyncRollouts(ctx)
        ctx.rollouts.start(None)
    prof = None
    if spec.profile:
        import cProfile

        prof = cProfile.Profile()
    times, gen, reward, phases = [], [], [], []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        ctx.state["step"] += 1
        m = train_step(ctx)
        ctx.logger.log(ctx.state["step"], m)  # as grpokit's own loop does (TRL logs every step here too)
        if prof is not None:
            prof.disable()
        times.append(time.perf_counter() - t0)
        gen.append(m["tokens/generated"])
        reward.append(m["reward/mean"])
        ph = {k: m[k] for k in ("time/rollout", "time/reward", "time/logprobs")}
        ph["time/update"] = times[-1] - sum(ph.values())  # update + rest (metrics, logging), as for TRL
        ph["time/update_own"] = m["time/update"]
        phases.append(ph)
    ctx.logger.close()
    if ctx.rollouts is not None:
        ctx.rollouts.close()
    if prof is not None:
        prof.dump_stats(spec.profile)
    return {"trainer": "grpokit", "step_s": times, "gen_tokens": gen, "rss_mib": _rss_mib(), "reward": reward,
            "phases": phases}


WORKERS = {"trl": worker_trl, "grpokit": worker_grpokit}


def run_worker(kind: str, spec: SpeedSpec, *, timeout: float | None = None) -> dict[str, Any]:
    """One trainer in a fresh interpreter; its result is the last stdout line starting with RESULT."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec.__dict__)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def summarize(results: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Timed steps (after each run's warm-up) pooled over repeats: median, min, max, IQR; tokens/s; RSS."""
    steps = [t for r in results for t in r["step_s"][warmup:]]
    toks = [g for r in results for g in r["gen_tokens"][warmup:]]
    q = statistics.quantiles(steps, n=4) if len(steps) >= 2 else [steps[0]] * 3
    return {
        "n": len(steps), "median": statistics.median(steps), "min": min(steps), "max": max(steps),
        "q1": q[0], "q3": q[2], "tok_s": sum(toks) / sum(steps), "mean_len": statistics.mean(toks),
        "rss_mib": max(r["rss_mib"] for r in results),
        "reward": statistics.mean(x for r in results for x in r["reward"]),
    }


def speed_markdown(spec: SpeedSpec, s_trl: dict[str, Any], s_gk: dict[str, Any], phases: dict[str, float],
                   labels: tuple[str, str] = ("TRL GRPOTrainer", "grpokit")) -> str:
    B = spec.prompts * spec.G
    rows = [
        f"| | {labels[0]} | {labels[1]} | first / second |",
        "|---|---:|---:|---:|",
        f"| s/step, median | {s_trl['median']:.2f} | {s_gk['median']:.2f} | **{s_trl['median'] / s_gk['median']:.2f}x** |",
        f"| s/step, min - max | {s_trl['min']:.2f} - {s_trl['max']:.2f} | {s_gk['min']:.2f} - {s_gk['max']:.2f} | |",
        f"| s/step, IQR | {s_trl['q1']:.2f} - {s_trl['q3']:.2f} | {s_gk['q1']:.2f} - {s_gk['q3']:.2f} | |",
        f"| generated tokens/s (higher is better) | {s_trl['tok_s']:.1f} | {s_gk['tok_s']:.1f} | {s_trl['tok_s'] / s_gk['tok_s']:.2f}x |",
        f"| generated tokens/step, mean | {s_trl['mean_len']:.0f} | {s_gk['mean_len']:.0f} | |",
        f"| peak RSS (MiB) | {s_trl['rss_mib']:.0f} | {s_gk['rss_mib']:.0f} | {s_trl['rss_mib'] / s_gk['rss_mib']:.2f}x |",
        f"| mean reward (sanity) | {s_trl['reward']:.3f} | {s_gk['reward']:.3f} | |",
        f"| timed steps | {s_trl['n']} | {s_gk['n']} | |",
    ]
    names = {"time/rollout": "rollout (generation)", "time/reward": "reward",
             "time/logprobs": "log-prob passes + batch prep", "time/update": "update (fwd+bwd+optimizer) + rest"}
    for k, label in names.items():
        t, g = phases["trl"][k], phases["grpokit"][k]
        ratio = f"{t / g:.2f}x" if g > 0.05 and t > 0.05 else ""
        rows.append(f"| phase: {label}, median s | {t:.2f} | {g:.2f} | {ratio} |")
    return "\n".join(rows) + "\n\nPhases: grpokit's own time/* metrics; TRL's from clocks around its `_generate`, " \
        "`_calculate_rewards` and `_generate_and_score_completions` (update = step - those).\n" + (
        f"\nSettings (equal in both): {B} sequences per step ({spec.prompts} arith prompts x G={spec.G}), "
        f"max_new_tokens={spec.max_new_tokens}, temperature={spec.temperature}, top_p=1, top_k=0, DAPO loss "
        f"(TRL loss_type='dapo' / grpokit ppo_clip + token_mean), eps={spec.eps_low}/{spec.eps_high}, beta={spec.beta}, "
        f"lr={spec.lr} constant, AdamW betas (0.9, 0.99), wd 0, grad clip 1.0, one optimizer step per rollout "
        f"(TRL num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1; grpokit updates_per_rollout=1, "
        f"micro_batch_size={B}), fp32 (TRL bf16=False, grpokit model.precision=fp32), no gradient checkpointing, "
        f"torch threads={spec.threads}, reward grpokit numeric_match, group advantages std+1e-4 (grpokit adv_eps=1e-4). "
        f"{spec.warmup} warm-up step(s) not timed, then {spec.steps} timed. A step is timed end to end (data, "
        f"generation, reward, log-prob passes, backward, optimizer, per-step logging). Differences by design: TRL "
        f"samples with model.generate; with one update per rollout neither runs an old-log-prob forward (both use the "
        f"detached current log-probs; grpokit train.old_logprobs='auto'); grpokit scores each group's shared prompt "
        f"once (train.pack_prompts=true), TRL scores every row's prompt."
    )


# ============================================================================ entry point

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a HF model directory")
    ap.add_argument("--parity-model", default="tiny", help="model(s) of the parity part, comma-separated (default tiny: "
                    "fast; 'same' = --model; e.g. tiny,smollm2)")
    ap.add_argument("--quick", action="store_true", help="small and short (development): 2 prompts x G 4, 16 tokens, 1+2 steps")
    ap.add_argument("--parity-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4, quick 2)")
    ap.add_argument("--G", type=int, default=None, help="completions per prompt (default 8, quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32, quick 16")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5, quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per trainer, alternated TRL, grpokit, TRL, ...")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both (default: cores available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="", help="cProfile the grpokit worker (and TRL's) into this directory")
    ap.add_argument("--engine", choices=["default", "vllm"], default="default",
                    help="vllm: TRL use_vllm=True (colocate) against grpokit rollout.engine='vllm'; run it with "
                         ".vllm-venv/bin/python and trl installed there (see benchmarks/README.md)")
    ap.add_argument("--async-compare", action="store_true",
                    help="speed part: grpokit synchronous against rollout.async_rollouts = true (no TRL)")
    ap.add_argument("--reward-latency", type=float, default=0.0,
                    help="with --async-compare: the reward answers after this many seconds per batch, as a remote "
                         "verifier or judge does")
    ap.add_argument("--out", default=str(RESULTS), help="markdown file for the tables")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        import transformers

        transformers.logging.set_verbosity_error()
        res = WORKERS[a.worker](SpeedSpec(**json.loads(a.spec)))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = a.threads or cores
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])])
    parts = [f"# grpokit vs TRL GRPOTrainer\n",
             f"Command: `{command}` (from the repository root, HF_HUB_OFFLINE=1).  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}.  ",
             f"Machine: {machine()}.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".\n"]
    ok = True
    if not a.speed_only:
        models = [a.model if m == "same" else m for m in a.parity_model.split(",")]
        for pm in models:
            t0 = time.perf_counter()
            tiny = pm in ("tiny", "tiny-char")
            n_prompts, G, N = (4, 4, 16) if tiny else (2, 4, 16)
            prev = torch.get_num_threads()
            torch.set_num_threads(1 if tiny else threads)
            rows = run_parity(pm, n_prompts=n_prompts, G=G, max_new_tokens=N, seed=a.seed)
            torch.set_num_threads(prev)
            shared = [r for r in rows if r["expect_equal"]]
            worst = max(r["rel_diff"] for r in shared)
            ok = ok and all(r["ok"] for r in rows)
            name = "SmolLM2-135M-Instruct" if pm in ("smollm2", "smollm2-135m") else pm
            table = parity_markdown(rows, f"## First-step loss parity ({name}, fp32, {n_prompts} prompts x G {G}, {N} new tokens)\n\n"
                                    f"TRL: `GRPOTrainer.compute_loss` on an `inputs` dict laid out as `_generate_and_score_completions` "
                                    f"returns it (prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, "
                                    f"num_items_in_batch, old_per_token_logps, ref_per_token_logps when beta > 0). grpokit: "
                                    f"`grpokit.train.step.micro_batch_loss` with global counts, summed over micro-batches. Same "
                                    f"sampled completions, same advantages (TRL's formula), old log-probs = current - N(0, 0.3) "
                                    f"with 8% of tokens at -1.6 (ratio ~5) so the clip and the delta/dual clip are active, "
                                    f"ref log-probs = current - N(0, 0.2). Gradients compared as ||g_TRL - g_grpokit|| / ||g||. "
                                    f"Tolerance {PARITY_TOL:g} relative on the loss.")
            print(table)
            verdict = "PASS" if all(r["ok"] for r in rows) else "FAIL"
            print(f"\nparity ({name}): worst relative difference over the {len(shared)} shared settings {worst:.1e} "
                  f"(tolerance {PARITY_TOL:g}): {verdict} ({time.perf_counter() - t0:.0f}s)\n", flush=True)
            parts.append(table + f"\n\nWorst relative loss difference over the {len(shared)} shared settings: {worst:.1e} "
                         f"({verdict}; {time.perf_counter() - t0:.0f}s).\n")
    if not a.parity_only:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = model_dir_for(a.model, Path(tmp))
            spec = SpeedSpec(
                model_dir=model_dir, prompts=a.prompts or (2 if a.quick else 4), G=a.G or (4 if a.quick else 8),
                max_new_tokens=a.max_new_tokens or (16 if a.quick else 32), temperature=a.temperature, lr=a.lr,
                beta=a.beta, warmup=a.warmup, steps=a.steps or (2 if a.quick else 5), threads=threads, seed=a.seed,
            )
            # the two sides: (worker, spec) each; "trl" is the baseline column of the table
            sides = {"trl": ("trl", replace(spec, engine=a.engine)), "grpokit": ("grpokit", replace(spec, engine=a.engine))}
            labels = ("TRL GRPOTrainer", "grpokit")
            note = ""
            if a.async_compare:
                spec = replace(spec, reward_latency=a.reward_latency)
                sides = {"trl": ("grpokit", spec), "grpokit": ("grpokit", replace(spec, async_rollouts=True))}
                labels = ("grpokit sync", "grpokit async")
                note = ("Both columns are grpokit with the settings below; the second sets rollout.async_rollouts = true "
                        "(step k+1's batch is generated in a background thread during step k's update, and "
                        "rollout.correction = 'auto' turns token-TIS on for the one-update lag)"
                        + (f"; the reward answers after {a.reward_latency:g} s per batch in both, as a remote verifier "
                           "or judge does" if a.reward_latency else "") + ".\n\n")
            elif a.engine == "vllm":
                labels = ("TRL use_vllm=True (colocate)", "grpokit rollout.engine = vllm")
                try:  # TRL's vLLM path first: where it cannot run here, its error goes in the results
                    print("[trl use_vllm=True] trying ...", flush=True)
                    first = run_worker("trl", sides["trl"][1])
                except RuntimeError as err:
                    lines = [ln for ln in str(err).splitlines() if ln.strip()]
                    trl_frames = [ln for ln in lines if "/trl/" in ln and "File " in ln]  # where in TRL it failed
                    versions_warn = [ln.strip() for ln in lines if "currently supports vLLM versions" in ln][:1]
                    tail = versions_warn + trl_frames[-1:] + lines[-3:]
                    note = ("TRL's vLLM path (use_vllm=True, vllm_mode='colocate') did not run here; its last lines:\n\n"
                            "```\n" + "\n".join(tail) + "\n```\n\nSo grpokit's `vllm` engine is compared with TRL's "
                            "default path (`model.generate`) instead.\n\n")
                    print(note, flush=True)
                    sides["trl"] = ("trl", spec)
                    labels = ("TRL GRPOTrainer (model.generate)", "grpokit rollout.engine = vllm")
                    first = None
            res: dict[str, list[dict[str, Any]]] = {"trl": [], "grpokit": []}
            for rep in range(a.repeats):
                for side in ("trl", "grpokit"):
                    kind, s = sides[side][0], copy.copy(sides[side][1])
                    if side == "trl" and rep == 0 and a.engine == "vllm" and not a.async_compare and first is not None:
                        res[side].append(first)  # the trial run above was this run
                        continue
                    if a.profile:
                        Path(a.profile).mkdir(parents=True, exist_ok=True)
                        s.profile = str(Path(a.profile) / f"{side}_{rep}.prof")
                    print(f"[{labels[side == 'grpokit']} run {rep + 1}/{a.repeats}] ...", flush=True)
                    r = run_worker(kind, s)
                    res[side].append(r)
                    print(f"[{labels[side == 'grpokit']} run {rep + 1}/{a.repeats}] step s: " + " ".join(f"{t:.2f}" for t in r["step_s"]) +
                          f"  | peak RSS {r['rss_mib']:.0f} MiB | wall {r['wall_s']:.0f}s", flush=True)
            s_trl, s_gk = summarize(res["trl"], spec.warmup), summarize(res["grpokit"], spec.warmup)
            phase_keys = ("time/rollout", "time/reward", "time/logprobs", "time/update")
            phases = {kind: {k: statistics.median(p[k] for r in res[kind] for p in r["phases"][spec.warmup:]) for k in phase_keys}
                      for kind in ("trl", "grpokit")}
            name = "SmolLM2-135M-Instruct" if a.model in ("smollm2", "smollm2-135m") else a.model
            table = speed_markdown(spec, s_trl, s_gk, phases, labels=labels)
            what = "sync vs async" if a.async_compare else ("vLLM engines" if a.engine == "vllm" else "default engines")
            head = (f"## Training speed, {what} ({name}, CPU, {threads} threads, {a.repeats} run(s) per side, alternated)\n\n")
            print(head + note + table)
            print(f"\n{labels[0]} / {labels[1]} seconds per step (median): {s_trl['median'] / s_gk['median']:.2f}x")
            parts.append(head + note + table + "\n")
    if not a.no_write:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(parts) + "\n")
        print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
