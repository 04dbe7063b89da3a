"""The `Rollout` batch that the sampler returns and the trainer scores.

Shapes: B sequences, P prompt tokens (left-padded), T response tokens (right-padded; T is the longest
response in the batch, at most ``max_new_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """Sampled responses and everything the loss needs about them.

    Fields:
        prompt_ids: [B, P] int64, left-padded with the tokenizer's pad id.
        prompt_mask: [B, P] bool, True on real prompt tokens.
        response_ids: [B, T] int64, right-padded with the pad id.
        response_mask: [B, T] bool, True on real response tokens, including the EOS token when one was
            produced (and the token that completed a stop string); False after it.
        logprobs: [B, T] float32, log-prob of each sampled token under the temperature-scaled sampling
            distribution (the full softmax of ``logits / temperature``, before top-k/top-p; see `Sampler`);
            0 where masked.
        truncated: [B] bool, True when the row hit ``max_new_tokens`` without EOS or a stop string.
        texts: B decoded responses, special tokens skipped, cut before the first stop string.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]

    def input_ids(self) -> torch.Tensor:
        """[B, P+T] int64: prompt and response, for teacher-forced scoring."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [B, P+T]

    def attention_mask(self) -> torch.Tensor:
        """[B, P+T] bool: prompt mask then response mask (left and right padding both False)."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # [B, P+T]

    def response_lengths(self) -> torch.Tensor:
        """[B] int64: number of real response tokens per row (EOS included)."""
        return self.response_mask.sum(dim=1)  # [B]

    def to(self, device: str | torch.device) -> "Rollout":
        """The same rollout with every tensor on `device` (the texts are shared)."""
        return Rollout(*(getattr(self, f).to(device) for f in ("prompt_ids", "prompt_mask", "response_ids",
                                                              "response_mask", "logprobs", "truncated")), self.texts)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]
