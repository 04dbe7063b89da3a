"""Asynchronous rollouts (`rollout.async_rollouts`, `rollout.max_staleness`, SPEC 12): up to s = max_staleness
batches are generated ahead, in one background worker thread, while the updates run.

Schedule (deterministic). Write w_j for the weights after update j (w_0: the initial policy). The batch of step
t is sampled with w_max(t-1-s, 0), so it trains on a policy lagging the trained one by min(s, t-1) updates
(`async/staleness`). The engine samples its own copy of the policy (`setup` builds it with
`shares_weights=False`). Before the first step the batches of steps 1..s are launched (all from w_0); then one step:

    col = wait for the batch of step k (the worker generated it from w_max(k-1-s, 0))
    take w_{k-1} (the current weights) for step k+s's batch; launch step k+s's collect
    ℓ°, advantages, update on col (ℓ° is the trainer's at the current weights; the rollout correction,
    on by default in this mode, weighs μ -> ℓ° and so covers the lag)

so while step k's update runs, the batches of steps k+1..k+s are in flight (at most s), generated in step order
by the one worker. With s = 1 the worker is idle when a batch is launched, and w_{k-1} goes straight into the
engine (as in the synchronous loop). With s > 1 the worker may still be generating an earlier batch, so the
weights are snapshotted at launch, detached copies on the CPU, and the worker loads a batch's snapshot into the
engine right before its collect. At most s snapshots are held (batches launched at the start share w_0's), i.e.
s copies of the weights in CPU memory. The vLLM engines (`vllm`, `vllm_server`) take the snapshot path at s = 1
too: their weights live in vLLM, so a checkpoint could not read them back from the engine; their weight sync
(an in-place reload, or a file write and a reload request to the server) then runs in the worker, beside the
update.

Resume is exact by deterministic regeneration, not by saving the in-flight batches: a checkpoint after step k
holds, for the batches of steps k+1..k+s, the weights each is sampled with (one file per distinct version:
`sampler.safetensors` for step k+1's, as with s = 1, `sampler_w<j>.safetensors` for w_j of the later ones;
`state.json: async_pending` maps steps to files) and the prompt generator's state from before step k+1's draw
(`state.json: async_data_rng`; draws happen in step order in the one worker, so this one state regenerates all
of them). Row seeds depend only on (seed, step, round, row), so relaunching those collects gives the very
batches the uninterrupted run trained on. A run that finished its last step resumes the same way, so extending
it matches a longer run too. A checkpoint written with another max_staleness cannot resume this schedule
(ConfigError); checkpoints of s = 1 without `async_pending` are read as before.

One process only: collect's collectives cannot run beside the update's under torchrun.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from grpokit import dist
from grpokit.config import ConfigError

SAMPLER_FILE = "sampler.safetensors"

Weights = dict[str, torch.Tensor]


@dataclasses.dataclass
class _Slot:
    """One scheduled batch: its step, the update its weights follow, and those weights (None: already in the
    engine, s = 1) and, once launched, its collect."""

    step: int
    version: int
    weights: Weights | None
    future: Future | None = None


class AsyncRollouts:
    """The pending collects of the next s steps; see the module docstring."""

    def __init__(self, ctx: Any) -> None:
        if dist.world_size() > 1:  # (an in-process vLLM creates a process group of its own, of one rank)
            raise ConfigError("rollout.async_rollouts runs in one process: its background collect cannot share "
                              "collectives with the update under torchrun; set rollout.async_rollouts = false")
        if getattr(ctx.engine, "shares_weights", True):
            raise ConfigError("rollout.async_rollouts needs an engine that samples its own copy of the policy "
                              "(setup builds the hf engine with shares_weights = False; the vLLM engines always are)")
        self.ctx = ctx
        self.s = int(getattr(ctx.cfg.rollout, "max_staleness", 1))
        # CPU snapshots taken at launch and loaded by the worker: with s > 1 (the worker may be busy), and for an
        # engine that cannot hand its weights back for a checkpoint (the vLLM engines hold them in vLLM)
        self.snapshots = self.s > 1 or getattr(ctx.engine, "model", None) is None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpokit-rollout")
        self.slots: list[_Slot] = []  # steps k+1..k+s after step k, in order
        self.rng_at: dict[int, Any] = {}  # step -> the prompt generator before that step's draw
        self.lock = threading.Lock()  # rng_at is written by the worker, read and pruned by the loop

    # ------------------------------------------------------------------ weights

    def _snapshot(self) -> Weights:
        """The current weights, detached copies on the CPU (the update will change the trained ones)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.ctx.base.state_dict().items()}

    def _schedule(self, step: int, version: int, weights: Weights | None) -> None:
        slot = _Slot(step, version, weights)
        self.slots.append(slot)
        if step <= self.ctx.cfg.train.steps:
            slot.future = self.pool.submit(self._collect, slot)

    def _collect(self, slot: _Slot) -> Any:
        """In the worker, in step order: the slot's weights into the engine, its collect, then the prompt
        generator's state, which is the next step's before its draw."""
        from grpokit.train.collect import collect

        if slot.weights is not None:
            self.ctx.engine.load_weights(slot.weights.items())
        view = dataclasses.replace(self.ctx, state={**self.ctx.state, "step": slot.step})  # seeds of that step
        col = collect(view)
        with self.lock:
            self.rng_at[slot.step + 1] = self.ctx.data_rng.getstate()
        return col

    # ------------------------------------------------------------------ the loop's calls

    def start(self, checkpoint: str | Path | None) -> None:
        """Before the first step of this process: schedule the batches of steps k+1..k+s (k = the current step),
        from the initial weights on a fresh run, from the checkpoint's weights and prompt generator on resume."""
        k = self.ctx.state["step"]
        if checkpoint is None:
            self.rng_at[k + 1] = self.ctx.data_rng.getstate()
            if not self.snapshots:
                self._schedule(k + 1, k, None)  # the engine holds the initial weights
                return
            w0 = self._snapshot()
            for j in range(k + 1, k + self.s + 1):
                self._schedule(j, max(j - 1 - self.s, 0), w0)
            return
        from safetensors.torch import load_file

        from grpokit.train.checkpoint import _tuple

        path = Path(checkpoint)
        state = json.loads((path / "state.json").read_text())
        if "async_data_rng" not in state or not (path / SAMPLER_FILE).exists():
            raise ConfigError(f"checkpoint {path} was written without rollout.async_rollouts; resume it with "
                              "rollout.async_rollouts = false")
        saved_s = int(state.get("async_max_staleness", 1))
        if saved_s != self.s:
            raise ConfigError(f"checkpoint {path} was written with rollout.max_staleness = {saved_s}; its in-flight "
                              f"batches follow that schedule, so resume it with rollout.max_staleness = {saved_s}")
        pending = state.get("async_pending") or [{"step": k + 1, "version": max(k - 1, 0), "file": "sampler"}]
        self.ctx.data_rng.setstate(_tuple(state["async_data_rng"]))
        self.rng_at[k + 1] = self.ctx.data_rng.getstate()
        loaded: dict[str, Weights] = {}
        for p in pending:
            if p["file"] not in loaded:
                loaded[p["file"]] = load_file(str(path / f"{p['file']}.safetensors"))
            if not self.snapshots:
                self.ctx.engine.load_weights(loaded[p["file"]].items())
                self._schedule(p["step"], p["version"], None)
            else:
                self._schedule(p["step"], p["version"], loaded[p["file"]])

    def next_batch(self) -> tuple[Any, dict[str, float]]:
        """The current step's batch; then the current weights are scheduled for step k+s's batch, whose collect
        starts. Returns the batch and its `async/*` metrics and `time/weight_sync`."""
        from grpokit.train.context import sync_weights

        step = self.ctx.state["step"]
        slot = self.slots[0] if self.slots else None
        if slot is None or slot.step != step or slot.future is None:
            raise RuntimeError(f"async rollouts: no pending batch for step {step} "
                               f"(scheduled: {[s.step for s in self.slots]})")
        t0 = time.perf_counter()
        col = slot.future.result()
        waited = time.perf_counter() - t0
        self.slots.pop(0)
        with self.lock:
            for j in [j for j in self.rng_at if j <= step]:
                del self.rng_at[j]
        t1 = time.perf_counter()
        if not self.snapshots:
            sync_s = sync_weights(self.ctx)  # the worker is idle: w_{k-1} goes straight into the engine
            self._schedule(step + 1, step - 1, None)
        else:
            weights = self._snapshot()
            sync_s = time.perf_counter() - t1
            self._schedule(step + self.s, step - 1, weights)
        gen = col.info.get("time/rollout", 0.0) + col.info.get("time/reward", 0.0)
        return col, {"async/wait": waited, "async/overlap": min(max(1.0 - waited / gen, 0.0), 1.0) if gen > 0 else 0.0,
                     "async/staleness": float(step - 1 - slot.version), "time/weight_sync": sync_s}

    def checkpoint_parts(self) -> tuple[dict[str, Any], dict[str, Weights]]:
        """What a checkpoint after step k adds or replaces: the prompt generator before step k+1's draw (JSON,
        also as data_rng: the live generator may be mid-draw in the worker), the schedule of steps k+1..k+s,
        and the weights of each distinct version, by file name. With s = 1 the weights are the engine's, which
        only reads them while generating, so this may run while the pending collect does."""
        from grpokit.train.checkpoint import _jsonable

        step = self.ctx.state["step"]
        with self.lock:
            rng = _jsonable(self.rng_at[step + 1])  # set: step k's collect, which ended before this, wrote it
        files: dict[str, Weights] = {}
        names: dict[int, str] = {}
        pending = []
        for i, slot in enumerate(self.slots):
            if slot.version not in names:
                names[slot.version] = "sampler" if i == 0 else f"sampler_w{slot.version}"
                w = slot.weights if slot.weights is not None else self.ctx.engine.model.state_dict()
                files[names[slot.version]] = {k: v.detach() for k, v in w.items()}
            pending.append({"step": slot.step, "version": slot.version, "file": names[slot.version]})
        more = {"async_data_rng": rng, "data_rng": rng, "async_max_staleness": self.s, "async_pending": pending}
        return more, files

    def close(self) -> None:
        """Wait for the running collect (its result is dropped), cancel the queued ones and stop the worker. The
        schedule stays: the run's last checkpoint records it."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for slot in self.slots:
            slot.future = None
