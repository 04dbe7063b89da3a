"""Rollout throughput: grpokit's KV-cache `Sampler` vs Hugging Face `model.generate`.

Both sample (``do_sample=True``) with the same temperature / top-p / top-k / max_new_tokens from the same
chat-templated prompts, on the same model, under the same autocast. Throughput counts real generated
tokens: for ``generate``, each row's tokens up to and including its first EOS (or all N when it never
ends); for the sampler, ``Rollout.response_mask.sum()``. Runs alternate between the two (A B B A ...) so
that load from other processes hits both alike; the table shows the median over repeats.

    python benchmarks/rollout.py                    # SmolLM2-135M, batches 8,32,64, 64 new tokens
    python benchmarks/rollout.py --quick            # batches 8,32, one repeat
    python benchmarks/rollout.py --model tiny-char --autocast bf16 --batches 8,64
    python benchmarks/rollout.py --model DIR --random-init --device cuda   # a config-only dir, random weights

With ``--random-init`` the weights are random (seed 0), so responses almost never end early: that measures
the engines alone, without the sampler's advantage of dropping finished rows.

``--engines vllm,vllm_server`` adds the vLLM rollout engines as columns (run it with vLLM's interpreter,
``.vllm-venv/bin/python``, see ``make vllm-env``): the same prompts, sampling parameters and precision through
`grpokit.rollout.engine`, one seed per row; the engine is built (and the server started) before timing::

    .vllm-venv/bin/python benchmarks/rollout.py --batches 32 --threads 2 --engines vllm,vllm_server
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import offline_env  # noqa: E402

offline_env()

import torch  # noqa: E402

from grpokit.models import autocast_context, load_model  # noqa: E402
from grpokit.rollout import Sampler, encode_prompts  # noqa: E402

#: A GRPO-like mix: short-answer arithmetic next to open questions, so response lengths are ragged.
PROMPTS = [
    "What is 17 + 25? Answer with just the number.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "If a train travels 60 km in 1.5 hours, what is its average speed in km/h?",
    "Name three primary colors.",
    "Give me a recipe for pancakes.",
    "Is 91 a prime number? Answer yes or no.",
]


def count_generated(new_tokens: torch.Tensor, eos_ids: torch.Tensor) -> int:
    """Real tokens in ``generate``'s output [B, N]: up to and including each row's first EOS."""
    is_eos = torch.isin(new_tokens, eos_ids)  # [B, N]
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # [B, N]: strictly after the first EOS
    return int((~after_eos).sum())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf(model, tokenizer, prompt_ids, args, eos_ids, seed) -> tuple[int, float]:
    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(p[::-1]) for p in prompt_ids], batch_first=True, padding_value=tokenizer.pad_token_id
    ).flip(1)  # [B, P] left-padded
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(len(p), dtype=torch.long) for p in prompt_ids], batch_first=True
    ).flip(1)  # [B, P]
    ids, mask = ids.to(args.device), mask.to(args.device)
    torch.manual_seed(seed)
    sync(args.device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast_context(args.device, args.autocast):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids.tolist(),
        )
    sync(args.device)
    elapsed = time.perf_counter() - start
    return count_generated(out[:, ids.shape[1] :], eos_ids), elapsed


def run_grpokit(sampler, prompt_ids, args, seed) -> tuple[int, float]:
    gen = torch.Generator(device=args.device).manual_seed(seed)
    sync(args.device)
    start = time.perf_counter()
    rollout = sampler.generate(
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        generator=gen,
    )
    sync(args.device)
    elapsed = time.perf_counter() - start
    return int(rollout.response_mask.sum()), elapsed


def run_engine(engine, prompt_ids, args, seed) -> tuple[int, float]:
    """One `RolloutEngine.generate` call (a grpokit engine by name: vllm, vllm_server); tokens and seconds."""
    from grpokit.rollout.engine import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k)
    seeds = [seed * 100_003 + i for i in range(len(prompt_ids))]
    sync(args.device)
    start = time.perf_counter()
    rollout = engine.generate(prompt_ids, params, seeds)
    sync(args.device)
    return int(rollout.response_mask.sum()), time.perf_counter() - start


def random_model(path: str, device: str):
    """A randomly initialised model (seed 0) from a directory holding only config.json and the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grpokit.models import normalize_tokenizer

    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    return model, normalize_tokenizer(AutoTokenizer.from_pretrained(path), model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or local HF directory")
    parser.add_argument("--batches", default="8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--autocast", choices=["fp32", "bf16"], default="fp32", help="same for both samplers")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler and batch size")
    parser.add_argument("--quick", action="store_true", help="batches 8,32 and one repeat")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-init", action="store_true", help="--model is a dir with config + tokenizer only")
    parser.add_argument("--engines", default="", help="extra rollout engines as columns: vllm, vllm_server")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = "8,32", 1
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.random_init:
        model, tokenizer = random_model(args.model, args.device)
    else:
        model, tokenizer = load_model(args.model, device=args.device)
    sampler = Sampler(model, tokenizer, device=args.device, autocast_dtype=args.autocast)
    eos_ids = sampler.eos_ids
    print(
        f"model={args.model} max_new_tokens={args.max_new_tokens} temperature={args.temperature} "
        f"top_p={args.top_p} top_k={args.top_k} autocast={args.autocast} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} device={args.device} random_init={args.random_init} torch={torch.__version__}"
    )
    warm = encode_prompts(tokenizer, PROMPTS[:2])
    run_hf(model, tokenizer, warm, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}), eos_ids, 0)
    run_grpokit(sampler, warm, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}), 0)
    extra = {}  # engine name -> engine
    for name in filter(None, args.engines.split(",")):
        from grpokit.rollout.engine import build_engine

        t0 = time.perf_counter()
        extra[name] = build_engine(name, model, tokenizer, device=args.device, precision=args.autocast)
        run_engine(extra[name], warm, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}), 0)
        print(f"  {name}: built and warmed in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompt_ids = encode_prompts(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(batch)])
        names = ["grpokit", "generate", *extra]
        rates = {n: [] for n in names}
        tokens = {n: [] for n in names}
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                if name == "grpokit":
                    n, sec = run_grpokit(sampler, prompt_ids, args, seed=rep)
                elif name == "generate":
                    n, sec = run_hf(model, tokenizer, prompt_ids, args, eos_ids, seed=rep)
                else:
                    n, sec = run_engine(extra[name], prompt_ids, args, seed=rep)
                rates[name].append(n / sec)
                tokens[name].append(n / batch)
        ours, hf = statistics.median(rates["grpokit"]), statistics.median(rates["generate"])
        mean_len = statistics.mean(tokens["grpokit"]), statistics.mean(tokens["generate"])
        more = [(statistics.median(rates[n]), statistics.mean(tokens[n])) for n in extra]
        rows.append((batch, ours, hf, ours / hf, *mean_len, more))
        print(f"  batch {batch}: grpokit {ours:.1f} tok/s, generate {hf:.1f} tok/s"
              + "".join(f", {n} {r:.1f} tok/s" for n, (r, _) in zip(extra, more)), flush=True)
    for engine in extra.values():
        engine.close()

    print()
    head = "".join(f" {n} tok/s | mean len {n} |" for n in extra)
    print("| batch | grpokit tok/s | generate tok/s | speed-up | mean len grpokit | mean len generate |" + head)
    print("|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(extra))
    for batch, ours, hf, ratio, len_ours, len_hf, more in rows:
        cells = "".join(f" {r:.1f} | {n:.1f} |" for r, n in more)
        print(f"| {batch} | {ours:.1f} | {hf:.1f} | {ratio:.2f}x | {len_ours:.1f} | {len_hf:.1f} |" + cells)


if __name__ == "__main__":
    main()
