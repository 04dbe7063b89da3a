"""Where a run's numbers go: metrics.jsonl, samples.jsonl, TensorBoard and the progress bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"len/min": float(t.min()), "len/q25": q[0], "len/median": q[1], "len/q75": q[2],
            "len/max": float(t.max()), "len/mean": float(t.mean())}


class MetricsLogger:
    """Appends one JSON line per step; mirrors scalars to TensorBoard. Resume truncates later steps."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            self._truncate(self.run_dir / name, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _truncate(path: Path, keep_upto: int) -> None:
        """Drop lines of steps after `keep_upto` (written by a process killed before its checkpoint)."""
        if not path.exists():
            return
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= keep_upto]
        path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def rollout_metrics(col: Any, batch: Any, *, group_size: int) -> dict[str, float]:
    """Reward, accuracy, group, length, entropy, KL, credit and sampler-vs-trainer statistics of one rollout
    batch, over every rank's rows (placeholder rows excluded). `col` is the step's `Collected`, `batch` its
    `Batch` after the update (ℓ° filled in)."""
    from grpokit import dist

    sb, real = col.batch, col.global_row >= 0  # [B]
    idx = (real & sc_valid(col)).nonzero().flatten().tolist()  # rows with a reward (a 'skip'ped error has none)
    sc, roll = sb.scores, sb.rollout
    mine = {
        "gid": (col.global_row[idx] // group_size).tolist(), "total": sc.total[idx].tolist(),
        "correct": sc.correct[idx].tolist(), "len": roll.response_mask[idx].sum(1).tolist(),
        "trunc": roll.truncated[idx].tolist(), "per": {k: [v[i] for i in idx] for k, v in sc.per_function.items()},
    }
    parts = dist.all_gather_objects(mine)
    cat = {k: [x for p in parts for x in p[k]] for k in ("gid", "total", "correct", "len", "trunc")}
    total = torch.tensor(cat["total"], dtype=torch.float64)  # [N]
    m: dict[str, float] = {"reward/mean": float(total.mean()) if len(total) else 0.0,
                           "reward/std": float(total.std()) if len(total) > 1 else 0.0}
    for name in parts[0]["per"]:
        v = [float(x) for p in parts for x in p["per"].get(name, []) if x is not None and math.isfinite(x)]
        if v:
            m[f"reward/{name}/mean"] = float(np.mean(v))
    m["acc"] = float(np.mean(cat["correct"])) if cat["correct"] else 0.0
    groups: dict[int, list[int]] = {}
    for n, g in enumerate(cat["gid"]):
        groups.setdefault(g, []).append(n)
    m["frac_zero_var_groups"] = float(np.mean([float(total[g].max() == total[g].min()) for g in groups.values()])) if groups else 0.0
    p_hat = torch.tensor([float(np.mean([cat["correct"][i] for i in g])) for g in groups.values()], dtype=torch.float64)
    m["utility/arcsin"] = float((2 * torch.asin(p_hat.sqrt())).mean()) if len(p_hat) else 0.0  # FRPO's implicit utility
    m.update(quantiles([float(x) for x in cat["len"]]))
    m["truncation_rate"] = float(np.mean(cat["trunc"])) if cat["trunc"] else 0.0
    # token sums over ranks: entropy of the sampling policy, KL to the reference, what credit changed, and
    # how far the sampler's log-probs μ are from the trainer's ℓ° (SPEC 12)
    mask = (batch.response_mask & real[:, None]).float()  # [B, T]
    shift = (batch.token_adv - batch.seq_adv[:, None] * mask).abs()  # [B, T]
    d = (roll.logprobs.float() - batch.old_logp) * mask  # [B, T] μ - ℓ°
    sums = [float(mask.sum()), float((batch.entropy * mask).sum()), float((shift * mask).sum()),
            float(((shift > batch.seq_adv.abs()[:, None]).float() * mask).sum()), float(d.sum()),
            float(((torch.exp(-d) + d - 1) * mask).sum())]
    if batch.ref_logp is not None:
        k = batch.old_logp - batch.ref_logp  # [B, T]
        sums.append(float(((torch.exp(-k) + k - 1) * mask).sum()))
    tot = dist.all_reduce_sum(sums).tolist()
    n = max(tot[0], 1.0)
    m["entropy"] = tot[1] / n
    m["credit/shift_abs_mean"] = tot[2] / n
    m["credit/shift_gt_adv_frac"] = tot[3] / n
    m["mismatch/k1"] = tot[4] / n
    m["mismatch/k3"] = tot[5] / n
    m["mismatch/abs_max"] = float(dist.all_reduce_max_float(float(d.abs().max()) if d.numel() else 0.0))
    if batch.ref_logp is not None:
        m["kl_ref_rollout"] = tot[6] / n
    return m


def sc_valid(col: Any) -> torch.Tensor:
    return col.batch.scores.valid.bool()  # [B]


def sample_records(tokenizer: Any, col: Any, credit: torch.Tensor, *, group_size: int, limit: int) -> list[dict[str, Any]]:
    """A few completions (the first of each of the first groups) with their tokens and per-token credit,
    for samples.jsonl and the report."""
    sb = col.batch
    out = []
    for i in [i for i in range(0, len(sb), group_size) if col.global_row[i] >= 0][:limit]:
        n = int(sb.rollout.response_mask[i].sum())
        ids = sb.rollout.response_ids[i, :n].tolist()
        out.append({
            "prompt": sb.rows[i]["prompt"], "answer": str(sb.rows[i].get("answer", "")), "completion": sb.rollout.texts[i],
            "reward": float(sb.scores.total[i]), "tokens": [tokenizer.decode([t]) for t in ids],
            "credit": [round(float(x), 5) for x in credit[i, :n]],
        })
    return out
