"""The typed config: recipes, overrides, typos, impossible combinations, --help."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from grpokit.config import ConfigError, help_text, load_config, parse_overrides, save_config

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))


def test_overrides_parse_toml_literals() -> None:
    got = parse_overrides(["algo.beta=0.01", "train.steps=5", 'rollout.stop_strings=["\\n"]', "model.name=tiny-char"])
    assert got == {"algo": {"beta": 0.01}, "train": {"steps": 5}, "rollout": {"stop_strings": ["\n"]}, "model": {"name": "tiny-char"}}


def test_set_overrides_recipe() -> None:
    cfg = load_config(RECIPES[0], ["algo.beta=0.02", "train.steps=3"])
    assert cfg.algo.beta == 0.02 and cfg.train.steps == 3


def test_typo_names_nearest_field() -> None:
    with pytest.raises(ConfigError, match=r"unknown config field 'algo.bta'; did you mean 'algo.beta'"):
        load_config(None, ["algo.bta=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'train'"):
        load_config(None, ["trian.steps=1"])


def test_wrong_type_names_field() -> None:
    with pytest.raises(ConfigError, match=r"train.steps must be an integer"):
        load_config(None, ["train.steps='many'"])


def test_unknown_registry_name_lists_valid() -> None:
    with pytest.raises(ConfigError, match=r"algo.loss: unknown loss 'ppo'.*valid names: cispo, fipo, gspo, .*ppo_clip"):
        load_config(None, ["algo.loss=ppo"])


def test_group_size_one_with_grpo_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"rollout.group_size = 1.*set rollout.group_size >= 2"):
        load_config(None, ["rollout.group_size=1"])


def test_fipo_with_one_update_warns() -> None:
    with pytest.warns(UserWarning, match=r"FIPO reduces to DAPO; set train.updates_per_rollout >= 2"):
        load_config(None, ["algo.loss=fipo", "train.updates_per_rollout=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["algo.loss=fipo", "train.updates_per_rollout=4"])


def test_frpo_needs_advantage_placement() -> None:
    with pytest.raises(ConfigError, match="kl_placement = 'advantage'"):
        load_config(None, ["algo.credit=frpo", "algo.beta=0.01"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_round_trips(recipe: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bundled recipes must not trigger their own warnings
        cfg = load_config(recipe)
    assert cfg.recipe == recipe.stem
    save_config(cfg, tmp_path / "c.toml")
    again = load_config(tmp_path / "c.toml")
    assert again == cfg


def test_help_documents_every_field() -> None:
    import dataclasses

    from grpokit.config import Config

    text = help_text()
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                assert f"{sec.name}.{f.name} (" in text
                assert f.metadata.get("help"), f"{sec.name}.{f.name} has no documentation"


def test_overlong_buffer_must_fit_in_max_new_tokens() -> None:
    with pytest.raises(ConfigError, match=r"rewards.overlong_buffer = 8 must be between 1 and rollout.max_new_tokens - 1 = 5"):
        load_config(None, ["rewards.overlong_buffer=8", "rollout.max_new_tokens=6"])


# ------------------------------------------------------------------ issue 10, defect 8: the losses' own defaults

# What each bundled recipe must resolve to (the hyperparameters its loss runs with), from its paper.
PAPER_LOSS_HPARAMS = {
    "cispo": {"clip_low": 1.0, "clip_high": 0.28},  # MiniMax-M1: no lower bound on the IS weight
    "dapo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": None},  # clip-higher
    "demo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 10.0, "tau": 32.0, "f_low": 1.0, "f_high": 1.2,
             "safety": 10.0, "drop_seqs": True},
    "dr_grpo": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},
    "fipo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 10.0, "tau": 32.0, "f_low": 1.0, "f_high": 1.2,
             "safety": 10.0, "drop_seqs": True},  # the 32B recipe
    "frpo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": None},
    "grpo": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},
    "grpo_tis": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},  # GRPO + rollout correction (SPEC 12)
    "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "dual_clip_c": None},
    "kdrl": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},  # GRPO's PPO clip under the teacher term
    "gopd": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},  # verl's defaults in the official script
    # SPEC 11, the catalogue (docs/catalogue.md)
    "ace": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": None},  # ACE on DAPO's clip-higher
    "apo": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},  # GRPO's
    "dler": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": None},  # DLER's higher clipping
    "dot": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": None},  # DAPO's
    "grpo_lambda": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},  # GRPO's
    "rapo": {"clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": None},  # GRPO's
    # SPEC 11 (catalogue)
    "clip_cov": {"clip_low": 1.0, "clip_high": 1.0, "dual_clip_c": None},  # verl's entropy recipe (clip_cov reads no c)
    "dppo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": None},
    "kl_cov": {"kl_cov_ratio": 2e-3, "kl_cov_coef": 1.0},  # the paper's 7B/32B runs
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},  # the paper's and TRL's defaults
}


def test_every_recipe_resolves_to_its_papers_loss_hyperparameters() -> None:
    from grpokit.train.step import resolved_loss_hparams

    assert sorted(PAPER_LOSS_HPARAMS) == [p.stem for p in RECIPES]
    for path in RECIPES:
        got = resolved_loss_hparams(load_config(path).algo)
        for key, want in PAPER_LOSS_HPARAMS[path.stem].items():
            assert got[key] == want, (path.stem, key, got[key])


@pytest.mark.parametrize("loss,low,high", [("gspo", 3e-4, 4e-4), ("cispo", 1.0, 0.28), ("ppo_clip", 0.2, 0.2), ("fipo", 0.2, 0.28)])
def test_set_loss_alone_runs_the_losses_own_defaults(loss: str, low: float, high: float) -> None:
    """`--set algo.loss=gspo` used to run GSPO with clip 0.2, and CISPO with a lower bound 0.8."""
    from grpokit.train.step import resolved_loss_hparams

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(None, [f"algo.loss={loss}", "train.updates_per_rollout=2"])
    got = resolved_loss_hparams(cfg.algo)
    assert (got["clip_low"], got["clip_high"]) == (low, high)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(None, [f"algo.loss={loss}", "algo.clip_high=0.5", "train.updates_per_rollout=2"], algo={"clip_low": 0.1})
    got = resolved_loss_hparams(cfg.algo)
    assert (got["clip_low"], got["clip_high"]) == (0.1, 0.5)  # explicit values (keyword section, --set) win


def test_a_set_field_the_loss_does_not_take_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"algo.fipo_tau = 16.0 is set, but algo.loss = 'ppo_clip' does not take it .*fipo"):
        load_config(None, ["algo.fipo_tau=16"])
    with pytest.raises(ConfigError, match=r"algo.dual_clip_c = 3.0 is set, but algo.loss = 'cispo' does not take it"):
        load_config(None, ["algo.loss=cispo", "algo.dual_clip_c=3"])
    fipo = next(p for p in RECIPES if p.stem == "fipo")
    with pytest.raises(ConfigError, match=r"algo.fipo_\w+ = .* is set, but algo.loss = 'ppo_clip'.*remove"):
        load_config(fipo, ["algo.loss=ppo_clip"])  # the recipe's FIPO fields count as set


def test_unset_loss_fields_round_trip_and_help_shows_each_losses_default(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(None, ["algo.loss=gspo", "algo.clip_high=0.001"])
    assert cfg.algo.clip_low is None and cfg.algo.clip_high == 0.001
    save_config(cfg, tmp_path / "c.toml")
    assert "clip_low" not in (tmp_path / "c.toml").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_config(tmp_path / "c.toml") == cfg
    text = help_text()
    assert "algo.clip_low (float, default: the loss's own (cispo 1.0, fipo 0.2, gspo 0.0003, ppo_clip 0.2))" in text
    assert "algo.fipo_tau (float, default 32.0 (fipo's own))" in text


def test_loss_field_ranges() -> None:
    with pytest.raises(ConfigError, match=r"algo.dual_clip_c must be > 1 \(or 0 = off\)"):
        load_config(None, ["algo.dual_clip_c=0.5"])
    with pytest.raises(ConfigError, match=r"algo.clip_low must be a number >= 0"):
        load_config(None, ["algo.clip_low=-0.1"])
    with pytest.raises(ConfigError, match=r"0 <= algo.fipo_f_low <= algo.fipo_f_high, got 1.5 and 1.2"):
        load_config(None, ["algo.loss=fipo", "algo.fipo_f_low=1.5", "train.updates_per_rollout=2"])


# ------------------------------------------------------------------ issue 10, defects 7 and 9: refuse or warn


def test_more_optimizer_steps_than_rows_is_an_error_saying_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"train.updates_per_rollout = 9 exceeds the 8 sequences .*2 x 4.*set train.updates_per_rollout <= 8"):
        load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.updates_per_rollout=9"])
    load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.updates_per_rollout=8"])


def test_temperature_zero_cannot_train() -> None:
    with pytest.raises(ConfigError, match=r"rollout.temperature = 0.0 cannot train.*set rollout.temperature > 0"):
        load_config(None, ["rollout.temperature=0"])


def test_k1_in_the_loss_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'k1' in the loss has zero expected gradient.*'k3'.*algo.kl_placement = 'reward'"):
        load_config(None, ["algo.beta=0.04", "algo.kl_estimator=k1"])
    load_config(None, ["algo.beta=0.04", "algo.kl_estimator=k1", "algo.kl_placement=reward"])  # k1 in the reward is right
    load_config(None, ["algo.kl_estimator=k1"])  # beta = 0: no KL at all


def test_gspo_with_token_mean_and_frpo_with_unbiased_std_warn() -> None:
    with pytest.warns(UserWarning, match=r"GSPO is defined with the sequence-level mean.*seq_mean_token_mean"):
        load_config(None, ["algo.loss=gspo", "algo.aggregation=token_mean"])
    frpo = ["algo.credit=frpo", "algo.kl_placement=advantage", "algo.beta=0.01"]
    with pytest.warns(UserWarning, match=r"FRPO paper .* population std.*algo.std = 'population'"):
        load_config(None, frpo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, [*frpo, "algo.std=population"])
        load_config(None, ["algo.loss=gspo", "algo.aggregation=seq_mean_token_mean"])


# ------------------------------------------------------------------ issue 10, defect 14: the new fields


def test_seq_weight_needs_a_loss_with_sequence_weights() -> None:
    with pytest.raises(ConfigError, match=r"algo.seq_weight = 'min_replace' .* algo.loss = 'ppo_clip' does not have; use it with algo.loss = 'gspo'"):
        load_config(None, ["algo.seq_weight=min_replace"])
    with pytest.raises(ConfigError, match=r"algo.seq_weight: unknown seq_weight 'min'"):
        load_config(None, ["algo.loss=gspo", "algo.seq_weight=min"])
    cfg = load_config(None, ["algo.loss=gspo", "algo.aggregation=seq_mean_token_mean", "algo.seq_weight=adv_orthogonal",
                             "train.updates_per_rollout=2"])
    assert cfg.algo.seq_weight == "adv_orthogonal"
    with pytest.warns(UserWarning, match=r"every sequence ratio s_i is 1"):
        load_config(None, ["algo.loss=gspo", "algo.aggregation=seq_mean_token_mean", "algo.seq_weight=min_replace"])


def test_kl_source_current_needs_frpo() -> None:
    with pytest.raises(ConfigError, match=r"algo.kl_source = 'current' only changes where FRPO's KL-to-go"):
        load_config(None, ["algo.kl_source=current"])
    cfg = load_config(None, ["algo.credit=frpo", "algo.kl_placement=advantage", "algo.beta=0.01", "algo.std=population",
                             "algo.kl_source=current"])
    assert cfg.algo.kl_source == "current"


# ------------------------------------------------------------------ SPEC 11 (catalogue): token masks and their fields


def test_catalogue_fields_belong_to_their_loss_or_mask() -> None:
    with pytest.raises(ConfigError, match=r"algo.clip_cov_ratio = 0.01 is set, but algo.token_mask = 'none' does not take it .*clip_cov"):
        load_config(None, ["algo.clip_cov_ratio=0.01"])
    with pytest.raises(ConfigError, match=r"algo.mask_delta = 4.0 is set, but algo.token_mask = 'clip_cov' does not take it .*dppo"):
        load_config(None, ["algo.token_mask=clip_cov", "algo.mask_delta=4"])
    with pytest.raises(ConfigError, match=r"algo.sapo_tau_pos = 2.0 is set, but algo.loss = 'ppo_clip' does not take it .*sapo"):
        load_config(None, ["algo.sapo_tau_pos=2"])
    with pytest.raises(ConfigError, match=r"algo.clip_high = 0.28 is set, but algo.loss = 'kl_cov' does not take it"):
        load_config(None, ["algo.loss=kl_cov", "algo.clip_high=0.28", "train.updates_per_rollout=2"])
    with pytest.raises(ConfigError, match=r"algo.token_mask: unknown token_mask 'clipcov'.*did you mean 'clip_cov'"):
        load_config(None, ["algo.token_mask=clipcov"])


@pytest.mark.parametrize("sets,match", [
    (["algo.token_mask=dppo", "algo.mask_delta=1"], r"algo.mask_delta must be a number > 1"),
    (["algo.token_mask=clip_cov", "algo.clip_cov_ratio=0"], r"algo.clip_cov_ratio is a fraction of the tokens"),
    (["algo.token_mask=clip_cov", "algo.clip_cov_lb=5", "algo.clip_cov_ub=1"], r"algo.clip_cov_lb < algo.clip_cov_ub"),
    (["algo.loss=kl_cov", "algo.kl_cov_ratio=2", "train.updates_per_rollout=2"], r"algo.kl_cov_ratio is a fraction"),
    (["algo.loss=sapo", "algo.sapo_tau_neg=0", "train.updates_per_rollout=2"], r"algo.sapo_tau_neg must be a number > 0"),
    (["algo.loss=kl_cov", "algo.token_mask=clip_cov", "train.updates_per_rollout=2"], r"both select tokens by covariance"),
])
def test_catalogue_values_out_of_range_are_errors(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_sapo_and_kl_cov_with_one_update_warn() -> None:
    for loss in ("sapo", "kl_cov"):
        with pytest.warns(UserWarning, match=r"reduce to the unclipped policy gradient; set train.updates_per_rollout >= 2"):
            load_config(None, [f"algo.loss={loss}", "train.updates_per_rollout=1"])
