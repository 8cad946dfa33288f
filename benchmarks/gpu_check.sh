#!/usr/bin/env bash
# GPU check (issue 16): the CUDA paths end to end on one GPU, in under 8 minutes on a modern GPU (H200).
#
#   1. env          CUDA visible? GPU name, compute capability, autocast dtype (stops here without a GPU)
#   2. demo         `agentic-pruner run --device cuda --no-latency`: the demo flow (embedded digits ResNet-18,
#                   50 % MACs) without its latency step; every fine-tuned history record and the final model
#                   must say CUDA
#   3. latency      paper Table 3 rows for ResNet-50 @ 2.06 G MACs: onnxruntime CPU bs 8 and the
#                   torch.compile GPU columns at batch 256 (random init: latency does not need weights)
#   4. train-step   one ImageNet-shaped inline fine-tuning step of ResNet-50 at 224x224 (synthetic tensors,
#                   batch 64): CPU vs GPU images/s through the flow's own training loop
#   5. llm          `agentic-pruner llm --device cuda` on the embedded tiny LLM: bf16 on the GPU, peak memory
#
# No internet needed: random-init timm models, synthetic tensors, embedded data and models (the digits
# ResNet-18 and the tiny LLM are trained on the CPU first; the LLM's training runs in the background while
# the demo runs). Results: $OUT/gpu_check/ when OUT is set, else benchmarks/results/gpu_check/
# (gpu_check.md, parts.csv, latency_resnet50.{csv,md,json}, train_step_resnet50.csv, demo_records.csv,
# llm_summary.json, one log per part). Exit status 0 only when every part passed.
#
# Usage: bash benchmarks/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
#        GPU_CHECK_DEVICE=cpu GPU_CHECK_TIMEOUT_SCALE=6 bash benchmarks/gpu_check.sh
#            dry run of the script itself on a machine without a GPU (the CPU in place of the GPU, smaller
#            sizes, longer limits; proves nothing about CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
OUT_DIR=${OUT:-$ROOT/benchmarks/results}/gpu_check
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")        # stores, caches, ONNX files: not results
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export AGENTIC_PRUNER_CACHE=${AGENTIC_PRUNER_CACHE:-$WORK/cache}
export PREFECT_HOME=$WORK/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONWARNINGS=ignore
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 TQDM_DISABLE=1
echo "part,status,seconds,result" > "$OUT_DIR/parts.csv"
FAILED=()
DEV=${GPU_CHECK_DEVICE:-cuda}
DRY=()
[[ $DEV == cpu ]] && DRY=(--dry-run-cpu)

# run_part NAME TIMEOUT_S CMD...: run, time and log one part; record ok/failed and its RESULT/FAILED line
run_part() {
  local name=$1 limit=$(( $2 * ${GPU_CHECK_TIMEOUT_SCALE:-1} )); shift 2
  local log="$OUT_DIR/$name.log" t0 t1 rc=0 line
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  line=$(grep -E '^(RESULT|FAILED): ' "$log" | tail -n 1 | sed -E 's/^(RESULT|FAILED): //' || true)
  if [[ $rc -eq 0 ]]; then
    echo "   ok in ${secs}s: ${line:-done}"
    printf '%s,ok,%s,"%s"\n' "$name" "$secs" "${line//\"/\'}" >> "$OUT_DIR/parts.csv"
  else
    [[ $rc -eq 124 || $rc -eq 137 ]] && line="timed out after ${limit}s${line:+; $line}"
    [[ -z "$line" ]] && line="exit $rc: $(tail -n 1 "$log")"
    echo "   FAILED (exit $rc) in ${secs}s: $line   (log: $log)"
    printf '%s,failed,%s,"%s"\n' "$name" "$secs" "${line//\"/\'}" >> "$OUT_DIR/parts.csv"
    FAILED+=("$name")
  fi
  return 0
}

T_START=$(date +%s)
run_part env 60 "$PY" benchmarks/gpu_check.py env --out "$OUT_DIR" "${DRY[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "no usable GPU: stopping (see $OUT_DIR/env.log)"
  "$PY" benchmarks/gpu_check.py report --out "$OUT_DIR" >/dev/null || true
  exit 1
fi

# the tiny LLM trains on the CPU (a fixed seed: the same cached weights on every machine) while the demo runs
"$PY" -c "from pruning.llm.tiny_model import train_tiny_model; print(train_tiny_model())" \
  >"$OUT_DIR/llm_train.log" 2>&1 &
LLM_TRAIN=$!

# the demo's configuration (embedded digits ResNet-18, 50 % MACs) without its latency step: part 3 measures
# latency, and torch.compile of two more models would cost a minute here
run_part demo 300 bash -c "
  '$PY' -m agentic_pruner.cli run --device $DEV --no-latency --store '$WORK/demo-store' &&
  '$PY' benchmarks/gpu_check.py demo-check --out '$OUT_DIR' --store '$WORK/demo-store' ${DRY[*]}"

wait "$LLM_TRAIN" || echo "   (tiny LLM pre-training failed; the llm part trains it again: $OUT_DIR/llm_train.log)"

run_part latency 240 "$PY" benchmarks/gpu_check.py latency --out "$OUT_DIR" "${DRY[@]}"
run_part train-step 120 "$PY" benchmarks/gpu_check.py train-step --out "$OUT_DIR" "${DRY[@]}"
run_part llm 180 bash -c "
  '$PY' -m agentic_pruner.cli llm --target-sparsity 0.45 --device $DEV --store '$WORK/llm-store' --json \
    > '$WORK/llm_summary.json' &&
  '$PY' benchmarks/gpu_check.py llm-check --out '$OUT_DIR' --summary '$WORK/llm_summary.json' ${DRY[*]}"

"$PY" benchmarks/gpu_check.py report --out "$OUT_DIR" "${DRY[@]}" >/dev/null || true
echo "total $(( $(date +%s) - T_START ))s; results in $OUT_DIR (gpu_check.md, parts.csv)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "FAILED parts: ${FAILED[*]}"
  exit 1
fi
echo "all parts passed"
