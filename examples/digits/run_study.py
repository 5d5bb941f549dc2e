"""Does SaRA fine-tune a pre-trained diffusion model well? A small study on real data, on a CPU.

    python examples/digits/run_study.py            # the study (3 seeds), writes examples/digits/results/
    python examples/digits/run_study.py --quick    # a ~30 s smoke run of the whole pipeline (not a result)
    python examples/digits/run_study.py --tune     # the learning-rate grid used to pick each method's rate

1. Data: scikit-learn's 1,797 bundled 8x8 digits, upsampled to 16x16, split per class
   (60% train / 40% held-out, seeded).
2. Pre-training (cached): a small diffusers UNet2DModel trained as a DDPM on digits 0-4.
3. A digit classifier (cached) whose 64-d penultimate features define the Fréchet distance (FD).
4. Fine-tuning at one trainable budget: SaRA (sara_kernels), PEFT LoRA and Super-Tuning, full
   fine-tuning, and SaRA without progressive re-selection / low-rank constraint / both, on
   (a) backbone: digits 0-4 again, (b) downstream: the unseen digits 5-9.
5. Metrics per run: FD of generated samples to the held-out images of the task's classes, the
   share of samples the classifier puts in the task's classes, time per step, peak memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time

# OpenMP threads spin only briefly before sleeping when idle (libgomp's default spins ~300k
# iterations). Measured on 2 shared cores, a 2-thread pre-training step: idle machine 0.21 s
# (default) / 0.20 s (this) / 0.33 s (OMP_WAIT_POLICY=PASSIVE); with two busy processes beside
# it 1.9 s / 1.2 s / 0.56 s (and up to 7 s with the default under heavier load). Set before torch
# loads the OpenMP runtime; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import methods as M  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

TASKS = {
    "backbone": {"classes": [0, 1, 2, 3, 4], "title": "backbone fine-tuning (digits 0-4)"},
    "downstream": {"classes": [5, 6, 7, 8, 9], "title": "downstream fine-tuning (unseen digits 5-9)"},
}

PRESETS = {
    "default": dict(
        pretrain=dict(classes=[0, 1, 2, 3, 4], steps=1200, batch=64, lr=2e-3, warmup=100, ema=0.995, seed=0),
        classifier=dict(epochs=15, batch=64, lr=2e-3, seed=0),
        finetune=dict(steps=150, batch=32),
        eval=dict(samples=512, ddim_steps=20),
        seeds=3,
    ),
    "quick": dict(
        pretrain=dict(classes=[0, 1, 2, 3, 4], steps=30, batch=32, lr=2e-3, warmup=5, ema=0.9, seed=0),
        classifier=dict(epochs=1, batch=64, lr=2e-3, seed=0),
        finetune=dict(steps=4, batch=8),
        eval=dict(samples=32, ddim_steps=4),
        seeds=1,
    ),
}

TUNE_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
TUNE_METHODS = ["full", "lora", "supertuning", "sara"]
TUNE_SEED = 100
#: The grid's evaluation: half the study's samples (the grid has 48 runs).
TUNE_EVAL = dict(samples=256, ddim_steps=20)
GRID_SHAPE = (6, 10)  # rows x columns of the sample grids
PRETRAIN_THREADS = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Cached models
# ---------------------------------------------------------------------------------------------
def prepare(cache_dir: str, preset: dict) -> dict:
    """Train (or load) the classifier and the pre-trained UNet; returns their paths and facts."""
    data = common.load_digits_16()
    out = {}

    clf_cfg = dict(
        preset["classifier"], model="DigitClassifier-v1", split=[common.SPLIT_SEED, common.TRAIN_SHARE]
    )
    clf_path = os.path.join(cache_dir, f"classifier-{common.config_key(clf_cfg)}.safetensors")
    t0 = time.perf_counter()
    if os.path.exists(clf_path):
        _, meta = common.load_tensors(clf_path)
        log(f"classifier: cached {clf_path} (held-out accuracy {meta['test_accuracy']:.2%})")
        out["classifier"] = dict(path=clf_path, cached=True, test_accuracy=meta["test_accuracy"], seconds=0.0)
    else:
        torch.set_num_threads(PRETRAIN_THREADS)
        clf = common.train_classifier(data, clf_cfg, log=log)
        common.save_tensors_atomic(
            clf.state_dict(), clf_path, {"config": clf_cfg, "test_accuracy": clf.test_accuracy}
        )
        seconds = time.perf_counter() - t0
        out["classifier"] = dict(
            path=clf_path, cached=False, test_accuracy=clf.test_accuracy, seconds=seconds
        )
        log(f"classifier: trained in {seconds:.0f} s -> {clf_path}")

    unet_cfg = dict(
        preset["pretrain"],
        unet=common.UNET_CONFIG,
        scheduler=common.SCHEDULER_CONFIG,
        split=[common.SPLIT_SEED, common.TRAIN_SHARE],
        threads=PRETRAIN_THREADS,
    )
    unet_cfg = json.loads(json.dumps(unet_cfg))  # tuples -> lists, as the cache key sees it
    unet_path = os.path.join(cache_dir, f"unet-{common.config_key(unet_cfg)}.safetensors")
    t0 = time.perf_counter()
    if os.path.exists(unet_path):
        log(f"pre-trained UNet: cached {unet_path}")
        out["unet"] = dict(path=unet_path, cached=True, seconds=0.0)
    else:
        torch.set_num_threads(PRETRAIN_THREADS)
        log(f"pre-training the UNet on digits {unet_cfg['classes']} ({unet_cfg['steps']} steps) ...")
        model = common.pretrain_unet(data, unet_cfg, log=log)
        common.save_tensors_atomic(model.state_dict(), unet_path, {"config": unet_cfg})
        seconds = time.perf_counter() - t0
        out["unet"] = dict(path=unet_path, cached=False, seconds=seconds)
        log(f"pre-trained UNet: {seconds:.0f} s -> {unet_path}")
    out["unet"]["config"] = unet_cfg
    return out


# ---------------------------------------------------------------------------------------------
# One run (in a worker process or inline)
# ---------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _loaded(key: str, loader):
    if key not in _WORKER:
        _WORKER[key] = loader()
    return _WORKER[key]


def _classifier(path: str) -> common.DigitClassifier:
    def load():
        clf = common.DigitClassifier()
        clf.load_state_dict(common.load_tensors(path)[0])
        return clf.eval()

    return _loaded(path, load)


def fd_and_rate(
    clf: common.DigitClassifier, fake: torch.Tensor, real: torch.Tensor, classes
) -> tuple[float, float]:
    """Fréchet distance in the classifier's feature space (torchmetrics), and the share of
    ``fake`` classified into ``classes``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=common.FeatureExtractor(clf))
    with torch.no_grad():
        metric.update(real, real=True)
        metric.update(fake, real=False)
        fd = float(metric.compute())
        predicted = clf(fake).argmax(1)
    rate = float(torch.isin(predicted, torch.tensor(classes)).float().mean())
    return fd, rate


def run_job(spec: dict) -> dict:
    """Fine-tune (unless method == 'pretrained'), sample, score. Returns a flat record."""
    t_job = time.perf_counter()
    data = _loaded("data", common.load_digits_16)
    classes = TASKS[spec["task"]]["classes"]
    unet = common.build_unet(spec["unet_config"])
    unet.load_state_dict(_loaded(spec["unet_path"], lambda: common.load_tensors(spec["unet_path"])[0]))
    record = {k: spec[k] for k in ("method", "task", "seed")}
    model = unet
    if spec["method"] != "pretrained":
        x_train, _ = common.select_classes(data["train"], classes)
        steps, batch = spec["finetune"]["steps"], spec["finetune"]["batch"]
        unet.train()
        setup = M.setup_method(
            spec["method"], unet, k=spec["k"], lr=spec["lr"], steps=steps, seed=spec["seed"]
        )
        model = setup.model
        scheduler = common.build_scheduler()
        # Every method: linear warm-up over 5% of the steps, then cosine decay to 0.
        warmup = max(1, steps // 20)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            setup.optimizer, lambda step: common.cosine_lr(step, steps, warmup)
        )
        g = torch.Generator().manual_seed(spec["seed"])
        times, losses = [], []
        with common.PeakRSS() as memory:
            for _ in range(steps):
                t0 = time.perf_counter()
                idx = torch.randint(0, x_train.shape[0], (batch,), generator=g)
                loss = common.diffusion_loss(model, scheduler, x_train[idx], g)
                losses.append(float(loss.detach()))
                if setup.regularizer is not None:
                    loss = loss + setup.regularizer()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
                setup.optimizer.step()
                setup.optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
                setup.after_step()
                times.append(time.perf_counter() - t0)
        record.update(
            trainable=setup.trainable,
            lr=spec["lr"],
            ms_per_step=1e3 * statistics.median(times[1:] if len(times) > 1 else times),
            peak_mib=memory.peak_above_start / 2**20,
            peak_exact=memory.exact,
            loss_first=statistics.fmean(losses[: max(1, steps // 10)]),
            loss_last=statistics.fmean(losses[-max(1, steps // 10) :]),
            info=setup.info,
        )
    else:
        record.update(trainable=0)
    fake = common.sample(
        model, spec["eval"]["samples"], spec["eval"]["ddim_steps"], seed=20_000 + spec["seed"]
    )
    reference_split = spec.get("reference", "test")
    real, _ = common.select_classes(data[reference_split], classes)
    fd, rate = fd_and_rate(_classifier(spec["classifier_path"]), fake, real, classes)
    record.update(fd=fd, in_class=rate, reference=reference_split, seconds=time.perf_counter() - t_job)
    if spec.get("keep_samples"):
        record["samples"] = fake[: GRID_SHAPE[0] * GRID_SHAPE[1]].clone()
    return record


def run_jobs(specs: list[dict], jobs: int, threads: int) -> list[dict]:
    results = []
    t0 = time.perf_counter()

    def done(r):
        results.append(r)
        log(
            f"  {len(results):>2}/{len(specs)} {r['task']:<10} {r['method']:<20} seed {r['seed']}"
            + (f" lr {r['lr']:.0e}: " if "lr" in r else ": ")
            + f"FD {r['fd']:.2f}, in-class {r['in_class']:.0%}"
            + (f", {r['ms_per_step']:.0f} ms/step" if "ms_per_step" in r else "")
            + f" ({r['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s elapsed)"
        )

    if jobs <= 1:
        _init_worker(threads)
        for spec in specs:
            done(run_job(spec))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(run_job, spec) for spec in specs]
            for future in concurrent.futures.as_completed(futures):
                done(future.result())
    return results


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def fmt(stat: dict | None, digits: int = 2, percent: bool = False) -> str:
    if stat is None:
        return "-"
    if percent:
        return f"{100 * stat['mean']:.{max(0, digits - 2)}f} ± {100 * stat['std']:.{max(0, digits - 2)}f}%"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summarize(records: list[dict], method_order: list[str]) -> dict:
    summary: dict = {}
    for method in method_order:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        entry: dict = {"label": M.LABELS.get(method, method), "trainable": rows[0]["trainable"]}
        rates = {r["task"]: r["lr"] for r in rows if "lr" in r}
        if rates:
            entry["lr"] = rates
        for task in TASKS:
            task_rows = [r for r in rows if r["task"] == task]
            if task_rows:
                entry[task] = {
                    "fd": mean_std([r["fd"] for r in task_rows]),
                    "in_class": mean_std([r["in_class"] for r in task_rows]),
                }
        if "ms_per_step" in rows[0]:
            entry["ms_per_step"] = mean_std([r["ms_per_step"] for r in rows])
            entry["peak_mib"] = mean_std([r["peak_mib"] for r in rows])
        summary[method] = entry
    return summary


def paired_difference(records: list[dict], a: str, b: str, task: str) -> dict | None:
    """FD(a) - FD(b) per seed (same data order, timesteps and sampling noise for both)."""
    fa = {r["seed"]: r["fd"] for r in records if r["method"] == a and r["task"] == task}
    fb = {r["seed"]: r["fd"] for r in records if r["method"] == b and r["task"] == task}
    seeds = sorted(set(fa) & set(fb))
    if not seeds:
        return None
    diffs = [fa[s] - fb[s] for s in seeds]
    return {**mean_std(diffs), "a_better": sum(d < 0 for d in diffs)}


#: Paired FD differences reported: (a, b) -> FD(a) - FD(b) per seed.
COMPARISONS = [
    ("sara", "lora"),
    ("sara", "supertuning"),
    ("sara", "full"),
    ("sara_no_progressive", "lora"),
    ("sara_plain", "lora"),
    ("sara_plain", "full"),
    ("sara", "sara_no_progressive"),
    ("sara", "sara_no_lowrank"),
    ("sara_no_progressive", "sara_plain"),
]


def paired_comparisons(records: list[dict], methods: list[str]) -> dict:
    return {
        f"{a} - {b}": {task: paired_difference(records, a, b, task) for task in TASKS}
        for a, b in COMPARISONS
        if a in methods and b in methods
    }


def markdown_table(summary: dict, floor: dict, budget_k: int, targeted: int) -> str:
    lines = [
        "| method | trainable params | lr (backbone / downstream) | FD backbone 0-4 ↓ | FD downstream 5-9 ↓ | samples in 5-9 ↑ "
        "| time / step (ms) | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines.append(
        f"| real held-out vs real train images (floor) | - | - | {fmt(floor.get('backbone'))} "
        f"| {fmt(floor.get('downstream'))} | - | - | - |"
    )
    for e in summary.values():
        share = f" ({e['trainable'] / targeted:.1%})" if 0 < e["trainable"] <= budget_k * 1.05 else ""
        lr = " / ".join(f"{e['lr'][t]:.0e}" for t in TASKS if t in e.get("lr", {})) or "-"
        down = e.get("downstream")
        lines.append(
            f"| {e['label']} | {e['trainable']:,}{share} | {lr} "
            f"| {fmt(e.get('backbone', {}).get('fd'))} | {fmt(down['fd']) if down else '-'} "
            f"| {fmt(down['in_class'], 3, percent=True) if down else '-'} "
            f"| {fmt(e.get('ms_per_step'), 0)} | {fmt(e.get('peak_mib'), 1)} |"
        )
    return "\n".join(lines)


def save_grid(samples: torch.Tensor, path: str, scale: int = 3, gap: int = 1) -> None:
    """A rows x cols grid of 16x16 samples (seed 0), ``gap`` grey pixels between them, upscaled."""
    from PIL import Image

    rows, cols = GRID_SHAPE
    size = common.IMAGE_SIZE
    step = size + gap
    canvas = torch.full((rows * step - gap, cols * step - gap), -0.5)
    for i in range(min(samples.shape[0], rows * cols)):
        r, c = divmod(i, cols)
        canvas[r * step : r * step + size, c * step : c * step + size] = samples[i, 0]
    pixels = ((canvas + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, mode="L")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path, optimize=True)


def save_chart(summary: dict, floor: dict, path: str) -> None:
    """FD per method and task: mean (dot) and std over seeds (bar), log scale, real-data floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    tasks = [t for t in TASKS if any(t in e for e in summary.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 3.2), squeeze=False, sharey=True)
    names = list(summary)
    y = list(range(len(names)))
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, m in enumerate(names):
            if task not in summary[m]:
                continue
            fd = summary[m][task]["fd"]
            color = "#777777" if m == "pretrained" else "#d62728" if m.startswith("sara") else "#1f77b4"
            ax.errorbar(fd["mean"], i, xerr=fd["std"], fmt="o", color=color, capsize=3, markersize=5)
            ax.annotate(
                f"{fd['mean']:.1f}",
                (fd["mean"], i),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
        if task in floor:
            ax.axvline(floor[task]["mean"], color="k", linestyle=":", linewidth=1, label="real-data floor")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(
            FuncFormatter(
                lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
            )
        )
        ax.set_yticks(y, [summary[m]["label"] for m in names], fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.7)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.set_xlabel("FD to held-out images (log scale; lower is better)", fontsize=8)
        ax.set_title(TASKS[task]["title"], fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for name in ("torch", "diffusers", "peft", "torchmetrics", "scikit-learn", "sara_kernels"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
    except OSError:
        env["cpu"] = None
    return env


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~30 s smoke run (tiny budgets; not a result)")
    p.add_argument("--tune", action="store_true", help="run the learning-rate grid instead of the study")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method and task (default 3; quick 1)")
    p.add_argument(
        "--out", default=None, help="output folder (default examples/digits/results; quick: <cache>/quick)"
    )
    p.add_argument("--cache-dir", default=None, help=f"model cache (default {common.default_cache_dir()})")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes, 1 thread each (default min(2, CPUs); quick 1)",
    )
    p.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(M.METHODS))
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    cache_dir = args.cache_dir or common.default_cache_dir()
    if args.out:
        out_dir = args.out
    elif args.quick:
        out_dir = os.path.join(cache_dir, "quick")
    else:
        out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else min(2, os.cpu_count() or 1))
    threads = PRETRAIN_THREADS if jobs <= 1 else 1
    methods = args.methods.split(",") if args.methods else list(M.METHODS)
    unknown = [m for m in methods if m not in M.METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(M.METHODS)}")
    if "supertuning" in methods and not M.supertuning_available():
        log("peft has no SupertuningConfig (it needs a newer peft): skipping Super-Tuning")
        methods.remove("supertuning")

    log(f"digits study ({'quick' if args.quick else 'default'}): cache {cache_dir}, output {out_dir}")
    prepared = prepare(cache_dir, preset)
    probe = common.build_unet(prepared["unet"]["config"]["unet"])
    budget_k = M.budget(probe)
    targeted = sum(m.weight.numel() for _, m in M.target_layers(probe))
    log(
        f"budget K = {budget_k:,} trainable entries ({budget_k / targeted:.1%} of the {targeted:,} targeted weights)"
    )

    base = dict(
        unet_path=prepared["unet"]["path"],
        unet_config=prepared["unet"]["config"]["unet"],
        classifier_path=prepared["classifier"]["path"],
        finetune=preset["finetune"],
        eval=preset["eval"],
        k=budget_k,
    )
    if args.tune:
        return tune(args, base, methods, out_dir, jobs, threads, t_start)

    specs = []
    for seed in range(seeds):
        for task in TASKS:
            for method in methods:
                lr = M.learning_rate(method, task)
                specs.append(dict(base, method=method, task=task, seed=seed, lr=lr, keep_samples=seed == 0))
    for seed in range(seeds):
        for task in TASKS:
            specs.append(dict(base, method="pretrained", task=task, seed=seed, keep_samples=seed == 0))
    log(f"{len(specs)} runs ({seeds} seed(s)), {jobs} process(es) x {threads} thread(s)")
    t_runs = time.perf_counter()
    records = run_jobs(specs, jobs, threads)
    runs_seconds = time.perf_counter() - t_runs

    # The floor: FD of real training images (as many as the generated samples) to the held-out ones.
    data = common.load_digits_16()
    clf = _classifier(prepared["classifier"]["path"])
    floor_runs: dict = {}
    for task, t in TASKS.items():
        x_train, _ = common.select_classes(data["train"], t["classes"])
        x_test, _ = common.select_classes(data["test"], t["classes"])
        values = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(30_000 + seed)
            pick = torch.randperm(x_train.shape[0], generator=g)[: preset["eval"]["samples"]]
            values.append(fd_and_rate(clf, x_train[pick], x_test, t["classes"])[0])
        floor_runs[task] = mean_std(values)

    order = ["pretrained", *methods]
    records.sort(key=lambda r: (order.index(r["method"]), list(TASKS).index(r["task"]), r["seed"]))
    summary = summarize(records, order)

    # Images: one grid per method and task (seed 0), the real held-out images, the FD chart.
    grids = {}
    for task, t in TASKS.items():
        real, _ = common.select_classes(data["test"], t["classes"])
        real = real[torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(1))]
        save_grid(real, os.path.join(out_dir, f"{task}_real.png"))
        grids[f"{task}/real"] = f"{task}_real.png"
        for method in order:
            rec = next(
                (r for r in records if r["method"] == method and r["task"] == task and "samples" in r), None
            )
            if rec is not None:
                save_grid(rec["samples"], os.path.join(out_dir, f"{task}_{method}.png"))
                grids[f"{task}/{method}"] = f"{task}_{method}.png"
    save_chart(summary, floor_runs, os.path.join(out_dir, "fd_chart.png"))
    grids["chart"] = "fd_chart.png"
    for r in records:
        r.pop("samples", None)

    comparisons = paired_comparisons(records, methods)
    total_seconds = time.perf_counter() - t_start
    report = {
        "mode": "quick" if args.quick else "default",
        "command": "python examples/digits/run_study.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "preset": preset,
        "seeds": seeds,
        "jobs": jobs,
        "threads_per_job": threads,
        "budget_k": budget_k,
        "targeted_weights": targeted,
        "lora_rank": M.LORA_RANK,
        "nuclear_weight": M.NUCLEAR_WEIGHT,
        "learning_rates": {task: {m: M.learning_rate(m, task) for m in methods} for task in TASKS},
        # Cache file names only: the cache folder is the user's (or a temporary one).
        "prepared": {
            name: {k: (os.path.basename(v) if k == "path" else v) for k, v in facts.items()}
            for name, facts in prepared.items()
        },
        "floor": floor_runs,
        "summary": summary,
        "paired_fd_differences": comparisons,
        "records": records,
        "images": grids,
        "seconds": {
            "classifier": prepared["classifier"]["seconds"],
            "pretraining": prepared["unet"]["seconds"],
            "runs": runs_seconds,
            "total": total_seconds,
        },
        "environment": environment(),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = render_markdown(report, targeted)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"done in {total_seconds:.0f} s; results in {out_dir}")
    return 0


def render_markdown(report: dict, targeted: int) -> str:
    p = report["preset"]
    lines = [
        f"# Digits study results ({report['mode']})",
        "",
        f"`{report['command']}` — {report['seeds']} seed(s), {report['jobs']} worker process(es) x "
        f"{report['threads_per_job']} thread(s); total {report['seconds']['total']:.0f} s "
        f"(classifier {report['seconds']['classifier']:.0f} s, pre-training {report['seconds']['pretraining']:.0f} s, "
        f"fine-tuning + evaluation {report['seconds']['runs']:.0f} s).",
        "",
        f"Budget K = {report['budget_k']:,} trainable entries = {report['budget_k'] / targeted:.1%} of the "
        f"{targeted:,} Linear/Conv2d weights (LoRA rank {report['lora_rank']} on all of them). "
        f"Fine-tuning: {p['finetune']['steps']} steps, batch {p['finetune']['batch']}; evaluation: "
        f"{p['eval']['samples']} samples per run, DDIM {p['eval']['ddim_steps']} steps. FD: Fréchet distance "
        "to the held-out images of the task's classes in the digit classifier's 64-d feature space "
        "(torchmetrics); mean ± std over seeds. Time / step: median, one thread per run; peak memory: "
        "peak RSS during training above the RSS before it (Linux VmHWM, reset per run).",
        "",
        markdown_table(report["summary"], report["floor"], report["budget_k"], targeted),
        "",
        "Paired FD differences (same seeds, data order and sampling noise; negative = first is better):",
        "",
    ]
    for name, per_task in report["paired_fd_differences"].items():
        parts = []
        for task, d in per_task.items():
            if d is not None:
                parts.append(
                    f"{task} {d['mean']:+.2f} ± {d['std']:.2f} (first better in {d['a_better']}/{d['n']})"
                )
        lines.append(f"- {name}: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


def tune(args, base: dict, methods: list[str], out_dir: str, jobs: int, threads: int, t_start: float) -> int:
    """The learning-rate grid: each method x TUNE_GRID x task, one seed that the study does not
    use, scored by FD to the task's *training* images (the held-out images stay unseen)."""
    tuned = [m for m in TUNE_METHODS if m in methods]
    specs = [
        dict(base, eval=TUNE_EVAL, method=m, task=task, seed=TUNE_SEED, lr=lr, reference="train")
        for task in TASKS
        for m in tuned
        for lr in TUNE_GRID
    ]
    log(f"learning-rate grid: {len(specs)} runs")
    records = run_jobs(specs, jobs, threads)
    seconds = time.perf_counter() - t_start
    md, best = tuning_report(records, base["finetune"], seconds)
    with open(os.path.join(out_dir, "tuning.json"), "w") as f:
        json.dump(
            {
                "grid": TUNE_GRID,
                "seed": TUNE_SEED,
                "finetune": base["finetune"],
                "eval": TUNE_EVAL,
                "best": best,
                "seconds": seconds,
                "records": records,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out_dir, "tuning.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def tuning_report(records: list[dict], finetune: dict, seconds: float) -> tuple[str, dict]:
    """The grid as markdown, and the best rate per task and method (lowest finite FD)."""
    tuned = [m for m in TUNE_METHODS if any(r["method"] == m for r in records)]
    best: dict = {}
    lines = [
        "# Learning-rate grid",
        "",
        f"`python examples/digits/run_study.py --tune`: every method x learning rate x task, seed {TUNE_SEED} "
        f"(not one of the study's seeds), {finetune['steps']} steps, batch {finetune['batch']}, scored by FD "
        f"of {TUNE_EVAL['samples']} samples (DDIM {TUNE_EVAL['ddim_steps']} steps) to the task's training "
        "images (the held-out images are not used). Bold: the best rate of each method and task, which "
        "the study uses (methods.LEARNING_RATES).",
        "",
    ]
    for task in TASKS:
        best[task] = {}
        lines += [
            f"{TASKS[task]['title']}:",
            "",
            "| method | " + " | ".join(f"lr {lr:.0e}" for lr in TUNE_GRID) + " |",
            "|---|" + "---:|" * len(TUNE_GRID),
        ]
        for m in tuned:
            rows = {r["lr"]: r["fd"] for r in records if r["method"] == m and r["task"] == task}
            finite = {lr: fd for lr, fd in rows.items() if math.isfinite(fd)}
            best[task][m] = min(finite, key=finite.get)
            cells = [f"**{rows[lr]:.2f}**" if lr == best[task][m] else f"{rows[lr]:.2f}" for lr in TUNE_GRID]
            lines.append(f"| {M.LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Total {seconds:.0f} s.")
    return "\n".join(lines) + "\n", best


if __name__ == "__main__":
    sys.exit(main())
