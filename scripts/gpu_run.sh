#!/usr/bin/env bash
# The whole GPU check of the streamed pipeline, as one script for a lent device (15 minutes in all).
#
#   bash scripts/gpu_run.sh            # on the device: results under $OUT (or ./gpu_out)
#   PYTHON=.venv/bin/python OUT=/tmp/g bash scripts/gpu_run.sh --dry   # the same steps on the CPU, toy sizes
#
# Steps, most important first, each under its own time limit so that one slow step cannot eat the
# others' time (a step that runs out leaves a line in steps.txt and the rest go on); the limits and
# their 10 s grace add up to under the device's 600 s per command (GNU `timeout` needed):
#   1. the machine (nvidia-smi, torch), then the CUDA tests (`pytest -m gpu`) when pytest is there;
#   2. benchmarks/llm_scale.py on random-init Llama-3-8B blocks (2 blocks, 128 x 2048 tokens): the
#      reference structure and SparseGPT (seconds per block with the breakdown, peak memory,
#      projected minutes for 32 layers);
#   3. ALPS + Trace on one such block;
#   4. benchmarks/alps_parts.py: where ALPS's time goes on each Llama-3-8B linear shape (eigh,
#      resolvents, ADMM products, the mask selection against torch.kthvalue, updates, CG);
#   5. auto on one block (the per-block figures);
#   6. benchmarks/sparse_speed.py: 2:4 kernels against dense on the Llama-3-8B linear shapes.
# Weights never travel: everything is random-init of real shapes. The library is imported from
# this checkout (PYTHONPATH), so nothing needs installing beyond torch / transformers / lightning.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the device's Python; PYTHON=.venv/bin/python here

if [ "${1:-}" = "--dry" ]; then
  DRY=1; DEV=cpu; SIZE=(--scale 0.03 --tokens 4x64); LIMITS=(0 60 60 60 60 60); SPEED=(--fast); PARTS=(--fast)
else
  DRY=0; DEV=cuda; SIZE=(--tokens 128x2048); LIMITS=(45 130 120 75 80 40); SPEED=(); PARTS=(--repeats 1)
fi

step() {  # step NAME LIMIT COMMAND...: run, time, record the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0)) limit=$limit" | tee -a "$OUT/steps.txt"
}

: > "$OUT/steps.txt"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$PY" -c "import torch, transformers; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"; } > "$OUT/machine.txt" 2>&1
if [ "$DRY" = 0 ] && "$PY" -c "import pytest" 2>/dev/null; then
  step tests_gpu "${LIMITS[0]}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
fi
SCALE=("$PY" benchmarks/llm_scale.py --device "$DEV" --config llama3-8b "${SIZE[@]}")
step llm_scale_sparsegpt "${LIMITS[1]}" "${SCALE[@]}" --blocks 2 --methods reference sparsegpt \
  --out "$OUT/llm_scale_sparsegpt"
step llm_scale_alps_trace "${LIMITS[2]}" "${SCALE[@]}" --blocks 1 --methods alps+trace --out "$OUT/llm_scale_alps_trace"
step alps_parts "${LIMITS[3]}" "$PY" benchmarks/alps_parts.py --device "$DEV" "${PARTS[@]}" --out "$OUT/alps_parts"
step llm_scale_auto "${LIMITS[4]}" "${SCALE[@]}" --blocks 1 --methods auto --out "$OUT/llm_scale_auto"
step sparse_speed "${LIMITS[5]}" "$PY" benchmarks/sparse_speed.py --device "$DEV" ${SPEED[@]+"${SPEED[@]}"} --out "$OUT/sparse_speed"
cat "$OUT/steps.txt"
! grep -qv " rc=0 " "$OUT/steps.txt"  # the script's status: every step ran to the end
