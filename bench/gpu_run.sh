#!/usr/bin/env bash
# One GPU session's measurements for issue 9, run from the repository root on the device machine:
#   the pinned transformers wheel (carried in .whl/) goes to /tmp/site, then both GPU bench scripts run, most important
#   first; every result is appended to $OUT/*.jsonl as it is measured, so a timeout loses only what had not run.
# SMOKE=1 bash bench/gpu_run.sh runs the same sequence with tiny dims on the CPU (checks the script, not the GPU).
set -uo pipefail
OUT=${OUT:-/tmp/evev2_gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SMOKE_FLAG=${SMOKE:+--smoke}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
cd bench
echo "== train step: ours / official re-creation / dense Qwen2, loss memory"
$PY gpu_train_step.py $SMOKE_FLAG --loss-memory --runs 1.5B:anchor 0.5B:anchor 1.5B:seq4096 \
  --kinds ours official dense --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/train_step.log"
echo "== generate: prefill and decode against dense Qwen2"
$PY gpu_generate.py $SMOKE_FLAG --out "$OUT/generate.jsonl" 2>&1 | tee "$OUT/generate.log"
echo "== train step extras: compiled layers, packed FlexAttention (same machine, same batch)"
$PY gpu_train_step.py $SMOKE_FLAG --runs 1.5B:anchor --kinds ours_compiled ours_packed \
  --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/extras.log"
