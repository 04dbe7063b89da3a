"""Reward-model ensembles (Coste et al., arXiv 2310.02743; SPEC section 13): `rewards.functions = ["ensemble"]`.

    [rewards.options.ensemble]
    method = "uwo"            # "mean" | "wco" (worst case: min) | "uwo" (mean - lam * unbiased var)
    lam = 0.1
    members = [{name = "orm", model = "runs/orm_a"}, {name = "orm", model = "runs/orm_b"}, "numeric_match"]

A member is a registered name or "module:function" (a string), or a table `{name = ..., **options}`;
scorer factories (orm, prm, llm_judge, remote, code_exec) are built from their options, and plain
functions get their options as keywords on every call. Each member receives the columns its
signature names. Per sample, the combination runs over the members that scored it (a member's
None leaves it out); a sample no member scored gets None. `uwo` with a single score has var 0.
A member that raises makes the whole ensemble raise for that call (RewardSet's error policy then
applies sample by sample).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import torch

from grpokit.rewards.base import REWARDS, build_scorer, load_reward, scorer_factory

#: Ensemble combinations (arXiv 2310.02743).
ENSEMBLE_METHODS = ("mean", "wco", "uwo")
#: λ of uncertainty-weighted optimisation (the paper's and SPEC's default).
UWO_LAMBDA = 0.1


def combine(scores: torch.Tensor, method: str = "mean", *, lam: float = UWO_LAMBDA) -> torch.Tensor:
    """Combine k reward scores per sample: mean_k, wco = min_k, uwo = mean_k − λ·var_k (unbiased).

    arXiv 2310.02743 (SPEC section 13). var with k = 1 is 0. Shapes: scores [K,B] -> [B].
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"ensemble method must be one of {', '.join(ENSEMBLE_METHODS)}, got {method!r}")
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"combine needs scores of shape [K >= 1, B], got {tuple(scores.shape)}")
    mean = scores.mean(0)  # [B]
    if method == "mean":
        return mean
    if method == "wco":
        return scores.amin(0)  # [B]
    k = scores.shape[0]
    var = ((scores - mean) ** 2).sum(0) / max(k - 1, 1)  # [B] unbiased
    return mean - lam * var  # [B]


class _Member:
    def __init__(self, name: str, fn: Callable[..., list], options: dict[str, Any]) -> None:
        self.name, self.fn, self.options = name, fn, options
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            params = []
        P = inspect.Parameter
        self.accepts = None if any(p.kind is P.VAR_KEYWORD for p in params) else {
            p.name for p in list(params)[2:] if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
        }

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, Any]) -> list:
        cols = columns if self.accepts is None else {k: v for k, v in columns.items() if k in self.accepts}
        out = self.fn(prompts, completions, **{**cols, **self.options})
        out = out.tolist() if hasattr(out, "tolist") else list(out)
        if len(out) != len(completions):
            raise ValueError(f"ensemble member '{self.name}' returned {len(out)} values for {len(completions)} completions")
        return out


def _member(spec: Any, i: int) -> _Member:
    if callable(spec):
        return _Member(getattr(spec, "__name__", type(spec).__name__), spec, {})
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"ensemble member {i} is {spec!r}; give a reward name ('orm') or a table with a name and its "
            f"options ({{name = 'orm', model = 'path'}})"
        )
    options = {k: v for k, v in spec.items() if k != "name"}
    fn = load_reward(spec["name"])
    built = build_scorer(spec["name"], fn, options)
    return _Member(spec["name"], built, {} if built is not fn else options)


@REWARDS.register("ensemble")
@scorer_factory
class Ensemble:
    """Combine several scorers per sample with `mean`, `wco` (min) or `uwo` (mean − λ·var), arXiv 2310.02743."""

    def __init__(self, members: Sequence[Any], method: str = "mean", lam: float = UWO_LAMBDA) -> None:
        if method not in ENSEMBLE_METHODS:
            raise ValueError(f"rewards.options.ensemble.method must be one of {', '.join(ENSEMBLE_METHODS)}, got {method!r}")
        if not members:
            raise ValueError("rewards.options.ensemble.members is empty; list at least one scorer, e.g. ['orm', 'numeric_match']")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"rewards.options.ensemble.lam must be a finite number >= 0, got {lam!r}")
        self.method, self.lam = method, float(lam)
        self.members = [_member(m, i) for i, m in enumerate(members)]
        self.__name__ = "ensemble"

    def member_scores(self, prompts: list[str], completions: list[str], **columns: Any) -> list[list[float | None]]:
        """Each member's scores: [K][B], None where a member gave no score."""
        return [m(list(prompts), list(completions), columns) for m in self.members]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        per = self.member_scores(prompts, completions, **columns)
        out: list[float | None] = []
        for i in range(len(completions)):
            vals = [float(p[i]) for p in per if p[i] is not None]
            out.append(None if not vals else float(combine(torch.tensor(vals, dtype=torch.float64)[:, None],
                                                           self.method, lam=self.lam)[0]))
        return out
