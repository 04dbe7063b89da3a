"""Model FLOPs utilisation of a grpokit training step on CPU, phase by phase.

1. The machine's matmul peak: large square ``torch.matmul`` in float32 and bfloat16 with the trainer's thread
   count, best of several repeats, in GFLOP/s (2·n³ FLOPs per n×n×n product).
2. grpokit's own ``setup`` + ``train_step`` on SmolLM2-135M-Instruct; for every step the useful model FLOPs of
   each phase are divided by that phase's time (the trainer's own ``time/*`` metrics) and by the peak:

   - rollout (``time/rollout``): the prefill of every real prompt token and one decode step per generated
     token, 2·N_body FLOPs per token through the transformer body, plus 2·d·V for the LM head of every
     generated token (the sampler only computes the last position's logits);
   - logprobs (``time/logprobs``): one teacher-forced forward per scoring model (the policy's old log-probs,
     plus the reference when beta > 0): 2·N_body per real prompt+response token, 2·d·V per response token
     (``logits_to_keep``: prompt positions never reach the LM head);
   - update (``time/update``): forward + backward, 3x the forward: 6·N_body per real token, 6·d·V per
     response token;
   - attention score/value products, 4·layers·heads·head_dim·context per token and pass (x3 in the update),
     are added (a few percent at these lengths).

   N_body = the weights of every ``nn.Linear`` except the LM head (embeddings are a lookup, not FLOPs);
   padding is not counted (it is waste, not model work). With ``model.precision = fp32`` the fp32 peak is
   the reference; under bf16 autocast, the bf16 peak.

    python benchmarks/mfu.py            # SmolLM2, 4 prompts x G 8, 32 new tokens, 1 warm-up + 3 timed steps
    python benchmarks/mfu.py --quick    # 2 prompts x G 4, 16 tokens, 1 + 2 steps, smaller matmuls

Writes benchmarks/results/mfu.md (``--out``; ``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, offline_env  # noqa: E402

offline_env()

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mfu.md"


# ---------------------------------------------------------------------------- peak

def matmul_gflops(n: int, dtype: torch.dtype, *, repeats: int = 5, min_time: float = 0.5) -> tuple[float, float]:
    """(best GFLOP/s, seconds of one product) of an n x n @ n x n torch.matmul over `repeats` timed batches,
    each >= min_time s; a product slower than min_time is timed `repeats` times alone (at most 2 when > 5 s)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    t = time.perf_counter()
    torch.matmul(a, b)  # warm-up (allocations, kernel selection), also a first estimate
    one = max(time.perf_counter() - t, 1e-6)
    reps = max(1, int(min_time / one))
    if one > 5.0:
        repeats = min(repeats, 2)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        dt = (time.perf_counter() - t) / reps
        best = max(best, 2 * n**3 / dt / 1e9)
    return best, 2 * n**3 / best / 1e9


def measure_peak(sizes: list[int], repeats: int, *, max_product_s: float = 3.0) -> dict[str, dict[int, float]]:
    """GFLOP/s per size and dtype; sizes ascending, a dtype stops growing once one product takes > max_product_s
    (bf16 without native kernels runs at ~1 GFLOP/s: a 2048 product would take a minute)."""
    out: dict[str, dict[int, float]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = {}
        for n in sorted(sizes if name == "fp32" else [256, 512, *sizes]):
            out[name][n], one = matmul_gflops(n, dtype, repeats=repeats)
            print(f"matmul {name} n={n}: {out[name][n]:.1f} GFLOP/s", flush=True)
            if one * 8 > max_product_s:  # the next size (x2) costs 8x
                break
    return out


# ---------------------------------------------------------------------------- model FLOPs

def model_shape(model: torch.nn.Module) -> dict[str, int]:
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n_all = sum(m.weight.numel() for m in linear)
    n_head = head.weight.numel() if head is not None else 0
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"n_body": n_all - n_head, "n_head": n_head, "n_params": sum(p.numel() for p in model.parameters()),
            "layers": cfg.num_hidden_layers, "attn_width": cfg.num_attention_heads * head_dim}


def _attn_causal(lengths: torch.Tensor, width: int, layers: int) -> float:
    """Forward attention FLOPs of teacher-forced causal sequences: 4·layers·width·Σ_i L_i(L_i+1)/2."""
    L = lengths.double()
    return float(4 * layers * width * (L * (L + 1) / 2).sum())


def step_flops(roll: Any, shape: dict[str, int], *, scoring_passes: int) -> dict[str, float]:
    """Useful FLOPs of one rollout batch in each phase (see the module docstring)."""
    p = roll.prompt_mask.sum(1).double()  # [B] real prompt tokens
    r = roll.response_mask.sum(1).double()  # [B] real response tokens
    body, head = 2.0 * shape["n_body"], 2.0 * shape["n_head"]
    tokens, resp = float((p + r).sum()), float(r.sum())
    # decode: the token at context c attends c keys; prefill: causal over the prompt
    decode_ctx = float((r * p + r * (r + 1) / 2).sum())  # Σ over generated tokens of their context length
    attn_roll = _attn_causal(p, shape["attn_width"], shape["layers"]) + 4 * shape["layers"] * shape["attn_width"] * decode_ctx
    attn_fwd = _attn_causal(p + r, shape["attn_width"], shape["layers"])
    fwd = body * tokens + head * resp + attn_fwd
    return {
        "rollout": body * (float(p.sum()) + resp) + head * resp + attn_roll,
        "logprobs": scoring_passes * fwd,
        "update": 3 * fwd,
        "tokens": tokens, "resp_tokens": resp,
    }


# ---------------------------------------------------------------------------- the training steps

def run_steps(a: argparse.Namespace, threads: int) -> tuple[list[dict[str, float]], dict[str, int], dict[str, Any]]:
    from grpokit.config import load_config
    from grpokit.train.loop import setup, train_step

    B = a.prompts * a.G
    run_dir = tempfile.mkdtemp(prefix="mfu_")
    cfg = load_config(None, [
        f"model.name={json.dumps(a.model)}", f"model.precision={json.dumps(a.precision)}", "data.heldout_size=0",
        f"rollout.prompts_per_step={a.prompts}", f"rollout.group_size={a.G}", f"rollout.max_new_tokens={a.max_new_tokens}",
        "algo.loss=\"ppo_clip\"", "algo.aggregation=\"token_mean\"", "algo.clip_low=0.2", "algo.clip_high=0.28",
        f"algo.beta={a.beta}", "train.updates_per_rollout=1", f"train.micro_batch_size={a.micro_batch_size or B}",
        f"train.steps={a.warmup + a.steps}", f"train.threads={threads}", f"train.run_dir={json.dumps(run_dir)}",
        "train.tensorboard=false", "train.progress=false", "train.report=false", "train.final_eval=false",
        "train.device=\"cpu\"", "train.lr=1e-6",
    ])
    ctx = setup(cfg)
    torch.set_num_threads(threads)
    shape = model_shape(ctx.base)
    rolls: list[Any] = []
    generate = ctx.engine.generate

    def capture(*args, **kw):
        out = generate(*args, **kw)
        rolls.append(out)
        return out

    ctx.engine.generate = capture  # an instance attribute shadows the method; the trainer is unchanged
    passes = 1 + (ctx.ref is not None)
    steps = []
    for i in range(a.warmup + a.steps):
        rolls.clear()
        ctx.state["step"] += 1
        m = train_step(ctx)
        ctx.logger.log(ctx.state["step"], m)
        # one rollout per step (this config has no dynamic sampling, so the scored batch is that rollout)
        assert len(rolls) == 1, f"expected one rollout per step, got {len(rolls)}"
        fl = step_flops(rolls[0], shape, scoring_passes=passes)
        rec = {**{f"flops/{k}": v for k, v in fl.items()}, **{k: m[k] for k in m if k.startswith("time/")}}
        rec["warmup"] = i < a.warmup
        steps.append(rec)
        print(f"step {i + 1}: " + ", ".join(f"{k.split('/')[1]} {m[k]:.2f}s" for k in
                                             ("time/rollout", "time/logprobs", "time/update", "time/step")), flush=True)
    ctx.logger.close()
    info = {"B": B, "passes": passes, "precision": cfg.model.precision, "micro_batch_size": cfg.train.micro_batch_size}
    return steps, shape, info


# ---------------------------------------------------------------------------- report

def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ""
    with contextlib.suppress(OSError):
        load = f", load average at start {os.getloadavg()[0]:.1f}"
    return f"{cpu}, {cores} cores available{load}"


def report(a: argparse.Namespace, threads: int, peak: dict[str, dict[int, float]], steps: list[dict[str, Any]],
           shape: dict[str, int], info: dict[str, Any], command: str) -> str:
    from grpokit.models import resolve_precision

    prec = resolve_precision("cpu", info["precision"])
    p32, p16 = max(peak["fp32"].values()), max(peak["bf16"].values())
    ref = p32 if prec == "fp32" else p16
    timed = [s for s in steps if not s["warmup"]]
    lines = [
        "# Model FLOPs utilisation of a grpokit training step (CPU)\n",
        f"Command: `{command}` (from the repository root).  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}.  ",
        f"Machine: {machine()}; torch {torch.__version__}, {threads} thread(s).  ",
        f"Model: {a.model}, {shape['n_params'] / 1e6:.1f}M parameters; matmul weights: body {shape['n_body'] / 1e6:.1f}M, "
        f"LM head {shape['n_head'] / 1e6:.1f}M; compute precision {prec}.  ",
        f"Step: {a.prompts} prompts x G {a.G} = {info['B']} sequences, max_new_tokens {a.max_new_tokens}, "
        f"micro_batch_size {info['micro_batch_size']}, one update per rollout, beta {a.beta} "
        f"({info['passes']} scoring pass(es)); {a.warmup} warm-up + {a.steps} timed steps.\n",
        "## Matmul peak (torch.matmul, n x n x n, best of repeats; bf16 stops growing n once a product takes over a few seconds)\n",
        "| n | fp32 GFLOP/s | bf16 GFLOP/s |", "|---:|---:|---:|",
    ]
    for n in sorted(set(peak["fp32"]) | set(peak["bf16"])):
        f32, b16 = peak["fp32"].get(n), peak["bf16"].get(n)
        lines.append(f"| {n} | {'' if f32 is None else f'{f32:.1f}'} | {'' if b16 is None else f'{b16:.1f}'} |")
    lines.append(f"| **peak** | **{p32:.1f}** | **{p16:.1f}** |")
    native = ""
    with contextlib.suppress(Exception):
        native = "native" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated (no AVX512-BF16/AMX)"
    lines.append(f"\nbf16 kernels on this CPU: {native or 'unknown'}. MFU below is against the {prec} peak, {ref:.1f} GFLOP/s.\n")
    lines += ["## Per phase (medians over the timed steps; aggregate = total FLOPs / total time)\n",
              "| phase | GFLOP per step | seconds per step | achieved GFLOP/s | MFU (median) | MFU (aggregate) | share of step time |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    step_t = sum(s["time/step"] for s in timed)
    tot_f = tot_t = 0.0
    for ph in ("rollout", "logprobs", "update"):
        f = [s[f"flops/{ph}"] for s in timed]
        t = [s[f"time/{ph}"] for s in timed]
        mfu = [fi / ti / 1e9 / ref for fi, ti in zip(f, t) if ti > 0]
        agg = sum(f) / sum(t) / 1e9
        tot_f += sum(f)
        tot_t += sum(t)
        lines.append(f"| {ph} | {statistics.median(f) / 1e9:.1f} | {statistics.median(t):.2f} | {agg:.1f} | "
                     f"{100 * statistics.median(mfu):.1f}% | {100 * agg / ref:.1f}% | {100 * sum(t) / step_t:.0f}% |")
    whole = tot_f / step_t / 1e9
    lines.append(f"| **whole step** (time/step) | {tot_f / len(timed) / 1e9:.1f} | {step_t / len(timed):.2f} | {whole:.1f} | | "
                 f"**{100 * whole / ref:.1f}%** | 100% |")
    resp = statistics.mean(s["flops/resp_tokens"] for s in timed)
    toks = statistics.mean(s["flops/tokens"] for s in timed)
    lines.append(f"\nPer step on average {resp:.0f} generated tokens and {toks:.0f} real prompt+response tokens scored. "
                 "FLOPs count real tokens only (see the docstring of benchmarks/mfu.py for the exact model); "
                 "reward time and per-step bookkeeping count in the whole step but carry no FLOPs.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="grpokit training-step MFU on CPU")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="2 prompts x G 4, 16 tokens, 1 + 2 steps, smaller matmuls")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--G", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=0, help="0 = the whole batch in one micro-batch")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: cores available)")
    ap.add_argument("--sizes", default="", help="matmul sizes, comma-separated (default 1024,2048,3072; quick 1024,2048)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    a.prompts = a.prompts or (2 if a.quick else 4)
    a.G = a.G or (4 if a.quick else 8)
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 32)
    a.steps = a.steps or (2 if a.quick else 3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = a.threads or cores
    torch.set_num_threads(threads)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else ([1024, 2048] if a.quick else [1024, 2048, 3072])
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, REPO),
                                                              *(argv if argv is not None else sys.argv[1:])])
    import transformers

    transformers.logging.set_verbosity_error()
    peak = measure_peak(sizes, repeats=3 if a.quick else 5)
    steps, shape, info = run_steps(a, threads)
    text = report(a, threads, peak, steps, shape, info, command)
    print(text)
    if not a.no_write:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
