"""Ensembles (arXiv 2310.02743): mean, wco, uwo, over any scorers; and scorer factories in RewardSet."""
import pytest
import torch

from grpokit.rewards import REWARDS, Ensemble, RewardSet, combine, is_factory, scorer_factory


def test_combine_formulas():
    s = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.7], [0.5, 0.0, 0.9]])  # [K=3, B=3]
    torch.testing.assert_close(combine(s, "mean"), torch.tensor([0.5, 0.0, 0.7]))
    torch.testing.assert_close(combine(s, "wco"), torch.tensor([0.0, 0.0, 0.5]))
    var = torch.tensor([0.25, 0.0, 0.04])  # unbiased: sum sq / (K - 1)
    torch.testing.assert_close(combine(s, "uwo"), torch.tensor([0.5, 0.0, 0.7]) - 0.1 * var)
    torch.testing.assert_close(combine(s, "uwo", lam=1.0), torch.tensor([0.5, 0.0, 0.7]) - var)
    torch.testing.assert_close(combine(s[:1], "uwo"), s[0])  # one member: var 0
    with pytest.raises(ValueError, match="mean, wco, uwo"):
        combine(s, "max")


def const(v):
    def fn(prompts, completions, **kw):
        return [v(c) for c in completions]
    return fn


def test_ensemble_over_plain_functions_and_none():
    ens = Ensemble([const(lambda c: 1.0), const(lambda c: 0.0 if c == "a" else None), const(lambda c: None)], method="uwo")
    out = ens(["p", "q"], ["a", "b"])
    assert out[0] == pytest.approx(0.5 - 0.1 * 0.5) and out[1] == 1.0  # "b": only one member scored it
    assert Ensemble([const(lambda c: None)])(["p"], ["a"]) == [None]


def test_ensemble_from_rewardset_options_with_named_members():
    rs = RewardSet([("ensemble", 2.0, {"method": "wco", "members": [
        "numeric_match", {"name": "format", "preset": "number"}]})])
    res = rs.score(["Say 4", "Say 5", "Say 6"], ["4", "7", "no"], {"answer": ["4", "5", "6"]})
    assert res.per_function["ensemble"] == [1.0, 0.0, 0.0]
    assert res.total.tolist() == [2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="members is empty"):
        RewardSet([("ensemble", 1.0, {"members": []})])
    with pytest.raises(ValueError, match="ensemble member 0"):
        RewardSet([("ensemble", 1.0, {"members": [3]})])


def test_scorer_factory_marker_and_instances():
    @scorer_factory
    class Times:
        def __init__(self, k: float) -> None:
            self.k = k

        def __call__(self, prompts, completions, answer):
            return [self.k * float(c == a) for c, a in zip(completions, answer)]

    assert is_factory(Times) and not is_factory(Times(2.0)) and not is_factory(REWARDS.get("numeric_match"))
    rs = RewardSet([(Times, 1.0, {"k": 3.0}, "times"), (Times(2.0), 1.0, {}, "inst")])
    res = rs.score(["a", "b"], ["1", "2"], {"answer": ["1", "1"], "other": [0, 0]})
    assert res.per_function == {"times": [3.0, 0.0], "inst": [2.0, 0.0]}
    for name in ("orm", "prm", "llm_judge", "remote", "ensemble", "code_exec"):
        assert is_factory(REWARDS.get(name)), name
