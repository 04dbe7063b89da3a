"""The REWARDS registry, `load_reward`, and the correctness marker used for the accuracy metric.

A reward function is a plain callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

returning one value per sample; None means "no score for this sample" (the function then adds nothing
to that sample's total). Columns are the rows' extra columns as lists (e.g. `answer`), plus
`completion_lengths` (list[int], response tokens) and `truncated` (list[bool]). A function receives only
the columns its signature names, or all of them if it takes `**kwargs`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

from grpokit.algo.registry import Registry

RewardFn = Callable[..., list]

#: Built-in and user reward functions by name; `load_reward("name")` looks here first.
REWARDS = Registry("reward function")

#: Attribute that marks a reward as a correctness check (1.0 = correct), see `correctness`.
CORRECTNESS_ATTR = "grpokit_correctness"

#: Attribute that marks a registered entry as a scorer factory, see `scorer_factory`.
FACTORY_ATTR = "grpokit_scorer_factory"


def correctness(fn: RewardFn) -> RewardFn:
    """Mark `fn` as a correctness reward: the accuracy metric counts samples where it returns >= 1.

    `RewardSet` uses the first marked function of its specs (numeric_match, math_verify and
    reasoning_gym are marked) unless told otherwise with `accuracy_key`.
    """
    setattr(fn, CORRECTNESS_ATTR, True)
    return fn


def is_correctness(fn: Any) -> bool:
    """Whether `fn` was marked with `correctness`."""
    return bool(getattr(fn, CORRECTNESS_ATTR, False))


def scorer_factory(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
    """Mark `factory` (e.g. a scorer class) as building a reward from keyword options.

    `RewardSet` calls `factory(**options)` once, at construction, and uses the returned callable
    as the reward with no per-call options; so `rewards.options.orm = {model = "path"}` builds one
    `ORMScorer(model="path")` that keeps its model loaded across steps.
    """
    setattr(factory, FACTORY_ATTR, True)
    return factory


def is_factory(fn: Any) -> bool:
    """Whether `fn` was marked with `scorer_factory` (a class or function that builds a reward)."""
    return bool(getattr(fn, FACTORY_ATTR, False)) and (isinstance(fn, type) or FACTORY_ATTR in getattr(fn, "__dict__", {}))


def build_scorer(name: str, fn: Any, options: dict[str, Any]) -> RewardFn:
    """`fn(**options)` if `fn` is a scorer factory, else `fn` itself (options stay per-call keywords).

    A bad option fails here, naming the scorer and the options it takes.
    """
    if not is_factory(fn):
        return fn
    try:
        return fn(**options)
    except TypeError as e:
        import inspect

        try:
            takes = ", ".join(p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs"))
        except (TypeError, ValueError):
            takes = "(unknown)"
        raise TypeError(f"reward '{name}': cannot build it from options {sorted(options)}: {e}; it takes: {takes}") from e


def load_reward(spec: str) -> RewardFn:
    """A reward function by registered name (`numeric_match`), `module:function`, or `path/file.py:function`."""
    if ":" not in spec:
        return REWARDS.get(spec)
    module_name, fn_name = spec.rsplit(":", 1)
    if not module_name or not fn_name:
        raise ValueError(f"reward '{spec}': expected 'module:function' (e.g. 'my_rewards:exact_match')")
    if module_name.endswith(".py"):
        module = _import_file(spec, module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            missing = getattr(e, "name", None)
            raise ImportError(
                f"reward '{spec}': cannot import module '{module_name}' ({type(e).__name__}: {e}); "
                + (
                    f"make sure '{module_name}' is importable: put its directory on PYTHONPATH (the working "
                    f"directory is {os.getcwd()}) or use 'path/to/{module_name.split('.')[-1]}.py:{fn_name}'"
                    if missing == module_name or (missing and module_name.startswith(missing + "."))
                    else f"the module imports '{missing}', which is not installed"
                )
            ) from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise AttributeError(
            f"reward '{spec}': module '{module_name}' has no attribute '{fn_name}'; "
            f"its public callables: {', '.join(sorted(public)) or '(none)'}"
        )
    if not callable(fn):
        raise TypeError(f"reward '{spec}': '{fn_name}' is a {type(fn).__name__}, not a function")
    return fn


def _import_file(spec: str, path: str) -> Any:
    if not os.path.exists(path):
        raise ImportError(f"reward '{spec}': file '{path}' not found (working directory {os.getcwd()})")
    name = "grpokit_user_rewards_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ImportError(f"reward '{spec}': importing '{path}' failed: {type(e).__name__}: {e}") from e
    return module
