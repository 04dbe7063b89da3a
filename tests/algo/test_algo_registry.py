"""The registries: names, one signature per registry, first docstring lines, unknown-name errors."""
import inspect

import pytest
import torch

import grpokit.algo as algo
from grpokit.algo import REGISTRIES

EXPECTED = {
    "advantage": ["batch_std", "dr_grpo", "grpo", "rloo"],
    "credit": ["broadcast", "frpo", "process"],
    "loss": ["cispo", "fipo", "gspo", "kl_cov", "ppo_clip", "sapo"],
    "aggregation": ["seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "token_mean"],
    "kl": ["forward_kl", "k1", "k2", "k3"],
    "seq_weight": ["adv_orthogonal", "min_replace", "none"],
    "distill": ["gopd", "kdrl", "none"],
    "adv_transform": ["ace", "none"],
    "kl_weight": ["apo", "constant"],
    "correction": ["geo_mask", "seq_mask", "seq_tis", "token_mask", "token_tis"],
    "token_mask": ["clip_cov", "dppo", "none"],
}
KEYWORDS = {  # the uniform keyword hyperparameters of each registry (docs/interfaces.md)
    "advantage": {"eps", "std"},
    "credit": {"old_logp", "ref_logp", "beta", "divergence"},
    "loss": {"clip_low", "clip_high", "dual_clip_c"},
    "aggregation": {"num_tokens", "num_seqs", "norm_const"},
    "kl": set(),
    "seq_weight": set(),
    "distill": set(),
    "adv_transform": {"old_logp", "ref_logp", "alpha"},
    "kl_weight": {"beta", "e"},
    "correction": {"low", "high"},
    "token_mask": set(),
}
POSITIONAL = {"advantage": 2, "credit": 2, "loss": 4, "aggregation": 2, "kl": 2, "seq_weight": 3, "distill": 4,
              "adv_transform": 2, "kl_weight": 4, "correction": 2, "token_mask": 5}


def test_registries_and_exports():
    assert {k: r.names() for k, r in REGISTRIES.items()} == EXPECTED
    assert algo.ADVANTAGES is REGISTRIES["advantage"] and algo.LOSSES is REGISTRIES["loss"]
    assert algo.CREDIT is REGISTRIES["credit"] and algo.AGGREGATIONS is REGISTRIES["aggregation"]
    assert algo.KL is REGISTRIES["kl"]


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_uniform_signature_and_docstrings(kind):
    reg = REGISTRIES[kind]
    for name, first_line in reg.summary():
        assert 10 < len(first_line) <= 100, (kind, name, first_line)
        params = inspect.signature(reg.get(name)).parameters.values()
        positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keyword = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert len(positional) == POSITIONAL[kind], (kind, name)
        assert KEYWORDS[kind] <= keyword, (kind, name, keyword)
        doc = inspect.getdoc(reg.get(name))
        assert "Shapes" in doc, (kind, name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        REGISTRIES["loss"].get("ppo_clipp")
    msg = str(err.value)
    assert "unknown loss 'ppo_clipp'" in msg and "did you mean 'ppo_clip'" in msg
    assert "cispo, fipo, gspo, kl_cov, ppo_clip, sapo" in msg
    with pytest.raises(ValueError, match="valid names: batch_std, dr_grpo, grpo, rloo"):
        REGISTRIES["advantage"].call("ppo", torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_call_routes_only_declared_hyperparameters():
    """The trainer can hand every loss the same keyword set; each takes what it declares."""
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    every = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, tau=32.0, f_low=1.0, f_high=1.2, safety=10.0,
                 drop_seqs=True, unrelated=1)
    for name in REGISTRIES["loss"]:
        per_tok, stats = REGISTRIES["loss"].call(name, x, x, x, mask, **every)
        assert per_tok.shape == (2, 3) and {"clipped_low", "clipped_high", "dual_clipped"} <= set(stats)


def test_accepts_defaults_and_call_strict():
    """What the config checks user-set fields against: the keywords a loss takes and acts on."""
    losses = REGISTRIES["loss"]
    assert losses.accepts("ppo_clip") == {"clip_low", "clip_high", "dual_clip_c"}
    assert losses.accepts("gspo") == {"clip_low", "clip_high", "dual_clip_c", "seq_ratio"}
    assert losses.accepts("cispo") == {"clip_low", "clip_high"}  # dual_clip_c is declared but ignored
    assert {"tau", "f_low", "f_high", "safety", "drop_seqs"} <= losses.accepts("fipo")
    assert losses.defaults("gspo")["clip_low"] == 3e-4 and losses.defaults("cispo")["clip_low"] == 1.0
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"loss 'ppo_clip' does not take tau .*leave it unset or choose a loss"):
        losses.call_strict("ppo_clip", x, x, x, mask, clip_low=0.2, tau=32.0)
    with pytest.raises(ValueError, match=r"loss 'cispo' does not take dual_clip_c"):
        losses.call_strict("cispo", x, x, x, mask, dual_clip_c=3.0)
    per_tok, _ = losses.call_strict("fipo", x, x, x, mask, tau=8.0)
    assert per_tok.shape == (2, 3)
