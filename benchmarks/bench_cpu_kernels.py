"""Time the C++/OpenMP CPU kernels of sara_kernels against the reference and dense baselines.

Run after building the extension (``pip install --no-build-isolation -e .``):

    python benchmarks/bench_cpu_kernels.py            # full sweep (~1-2 min on 2 cores)
    python benchmarks/bench_cpu_kernels.py --quick    # fewer shapes and runs

Each time is the median (or, with ``--stat min``, the minimum) of ``--repeat`` runs after
``--warmup`` runs (time.perf_counter), in ms; the JSON holds both.
The native ops are timed through the dispatcher (``torch.ops.sara_kernels.*`` under
``sara_kernels.use_backend("cpu")``: the C++ kernel registered as the op's CPU kernel, which checks
its own inputs; no Python wrapper), each sampled-gradient variant forced with
``sara_kernels.use_grad_variant``; ``reference`` is ``sara_kernels.reference``. ``speedup`` is
reference time / time (>1: faster than the reference). The table is printed and written as JSON
to ``benchmarks/results/cpu_kernels.json``; the auto crossovers in csrc/cpu/sampled_grad_*.cpp
come from its direct vs gemm rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import sara_kernels
from sara_kernels import reference

VARIANTS = ("auto", "direct", "gemm")  # the CPU kernels' sampled-gradient variants
DENSITIES = (0.001, 0.01, 0.058, 0.2, 0.5)


#: Every timing as (median, min) in ms; the table shows STAT["name"] of the two.
STAT = {"name": "median"}


class Timing(float):
    """A time in ms (the chosen statistic) that also carries the other one."""

    median: float
    min: float


def timeit(fn, warmup: int, repeat: int) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med, low = statistics.median(times) * 1e3, min(times) * 1e3
    out = Timing(med if STAT["name"] == "median" else low)
    out.median, out.min = med, low
    return out


def random_index(numel: int, density: float, gen: torch.Generator) -> torch.Tensor:
    k = max(1, round(density * numel))
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, op: str, case: str, results: dict[str, float]) -> None:
        ref = results.get("reference")
        for method, ms in results.items():
            self.rows.append(
                {
                    "op": op,
                    "case": case,
                    "method": method,
                    "ms": float(ms),
                    "median_ms": getattr(ms, "median", float(ms)),
                    "min_ms": getattr(ms, "min", float(ms)),
                    "speedup_vs_reference": (ref / ms) if ref else None,
                }
            )
        cells = "  ".join(
            f"{m}={ms:8.3f}" + (f" ({ref / ms:5.1f}x)" if ref and m != "reference" else "")
            for m, ms in results.items()
        )
        print(f"{op:28s} {case:34s} {cells}", flush=True)


def bench_linear(table: Table, args, gen: torch.Generator) -> None:
    native = torch.ops.sara_kernels.sampled_weight_grad_linear
    shapes = [(320, 320, 512), (640, 640, 512)]
    if not args.quick:
        shapes.append((1280, 1280, 512))
    for out_f, in_f, n in shapes:
        g = torch.randn(n, out_f, generator=gen)
        x = torch.randn(n, in_f, generator=gen)
        dense = timeit(lambda: g.t() @ x, args.warmup, args.repeat)
        for density in DENSITIES:
            index = random_index(out_f * in_f, density, gen)
            results = {}
            for name in VARIANTS:
                with sara_kernels.use_grad_variant(name):
                    results[f"cpp_{name}"] = timeit(
                        lambda: native(g, x, index, out_f, in_f), args.warmup, args.repeat
                    )
            results["reference"] = timeit(
                lambda: reference.sampled_weight_grad_linear(g, x, index, out_f, in_f),
                args.warmup,
                args.repeat,
            )
            results["dense_gT_x"] = dense
            table.add("sampled_weight_grad_linear", f"{out_f}x{in_f} N={n} d={density:.1%}", results)


def bench_conv(table: Table, args, gen: torch.Generator) -> None:
    native = torch.ops.sara_kernels.sampled_weight_grad_conv2d
    # (C_in, C_out, H=W, groups)
    shapes = [(64, 64, 16, 1), (64, 64, 32, 1), (128, 128, 16, 1), (128, 128, 32, 1)]
    if args.quick:
        shapes = [(64, 64, 32, 1), (128, 128, 16, 1)]
    else:
        shapes.append((128, 128, 32, 128))  # depthwise
    for cin, cout, hw, groups in shapes:
        x = torch.randn(2, cin, hw, hw, generator=gen)
        wshape = [cout, cin // groups, 3, 3]
        weight = torch.randn(wshape, generator=gen)
        g = torch.randn(2, cout, hw, hw, generator=gen)
        conv = ([1, 1], [1, 1], [1, 1], groups)
        dense = timeit(
            lambda: torch.ops.aten.convolution_backward(
                g,
                x,
                weight,
                None,
                [1, 1],
                [1, 1],
                [1, 1],
                False,
                [0, 0],
                groups,
                [False, True, False],
            ),
            args.warmup,
            args.repeat,
        )
        for density in DENSITIES:
            index = random_index(weight.numel(), density, gen)
            results = {}
            for name in VARIANTS:
                with sara_kernels.use_grad_variant(name):
                    results[f"cpp_{name}"] = timeit(
                        lambda: native(g, x, index, wshape, *conv), args.warmup, args.repeat
                    )
            results["reference"] = timeit(
                lambda: reference.sampled_weight_grad_conv2d(g, x, index, wshape, *conv),
                args.warmup,
                args.repeat,
            )
            results["dense_conv_bwd"] = dense
            label = f"{cin}->{cout} {hw}x{hw} g={groups} d={density:.1%}"
            table.add("sampled_weight_grad_conv2d", label, results)


def bench_optim(table: Table, args, gen: torch.Generator) -> None:
    native = torch.ops.sara_kernels
    ks = (100_000,) if args.quick else (100_000, 1_000_000)
    for k in ks:
        numel = 4 * k
        weight = torch.randn(numel, generator=gen)
        index = torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)
        base = weight[index.long()].clone()
        delta = torch.zeros(k)
        grad = torch.randn(k, generator=gen) * 1e-2
        m, v = torch.zeros(k), torch.zeros(k)
        hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        steps = [0]

        def cpp():
            steps[0] += 1
            native.sparse_adamw_(weight, index, base, delta, grad, m, v, step=float(steps[0]), **hp)

        def ref():
            steps[0] += 1
            reference.sparse_adamw_(weight, index, base, delta, grad, m, v, step=float(steps[0]), **hp)

        param = torch.nn.Parameter(torch.zeros(k))
        param.grad = grad.clone()
        opt = torch.optim.AdamW(
            [param],
            lr=hp["lr"],
            betas=(hp["beta1"], hp["beta2"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
        )
        long_index = index.long()

        def torch_adamw():
            opt.step()
            weight.index_put_((long_index,), base + param.detach())

        results = {
            "cpp": timeit(cpp, args.warmup, args.repeat),
            "reference": timeit(ref, args.warmup, args.repeat),
            "torch_AdamW+index_put_": timeit(torch_adamw, args.warmup, args.repeat),
        }
        table.add("sparse_adamw_", f"k={k} (fp32 weight {numel})", results)

        results = {
            "cpp": timeit(
                lambda: native.scatter_merge_(weight, index, base, delta, 1.0), args.warmup, args.repeat
            ),
            "reference": timeit(
                lambda: reference.scatter_merge_(weight, index, base, delta, 1.0), args.warmup, args.repeat
            ),
        }
        table.add("scatter_merge_", f"k={k}", results)
        results = {
            "cpp": timeit(lambda: native.restore_(weight, index, base), args.warmup, args.repeat),
            "reference": timeit(lambda: reference.restore_(weight, index, base), args.warmup, args.repeat),
        }
        table.add("restore_", f"k={k}", results)


def bench_select(table: Table, args, gen: torch.Generator) -> None:
    native = torch.ops.sara_kernels.select_small_magnitude
    sizes = [(640, 640)] if args.quick else [(640, 640), (1280, 1280, 3, 3)]
    for shape in sizes:
        w = torch.randn(shape, generator=gen) * 0.02
        numel = w.numel()
        label = "x".join(map(str, shape))
        for mode, kwargs in (("threshold=2e-3", (2e-3, None)), ("k=5.8%", (None, round(0.058 * numel)))):
            results = {
                "cpp": timeit(lambda kw=kwargs: native(w, *kw), args.warmup, args.repeat),
                "reference": timeit(
                    lambda kw=kwargs: reference.select_small_magnitude(w, *kw), args.warmup, args.repeat
                ),
            }
            table.add("select_small_magnitude", f"{label} {mode}", results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and runs")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per case (default 3, quick 1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 15, quick 5)")
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic shown in the table (both go to the JSON); min is steadier on a shared machine",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--only",
        choices=("linear", "conv", "optim", "select"),
        action="append",
        help="run only these groups (repeatable)",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_kernels.json"),
        help="JSON output path",
    )
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeat = args.repeat if args.repeat is not None else (5 if args.quick else 15)
    STAT["name"] = args.stat
    if args.threads:
        torch.set_num_threads(args.threads)
    info = sara_kernels.backends()
    if not info["native"]["loaded"]:
        raise SystemExit(f"the native extension is not built: {info['native']['error']}")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"{args.stat} of {args.repeat} runs after {args.warmup} warm-up, ms (speedup vs reference)"
    )
    gen = torch.Generator().manual_seed(0)
    table = Table()
    groups = args.only or ["linear", "conv", "optim", "select"]
    # The native ops on the CPU kernels (refused, not silently replaced, if they cannot run).
    with sara_kernels.use_backend("cpu"):
        if "linear" in groups:
            bench_linear(table, args, gen)
        if "conv" in groups:
            bench_conv(table, args, gen)
        if "optim" in groups:
            bench_optim(table, args, gen)
        if "select" in groups:
            bench_select(table, args, gen)

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "processor": platform.processor(),
                "quick": args.quick,
                "stat": args.stat,
                "warmup": args.warmup,
                "repeat": args.repeat,
                "rows": table.rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
