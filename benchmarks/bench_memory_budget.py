"""Training memory against the trainable budget: which methods grow with k, which with the weight.

    python benchmarks/bench_memory_budget.py                 # tiny UNet, CPU, budgets 0.6/2.3/5.8/20% (~10 min on 2 cores)
    python benchmarks/bench_memory_budget.py --budgets 0.01,0.1 --methods sara,dense_mask

For each budget K (a share of the Linear+Conv2d weight entries) every method runs in a fresh
process through ``bench_unet.py``'s worker (same workload, methods and measurement definitions:
``benchmarks/_unet_bench.py``): peak training memory (peak RSS minus the built model's) and
training-state bytes (trainable parameters + grads + optimizer state + mask/index/base buffers).
Methods: sara (every Linear/Conv2d), lora (rank matched to K), supertuning, shira and sara_linear
(the attention linears only, the same K), dense_mask (dense trainable weights and bool masks, as
the official SaRA code), and frozen once as the floor. Output: a table, JSON and one PNG chart
(default benchmarks/results/memory_budget_<workload>_cpu.json / .png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _unet_bench as ub  # noqa: E402
import bench_unet  # noqa: E402

MiB = 1024 * 1024
METHODS = ("sara", "lora", "supertuning", "shira", "sara_linear", "dense_mask")
KEEP = (
    "trainable",
    "K",
    "K_linear",
    "state_bytes",
    "state_parts",
    "peak_overhead_bytes",
    "peak_bytes",
    "baseline_bytes",
    "model_param_bytes",
    "linear_conv_entries",
    "attn_linear_entries",
    "info",
    "error",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(ub.WORKLOADS), default="tiny", help="default tiny (the UNet)")
    p.add_argument(
        "--budgets", default="0.006,0.023,0.058,0.2", help="comma-separated shares (default 0.6/2.3/5.8/20%%)"
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated (default: " + ",".join(METHODS) + ")"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/memory_budget_<workload>_cpu.json)"
    )
    p.add_argument("--no-charts", action="store_true", help="skip the PNG chart")
    args = p.parse_args(argv)
    args.budget_list = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def worker_args(args, budget: float, methods: list[str]):
    # Memory only: two training steps (the peak and the state are those of the first step, when
    # the optimizer state is created while the gradients are alive), no forward timing, no save.
    return bench_unet.parse_args(
        [
            "--workload",
            args.workload,
            "--warmup",
            "1",
            "--steps",
            "1",
            "--fwd-steps",
            "0",
            "--no-adapter-size",
            "--budget",
            repr(budget),
            "--methods",
            ",".join(methods),
            "--no-charts",
        ]
        + (["--threads", str(args.threads)] if args.threads else [])
    )


def table(doc: dict) -> str:
    methods = doc["methods"]
    head = f"{'budget':>7} {'K':>10} | " + " | ".join(f"{m:>17}" for m in methods)
    lines = [f"{'':>20}" + "   ".join(f"{'state / peak MiB':>17}" for _ in methods), head, "-" * len(head)]
    for b, row in doc["budgets"].items():
        cells = []
        for m in methods:
            r = row.get(m, {})
            cells.append(
                f"{'FAILED':>17}"
                if "error" in r or not r
                else f"{r['state_bytes'] / MiB:8.1f} /{r['peak_overhead_bytes'] / MiB:7.1f}"
            )
        k = next((r["K"] for r in row.values() if "K" in r), 0)
        lines.append(f"{float(b):7.1%} {k:>10,} | " + " | ".join(cells))
    return "\n".join(lines)


def chart(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [float(b) for b in doc["budgets"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {
        "sara": ("#d62728", "o-"),
        "sara_linear": ("#ff9896", "o--"),
        "lora": ("#1f77b4", "s-"),
        "supertuning": ("#2ca02c", "^-"),
        "shira": ("#9467bd", "v-"),
        "dense_mask": ("#7f7f7f", "D-"),
    }
    for m in doc["methods"]:
        color, style = styles.get(m, ("k", ".-"))
        xs, peaks, states = [], [], []
        for b, key in zip(budgets, doc["budgets"], strict=True):
            r = doc["budgets"][key].get(m, {})
            if r and "error" not in r:
                xs.append(100 * b)
                peaks.append(r["peak_overhead_bytes"] / MiB)
                states.append(r["state_bytes"] / MiB)
        ax1.plot(xs, peaks, style, color=color, label=m)
        ax2.plot(xs, states, style, color=color, label=m)
    frozen = doc.get("frozen") or {}
    if "peak_overhead_bytes" in frozen:
        ax1.axhline(frozen["peak_overhead_bytes"] / MiB, color="k", ls=":", lw=1, label="frozen (floor)")
    weights = doc.get("linear_conv_weight_bytes")
    if weights:
        ax2.axhline(weights / MiB, color="k", ls=":", lw=1, label="Linear+Conv2d weights (one copy)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
        ax.set_xlabel("trainable share K of the Linear+Conv2d entries")
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.set_ylabel("MiB")
    ax1.set_title("peak training memory over the built model")
    ax2.set_title("training state: params + grads + optimizer + index/mask/base (log)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"{doc['workload']} on CPU (fp32, batch {doc.get('batch')}): memory against the budget", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or os.path.join(HERE, "results", f"memory_budget_{args.workload}_cpu.json")
    t0 = time.perf_counter()
    print(
        f"memory against budget: workload={args.workload} budgets={args.budgets} methods={','.join(args.method_list)}"
    )
    doc = {
        "benchmark": "bench_memory_budget",
        "workload": args.workload,
        "methods": args.method_list,
        "command": " ".join(
            [os.path.relpath(__file__, os.getcwd())] + (sys.argv[1:] if argv is None else argv)
        ),
        "environment": ub.environment(),
        "definitions": ub.__doc__,
        "budgets": {},
    }
    frozen_args = worker_args(args, args.budget_list[0], ["frozen"])
    frozen = bench_unet.run_method(frozen_args, "frozen", 0, bench_unet.Progress(1))
    doc["frozen"] = {k: frozen[k] for k in KEEP if k in frozen}
    doc["batch"] = frozen.get("batch")
    doc["linear_conv_weight_bytes"] = frozen.get("linear_conv_entries", 0) * 4 or None
    for b in args.budget_list:
        print(f"\nbudget {b:.1%}:")
        wargs = worker_args(args, b, args.method_list)
        progress = bench_unet.Progress(len(args.method_list))
        row = {}
        for i, m in enumerate(args.method_list, 1):
            r = bench_unet.run_method(wargs, m, i, progress)
            row[m] = {k: r[k] for k in KEEP if k in r}
        doc["budgets"][repr(b)] = row
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not args.no_charts:
        png = os.path.splitext(out)[0] + ".png"
        chart(doc, png)
        doc["chart"] = os.path.relpath(png, os.path.dirname(HERE))
    doc["wall_s"] = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print()
    print(table(doc))
    if "peak_overhead_bytes" in frozen:
        print(f"frozen (nothing trained) peak {frozen['peak_overhead_bytes'] / MiB:.1f} MiB")
    print(
        "state = params + grads + optimizer state + mask/index/base buffers; peak = peak RSS minus the built model's"
    )
    print(
        f"\nwrote {os.path.relpath(out)}"
        + (f", {doc['chart']}" if "chart" in doc else "")
        + f" in {doc['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
