"""`ScoredBatch`: one rollout batch with its rewards, the unit every batch transform takes and returns.

Shapes: B rows on this rank (whole groups: a group never spans ranks), T response tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from grpokit.rollout.types import Rollout


@dataclass
class Scores:
    """Rewards of one rollout batch: total [B] (NaN-free), per scorer, and which samples count."""

    total: torch.Tensor                 # [B] f32, 0 where valid is False
    per_function: dict[str, list[float]]
    valid: torch.Tensor                 # [B] bool (False: a 'skip'ped reward error)
    correct: torch.Tensor               # [B] bool: the correctness reward >= 1 (or total >= 1 without one)

    @staticmethod
    def of(result: Any) -> "Scores":
        total = result.total.float()  # [B]
        valid = result.valid.bool() & torch.isfinite(total)  # [B]
        total = torch.where(valid, total, torch.zeros_like(total))  # [B]
        correct = result.correct.bool() if result.correct is not None else total >= 1  # [B]
        return Scores(total, dict(result.per_function), valid, correct & valid)

    def select(self, idx: list[int]) -> "Scores":
        return Scores(self.total[idx], {k: [v[i] for i in idx] for k, v in self.per_function.items()},
                      self.valid[idx], self.correct[idx])

    @staticmethod
    def cat(parts: list["Scores"]) -> "Scores":
        keys = parts[0].per_function.keys()
        return Scores(torch.cat([p.total for p in parts]), {k: sum((p.per_function[k] for p in parts), []) for k in keys},
                      torch.cat([p.valid for p in parts]), torch.cat([p.correct for p in parts]))


@dataclass
class ScoredBatch:
    """Rows, their rollout and their scores, plus where each group stands in the global batch.

    group_key [B]: (round, global prompt index) packed into one int64, the same for every member of a
        group and independent of the number of ranks; the trainer orders kept groups by it, so 1 rank and
        N ranks assemble the same global batch.
    loss_rows [B]: rows that enter the loss (a transform such as overlong filtering clears rows here; they
        still count in their group's advantage statistics, as DAPO specifies).
    """

    rows: list[dict[str, Any]]
    rollout: Rollout
    scores: Scores
    group_key: torch.Tensor   # [B] int64
    loss_rows: torch.Tensor   # [B] bool

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: list[int]) -> "ScoredBatch":
        """Rows `idx` (keep groups whole)."""
        r = self.rollout
        roll = Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.response_ids[idx], r.response_mask[idx],
                       r.logprobs[idx], r.truncated[idx], [r.texts[i] for i in idx])
        return ScoredBatch([self.rows[i] for i in idx], roll, self.scores.select(idx),
                           self.group_key[idx], self.loss_rows[idx])

    def with_scores(self, scores: Scores) -> "ScoredBatch":
        return replace(self, scores=scores)

    def groups(self) -> list[list[int]]:
        """Row indices of each group, in order (groups are contiguous)."""
        out: list[list[int]] = []
        keys = self.group_key.tolist()
        for i, k in enumerate(keys):
            if i and k == keys[i - 1]:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    @staticmethod
    def cat(parts: list["ScoredBatch"], pad_id: int) -> "ScoredBatch":
        return ScoredBatch(
            [r for p in parts for r in p.rows],
            concat_rollouts([(p.rollout, list(range(len(p)))) for p in parts], pad_id),
            Scores.cat([p.scores for p in parts]),
            torch.cat([p.group_key for p in parts]),
            torch.cat([p.loss_rows for p in parts]),
        )


def concat_rollouts(parts: list[tuple[Rollout, list[int]]], pad_id: int) -> Rollout:
    """Rows `idx` of several rollouts, re-padded to one width (prompts left, responses right)."""
    P = max(r.prompt_ids.shape[1] for r, _ in parts)
    T = max(r.response_ids.shape[1] for r, _ in parts)

    def left(x: torch.Tensor, fill: Any) -> torch.Tensor:
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=fill)

    def right(x: torch.Tensor, fill: Any) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)

    return Rollout(
        prompt_ids=torch.cat([left(r.prompt_ids[i], pad_id) for r, i in parts]),  # [B, P]
        prompt_mask=torch.cat([left(r.prompt_mask[i], False) for r, i in parts]),  # [B, P]
        response_ids=torch.cat([right(r.response_ids[i], pad_id) for r, i in parts]),  # [B, T]
        response_mask=torch.cat([right(r.response_mask[i], False) for r, i in parts]),  # [B, T]
        logprobs=torch.cat([right(r.logprobs[i], 0.0) for r, i in parts]),  # [B, T]
        truncated=torch.cat([r.truncated[i] for r, i in parts]),  # [B]
        texts=[r.texts[j] for r, i in parts for j in i],
    )


def finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]
