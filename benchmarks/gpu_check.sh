#!/usr/bin/env bash
# On a CUDA machine: build the extension (CPU + CUDA kernels), run the test suite on CUDA, the
# kernel benchmark (benchmarks/bench_gpu_kernels.py), then the SD 1.5 UNet fine-tuning benchmark
# (benchmarks/bench_unet.py, bf16: memory and step time of SaRA against full fine-tuning and LoRA).
# Everything goes to $OUT (default benchmarks/results): build.log, backends.json, env.txt,
# tests.log, bench_gpu_kernels.json/.txt, unet_sd15_cuda_bf16.json / unet_sd15.txt.
#
#   bash benchmarks/gpu_check.sh                    # from the repository root
#   SKIP_TESTS=1 BENCH_ARGS="--only linear" bash benchmarks/gpu_check.sh
#
# Needs a CUDA build of torch, triton, pytest (pytest-xdist and pytest-timeout when present),
# setuptools and ninja already installed: it downloads nothing. Wheels in .whl/ (made by
# scripts/offline_wheels.sh where pip can download, e.g. diffusers for the UNet benchmark) are
# installed into a temporary folder first. Time limits (s): TEST_TIMEOUT (the whole test run,
# default 240), BENCH_TIMEOUT (default 240), UNET_TIMEOUT (default 300). SKIP_TESTS=1, SKIP_BENCH=1
# and SKIP_UNET=1 skip a part; TEST_FILES and TEST_K narrow the tests; BENCH_ARGS go to the kernel
# benchmark; UNET_METHODS to the UNet benchmark. NCU_ADAMW=1 adds one launch of each fused AdamW
# kernel under Nsight Compute ($OUT/ncu_adamw.csv; NCU_TIMEOUT, default 240).
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

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "== offline wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sara_kernels_site \
    .whl/*.whl || echo "(offline wheels failed to install)"
  export PYTHONPATH="/tmp/sara_kernels_site${PYTHONPATH:+:$PYTHONPATH}"
fi

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
  "$PY" -c "import torch, sara_kernels; torch.ops.sara_kernels.select_small_magnitude(torch.randn(10), None, 11)" \
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
    ${TEST_FILES:-tests/test_native.py tests/test_ops.py tests/test_triton.py} ${TEST_K:+-k "$TEST_K"} \
    -v -rf --tb=short -p no:cacheprovider $xdist $tmo >"$OUT/tests.log" 2>&1
  test_rc=$?
  echo "passed: $(grep -c ' PASSED ' "$OUT/tests.log"); failed: $(grep -c ' FAILED ' "$OUT/tests.log")"
  grep -E " FAILED | ERROR " "$OUT/tests.log" | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' | sort -u | head -n 30
  grep -E "^FAILED .* - " "$OUT/tests.log" | cut -c1-300 | head -n 30
  echo "tests rc=$test_rc took $(( $(date +%s) - start )) s"
fi

bench_rc=0
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== kernel benchmark"
  timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/bench_gpu_kernels.py --json "$OUT/bench_gpu_kernels.json" ${BENCH_ARGS:-} \
    >"$OUT/bench_gpu_kernels.txt" 2>&1
  bench_rc=$?
  grep -E "FAILED|MISMATCH|Error" "$OUT/bench_gpu_kernels.txt" | head -n 20
  sed -n '/^summary/,$p' "$OUT/bench_gpu_kernels.txt"
fi

unet_rc=0
if [ -z "${SKIP_UNET:-}" ]; then
  if "$PY" -c "import diffusers, peft" 2>/dev/null; then
    echo "== UNet benchmark (SD 1.5 config, bf16 weights, batch 2)"
    timeout "${UNET_TIMEOUT:-300}" "$PY" benchmarks/bench_unet.py --workload sd15 --device cuda --dtype bf16 \
      --methods "${UNET_METHODS:-frozen,full,lora,sara,sara_torch_adamw}" --no-charts \
      --out "$OUT/unet_sd15_cuda_bf16.json" >"$OUT/unet_sd15.txt" 2>&1
    unet_rc=$?
    tail -n 25 "$OUT/unet_sd15.txt"
  else
    echo "== UNet benchmark skipped: diffusers and peft are not importable (scripts/offline_wheels.sh)"
  fi
fi
if [ -n "${NCU_ADAMW:-}" ]; then
  # Opt-in: one launch of each fused AdamW kernel under Nsight Compute (benchmarks/profile_adamw.py
  # says what and why). Needs hardware counters (Firecracker machines; gVisor has none: then only
  # the script's own CUDA-event timings come back).
  echo "== AdamW kernels under ncu"
  if command -v ncu >/dev/null 2>&1; then
    timeout "${NCU_TIMEOUT:-240}" ncu --clock-control none --nvtx --nvtx-include "profile/" \
      --kernel-name regex:sparse_adamw --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats --csv --page details \
      "$PY" benchmarks/profile_adamw.py --json "$OUT/profile_adamw.json" >"$OUT/ncu_adamw.csv" 2>"$OUT/ncu_adamw.err"
    echo "ncu rc=$? ($(grep -c '' "$OUT/ncu_adamw.csv") lines in ncu_adamw.csv)"
    "$PY" - "$OUT/ncu_adamw.csv" <<'PY'
import csv, sys
wanted = ("Duration", "DRAM Throughput", "Memory Throughput", "L2 Hit Rate", "Achieved Occupancy",
          "Registers Per Thread", "Theoretical Occupancy")
lines = open(sys.argv[1], errors="replace").read().splitlines()
start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
for row in csv.DictReader(lines[start:]) if start is not None else []:
    if row.get("Metric Name") in wanted:
        print(f'{row["ID"]:>3} {row["Kernel Name"][:48]:<48} {row["Metric Name"]:<24} {row["Metric Value"]:>12} {row["Metric Unit"]}')
PY
    tail -n 3 "$OUT/ncu_adamw.err"
  else
    "$PY" benchmarks/profile_adamw.py --json "$OUT/profile_adamw.json"
  fi
fi
echo "tests rc=$test_rc bench rc=$bench_rc unet rc=$unet_rc"
exit $(( test_rc != 0 || bench_rc != 0 || unet_rc != 0 ))
