"""Held-out evaluation (SPEC section 9): sample k completions per problem, score them, summarise.

`evaluate` returns a plain JSON-able dict (the shape of each side of `eval.json`):

    {"n": problems, "k": samples per problem, "acc": = avg@k, "avg@k", "pass@k": {"1": .., "<k>": ..},
     "cons@k", "ci": {"avg@k": [lo, hi], "pass@1": [lo, hi], "pass@<k>": [lo, hi], "cons@k": [lo, hi]},
     "length": length_stats(...), "rewards": {fn: mean}, "samples": [a few examples],
     "settings": {temperature, top_p, top_k, max_new_tokens, seed, ...}, "time_s": seconds}

Confidence intervals are 95% percentile bootstraps over problems (1000 resamples, `bootstrap_ci`).
`format_table` renders one result as text, `format_comparison` puts several side by side, and
`write_json` writes either atomically.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from grpokit.report.metrics import (
    avg_at_k_per_problem,
    bootstrap_ci,
    cons_at_k_per_problem,
    length_stats,
    pass_at_k_per_problem,
)
from grpokit.rewards.extract import answer_key

# Reward totals at or above this count as correct by default: verifiable rewards give 1 for right.
DEFAULT_CORRECT_THRESHOLD = 1.0
# Slack for the threshold comparison, so a weighted sum like 0.5 + 0.5 stored in float32 still passes.
CORRECT_ATOL = 1e-6
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_ALPHA = 0.05


@dataclass
class Scores:
    """One batch's reward result, normalised: what a `correct_fn` receives.

    total: [B] weighted sum per completion. per_function: reward name -> [B] values (None/NaN = no
    score). correct: [B] the reward set's own verdict (RewardSet's `accuracy_key` reward >= 1), None
    when the reward set has no correctness reward.
    """

    total: list[float]
    per_function: dict[str, list[float | None]]
    correct: list[bool] | None = None


CorrectFn = Callable[[Scores], list[bool]]


def default_correct(scores: Scores) -> list[bool]:
    """The reward set's own correctness when it reports one (so a format bonus does not count),
    else the weighted total >= 1."""
    return list(scores.correct) if scores.correct is not None else by_total()(scores)


def by_total(threshold: float = DEFAULT_CORRECT_THRESHOLD) -> CorrectFn:
    """Correct when the weighted reward total is >= threshold (the default, threshold 1)."""

    def correct(scores: Scores) -> list[bool]:
        return [t is not None and t >= threshold - CORRECT_ATOL for t in scores.total]

    return correct


def by_reward(name: str, threshold: float = DEFAULT_CORRECT_THRESHOLD) -> CorrectFn:
    """Correct when reward function `name` alone scores >= threshold (e.g. ignore a format bonus)."""

    def correct(scores: Scores) -> list[bool]:
        if name not in scores.per_function:
            raise KeyError(
                f"correctness reward '{name}' is not in the reward set "
                f"(has: {', '.join(scores.per_function) or 'nothing'}); pass one of those names"
            )
        return [v is not None and v >= threshold - CORRECT_ATOL for v in scores.per_function[name]]

    return correct


#: The cons@k vote key of a completion: the number `numeric_match` reads, written canonically
#: (`grpokit.rewards.extract.answer_key`); one extractor for rewards and evaluation.
default_extract_answer = answer_key


def _normalise_scores(result: Any, batch: int) -> Scores:
    """Accept RewardSet.score's (total, per_function) tuple or an object with .total/.per_function."""
    if hasattr(result, "total"):
        total, per_function = result.total, result.per_function
        correct = getattr(result, "correct", None)
    else:
        total, per_function = result
        correct = None
    total = total.tolist() if hasattr(total, "tolist") else list(total)
    if len(total) != batch:
        raise ValueError(f"reward set returned {len(total)} totals for {batch} completions")
    if correct is not None:
        correct = [bool(c) for c in (correct.tolist() if hasattr(correct, "tolist") else correct)]
    return Scores(
        total=[float(t) for t in total], per_function={k: list(v) for k, v in per_function.items()}, correct=correct
    )


def _default_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _columns(rows: Sequence[Mapping[str, Any]], lengths: list[int], truncated: list[bool]) -> dict[str, list]:
    """The reward contract's columns: every row key except `prompt`, as lists, plus lengths/truncation."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"]
    cols = {k: [r.get(k) for r in rows] for k in keys}
    cols["completion_lengths"] = lengths
    cols["truncated"] = truncated
    return cols


def evaluate(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    reward_set: Any,
    k: int = 1,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    extract_answer: Callable[[str], str | None] | None = None,
    correct_fn: CorrectFn | None = None,
    stop_strings: Sequence[str] = (),
    num_examples: int = 4,
    device: str | torch.device | None = None,
    sampler: Any = None,
    encode: Callable[[Any, list[str]], list[list[int]]] | None = None,
) -> dict[str, Any]:
    """Sample k completions for each row, score them with `reward_set`, and summarise (SPEC section 9).

    rows: task rows (`prompt`, `answer`, extra columns). temperature: 0 means greedy, sent to the
    sampler as temperature 1 with top_k=1. batch_size counts sequences (prompts x k) per generate call.
    seed seeds one `torch.Generator` for the whole evaluation. extract_answer: completion -> answer for
    cons@k (default `default_extract_answer`). correct_fn: `Scores` -> per-sample correctness (default
    `default_correct`: the reward set's `.correct` when it has one, else total >= 1; or `by_total(t)`,
    `by_reward("numeric_match")`). sampler / encode default to
    `grpokit.rollout.Sampler(model, tokenizer, device=device)` and `grpokit.rollout.encode_prompts`;
    pass them to reuse a sampler or to test without a model. pass@k is reported for k' in {1, k}.
    """
    if not rows:
        raise ValueError("evaluate got no rows; pass at least one held-out problem")
    if k < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"k, batch_size and max_new_tokens must be >= 1, got {k}, {batch_size}, {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    extract_answer = extract_answer or default_extract_answer
    correct_fn = correct_fn or default_correct
    device = torch.device(device) if device is not None else _default_device(model)
    if encode is None:
        from grpokit.rollout import encode_prompts as encode
    if sampler is None:
        from grpokit.rollout import Sampler

        sampler = Sampler(model, tokenizer, device=device)
    greedy = temperature == 0
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        top_k=1 if greedy else 0,
        stop_strings=tuple(stop_strings),
    )
    generator = torch.Generator(device=device).manual_seed(seed)

    # Each row repeated k times, consecutively: sequence i belongs to problem i // k.
    seq_rows = [r for r in rows for _ in range(k)]
    prompt_ids = encode(tokenizer, [r["prompt"] for r in rows])  # one encoding per problem
    seq_prompt_ids = [ids for ids in prompt_ids for _ in range(k)]

    t0 = time.perf_counter()
    texts: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    totals: list[float] = []
    per_fn: dict[str, list[float | None]] = {}
    correct: list[bool] = []
    for start in range(0, len(seq_rows), batch_size):
        batch_rows = seq_rows[start : start + batch_size]
        out = sampler.generate(seq_prompt_ids[start : start + batch_size], generator=generator, **gen_kwargs)
        b_len = [int(x) for x in out.response_mask.sum(-1).tolist()]  # [b]
        b_trunc = [bool(x) for x in out.truncated.tolist()]  # [b]
        b_texts = list(out.texts)
        cols = _columns(batch_rows, b_len, b_trunc)
        scores = _normalise_scores(
            reward_set.score([r["prompt"] for r in batch_rows], b_texts, cols), len(batch_rows)
        )
        b_correct = [bool(c) for c in correct_fn(scores)]
        if len(b_correct) != len(batch_rows):
            raise ValueError(f"correct_fn returned {len(b_correct)} flags for {len(batch_rows)} completions")
        texts += b_texts
        lengths += b_len
        truncated += b_trunc
        totals += scores.total
        for name, vals in scores.per_function.items():
            per_fn.setdefault(name, []).extend(vals)
        correct += b_correct
    elapsed = time.perf_counter() - t0

    answers = [extract_answer(t) for t in texts]
    by_problem = lambda xs: [xs[i * k : (i + 1) * k] for i in range(len(rows))]  # noqa: E731
    correct_pp, answers_pp = by_problem(correct), by_problem(answers)

    per_problem = {"avg@k": avg_at_k_per_problem(correct_pp)}
    ks = sorted({1, k})
    for kk in ks:
        per_problem[f"pass@{kk}"] = pass_at_k_per_problem(correct_pp, kk)
    per_problem["cons@k"] = cons_at_k_per_problem(answers_pp, correct_pp)
    ci: dict[str, list[float]] = {}
    means: dict[str, float] = {}
    for name, vals in per_problem.items():
        m, lo, hi = bootstrap_ci(vals, n_resamples=BOOTSTRAP_RESAMPLES, alpha=BOOTSTRAP_ALPHA, seed=seed)
        means[name], ci[name] = m, [lo, hi]

    samples = []
    for i in range(min(num_examples, len(rows))):
        j = i * k  # the first sample of problem i
        samples.append({
            "prompt": rows[i]["prompt"],
            "answer": rows[i].get("answer"),
            "completion": texts[j],
            "extracted": answers[j],
            "reward": totals[j],
            "correct": correct[j],
            "length": lengths[j],
            "truncated": truncated[j],
        })
    return {
        "n": len(rows),
        "k": k,
        "acc": means["avg@k"],
        "avg@k": means["avg@k"],
        "pass@k": {str(kk): means[f"pass@{kk}"] for kk in ks},
        "cons@k": means["cons@k"],
        "ci": ci,
        "length": length_stats(lengths, truncated),
        "rewards": {name: _nanmean(vals) for name, vals in per_fn.items()},
        "reward_mean": _nanmean(totals),
        "samples": samples,
        "settings": {**{k_: v for k_, v in gen_kwargs.items() if k_ != "stop_strings"},
                     "stop_strings": list(stop_strings), "greedy": greedy, "seed": seed,
                     "batch_size": batch_size},
        "time_s": elapsed,
    }


def _nanmean(vals: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
    return sum(xs) / len(xs) if xs else None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _rows_of(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, 95% CI) lines of one result; metric names carry the real k (avg@8)."""
    k = result.get("k", "k")
    ci = result.get("ci", {})
    ci_str = lambda key: f"[{_fmt(ci[key][0])}, {_fmt(ci[key][1])}]" if key in ci else ""  # noqa: E731
    out = [("problems (n)", _fmt(result.get("n")), ""), ("samples/problem (k)", _fmt(k), "")]
    if "avg@k" in result:
        out.append((f"avg@{k}", _fmt(result["avg@k"]), ci_str("avg@k")))
    elif "acc" in result:
        out.append(("acc", _fmt(result["acc"]), ci_str("acc")))
    for kk, v in sorted(result.get("pass@k", {}).items(), key=lambda kv: int(kv[0])):
        out.append((f"pass@{kk}", _fmt(v), ci_str(f"pass@{kk}")))
    if "cons@k" in result:
        out.append((f"cons@{k}", _fmt(result["cons@k"]), ci_str("cons@k")))
    for name, v in result.get("rewards", {}).items():
        out.append((f"reward {name}", _fmt(v), ""))
    ls = result.get("length")
    if ls:
        out.append(("length min/q25/median", f"{_fmt(ls['min'], 0)}/{_fmt(ls['q25'], 1)}/{_fmt(ls['median'], 1)}", ""))
        out.append(("length mean/q75/max", f"{_fmt(ls['mean'], 1)}/{_fmt(ls['q75'], 1)}/{_fmt(ls['max'], 0)}", ""))
        out.append(("truncation rate", _fmt(ls["truncation_rate"]), ""))
    return out


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r).rstrip() for r in body)])


def format_table(result: Mapping[str, Any]) -> str:
    """One evaluation result as a plain-text table: metric, value, 95% bootstrap CI."""
    rows = _rows_of(result)
    return _render(["metric", "value", "95% CI"], [list(r) for r in rows])


def format_comparison(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Several results side by side (e.g. {"before": r0, "after": r1}), value and CI per column."""
    names = list(results)
    tables = [dict((m, (v, c)) for m, v, c in _rows_of(results[n])) for n in names]
    metrics = list(dict.fromkeys(m for t in tables for m in t))
    header = ["metric"] + [h for n in names for h in (n, f"{n} 95% CI")]
    body = [[m] + [x for t in tables for x in t.get(m, ("-", ""))] for m in metrics]
    return _render(header, body)


def _jsonable(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); tensors/numpy scalars -> Python numbers; tuples -> lists."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `obj` (an evaluation result, or {"before": .., "after": ..}) as indented JSON, atomically.

    NaN and infinities become null so the file is strict JSON. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_jsonable(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
