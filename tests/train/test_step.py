"""The train step's functions around grpokit.algo (issue 10, defects 5, 7, 8 and 14).

Each test names the defect it pins; each fails on the code before its fix.
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from grpokit.algo.advantages import ADVANTAGES
from grpokit.config import AlgoConfig
from grpokit.train.step import (
    Batch,
    StatSums,
    cancellation_metrics,
    loss_hparams,
    micro_batch_loss,
    plan_minibatches,
    resolved_loss_hparams,
    sequence_advantages,
    sequence_weights,
    token_credit,
)

ESTIMATORS = ["grpo", "dr_grpo", "batch_std", "rloo"]


def make_step_batch(b: int, t: int, *, seed: int, cfg: AlgoConfig, p: int = 3, spread: float = 0.3) -> tuple[Batch, torch.Tensor]:
    """A float64 rollout batch as the loop builds it (zeros at padding), and the current log-probs [B, T]."""
    x = ref.make_batch(b, t, seed=seed, garbage=False, spread=spread)
    mask = x["mask"]
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(5, 9, (b, p), generator=g)
    seq_adv = ADVANTAGES.call(cfg.advantage, x["rewards"], x["group_ids"], std=cfg.std)  # [B]
    zero = torch.zeros_like(x["old_logp"])
    old = torch.where(mask, x["old_logp"], zero)
    reflp = torch.where(mask, x["ref_logp"], zero)
    batch = Batch(
        input_ids=torch.cat([prompt, x["ids"]], 1), attention_mask=torch.cat([torch.ones(b, p, dtype=torch.bool), mask], 1),
        response_mask=mask, loss_mask=mask.clone(), group_ids=x["group_ids"], rewards=x["rewards"], seq_adv=seq_adv,
        token_adv=token_credit(seq_adv, mask, cfg=cfg, old_logp=old, ref_logp=reflp).double(), old_logp=old,
        ref_logp=reflp, entropy=zero,
    )
    return batch, torch.where(mask, x["logp"], zero)


def run_update(batch: Batch, logp: torch.Tensor, cfg: AlgoConfig, splits: list[torch.Tensor]) -> tuple[float, torch.Tensor, list[dict]]:
    """One optimizer step's loss and d loss / d logp, accumulated over the micro-batches `splits`."""
    leaf = logp.clone().requires_grad_(True)
    n_tok, n_seq = float(batch.loss_mask.sum()), float(batch.loss_mask.shape[0])
    total, outs = 0.0, []
    for idx in splits:
        sub = batch.select(idx)
        lp = leaf[idx][:, : sub.response_len]  # [b, T']
        loss, s = micro_batch_loss(sub, lp, cfg=cfg, num_tokens=n_tok, num_seqs=n_seq, norm_const=float(logp.shape[1]),
                                   stats=StatSums())
        loss.backward()
        total += float(loss.detach())
        outs.append({"idx": idx, **s})
    return total, leaf.grad, outs


SPLITS = {
    "one": lambda b: [torch.arange(b)],
    "three": lambda b: list(torch.tensor_split(torch.arange(b), 3)),
    "singletons": lambda b: [torch.tensor([i]) for i in range(b)],
    "shuffled": lambda b: list(torch.randperm(b, generator=torch.Generator().manual_seed(5)).split(4)),
}


# ---------------------------------------------------------------------------------- defect 5: skipped rewards


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("std", ["unbiased", "population"])
def test_skipped_rows_are_left_out_of_the_group_statistics(name: str, std: str) -> None:
    """Defect 5: a row skipped by rewards.on_error = 'skip' is no sample: not a reward 0 in its group's mean/std."""
    g = torch.Generator().manual_seed(3)
    B = 40
    rewards = torch.rand(B, generator=g, dtype=torch.float64).round(decimals=1)  # [B]
    group_ids = torch.tensor([11, 4, 9, 2, 30])[torch.randint(0, 5, (B,), generator=g)]  # [B] ragged, interleaved
    valid = torch.rand(B, generator=g) > 0.3  # [B]
    valid[group_ids == 2] = False  # a group skipped entirely
    valid[(group_ids == 30).nonzero()[1:]] = False  # a group left with one valid row: a singleton
    rewards = torch.where(valid, rewards, torch.full_like(rewards, float("nan")))  # skipped rewards are undefined
    cfg = AlgoConfig(advantage=name, std=std)
    got = sequence_advantages(rewards, group_ids, cfg=cfg, valid=valid)
    want = ref.advantages_valid(name, rewards, group_ids, valid, std=std)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got[~valid] == 0).all() and got.isfinite().all()
    assert (got[group_ids == 30] == 0).all()
    # the old behaviour (a skipped row as reward 0 inside the statistics) gives other advantages
    zeroed = sequence_advantages(torch.where(valid, rewards, torch.zeros_like(rewards)), group_ids, cfg=cfg)
    assert (zeroed[valid] - want[valid]).abs().max() > 0.05


def test_all_rows_valid_is_the_plain_estimator_and_none_valid_is_zero() -> None:
    x = ref.make_batch(24, 4, seed=1)
    cfg = AlgoConfig()
    plain = sequence_advantages(x["rewards"], x["group_ids"], cfg=cfg)
    assert torch.equal(sequence_advantages(x["rewards"], x["group_ids"], cfg=cfg, valid=torch.ones(24, dtype=torch.bool)), plain)
    none = sequence_advantages(x["rewards"], x["group_ids"], cfg=cfg, valid=torch.zeros(24, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(24, dtype=none.dtype))


# ---------------------------------------------------------------------------------- defect 7: k optimizer steps


def test_plan_minibatches_gives_exactly_k_steps_of_balanced_size() -> None:
    """Defect 7: torch.arange(12).chunk(8) gives 6 steps; the plan gives 8 of sizes 2,2,2,2,1,1,1,1."""
    assert [len(m) for m in plan_minibatches(12, 8)] == [2, 2, 2, 2, 1, 1, 1, 1]
    for B in range(1, 41):
        for k in range(1, B + 1):
            plan = plan_minibatches(B, k)
            assert [len(m) for m in plan] == ref.minibatch_sizes(B, k), (B, k)
            assert torch.equal(torch.cat(plan), torch.arange(B))  # contiguous, every row once, in order


def test_plan_minibatches_refuses_fewer_rows_than_steps() -> None:
    with pytest.raises(ValueError, match=r"6 rows cannot be split into train.updates_per_rollout = 8 .*set train.updates_per_rollout <= 6"):
        plan_minibatches(6, 8)


# ---------------------------------------------------------------------------------- defect 8: the loss's own defaults


def _uniform_batch(log_ratio: float, adv: float) -> tuple[Batch, torch.Tensor]:
    b, t = 4, 5
    mask = torch.ones(b, t, dtype=torch.bool)
    old = torch.full((b, t), -1.0, dtype=torch.float64)
    zero = torch.zeros(b, t, dtype=torch.float64)
    batch = Batch(input_ids=torch.ones(b, t + 1, dtype=torch.long), attention_mask=torch.ones(b, t + 1, dtype=torch.bool),
                  response_mask=mask, loss_mask=mask, group_ids=torch.zeros(b, dtype=torch.long), rewards=zero[:, 0],
                  seq_adv=torch.full((b,), adv, dtype=torch.float64), token_adv=torch.full((b, t), adv, dtype=torch.float64),
                  old_logp=old, ref_logp=None, entropy=zero)
    return batch, old + log_ratio


def _clip_fractions(cfg: AlgoConfig, batch: Batch, logp: torch.Tensor) -> tuple[float, dict[str, float]]:
    stats = StatSums()
    loss, _ = micro_batch_loss(batch, logp, cfg=cfg, num_tokens=float(batch.loss_mask.sum()), num_seqs=4.0,
                               norm_const=5.0, stats=stats)
    return float(loss), stats.means()


def test_gspo_runs_with_its_own_clip_unless_set() -> None:
    """Defect 8: `algo.loss = gspo` alone clips the sequence ratio at 1 + 4e-4 (SPEC 2), not at 1.2."""
    batch, logp = _uniform_batch(0.01, 1.0)  # s_i = e^0.01 ~ 1.01, A > 0
    cfg = AlgoConfig(loss="gspo", aggregation="seq_mean_token_mean")
    assert resolved_loss_hparams(cfg)["clip_low"] == 3e-4 and resolved_loss_hparams(cfg)["clip_high"] == 4e-4
    _, m = _clip_fractions(cfg, batch, logp)
    assert m["clip/high"] == 1.0
    _, m = _clip_fractions(AlgoConfig(loss="gspo", aggregation="seq_mean_token_mean", clip_high=0.2), batch, logp)
    assert m["clip/high"] == 0.0  # a value the user sets is used


def test_cispo_has_no_lower_bound_unless_set() -> None:
    """Defect 8: CISPO clips the IS weight only from above (MiniMax-M1, arXiv 2506.13585)."""
    batch, logp = _uniform_batch(-0.5, 1.0)  # rho = e^-0.5 ~ 0.61 < 0.8
    loss, m = _clip_fractions(AlgoConfig(loss="cispo"), batch, logp)
    assert m["clip/low"] == 0.0
    assert loss == pytest.approx(-math.exp(-0.5) * 1.0 * -1.5, rel=1e-12)  # -w * A * logp, w = rho unclipped
    loss, m = _clip_fractions(AlgoConfig(loss="cispo", clip_low=0.2), batch, logp)
    assert m["clip/low"] == 1.0 and loss == pytest.approx(-0.8 * -1.5, rel=1e-12)


def test_fipo_gets_its_dual_clip_and_a_field_the_loss_does_not_take_is_refused() -> None:
    """Defect 8: FIPO's c = 10 applies by default; a hyperparameter the loss does not take is not dropped."""
    assert resolved_loss_hparams(AlgoConfig(loss="fipo"))["dual_clip_c"] == 10.0
    assert loss_hparams(AlgoConfig(loss="fipo", dual_clip_c=0.0)) == {"dual_clip_c": None}  # 0 = off
    assert loss_hparams(AlgoConfig()) == {}
    batch, logp = _uniform_batch(0.1, 1.0)
    with pytest.raises(ValueError, match=r"loss 'ppo_clip' does not take tau"):
        _clip_fractions(AlgoConfig(loss="ppo_clip", fipo_tau=8.0), batch, logp)


# ---------------------------------------------------------------------------------- defect 14 (a): the residual


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cancellation_metrics_match_the_twin(seed: int) -> None:
    cfg = AlgoConfig()
    batch, _ = make_step_batch(30, 12, seed=seed, cfg=cfg)
    got = cancellation_metrics(batch)
    T = batch.response_mask.shape[1]
    want = ref.cancellation_residual(batch.input_ids[:, -T:], batch.loss_mask, batch.group_ids, batch.seq_adv, torch.ones(30))
    assert got["cancel/residual"] == pytest.approx(want, abs=1e-6)
    w = torch.rand(30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    want_w = ref.cancellation_residual(batch.input_ids[:, -T:], batch.loss_mask, batch.group_ids, batch.seq_adv, w)
    assert cancellation_metrics(batch, seq_weights=w)["cancel/residual"] == pytest.approx(want_w, abs=1e-6)
    assert want_w != pytest.approx(want, abs=1e-3)  # the weights matter


# ---------------------------------------------------------------------------------- defect 14 (b): GSPO weights


@pytest.mark.parametrize("transform", ["min_replace", "adv_orthogonal", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_sequence_weights_match_the_twin_for_every_micro_batch_split(transform: str, seed: int) -> None:
    """Defect 14b: algo.seq_weight transforms s_i over the optimizer step's rows, ahead of the micro-batches,
    so the loss and its gradient are the twin's whatever the split (SPEC 3 invariance)."""
    cfg = AlgoConfig(loss="gspo", aggregation="seq_mean_token_mean", seq_weight=transform, clip_low=0.05, clip_high=0.08)
    B, T = 26, 9
    batch, logp = make_step_batch(B, T, seed=seed, cfg=cfg, spread=0.1)
    batch.seq_weight = sequence_weights(batch, logp, cfg=cfg)
    per_tok, w, grad_tok = ref.gspo_weighted(logp, batch.old_logp, batch.token_adv, batch.loss_mask, batch.group_ids,
                                             batch.seq_adv, clip_low=0.05, clip_high=0.08, transform=transform)
    used = batch.loss_mask.any(1)
    torch.testing.assert_close(batch.seq_weight[used].double(), w[used], rtol=1e-6, atol=1e-6)
    n_seq = float(B)
    want = ref.aggregate("seq_mean_token_mean", per_tok, batch.loss_mask, num_tokens=0, num_seqs=n_seq, norm_const=0)
    L = batch.loss_mask.sum(1, keepdim=True).clamp(min=1).double()
    want_grad = grad_tok / (L * n_seq)  # d/d logp of (1/N_seq) sum_i mean_t per_tok
    clipped = (w[used] > 1.08).sum() + (w[used] < 0.95).sum()
    for name, split in SPLITS.items():
        loss, grad, outs = run_update(batch, logp, cfg, split(B))
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-7), name
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7, msg=name)
        for o in outs:  # the weights in use are reported, for the cancellation metric
            rows = o["idx"][batch.loss_mask[o["idx"]].any(1)]
            sr = o["seq_ratio"][batch.loss_mask[o["idx"]].any(1)]
            torch.testing.assert_close(sr.double(), w[rows], rtol=1e-6, atol=1e-6)
    if transform != "none":
        assert clipped > 0 or transform == "adv_orthogonal"  # the clip is exercised for min_replace


def test_gspo_group_transform_per_micro_batch_would_depend_on_the_split() -> None:
    """Why the weights are computed ahead: a group minimum taken inside each micro-batch changes the gradient."""
    cfg = AlgoConfig(loss="gspo", aggregation="seq_mean_token_mean", seq_weight="min_replace", clip_low=0.5, clip_high=0.5)
    B, T = 26, 9
    batch, logp = make_step_batch(B, T, seed=2, cfg=cfg, spread=0.3)
    batch.seq_weight = sequence_weights(batch, logp, cfg=cfg)
    _, whole, _ = run_update(batch, logp, cfg, SPLITS["one"](B))
    local = torch.zeros_like(logp)
    for idx in SPLITS["three"](B):
        sub = batch.select(idx)
        sub.seq_weight = sequence_weights(sub, logp[idx][:, : sub.response_len], cfg=cfg)  # the unsound way
        leaf = logp[idx][:, : sub.response_len].clone().requires_grad_(True)
        loss, _ = micro_batch_loss(sub, leaf, cfg=cfg, num_tokens=1.0, num_seqs=float(B), norm_const=1.0, stats=StatSums())
        loss.backward()
        local[idx, : sub.response_len] = leaf.grad
    assert (local - whole).abs().max() > 0.1 * whole.abs().max()


def test_min_replace_and_adv_orthogonal_cancel_whole_group_prefixes() -> None:
    """SPEC 8: with GSPO's own s_i a template prefix shared by a whole group keeps a net gradient; after
    min-replace or advantage-orthogonal weights it cancels exactly (residual 0)."""
    B, T, G = 16, 10, 4
    cfg = AlgoConfig(loss="gspo", aggregation="seq_mean_token_mean", seq_weight="min_replace")
    batch, logp = make_step_batch(B, T, seed=7, cfg=cfg, spread=0.2)
    gid = torch.arange(B) // G
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    ids = 100 + torch.arange(B * T).view(B, T)  # distinct everywhere ...
    ids[:, :4] = 1  # ... but a 4-token template shared within every group
    batch.group_ids, batch.rewards = gid, rewards
    batch.seq_adv = ADVANTAGES.call("grpo", rewards, gid)
    batch.loss_mask = batch.response_mask = torch.ones(B, T, dtype=torch.bool)
    batch.input_ids[:, -T:] = ids
    raw = cancellation_metrics(batch, seq_weights=sequence_weights(batch, logp, cfg=AlgoConfig(loss="gspo")))
    assert raw["cancel/residual"] > 0.01
    for transform in ("min_replace", "adv_orthogonal"):
        w = sequence_weights(batch, logp, cfg=AlgoConfig(loss="gspo", seq_weight=transform))
        assert cancellation_metrics(batch, seq_weights=w)["cancel/residual"] < 1e-6, transform


def test_seq_weight_without_the_weights_is_an_error_not_a_silent_no_op() -> None:
    cfg = AlgoConfig(loss="gspo", aggregation="seq_mean_token_mean", seq_weight="min_replace")
    batch, logp = make_step_batch(6, 4, seed=0, cfg=cfg)
    with pytest.raises(ValueError, match=r"the trainer must set batch.seq_weight\[rows\] = step.sequence_weights"):
        run_update(batch, logp, cfg, SPLITS["one"](6))


def test_sequence_weights_first_step_and_unused_rows() -> None:
    """logp=None (the policy has not moved): s_i = 1. A row with no loss token takes no part in its group's minimum."""
    cfg = AlgoConfig(loss="gspo", seq_weight="min_replace")
    batch, logp = make_step_batch(12, 6, seed=2, cfg=cfg)
    assert torch.equal(sequence_weights(batch, None, cfg=cfg), torch.ones(12))
    gid = batch.group_ids
    batch.loss_mask[0] = False
    low = logp.clone()
    low[0] = batch.old_logp[0] - 5.0  # row 0 alone would make its group's minimum e^-5
    w = sequence_weights(batch, low, cfg=cfg)
    assert w[0] == 1.0 and (w[gid == gid[0]][1:] > math.exp(-4)).all()


# ---------------------------------------------------------------------------------- defect 14 (c): FRPO kl_source


@pytest.mark.parametrize("divergence", ["k1", "k3"])
def test_frpo_current_kl_source_matches_the_twin(divergence: str) -> None:
    """Defect 14c: kl_source = 'current' recomputes A_grpo - beta * KL-to-go from the detached current log-probs
    in every micro-batch (SPEC 7); the loss, its gradient and the reported credit are the twin's."""
    beta = 0.3
    cfg = AlgoConfig(credit="frpo", kl_placement="advantage", beta=beta, std="population", divergence=divergence,
                     kl_source="current", loss="ppo_clip", aggregation="token_mean", clip_low=0.2, clip_high=0.28)
    B, T = 20, 11
    batch, logp = make_step_batch(B, T, seed=8, cfg=cfg)
    credit = ref.frpo(batch.seq_adv, batch.response_mask, old_logp=logp, ref_logp=batch.ref_logp, beta=beta,
                      divergence=divergence)  # [B, T] from the current log-probs
    per_tok = ref.ppo_clip(logp, batch.old_logp, credit, batch.loss_mask, clip_low=0.2, clip_high=0.28)[0]
    n_tok = float(batch.loss_mask.sum())
    want = ref.aggregate("token_mean", per_tok, batch.loss_mask, num_tokens=n_tok, num_seqs=B, norm_const=0)
    # the gradient of PPO with that credit held constant
    leaf = logp.clone().requires_grad_(True)
    from grpokit.algo.losses import ppo_clip

    pt, _ = ppo_clip(leaf, batch.old_logp, credit, batch.loss_mask, clip_low=0.2, clip_high=0.28)
    (pt.sum() / n_tok).backward()
    for name, split in SPLITS.items():
        loss, grad, outs = run_update(batch, logp, cfg, split(B))
        assert loss == pytest.approx(want, rel=1e-6), name
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-6, atol=1e-8, msg=name)
        for o in outs:
            t = o["token_adv"].shape[1]
            torch.testing.assert_close(o["token_adv"].double(), credit[o["idx"], :t].double(), rtol=1e-6, atol=1e-6)
    old, _, _ = run_update(batch, logp, AlgoConfig(**{**cfg.__dict__, "kl_source": "old"}), SPLITS["one"](B))
    assert abs(old - want) > 1e-3  # 'old' differs: the test sees which log-probs the credit came from
