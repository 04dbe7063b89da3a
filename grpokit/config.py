"""The one typed configuration tree. Every field is documented once, here; `grpokit train --help` shows it.

A recipe is a TOML file whose tables mirror the sections below (`[model]`, `[data]`, `[rollout]`,
`[rewards]`, `[algo]`, `[train]`, `[dist]`). Overrides use dotted paths: `--set algo.beta=0.01`.
A misspelt field fails with the nearest valid name; the resolved config is saved in the run directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached (shown by `grpokit train --help`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = doc("Policy model: a built-in name (smollm2-135m, tiny-char), a local HF directory or a hub id.", "smollm2-135m")
    precision: str = doc("Compute precision: 'auto' (bf16 autocast where the device supports it), 'bf16' or 'fp32'. Weights and optimizer stay fp32.", "auto")
    gradient_checkpointing: bool = doc("Recompute activations in the backward pass to save memory.", False)
    lora_r: int = doc("LoRA rank (0 = full fine-tuning). With LoRA the reference log-probs come from the same model with adapters disabled.", 0)
    lora_alpha: float = doc("LoRA scaling alpha.", 16.0)
    lora_dropout: float = doc("LoRA dropout.", 0.0)
    lora_targets: list[str] = doc("Module names LoRA adapts.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    ref_quantization: str = doc("Hold the frozen KL reference (algo.beta > 0, full fine-tuning) weight-only quantized: 'none', 'int8' (per output channel) or 'int4' (group-wise). benchmarks/README.md has its measured log-prob and k3 error.", "none")
    ref_quant_group_size: int = doc("Input features per int4 scale/offset of the quantized reference (even).", 64)
    ref_quant_embeddings: bool = doc("Also quantize the reference's input embedding and output head (default: full precision).", False)
    teacher: str = doc("Teacher model of algo.distill (KDRL, G-OPD): a local HF directory or a hub id whose tokenizer is the policy's (checked at start-up). Loaded like the reference: a frozen full copy on every rank, scored without grad under model.precision ('' = none).", "")
    teacher_quantization: str = doc("Hold the teacher weight-only quantized, as model.ref_quantization does the reference: 'none', 'int8' or 'int4' (group size and embeddings as model.ref_quant_group_size / ref_quant_embeddings).", "none")


@dataclass
class DataConfig:
    task: str = doc("Training task: 'arith', 'rg:<reasoning-gym task>', a .jsonl/.parquet path, or 'hf:<dataset>'.", "arith")
    task_options: dict[str, Any] = doc("Keyword options passed to the task (e.g. column mapping, digit range).", factory=dict)
    heldout_size: int = doc("Held-out problems evaluated greedily before and after training (0 = skip).", 100)
    system_prompt: str = doc("System message for the chat template ('' = the tokenizer's default).", "")
    chat_template: bool = doc("Wrap prompts in the tokenizer's chat template.", True)


@dataclass
class VLLMConfig:
    dtype: str = doc("vLLM's weight dtype: '' (model.precision: fp32 -> float32, bf16 -> bfloat16), 'float32', 'bfloat16' or 'float16'.", "")
    gpu_memory_utilization: float = doc("vLLM on a GPU: the fraction of its memory vLLM may take (weights, activations, KV cache).", 0.3)
    enforce_eager: bool = doc("Run vLLM without CUDA graphs / compilation (faster start, slower decode on a GPU; the CPU build needs it).", True)
    max_model_len: int = doc("Longest prompt + response vLLM plans for (0 = 2048, capped by the model's own).", 0)
    kv_cache_gb: int = doc("vLLM's CPU build: GiB of memory for its KV cache (VLLM_CPU_KVCACHE_SPACE).", 1)
    sleep: bool = doc("vLLM on a GPU: free its weights and KV cache during the update (sleep level 1, woken before the weight sync); ignored on CPU.", False)
    lora_sync: str = doc("With LoRA (model.lora_r > 0), what a weight sync sends: 'merged' (W + (alpha/r) B A, vLLM runs a plain model; both engines) or 'adapter' (vLLM runs the base model with LoRA on; each sync writes the PEFT adapter to lora_vN and serves it as 'policy-vN': /v1/load_lora_adapter on the server, a LoRARequest per generate in process; the base weights never change).", "merged")


@dataclass
class ServerConfig:
    launch: bool = doc("rollout.engine = 'vllm_server': start the server as a subprocess on 127.0.0.1 (true) or use rollout.server.url (false).", True)
    url: str = doc("An already running vLLM OpenAI-compatible server, e.g. 'http://127.0.0.1:8000' (launch = false).", "")
    python: str = doc("Python of the launched server ('' = .vllm-venv/bin/python when it exists, else this interpreter).", "")
    startup_timeout_s: float = doc("How long a launched server may take to answer /health.", 300.0)
    request_timeout_s: float = doc("Time limit of one request; a request that times out is retried with backoff.", 300.0)
    retries: int = doc("Attempts per request (timeouts, connection errors) and restarts of a launched server that died, per call.", 3)
    concurrency: int = doc("Completion requests in flight at once.", 16)
    weights_dir: str = doc("Where weight syncs write safetensors for the server to read ('' = a temporary directory, removed at the end).", "")
    args: list[str] = doc("Extra command-line arguments for a launched `vllm serve`.", factory=list)


@dataclass
class RolloutConfig:
    prompts_per_step: int = doc("Prompts sampled per training step (each gets group_size completions).", 8)
    group_size: int = doc("G: completions sampled per prompt.", 8)
    max_new_tokens: int = doc("Maximum response length in tokens.", 64)
    temperature: float = doc("Sampling temperature (also applied to the trainer's log-probs, as verl and TRL do).", 1.0)
    top_p: float = doc("Nucleus sampling threshold (1.0 = off).", 1.0)
    top_k: int = doc("Top-k sampling (0 = off).", 0)
    stop_strings: list[str] = doc("Strings that end a response (besides EOS).", factory=list)
    engine: str = doc("Rollout engine (`grpokit list engine`): 'hf', the in-process KV-cache sampler; 'vllm' (vLLM's LLM in this process) or 'vllm_server' (an OpenAI-compatible vLLM server), both needing vLLM installed (`make vllm-env`).", "hf")
    precision: str = doc("The engine's compute precision: 'same' (model.precision), 'auto', 'bf16' or 'fp32'. A sampler in bf16 under an fp32 trainer reports log-probs μ that differ from the trainer's ℓ° (SPEC 12).", "same")
    correction: str = doc("Rollout correction (SPEC 12): 'auto' (token_tis where the engine's log-probs can differ from the trainer's: the vLLM engines, hf sampling in bf16; 'none' for hf in fp32), 'none', 'bypass' (no ℓ° pass: ratio exp(ℓ − μ)) or a decoupled mode of `grpokit list correction`: token_tis, seq_tis, token_mask, seq_mask, geo_mask.", "auto")
    correction_low: float | None = doc("Lower ratio bound of the mask modes (unset: 1/correction_high; geo_mask 0.99).", None)
    async_rollouts: bool = doc("Asynchronous rollouts (SPEC 12; also spelt rollout.async): generate the next steps' batches in a background thread while the update runs (one process; the engine samples its own copy of the policy, rollout.max_staleness updates old at most). The rollout correction ('auto': token_tis) covers the lag; resume regenerates the in-flight batches exactly.", False)
    max_staleness: int = doc("With rollout.async_rollouts: s, how many batches are generated ahead. Step t's batch is sampled with the weights after update max(t-1-s, 0), so it lags the trained policy by min(s, t-1) updates (logged as async/staleness); at most s batches in flight, s copies of the weights kept on the CPU. 1: step k+1's batch overlaps step k's update.", 1)
    correction_high: float | None = doc("C of the TIS modes (token_tis 2, seq_tis 3) or upper ratio bound of the mask modes (token_mask 2, seq_mask 3, geo_mask 1.01); unset: the mode's own.", None)
    vllm: VLLMConfig = doc("Options of the 'vllm' and 'vllm_server' engines (a section: rollout.vllm.<field>).", factory=VLLMConfig)
    server: ServerConfig = doc("The 'vllm_server' engine's server (a section: rollout.server.<field>).", factory=ServerConfig)


@dataclass
class RewardsConfig:
    functions: list[str] = doc("Reward functions: registered names or 'module:function'. Each is (prompts, completions, **columns) -> list[float|None].", factory=lambda: ["numeric_match"])
    weights: list[float] = doc("Weight of each reward function (default 1 each).", factory=list)
    options: dict[str, dict[str, Any]] = doc("Per-function keyword options, keyed by function name.", factory=dict)
    on_error: str = doc("When a reward function raises or times out: 'raise' (stop, naming the sample), 'zero' or 'skip' (drop the sample).", "raise")
    timeout_s: float = doc("Per-call time limit for a reward function in seconds (0 = none).", 0.0)
    concurrent: bool = doc("Run the reward functions of a batch at the same time, one thread each (for scorers that wait on an endpoint, a reward model or a sandbox).", False)
    overlong_buffer: int = doc("DAPO overlong shaping buffer L_c in tokens (0 = off); L_max is rollout.max_new_tokens.", 0)


#: AlgoConfig fields that are loss hyperparameters -> the keyword the losses declare (SPEC 2, 6).
#: Unset (None) means "the chosen loss's own default" (its signature's); a field set explicitly (in a
#: recipe, a keyword section or --set) is passed on, and is an error if the chosen loss does not take it.
LOSS_HPARAMS: dict[str, str] = {
    "clip_low": "clip_low", "clip_high": "clip_high", "dual_clip_c": "dual_clip_c",
    "fipo_tau": "tau", "fipo_f_low": "f_low", "fipo_f_high": "f_high", "fipo_safety": "safety",
    "fipo_drop_seqs": "drop_seqs",
    "kl_cov_ratio": "kl_cov_ratio", "kl_cov_coef": "kl_cov_coef", "sapo_tau_pos": "tau_pos", "sapo_tau_neg": "tau_neg",
}
#: AlgoConfig fields that are token-mask hyperparameters (SPEC 11) -> the keyword the masks declare; unset
#: (None) means the chosen mask's own default, and a set field the chosen algo.token_mask does not take is an error.
TOKEN_MASK_HPARAMS: dict[str, str] = {
    "mask_delta": "delta", "clip_cov_ratio": "ratio", "clip_cov_lb": "cov_lb", "clip_cov_ub": "cov_ub",
}
#: Loss hyperparameters whose config value 0 means "off" (the keyword None).
OFF_AT_ZERO = frozenset({"dual_clip_c", "fipo_safety"})


@dataclass
class AlgoConfig:
    advantage: str = doc("Advantage estimator (SPEC 1): grpo, dr_grpo, batch_std, rloo.", "grpo")
    std: str = doc("Std convention of grpo: 'unbiased' (torch/verl/TRL) or 'population' (the FRPO paper).", "unbiased")
    adv_eps: float = doc("epsilon added to the group std.", 1e-6)
    credit: str = doc("Token credit (SPEC 7): 'broadcast' (A_i on every token) or 'frpo' (A_i - beta * KL-to-go).", "broadcast")
    divergence: str = doc("FRPO generator: 'k1' (reverse KL), 'k3' (reverse k3) or 'forward'.", "k1")
    loss: str = doc("Policy loss (SPEC 2, 6): ppo_clip, gspo, cispo, fipo.", "ppo_clip")
    aggregation: str = doc("Loss aggregation (SPEC 3): token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm.", "token_mean")
    norm_const: int = doc("C of seq_mean_token_sum_norm (0 = rollout.max_new_tokens).", 0)
    clip_low: float | None = doc("epsilon_low of the ratio clip (unset: the loss's own, see SPEC 2; CISPO's 1.0 means no lower bound).", None)
    clip_high: float | None = doc("epsilon_high of the ratio clip (unset: the loss's own; DAPO clip-higher is 0.28).", None)
    dual_clip_c: float | None = doc("Dual-clip constant c > 1 for A < 0, 0 = off (unset: the loss's own; verl uses 3, FIPO 10).", None)
    beta: float = doc("KL coefficient to the reference model (0 = no reference model is loaded).", 0.0)
    kl_estimator: str = doc("KL estimator for kl_placement='loss': k1, k2, k3.", "k3")
    kl_placement: str = doc("Where the KL goes: 'loss' (beta*k per token), 'reward' (R -= beta*sum k1) or 'advantage' (FRPO, needs credit='frpo').", "loss")
    kl_source: str = doc("FRPO (SPEC 7): the log-probs of its KL-to-go, 'old' (the rollout policy's, fixed for the rollout) or 'current' (recomputed in every micro-batch from the detached current log-probs).", "old")
    seq_weight: str = doc("GSPO's sequence weights s_i (SPEC 8): 'none', 'min_replace' or 'adv_orthogonal' (stop-gradient transforms, per group over each optimizer step's rows, that restore the cancellation of shared tokens).", "none")
    fipo_tau: float | None = doc("FIPO half-life tau of the future-KL discount, in tokens (gamma = 2^(-1/tau)).", None)
    fipo_f_low: float | None = doc("FIPO lower clip of the influence weight f.", None)
    fipo_f_high: float | None = doc("FIPO upper clip of the influence weight f.", None)
    fipo_safety: float | None = doc("FIPO safety threshold: for A<0 and ratio > safety, f is clamped to [0.8, 1] (0 = off).", None)
    fipo_drop_seqs: bool | None = doc("FIPO: drop a sequence with more than one negative-advantage token past the dual-clip threshold (official code).", None)
    kl_cov_ratio: float | None = doc("KL-Cov (algo.loss = 'kl_cov', SPEC 11): fraction kappa of an optimizer step's loss tokens, those of largest covariance, that get the |l - l_old| penalty (k = max(floor(kappa*N), 1)).", None)
    kl_cov_coef: float | None = doc("KL-Cov: coefficient of the |l - l_old| penalty on the selected tokens (verl's ppo_kl_coef).", None)
    sapo_tau_pos: float | None = doc("SAPO (algo.loss = 'sapo', SPEC 11): gate temperature for tokens with A > 0.", None)
    sapo_tau_neg: float | None = doc("SAPO: gate temperature for tokens with A <= 0 (larger = faster decay off-policy).", None)
    token_mask: str = doc("Token mask applied after any loss (SPEC 11, `grpokit list token_mask`): 'none', 'dppo' (drop tokens whose ratio leaves [1/delta, delta]) or 'clip_cov' (detach random high-covariance tokens, arXiv 2505.22617).", "none")
    mask_delta: float | None = doc("DPPO / IcePop mask (algo.token_mask = 'dppo'): delta > 1 of the kept ratio band [1/delta, delta] (default 8, prime-rl's).", None)
    clip_cov_ratio: float | None = doc("Clip-Cov (algo.token_mask = 'clip_cov'): fraction r of an optimizer step's loss tokens to detach, k = max(floor(r*N), 1) (default 2e-4).", None)
    clip_cov_lb: float | None = doc("Clip-Cov: lower bound of the covariance band of candidate tokens (default 1).", None)
    clip_cov_ub: float | None = doc("Clip-Cov: upper bound of the covariance band of candidate tokens (default 5).", None)
    dynamic_sampling: bool = doc("DAPO dynamic sampling: drop groups with all-equal rewards and sample more prompts.", False)
    max_gen_batches: int = doc("Dynamic sampling: at most this many rollout rounds per step.", 3)
    overlong_filter: bool = doc("DAPO overlong filtering: truncated responses are masked out of the loss.", False)
    dynamic_sampling_metric: str = doc("What dynamic sampling compares within a group: 'acc' (task correctness, as DAPO and verl's filter_groups.metric=acc) or 'reward' (the shaped total).", "acc")
    transforms: list[str] = doc("Extra batch transforms (`grpokit list transform`): SPEC 11's 'dot', 'truncation_penalty' and 'grpo_lambda' run before dynamic sampling (their papers' order), others after overlong shaping/filtering and dynamic sampling.", factory=list)
    distill: str = doc("Distillation inside RL from model.teacher (`grpokit list distill`, docs/catalogue.md): 'none', 'kdrl' (+ beta * k2(l, l_teacher) in the loss on failed responses, arXiv 2506.02208) or 'gopd' (G-OPD/ExOPD dense per-token advantage, arXiv 2602.12125).", "none")
    kdrl_beta_start: float = doc("KDRL: coefficient of the teacher k2 term at the first step (the paper's 5e-3).", 5e-3)
    kdrl_beta_end: float = doc("KDRL: coefficient at the last annealing step (the paper's 1e-3); linear in between.", 1e-3)
    kdrl_anneal_steps: int = doc("KDRL: RL steps over which the coefficient anneals from start to end, then held (0 = train.steps).", 0)
    kdrl_responses: str = doc("KDRL: which responses get the teacher term, 'failed' (task correctness reward below 1: the paper's reward-guided masking) or 'all'.", "failed")
    gopd_lambda: float = doc("G-OPD reward scaling factor lambda: 1.0 = standard on-policy distillation, 1.25 = ExOPD (reward extrapolation). lambda != 1 reads the reference model's log-probs, which is then loaded even with algo.beta = 0.", 1.25)
    gopd_outcome_weight: float = doc("G-OPD: weight w of the outcome advantage added to the dense reward, A = w * A_outcome + r_dense (0 = the paper's pure distillation).", 0.0)
    # ---- SPEC 11, the catalogue (docs/catalogue.md): ACE, GRPO-lambda, DOT, DLER, APO, RAPO
    adv_transform: str = doc("Transform of the group advantages before token credit (`grpokit list adv_transform`): 'none' or 'ace' (arXiv 2602.21420: A_i < 0 scaled by 1 + ace_alpha * softplus(c_i), c_i the rollout's log-ratio to the reference; loads the reference model even with beta = 0).", "none")
    ace_alpha: float = doc("ACE's alpha, the strength of the extra penalty on confident errors.", 1.0)
    kl_weight: str = doc("Per-sequence weight of the KL in the loss (`grpokit list kl_weight`): 'constant' (beta) or 'apo' (APO/DADS: beta * (1 - exp(-apo_e * (1 - group accuracy))) on correct samples).", "constant")
    apo_e: float = doc("APO/DADS: the rate e in 1 - exp(-e * (1 - d)) (default Euler's number, as SPEC 11 writes it).", math.e)
    grpo_lambda_frac: float = doc("GRPO-lambda (transform 'grpo_lambda', arXiv 2505.18086): the fraction lambda of groups, by accuracy, whose correct answers get the length penalty.", 0.2)
    grpo_lambda_alpha: float = doc("GRPO-lambda: the length penalty strength alpha (correct reward 1 - alpha * sigmoid(z), z the length z-score among the group's correct answers).", 0.6)
    dot_std_mult: float = doc("DOT (transform 'dot', arXiv 2601.03969): the cut T = floor(mean + dot_std_mult * std) of an all-correct group's lengths (with the unbiased std a member can pass mean + 3 std only in groups of 11 or more).", 3.0)
    dot_margin: int = doc("DOT: a response is cut only when it is at least this many tokens longer than T.", 32)
    length_cap: int = doc("DLER's truncation penalty (transform 'truncation_penalty', arXiv 2510.15110): responses longer than this many tokens get reward 0 (0 = rollout.max_new_tokens; responses that hit the generation limit are always penalised).", 0)


@dataclass
class TrainConfig:
    steps: int = doc("Training steps (one rollout batch each).", 20)
    updates_per_rollout: int = doc("Optimizer steps (mini-batches) per rollout batch. FIPO needs >= 2 to act.", 1)
    micro_batch_size: int = doc("Sequences per forward/backward micro-batch (gradient accumulation).", 16)
    max_tokens_per_microbatch: int = doc("Pack micro-batches by token count instead of micro_batch_size (0 = off).", 0)
    pack_prompts: bool = doc("Score each group's shared prompt once (one packed sequence per group with a block attention mask) where it costs less than scoring every row; same log-probs to float rounding.", True)
    old_logprobs: str = doc("Old-policy log-probs: 'auto' (with updates_per_rollout = 1 the policy has not moved since sampling, so no separate pass: the ratio uses the detached current log-probs, as TRL does) or 'recompute' (always a separate forward pass, verl's default).", "auto")
    lr: float = doc("AdamW learning rate.", 1e-6)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    betas: list[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.99])
    warmup_steps: int = doc("Linear learning-rate warm-up, in optimizer steps.", 0)
    grad_clip: float = doc("Gradient-norm clip (0 = off).", 1.0)
    seed: int = doc("Seed for data, sampling and initialisation.", 0)
    run_dir: str = doc("Run directory ('' = runs/<recipe>-<time>).", "")
    save_every: int = doc("Checkpoint every N steps (0 = only at the end).", 0)
    keep_last: int = doc("Checkpoints kept.", 2)
    log_samples: int = doc("Sample completions written to samples.jsonl per step.", 2)
    threads: int = doc("torch CPU threads (0 = torch's default).", 0)
    max_nonfinite: int = doc("Stop after this many non-finite steps in a row (each is skipped).", 3)
    tensorboard: bool = doc("Write TensorBoard event files.", True)
    device: str = doc("'auto', 'cpu' or 'cuda'.", "auto")
    progress: bool = doc("Show a progress bar.", True)
    report: bool = doc("Write report.html at the end.", True)
    final_eval: bool = doc("Evaluate the held-out set before and after training.", True)
    deterministic: bool = doc("torch deterministic algorithms (for exact resume tests).", False)


@dataclass
class DistConfig:
    strategy: str = doc("Data parallelism under torchrun: 'none', 'ddp' or 'fsdp2'.", "none")
    backend: str = doc("Process-group backend ('' = nccl on CUDA, gloo on CPU).", "")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    recipe: str = doc("Recipe name (set from the TOML file name).", "custom")


# ---------------------------------------------------------------------------- building and checking

def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if origin in (Union, UnionType):  # `X | None`: a set value is an X (TOML has no null)
        (typ,) = [t for t in get_args(typ) if t is not type(None)]
        return _coerce(value, typ, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(typ)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config field '{where}'{hint} (valid: {', '.join(prefix + n for n in names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; set its fields, e.g. {where}.{dataclasses.fields(current)[0].name}=...")
            _merge(current, value, f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['algo.beta=0.01', ...] -> nested dict. Values are TOML literals; bare words are strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value, e.g. algo.beta=0.01")
        path, text = item.split("=", 1)
        node = out
        keys = path.strip().split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = _parse_value(text.strip())
    return out


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def read_recipe(path: str | Path, *, kind: str = "recipe", hint: str = "`grpokit list recipes` shows the bundled ones") -> dict[str, Any]:
    """The tables of a TOML recipe, with `recipe` set from its file name; a missing or invalid file is a
    ConfigError naming it (`kind`: 'recipe', 'SFT recipe', ...; `hint`: where the bundled ones are)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{kind} '{path}' not found; {hint}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{kind} '{path}' is not valid TOML: {e}") from None
    data.setdefault("recipe", path.stem)
    return data


#: Other spellings of a field whose name is a Python keyword: (section, alias) -> the field.
FIELD_ALIASES = {("rollout", "async"): "async_rollouts"}


def _resolve_aliases(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Rename the aliases of FIELD_ALIASES in one source of settings (`where`: the recipe, the overrides, ...)."""
    for (section, alias), name in FIELD_ALIASES.items():
        table = data.get(section)
        if isinstance(table, dict) and alias in table:
            if name in table:
                raise ConfigError(f"{where} sets both {section}.{alias} and {section}.{name}, which are one field "
                                  f"({alias} is its other spelling); keep one of them")
            data[section] = table = dict(table)  # the caller's table stays as it was
            table[name] = table.pop(alias)
    return data


def build(cfg: Any, data: dict[str, Any], sections: dict[str, Any], overrides: list[str] | None) -> Any:
    """`cfg` (a config dataclass of defaults) <- recipe tables <- keyword sections <- `--set` overrides."""
    _resolve_aliases(data, "the recipe")
    _deep_update(data, _resolve_aliases(dict(sections), "the keyword sections"))
    _deep_update(data, _resolve_aliases(parse_overrides(overrides or []), "the --set overrides"))
    _merge(cfg, data, "")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **sections: Any) -> Config:
    """Defaults <- TOML recipe <- keyword sections <- `--set` overrides, then validated."""
    cfg = build(Config(), read_recipe(path) if path is not None else {}, sections, overrides)
    validate(cfg)
    return cfg


def _check_loss_hparams(a: AlgoConfig, losses: Any) -> None:
    """Every loss hyperparameter the user set must be one the chosen loss takes, and in range."""
    taken = losses.accepts(a.loss)
    for fname, kw in LOSS_HPARAMS.items():
        value = getattr(a, fname)
        if value is None:
            continue
        if taken is not None and kw not in taken:
            takers = [n for n in losses.names() if kw in (losses.accepts(n) or {kw})]
            raise ConfigError(
                f"algo.{fname} = {value!r} is set, but algo.loss = '{a.loss}' does not take it (it is used by: "
                f"{', '.join(takers)}); remove algo.{fname} from the recipe/overrides or choose a loss that uses it"
            )
    for fname in ("clip_low", "clip_high"):
        value = getattr(a, fname)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"algo.{fname} must be a number >= 0, got {value}")
    if a.dual_clip_c is not None and a.dual_clip_c != 0 and not a.dual_clip_c > 1:
        raise ConfigError(f"algo.dual_clip_c must be > 1 (or 0 = off), got {a.dual_clip_c}")
    if a.fipo_safety is not None and a.fipo_safety < 0:
        raise ConfigError(f"algo.fipo_safety must be > 0 (or 0 = off), got {a.fipo_safety}")
    if a.fipo_tau is not None and not a.fipo_tau > 0:
        raise ConfigError(f"algo.fipo_tau must be > 0 tokens (inf = no discount), got {a.fipo_tau}")
    lo = a.fipo_f_low if a.fipo_f_low is not None else losses.defaults(a.loss).get("f_low")
    hi = a.fipo_f_high if a.fipo_f_high is not None else losses.defaults(a.loss).get("f_high")
    if lo is not None and hi is not None and not 0 <= lo <= hi:
        raise ConfigError(f"FIPO needs 0 <= algo.fipo_f_low <= algo.fipo_f_high, got {lo} and {hi}")


def _check_distill(cfg: Config) -> None:
    """algo.distill needs a teacher, and its coefficients must be usable numbers (docs/catalogue.md)."""
    a, m = cfg.algo, cfg.model
    if a.distill != "none" and not m.teacher:
        raise ConfigError(
            f"algo.distill = '{a.distill}' distils from a teacher model, but model.teacher is not set; set model.teacher "
            "to a local model directory or hub id that uses the policy's tokenizer, or set algo.distill = 'none'"
        )
    if m.teacher_quantization not in ("none", "int8", "int4"):
        raise ConfigError(f"model.teacher_quantization = {m.teacher_quantization!r} is not one of none, int8, int4")
    if a.kdrl_responses not in ("failed", "all"):
        raise ConfigError(f"algo.kdrl_responses = {a.kdrl_responses!r} is not one of failed, all")
    for fname in ("kdrl_beta_start", "kdrl_beta_end"):
        value = getattr(a, fname)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"algo.{fname} must be a number >= 0 (the paper anneals 5e-3 -> 1e-3), got {value}")
    if a.kdrl_anneal_steps < 0:
        raise ConfigError(f"algo.kdrl_anneal_steps must be >= 0 (0 = train.steps), got {a.kdrl_anneal_steps}")
    if not (math.isfinite(a.gopd_lambda) and a.gopd_lambda >= 0):
        raise ConfigError(f"algo.gopd_lambda must be a number >= 0 (1.0 = standard OPD, 1.25 = ExOPD), got {a.gopd_lambda}")
    if not math.isfinite(a.gopd_outcome_weight):
        raise ConfigError(f"algo.gopd_outcome_weight must be a finite number, got {a.gopd_outcome_weight}")


def _check_catalogue(cfg: Config) -> None:
    """SPEC 11's options (docs/catalogue.md): names, ranges and the combinations they need."""
    a, r = cfg.algo, cfg.rollout
    if a.adv_transform == "ace" and not (math.isfinite(a.ace_alpha) and a.ace_alpha > 0):
        raise ConfigError(f"algo.ace_alpha must be a number > 0 with algo.adv_transform = 'ace', got {a.ace_alpha}")
    if a.kl_weight != "constant" and not (a.beta > 0 and a.kl_placement == "loss"):
        raise ConfigError(
            f"algo.kl_weight = '{a.kl_weight}' weights the KL term in the loss per sequence; set algo.beta > 0 and "
            "algo.kl_placement = 'loss', or set algo.kl_weight = 'constant'"
        )
    if not (math.isfinite(a.apo_e) and a.apo_e > 0):
        raise ConfigError(f"algo.apo_e must be a number > 0, got {a.apo_e}")
    if not 0 < a.grpo_lambda_frac <= 1:
        raise ConfigError(f"algo.grpo_lambda_frac must be in (0, 1] (the paper uses 0.2), got {a.grpo_lambda_frac}")
    if not (math.isfinite(a.grpo_lambda_alpha) and a.grpo_lambda_alpha >= 0):
        raise ConfigError(f"algo.grpo_lambda_alpha must be a number >= 0, got {a.grpo_lambda_alpha}")
    if not (math.isfinite(a.dot_std_mult) and a.dot_std_mult >= 0):
        raise ConfigError(f"algo.dot_std_mult must be a number >= 0 (the paper uses 3), got {a.dot_std_mult}")
    if a.dot_margin < 1:
        raise ConfigError(f"algo.dot_margin must be >= 1 token (the paper uses 32), got {a.dot_margin}")
    if not 0 <= a.length_cap <= r.max_new_tokens:
        raise ConfigError(
            f"algo.length_cap = {a.length_cap} must be between 0 (= rollout.max_new_tokens) and "
            f"rollout.max_new_tokens = {r.max_new_tokens}: a response cannot be longer than the generation limit"
        )


def _check_correction(cfg: Config) -> None:
    """rollout.precision and the rollout-correction fields (SPEC 12)."""
    from grpokit.algo.correction import CORRECTIONS

    r = cfg.rollout
    if r.precision not in ("same", "auto", "bf16", "fp32"):
        raise ConfigError(f"rollout.precision = {r.precision!r} is not one of same, auto, bf16, fp32")
    modes = ("auto", "none", "bypass", *CORRECTIONS.names())
    if r.correction not in modes:
        close = difflib.get_close_matches(r.correction, modes, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"rollout.correction = {r.correction!r}{hint} is not one of {', '.join(modes)}")
    mode = "token_tis" if r.correction == "auto" else r.correction  # auto turns token_tis on or everything off
    takes = CORRECTIONS.accepts(mode) if mode in CORRECTIONS else frozenset()
    for fname, kw in (("correction_low", "low"), ("correction_high", "high")):
        value = getattr(r, fname)
        if value is None:
            continue
        if kw not in takes:
            raise ConfigError(
                f"rollout.{fname} has no effect with rollout.correction = '{r.correction}'"
                + (f" ({mode} takes only {', '.join(sorted(takes))})" if takes else "")
                + f"; leave it unset or choose a mode that uses it ({', '.join(n for n in CORRECTIONS.names() if kw in CORRECTIONS.accepts(n))})"
            )
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"rollout.{fname} must be a positive ratio, got {value}")
    lo = r.correction_low if r.correction_low is not None else CORRECTIONS.defaults(mode).get("low") if mode in CORRECTIONS else None
    hi = r.correction_high if r.correction_high is not None else CORRECTIONS.defaults(mode).get("high") if mode in CORRECTIONS else None
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"rollout.correction = '{mode}' needs correction_low <= correction_high, got {lo} and {hi}")
    if r.correction == "bypass" and cfg.train.old_logprobs == "recompute":
        raise ConfigError(
            "rollout.correction = 'bypass' means no ℓ° pass (ℓ° := μ), but train.old_logprobs = 'recompute' asks for one; "
            "set train.old_logprobs = 'auto', or use a decoupled mode such as rollout.correction = 'token_tis'"
        )


def _check_token_mask(a: AlgoConfig, masks: Any, losses: Any) -> None:
    """Token-mask hyperparameters must belong to the chosen algo.token_mask and be in range (SPEC 11)."""
    taken = masks.accepts(a.token_mask) or frozenset()
    for fname, kw in TOKEN_MASK_HPARAMS.items():
        value = getattr(a, fname)
        if value is not None and kw not in taken:
            takers = [n for n in masks.names() if kw in (masks.accepts(n) or ())]
            raise ConfigError(
                f"algo.{fname} = {value!r} is set, but algo.token_mask = '{a.token_mask}' does not take it (it is used "
                f"by: {', '.join(takers)}); remove algo.{fname} or set algo.token_mask = '{takers[0]}'"
            )
    if a.mask_delta is not None and not (math.isfinite(a.mask_delta) and a.mask_delta > 1):
        raise ConfigError(f"algo.mask_delta must be a number > 1 (the kept ratio band is [1/delta, delta]), got {a.mask_delta}")
    for fname in ("clip_cov_ratio", "kl_cov_ratio"):
        value = getattr(a, fname)
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"algo.{fname} is a fraction of the tokens, 0 < value <= 1; got {value}")
    d = masks.defaults("clip_cov")
    lb = a.clip_cov_lb if a.clip_cov_lb is not None else d["cov_lb"]
    ub = a.clip_cov_ub if a.clip_cov_ub is not None else d["cov_ub"]
    if a.token_mask == "clip_cov" and not lb < ub:
        raise ConfigError(f"Clip-Cov needs algo.clip_cov_lb < algo.clip_cov_ub (an empty band selects nothing), got {lb} and {ub}")
    for fname in ("sapo_tau_pos", "sapo_tau_neg"):
        value = getattr(a, fname)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"algo.{fname} must be a number > 0, got {value}")
    if a.kl_cov_coef is not None and not (math.isfinite(a.kl_cov_coef) and a.kl_cov_coef >= 0):
        raise ConfigError(f"algo.kl_cov_coef must be a number >= 0, got {a.kl_cov_coef}")
    if "selected" in taken and "penalised" in (losses.accepts(a.loss) or ()):
        raise ConfigError(
            f"algo.token_mask = '{a.token_mask}' and algo.loss = '{a.loss}' both select tokens by covariance (Clip-Cov and "
            "KL-Cov are alternatives in arXiv 2505.22617); set algo.token_mask = 'none' or choose another loss"
        )


def check_registered(reg: Any, name: str, where: str) -> None:
    """A ConfigError naming the field `where` (and the close matches) when `name` is not in registry `reg`."""
    if name not in reg:
        try:
            reg.get(name)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


def validate(cfg: Config) -> list[str]:
    """Raise ConfigError on impossible combinations; return (and emit) warnings for useless ones."""
    a, r, t = cfg.algo, cfg.rollout, cfg.train
    from grpokit.algo import (
        ADV_TRANSFORMS, ADVANTAGES, AGGREGATIONS, CREDIT, DISTILL, KL, KL_WEIGHTS, LOSSES, SEQ_WEIGHTS, TOKEN_MASKS,
    )

    from grpokit.rollout.engine import ENGINES
    from grpokit.transforms import TRANSFORMS

    for reg, name, where in [
        (ENGINES, r.engine, "rollout.engine"), *[(TRANSFORMS, n, "algo.transforms") for n in a.transforms],
        (ADVANTAGES, a.advantage, "algo.advantage"), (LOSSES, a.loss, "algo.loss"),
        (AGGREGATIONS, a.aggregation, "algo.aggregation"), (CREDIT, a.credit, "algo.credit"),
        (KL, a.kl_estimator, "algo.kl_estimator"), (SEQ_WEIGHTS, a.seq_weight, "algo.seq_weight"),
        (TOKEN_MASKS, a.token_mask, "algo.token_mask"), (DISTILL, a.distill, "algo.distill"),
        (ADV_TRANSFORMS, a.adv_transform, "algo.adv_transform"), (KL_WEIGHTS, a.kl_weight, "algo.kl_weight"),
    ]:
        check_registered(reg, name, where)
    choices = {
        "algo.std": (a.std, ("unbiased", "population")),
        "algo.kl_placement": (a.kl_placement, ("loss", "reward", "advantage")),
        "algo.divergence": (a.divergence, ("k1", "k3", "forward")),
        "algo.kl_source": (a.kl_source, ("old", "current")),
        "rewards.on_error": (cfg.rewards.on_error, ("raise", "zero", "skip")),
        "model.precision": (cfg.model.precision, ("auto", "bf16", "fp32")),
        "model.ref_quantization": (cfg.model.ref_quantization, ("none", "int8", "int4")),
        "dist.strategy": (cfg.dist.strategy, ("none", "ddp", "fsdp2")),
        "train.device": (t.device, ("auto", "cpu", "cuda")),
        "train.old_logprobs": (t.old_logprobs, ("auto", "recompute")),
        "algo.dynamic_sampling_metric": (a.dynamic_sampling_metric, ("acc", "reward")),
    }
    for where, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(valid)}")
    positive = {
        "rollout.prompts_per_step": r.prompts_per_step, "rollout.max_new_tokens": r.max_new_tokens,
        "train.steps": t.steps, "train.updates_per_rollout": t.updates_per_rollout,
        "train.micro_batch_size": t.micro_batch_size, "rollout.group_size": r.group_size,
    }
    for where, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where} must be >= 1, got {value}")
    if cfg.model.ref_quantization != "none" and cfg.model.lora_r > 0:
        raise ConfigError("model.ref_quantization needs full fine-tuning: with LoRA the reference is the policy with its adapters off (no copy to quantize); set model.ref_quantization = 'none'")
    if cfg.model.ref_quant_group_size < 2 or cfg.model.ref_quant_group_size % 2:
        raise ConfigError(f"model.ref_quant_group_size must be even and >= 2, got {cfg.model.ref_quant_group_size}")
    pure_opd = a.distill == "gopd" and a.gopd_outcome_weight == 0  # G-OPD's dense reward needs no group
    if r.group_size < 2 and a.advantage in {"grpo", "dr_grpo", "rloo", "batch_std"} and not pure_opd:
        raise ConfigError(
            f"rollout.group_size = {r.group_size} gives every group a single member, so the group-relative "
            f"advantage '{a.advantage}' is 0 everywhere and nothing trains; set rollout.group_size >= 2"
        )
    if (a.credit == "frpo") != (a.kl_placement == "advantage"):
        raise ConfigError("FRPO puts the KL in the advantage: set algo.credit = 'frpo' together with algo.kl_placement = 'advantage'")
    if a.credit == "frpo" and a.beta <= 0:
        raise ConfigError("algo.credit = 'frpo' needs algo.beta > 0 (the paper uses 0.01)")
    _check_loss_hparams(a, LOSSES)
    _check_distill(cfg)
    _check_catalogue(cfg)
    _check_token_mask(a, TOKEN_MASKS, LOSSES)
    if a.kl_source == "current" and a.kl_placement != "advantage":
        raise ConfigError(
            "algo.kl_source = 'current' only changes where FRPO's KL-to-go comes from; set algo.credit = 'frpo' "
            "and algo.kl_placement = 'advantage', or leave algo.kl_source = 'old'"
        )
    if a.seq_weight != "none" and "seq_ratio" not in (LOSSES.accepts(a.loss) or ()):
        takers = [n for n in LOSSES.names() if "seq_ratio" in (LOSSES.accepts(n) or ())]
        raise ConfigError(
            f"algo.seq_weight = '{a.seq_weight}' transforms per-sequence weights, which algo.loss = '{a.loss}' does "
            f"not have; use it with algo.loss = {' or '.join(repr(n) for n in takers)}, or set algo.seq_weight = 'none'"
        )
    if not math.isfinite(r.temperature) or r.temperature <= 0:
        raise ConfigError(
            f"rollout.temperature = {r.temperature} cannot train: the trainer divides the logits by it to score the "
            "samples, and greedy groups hold identical answers with no relative signal; set rollout.temperature > 0 "
            "(1.0 samples the policy itself; greedy evaluation is `grpokit eval --temperature 0`)"
        )
    if a.beta > 0 and a.kl_placement == "loss" and a.kl_estimator == "k1":
        raise ConfigError(
            "algo.kl_estimator = 'k1' in the loss has zero expected gradient (SPEC 4: E[grad log pi] = 0), so the KL "
            "term would only add noise; set algo.kl_estimator = 'k3' (GRPO's) or 'k2', or put k1 in the reward with "
            "algo.kl_placement = 'reward'"
        )
    if not math.isfinite(t.lr) or t.lr <= 0:
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
    n_rewards = len(cfg.rewards.functions)
    if cfg.rewards.weights and len(cfg.rewards.weights) != n_rewards:
        raise ConfigError(f"rewards.weights has {len(cfg.rewards.weights)} entries for {n_rewards} rewards.functions; give one weight per function")
    if cfg.rewards.overlong_buffer and not 0 < cfg.rewards.overlong_buffer < r.max_new_tokens:
        raise ConfigError(
            f"rewards.overlong_buffer = {cfg.rewards.overlong_buffer} must be between 1 and rollout.max_new_tokens - 1 "
            f"= {r.max_new_tokens - 1} (DAPO's L_c is a buffer before L_max)"
        )
    _check_correction(cfg)
    _check_async(cfg)
    batch = r.prompts_per_step * r.group_size
    if t.updates_per_rollout > batch:
        raise ConfigError(
            f"train.updates_per_rollout = {t.updates_per_rollout} exceeds the {batch} sequences of a rollout batch "
            f"(rollout.prompts_per_step x rollout.group_size = {r.prompts_per_step} x {r.group_size}), so some "
            f"optimizer steps would have no rows; set train.updates_per_rollout <= {batch} or sample more prompts"
        )
    _check_vllm(r)
    if r.vllm.lora_sync == "adapter" and cfg.model.lora_r <= 0 and r.engine in ("vllm", "vllm_server"):
        raise ConfigError("rollout.vllm.lora_sync = 'adapter' needs a LoRA policy (model.lora_r > 0); "
                          "set model.lora_r or rollout.vllm.lora_sync = 'merged'")
    notes = []
    if a.loss == "gspo" and a.aggregation == "token_mean":
        notes.append(
            "algo.loss = 'gspo' with algo.aggregation = 'token_mean': GSPO is defined with the sequence-level mean "
            "(arXiv 2507.18071, SPEC 2), and token_mean weights long responses more; set "
            "algo.aggregation = 'seq_mean_token_mean' to follow the paper"
        )
    if a.credit == "frpo" and a.std == "unbiased" and a.advantage in ("grpo", "batch_std"):
        notes.append(
            "algo.credit = 'frpo' with algo.std = 'unbiased': the FRPO paper (arXiv 2601.10201, SPEC 7) normalises "
            "with the population std (1/G); set algo.std = 'population' to follow it"
        )
    if a.seq_weight != "none" and t.updates_per_rollout < 2:
        notes.append(
            f"algo.seq_weight = '{a.seq_weight}' with train.updates_per_rollout = 1: the only update starts from the "
            "sampling policy, so every sequence ratio s_i is 1 and there is nothing to transform; set "
            "train.updates_per_rollout >= 2"
        )
    if a.loss == "fipo" and t.updates_per_rollout < 2:
        notes.append(
            "algo.loss = 'fipo' with train.updates_per_rollout = 1: the policy equals the sampling policy in "
            "the only update, so every FIPO weight is exactly 1 and FIPO reduces to DAPO; set "
            "train.updates_per_rollout >= 2 (the paper uses 8)"
        )
    if cfg.model.teacher and a.distill == "none":
        notes.append(
            f"model.teacher = '{cfg.model.teacher}' is set but algo.distill = 'none', so no teacher is loaded; set "
            "algo.distill = 'kdrl' or 'gopd' to distil from it, or remove model.teacher"
        )
    if a.loss in ("sapo", "kl_cov") and t.updates_per_rollout < 2:
        notes.append(
            f"algo.loss = '{a.loss}' with train.updates_per_rollout = 1: the only update starts at the sampling policy "
            "(ratio 1), where SAPO's gate weight is 1 and KL-Cov's |l - l_old| has zero gradient, so both reduce to the "
            "unclipped policy gradient; set train.updates_per_rollout >= 2"
        )
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=2)
    return notes


def _check_vllm(r: RolloutConfig) -> None:
    """rollout.vllm / rollout.server values that cannot work."""
    v, s = r.vllm, r.server
    if v.dtype not in ("", "float32", "bfloat16", "float16", "auto"):
        raise ConfigError(f"rollout.vllm.dtype = {v.dtype!r}: use '' (follow model.precision), 'float32', 'bfloat16', 'float16' or 'auto'")
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization = {v.gpu_memory_utilization} must be in (0, 1]")
    if v.max_model_len < 0 or v.kv_cache_gb < 1:
        raise ConfigError("rollout.vllm.max_model_len must be >= 0 (0 = automatic) and rollout.vllm.kv_cache_gb >= 1")
    if r.engine == "vllm_server" and not s.launch and not s.url:
        raise ConfigError("rollout.engine = 'vllm_server' with rollout.server.launch = false needs rollout.server.url "
                          "(e.g. 'http://127.0.0.1:8000'); or set rollout.server.launch = true to start one")
    if s.url and not s.url.startswith(("http://", "https://")):
        raise ConfigError(f"rollout.server.url = {s.url!r} must start with http:// or https://")
    if s.retries < 1 or s.concurrency < 1 or s.request_timeout_s <= 0 or s.startup_timeout_s <= 0:
        raise ConfigError("rollout.server.retries and .concurrency must be >= 1, and .request_timeout_s and "
                          ".startup_timeout_s > 0")
    if v.lora_sync not in ("merged", "adapter"):
        raise ConfigError(f"rollout.vllm.lora_sync = {v.lora_sync!r}: use 'merged' or 'adapter'")


# ---------------------------------------------------------------------------- saving and help

def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _drop_unset(data: dict[str, Any]) -> dict[str, Any]:
    """The dict without None values (unset fields: TOML has no null, and loading omits them back to None)."""
    return {k: _drop_unset(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as a recipe that loads back to an equal Config. Unset loss hyperparameters are left out,
    so they stay "the loss's own default" (`grpokit.train.step.resolved_loss_hparams` gives the values)."""
    import tomli_w

    data = _drop_unset(to_dict(cfg))
    recipe = data.pop("recipe")
    Path(path).write_text(tomli_w.dumps({"recipe": recipe, **data}))


def _loss_defaults_note(fname: str) -> str:
    """For a loss hyperparameter field: the default of every loss that takes it, e.g. 'ppo_clip 0.2, gspo 0.0003'."""
    from grpokit.algo import LOSSES

    kw = LOSS_HPARAMS[fname]
    found = [(n, "off" if v is None else repr(v)) for n in LOSSES.names()
             if kw in (LOSSES.accepts(n) or ()) and (v := LOSSES.defaults(n).get(kw, "")) != ""]
    values = {v for _, v in found}
    if len(values) == 1:
        return f"default {values.pop()} ({', '.join(n for n, _ in found)}'s own)"
    return "default: the loss's own (" + ", ".join(f"{n} {v}" for n, v in found) + ")"


def _token_mask_defaults_note(fname: str) -> str:
    """For a token-mask hyperparameter field: the default of the mask that takes it, e.g. 'default 8.0 (dppo's own)'."""
    from grpokit.algo import TOKEN_MASKS

    kw = TOKEN_MASK_HPARAMS[fname]
    found = [(n, TOKEN_MASKS.defaults(n)[kw]) for n in TOKEN_MASKS.names() if kw in (TOKEN_MASKS.accepts(n) or ())]
    return ", ".join(f"default {v!r} ({n}'s own)" for n, v in found)


def help_text() -> str:
    """Every field with its type, default and documentation, section by section."""
    lines = ["configuration fields (set in a TOML recipe or with --set section.field=value):", ""]
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        lines.append(f"[{sec.name}]")
        _help_fields(obj, sec.name, lines)
        lines.append("")
    return "\n".join(lines)


def _help_fields(obj: Any, prefix: str, lines: list[str]) -> None:
    """The help lines of a section's fields; a nested section (rollout.vllm) lists its own fields below it."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        typ = hints[f.name]
        if get_origin(typ) in (Union, UnionType):
            (typ,) = [t for t in get_args(typ) if t is not type(None)]
        name = getattr(typ, "__name__", str(typ))
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"  {prefix}.{f.name} (section)")
            lines.append(f"      {f.metadata.get('help', '')}")
            _help_fields(value, f"{prefix}.{f.name}", lines)
            continue
        default = _loss_defaults_note(f.name) if prefix == "algo" and f.name in LOSS_HPARAMS and value is None else f"default {value!r}"
        if prefix == "algo" and f.name in TOKEN_MASK_HPARAMS and value is None:
            default = _token_mask_defaults_note(f.name)
        lines.append(f"  {prefix}.{f.name} ({name}, {default})")
        lines.append(f"      {f.metadata.get('help', '')}")


def _check_async(cfg: Config) -> None:
    """rollout.max_staleness (asynchronous rollouts)."""
    r = cfg.rollout
    if isinstance(r.max_staleness, bool) or not isinstance(r.max_staleness, int) or r.max_staleness < 1:
        raise ConfigError(f"rollout.max_staleness must be an integer >= 1 (the number of batches generated ahead), "
                          f"got {r.max_staleness!r}; use 1 for one batch overlapping each update")
    if r.max_staleness > 1 and not r.async_rollouts:
        # an error, not a warning: the user asked for stale batches and would silently train synchronously
        raise ConfigError(f"rollout.max_staleness = {r.max_staleness} only applies to asynchronous rollouts; set "
                          "rollout.async_rollouts = true, or remove rollout.max_staleness")
