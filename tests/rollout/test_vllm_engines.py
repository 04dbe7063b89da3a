"""The vLLM engines beyond the shared contract (tests/rollout/test_engine_contract.py): the LoRA merge they
send, the rows-to-Rollout assembly, config errors, the server's faults (a bad URL, responses slower than the
timeout, the launched server killed mid-run) and 3 training steps with each engine.

The tests marked `vllm` need vLLM (`make test-vllm` runs them in .vllm-venv); the others run everywhere: the
slow-server test talks to a fake OpenAI-style server on 127.0.0.1 (stdlib http.server), no vLLM needed."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from grpokit.config import ConfigError, ServerConfig, VLLMConfig, load_config
from grpokit.models import make_tiny
from grpokit.rollout import encode_prompts, token_logprobs
from grpokit.rollout.engine import SamplingParams, build_engine
from grpokit.rollout.vllm_engine import (ServerError, adapter_state, check_adapter_only, lora_scalings, merged_weights,
                                         rollout_from_rows, write_adapter)

VLLM_SHAPE = {"hidden_size": 128}  # head size 32: vLLM's CPU attention does not take the tiny model's 24
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.9)


def tiny_prompts(tok) -> list[list[int]]:
    return encode_prompts(tok, ["12+3", "7", "905+1", "4+4"], chat=True)


# ---------------------------------------------------------------------------- no vLLM needed

def test_lora_merge_equals_peft_merge_and_unload() -> None:
    from grpokit.models.lora import apply_lora, merged_copy

    model, _ = make_tiny(seed=0)
    model = apply_lora(model, r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make the merge trivially the base weight
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    scalings = lora_scalings(model)
    assert len(scalings) == 2 * 3 and set(scalings.values()) == {2.0}  # q, v in 3 layers; alpha / r = 8 / 4
    ours = dict(merged_weights(model.state_dict().items(), scalings))
    ref = merged_copy(model).state_dict()
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[q] - model.state_dict()[f"base_model.model.{q[:-len('.weight')]}.base_layer.weight"]).abs().max() > 1e-3
    plain, _ = make_tiny(seed=0)
    assert lora_scalings(plain) == {} and list(merged_weights(iter([("a", torch.ones(1))]), {}))[0][0] == "a"


def test_rows_become_a_padded_rollout() -> None:
    _, tok = make_tiny(seed=0)
    prompts = [[1, 2, 3], [4]]
    ab = tok.convert_tokens_to_ids(["a", "b"])
    eos = tok.eos_token_id
    roll = rollout_from_rows(prompts, [[ab[0], ab[1], eos], [ab[1]]], [[-0.5, -1.0, -0.25], [-2.0]],
                             [True, False], tokenizer=tok, stop_strings=("b",))
    assert roll.prompt_ids.tolist() == [[1, 2, 3], [tok.pad_token_id] * 2 + [4]]
    assert roll.prompt_mask.tolist() == [[True] * 3, [False, False, True]]
    assert roll.response_ids.tolist() == [[ab[0], ab[1], eos], [ab[1], tok.pad_token_id, tok.pad_token_id]]
    assert roll.response_mask.tolist() == [[True, True, True], [True, False, False]]
    assert roll.logprobs.tolist() == [[-0.5, -1.0, -0.25], [-2.0, 0.0, 0.0]]
    assert roll.truncated.tolist() == [False, True]
    assert roll.texts == ["a", ""]  # cut before the stop string; EOS (special) skipped
    with pytest.raises(RuntimeError, match="row 0: 1 tokens but 2 log-probs"):
        rollout_from_rows([[1]], [[5]], [[-1.0, -1.0]], [True], tokenizer=tok, stop_strings=())


def test_server_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"rollout.server.launch = false needs rollout.server.url"):
        load_config(None, ["rollout.engine='vllm_server'", "rollout.server.launch=false"])
    with pytest.raises(ConfigError, match=r"rollout.server.url = 'localhost:8000' must start with http://"):
        load_config(None, ["rollout.engine='vllm_server'", "rollout.server.url='localhost:8000'"])
    with pytest.raises(ConfigError, match=r"rollout.vllm.dtype = 'fp16'"):
        load_config(None, ["rollout.vllm.dtype='fp16'"])
    with pytest.raises(ConfigError, match=r"unknown config field 'rollout.server.ur'; did you mean 'rollout.server.url'"):
        load_config(None, ["rollout.server.ur='http://127.0.0.1:1'"])
    cfg = load_config(None, ["rollout.engine='vllm_server'", "rollout.server.launch=false",
                             "rollout.server.url='http://127.0.0.1:8000'", "rollout.vllm.max_model_len=512"])
    assert cfg.rollout.server.url == "http://127.0.0.1:8000" and cfg.rollout.vllm.max_model_len == 512


def _closed_port() -> int:
    from grpokit.rollout.vllm_engine import free_port

    return free_port()  # bound and released: nothing listens there now


def test_an_unreachable_server_fails_within_seconds_naming_the_url() -> None:
    model, tok = make_tiny(seed=0)
    url = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=rf"no vLLM server answers at {url}/health \(rollout.server.url\): check"):
        build_engine("vllm_server", model, tok, server=ServerConfig(launch=False, url=url))
    assert time.monotonic() - t0 < 10


def fake_token(prompt: list[int], i: int) -> int:
    return 6 + (prompt[-1] + 1 + i) % 90  # a printable character of the tiny vocabulary


class FakeVLLM(BaseHTTPRequestHandler):
    """An OpenAI-style completions server on 127.0.0.1 that answers the n-th completion request after
    `delays[n]` seconds; response token i is `fake_token(prompt, i)`, with log-prob -1 (enough for the client's
    side of the protocol)."""

    delays: list[float] = []  # seconds before answering the n-th completion request (then 0)
    calls: list[str] = []
    bodies: list[tuple[str, object]] = []  # (path, JSON body) of every POST
    adapters: set[str] = set()  # LoRA adapters loaded (/v1/load_lora_adapter); completions for others get 404

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, data) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        try:
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up: what the test provokes

    def _send_text(self, text: str, code: int = 200) -> None:
        raw = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send({})
        elif self.path == "/v1/models":
            self._send({"data": [{"id": "fake"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"null")
        type(self).calls.append(self.path)
        type(self).bodies.append((self.path, body))
        if self.path == "/v1/load_lora_adapter":
            type(self).adapters.add(body["lora_name"])
            self._send_text(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
        elif self.path == "/v1/unload_lora_adapter":
            type(self).adapters.discard(body["lora_name"])
            self._send_text(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")
        elif self.path == "/v1/completions" and body["model"] != "fake" and body["model"] not in type(self).adapters:
            self._send_text(json.dumps({"error": {"message": f"The model `{body['model']}` does not exist."}}), 404)
        elif self.path == "/v1/completions":
            n = sum(p == "/v1/completions" for p in type(self).calls) - 1
            time.sleep(type(self).delays[n] if n < len(type(self).delays) else 0.0)
            ids = [fake_token(body["prompt"], i) for i in range(body["max_tokens"])]
            self._send({"choices": [{"token_ids": ids, "logprobs": {"token_logprobs": [-1.0] * len(ids)},
                                     "finish_reason": "length"}]})
        else:  # /collective_rpc, /reset_prefix_cache
            self._send({"results": [None]})


@pytest.fixture
def fake_server():
    FakeVLLM.delays, FakeVLLM.calls, FakeVLLM.bodies, FakeVLLM.adapters = [], [], [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_requests_slower_than_the_timeout_are_retried_then_fail_clearly(fake_server: str) -> None:
    model, tok = make_tiny(seed=0)
    cfg = ServerConfig(launch=False, url=fake_server, request_timeout_s=0.5, retries=3, concurrency=4)
    engine = build_engine("vllm_server", model, tok, server=cfg)
    assert FakeVLLM.calls == ["/collective_rpc", "/reset_prefix_cache"]  # the policy's weights went out first
    prompts = tiny_prompts(tok)
    # the first two requests (of the first attempt) answer after 2 s: that attempt times out, the retry answers
    FakeVLLM.delays = [2.0, 2.0]
    t0 = time.monotonic()
    roll = engine.generate(prompts, PARAMS, seeds=[0, 1, 2, 3])
    took = time.monotonic() - t0
    assert roll.response_ids.tolist() == [[fake_token(p, i) for i in range(PARAMS.max_new_tokens)] for p in prompts]
    assert roll.response_mask.all() and roll.truncated.all() and (roll.logprobs == -1).all()
    assert sum(p == "/v1/completions" for p in FakeVLLM.calls) >= 5, FakeVLLM.calls  # 4 + at least one retry
    assert 0.5 <= took < 8, took
    # every request slow: 3 attempts with backoff 1 s, 2 s, then an error naming the server and the fix
    FakeVLLM.calls, FakeVLLM.delays = [], [3.0] * 100
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=rf"a rollout batch failed 3 times against the vLLM server at {fake_server}"
                                          r" .*raise rollout.server.request_timeout_s"):
        engine.generate(prompts, PARAMS, seeds=[0, 1, 2, 3])
    assert time.monotonic() - t0 < 20
    engine.close()


def lora_policy(targets=("q_proj", "k_proj", "v_proj", "o_proj"), **shape):
    """The tiny model with rank-4 LoRA (alpha 8) and B drawn at random (B = 0 at init would make the adapter a
    no-op)."""
    from grpokit.models.lora import apply_lora

    model, tok = make_tiny(seed=0, **shape)
    model = apply_lora(model, r=4, alpha=8.0, dropout=0.0, targets=list(targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, tok


def test_the_adapter_written_is_peft_save_pretrained_and_loads_back(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    model, _ = lora_policy()
    model.save_pretrained(str(tmp_path / "peft"))
    ours = adapter_state(model.state_dict().items())
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) == 2 * 4 * 3  # A and B of q, k, v, o in 3 layers
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    config = (tmp_path / "peft" / "adapter_config.json").read_text()
    write_adapter(ours, config, tmp_path / "ours")
    base, tok = make_tiny(seed=0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    ids = torch.tensor([tok.encode("12+3=15")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    assert check_adapter_only(model) == "default"


def test_adapter_sync_refuses_what_an_adapter_cannot_carry() -> None:
    from peft import LoraConfig, get_peft_model

    plain, tok = make_tiny(seed=0)
    with pytest.raises(ValueError, match=r"exactly one PEFT LoRA adapter .* this one has 0: use rollout.vllm.lora_sync = 'merged'"):
        check_adapter_only(plain)
    saved = get_peft_model(make_tiny(seed=0)[0], LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"other parameters train \(e.g. \[.*lm_head.*\]\): the adapter cannot express"):
        check_adapter_only(saved)
    with pytest.raises(ValueError, match=r"exactly one PEFT LoRA adapter"):
        build_engine("vllm_server", plain, tok, vllm=VLLMConfig(lora_sync="adapter"),
                     server=ServerConfig(launch=False, url="http://127.0.0.1:1"))
    with pytest.raises(ConfigError, match=r"rollout.vllm.lora_sync = 'adapter' needs a LoRA policy \(model.lora_r > 0\)"):
        load_config(None, ["rollout.engine='vllm_server'", "rollout.vllm.lora_sync='adapter'"])
    with pytest.raises(ConfigError, match=r"rollout.vllm.lora_sync = 'adapter' needs a LoRA policy"):
        load_config(None, ["rollout.engine='vllm'", "rollout.vllm.lora_sync='adapter'"])
    with pytest.raises(ConfigError, match=r"rollout.vllm.lora_sync = 'adaptor': use 'merged' or 'adapter'"):
        load_config(None, ["rollout.vllm.lora_sync='adaptor'"])
    cfg = load_config(None, ["rollout.engine='vllm_server'", "rollout.vllm.lora_sync='adapter'", "model.lora_r=4"])
    assert cfg.rollout.vllm.lora_sync == "adapter"


def test_adapter_sync_request_sequence(fake_server: str, tmp_path: Path) -> None:
    """Against a fake server: the base weights once, then per sync a new adapter directory, loaded under a new
    versioned name, the one before unloaded and its directory removed; completions name the current adapter;
    an adapter the server does not have is a clear error."""
    from safetensors.torch import load_file

    model, tok = lora_policy()
    cfg = ServerConfig(launch=False, url=fake_server, weights_dir=str(tmp_path / "w"))
    engine = build_engine("vllm_server", model, tok, vllm=VLLMConfig(lora_sync="adapter"), server=cfg)
    v1 = tmp_path / "w" / "lora_v1"
    assert FakeVLLM.calls == ["/collective_rpc", "/v1/load_lora_adapter"]
    assert FakeVLLM.bodies[0][1] == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "w" / "base")}}
    base = load_file(str(tmp_path / "w" / "base" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(base[q], model.state_dict()[f"base_model.model.{q[:-len('.weight')]}.base_layer.weight"])
    assert FakeVLLM.bodies[1][1] == {"lora_name": "policy-v1", "lora_path": str(v1)}
    assert sorted(p.name for p in v1.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((v1 / "adapter_config.json").read_text())["r"] == 4
    prompts = tiny_prompts(tok)
    engine.generate(prompts, PARAMS, seeds=[0, 1, 2, 3])
    assert {b["model"] for p, b in FakeVLLM.bodies if p == "/v1/completions"} == {"policy-v1"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.01)
    FakeVLLM.calls, FakeVLLM.bodies = [], []
    engine.load_weights(model.state_dict().items())
    v2 = tmp_path / "w" / "lora_v2"
    assert FakeVLLM.bodies == [("/v1/load_lora_adapter", {"lora_name": "policy-v2", "lora_path": str(v2)}),
                               ("/v1/unload_lora_adapter", {"lora_name": "policy-v1"})]
    assert not v1.exists() and FakeVLLM.adapters == {"policy-v2"}
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(load_file(str(v2 / "adapter_model.safetensors"))[a],
                       model.state_dict()[a.replace("lora_A.", "lora_A.default.")])
    engine.generate(prompts, PARAMS, seeds=[0, 1, 2, 3])
    assert {b["model"] for p, b in FakeVLLM.bodies if p == "/v1/completions"} == {"policy-v2"}
    FakeVLLM.adapters.clear()  # as if the server lost it
    with pytest.raises(ServerError, match=r"has no LoRA adapter 'policy-v2' \(it answers 404: .*does not exist"):
        engine.generate(prompts, PARAMS, seeds=[0, 1, 2, 3])
    engine.close()


# ---------------------------------------------------------------------------- with vLLM

def teacher_forced(model, roll) -> torch.Tensor:
    with torch.no_grad():
        return token_logprobs(model, roll.input_ids(), roll.attention_mask(), roll.response_ids.shape[1],
                              temperature=PARAMS.temperature)  # [B, T]


@pytest.mark.vllm
def test_a_killed_server_is_restarted_with_the_last_synced_weights() -> None:
    import copy

    model, tok = make_tiny(seed=0, **VLLM_SHAPE)
    engine = build_engine("vllm_server", copy.deepcopy(model), tok, server=ServerConfig(startup_timeout_s=240))
    try:
        assert engine.url.startswith("http://127.0.0.1:")  # bound to the loopback only
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.load_weights(model.state_dict().items())
        prompts, seeds = tiny_prompts(tok) * 2, list(range(8))
        before = engine.generate(prompts, PARAMS, seeds)
        first = engine.server.proc
        os.killpg(first.pid, signal.SIGKILL)  # the server dies mid-run
        first.wait(timeout=30)
        after = engine.generate(prompts, PARAMS, seeds)  # restarted, weights reloaded, call retried
        assert engine.server.proc is not first and engine.server.alive()
        assert torch.equal(before.response_ids, after.response_ids)
        torch.testing.assert_close(after.logprobs, teacher_forced(model, after), atol=4e-5, rtol=0)
    finally:
        proc = engine.server.proc
        engine.close()
    assert proc.poll() is not None, "close() must stop the launched server"


def _length_reward(prompts, completions, **_):
    return [min(len(c), 8) / 8 for c in completions]  # varied from the first step: every group has a signal


@pytest.mark.vllm
@pytest.mark.parametrize("engine,extra", [("vllm", []), ("vllm_server", []),
                                          ("vllm", ["rollout.vllm.lora_sync='adapter'", "model.lora_r=4"]),
                                          ("vllm_server", ["rollout.vllm.lora_sync='adapter'", "model.lora_r=4"])],
                         ids=["vllm", "vllm_server", "vllm-lora-adapter", "vllm_server-lora-adapter"])
def test_three_training_steps(engine: str, extra: list[str], tmp_path: Path) -> None:
    import psutil

    import grpokit
    from safetensors.torch import load_file

    model, tok = make_tiny(seed=0, **VLLM_SHAPE)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    if extra:
        extra = [*extra, f"rollout.server.weights_dir='{tmp_path / 'w'}'"]
    run = grpokit.train(
        None, model=model, tokenizer=tok, dataset="copy2", reward_funcs=[_length_reward],
        overrides=[f"rollout.engine='{engine}'", "model.precision='fp32'", "rollout.prompts_per_step=4", "rollout.group_size=4",
                   "rollout.max_new_tokens=8", "train.steps=3", "train.lr=0.01", "train.micro_batch_size=16",
                   f"train.run_dir='{tmp_path / 'run'}'", "train.progress=false", "train.report=false",
                   "train.tensorboard=false", "data.heldout_size=0", "train.final_eval=false", *extra])
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # every step samples with the weights of the step before: μ from vLLM equals the trainer's ℓ° (a stale
    # engine would be off by the lr-0.01 update, far more than 1e-4)
    assert all(r["mismatch/abs_max"] < 1e-4 for r in rows), [r["mismatch/abs_max"] for r in rows]
    assert all(r["time/weight_sync"] > 0 for r in rows)
    after = load_file(str(Path(run) / "final" / "model.safetensors"))
    assert max(float((after[k] - start[k]).abs().max()) for k in start) > 1e-3, "the policy did not move"
    if extra and engine == "vllm_server":  # adapter mode: only adapters went out, one per sync (the last kept)
        assert [p.name for p in (tmp_path / "w").iterdir()] == ["lora_v4"]
    servers = [p for p in psutil.Process().children(recursive=True) if "vllm.entrypoints" in " ".join(p.cmdline())]
    assert not servers, f"a vLLM server outlived the run: {servers}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launched_process_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """What keeps a launched server from outliving a grpokit killed without cleanup (SIGKILL, timeout's
    SIGTERM): the child gets SIGTERM when its parent dies. Shown with `sleep` in place of the server."""
    import subprocess

    parent = (
        "import os, subprocess, sys\n"
        "from grpokit.rollout.vllm_engine import _own_group_dies_with_parent\n"
        "p = subprocess.Popen(['sleep', '60'], preexec_fn=_own_group_dies_with_parent)\n"
        "print(p.pid, flush=True)\n"
        "os._exit(0)\n"  # no atexit, no finally: as if killed
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60, check=True)
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


@pytest.mark.vllm
def test_adapter_sync_serves_the_lora_policy_across_versions_and_a_restart(tmp_path: Path) -> None:
    """rollout.vllm.lora_sync = 'adapter' on a launched server (one server start for all checks, one restart):
    μ of the hot-loaded adapter equals the trainer's teacher-forced log-probs of the LoRA policy (the engine
    contract's 4e-5) before and after an optimizer step + sync; versions advance, the old one is unloaded;
    a killed server comes back with the current adapter."""
    import copy

    model, tok = lora_policy(**VLLM_SHAPE)
    weights = tmp_path / "w"
    engine = build_engine("vllm_server", copy.deepcopy(model), tok, vllm=VLLMConfig(lora_sync="adapter"),
                          server=ServerConfig(startup_timeout_s=240, weights_dir=str(weights)))
    prompts, seeds = tiny_prompts(tok) * 2, list(range(8))

    def gap(roll, policy) -> float:
        return float(((roll.logprobs - teacher_forced(policy, roll)).abs() * roll.response_mask).max())

    try:
        assert engine.model_name == "policy-v1" and (weights / "lora_v1" / "adapter_model.safetensors").exists()
        first = engine.generate(prompts, PARAMS, seeds)
        assert first.response_mask.sum() > 20
        g1 = gap(first, model)
        assert g1 < 4e-5
        with model.disable_adapter():  # the adapter is applied: the base model's log-probs are far off
            g_base = gap(first, model)
        assert g_base > 0.1
        # an optimizer step on the LoRA weights (lr 0.01), then a sync: a new adapter version
        before = copy.deepcopy(model)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        lp = token_logprobs(model, first.input_ids(), first.attention_mask(), first.response_ids.shape[1],
                            temperature=PARAMS.temperature)
        (-(lp * first.response_mask).sum()).backward()
        opt.step()
        engine.load_weights(model.state_dict().items())
        assert engine.model_name == "policy-v2" and engine.version == 2
        assert not (weights / "lora_v1").exists() and (weights / "lora_v2").exists()
        second = engine.generate(prompts, PARAMS, seeds)
        assert gap(second, model) < 4e-5
        assert gap(second, before) > 1e-3  # a stale adapter would be caught
        # the version before was unloaded: asking for it is a clear error
        engine.model_name = "policy-v1"
        with pytest.raises(ServerError, match=r"has no LoRA adapter 'policy-v1' \(it answers 404: .*does not exist"):
            engine.generate(prompts[:1], PARAMS, seeds[:1])
        engine.model_name = "policy-v2"
        # killed: restarted from the base, the current adapter loaded again under its name
        proc = engine.server.proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        third = engine.generate(prompts, PARAMS, seeds)
        assert engine.server.proc is not proc and engine.model_name == "policy-v2"
        assert torch.equal(third.response_ids, second.response_ids) and gap(third, model) < 4e-5
        print(f"adapter μ vs trainer: v1 {g1:.2e} (base model: {g_base:.2f}), v2 {gap(second, model):.2e} "
              f"(pre-step policy: {gap(second, before):.2e}), after restart {gap(third, model):.2e}")
    finally:
        proc = engine.server.proc
        engine.close()
    assert proc.poll() is not None


@pytest.mark.vllm
def test_in_process_adapter_sync_serves_the_lora_policy_across_versions() -> None:
    """rollout.vllm.lora_sync = 'adapter' with the in-process `vllm` engine (LLM(enable_lora=True), a
    LoRARequest per generate): μ equals the trainer's teacher-forced log-probs of the LoRA policy (4e-5) before
    and after an optimizer step + sync, and a stale adapter would be caught."""
    import copy

    model, tok = lora_policy(**VLLM_SHAPE)
    engine = build_engine("vllm", copy.deepcopy(model), tok, vllm=VLLMConfig(lora_sync="adapter"))
    prompts, seeds = tiny_prompts(tok) * 2, list(range(8))

    def gap(roll, policy) -> float:
        return float(((roll.logprobs - teacher_forced(policy, roll)).abs() * roll.response_mask).max())

    try:
        assert engine.lora_request.lora_name == "policy-v1" and engine.lora_request.lora_int_id == 1
        first = engine.generate(prompts, PARAMS, seeds)
        g1 = gap(first, model)
        with model.disable_adapter():
            g_base = gap(first, model)
        assert g1 < 4e-5 and g_base > 0.1, (g1, g_base)
        before = copy.deepcopy(model)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        lp = token_logprobs(model, first.input_ids(), first.attention_mask(), first.response_ids.shape[1],
                            temperature=PARAMS.temperature)
        (-(lp * first.response_mask).sum()).backward()
        opt.step()
        old_path = Path(engine.lora_request.lora_path)
        engine.load_weights(model.state_dict().items())
        assert engine.lora_request.lora_name == "policy-v2" and engine.lora_request.lora_int_id == 2
        assert not old_path.exists() and engine.llm.llm_engine.list_loras() <= {2}
        second = engine.generate(prompts, PARAMS, seeds)
        g2, g_stale = gap(second, model), gap(second, before)
        assert g2 < 4e-5 and g_stale > 1e-3, (g2, g_stale)
        print(f"in-process adapter μ vs trainer: v1 {g1:.2e} (base model: {g_base:.2f}), v2 {g2:.2e} "
              f"(pre-step policy: {g_stale:.2e})")
    finally:
        engine.close()
