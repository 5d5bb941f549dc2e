"""Per-call overhead of a sparse-delta layer against the dense layer (small shapes, one thread).

    python benchmarks/bench_layer_overhead.py

Prints microseconds per call (the median of --repeats timed loops) for: nn.Linear forward,
SparseDeltaLinear forward, the op sara_kernels.sparse_linear forward, and forward + backward of
the dense and sparse layers, with the sparse/dense ratios. Small shapes make the Python and
dispatcher cost visible. Writes benchmarks/results/layer_overhead_cpu.json (--out).

Then one optimizer step over --layers such layers (282: SD 1.5's Linear/Conv2d count), per layer:
SparseAdamW (all layers in one sparse_adamw_multi_ call), SparseAdamW(foreach=False) (one
sparse_adamw_ call per layer) and torch.optim.AdamW(foreach=True) on the same deltas (without the
re-merge its next forward adds). The update of --k entries is tiny; what is left is the host cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import sara_kernels as sk


def _bench(fn, n: int, repeats: int = 1) -> float:
    """Microseconds per call: the median over ``repeats`` loops of ``n`` calls (after a warm-up)."""
    for _ in range(50):
        fn()
    loops = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        loops.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(loops)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=282, help="layers in the optimizer-step rows")
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per row (the median is reported)")
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "layer_overhead_cpu.json"
        ),
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = args.features
    dense = torch.nn.Linear(f, f)
    sparse = sk.SparseDeltaLinear.from_dense(torch.nn.Linear(f, f), k=args.k)
    x = torch.randn(args.tokens, f, requires_grad=True)
    r = args.repeats
    op_args = (x, sparse.weight, sparse.bias, sparse.sparse_index, sparse.sparse_delta)
    rows = {
        "dense forward": _bench(lambda: dense(x), args.calls, r),
        "sparse layer forward": _bench(lambda: sparse(x), args.calls, r),
        "registered op forward": _bench(lambda: sk.ops.sparse_linear(*op_args), args.calls, r),
        "dense forward+backward": _bench(lambda: dense(x).sum().backward(), args.calls, r),
        "sparse layer forward+backward": _bench(lambda: sparse(x).sum().backward(), args.calls, r),
    }
    ratios = {
        "forward": rows["sparse layer forward"] / rows["dense forward"],
        "forward+backward": rows["sparse layer forward+backward"] / rows["dense forward+backward"],
    }
    model = torch.nn.Sequential(*[torch.nn.Linear(f, f) for _ in range(args.layers)])
    sk.apply_sara(model, sk.SaRAConfig(count=args.k, budget_scope="per_layer"))
    model(torch.randn(1, f))  # the first forward registers each delta's layer for the fused step
    deltas = sk.sparse_parameters(model)
    for p in deltas:
        p.grad = torch.randn_like(p)
    optimizers = {
        "SparseAdamW step": sk.SparseAdamW(deltas, lr=1e-4),
        "SparseAdamW(foreach=False) step": sk.SparseAdamW(deltas, lr=1e-4, foreach=False),
        "torch AdamW(foreach) step": torch.optim.AdamW(deltas, lr=1e-4, foreach=True),
    }
    for name, opt in optimizers.items():
        rows[f"{name}, per layer"] = _bench(opt.step, args.steps, r) / args.layers
    for name, us in rows.items():
        print(f"{name:<40} {us:8.1f} us")
    for name, ratio in ratios.items():
        print(f"sparse layer / nn.Linear, {name:<24} {ratio:8.2f}x")
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": 1,
            "torch": torch.__version__,
        },
        "args": vars(args),
        "us_per_call": rows,
        "sparse_over_dense": ratios,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
