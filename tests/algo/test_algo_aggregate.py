"""Aggregations (SPEC section 3): twins, and the invariance every optimizer step relies on:
the accumulated gradient does not depend on the split into micro-batches or ranks."""
import pytest
import torch

from grpokit.algo.aggregate import AGGREGATIONS
from grpokit.algo.losses import LOSSES
import reference as ref

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
LOSS_KW = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)


def _counts(mask):
    return dict(num_tokens=mask.sum(), num_seqs=mask.shape[0], norm_const=float(mask.shape[1]))


@pytest.mark.parametrize("name", AGGS)
@pytest.mark.parametrize("b,t,all_masked", [(1, 1, False), (7, 13, False), (5, 200, False), (4, 6, True)])
def test_matches_twin(name, b, t, all_masked):
    x = ref.make_batch(b, t, seed=b + t, all_masked=all_masked)
    per_tok = torch.where(x["mask"], torch.randn(b, t, dtype=torch.float64), torch.full((b, t), float("nan"),
                                                                                         dtype=torch.float64))
    c = _counts(x["mask"])
    out = AGGREGATIONS.call(name, per_tok, x["mask"], **c)
    want = ref.aggregate(name, per_tok, x["mask"], num_tokens=int(c["num_tokens"]), num_seqs=c["num_seqs"],
                         norm_const=c["norm_const"])
    assert out.dim() == 0
    assert float(out) == pytest.approx(want, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", AGGS)
def test_all_masked_is_zero_not_nan(name):
    per_tok = torch.zeros(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert float(AGGREGATIONS.call(name, per_tok, mask, num_tokens=0, num_seqs=0, norm_const=4.0)) == 0.0
    assert float(AGGREGATIONS.call(name, per_tok, mask, num_tokens=torch.tensor(0), num_seqs=torch.tensor(0),
                                   norm_const=4.0)) == 0.0


def test_missing_counts_fail_clearly():
    with pytest.raises(ValueError, match="num_tokens"):
        AGGREGATIONS.get("token_mean")(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), num_tokens=None)
    with pytest.raises(ValueError, match="norm_const"):
        AGGREGATIONS.get("seq_mean_token_sum_norm")(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                                    num_seqs=1, norm_const=0.0)


def _splits(b, n, seed):
    """A random partition of range(b) into n non-empty (uneven) row subsets."""
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed)).tolist()
    cuts = sorted(torch.randperm(b - 1, generator=torch.Generator().manual_seed(seed + 1))[: n - 1].add(1).tolist())
    bounds = [0, *cuts, b]
    return [torch.tensor(sorted(perm[a:z])) for a, z in zip(bounds[:-1], bounds[1:])]


def _accumulated_grad(loss, agg, x, parts, counts, **loss_kw):
    """Run one optimizer step's backward over the given micro-batches; return logp.grad."""
    logp = x["logp"].clone().requires_grad_(True)
    for rows in parts:
        per_tok, _ = LOSSES.call(loss, logp[rows], x["old_logp"][rows], x["adv"][rows], x["mask"][rows], **loss_kw)
        AGGREGATIONS.call(agg, per_tok, x["mask"][rows], **counts).backward()
    return logp.grad


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss", ["ppo_clip", "gspo", "fipo", "cispo"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_micro_batch_and_rank_invariance(agg, loss, dtype, atol):
    b, t = 12, 23
    x = ref.make_batch(b, t, seed=5, dtype=dtype, spread=0.5)
    counts = _counts(x["mask"])  # GLOBAL counts: the whole step, all ranks
    kw = dict(LOSS_KW, dual_clip_c=10.0) if loss == "fipo" else LOSS_KW
    full = _accumulated_grad(loss, agg, x, [torch.arange(b)], counts, **kw)
    assert full.abs().sum() > 0 and torch.isfinite(full).all()
    for n in (2, 3):
        torch.testing.assert_close(_accumulated_grad(loss, agg, x, _splits(b, n, seed=n), counts, **kw), full,
                                   rtol=0, atol=atol)
    # two "ranks", each with its rows split into 2 micro-batches; the all-reduce sums their grads
    rank_rows = _splits(b, 2, seed=11)
    grads = []
    for r, rows in enumerate(rank_rows):
        sub = [rows[p] for p in _splits(len(rows), 2, seed=20 + r)]
        grads.append(_accumulated_grad(loss, agg, x, sub, counts, **kw))
    torch.testing.assert_close(grads[0] + grads[1], full, rtol=0, atol=atol)


def test_local_counts_would_break_invariance():
    """Guard the test itself: dividing by per-micro-batch counts does change the gradient."""
    x = ref.make_batch(12, 23, seed=5, spread=0.5)
    full = _accumulated_grad("ppo_clip", "token_mean", x, [torch.arange(12)], _counts(x["mask"]), **LOSS_KW)
    logp = x["logp"].clone().requires_grad_(True)
    for rows in _splits(12, 3, seed=3):
        per_tok, _ = LOSSES.call("ppo_clip", logp[rows], x["old_logp"][rows], x["adv"][rows], x["mask"][rows],
                                 **LOSS_KW)
        (AGGREGATIONS.call("token_mean", per_tok, x["mask"][rows], num_tokens=x["mask"][rows].sum()) / 3).backward()
    assert (logp.grad - full).abs().max() > 1e-4
