"""Mixed precision: one helper that picks and enters bf16 autocast where the hardware supports it."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["bf16", "fp32", "auto"]


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); else bf16 is emulated
    and usually slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: str | torch.device, dtype: Precision | None) -> Literal["bf16", "fp32"]:
    """Map ``"auto"`` to ``"bf16"`` where supported (CUDA with bf16, or a CPU with native bf16), else ``"fp32"``."""
    if dtype in (None, "fp32", "float32"):
        return "fp32"
    if dtype in ("bf16", "bfloat16"):
        return "bf16"
    if dtype != "auto":
        raise ValueError(f"unknown autocast dtype {dtype!r}; use 'bf16', 'fp32' or 'auto'")
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device_type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast_context(device: str | torch.device, dtype: Precision | None = "auto"):
    """A context manager: bf16 autocast on ``device`` when ``dtype`` resolves to bf16, else a no-op.

    ``with autocast_context("cpu", "bf16"): logits = model(ids).logits`` runs matmuls in bf16; reduce and
    take log-softmaxes in float32 afterwards (``logits.float()``).
    """
    if resolve_precision(device, dtype) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
