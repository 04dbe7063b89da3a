"""Rollouts: the KV-cache sampler (tokens, masks, log-probs) and teacher-forced log-prob scoring."""

from grpokit.rollout.logprobs import position_ids_from_mask, token_logprobs
from grpokit.rollout.sampler import Sampler, encode_prompts, left_pad
from grpokit.rollout.types import Rollout

__all__ = ["Rollout", "Sampler", "encode_prompts", "left_pad", "position_ids_from_mask", "token_logprobs"]
