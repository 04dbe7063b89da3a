"""What every benchmark script shares: the offline, quiet environment and the machine's CPU name."""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error",
}


def offline_env(**extra: str) -> None:
    """No hub calls (they hang offline), no tokenizer threads, quiet transformers; set before importing it."""
    for key, value in {**ENV, **extra}.items():
        os.environ.setdefault(key, value)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or ""
