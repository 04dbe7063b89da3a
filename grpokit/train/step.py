"""The one call site of `grpokit.algo`: advantages once per rollout, then loss per micro-batch.

Shapes: B sequences, T response tokens (right-padded), P prompt tokens (left-padded).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from grpokit.algo import ADVANTAGES, AGGREGATIONS, CREDIT, KL, LOSSES
from grpokit.config import AlgoConfig

CLIP_STATS = {"clipped_low": "clip/low", "clipped_high": "clip/high", "dual_clipped": "clip/dual"}


@dataclass
class Batch:
    """One rollout batch, ready for the update. Every tensor has B rows."""

    input_ids: torch.Tensor        # [B, P+T] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor   # [B, P+T]
    response_mask: torch.Tensor    # [B, T] bool, real response tokens
    loss_mask: torch.Tensor        # [B, T] bool, tokens that enter the loss (overlong filtering may drop rows)
    group_ids: torch.Tensor        # [B] int64
    rewards: torch.Tensor          # [B] f32, after any KL-in-reward shaping
    seq_adv: torch.Tensor          # [B] f32
    token_adv: torch.Tensor        # [B, T] f32, the final per-token advantage (credit)
    old_logp: torch.Tensor         # [B, T] f32
    ref_logp: torch.Tensor | None  # [B, T] f32 or None when beta = 0
    entropy: torch.Tensor          # [B, T] f32, of the sampling policy (metrics only)

    def select(self, idx: torch.Tensor) -> "Batch":
        """Rows `idx`, with columns trimmed to what those rows use (all-pad prompt columns, tail)."""
        sub = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)}
        T = self.response_mask.shape[1]
        P = self.input_ids.shape[1] - T
        t_used = int(sub["response_mask"].sum(1).max().item()) if len(idx) else 0  # longest response
        t_used = max(t_used, 1)
        p_first = int(sub["attention_mask"][:, :P].any(0).float().argmax().item()) if P else 0
        sub["input_ids"] = sub["input_ids"][:, p_first : P + t_used]  # [b, P'+T']
        sub["attention_mask"] = sub["attention_mask"][:, p_first : P + t_used]  # [b, P'+T']
        for name in ("response_mask", "loss_mask", "token_adv", "old_logp", "ref_logp", "entropy"):
            if sub[name] is not None:
                sub[name] = sub[name][:, :t_used]  # [b, T']
        return Batch(**sub)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]


def plan_microbatches(
    lengths: torch.Tensor, *, micro_batch_size: int, max_tokens: int = 0
) -> list[torch.Tensor]:
    """Split row indices into micro-batches: a fixed count, or packed by a token budget.

    `lengths` [B] are total (prompt + response) token counts. With `max_tokens`, rows are taken in
    order and a micro-batch closes when adding the next row would make (rows x longest row) exceed
    the budget; a single row longer than the budget gets a micro-batch of its own.
    """
    B = lengths.shape[0]
    if max_tokens <= 0:
        return [torch.arange(s, min(s + micro_batch_size, B)) for s in range(0, B, micro_batch_size)]
    out: list[torch.Tensor] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths.tolist()):
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            out.append(torch.tensor(current))
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        out.append(torch.tensor(current))
    return out


def sequence_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, cfg: AlgoConfig) -> torch.Tensor:
    """Group-relative advantages from scalar rewards (SPEC 1). rewards [B], group_ids [B] -> [B]."""
    return ADVANTAGES.call(cfg.advantage, rewards, group_ids, eps=cfg.adv_eps, std=cfg.std)  # [B]


def token_credit(
    seq_adv: torch.Tensor, response_mask: torch.Tensor, *, cfg: AlgoConfig,
    old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
) -> torch.Tensor:
    """The per-token advantage (broadcast, or FRPO's A_i - beta * KL-to-go, SPEC 7): [B, T], no grad."""
    return CREDIT.call(
        cfg.credit, seq_adv, response_mask, old_logp=old_logp, ref_logp=ref_logp,
        beta=cfg.beta, divergence=cfg.divergence,
    ).float()  # [B, T]


def loss_hparams(cfg: AlgoConfig) -> dict[str, object]:
    """The keyword hyperparameters every registered loss may take; each takes only its own."""
    return dict(
        clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        dual_clip_c=cfg.dual_clip_c if cfg.dual_clip_c > 0 else None,
        tau=cfg.fipo_tau, f_low=cfg.fipo_f_low, f_high=cfg.fipo_f_high,
        safety=cfg.fipo_safety, drop_seqs=cfg.fipo_drop_seqs,
    )


class StatSums:
    """Sums of per-token statistics over micro-batches (and ranks), divided once at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        v = values.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + float((v * mask).sum())
        self.counts[name] = self.counts.get(name, 0.0) + float(mask.sum())

    def add_extreme(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        if mask.any():
            v = values.detach().float()[mask]
            lo, hi = float(v.min()), float(v.max())
            self.sums[name + "/min"] = min(self.sums.get(name + "/min", lo), lo)
            self.sums[name + "/max"] = max(self.sums.get(name + "/max", hi), hi)

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.counts if self.counts[k] > 0}
        out.update({k: v for k, v in self.sums.items() if k.endswith(("/min", "/max"))})
        return out


def micro_batch_loss(
    batch: Batch, logp: torch.Tensor, *, cfg: AlgoConfig, num_tokens: float, num_seqs: float,
    norm_const: float, stats: StatSums,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss (+ KL in the loss) for one micro-batch, aggregated with the global counts.

    `logp` [b, T'] carries the gradient. Summing the returned values over all micro-batches and ranks
    of an optimizer step gives the full-batch loss of SPEC section 3. Also returns the loss's
    per-token statistics (clip flags, FIPO weights, ...) for this micro-batch.
    """
    mask = batch.loss_mask  # [b, T']
    per_tok, s = LOSSES.call(cfg.loss, logp, batch.old_logp, batch.token_adv, mask, **loss_hparams(cfg))  # [b, T']
    if cfg.beta > 0 and cfg.kl_placement == "loss":
        kl = KL.call(cfg.kl_estimator, logp, batch.ref_logp)  # [b, T']
        per_tok = per_tok + cfg.beta * kl * mask
    loss = AGGREGATIONS.call(
        cfg.aggregation, per_tok, mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_const=norm_const
    )
    fm = mask.float()
    stats.add("ppo_kl", batch.old_logp - logp, fm)
    if batch.ref_logp is not None:
        stats.add("kl_ref", KL.call("k3", logp, batch.ref_logp), fm)
    for key, name in CLIP_STATS.items():
        stats.add(name, s[key].float(), fm)
    for key, value in s.items():
        if key.startswith("fipo_") and value.dim() == 2:
            name = "fipo/" + key[5:]
            stats.add(name, value.float(), fm)
            if key == "fipo_weight":
                stats.add_extreme(name, value, mask)
                stats.add("fipo/at_low", (value <= cfg.fipo_f_low + 1e-7).float(), fm)
                stats.add("fipo/at_high", (value >= cfg.fipo_f_high - 1e-7).float(), fm)
        elif key.startswith("fipo_"):
            stats.add("fipo/" + key[5:], value.float(), torch.ones_like(value, dtype=torch.float32))
    return loss, s
