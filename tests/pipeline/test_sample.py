"""`grpokit sample` (rejection sampling, SPEC 10 stage 3): each filter removes exactly what it should, counted;
the JSONL carries the provenance columns; runs are reproducible; the CLI; one end-to-end run on a tiny model."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from grpokit.cli import main
from grpokit.config import ConfigError
from grpokit.models import make_tiny
from grpokit.pipeline.sample import (
    FILTERS, format_counts, load_sample_config, normalise, repetition, run_sample, sample_seed,
)
from grpokit.rewards import numeric_match
from grpokit.rollout import Rollout

N = 8
GOOD = "<think>a</think> <answer>5</answer>"  # the shortest correct, well-formed sample of Q0
# what prompt Q0 (answer 5) gets, sample by sample: (text, truncated)
SCRIPT_Q0 = [
    ("<think>a b</think> <answer>5</answer>", False),            # 0: correct, but longer than 7 -> over_k (k=1)
    ("<think>a b c", True),                                      # 1: truncated (also ill-formed, incorrect)
    ("5", False),                                                # 2: correct but not <think>/<answer> -> format
    ("<think>a</think> <answer>6</answer>", False),              # 3: wrong answer -> incorrect
    ("<think>x x x x x x x x x x x x</think> <answer>5</answer>", False),  # 4: a loop -> repetition
    ("<think>a  b</think>\n<answer>5</answer>", False),          # 5: sample 0 up to whitespace -> duplicate
    ("<think>a b c d</think> <answer>5</answer>", False),        # 6: correct, longer -> over_k
    (GOOD, False),                                               # 7: kept
]
SCRIPT_Q1 = [(f"<think>t{j}</think> <answer>{j}</answer>", False) for j in range(N)]  # answer 9: all wrong


class ListTask:
    """Two fixed prompts (a Task with a training stream and a held-out split)."""

    name = "list"

    def __init__(self) -> None:
        self.rows = [{"prompt": "Q0", "answer": "5", "level": "easy"}, {"prompt": "Q1", "answer": "9", "level": "hard"}]

    def sample(self, n: int, rng: Any) -> list[dict[str, Any]]:
        return [dict(self.rows[rng.randrange(2)]) for _ in range(n)]

    def heldout(self, n: int | None = None) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows[:n]]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FakeEngine:
    """Returns the scripted completion of each (prompt, sample) it is asked for, recognised from the prompt
    text and the row's seed; the response length in tokens is the text's length in characters."""

    def __init__(self, tokenizer: Any, scripts: dict[str, list[tuple[str, bool]]], seed: int = 0) -> None:
        self.tokenizer, self.scripts = tokenizer, scripts
        self.by_seed = {sample_seed(seed, i, j): j for i in range(len(scripts)) for j in range(N)}
        self.calls: list[int] = []

    def generate(self, prompts: list[list[int]], params: Any, seeds: list[int]) -> Rollout:
        self.calls.append(len(prompts))
        items = []
        for ids, seed in zip(prompts, seeds):
            name = re.findall(r"Q\d", self.tokenizer.decode(ids))[-1]
            items.append(self.scripts[name][self.by_seed[seed]])
        B, T = len(items), max(len(t) for t, _ in items)
        mask = torch.zeros(B, T, dtype=torch.bool)  # [B, T]
        for b, (text, _) in enumerate(items):
            mask[b, : len(text)] = True
        return Rollout(
            prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
            response_ids=mask.long(), response_mask=mask, logprobs=torch.zeros(B, T),
            truncated=torch.tensor([tr for _, tr in items]), texts=[t for t, _ in items],
        )

    def load_weights(self, named: Any) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_tok() -> Any:
    return make_tiny(seed=0)[1]


def scripted(tmp_path: Path, tok: Any, *sets: str, scripts: dict | None = None) -> tuple[Path, dict, FakeEngine]:
    cfg = load_sample_config(None, [f"sample.out_dir='{tmp_path / 'out'}'", "sample.prompts=2", f"sample.n={N}",
                                    "sample.split='heldout'", "sample.format='think_answer'", "sample.progress=false", *sets])
    engine = FakeEngine(tok, scripts or {"Q0": SCRIPT_Q0, "Q1": SCRIPT_Q1}, cfg.sample.seed)
    path = run_sample(cfg, engine=engine, tokenizer=tok, task=ListTask())
    summary = json.loads((path.parent / "summary.json").read_text())
    return path, summary, engine


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_filter_removes_what_it_should_counted(tmp_path: Path, tiny_tok: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path, summary, _ = scripted(tmp_path, tiny_tok)
    assert summary["generated"] == 16
    assert summary["removed"] == {"truncated": 1, "format": 1, "incorrect": 1 + 8, "repetition": 1, "duplicate": 1, "over_k": 2}
    # every sample failing each check, whatever removed it first: sample 1 is also ill-formed and wrong
    assert summary["failing"] == {"truncated": 1, "format": 2, "incorrect": 2 + 8, "repetition": 1}
    assert summary["examples"]["repetition"] == [SCRIPT_Q0[4][0]] and summary["examples"]["duplicate"] == [SCRIPT_Q0[5][0]]
    rows = read(path)
    assert [r["completion"] for r in rows] == [GOOD] and summary["kept"] == 1 and summary["prompts_kept"] == 1
    out = capsys.readouterr().out
    assert format_counts(16, summary["removed"]) in out
    assert re.search(r"incorrect\s+9\s+5\n", out) and re.search(r"over_k\s+2\s+1\n", out)


def test_provenance_columns(tmp_path: Path, tiny_tok: Any) -> None:
    path, _, _ = scripted(tmp_path, tiny_tok, "model.name='my/policy'")
    (row,) = read(path)
    assert row == {"prompt": "Q0", "completion": GOOD, "answer": "5", "level": "easy", "source_model": "my/policy",
                   "reward": 1.0, "length": len(GOOD), "seed": sample_seed(0, 0, 7), "sample": 7}


def test_k_order_and_switches(tmp_path: Path, tiny_tok: Any) -> None:
    # k = 0 keeps every survivor (shortest first); k = 2 keeps the two shortest
    rows = read(scripted(tmp_path / "a", tiny_tok, "sample.k=0")[0])
    assert [r["sample"] for r in rows] == [7, 0, 6]
    rows = read(scripted(tmp_path / "b", tiny_tok, "sample.k=2")[0])
    assert [r["sample"] for r in rows] == [7, 0]
    picks = {tuple(r["sample"] for r in read(scripted(tmp_path / f"r{s}", tiny_tok, "sample.k=2", "sample.order='random'",
                                                      f"sample.seed={s}")[0]))
             for s in range(6)}
    assert len(picks) > 1 and all(set(p) <= {0, 6, 7} and len(p) == 2 for p in picks)
    # each switch turns its filter off, and the sample it removed moves on to the next filter
    _, s, _ = scripted(tmp_path / "c", tiny_tok, "sample.drop_truncated=false")
    assert s["removed"]["truncated"] == 0 and s["removed"]["format"] == 2
    _, s, _ = scripted(tmp_path / "d", tiny_tok, "sample.format=''", "sample.k=0")
    assert s["removed"]["format"] == 0 and s["kept"] == 4  # "5" is correct and now kept
    _, s, _ = scripted(tmp_path / "e", tiny_tok, "sample.max_repetition=1.0", "sample.k=0")
    assert s["removed"]["repetition"] == 0 and s["kept"] == 4
    _, s, _ = scripted(tmp_path / "f", tiny_tok, "sample.dedup=false", "sample.k=0")
    assert s["removed"]["duplicate"] == 0 and s["kept"] == 4


def test_threshold_and_reward_key(tmp_path: Path, tiny_tok: Any) -> None:
    # the total of numeric_match + 0.5 * format: correct & formatted = 1.5, formatted only = 0.5
    sets = ["rewards.functions=['numeric_match', 'format']", "rewards.weights=[1.0, 0.5]",
            "rewards.options={format={preset='think_answer'}}", "sample.format=''", "sample.k=0"]
    path, s, _ = scripted(tmp_path / "a", tiny_tok, *sets, "sample.reward_key='total'", "sample.threshold=1.5")
    assert s["removed"]["incorrect"] == 1 + 1 + 8  # the wrong one and the bare "5" (1.0); all of Q1 (0.5 each)
    assert {r["reward"] for r in read(path)} == {1.5}
    _, s, _ = scripted(tmp_path / "b", tiny_tok, *sets, "sample.reward_key='format'", "sample.threshold=1.0")
    assert s["removed"]["incorrect"] == 1  # only the bare "5" (the truncated one went first); Q1's are well-formed
    with pytest.raises(ConfigError, match="reward_key = 'nope' is not one of the rewards"):
        scripted(tmp_path / "c", tiny_tok, "sample.reward_key='nope'")


def test_batches_are_whole_prompts_and_do_not_change_the_samples(tmp_path: Path, tiny_tok: Any) -> None:
    _, s1, e1 = scripted(tmp_path / "a", tiny_tok, "sample.batch_size=8")
    _, s2, e2 = scripted(tmp_path / "b", tiny_tok, "sample.batch_size=64")
    assert e1.calls == [8, 8] and e2.calls == [16]
    assert s1["removed"] == s2["removed"]


def test_repetition_and_normalise() -> None:
    assert repetition("a b c a b c", 3) == pytest.approx(0.25)  # 4 trigrams, 3 distinct
    assert repetition("a b", 3) == 0.0 and repetition("", 3) == 0.0
    assert repetition("carry 1 " * 20, 3) > 0.9
    assert repetition("units 7+5=12 write 2 carry 1; tens 4+8+1=13 write 3 carry 1; hundreds 1", 3) < 0.1
    assert normalise("  a\n\tb  c ") == "a b c"


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'sample.k'"):
        load_sample_config(None, ["sample.kk=1"])
    with pytest.raises(ConfigError, match="sample.format = 'xml' is not a preset"):
        load_sample_config(None, ["sample.format='xml'"])
    with pytest.raises(ConfigError, match="identical"):
        load_sample_config(None, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match="sample.order"):
        load_sample_config(None, ["sample.order='longest'"])
    with pytest.raises(ConfigError, match="max_repetition"):
        load_sample_config(None, ["sample.max_repetition=2"])
    bundled = Path(__file__).resolve().parents[2] / "recipes" / "sample" / "r1_traces.toml"
    cfg = load_sample_config(bundled)
    assert cfg.recipe == "r1_traces" and cfg.data.task == "add_trace" and cfg.sample.format == "think_answer"


def test_end_to_end_on_the_tiny_model(warm_tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real engine and rewards on the SFT-warmed tiny model (copy2: 'Say 47' -> '47')."""
    recipe = tmp_path / "copy.toml"
    recipe.write_text(f"""
[model]
name = "{warm_tiny}"
precision = "fp32"
[data]
task = "copy2"
[rollout]
max_new_tokens = 6
[rewards]
functions = ["numeric_match"]
[sample]
prompts = 12
n = 6
k = 2
format = "number"
device = "cpu"
""")
    out1 = tmp_path / "one"
    assert main(["sample", str(recipe), "--set", f"sample.out_dir='{out1}'", "--set", "sample.batch_size=12"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and all(name in printed for name in FILTERS)
    summary = json.loads((out1 / "summary.json").read_text())
    rows = read(out1 / "samples.jsonl")
    assert summary["generated"] == 72 and summary["kept"] == len(rows) > 0
    assert sum(summary["removed"].values()) + summary["kept"] == 72
    assert 0 < summary["removed"]["incorrect"] < 72  # the warmed-up model is right only part of the time
    assert numeric_match([""] * len(rows), [r["completion"] for r in rows], answer=[r["answer"] for r in rows]) == [1.0] * len(rows)
    assert all(r["source_model"] == warm_tiny and r["reward"] == 1.0 and r["length"] >= 2 for r in rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["prompt"]] = counts.get(r["prompt"], 0) + 1
    assert max(counts.values()) <= 2 and len(rows) == sum(min(2, c) for c in counts.values())
    assert (out1 / "config.toml").exists() and not math.isnan(summary["correct_rate"])
    # reproducible, whatever the batch size
    out2 = tmp_path / "two"
    assert main(["sample", str(recipe), "--set", f"sample.out_dir='{out2}'", "--set", "sample.batch_size=72"]) == 0
    assert read(out2 / "samples.jsonl") == rows


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "no_such_recipe"]) == 2
    assert "sample recipe 'no_such_recipe' not found" in capsys.readouterr().err
    assert main(["sample", "r1_traces", "--set", "model.name='./no_model_here'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpokit: error: model directory './no_model_here' does not exist") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
