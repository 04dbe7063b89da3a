"""The SFT stage (SPEC 10, stage 1; DeepSeek-R1, arXiv:2501.12948): `grpokit sft RECIPE`.

Each optimizer step: take the next `batch_size` examples of a seeded epoch order (every rank draws the
same global list and keeps its share), plan micro-batches, and accumulate the gradient of

    loss = sum over completion tokens of -log p(token) / N_tok,   N_tok summed over micro-batches and ranks

(token mean over the global batch, SPEC 3), so the step does not depend on how the batch is split.
Then clip, step, log, checkpoint. The run directory holds config.toml, metrics.jsonl (and tb/),
checkpoints/ (exact resume: weights, AdamW, scheduler, RNG and data-order state), eval.json (held-out
loss before and after), final/ (Hugging Face format, LoRA merged) and report.html.

Shapes: n rows of a micro-batch, S positions, K positions with a loss target, V vocabulary.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpokit import dist
from grpokit.config import ConfigError
from grpokit.train import checkpoint as ckpt
from grpokit.train.context import pick_device, seed_everything
from grpokit.train.metrics import MetricsLogger
from grpokit.train.sft_config import SFTConfig, save_sft_config
from grpokit.train.sft_data import (
    DataOrder, Example, SFTBatch, SFTDataError, build_rows, can_pack, collate, plan_micro, read_records,
    split_heldout, tokenize,
)

__all__ = ["run_sft", "completion_nll", "SFTContext", "setup_sft", "sft_step", "heldout_loss"]


# ---------------------------------------------------------------------------- the loss

def completion_nll(model: torch.nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over the completion targets [] f32 with grad, number of those targets [] i64).

    Only the positions that predict a completion token get logits (`logits_to_keep`), so the prompt's
    [n, P, V] logits never exist; the log-softmax is float32 (also under bf16 autocast).
    """
    from grpokit.rollout.logprobs import accepts_logits_to_keep

    keep = batch.loss_mask.any(0).nonzero().squeeze(1)  # [K]
    kw = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, **kw)
    logits = out.logits if kw else out.logits[:, keep]  # [n, K, V]
    targets = batch.targets[:, keep]  # [n, K]
    mask = batch.loss_mask[:, keep]  # [n, K]
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [n*K]
    return (nll * mask.flatten()).sum(), mask.sum()


# ---------------------------------------------------------------------------- set-up

@dataclass
class SFTContext:
    """Everything the SFT loop holds; built once by `setup_sft`."""

    cfg: SFTConfig
    run_dir: Path
    device: str
    model: torch.nn.Module     # as trained (possibly DDP/FSDP2-wrapped)
    base: torch.nn.Module      # unwrapped (under FSDP2 the sharded module itself)
    tokenizer: Any
    train: list[Example]
    heldout: list[Example]
    order: DataOrder
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Any
    pack: bool
    logger: MetricsLogger | None = None
    state: dict[str, Any] = field(default_factory=dict)


def _lr_lambda(cfg: SFTConfig) -> Any:
    t = cfg.train
    warm, total = max(t.warmup_steps, 0), t.steps

    def factor(s: int) -> float:  # s optimizer steps done; the factor of step s + 1
        if warm and s < warm:
            return (s + 1) / warm
        if t.lr_schedule == "cosine":
            frac = min(1.0, (s - warm) / max(total - warm, 1))
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    return factor


def _rows(cfg: SFTConfig, data: Any, heldout: Any) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """Training and held-out rows (and the training rows' locations) from `data`/`heldout` or the config."""
    d = cfg.data
    source = data if data is not None else d.path
    if source is None or (isinstance(source, str) and not source):
        raise ConfigError("data.path is empty: set it to a .jsonl/.parquet file of (prompt, completion) rows, e.g. --set data.path=train.jsonl")
    records = read_records(source, split=d.split)
    rows = build_rows(records, d.column_map)
    where = [w for w, _ in records]
    if heldout is not None or d.heldout_path:
        if heldout is None and str(source).startswith("hf:"):
            held_records = read_records(str(source), split=d.heldout_path)
        else:
            held_records = read_records(heldout if heldout is not None else d.heldout_path)
        return rows, build_rows(held_records, d.column_map), where
    train, held = split_heldout(rows, d.heldout_fraction, d.split_seed)
    if held:
        keep = {id(r) for r in train}
        where = [w for w, r in zip(where, rows) if id(r) in keep]
    return train, held, where


def setup_sft(cfg: SFTConfig, *, resume: str | Path | None = None, data: Any = None, heldout: Any = None,
              model: torch.nn.Module | None = None, tokenizer: Any = None) -> SFTContext:
    """Process group, data, model (+LoRA), wrapping, optimizer; restores `resume` when given."""
    from grpokit.models import autocast_context, load_model

    device = pick_device(cfg.train.device)
    dist.init(cfg.dist.backend, device)
    if cfg.dist.strategy == "none" and dist.world_size() > 1:
        raise ConfigError(f"launched on {dist.world_size()} ranks with dist.strategy = 'none': every rank would train its "
                          f"own copy; set dist.strategy = 'ddp' or 'fsdp2'")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.train.seed)
    train_rows, held_rows, where = _rows(cfg, data, heldout)  # before the model: bad data fails fast

    resuming_dir = resume and Path(resume).is_dir() and (Path(resume) / "config.toml").exists()
    if resuming_dir:
        run_dir = Path(resume)
    elif cfg.train.run_dir:
        run_dir = Path(cfg.train.run_dir)
    else:
        stamp = dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        run_dir = Path("runs") / f"{cfg.recipe}-{stamp}"
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_sft_config(cfg, run_dir / "config.toml")
    dist.barrier()

    if model is None:
        model, tokenizer = load_model(cfg.model.name)
    elif tokenizer is None:
        raise ValueError("setup_sft(model=...) needs tokenizer= as well")
    d = cfg.data
    system = d.system_prompt or None
    train, skipped = tokenize(tokenizer, train_rows, system=system, chat=d.chat_template, max_length=d.max_length,
                              on_too_long=d.on_too_long, where=where)
    held, _ = tokenize(tokenizer, held_rows, system=system, chat=d.chat_template, max_length=d.max_length)
    if not train:
        raise SFTDataError(f"no training example fits data.max_length = {d.max_length} ({skipped} skipped); raise it")
    if cfg.model.lora_r > 0:
        from grpokit.models.lora import apply_lora

        model = apply_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, dropout=cfg.model.lora_dropout,
                           targets=cfg.model.lora_targets)
    model.to(device)
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # dropout (LoRA's) and gradient checkpointing act only in train mode
    pack = cfg.train.pack and can_pack(model)
    wrapped = dist.wrap(model, cfg.dist.strategy, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    ctx = SFTContext(cfg=cfg, run_dir=run_dir, device=device, model=wrapped, base=model, tokenizer=tokenizer,
                     train=train, heldout=held, order=DataOrder(len(train), cfg.train.seed), optimizer=optimizer,
                     scheduler=scheduler, autocast=autocast_context(device, cfg.model.precision), pack=pack,
                     state={"step": 0, "tokens_seen": 0, "skipped_too_long": skipped, "nonfinite_total": 0})
    if resume:
        restore(ctx, resume)
    ctx.logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, resume_step=ctx.state["step"],
                               enabled=dist.is_main())
    return ctx


# ---------------------------------------------------------------------------- checkpoints

def _fsdp(ctx: SFTContext) -> bool:
    return ctx.cfg.dist.strategy == "fsdp2" and dist.is_distributed()


def model_state(ctx: SFTContext) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights; a collective under FSDP2, so every rank calls it."""
    return dist.full_model_state(ctx.base, _fsdp(ctx))


def optim_state(ctx: SFTContext) -> dict[str, Any]:
    return dist.full_optim_state(ctx.base, ctx.optimizer, _fsdp(ctx))


def save(ctx: SFTContext) -> Path | None:
    """Checkpoint the current step (atomic, keeps the newest train.keep_last)."""
    state = {**ctx.state, "order": ctx.order.state_dict(), "scheduler": ctx.scheduler.state_dict(),
             "world_size": dist.world_size(), "stage": "sft"}
    m, o = model_state(ctx), optim_state(ctx)
    path = None
    if dist.is_main():
        path = ckpt.save_checkpoint(ctx.run_dir, ctx.state["step"], model_state=m, optim_state=o, generator=None,
                                    state=state, keep_last=ctx.cfg.train.keep_last)
    dist.barrier()
    return path


def restore(ctx: SFTContext, resume: str | Path) -> None:
    """Load weights, AdamW, scheduler, RNG and data order from a run directory's newest checkpoint (or a
    checkpoint directory)."""
    path = Path(resume)
    if (path / "checkpoints").exists() or not (path / "state.json").exists():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"--resume {resume}: no complete checkpoint under {path / 'checkpoints'}")
        path = found
    m, o, state = ckpt.load_checkpoint(path, None)
    if state.get("stage") != "sft":
        raise ConfigError(f"--resume {resume}: {path} is not an SFT checkpoint; resume it with `grpokit train`")
    dist.load_full_state(ctx.base, ctx.optimizer, m, o, _fsdp(ctx))
    ctx.scheduler.load_state_dict(state.pop("scheduler"))
    ctx.order.load_state_dict(state.pop("order"))
    for k in ("world_size", "stage"):
        state.pop(k, None)
    ctx.state.update(state)


def save_final(ctx: SFTContext) -> Path:
    """The trained model in Hugging Face format (LoRA merged), loadable by `AutoModelForCausalLM`."""
    out = ctx.run_dir / "final"
    full = model_state(ctx)
    if dist.is_main():
        model = ctx.base
        if _fsdp(ctx):  # the sharded module cannot save itself: load the gathered weights into a fresh copy
            from grpokit.models import load_model

            model, _ = load_model(ctx.cfg.model.name)
            if ctx.cfg.model.lora_r > 0:
                from grpokit.models.lora import apply_lora

                c = ctx.cfg.model
                model = apply_lora(model, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, targets=c.lora_targets)
            model.load_state_dict(full)
        if ctx.cfg.model.lora_r > 0:
            from grpokit.models.lora import merged_copy

            model = merged_copy(model)
        model.save_pretrained(out, safe_serialization=True)
        ctx.tokenizer.save_pretrained(out)
    dist.barrier()
    return out


# ---------------------------------------------------------------------------- one step

def _shares(ctx: SFTContext, idx: list[int]) -> list[Example]:
    """This rank's share of a global list of example indices."""
    return [ctx.train[i] for i in idx[dist.rank() :: dist.world_size()]]


def sft_step(ctx: SFTContext) -> dict[str, float]:
    """One optimizer step over the next `batch_size` examples; returns its metrics."""
    c = ctx.cfg.train
    t0 = time.perf_counter()
    global_idx = ctx.order.take(c.batch_size)
    mine = _shares(ctx, global_idx)
    counts = dist.all_reduce_sum([float(sum(e.n_target for e in mine)), float(sum(len(e) for e in mine))])
    n_tok, n_all = float(counts[0]), float(counts[1])
    micro = plan_micro([len(e) for e in mine], micro_batch_size=c.micro_batch_size,
                       max_tokens=c.max_tokens_per_microbatch, packed=ctx.pack)
    n_micro = dist.lockstep(len(micro))  # every rank runs as many forwards (FSDP2/DDP collectives)
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    ctx.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for k in range(n_micro):
        # a rank out of examples runs one example at weight 0
        exs, weight = ([mine[i] for i in micro[k]], 1.0) if k < len(micro) else ([ctx.train[global_idx[0]]], 0.0)
        batch = collate(exs, model=ctx.base, pack=ctx.pack, pad_id=pad).to(ctx.device)
        last = k == n_micro - 1
        sync = dist.grad_sync(ctx.model, enabled=last)
        with sync:
            with ctx.autocast:
                nll, _ = completion_nll(ctx.model, batch)
            # DDP and FSDP2 average gradients over ranks; x world size gives the global token mean (SPEC 3)
            (nll * (weight * dist.world_size() / max(n_tok, 1.0))).backward()
        total += nll.detach().double().cpu() * weight
    loss = float(dist.all_reduce_sum([float(total)])[0]) / max(n_tok, 1.0)
    gn = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float("inf"))
    gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
    lr = ctx.scheduler.get_last_lr()[0]
    finite = math.isfinite(loss) and math.isfinite(gn)
    if finite:
        ctx.optimizer.step()
    else:
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.state["nonfinite_total"] += 1
    ctx.scheduler.step()
    ctx.state["tokens_seen"] += int(n_tok)
    return {"loss": loss, "grad_norm": gn, "lr": lr, "tokens/completion": n_tok, "tokens/total": n_all,
            "tokens/seen": float(ctx.state["tokens_seen"]), "epoch": ctx.order.epoch - 1 + ctx.order.pos / max(ctx.order.n, 1),
            "micro_batches": float(n_micro), "nonfinite_total": float(ctx.state["nonfinite_total"]),
            "time/step": time.perf_counter() - t0}


@torch.no_grad()
def heldout_loss(ctx: SFTContext) -> dict[str, float]:
    """Token-mean completion loss over the held-out examples (all ranks, summed globally)."""
    mine = ctx.heldout[dist.rank() :: dist.world_size()]
    bs = ctx.cfg.train.eval_batch_size
    chunks = [mine[s : s + bs] for s in range(0, len(mine), bs)]
    n_micro = dist.lockstep(len(chunks))
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    nll_sum, n_sum = 0.0, 0.0
    ctx.base.eval()
    try:
        for k in range(n_micro):
            exs, weight = (chunks[k], 1.0) if k < len(chunks) else (ctx.heldout[:1], 0.0)
            batch = collate(exs, model=ctx.base, pack=ctx.pack, pad_id=pad).to(ctx.device)
            with ctx.autocast:
                nll, n = completion_nll(ctx.base, batch)
            nll_sum += float(nll) * weight
            n_sum += float(n) * weight
    finally:
        ctx.base.train()
    tot = dist.all_reduce_sum([nll_sum, n_sum])
    return {"loss": float(tot[0] / max(float(tot[1]), 1.0)), "tokens": float(tot[1]), "n": float(len(ctx.heldout))}


# ---------------------------------------------------------------------------- the run

def run_sft(cfg: SFTConfig, *, resume: str | Path | None = None, data: Any = None, heldout: Any = None,
            model: torch.nn.Module | None = None, tokenizer: Any = None) -> Path:
    """Run the SFT stage; returns the run directory (its `final/` is the trained model).

    Args:
        cfg: the stage config (`load_sft_config`).
        resume: a run directory (continues from its newest checkpoint) or a checkpoint directory; the
            resumed run gives the same weights and metrics as one that was never interrupted.
        data: instead of `cfg.data.path`: a list of dicts or a `datasets.Dataset` with prompt/completion
            columns (after `cfg.data.column_map`), or a path.
        heldout: likewise for the held-out split (instead of `cfg.data.heldout_path`/`heldout_fraction`).
        model, tokenizer: an already loaded model (instead of `cfg.model.name`); it is trained in place.
            `cfg.model.name` is still used to rebuild the model when saving `final/` under FSDP2.
    """
    ctx = setup_sft(cfg, resume=resume, data=data, heldout=heldout, model=model, tokenizer=tokenizer)
    c = cfg.train
    say = print if dist.is_main() and c.progress else (lambda *a, **k: None)
    say(f"grpokit sft: run directory {ctx.run_dir} ({len(ctx.train)} training examples, {len(ctx.heldout)} held out, "
        f"{'packed' if ctx.pack else 'padded'} micro-batches)")
    if ctx.heldout and ctx.state.get("eval_before") is None:
        ctx.state["eval_before"] = heldout_loss(ctx)
        say(f"held-out loss before training: {ctx.state['eval_before']['loss']:.4f}")
    bar = None
    if c.progress and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=ctx.state["step"], desc=cfg.recipe, unit="step", dynamic_ncols=True)
    try:
        while ctx.state["step"] < c.steps:
            ctx.state["step"] += 1
            m = sft_step(ctx)
            step = ctx.state["step"]
            if ctx.heldout and (step == c.steps or (c.eval_every and step % c.eval_every == 0)):
                ctx.state["eval_last"] = heldout_loss(ctx)
                m["eval/loss"] = ctx.state["eval_last"]["loss"]
            ctx.logger.log(step, m)
            if bar is not None:
                bar.set_postfix_str(f"loss {m['loss']:.4f}")
                bar.update(1)
            if c.save_every and step % c.save_every == 0:
                save(ctx)
    finally:
        if bar is not None:
            bar.close()
    results: dict[str, Any] = {}
    if ctx.heldout:
        if ctx.state.get("eval_last") is None:  # a resumed run that had nothing left to do
            ctx.state["eval_last"] = heldout_loss(ctx)
        results = {"before": ctx.state["eval_before"], "after": ctx.state["eval_last"]}
        say(f"held-out loss: {results['before']['loss']:.4f} -> {results['after']['loss']:.4f}")
    if not (c.save_every and ctx.state["step"] % c.save_every == 0):
        save(ctx)
    final = save_final(ctx)
    if dist.is_main():
        if results:
            (ctx.run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        say(f"final model: {final}")
        if c.report:
            from grpokit.report.html import write_report

            say(f"report: {write_report(ctx.run_dir)}")
    ctx.logger.close()
    return ctx.run_dir
