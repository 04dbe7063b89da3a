#!/bin/bash
# The GPU checks, one script for one short lease (run it in the repo root on the GPU machine, with .whl and .gpu
# from benchmarks/gpu/prepare.sh carried): versions; hf-engine rollout rates (random weights, SmolLM2-135M and a
# 0.5B shape); the trainer's tests with train.device = auto (cuda there); timed GRPO steps through the CLI on the
# 0.5B shape (plain, then 1-rank FSDP2 on nccl). Results go to $OUT. DEV, BATCHES, NEW, REP, PPS, TNEW, TESTS,
# PYTEST_X, SKIP_ROLLOUT and T (timeout scale) make it rehearsable on a CPU at toy sizes:
#   DEV=cpu PYBIN=.venv/bin/python BATCHES=2 NEW=4 REP=1 PPS=2 TNEW=8 PYTEST_X=" " TESTS=tests/train/test_step.py T=3 \
#     benchmarks/gpu/run.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT
DEV=${DEV:-cuda}; PYBIN=${PYBIN:-python3}
BATCHES=${BATCHES:-32,256}; NEW=${NEW:-128}; REP=${REP:-2}
if [ -d .whl ] && [ "$DEV" = cuda ]; then
  $PYBIN -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3; nproc
  $PYBIN -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee $OUT/env.txt
step() { echo "=== $1 $(date -u +%T)"; }
# 1. rollout rates, hf engine (grpokit Sampler vs model.generate), random weights
[ -n "$SKIP_ROLLOUT" ] || for spec in "smol135 bf16" "qwen05 bf16"; do
  set -- $spec; step "rollout $1 $2"
  timeout $((75*${T:-1})) $PYBIN benchmarks/rollout.py --model .gpu/$1 --random-init --device $DEV --autocast $2 \
    --batches $BATCHES --max-new-tokens $NEW --repeats $REP 2>&1 | grep -v Warning | tee $OUT/rollout_$1_$2.txt
done 2>&1 | tee $OUT/rollout.log
# 2. the trainer's tests with train.device = auto, which is cuda here
step "pytest"
timeout $((200*${T:-1})) $PYBIN -m pytest -q -p no:cacheprovider -m "not slow and not vllm" ${PYTEST_X:--n 8 --timeout 120 -rfE} \
  ${TESTS:-tests/train tests/rollout tests/models tests/test_api.py tests/report tests/pipeline} 2>&1 | tee $OUT/pytest_full.txt | tail -40
# 3. timed GRPO steps through the CLI on a random-weight 0.5B-shape model (reward 0: timing, not learning)
step "save random weights"
$PYBIN - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
for name in ("qwen05",):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f".gpu/{name}"))
    m.save_pretrained(f"/tmp/{name}w"); AutoTokenizer.from_pretrained(f".gpu/{name}").save_pretrained(f"/tmp/{name}w")
PY
COMMON="--set rollout.prompts_per_step=${PPS:-16} --set rollout.group_size=8 --set rollout.max_new_tokens=${TNEW:-256} --set rollout.stop_strings=[] --set train.steps=3 --set train.micro_batch_size=32 --set data.heldout_size=0 --set train.final_eval=false --set train.progress=false --set train.report=false --set train.device=$DEV"
for spec in "qwen05 auto none" "qwen05 auto fsdp2"; do
  set -- $spec; step "train $1 $2 $3"; run=/tmp/run_$1_$3
  if [ $3 = fsdp2 ]; then L="$PYBIN -m torch.distributed.run --nproc_per_node 1 -m grpokit"; else L="$PYBIN -m grpokit"; fi
  timeout $((100*${T:-1})) $L train grpo $COMMON --set model.name=/tmp/$1w --set model.precision=$2 --set dist.strategy=$3 --set train.run_dir=$run 2>&1 | tee $OUT/trainlog_$1_$3.txt | tail -8
  $PYBIN -c "
import json,sys
for l in open('$run/metrics.jsonl'):
    r=json.loads(l); print({k: (round(v,4) if isinstance(v,float) else v) for k,v in r.items() if k.startswith(('step','time/','len/mean','correction/weight/mean','mem','tok'))})
" 2>&1 | tee $OUT/train_$1_$3.txt
done 2>&1 | tee $OUT/train.log
step done
