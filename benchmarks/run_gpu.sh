#!/usr/bin/env bash
# The GPU check, sized for one short window on a fresh GPU machine (torch, triton and nvcc preinstalled, no package
# index): at most NVG_GPU_CHECK_BUDGET_S seconds in all (default 690, i.e. 11.5 minutes), every command under its own
# `timeout` (at most 480 s, and never past the budget). Phases are independent: a failed CUDA build falls back to a
# CPU-only build so that the Triton tests and benchmarks still run; each phase's status goes to the summary.
#
#     OUT=/some/dir bash benchmarks/run_gpu.sh                            # on the GPU machine
#     NVG_GPU_CHECK_DRY_RUN=1 OUT=/tmp/x bash benchmarks/run_gpu.sh      # anywhere: every phase but the GPU ones
#
# Writes under $OUT (default ./gpu-results): summary.txt (one line per phase: status, seconds, limit), one log per
# phase, env.txt, pytest-benchmark JSON, aot.json. Exit status 0 when no phase failed or timed out.
# Phases (limit in s):  env 30 | build 240 (+ CPU-only fallback 120) | registered 60 | triton-aot 90 |
#   tests-ops 120 | tests-triton 240 | sanitizer-{memcheck,racecheck,synccheck} 90 each | tests-cuda-rest 90 |
#   bench-nvg-vs-var-b1 120 | bench-nvg-vs-var-b64 150 | bench-ops 90 | bench-attn 150 (the limits sum to more than
#   the budget: the last phases get what is left).  Never run on a GPU yet: the time each phase takes is a guess.
# Tests run with NVG_TRITON_AUTOTUNE=0 (one Triton config per kernel: tools/triton_aot_compile.py counts and
# times the compilations they need); benchmarks autotune fully. Record results in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
DRY="${NVG_GPU_CHECK_DRY_RUN:-0}"
BUDGET="${NVG_GPU_CHECK_BUDGET_S:-690}"
MAX_CMD_S=480
PY="${PYTHON:-python3}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/nvg-triton-cache}"
unset TRITON_INTERPRET
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
PLANNED=0  # worst case: the sum of the limits the phases get
[[ "$DRY" == 1 ]] && echo "# dry run: GPU phases are listed, not run" >> "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
record() {  # name status seconds limit
  printf '%-20s %-30s %5ss  (limit %ss)\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

# phase NAME KIND LIMIT CMD... : KIND gpu (not run in the dry run) or cpu (runs everywhere).
phase() {
  local name=$1 kind=$2 limit=$3
  shift 3
  local left=$(( BUDGET - $(elapsed) - 15 ))  # 15 s: the kill grace period and the summary
  (( limit > MAX_CMD_S )) && limit=$MAX_CMD_S
  (( limit > left )) && limit=$left
  (( limit > 0 )) && PLANNED=$(( PLANNED + limit ))
  if [[ "$DRY" == 1 && "$kind" == gpu ]]; then
    echo "$*" > "$OUT/$name.log"
    record "$name" "skipped (dry run)" 0 "$limit"
    return 0
  fi
  if (( limit < 10 )); then
    record "$name" "skipped (time budget spent)" 0 "$limit"
    return 0
  fi
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="passed" ;;
    5) status="no tests collected" ;;
    124|137) status="TIMED OUT"; FAILED=1 ;;
    *) status="FAILED (rc=$rc)"; FAILED=1 ;;
  esac
  record "$name" "$status" $(( $(date +%s) - t0 )) "$limit"
  return $rc
}

# 1. environment (never fails: what is missing is written down)
env_report() {
  date -u
  git rev-parse HEAD 2>/dev/null || echo "no git"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2 || echo "nvcc: not on PATH"
  [[ -x /usr/local/cuda/bin/nvcc ]] && /usr/local/cuda/bin/nvcc --version | tail -1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
                'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not importable"
  echo "compute-sanitizer: $(sanitizer || echo 'not found')"
  nproc
  return 0
}
sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}
env_report > "$OUT/env.txt" 2>&1
record env passed "$(elapsed)" 30

# 2. build: the CUDA extension; on failure a CPU-only build, so that everything Triton still runs
build_args=(-m pip install -e . --no-build-isolation --no-deps --no-index)
[[ "$DRY" == 1 ]] && build_args+=(--dry-run)  # resolves and prepares the metadata, compiles nothing
if ! phase build cpu 240 "$PY" "${build_args[@]}"; then
  phase build-cpu-only cpu 120 env NVG_USE_CUDA=0 "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index
fi
phase registered gpu 60 "$PY" -c "import nvg, torch
for op in ('granularity_cluster', 'cluster_quantize', 'cluster_quantize_prepare'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('nvg::' + op, 'CUDA'), op + ': no CUDA kernel'
print('CUDA kernels registered')"

# 3. Triton: compile the test variants ahead of time into the shared cache (also times them)
aot_args=(tools/triton_aot_compile.py --json "$OUT/aot.json" --jobs "$(nproc)")
[[ -n "${NVG_GPU_CHECK_AOT_LIMIT:-}" ]] && aot_args+=(--limit "$NVG_GPU_CHECK_AOT_LIMIT")
phase triton-aot cpu 90 "$PY" "${aot_args[@]}"

# 4. tests (the device fixture adds CUDA to every op test; Triton with one config per kernel)
pytest_args=(-q -rs -p no:cacheprovider)
phase tests-ops gpu 120 "$PY" -m pytest "${pytest_args[@]}" tests/test_ops_granularity_cluster.py \
  tests/test_ops_cluster_quantize.py tests/test_kernels_launch.py
phase tests-triton gpu 240 env NVG_TRITON_AUTOTUNE=0 "$PY" -m pytest "${pytest_args[@]}" \
  tests/test_kernels_block_attn.py tests/test_kernels_kv_cache.py \
  tests/test_sample_fast.py::test_prefix_training_through_the_triton_kernels

# 5. compute-sanitizer over the CUDA ops at small sizes
if san="$(sanitizer)" || [[ "$DRY" == 1 ]]; then
  for tool in memcheck racecheck synccheck; do
    # without torch's caching allocator every tensor is its own allocation, so memcheck sees out-of-bounds accesses
    phase "sanitizer-$tool" gpu 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${san:-compute-sanitizer}" --tool "$tool" \
      --error-exitcode 1 "$PY" tools/gpu_sanitize_ops.py
  done
else
  record sanitizer "SKIPPED: compute-sanitizer not found" 0 0
fi

# 6. the remaining cuda-marked tests (the fast NVG sampler's CUDA-graph step among them), then benchmarks (full
# autotuning): NVG vs VAR sampling at d16 first (issue targets: NVG fast >= 40 images/s at batch 64, <= 0.30 s at
# batch 1, bf16, decode included), one pytest per batch so that a cut run keeps the batch-1 JSON
# the other cuda-marked tests: files that need a missing optional package (PIL) are left out, and said so
rest=()
for f in $(grep -l "mark.cuda" tests/test_*.py); do
  case "$f" in tests/test_ops_*|tests/test_kernels_*) continue ;; esac
  if grep -qE "^(from|import) PIL" "$f" && ! "$PY" -c "import PIL" 2>/dev/null; then
    echo "left out (PIL missing): $f" >> "$OUT/env.txt"
    continue
  fi
  rest+=("$f")
done
if (( ${#rest[@]} )); then
  phase tests-cuda-rest gpu 90 env NVG_TRITON_AUTOTUNE=0 "$PY" -m pytest "${pytest_args[@]}" -m cuda "${rest[@]}"
fi
nvg_rows="test_sample and (var] or nvg] or nvg_fast] or nvg_2step])"
for b in 1 64; do
  phase "bench-nvg-vs-var-b$b" gpu $(( b == 1 ? 120 : 150 )) env NVG_BENCH_SIZES=d16 NVG_BENCH_ROUNDS=1:5,64:2 \
    "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_nvg_vs_var.py --benchmark-only -k "$nvg_rows and d16-$b-" \
    --benchmark-json="$OUT/bench_nvg_vs_var_b$b.json" --benchmark-columns=median,iqr,rounds
done
phase bench-ops gpu 90 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_ops_granularity_cluster.py \
  benchmarks/bench_ops_cluster_quantize.py --benchmark-only --benchmark-json="$OUT/bench_ops.json" \
  --benchmark-columns=median,iqr,rounds
phase bench-attn gpu 150 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_block_attn.py --benchmark-only \
  --benchmark-json="$OUT/bench_attn.json" --benchmark-columns=median,iqr,rounds

if [[ -f "$OUT/aot.json" ]]; then
  echo "triton-aot: $(tr -d '\n ' < "$OUT/aot.json")" | tee -a "$SUMMARY"
fi
echo "time: phase limits sum to $PLANNED s; each limit is cut to what is left of the budget, so the run takes at" \
  "most $(( BUDGET + 5 )) s (budget $BUDGET s + 5 s kill grace)" | tee -a "$SUMMARY"
record total "$([[ $FAILED == 0 ]] && echo 'no failure' || echo 'SOME PHASE FAILED')" "$(elapsed)" "$BUDGET"
exit $FAILED
