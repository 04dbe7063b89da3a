"""Causal LMs: loading (local dir, hub id, built-ins), the frozen reference copy (maybe quantized), LoRA,
precision helpers, activation checkpointing."""

from grpokit.models.checkpointing import enable_gradient_checkpointing
from grpokit.models.lora import apply_lora, merged_copy
from grpokit.models.loading import BUILTIN_MODELS, cache_root, load_model, normalize_tokenizer, ref_model, resolve_dtype
from grpokit.models.precision import autocast_context, resolve_precision
from grpokit.models.quant import module_nbytes, quantized_ref_model
from grpokit.models.tiny import make_tiny, save_tiny

__all__ = [
    "BUILTIN_MODELS",
    "apply_lora",
    "autocast_context",
    "cache_root",
    "enable_gradient_checkpointing",
    "load_model",
    "make_tiny",
    "merged_copy",
    "module_nbytes",
    "normalize_tokenizer",
    "quantized_ref_model",
    "ref_model",
    "resolve_dtype",
    "resolve_precision",
    "save_tiny",
]
