"""The quantized frozen reference (SPEC section 10): its memory, its log-prob error against the fp32
reference, the k3 KL error that follows, and its forward time.

Policy = the fp32 model. Rollouts: `--prompts` prompts of the `arith` task, one sampled response each
(`grpokit.rollout.Sampler`, temperature 1, `--new-tokens` new tokens, seeded). Each reference variant
(`grpokit.models.quantized_ref_model`) is built from the policy in turn and measured:

- **bytes**: parameters + buffers, each storage once (`grpokit.models.module_nbytes`); exact.
- **RSS Δ**: the process's resident memory after building the reference minus before (glibc's mmap
  threshold is pinned to 64 KiB so that freed tensors go back to the OS; approximate, allocator noise
  is a few MiB). **build peak Δ**: VmHWM during the build (reset through /proc/self/clear_refs) minus
  the RSS before: what building it costs at its peak (the fp32 weights being replaced are never copied).
- **|Δ logp|**: per response token, |ℓʳ_quant − ℓʳ_fp32| (teacher-forced, fp32 compute), mean and max.
- **k3 at the policy**: the per-token mean of k3(ℓ_policy, ℓʳ) (SPEC section 4). With the fp32
  reference it is exactly 0 (policy = reference); with a quantized one it is the KL the quantization
  alone shows to the loss.
- **moved policy**: the policy after one SGD step on −mean_t A_i·ℓ_t with seeded random advantages
  A_i = ±1 per response, for each `--lrs`; k3(moved, fp32 ref) is the true value, and the table gives
  k3(moved, quantized ref) next to it, with the mean per-token |Δk3| between the two.
- **ref fwd**: median wall time of one reference scoring call (`score_logprobs`, no grad) over the
  batch, after a warm-up, `--reps` runs.
- With `--torchao` and torchao importable, torchao's own int8 weight-only (``Int8WeightOnlyConfig``,
  lm_head excluded) is measured the same way as a cross-check of the int8 row.

Note: the built-in `smollm2-135m` is dequantized from the bundled Q4_1 GGUF (blocks of 32 inputs, w = q·d + m
with q in 0..15 and fp16 d, m): exactly grpokit's int4 grid at group 32, which therefore reproduces it
bit for bit (error 0) on this model; the weights of a model trained in full precision lie on no such grid.
Judge int4 by the other group sizes.

    python benchmarks/quant_ref.py --threads 2                  # SmolLM2-135M (cached conversion)
    python benchmarks/quant_ref.py --model tiny-char --prompts 4 --new-tokens 8 --reps 1   # smoke
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, offline_env  # noqa: E402

MMAP_THRESHOLD = "65536"


def vm(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def tensor_bytes(module) -> int:
    """`module_nbytes`, but also for tensor subclasses (torchao) whose data lives in inner tensors."""
    from grpokit.models import module_nbytes

    try:
        return module_nbytes(module)
    except Exception:
        total = 0
        for t in list(module.parameters()) + list(module.buffers()):
            if hasattr(t, "__tensor_flatten__"):
                names, _ = t.__tensor_flatten__()
                total += sum(getattr(t, n).nbytes for n in names)
            else:
                total += t.nbytes
        return total


def masked_mean(x, mask) -> float:
    return float((x * mask).sum() / mask.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-sizes", default="32,64,128", help="int4 group sizes to measure")
    ap.add_argument("--lrs", default="1e-4,1e-3", help="SGD learning rates of the moved policies")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torchao", action="store_true", help="also measure torchao's int8 weight-only")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # must be set before the process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])
    offline_env()

    import torch

    from grpokit.algo.kl import k3
    from grpokit.data import get_task
    from grpokit.models import load_model, quantized_ref_model
    from grpokit.rollout import Sampler, encode_prompts, token_logprobs
    from grpokit.rollout.logprobs import score_logprobs

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model)
    rows = get_task("arith").sample(a.prompts, random.Random(a.seed))
    prompts = encode_prompts(tok, [r["prompt"] for r in rows])
    roll = Sampler(model, tok).generate(prompts, max_new_tokens=a.new_tokens, temperature=1.0,
                                        generator=torch.Generator().manual_seed(a.seed))
    ids, att, T = roll.input_ids(), roll.attention_mask(), roll.response_ids.shape[1]  # [B, P+T], [B, P+T]
    mask = roll.response_mask.float()  # [B, T]
    n_tok = int(mask.sum())

    with torch.no_grad():
        logp_policy = token_logprobs(model, ids, att, T)  # [B, T]
    moved = {}  # lr -> [B, T] log-probs of the policy after one SGD step
    adv = (torch.randint(0, 2, (len(rows),), generator=torch.Generator().manual_seed(a.seed)) * 2 - 1).float()  # [B]
    for lr in [float(x) for x in a.lrs.split(",") if x]:
        pol = copy.deepcopy(model)
        logp = token_logprobs(pol, ids, att, T)  # [B, T]
        loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
        loss.backward()
        with torch.no_grad():
            for p in pol.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
            moved[lr] = token_logprobs(pol, ids, att, T)  # [B, T]
        del pol, logp, loss
        gc.collect()

    variants: list[tuple[str, object]] = [("fp32 (plain copy)", lambda: quantized_ref_model(model, "none")),
                                          ("int8", lambda: quantized_ref_model(model, "int8"))]
    variants.append(("int8 + emb/head", lambda: quantized_ref_model(model, "int8", embeddings=True)))
    for g in [int(x) for x in a.group_sizes.split(",") if x]:
        variants.append((f"int4 g{g}", lambda g=g: quantized_ref_model(model, "int4", group_size=g)))
    variants.append(("int4 g64 + emb/head", lambda: quantized_ref_model(model, "int4", group_size=64, embeddings=True)))
    if a.torchao:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            def tao():
                ref = quantized_ref_model(model, "none")
                head = ref.get_output_embeddings()
                quantize_(ref, Int8WeightOnlyConfig(),
                          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
                return ref

            variants.append(("torchao int8", tao))
        except ImportError as err:
            print(f"(torchao not importable, skipped: {err})", file=sys.stderr)

    out = []
    for name, build in variants:
        gc.collect()
        rss0 = vm("VmRSS")
        reset_peak()
        with torch.no_grad():
            ref = build()
        gc.collect()
        row = {"variant": name, "bytes": tensor_bytes(ref), "rss_delta_mib": vm("VmRSS") - rss0,
               "build_peak_delta_mib": vm("VmHWM") - rss0}
        with torch.no_grad():
            logp_ref = token_logprobs(ref, ids, att, T)  # [B, T]
            d = (logp_ref - logp_policy).abs()[roll.response_mask]  # [n_tok]
            row.update(mean_abs_dlogp=float(d.mean()), max_abs_dlogp=float(d.max()),
                       k3_at_policy=masked_mean(k3(logp_policy, logp_ref), mask))
            for lr, lp in moved.items():
                true = k3(lp, logp_policy)  # [B, T]: the fp32 reference's log-probs are the policy's
                got = k3(lp, logp_ref)  # [B, T]
                row[f"k3_true@{lr:g}"] = masked_mean(true, mask)
                row[f"k3_quant@{lr:g}"] = masked_mean(got, mask)
                row[f"abs_dk3@{lr:g}"] = masked_mean((got - true).abs(), mask)
            times = []
            score_logprobs(ref, ids, att, T, pad_id=tok.pad_token_id)  # warm-up
            for _ in range(a.reps):
                t0 = time.perf_counter()
                score_logprobs(ref, ids, att, T, pad_id=tok.pad_token_id)
                times.append(time.perf_counter() - t0)
        row["fwd_s"] = statistics.median(times)
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del ref, logp_ref
        gc.collect()

    fp = out[0]
    print(f"model {a.model}, {a.prompts} arith prompts x 1 response, {a.new_tokens} new tokens ({n_tok} response "
          f"tokens, batch {ids.shape[0]} x {ids.shape[1]}), seed {a.seed}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {cpu_model()}; policy = fp32 model\n")
    print("| reference | bytes (MiB) | vs fp32 | RSS Δ (MiB) | build peak Δ (MiB) | mean \\|Δlogp\\| | max \\|Δlogp\\| "
          "| k3 at policy | ref fwd (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in out:
        print(f"| {r['variant']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / fp['bytes']:.3f} | {r['rss_delta_mib']:.1f} | "
              f"{r['build_peak_delta_mib']:.1f} | {r['mean_abs_dlogp']:.2e} | {r['max_abs_dlogp']:.2e} | "
              f"{r['k3_at_policy']:.2e} | {r['fwd_s']:.3f} |")
    for lr in moved:
        print(f"\nmoved policy (one SGD step, lr {lr:g}): true k3(policy, fp32 ref) = {fp[f'k3_true@{lr:g}']:.3e} "
              "per token\n")
        print("| reference | k3(policy, ref) | relative error of the mean | mean per-token \\|Δk3\\| |")
        print("|---|---:|---:|---:|")
        for r in out:
            true, got = r[f"k3_true@{lr:g}"], r[f"k3_quant@{lr:g}"]
            print(f"| {r['variant']} | {got:.3e} | {(got - true) / true:+.1%} | {r[f'abs_dk3@{lr:g}']:.2e} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "tokens": n_tok, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
