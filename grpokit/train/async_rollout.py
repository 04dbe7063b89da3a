"""Asynchronous rollouts (`rollout.async_rollouts`, SPEC 12): the batch of step k+1 is generated in a
background thread while step k's update runs, so each batch is one update old (staleness 1).

The engine samples its own copy of the policy (`setup` builds it with `shares_weights=False`). One step:

    col = wait for the pending batch of step k (generated with the weights after step k-2)
    copy the current weights (after step k-1) into the idle engine; launch step k+1's collect
    ℓ°, advantages, update on col (ℓ° is the trainer's at the current weights; the rollout correction,
    on by default in this mode, weighs μ -> ℓ° and so covers the lag)

The first batch of a run has nobody to overlap with: it is launched and awaited at once (staleness 0).

Resume is exact by deterministic regeneration, not by saving the in-flight batch: a checkpoint after step k
holds the engine's weights (those after step k-1, `sampler.safetensors`) and the prompt generator's state
from before the pending draw (`state.json: async_data_rng`). Row seeds depend only on (seed, step, round,
row), so relaunching step k+1's collect from those gives the very batch the uninterrupted run trained on.
A run that finished its last step resumes the same way, so extending it matches a longer run too.

One process only: collect's collectives cannot run beside the update's under torchrun.
"""
from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from grpokit import dist
from grpokit.config import ConfigError

SAMPLER_FILE = "sampler.safetensors"


class AsyncRollouts:
    """The one pending collect of the next step; see the module docstring."""

    def __init__(self, ctx: Any) -> None:
        if dist.is_distributed():
            raise ConfigError("rollout.async_rollouts runs in one process: its background collect cannot share "
                              "collectives with the update under torchrun; set rollout.async_rollouts = false")
        if getattr(ctx.engine, "model", None) is None or getattr(ctx.engine, "shares_weights", True):
            raise ConfigError("rollout.async_rollouts needs an engine that samples its own copy of the policy "
                              "(rollout.engine = 'hf', built with shares_weights = False by setup)")
        self.ctx = ctx
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpokit-rollout")
        self.pending: Future | None = None
        self.pending_step = 0
        self.rng_before: Any = ctx.data_rng.getstate()  # the prompt generator before the pending draw

    def start(self, checkpoint: str | Path | None) -> None:
        """Before the first step of this process: on resume, put back the engine's weights and the prompt
        generator of the checkpoint's pending batch; then launch the next step's collect."""
        if checkpoint is not None:
            from safetensors.torch import load_file

            from grpokit.train.checkpoint import _tuple

            path = Path(checkpoint)
            state = json.loads((path / "state.json").read_text())
            if "async_data_rng" not in state or not (path / SAMPLER_FILE).exists():
                raise ConfigError(f"checkpoint {path} was written without rollout.async_rollouts; resume it with "
                                  "rollout.async_rollouts = false")
            self.ctx.engine.load_weights(load_file(str(path / SAMPLER_FILE)).items())
            self.ctx.data_rng.setstate(_tuple(state["async_data_rng"]))
        self.launch()

    def launch(self) -> None:
        """Collect the batch of step (current step + 1) in the background, if the run has that step."""
        from grpokit.train.collect import collect

        self.rng_before = self.ctx.data_rng.getstate()
        step = self.ctx.state["step"] + 1
        if step > self.ctx.cfg.train.steps:
            self.pending = None
            return
        view = dataclasses.replace(self.ctx, state={**self.ctx.state, "step": step})  # seeds of step `step`
        self.pending, self.pending_step = self.pool.submit(collect, view), step

    def next_batch(self) -> tuple[Any, dict[str, float]]:
        """The current step's batch; then the current weights go into the idle engine and the next step's
        collect starts. Returns the batch and its `async/*` metrics and `time/weight_sync`."""
        from grpokit.train.context import sync_weights

        step = self.ctx.state["step"]
        if self.pending is None or self.pending_step != step:
            raise RuntimeError(f"async rollouts: no pending batch for step {step} (pending: {self.pending_step})")
        t0 = time.perf_counter()
        col = self.pending.result()
        waited = time.perf_counter() - t0
        self.pending = None
        sync_s = sync_weights(self.ctx)
        self.launch()
        gen = col.info.get("time/rollout", 0.0) + col.info.get("time/reward", 0.0)
        return col, {"async/wait": waited, "async/overlap": min(max(1.0 - waited / gen, 0.0), 1.0) if gen > 0 else 0.0,
                     "time/weight_sync": sync_s}

    def checkpoint_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What a checkpoint adds or replaces: the prompt generator before the pending draw (JSON) and the engine's
        weights (the pending batch's). The engine only reads its weights while generating, so this may run
        while the pending collect does."""
        from grpokit.train.checkpoint import _jsonable

        state = self.ctx.engine.model.state_dict()
        rng = _jsonable(self.rng_before)  # also as data_rng: the live generator may be mid-draw in the worker
        return {"async_data_rng": rng, "data_rng": rng}, {k: v.detach() for k, v in state.items()}

    def close(self) -> None:
        """Wait for a pending collect (its result is dropped) and stop the worker."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = None
