"""Tiny reward models trained inside the tests in seconds, saved as safetensors, loaded by the scorers.

ORM: a LlamaForSequenceClassification (hidden 32) on the char tokenizer that learns to prefer completions
that contain the right answer ("7") to the fixed question "What is 3+4?"; the completion is rendered with
the tokenizer's chat template (ChatML), as ORMScorer does.
PRM: a LlamaForTokenClassification (hidden 32) that learns, at the last token of every step, whether the
step's result digit is even ("good") or odd ("bad"): a rule that holds only at the step's last token, so
scoring at a wrong position gives wrong scores.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from grpokit.models.tiny import make_tiny_tokenizer

QUESTION = "What is 3+4?"
TEMPLATES = ["The answer is {}", "{}", "It is {}.", "3+4 = {}", "so {} it is", "Answer: {}"]
HELDOUT_TEMPLATES = ["I think {}", "result {}!"]


def _config(cls_name: str, tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       num_labels=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}, **kw)


def orm_example(rng: random.Random, templates=TEMPLATES) -> tuple[str, int]:
    good = rng.random() < 0.5
    d = 7 if good else rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 9])
    return rng.choice(templates).format(d), int(good)


def _one_thread(fn):
    """Train with one intra-op thread: tiny matrices gain nothing from more, and on a busy machine
    spinning OpenMP threads slow them down many times."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return wrapper


@_one_thread
def train_tiny_orm(path: Path, *, seed: int = 0, steps: int = 120) -> str:
    from transformers import LlamaForSequenceClassification

    tok = make_tiny_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config("seq", tok))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [orm_example(rng) for _ in range(32)]
        texts = [tok.apply_chat_template([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": c}],
                                         tokenize=False) for c, _ in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def prm_completion(rng: random.Random, n_steps: int) -> tuple[str, list[int]]:
    steps, labels = [], []
    for _ in range(n_steps):
        a, b = rng.randint(1, 9), rng.randint(0, 9)
        d = rng.randint(0, 9)
        steps.append(f"{a}*{b} gives {d}")
        labels.append(int(d % 2 == 0))
    return "\n\n".join(steps), labels


@_one_thread
def train_tiny_prm(path: Path, *, seed: int = 0, steps: int = 80, join: str = "\n") -> str:
    from transformers import LlamaForTokenClassification

    from grpokit.rewards.models import split_steps

    tok = make_tiny_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(seed)
    model = LlamaForTokenClassification(_config("tok", tok))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        prompts, comps, step_labels = [], [], []
        for _ in range(16):
            c, y = prm_completion(rng, rng.randint(1, 4))
            prompts.append(f"Task {rng.randint(0, 99)}")
            comps.append(c)
            step_labels.append(y)
        texts = [p + join + c for p, c in zip(prompts, comps)]
        enc = tok(texts, return_tensors="pt", padding=True, return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        labels = torch.full(enc["input_ids"].shape, -100)
        for j, (p, c, y) in enumerate(zip(prompts, comps, step_labels)):
            ends = [len(p + join) + e for e in split_steps(c)]
            tok_end = offsets[j, :, 1].tolist()
            for e, lab in zip(ends, y):
                k = next(t for t, te in enumerate(tok_end) if te >= e)
                labels[j, k] = lab
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)
