"""Tasks and datasets -> prompt rows; group expansion -> group ids.

    task = get_task("arith")                       # or "rg:chain_sum", "data/train.jsonl", "hf:DIR"
    rows = task.sample(8, rng)                     # rng: random.Random, saved with the checkpoint
    rows, group_ids = expand_groups(rows, G=4)     # [B = 32] rows, group_ids [B] i64
    eval_rows = task.heldout(200)                  # fixed, disjoint from training

Resume: save `rng.getstate()` and `task.state_dict()`; restore both (see `grpokit.data.task`).
"""
from grpokit.data.task import FILE_SUFFIXES, TASKS, Row, Task, expand_groups, get_task
from grpokit.data import arith as _arith  # noqa: F401  (registers "arith")
from grpokit.data import files as _files  # noqa: F401  (registers "jsonl", "parquet", "hf")
from grpokit.data import gym as _gym  # noqa: F401  (registers "rg")
from grpokit.data import traces as _traces  # noqa: F401  (registers "add_trace")
from grpokit.data.arith import ArithTask
from grpokit.data.files import TableTask
from grpokit.data.gym import ReasoningGymTask

__all__ = [
    "TASKS", "Task", "Row", "get_task", "expand_groups", "FILE_SUFFIXES",
    "ArithTask", "ReasoningGymTask", "TableTask",
]
