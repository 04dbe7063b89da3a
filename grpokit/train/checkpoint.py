"""Checkpoints that survive a kill at any instant, and resume exactly.

A checkpoint is a directory `checkpoints/step_NNNNNN/` with
- `model.safetensors`: the policy weights (full, gathered on rank 0 under FSDP2),
- `optimizer.safetensors` + `optimizer.json`: AdamW state tensors and the rest of its state dict,
- `rng.safetensors`: torch CPU (and CUDA) RNG states and the sampling generator,
- `state.json`: step, python/numpy RNG states, data position, scheduler state, run bookkeeping.
It is written to a temporary directory, every file fsynced, then renamed into place, so a kill during a
save leaves the previous checkpoint intact. Nothing is unpickled: tensors are safetensors, the rest JSON.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        if v.numel() and v.data_ptr() in seen:  # tied weights: safetensors stores each tensor once
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    save_file(out, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                key = f"{pid}.{k}"
                tensors[key] = v
                entry[k] = {"tensor": key}
            else:
                entry[k] = v
        state_json[str(pid)] = entry
    return tensors, {"state": state_json, "param_groups": sd["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entry in skeleton["state"].items():
        key = int(pid) if pid.lstrip("-").isdigit() else pid
        state[key] = {k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in entry.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def rng_state(generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["sampler"] = generator.get_state()
    np_state = np.random.get_state()
    extra = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, extra


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    if generator is not None and "sampler" in tensors:
        generator.set_state(tensors["sampler"])
    random.setstate(_tuple(extra["python"]))
    n = extra["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return {"__tuple__": [_jsonable(v) for v in x]}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def _tuple(x: Any) -> Any:
    if isinstance(x, dict) and "__tuple__" in x:
        return tuple(_tuple(v) for v in x["__tuple__"])
    if isinstance(x, list):
        return [_tuple(v) for v in x]
    return x


def save_checkpoint(
    run_dir: Path, step: int, *, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
    generator: torch.Generator | None, state: dict[str, Any], keep_last: int,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep_last`. Returns its directory.
    `extra_tensors`: more files, `<name>.safetensors` each (asynchronous rollouts: the engine's weights)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(tmp / "model.safetensors", model_state)
    opt_tensors, opt_json = flatten_optimizer_state(optim_state)
    _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    _write_json(tmp / "optimizer.json", opt_json)
    rng_tensors, rng_extra = rng_state(generator)
    _save_tensors(tmp / "rng.safetensors", rng_tensors)
    for name, tensors in (extra_tensors or {}).items():
        _save_tensors(tmp / f"{name}.safetensors", tensors)
    _write_json(tmp / "state.json", {**state, "step": step, "rng": rng_extra})
    _fsync_dir(tmp)
    if final.exists():
        trash = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: (model state, optimizer state, run state); restores the RNG states."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"'{path}' is not a complete grpokit checkpoint (no state.json)")
    model_state = load_file(str(path / "model.safetensors"))
    optim_state = unflatten_optimizer_state(
        load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
    )
    state = json.loads((path / "state.json").read_text())
    set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"), generator)
    return model_state, optim_state, state
