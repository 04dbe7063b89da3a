"""The long-response mode of benchmarks/algorithms.py: its task really is long, and its plumbing runs.

The benchmark's `trace2` task must give the character model responses of 64 tokens or more that fit the
mode's new-token budget, with the answer decided by the first (units) column; the settings every method
shares must reach each recipe, GSPO with min-replace must differ from GSPO only in `algo.seq_weight`, and
a README section update must leave the other sections in place.
"""
from __future__ import annotations

import random


def test_trace2_responses_are_long_and_fit_the_budget(bench):
    from grpokit.data import get_task
    from grpokit.models.tiny import make_tiny_tokenizer

    spec, options = bench.TASK_SPECS["trace2"]
    task = get_task(spec, **options)
    tok = make_tiny_tokenizer()
    rows = task.sample(300, random.Random(0)) + task.heldout()
    lens = [len(tok.encode(r["completion"], add_special_tokens=False)) + 1 for r in rows]  # + EOS
    assert min(lens) >= 64
    assert max(lens) <= bench.COMMON_LONG["max_new_tokens"]
    # the units column comes first: its step is within the first 40 tokens of every trace
    assert all(r["completion"].startswith("<think>units ") and r["completion"].index(";") < 40 for r in rows)


def test_long_mode_overrides_per_method(bench, tmp_path):
    import tomllib

    from grpokit.config import load_config

    c = bench.COMMON_LONG
    cfgs = {}
    for m in bench.LONG_METHODS:
        ov = bench.overrides_for(m, "trace2", "tiny", 0, 3, tmp_path / m, c)
        items = [f"{k}={bench.toml_literal(v)}" for k, v in ov.items()]
        cfgs[m] = load_config(bench.RECIPES / bench.METHODS[m][0], items)
        cfg = cfgs[m]
        assert cfg.rollout.max_new_tokens == c["max_new_tokens"] and cfg.rollout.group_size == c["group_size"]
        assert cfg.train.lr == c["lr"] and cfg.train.steps == 3 and cfg.data.task == "add_trace"
        recipe = tomllib.loads((bench.RECIPES / bench.METHODS[m][0]).read_text())
        assert cfg.algo.loss == recipe["algo"]["loss"]
    assert cfgs["gspo"].algo.seq_weight == "none" and cfgs["gspo_mr"].algo.seq_weight == "min_replace"
    assert cfgs["dr_grpo"].algo.norm_const == c["max_new_tokens"]
    assert cfgs["dapo"].rewards.overlong_buffer == round(8 * c["max_new_tokens"] / 32)


def test_update_readme_keeps_other_sections(bench, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\n## A\n\nold a\n\n" + bench.README_SECTION + "\n\nold short\n\n## Z\n\nz\n")
    monkeypatch.setattr(bench, "README", readme)
    bench.update_readme("new long", bench.LONG_README_SECTION)
    bench.update_readme("new short")
    text = readme.read_text()
    assert "old short" not in text and "new short" in text and "new long" in text
    assert "## A\n\nold a" in text and "## Z\n\nz" in text
    bench.update_readme("newer long", bench.LONG_README_SECTION)
    text = readme.read_text()
    assert text.count(bench.LONG_README_SECTION) == 1 and "newer long" in text and "new long\n" not in text
