"""SPEC section 11 through the real trainer: each catalogue recipe trains a step and logs its statistic,
Clip-Cov composes with DAPO, and the covariance choice is the same for any micro-batch split and on resume."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from grpokit.config import load_config
from grpokit.train.loop import train
from test_loop import _grads_after_update, read_metrics, tiny_overrides

ROOT = Path(__file__).parents[2]
ONE_STEP = {"train.steps": 1, "data.heldout_size": 0, "train.final_eval": False}
#: every candidate in the covariance band, 10% of the tokens chosen: the choice always acts on the tiny model
WIDE_CLIP_COV = {"algo.token_mask": "clip_cov", "algo.clip_cov_ratio": 0.1, "algo.clip_cov_lb": -100.0, "algo.clip_cov_ub": 100.0}


def _run(recipe: str | None, run: Path, warm_tiny: str, **extra: object) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cfg = load_config(ROOT / "recipes" / f"{recipe}.toml" if recipe else None, tiny_overrides(warm_tiny, run, **{**ONE_STEP, **extra}))
    train(cfg)
    return read_metrics(run)


@pytest.mark.parametrize("recipe,key", [("clip_cov", "mask/clip_cov"), ("kl_cov", "kl_cov/penalised"),
                                        ("sapo", "sapo/gate"), ("dppo", "mask/dppo")])
def test_catalogue_recipe_trains_one_step_and_logs_its_statistic(recipe: str, key: str, warm_tiny: str, tmp_path: Path) -> None:
    # the recipe as shipped steps in test_loop.py::test_every_recipe_runs_one_step; here without dynamic sampling's
    # extra rounds (time), to read the method's statistic
    (row,) = _run(recipe, tmp_path / "run", warm_tiny, **{"algo.dynamic_sampling": False})
    assert row["loss"] == row["loss"] and row["grad_norm"] == row["grad_norm"]
    assert key in row and 0.0 <= row[key] <= 1.0, (key, row.get(key))
    if recipe == "kl_cov":  # max(floor(0.002 N), 1) = 1 token per optimizer step on the tiny batch
        assert row[key] > 0
    if recipe == "sapo":  # the second update is off-policy: some gate below 1, none at 0
        assert 0.5 < row[key] <= 1.0


def test_clip_cov_composes_with_dapo(warm_tiny: str, tmp_path: Path) -> None:
    """DAPO's recipe (clip-higher, token_mean, dynamic sampling) with the Clip-Cov token mask on top."""
    (row,) = _run("dapo", tmp_path / "run", warm_tiny, **{"rewards.overlong_buffer": 2, **WIDE_CLIP_COV})
    assert row["mask/clip_cov"] > 0.05  # about 10% of the loss tokens, less those the clip already clipped
    assert "clip/high" in row and row["loss"] == row["loss"]


@pytest.mark.parametrize("algo", [
    pytest.param({"algo.loss": "kl_cov", "algo.kl_cov_ratio": 0.1}, marks=pytest.mark.slow),  # same step-level path
    {"algo.loss": "ppo_clip", "algo.clip_high": 0.28, **WIDE_CLIP_COV},
], ids=["kl_cov", "clip_cov"])
def test_covariance_choice_does_not_depend_on_micro_batching(warm_tiny: str, tmp_path: Path, algo: dict) -> None:
    """One choice per optimizer step: 1 micro-batch and 5-row micro-batches give one gradient
    (verl chooses per micro-batch, which would not), and the choice changes the gradient (not vacuous)."""
    loss = algo["algo.loss"]
    extra = {k: v for k, v in algo.items() if k != "algo.loss"}
    ref = _grads_after_update(warm_tiny, tmp_path, "a", loss, "token_mean", **{"train.micro_batch_size": 12}, **extra)
    for name, micro in [("b", {"train.micro_batch_size": 5})]:  # (token budgets: tests/parallel, 2 ranks)
        got = _grads_after_update(warm_tiny, tmp_path, name, loss, "token_mean", **micro, **extra)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    if loss == "ppo_clip":
        plain = _grads_after_update(warm_tiny, tmp_path, "d", loss, "token_mean", **{"train.micro_batch_size": 12, "algo.clip_high": 0.28})
    else:
        plain = _grads_after_update(warm_tiny, tmp_path, "d", loss, "token_mean", **{"train.micro_batch_size": 12, "algo.kl_cov_ratio": 1e-6})
    diff = max(float((g - r).abs().max()) for g, r in zip(plain, ref))
    assert diff > 1e-6, "the covariance choice did not change the gradient: the comparison is vacuous"


def test_clip_cov_resume_repeats_the_random_choice(warm_tiny: str, tmp_path: Path) -> None:
    """The random choice is seeded by (train.seed, step, update): 3 steps in one go and 2 + resume 1 agree."""
    extra = {**WIDE_CLIP_COV, "train.updates_per_rollout": 2, "train.save_every": 1, "train.keep_last": 5,
             "train.deterministic": True, "train.threads": 1, "data.heldout_size": 0, "train.final_eval": False}

    def cfg(run: Path, steps: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return load_config(None, tiny_overrides(warm_tiny, run, **{**extra, "train.steps": steps}))

    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg(full, 3))
    train(cfg(cut, 2))
    train(cfg(cut, 3), resume=cut)
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3] and all(r["mask/clip_cov"] > 0 for r in a)
    drop = ("time/", "tokens/s")
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in a] == \
        [{k: v for k, v in r.items() if not k.startswith(drop)} for r in b]
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
