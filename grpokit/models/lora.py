"""LoRA adapters (arXiv:2106.09685) through PEFT: wrap a causal LM, and merge it back for saving.

With LoRA the reference policy is the same module with its adapters disabled (``model.disable_adapter()``),
so no frozen copy is needed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from transformers import PreTrainedModel


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
):
    """Wrap ``model`` in a PEFT ``PeftModel`` with rank-``r`` adapters on the modules named in ``targets``.

    Only the adapter weights are trainable. The returned model is used like the original (same forward,
    ``save_pretrained`` writes the adapter only; see `merged_copy` for a plain checkpoint), and its
    ``disable_adapter()`` context gives the base model.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a declared dependency
        raise ImportError("LoRA needs the peft package: pip install 'peft>=0.12' (or `make install`)") from err
    if r <= 0:
        raise ValueError(f"LoRA rank r must be > 0, got {r}; use r=0 in the config to train all weights instead")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(
            f"LoRA targets {missing} match no module of {type(model).__name__}; "
            f"linear layers it has include {sorted(n for n in names if n.endswith('proj'))}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def merged_copy(model) -> PreTrainedModel:
    """A plain transformers model with the LoRA weights merged in (the input is left untouched), ready for
    ``save_pretrained`` and loading without peft."""
    if not hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model)
    return copy.deepcopy(model).merge_and_unload()
