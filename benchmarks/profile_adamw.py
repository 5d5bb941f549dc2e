"""The fused AdamW kernels, one launch each, for Nsight Compute.

On the H200 the native sparse_adamw_ kernel ran 2.2x slower than the Triton kernel at k = 49.9M
with the same access pattern (benchmarks/GPU_NOTES.md, AdamW item), and the cause is not known.
This script runs each variant a few times unprofiled (warm-up, Triton compilation), then exactly
once inside an NVTX range named "profile", so that ncu measures one launch of each:

  native        sparse_adamw_ on k = 5.8% of an 860M-entry bf16 weight (the H200 row)
  triton        the Triton kernel on the same tensors
  native multi  sparse_adamw_multi_ with that one set (the multi-tensor kernel's per-entry cost)
  native multi  sparse_adamw_multi_ over SD 1.5's 282 weight shapes at 5.8% (8 launches)

The native index checks run as in training (async, set with
``sara_kernels._backend.native_settings(index_checks=1)``: a separate validation kernel for
sparse_adamw_, folded into the update for sparse_adamw_multi_); ncu's filter keeps the update
kernels only.

    ncu --clock-control none --nvtx --nvtx-include "profile/" --kernel-name regex:sparse_adamw \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --csv --page details \
        python benchmarks/profile_adamw.py > ncu_adamw.csv
    NCU_ADAMW=1 bash benchmarks/gpu_check.sh          # the same, into $OUT/ncu_adamw.csv

Without ncu it is still useful: it prints the CUDA-event median of each variant (and writes
--json). --device cpu --small runs the same calls on CPU tensors (smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gpu_kernels import SD15_WEIGHT_SHAPES, random_index  # noqa: E402

import sara_kernels  # noqa: E402
from sara_kernels import _backend  # noqa: E402
from sara_kernels import ops as sk  # noqa: E402

DENSITY = 0.058
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


def adam_set(numel: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """[weight, index, base, delta, grad, exp_avg, exp_avg_sq] at DENSITY, random state."""
    weight = torch.randn(numel, device=device, dtype=dtype)
    index = random_index(numel, DENSITY, device)
    k = index.numel()
    return [
        weight,
        index,
        weight[index.long()].clone(),
        torch.randn(k, device=device) * 1e-3,
        torch.randn(k, device=device),
        torch.randn(k, device=device) * 1e-3,
        torch.rand(k, device=device) * 1e-6,
    ]


def median_ms(fn, device: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (smoke test)")
    parser.add_argument(
        "--reps", type=int, default=10, help="timed calls per variant (after the profiled one)"
    )
    parser.add_argument("--json", default=None, help="write the timings here")
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16
    torch.manual_seed(0)
    native = device if _backend.native_available(device) else None
    triton_ok = _backend.triton_available(device)  # on CPU tensors only under TRITON_INTERPRET=1

    big = adam_set(200_000 if args.small else 860_000_000, device, dtype)
    shapes = {(64, 48): 3, (32, 32, 3, 3): 2} if args.small else SD15_WEIGHT_SHAPES
    layers = [adam_set(_numel(s), device, dtype) for s, count in shapes.items() for _ in range(count)]
    layer_steps = [10.0] * len(layers)

    k_big, k_layers = big[1].numel(), sum(s[1].numel() for s in layers)
    variants = {}  # name -> (backend, call, entries updated)
    if native:
        variants["native sparse_adamw_"] = (native, lambda: sk.sparse_adamw_(*big, step=10.0, **HYPER), k_big)
        variants["native sparse_adamw_multi_, 1 set"] = (
            native,
            lambda: sk.sparse_adamw_multi_(*[[t] for t in big], steps=[10.0], **HYPER),
            k_big,
        )
        variants[f"native sparse_adamw_multi_, {len(layers)} sets"] = (
            native,
            lambda: sk.sparse_adamw_multi_(
                *[[s[j] for s in layers] for j in range(7)], steps=layer_steps, **HYPER
            ),
            k_layers,
        )
    if triton_ok:
        variants["triton sparse_adamw_"] = (
            "triton",
            lambda: sk.sparse_adamw_(*big, step=10.0, **HYPER),
            k_big,
        )

    results = []
    # The Python-side checks (one host sync) are not the subject; the native kernels' index checks
    # run as in training (async), whatever index_checks(False) or SARA_KERNELS_CHECK_INDEX say.
    with sara_kernels.index_checks(False):
        for name, (backend, fn, k) in variants.items():
            with sara_kernels.use_backend(backend), _backend.native_settings(index_checks=1):
                for _ in range(3):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.nvtx.range_push("profile")
                fn()
                if device == "cuda":
                    torch.cuda.nvtx.range_pop()
                    torch.cuda.synchronize()
                ms = median_ms(fn, device, args.reps)
            results.append(dict(variant=name, ms=ms, k=k, ns_per_entry=ms * 1e6 / k))
            print(f"{name:<44} {ms:9.3f} ms  k={k:>10}  {ms * 1e6 / k:6.3f} ns/entry", flush=True)
    if args.json:
        info = dict(
            device=torch.cuda.get_device_name() if device == "cuda" else device,
            torch=torch.__version__,
            density=DENSITY,
            dtype=str(dtype),
            command=" ".join(sys.argv),
            rows=results,
        )
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
