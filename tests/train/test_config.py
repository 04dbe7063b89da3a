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
    with pytest.raises(ConfigError, match=r"algo.loss: unknown loss 'ppo'.*valid names: cispo, fipo, gspo, ppo_clip"):
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
