#!/usr/bin/env bash
# Prove that the CUDA kernels (csrc/cuda) compile and link, on a machine without a GPU.
#
#  1. Finds the CUDA toolkit from the `nvcc` on the PATH, following a wrapper script that execs
#     the real nvcc (CUDA_HOME, when set, wins).
#  2. Creates, if missing, a virtualenv with a CUDA build of torch:
#       $SARA_KERNELS_CUDA_VENV (default: <repo>/.venv-cuda), `pip install torch==2.14.1 ninja
#       setuptools wheel` ($SARA_KERNELS_CUDA_TORCH overrides the torch requirement).
#  3. Builds the extension in that virtualenv from a copy of the source tree (so it never touches
#     ./build or the in-place CPU build), with TORCH_CUDA_ARCH_LIST=9.0 and MAX_JOBS=2 (both
#     overridable from the environment).
#  4. Checks the result: the build really compiled the CUDA sources, the .so holds sm_90 cubins for
#     every .cu file and the host stubs of every kernel, and importing it registers a C++ CUDA
#     kernel under every kernel op (torch.ops.sara_kernels.*; no GPU is needed for that).
# Exits non-zero on any failure. Called from .ci/run. (Here-strings, not `echo | grep -q`: under
# pipefail the early exit of grep -q can fail the pipeline with SIGPIPE.)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SARA_KERNELS_CUDA_VENV:-$ROOT/.venv-cuda}
TORCH_REQ=${SARA_KERNELS_CUDA_TORCH:-torch==2.14.1}
ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
JOBS=${MAX_JOBS:-2}
PYTHON=${PYTHON:-python3}
start=$(date +%s)

fail() {
  echo "check_cuda_build: FAILED: $*" >&2
  exit 1
}
log() { echo "check_cuda_build: $*"; }

# --- 1. the toolkit ----------------------------------------------------------------------------
find_cuda_home() {
  local nvcc real next seen=""
  nvcc=$(command -v nvcc) || return 1
  while [ -n "$nvcc" ]; do
    real=$(readlink -f "$nvcc")
    case " $seen " in *" $real "*) return 1 ;; esac
    seen="$seen $real"
    if [ "$(head -c 2 "$real")" = "#!" ]; then
      # A wrapper script: follow the first .../bin/nvcc it names.
      next=$(grep -o "[^[:space:]\"'=]*/bin/nvcc" "$real" | grep -v "^$real\$" | head -n 1 || true)
      [ -n "$next" ] || return 1
      nvcc=$next
      continue
    fi
    dirname "$(dirname "$real")"
    return 0
  done
  return 1
}

if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(find_cuda_home) || fail "no CUDA toolkit: no nvcc on the PATH (or a wrapper that names none)"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || fail "CUDA_HOME=$CUDA_HOME has no include/cuda_runtime.h"
export CUDA_HOME
log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*' || echo 'nvcc version unknown'))"

# --- 2. the virtualenv -------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $TORCH_REQ"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_REQ" ninja setuptools wheel
fi
VPY="$VENV/bin/python"
"$VPY" -c "import ninja, setuptools" 2>/dev/null || "$VPY" -m pip install ninja setuptools wheel
torch_info=$("$VPY" -c "import torch; print(torch.__version__, torch.version.cuda)" 2>/dev/null) ||
  fail "torch does not import in $VENV"
case "$torch_info" in
  *" None") fail "$VENV has a CPU-only torch ($torch_info); a CUDA build is needed" ;;
esac
log "torch ${torch_info% *} (CUDA ${torch_info#* }) in $VENV"

# --- 3. build from a copy of the tree ----------------------------------------------------------
BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sara_kernels_cuda_build.XXXXXX")
cleanup() { rm -rf "$BUILD_DIR"; }
trap cleanup EXIT
cp -r "$ROOT/csrc" "$ROOT/sara_kernels" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$BUILD_DIR/"
for f in "$ROOT"/README* "$ROOT"/LICENSE*; do [ -e "$f" ] && cp "$f" "$BUILD_DIR/"; done
find "$BUILD_DIR/sara_kernels" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
ls "$BUILD_DIR"/csrc/cuda/*.cu >/dev/null 2>&1 || fail "no csrc/cuda/*.cu sources"

log "building in $BUILD_DIR (TORCH_CUDA_ARCH_LIST=$ARCH_LIST, MAX_JOBS=$JOBS)"
build_start=$(date +%s)
(
  cd "$BUILD_DIR"
  env -u SARA_KERNELS_NO_CUDA -u SARA_KERNELS_NO_NATIVE TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS="$JOBS" \
    "$VPY" setup.py build_ext --inplace
) >"$BUILD_DIR/build.log" 2>&1 || {
  tail -n 200 "$BUILD_DIR/build.log" >&2
  fail "the build failed (log above)"
}
log "build took $(($(date +%s) - build_start)) s"
grep -q "building the native extension with CPU + CUDA kernels" "$BUILD_DIR/build.log" ||
  { tail -n 50 "$BUILD_DIR/build.log" >&2; fail "setup.py did not enable the CUDA kernels"; }
warnings=$(grep -E "warning( #[0-9A-Z-]+)?:" "$BUILD_DIR/build.log" | grep -E "csrc/cuda/" | sort -u || true)
if [ -n "$warnings" ]; then
  log "compiler warnings in csrc/cuda:"
  echo "$warnings"
fi

# --- 4. what the .so holds ---------------------------------------------------------------------
so=$(ls "$BUILD_DIR"/sara_kernels/_C*.so 2>/dev/null | head -n 1)
[ -n "$so" ] || fail "no sara_kernels/_C*.so was built"

cuobjdump=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
  "$VENV"/lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump; do
  if [ -n "$c" ] && [ -x "$c" ]; then cuobjdump=$c && break; fi
done
if [ -n "$cuobjdump" ]; then
  elfs=$("$cuobjdump" --list-elf "$so") || fail "$cuobjdump --list-elf failed"
  echo "$elfs"
  for src in "$BUILD_DIR"/csrc/cuda/*.cu; do
    name=$(basename "$src" .cu)
    grep -q "${name}\.sm_90\.cubin" <<<"$elfs" || fail "no sm_90 cubin for csrc/cuda/$name.cu in $so"
  done
else
  log "no cuobjdump found (toolkit, PATH or triton); checking for sm_90 cubin names only"
  grep -aq "sm_90" "$so" || fail "no sm_90 code in $so"
fi

symbols=$(nm -C "$so")
for kernel in validate_index_kernel linear_direct_kernel linear_gather_kernel conv_direct_kernel \
  conv_gather_kernel sparse_adamw_kernel scatter_merge_kernel restore_kernel; do
  grep -q "sara_kernels_cuda::.*${kernel}<" <<<"$symbols" || fail "kernel $kernel is missing from $so"
done
log "sm_90 code and all kernel stubs present"

# Run from the build copy: the current directory comes first on sys.path, and the repository's
# own sara_kernels/ may hold an in-place CPU build.
(cd "$BUILD_DIR" && PYTHONPATH="$BUILD_DIR" "$VPY" - "$so") <<'EOF' || fail "the built extension does not register the CUDA kernels"
import os
import sys

import torch
import sara_kernels  # declares torch.ops.sara_kernels.*; its _C registers the native kernels
import sara_kernels._C

built = os.path.realpath(sys.argv[1])
if os.path.realpath(sara_kernels._C.__file__) != built:
    raise SystemExit(f"imported {sara_kernels._C.__file__}, not the freshly built {built}")

ops = ["select_small_magnitude", "sampled_weight_grad_linear", "sampled_weight_grad_conv2d",
       "sparse_adamw_", "sparse_adamw_multi_", "scatter_merge_", "restore_"]

def cuda_kernel_is_native(op):
    """The op's CUDA kernel was registered from csrc/cuda (not the Python fallback of _ops.py)."""
    for line in torch._C._dispatch_dump(f"sara_kernels::{op}").splitlines():
        if line.startswith("CUDA:"):
            return "/csrc/cuda/" in line
    return False


missing = [op for op in ops if not cuda_kernel_is_native(op)]
if missing:
    raise SystemExit(f"no CUDA kernel registered for: {', '.join(missing)}")
assert sara_kernels.backends()["native"]["cuda_kernels"] is True
print(f"check_cuda_build: CUDA kernels registered for {len(ops)} ops (torch {torch.__version__})")
EOF

log "OK in $(($(date +%s) - start)) s"
