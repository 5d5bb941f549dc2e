"""The digits fine-tuning study (examples/digits) runs end to end in its quick mode.

A smoke test of the pipeline (data, cached pre-training and classifier, every method, metrics,
report, images), not a result: the quick mode trains for a handful of steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "digits", "run_study.py")


def test_digits_study_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torchmetrics")
    pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    command = [sys.executable, SCRIPT, "--quick", "--cache-dir", str(cache), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The pre-trained UNet and the classifier are cached as safetensors, keyed by their config.
    cached = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("unet-") and n.endswith(".safetensors") for n in cached), cached
    assert any(n.startswith("classifier-") and n.endswith(".safetensors") for n in cached), cached
    assert not any(".tmp-" in n for n in cached), cached

    report = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# Digits study results (quick)")
    summary = report["summary"]
    expected = {"pretrained", "full", "lora", "sara", "sara_no_progressive", "sara_no_lowrank", "sara_plain"}
    has_supertuning = hasattr(peft, "SupertuningConfig")
    assert set(summary) == expected | ({"supertuning"} if has_supertuning else set())
    k = report["budget_k"]
    for method in ("lora", "sara", "sara_no_progressive", "sara_no_lowrank", "sara_plain"):
        assert summary[method]["trainable"] == k
    if has_supertuning:
        assert 0.9 * k <= summary["supertuning"]["trainable"] <= 1.1 * k
    assert summary["full"]["trainable"] > 10 * k
    for record in report["records"]:
        assert math.isfinite(record["fd"]) and record["fd"] >= 0, record
        assert 0.0 <= record["in_class"] <= 1.0, record
        if record["method"] != "pretrained":
            assert math.isfinite(record["ms_per_step"]) and record["ms_per_step"] > 0, record
            assert math.isfinite(record["peak_mib"]), record
    for task in ("backbone", "downstream"):
        assert math.isfinite(report["floor"][task]["mean"])
    for name in report["images"].values():
        assert (out / name).stat().st_size > 0, name
    assert (out / "downstream_sara.png").exists() and (out / "fd_chart.png").exists()
    assert not (tmp_path / "xdg" / "sara_kernels").exists()  # --cache-dir wins over XDG_CACHE_HOME
