"""A KV cache for one rollout: preallocated to its final length, shrinkable in the batch dimension.

Hugging Face's `DynamicCache` grows each layer with ``torch.cat`` every step, copying the whole cache
(O(L) per step, O(L^2) per rollout). `PreallocatedLayer` writes each step into a buffer sized for
``prompt + max_new_tokens`` and hands attention a view of the filled prefix. Dropping finished rows
(`Cache.batch_select_indices`) copies the surviving rows once. Shapes: b rows, h key-value heads,
L filled positions, C capacity, d head dim.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` backed by a ``[b, h, C, d]`` buffer; ``keys``/``values`` are ``[b, h, L, d]`` views."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buf = key_states.new_empty((b, h, self.capacity, d))  # [b, h, C, d]
        self.value_buf = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} positions for a cache sized {self.capacity}")
        self.key_buf[:, :, self.length : end] = key_states  # [b, h, q, d] into [b, h, C, d]
        self.value_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buf[:, :, :end]  # [b, h, L, d]
        self.values = self.value_buf[:, :, :end]  # [b, h, L, d]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.key_buf = self.key_buf[indices]  # [b', h, C, d]
        self.value_buf = self.value_buf[indices]
        self.keys = self.key_buf[:, :, : self.length]
        self.values = self.value_buf[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer does not support crop; use transformers.DynamicCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PreallocatedLayer does not support batch_repeat_interleave")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


def make_rollout_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """A cache for ``capacity`` positions: preallocated when every layer is a plain full-attention layer
    (Llama, Qwen, Mistral without sliding window, ...), else Hugging Face's own `DynamicCache` for the model
    (sliding-window, hybrid and linear-attention layers keep their own logic)."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache
