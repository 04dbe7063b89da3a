"""Data parallelism: the only package that imports torch.distributed.

Under `torchrun`, `init()` creates the process group; `wrap()` applies DDP or FSDP2 (`fully_shard`).
Everything else asks this module for the rank, the world size and global sums, so a single process is
just the world of size 1.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


_COMM_DEVICE = "cpu"  # where collective tensors live: cuda for nccl, cpu for gloo


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str = "", device: str = "cpu") -> None:
    """Create the process group when launched by torchrun (no-op otherwise)."""
    if is_distributed() or not launched_by_torchrun():
        return
    global _COMM_DEVICE
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    _COMM_DEVICE = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> torch.Tensor:
    """Sum a vector of numbers over ranks (float64, so token counts stay exact). Returns a CPU tensor."""
    t = torch.tensor(values, dtype=torch.float64, device=_COMM_DEVICE)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_reduce_max(value: int) -> int:
    """The largest of one integer over ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=_COMM_DEVICE)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap(model: torch.nn.Module, strategy: str, device: str = "cpu") -> torch.nn.Module:
    """Wrap the policy for data parallelism: 'none', 'ddp' or 'fsdp2'.

    Both DDP and FSDP2 average gradients over ranks; the trainer multiplies its loss by the world size so
    that the global-count aggregation gives the single-process gradient (SPEC section 3).
    """
    if strategy == "none" or not is_distributed():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.cuda.current_device()] if device == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the mesh names the training device: fully_shard's default mesh is the accelerator whenever one is
        # visible, which would move a CPU (gloo) run's shards to the GPU
        mesh = init_device_mesh("cuda" if device == "cuda" else "cpu", (world_size(),))
        layers = getattr(getattr(model, "model", model), "layers", None)
        for layer in layers or []:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown dist.strategy '{strategy}'; valid: none, ddp, fsdp2")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def grad_sync(model: torch.nn.Module, enabled: bool) -> Any:
    """A context in which backward passes do (enabled) or do not (disabled) reduce gradients over ranks:
    gradient accumulation reduces once, on the last micro-batch (DDP `no_sync`, FSDP2
    `set_requires_gradient_sync`). A no-op for a plain module."""
    import contextlib

    if enabled or not is_distributed():
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused() -> Any:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()


def gather_rows(*columns: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every rank's rows of `columns` (1-D tensors of this rank's B rows), concatenated in rank order, and the
    offset of this rank's first row in them: a batch-wide computation on the result, sliced back with
    `[start : start + B]`, sees the whole global batch. A collective: every rank must call it."""
    parts = all_gather_objects(tuple(c.tolist() for c in columns))
    out = [torch.tensor([x for p in parts for x in p[i]], dtype=c.dtype) for i, c in enumerate(columns)]
    start = sum(len(p[0]) for p in parts[: rank()])
    return out, start


def all_reduce_min_max(values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per name (min, max) over ranks; names missing on some rank are taken from the ranks that have them."""
    parts = all_gather_objects(values)
    out: dict[str, tuple[float, float]] = {}
    for part in parts:
        for k, (lo, hi) in part.items():
            a, b = out.get(k, (lo, hi))
            out[k] = (min(a, lo), max(b, hi))
    return out


def lockstep(n_local: int) -> int:
    """The number of forward passes every rank must run when this rank has `n_local` (the most over ranks):
    under FSDP2 (and DDP's buffer broadcast) each forward is a collective, so a rank with fewer micro-batches
    runs padding forwards at weight 0 instead of leaving the others waiting."""
    return all_reduce_max(n_local)


def all_reduce_max_float(value: float) -> float:
    """The largest of one number over ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=_COMM_DEVICE)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def full_model_state(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `model` on CPU; a collective when `sharded` (FSDP2): every rank calls it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def full_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The full optimizer state (keyed by parameter names under FSDP2); a collective when `sharded`."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any], sharded: bool) -> None:
    """Load what `full_model_state` / `full_optim_state` returned (on any world size)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
    else:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
