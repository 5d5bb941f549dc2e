"""Time every backend of the sampled weight gradient and the fused optimizer at UNet-sized layers.

Rows: a 1280x1280 Linear (N = 2 x 32 x 32 tokens) and a 3x3 Conv2d 640->640 at 32x32, batch 2,
at several densities; sparse_adamw_ at the selected count of a 1280x1280 weight. Each backend
available on the device (cuda, triton, reference; cpu on CPU) is timed, next to the dense
baseline (the dense weight gradient, which the sampled one replaces).

    python benchmarks/gpu_check.py                 # on CUDA when present, else CPU (small reps)
    python benchmarks/gpu_check.py --json out.json

Medians over repeats (CUDA events via triton.testing.do_bench on GPU; perf_counter on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import sara_kernels
from sara_kernels import _backend
from sara_kernels import ops as sk


def _bench(fn, device: str, reps: int) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except Exception:  # pragma: no cover - triton missing on a CUDA machine
            pass
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _backends(device: str) -> list[str]:
    found = []
    if _backend.native_available(device):
        found.append(device)
    if _backend.triton_available(device) and not (device == "cpu" and _backend.triton_interpret()):
        found.append("triton")
    found.append("reference")
    return found


def _index(numel: int, density: float, device: str) -> torch.Tensor:
    k = max(1, int(numel * density))
    return torch.randperm(numel, device=device)[:k].sort().values.to(torch.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--densities", default="0.001,0.006,0.023,0.058,0.2")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (CPU); default 20 CUDA / 3 CPU")
    parser.add_argument("--small", action="store_true", help="quarter-size layers (for a quick CPU check)")
    parser.add_argument(
        "--json", default=None, help="write results here (default $OUT/gpu_check.json when OUT is set)"
    )
    args = parser.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (20 if device == "cuda" else 3)
    densities = [float(d) for d in args.densities.split(",")]
    scale = 4 if args.small else 1
    torch.manual_seed(0)
    rows = []
    backends = _backends(device)

    def record(kind, shape, density, variant, ms, extra=None):
        row = dict(kind=kind, shape=shape, density=density, variant=variant, ms=ms)
        row.update(extra or {})
        rows.append(row)
        print(f"  {kind:<7} {shape:<26} {density:>7.3%} {variant:<22} {ms:10.3f} ms", flush=True)

    # ---- Linear 1280x1280, N = 2 x 32 x 32 tokens -------------------------------------------
    out_f = in_f = 1280 // scale
    n = 2 * 32 * 32 // scale
    g = torch.randn(n, out_f, device=device, dtype=dtype)
    x = torch.randn(n, in_f, device=device, dtype=dtype)
    shape = f"linear {out_f}x{in_f} N={n}"
    dense_ms = _bench(lambda: g.t() @ x, device, reps)
    record("linear", shape, 1.0, "dense weight grad", dense_ms)
    for density in densities:
        index = _index(out_f * in_f, density, device)
        for backend in backends:
            variants = ["direct", "gemm", "auto"] if backend in ("cpu", "cuda") else ["-"]
            for variant in variants:

                def run(backend=backend, variant=variant, index=index):
                    with (
                        sara_kernels.use_backend(backend),
                        sara_kernels.use_grad_variant(variant if variant != "-" else "auto"),
                        sara_kernels.index_checks(False),
                    ):
                        sk.sampled_weight_grad_linear(g, x, index, out_f, in_f)

                ms = _bench(run, device, reps)
                record("linear", shape, density, f"{backend}/{variant}", ms, {"vs_dense": ms / dense_ms})

    # ---- Conv 3x3 640->640 at 32x32, batch 2 -------------------------------------------------
    c = 640 // scale
    hw = 32 // (2 if args.small else 1)
    cx = torch.randn(2, c, hw, hw, device=device, dtype=dtype)
    cw = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
    cg = torch.randn(2, c, hw, hw, device=device, dtype=dtype)
    shape = f"conv3x3 {c}->{c} {hw}x{hw} N=2"
    dense_ms = _bench(
        lambda: torch.ops.aten.convolution_backward(
            cg, cx, cw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
        ),
        device,
        reps,
    )
    record("conv", shape, 1.0, "dense weight grad", dense_ms)
    for density in densities:
        index = _index(cw.numel(), density, device)
        for backend in backends:
            variants = ["direct", "gemm", "auto"] if backend in ("cpu", "cuda") else ["-"]
            for variant in variants:

                def run(backend=backend, variant=variant, index=index):
                    with (
                        sara_kernels.use_backend(backend),
                        sara_kernels.use_grad_variant(variant if variant != "-" else "auto"),
                        sara_kernels.index_checks(False),
                    ):
                        sk.sampled_weight_grad_conv2d(cg, cx, index, list(cw.shape), 1, 1, 1, 1)

                ms = _bench(run, device, reps)
                record("conv", shape, density, f"{backend}/{variant}", ms, {"vs_dense": ms / dense_ms})

    # ---- Fused AdamW at 5.8% of a 1280x1280 weight (and 5.8% of 860M/64 for a bandwidth row) ----
    def adamw_rows(numel):
        weight = torch.randn(numel, device=device, dtype=dtype)
        index = _index(numel, 0.058, device)
        k = index.numel()
        base = weight[index.long()].clone()
        delta, grad = torch.zeros(k, device=device), torch.randn(k, device=device)
        m, v = torch.zeros(k, device=device), torch.zeros(k, device=device)
        moved = k * (4 * 3 * 2 + 4 + 2 * weight.element_size() + index.element_size())
        copy_src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        copy_dst = torch.empty_like(copy_src)
        copy_ms = _bench(lambda: copy_dst.copy_(copy_src), device, reps)
        record("adamw", f"k={k}", 0.058, "copy of same bytes", copy_ms, {"bytes": moved})
        twin = torch.zeros(k, device=device, requires_grad=True)
        twin.grad = grad
        opt = torch.optim.AdamW([twin], lr=1e-4, fused=(device == "cuda") or None)

        def torch_adamw():
            opt.step()
            weight.index_put_((index.long(),), (base.float() + twin.detach()).to(weight.dtype))

        torch_ms = _bench(torch_adamw, device, reps)
        record("adamw", f"k={k}", 0.058, "torch AdamW+index_put_", torch_ms, {"bytes": moved})
        for backend in backends:

            def run(backend=backend):
                with sara_kernels.use_backend(backend), sara_kernels.index_checks(False):
                    sk.sparse_adamw_(weight, index, base, delta, grad, m, v, step=1.0, lr=1e-4)

            ms = _bench(run, device, reps)
            record(
                "adamw",
                f"k={k}",
                0.058,
                f"{backend}",
                ms,
                {
                    "bytes": moved,
                    "GB/s": moved / ms / 1e6,
                    "vs_copy": ms / copy_ms,
                    "vs_torch": ms / torch_ms,
                },
            )

    for numel in (1280 * 1280 // scale, (1 << 24) // scale):
        adamw_rows(numel)

    info = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "backends": sara_kernels.backends()["available"],
        "rows": rows,
    }
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {path}")
    # Short summary last: best variant per (kind, shape, density) against the dense baseline.
    print(f"\nsummary on {info['device']} ({args.dtype}): best sampled variant vs dense weight grad")
    best = {}
    for row in rows:
        if row["kind"] in ("linear", "conv") and "vs_dense" in row:
            key = (row["shape"], row["density"])
            if key not in best or row["ms"] < best[key]["ms"]:
                best[key] = row
    for (shape, density), row in best.items():
        print(
            f"  {shape:<28} {density:>7.3%}  {row['variant']:<16} {row['ms']:9.3f} ms  x{row['vs_dense']:.2f} dense"
        )
    return 0 if all(math.isfinite(r["ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
