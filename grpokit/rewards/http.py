"""Scorers behind HTTP (SPEC section 13): a remote reward endpoint and an LLM judge, standard library only.

Remote reward (`rewards.functions = ["remote"]`):

    [rewards.options.remote]
    url = "http://127.0.0.1:8000/score"
    batch_size = 32        # samples per POST
    concurrency = 4        # POSTs in flight (a thread pool over batches)
    timeout_s = 30.0       # per attempt
    retries = 3            # extra attempts after the first, with exponential backoff
    auth_env = "MY_REWARD_TOKEN"   # the NAME of an environment variable; its value is sent as
                                   # "Authorization: Bearer <value>" (never put the secret in the config)

  Request: POST, JSON body = a list of objects {"prompt": ..., "completion": ..., **columns}, one per
  sample of the batch (columns that are not JSON-serialisable are sent as their str()).
  Response: a JSON list of numbers or null, one per object (or {"rewards": [...]}); null = no score.

LLM judge (`rewards.functions = ["llm_judge"]`, LLM-as-a-judge, arXiv 2306.05685): one chat request per sample to any OpenAI-compatible
endpoint (`{base_url}/chat/completions`, e.g. a vLLM server), with a configurable template that may use
{problem}, {answer} (the row's `answer_column`) and {completion}; literal braces are written {{ }}.
The verdict (the message content) is parsed as `verdict = "yes_no"` (the last standalone yes/no,
yes = 1) or `"score"` (the last number in [0, 10], mapped to [0, 1]).

Errors and retries (both scorers): connection errors, timeouts, a dropped connection, HTTP 408/429
and 5xx are retried up to `retries` times, waiting backoff_s·2^k (capped at max_backoff_s); other
4xx, malformed JSON, a wrong-length answer and an unparseable verdict are not retried. A call in
which some samples failed raises `HTTPScorerError` after every request has finished; RewardSet then
re-asks sample by sample and its error policy (raise / zero / skip) decides for the failing ones.
Results already received are kept in a small cache for that re-ask, so nothing received is lost or
requested twice.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from grpokit.rewards.base import REWARDS, scorer_factory

#: HTTP statuses worth retrying (server overloaded or temporarily failing).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Samples whose results are kept for RewardSet's sample-by-sample re-ask (per scorer instance).
CACHE_SIZE = 4096

DEFAULT_JUDGE_TEMPLATE = (
    "You are grading a student's answer.\n\nProblem:\n{problem}\n\nReference answer:\n{answer}\n\n"
    "Student's answer:\n{completion}\n\nIs the student's final answer correct? Reply with one word: yes or no."
)
DEFAULT_JUDGE_SCORE_TEMPLATE = (
    "You are grading a student's answer.\n\nProblem:\n{problem}\n\nReference answer:\n{answer}\n\n"
    "Student's answer:\n{completion}\n\nRate the answer from 0 (wrong) to 10 (fully correct). Reply with the number only."
)


class HTTPScorerError(RuntimeError):
    """A request failed for good (after retries), or its answer could not be used."""


class _Retryable(Exception):
    pass


def auth_headers(auth_env: str | None, *, header: str = "Authorization", scheme: str = "Bearer", who: str) -> dict[str, str]:
    """{header: "scheme value-of-$auth_env"}, or {} without auth_env; a missing variable fails here."""
    if not auth_env:
        return {}
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", auth_env):
        raise ValueError(
            f"{who}: auth_env must be the NAME of an environment variable (e.g. 'MY_TOKEN'), not the secret itself"
        )
    value = os.environ.get(auth_env)
    if not value:
        raise ValueError(f"{who}: auth_env = '{auth_env}' but the environment variable {auth_env} is not set; export it before training")
    return {header: f"{scheme} {value}".strip()}


def post_json(
    url: str,
    payload: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    max_backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """POST `payload` as JSON and return the decoded JSON answer, retrying transient failures.

    At most 1 + retries attempts, each bounded by timeout_s; waits backoff_s·2^k (≤ max_backoff_s)
    between them. Raises HTTPScorerError naming the URL and the last failure.
    """
    body = json.dumps(payload).encode()
    hdrs = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(max_backoff_s, backoff_s * 2 ** (attempt - 1)))
        try:
            return _post_once(url, body, hdrs, timeout_s)
        except _Retryable as e:
            last = str(e)
    raise HTTPScorerError(f"POST {url} failed {retries + 1} times (last: {last}); check the server, or raise timeout_s/retries")


def _post_once(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Any:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        if e.code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {e.code}") from None
        detail = e.read()[:200].decode(errors="replace") if e.fp else ""
        raise HTTPScorerError(f"POST {url}: HTTP {e.code} {e.reason}: {detail}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Retryable(f"{type(e).__name__}: {reason}") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPScorerError(f"POST {url}: the answer is not valid JSON ({e}): {raw[:120]!r}") from None


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


class _Cache:
    """Results of recent samples by key, so a sample-by-sample re-ask does not repeat requests."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size, self._d, self._lock = size, {}, threading.Lock()

    def get(self, key: str) -> tuple[bool, Any]:
        with self._lock:
            return (True, self._d[key]) if key in self._d else (False, None)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.pop(next(iter(self._d)))


def _check_common(who: str, *, timeout_s: float, retries: int, backoff_s: float, concurrency: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"{who}: timeout_s must be > 0, got {timeout_s}")
    if not (isinstance(retries, int) and 0 <= retries <= 20):
        raise ValueError(f"{who}: retries must be an integer in [0, 20], got {retries!r}")
    if not backoff_s >= 0:
        raise ValueError(f"{who}: backoff_s must be >= 0, got {backoff_s}")
    if not (isinstance(concurrency, int) and concurrency >= 1):
        raise ValueError(f"{who}: concurrency must be an integer >= 1, got {concurrency!r}")


@REWARDS.register("remote")
@scorer_factory
class RemoteReward:
    """POST batches of {prompt, completion, **columns} to a URL; the answer is a list of floats or null."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 32,
        concurrency: int = 4,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        auth_env: str | None = None,
        auth_header: str = "Authorization",
        auth_scheme: str = "Bearer",
        columns: Sequence[str] | None = None,
    ) -> None:
        who = "rewards.options.remote"
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"{who}.url must start with http:// or https://, got {url!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"{who}.batch_size must be an integer >= 1, got {batch_size!r}")
        _check_common(who, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, concurrency=concurrency)
        self.url, self.batch_size, self.concurrency = url, batch_size, concurrency
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = timeout_s, retries, backoff_s, max_backoff_s
        self.headers = auth_headers(auth_env, header=auth_header, scheme=auth_scheme, who=who)
        self.columns = None if columns is None else list(columns)
        self._cache = _Cache()
        self.__name__ = "remote"

    def _items(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[dict[str, Any]]:
        keep = columns if self.columns is None else {k: v for k, v in columns.items() if k in self.columns}
        return [
            {"prompt": p, "completion": c, **{k: _jsonable(v[i]) for k, v in keep.items()}}
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]

    def _post_batch(self, items: list[dict[str, Any]]) -> list[float | None]:
        out = post_json(self.url, items, headers=self.headers, timeout_s=self.timeout_s, retries=self.retries,
                        backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s)
        if isinstance(out, dict) and "rewards" in out:
            out = out["rewards"]
        if not isinstance(out, list) or len(out) != len(items):
            raise HTTPScorerError(
                f"POST {self.url}: expected a JSON list of {len(items)} numbers (or null), got {json.dumps(out)[:120]}"
            )
        vals: list[float | None] = []
        for v in out:
            if v is None:
                vals.append(None)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                vals.append(float(v))
            else:
                raise HTTPScorerError(f"POST {self.url}: reward {v!r} is not a finite number or null")
        return vals

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        items = self._items(list(prompts), list(completions), columns)
        keys = [json.dumps(it, sort_keys=True) for it in items]
        values: list[Any] = [None] * len(items)
        todo = []
        for i, k in enumerate(keys):
            hit, v = self._cache.get(k)
            if hit:
                values[i] = v
            else:
                todo.append(i)
        batches = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        errors: list[str] = []

        def run(idx: list[int]) -> None:
            try:
                got = self._post_batch([items[i] for i in idx])
            except HTTPScorerError as e:
                errors.append(str(e))
                return
            for i, v in zip(idx, got):
                values[i] = v
                self._cache.put(keys[i], v)

        if batches:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batches))) as pool:
                list(pool.map(run, batches))
        if errors:
            raise HTTPScorerError(errors[0] if len(batches) == 1 else f"{len(errors)} of {len(batches)} batches failed; first: {errors[0]}")
        return values


def parse_verdict(text: str, verdict: str = "yes_no") -> float:
    """A judge's answer -> reward: "yes_no": the last standalone yes/no (yes = 1.0, no = 0.0);
    "score": the last number in [0, 10] (optionally written as N/10) divided by 10.
    Raises ValueError when there is none."""
    if verdict == "yes_no":
        found = re.findall(r"\b(yes|no)\b", text, flags=re.IGNORECASE)
        if not found:
            raise ValueError(f"no yes/no verdict in the judge's answer {text[:80]!r}")
        return 1.0 if found[-1].lower() == "yes" else 0.0
    if verdict == "score":
        found = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)(?:\s*/\s*10)?(?![\d.])", text)
        if not found:
            raise ValueError(f"no 0-10 score in the judge's answer {text[:80]!r}")
        x = float(found[-1])
        if not 0.0 <= x <= 10.0:
            raise ValueError(f"the judge's score {x} is outside [0, 10] in {text[:80]!r}")
        return x / 10.0
    raise ValueError(f"verdict must be 'yes_no' or 'score', got {verdict!r}")


@REWARDS.register("llm_judge")
@scorer_factory
class LLMJudge:
    """Ask an OpenAI-compatible chat endpoint whether each completion is right; yes/no or 0-10 verdicts."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        template: str | None = None,
        system: str | None = None,
        verdict: str = "yes_no",
        answer_column: str = "answer",
        max_tokens: int = 16,
        temperature: float = 0.0,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        auth_env: str | None = None,
    ) -> None:
        who = "rewards.options.llm_judge"
        if verdict not in ("yes_no", "score"):
            raise ValueError(f"{who}.verdict must be 'yes_no' or 'score', got {verdict!r}")
        _check_common(who, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, concurrency=concurrency)
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{who}.base_url must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1), got {base_url!r}")
        self.template = template or (DEFAULT_JUDGE_TEMPLATE if verdict == "yes_no" else DEFAULT_JUDGE_SCORE_TEMPLATE)
        try:
            self.template.format(problem="", answer="", completion="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"{who}.template may use only {{problem}}, {{answer}} and {{completion}} (write literal braces as {{{{ }}}}): {e!r}"
            ) from None
        self.model, self.system, self.verdict, self.answer_column = model, system, verdict, answer_column
        self.max_tokens, self.temperature, self.concurrency = max_tokens, temperature, concurrency
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = timeout_s, retries, backoff_s, max_backoff_s
        self.headers = auth_headers(auth_env, who=who)
        self._cache = _Cache()
        self.__name__ = "llm_judge"

    def messages(self, problem: str, answer: Any, completion: str) -> list[dict[str, str]]:
        content = self.template.format(problem=problem, answer="" if answer is None else answer, completion=completion)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": content}]

    def _ask(self, msgs: list[dict[str, str]]) -> float:
        payload = {"model": self.model, "messages": msgs, "max_tokens": self.max_tokens, "temperature": self.temperature}
        out = post_json(self.url, payload, headers=self.headers, timeout_s=self.timeout_s, retries=self.retries,
                        backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s)
        try:
            text = out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise HTTPScorerError(f"POST {self.url}: not a chat completion (no choices[0].message.content): {json.dumps(out)[:120]}") from None
        try:
            return parse_verdict(str(text), self.verdict)
        except ValueError as e:
            raise HTTPScorerError(f"unparseable verdict: {e}") from None

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        answers = columns.get(self.answer_column) or [None] * len(completions)
        msgs = [self.messages(p, a, c) for p, a, c in zip(prompts, answers, completions)]
        keys = [json.dumps(m) for m in msgs]
        values: list[float | None] = [None] * len(msgs)
        errors: list[str] = []

        def run(i: int) -> None:
            hit, v = self._cache.get(keys[i])
            if hit:
                values[i] = v
                return
            try:
                values[i] = self._ask(msgs[i])
            except HTTPScorerError as e:
                errors.append(str(e))
                return
            self._cache.put(keys[i], values[i])

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(msgs)))) as pool:
            list(pool.map(run, range(len(msgs))))
        if errors:
            raise HTTPScorerError(errors[0] if len(msgs) == 1 else f"{len(errors)} of {len(msgs)} judge requests failed; first: {errors[0]}")
        return values
