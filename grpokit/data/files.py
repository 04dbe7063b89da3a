"""Datasets from files: `.jsonl`, `.parquet`, and `hf:<dataset id or local directory>`.

Column mapping: `column_map = {"prompt": "question", "answer": "solution", "level": "difficulty"}` maps
grpokit row keys (left) to source columns (right); `prompt` and `answer` default to columns of the same
name. Source columns the map does not mention are kept under their own names (set
`keep_unmapped=False` to drop them); they reach reward functions as keyword arguments.

Held-out split: `heldout_path` (a separate file, or for hf: `heldout_split`, e.g. "test"), or else a
seeded `heldout_fraction` of the rows (default 0.1, at least one row). Training rows whose prompt text
equals a held-out prompt are dropped, so the splits are disjoint even when the data has duplicates.

Long prompts: with `max_prompt_chars` and/or `max_prompt_tokens` (needs `tokenizer`; counts the prompt
text without the chat template), an over-long row is skipped and counted in `task.stats` with
`on_long_prompt="skip"` (default), or raises with `"raise"`.

Sampling: epochs without replacement. Each epoch is a permutation of the training rows drawn from the
`rng` passed to `sample`; `state_dict()` holds the permutation and the cursor, so rng state + task
state resume exactly.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Iterable, Literal

from grpokit.data.task import TASKS, Row

#: Column names a row may not use: reward functions receive these as arguments of their own.
RESERVED_COLUMNS = ("prompts", "completions", "completion_lengths", "truncated")
#: Characters of a prompt shown in error messages.
PREVIEW_CHARS = 60


def _preview(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 3] + "..."


def read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) for each non-blank line; a malformed line raises naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}): {_preview(line)!r}; "
                    f"fix or delete that line (each line must be one JSON object)"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}; "
                    f"write each row as {{\"prompt\": ..., \"answer\": ...}}"
                )
            records.append((f"{path}:{lineno}", record))
    return records


def read_parquet(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) for each row of a Parquet file."""
    import pyarrow.parquet as pq

    return [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]


def read_hf(source: str, *, split: str, config_name: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a Hugging Face dataset: a `save_to_disk` directory, a directory of data files, or a hub id."""
    import datasets

    where = f"hf:{source} split '{split}'"
    try:
        if os.path.isdir(source) and (
            os.path.exists(os.path.join(source, "dataset_dict.json"))
            or os.path.exists(os.path.join(source, "state.json"))
        ):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{where}: no such split; the directory has {', '.join(ds)}; set the task option split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, config_name, split=split)
    except (ValueError, FileNotFoundError) as e:
        if str(e).startswith(where):
            raise
        raise _hf_error(source, split, e) from e
    except Exception as e:  # network / hub errors come in many types
        raise _hf_error(source, split, e) from e
    return [(f"{where} row {i}", r) for i, r in enumerate(ds.to_list())]


def _hf_error(source: str, split: str, e: BaseException) -> RuntimeError:
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1), so nothing can be downloaded" if offline \
        else "it is not in the local cache and could not be downloaded"
    return RuntimeError(
        f"could not load Hugging Face dataset '{source}' (split '{split}'): {type(e).__name__}: {' '.join(str(e).split())[:300]}. "
        f"Likely {why}. On a machine with network access run "
        f"`datasets.load_dataset('{source}').save_to_disk('DIR')` and use task 'hf:DIR', "
        f"or export the rows to a .jsonl/.parquet file and pass its path"
    )


class _RowBuilder:
    """Applies the column map, type checks and the prompt-length limit to raw records."""

    def __init__(
        self,
        *,
        source: str,
        column_map: dict[str, str] | None,
        keep_unmapped: bool,
        max_prompt_chars: int | None,
        max_prompt_tokens: int | None,
        tokenizer: Any,
        on_long_prompt: str,
    ) -> None:
        if on_long_prompt not in ("skip", "raise"):
            raise ValueError(f"on_long_prompt must be 'skip' or 'raise', got {on_long_prompt!r}")
        if max_prompt_tokens is not None and tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer: pass tokenizer=..., or use max_prompt_chars")
        self.source = source
        self.map = {"prompt": "prompt", "answer": "answer", **(column_map or {})}
        bad = [k for k in self.map if k in RESERVED_COLUMNS]
        if bad:
            raise ValueError(f"column_map keys {bad} are reserved for reward arguments; pick other names")
        self.keep_unmapped = keep_unmapped
        self.max_chars = max_prompt_chars
        self.max_tokens = max_prompt_tokens
        self.tokenizer = tokenizer
        self.on_long = on_long_prompt
        self.skipped_long = 0

    def _missing(self, key: str, record: dict[str, Any], where: str) -> ValueError:
        col = self.map[key]
        import difflib

        close = difflib.get_close_matches(col, list(record), n=1)
        guess = close[0] if close else "<column>"
        return ValueError(
            f"{where}: column '{col}' (for the row's '{key}') not found; available columns: "
            f"{', '.join(map(str, record)) or '(none)'}; set the task option column_map = "
            f"{{\"{key}\": \"{guess}\"}} to name the right column"
        )

    def _too_long(self, prompt: str) -> str | None:
        if self.max_chars is not None and len(prompt) > self.max_chars:
            return f"{len(prompt)} characters, over max_prompt_chars = {self.max_chars}"
        if self.max_tokens is not None:
            n = len(self.tokenizer.encode(prompt, add_special_tokens=False))
            if n > self.max_tokens:
                return f"{n} tokens, over max_prompt_tokens = {self.max_tokens}"
        return None

    def build(self, records: Iterable[tuple[str, dict[str, Any]]]) -> list[Row]:
        rows = []
        for where, record in records:
            row: Row = {}
            for key, col in self.map.items():
                if col not in record:
                    raise self._missing(key, record, where)
                row[key] = record[col]
            if self.keep_unmapped:
                used = set(self.map.values())
                for col, value in record.items():
                    if col in used or col in row:
                        continue
                    if col in RESERVED_COLUMNS:
                        raise ValueError(
                            f"{where}: column '{col}' is reserved for reward arguments; rename it, "
                            f"or set keep_unmapped = false"
                        )
                    row[col] = value
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError(
                    f"{where}: prompt (column '{self.map['prompt']}') must be a non-empty string, got "
                    f"{type(row['prompt']).__name__} {_preview(repr(row['prompt']))}; chat-message lists "
                    f"are not supported, map a plain-text column"
                )
            answer = row["answer"]
            if answer is None or isinstance(answer, (list, dict)):
                raise ValueError(
                    f"{where}: answer (column '{self.map['answer']}') must be a string or number, got "
                    f"{_preview(repr(answer))}"
                )
            row["answer"] = str(answer)
            why = self._too_long(row["prompt"])
            if why is not None:
                if self.on_long == "raise":
                    raise ValueError(
                        f"{where}: prompt is {why} ({_preview(row['prompt'])!r}); set on_long_prompt = "
                        f"\"skip\" to drop such rows, or raise the limit"
                    )
                self.skipped_long += 1
                continue
            rows.append(row)
        return rows


class TableTask:
    """Rows from a file or dataset: epochs of seeded permutations over the training rows."""

    def __init__(self, *, name: str, train: list[Row], heldout: list[Row], stats: dict[str, int]) -> None:
        if not train:
            raise ValueError(f"{name}: no training rows left (stats: {stats}); check the file, the split and the limits")
        self.name = name
        self._train = train
        self._heldout = heldout
        self.stats = stats  # rows, train, heldout, skipped_long_prompt, dropped_heldout_overlap
        self._order: list[int] = []
        self._pos = 0
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._train)

    def sample(self, n: int, rng: random.Random) -> list[Row]:
        """The next `n` training rows; a new epoch starts with a fresh `rng.shuffle` of all rows."""
        rows = []
        while len(rows) < n:
            if self._pos >= len(self._order):
                self._order = list(range(len(self._train)))
                rng.shuffle(self._order)
                self._pos = 0
                self._epoch += 1
            take = self._order[self._pos : self._pos + n - len(rows)]
            rows.extend(dict(self._train[i]) for i in take)
            self._pos += len(take)
        return rows

    def heldout(self, n: int | None = None) -> list[Row]:
        """The first `n` held-out rows (all when None, or when `n` exceeds the split's size)."""
        if not self._heldout:
            raise ValueError(f"{self.name} has no held-out rows; set heldout_fraction > 0 or heldout_path")
        return [dict(r) for r in self._heldout[:n]]

    def state_dict(self) -> dict[str, Any]:
        """Epoch number, the current permutation and the cursor in it (JSON-serialisable)."""
        return {"epoch": self._epoch, "pos": self._pos, "order": list(self._order), "num_rows": len(self._train)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; refuses one taken on a dataset with another number of rows."""
        if state.get("num_rows") != len(self._train):
            raise ValueError(
                f"{self.name}: the checkpoint's data state is for {state.get('num_rows')} training rows, this "
                f"dataset has {len(self._train)}; the data or its split/limit options changed since the checkpoint"
            )
        self._epoch, self._pos, self._order = int(state["epoch"]), int(state["pos"]), list(state["order"])


def build_table_task(
    name: str,
    records: list[tuple[str, dict[str, Any]]],
    heldout_records: list[tuple[str, dict[str, Any]]] | None,
    *,
    column_map: dict[str, str] | None,
    keep_unmapped: bool,
    heldout_fraction: float | None,
    split_seed: int,
    max_prompt_chars: int | None,
    max_prompt_tokens: int | None,
    tokenizer: Any,
    on_long_prompt: str,
) -> TableTask:
    """Map columns, apply limits, split off the held-out rows, drop overlaps; see the module docstring."""
    builder = _RowBuilder(
        source=name, column_map=column_map, keep_unmapped=keep_unmapped, max_prompt_chars=max_prompt_chars,
        max_prompt_tokens=max_prompt_tokens, tokenizer=tokenizer, on_long_prompt=on_long_prompt,
    )
    rows = builder.build(records)
    if heldout_records is not None:
        if heldout_fraction is not None:
            raise ValueError(f"{name}: set either heldout_fraction or a separate held-out file/split, not both")
        heldout = builder.build(heldout_records)
        train = rows
    else:
        fraction = 0.1 if heldout_fraction is None else heldout_fraction
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
        order = list(range(len(rows)))
        random.Random(split_seed).shuffle(order)
        k = 0 if fraction == 0 or len(rows) < 2 else max(1, round(fraction * len(rows)))
        heldout = [rows[i] for i in sorted(order[:k])]
        train = [rows[i] for i in sorted(order[k:])]
    heldout_prompts = {r["prompt"] for r in heldout}
    kept = [r for r in train if r["prompt"] not in heldout_prompts]
    stats = {
        "rows": len(records) + len(heldout_records or ()),  # records read, before any filtering
        "train": len(kept),
        "heldout": len(heldout),
        "skipped_long_prompt": builder.skipped_long,
        "dropped_heldout_overlap": len(train) - len(kept),
    }
    return TableTask(name=name, train=kept, heldout=heldout, stats=stats)


_LongPrompt = Literal["skip", "raise"]


def _file_task(reader: Any, kind: str):
    def factory(
        target: str,
        *,
        column_map: dict[str, str] | None = None,
        keep_unmapped: bool = True,
        heldout_path: str | None = None,
        heldout_fraction: float | None = None,
        split_seed: int = 0,
        max_prompt_chars: int | None = None,
        max_prompt_tokens: int | None = None,
        tokenizer: Any = None,
        on_long_prompt: _LongPrompt = "skip",
    ) -> TableTask:
        if not os.path.exists(target):
            raise FileNotFoundError(f"{kind} dataset file not found: {target} (working directory {os.getcwd()})")
        if heldout_path is not None and not os.path.exists(heldout_path):
            raise FileNotFoundError(f"heldout_path not found: {heldout_path}")
        return build_table_task(
            target, reader(target), reader(heldout_path) if heldout_path else None,
            column_map=column_map, keep_unmapped=keep_unmapped, heldout_fraction=heldout_fraction,
            split_seed=split_seed, max_prompt_chars=max_prompt_chars, max_prompt_tokens=max_prompt_tokens,
            tokenizer=tokenizer, on_long_prompt=on_long_prompt,
        )

    factory.__name__ = f"{kind}_task"
    factory.__doc__ = f"Rows of a {kind} file with a column map and a held-out split (see grpokit.data.files)."
    return factory


TASKS.register("jsonl")(_file_task(read_jsonl, "jsonl"))
TASKS.register("parquet")(_file_task(read_parquet, "parquet"))


@TASKS.register("hf")
def hf(
    target: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    heldout_split: str | None = None,
    column_map: dict[str, str] | None = None,
    keep_unmapped: bool = True,
    heldout_fraction: float | None = None,
    split_seed: int = 0,
    max_prompt_chars: int | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer: Any = None,
    on_long_prompt: _LongPrompt = "skip",
) -> TableTask:
    """A Hugging Face dataset: hub id (needs the local cache when offline) or a local directory."""
    if not target:
        raise ValueError("task 'hf' needs a dataset: 'hf:<dataset id or local directory>'")
    records = read_hf(target, split=split, config_name=config_name)
    held = read_hf(target, split=heldout_split, config_name=config_name) if heldout_split else None
    return build_table_task(
        f"hf:{target}", records, held,
        column_map=column_map, keep_unmapped=keep_unmapped, heldout_fraction=heldout_fraction,
        split_seed=split_seed, max_prompt_chars=max_prompt_chars, max_prompt_tokens=max_prompt_tokens,
        tokenizer=tokenizer, on_long_prompt=on_long_prompt,
    )
