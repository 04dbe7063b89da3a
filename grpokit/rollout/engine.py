"""The rollout-engine seam: whatever samples responses for the trainer.

An engine takes token-id prompts, sampling parameters and one seed per row, and returns a `Rollout`:
the response tokens, their masks, whether each row was truncated, the texts, and the sampler's own
per-token log-probs μ (SPEC 12), which the trainer keeps apart from its recomputed ℓ°. The rollout's
tensors are on the CPU whatever device the engine samples on: the trainer keeps its batch there and moves
one micro-batch at a time to the model's device. After every
optimizer step the trainer hands the engine the new weights (`load_weights`).
An engine may set `exact_logprobs = True` when its μ equals the trainer's ℓ° to fp32 rounding (the hf
engine in fp32); without it, rollout.correction = 'auto' turns the rollout correction on (SPEC 12).

    engine = ENGINES.get("hf")(model, tokenizer, device="cpu", precision="fp32", shares_weights=True)
    roll = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64), seeds=[...])
    engine.load_weights(model.state_dict().items())   # a no-op when the engine runs the trained module
    engine.close()

Each implementation is one class plus one registry line; `tests/rollout/test_engine_contract.py` runs the
same contract on every registered engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from grpokit.algo.registry import Registry
from grpokit.rollout.types import Rollout


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; the same fields for every engine."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy (log-probs are then reported at temperature 1)
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses; see the module docstring."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Rollout:
        """One response per prompt (repeat a prompt G times for a group). `seeds`: one per row; a row's
        tokens depend only on its prompt, its seed and the weights, where the engine can seed per row."""
        ...

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the policy's new weights (full, unsharded tensors by the trainer's parameter names)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (processes, memory)."""
        ...


#: Engine classes by name (`rollout.engine`); each is built as `cls(model, tokenizer, **options)`.
ENGINES = Registry("rollout engine")


@ENGINES.register("hf")
class HFEngine:
    """The in-process KV-cache sampler (`grpokit.rollout.Sampler`) on a Hugging Face causal LM.

    With `shares_weights=True` the engine runs the very module the trainer updates (one process, DDP,
    LoRA), so `load_weights` has nothing to do. Otherwise (FSDP2, where the trained module is sharded) it
    runs its own unsharded copy and `load_weights` copies the gathered full weights into it.
    Seeding: every row draws from its own `torch.Generator(seed)`, so rollouts are exactly reproducible
    and a row's tokens do not depend on the rows that share its batch (or on the number of ranks).
    """

    #: μ is the trainer's own forward: ℓ° up to float rounding in fp32 (False under bf16, set per instance)
    exact_logprobs = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str = "cpu",
                 precision: str = "fp32", shares_weights: bool = True) -> None:
        from grpokit.rollout.sampler import Sampler
        from grpokit.models.precision import resolve_precision

        self.model = model
        self.device = device
        self.shares_weights = shares_weights
        self.exact_logprobs = precision in (None, "fp32")
        self.sampler = Sampler(model, tokenizer, device=device, autocast_dtype=precision)
        # μ equals the trainer's ℓ° to fp32 rounding only when the sampler runs in fp32 (SPEC 12); the trainer reads
        # this to turn rollout correction on ('auto'). An engine without the attribute is taken as inexact.
        self.exact_logprobs = resolve_precision(device, precision) == "fp32"

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Rollout:
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per row")
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        return self.sampler.generate(
            prompts, max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, stop_strings=params.stop_strings, generator=generators,
        ).to("cpu")

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.shares_weights:
            return
        state = dict(named)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"hf engine: the weights sent do not match its model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); the engine must be built from a copy of the trained model"
            )

    def close(self) -> None:
        self.sampler = None  # type: ignore[assignment]


def build_engine(name: str, model: torch.nn.Module, tokenizer: Any, **options: Any) -> RolloutEngine:
    """The engine registered as `name`, built with `options` (an unknown name lists the valid ones)."""
    return ENGINES.get(name)(model, tokenizer, **options)


class EngineSampler:
    """The `Sampler.generate` call shape (keyword sampling parameters, one `torch.Generator`) over any engine,
    for code written against the sampler (`grpokit.report.evaluate`). Row seeds are drawn from the generator."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_strings: Sequence[str] = (),
                 generator: torch.Generator | None = None) -> Rollout:
        device = generator.device if generator is not None else "cpu"  # a generator draws on its own device
        seeds = torch.randint(0, 2**62, (len(prompt_ids),), generator=generator, device=device).tolist()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, stop_strings=tuple(stop_strings))
        return self.engine.generate(prompt_ids, params, seeds)


# the vLLM engines ('vllm', 'vllm_server'); vLLM itself is imported only when one is built
from grpokit.rollout import vllm_engine  # noqa: E402,F401
