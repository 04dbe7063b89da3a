"""JSONL / Parquet / HF-directory datasets: column mapping, errors, long prompts, held-out splits, resume."""
import json
import random

import pytest

from grpokit.data import get_task

MAP = {"prompt": "question", "answer": "solution"}


def test_jsonl_column_map_keeps_extra_columns(fixtures_dir):
    task = get_task(str(fixtures_dir / "tiny_math.jsonl"), column_map={**MAP, "difficulty": "level"})
    rows = task.sample(20, random.Random(0))
    assert set(rows[0]) == {"prompt", "answer", "difficulty"}  # mapped sources are not duplicated
    assert all(r["prompt"].startswith("Compute ") and "####" in r["answer"] for r in rows)
    assert task.stats["rows"] == 20 and task.stats["heldout"] == 2 and task.stats["train"] == 18


def test_parquet_loads_the_same_rows_as_jsonl(fixtures_dir):
    pq = get_task(str(fixtures_dir / "tiny_math.parquet"), column_map=MAP, heldout_fraction=0.25)
    js = get_task(str(fixtures_dir / "tiny_math.jsonl"), column_map=MAP, heldout_fraction=0.25)
    assert pq.heldout() == js.heldout() and len(pq.heldout()) == 5
    assert pq.sample(15, random.Random(1)) == js.sample(15, random.Random(1))
    assert isinstance(pq.heldout()[0]["level"], int)


def test_malformed_jsonl_names_file_and_line(fixtures_dir):
    path = fixtures_dir / "malformed.jsonl"
    with pytest.raises(ValueError) as e:
        get_task(str(path), column_map=MAP)
    assert f"{path}:3: malformed JSON" in str(e.value) and "fix or delete that line" in str(e.value)


def test_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "p", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object per line, got list"):
        get_task(str(path))


def test_missing_column_names_it_and_the_option(fixtures_dir):
    with pytest.raises(ValueError) as e:
        get_task(str(fixtures_dir / "tiny_math.jsonl"), column_map={"prompt": "question"})
    msg = str(e.value)
    assert "tiny_math.jsonl:1: column 'answer' (for the row's 'answer') not found" in msg
    assert "available columns: question, solution, level" in msg
    assert "column_map" in msg


def _long_file(tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "x" * n, "answer": str(n)} for n in (5, 50, 8, 500, 12, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_long_prompts_are_skipped_and_counted(tmp_path):
    task = get_task(str(_long_file(tmp_path)), max_prompt_chars=20, heldout_fraction=0.0)
    assert task.stats["skipped_long_prompt"] == 2 and task.stats["train"] == 4
    assert all(len(r["prompt"]) <= 20 for r in task.sample(4, random.Random(0)))


def test_long_prompts_raise_when_asked(tmp_path):
    with pytest.raises(ValueError, match=r"long\.jsonl:2: prompt is 50 characters, over max_prompt_chars = 20.*on_long_prompt"):
        get_task(str(_long_file(tmp_path)), max_prompt_chars=20, on_long_prompt="raise")


def test_token_limit_uses_the_tokenizer(tmp_path):
    class WordTokenizer:  # one token per character: stands in for a HF tokenizer
        def encode(self, text, add_special_tokens=False):
            return list(text)

    task = get_task(str(_long_file(tmp_path)), max_prompt_tokens=10, tokenizer=WordTokenizer(), heldout_fraction=0.0)
    assert task.stats["skipped_long_prompt"] == 3
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_task(str(_long_file(tmp_path)), max_prompt_tokens=10)


def test_separate_heldout_file_drops_overlap(tmp_path, fixtures_dir):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"question": "Compute 1 + 2.", "solution": "3"}) + "\n")
    task = get_task(str(fixtures_dir / "tiny_math.jsonl"), column_map=MAP, heldout_path=str(held))
    assert task.heldout() == [{"prompt": "Compute 1 + 2.", "answer": "3"}]
    assert task.stats["dropped_heldout_overlap"] == 1 and task.stats["train"] == 19
    assert "Compute 1 + 2." not in {r["prompt"] for r in task.sample(19, random.Random(0))}


def test_epochs_cover_every_row_and_state_resumes_exactly(fixtures_dir):
    path = str(fixtures_dir / "tiny_math.jsonl")
    task = get_task(path, column_map=MAP)
    rng = random.Random(5)
    epoch = task.sample(18, rng)
    assert len({r["prompt"] for r in epoch}) == 18  # one epoch: each training row once
    task.sample(7, rng)
    state, rng_state = json.loads(json.dumps(task.state_dict())), rng.getstate()
    expected = task.sample(30, rng)
    resumed = get_task(path, column_map=MAP)
    resumed.load_state_dict(state)
    rng2 = random.Random()
    rng2.setstate(rng_state)
    assert resumed.sample(30, rng2) == expected
    other = get_task(path, column_map=MAP, heldout_fraction=0.5)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        other.load_state_dict(state)


def test_hf_local_directory_and_offline_hub_message(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"q": f"question {i}", "a": i} for i in range(6)]),
        "test": datasets.Dataset.from_list([{"q": "held", "a": 0}]),
    }).save_to_disk(str(tmp_path / "ds"))
    task = get_task(f"hf:{tmp_path / 'ds'}", heldout_split="test", column_map={"prompt": "q", "answer": "a"})
    assert task.heldout() == [{"prompt": "held", "answer": "0"}] and task.stats["train"] == 6
    with pytest.raises(RuntimeError) as e:
        get_task("hf:grpokit-test/does-not-exist")
    assert "could not load Hugging Face dataset 'grpokit-test/does-not-exist'" in str(e.value)
    assert "save_to_disk" in str(e.value)
