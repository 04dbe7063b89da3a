"""Checks of a run's inputs before anything is created: the model, the dataset file, the reward
functions. Each failure is a `UserError` whose message names the input and what to do; the CLI prints it
as one line (`grpokit: error: ...`) and exits with status 2, without a traceback."""
from __future__ import annotations

import os
import re
from typing import Any, Iterable


class UserError(Exception):
    """A mistake in what the user asked for (a path, a name, an import); the message says how to fix it."""


#: `owner/name`: what transformers would try as a hub id
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(name: str) -> None:
    from grpokit.models import BUILTIN_MODELS

    if name in BUILTIN_MODELS or os.path.isdir(name):
        return
    if os.path.exists(name):
        raise UserError(f"model.name = '{name}' is a file, not a model directory; give the folder holding config.json")
    if not HUB_ID.match(name):
        raise UserError(
            f"model directory '{name}' does not exist; give a folder holding config.json, a hub id (owner/name) "
            f"or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise UserError(
                f"model '{name}' is not a local directory, and as a hub id it is not in the Hugging Face cache "
                f"(HF_HUB_OFFLINE is set, so nothing is downloaded); give a local directory, download it first, "
                f"or use a built-in name ({', '.join(BUILTIN_MODELS)})"
            )


def check_dataset(task: str) -> None:
    from grpokit.data.task import FILE_SUFFIXES

    if task.lower().endswith(tuple(FILE_SUFFIXES)) and not os.path.exists(task):
        raise UserError(f"dataset file '{task}' does not exist (data.task; working directory {os.getcwd()})")


def check_rewards(specs: Iterable[Any]) -> None:
    from grpokit.rewards.base import load_reward

    for spec in specs:
        if not isinstance(spec, str):
            continue
        try:
            load_reward(spec)
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise UserError(str(e).splitlines()[0]) from None


def check_inputs(cfg: Any) -> None:
    """Every check above, for an RL config."""
    check_model(cfg.model.name)
    check_dataset(cfg.data.task)
    check_rewards(cfg.rewards.functions)
