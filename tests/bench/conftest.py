"""The benchmark scripts, imported as modules for their tests (benchmarks/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(filename: str) -> ModuleType:
    """benchmarks/<filename> as a module named grpokit_bench_<stem> (registered in sys.modules first, as a
    dataclass defined in it needs)."""
    spec = importlib.util.spec_from_file_location(f"grpokit_bench_{Path(filename).stem}", BENCHMARKS / filename)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("algorithms.py")


@pytest.fixture(scope="module")
def vs_trl() -> ModuleType:
    return load_benchmark("vs_trl.py")
