"""Peak memory of a training step, full fine-tuning against LoRA, with a KL reference (beta > 0).

Each configuration runs in a fresh child process (so peaks do not mix): load the policy, build the trainer
(`grpokit.train.loop.setup`), run `--steps` training steps, and report the process's peak RSS (VmHWM), the
RSS before the first step, the parameters that train, and how the reference policy is held: a frozen deep
copy for full fine-tuning, the same module with its adapters disabled for LoRA (no copy).

    python benchmarks/lora_memory.py                   # SmolLM2-135M, 4 prompts x G 4, 32 new tokens
    python benchmarks/lora_memory.py --model tiny      # the tiny test model (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def vm(key: str) -> float:
    """VmHWM / VmRSS of this process in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    import torch

    from grpokit.config import load_config
    from grpokit.train.loop import AdapterOff, setup, train_step

    torch.set_num_threads(spec["threads"])
    run_dir = tempfile.mkdtemp(prefix="lora_mem_")
    sets = {
        "model.name": spec["model"], "model.precision": "fp32", "model.lora_r": spec["lora_r"], "data.task": "arith",
        "data.heldout_size": 0, "rollout.prompts_per_step": spec["prompts"], "rollout.group_size": spec["G"],
        "rollout.max_new_tokens": spec["max_new_tokens"], "algo.beta": 0.04, "algo.kl_placement": "loss",
        "train.steps": spec["steps"], "train.micro_batch_size": spec["prompts"] * spec["G"], "train.lr": 1e-5,
        "train.run_dir": run_dir, "train.threads": spec["threads"], "train.tensorboard": False,
        "train.progress": False, "train.report": False, "train.final_eval": False, "train.device": "cpu",
    }
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    ctx = setup(cfg)
    rss_setup = vm("VmRSS")
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        ctx.state["step"] += 1
        train_step(ctx)
    params = list(ctx.base.parameters())
    ref = ctx.ref
    return {
        "lora_r": spec["lora_r"],
        "rss_after_setup_mib": rss_setup,
        "peak_rss_mib": vm("VmHWM"),
        "s_per_step": (time.perf_counter() - t0) / spec["steps"],
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "policy_params": sum(p.numel() for p in params),
        "reference": "adapters disabled on the policy (no copy)" if isinstance(ref, AdapterOff) else
                     f"frozen copy ({sum(p.numel() for p in ref.parameters())} params)",
        "optimizer_state_mib": sum(t.numel() * t.element_size() for st in ctx.optimizer.state.values()
                                   for t in st.values() if hasattr(t, "numel")) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny (tiny-char) or an HF directory")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))))
        return
    model = "tiny-char" if a.model == "tiny" else a.model
    rows = []
    for r in (0, a.lora_r):
        spec = {"model": model, "lora_r": r, "prompts": a.prompts, "G": a.G, "max_new_tokens": a.max_new_tokens,
                "steps": a.steps, "threads": a.threads}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"child failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(line[7:]))
    full, lora = rows
    print(f"model {model}, {a.prompts} prompts x G {a.G}, {a.max_new_tokens} new tokens, beta 0.04 (a reference is needed), "
          f"{a.steps} steps, fp32, {a.threads} threads\n")
    print("| | full fine-tuning | LoRA r=%d |" % a.lora_r)
    print("|---|---:|---:|")
    for key, label in [("peak_rss_mib", "peak RSS (MiB)"), ("rss_after_setup_mib", "RSS after setup (MiB)"),
                       ("optimizer_state_mib", "AdamW state (MiB)"), ("trainable_params", "trainable parameters"),
                       ("policy_params", "policy parameters"), ("s_per_step", "s / step"), ("reference", "reference policy")]:
        fmt = (lambda v: f"{v:,.0f}") if isinstance(full[key], (int, float)) and key != "s_per_step" else (lambda v: f"{v:.2f}" if isinstance(v, float) else str(v))
        print(f"| {label} | {fmt(full[key])} | {fmt(lora[key])} |")
    print(f"\npeak RSS: LoRA / full = {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
