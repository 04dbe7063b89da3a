"""get_task dispatch and errors; expand_groups layout."""
import torch
import pytest

from grpokit.data import TASKS, Task, expand_groups, get_task


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_task("arithh")
    msg = str(e.value)
    assert "unknown task 'arithh'" in msg and "did you mean 'arith'" in msg and "rg" in msg and ".jsonl" in msg


def test_unsupported_file_type_and_unknown_option():
    with pytest.raises(ValueError, match=r"only \.jsonl, \.parquet"):
        get_task("data/train.csv")
    with pytest.raises(ValueError, match="unknown option.*'max_digit'.*valid options: .*max_digits"):
        get_task("arith", max_digit=3)


def test_builtins_satisfy_the_task_protocol(fixtures_dir):
    for spec in ("arith", "rg:chain_sum", str(fixtures_dir / "tiny_math.jsonl")):
        opts = {"column_map": {"prompt": "question", "answer": "solution"}} if spec.endswith("jsonl") else {}
        task = get_task(spec, **opts)
        assert isinstance(task, Task) and isinstance(task.name, str)
    assert {"arith", "rg", "jsonl", "parquet", "hf"} <= set(TASKS.names())


def test_expand_groups_repeats_contiguously_with_group_ids():
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "3"}]
    out, gid = expand_groups(rows, 4)
    assert [r["prompt"] for r in out] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert gid.dtype == torch.long and gid.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    out[0]["reward"] = 1.0  # copies: annotating one sample leaves the others alone
    assert "reward" not in out[1] and "reward" not in rows[0]
    with pytest.raises(ValueError, match="positive"):
        expand_groups(rows, 0)
