"""The Python API, for users coming from TRL: objects in, a trained run directory out.

    import grpokit
    from datasets import Dataset

    def exact(prompts, completions, answer, **_):          # a plain TRL-style reward function
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    run_dir = grpokit.train(
        "grpo",                                            # a recipe name/path, a Config, a dict, or None
        model="smollm2-135m",                              # a name/path, or a PreTrainedModel (+ tokenizer=)
        reward_funcs=[exact, "format"],                    # callables and/or registered names
        dataset=Dataset.from_list([{"prompt": "2+2?", "answer": "4"}, ...]),  # or list[dict], or a task spec
        overrides=["train.steps=50"],                      # the CLI's --set
    )

`docs/trl.md` maps TRL `GRPOConfig` fields to grpokit's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from grpokit.config import Config, ConfigError, load_config


def _config(config: Any, overrides: Sequence[str], sections: dict[str, Any]) -> Config:
    if isinstance(config, Config):
        if overrides or sections:
            raise ConfigError("pass overrides with a recipe path/name or a dict, not with a ready Config object")
        return config
    if isinstance(config, dict):
        return load_config(None, list(overrides), **{**config, **sections})
    if config is None:
        return load_config(None, list(overrides), **sections)
    from grpokit.cli import resolve_recipe

    return load_config(resolve_recipe(str(config)), list(overrides), **sections)


def dataset_task(dataset: Any, *, eval_dataset: Any = None, heldout_fraction: float | None = None,
                 column_map: dict[str, str] | None = None, seed: int = 0, name: str = "dataset") -> Any:
    """A training task from in-memory rows: a `datasets.Dataset` or a list of dicts with a `prompt` column
    (and `answer` and any columns the rewards read). Held-out rows come from `eval_dataset`, or a
    `heldout_fraction` split (default 0.1 when there is no eval_dataset)."""
    from grpokit.data.files import build_table_task

    def records(rows: Iterable[Any], what: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise TypeError(f"{what} row {i} is a {type(row).__name__}; every row must be a dict with a 'prompt' key")
            out.append((f"{what} row {i}", dict(row)))
        return out

    held = records(eval_dataset, "eval_dataset") if eval_dataset is not None else None
    return build_table_task(
        name, records(dataset, "dataset"), held, column_map=column_map, keep_unmapped=True,
        heldout_fraction=None if held is not None else heldout_fraction, split_seed=seed,
        max_prompt_chars=None, max_prompt_tokens=None, tokenizer=None, on_long_prompt="raise",
    )


def train(config: Any = None, *, model: Any = None, tokenizer: Any = None,
          reward_funcs: Sequence[Callable[..., Any] | str] | None = None, dataset: Any = None,
          eval_dataset: Any = None, resume: str | Path | None = None, overrides: Sequence[str] = (),
          **sections: Any) -> Path:
    """Train with GRPO-family RL; returns the run directory (checkpoints, metrics, `final/` in HF format).

    config: a recipe path or bundled name (`"grpo"`, `"dapo"`, ...), a `Config`, a dict of sections, or
        None (the defaults). `overrides` are `section.field=value` strings; `sections` are keyword sections
        (`train={"steps": 10}`).
    model: a model name/path (sets model.name) or a `PreTrainedModel` (give its `tokenizer` too).
    reward_funcs: reward callables `fn(prompts, completions, **columns) -> list[float | None]` and/or
        registered names; they replace rewards.functions (rewards.weights still applies, in order).
    dataset / eval_dataset: `datasets.Dataset` or list of dicts (`prompt`, `answer`, extra columns), or a task
        spec string (sets data.task).
    """
    if isinstance(model, (str, Path)):
        sections.setdefault("model", {})["name"] = str(model)
        model = None
    if isinstance(dataset, (str, Path)):
        sections.setdefault("data", {})["task"] = str(dataset)
        dataset = None
    if reward_funcs is not None and all(isinstance(f, str) for f in reward_funcs):
        sections.setdefault("rewards", {})["functions"] = list(reward_funcs)
        reward_funcs = None
    cfg = _config(config, overrides, sections)
    task = dataset_task(dataset, eval_dataset=eval_dataset, seed=cfg.train.seed) if dataset is not None else None
    from grpokit.train.loop import train as run

    return run(cfg, resume=resume, model=model, tokenizer=tokenizer, task=task, reward_funcs=reward_funcs)
