"""The RL loop, top to bottom. One step:

    1. sample   prompts -> the rollout engine (`collect.sample_round`)
    2. score    every scorer (`ctx.scorer`)
    3. transform  overlong shaping/filtering, dynamic sampling, ... (`grpokit.transforms`)
    4. advantages  ℓ°/ℓʳ passes, KL-in-reward, group advantages, token credit (`update.build_batch`)
    5. update   mini-batches x micro-batches -> optimizer steps (`update.update`)
    6. sync     the new weights into the engine (`context.sync_weights`)
    7. log      metrics over every rank, samples
    8. checkpoint

Shapes: B sequences on this rank (= prompts x G), T response tokens, P prompt tokens.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from grpokit import dist
from grpokit.config import Config
from grpokit.report.evaluate import write_json
from grpokit.train.collect import collect, encode
from grpokit.train.context import (  # noqa: F401  (re-exported: the loop's public names)
    AdapterOff, Context, TrainingStopped, build_scorer, save, save_final, setup, sync_weights,
)
from grpokit.train.metrics import rollout_metrics, sample_records
from grpokit.train.update import build_batch, update


def train_step(ctx: Context) -> dict[str, float]:
    c, G = ctx.cfg, ctx.cfg.rollout.group_size
    t0 = time.perf_counter()
    extra: dict[str, float] = {}
    if ctx.rollouts is not None:  # asynchronous: generated during the last update; the engine gets the weights now
        col, extra = ctx.rollouts.next_batch()
    else:
        col = collect(ctx)                                      # 1-3. sample, score, transform
    t1 = time.perf_counter()
    batch = build_batch(ctx, col)                               # 4. ℓ°, ℓʳ, advantages, credit
    t2 = time.perf_counter()
    upd, credit = update(ctx, batch, col.global_row)            # 5. optimizer steps
    t3 = time.perf_counter()
    sync_s = sync_weights(ctx) if ctx.rollouts is None else extra["time/weight_sync"]  # 6. new weights into the engine
    m = {**rollout_metrics(col, batch, group_size=G), **upd, **col.info, **extra}   # 7. log
    m["time/logprobs"] = t2 - t1
    m["time/update"] = t3 - t2
    m["time/weight_sync"] = sync_s
    m["time/step"] = time.perf_counter() - t0
    m["tokens/trained"] = float(dist.all_reduce_sum([float(batch.loss_mask.sum())])[0])
    if ctx.logger:
        ctx.logger.samples(ctx.state["step"], sample_records(ctx.tokenizer, col, credit, group_size=G, limit=c.train.log_samples))
    return m


# ---------------------------------------------------------------------------- evaluation and the run

def heldout_eval(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy accuracy on the held-out rows (every rank evaluates all rows: forwards stay in step)."""
    from grpokit.report.evaluate import evaluate

    def enc(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
        return encode(ctx, [{"prompt": p} for p in prompts])

    from grpokit.rollout.engine import EngineSampler

    return evaluate(None, ctx.tokenizer, rows, reward_set=ctx.scorer, k=1, temperature=0.0,
                    max_new_tokens=ctx.cfg.rollout.max_new_tokens, batch_size=64, seed=ctx.cfg.train.seed,
                    stop_strings=tuple(ctx.cfg.rollout.stop_strings), device=ctx.device,
                    sampler=EngineSampler(ctx.engine), encode=enc)


def _fmt(m: dict[str, float]) -> str:
    return f"reward {m.get('reward/mean', float('nan')):.3f} acc {m.get('acc', float('nan')):.3f} len {m.get('len/mean', float('nan')):.1f}"


def train(cfg: Config, *, resume: str | Path | None = None, **objects: Any) -> Path:
    """Run a whole training job; returns the run directory. `objects` (model, tokenizer, task,
    reward_funcs) replace what the config names, see `setup`."""
    ctx = setup(cfg, resume=resume, **objects)
    try:
        return _train(ctx, cfg)
    finally:
        ctx.engine.close()  # a vLLM engine frees its memory and stops its server, on errors and Ctrl-C too


def _train(ctx: Context, cfg: Config) -> Path:
    c = cfg.train
    say = print if dist.is_main() else (lambda *a, **k: None)
    say(f"grpokit: run directory {ctx.run_dir}")
    heldout = ctx.task.heldout(cfg.data.heldout_size) if cfg.data.heldout_size > 0 and c.final_eval else []
    if heldout and ctx.state.get("eval_before") is None:
        t = time.perf_counter()
        ctx.state["eval_before"] = _brief(heldout_eval(ctx, heldout))
        say(f"held-out accuracy before training: {ctx.state['eval_before']['acc']:.3f} "
            f"({len(heldout)} problems, greedy, {time.perf_counter() - t:.0f}s)")
    bar = None
    if c.progress and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=ctx.state["step"], desc=cfg.recipe, unit="step", dynamic_ncols=True)
    if cfg.rollout.async_rollouts:
        from grpokit.train.async_rollout import AsyncRollouts

        ctx.rollouts = AsyncRollouts(ctx)
        ctx.rollouts.start(ctx.state.get("checkpoint"))
    try:
        while ctx.state["step"] < c.steps:
            ctx.state["step"] += 1
            m = train_step(ctx)
            bad = m["nonfinite_updates"] > 0
            ctx.state["nonfinite_streak"] = ctx.state["nonfinite_streak"] + 1 if bad else 0
            ctx.state["nonfinite_total"] += int(m["nonfinite_updates"])
            m["nonfinite_total"] = float(ctx.state["nonfinite_total"])
            ctx.logger.log(ctx.state["step"], m)
            if bar is not None:
                bar.set_postfix_str(_fmt(m))
                bar.update(1)
            if ctx.state["nonfinite_streak"] >= c.max_nonfinite:
                path = save(ctx)
                raise TrainingStopped(
                    f"step {ctx.state['step']}: {ctx.state['nonfinite_streak']} steps in a row had a non-finite loss or "
                    f"gradient and were skipped; the last good state is saved in {path}. Lower train.lr, check the "
                    f"reward functions for NaN/inf, or set model.precision = 'fp32'"
                )
            if c.save_every and ctx.state["step"] % c.save_every == 0:
                save(ctx)
    finally:
        if bar is not None:
            bar.close()
        if ctx.rollouts is not None:
            ctx.rollouts.close()
    if not (c.save_every and ctx.state["step"] % c.save_every == 0):
        save(ctx)
    if ctx.rollouts is not None:
        sync_weights(ctx)  # the engine held the weights one update old; evaluate the final ones
    results: dict[str, Any] = {"before": ctx.state.get("eval_before")}
    if heldout:
        t = time.perf_counter()
        results["after"] = _brief(heldout_eval(ctx, heldout))
        say(f"held-out accuracy after training:  {results['after']['acc']:.3f} ({time.perf_counter() - t:.0f}s)")
        say(f"held-out accuracy: {results['before']['acc']:.3f} -> {results['after']['acc']:.3f} "
            f"({100 * (results['after']['acc'] - results['before']['acc']):+.1f} points)")
    final = save_final(ctx)
    if dist.is_main():
        write_json(results, ctx.run_dir / "eval.json")
        say(f"final model: {final}")
        if c.report:
            from grpokit.report.html import write_report

            say(f"report: {write_report(ctx.run_dir)}")
    ctx.logger.close()
    return ctx.run_dir


def _brief(res: dict[str, Any]) -> dict[str, Any]:
    """The held-out numbers kept in eval.json and checkpoints (JSON-serialisable)."""
    keep = {k: v for k, v in res.items() if k != "samples"}
    keep["acc"] = float(res.get("avg@k", res.get("acc", 0.0)))
    keep["samples"] = res.get("samples", [])[:5]
    return json.loads(json.dumps(keep, default=float))
