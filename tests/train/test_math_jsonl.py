"""A JSONL dataset with LaTeX answers trains a step with the math-verify reward (issue: real datasets)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from grpokit.config import load_config
from grpokit.train.loop import build_scorer, train

FIXTURE = Path(__file__).parents[1] / "fixtures" / "latex_math.jsonl"


def test_jsonl_latex_answers_train_one_step_with_math_verify(warm_tiny: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = {
        "model.name": warm_tiny, "model.precision": "fp32", "data.task": str(FIXTURE),
        "data.heldout_size": 2, "rollout.prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
        "rewards.functions": ["math_verify"], "train.steps": 1, "train.run_dir": str(run), "train.progress": False,
        "train.report": False, "train.tensorboard": False, "train.lr": 1e-3,
    }
    options = {"column_map": {"prompt": "problem", "answer": "solution"}, "heldout_fraction": 0.2}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()], data={"task_options": options})
    train(cfg)
    (row,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    assert "reward/math_verify/mean" in row
    ev = json.loads((run / "eval.json").read_text())
    assert 0.0 <= ev["after"]["acc"] <= 1.0
    # the reward the run used reads the LaTeX answer column: equivalent forms score 1, others 0
    rewards = build_scorer(cfg)
    prompts = ["Simplify 2/4.", "What is 10 divided by 4?", "What is the square root of 8, simplified?", "Compute 9 - 12."]
    completions = ["It is 0.5", "\\boxed{2.5}", "The answer is $\\sqrt{8}$", "3"]
    answers = ["\\boxed{\\frac{1}{2}}", "$\\frac{5}{2}$", "$2\\sqrt{2}$", "$-3$"]
    result = rewards.score(prompts, completions, {"answer": answers, "completion_lengths": [4] * 4, "truncated": [False] * 4})
    assert result.total.tolist() == [1.0, 1.0, 1.0, 0.0]
