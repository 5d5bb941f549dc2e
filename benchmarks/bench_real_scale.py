"""One training step at real model size on a CPU machine: peak memory and step time of SaRA, LoRA
and full fine-tuning, bf16, batch 1, small resolution.

    python benchmarks/bench_real_scale.py                        # SD1.5 UNet, then SD3-medium's transformer
    python benchmarks/bench_real_scale.py --models sd15          # one model (results merged into the JSON)
    python benchmarks/bench_real_scale.py --memory-cap-gib 12    # a smaller cap per method

The models are built from their published configs with random weights (no download): ``sd15``
is SD1.5's UNet2DConditionModel (block_out_channels 320/640/1280/1280, cross-attention 768,
attention_head_dim 8, layers_per_block 2; 860M parameters), ``sd3_medium`` is SD3-medium's
SD3Transformer2DModel (24 blocks of 24 heads x 64, joint_attention_dim 4096; 2.0B parameters).
Both configs live in ``benchmarks/_unet_bench.py`` (WORKLOADS), which also holds the methods and
the measurements; each method runs in a fresh process through ``bench_unet.py``'s worker, so the
definitions (peak = VmHWM minus the RSS of the built model, state = params + grads + optimizer
state + buffers) are those of ``bench_unet.py``.

Methods: ``sara`` (apply_sara(count=K) + SparseAdamW, K = --budget of every Linear/Conv2d
entry), ``lora`` (PEFT LoRA, rank matched to the same K; UNet: attention linears, proj_in/out,
resnet convs; DiT: attention and feed-forward linears) and ``full`` (torch.optim.AdamW on every
bf16 parameter: a pure-bf16 run, grads and moments in bf16, 8 bytes per parameter on top of the
weights; mixed precision with fp32 master weights needs 16 B/parameter more). ``full`` runs
last. Every worker is held to ``--memory-cap-gib`` of resident memory (an address-space limit
set after the build, and this process stops a worker whose RSS passes the cap); a method that
does not fit is reported as such, with the bytes its state would need.
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

GiB = 1024**3
MODELS = {
    # name: (workload, latent side: 32 = 256x256 pixels with the VAE's factor 8)
    "sd15": ("sd15", 32),
    "sd3_medium": ("sd3_medium", 32),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="sd15,sd3_medium", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument(
        "--methods", default="sara,lora,full", help="comma-separated bench_unet methods (full last)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.058,
        help="SaRA's K as a fraction of the Linear+Conv2d entries; LoRA's rank is matched to it (default 0.058)",
    )
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32, i.e. 256x256 pixels)")
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=16.0,
        help="resident-memory cap per worker (default 16, lowered to MemAvailable - 2 GiB)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed training steps per method (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=1500, help="seconds per worker (default 1500)")
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "results", "real_scale_cpu_bf16.json"),
        help="JSON, updated per model (default benchmarks/results/real_scale_cpu_bf16.json)",
    )
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.method_list = [m for m in methods if m != "full"] + (["full"] if "full" in methods else [])
    return args


def mem_available() -> int | None:
    kib = ub.proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024


def run_model(args, model: str, cap_gib: float) -> dict:
    workload, latent = MODELS[model]
    worker_args = bench_unet.parse_args(
        [
            "--workload",
            workload,
            "--dtype",
            "bf16",
            "--batch",
            "1",
            "--latent",
            str(args.latent or latent),
            "--budget",
            repr(args.budget),
            "--methods",
            ",".join(args.method_list),
            "--warmup",
            "1",
            "--steps",
            str(args.steps),
            "--fwd-steps",
            "1",
            "--memory-cap-gib",
            f"{cap_gib:.2f}",
            "--timeout",
            str(args.timeout),
            "--no-charts",
            "--no-adapter-size",
        ]
        + (["--threads", str(args.threads)] if args.threads else [])
    )
    progress = bench_unet.Progress(len(args.method_list))
    results = {}
    for i, method in enumerate(args.method_list, 1):
        results[method] = bench_unet.run_method(worker_args, method, i, progress)
    first = next((r for r in results.values() if "error" not in r), {})
    params = first.get("model_params")
    return {
        "workload": workload,
        "latent": args.latent or latent,
        "pixels": 8 * (args.latent or latent),
        "batch": 1,
        "dtype": "bf16",
        "memory_cap_gib": cap_gib,
        "model_params": params,
        "model_param_bytes": first.get("model_param_bytes"),
        # full fine-tuning in bf16 holds a grad and two AdamW moments per parameter next to the weight
        "full_state_bytes_needed": 3 * first["model_param_bytes"] if first.get("model_param_bytes") else None,
        "K": first.get("K"),
        "results": results,
    }


def table(doc: dict) -> str:
    head = (
        f"{'model':<11} {'params':>7} {'method':<6} {'trainable':>11} {'state GiB':>9} {'peak GiB':>8} "
        f"{'RSS GiB':>10} {'/full':>5} {'step s':>7} {'/full':>5} {'/lora':>5}"
    )
    lines = [head, "-" * len(head)]
    for model, m in doc["models"].items():
        rows = m["results"]
        ok = {k: r for k, r in rows.items() if "error" not in r}
        full, lora = ok.get("full"), ok.get("lora")
        for method, r in rows.items():
            prefix = f"{model:<11} {(m['model_params'] or 0) / 1e9:6.2f}B {method:<6}"
            if "error" in r:
                need = m.get("full_state_bytes_needed") if method == "full" else None
                lines.append(
                    prefix
                    + f" {r['error']}"
                    + (
                        f" (weights {m['model_param_bytes'] / GiB:.1f} GiB + grads and AdamW moments "
                        f"{need / GiB:.1f} GiB, before activations)"
                        if need
                        else ""
                    )
                )
                continue
            peak, step = r["peak_overhead_bytes"], r["step_ms"]["median"] / 1e3

            def ratio(value, ref, key):
                if ref is None:
                    return f"{'-':>5}"
                base = ref["peak_overhead_bytes"] if key == "peak" else ref["step_ms"]["median"] / 1e3
                return f"{value / base:5.2f}"

            lines.append(
                prefix + f" {r['trainable']:>11,} {r['state_bytes'] / GiB:9.2f} {peak / GiB:8.2f} "
                f"{r['peak_bytes'] / GiB:10.2f} {ratio(peak, full, 'peak')} {step:7.1f} "
                f"{ratio(step, full, 'step')} {ratio(step, lora, 'step')}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    available = mem_available()
    cap = args.memory_cap_gib
    if available is not None:
        cap = min(cap, available / GiB - 2)
    print(
        f"real-scale training step: models={','.join(args.model_list)} methods={','.join(args.method_list)} "
        f"bf16 batch 1 budget {args.budget:.1%}; memory cap {cap:.1f} GiB per worker "
        f"(MemAvailable {available / GiB if available else float('nan'):.1f} GiB); {os.cpu_count()} CPUs"
    )
    doc = {"benchmark": "bench_real_scale", "models": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    doc["definitions"] = ub.__doc__
    doc["environment"] = ub.environment()
    t0 = time.perf_counter()
    for model in args.model_list:
        print(f"\n{model}:")
        entry = run_model(args, model, cap)
        entry["command"] = " ".join(
            [os.path.relpath(__file__, os.getcwd())] + (sys.argv[1:] if argv is None else argv)
        )
        entry["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        entry["load_average_at_end"] = os.getloadavg()
        doc["models"][model] = entry
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print()
    print(table(doc))
    print(
        "state = params + grads + optimizer state + index/base buffers right after optimizer.step(); peak = peak "
        "RSS minus the built model's (RSS: the absolute peak RSS); step = median of the timed steps"
    )
    print(f"\nwrote {os.path.relpath(args.out)} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
