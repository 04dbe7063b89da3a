"""Measure the learning tests' signals over seeds, to choose margins that hold on any CPU (issue 10).

Not a test (pytest does not collect it). Run it once per kernel set torch accepts on the machine:

    for cap in default avx2 avx512; do
        ATEN_CPU_CAPABILITY=$cap python tests/margins.py --seeds 0 1 2 3 4 > margins-$cap.jsonl
    done

Each line is one (test, seed) with the quantity its assertion reads. Seed s builds the SFT-warmed tiny
model with seed s (the suite's fixture uses 0; `--warm-seed 0` keeps that one) and trains with
train.seed = s, so every seed is a different trajectory, as another CPU's floating-point path would give. Keep only margins that hold for
every line, with room.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # this checkout's grpokit, not an installed one
import toy  # noqa: E402
from test_loop import (  # noqa: E402
    RECIPES, SEEDED_GRPO, TWO_STEPS, _grads_after_update, read_metrics, tiny_overrides,
)

from grpokit.config import load_config  # noqa: E402
from grpokit.train.loop import train  # noqa: E402


def warm(seed: int, root: Path) -> str:
    """The conftest fixture `warm_tiny`, with the seed as a parameter."""
    from grpokit.models import make_tiny
    from grpokit.train.sft import sft

    torch.manual_seed(seed)
    model, tok = make_tiny(seed=seed)
    sft(model, tok, toy.noisy_pairs(4000, p_digit=0.4, seed=seed), steps=150, batch_size=32, lr=3e-3, seed=seed)
    path = root / f"warm{seed}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def two_steps(model: str, root: Path, seed: int) -> dict:
    from safetensors.torch import load_file

    run = root / f"two{seed}"
    train(load_config(None, tiny_overrides(model, run, **{**TWO_STEPS, "train.seed": seed})))
    rows = read_metrics(run)
    before = load_file(str(Path(model) / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    moved = sum(float((before[k] - after[k]).abs().max()) > 0 for k in before)
    return {"frac_zero_var_groups": [r["frac_zero_var_groups"] for r in rows], "acc": [r["acc"] for r in rows],
            "moved": moved, "of": len(before)}


def seeded(model: str, root: Path, seed: int, extra: dict | None = None) -> dict:
    run = root / f"seeded{seed}"
    train(load_config(None, tiny_overrides(model, run, **{**SEEDED_GRPO, "train.seed": seed, **(extra or {})})))
    ev = json.loads((run / "eval.json").read_text())
    rows = read_metrics(run)
    first = sum(r["acc"] for r in rows[:4]) / 4
    last = sum(r["acc"] for r in rows[-4:]) / 4
    return {"heldout_before": ev["before"]["acc"], "heldout_after": ev["after"]["acc"],
            "heldout_rise": ev["after"]["acc"] - ev["before"]["acc"], "train_first4": first, "train_last4": last,
            "train_rise": last - first, "zero_var_max": max(r["frac_zero_var_groups"] for r in rows)}


def recipes(model: str, root: Path, seed: int) -> dict:
    out = {}
    for recipe in RECIPES:
        run = root / f"recipe-{recipe.stem}{seed}"
        extra = {"train.steps": 1, "data.heldout_size": 0, "train.final_eval": False, "train.seed": seed}
        if "overlong_buffer" in recipe.read_text():
            extra["rewards.overlong_buffer"] = 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cfg = load_config(recipe, tiny_overrides(model, run, **extra))
        train(cfg)
        (row,) = read_metrics(run)
        out[recipe.stem] = {"loss": row["loss"], "grad_norm": row["grad_norm"], "zero_var": row["frac_zero_var_groups"]}
    return out


def grads(model: str, root: Path, seed: int) -> dict:
    out = {}
    for loss, agg in [("ppo_clip", "seq_mean_token_mean"), ("fipo", "token_mean")]:
        g = _grads_after_update(model, root / f"g{loss}{seed}", "a", loss, agg, **{"train.micro_batch_size": 12, "train.seed": seed})
        out[loss] = {"grad_norm": float(torch.cat([x.flatten() for x in g]).norm())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--only", nargs="*", default=["two_steps", "seeded", "recipes", "grads"])
    ap.add_argument("--warm-seed", type=int, default=None, help="one SFT warm-up seed for all (default: the run's seed)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="overrides for the seeded run (to explore)")
    args = ap.parse_args()
    cap = torch.backends.cpu.get_cpu_capability()
    import grpokit

    print(f"grpokit from {Path(grpokit.__file__).parent}, kernels {cap}", file=sys.stderr)
    extra = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in args.seeds:
            t0 = time.time()
            ws = seed if args.warm_seed is None else args.warm_seed
            model = str(root / f"warm{ws}") if (root / f"warm{ws}").exists() else warm(ws, root)
            for name, fn in [("two_steps", two_steps), ("seeded", seeded), ("recipes", recipes), ("grads", grads)]:
                if name in args.only:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = fn(model, root, seed, extra) if name == "seeded" else fn(model, root, seed)
                    tag = {"set": extra} if name == "seeded" and extra else {}
                    tag["warm_seed"] = ws
                    print(json.dumps({"test": name, "seed": seed, "cap": cap, **tag, **res}), flush=True)
            print(json.dumps({"test": "time", "seed": seed, "cap": cap, "s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
