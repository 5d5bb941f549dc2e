"""The package imports and works without its compiled extension, and says why."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import sara_kernels

_BLOCK_NATIVE = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sara_kernels._C":
                raise ImportError("simulated: extension not built")
            return None

    sys.meta_path.insert(0, _Block())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import sara_kernels
        from sara_kernels import ops
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("sara_kernels._C could not be imported" in m and "simulated" in m for m in messages), messages
    info = sara_kernels.backends()
    assert info["native"]["loaded"] is False and info["available"]["cpu"] is False
    assert info["ops"]["cpu"]["sampled_weight_grad_linear"] == "reference"
    g, x = torch.randn(4, 3), torch.randn(4, 5)
    index = torch.tensor([0, 7, 14], dtype=torch.int32)
    got = ops.sampled_weight_grad_linear(g, x, index, 3, 5)
    want = (g.t() @ x).reshape(-1)[index.long()]
    assert torch.allclose(got, want), (got, want)
    # The layer ops' Python autograd and autocast (the compiled extension registers them in C++).
    import torch.nn.functional as F
    for dense, inp in (
        (torch.nn.Linear(6, 4), torch.randn(3, 6)),
        (torch.nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6)),
    ):
        layer = sara_kernels.SparseDeltaLinear.from_dense(dense, k=7) if isinstance(dense, torch.nn.Linear) else (
            sara_kernels.SparseDeltaConv2d.from_dense(dense, k=9)
        )
        inp = inp.requires_grad_()
        layer(inp).square().sum().backward()
        w = layer.weight.detach().clone().requires_grad_()
        x2 = inp.detach().clone().requires_grad_()
        functional = F.linear if isinstance(dense, torch.nn.Linear) else (lambda a, b, c: F.conv2d(a, b, c, 1, 1))
        functional(x2, w, layer.bias.detach()).square().sum().backward()
        assert torch.allclose(layer.sparse_delta.grad, w.grad.view(-1)[layer.sparse_index.long()], atol=1e-5)
        assert torch.allclose(inp.grad, x2.grad, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(inp).dtype == torch.bfloat16
    try:
        with sara_kernels.use_backend("cpu"):
            ops.sampled_weight_grad_linear(g, x, index, 3, 5)
    except RuntimeError as error:
        assert "backend 'cpu' was forced" in str(error) and "could not be imported" in str(error), error
    else:
        raise AssertionError("forcing 'cpu' without the extension must fail")
    print("ok")
    """
)


def test_import_without_native_extension_warns_and_uses_reference():
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_NATIVE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_installed_package_reports_its_backends():
    info = sara_kernels.backends()
    assert info["available"]["reference"] is True
    assert set(info["ops"]["cpu"]) == set(sara_kernels._backend.OPS)
    assert sara_kernels.__version__


def test_native_extension_loaded_when_required():
    """CI sets SARA_KERNELS_REQUIRE_NATIVE=1 so a broken build cannot pass as a reference-only run."""
    import os

    import pytest

    if os.environ.get("SARA_KERNELS_REQUIRE_NATIVE") != "1":
        pytest.skip("SARA_KERNELS_REQUIRE_NATIVE is not set")
    info = sara_kernels.backends()
    assert info["native"]["loaded"], info["native"]["error"]
    assert info["ops"]["cpu"]["sampled_weight_grad_linear"] == "cpu"
