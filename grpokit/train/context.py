"""What the RL loop holds, how it is built (`setup`), checkpointed (`save`, `restore`) and how new weights
reach the rollout engine (`sync_weights`)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from grpokit import dist
from grpokit.config import Config, ConfigError, save_config
from grpokit.train import checkpoint as ckpt
from grpokit.train.metrics import MetricsLogger


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. repeated non-finite steps); the last good state is checkpointed."""


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is visible; set train.device = 'cpu' or 'auto'")
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
    tokenizer: Any
    ref: Any                        # a frozen reference module, a LoRA adapter switch, or None
    task: Any
    scorer: Any                     # a RewardSet: every scorer's weighted total per sample
    engine: Any                     # a RolloutEngine (grpokit.rollout.engine)
    transforms: list                # (name, fn) batch transforms, in order
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data_rng: random.Random
    autocast: Any
    unsharded: torch.nn.Module | None = None  # FSDP2: an unsharded copy of the policy (the hf engine samples it)
    logger: MetricsLogger | None = None
    state: dict[str, Any] = field(default_factory=dict)
    teacher: Any = None             # model.teacher, frozen (algo.distill), or None
    rollouts: Any = None            # rollout.async_rollouts: the pending collect (grpokit.train.async_rollout)


def build_scorer(cfg: Config, reward_funcs: Sequence[Any] | None = None) -> Any:
    """The RewardSet of `rewards.functions` (names, 'module:function' specs) or of the given callables."""
    from grpokit.rewards import RewardSet

    r = cfg.rewards
    funcs = list(reward_funcs) if reward_funcs is not None else list(r.functions)
    weights = r.weights or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"rewards.weights has {len(weights)} entries for {len(funcs)} reward functions; give one weight per function")
    specs = []
    for fn, w in zip(funcs, weights):
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)
        specs.append((fn, w, dict(r.options.get(name, {}))))
    return RewardSet(specs, on_error=r.on_error, timeout_s=r.timeout_s or None, concurrent=r.concurrent)


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


def check_launch(cfg: Config) -> None:
    """Refuse a torchrun launch that would train W separate models (dist.strategy = 'none')."""
    if dist.launched_by_torchrun() and dist.world_size() > 1 and cfg.dist.strategy == "none":
        raise ConfigError(
            f"launched by torchrun with {dist.world_size()} processes but dist.strategy = 'none': every rank "
            f"would train its own copy on its own gradients and the copies would drift apart; set "
            f"dist.strategy = 'ddp' or 'fsdp2', or run one process without torchrun"
        )
    if dist.is_distributed() and cfg.rollout.prompts_per_step < dist.world_size():
        raise ConfigError(
            f"rollout.prompts_per_step = {cfg.rollout.prompts_per_step} is less than the {dist.world_size()} ranks: "
            f"some rank would get no prompt; set rollout.prompts_per_step >= the number of processes"
        )


def setup(cfg: Config, *, resume: str | Path | None = None, model: Any = None, tokenizer: Any = None,
          task: Any = None, reward_funcs: Sequence[Callable[..., Any] | str] | None = None) -> Context:
    """Build the run: process group, model (+LoRA, gradient checkpointing, reference), engine, scorer,
    transforms, optimizer; restore a checkpoint when resuming. `model`/`tokenizer`/`task`/`reward_funcs`
    replace what the config names (the Python API, `grpokit.train(...)`)."""
    from grpokit.data import get_task
    from grpokit.models import autocast_context, load_model, quantized_ref_model, ref_model
    from grpokit.rollout.engine import build_engine
    from grpokit.train.teacher import load_teacher, needs_reference
    from grpokit.transforms import build_transforms

    device = pick_device(cfg.train.device)
    dist.init(cfg.dist.backend, device)
    check_launch(cfg)
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

    if model is None:
        model, tokenizer = load_model(cfg.model.name)
    elif tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=... too")
    else:
        from grpokit.models import normalize_tokenizer

        tokenizer = normalize_tokenizer(tokenizer, model)
    ref: Any = None
    if cfg.model.lora_r > 0:
        from grpokit.models.lora import apply_lora

        model = apply_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha,
                           dropout=cfg.model.lora_dropout, targets=cfg.model.lora_targets)
    model.to(device)
    if cfg.model.gradient_checkpointing:
        from grpokit.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    if needs_reference(cfg.algo):  # beta = 0 never loads a reference model (SPEC 4), unless G-OPD or ACE reads it
        m = cfg.model
        ref = AdapterOff(model) if m.lora_r > 0 else quantized_ref_model(
            model, m.ref_quantization, group_size=m.ref_quant_group_size, embeddings=m.ref_quant_embeddings).to(device)
    teacher = load_teacher(cfg, tokenizer, device) if cfg.algo.distill != "none" else None  # like the reference
    shard = cfg.dist.strategy == "fsdp2" and dist.is_distributed()
    # FSDP2 shards the trained module in place: the engine then runs an unsharded copy, made before sharding
    # and re-synced after every optimizer step (and after a restore)
    # asynchronous rollouts: the engine samples its own copy while the update changes the trained one
    rollout_model = ref_model(model) if shard or cfg.rollout.async_rollouts else model
    shard_or_async = shard or cfg.rollout.async_rollouts
    wrapped = dist.wrap(model, cfg.dist.strategy, device)
    from grpokit.rollout.engine import ENGINES

    sections = {k: getattr(cfg.rollout, k) for k in getattr(ENGINES.get(cfg.rollout.engine), "config_sections", ())}
    extra = {**sections, "seed": cfg.train.seed} if sections else {}  # the vLLM engines' rollout.vllm/.server
    engine = build_engine(cfg.rollout.engine, rollout_model, tokenizer, device=device,
                          precision=cfg.model.precision if cfg.rollout.precision == "same" else cfg.rollout.precision,
                          shares_weights=not shard_or_async, **extra)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, foreach=False)
    warm = max(cfg.train.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ctx = Context(
        cfg=cfg, run_dir=run_dir, device=device, model=wrapped, base=model, tokenizer=tokenizer, ref=ref,
        task=task if task is not None else get_task(cfg.data.task, **cfg.data.task_options),
        scorer=build_scorer(cfg, reward_funcs), engine=engine, transforms=build_transforms(cfg),
        optimizer=optimizer, scheduler=scheduler, data_rng=random.Random(cfg.train.seed),
        autocast=autocast_context(device, cfg.model.precision), unsharded=rollout_model if shard else None,
        state={"step": 0, "nonfinite_streak": 0, "nonfinite_total": 0}, teacher=teacher,
    )
    if resume:
        restore(ctx, resume)
        sync_weights(ctx)  # the engine samples the restored weights, not the initial ones
    ctx.logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, resume_step=ctx.state["step"], enabled=dist.is_main())
    return ctx


# ---------------------------------------------------------------------------- weights and checkpoints

def sharded(ctx: Context) -> bool:
    return ctx.cfg.dist.strategy == "fsdp2" and dist.is_distributed()


def model_state(ctx: Context) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of the policy; a collective under FSDP2 (every rank calls it)."""
    return dist.full_model_state(ctx.base, sharded(ctx))


def optim_state(ctx: Context) -> dict[str, Any]:
    return dist.full_optim_state(ctx.base, ctx.optimizer, sharded(ctx))


def sync_weights(ctx: Context) -> float:
    """Hand the policy's current weights to the engine; returns the seconds it took. An engine that runs the
    trained module itself ignores them, so the full state is gathered only for engines that need it."""
    t0 = time.perf_counter()
    if getattr(ctx.engine, "shares_weights", False):
        return 0.0
    if sharded(ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(ctx.base, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        full = ctx.base.state_dict()
    ctx.engine.load_weights(full.items())
    return time.perf_counter() - t0


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
    extra = {}
    if ctx.rollouts is not None:  # asynchronous rollouts: what regenerates the in-flight batch on resume
        more, files = ctx.rollouts.checkpoint_parts()  # sampler.safetensors (+ sampler_w<j> with max_staleness > 1)
        state.update(more)
        extra.update(files)
    path = None
    if dist.is_main():
        path = ckpt.save_checkpoint(ctx.run_dir, ctx.state["step"], model_state=m, optim_state=o,
                                    generator=None, state=state, keep_last=ctx.cfg.train.keep_last, extra_tensors=extra)
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
    ctx.state["checkpoint"] = str(path)  # asynchronous rollouts read their pending batch's state from it
    dist.load_full_state(ctx.base, ctx.optimizer, m, o, sharded(ctx))
    ctx.scheduler.load_state_dict(state["scheduler"])
    ctx.data_rng.setstate(ckpt._tuple(state["data_rng"]))
    if state.get("task") is not None and hasattr(ctx.task, "load_state_dict"):
        ctx.task.load_state_dict(state["task"])
    # sampling needs no saved generator: each row's seed is derived from (seed, step, round, global row), so a
    # run resumes on the same or another world size with the rollouts it would have drawn
    for k in ("step", "nonfinite_streak", "nonfinite_total", "eval_before"):
        ctx.state[k] = state.get(k, ctx.state.get(k))


def save_final(ctx: Context) -> Path:
    """The trained policy in Hugging Face format (LoRA merged), loadable by plain transformers."""
    out = ctx.run_dir / "final"
    state = model_state(ctx)
    if dist.is_main():
        model = ctx.base
        if sharded(ctx):  # the sharded module holds DTensor shards: save through the unsharded copy
            model = ctx.unsharded
            model.load_state_dict(state)
        if ctx.cfg.model.lora_r > 0:
            from grpokit.models.lora import merged_copy

            model = merged_copy(model)
        model.save_pretrained(out, safe_serialization=True)
        ctx.tokenizer.save_pretrained(out)
    dist.barrier()
    return out
