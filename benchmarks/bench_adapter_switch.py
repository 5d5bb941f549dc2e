"""Serving many adapters on one UNet: the time to switch adapters and the steady forward time.

    python benchmarks/bench_adapter_switch.py                      # SD1.5's real UNet config, CPU, fp32 (~6 min on 2 cores)
    python benchmarks/bench_adapter_switch.py --workload tiny      # the small UNet of bench_unet.py (smoke test)

Three adapters of one size (``--budget``, default 5.8% of the Linear+Conv2d weight entries) on a
UNet built from its config (random weights rescaled like bench_unet.py; no download), each method
in a fresh process:

  sara   sara_kernels named adapters: ``load_adapter(adapter_name=)`` x3, then
         ``set_adapters`` to one adapter after another, to a three-adapter mix, and
         ``disable_adapters``; the layers stay plain nn.Linear/nn.Conv2d.
  lora   PEFT LoRA through diffusers (``unet.add_adapter`` x3, rank matched to the same budget over
         bench_unet.py's LoRA targets): unfused ``set_adapters`` (one adapter, the mix), and
         ``fuse_lora`` / ``unfuse_lora`` (a fused switch = unfuse + set_adapters + fuse).

The SaRA adapters sit at random entries of each layer (k per layer as ``apply_sara`` selects),
a different draw per adapter: the union of three adapters is close to 3k, the costly case for a
switch (adapters trained with one threshold on one base share most entries). Reported per state:
the median switch time (each switch timed alone, ``--switches`` of them) and the median forward
time (``--repeats`` forwards, batch 1, ``--latent`` latents, 77 text tokens, under
``torch.no_grad``), the base model's forward measured in the same process, and the bytes each
adapter keeps resident. Output: a table, JSON (default
``benchmarks/results/adapter_switch_<workload>_<device>.json``) and a PNG chart next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _unet_bench as ub  # noqa: E402
import torch  # noqa: E402

MiB = 1024 * 1024
NAMES = ("a", "b", "c")
MIX = (0.5, 0.3, 0.2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workload", default="sd15", choices=sorted(n for n, w in ub.WORKLOADS.items() if w.family == "unet")
    )
    p.add_argument("--methods", default="sara,lora")
    p.add_argument("--budget", type=float, default=0.058, help="adapter size: share of Linear+Conv2d entries")
    p.add_argument(
        "--latent",
        type=int,
        default=None,
        help="latent side (default: 32 for sd15, the workload's own for tiny)",
    )
    p.add_argument("--repeats", type=int, default=5, help="forwards timed per state")
    p.add_argument("--switches", type=int, default=6, help="switches timed per kind")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker helpers
# ---------------------------------------------------------------------------------------------
def _inputs(args, model):
    workload = ub.WORKLOADS[args.workload]
    config, latent, tokens = workload.config, workload.latent, workload.tokens
    side = args.latent or (32 if args.workload == "sd15" else latent)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, config["in_channels"], side, side, generator=g)
    text = torch.randn(1, tokens, config["cross_attention_dim"], generator=g)
    t = torch.tensor([500])
    return lambda: model(x, t, text).sample, side


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _forward_ms(forward, repeats: int, warmup: int = 1) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            forward()
        return ub.summarize([_timed(forward) for _ in range(repeats)])


def _budget(model, share: float) -> int:
    return int(round(share * sum(m.weight.numel() for _, m in ub.linear_conv_layers(model))))


def _switch_ms(switch, states, count: int) -> dict:
    """Median time of ``switch(state)``, cycling through ``states`` (the first call untimed)."""
    switch(states[-1])
    times = []
    for i in range(count):
        state = states[i % len(states)]
        times.append(_timed(lambda: switch(state)))  # noqa: B023 - called right away
    return ub.summarize(times)


def _checksum(model) -> float:
    with torch.no_grad():
        return float(sum(m.weight.double().sum() for _, m in ub.linear_conv_layers(model)))


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
def _make_sara_adapters(base, K: int, seed: int, directory: str) -> list[str]:
    import sara_kernels as sk

    trained = sk.apply_sara(copy.deepcopy(base), sk.SaRAConfig(count=K))
    layers = list(sk.sparse_layers(trained))
    paths = []
    for i, name in enumerate(NAMES):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        for _, layer in layers:
            numel = layer.weight.numel()
            index = torch.randperm(numel, generator=g)[: layer.k].sort().values.to(torch.int32)
            delta = torch.randn(layer.k, generator=g) * 1e-3
            layer.set_entries_(index, delta)
        path = os.path.join(directory, f"{name}.safetensors")
        sk.save_adapter(trained, path)
        paths.append(path)
    del trained, layers
    ub.malloc_trim()
    return paths


def worker_sara(args, model, forward) -> dict:
    import sara_kernels as sk

    K = _budget(model, args.budget)
    base_sum = _checksum(model)
    out = {"budget_entries": K}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        paths = _make_sara_adapters(model, K, args.seed, d)
        out["make_adapters_s"] = time.perf_counter() - t0
        out["file_bytes"] = [os.path.getsize(p) for p in paths]
        rss0 = ub.rss_bytes()
        loads = []
        for name, path in zip(NAMES, paths, strict=True):
            loads.append(_timed(lambda n=name, p=path: sk.load_adapter(model, p, adapter_name=n)))
        out["load_ms"] = ub.summarize(loads)
    ub.malloc_trim()
    from sara_kernels import multi_adapter

    listed = sk.list_adapters(model)
    out["entries_per_adapter"] = [listed[n]["entries"] for n in NAMES]
    out["resident_bytes_per_adapter"] = [listed[n]["bytes"] for n in NAMES]
    out["resident_bytes_total"] = multi_adapter.resident_bytes(model)
    out["rss_growth_bytes"] = ub.rss_bytes() - rss0
    singles = [[n] for n in NAMES]
    out["switch_single_ms"] = _switch_ms(lambda s: sk.set_adapters(model, s), singles, args.switches)
    sk.set_adapters(model, "a")
    out["forward_single_ms"] = _forward_ms(forward, args.repeats)
    out["switch_mix_ms"] = _switch_ms(
        lambda s: sk.set_adapters(model, *s), [(list(NAMES), list(MIX)), (["a"], [1.0])], args.switches
    )
    sk.set_adapters(model, list(NAMES), list(MIX))
    out["forward_mix_ms"] = _forward_ms(forward, args.repeats)
    out["disable_ms"] = _switch_ms(lambda s: sk.set_adapters(model, s), [[], ["b"]], args.switches)
    sk.disable_adapters(model)
    out["base_restored_checksum_equal"] = _checksum(model) == base_sum
    out["base_checksum_drift"] = _checksum(model) - base_sum
    out["forward_disabled_ms"] = _forward_ms(forward, args.repeats)
    return out


def worker_lora(args, model, forward) -> dict:
    import peft

    K = _budget(model, args.budget)
    targets = ub.linear_conv_layers(model, targets=ub.LORA_TARGETS)
    r = ub.lora_rank(targets, K)
    out = {"budget_entries": K, "rank": r, "targeted_layers": len(targets), "peft_version": peft.__version__}
    rss0 = ub.rss_bytes()
    base_sum = _checksum(model)
    t0 = time.perf_counter()
    for i, name in enumerate(NAMES):
        config = peft.LoraConfig(
            r=r, lora_alpha=r, lora_dropout=0.0, target_modules=ub.LORA_TARGETS, init_lora_weights=True
        )
        model.add_adapter(config, adapter_name=name)
        g = torch.Generator().manual_seed(args.seed * 1000 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}." in pname or f"lora_A.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * (1e-2 if "lora_A" in pname else 1e-3))
    out["add_adapters_s"] = time.perf_counter() - t0
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    out["resident_bytes_total"] = sum(p.numel() * p.element_size() for p in lora_params)
    out["resident_bytes_per_adapter"] = [
        sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if f".{name}." in n and "lora_" in n
        )
        for name in NAMES
    ]
    out["entries_per_adapter"] = [b // 4 for b in out["resident_bytes_per_adapter"]]
    ub.malloc_trim()
    out["rss_growth_bytes"] = ub.rss_bytes() - rss0

    singles = [[n] for n in NAMES]
    out["switch_single_ms"] = _switch_ms(lambda s: model.set_adapters(s, [1.0]), singles, args.switches)
    model.set_adapters(["a"], [1.0])
    out["forward_single_ms"] = _forward_ms(forward, args.repeats)
    out["switch_mix_ms"] = _switch_ms(
        lambda s: model.set_adapters(*s), [(list(NAMES), list(MIX)), (["a"], [1.0])], args.switches
    )
    model.set_adapters(list(NAMES), list(MIX))
    out["forward_mix_ms"] = _forward_ms(forward, args.repeats)

    # Fused: the forward of the base; a switch is unfuse + select + fuse (a dense pass each way).
    def fused_switch(names):
        model.unfuse_lora()
        model.set_adapters(names, [1.0] * len(names))
        model.fuse_lora(adapter_names=names)

    model.set_adapters(["a"], [1.0])
    out["fuse_ms"] = ub.summarize([_timed(lambda: model.fuse_lora(adapter_names=["a"]))])
    out["forward_fused_ms"] = _forward_ms(forward, args.repeats)
    out["unfuse_ms"] = ub.summarize([_timed(model.unfuse_lora)])
    model.fuse_lora(adapter_names=["a"])
    out["switch_fused_ms"] = _switch_ms(fused_switch, singles, max(2, args.switches // 2))
    model.unfuse_lora()
    model.disable_adapters()
    out["forward_disabled_ms"] = _forward_ms(forward, args.repeats)
    # fuse_lora + unfuse_lora adds and subtracts B·A in the weight's dtype: not exact.
    out["base_restored_checksum_equal"] = _checksum(model) == base_sum
    out["base_checksum_drift"] = _checksum(model) - base_sum
    return out


def run_worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ub.build_model(args.workload, None, args.seed).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forward, side = _inputs(args, model)
    result = {"method": args.worker, "latent": side, "threads": torch.get_num_threads()}
    result["forward_base_ms"] = _forward_ms(
        forward, args.repeats, warmup=3
    )  # the first forwards of a process are slow
    ub.malloc_trim()
    result.update({"sara": worker_sara, "lora": worker_lora}[args.worker](args, model, forward))
    result["peak_rss_bytes"] = ub.peak_rss_bytes()
    return result


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _med(row: dict, key: str):
    value = row.get(key)
    return value.get("median") if isinstance(value, dict) else None


def _ms(v) -> str:
    return "-" if v is None else (f"{v:,.1f}" if v < 100 else f"{v:,.0f}")


def table(results: dict) -> str:
    lines = [
        "| method | state | switch (ms, median) | forward (ms, median) | forward / base | resident per adapter (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for method, row in results.items():
        base = _med(row, "forward_base_ms")
        per = row.get("resident_bytes_per_adapter") or [0]
        states = [
            ("base model (no adapter)", None, "forward_base_ms"),
            ("one adapter (a → b → c)", "switch_single_ms", "forward_single_ms"),
            ("mix of three (0.5/0.3/0.2)", "switch_mix_ms", "forward_mix_ms"),
        ]
        if method == "lora":
            states.append(("fused one adapter (unfuse+set+fuse)", "switch_fused_ms", "forward_fused_ms"))
        states.append(("disabled", "disable_ms", "forward_disabled_ms"))
        for label, switch_key, forward_key in states:
            fwd = _med(row, forward_key)
            ratio = f"{fwd / base:.2f}×" if fwd and base else "-"
            switch = _med(row, switch_key) if switch_key else None
            lines.append(
                f"| {method} | {label} | {_ms(switch)} | {_ms(fwd)} | {ratio} | {max(per) / MiB:,.1f} |"
            )
    return "\n".join(lines)


def chart(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bars = []
    for method, row in results.items():
        bars.append((f"{method}\none", _med(row, "switch_single_ms")))
        bars.append((f"{method}\nmix of 3", _med(row, "switch_mix_ms")))
        if method == "lora":
            bars.append(("lora fused\none", _med(row, "switch_fused_ms")))
    labels, values = zip(*[(k, v) for k, v in bars if v is not None], strict=True)
    ax1.bar(labels, values, color=["#2a7" if "sara" in k else "#c73" for k in labels])
    ax1.set_yscale("log")
    ax1.set_ylabel("switch time (ms, median, log)")
    ax1.set_title("switching adapters")
    fwd = []
    for method, row in results.items():
        base = _med(row, "forward_base_ms")
        for key, label in (
            ("forward_single_ms", "one"),
            ("forward_mix_ms", "mix of 3"),
            ("forward_fused_ms", "fused"),
        ):
            if _med(row, key) and base:
                fwd.append((f"{method}\n{label}", _med(row, key) / base))
    labels, values = zip(*fwd, strict=True)
    ax2.bar(labels, values, color=["#2a7" if "sara" in k else "#c73" for k in labels])
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("forward time / base model's")
    ax2.set_title("steady forward")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return 0
    device = "cpu"
    out = args.out or os.path.join(HERE, "results", f"adapter_switch_{args.workload}_{device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        argv_worker = [sys.executable, os.path.abspath(__file__), "--worker", method]
        for flag in ("workload", "budget", "latent", "repeats", "switches", "threads", "seed"):
            value = getattr(args, flag)
            if value is not None:
                argv_worker += [f"--{flag}", str(value)]
        t0 = time.perf_counter()
        proc = subprocess.run(argv_worker, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"worker {method} failed (exit {proc.returncode})")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[{method}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report = {
        "benchmark": "adapter_switch",
        "workload": args.workload,
        "device": device,
        "command": "python benchmarks/bench_adapter_switch.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": ub.environment(),
        "budget": args.budget,
        "mix_weights": list(MIX),
        "results": results,
    }
    text = (
        table(results)
        + "\n\nbase weights restored exactly after the switches (sum over every weight, fp64): "
        + ", ".join(
            f"{m}: {'yes' if r.get('base_restored_checksum_equal') else 'no (drift ' + format(r.get('base_checksum_drift', 0), '.3g') + ')'}"
            for m, r in results.items()
        )
    )
    print(text)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    if not args.no_chart:
        png = os.path.splitext(out)[0] + ".png"
        chart(
            results, png, f"{len(NAMES)} adapters at {args.budget:.1%} on the {args.workload} UNet ({device})"
        )
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
