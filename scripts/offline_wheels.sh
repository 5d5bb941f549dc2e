#!/usr/bin/env bash
# Download the pure-Python wheels that benchmarks/gpu_check.sh installs on a GPU machine without
# internet access, into .whl/ (git-ignored): diffusers (for benchmarks/bench_unet.py) and the one
# requirement of it that such machines tend to lack. torch, triton, peft, accelerate,
# huggingface_hub, safetensors and the rest are expected there already.
#
#   bash scripts/offline_wheels.sh               # where pip can download
#   WHEELS="diffusers==0.42.1 importlib_metadata" bash scripts/offline_wheels.sh
#
# The wheels are py3-none-any, so the Python version of this machine does not matter.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-diffusers==0.42.1 importlib_metadata==10.2.0}"
mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl $WHEELS
ls -l .whl
du -sh .whl
