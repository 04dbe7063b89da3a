"""The Python API for TRL users: grpokit.train(config, model=<object>, reward_funcs=[callables],
dataset=<list of dicts or datasets.Dataset>)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import grpokit


def test_train_takes_objects(warm_tiny: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(warm_tiny)
    tok = AutoTokenizer.from_pretrained(warm_tiny)
    seen: list[int] = []

    def first_char_matches(prompts, completions, answer, **_):  # a TRL-style reward function
        seen.append(len(completions))
        return [float(c[:1] == a[:1]) for c, a in zip(completions, answer)]

    rows = [{"prompt": f"{a}{b}", "answer": f"{a}{b}"} for a in range(10) for b in range(10)]
    run = grpokit.train(
        None, model=model, tokenizer=tok, reward_funcs=[first_char_matches], dataset=rows,
        overrides=["model.precision='fp32'", "rollout.prompts_per_step=2", "rollout.group_size=4",
                   "rollout.max_new_tokens=4", "train.steps=2", "train.progress=false", "train.report=false",
                   "train.tensorboard=false", "train.final_eval=false", "data.heldout_size=0",
                   f"train.run_dir='{tmp_path / 'run'}'", "train.lr=1e-3"],
    )
    assert run == tmp_path / "run" and (run / "final" / "config.json").exists()
    assert seen == [8, 8], "the callable scored every rollout batch"
    rows_logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_logged] == [1, 2] and "reward/first_char_matches/mean" in rows_logged[0]


def test_train_takes_a_datasets_dataset_and_reward_names(warm_tiny: str, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": f"{a}{b}", "answer": f"{a}{b}"} for a in range(10) for b in range(10)])
    run = grpokit.train("grpo", model=warm_tiny, reward_funcs=["numeric_match"], dataset=ds, train={"steps": 1},
                        overrides=["model.precision='fp32'", "rollout.prompts_per_step=2", "rollout.group_size=2",
                                   "rollout.max_new_tokens=4", "train.progress=false", "train.report=false",
                                   "train.tensorboard=false", "train.final_eval=false", "data.heldout_size=0",
                                   f"train.run_dir='{tmp_path / 'run'}'"])
    assert (run / "final" / "model.safetensors").exists()


def test_a_row_that_is_not_a_dict_is_named() -> None:
    from grpokit.api import dataset_task

    with pytest.raises(TypeError, match="dataset row 1 is a str"):
        dataset_task([{"prompt": "a", "answer": "1"}, "b"])
