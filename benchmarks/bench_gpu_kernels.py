"""Kernel benchmark at Stable Diffusion 1.5 UNet shapes: every sampled-gradient variant against the
dense weight gradient it replaces, and the fused sparse AdamW against the device's copy bandwidth
and against torch's fused AdamW + index_put_, all measured in one run on one device.

    python benchmarks/bench_gpu_kernels.py                       # on CUDA: the full matrix
    python benchmarks/bench_gpu_kernels.py --json out.json
    python benchmarks/bench_gpu_kernels.py --quick --device cpu  # tiny shapes (smoke test)

Rows:
  ceilings  device-to-device copy (bytes read + written per second) and a large GEMM in --dtype
            (FLOP/s): the two rates every other row is judged against.
  linear    weight [out, in] = 320x320, 640x640, 1280x1280, 5120x1280 (the 1280 -> 5120 FF),
            N = 4096 and 32768 tokens (1 x 64 x 64 and 8 x 64 x 64).
  conv      3x3, padding 1, C -> C at the UNet's spatial sizes (320 @ 64x64, 640 @ 32x32,
            1280 @ 16x16, 1280 @ 8x8), batch 1 and 8.
  adamw     sparse_adamw_ over k = 5.8% of a 1280x1280 weight and of an 860M-entry weight.
  step      one optimizer step over the 282 Linear/Conv2d weights of SD 1.5's UNet (5.8% of each
            selected): SparseAdamW per backend (all layers in one sparse_adamw_multi_ call, and
            with foreach=False one sparse_adamw_ call per layer) against torch's fused
            AdamW on the same deltas followed by the re-merge the next forward does, and against
            torch's fused AdamW over the dense fp32 weights (full fine-tuning's step). Per-layer
            launches and Python dispatch count here, as they do in training.
Each sampled-gradient row is timed at densities 0.1%, 0.6%, 2.3%, 5.8% and 20% (uniformly random
sorted entries, int32 indices) for every variant the device has: the native kernel's direct, gemm
and auto (what the library picks), and the Triton backend's (its kernel, its dense-GEMM path and
auto). The dense baseline is what autograd computes for
the dense weight in the same dtype (cuBLAS g^T x; cuDNN's convolution weight gradient).

Timing: medians of triton.testing.do_bench (CUDA events, L2 flushed between repeats) on CUDA;
perf_counter medians on the CPU. The transient workspace of a call is the peak allocated memory
during the call beyond its inputs and output. Every result is checked against the gemm variant's
(max relative error, recorded). A variant that took over 40x the dense time at some density is not
timed at higher densities of that shape (recorded as skipped).
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

DENSITIES = (0.001, 0.006, 0.023, 0.058, 0.2)
LINEAR_SHAPES = ((320, 320), (640, 640), (1280, 1280), (5120, 1280))  # (out, in)
LINEAR_TOKENS = (4096, 32768)
CONV_SHAPES = ((320, 64), (640, 32), (1280, 16), (1280, 8))  # (channels, spatial)
CONV_BATCH = (1, 8)
ADAMW_NUMEL = (1280 * 1280, 860_000_000)
ADAMW_DENSITY = 0.058

#: Weight shapes of SD 1.5's UNet (diffusers UNet2DConditionModel with the SD 1.5 config of
#: benchmarks/_unet_bench.py): shape -> count; 282 Linear/Conv2d weights, 859,077,120 entries.
#: Embedded so that the step rows run where diffusers is not installed; tests/test_bench_smoke.py
#: checks the table against diffusers.
SD15_WEIGHT_SHAPES = {
    (320, 320): 30, (320, 768): 10, (320, 1280): 10, (640, 640): 30, (640, 768): 10,
    (640, 1280): 5, (640, 2560): 5, (1280, 320): 1, (1280, 768): 12, (1280, 1280): 49,
    (1280, 5120): 6, (2560, 320): 5, (5120, 640): 5, (10240, 1280): 6,
    (4, 320, 3, 3): 1, (320, 4, 3, 3): 1, (320, 320, 1, 1): 10, (320, 320, 3, 3): 8,
    (320, 640, 1, 1): 2, (320, 640, 3, 3): 2, (320, 960, 1, 1): 1, (320, 960, 3, 3): 1,
    (640, 320, 1, 1): 1, (640, 320, 3, 3): 1, (640, 640, 1, 1): 10, (640, 640, 3, 3): 8,
    (640, 960, 1, 1): 1, (640, 960, 3, 3): 1, (640, 1280, 1, 1): 1, (640, 1280, 3, 3): 1,
    (640, 1920, 1, 1): 1, (640, 1920, 3, 3): 1, (1280, 640, 1, 1): 1, (1280, 640, 3, 3): 1,
    (1280, 1280, 1, 1): 12, (1280, 1280, 3, 3): 20, (1280, 1920, 1, 1): 1, (1280, 1920, 3, 3): 1,
    (1280, 2560, 1, 1): 5, (1280, 2560, 3, 3): 5,
}  # fmt: skip
#: --quick: a few small layers of both kinds.
QUICK_WEIGHT_SHAPES = {(64, 64): 3, (96, 64): 1, (64, 48, 3, 3): 2, (32, 64, 1, 1): 1}
SKIP_FACTOR = 40.0


def bench_ms(fn, device: str, reps: int) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, device: str) -> float | None:
    """Median milliseconds of fn() replayed from a CUDA graph (no Python or launch overhead between
    kernels): the kernels' own time. None off CUDA or when fn cannot be captured."""
    if device != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as exc:  # recorded as missing, printed
        print(f"    (no graph timing: {exc!r})"[:200], flush=True)
        torch.cuda.synchronize()
        return None


def transient_bytes(fn, device: str, out_bytes: int) -> int | None:
    """Peak memory allocated during fn() beyond what was allocated before it and its output."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before - out_bytes
    del result
    return max(0, int(peak))


def variants(device: str) -> list[tuple[str, str, str]]:
    """(label, backend, grad variant) of every sampled-gradient variant this device runs."""
    found = []
    if _backend.native_available(device):
        found += [(f"{device}/{v}", device, v) for v in ("direct", "gemm", "auto")]
    if _backend.triton_available(device) and not (device == "cpu" and _backend.triton_interpret()):
        found += [(f"triton/{v}", "triton", v) for v in ("direct", "gemm", "auto")]
    if not found:
        found.append(("reference", "reference", "auto"))
    return found


def random_index(numel: int, density: float, device: str) -> torch.Tensor:
    k = max(1, round(numel * density))
    return torch.randperm(numel, device=device)[:k].sort().values.to(torch.int32)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


class Runner:
    def __init__(self, device: str, reps: int):
        self.device = device
        self.reps = reps
        self.rows: list[dict] = []

    def record(self, **row) -> dict:
        self.rows.append(row)
        ms = row.get("ms")
        ratio = row.get("vs_dense")
        extra = f"x{ratio:6.2f} dense" if ratio is not None else ""
        ws = row.get("workspace_MiB")
        ws_s = f"ws {ws:7.1f} MiB" if ws is not None else ""
        ms_s = f"{ms:10.4f} ms" if ms is not None else f"{'skipped':>13}"
        print(
            f"  {row['kind']:<6} {row['shape']:<30} {row.get('density', 1.0):>7.2%} {row['variant']:<14}"
            f" {ms_s} {extra:<14} {ws_s}",
            flush=True,
        )
        return row

    def sampled(self, kind, shape, dense_fn, call, numel, out_bytes_per_entry=4):
        """Time the dense baseline, then every variant at every density."""
        dense_ms = bench_ms(dense_fn, self.device, self.reps)
        dense_graph = graph_ms(dense_fn, self.device)
        self.record(kind=kind, shape=shape, variant="dense", ms=dense_ms, graph_ms=dense_graph, density=1.0)
        slow: set[str] = set()
        for density in self.densities:
            index = random_index(numel, density, self.device)
            k = index.numel()
            check = None
            for label, backend, variant in self.variants:
                if label in slow:
                    self.record(
                        kind=kind, shape=shape, variant=label, ms=None, density=density, k=k, skipped=True
                    )
                    continue

                def run(backend=backend, variant=variant, index=index):
                    with (
                        sara_kernels.use_backend(backend),
                        sara_kernels.use_grad_variant(variant),
                        sara_kernels.index_checks(False),
                    ):
                        return call(index)

                row = dict(kind=kind, shape=shape, variant=label, density=density, k=k)
                try:
                    result = run()
                    if check is None:
                        check = result
                    err = rel_err(result, check)
                    ws = transient_bytes(run, self.device, k * out_bytes_per_entry)
                    ms = bench_ms(run, self.device, self.reps)
                    gms = graph_ms(run, self.device)
                except Exception as exc:  # recorded, never hidden: the summary lists failures
                    self.record(**row, ms=None, error=repr(exc)[:300])
                    print(f"    FAILED: {exc!r}"[:400], flush=True)
                    continue
                ok = math.isfinite(err) and err < 2e-2
                if not ok:
                    print(f"    MISMATCH: rel err {err:.3e} against {self.variants[0][0]}", flush=True)
                self.record(
                    **row,
                    ms=ms,
                    vs_dense=ms / dense_ms,
                    dense_ms=dense_ms,
                    graph_ms=gms,
                    dense_graph_ms=dense_graph,
                    vs_dense_graph=None if gms is None or not dense_graph else gms / dense_graph,
                    rel_err_vs_first=err,
                    matches=ok,
                    workspace_MiB=None if ws is None else ws / 2**20,
                )
                if ms > SKIP_FACTOR * dense_ms:
                    slow.add(label)


def ceilings(runner: Runner, dtype: torch.dtype, quick: bool) -> dict:
    device = runner.device
    n_bytes = (1 << 20) if quick else (1 << 30)
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), device, runner.reps)
    copy_gbs = 2 * n_bytes / copy_ms / 1e6
    runner.record(
        kind="ceil", shape=f"copy {n_bytes >> 20} MiB", variant="d2d copy", ms=copy_ms, GBps=copy_gbs
    )
    # 8192^3 saturates a GPU's tensor cores; on a CPU it would take minutes (bf16), 1024^3 does.
    n = 256 if quick else (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = bench_ms(lambda: a @ b, device, runner.reps)
    tflops = 2 * n**3 / mm_ms / 1e9
    runner.record(
        kind="ceil", shape=f"gemm {n}^3", variant=str(dtype).split(".")[-1], ms=mm_ms, TFLOPs=tflops
    )
    return {"copy_GBps": copy_gbs, "gemm_TFLOPs": tflops}


def linear_rows(runner: Runner, dtype: torch.dtype, quick: bool) -> None:
    shapes = ((40, 24), (96, 80)) if quick else LINEAR_SHAPES
    tokens = (64,) if quick else LINEAR_TOKENS
    for out_f, in_f in shapes:
        for n in tokens:
            g = torch.randn(n, out_f, device=runner.device, dtype=dtype)
            x = torch.randn(n, in_f, device=runner.device, dtype=dtype)
            runner.sampled(
                "linear",
                f"linear {out_f}x{in_f} N={n}",
                lambda g=g, x=x: g.t() @ x,
                lambda index, g=g, x=x, o=out_f, i=in_f: sk.sampled_weight_grad_linear(g, x, index, o, i),
                out_f * in_f,
            )
            del g, x


def conv_rows(runner: Runner, dtype: torch.dtype, quick: bool) -> None:
    shapes = ((8, 6), (16, 5)) if quick else CONV_SHAPES
    batches = (2,) if quick else CONV_BATCH
    for c, hw in shapes:
        for batch in batches:
            x = torch.randn(batch, c, hw, hw, device=runner.device, dtype=dtype)
            w = torch.randn(c, c, 3, 3, device=runner.device, dtype=dtype)
            g = torch.randn(batch, c, hw, hw, device=runner.device, dtype=dtype)

            def dense(g=g, x=x, w=w):
                return torch.ops.aten.convolution_backward(
                    g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
                )[1]

            runner.sampled(
                "conv",
                f"conv3x3 {c}->{c} {hw}x{hw} B={batch}",
                dense,
                lambda index, g=g, x=x, shape=list(w.shape): sk.sampled_weight_grad_conv2d(
                    g, x, index, shape, 1, 1, 1, 1
                ),
                w.numel(),
            )
            del x, w, g


def optimizer_backends(device: str) -> list[str]:
    """The backends the AdamW rows time on ``device``: native, Triton (compiled), reference."""
    backends = [device] if _backend.native_available(device) else []
    if _backend.triton_available(device) and not (device == "cpu" and _backend.triton_interpret()):
        backends.append("triton")
    return [*backends, "reference"]


def adamw_rows(runner: Runner, dtype: torch.dtype, quick: bool, copy_gbps: float) -> None:
    device = runner.device
    backends = optimizer_backends(device)
    for numel in (1000, 50_000) if quick else ADAMW_NUMEL:
        weight = torch.randn(numel, device=device, dtype=dtype)
        index = random_index(numel, ADAMW_DENSITY, device)
        k = index.numel()
        base = weight[index.long()].clone()
        delta = torch.randn(k, device=device) * 1e-3
        grad = torch.randn(k, device=device)
        m = torch.randn(k, device=device) * 1e-3
        v = torch.rand(k, device=device) * 1e-6
        # delta, m, v read + written (fp32), grad read (fp32), base read, index read, weight written.
        moved = k * (3 * 2 * 4 + 4 + 2 * weight.element_size() + index.element_size())
        shape = f"k={k} of {numel}"
        twin = torch.zeros(k, device=device, requires_grad=True)
        twin.grad = grad.clone()
        opt = torch.optim.AdamW([twin], lr=1e-4, fused=True if device == "cuda" else None)
        long_index = index.long()

        def torch_adamw(opt=opt, twin=twin, weight=weight, long_index=long_index, base=base):
            opt.step()
            weight.index_put_((long_index,), (base.float() + twin.detach()).to(weight.dtype))

        torch_ms = bench_ms(torch_adamw, device, runner.reps)
        runner.record(
            kind="adamw",
            shape=shape,
            variant="torch fused+index_put_",
            ms=torch_ms,
            density=ADAMW_DENSITY,
            bytes=moved,
            GBps=moved / torch_ms / 1e6,
        )
        del opt, twin
        labels = list(backends)
        if device == "cuda" and _backend.native_available(device):
            labels.insert(1, "cuda/no-device-index-check")  # isolates the async validation kernel
        for label in labels:
            backend = label.split("/")[0]
            if backend == "reference" and device == "cuda" and numel > 10_000_000:
                continue

            def run(backend=backend, label=label):
                # The native CUDA kernels' index checks: the default (async: the validation kernel)
                # or off (no validation kernel); the Python-side checks are off throughout.
                checks = 0 if label.endswith("no-device-index-check") else 1
                with (
                    sara_kernels.use_backend(backend),
                    sara_kernels.index_checks(False),
                    _backend.native_settings(index_checks=checks),
                ):
                    sk.sparse_adamw_(weight, index, base, delta, grad, m, v, step=10.0, lr=1e-4)

            try:
                ms = bench_ms(run, device, runner.reps)
            except Exception as exc:
                runner.record(kind="adamw", shape=shape, variant=label, ms=None, error=repr(exc)[:300])
                continue
            runner.record(
                kind="adamw",
                shape=shape,
                variant=label,
                ms=ms,
                density=ADAMW_DENSITY,
                bytes=moved,
                GBps=moved / ms / 1e6,
                vs_copy_bandwidth=(moved / ms / 1e6) / copy_gbps,
                vs_torch=ms / torch_ms,
            )


def build_layers(shapes: dict, device: str, dtype: torch.dtype) -> torch.nn.ModuleList:
    """Bias-free Linear / Conv2d layers of the given weight shapes, initialised on ``device``."""
    layers = torch.nn.ModuleList()
    for shape, count in shapes.items():
        for _ in range(count):
            if len(shape) == 2:
                layer = torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=dtype)
            else:
                layer = torch.nn.Conv2d(
                    shape[1],
                    shape[0],
                    shape[2:],
                    padding=shape[2] // 2,
                    bias=False,
                    device=device,
                    dtype=dtype,
                )
            layers.append(layer)
    return layers


def step_rows(runner: Runner, dtype: torch.dtype, quick: bool) -> None:
    """One optimizer step over every Linear/Conv2d weight of a UNet (see the module docstring)."""
    from sara_kernels.nn import layer_of

    device = runner.device
    shapes = QUICK_WEIGHT_SHAPES if quick else SD15_WEIGHT_SHAPES
    name = "quick layers" if quick else "SD1.5 UNet"
    model = build_layers(shapes, device, dtype)
    numel = sum(p.numel() for p in model.parameters())
    sara_kernels.apply_sara(model, sara_kernels.SaRAConfig(fraction=ADAMW_DENSITY, budget_scope="per_layer"))
    layers = [layer for _, layer in sara_kernels.sparse_layers(model)]
    for layer in layers:
        layer._maybe_merge()  # what the first forward does: registers the delta's layer
    deltas = sara_kernels.sparse_parameters(model)
    assert all(layer_of(p) is not None for p in deltas), "every delta must reach the fused path"
    k = sum(p.numel() for p in deltas)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in deltas:
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    n_layers = len(layers)
    shape = f"{name}: {n_layers} layers, k={k} of {numel}"
    weight_bytes = torch.finfo(dtype).bits // 8
    # delta, m, v read + written (fp32), grad read (fp32), base read, index read (int32), weight written.
    moved = k * (3 * 2 * 4 + 4 + 2 * weight_bytes + 4)
    print(f"  step: {shape}", flush=True)

    def record(variant: str, ms: float, graph: float | None = None, **extra) -> None:
        step = dict(kind="step", shape=shape, variant=variant, density=ADAMW_DENSITY, layers=n_layers)
        runner.record(**step, ms=ms, graph_ms=graph, k=k, numel=numel, us_per_layer=1e3 * ms / n_layers, **extra)

    for backend in optimizer_backends(device):
        # foreach (the default): one sparse_adamw_multi_ call for all layers; per layer: one
        # sparse_adamw_ call each (foreach=False), what the optimizer did before the multi op.
        for foreach, suffix in ((True, ""), (False, " per-layer")):
            variant = f"SparseAdamW/{backend}{suffix}"
            opt = sara_kernels.SparseAdamW(deltas, lr=1e-4, foreach=foreach)

            def sparse_step(opt=opt, backend=backend):
                with sara_kernels.use_backend(backend):
                    opt.step()

            try:
                ms = bench_ms(sparse_step, device, runner.reps)
                graph = graph_ms(sparse_step, device)
            except Exception as exc:
                runner.record(kind="step", shape=shape, variant=variant, ms=None, error=repr(exc)[:300])
                continue
            record(variant, ms, graph, GBps=moved / ms / 1e6)
            del opt, sparse_step

    fused = dict(fused=True) if device == "cuda" else dict(foreach=True)
    torch_opt = torch.optim.AdamW(deltas, lr=1e-4, **fused)

    def torch_step(torch_opt=torch_opt, layers=layers):
        torch_opt.step()
        for layer in layers:
            layer._maybe_merge()  # the re-merge the next forward would do (O(k) per layer)

    record("torch AdamW on the deltas + re-merge", bench_ms(torch_step, device, runner.reps))
    del torch_opt, torch_step

    # Full fine-tuning's optimizer step: fp32 master weights, their gradients and both moments.
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    if free is not None and free < numel * 4 * 4 * 1.2:
        runner.record(
            kind="step",
            shape=shape,
            variant="full: torch AdamW on fp32 weights",
            ms=None,
            skipped=f"needs {numel * 16 / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
        )
        return
    del model, layers, deltas
    dense = [torch.zeros(s, device=device) for s, count in shapes.items() for _ in range(count)]
    for p in dense:
        p.requires_grad_(True)
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    full_opt = torch.optim.AdamW(dense, lr=1e-4, **fused)
    record("full: torch AdamW on fp32 weights", bench_ms(full_opt.step, device, runner.reps))
    del full_opt, dense


def summary(info: dict) -> None:
    rows = info["rows"]
    print(
        f"\nsummary on {info['device']} ({info['dtype']}); ceilings: copy {info['ceilings']['copy_GBps']:.0f} GB/s, "
        f"gemm {info['ceilings']['gemm_TFLOPs']:.0f} TFLOP/s"
    )
    print(
        f"  {'shape':<30} {'density':>7} {'dense ms':>9} {'best':<14} {'best ms':>9} {'xdense':>6} {'auto x':>6}"
        f" {'graph: best':<14} {'xdense':>6} {'auto x':>6} target (on the graph ratio of auto when timed)"
    )
    groups: dict = {}
    for r in rows:
        if r["kind"] in ("linear", "conv") and r.get("ms") is not None and r["variant"] != "dense":
            groups.setdefault((r["shape"], r["density"]), []).append(r)
    misses = 0
    for (shape, density), rs in groups.items():
        best = min(rs, key=lambda r: r["ms"])
        auto = next((r for r in rs if r["variant"].endswith("/auto")), None)
        graphed = [r for r in rs if r.get("vs_dense_graph") is not None]
        gbest = min(graphed, key=lambda r: r["graph_ms"]) if graphed else None
        pick = auto or best
        ratio = pick.get("vs_dense_graph") or pick["vs_dense"]
        if density >= 0.02:
            target, ok = "<=1.1", ratio <= 1.1
        elif density <= 0.006:
            target, ok = "<1.0", ratio < 1.0
        else:
            target, ok = "-", True
        misses += not ok
        nan = float("nan")
        print(
            f"  {shape:<30} {density:>7.2%} {best['dense_ms']:9.4f} {best['variant']:<14} {best['ms']:9.4f}"
            f" {best['vs_dense']:6.2f} {auto['vs_dense'] if auto else nan:6.2f}"
            f" {gbest['variant'] if gbest else '-':<14} {gbest['vs_dense_graph'] if gbest else nan:6.2f}"
            f" {(auto or {}).get('vs_dense_graph') or nan:6.2f} {target} {'ok' if ok else 'MISS'}"
        )
    for r in rows:
        if r["kind"] == "adamw" and r.get("ms") is not None:
            extra = ""
            if "vs_copy_bandwidth" in r:
                extra = f"{r['vs_copy_bandwidth']:.0%} of copy, x{r['vs_torch']:.2f} torch"
            print(
                f"  adamw {r['shape']:<24} {r['variant']:<24} {r['ms']:9.4f} ms {r['GBps']:7.0f} GB/s {extra}"
            )
    steps = [r for r in rows if r["kind"] == "step" and r.get("ms") is not None]
    full = next((r for r in steps if r["variant"].startswith("full")), None)
    for r in steps:
        ratio = f" x{r['ms'] / full['ms']:.2f} full" if full else ""
        graph = f" (graph {r['graph_ms']:.3f} ms)" if r.get("graph_ms") else ""
        print(
            f"  step  {r['shape'][:24]:<24} {r['variant']:<36} {r['ms']:9.3f} ms "
            f"{r['us_per_layer']:6.1f} us/layer{ratio}{graph}"
        )
    failures = [r for r in rows if r.get("error") or r.get("matches") is False]
    print(
        f"  sampled-gradient targets missed: {misses} of {len(groups)}; failures/mismatches: {len(failures)}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    parser.add_argument("--only", default="linear,conv,adamw,step", help="comma list of sections")
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    parser.add_argument("--reps", type=int, default=None, help="CUDA: do_bench ms budget; CPU: repeats")
    parser.add_argument(
        "--json", default=None, help="output (default $OUT/bench_gpu_kernels.json if OUT is set)"
    )
    args = parser.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (40 if device == "cuda" else (2 if args.quick else 5))
    torch.manual_seed(0)
    runner = Runner(device, reps)
    runner.densities = [float(d) for d in args.densities.split(",")]
    runner.variants = variants(device)
    sections = set(args.only.split(","))
    print(f"device {device}; variants: {', '.join(v[0] for v in runner.variants)}", flush=True)
    info = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sara_kernels": sara_kernels.__version__,
        "dtype": args.dtype,
        "command": "python benchmarks/bench_gpu_kernels.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "backends": sara_kernels.backends(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["l2_MiB"] = getattr(props, "L2_cache_size", 0) / 2**20
    info["ceilings"] = ceilings(runner, dtype, args.quick)
    info["rows"] = runner.rows
    path = args.json or (
        os.path.join(os.environ["OUT"], "bench_gpu_kernels.json") if os.environ.get("OUT") else None
    )

    def save():
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(info, f, indent=1, default=str)
            os.replace(tmp, path)

    if "linear" in sections:
        linear_rows(runner, dtype, args.quick)
        save()
    if "conv" in sections:
        conv_rows(runner, dtype, args.quick)
        save()
    if "adamw" in sections:
        adamw_rows(runner, dtype, args.quick, info["ceilings"]["copy_GBps"])
        save()
    if "step" in sections:
        step_rows(runner, dtype, args.quick)
    save()
    if path:
        print(f"wrote {path}")
    summary(info)
    bad = [r for r in runner.rows if r.get("error") or r.get("matches") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
