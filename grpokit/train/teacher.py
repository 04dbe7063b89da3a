"""The teacher of distillation inside RL (algo.distill, SPEC 11): loading it next to the policy, refusing a
teacher whose tokenizer is not the policy's, and the per-row inputs the distillation methods read.

The teacher is loaded like the full-fine-tuning reference: a frozen full copy on the training device
(every rank holds all of it, also under FSDP2, as the reference does), optionally held weight-only
quantized (model.teacher_quantization), and scored without grad by `update.logprob_pass` in the same
micro-batch plan and under the same autocast (model.precision) and temperature as the reference.
"""
from __future__ import annotations

from typing import Any

import torch

from grpokit.algo.distill import kdrl_beta, kdrl_row_coef
from grpokit.config import AlgoConfig, Config, ConfigError


def needs_reference(cfg: AlgoConfig) -> bool:
    """Whether the reference model ℓʳ must be loaded: KL to it (beta > 0), G-OPD with lambda != 1, whose
    dense reward has the term (lambda - 1)(ℓ_T - ℓʳ), or an advantage transform that reads it (ACE, SPEC 11)."""
    from grpokit.train.step import transform_needs_reference

    return cfg.beta > 0 or (cfg.distill == "gopd" and cfg.gopd_lambda != 1.0) or transform_needs_reference(cfg)


def _specials(tok: Any) -> dict[str, Any]:
    """The named special tokens with their ids: BOS, EOS (which ends every response, so both models must
    score the same id), UNK, SEP, CLS, MASK. Left out: the pad token (padded positions are masked and never
    scored, and grpokit sets pad = EOS where a checkpoint names none) and the list of additional special
    tokens (it only changes decoding, and the built-in SmolLM2, converted from GGUF, lists none; their ids
    are in the vocabulary, which is compared in full)."""
    out: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token"):
        token = getattr(tok, name, None)
        if token is not None:
            out[name] = (str(token), tok.convert_tokens_to_ids(str(token)))
    return out


def tokenizer_mismatch(policy_tok: Any, teacher_tok: Any) -> str | None:
    """None when the two tokenizers map every token string to the same id and have the same special tokens;
    otherwise a one-line description of the first differences."""
    pv, tv = policy_tok.get_vocab(), teacher_tok.get_vocab()  # token -> id
    problems = []
    if pv != tv:
        only_p = sorted(set(pv) - set(tv), key=lambda k: pv[k])
        only_t = sorted(set(tv) - set(pv), key=lambda k: tv[k])
        moved = sorted((k for k in set(pv) & set(tv) if pv[k] != tv[k]), key=lambda k: pv[k])
        what = [f"{len(pv)} vs {len(tv)} tokens"]
        if moved:
            what.append(f"{len(moved)} tokens with different ids (e.g. {moved[0]!r}: {pv[moved[0]]} vs {tv[moved[0]]})")
        if only_p:
            what.append(f"{len(only_p)} only in the policy's (e.g. {only_p[0]!r})")
        if only_t:
            what.append(f"{len(only_t)} only in the teacher's (e.g. {only_t[0]!r})")
        problems.append("vocabularies differ: " + ", ".join(what))
    ps, ts = _specials(policy_tok), _specials(teacher_tok)
    diff = [k for k in sorted(set(ps) | set(ts)) if ps.get(k) != ts.get(k)]
    if diff:
        problems.append("special tokens differ: " + ", ".join(f"{k} {ps.get(k)} vs {ts.get(k)}" for k in diff))
    return "; ".join(problems) or None


def check_same_tokenizer(policy_tok: Any, teacher_tok: Any, *, policy: str, teacher: str) -> None:
    """Refuse a teacher whose tokenizer differs from the policy's (ConfigError naming both models)."""
    problem = tokenizer_mismatch(policy_tok, teacher_tok)
    if problem:
        raise ConfigError(
            f"model.teacher '{teacher}' does not share the tokenizer of the policy model.name '{policy}' ({problem}); "
            "distillation compares the two models' log-probs of the same token ids, so the teacher must use the "
            "policy's tokenizer: choose a teacher from the policy's model family, or set algo.distill = 'none'"
        )


def load_teacher(cfg: Config, tokenizer: Any, device: str) -> torch.nn.Module:
    """model.teacher as a frozen module on `device` (eval mode, no grad, maybe quantized), after checking that
    its tokenizer is `tokenizer` (the policy's)."""
    from grpokit.models import load_model, quantized_ref_model

    m = cfg.model
    teacher, teacher_tok = load_model(m.teacher)
    check_same_tokenizer(tokenizer, teacher_tok, policy=m.name, teacher=m.teacher)
    if m.teacher_quantization != "none":
        teacher = quantized_ref_model(teacher, m.teacher_quantization, group_size=m.ref_quant_group_size,
                                      embeddings=m.ref_quant_embeddings)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device)


def distill_row_coef(cfg: Config, *, step: int, correct: torch.Tensor) -> torch.Tensor:
    """KDRL's per-row coefficient for a rollout batch at RL step `step` (1-based): the annealed beta on the
    responses it regularises (`algo.kdrl_responses`), 0 on the others. correct [B] bool -> [B] f32.
    Other methods ignore it."""
    a = cfg.algo
    beta = kdrl_beta(step, beta_start=a.kdrl_beta_start, beta_end=a.kdrl_beta_end,
                     steps=a.kdrl_anneal_steps or cfg.train.steps)
    return kdrl_row_coef(correct, beta=beta, only_failed=a.kdrl_responses == "failed")  # [B]
