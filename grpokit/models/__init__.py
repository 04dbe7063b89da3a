"""Causal LMs: loading (local dir, hub id, built-ins), the frozen reference copy, precision helpers."""

from grpokit.models.loading import BUILTIN_MODELS, cache_root, load_model, normalize_tokenizer, ref_model, resolve_dtype
from grpokit.models.precision import autocast_context, resolve_precision
from grpokit.models.tiny import make_tiny, save_tiny

__all__ = [
    "BUILTIN_MODELS",
    "autocast_context",
    "cache_root",
    "load_model",
    "make_tiny",
    "normalize_tokenizer",
    "ref_model",
    "resolve_dtype",
    "resolve_precision",
    "save_tiny",
]
