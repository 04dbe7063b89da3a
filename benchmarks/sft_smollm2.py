"""Acceptance of the SFT stage on SmolLM2-135M (issue 10): `grpokit sft demo` on tests/fixtures/sft_arith.jsonl.

Runs the bundled recipe (overrides below keep it to a few minutes on 2 CPU cores) three ways:
  whole:  STEPS steps uninterrupted;
  part:   the same run, killed (SIGKILL) once its checkpoint at STEPS/2 exists, then `grpokit sft --resume`;
and checks that the loss falls, the resumed run's final weights equal the uninterrupted run's bit for bit
(and its metrics, time aside), and final/ loads with AutoModelForCausalLM. Whole and part run side by side.

    python benchmarks/sft_smollm2.py [--steps 10] [--out /tmp/sft_acceptance]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="/tmp/sft_acceptance")
    ap.add_argument("--model", default="", help="another model.name (e.g. tiny-char for a dry run)")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    half = a.steps // 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def cmd(run: Path) -> list[str]:
        sets = [f"train.steps={a.steps}", f"train.batch_size={a.batch_size}", f"train.micro_batch_size={a.batch_size}",
                f"train.save_every={half}", "train.keep_last=5", "data.heldout_fraction=0.05", "train.progress=false",
                f"train.run_dir={run}", *([f"model.name={a.model}"] if a.model else [])]
        return [sys.executable, "-m", "grpokit", "sft", "demo", *[x for s in sets for x in ("--set", s)]]

    t0 = time.time()
    whole = subprocess.Popen(cmd(out / "whole"), env=env, cwd=ROOT, stdout=open(out / "whole.log", "w"), stderr=subprocess.STDOUT)
    part = subprocess.Popen(cmd(out / "part"), env=env, cwd=ROOT, stdout=open(out / "part.log", "w"), stderr=subprocess.STDOUT)
    marker = out / "part" / "checkpoints" / f"step_{half:06d}" / "state.json"
    while not marker.exists():
        if part.poll() is not None:
            raise SystemExit(f"the part run ended before its step-{half} checkpoint; see {out / 'part.log'}")
        time.sleep(1)
    part.send_signal(signal.SIGKILL)
    part.wait()
    t_kill = time.time() - t0
    resumed = subprocess.run([sys.executable, "-m", "grpokit", "sft", "--resume", str(out / "part")], env=env, cwd=ROOT,
                             stdout=open(out / "resume.log", "w"), stderr=subprocess.STDOUT)
    assert resumed.returncode == 0, f"resume failed; see {out / 'resume.log'}"
    assert whole.wait() == 0, f"whole run failed; see {out / 'whole.log'}"
    wall = time.time() - t0

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def metrics(run: str) -> list[dict]:
        rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    w, p = (load_file(str(out / r / "final" / "model.safetensors")) for r in ("whole", "part"))
    identical = w.keys() == p.keys() and all(torch.equal(w[k], p[k]) for k in w)
    same_metrics = metrics("whole") == metrics("part")
    losses = [r["loss"] for r in metrics("whole")]
    ev = json.loads((out / "whole" / "eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "whole" / "final")
    tok = AutoTokenizer.from_pretrained(out / "whole" / "final")
    from grpokit.rollout import encode_prompts

    samples = []
    for q in ("What is 23+45?", "What is 71-38?"):
        ids = torch.tensor([encode_prompts(tok, [q])[0]])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=16, do_sample=False)
        samples.append((q, tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)))
    step_times = [json.loads(x)["time/step"] for x in (out / "whole" / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({
        "steps": a.steps, "batch_size": a.batch_size, "loss_per_step": [round(x, 4) for x in losses],
        "heldout_loss_before": ev["before"]["loss"], "heldout_loss_after": ev["after"]["loss"],
        "resume_bit_identical_weights": identical, "resume_identical_metrics": same_metrics,
        "final_loads_with_AutoModelForCausalLM": True, "greedy_samples": samples,
        "s_per_step_mean": sum(step_times) / len(step_times), "killed_after_s": round(t_kill, 1), "wall_s": round(wall, 1),
    }, indent=1))
    return 0 if identical and same_metrics and losses[-1] < losses[0] and ev["after"]["loss"] < ev["before"]["loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
