"""Fine-tuning methods on a diffusers UNet or DiT: training memory, step time and adapter size.

    python benchmarks/bench_unet.py                                   # tiny UNet, CPU, every method (< 5 min on 2 cores)
    python benchmarks/bench_unet.py --quick --methods frozen,sara,lora  # smoke test (< 90 s)
    python benchmarks/bench_unet.py --workload flux_tiny              # tiny FluxTransformer2DModel, CPU, every method
    python benchmarks/bench_unet.py --workload sd3_tiny               # tiny SD3Transformer2DModel, CPU, every method
    python benchmarks/bench_unet.py --workload sd15 --device cuda     # SD 1.5 UNet config on a GPU
    python benchmarks/bench_unet.py --pretrained /path/to/sd15 --device cuda   # a local diffusers checkpoint

Every method runs in a fresh process (this script with ``--worker METHOD``, printing one JSON
object), so memory readings do not leak from one method into the next. The methods share one
trainable budget K (``--budget``, default 5.8% of the Linear+Conv2d weight entries):

  frozen            the floor: nothing trainable; the input latents require grad, so backward runs
                    through the whole net
  full              torch.optim.AdamW on every parameter
  lora              PEFT LoRA (attention linears, proj_in/out, resnet conv1/conv2), rank matched to K
  supertuning       PEFT Super-Tuning, select_top=False (smallest |w|), attention linears only
                    (to_q/k/v, to_out.0, ff), sparsity matched to K
                    (DiTs: LoRA, Super-Tuning, SHiRA and sara_linear all target the attention and
                    feed-forward linears of both streams: to_q/k/v, to_out.0, add_q/k/v_proj,
                    to_add_out, ff, ff_context, and Flux's proj_mlp/proj_out; see DIT_LINEARS)
  shira             PEFT SHiRA (random mask), attention linears only, r matched to K
  sara_linear       sara_kernels on the same attention linears with the same K: the like-for-like
                    row for supertuning / shira (see --linear-budget)
  dense_mask        the official SaRA code's scheme re-implemented here: dense trainable weights
                    (dense gradients), dense bool masks, gradient gathered at the mask, AdamW over
                    compact moments
  sara              sara_kernels: apply_sara(count=K) + SparseAdamW
  sara_torch_adamw  sara_kernels with stock torch.optim.AdamW on the deltas
  sara_reference    sara with the pure-PyTorch 'reference' backend forced (SARA_KERNELS_BACKEND)

The synthetic workloads rescale each Linear/Conv2d weight to a trained-UNet-like std
(0.6/sqrt(fan_in) clamped to [0.02, 0.05]); the share of entries below the paper's θ = 2e-3 is
printed. Measurement definitions are in benchmarks/_unet_bench.py and in the JSON.

Output: a table, JSON (default benchmarks/results/unet_<workload>_<device>.json, dit_<workload>_...
for the DiTs) and two PNG
charts next to it (<stem>_memory.png, <stem>_time.png). The targets (stated for ``tiny`` on CPU)
are reported as met/missed; they are not assertions and the exit status does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _unet_bench as ub  # noqa: E402

MiB = 1024 * 1024

#: Earlier measurements on `tiny` (CPU, 2 threads, peft 0.21.2), for a sanity check of a new run.
ANCHORS = {
    "peak_overhead_mib": {"frozen": 243, "full": 624, "lora": 384, "supertuning": 349, "shira": 373, "dense_mask": 682},
    "step_vs_full": {"frozen": (0.66, 0.80), "lora": (1.04, 1.09), "supertuning": (0.78, 0.90),
                     "shira": (0.90, 0.95), "dense_mask": (1.01, 1.20)},
}

#: (name, kind, method, reference method or 'floor', limit) -- value(method) <= limit * value(reference)
TARGETS = [
    ("state bytes per selected entry <= 24", "state_per_entry", "sara", None, 24.0),
    ("sara peak <= 1.05 x floor", "peak", "sara", "floor", 1.05),
    ("sara peak <= 0.85 x lora", "peak", "sara", "lora", 0.85),
    ("sara peak <= 0.55 x full", "peak", "sara", "full", 0.55),
    ("sara_linear peak <= 0.90 x supertuning", "peak", "sara_linear", "supertuning", 0.90),
    ("sara step <= 0.88 x full", "step", "sara", "full", 0.88),
    ("sara step <= 0.80 x lora", "step", "sara", "lora", 0.80),
    ("sara_linear step <= 0.95 x supertuning", "step", "sara_linear", "supertuning", 0.95),
    ("sara forward <= 1.03 x frozen", "fwd", "sara", "frozen", 1.03),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark fine-tuning methods (SaRA via sara_kernels, LoRA, Super-Tuning, SHiRA, full, "
        "dense masks) on a diffusers UNet2DConditionModel: trainable count, training-state bytes, peak memory, "
        "step and forward time, adapter size.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {m:<17} {ub.METHOD_HELP[m]}" for m in ub.METHODS),
    )
    p.add_argument("--workload", choices=sorted(ub.WORKLOADS), default="tiny",
                   help="UNet config: 'tiny' (64-128-256-256, cross-attn 256, 32x32 latents, batch 2; the CPU default) "
                   "or 'sd15' (the SD 1.5 UNet: 320-640-1280-1280, cross-attn 768, 64x64 latents; for GPUs); "
                   "DiTs: 'flux_tiny' (FluxTransformer2DModel, 2 double + 4 single blocks, width 256), 'sd3_tiny' "
                   "(SD3Transformer2DModel, 4 blocks, width 256), both 32x32 latents, batch 2, 77 text tokens, and "
                   "'sd3_medium' (SD3-medium's transformer config, 2.0B parameters). Default: tiny")
    p.add_argument("--pretrained", metavar="DIR", default=None,
                   help="load a local diffusers UNet checkpoint (DIR or DIR/unet) instead of building --workload "
                   "from its config; no weight rescaling")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods to run, or 'all' (default). Choices: " + ", ".join(ub.METHODS))
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda / cuda:0")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the model weights and inputs (default fp32; no autocast: full fine-tuning then "
                   "trains in that dtype); sparse deltas and their Adam state stay fp32")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per method (default 5; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up steps per method, at least 1 (default 1; --quick: 1); the last one also "
                   "does the training-state accounting")
    p.add_argument("--fwd-steps", type=int, default=None,
                   help="timed forward passes per method (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps (warm-up 1, 2 timed steps, 1 forward) for smoke tests; explicit --steps/"
                   "--warmup/--fwd-steps win")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole method list this many times, interleaved (a fresh process each time), and "
                   "pool the timings (median over all rounds' steps; peak: median of the rounds); more robust on "
                   "a noisy machine (default 1)")
    p.add_argument("--budget", type=float, default=0.058,
                   help="trainable budget K as a fraction of all Linear+Conv2d weight entries (default 0.058); "
                   "the Linear-only methods: see --linear-budget")
    p.add_argument("--linear-budget", choices=("same-k", "same-density"), default="same-k",
                   help="budget of the Linear-only methods (supertuning, shira, sara_linear) on the attention "
                   "linears: 'same-k' (default: the same K entries, i.e. a higher density of those layers) or "
                   "'same-density' (--budget of the attention linears' entries)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the workload's, 2 for the tiny ones)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent height = width (default: the workload's; 32 for the tiny ones)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="CPU: a worker may grow to about this resident size (GiB) and no further: its address "
                   "space is limited (RLIMIT_AS) after the build and this process stops it if its RSS passes "
                   "the cap; the method is then reported as not fitting (default: no cap)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in each worker (default: torch's default)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of every optimizer (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, the inputs and SHiRA's mask (default 0)")
    p.add_argument("--out", default=None,
                   help="JSON output path (default benchmarks/results/unet_<workload>_<device>[_<dtype>].json); "
                   "the PNG charts go next to it as <stem>_memory.png and <stem>_time.png")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, profile one training step and one forward per method with "
                   "torch.profiler and print the top ops (also stored in the JSON)")
    p.add_argument("--profile-rows", type=int, default=15, help="rows of each --profile table (default 15)")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--no-adapter-size", action="store_true",
                   help="do not save each method's adapter to measure its size (saves time and disk at real scale)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a method's worker is killed (default 900)")
    p.add_argument("--worker", metavar="METHOD", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (1, 2, 1) if args.quick else (1, 5, 3)
    for name, value in zip(("warmup", "steps", "fwd_steps"), defaults, strict=False):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.warmup = max(1, args.warmup)
    if args.methods == "all":
        args.method_list = list(ub.METHODS)
    else:
        args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in args.method_list if m not in ub.METHODS]
        if bad:
            p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ub.METHODS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 0 < args.budget < 1:
        p.error("--budget must lie in (0, 1)")
    return args


def worker_argv(args, method: str) -> list[str]:
    argv = [sys.executable, "-u", os.path.abspath(__file__), "--worker", method,
            "--workload", args.workload, "--device", args.device, "--dtype", args.dtype,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--fwd-steps", str(args.fwd_steps),
            "--budget", repr(args.budget), "--linear-budget", args.linear_budget, "--lr", repr(args.lr), "--seed", str(args.seed)]
    if args.profile:
        argv += ["--profile", "--profile-rows", str(args.profile_rows)]
    if args.no_adapter_size:
        argv += ["--no-adapter-size"]
    for name in ("pretrained", "batch", "latent", "threads", "memory_cap_gib"):
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def child_rss(pid: int) -> int | None:
    kib = ub.proc_kib(f"/proc/{pid}/status", "VmRSS")
    return None if kib is None else kib * 1024


class Progress:
    """One status line per method; redrawn in place on a terminal."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stdout.isatty()
        self.line = ""

    def update(self, i: int, method: str, status: str, t0: float) -> None:
        text = f"[{i}/{self.total}] {method:<17} {status:<24} {time.perf_counter() - t0:6.1f} s"
        if self.tty:
            sys.stdout.write("\r" + text.ljust(len(self.line)))
            sys.stdout.flush()
        self.line = text

    def done(self, i: int, method: str, status: str, t0: float) -> None:
        self.update(i, method, status, t0)
        if self.tty:
            sys.stdout.write("\n")
        else:
            print(self.line)
        sys.stdout.flush()
        self.line = ""


def run_method(args, method: str, i: int, progress: Progress) -> dict:
    env = dict(os.environ)
    env.pop("SARA_KERNELS_BACKEND", None)
    if method == "sara_reference":
        env["SARA_KERNELS_BACKEND"] = "reference"
    t0 = time.perf_counter()
    proc = subprocess.Popen(worker_argv(args, method), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=os.path.dirname(HERE))
    log: list[str] = []
    status = ["starting"]

    def read_stderr():
        for line in proc.stderr:
            if line.startswith("@progress "):
                status[0] = line[len("@progress "):].strip()
            else:
                log.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    cap = int(args.memory_cap_gib * 1024**3) if args.memory_cap_gib else None
    over_cap = False
    while proc.poll() is None:
        progress.update(i, method, status[0], t0)
        if time.perf_counter() - t0 > args.timeout:
            proc.kill()
            break
        if cap and (child_rss(proc.pid) or 0) > cap:
            over_cap = True
            proc.kill()
            break
        time.sleep(0.1 if cap else 0.25)
    out = proc.stdout.read()
    proc.wait()
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if over_cap:
        result = {"method": method, "error": f"out of memory: RSS passed the {args.memory_cap_gib:g} GiB cap, stopped",
                  "memory_cap_gib": args.memory_cap_gib}
    if result is not None and "error" in result:
        progress.done(i, method, "out of memory" if "memory" in result["error"] else "FAILED", t0)
        result.update(wall_s=wall, stderr_tail="".join(log[-10:]))
        return result
    if proc.returncode != 0 or result is None:
        why = "timed out" if wall > args.timeout else f"exit {proc.returncode}"
        progress.done(i, method, f"FAILED ({why})", t0)
        tail = "".join(log[-25:])
        print(f"--- {method} worker stderr (tail) ---\n{tail}", file=sys.stderr)
        return {"method": method, "error": why, "stderr_tail": tail, "wall_s": wall}
    result["wall_s"] = wall
    progress.done(i, method, "done", t0)
    return result


def merge_rounds(runs: list[dict]) -> dict:
    """One result from several rounds of a method: timings pooled (median over every timed step of
    every round), peak overhead the median of the rounds' peaks; per-round values kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    if len(ok) == 1 and len(runs) == 1:
        return ok[0]
    merged = dict(ok[0])
    for key in ("step_ms", "fwd_ms", "fwd_nograd_ms"):
        pooled = [t / 1e3 for r in ok for t in r[key].get("all", [])]
        merged[key] = ub.summarize(pooled)
    peaks = sorted(r["peak_overhead_bytes"] for r in ok)
    merged["peak_overhead_bytes"] = peaks[len(peaks) // 2]
    merged["rounds"] = [
        {k: (r[k]["median"] if isinstance(r.get(k), dict) else r.get(k))
         for k in ("step_ms", "fwd_ms", "peak_overhead_bytes", "wall_s", "error")}
        for r in runs
    ]
    return merged


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _get(results: dict, method: str, kind: str):
    r = results.get(method)
    if not r or "error" in r:
        return None
    if kind == "peak":
        return r["peak_overhead_bytes"]
    if kind == "step":
        return r["step_ms"]["median"]
    if kind == "fwd":
        return r["fwd_ms"]["median"]
    if kind == "state":
        return r["state_bytes"]
    if kind == "adapter":
        return r.get("adapter_bytes")
    if kind == "state_per_entry":
        return r["state_bytes"] / max(1, r["trainable"])
    raise KeyError(kind)


def floor_bytes(results: dict, method: str = "sara") -> dict | None:
    """frozen's peak overhead + the extra activations of trained layers' inputs + the method's
    training state (24 B x K with fp32 weights; 22 B x K with bf16/fp16 ones, whose base is 2 B)."""
    frozen, r = results.get("frozen"), results.get(method)
    if not frozen or "error" in frozen or not r or "error" in r:
        return None
    est = frozen.get("activation_estimate") or {}
    acts = est.get("extra_bytes_linear" if method == "sara_linear" else "extra_bytes_all", 0)
    state = r.get("state_bytes") or 24 * r["trainable"]
    return {
        "frozen_overhead": frozen["peak_overhead_bytes"],
        "extra_activations": acts,
        "state": state,
        "state_bytes_per_entry": state / max(1, r["trainable"]),
        "floor": frozen["peak_overhead_bytes"] + acts + state,
    }


def evaluate_targets(results: dict) -> list[dict]:
    out = []
    for name, kind, method, ref, limit in TARGETS:
        value = _get(results, method, kind)
        if ref is None:
            ref_value = 1.0
        elif ref == "floor":
            f = floor_bytes(results, method)
            ref_value = f["floor"] if f else None
        else:
            ref_value = _get(results, ref, kind)
        if value is None or ref_value is None:
            out.append(dict(target=name, status="skipped", value=None, limit=None))
            continue
        if kind == "state_per_entry":
            ratio = round(value, 2)  # fixed per-layer scalars (Adam's step counters) are < 0.01 B/entry
            ok = ratio <= limit
            out.append(dict(target=name, status="met" if ok else "missed", value=value, limit=limit, ratio=value))
        else:
            ratio = value / ref_value
            out.append(dict(target=name, status="met" if ratio <= limit else "missed", value=value,
                            reference=ref_value, ratio=ratio, limit=limit))
    return out


def _fmt_bytes(b, unit=MiB):
    return "-" if b is None else f"{b / unit:8.1f}"


def _fmt_ratio(a, b):
    return "   -" if a is None or b in (None, 0) else f"{a / b:4.2f}"


def table(results: dict, order: list[str]) -> str:
    head = (f"{'method':<17} {'trainable':>10} {'state MiB':>9} {'B/entry':>8} {'peak MiB':>8} {'/full':>5} {'/lora':>5} "
            f"{'/froz':>5} {'step ms':>8} {'[min-max]':>15} {'/full':>5} {'/lora':>5} {'/froz':>5} {'fwd ms':>7} "
            f"{'/froz':>5} {'adapter MiB':>11}")
    lines = [head, "-" * len(head)]
    full_p, lora_p, froz_p = (_get(results, m, "peak") for m in ("full", "lora", "frozen"))
    full_s, lora_s, froz_s = (_get(results, m, "step") for m in ("full", "lora", "frozen"))
    froz_f = _get(results, "frozen", "fwd")
    for m in order:
        r = results.get(m)
        if not r or "error" in r:
            lines.append(f"{m:<17} FAILED: {r.get('error') if r else 'not run'}")
            continue
        peak, step, fwd = r["peak_overhead_bytes"], r["step_ms"]["median"], r["fwd_ms"]["median"]
        per = f"{r['state_bytes'] / r['trainable']:8.2f}" if r["trainable"] else f"{'-':>8}"
        spread = f"[{r['step_ms']['min']:.0f}-{r['step_ms']['max']:.0f}]"
        lines.append(
            f"{m:<17} {r['trainable']:>10} {_fmt_bytes(r['state_bytes']):>9} {per} {_fmt_bytes(peak)} "
            f"{_fmt_ratio(peak, full_p):>5} {_fmt_ratio(peak, lora_p):>5} {_fmt_ratio(peak, froz_p):>5} "
            f"{step:8.0f} {spread:>15} {_fmt_ratio(step, full_s):>5} {_fmt_ratio(step, lora_s):>5} "
            f"{_fmt_ratio(step, froz_s):>5} {fwd:7.0f} {_fmt_ratio(fwd, froz_f):>5} "
            f"{_fmt_bytes(r.get('adapter_bytes')):>11}"
        )
    return "\n".join(lines)


def anchor_lines(results: dict) -> list[str]:
    lines = []
    full_s = _get(results, "full", "step")
    for m in ub.METHODS:
        peak, step = _get(results, m, "peak"), _get(results, m, "step")
        parts = []
        if m in ANCHORS["peak_overhead_mib"] and peak is not None:
            parts.append(f"peak {peak / MiB:.0f} MiB (anchor {ANCHORS['peak_overhead_mib'][m]})")
        if m in ANCHORS["step_vs_full"] and step is not None and full_s:
            lo, hi = ANCHORS["step_vs_full"][m]
            parts.append(f"step/full {step / full_s:.2f} (anchor {lo:.2f}-{hi:.2f})")
        if parts:
            lines.append(f"  {m:<12} " + ", ".join(parts))
    return lines


def charts(results: dict, order: list[str], stem: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [m for m in order if results.get(m) and "error" not in results[m]]
    if not ok:
        return []
    colors = ["#d62728" if m.startswith("sara") else "#7f7f7f" if m == "frozen" else "#1f77b4" for m in ok]
    y = list(range(len(ok)))
    paths = []

    def label(ax, xlabel: str, panel_title: str) -> None:
        ax.set_yticks(y, ok)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(panel_title)

    def save(fig, suffix: str) -> None:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        paths.append(stem + suffix)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 2.2))
    peaks = [results[m]["peak_overhead_bytes"] / MiB for m in ok]
    ax1.barh(y, peaks, color=colors)
    for yi, v in zip(y, peaks, strict=False):
        ax1.text(v, yi, f" {v:.0f}", va="center", fontsize=8)
    f = floor_bytes(results, "sara")
    if f:
        ax1.axvline(f["floor"] / MiB, color="k", ls="--", lw=1, label=f"sara floor {f['floor'] / MiB:.0f} MiB")
        ax1.legend(loc="lower right", fontsize=8)
    label(ax1, "peak memory overhead over the built model (MiB)", "peak memory during training")
    states = [(results[m]["state_bytes"] or 0) / MiB for m in ok]
    positive = [v for v in states if v > 0]
    left = min(positive) / 4 if positive else 0.01
    ax2.barh(y, [v - left if v > left else 0 for v in states], left=left, color=colors)
    for yi, v in zip(y, states, strict=False):
        ax2.text(max(v, left), yi, f" {v:.1f}" if v > 0 else " 0 (nothing trained)", va="center", fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlim(left=left)
    label(ax2, "training state: params + grads + optimizer + buffers (MiB, log)", "training-state bytes")
    save(fig, "_memory.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 2.2))
    med = [results[m]["step_ms"]["median"] for m in ok]
    lo = [results[m]["step_ms"]["median"] - results[m]["step_ms"]["min"] for m in ok]
    hi = [results[m]["step_ms"]["max"] - results[m]["step_ms"]["median"] for m in ok]
    ax1.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
    for yi, v, h in zip(y, med, hi, strict=False):
        ax1.text(v + h, yi, f" {v:.0f}", va="center", fontsize=8)
    label(ax1, "training step (ms): median, whiskers min-max", "step time (fwd + loss + bwd + optimizer)")
    fmed = [results[m]["fwd_ms"]["median"] for m in ok]
    ax2.barh(y, fmed, color=colors)
    for yi, v in zip(y, fmed, strict=False):
        ax2.text(v, yi, f" {v:.0f}", va="center", fontsize=8)
    label(ax2, "training forward (ms), median", "forward time")
    save(fig, "_time.png")
    return paths


def family_label(args) -> str:
    return {"unet": "UNet", "flux": "Flux DiT", "sd3": "SD3 DiT"}[ub.WORKLOADS[args.workload].family]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            result = ub.run_worker(args.worker, args)
        except (MemoryError, RuntimeError) as e:
            if not ub.is_out_of_memory(e):
                raise
            result = {"method": args.worker, "error": "out of memory" + (
                f" under the {args.memory_cap_gib:g} GiB cap" if args.memory_cap_gib else ""),
                "detail": str(e)[:400], "memory_cap_gib": args.memory_cap_gib}
        ub.dump(result)
        return 0

    t_start = time.perf_counter()
    order = args.method_list
    print(f"{family_label(args)} benchmark: workload={args.pretrained or args.workload} device={args.device} dtype={args.dtype} "
          f"budget={args.budget:.1%} warm-up={args.warmup} steps={args.steps} forward={args.fwd_steps} rounds={args.rounds} "
          f"methods={','.join(order)}")
    try:
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} on {os.cpu_count()} CPUs"
              + ("  (the machine is busy: timings are noisy)" if load[0] > 0.5 * (os.cpu_count() or 1) else ""))
    except OSError:
        load = None
    progress = Progress(len(order) * args.rounds)
    runs: dict[str, list[dict]] = {m: [] for m in order}
    for r in range(args.rounds):
        for i, method in enumerate(order, 1):
            runs[method].append(run_method(args, method, r * len(order) + i, progress))
    results = {m: merge_rounds(rs) for m, rs in runs.items()}

    first = next((r for r in results.values() if "error" not in r), None)
    print()
    if first:
        print(f"model: {first['linear_conv_entries']:,} Linear+Conv2d weight entries; K = {first['K']:,} "
              f"({args.budget:.1%}); attention-linear K = {first['K_linear']:,}; "
              f"share with |w| < 2e-3: {first['share_below_paper_threshold']:.2%}; "
              f"threads {first['threads']}; batch {first['batch']}, {first['latent']}x{first['latent']} latents")
    print(table(results, order))
    print("state = params + grads + optimizer state + mask/index/base buffers; peak = peak "
          + ("max_memory_allocated" if args.device.startswith("cuda") else "RSS (VmHWM)")
          + " minus the built model's; step = median of timed steps; /x = ratio to method x")
    floor = floor_bytes(results, "sara")
    if floor:
        print(f"floor for sara: frozen {floor['frozen_overhead'] / MiB:.1f} MiB + trained-layer inputs "
              f"{floor['extra_activations'] / MiB:.1f} MiB + {floor['state_bytes_per_entry']:.0f} B x K "
              f"{floor['state'] / MiB:.1f} MiB "
              f"= {floor['floor'] / MiB:.1f} MiB")
    targets = evaluate_targets(results)
    tiny_cpu = args.workload == "tiny" and not args.pretrained and args.device == "cpu"
    print("\ntargets" + ("" if tiny_cpu else " (defined for tiny on CPU; shown for information)") + ":")
    skipped = [t for t in targets if t["status"] == "skipped"]
    if skipped:
        print(f"  {len(skipped)} of {len(targets)} skipped (a method they compare was not run)")
    for t in targets:
        if t["status"] == "skipped":
            continue
        elif t["target"].startswith("state"):
            print(f"  [{t['status']:>6}] {t['target']}: {t['value']:.3f} B/entry")
        else:
            print(f"  [{t['status']:>6}] {t['target']}: ratio {t['ratio']:.3f}")
    if args.profile:
        for m in order:
            for name, text in (results.get(m) or {}).get("profile", {}).items():
                print(f"\nprofile: {m}, one {name} (top ops by self time)\n{text}")
    anchors = anchor_lines(results)
    if anchors and tiny_cpu:
        print("\nearlier anchors on this workload (CPU, 2 threads, peft 0.21.2):")
        print("\n".join(anchors))

    prefix = "unet" if ub.WORKLOADS[args.workload].family == "unet" else "dit"
    out = args.out or os.path.join(
        HERE, "results", f"{prefix}_{args.workload if not args.pretrained else 'pretrained'}_"
        f"{args.device.split(':')[0]}{'' if args.dtype == 'fp32' else '_' + args.dtype}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    doc = {
        "benchmark": "bench_unet",
        "command": " ".join([os.path.relpath(__file__, os.getcwd())] + (sys.argv[1:] if argv is None else argv)),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "environment": ub.environment(),
        "load_average_at_start": load,
        "wall_s": None,
        "definitions": ub.__doc__,
        "floor_sara": floor,
        "floor_sara_linear": floor_bytes(results, "sara_linear"),
        "targets": targets,
        "anchors": ANCHORS,
        "results": results,
    }
    chart_paths = []
    if not args.no_charts:
        try:
            chart_paths = charts(results, order, stem, f"{family_label(args)} {args.pretrained or args.workload} on {args.device} "
                                 f"({args.dtype}), budget {args.budget:.1%}")
        except ImportError:
            print("matplotlib is not installed: no charts")
    doc["charts"] = [os.path.relpath(p, os.path.dirname(HERE)) for p in chart_paths]
    doc["wall_s"] = time.perf_counter() - t_start
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {os.path.relpath(out)}" + "".join(f", {os.path.relpath(p)}" for p in chart_paths)
          + f" in {doc['wall_s']:.0f} s")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
