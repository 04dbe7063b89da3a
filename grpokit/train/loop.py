"""The training loop, top to bottom: sample, score, advantages, update, log, checkpoint.

Shapes: B sequences on this rank (= prompts x G), T response tokens, P prompt tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpokit import dist
from grpokit.config import Config, save_config
from grpokit.train import checkpoint as ckpt
from grpokit.report.evaluate import write_json
from grpokit.train.metrics import MetricsLogger, quantiles
from grpokit.train.step import Batch, StatSums, micro_batch_loss, plan_microbatches, sequence_advantages, token_credit


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. repeated non-finite steps); the last good state is checkpointed."""


# ---------------------------------------------------------------------------- set-up

def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is visible; set train.device = 'cpu' or 'auto'")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: Config) -> Path:
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    stamp = dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.recipe}-{stamp}"


@dataclass
class Context:
    """Everything the loop holds; built once by `setup`."""

    cfg: Config
    run_dir: Path
    device: str
    model: torch.nn.Module          # the policy as trained (possibly DDP/FSDP-wrapped)
    base: torch.nn.Module           # the unwrapped policy
    rollout_model: torch.nn.Module  # the module the sampler runs (the policy itself unless FSDP2)
    tokenizer: Any
    ref: Any                        # a frozen reference module, a LoRA adapter switch, or None
    task: Any
    rewards: Any
    sampler: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data_rng: random.Random
    autocast: Any
    logger: MetricsLogger | None = None
    state: dict[str, Any] = field(default_factory=dict)


def build_rewards(cfg: Config) -> Any:
    from grpokit.rewards import RewardSet

    r = cfg.rewards
    weights = r.weights or [1.0] * len(r.functions)
    specs = [(name, w, dict(r.options.get(name, {}))) for name, w in zip(r.functions, weights)]
    if r.overlong_buffer > 0:
        specs.append(("overlong", 1.0, {"max_len": cfg.rollout.max_new_tokens, "buffer": r.overlong_buffer}))
    return RewardSet(specs, on_error=r.on_error, timeout_s=r.timeout_s or None)


def setup(cfg: Config, *, resume: str | Path | None = None) -> Context:
    from grpokit.data import get_task
    from grpokit.models import autocast_context, load_model, ref_model
    from grpokit.rollout import Sampler

    device = pick_device(cfg.train.device)
    dist.init(cfg.dist.backend, device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.train.seed)
    run_dir = Path(resume) if resume and Path(resume).is_dir() and (Path(resume) / "config.toml").exists() else resolve_run_dir(cfg)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.toml")
    dist.barrier()

    model, tokenizer = load_model(cfg.model.name)
    ref: Any = None
    if cfg.model.lora_r > 0:
        from grpokit.models.lora import apply_lora

        model = apply_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha,
                           dropout=cfg.model.lora_dropout, targets=cfg.model.lora_targets)
    model.to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.algo.beta > 0:  # beta = 0 never loads a reference model (SPEC 4)
        ref = AdapterOff(model) if cfg.model.lora_r > 0 else ref_model(model).to(device)
    rollout_model = model
    if cfg.dist.strategy == "fsdp2" and dist.is_distributed():
        rollout_model = ref_model(model)  # an unsharded copy for sampling (made before sharding), re-synced every step
    wrapped = dist.wrap(model, cfg.dist.strategy, device)
    autocast = autocast_context(device, cfg.model.precision)
    sampler = Sampler(rollout_model, tokenizer, device=device, autocast_dtype=cfg.model.precision)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, foreach=False)
    warm = max(cfg.train.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ctx = Context(
        cfg=cfg, run_dir=run_dir, device=device, model=wrapped, base=model, rollout_model=rollout_model,
        tokenizer=tokenizer, ref=ref, task=get_task(cfg.data.task, **cfg.data.task_options),
        rewards=build_rewards(cfg), sampler=sampler, optimizer=optimizer, scheduler=scheduler,
        data_rng=random.Random(cfg.train.seed), autocast=autocast,
        state={"step": 0, "nonfinite_streak": 0, "nonfinite_total": 0},
    )
    if resume:
        restore(ctx, resume)
    ctx.logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, resume_step=ctx.state["step"], enabled=dist.is_main())
    return ctx


class AdapterOff:
    """The reference policy of a LoRA model: the same module with its adapters disabled (no copy)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    __call__ = forward

    def parameters(self) -> Any:
        return self.model.parameters()


# ---------------------------------------------------------------------------- checkpoints

def model_state(ctx: Context) -> dict[str, torch.Tensor]:
    if ctx.cfg.dist.strategy == "fsdp2" and dist.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(ctx.base, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return ctx.base.state_dict()


def optim_state(ctx: Context) -> dict[str, Any]:
    if ctx.cfg.dist.strategy == "fsdp2" and dist.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(ctx.base, ctx.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return ctx.optimizer.state_dict()


def save(ctx: Context) -> Path | None:
    state = {
        "step": ctx.state["step"],
        "nonfinite_streak": ctx.state["nonfinite_streak"],
        "nonfinite_total": ctx.state["nonfinite_total"],
        "data_rng": ckpt._jsonable(ctx.data_rng.getstate()),
        "task": ctx.task.state_dict() if hasattr(ctx.task, "state_dict") else None,
        "scheduler": ctx.scheduler.state_dict(),
        "eval_before": ctx.state.get("eval_before"),
        "world_size": dist.world_size(),
    }
    m, o = model_state(ctx), optim_state(ctx)  # collective under FSDP2: every rank takes part
    path = None
    if dist.is_main():
        path = ckpt.save_checkpoint(ctx.run_dir, ctx.state["step"], model_state=m, optim_state=o,
                                    generator=None, state=state, keep_last=ctx.cfg.train.keep_last)
    dist.barrier()
    return path


def restore(ctx: Context, resume: str | Path) -> None:
    path = Path(resume)
    if (path / "checkpoints").exists() or not (path / "state.json").exists():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint under {path / 'checkpoints'}")
        path = found
    m, o, state = ckpt.load_checkpoint(path, None)
    if ctx.cfg.dist.strategy == "fsdp2" and dist.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        set_model_state_dict(ctx.base, m, options=opts)
        set_optimizer_state_dict(ctx.base, ctx.optimizer, o, options=opts)
    else:
        ctx.base.load_state_dict(m)
        ctx.optimizer.load_state_dict(o)
    ctx.scheduler.load_state_dict(state["scheduler"])
    ctx.data_rng.setstate(ckpt._tuple(state["data_rng"]))
    if state.get("task") is not None and hasattr(ctx.task, "load_state_dict"):
        ctx.task.load_state_dict(state["task"])
    # sampling needs no saved generator: each row's is derived from (seed, step, global row), so a run
    # resumes on the same or another world size with the rollouts it would have drawn
    for k in ("step", "nonfinite_streak", "nonfinite_total", "eval_before"):
        ctx.state[k] = state.get(k, ctx.state.get(k))


# ---------------------------------------------------------------------------- one step

@dataclass
class Scores:
    """Rewards of one rollout batch: total [B] (NaN-free), per function, and which samples count."""

    total: torch.Tensor                 # [B] f32
    per_function: dict[str, list[float]]
    valid: torch.Tensor                 # [B] bool (False: a 'skip'ped reward error)
    correct: torch.Tensor               # [B] bool: the correctness reward >= 1 (or total >= 1 without one)

    @staticmethod
    def of(result: Any) -> "Scores":
        total = result.total.float()  # [B]
        valid = result.valid.bool() & torch.isfinite(total)  # [B]
        total = torch.where(valid, total, torch.zeros_like(total))  # [B]
        correct = result.correct.bool() if result.correct is not None else total >= 1  # [B]
        return Scores(total, dict(result.per_function), valid, correct & valid)

    def select(self, idx: list[int]) -> "Scores":
        return Scores(self.total[idx], {k: [v[i] for i in idx] for k, v in self.per_function.items()},
                      self.valid[idx], self.correct[idx])

    @staticmethod
    def cat(parts: list["Scores"]) -> "Scores":
        keys = parts[0].per_function.keys()
        return Scores(torch.cat([p.total for p in parts]), {k: sum((p.per_function[k] for p in parts), []) for k in keys},
                      torch.cat([p.valid for p in parts]), torch.cat([p.correct for p in parts]))


def sample_rows(ctx: Context, n_prompts: int) -> list[dict[str, Any]]:
    """This rank's share of `n_prompts` prompts; every rank draws the same global list and slices it."""
    rows = ctx.task.sample(n_prompts, ctx.data_rng)
    return rows[dist.rank() :: dist.world_size()]


def row_seed(seed: int, step: int, round_: int, row: int) -> int:
    """The sampling seed of one global rollout row: a hash of (run seed, step, dynamic-sampling round, row)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{round_}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid manual_seed


def row_generators(ctx: Context, n_prompts: int, round_: int) -> list[torch.Generator]:
    """One sampling generator per row of this rank's rollout batch (n_prompts x G rows), seeded from the
    row's *global* index, so a row draws the same tokens on 1 rank or N and whatever shares its batch."""
    G, W, r = ctx.cfg.rollout.group_size, dist.world_size(), dist.rank()
    step, seed = ctx.state["step"], ctx.cfg.train.seed
    return [torch.Generator(device=ctx.device).manual_seed(row_seed(seed, step, round_, (r + i * W) * G + j))
            for i in range(n_prompts) for j in range(G)]


def encode(ctx: Context, rows: list[dict[str, Any]]) -> list[list[int]]:
    from grpokit.rollout import encode_prompts

    return encode_prompts(ctx.tokenizer, [r["prompt"] for r in rows],
                          system=ctx.cfg.data.system_prompt or None, chat=ctx.cfg.data.chat_template)


def score(ctx: Context, rows: list[dict[str, Any]], roll: Any) -> Scores:
    from grpokit.rewards.rewardset import columns_from_rows

    cols = columns_from_rows(rows, completion_lengths=roll.response_mask.sum(1).tolist(), truncated=roll.truncated.tolist())
    return Scores.of(ctx.rewards.score([r["prompt"] for r in rows], roll.texts, cols))


def concat_rollouts(parts: list[tuple[Any, list[int]]], pad_id: int) -> Any:
    """Rows `idx` of several rollouts, re-padded to one width (prompts left, responses right)."""
    from grpokit.rollout import Rollout

    P = max(r.prompt_ids.shape[1] for r, _ in parts)
    T = max(r.response_ids.shape[1] for r, _ in parts)

    def left(x: torch.Tensor, fill: Any) -> torch.Tensor:
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=fill)

    def right(x: torch.Tensor, fill: Any) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)

    return Rollout(
        prompt_ids=torch.cat([left(r.prompt_ids[i], pad_id) for r, i in parts]),  # [B, P]
        prompt_mask=torch.cat([left(r.prompt_mask[i], False) for r, i in parts]),  # [B, P]
        response_ids=torch.cat([right(r.response_ids[i], pad_id) for r, i in parts]),  # [B, T]
        response_mask=torch.cat([right(r.response_mask[i], False) for r, i in parts]),  # [B, T]
        logprobs=torch.cat([right(r.logprobs[i], 0.0) for r, i in parts]),  # [B, T]
        truncated=torch.cat([r.truncated[i] for r, i in parts]),  # [B]
        texts=[r.texts[j] for r, i in parts for j in i],
    )


def rollout_and_score(ctx: Context) -> tuple[list[dict[str, Any]], Any, Scores, dict[str, float]]:
    """Sample prompts x G, generate, score. With dynamic sampling (DAPO), keep only groups whose
    rewards differ, drawing new prompts until `prompts_per_step` groups are kept or
    `max_gen_batches` rounds are spent; if none differs, the last round is used as is."""
    from grpokit.data import expand_groups

    c, G = ctx.cfg, ctx.cfg.rollout.group_size
    want = max(c.rollout.prompts_per_step // dist.world_size(), 1)
    keep: list[tuple[list[dict[str, Any]], Any, Scores, list[int]]] = []
    info = {"time/rollout": 0.0, "time/reward": 0.0, "dynamic/rounds": 0.0, "tokens/generated": 0.0}
    n_kept = 0
    while True:
        prompts = sample_rows(ctx, c.rollout.prompts_per_step)
        rows, _ = expand_groups(prompts, G)
        t0 = time.perf_counter()
        roll = ctx.sampler.generate(
            encode(ctx, rows), max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
            top_p=c.rollout.top_p, top_k=c.rollout.top_k, stop_strings=tuple(c.rollout.stop_strings),
            generator=row_generators(ctx, len(prompts), int(info["dynamic/rounds"])),
        )
        t1 = time.perf_counter()
        sc = score(ctx, rows, roll)
        info["time/rollout"] += t1 - t0
        info["time/reward"] += time.perf_counter() - t1
        info["dynamic/rounds"] += 1
        info["tokens/generated"] += float(roll.response_mask.sum())  # every round's, kept or not
        if not c.algo.dynamic_sampling:
            return rows, roll, sc, info
        total = sc.total.view(-1, G)  # [n, G]
        differ = (total.max(1).values > total.min(1).values).tolist()  # [n]
        idx = [g * G + j for g, d in enumerate(differ) if d for j in range(G)][: max(want - n_kept, 0) * G]
        keep.append((rows, roll, sc, idx))
        n_kept += len(idx) // G
        if n_kept >= want or info["dynamic/rounds"] >= c.algo.max_gen_batches:
            break
    info["dynamic/kept_groups"] = float(n_kept)
    if n_kept == 0:
        rows, roll, sc, _ = keep[-1]
        return rows, roll, sc, info
    parts = [(r, i) for _, r, _, i in keep if i]
    rows = [rw[i] for rw, _, _, idx in keep for i in idx]
    roll = concat_rollouts(parts, ctx.tokenizer.pad_token_id)
    sc = Scores.cat([s.select(i) for _, _, s, i in keep if i])
    return rows, roll, sc, info


def score_tokens(ctx: Context, module: Any, sub: Batch, *, entropy: bool = False) -> Any:
    """Teacher-forced log-probs [b, T'] (and entropies) of a micro-batch's responses under `module`."""
    from grpokit.rollout.logprobs import score_logprobs

    with ctx.autocast:
        return score_logprobs(module, sub.input_ids.to(ctx.device), sub.attention_mask.to(ctx.device), sub.response_len,
                              temperature=ctx.cfg.rollout.temperature, return_entropy=entropy,
                              pack=ctx.cfg.train.pack_prompts, pad_id=ctx.tokenizer.pad_token_id)


def recompute_old_logprobs(ctx: Context) -> bool:
    """Whether the old-policy log-probs need their own pass (SPEC 0): not when the only update of a rollout
    starts from the sampling policy, where old = the detached current log-probs."""
    return ctx.cfg.train.old_logprobs == "recompute" or ctx.cfg.train.updates_per_rollout > 1


def logprob_pass(ctx: Context, module: Any, batch: Batch, micro: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies of all response tokens, no grad: [B, T] each."""
    B, T = batch.response_mask.shape
    logp = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    ent = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    with torch.no_grad():
        for idx in micro:
            sub = batch.select(idx)
            lp, en = score_tokens(ctx, module, sub, entropy=True)
            t = sub.response_len
            logp[idx, :t] = lp.float().cpu() * sub.response_mask  # [b, T']
            ent[idx, :t] = en.float().cpu() * sub.response_mask  # [b, T']
    return logp, ent


def global_sequence_advantages(ctx: Context, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Advantages computed over every rank's rewards (so batch-wide estimators are rank-invariant),
    then this rank's rows. rewards [B], group_ids [B] -> [B]."""
    if not dist.is_distributed():
        return sequence_advantages(rewards, group_ids, cfg=ctx.cfg.algo)
    parts = dist.all_gather_objects((rewards.tolist(), group_ids.tolist()))
    all_r = torch.tensor([x for r, _ in parts for x in r], dtype=torch.float32)  # [B_all]
    all_g = torch.tensor([g + (1 << 32) * k for k, (_, gs) in enumerate(parts) for g in gs])  # [B_all]
    start = sum(len(r) for r, _ in parts[: dist.rank()])
    return sequence_advantages(all_r, all_g, cfg=ctx.cfg.algo)[start : start + len(rewards)]  # [B]


def build_batch(ctx: Context, roll: Any, sc: Scores, micro_size: int) -> Batch:
    """Old/ref log-probs (recomputed by the trainer, SPEC 0), KL-in-reward, advantages, credit."""
    a, G = ctx.cfg.algo, ctx.cfg.rollout.group_size
    resp_mask = roll.response_mask.bool()  # [B, T]
    loss_mask = resp_mask & sc.valid[:, None]  # [B, T]
    if a.overlong_filter:
        loss_mask &= ~roll.truncated.bool()[:, None]
    zeros = torch.zeros(resp_mask.shape, dtype=torch.float32)  # [B, T]
    batch = Batch(
        input_ids=roll.input_ids(), attention_mask=roll.attention_mask(), response_mask=resp_mask,
        loss_mask=loss_mask, group_ids=torch.arange(len(sc.total)) // G, rewards=sc.total.clone(),
        seq_adv=torch.zeros_like(sc.total), token_adv=zeros, old_logp=zeros, ref_logp=None, entropy=zeros,
    )
    micro = plan_microbatches(batch.attention_mask.sum(1), micro_batch_size=micro_size,
                              max_tokens=ctx.cfg.train.max_tokens_per_microbatch)
    if recompute_old_logprobs(ctx):
        batch.old_logp, batch.entropy = logprob_pass(ctx, ctx.model, batch, micro)
    else:  # the sampler's log-probs stand in for credit and metrics; the loss uses the detached current ones
        batch.old_logp = roll.logprobs.float() * resp_mask  # [B, T]
    if ctx.ref is not None:
        batch.ref_logp, _ = logprob_pass(ctx, ctx.ref, batch, micro)
        if a.kl_placement == "reward":  # R_i -= beta * sum_t k1 (SPEC 4)
            batch.rewards = batch.rewards - a.beta * ((batch.old_logp - batch.ref_logp) * resp_mask).sum(1)
    batch.seq_adv = global_sequence_advantages(ctx, batch.rewards, batch.group_ids)  # [B]
    batch.token_adv = token_credit(batch.seq_adv, resp_mask, cfg=a, old_logp=batch.old_logp, ref_logp=batch.ref_logp)
    return batch


def update(ctx: Context, batch: Batch) -> tuple[dict[str, float], torch.Tensor]:
    """`updates_per_rollout` optimizer steps over contiguous mini-batches, each with gradient
    accumulation over micro-batches. Returns metrics and the effective per-token credit [B, T]
    (advantage x FIPO weight where the loss reports one)."""
    c = ctx.cfg
    B = batch.rewards.shape[0]
    stats = StatSums()
    credit = batch.token_adv.clone()  # [B, T]
    norm_const = float(c.algo.norm_const or c.rollout.max_new_tokens)
    lengths = batch.attention_mask.sum(1)  # [B]
    grad_norms, skipped, losses = [], 0, []
    # the optimizer's own list: under FSDP2, model.parameters() lists the root's unsharded tensors between a
    # forward and its backward, which never receive the (sharded) gradients
    params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
    fresh = not recompute_old_logprobs(ctx)
    for mb in torch.arange(B).chunk(c.train.updates_per_rollout):
        counts = dist.all_reduce_sum([float(batch.loss_mask[mb].sum()), float(len(mb))])
        n_tok, n_seq = max(float(counts[0]), 1.0), float(counts[1])
        micro = plan_microbatches(lengths[mb], micro_batch_size=c.train.micro_batch_size,
                                  max_tokens=c.train.max_tokens_per_microbatch)
        n_micro = dist.all_reduce_max(len(micro))
        ctx.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for k in range(n_micro):
            # under FSDP2 every rank must run the same number of forwards: a rank out of rows runs one row at weight 0
            idx = mb[micro[k]] if k < len(micro) else mb[:1]
            weight = 1.0 if k < len(micro) else 0.0
            sub = batch.select(idx)
            if fresh:  # no old-log-prob pass was run: old = detached current (ratio 1), entropy from this forward
                logp, ent = score_tokens(ctx, ctx.model, sub, entropy=True)
                sub.old_logp = logp.detach().float()
                if weight:
                    batch.entropy[idx, : sub.response_len] = ent.float().cpu()
            else:
                logp = score_tokens(ctx, ctx.model, sub)
            sub = _to(sub, logp.device)
            loss, s = micro_batch_loss(sub, logp.float(), cfg=c.algo, num_tokens=n_tok, num_seqs=n_seq,
                                       norm_const=norm_const, stats=stats if weight else StatSums())
            (loss * weight * dist.world_size()).backward()
            total += loss.detach().double().cpu() * weight
            if weight and "fipo_weight" in s:
                credit[idx, : sub.response_len] = (sub.token_adv * s["fipo_weight"]).cpu()
        loss_sum = float(dist.all_reduce_sum([float(total)])[0])
        gn = torch.nn.utils.clip_grad_norm_(params, c.train.grad_clip if c.train.grad_clip > 0 else float("inf"))
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if not (math.isfinite(loss_sum) and math.isfinite(gn)):
            skipped += 1
            ctx.optimizer.zero_grad(set_to_none=True)
            continue
        ctx.optimizer.step()
        ctx.scheduler.step()
        grad_norms.append(gn)
        losses.append(loss_sum)
    out = stats.means()
    out.update({"loss": float(np.mean(losses)) if losses else float("nan"),
                "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
                "lr": ctx.scheduler.get_last_lr()[0], "nonfinite_updates": float(skipped)})
    return out, credit


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    from dataclasses import fields as dc_fields

    return Batch(**{f.name: (None if getattr(batch, f.name) is None else getattr(batch, f.name).to(device)) for f in dc_fields(batch)})


def rollout_metrics(ctx: Context, roll: Any, sc: Scores, batch: Batch) -> dict[str, float]:
    """Reward, accuracy, group, length and credit statistics of one rollout batch."""
    G = ctx.cfg.rollout.group_size
    total = sc.total  # [B]
    m: dict[str, float] = {"reward/mean": float(total.mean()), "reward/std": float(total.std()) if len(total) > 1 else 0.0}
    for name, vals in sc.per_function.items():
        v = torch.tensor([x for x in vals if x is not None and math.isfinite(x)], dtype=torch.float64)
        if len(v):
            m[f"reward/{name}/mean"] = float(v.mean())
    correct = sc.correct.tolist()
    m["acc"] = float(np.mean(correct)) if correct else 0.0
    grouped = total.view(-1, G)  # [n, G]
    m["frac_zero_var_groups"] = float((grouped.max(1).values == grouped.min(1).values).float().mean())
    p_hat = torch.tensor(correct, dtype=torch.float64).view(-1, G).mean(1)  # [n]
    m["utility/arcsin"] = float((2 * torch.asin(p_hat.sqrt())).mean())  # FRPO's implicit utility of GRPO
    lengths = roll.response_mask.sum(1).float()  # [B]
    m.update(quantiles(lengths.tolist()))
    m["truncation_rate"] = float(roll.truncated.float().mean())
    mask = batch.response_mask.float()  # [B, T]
    n = mask.sum().clamp(min=1)
    m["entropy"] = float((batch.entropy * mask).sum() / n)
    if batch.ref_logp is not None:
        d = batch.old_logp - batch.ref_logp  # [B, T]
        m["kl_ref_rollout"] = float(((torch.exp(-d) + d - 1) * mask).sum() / n)
    shift = (batch.token_adv - batch.seq_adv[:, None] * mask).abs()  # [B, T]: what credit changed
    m["credit/shift_abs_mean"] = float((shift * mask).sum() / n)
    m["credit/shift_gt_adv_frac"] = float(((shift > batch.seq_adv.abs()[:, None]).float() * mask).sum() / n)
    return m


def sample_records(ctx: Context, rows: list[dict[str, Any]], roll: Any, sc: Scores, credit: torch.Tensor) -> list[dict[str, Any]]:
    """A few completions with their tokens and per-token credit, for samples.jsonl and the report."""
    out = []
    G = ctx.cfg.rollout.group_size
    picks = list(range(0, len(rows), G))[: ctx.cfg.train.log_samples]
    for i in picks:
        n = int(roll.response_mask[i].sum())
        ids = roll.response_ids[i, :n].tolist()
        out.append({
            "prompt": rows[i]["prompt"], "answer": str(rows[i].get("answer", "")), "completion": roll.texts[i],
            "reward": float(sc.total[i]), "tokens": [ctx.tokenizer.decode([t]) for t in ids],
            "credit": [round(float(x), 5) for x in credit[i, :n]],
        })
    return out


def train_step(ctx: Context) -> dict[str, float]:
    t0 = time.perf_counter()
    rows, roll, sc, info = rollout_and_score(ctx)
    t1 = time.perf_counter()
    batch = build_batch(ctx, roll, sc, ctx.cfg.train.micro_batch_size)
    t2 = time.perf_counter()
    upd, credit = update(ctx, batch)
    t3 = time.perf_counter()
    if ctx.rollout_model is not ctx.base:
        sync_rollout_weights(ctx)
    m = {**rollout_metrics(ctx, roll, sc, batch), **upd, **info}
    m["time/logprobs"] = t2 - t1
    m["time/update"] = t3 - t2
    m["time/step"] = time.perf_counter() - t0
    m["tokens/trained"] = float(roll.response_mask.sum())  # the rows that reached the update
    step = ctx.state["step"]
    if ctx.logger:
        ctx.logger.samples(step, sample_records(ctx, rows, roll, sc, credit))
    return m


def sync_rollout_weights(ctx: Context) -> None:
    """FSDP2: copy the gathered full weights into the unsharded sampling copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(ctx.base, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    ctx.rollout_model.load_state_dict(full)


# ---------------------------------------------------------------------------- evaluation and the run

def heldout_eval(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy accuracy on the held-out rows (every rank evaluates all rows: forwards stay in step)."""
    from grpokit.report.evaluate import evaluate

    def enc(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
        return encode(ctx, [{"prompt": p} for p in prompts])

    return evaluate(ctx.rollout_model, ctx.tokenizer, rows, reward_set=ctx.rewards, k=1, temperature=0.0,
                    max_new_tokens=ctx.cfg.rollout.max_new_tokens, batch_size=64, seed=ctx.cfg.train.seed,
                    stop_strings=tuple(ctx.cfg.rollout.stop_strings), device=ctx.device, sampler=ctx.sampler,
                    encode=enc)


def save_final(ctx: Context) -> Path:
    """The trained policy in Hugging Face format (LoRA merged), loadable by plain transformers."""
    out = ctx.run_dir / "final"
    state = model_state(ctx)
    if dist.is_main():
        model = ctx.base
        if ctx.cfg.model.lora_r > 0:
            from grpokit.models.lora import merged_copy

            model = merged_copy(model)
        elif ctx.cfg.dist.strategy == "fsdp2" and dist.is_distributed():
            model = ctx.rollout_model
            model.load_state_dict(state)
        model.save_pretrained(out, safe_serialization=True)
        ctx.tokenizer.save_pretrained(out)
    dist.barrier()
    return out


def _fmt(m: dict[str, float]) -> str:
    return f"reward {m.get('reward/mean', float('nan')):.3f} acc {m.get('acc', float('nan')):.3f} len {m.get('len/mean', float('nan')):.1f}"


def train(cfg: Config, *, resume: str | Path | None = None) -> Path:
    """Run a whole training job; returns the run directory."""
    ctx = setup(cfg, resume=resume)
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
    if not (c.save_every and ctx.state["step"] % c.save_every == 0):
        save(ctx)
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
