#!/usr/bin/env bash
# Compile check of the CUDA kernels (csrc/cuda/*.cu) for Hopper (sm_90) against a CUDA build of torch; needs no GPU.
#
#   tools/check_cuda_build.sh
#
# 1. Makes, once, a separate virtual environment holding a CUDA build of torch (NVG_CUDA_VENV, default
#    $TMPDIR/nvg-cuda-venv; torch spec NVG_CUDA_TORCH, default torch==2.14.1). The project's own .venv is not touched.
# 2. Copies the working tree (tracked and untracked, not ignored files: no .venv, no build outputs) into
#    NVG_CUDA_BUILD_DIR (default $TMPDIR/nvg-cuda-build), so the project's CPU nvg/_C*.so is never overwritten.
# 3. Builds the extension there with setup.py, NVG_USE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0 (override with the same
#    variable), MAX_JOBS=1 (override likewise). CUDA_HOME: taken from the environment, else the conventional
#    /usr/local/cuda when it has bin/nvcc, else two levels above the nvcc found on PATH.
# 4. Loads the built library into that torch and checks that both ops have CPU and CUDA kernels registered, and
#    (when a cuobjdump is at hand, e.g. the one triton ships) that the library holds sm_90 machine code.
# Exit status 0 only if every step passed. Running it again rebuilds from a fresh copy (the venv is reused).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="${TMPDIR:-/tmp}"
venv="${NVG_CUDA_VENV:-$tmp/nvg-cuda-venv}"
work="${NVG_CUDA_BUILD_DIR:-$tmp/nvg-cuda-build}"
torch_spec="${NVG_CUDA_TORCH:-torch==2.14.1}"
arch="${TORCH_CUDA_ARCH_LIST:-9.0}"

say() { printf '[check_cuda_build] %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }

# CUDA toolkit
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
[[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || fail "no CUDA toolkit found: set CUDA_HOME to the directory holding bin/nvcc"
export CUDA_HOME
say "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

# 1. CUDA torch in its own venv
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  say "creating $venv with $torch_spec (a CUDA build: several GB)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$torch_spec" numpy setuptools wheel ninja
fi
"$venv/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' \
  || fail "$venv has a CPU-only torch; remove the venv or set NVG_CUDA_TORCH to a CUDA build"
say "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# 2. fresh copy of the working tree
rm -rf "$work"
mkdir -p "$work"
(cd "$repo" && git ls-files -z -c -o --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
  | tar -xf - -C "$work"
[[ -f "$work/setup.py" ]] || fail "copying the working tree to $work"

# 3. build
say "building in $work (TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=${MAX_JOBS:-1})"
(cd "$work" && NVG_USE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-1}" \
  "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1) || { tail -50 "$work/build.log"; fail "build (log: $work/build.log)"; }
so="$(ls "$work"/nvg/_C*.so 2>/dev/null | head -1)"
[[ -n "$so" ]] || fail "the build produced no nvg/_C*.so"
if grep -n -i 'warning' "$work/build.log" | grep -E 'csrc/' ; then
  say "the compiler warned about the project's sources (above)"
fi

# 4. registration and machine code
"$venv/bin/python" - "$so" <<'EOF' || fail "registration check"
import sys
import torch

torch.ops.load_library(sys.argv[1])
for op in ("granularity_cluster", "cluster_quantize"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nvg::{op}", key), f"nvg::{op} has no {key} kernel"
print("[check_cuda_build] nvg::granularity_cluster and nvg::cluster_quantize: CPU and CUDA kernels registered")
EOF
cuobjdump="$(command -v cuobjdump || true)"
[[ -n "$cuobjdump" ]] || cuobjdump="$("$venv/bin/python" -c 'import os, triton; p = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"); print(p if os.path.exists(p) else "")' 2>/dev/null || true)"
if [[ -n "$cuobjdump" ]]; then
  elves="$("$cuobjdump" -lelf "$so")"
  echo "$elves" | grep -q 'sm_90' || fail "no sm_90 machine code in $so"
  say "machine code: $(echo "$elves" | grep -c 'sm_90') sm_90 ELF image(s) in $(basename "$so")"
else
  say "no cuobjdump found: machine-code check skipped"
fi
say "OK: the CUDA ops compile for TORCH_CUDA_ARCH_LIST=$arch and register their kernels"
