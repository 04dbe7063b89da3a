"""Supervised fine-tuning on (prompt, completion) pairs: stage 1 of the R1 recipe (SPEC 10), and the
warm-up that gives a from-scratch test model the answer format before RL.

The loss is the mean cross-entropy of the completion tokens (the prompt and padding are masked out);
prompts go through the same chat template as rollouts, and every completion ends with EOS.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from grpokit.rollout import encode_prompts
from grpokit.rollout.logprobs import token_logprobs


def sft_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, chat: bool = True,
              system: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts + right-padded completions: input_ids [B, P+T], attention_mask [B, P+T], T."""
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs], system=system, chat=chat)
    eos = tokenizer.eos_token_id
    comps = [tokenizer.encode(c, add_special_tokens=False) + [eos] for _, c in pairs]
    P, T = max(map(len, prompts)), max(map(len, comps))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(pairs), P + T), pad, dtype=torch.long)  # [B, P+T]
    mask = torch.zeros(len(pairs), P + T, dtype=torch.bool)  # [B, P+T]
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(c)] = torch.tensor(c)
        mask[i, P - len(p) : P + len(c)] = True
    return ids, mask, T


def sft(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, steps: int,
        batch_size: int = 32, lr: float = 1e-3, seed: int = 0, chat: bool = True,
        system: str | None = None) -> list[float]:
    """Train on random mini-batches of `pairs` for `steps` AdamW steps; returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        ids, mask, T = sft_batch(tokenizer, batch, chat=chat, system=system)
        logp = token_logprobs(model, ids, mask, T)  # [B, T]
        resp = mask[:, -T:]  # [B, T]
        loss = -(logp * resp).sum() / resp.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
