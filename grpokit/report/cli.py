"""`grpokit eval MODEL_OR_RUN_DIR --task arith --k 8`: held-out avg@k, cons@k, pass@k with intervals."""
from __future__ import annotations

import argparse
from pathlib import Path

from grpokit.report.evaluate import evaluate, format_table, write_json


def resolve_model(spec: str) -> str:
    """A run directory means its `final/` model; anything else is passed to `load_model`."""
    p = Path(spec)
    if (p / "final" / "config.json").exists():
        return str(p / "final")
    return spec


def eval_command(args: argparse.Namespace) -> int:
    import torch

    from grpokit.data import get_task
    from grpokit.models import load_model
    from grpokit.rewards import RewardSet

    model, tokenizer = load_model(resolve_model(args.model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    task = get_task(args.task)
    rows = task.heldout(args.n)
    rewards = RewardSet(args.reward or ["numeric_match"])
    temperature = args.temperature if args.temperature is not None else (0.0 if args.k == 1 else 1.0)
    result = evaluate(model, tokenizer, rows, reward_set=rewards, k=args.k, temperature=temperature,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, device=device)
    print(format_table(result))
    if args.json:
        write_json(result, Path(args.json))
    return 0
