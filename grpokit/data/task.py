"""The Task protocol, the TASKS registry, `get_task` and group expansion.

A row is a dict: `prompt` (str, the user message, no chat template), `answer` (str), plus extra columns
that reward functions receive by name (see `grpokit.rewards`).

Resume contract (the same for every built-in task): `Task.sample(n, rng)` draws only from the
`random.Random` it is given, plus the task's own position, which `state_dict()` returns. A trainer that
saves `rng.getstate()` and `task.state_dict()` and restores both (`rng.setstate`,
`task.load_state_dict`) gets exactly the rows it would have drawn without the interruption.
Procedural tasks (`arith`, `rg:*`) are stateless (`state_dict() == {}`); file datasets hold an
epoch permutation and a cursor.
"""
from __future__ import annotations

import inspect
import os
import random
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from grpokit.algo.registry import Registry

Row = dict[str, Any]

#: Factories `fn(target: str, **options) -> Task`. `get_task("name:target")` calls `TASKS["name"]`
#: with `target`; `get_task("name")` calls it with `target=""`.
TASKS = Registry("task")

#: File suffixes `get_task` loads directly, and the TASKS entry that loads them.
FILE_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}


@runtime_checkable
class Task(Protocol):
    """A source of prompts: a training stream and a fixed held-out split disjoint from it."""

    name: str

    def sample(self, n: int, rng: random.Random) -> list[Row]:
        """`n` training rows, drawn using `rng` (and the task's own cursor, see `state_dict`)."""
        ...

    def heldout(self, n: int | None = None) -> list[Row]:
        """The first `n` rows (all when None) of the fixed held-out split; the same on every call."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The task's own sampling position (JSON-serialisable); `{}` for stateless tasks."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position returned by `state_dict`."""
        ...


def _split_spec(spec: str) -> tuple[str, str]:
    """'rg:chain_sum' -> ('rg', 'chain_sum'); 'data/x.jsonl' -> ('jsonl', 'data/x.jsonl')."""
    lower = spec.lower()
    for suffix, kind in FILE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind, spec
    if ":" in spec:
        name, target = spec.split(":", 1)
        return name, target
    if spec in TASKS:
        return spec, ""
    ext = os.path.splitext(spec)[1]
    if ext or os.sep in spec or os.path.exists(spec):
        raise ValueError(
            f"task '{spec}' looks like a file, but only {', '.join(FILE_SUFFIXES)} files are read "
            f"directly; convert it, or load it with 'hf:<directory or dataset id>'"
        )
    return spec, ""


def get_task(spec: str, **options: Any) -> Task:
    """Build the task named by `spec`, passing it `options`.

    spec: `arith`, `rg:<reasoning-gym dataset name>`, a `.jsonl` or `.parquet` path, `hf:<dataset id or
    local directory>`, or any name registered in `TASKS` (`name` or `name:target`).
    options: the factory's keyword options (e.g. `column_map`, `heldout_fraction` for files,
    `ops`, `max_digits` for arith); an option the factory does not take raises with the valid ones.
    """
    name, target = _split_spec(spec)
    try:
        factory = TASKS.get(name)
    except ValueError as e:
        raise ValueError(f"{e}; or a path ending in {' / '.join(FILE_SUFFIXES)}") from None
    _check_options(f"task '{spec}'", factory, options)
    return factory(target, **options)


def _check_options(what: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{what} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )


def expand_groups(rows: list[Row], G: int) -> tuple[list[Row], torch.Tensor]:
    """Repeat each row G times contiguously: [r0]*G + [r1]*G + ...; group_ids [B = len(rows)*G] i64.

    Each repeat is a shallow copy, so a caller may annotate one sample's dict without touching the
    others. group_ids[i] = i // G, matching the layout `grpokit.algo.advantages` expects.
    """
    if not isinstance(G, int) or G < 1:
        raise ValueError(f"group size G must be a positive int, got {G!r}")
    expanded = [dict(row) for row in rows for _ in range(G)]
    group_ids = torch.arange(len(rows), dtype=torch.long).repeat_interleave(G)  # [B]
    return expanded, group_ids
