#!/usr/bin/env bash
# GPU check (issue 3): on a machine with an NVIDIA GPU and nvcc, from a bare checkout of this tree:
#   1. builds the addon for the GPU's arch and runs the kernel grid on the cuda backend against the float64
#      reference and against the emulator's outputs on the same inputs (bench/gpu-check/grid.ts);
#   2. benchmarks the kernels' entry points (forward GEMV/GEMM, backward) on LLaMA-7B layer shapes, weight copies
#      rotated past the L2 cache, against the GPU's own copy bandwidth and a cuBLAS GEMM measured in the same run
#      (bench/gpu-check/bench.cu; compiled while the grid runs);
#   3. runs a LLaMA-7B-shaped model through the runtime on device-resident tensors: decode tokens/s at batch 1
#      and 8 against the bandwidth roofline, a training step at sequence 2048 against the cuBLAS rate of step 2
#      (bench/gpu-model.ts).
# Results go to $OUT (default $TMPDIR/qalora-gpu-check): gpu-check.log, grid.json, bench.json, model.json,
# summary.txt. Output format: bench/README.md. Finishes in under 8 minutes (each step has its own timeout).
#
#   bench/gpu-check.sh          the real check (no GPU: runs what it can and says what it skipped, exit 3)
#   bench/gpu-check.sh --dry    no GPU needed: builds everything, runs the reference and emulator halves on
#                               tiny shapes, compiles the benchmark and skips the GPU parts with a message (the
#                               model step's dry run is `npx tsx bench/gpu-model.ts --backend emu --shape tiny`)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
for a in "$@"; do
  case "$a" in
    --dry) DRY=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $a (use --dry or --help)" >&2; exit 64 ;;
  esac
done
OUT="${OUT:-${TMPDIR:-/tmp}/qalora-gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
T0=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qalora-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "GPU-CHECK $*"; echo "$*" >> "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." 2>/dev/null && pwd)"
  [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=/usr/local/cuda
fi
# The emulator compiles the CUDA fp16/bf16 headers with g++.
export CPATH="$CUDA_HOME/include${CPATH:+:$CPATH}"
JOBS="$(nproc 2>/dev/null || echo 2)"
[ "$JOBS" -gt 16 ] && JOBS=16
say "start dry=$DRY nvcc=$NVCC cuda_home=$CUDA_HOME jobs=$JOBS out=$OUT"

if [ ! -x "$NVCC" ]; then say "FAIL nvcc not found (set NVCC)"; exit 1; fi
if [ ! -d node_modules ] || [ ! -e node_modules/.bin/tsx ]; then
  say "node_modules missing: npm ci"
  npm ci --no-audit --no-fund --offline || npm ci --no-audit --no-fund || { say "FAIL npm ci"; exit 1; }
fi
TSX="$ROOT/node_modules/.bin/tsx"

# ---- The GPU -----------------------------------------------------------------------------------------------
ARCH=""
GPU=""
if [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
  GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  [ -n "$CAP" ] && ARCH="sm_$CAP"
fi
if [ -z "$ARCH" ]; then
  [ "$DRY" = 0 ] && say "SKIP no GPU found (nvidia-smi missing or no device): running the dry checks only"
  HAVE_GPU=0
  ARCH=sm_80
else
  HAVE_GPU=1
  say "gpu name=\"$GPU\" arch=$ARCH"
fi

# ---- 2a. The benchmark's build, in the background while the grid runs ------------------------------------
echo "== bench: compile specs/llama2-7b.qal"
BENCH_OK=0
if node bin/qalora.mjs compile specs/llama2-7b.qal -o "$WORK/llama" > "$WORK/compile.out" 2>&1; then
  SPEC_ID="$(grep -m1 -oE '^// ==== specialization [A-Za-z0-9_]+' "$WORK/llama/src/cuda/kernels.cu" | awk '{print $4}')"
  BLAS=(-lcublas)
  if [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
    BLAS=(-DQL_NO_CUBLAS)
    say "SKIP cuBLAS yardstick: $CUDA_HOME/include/cublas_v2.h not installed"
  fi
  timeout 240 "$NVCC" -std=c++17 -O3 -arch="$ARCH" -DQL_SPEC="$SPEC_ID" -I"$WORK/llama/src" -I"$WORK/llama/src/common" \
    -I"$WORK/llama/src/cuda" bench/gpu-check/bench.cu "${BLAS[@]}" -o "$WORK/bench" > "$WORK/bench-build.out" 2>&1 &
  BENCH_PID=$!
  BENCH_OK=1
else
  cat "$WORK/compile.out"; say "FAIL qalora compile specs/llama2-7b.qal"; FAILED=1
fi

# ---- 1. Kernel grid: cuda vs reference vs emulator --------------------------------------------------------
if [ "$HAVE_GPU" = 1 ]; then
  GRID_ARGS=(--backends cuda,emu --arch "$ARCH")
  GRID_TIMEOUT=180
else
  GRID_ARGS=(--backends emu --tiny --arch "$ARCH")
  GRID_TIMEOUT=900
  say "SKIP cuda backend grid (no GPU): checking the emulator against the reference on tiny shapes"
fi
echo "== grid: ${GRID_ARGS[*]}"
timeout "$GRID_TIMEOUT" "$TSX" bench/gpu-check/grid.ts "${GRID_ARGS[@]}" --jobs "$JOBS" --json "$OUT/grid.json" | tee "$WORK/grid.out"
RC=${PIPESTATUS[0]}
grep -E '^GRID-(SUMMARY|BUILD|TIME)' "$WORK/grid.out" >> "$SUMMARY"
if [ "$RC" = 0 ]; then say "grid pass seconds=$(elapsed)"; else say "FAIL grid rc=$RC seconds=$(elapsed)"; FAILED=1; fi

# ---- 2b. Benchmark on LLaMA-7B shapes ----------------------------------------------------------------------
if [ "$BENCH_OK" = 1 ]; then
  if wait "$BENCH_PID"; then
    say "bench built spec=$SPEC_ID arch=$ARCH seconds=$(elapsed)"
    if [ "$HAVE_GPU" = 1 ]; then
      timeout 90 "$WORK/bench" "$OUT/bench.json" | tee "$WORK/bench.out"
      RC=${PIPESTATUS[0]}
      grep -E '^(DEVICE|RESULT)' "$WORK/bench.out" >> "$SUMMARY"
      if [ "$RC" = 0 ]; then say "bench pass seconds=$(elapsed)"; else say "FAIL bench rc=$RC"; FAILED=1; fi
    else
      "$WORK/bench" "$OUT/bench.json" > "$WORK/bench.out" 2>&1
      RC=$?
      cat "$WORK/bench.out"
      if [ "$RC" = 2 ] && grep -q '^SKIP' "$WORK/bench.out"; then
        say "SKIP gpu benchmark (no GPU): the binary ran and reported $(grep -m1 '^STATUS' "$WORK/bench.out")"
      else
        say "FAIL bench without a GPU should skip, rc=$RC"; FAILED=1
      fi
    fi
  else
    cat "$WORK/bench-build.out"; say "FAIL bench compile"; FAILED=1
  fi
fi

# ---- 3. The whole model through the runtime ----------------------------------------------------------------
if [ "$HAVE_GPU" = 1 ]; then
  # The compute roofline of the training step: the best cuBLAS rate step 2 measured.
  TFLOPS="$(grep -oE 'op=cublas_gemm [^ ]+ [^ ]+ [^ ]+ [^ ]+ TFLOP/s=[0-9.]+' "$WORK/bench.out" 2>/dev/null | grep -oE '[0-9.]+$' | sort -g | tail -1)"
  timeout 150 "$TSX" bench/gpu-model.ts --backend cuda --arch "$ARCH" ${TFLOPS:+--tflops "$TFLOPS"} --json "$OUT/model.json" | tee "$WORK/model.out"
  RC=${PIPESTATUS[0]}
  grep -E '^(MODEL|RESULT|POOL)' "$WORK/model.out" >> "$SUMMARY"
  if [ "$RC" = 0 ]; then say "model pass seconds=$(elapsed)"; else say "FAIL model rc=$RC seconds=$(elapsed)"; FAILED=1; fi
else
  say "SKIP model benchmark (no GPU): its dry run is npx tsx bench/gpu-model.ts --backend emu --shape tiny"
fi

STATUS=pass
[ "$FAILED" = 1 ] && STATUS=fail
say "done status=$STATUS dry=$DRY gpu=$HAVE_GPU seconds=$(elapsed)"
[ "$FAILED" = 1 ] && exit 1
[ "$DRY" = 0 ] && [ "$HAVE_GPU" = 0 ] && exit 3
exit 0
