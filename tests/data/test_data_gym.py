"""rg:<name> tasks: rows carry what the scorer needs; held-out comes from a disjoint seed range."""
import json
import random

import pytest

from grpokit.data import get_task


def test_rows_carry_scorer_columns():
    task = get_task("rg:basic_arithmetic", heldout_size=20)
    row = task.sample(1, random.Random(0))[0]
    assert row["rg_task"] == "basic_arithmetic" and json.loads(row["rg_config"]) == {}
    entry = json.loads(row["rg_entry"])
    assert entry["answer"] == row["answer"] and row["prompt"].startswith(entry["question"])
    assert entry["metadata"]["source_dataset"] == "basic_arithmetic"
    assert row["prompt"].endswith(" Give only the final answer.")


def test_heldout_fixed_and_disjoint_from_training():
    task = get_task("rg:chain_sum", heldout_size=50)
    held = task.heldout()
    assert len(held) == 50 and task.heldout(5) == held[:5]
    assert get_task("rg:chain_sum", heldout_size=50).heldout() == held
    held_idx = {json.loads(r["rg_entry"])["metadata"]["source_index"] for r in held}
    assert held_idx == set(range(50))  # items 0..49 of the held-out seed
    train = task.sample(300, random.Random(1))
    assert not ({r["prompt"] for r in train} & {r["prompt"] for r in held})
    assert task.heldout_seed == task.train_seed + task.train_size  # disjoint Random(seed + i) ranges


def test_sampling_depends_only_on_rng_and_config_is_forwarded():
    a = get_task("rg:chain_sum", config={"min_terms": 2, "max_terms": 2}, heldout_size=5)
    b = get_task("rg:chain_sum", config={"min_terms": 2, "max_terms": 2}, heldout_size=5)
    rows = a.sample(10, random.Random(7))
    assert rows == b.sample(10, random.Random(7))
    assert all(json.loads(r["rg_entry"])["metadata"]["num_terms"] == 2 for r in rows)


def test_unknown_rg_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym dataset 'rg:chain_sums'.*rg:chain_sum"):
        get_task("rg:chain_sums")
