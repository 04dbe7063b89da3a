"""`RewardSet`: several weighted reward functions -> one total reward per sample, with error policy.

    rewards = RewardSet([("numeric_match", 1.0, {}), ("format", 0.1, {"preset": "number"})],
                        on_error="raise", timeout_s=10.0)
    result = rewards.score(prompts, completions, columns)   # columns: see columns_from_rows
    total, per_function = result                             # unpacks as in docs/interfaces.md
    result.valid, result.correct                             # [B] bool

Semantics, per sample i and function k with weight w_k and value r_k[i]:
- total[i] = sum_k w_k * r_k[i] over the functions that scored sample i. None ("no score") adds
  nothing for that function; a sample no function scored gets total 0 (as in TRL).
- per_function[name][i] = r_k[i] as float, NaN where the function gave None or the sample was skipped.
- Errors (an exception, or no return within `timeout_s`), by `on_error`:
  "raise": raise RewardError naming the function, the sample index and its prompt.
  "zero":  the failing function scores that sample 0.0.
  "skip":  total[i] = NaN and valid[i] = False; the trainer must mask such samples out of the update.
  A function that raises on a batch is retried one sample at a time to find the failing samples, so
  the others keep their scores. A timeout on the batch call applies to the whole batch (no retry).
- Always raised, whatever on_error says (they are bugs or configuration errors, not bad samples):
  a wrong-length or wrong-type return, NaN/inf values, a required argument that is neither an option
  nor a column.
- Scorer factories (`scorer_factory`, e.g. the ORM, PRM, judge, remote, ensemble and code_exec
  classes): the spec's options build the scorer once, `factory(**options)`; the instance is the
  reward function and receives columns only.
- Accuracy: `correct[i]` = per_function[accuracy_key][i] >= 1, where `accuracy_key` is the first
  function marked `correctness` (numeric_match, math_verify, reasoning_gym) unless given; None when
  there is no such function. The trainer reports `acc` = mean of `correct`.
- Timeouts run each call in a daemon thread joined with `timeout_s`; Python cannot kill a thread, so a
  timed-out call keeps running in the background until it returns.
"""
from __future__ import annotations

import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import torch

from grpokit.rewards.base import REWARDS, RewardFn, build_scorer, is_correctness, is_factory, load_reward

OnError = Literal["raise", "zero", "skip"]
Spec = Union[str, RewardFn, tuple]

#: Characters of a prompt shown in error messages.
PREVIEW_CHARS = 60
#: Arguments the first two positional parameters receive; options may not use these names.
POSITIONAL = ("prompts", "completions")


class RewardError(RuntimeError):
    """A reward function failed or misbehaved; the message says which, on what, and what to do."""


class _Timeout(Exception):
    pass


@dataclass
class RewardResult:
    """Scores of one batch of B completions. Unpacks as `(total, per_function)`."""

    total: torch.Tensor  # [B] f32, NaN where valid is False
    per_function: dict[str, list[float]]  # name -> B values, NaN = no score / skipped
    valid: torch.Tensor  # [B] bool; False only with on_error="skip"
    correct: torch.Tensor | None  # [B] bool, per_function[accuracy_key] >= 1; None without accuracy_key
    accuracy_key: str | None
    errors: dict[str, int] = field(default_factory=dict)  # name -> samples that failed (zero/skip modes)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.total, self.per_function))


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: RewardFn
    weight: float
    options: dict[str, Any]
    accepts: frozenset[str] | None  # keyword names the function takes; None = takes **kwargs
    required: tuple[str, ...]  # keyword names without a default


def _preview(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 3] + "..."


def _fn_name(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__name__", type(fn).__name__)


def _inspect(name: str, fn: RewardFn) -> tuple[frozenset[str] | None, tuple[str, ...]]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None, ()
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is P.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"reward function '{name}' must take (prompts, completions, **columns); "
            f"its signature is {inspect.signature(fn)}"
        )
    keyword = [p for p in params[2:] if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    required = tuple(p.name for p in keyword if p.default is P.empty)
    if any(p.kind is P.VAR_KEYWORD for p in params):
        return None, required
    return frozenset(p.name for p in keyword), required


def _parse_spec(spec: Spec) -> tuple[RewardFn, float, dict[str, Any], str | None, str]:
    """-> (fn, weight, options, explicit name, default name)."""
    if isinstance(spec, str) or callable(spec):
        spec = (spec,)
    if not isinstance(spec, (tuple, list)) or not 1 <= len(spec) <= 4:
        raise TypeError(f"reward spec must be fn, (fn, weight), (fn, weight, options) or (fn, weight, options, name); got {spec!r}")
    fn_or_name, weight, options, name = (*spec, *[None] * (4 - len(spec)))
    weight = 1.0 if weight is None else weight
    options = {} if options is None else options
    if isinstance(fn_or_name, str):
        fn, default_name = load_reward(fn_or_name), fn_or_name.rsplit(":", 1)[-1]
    elif callable(fn_or_name):
        registered = [n for n in REWARDS.names() if REWARDS.get(n) is fn_or_name]
        fn, default_name = fn_or_name, registered[0] if registered else _fn_name(fn_or_name)
    else:
        raise TypeError(f"reward spec's first item must be a name or a callable, got {fn_or_name!r}")
    if not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise ValueError(f"reward '{default_name}': weight must be a finite number, got {weight!r}")
    if not isinstance(options, dict):
        raise TypeError(f"reward '{default_name}': options must be a dict of keyword arguments, got {options!r}")
    if is_factory(fn):  # a scorer class (ORM, judge, sandbox, ...): built once from its options
        return build_scorer(default_name, fn, dict(options)), float(weight), {}, name, default_name
    return fn, float(weight), dict(options), name, default_name


def columns_from_rows(
    rows: Sequence[dict[str, Any]],
    *,
    completion_lengths: Sequence[int] | torch.Tensor,
    truncated: Sequence[bool] | torch.Tensor,
) -> dict[str, list[Any]]:
    """The `columns` argument of `RewardSet.score` for B expanded rows.

    Every row key except `prompt` becomes a list of B values (None where a row lacks the key, e.g.
    mixed tasks), plus `completion_lengths` (response tokens) and `truncated` (hit max_new_tokens).
    """
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "prompt"]
    columns = {k: [row.get(k) for row in rows] for k in keys}
    columns["completion_lengths"] = [int(x) for x in _as_list(completion_lengths)]
    columns["truncated"] = [bool(x) for x in _as_list(truncated)]
    return columns


def _as_list(values: Any) -> list[Any]:
    if isinstance(values, list):
        return values
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


class RewardSet:
    """Weighted reward functions with one error policy and an optional per-call timeout."""

    def __init__(
        self,
        specs: Sequence[Spec],
        *,
        on_error: OnError = "raise",
        timeout_s: float | None = None,
        accuracy_key: str | None = None,
        concurrent: bool = False,
    ) -> None:
        """specs: each `fn_or_name`, `(fn_or_name, weight)`, `(fn_or_name, weight, options)` or
        `(fn_or_name, weight, options, name)`; a name goes through `load_reward`; options are keyword
        arguments for the function; `name` (default: the function's name, de-duplicated with _2, _3)
        keys `per_function` and the metrics.
        on_error: "raise" | "zero" | "skip" (module docstring). timeout_s: per call, None = no limit.
        accuracy_key: the reward whose value >= 1 means correct; default the first correctness reward.
        concurrent: run the scorers of a batch at the same time, one thread each (for scorers that wait on a
        server, a reward model or a sandbox); results and errors are the same as in order.
        """
        if on_error not in ("raise", "zero", "skip"):
            raise ValueError(f"on_error must be 'raise', 'zero' or 'skip', got {on_error!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        if not specs:
            raise ValueError("RewardSet needs at least one reward function, e.g. [('numeric_match', 1.0)]")
        self.on_error: OnError = on_error
        self.timeout_s = timeout_s
        self.concurrent = concurrent
        self._entries: list[_Entry] = []
        for spec in specs:
            fn, weight, options, name, default_name = _parse_spec(spec)
            if name is None:
                name, k = default_name, 2
                while name in self.names:
                    name, k = f"{default_name}_{k}", k + 1
            elif name in self.names:
                raise ValueError(f"two rewards are named '{name}'; give them distinct names")
            accepts, required = _inspect(name, fn)
            bad = [k for k in options if k in POSITIONAL or (accepts is not None and k not in accepts)]
            if bad:
                raise ValueError(
                    f"reward function '{name}' has no option(s) {', '.join(map(repr, bad))}; "
                    f"it takes: {', '.join(sorted(accepts or ())) or '(no options)'}"
                )
            self._entries.append(_Entry(name, fn, weight, options, accepts, required))
        correctness = [e.name for e in self._entries if is_correctness(e.fn)]
        if accuracy_key is not None and accuracy_key not in self.names:
            raise ValueError(f"accuracy_key '{accuracy_key}' is not one of the rewards: {', '.join(self.names)}")
        #: The reward whose value >= 1 counts as correct for the accuracy metric (None: no accuracy).
        self.accuracy_key: str | None = accuracy_key or (correctness[0] if correctness else None)

    @property
    def names(self) -> list[str]:
        """Reward names in spec order (the keys of `per_function`)."""
        return [e.name for e in self._entries]

    @property
    def functions(self) -> dict[str, RewardFn]:
        """name -> the reward callable (a built scorer instance for scorer factories), in spec order."""
        return {e.name: e.fn for e in self._entries}

    @property
    def weights(self) -> dict[str, float]:
        return {e.name: e.weight for e in self._entries}

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, Any]) -> RewardResult:
        """Score B completions. `columns`: name -> B values (see `columns_from_rows`)."""
        B = len(completions)
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != B:
            raise ValueError(f"score got {len(prompts)} prompts for {B} completions; pass one prompt per completion")
        cols = {k: _as_list(v) for k, v in columns.items()}
        for k, v in cols.items():
            if len(v) != B:
                raise ValueError(f"column '{k}' has {len(v)} values for {B} completions; expand rows with expand_groups first")
        if B == 0:
            empty = torch.zeros(0, dtype=torch.bool)  # [0]
            return RewardResult(torch.zeros(0), {n: [] for n in self.names}, empty,
                                empty if self.accuracy_key else None, self.accuracy_key)
        total = [0.0] * B
        valid = [True] * B
        per_function: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        if self.concurrent and len(self._entries) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(self._entries)) as pool:
                futures = [pool.submit(self._run, e, prompts, completions, cols) for e in self._entries]
                outcomes = [f.result() for f in futures]  # re-raises the first failure in entry order
        else:
            outcomes = [self._run(e, prompts, completions, cols) for e in self._entries]
        for e, (values, failed) in zip(self._entries, outcomes):
            scores = []
            for i in range(B):
                if i in failed:
                    if self.on_error == "zero":
                        scores.append(0.0)
                    else:  # skip
                        scores.append(math.nan)
                        valid[i] = False
                elif values[i] is None:
                    scores.append(math.nan)
                else:
                    scores.append(values[i])
                    total[i] += e.weight * values[i]
            per_function[e.name] = scores
            if failed:
                errors[e.name] = len(failed)
        total_t = torch.tensor(total, dtype=torch.float32)  # [B]
        valid_t = torch.tensor(valid, dtype=torch.bool)  # [B]
        total_t[~valid_t] = math.nan
        correct = None
        if self.accuracy_key is not None:
            correct = torch.tensor([v >= 1.0 for v in per_function[self.accuracy_key]], dtype=torch.bool)  # [B]
        return RewardResult(total_t, per_function, valid_t, correct, self.accuracy_key, errors)

    def _kwargs(self, e: _Entry, cols: dict[str, list[Any]]) -> dict[str, Any]:
        passed = cols if e.accepts is None else {k: v for k, v in cols.items() if k in e.accepts}
        clash = [k for k in e.options if k in passed]
        if clash:
            raise RewardError(
                f"reward function '{e.name}': option(s) {clash} have the same name as data columns; "
                f"rename the option or the column (column_map)"
            )
        missing = [k for k in e.required if k not in e.options and k not in passed]
        if missing:
            raise RewardError(
                f"reward function '{e.name}' needs argument(s) {', '.join(map(repr, missing))}, which are neither "
                f"options nor data columns (columns: {', '.join(cols) or '(none)'}); set them in the reward's "
                f"options, e.g. ('{e.name}', {e.weight}, {{'{missing[0]}': ...}}), or add the column to the data"
            )
        return {**passed, **e.options}

    def _call(self, e: _Entry, prompts: list[str], completions: list[str], kwargs: dict[str, Any]) -> Any:
        if self.timeout_s is None:
            return e.fn(prompts, completions, **kwargs)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = e.fn(prompts, completions, **kwargs)
            except BaseException as exc:  # re-raised on the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"reward-{e.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise _Timeout()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _validate(self, e: _Entry, out: Any, n: int, first: int) -> list[float | None]:
        if not isinstance(out, (list, tuple)) and hasattr(out, "tolist"):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise RewardError(
                f"reward function '{e.name}' returned {type(out).__name__}; it must return a list of {n} "
                f"floats, one per completion (None for no score)"
            )
        if len(out) != n:
            raise RewardError(
                f"reward function '{e.name}' returned {len(out)} values for {n} completions; it must return "
                f"one value per completion (None for no score)"
            )
        values: list[float | None] = []
        for j, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            if not isinstance(v, numbers.Real):
                raise RewardError(
                    f"reward function '{e.name}' returned {type(v).__name__} {_preview(repr(v))} for sample "
                    f"{first + j}; values must be float, int, bool or None"
                )
            if not math.isfinite(float(v)):
                raise RewardError(
                    f"reward function '{e.name}' returned {v} for sample {first + j}; return None for "
                    f"'no score' instead of NaN/inf"
                )
            values.append(float(v))
        return values

    def _failure(self, e: _Entry, where: str, exc: BaseException) -> RewardError:
        if isinstance(exc, _Timeout):
            what = f"did not return within timeout_s = {self.timeout_s} s"
            fix = "raise rewards.timeout_s, or set rewards.on_error = \"zero\" to score such samples 0 instead"
        else:
            what = f"raised {type(exc).__name__}"
            fix = "set rewards.on_error = \"zero\" to score such samples 0 instead (or \"skip\" to drop them from the update)"
        detail = f": {_preview(str(exc))}" if str(exc) else ""
        return RewardError(f"reward function '{e.name}' {what} on {where}{detail}; {fix}")

    def _run(
        self, e: _Entry, prompts: list[str], completions: list[str], cols: dict[str, list[Any]]
    ) -> tuple[list[float | None], set[int]]:
        """-> (values, indices of failed samples). Raises in "raise" mode."""
        B = len(completions)
        kwargs = self._kwargs(e, cols)
        try:
            out = self._call(e, prompts, completions, kwargs)
        except _Timeout as exc:
            if self.on_error == "raise":
                where = f"a batch of {B} samples (first prompt {_preview(prompts[0])!r})"
                raise self._failure(e, where, exc) from None
            return [None] * B, set(range(B))
        except Exception as batch_exc:
            return self._run_each(e, prompts, completions, cols, batch_exc)
        return self._validate(e, out, B, 0), set()

    def _run_each(
        self, e: _Entry, prompts: list[str], completions: list[str], cols: dict[str, list[Any]], batch_exc: Exception
    ) -> tuple[list[float | None], set[int]]:
        """Retry sample by sample after the batch call raised, to find (and keep) each sample's result."""
        B = len(completions)
        values: list[float | None] = [None] * B
        failed: set[int] = set()
        for i in range(B):
            kwargs = self._kwargs(e, {k: v[i : i + 1] for k, v in cols.items()})
            try:
                out = self._call(e, prompts[i : i + 1], completions[i : i + 1], kwargs)
            except Exception as exc:
                if self.on_error == "raise":
                    where = f"sample {i} (prompt {_preview(prompts[i])!r})"
                    raise self._failure(e, where, exc) from (None if isinstance(exc, _Timeout) else exc)
                failed.add(i)
                continue
            values[i] = self._validate(e, out, 1, i)[0]
        if not failed and self.on_error == "raise":
            raise RewardError(
                f"reward function '{e.name}' raised {type(batch_exc).__name__} on the batch of {B} samples but on "
                f"none of them alone: {_preview(str(batch_exc))}; fix the function's batch handling"
            ) from batch_exc
        return values, failed
