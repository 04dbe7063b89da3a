"""A weight-only quantized frozen reference model (SPEC section 10, the memory paragraph).

The KL reference π_ref is never trained, so it can be held in fewer bits: each ``nn.Linear`` of a frozen
copy is replaced by a `WeightOnlyLinear` that stores its weight as integers plus scales and dequantizes it
on the fly inside ``forward`` (activations, the matmul and the log-softmax stay in the compute dtype). Its
log-probs then differ from the full-precision reference's by a measured amount (``benchmarks/quant_ref.py``;
on SmolLM2-135M int8 adds a k3 floor of ~4e-3 per token, round-to-nearest int4 at group 64 one of ~0.3).

Schemes (`SCHEMES`; ``"none"`` is the plain frozen copy, `grpokit.models.ref_model`):

- ``"int8"``: per-output-channel symmetric. Row n of W [N, K] gets s_n = max_k |W_nk| / 127 (float32) and
  q = round(W / s) in [-127, 127] (int8). Error |W − q·s| ≤ s_n / 2. 8 bits per weight + 32 per row.
- ``"int4"``: group-wise asymmetric (min/max, as GPTQ and torchao's int4 weight-only). Each row is cut into
  groups of ``group_size`` consecutive input features (K is zero-padded up to a multiple of it); a group
  with range [lo, hi] gets s = (hi − lo) / 15 and offset m = lo, both stored as float16, and
  q = round((W − m) / s) in [0, 15], packed two per byte (even index in the low nibble). Error
  ≤ s / 2 plus the float16 rounding of s and m (relative 2^-11). 4 bits per weight + 32 bits per group
  (4.5 bits per weight at group 64).

Both are round-to-nearest (RTN), with no calibration data: the int8 grid is LLM.int8()'s vector-wise
absmax (arXiv 2208.07339, without its fp16 outlier decomposition), the int4 grid GPTQ's / AWQ's group-wise
min/max (arXiv 2210.17323, 2306.00978, without their error-compensating or activation-aware rounding).

Embeddings and the output head (``lm_head``) stay in full precision by default (``embeddings=False``):
they are where a quantization error reaches the log-probs most directly, and in a large model they are a
small share of the weights. ``embeddings=True`` quantizes both with the same scheme (row-wise, which for
the head is per output channel, so a tied embedding/head keeps one shared quantized copy).

This is plain torch and runs on any device. torchao 0.18 installs beside torch 2.13 (it declares no torch
requirement); its ``Int8WeightOnlyConfig`` runs on CPU and matches this int8 closely (benchmarks), but its
int4 needs CUDA or the ``mslk`` kernel package, hence this implementation. On GPU, bitsandbytes (``Linear8bitLt``, ``Linear4bit`` NF4) and torchao
(``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``) are faster fused alternatives for the same idea.

Shapes: N output features, K input features, G = ceil(K / group_size) groups, ... leading dims.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SCHEMES",
    "QuantScheme",
    "QuantEmbedding",
    "WeightOnlyLinear",
    "dequantize_int4",
    "dequantize_int8",
    "get_scheme",
    "module_nbytes",
    "quantize_int4",
    "quantize_int8",
    "quantized_ref_model",
]

#: Largest int8 code; the symmetric grid is [-INT8_QMAX, INT8_QMAX] (-128 unused, so the grid is symmetric).
INT8_QMAX = 127
#: Largest int4 code; the asymmetric grid is [0, INT4_QMAX].
INT4_QMAX = 15
#: dtype of the int4 group scales and offsets (float16: 10 mantissa bits, far finer than the 4-bit grid).
INT4_SCALE_DTYPE = torch.float16
#: Default int4 group size (input features per scale/offset pair).
DEFAULT_GROUP_SIZE = 64


# ---------------------------------------------------------------------------- int8, per output channel

def quantize_int8(weight: torch.Tensor, group_size: int = 0) -> dict[str, torch.Tensor]:
    """Per-row symmetric int8: ``{"qweight": [N, K] int8, "scale": [N] float32}`` with W ≈ q·s.

    ``group_size`` is unused (int8 keeps one scale per output channel); it is accepted so that every scheme
    has one signature. An all-zero row gets scale 1.
    """
    w = weight.detach().float()  # [N, K]
    scale = w.abs().amax(dim=-1) / INT8_QMAX  # [N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # [N]
    q = torch.round(w / scale[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)  # [N, K]
    return {"qweight": q, "scale": scale}


def dequantize_int8(buffers: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``q·s`` in ``dtype``: qweight [..., K], scale [...] -> [..., K] (rows may be gathered first)."""
    return buffers["qweight"].to(dtype) * buffers["scale"].to(dtype)[..., None]  # [..., K]


# ---------------------------------------------------------------------------- int4, group-wise, packed

def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Group-wise asymmetric int4, two codes per byte.

    Returns ``{"qweight": [N, G·g/2] uint8, "scale": [N, G] float16, "offset": [N, G] float16}`` with
    W ≈ q·s + m per group of g = ``group_size`` input features; K is zero-padded to G·g.
    """
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even number >= 2 (two codes share a byte), got {group_size}")
    w = weight.detach().float()  # [N, K]
    if w.abs().max() > torch.finfo(INT4_SCALE_DTYPE).max / 2:
        raise ValueError(
            f"a weight of magnitude {w.abs().max():.3g} overflows the float16 int4 scales; use 'int8' for this model"
        )
    n, k = w.shape
    groups = math.ceil(k / group_size)
    w = F.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)  # [N, G, g]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, G], [N, G]
    scale = ((hi - lo) / INT4_QMAX).to(INT4_SCALE_DTYPE)  # [N, G]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # [N, G] constant group: any scale works
    offset = lo.to(INT4_SCALE_DTYPE)  # [N, G]
    q = torch.round((w - offset.float()[..., None]) / scale.float()[..., None])  # [N, G, g]
    q = q.clamp(0, INT4_QMAX).to(torch.uint8).view(n, groups * group_size)  # [N, G·g]
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, G·g/2]
    return {"qweight": packed, "scale": scale, "offset": offset}


def dequantize_int4(buffers: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``q·s + m`` in ``dtype``: qweight [..., G·g/2], scale/offset [..., G] -> [..., K], K = ``in_features``."""
    packed, scale, offset = buffers["qweight"], buffers["scale"], buffers["offset"]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # [..., G·g]
    q = q.unflatten(-1, (scale.shape[-1], -1)).to(dtype)  # [..., G, g]
    w = q * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]  # [..., G, g]
    return w.flatten(-2)[..., :in_features]  # [..., K]


# ---------------------------------------------------------------------------- the scheme registry

@dataclass(frozen=True)
class QuantScheme:
    """One weight-only scheme: ``quantize(W [N, K], group_size) -> buffers`` and
    ``dequantize(buffers, K, dtype) -> W [..., K]`` (row-wise, so gathered rows dequantize alone)."""

    name: str
    quantize: Callable[[torch.Tensor, int], dict[str, torch.Tensor]]
    dequantize: Callable[[dict[str, torch.Tensor], int, torch.dtype], torch.Tensor]


SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme("int8", quantize_int8, dequantize_int8),
    "int4": QuantScheme("int4", quantize_int4, dequantize_int4),
}


def get_scheme(name: str) -> QuantScheme:
    """The scheme called ``name``; an unknown name fails with the valid ones."""
    if name not in SCHEMES:
        close = difflib.get_close_matches(name, list(SCHEMES) + ["none"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown reference quantization '{name}'{hint}; valid: none, {', '.join(sorted(SCHEMES))} "
            f"(set model.ref_quantization)"
        )
    return SCHEMES[name]


# ---------------------------------------------------------------------------- modules

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul will run in: the autocast dtype inside autocast, else the input's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _Quantized(nn.Module):
    """Holds a quantized [N, K] weight as buffers (no parameters: nothing to train, nothing to decay)."""

    def _set_weight(self, scheme: str, buffers: dict[str, torch.Tensor], out_features: int, in_features: int,
                    group_size: int) -> None:
        self.scheme = scheme
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self._dequantize = get_scheme(scheme).dequantize
        self._buffer_names = tuple(buffers)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def quant_buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._buffer_names}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [N, K] weight in ``dtype`` (what ``forward`` multiplies by)."""
        return self._dequantize(self.quant_buffers(), self.in_features, dtype)  # [N, K]


class WeightOnlyLinear(_Quantized):
    """``nn.Linear`` with a weight-only quantized weight: y = x·deq(W)ᵀ + b, W dequantized per call.

    Build with `WeightOnlyLinear.from_linear`. The bias (if any) stays in full precision.
    """

    def __init__(self, scheme: str, buffers: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, group_size: int = 0):
        super().__init__()
        self._set_weight(scheme, buffers, out_features, in_features, group_size)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> WeightOnlyLinear:
        buffers = get_scheme(scheme).quantize(linear.weight, group_size)
        return cls(scheme, buffers, linear.in_features, linear.out_features, linear.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(_compute_dtype(x))  # [N, K]
        return F.linear(x, w, self.bias)  # [..., N]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}"


class QuantEmbedding(_Quantized):
    """``nn.Embedding`` with a weight-only quantized table: only the looked-up rows are dequantized."""

    def __init__(self, scheme: str, buffers: dict[str, torch.Tensor], num_embeddings: int, embedding_dim: int,
                 group_size: int = 0, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._set_weight(scheme, buffers, num_embeddings, embedding_dim, group_size)
        self.padding_idx, self.out_dtype = padding_idx, dtype  # dtype: that of the table it replaces

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = {name: t[ids] for name, t in self.quant_buffers().items()}  # each [..., *]
        return self._dequantize(rows, self.in_features, self.out_dtype)  # [..., D]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.out_features}, {self.in_features}, scheme={self.scheme}{group}"


# ---------------------------------------------------------------------------- the frozen reference

def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantized_ref_model(model: nn.Module, scheme: str = "int8", *, group_size: int = DEFAULT_GROUP_SIZE,
                        embeddings: bool = False) -> nn.Module:
    """A frozen copy of ``model`` for the KL reference, with its weights held weight-only quantized.

    Args:
        model: a causal LM (a plain transformers model; left untouched).
        scheme: ``"none"`` (the plain frozen copy, `grpokit.models.ref_model`), ``"int8"`` or ``"int4"``.
        group_size: input features per int4 scale/offset (ignored by int8).
        embeddings: also quantize the input embedding and the output head (a tied pair stays tied).

    Returns:
        the copy, in eval mode, with ``requires_grad=False`` on every parameter left; each quantized
        ``nn.Linear`` is a `WeightOnlyLinear` (buffers only). The full-precision weights being replaced are
        never copied: peak memory is the policy plus the quantized copy plus one layer.
    """
    from grpokit.models.loading import ref_model

    if scheme == "none":
        return ref_model(model)
    get_scheme(scheme)
    if hasattr(model, "peft_config"):
        raise ValueError(
            "a LoRA model's reference is the same module with its adapters disabled (no copy to quantize); "
            "set model.ref_quantization = 'none' with LoRA"
        )
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        is_head = module is out_head
        if isinstance(module, nn.Linear) and (embeddings or not is_head):
            targets[name] = module
        elif embeddings and module is in_emb and isinstance(module, nn.Embedding):
            targets[name] = module
    # the weights being replaced are not deep-copied: the copy gets an empty placeholder for each
    memo = {id(m.weight): nn.Parameter(torch.empty(0, device=m.weight.device), requires_grad=False)
            for m in targets.values()}
    ref = copy.deepcopy(model, memo)
    shared: dict[int, dict[str, torch.Tensor]] = {}  # id(weight) -> buffers, so a tied pair shares one copy
    with torch.no_grad():
        for name, module in targets.items():
            key = id(module.weight)
            if key not in shared:
                shared[key] = get_scheme(scheme).quantize(module.weight, group_size)
            buffers = shared[key]
            if isinstance(module, nn.Embedding):
                new: nn.Module = QuantEmbedding(scheme, buffers, module.num_embeddings, module.embedding_dim,
                                                group_size, module.padding_idx, module.weight.dtype)
            else:
                new = WeightOnlyLinear(scheme, buffers, module.in_features, module.out_features, module.bias,
                                       group_size)
            _set_module(ref, name, new)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, each storage counted once (tied weights, shared
    quantized buffers)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
