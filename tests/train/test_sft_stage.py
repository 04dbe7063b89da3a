"""The SFT stage (SPEC 10, stage 1): completion-only loss, packing without cross-attention, the global token
mean (SPEC 3), exact resume, final/ in HF format, config typos, data errors, the CLI.

Data: tests/fixtures/sft_arith.jsonl, 400 rows "What is 59+63?" -> "59+63=122. The answer is 122."
(a + or - of two numbers in 10..99, drawn by random.Random(0), no repeats).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpokit.config import ConfigError
from grpokit.models import make_tiny
from grpokit.rollout import encode_prompts
from grpokit.train.sft_config import load_sft_config
from grpokit.train.sft_data import (
    DataOrder, SFTDataError, build_rows, can_pack, collate_packed, collate_padded, plan_micro, read_records, tokenize,
)
from grpokit.train.sft_stage import completion_nll, run_sft, setup_sft, sft_step

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures" / "sft_arith.jsonl"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg_for(run_dir: Path, *extra: str, steps: int = 6):
    return load_sft_config(None, [
        "model.name=tiny-char", "model.precision=fp32", f"data.path={DATA}", f"train.steps={steps}",
        "train.batch_size=16", "train.micro_batch_size=5", "train.lr=3e-3", "train.device=cpu",
        "train.progress=false", "train.tensorboard=false", "train.report=false", f"train.run_dir={run_dir}", *extra,
    ])


def rows(n: int = 12) -> list[dict[str, str]]:
    return build_rows(read_records(str(DATA)))[:n]


def examples(n: int = 12):
    _, tok = make_tiny(seed=0)
    return tokenize(tok, rows(n))[0], tok


# ---------------------------------------------------------------------------- masking and packing

def test_loss_mask_covers_exactly_the_completion_and_eos() -> None:
    exs, tok = examples(3)
    prompts = encode_prompts(tok, [r["prompt"] for r in rows(3)])  # the rollout template
    for ex, r, p in zip(exs, rows(3), prompts):
        assert list(ex.ids[: ex.n_prompt]) == p
        b = collate_padded([ex], tok.pad_token_id)
        targets = b.targets[0][b.loss_mask[0]].tolist()
        assert targets == tok.encode(r["completion"], add_special_tokens=False) + [tok.eos_token_id]
        assert tok.decode(targets[:-1]) == r["completion"]


def test_prompt_targets_get_no_loss_and_no_gradient() -> None:
    """Changing the target of a prompt (or chat-template) position leaves loss and gradients bit-identical;
    changing a completion target changes the loss (so the check can fail)."""
    model, tok = make_tiny(seed=0)
    exs, _ = tokenize(tok, rows(4))
    batch = collate_padded(exs, tok.pad_token_id)

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        nll, n = completion_nll(model, b)
        (nll / n).backward()
        return nll.detach().clone(), [p.grad.clone() for p in model.parameters()]

    base, g0 = loss_and_grads(batch)
    prompt_pos = (~batch.loss_mask).nonzero()
    assert len(prompt_pos) > 4 * 10  # the chat template alone is more than 10 tokens per row
    changed = collate_padded(exs, tok.pad_token_id)
    changed.targets[~batch.loss_mask] = (changed.targets[~batch.loss_mask] + 7) % len(tok)
    loss2, g2 = loss_and_grads(changed)
    assert torch.equal(base, loss2) and all(torch.equal(a, b) for a, b in zip(g0, g2))
    comp = collate_padded(exs, tok.pad_token_id)
    i, j = batch.loss_mask.nonzero()[0].tolist()
    comp.targets[i, j] = (comp.targets[i, j] + 7) % len(tok)
    assert abs(float(loss_and_grads(comp)[0]) - float(base)) > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_unpacked_loss_and_gradients(impl: str) -> None:
    model, tok = make_tiny(seed=0)
    model.config._attn_implementation = impl
    exs, _ = tokenize(tok, rows(7))
    assert len({len(e) for e in exs}) > 1  # ragged lengths
    mask_dtype = None if impl == "sdpa" else torch.float32
    results = []
    for batch in (collate_padded(exs, tok.pad_token_id), collate_packed(exs, mask_dtype)):
        model.zero_grad(set_to_none=True)
        nll, n = completion_nll(model, batch)
        (nll / n).backward()
        results.append((float(nll.detach() / n), int(n), [p.grad.clone() for p in model.parameters()]))
    (lu, nu, gu), (lp, np_, gp) = results
    assert results[1][0] != 0 and nu == np_ == sum(e.n_target for e in exs)
    assert lp == pytest.approx(lu, abs=1e-5)
    for a, b in zip(gu, gp):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_packed_mask_blocks_attention_across_examples() -> None:
    """Position ids restart per example, and changing example 0's tokens leaves example 1's loss unchanged."""
    model, tok = make_tiny(seed=0)
    exs, _ = tokenize(tok, rows(2))
    b = collate_packed(exs)
    L0 = len(exs[0])
    assert b.position_ids[0, L0].item() == 0 and b.position_ids[0, L0 - 1].item() == L0 - 1
    assert not b.attention_mask[0, 0, L0:, :L0].any()  # example 1 never sees example 0

    def loss_of_second(batch):
        keep = batch.loss_mask.clone()
        keep[0, :L0] = False
        batch.loss_mask = keep
        return float(completion_nll(model, batch)[0])

    with torch.no_grad():
        before = loss_of_second(collate_packed(exs))
        other = collate_packed(exs)
        other.input_ids[0, 3:L0 - 1] = (other.input_ids[0, 3:L0 - 1] + 5) % len(tok)
        assert loss_of_second(other) == pytest.approx(before, abs=1e-6)


def test_attention_without_4d_masks_trains_padded() -> None:
    class Cfg:
        _attn_implementation = "flash_attention_2"

    class M(torch.nn.Module):
        config = Cfg()

    assert not can_pack(M())
    assert can_pack(make_tiny(seed=0)[0])


def test_micro_batch_plans() -> None:
    assert plan_micro([5, 5, 5, 5, 5], micro_batch_size=2, packed=True) == [[0, 1], [2, 3], [4]]
    assert plan_micro([4, 6, 3, 9], micro_batch_size=1, max_tokens=12, packed=True) == [[0, 1], [2, 3]]
    assert plan_micro([4, 6, 3, 9], micro_batch_size=1, max_tokens=12, packed=False) == [[0, 1], [2], [3]]
    assert plan_micro([20, 3], micro_batch_size=1, max_tokens=12, packed=True) == [[0], [1]]


@pytest.mark.parametrize("micro", [
    ["train.micro_batch_size=1"], ["train.micro_batch_size=16"], ["train.max_tokens_per_microbatch=150"],
    ["train.pack=false", "train.micro_batch_size=3"], ["train.pack=false", "train.max_tokens_per_microbatch=200"],
], ids=["one-per-micro", "one-micro", "token-budget", "padded", "padded-token-budget"])
def test_step_gradient_does_not_depend_on_the_micro_batch_split(tmp_path: Path, micro: list[str]) -> None:
    """SPEC 3: the token mean over the whole optimizer batch, whatever the micro-batches."""
    def grads(extra: list[str], name: str):
        ctx = setup_sft(cfg_for(tmp_path / name, "train.grad_clip=0", *extra, steps=1))
        m = sft_step(ctx)
        return m, [p.grad.clone() for p in ctx.optimizer.param_groups[0]["params"]]

    m0, g0 = grads(["train.micro_batch_size=5"], "ref")
    m1, g1 = grads(micro, "other")
    assert m1["micro_batches"] != m0["micro_batches"] or "train.pack=false" in micro
    assert m1["loss"] == pytest.approx(m0["loss"], abs=1e-5)
    assert m1["tokens/completion"] == m0["tokens/completion"]
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- the stage

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_run_directory_is_complete(tmp_path: Path) -> None:
    run = run_sft(cfg_for(tmp_path / "run", "data.heldout_fraction=0.1", "train.report=true",
                          "train.warmup_steps=2", steps=12))
    rows_ = metrics(run)
    assert [r["step"] for r in rows_] == list(range(1, 13))
    first, last = rows_[0]["loss"], sum(r["loss"] for r in rows_[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["after"]["loss"] < 0.5 * ev["before"]["loss"] and ev["before"]["n"] == 40
    assert rows_[-1]["eval/loss"] == pytest.approx(ev["after"]["loss"])
    assert rows_[0]["lr"] == pytest.approx(1.5e-3) and rows_[1]["lr"] == pytest.approx(3e-3)  # warm-up
    assert all(r["tokens/completion"] > 0 and r["tokens/total"] > r["tokens/completion"] for r in rows_)
    page = (run / "report.html").read_text()
    assert 'id="plot-loss"' in page and 'id="plot-grad_norm"' in page and 'id="plot-lr"' in page
    assert (run / "config.toml").exists() and (run / "checkpoints").is_dir()
    assert load_sft_config(run / "config.toml").train.steps == 12  # the saved config loads back


def test_final_loads_with_automodel_and_matches_the_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_sft(cfg_for(tmp_path / "run", steps=2))
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    AutoTokenizer.from_pretrained(run / "final")
    saved = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    start = make_tiny(seed=0)[0].state_dict()
    assert any(not torch.equal(start[k], saved[k]) for k in saved)


def test_lora_final_is_merged(tmp_path: Path) -> None:
    """final/ of a LoRA run is a plain model whose logits equal the adapted model's."""
    from transformers import AutoModelForCausalLM

    from grpokit.models.lora import apply_lora

    run = run_sft(cfg_for(tmp_path / "run", "model.lora_r=4", "model.lora_targets=['q_proj', 'v_proj']", steps=3))
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    assert not any("lora" in k for k in merged.state_dict())
    adapted = apply_lora(make_tiny(seed=0)[0], r=4, targets=["q_proj", "v_proj"])
    adapted.load_state_dict(load_file(str(run / "checkpoints" / "step_000003" / "model.safetensors")))
    assert any(float(v.abs().max()) > 0 for k, v in adapted.state_dict().items() if "lora_B" in k)  # trained
    ids = torch.tensor([[7, 30, 31, 40, 50, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["model.lora_r=4", "model.lora_dropout=0.2", "train.lr_schedule=cosine"]],
                         ids=["full", "lora-dropout-cosine"])
def test_resume_is_exact(tmp_path: Path, extra: list[str]) -> None:
    """N steps, then resumed to 2N, gives bit-identical final weights and the same metrics as 2N at once.
    (The cosine schedule is set by train.steps, so with it the first part is stopped with save_every
    instead: a kill after a checkpoint.)"""
    N = 3
    common = ["train.warmup_steps=2", *extra]
    data = rows(40)  # 2 N x 16 > 40 rows: the order crosses an epoch boundary
    whole = run_sft(cfg_for(tmp_path / "whole", *common, steps=2 * N), data=data)
    if "train.lr_schedule=cosine" in extra:
        part = run_sft(cfg_for(tmp_path / "part", *common, f"train.save_every={N}", "train.keep_last=5", steps=2 * N), data=data)
        ckpt_dir = part / "checkpoints" / f"step_{N:06d}"
        part = tmp_path / "killed"
        (part / "checkpoints").mkdir(parents=True)
        os.rename(ckpt_dir, part / "checkpoints" / ckpt_dir.name)
        (part / "config.toml").write_text((tmp_path / "part" / "config.toml").read_text())
        (part / "metrics.jsonl").write_text((tmp_path / "part" / "metrics.jsonl").read_text())  # steps > N are dropped
    else:
        part = run_sft(cfg_for(tmp_path / "part", *common, steps=N), data=data)
    resumed = run_sft(cfg_for(part, *common, steps=2 * N), resume=part, data=data)
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def strip(rows_):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows_]

    assert strip(metrics(resumed)) == strip(metrics(whole))
    assert metrics(whole)[-1]["epoch"] > 1  # the order crossed an epoch boundary


def test_in_memory_rows_and_dataset(tmp_path: Path) -> None:
    import datasets

    data = [{"q": r["prompt"], "a": r["completion"]} for r in rows(40)]
    cfg = cfg_for(tmp_path / "a", "data.column_map={prompt = 'q', completion = 'a'}", steps=2)
    m1 = metrics(run_sft(cfg, data=data))
    cfg = cfg_for(tmp_path / "b", "data.column_map={prompt = 'q', completion = 'a'}", steps=2)
    m2 = metrics(run_sft(cfg, data=datasets.Dataset.from_list(data)))
    assert [r["loss"] for r in m1] == [r["loss"] for r in m2]


# ---------------------------------------------------------------------------- errors

def test_a_typo_names_the_nearest_field() -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.micro_batch_size'"):
        load_sft_config(None, ["train.micro_batch_szie=2"])
    with pytest.raises(ConfigError, match="did you mean 'data.column_map'"):
        load_sft_config(None, ["data.colum_map={prompt = 'q'}"])
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_sft_config(None, ["train.lr_schedule=linear"])


def test_a_malformed_row_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:3: malformed JSON"):
        run_sft(cfg_for(tmp_path / "run", f"data.path={bad}"))
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "answer": "d"}\n')
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:2: column 'completion'.*column_map = \{completion = \"answer\"\}"):
        run_sft(cfg_for(tmp_path / "run", f"data.path={bad}"))
    bad.write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:1: completion .* must be a string"):
        run_sft(cfg_for(tmp_path / "run", f"data.path={bad}"))
    with pytest.raises(SFTDataError, match="not found"):
        run_sft(cfg_for(tmp_path / "run", f"data.path={tmp_path / 'nope.jsonl'}"))


def test_too_long_rows_are_skipped_or_named(tmp_path: Path) -> None:
    _, tok = make_tiny(seed=0)
    exs, skipped = tokenize(tok, rows(10), max_length=60)
    assert skipped > 0 and all(len(e) <= 60 for e in exs) and len(exs) + skipped == 10
    with pytest.raises(SFTDataError, match="row 0: .* over data.max_length = 10"):
        tokenize(tok, rows(10), max_length=10, on_too_long="raise")


def test_data_order_resumes_exactly() -> None:
    a = DataOrder(7, seed=3)
    a.take(5)
    b = DataOrder(7, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.take(4) for _ in range(5)] == [b.take(4) for _ in range(5)]
    assert sorted(DataOrder(7, seed=0).take(7)) == list(range(7))  # an epoch is a permutation


# ---------------------------------------------------------------------------- CLI and recipes

def test_cli_help_typo_and_bundled_recipes(capsys: pytest.CaptureFixture) -> None:
    from grpokit.cli import main, resolve_sft_recipe

    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train.micro_batch_size" in out and "data.column_map" in out and "--resume" in out
    assert main(["sft", "demo", "--set", "train.setps=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    recipes = sorted((ROOT / "recipes" / "sft").glob("*.toml"))
    assert recipes and resolve_sft_recipe("demo") == ROOT / "recipes" / "sft" / "demo.toml"
    for path in recipes:
        cfg = load_sft_config(path)
        assert Path(cfg.data.path).is_absolute() or (ROOT / cfg.data.path).exists()


def test_cli_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from grpokit.cli import main

    args = ["--set", "model.name=tiny-char", "--set", "train.steps=2", "--set", f"train.run_dir={tmp_path / 'r'}",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.device=cpu",
            "--set", "model.precision=fp32", "--set", "train.save_every=0"]
    assert main(["sft", "demo", *args]) == 0
    capsys.readouterr()
    assert main(["sft", "demo", *args[:2], "--set", "train.steps=3", *args[4:], "--resume", str(tmp_path / "r")]) == 0
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2, 3]
    capsys.readouterr()
    assert main(["sft", "demo", *args, "--set", f"data.path={tmp_path / 'missing.jsonl'}"]) == 2
    assert main(["sft", "no_such_recipe"]) == 2
    assert main(["sft", "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("grpokit: error: ") for line in err), err


def test_gradient_checkpointing_recomputes_and_keeps_the_gradient(tmp_path: Path) -> None:
    """model.gradient_checkpointing = true acts (the model trains in train mode) and changes no number."""
    def run(extra: list[str], name: str):
        ctx = setup_sft(cfg_for(tmp_path / name, "train.grad_clip=0", *extra, steps=1))
        assert ctx.base.training
        calls = []
        mlp = ctx.base.model.layers[0].mlp  # inside the checkpointed forward (module hooks skip the recompute)
        forward = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        m = sft_step(ctx)
        return m, [p.grad.clone() for p in ctx.optimizer.param_groups[0]["params"]], len(calls)

    m0, g0, n0 = run([], "plain")
    m1, g1, n1 = run(["model.gradient_checkpointing=true"], "ckpt")
    assert n1 == 2 * n0  # every micro-batch's layer forward ran again in the backward pass
    assert m1["loss"] == pytest.approx(m0["loss"], abs=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
