"""What keeping SaRA layers trainer-safe costs, and how apply_sara scales with the layer count.

    python benchmarks/bench_trainer_overhead.py            # ~1 minute on 2 CPU cores
    python benchmarks/bench_trainer_overhead.py --quick    # smoke run

Three sections, one thread, printed as tables and written to
``benchmarks/results/trainer_overhead_cpu.json``:

1. **apply_sara vs the number of layers**: seconds to convert a stack of N small Linear layers
   (16x16) under the threshold rule, a global budget and a per-layer budget, N = 250 ... 2000.
   Linear in N means the seconds per layer stay flat.
2. **Host cost per layer** of the mechanisms that keep the merged invariant (282 Linear 64x64
   layers, k = 200 each): the consistency check every forward runs before using the weight (on a
   merged layer: nothing else to do), the global optimizer post-step hook after ``SparseAdamW``
   (it only looks: the fused step wrote the weight) and after ``torch.optim.AdamW`` (it merges the
   k entries of every stepped layer right away, where the forward used to do it lazily).
3. **Share of a real step**: the tiny diffusers UNet of ``bench_unet.py`` (batch 2, 32x32 latents,
   fp32) trained with ``SparseAdamW`` and with ``torch.optim.AdamW``: the median step time, and the
   median time spent inside the checks and the post-step hook in those same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.optim import optimizer as optim_module

import sara_kernels as sk
from sara_kernels import nn as sk_nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _bench(fn, calls: int, warmup: int = 20) -> float:
    """Microseconds per call (mean over a timed loop)."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def apply_sara_scaling(sizes: list[int], rounds: int) -> list[dict]:
    rules = {
        "threshold": dict(threshold=0.05),
        "global fraction": dict(fraction=0.05),
        "per-layer fraction": dict(fraction=0.05, budget_scope="per_layer"),
    }
    rows = []
    for n in sizes:
        for rule, config in rules.items():
            times = []
            for r in range(rounds):
                torch.manual_seed(r)
                model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(n)])
                start = time.perf_counter()
                sk.apply_sara(model, sk.SaRAConfig(**config))
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            rows.append({"layers": n, "rule": rule, "seconds": median, "us_per_layer": median / n * 1e6})
    return rows


def host_costs(layers: int, features: int, k: int, calls: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(features, features) for _ in range(layers)])
    sk.apply_sara(model, sk.SaRAConfig(count=k, budget_scope="per_layer"))
    deltas = sk.sparse_parameters(model)
    for p in deltas:
        p.grad = torch.randn_like(p)
    one = model[0]
    fused = sk.SparseAdamW(deltas, lr=1e-4)
    plain = torch.optim.AdamW(deltas, lr=1e-4, foreach=True)
    fused.step()
    plain.step()
    hook = sk_nn._after_optimizer_step
    return {
        "forward check (merged layer), per layer": _bench(one._maybe_merge, calls * 10),
        "post-step hook after SparseAdamW, per layer": _bench(lambda: hook(fused, (), {}), calls) / layers,
        "post-step hook + merge after torch AdamW, per layer": _bench(lambda: hook(plain, (), {}), calls)
        / layers,
        "merge_ alone (k entries), per layer": _bench(one.merge_, calls * 10),
    }


class _Timer:
    """Accumulates the time spent inside wrapped functions."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def unet_share(steps: int) -> dict:
    import _unet_bench as ub

    config, size, batch, tokens, _ = ub.WORKLOADS["tiny"]
    results = {}
    for name in ("SparseAdamW", "torch AdamW"):
        unet = ub.build_model("tiny", None, seed=0)
        sk.apply_sara(unet, sk.SaRAConfig(fraction=0.058))
        deltas = sk.sparse_parameters(unet)
        opt = sk.SparseAdamW(deltas, lr=1e-4) if name == "SparseAdamW" else torch.optim.AdamW(deltas, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(batch, 4, size, size, generator=g)
        cond = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        timer = _Timer()
        check, hook = sk_nn._SparseDeltaMixin._check_state, sk_nn._after_optimizer_step
        sk_nn._SparseDeltaMixin._check_state = timer.wrap(check)
        hooks = optim_module._global_optimizer_post_hooks  # the library's hook, timed in place
        key = next(key for key, value in hooks.items() if value is hook)
        hooks[key] = timer.wrap(hook)
        step_times, mechanism = [], []
        try:
            for i in range(steps + 1):
                timer.seconds = 0.0
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.mse_loss(unet(latents, t, cond).sample, latents).backward()
                opt.step()
                elapsed = time.perf_counter() - start
                if i:  # the first step warms up
                    step_times.append(elapsed)
                    mechanism.append(timer.seconds)
        finally:
            sk_nn._SparseDeltaMixin._check_state = check
            hooks[key] = hook
        step, cost = statistics.median(step_times), statistics.median(mechanism)
        results[name] = {
            "step_ms": step * 1e3,
            "mechanism_ms": cost * 1e3,
            "share": cost / step,
            "layers": len(list(sk.sparse_layers(unet))),
            "k": unet.sara_summary.total_k,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "trainer_overhead_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [50, 100] if args.quick else [250, 500, 1000, 2000]
    scaling = apply_sara_scaling(sizes, rounds=1 if args.quick else 3)
    print(f"{'apply_sara':<22} {'layers':>7} {'seconds':>9} {'us/layer':>9}")
    for row in scaling:
        print(f"{row['rule']:<22} {row['layers']:>7} {row['seconds']:>9.3f} {row['us_per_layer']:>9.1f}")
    costs = host_costs(layers=20 if args.quick else 282, features=64, k=200, calls=20 if args.quick else 200)
    print()
    for name, us in costs.items():
        print(f"{name:<55} {us:8.2f} us")
    share = {} if args.quick else unet_share(steps=5)
    if share:
        print()
        print(f"{'tiny UNet step':<14} {'step ms':>9} {'checks+hook ms':>15} {'share':>7}")
        for name, r in share.items():
            print(f"{name:<14} {r['step_ms']:>9.1f} {r['mechanism_ms']:>15.2f} {r['share']:>7.2%}")
    result = {
        "machine": "CPU, 1 thread",
        "command": "python benchmarks/bench_trainer_overhead.py" + (" --quick" if args.quick else ""),
        "apply_sara": scaling,
        "host_us": costs,
        "tiny_unet_step": share,
    }
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
