"""The SFT stage under torchrun, on 2 gloo processes over 127.0.0.1: N steps with DDP or FSDP2 give the
weights and losses of the same N steps in one process (each rank takes its share of the global batch; the
completion-token count is summed over ranks, SPEC 3). A run that would hang fails by the timeout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "sft_arith.jsonl"
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grpokit.models import make_tiny

    root = tmp_path_factory.mktemp("sft_dist")
    model, tok = make_tiny(seed=0)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return root


def sft(root: Path, run: Path, nproc: int, *extra: str) -> Path:
    sets = [f"model.name={root / 'tiny'}", "model.precision=fp32", f"data.path={DATA}", "data.heldout_fraction=0.05",
            "train.steps=3", "train.batch_size=15", "train.micro_batch_size=4", "train.lr=1e-3", "train.device=cpu",
            "train.threads=1", "train.progress=false", "train.report=false", "train.tensorboard=false",
            f"train.run_dir={run}", *extra]
    args = ["-m", "grpokit", "sft", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(DATA.parents[2]), os.environ.get("PYTHONPATH", "")])}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def logged(run: Path, key: str) -> list[float]:
    return [json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(root: Path) -> Path:
    return sft(root, root / "single", 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    ("ddp", []), ("fsdp2", []), ("fsdp2", ["train.max_tokens_per_microbatch=120", "model.lora_r=4"]),
], ids=["ddp", "fsdp2", "fsdp2-token-budget-lora"])
def test_two_ranks_match_one_process(root: Path, single: Path, strategy: str, extra: list[str]) -> None:
    # batch 15 on 2 ranks: 8 + 7 examples, uneven micro-batch counts; the weight-0 filler keeps them in step
    ref = single if not extra else sft(root, root / "single-lora", 1, *extra)
    run = sft(root, root / f"{strategy}-{len(extra)}", 2, f"dist.strategy={strategy}", *extra)
    got, want = weights(run), weights(ref)
    start = load_file(str(root / "tiny" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 1e-4  # training moved the weights
    # Adam divides by sqrt(v): summation-order noise between layouts moves near-zero-gradient elements
    # visibly; a wrong gradient (a missed reduction, a wrong token count) moves most of them by ~lr = 1e-3
    diffs = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
    assert float(diffs.max()) <= 1e-4 and float((diffs > 1e-5).float().mean()) <= 1e-3
    assert logged(run, "loss") == pytest.approx(logged(ref, "loss"), rel=1e-5)
    # Adam is nearly blind to a gradient's scale, so the weights alone would miss a wrong normalisation
    assert logged(run, "grad_norm") == pytest.approx(logged(ref, "grad_norm"), rel=1e-4)
    ev, ev_ref = (json.loads((r / "eval.json").read_text()) for r in (run, ref))
    assert ev["before"]["loss"] == pytest.approx(ev_ref["before"]["loss"], rel=1e-5)
    assert ev["after"]["loss"] == pytest.approx(ev_ref["after"]["loss"], rel=1e-4)
