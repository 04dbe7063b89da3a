"""Where a run's numbers go: metrics.jsonl, samples.jsonl, TensorBoard and the progress bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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
