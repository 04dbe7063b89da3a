"""Activation (gradient) checkpointing that works on a model kept in eval mode.

Hugging Face checkpoints a decoder layer only when ``self.training`` is set, but grpokit keeps the policy
in eval mode (no dropout: the sampler, the scorer and the update must see one and the same function), so
``model.gradient_checkpointing_enable()`` alone never recomputes anything there. `enable_gradient_checkpointing`
instead wraps each decoder layer's ``forward`` in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
whenever autograd records (grad enabled; a KV cache is then left unfilled, as Hugging Face does): the layer's
activations are dropped after the forward and recomputed in the backward pass. Without grad (sampling,
old/reference scoring) the layer runs as is, KV cache included. The layer's module hooks (FSDP2's
unshard/reshard) stay outside the checkpoint, so they run once, and the parameter names and ``state_dict``
are unchanged.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

#: Keyword arguments through which a decoder layer receives a KV cache. Under grad they are cleared (as Hugging
#: Face does in training mode): the backward replay would append to the cache a second time.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_MARK = "_grpokit_checkpointed"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of ``model`` (plain, PEFT-wrapped or FSDP2-wrapped): the modules that
    subclass transformers' ``GradientCheckpointingLayer``, else the children of a ``layers`` ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    layers = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            return list(module)
    return []


def _checkpointed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward  # the class's own forward (FSDP2's subclass keeps it), unbound
    if not torch.is_grad_enabled():  # nothing to recompute: run as is, KV cache included
        return forward(self, *args, **kwargs)
    if any(kwargs.get(k) is not None for k in CACHE_KWARGS) or kwargs.get("use_cache"):
        warnings.warn("gradient checkpointing: a forward with grad does not fill the KV cache (the backward replay "
                      "would write it twice); pass use_cache=False when training", stacklevel=3)
        for k in CACHE_KWARGS:
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every decoder layer's activations in the backward pass, in eval or train mode.

    Call it on the plain or PEFT-wrapped model, before ``grpokit.dist.wrap`` (FSDP2/DDP) and before
    ``ref_model``/deep copies (a copy keeps the wrapper, which is a no-op without grad). Idempotent. Returns
    the number of layers wrapped. Gradients equal the non-checkpointed ones (the layer is a deterministic
    function in eval mode; in train mode the RNG state is replayed by ``torch.utils.checkpoint``).
    Does not touch ``config.use_cache``: sampling keeps its KV cache, the scorer passes ``use_cache=False``.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers to checkpoint (no transformers GradientCheckpointingLayer "
            "and no `layers` ModuleList); set model.gradient_checkpointing = false for this model"
        )
    for layer in layers:
        if not getattr(layer, _MARK, False):
            # bound to `layer`: copy.deepcopy rebinds a bound method to the copy
            layer.forward = types.MethodType(_checkpointed_forward, layer)
            setattr(layer, _MARK, True)
    return len(layers)


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Undo `enable_gradient_checkpointing`."""
    for layer in decoder_layers(model):
        if getattr(layer, _MARK, False):
            del layer.forward
            delattr(layer, _MARK)
