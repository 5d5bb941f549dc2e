"""The README's main job runs end to end (a quick subset: frozen floor, full fine-tuning, SaRA)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _run_benchmark(script: str, *args: str, timeout: int = 600, env: dict | None = None):
    """``python benchmarks/<script> <args>`` from the repository root; it must exit 0."""
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _benchmark_modules(*names: str) -> list:
    """The named benchmark scripts, imported (with benchmarks/ on sys.path only meanwhile)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(BENCHMARKS)


def test_unet_benchmark_quick_runs_and_reports(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "unet.json"
    _run_benchmark(
        "bench_unet.py", "--quick", "--methods", "frozen,full,sara", "--no-charts", "--out", str(out)
    )
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) >= {"frozen", "full", "sara"}
    sara = rows["sara"]
    assert sara["trainable"] > 0 and sara["trainable"] < rows["full"]["trainable"] / 10
    # The SaRA training state is index + base + delta + grad + two moments per selected entry.
    assert 23.9 < sara["state_bytes"] / sara["trainable"] <= 24.01
    assert "targets" in report


@pytest.mark.parametrize("workload", ["flux_tiny", "sd3_tiny"])
def test_dit_benchmark_quick_runs_and_reports(tmp_path, workload):
    pytest.importorskip("diffusers")
    out = tmp_path / f"dit_{workload}.json"
    _run_benchmark(
        "bench_unet.py", "--workload", workload, "--quick",
        "--methods", "frozen,lora,sara", "--no-charts", "--out", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"frozen", "lora", "sara"}
    assert rows["frozen"]["family"] == workload.split("_")[0]
    sara, lora = rows["sara"], rows["lora"]
    assert 0 < sara["trainable"] < sara["linear_conv_entries"] / 10
    assert 23.9 < sara["state_bytes"] / sara["trainable"] <= 24.01
    assert lora["info"]["rank"] >= 1 and abs(lora["trainable"] - sara["K"]) < 0.1 * sara["K"]


def test_memory_budget_benchmark_runs(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "budget.json"
    _run_benchmark(
        "bench_memory_budget.py", "--budgets", "0.01", "--methods", "sara", "--no-charts", "--out", str(out)
    )
    report = json.loads(out.read_text())
    sara = report["budgets"]["0.01"]["sara"]
    assert sara["state_bytes"] > 0 and sara["peak_overhead_bytes"] > 0
    assert report["frozen"]["trainable"] == 0


def test_real_scale_configs_are_the_published_sizes():
    """The real-scale benchmark's models (built on the meta device): SD1.5's UNet and SD3-medium's
    transformer have their published parameter counts."""
    pytest.importorskip("diffusers")
    import diffusers
    import torch

    bench_real_scale, ub = _benchmark_modules("bench_real_scale", "_unet_bench")
    WORKLOADS = ub.WORKLOADS
    classes = {"unet": diffusers.UNet2DConditionModel, "sd3": diffusers.SD3Transformer2DModel}
    counts = {}
    for name, (workload, _) in bench_real_scale.MODELS.items():
        with torch.device("meta"):
            model = classes[WORKLOADS[workload].family](**WORKLOADS[workload].config)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {"sd15": 859_520_964, "sd3_medium": 2_028_328_000}, counts


def test_gpu_kernel_benchmark_quick_runs_on_cpu(tmp_path):
    # The GPU kernel benchmark's code paths (every section, the JSON and the summary) on tiny CPU
    # shapes, so that the script a GPU session runs does not rot between sessions.
    out = tmp_path / "kernels.json"
    result = _run_benchmark("bench_gpu_kernels.py", "--quick", "--device", "cpu", "--json", str(out))
    report = json.loads(out.read_text())
    kinds = {row["kind"] for row in report["rows"]}
    assert kinds == {"ceil", "linear", "conv", "adamw", "step"}
    steps = {row["variant"]: row for row in report["rows"] if row["kind"] == "step"}
    assert {
        "SparseAdamW/cpu",
        "SparseAdamW/cpu per-layer",
        "torch AdamW on the deltas + re-merge",
        "full: torch AdamW on fp32 weights",
    } <= set(steps), steps
    assert all(row["ms"] > 0 and row["layers"] == 7 and 0 < row["k"] < row["numel"] for row in steps.values())
    sampled = [
        row for row in report["rows"] if row["kind"] in ("linear", "conv") and row["variant"] != "dense"
    ]
    assert not [row for row in sampled if row.get("error")]
    timed = [row for row in sampled if not row.get("skipped")]  # skipped: > 40x dense at a lower density
    assert timed and all(row["matches"] and row["ms"] > 0 for row in timed)
    assert "summary on" in result.stdout


def test_gpu_kernel_benchmark_sd15_shapes_match_diffusers():
    """The step rows' embedded SD 1.5 weight shapes are those of diffusers' UNet with that config."""
    pytest.importorskip("diffusers")
    import collections

    import torch
    from diffusers import UNet2DConditionModel

    bench_gpu_kernels, ub = _benchmark_modules("bench_gpu_kernels", "_unet_bench")
    WORKLOADS = ub.WORKLOADS
    with torch.device("meta"):
        unet = UNet2DConditionModel(**WORKLOADS["sd15"][0])
    shapes = collections.Counter(
        tuple(m.weight.shape) for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    )
    assert dict(shapes) == bench_gpu_kernels.SD15_WEIGHT_SHAPES
    assert sum(shapes.values()) == 282


def test_adamw_profile_driver_runs_on_cpu(tmp_path):
    # The script a GPU session runs under ncu (benchmarks/profile_adamw.py), on small CPU tensors.
    from sara_kernels import _backend

    if not _backend.native_available("cpu"):
        pytest.skip("the profile driver times the native kernels")
    out = tmp_path / "profile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Triton's interpreter is slow
    _run_benchmark(
        "profile_adamw.py", "--device", "cpu", "--small", "--reps", "2", "--json", str(out), env=env
    )
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "native sparse_adamw_",
        "native sparse_adamw_multi_, 1 set",
        "native sparse_adamw_multi_, 5 sets",
    }
    assert all(row["ms"] > 0 and row["k"] > 0 for row in rows.values())


def test_trainer_overhead_benchmark_quick_runs():
    result = _run_benchmark("bench_trainer_overhead.py", "--quick", timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {row["rule"] for row in report["apply_sara"]} == {"threshold", "global fraction", "per-layer fraction"}
    assert all(row["seconds"] > 0 for row in report["apply_sara"])
    assert set(report["host_us"]) >= {"forward check (merged layer), per layer"}


def test_adapter_switch_benchmark_quick_runs(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    out = tmp_path / "switch.json"
    _run_benchmark(
        "bench_adapter_switch.py", "--workload", "tiny",
        "--repeats", "1", "--switches", "2", "--no-chart", "--out", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"sara", "lora"}
    for row in rows.values():
        assert row["switch_single_ms"]["median"] > 0 and row["forward_mix_ms"]["median"] > 0
    sara = rows["sara"]
    assert sara["base_restored_checksum_equal"] is True  # (fuse_lora + unfuse_lora is not exact)
    # Each resident SaRA adapter is its file's index + delta: 8 bytes per entry.
    assert [
        b / e for b, e in zip(sara["resident_bytes_per_adapter"], sara["entries_per_adapter"], strict=True)
    ] == [8.0] * 3


def test_layer_overhead_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "overhead.json"
    _run_benchmark(
        "bench_layer_overhead.py", "--calls", "20", "--layers", "4", "--steps", "2", "--repeats", "1",
        "--out", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["sparse_over_dense"]) == {"forward", "forward+backward"}
    assert all(us > 0 for us in report["us_per_call"].values())
