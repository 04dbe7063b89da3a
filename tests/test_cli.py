"""The command line: list, train --help, eval, report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpokit.algo import REGISTRIES
from grpokit.cli import main


def test_list_shows_every_registered_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, reg in REGISTRIES.items():
        assert f"\n{kind}\n" in "\n" + out
        for name in reg.names():
            assert f"  {name} " in out, f"{kind} '{name}' missing from `grpokit list`"


def test_train_help_documents_fields(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "algo.fipo_tau (float, default 32.0)" in out and "Future-KL" in out or "future-KL" in out


def test_train_config_typo_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "grpo", "--set", "algo.clip_hihg=0.3"]) == 2
    assert "did you mean 'algo.clip_high'" in capsys.readouterr().err


def test_eval_on_a_model_directory(warm_tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    assert main(["eval", warm_tiny, "--task", "copy2", "--n", "15", "--k", "4", "--max-new-tokens", "6",
                 "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert res["n"] == 15 and res["k"] == 4
    assert 0.0 <= res["pass@k"]["1"] <= res["pass@k"]["4"] <= 1.0
    out = capsys.readouterr().out
    assert "avg@4" in out and "pass@4" in out and "95% CI" in out


@pytest.mark.parametrize("args,needle", [
    (["train", "no/such/recipe.toml"], "recipe 'no/such/recipe.toml' not found"),
    (["train", "grpo", "--set", "model.name='./no_such_model_dir'"], "model directory './no_such_model_dir' does not exist"),
    (["train", "grpo", "--set", "data.task='missing_data.jsonl'"], "dataset file 'missing_data.jsonl' does not exist"),
    (["train", "grpo", "--set", "rewards.functions=['no_such_reward_module:fn']"], "cannot import module 'no_such_reward_module'"),
    (["train", "--resume", "no_such_run_dir"], "no such run directory"),
])
def test_known_user_errors_are_one_line_and_status_2(args: list[str], needle: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpokit: error: ") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "a refused run must not create its run directory"
