"""`rg:<name>`: any reasoning-gym procedural dataset (e.g. rg:basic_arithmetic, rg:chain_sum).

Rows: `prompt` (the entry's question + `prompt_suffix`), `answer` (the entry's answer), and the three
columns the `reasoning_gym` reward needs to call the dataset's own `score_answer`:
`rg_task` (the dataset name), `rg_entry` (JSON of {question, answer, metadata}) and `rg_config`
(JSON of the config overrides). JSON strings keep rows Arrow/Parquet/checkpoint friendly whatever the
metadata holds (tuples come back as lists).

Splits: reasoning-gym item `i` of a dataset with seed `s` is generated from `Random(s + i)`. Training
draws `i` uniformly from [0, train_size) with seed `train_seed`; the held-out split is items
0..heldout_size-1 with seed `heldout_seed` (default `train_seed + train_size`), a disjoint seed range.
Training also rejects any item whose question text equals a held-out question. Sampling is stateless:
all randomness comes from the `rng` passed to `sample`.
"""
from __future__ import annotations

import functools
import json
import random
from typing import Any

from grpokit.data.task import TASKS, Row

#: Rejection-sampling budget per training row (only hit when the task's problem space is tiny).
MAX_TRIES_PER_ROW = 1000


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback for metadata values: sets -> sorted lists, numpy scalars/arrays -> Python."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


def _create(name: str, config: dict[str, Any], *, seed: int, size: int) -> Any:
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, **{**config, "seed": seed, "size": size})
    except ValueError as e:
        if "not registered" in str(e):
            from reasoning_gym.factory import DATASETS

            import difflib

            close = difflib.get_close_matches(name, DATASETS, n=3)
            hint = f" (did you mean {', '.join('rg:' + c for c in close)}?)" if close else ""
            raise ValueError(
                f"unknown reasoning-gym dataset 'rg:{name}'{hint}; "
                f"the installed reasoning-gym has {len(DATASETS)} datasets, e.g. rg:basic_arithmetic, rg:chain_sum"
            ) from None
        raise
    except TypeError as e:
        raise ValueError(f"rg:{name}: invalid config {config}: {e}; check the dataset's config fields") from e


class ReasoningGymTask:
    """A reasoning-gym dataset as a grpokit Task, scored by the dataset's own `score_answer`."""

    def __init__(
        self,
        dataset: str,
        *,
        config: dict[str, Any] | None = None,
        prompt_suffix: str = " Give only the final answer.",
        train_seed: int = 0,
        train_size: int = 100_000,
        heldout_size: int = 200,
        heldout_seed: int | None = None,
    ) -> None:
        if not dataset:
            raise ValueError("task 'rg' needs a dataset name: 'rg:<name>', e.g. 'rg:chain_sum'")
        self.name = f"rg:{dataset}"
        self.dataset = dataset
        self.config = dict(config or {})
        self.config_json = json.dumps(self.config, sort_keys=True, default=_jsonable)
        self.prompt_suffix = prompt_suffix
        self.train_seed = train_seed
        self.train_size = train_size
        self.heldout_size = heldout_size
        self.heldout_seed = train_seed + train_size if heldout_seed is None else heldout_seed
        # Fail now (unknown name, bad config) rather than at the first sample.
        self._heldout_ds = _create(dataset, self.config, seed=self.heldout_seed, size=heldout_size)
        self._train_ds: Any = None  # built on the first `sample`: some datasets precompute `size` items

    def _row(self, entry: dict[str, Any]) -> Row:
        record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})}
        return {
            "prompt": str(entry["question"]) + self.prompt_suffix,
            "answer": str(entry["answer"]),
            "rg_task": self.dataset,
            "rg_entry": json.dumps(record, default=_jsonable),
            "rg_config": self.config_json,
        }

    @functools.cached_property
    def _heldout_rows(self) -> list[Row]:
        return [self._row(self._heldout_ds[i]) for i in range(self.heldout_size)]

    @functools.cached_property
    def _heldout_questions(self) -> set[str]:
        return {row["prompt"] for row in self._heldout_rows}

    def sample(self, n: int, rng: random.Random) -> list[Row]:
        """`n` training rows (uniform item indices from `rng`; held-out questions rejected)."""
        if self._train_ds is None:
            self._train_ds = _create(self.dataset, self.config, seed=self.train_seed, size=self.train_size)
        rows = []
        for _ in range(n):
            for _ in range(MAX_TRIES_PER_ROW):
                row = self._row(self._train_ds[rng.randrange(self.train_size)])
                if row["prompt"] not in self._heldout_questions:
                    break
            else:
                raise RuntimeError(f"{self.name}: every drawn item was a held-out question; lower heldout_size")
            rows.append(row)
        return rows

    def heldout(self, n: int | None = None) -> list[Row]:
        """The first `n` of the `heldout_size` fixed held-out items (all when None)."""
        if n is not None and n > self.heldout_size:
            raise ValueError(
                f"{self.name} has {self.heldout_size} held-out items, {n} were asked for; "
                f"set the task option heldout_size = {n}"
            )
        return [dict(r) for r in self._heldout_rows[:n]]

    def state_dict(self) -> dict[str, Any]:
        """Stateless: all training randomness comes from the rng passed to `sample`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""


@TASKS.register("rg")
def rg(
    target: str,
    *,
    config: dict[str, Any] | None = None,
    prompt_suffix: str = " Give only the final answer.",
    train_seed: int = 0,
    train_size: int = 100_000,
    heldout_size: int = 200,
    heldout_seed: int | None = None,
) -> ReasoningGymTask:
    """A reasoning-gym dataset, `rg:<name>`, scored by its own `score_answer` (reward `reasoning_gym`)."""
    return ReasoningGymTask(
        target, config=config, prompt_suffix=prompt_suffix, train_seed=train_seed,
        train_size=train_size, heldout_size=heldout_size, heldout_seed=heldout_seed,
    )
