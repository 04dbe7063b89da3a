"""`tiny-char`: a from-scratch character-level Llama for tests and smoke runs.

The tokenizer maps every printable ASCII character (plus ``\\n`` and ``\\t``) to one token, with the special
tokens ``<pad> <s> </s> <unk> <|im_start|> <|im_end|>``; the end-of-sequence token is ``<|im_end|>`` and the
chat template is ChatML, like SmolLM2's, so code written against the tiny model runs unchanged on a real one.
The model is a ~0.3M-parameter ``LlamaForCausalLM`` (hidden 96, 3 layers, 4 query / 2 key-value heads) whose
random initialisation is a pure function of ``seed``. Both round-trip through ``save_pretrained`` and the
``Auto*.from_pretrained`` loaders.
"""

from __future__ import annotations

import os
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS_DOC, UNK, IM_START, IM_END = "<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS_DOC, UNK, IM_START, IM_END]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]  # 95 printable + \t + \n = 97

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Model shape. hidden 96 = 4 heads x 24; 2 key-value heads exercise grouped-query attention.
TINY_SHAPE = dict(
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
#: Std of the normal init. Larger than Llama's 0.02 so an untrained model has a peaked, non-uniform
#: next-token distribution (tests then see repeated tokens, early EOS and meaningful top-k/top-p).
TINY_INIT_STD = 0.1


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: one token per character, special tokens first (ids 0..5)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    backend.decoder = decoders.Fuse()  # join characters without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        unk_token=UNK,
        additional_special_tokens=[EOS_DOC, IM_START],
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny(seed: int = 0, **shape: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Llama and its tokenizer; the weights depend only on ``seed`` (and ``shape``:
    overrides of `TINY_SHAPE`, e.g. ``hidden_size=128`` for a head size of 32, which vLLM's CPU attention needs).

    The global torch RNG is left untouched (the init runs under ``torch.random.fork_rng``).
    """
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        initializer_range=TINY_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **{**TINY_SHAPE, **shape},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, tokenizer


def save_tiny(path: str | os.PathLike, *, seed: int = 0) -> str:
    """Write ``make_tiny(seed)`` (model + tokenizer) to the directory ``path``; returns the path as a string.

    ``grpokit.models.load_model(path)`` and ``AutoModelForCausalLM.from_pretrained(path)`` load it back.
    """
    model, tokenizer = make_tiny(seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return os.fspath(path)
