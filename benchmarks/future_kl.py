"""Future-KL scan benchmark: grpokit's blocked scan vs the FIPO paper's chunked triangular matmul
vs a plain reverse loop, for F_t = x_t + γ·F_{t+1} (SPEC section 6).

    python benchmarks/future_kl.py            # full table (a few minutes on a 2-core CPU)
    python benchmarks/future_kl.py --quick    # B=8 only, fewer repetitions

Methods: the blocked scan (grpokit.algo.scan, O(B·T·K)); the paper's chunked triangular matmul with
K=128 (official `compute_policy_loss_future_kl`: the decay block is rebuilt for every chunk; here
only against later positions, which halves the paper's work), O(B·T²); the same with the decay
matrix built once and sliced ("decay hoisted", the best case for the matmul form); and the
recursion as a Python loop over T, vectorised over B.

Reports per method: median wall time, peak memory, and the max relative difference to a float64
reference, max|F − F64| / max|F64| over the batch (F64: the recursion run in float64).

Peak memory is measured, not estimated, in a fresh child process per cell (so that no heap state
is shared): glibc's mmap and trim thresholds are pinned to 64 KiB through MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ (torch's CPU allocator does not cache, so every tensor above 64 KiB is mapped
on allocation and unmapped on free); the child builds the input, runs the method once to warm up,
resets the peak resident set size (VmHWM) through /proc/self/clear_refs, runs it again and reports
VmHWM − VmRSS(before): what one call adds at its peak, output included.

Timings on a shared machine are noisy; the default is one torch thread, because on a 2-core box
shared with other jobs two OpenMP threads mostly wait for each other.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpokit.algo.scan import DEFAULT_BLOCK, discounted_reverse_cumsum, gamma_from_half_life  # noqa: E402

PAPER_CHUNK = 128  # the FIPO official code's chunk_size
LOOP_BUDGET_S = 60.0  # skip a loop configuration whose estimated single run exceeds this
WARMUP_BELOW_S = 2.0  # warm up (and repeat) only methods whose single run is cheaper than this
MALLOC_PIN = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
METHODS = {  # key -> table label
    "scan": "blocked scan (ours)",
    "paper": f"chunked matmul (paper, K={PAPER_CHUNK})",
    "hoisted": "chunked matmul, decay hoisted",
    "loop": "reverse loop over T",
}


def chunked_matmul(x: torch.Tensor, gamma: float, chunk: int = PAPER_CHUNK) -> torch.Tensor:
    """The paper's form: for each output chunk, multiply all later positions by the decay matrix.

    out[:, s:e] = x[:, s:] @ D, D[k, t] = γ^(k−t) for k ≥ t (γ powers in float32, as the official
    code does in the model dtype). O(B·T²) time, O(B·T + T·chunk) memory. Shapes: [B,T] -> [B,T].
    """
    b, t = x.shape
    out = torch.empty_like(x)  # [B,T]
    gamma_t = torch.tensor(gamma, dtype=x.dtype)
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        dist = torch.arange(s, t)[:, None] - torch.arange(s, e)[None, :]  # [T−s, K] k − t
        decay = torch.pow(gamma_t, dist.clamp(min=0).to(x.dtype)) * (dist >= 0).to(x.dtype)  # [T−s, K]
        out[:, s:e] = x[:, s:] @ decay  # [B,K]
    return out


def chunked_matmul_hoisted(x: torch.Tensor, gamma: float, chunk: int = PAPER_CHUNK) -> torch.Tensor:
    """As `chunked_matmul`, but D depends only on k − t, so one [T, chunk] block is built and sliced."""
    b, t = x.shape
    out = torch.empty_like(x)  # [B,T]
    k = min(chunk, t)
    dist = torch.arange(t)[:, None] - torch.arange(k)[None, :]  # [T,K]
    decay = torch.pow(torch.tensor(gamma, dtype=x.dtype), dist.clamp(min=0).to(x.dtype)) * (dist >= 0).to(x.dtype)
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        out[:, s:e] = x[:, s:] @ decay[: t - s, : e - s]  # [B,K]
    return out


def reverse_loop(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The recursion as a Python loop over T, vectorised over B. Shapes: [B,T] -> [B,T]."""
    out = torch.empty_like(x)  # [B,T]
    carry = torch.zeros(x.shape[0], dtype=x.dtype)  # [B]
    for t in range(x.shape[1] - 1, -1, -1):
        carry = x[:, t] + gamma * carry  # [B]
        out[:, t] = carry
    return out


def method(key: str, x: torch.Tensor, gamma: float) -> Callable[[], torch.Tensor]:
    fns = {"scan": discounted_reverse_cumsum, "paper": chunked_matmul, "hoisted": chunked_matmul_hoisted,
           "loop": reverse_loop}
    return lambda: fns[key](x, gamma)


def make_input(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, generator=torch.Generator().manual_seed(b * t))  # [B,T] f32


def median_time(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, int, torch.Tensor]:
    """(median wall time over `reps` runs after a warm-up, runs, output); one cold run if it is slow."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if first > WARMUP_BELOW_S:
        return first, 1, out
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps, out


def rel_diff(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((out.double() - ref64).abs().max() / ref64.abs().max())


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def child_peak_mem(key: str, b: int, t: int, gamma: float) -> None:
    """In the child: print the peak resident memory one call of `key` adds, in KiB."""
    fn = method(key, make_input(b, t), gamma)
    fn()  # warm-up: one-time buffers (BLAS, OpenMP) are not the method's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    out = fn()
    print(_status_kb("VmHWM") - before)
    del out


def peak_mem_mib(key: str, b: int, t: int, gamma: float, threads: int) -> float:
    cmd = [sys.executable, __file__, "--child-mem", key, str(b), str(t), str(gamma), "--threads", str(threads)]
    res = subprocess.run(cmd, env={**os.environ, **MALLOC_PIN}, capture_output=True, text=True)
    return int(res.stdout.strip()) / 1024 if res.returncode == 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B=8 only and fewer repetitions")
    ap.add_argument("--tau", type=float, default=32.0, help="half-life in tokens (FIPO default 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see the docstring)")
    ap.add_argument("--child-mem", nargs=4, metavar=("METHOD", "B", "T", "GAMMA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_mem:
        key, b, t, gamma = args.child_mem
        child_peak_mem(key, int(b), int(t), float(gamma))
        return
    gamma = gamma_from_half_life(args.tau)
    configs = [(b, t) for b in ([8] if args.quick else [8, 64]) for t in (1024, 8192, 20480)]
    reps = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
          f"thread(s); tau={args.tau} (gamma={gamma:.6f}); scan block K={DEFAULT_BLOCK}, paper chunk={PAPER_CHUNK}")
    print()
    print("| B | T | method | median time | time / scan | peak mem | max rel diff vs f64 |")
    print("|---|---|---|---|---|---|---|", flush=True)
    loop_per_step = None
    for b, t in configs:
        x = make_input(b, t)  # [B,T] f32
        ref64 = reverse_loop(x.double(), gamma)  # [B,T] f64
        scan_sec = None
        for key, label in METHODS.items():
            if key == "loop" and loop_per_step is not None and loop_per_step * t > LOOP_BUDGET_S:
                print(f"| {b} | {t} | {label} | skipped (est. {loop_per_step * t:.0f} s) | | | |", flush=True)
                continue
            sec, n, out = median_time(method(key, x, gamma), reps)
            if key == "loop" and loop_per_step is None:
                loop_per_step = sec / t
            scan_sec = scan_sec or sec
            mem = peak_mem_mib(key, b, t, gamma, args.threads)
            print(f"| {b} | {t} | {label} | {sec * 1e3:.2f} ms (n={n}) | {sec / scan_sec:.1f}x | {mem:.1f} MiB | "
                  f"{rel_diff(out, ref64):.1e} |", flush=True)
    print()

    b, t = (8, 20480) if args.quick else (64, 20480)
    x = make_input(b, t)
    print(f"Scan block size K (B={b}, T={t}, median of {reps}):")
    for k in (16, 32, 64, 128, 256):
        sec, _, _ = median_time(lambda: discounted_reverse_cumsum(x, gamma, block=k), reps)
        print(f"  K={k:4d}: {sec * 1e3:.2f} ms")
    print()
    x = torch.randn(2, 131072, generator=torch.Generator().manual_seed(2))
    out = discounted_reverse_cumsum(x, gamma)
    ok = bool(torch.isfinite(out).all())
    print(f"T=131072, tau={args.tau}, B=2: output finite: {ok}; max rel diff vs f64 = "
          f"{rel_diff(out, reverse_loop(x.double(), gamma)):.1e}")
    steps = torch.arange(131072.0)
    naive = torch.cumsum(x * gamma**-steps, -1) * gamma**steps
    print(f"  (for contrast, the naive cumsum(x*gamma^-t)*gamma^t is finite: {bool(torch.isfinite(naive).all())})")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
