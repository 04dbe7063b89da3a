"""Reward models as scorers (SPEC section 13): an outcome RM (`orm`) and a process RM (`prm`).

Outcome vs process supervision: Lightman et al., arXiv 2305.20050 (step scores, min/prod
aggregation); DeepSeekMath, arXiv 2402.03300 §4.1.3 (process-supervised GRPO, `credit = "process"`).

    [rewards.options.orm]
    model = "path/or/hub-id"   # AutoModelForSequenceClassification
    device = "cpu"             # its own device ("cuda:1", ...) and precision ("fp32", "bf16", "fp16")
    precision = "fp32"
    output = "logit"           # "logit" | "sigmoid" | "softmax" of the positive label
    positive_label = 1         # label index or name (id2label); 0 for a single-logit head
    standardize = false        # running mean/std over every score seen so far

ORM: each (prompt, completion) is rendered with the model's own chat template when it has one (user
turn = prompt, assistant turn = completion), else as prompt + `join` + completion; batched; the reward
is the positive label's logit, its sigmoid, or its softmax probability.

PRM: the completion is split into steps at `separator` (default "\\n\\n"; empty steps are dropped); the
text prompt + `join` + completion goes through an AutoModelForTokenClassification once, and each step
is scored at its last token by the probability of the `good_label` (softmax over the labels, or the
sigmoid of a single logit). We chose a token-classification head because one forward pass scores every
step; a step's score only sees the text up to its end (causal models), as the definition asks.
The outcome reward aggregates the step scores: "min" (default), "last", "prod" or "mean"; a
completion with no step gets None. `PRMScorer.steps` gives the per-step scores and the character
offsets where steps end; `PRMScorer.process_inputs` turns them into the `step_rewards`, `step_ends`
(response-token index of each step's last token, for the policy's tokenizer) and `step_mask` tensors
the `process` credit takes (grpokit.algo.process).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from grpokit.rewards.base import REWARDS, scorer_factory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ORM_OUTPUTS = ("logit", "sigmoid", "softmax")
PRM_AGGREGATIONS = ("min", "last", "prod", "mean")
#: ε added to the running std of `standardize`.
STANDARDIZE_EPS = 1e-6


def _load(kind: str, model: str, *, device: str, precision: str, trust_remote_code: bool, who: str) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoTokenizer

    if precision not in PRECISIONS:
        raise ValueError(f"{who}.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cls = getattr(transformers, kind)
    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        net = cls.from_pretrained(model, dtype=PRECISIONS[precision], trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OSError(
            f"{who}: cannot load '{model}' as {kind} ({e}); give a local directory with config.json, the weights "
            f"(safetensors) and a tokenizer, or a hub id (with network access)"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tok.pad_token_id
    net.to(device).eval()
    net.requires_grad_(False)
    return net, tok


def _label_index(config: Any, label: int | str, who: str) -> int:
    n = int(config.num_labels)
    if isinstance(label, str):
        names = {str(v): int(k) for k, v in (config.id2label or {}).items()}
        if label not in names:
            raise ValueError(f"{who}: label '{label}' is not one of the model's labels {sorted(names)}")
        return names[label]
    if not 0 <= int(label) < n:
        raise ValueError(f"{who}: label index {label} is out of range for a head with {n} label(s)")
    return int(label)


class _Running:
    """Running mean and variance (Welford / Chan, batch merge) of every score seen."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: Sequence[float]) -> None:
        if not xs:
            return
        nb = len(xs)
        mb = sum(xs) / nb
        m2b = sum((x - mb) ** 2 for x in xs)
        delta = mb - self.mean
        tot = self.n + nb
        self.mean += delta * nb / tot
        self.m2 += m2b + delta * delta * self.n * nb / tot
        self.n = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


@REWARDS.register("orm")
@scorer_factory
class ORMScorer:
    """Outcome reward model: a sequence classifier's positive-label logit/probability per completion."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 8,
        max_length: int = 2048,
        output: str = "logit",
        positive_label: int | str | None = None,
        standardize: bool = False,
        chat_template: bool | None = None,
        join: str = "",
        trust_remote_code: bool = False,
    ) -> None:
        who = "rewards.options.orm"
        if output not in ORM_OUTPUTS:
            raise ValueError(f"{who}.output must be one of {', '.join(ORM_OUTPUTS)}, got {output!r}")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"{who}: batch_size and max_length must be >= 1")
        self.model, self.tokenizer = _load("AutoModelForSequenceClassification", model, device=device, precision=precision,
                                           trust_remote_code=trust_remote_code, who=who)
        n = int(self.model.config.num_labels)
        self.label = _label_index(self.model.config, (0 if n == 1 else 1) if positive_label is None else positive_label, who)
        if output == "softmax" and n < 2:
            raise ValueError(f"{who}.output = 'softmax' needs >= 2 labels; this head has 1: use 'logit' or 'sigmoid'")
        self.device, self.batch_size, self.max_length, self.output, self.join = device, batch_size, max_length, output, join
        self.use_chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat_template is None else chat_template
        if self.use_chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{who}.chat_template = true but the tokenizer of '{model}' has no chat template")
        self.tokenizer.truncation_side = "left"  # keep the end of the completion
        self.tokenizer.padding_side = "right"
        self.running = _Running() if standardize else None
        self.__name__ = "orm"

    def render(self, prompt: str, completion: str) -> str:
        if self.use_chat:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return prompt + self.join + completion

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The chosen output (logit / sigmoid / softmax) per sample, before standardisation."""
        out: list[float] = []
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s : s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=not self.use_chat).to(self.device)
            logits = self.model(**enc).logits.float()  # [b, num_labels]
            if self.output == "softmax":
                v = logits.softmax(-1)[:, self.label]  # [b]
            elif self.output == "sigmoid":
                v = logits[:, self.label].sigmoid()  # [b]
            else:
                v = logits[:, self.label]  # [b]
            out.extend(v.cpu().tolist())
        return out

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float | None]:
        vals = self.raw_scores(prompts, completions)
        if self.running is None:
            return vals
        self.running.update(vals)
        mu, sd = self.running.mean, self.running.std
        return [(v - mu) / (sd + STANDARDIZE_EPS) for v in vals]


@dataclass
class PRMSteps:
    """One completion's steps: PRM score of each step and the character offset (in the completion) just
    past each step's last character."""

    scores: list[float]
    char_ends: list[int]


def split_steps(completion: str, separator: str = "\n\n") -> list[int]:
    """Character offsets (exclusive) where the non-empty steps of `completion` end; separators excluded."""
    if not separator:
        raise ValueError("the PRM step separator must not be empty (e.g. '\\n\\n')")
    ends, pos = [], 0
    for part in completion.split(separator):
        stripped = part.rstrip()
        if stripped.strip():
            ends.append(pos + len(stripped))
        pos += len(part) + len(separator)
    return ends


def aggregate_steps(scores: Sequence[float], how: str = "min") -> float | None:
    """Outcome reward from step scores: min, last, prod or mean (SPEC 13); None without steps."""
    if how not in PRM_AGGREGATIONS:
        raise ValueError(f"PRM aggregation must be one of {', '.join(PRM_AGGREGATIONS)}, got {how!r}")
    if not scores:
        return None
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "prod":
        return math.prod(scores)
    return sum(scores) / len(scores)


def step_token_ends(char_ends: Sequence[int], response_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """Map character offsets in the decoded response to the index of the token holding that character.

    Token k covers the characters up to len(decode(ids[: k + 1])); the step ending at character e ends
    at the first token k whose decoded prefix is at least e characters long (binary search, O(K log T)
    decodes). Offsets past the text map to the last token. Shapes: K offsets, T ids -> K indices.
    """
    ids = list(response_ids)
    if not ids:
        return [0 for _ in char_ends]
    cache: dict[int, int] = {}

    def length(k: int) -> int:
        if k not in cache:
            cache[k] = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True))
        return cache[k]

    class _Lens:
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, k: int) -> int:
            return length(k)

    return [min(bisect.bisect_left(_Lens(), e), len(ids) - 1) for e in char_ends]


@REWARDS.register("prm")
@scorer_factory
class PRMScorer:
    """Process reward model: step scores at each step's last token, aggregated to one outcome reward."""

    def __init__(
        self,
        model: str,
        *,
        separator: str = "\n\n",
        aggregation: str = "min",
        good_label: int | str = 1,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 8,
        max_length: int = 4096,
        join: str = "\n",
        trust_remote_code: bool = False,
    ) -> None:
        who = "rewards.options.prm"
        aggregate_steps([1.0], aggregation)  # validates
        split_steps("x", separator)  # validates
        self.model, self.tokenizer = _load("AutoModelForTokenClassification", model, device=device, precision=precision,
                                           trust_remote_code=trust_remote_code, who=who)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{who}: the PRM needs a fast tokenizer (character offsets); '{model}' has a slow one")
        self.label = _label_index(self.model.config, good_label, who)
        self.separator, self.aggregation, self.join = separator, aggregation, join
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.tokenizer.padding_side = "right"
        self._last: dict[tuple[str, str], PRMSteps] = {}
        self.__name__ = "prm"

    @torch.no_grad()
    def steps(self, prompts: Sequence[str], completions: Sequence[str]) -> list[PRMSteps]:
        """Per-step scores (probability of the good label at each step's last token) and step ends."""
        out: list[PRMSteps] = []
        for s in range(0, len(completions), self.batch_size):
            ps, cs = list(prompts[s : s + self.batch_size]), list(completions[s : s + self.batch_size])
            prefixes = [p + self.join for p in ps]
            texts = [p + c for p, c in zip(prefixes, cs)]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True, add_special_tokens=True)
            offsets = enc.pop("offset_mapping")  # [b, L, 2]
            logits = self.model(**enc.to(self.device)).logits.float().cpu()  # [b, L, num_labels]
            if logits.shape[-1] == 1:
                good = logits[..., 0].sigmoid()  # [b, L]
            else:
                good = logits.softmax(-1)[..., self.label]  # [b, L]
            for j, c in enumerate(cs):
                ends = split_steps(c, self.separator)
                base = len(prefixes[j])
                tok_end = offsets[j, :, 1].tolist()  # char end of each token
                real = enc["attention_mask"][j].bool().tolist()
                scores, kept = [], []
                for e in ends:
                    # the step's last token: the first real token whose span reaches the step's last character
                    k = next((t for t, (te, r) in enumerate(zip(tok_end, real)) if r and te >= base + e), None)
                    if k is None:
                        continue  # truncated away
                    scores.append(float(good[j, k]))
                    kept.append(e)
                out.append(PRMSteps(scores, kept))
        return out

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float | None]:
        per = self.steps(prompts, completions)
        self._last = {(p, c): st for p, c, st in zip(prompts, completions, per)}  # for process_inputs
        return [aggregate_steps(st.scores, self.aggregation) for st in per]

    def process_inputs(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        tokenizer: Any,
    ) -> dict[str, torch.Tensor]:
        """The `process` credit's keyword tensors for a rollout batch (reuses the last `__call__`'s scores).

        step_ends are response-token indices of the policy's tokens (`tokenizer` = the policy's).
        Shapes: response_ids [B,T], response_mask [B,T] -> step_rewards [B,K] f32, step_ends [B,K]
        int64, step_mask [B,K] bool (K = the most steps of any completion, at least 1).
        """
        cached = dict(self._last)
        missing = [(p, c) for p, c in zip(prompts, completions) if (p, c) not in cached]
        if missing:
            cached.update(zip(missing, self.steps([p for p, _ in missing], [c for _, c in missing])))
        per = [cached[(p, c)] for p, c in zip(prompts, completions)]
        b = len(per)
        k = max([len(st.scores) for st in per] + [1])
        rewards = torch.zeros(b, k)  # [B,K]
        ends = torch.zeros(b, k, dtype=torch.long)  # [B,K]
        mask = torch.zeros(b, k, dtype=torch.bool)  # [B,K]
        for i, st in enumerate(per):
            n = int(response_mask[i].sum())
            if not st.scores or n == 0:
                continue
            idx = step_token_ends(st.char_ends, response_ids[i, :n].tolist(), tokenizer)
            rewards[i, : len(idx)] = torch.tensor(st.scores)
            ends[i, : len(idx)] = torch.tensor(idx)
            mask[i, : len(idx)] = True
        return {"step_rewards": rewards, "step_ends": ends, "step_mask": mask}


def process_credit_inputs(
    rewards: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    tokenizer: Any,
    group_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The keyword tensors the `process` credit needs, from the PRM scorer inside a RewardSet.

    Call after `rewards.score(prompts, completions, ...)` (the PRM's step scores are reused, not
    recomputed): `CREDIT.call(name, seq_adv, mask, ..., **process_credit_inputs(...))`. Other credit
    functions ignore these keywords. Shapes: response_ids/response_mask [B,T], group_ids [B] ->
    step_rewards [B,K] f32, step_ends [B,K] int64, step_mask [B,K] bool, group_ids [B].
    """
    prms = [fn for fn in getattr(rewards, "functions", {}).values() if isinstance(fn, PRMScorer)]
    if len(prms) != 1:
        raise ValueError(
            f"credit 'process' needs exactly one 'prm' reward in rewards.functions (found {len(prms)}); "
            f"add rewards.functions = ['prm'] with rewards.options.prm = {{model = ...}}"
        )
    out = prms[0].process_inputs(prompts, completions, response_ids, response_mask, tokenizer)
    return {**out, "group_ids": group_ids}
