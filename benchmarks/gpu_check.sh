#!/usr/bin/env bash
# On a CUDA machine: build the extension (CPU + CUDA kernels), run the test suite on CUDA, then the
# kernel benchmark (benchmarks/bench_gpu_kernels.py). Everything goes to $OUT (default
# benchmarks/results): build.log, backends.json, env.txt, tests.log, bench_gpu_kernels.json/.txt.
#
#   bash benchmarks/gpu_check.sh                    # from the repository root
#   SKIP_TESTS=1 BENCH_ARGS="--only linear" bash benchmarks/gpu_check.sh
#
# Needs a CUDA build of torch, triton, pytest (pytest-xdist and pytest-timeout when present),
# setuptools and ninja already installed: it downloads nothing. Time limits: TEST_TIMEOUT (s, the
# whole test run, default 240) and BENCH_TIMEOUT (s, default 240). SKIP_TESTS=1 skips the tests;
# TEST_FILES and TEST_K narrow them; BENCH_ARGS go to the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONUNBUFFERED=1
export SARA_KERNELS_REQUIRE_NATIVE=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  nvcc --version | tail -n 2
  "$PY" -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
start=$(date +%s)
"$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
build_rc=$?
tail -n 3 "$OUT/build.log"
echo "build rc=$build_rc took $(( $(date +%s) - start )) s"
[ "$build_rc" -eq 0 ] || exit 1
"$PY" -c "import json, sara_kernels; print(json.dumps(sara_kernels.backends(), indent=1))" >"$OUT/backends.json" 2>&1
grep -n '"cuda_kernels"\|"error"' "$OUT/backends.json"

echo "== native error-path check"
# A native error whose message formatted an integer segfaulted on one CUDA image (gcc 13.3, torch
# 2.11) inside a copy of std::ostream::_M_insert<long> in _C.so. The library's messages now format
# numbers as strings (csrc/message.h); torch's inline headers still reference the inserters. Record
# the symbols and the libstdc++ in use, then try an error path in a subprocess.
{
  nm -DC sara_kernels/_C*.so | grep -E "_M_insert<" || echo "(no _M_insert<...> symbol)"
  "$PY" - <<'PY'
import torch, sara_kernels
maps = [line.split()[-1] for line in open("/proc/self/maps") if "libstdc++" in line]
print("libstdc++ mapped:", sorted(set(maps)))
PY
  "$PY" -c "import torch, sara_kernels; torch.ops.sara_kernels_C.select_small_magnitude(torch.randn(10), None, 11)" \
    >"$OUT/error_path_call.txt" 2>&1
  rc=$?
  tail -n 1 "$OUT/error_path_call.txt"
  echo "exit status of the error-path call: $rc (1 = clean Python error, 139 = segfault)"
} 2>&1 | tee "$OUT/error_path.txt"

test_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests (CUDA)"
  start=$(date +%s)
  xdist=""
  "$PY" -c "import xdist" 2>/dev/null && xdist="-n 12"
  tmo=""
  "$PY" -c "import pytest_timeout" 2>/dev/null && tmo="--timeout 90"
  # TEST_FILES (default: the suites with CUDA cases; CI runs the rest on CPU) and TEST_K (a
  # pytest -k expression) narrow the run. -v keeps every result in the log even when the time
  # limit cuts the run short; -rf --tb=short lists the failures at the end.
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest \
    ${TEST_FILES:-tests/test_cuda_native.py tests/test_ops.py tests/test_triton.py} ${TEST_K:+-k "$TEST_K"} \
    -v -rf --tb=short -p no:cacheprovider $xdist $tmo >"$OUT/tests.log" 2>&1
  test_rc=$?
  echo "passed: $(grep -c ' PASSED ' "$OUT/tests.log"); failed: $(grep -c ' FAILED ' "$OUT/tests.log")"
  grep -E " FAILED | ERROR " "$OUT/tests.log" | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' | sort -u | head -n 30
  grep -E "^FAILED .* - " "$OUT/tests.log" | cut -c1-300 | head -n 30
  echo "tests rc=$test_rc took $(( $(date +%s) - start )) s"
fi

echo "== kernel benchmark"
timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/bench_gpu_kernels.py --json "$OUT/bench_gpu_kernels.json" ${BENCH_ARGS:-} \
  >"$OUT/bench_gpu_kernels.txt" 2>&1
bench_rc=$?
grep -E "FAILED|MISMATCH|Error" "$OUT/bench_gpu_kernels.txt" | head -n 20
sed -n '/^summary/,$p' "$OUT/bench_gpu_kernels.txt"
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
