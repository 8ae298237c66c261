#!/usr/bin/env bash
# One-shot GPU check: build the CUDA ops, run the tests (CUDA cases included) and the benchmarks, and write logs and
# pytest-benchmark JSON under $OUT (default ./gpu-results). Meant for a machine with a CUDA torch, triton and nvcc
# preinstalled and no package index:
#     OUT=/some/dir bash benchmarks/run_gpu.sh [pytest -k expression for the benchmarks]
# Record what it measured in benchmarks/RESULTS.md with the date, GPU, commit and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

MAX_JOBS=16 python3 -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import nvg, torch; assert torch.ops.nvg.granularity_cluster.default.has_kernel_for_dispatch_key('CUDA')" \
  || { echo "the CUDA kernels were not built"; tail -50 "$OUT/build.log"; exit 1; }

# Tests: the CUDA cases and the ops/kernels tests (the device fixture adds 'cuda' to every op test).
python3 -m pytest -q -x tests/test_ops_granularity_cluster.py tests/test_ops_cluster_quantize.py \
  tests/test_kernels_block_attn.py tests/test_kernels_kv_cache.py > "$OUT/tests_ops.log" 2>&1
echo "ops/kernels tests: rc=$?" | tee -a "$OUT/summary.txt"
python3 -m pytest -q -m cuda tests/ > "$OUT/tests_cuda.log" 2>&1
echo "all cuda-marked tests: rc=$?" | tee -a "$OUT/summary.txt"

# Benchmarks (JSON for RESULTS.md; the tables print to the log).
python3 -m pytest benchmarks/ --benchmark-only -q ${1:+-k "$1"} --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=median,iqr,rounds > "$OUT/bench.log" 2>&1
echo "benchmarks: rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT"/tests_*.log
