"""SPEC 11's catalogue inside the trainer: the config's checks, the reference ACE needs, APO's per-sequence
KL weight in the loss, and one real step of each method on the SFT-warmed tiny model (each bundled recipe
also trains one step in tests/train/test_loop.py::test_every_recipe_runs_one_step)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import reference as ref
from grpokit.algo import KL
from grpokit.config import AlgoConfig, ConfigError, load_config
from grpokit.train.step import StatSums, micro_batch_loss, sequence_advantages
from grpokit.train.teacher import needs_reference
from test_loop import tiny_overrides
from test_step import make_step_batch


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("override,message", [
    ("algo.adv_transform=acee", r"algo.adv_transform: unknown advantage transform 'acee' \(did you mean 'ace'\?\)"),
    ("algo.kl_weight=apo", r"algo.kl_weight = 'apo' weights the KL term in the loss per sequence; set algo.beta > 0"),
    ("algo.grpo_lambda_frac=0", r"algo.grpo_lambda_frac must be in \(0, 1\]"),
    ("algo.dot_margin=0", r"algo.dot_margin must be >= 1 token"),
    ("algo.length_cap=100", r"algo.length_cap = 100 must be between 0 .* rollout.max_new_tokens = 64"),
    ("algo.transforms=['dott']", r"algo.transforms: unknown batch transform 'dott' \(did you mean 'dot'\?\)"),
])
def test_catalogue_config_errors_name_the_field_and_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    with pytest.raises(ConfigError, match=r"algo.ace_alpha must be a number > 0"):
        load_config(None, ["algo.adv_transform=ace", "algo.ace_alpha=0"])


def test_ace_loads_the_reference_even_without_a_kl() -> None:
    assert not needs_reference(AlgoConfig())
    assert needs_reference(AlgoConfig(adv_transform="ace"))  # beta = 0, but c_i reads the reference
    assert needs_reference(AlgoConfig(beta=0.01))


# ---------------------------------------------------------------------------- APO's weight in the loss

@pytest.mark.parametrize("seed", [0, 1])
def test_per_sequence_kl_weight_enters_the_loss_as_beta_i(seed: int) -> None:
    """micro_batch_loss with Batch.kl_weight = w: the loss of ppo_clip plus w_i·k(ℓ, ℓʳ) per token; w = β
    everywhere is exactly the constant-β loss."""
    cfg = AlgoConfig(beta=0.1, kl_estimator="forward_kl", aggregation="token_mean")
    batch, logp = make_step_batch(12, 9, seed=seed, cfg=cfg)
    n_tok, n_seq = float(batch.loss_mask.sum()), 12.0

    def loss_of(b):
        out, _ = micro_batch_loss(b, logp, cfg=cfg, num_tokens=n_tok, num_seqs=n_seq, norm_const=9.0, stats=StatSums())
        return out

    plain = loss_of(batch)
    batch.kl_weight = torch.full((12,), 0.1, dtype=torch.float64)
    assert float(loss_of(batch)) == float(plain)
    w = torch.rand(12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.2
    batch.kl_weight = w
    zero_kl = AlgoConfig(beta=0.0, aggregation="token_mean")
    pg, _ = micro_batch_loss(batch, logp, cfg=zero_kl, num_tokens=n_tok, num_seqs=n_seq, norm_const=9.0, stats=StatSums())
    kl = ref.forward_kl(logp, batch.ref_logp)
    want = float(pg) + float((w[:, None] * kl * batch.loss_mask).sum()) / n_tok
    assert math.isclose(float(loss_of(batch)), want, rel_tol=1e-9, abs_tol=1e-12)
    assert KL.call("forward_kl", logp, batch.ref_logp).shape == logp.shape


# ---------------------------------------------------------------------------- one step on the tiny model

def _ctx(warm_tiny: str, run: Path, reward_funcs=None, **extra: object):
    from grpokit.train.loop import setup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cfg = load_config(None, tiny_overrides(warm_tiny, run, **{"data.heldout_size": 0, "train.final_eval": False, **extra}))
    ctx = setup(cfg, reward_funcs=reward_funcs)
    ctx.state["step"] = 1
    return ctx


def test_ace_step_transforms_negative_advantages_and_composes_with_fipo(warm_tiny: str, tmp_path: Path) -> None:
    """ACE with FIPO, beta = 0: the reference is loaded, build_batch's advantages are ACE of the group
    advantages with c_i from ℓ° and ℓʳ, and a FIPO update over two mini-batches runs on them."""
    from grpokit.train.collect import collect
    from grpokit.train.update import build_batch, update

    ctx = _ctx(warm_tiny, tmp_path / "run", **{"algo.adv_transform": "ace", "algo.ace_alpha": 2.0, "algo.loss": "fipo",
                                               "train.updates_per_rollout": 2})
    assert ctx.ref is not None
    torch.manual_seed(0)
    col = collect(ctx)
    batch = build_batch(ctx, col)
    counted = col.batch.scores.valid & (col.global_row >= 0)
    plain = sequence_advantages(batch.rewards, batch.group_ids, cfg=ctx.cfg.algo, valid=counted)
    want = ref.ace(plain.double(), batch.response_mask, batch.old_logp.double(), batch.ref_logp.double(), alpha=2.0)
    torch.testing.assert_close(batch.seq_adv.double(), want, rtol=1e-5, atol=1e-5)
    assert (plain < 0).any() and torch.equal(batch.seq_adv[plain >= 0], plain[plain >= 0])
    assert (batch.seq_adv[plain < 0] < plain[plain < 0]).all()
    torch.testing.assert_close(batch.token_adv, batch.seq_adv[:, None].float() * batch.response_mask)
    m, _ = update(ctx, batch, col.global_row)
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and "fipo/weight" in m


def test_apo_step_weights_the_kl_of_each_sequence(warm_tiny: str, tmp_path: Path) -> None:
    from grpokit.algo.catalogue import apo_kl_weight
    from grpokit.train.collect import collect
    from grpokit.train.update import build_batch, update

    ctx = _ctx(warm_tiny, tmp_path / "run", **{"algo.beta": 0.05, "algo.kl_weight": "apo",
                                               "rewards.functions": ["copy2_digits"]})
    torch.manual_seed(0)
    col = collect(ctx)
    batch = build_batch(ctx, col)
    sc = col.batch.scores
    want = apo_kl_weight(batch.seq_adv, sc.correct, sc.valid, batch.group_ids, beta=0.05)
    torch.testing.assert_close(batch.kl_weight, want)
    m, _ = update(ctx, batch, col.global_row)
    assert math.isfinite(m["loss"]) and "kl_ref" in m


def test_dot_step_cuts_all_correct_groups_and_rescores_the_cut_text(warm_tiny: str, tmp_path: Path) -> None:
    """A scorer that calls every answer right makes every group all-correct; with k = 0 and a 1-token margin,
    DOT cuts each answer longer than floor(mean) + 1 and the scorer sees exactly the cut texts again."""
    from grpokit.train.collect import collect
    from grpokit.train.update import build_batch, update

    seen: list[list[str]] = []

    def always_right(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        seen.append(list(completions))
        return [1.0] * len(completions)

    ctx = _ctx(warm_tiny, tmp_path / "run", reward_funcs=[always_right],
               **{"algo.transforms": ["dot"], "algo.dot_std_mult": 0.0, "algo.dot_margin": 1,
                  "rollout.max_new_tokens": 8, "rollout.temperature": 1.5})
    torch.manual_seed(0)
    for step in range(1, 9):  # row seeds follow the step; a device's sampling stream may give a draw with equal lengths
        ctx.state["step"] = step
        seen.clear()
        col = collect(ctx)
        cut = torch.tensor(col.batch.scores.per_function["dot_cut_tokens"]) > 0
        if cut.any():
            break
    assert cut.any(), "no answer was long enough to cut in 8 draws; the check would be vacuous"
    assert len(seen) == 2 and seen[1] == [col.batch.rollout.texts[i] for i in cut.nonzero().flatten().tolist()]
    lengths = col.batch.rollout.response_mask.sum(1).double()
    for g in col.batch.group_key.unique():
        members = col.batch.group_key == g
        if (members & cut).any():  # every cut row of a group is cut to the same T, below its uncut rows' max
            assert (lengths[members & cut] == lengths[members & cut].min()).all()
    batch = build_batch(ctx, col)
    m, _ = update(ctx, batch, col.global_row)
    assert math.isfinite(m["loss"])


@pytest.mark.parametrize("transform", ["grpo_lambda", "truncation_penalty"])
def test_reward_shapers_change_the_rewards_the_advantages_see(transform: str, warm_tiny: str, tmp_path: Path) -> None:
    from grpokit.train.collect import collect
    from grpokit.train.update import build_batch

    max_new = {"grpo_lambda": 6, "truncation_penalty": 2}[transform]
    ctx = _ctx(warm_tiny, tmp_path / "run", **{"algo.transforms": [transform], "algo.grpo_lambda_frac": 1.0,
                                               "rewards.functions": ["copy2_digits"], "rollout.max_new_tokens": max_new})
    torch.manual_seed(0)
    col = collect(ctx)
    key = {"grpo_lambda": "length_penalty", "truncation_penalty": "truncation"}[transform]
    delta = torch.tensor(col.batch.scores.per_function[key])
    raw = torch.tensor(col.batch.scores.per_function["copy2_digits"])
    torch.testing.assert_close(col.batch.scores.total, (raw + delta).float())
    if transform == "truncation_penalty":  # 2 tokens hold two digits but not the EOS after them: most are cut off
        cut = col.batch.rollout.truncated
        assert cut.any() and (raw[cut] > 0).any(), "no cut-off answer earned a reward; the check would be vacuous"
        assert (col.batch.scores.total[cut] == 0).all() and not col.batch.scores.correct[cut].any()
        assert (delta[~cut] == 0).all()  # a finished answer keeps its reward
    else:
        assert (delta[col.batch.scores.correct] < 0).all() and (delta[~col.batch.scores.correct] == 0).all()
    batch = build_batch(ctx, col)
    torch.testing.assert_close(batch.rewards, col.batch.scores.total)


def test_rapo_and_dler_recipes_log_their_terms(warm_tiny: str, tmp_path: Path) -> None:
    """The RAPO recipe's step logs a KL to the reference; DLER's logs the truncation term."""
    from grpokit.train.loop import train

    root = Path(__file__).parents[2] / "recipes"
    for name, key in [("rapo", "kl_ref"), ("dler", "reward/truncation/mean")]:
        run = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cfg = load_config(root / f"{name}.toml", tiny_overrides(warm_tiny, run, **{
                "train.steps": 1, "data.heldout_size": 0, "train.final_eval": False}))
        train(cfg)
        (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert key in row and math.isfinite(row[key]) and math.isfinite(row["loss"]), (name, row.get(key))
