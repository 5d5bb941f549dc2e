#!/usr/bin/env bash
# On a CUDA machine: build the extension (CPU + CUDA kernels), run the whole test suite on CUDA,
# then time CUDA vs Triton vs reference at UNet-sized layers. Results go to $OUT (or
# benchmarks/results): tests.log, gpu_check.json, gpu_check.txt.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs torch (a CUDA build), triton, pytest, setuptools, ninja already installed (no downloads).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONUNBUFFERED=1

echo "== build"
start=$(date +%s)
"$PY" -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 3 | tee "$OUT/build.log"
echo "build took $(( $(date +%s) - start )) s"
"$PY" - <<'PY' | tee "$OUT/backends.txt"
import json, sara_kernels
print(json.dumps(sara_kernels.backends(), indent=1))
PY

echo "== tests (CUDA)"
"$PY" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 25
test_rc=${PIPESTATUS[0]}

echo "== timings"
"$PY" benchmarks/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
