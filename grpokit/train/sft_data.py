"""SFT data: (prompt, completion) rows -> token ids -> micro-batches, packed or padded.

Shapes: n rows of a micro-batch tensor, S positions per row, V vocabulary.

An example is the prompt through the same chat template as rollouts (`grpokit.rollout.encode_prompts`)
followed by the completion's tokens and EOS. Position j of a row predicts `targets[j]`, the token at
j + 1; `loss_mask[j]` is True exactly where that target is a completion token (EOS included), so the
prompt and the chat template's own tokens never enter the loss (SPEC 10, stage 1).

Packing puts a micro-batch's examples side by side in one row: position ids restart at 0 for every
example and a 4-D block-diagonal causal mask keeps each example's attention inside itself, so every
logit equals the unpacked one. Padding (the fallback for attention implementations that ignore a 4-D
mask, e.g. flash-attention) right-pads rows with a 2-D mask.
"""
from __future__ import annotations

import difflib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

#: Keys of an SFT row.
ROW_KEYS = ("prompt", "completion")
#: Attention implementations that honour a 4-D (block-diagonal) attention mask.
MASK4D_ATTENTION = ("sdpa", "eager")


class SFTDataError(ValueError):
    """SFT data that cannot be used; the message names the file and line (or row) and the fix."""


def _preview(text: Any, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------- reading rows

def resolve_data_path(path: str) -> str:
    """A relative path that does not exist from the working directory is looked up from the grpokit checkout
    (so the bundled recipes run from anywhere)."""
    if path.startswith("hf:") or os.path.isabs(path) or os.path.exists(path):
        return path
    root = Path(__file__).resolve().parents[2]
    return str(root / path) if (root / path).exists() else path


def read_records(source: Any, *, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs from a .jsonl/.parquet path, 'hf:<dataset>', a list of dicts or a
    `datasets.Dataset`. A malformed JSON line raises naming its file and line."""
    from grpokit.data.files import read_hf, read_jsonl, read_parquet

    if isinstance(source, (str, os.PathLike)):
        path = resolve_data_path(os.fspath(source))
        try:
            if path.startswith("hf:"):
                return read_hf(path[3:], split=split, config_name=None)
            if not os.path.exists(path):
                raise SFTDataError(f"SFT data file not found: {path} (working directory {os.getcwd()}); set data.path")
            if path.endswith(".jsonl"):
                return read_jsonl(path)
            if path.endswith(".parquet"):
                return read_parquet(path)
        except SFTDataError:
            raise
        except (ValueError, RuntimeError) as e:
            raise SFTDataError(str(e)) from None
        raise SFTDataError(f"SFT data '{path}': unknown format; give a .jsonl or .parquet file or 'hf:<dataset>'")
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        source = source.to_list()
    if isinstance(source, Sequence) and all(isinstance(r, dict) for r in source):
        return [(f"row {i}", r) for i, r in enumerate(source)]
    raise SFTDataError(f"SFT data must be a file path, 'hf:<dataset>', a list of dicts or a datasets.Dataset; got {type(source).__name__}")


def build_rows(records: Iterable[tuple[str, dict[str, Any]]], column_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    """{'prompt', 'completion'} rows through the column map; a bad row raises naming its location."""
    cmap = {k: k for k in ROW_KEYS} | dict(column_map or {})
    rows = []
    for where, record in records:
        row = {}
        for key in ROW_KEYS:
            col = cmap[key]
            if col not in record:
                close = difflib.get_close_matches(col, [str(c) for c in record], n=1)
                spare = [str(c) for c in record if c not in cmap.values()]
                guess = close[0] if close else spare[0] if len(spare) == 1 else "<column>"
                raise SFTDataError(
                    f"{where}: column '{col}' (for the row's '{key}') not found; available columns: "
                    f"{', '.join(map(str, record)) or '(none)'}; set data.column_map = {{{key} = \"{guess}\"}}"
                )
            value = record[col]
            if not isinstance(value, str) or (key == "prompt" and not value.strip()):
                raise SFTDataError(
                    f"{where}: {key} (column '{col}') must be a {'non-empty ' if key == 'prompt' else ''}string, got "
                    f"{type(value).__name__} {_preview(repr(value))}; fix that row or map a plain-text column"
                )
            row[key] = value
        rows.append(row)
    if not rows:
        raise SFTDataError("the SFT data has no rows")
    return rows


def split_heldout(rows: list[dict[str, str]], fraction: float, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, heldout): a seeded `fraction` of the rows held out (at least one when fraction > 0)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(rows)))
    held = sorted(order[:k])
    return [rows[i] for i in sorted(order[k:])], [rows[i] for i in held]


# ---------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Example:
    """One tokenized example: prompt (chat template included) then completion + EOS."""

    ids: tuple[int, ...]
    n_prompt: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_target(self) -> int:
        """Completion tokens in the loss (EOS included)."""
        return len(self.ids) - self.n_prompt


def tokenize(tokenizer: Any, rows: Sequence[dict[str, str]], *, system: str | None = None, chat: bool = True,
             max_length: int | None = None, on_too_long: str = "skip", where: Sequence[str] | None = None) -> tuple[list[Example], int]:
    """(examples, number skipped for length). Prompts go through `encode_prompts` (the rollout template);
    every completion ends with the tokenizer's EOS."""
    from grpokit.rollout import encode_prompts

    eos = tokenizer.eos_token_id
    if eos is None:
        raise SFTDataError("the tokenizer has no eos_token_id; load the model with grpokit.models.load_model")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], system=system, chat=chat)
    out, skipped = [], 0
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids = tuple(p) + tuple(tokenizer.encode(r["completion"], add_special_tokens=False)) + (eos,)
        if max_length is not None and len(ids) > max_length:
            if on_too_long == "raise":
                loc = where[i] if where else f"row {i}"
                raise SFTDataError(f"{loc}: {len(ids)} tokens, over data.max_length = {max_length}; raise the limit "
                                   f"or set data.on_too_long = 'skip'")
            skipped += 1
            continue
        out.append(Example(ids, len(p)))
    return out, skipped


class DataOrder:
    """Epochs of permutations of range(n) drawn from one seeded `random.Random`; `state_dict()` holds its
    state, the permutation and the cursor, so a restored order continues exactly."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
                self.pos = 0
                self.epoch += 1
            part = self.order[self.pos : self.pos + k - len(out)]
            out += part
            self.pos += len(part)
        return out

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order), "pos": self.pos,
                "epoch": self.epoch, "num_rows": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != self.n:
            raise SFTDataError(f"the checkpoint's data order is for {state['num_rows']} training examples, the data "
                               f"now has {self.n}; resume with the same data, data.max_length and held-out split")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.pos, self.epoch = list(state["order"]), int(state["pos"]), int(state["epoch"])


# ---------------------------------------------------------------------------- micro-batches

def plan_micro(lengths: Sequence[int], *, micro_batch_size: int, max_tokens: int = 0, packed: bool) -> list[list[int]]:
    """Split example indices into micro-batches, in order: `micro_batch_size` each, or with `max_tokens` a
    budget (packed: the sum of lengths; padded: rows x longest row). An example over the budget goes alone."""
    if max_tokens <= 0:
        return [list(range(s, min(s + micro_batch_size, len(lengths)))) for s in range(0, len(lengths), micro_batch_size)]
    out: list[list[int]] = []
    cur: list[int] = []
    total = longest = 0
    for i, n in enumerate(lengths):
        cost = total + n if packed else max(longest, n) * (len(cur) + 1)
        if cur and cost > max_tokens:
            out.append(cur)
            cur, total, longest = [], 0, 0
        cur.append(i)
        total, longest = total + n, max(longest, n)
    if cur:
        out.append(cur)
    return out


@dataclass
class SFTBatch:
    """Model inputs and next-token targets of one micro-batch."""

    input_ids: torch.Tensor       # [n, S] int64
    position_ids: torch.Tensor    # [n, S] int64, restarting at 0 for every example
    attention_mask: torch.Tensor  # [n, S] bool (padded) or [n, 1, S, S] bool/additive (packed)
    targets: torch.Tensor         # [n, S] int64: the token each position predicts (pad where none)
    loss_mask: torch.Tensor       # [n, S] bool: the target is a completion token

    def to(self, device: Any) -> "SFTBatch":
        return SFTBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask, self.targets, self.loss_mask)))


def _targets(ex: Example) -> tuple[list[int], list[bool]]:
    """Targets and loss mask of one example (length len(ex)): position j predicts ids[j+1]."""
    ids = list(ex.ids)
    return ids[1:] + [ids[-1]], [ex.n_prompt <= j + 1 < len(ids) for j in range(len(ids))]


def collate_padded(examples: Sequence[Example], pad_id: int) -> SFTBatch:
    """One right-padded row per example with a 2-D attention mask."""
    S = max(map(len, examples))
    n = len(examples)
    ids = torch.full((n, S), pad_id, dtype=torch.long)  # [n, S]
    targets = torch.full((n, S), pad_id, dtype=torch.long)  # [n, S]
    lmask = torch.zeros(n, S, dtype=torch.bool)  # [n, S]
    amask = torch.zeros(n, S, dtype=torch.bool)  # [n, S]
    for i, ex in enumerate(examples):
        t, m = _targets(ex)
        L = len(ex)
        ids[i, :L] = torch.tensor(ex.ids)
        targets[i, :L] = torch.tensor(t)
        lmask[i, :L] = torch.tensor(m)
        amask[i, :L] = True
    pos = torch.arange(S).expand(n, S).clone()  # [n, S]
    return SFTBatch(ids, pos, amask, targets, lmask)


def collate_packed(examples: Sequence[Example], mask_dtype: torch.dtype | None = None) -> SFTBatch:
    """All examples in one row: position ids restart per example, a block-diagonal causal 4-D mask
    (bool, True = attend; with `mask_dtype` additive: 0 or the dtype's minimum)."""
    ids, targets, lmask, pos, block = [], [], [], [], []
    for b, ex in enumerate(examples):
        t, m = _targets(ex)
        ids += ex.ids
        targets += t
        lmask += m
        pos += range(len(ex))
        block += [b] * len(ex)
    blk = torch.tensor(block)  # [S]
    S = blk.shape[0]
    causal = torch.ones(S, S, dtype=torch.bool).tril()  # [S, S]
    allowed = (blk[:, None] == blk[None, :]) & causal  # [S, S]: query q sees key k of its own example, k <= q
    mask = allowed[None, None]  # [1, 1, S, S]
    if mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(~mask, torch.finfo(mask_dtype).min)  # [1, 1, S, S]
    return SFTBatch(
        input_ids=torch.tensor([ids]),  # [1, S]
        position_ids=torch.tensor([pos]),  # [1, S]
        attention_mask=mask,
        targets=torch.tensor([targets]),  # [1, S]
        loss_mask=torch.tensor([lmask]),  # [1, S]
    )


def can_pack(model: torch.nn.Module) -> bool:
    """Whether the model's attention implementation honours a 4-D attention mask (sdpa, eager)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    return impl in MASK4D_ATTENTION


def collate(examples: Sequence[Example], *, model: torch.nn.Module, pack: bool, pad_id: int) -> SFTBatch:
    """Packed where asked and the attention implementation allows it, else padded."""
    if pack and can_pack(model):
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        mask_dtype = None if impl == "sdpa" else next(model.parameters()).dtype
        return collate_packed(examples, mask_dtype)
    return collate_padded(examples, pad_id)
