"""Reward functions: plain callables `(prompts, completions, **columns) -> list[float | None]`.

    rewards = RewardSet([("numeric_match", 1.0), ("format", 0.1, {"preset": "number"})], on_error="raise")
    columns = columns_from_rows(rows, completion_lengths=lengths, truncated=rollout.truncated)
    result = rewards.score(prompts, rollout.texts, columns)   # RewardResult; unpacks as (total, per_function)

Built in (REWARDS): numeric_match, format, overlong (DAPO), math_verify, reasoning_gym.
Scorers built from their options (SPEC 13; `rewards.options.<name> = {...}`): orm, prm (models.py),
llm_judge, remote (http.py), ensemble (ensemble.py), code_exec (sandbox.py).
Your own: any callable, or `load_reward("my_module:my_fn")` / `"path/to/file.py:my_fn"`;
`REWARDS.register("name")` to give it a name. Mark a correctness reward with `@correctness` so the
accuracy metric uses it. See `grpokit.rewards.rewardset` for weights, None, errors and timeouts.
"""
from grpokit.rewards.base import REWARDS, RewardFn, correctness, is_correctness, load_reward
from grpokit.rewards.builtin import FORMAT_PRESETS, format_reward, numeric_match, overlong
from grpokit.rewards.extract import answer_key, extract_number, format_number, last_answer_tag, last_boxed, last_number, parse_number
from grpokit.rewards.gym import extract_rg_answer, reasoning_gym
from grpokit.rewards.latex import math_verify
from grpokit.rewards.rewardset import RewardError, RewardResult, RewardSet, columns_from_rows
from grpokit.rewards.base import build_scorer, is_factory, scorer_factory
from grpokit.rewards.ensemble import Ensemble, combine
from grpokit.rewards.http import HTTPScorerError, LLMJudge, RemoteReward, parse_verdict
from grpokit.rewards.sandbox import CodeExec, SandboxError, extract_code, parse_tests, run_sandboxed
from grpokit.rewards.models import ORMScorer, PRMScorer, PRMSteps, aggregate_steps, process_credit_inputs, split_steps, step_token_ends

__all__ = [
    "REWARDS", "RewardFn", "correctness", "is_correctness", "load_reward",
    "numeric_match", "format_reward", "overlong", "math_verify", "reasoning_gym", "FORMAT_PRESETS",
    "answer_key", "extract_number", "format_number", "last_boxed", "last_number", "last_answer_tag", "parse_number", "extract_rg_answer",
    "RewardSet", "RewardResult", "RewardError", "columns_from_rows",
    "scorer_factory", "is_factory", "build_scorer",
    "Ensemble", "combine", "LLMJudge", "RemoteReward", "HTTPScorerError", "parse_verdict",
    "ORMScorer", "PRMScorer", "PRMSteps", "aggregate_steps", "process_credit_inputs", "split_steps", "step_token_ends",
    "CodeExec", "SandboxError", "extract_code", "parse_tests", "run_sandboxed",
]
