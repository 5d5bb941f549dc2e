"""Every public op on every backend available here, against the pure-PyTorch reference.

The reference itself is checked against independent brute-force definitions (loops over entries),
so a bug shared by the reference and a kernel cannot hide.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS
from helpers import random_index as _index
from helpers import random_values as _random

import sara_kernels
from sara_kernels import _ops, reference
from sara_kernels import ops as sk

FP = [torch.float32, torch.float16, torch.bfloat16]


def _grad_tolerance(dtype, n_terms, g, x):
    """Accumulation-order tolerance of a sum of n_terms products (inputs exact in both paths)."""
    eps = 1e-12 if dtype == torch.float64 else 2e-6
    scale = float(g.abs().max()) * float(x.abs().max()) if g.numel() and x.numel() else 1.0
    return dict(
        rtol=1e-5 if dtype != torch.float64 else 1e-10, atol=eps * math.sqrt(max(n_terms, 1)) * scale * 4
    )


def _skip_slow_triton(device, backend, size):
    if backend == "triton" and device == "cpu" and size > 50_000:
        pytest.skip("the Triton interpreter is slow; large shapes run on CUDA only")


# ---------------------------------------------------------------------------------------------
# Reference vs brute force
# ---------------------------------------------------------------------------------------------
def test_reference_linear_grad_matches_loops():
    g, x = _random((5, 3)).double(), _random((5, 4)).double()
    index = torch.tensor([0, 2, 5, 11], dtype=torch.int32)
    got = reference.sampled_weight_grad_linear(g, x, index, 3, 4)
    for j, flat in enumerate(index.tolist()):
        r, c = divmod(flat, 4)
        assert abs(float(got[j]) - sum(float(g[n, r] * x[n, c]) for n in range(5))) < 1e-12


def test_reference_conv_grad_matches_loops():
    x = _random((2, 4, 6, 5)).double()
    weight_shape, stride, padding, dilation, groups = [4, 2, 3, 2], [2, 1], [1, 2], [1, 2], 2
    out = F.conv2d(x, torch.zeros(weight_shape, dtype=torch.float64), None, stride, padding, dilation, groups)
    g = _random(out.shape).double()
    index = torch.arange(0, 48, 5, dtype=torch.int32)
    got = reference.sampled_weight_grad_conv2d(g, x, index, weight_shape, stride, padding, dilation, groups)
    O, Cg, KH, KW = weight_shape
    for j, flat in enumerate(index.tolist()):
        o, rest = divmod(flat, Cg * KH * KW)
        c, rest = divmod(rest, KH * KW)
        i, jj = divmod(rest, KW)
        cin = (o // (O // groups)) * Cg + c
        total = 0.0
        for n in range(x.shape[0]):
            for p in range(g.shape[2]):
                for q in range(g.shape[3]):
                    h = p * stride[0] + i * dilation[0] - padding[0]
                    w = q * stride[1] + jj * dilation[1] - padding[1]
                    if 0 <= h < x.shape[2] and 0 <= w < x.shape[3]:
                        total += float(g[n, o, p, q] * x[n, cin, h, w])
        assert abs(float(got[j]) - total) < 1e-12


# ---------------------------------------------------------------------------------------------
# select_small_magnitude
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (3, 17), (129, 7), (4, 3, 3, 3)])
@pytest.mark.parametrize("dtype", FP + [torch.float64])
def test_select_by_threshold(device, backend, shape, dtype):
    w = (_random(shape, device=device) * 0.01).to(dtype)
    threshold = 5e-3
    with sara_kernels.use_backend(backend):
        index = sk.select_small_magnitude(w, threshold=threshold)
    assert index.dtype == torch.int32
    flat = w.reshape(-1).cpu().double()
    expected = [i for i, v in enumerate(flat.tolist()) if abs(v) < threshold]
    assert index.cpu().tolist() == expected


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 7, 64, 200])
def test_select_by_count_breaks_ties_by_index(device, backend, k):
    # Few distinct magnitudes (and both signs) so many ties straddle the k-th value.
    w = (torch.randint(-4, 5, (10, 20)).float() * 0.25).to(device)
    with sara_kernels.use_backend(backend):
        index = sk.select_small_magnitude(w, k=k)
    flat = w.reshape(-1).cpu().tolist()
    expected = sorted(sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i))[:k])
    assert index.cpu().tolist() == expected
    assert index.dtype == torch.int32


def test_select_rejects_bad_arguments():
    w = _random((4, 4))
    with pytest.raises(ValueError, match="exactly one of threshold or k"):
        sk.select_small_magnitude(w)
    with pytest.raises(ValueError, match="exactly one of threshold or k"):
        sk.select_small_magnitude(w, threshold=0.1, k=3)
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        sk.select_small_magnitude(w, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        sk.select_small_magnitude(w, threshold=float("nan"))
    with pytest.raises(ValueError, match="k=17 must lie in"):
        sk.select_small_magnitude(w, k=17)
    with pytest.raises(TypeError, match="weight has dtype torch.int64"):
        sk.select_small_magnitude(torch.ones(3, dtype=torch.int64), k=1)


# ---------------------------------------------------------------------------------------------
# Sampled weight gradients
# ---------------------------------------------------------------------------------------------
LINEAR_SHAPES = [  # (leading dims, out, in)
    ((1,), 1, 1),
    ((3,), 17, 3),
    ((2, 5), 3, 129),
    ((17,), 129, 17),
    ((4, 33), 64, 96),
]
DENSITIES = [0, 1, 0.001, 0.05, 0.5, 1.0]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("lead,out_f,in_f", LINEAR_SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", FP + [torch.float64])
def test_sampled_weight_grad_linear(device, backend, lead, out_f, in_f, density, dtype):
    _skip_slow_triton(device, backend, math.prod(lead) * out_f * in_f)
    g = _random((*lead, out_f), dtype, device)
    x = _random((*lead, in_f), dtype, device)
    index = _index(out_f * in_f, density, device)
    with sara_kernels.use_backend(backend):
        got = sk.sampled_weight_grad_linear(g, x, index, out_f, in_f)
    assert _ops.last_backend["sampled_weight_grad_linear"] == backend
    want = reference.sampled_weight_grad_linear(g, x, index, out_f, in_f)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == index.shape
    torch.testing.assert_close(got, want, **_grad_tolerance(dtype, math.prod(lead), g, x))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sampled_weight_grad_linear_int64_index_and_noncontiguous(device, backend):
    g = _random((9, 12), device=device).t()  # [12, 9] non-contiguous
    x = _random((5, 12), device=device).t()  # [12, 5]
    index = _index(45, 0.3, device, torch.int64)
    with sara_kernels.use_backend(backend):
        got = sk.sampled_weight_grad_linear(g, x, index, 9, 5)
    torch.testing.assert_close(got, reference.sampled_weight_grad_linear(g, x, index, 9, 5))


CONV_CASES = [  # (N, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (1, 1, 5, 5, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 7, 6, 5, 3, 3, 1, 1, 1, 1),
    (2, 4, 9, 8, 6, 3, 3, 2, 0, 1, 2),
    (1, 6, 8, 9, 6, 3, 3, 1, 2, 2, 6),  # depthwise
    (3, 4, 6, 7, 4, 2, 3, (2, 1), (1, 0), (1, 2), 1),
    (2, 8, 5, 5, 16, 1, 1, 1, 0, 1, 4),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("density", [0, 1, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("dtype", FP + [torch.float64])
def test_sampled_weight_grad_conv2d(device, backend, case, density, dtype):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    x = _random((N, C, H, W), dtype, device)
    weight_shape = [O, C // groups, kh, kw]
    out = F.conv2d(
        x.float(), torch.zeros(weight_shape, device=device), None, stride, padding, dilation, groups
    )
    g = _random(out.shape, dtype, device)
    index = _index(math.prod(weight_shape), density, device)
    with sara_kernels.use_backend(backend):
        got = sk.sampled_weight_grad_conv2d(g, x, index, weight_shape, stride, padding, dilation, groups)
    assert _ops.last_backend["sampled_weight_grad_conv2d"] == backend
    s, p, d = sk._geometry("t", 2, stride, padding, dilation)
    want = reference.sampled_weight_grad_conv2d(g, x, index, weight_shape, s, p, d, groups)
    tol = _grad_tolerance(dtype, N * out.shape[2] * out.shape[3], g, x)
    if backend == "cuda" and dtype in (torch.float16, torch.bfloat16):
        # The CUDA gemm variant (auto's choice above its crossover) returns cuDNN's dense fp16/bf16
        # gradient at the entries: fp32 accumulation, each entry rounded once to the input dtype.
        tol["rtol"] = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(got, want, **tol)


# ---------------------------------------------------------------------------------------------
# sparse_linear / sparse_conv2d (autograd)
# ---------------------------------------------------------------------------------------------
def _merged(weight, index, delta):
    """weight with base + delta written at index (outside autograd: the caller's invariant)."""
    w = weight.detach().clone()
    w.view(-1)[index.long()] += delta.detach().to(w.dtype)
    return w


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_gradients_match_dense_autograd(device, backend, bias):
    x = _random((2, 3, 11), device=device).requires_grad_()
    w0 = _random((7, 11), device=device)
    b = _random((7,), device=device).requires_grad_() if bias else None
    index = _index(77, 0.3, device)
    delta = _random(index.shape, device=device, scale=0.1).requires_grad_()
    w = _merged(w0, index, delta)
    with sara_kernels.use_backend(backend):
        y = sk.sparse_linear(x, w, b, index, delta)
        gy = _random(y.shape, device=device)
        y.backward(gy)
    # Dense twin: the same function with the weight as a differentiable dense tensor.
    x2 = x.detach().clone().requires_grad_()
    w2 = w.clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    y2 = F.linear(x2, w2, b2)
    y2.backward(gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(delta.grad, w2.grad.view(-1)[index.long()])
    if bias:
        torch.testing.assert_close(b.grad, b2.grad)
    assert w.grad is None


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES[1:5])
def test_sparse_conv2d_gradients_match_dense_autograd(device, backend, case):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    x = _random((N, C, H, W), device=device).requires_grad_()
    w0 = _random((O, C // groups, kh, kw), device=device)
    b = _random((O,), device=device).requires_grad_()
    index = _index(w0.numel(), 0.4, device)
    delta = _random(index.shape, device=device, scale=0.1).requires_grad_()
    w = _merged(w0, index, delta)
    with sara_kernels.use_backend(backend):
        y = sk.sparse_conv2d(x, w, b, index, delta, stride, padding, dilation, groups)
        gy = _random(y.shape, device=device)
        y.backward(gy)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = F.conv2d(x2, w2, b2, stride, padding, dilation, groups)
    y2.backward(gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(delta.grad, w2.grad.view(-1)[index.long()])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sparse_linear_gradcheck(device, backend):
    w0 = _random((5, 4), torch.float64, device)
    index = _index(20, 0.5, device)

    def f(x, b, delta):
        return sk.sparse_linear(x, _merged(w0, index, delta), b, index, delta)

    x = _random((3, 4), torch.float64, device).requires_grad_()
    b = _random((5,), torch.float64, device).requires_grad_()
    delta = _random(index.shape, torch.float64, device, 0.1).requires_grad_()
    with sara_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, b, delta))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", [CONV_CASES[2], CONV_CASES[3], CONV_CASES[4]])
def test_sparse_conv2d_gradcheck(device, backend, case):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    w0 = _random((O, C // groups, kh, kw), torch.float64, device)
    index = _index(w0.numel(), 0.5, device)

    def f(x, b, delta):
        w = _merged(w0, index, delta)
        return sk.sparse_conv2d(x, w, b, index, delta, stride, padding, dilation, groups)

    x = _random((1, C, H, W), torch.float64, device).requires_grad_()
    b = _random((O,), torch.float64, device).requires_grad_()
    delta = _random(index.shape, torch.float64, device, 0.1).requires_grad_()
    with sara_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, b, delta))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("density", [0.02, 0.5])  # the direct and the dense-GEMM variants
def test_sampled_gradients_under_create_graph(device, backend, density):
    """A backward with create_graph=True (gradient penalties, meta-learning) passes inputs that
    require grad to the sampled gradients: they must give the same values as without it."""
    lin = torch.nn.Linear(37, 23, device=device)
    conv = torch.nn.Conv2d(6, 10, 3, padding=1, device=device)
    layers = [
        sara_kernels.SparseDeltaLinear.from_dense(lin, k=round(density * lin.weight.numel())),
        sara_kernels.SparseDeltaConv2d.from_dense(conv, k=round(density * conv.weight.numel())),
    ]
    inputs = [_random((5, 37), device=device), _random((2, 6, 7, 7), device=device)]
    with sara_kernels.use_backend(backend):
        for layer, x in zip(layers, inputs, strict=True):
            x = x.requires_grad_()
            plain = torch.autograd.grad(layer(x).square().sum(), [layer.sparse_delta])[0]
            graph = torch.autograd.grad(layer(x).square().sum(), [layer.sparse_delta], create_graph=True)[0]
            torch.testing.assert_close(graph.detach(), plain, rtol=1e-5, atol=1e-5)
            assert plain.abs().max() > 0


def test_sparse_linear_refuses_trainable_weight():
    x = _random((2, 3))
    w = _random((4, 3)).requires_grad_()
    index = _index(12, 3)
    delta = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        sk.sparse_linear(x, w, None, index, delta)


# ---------------------------------------------------------------------------------------------
# Fused AdamW, merge, restore
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("weight_dtype", FP)
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.05, False), (0.01, True)])
def test_sparse_adamw_matches_torch_adamw(device, backend, weight_dtype, weight_decay, maximize):
    numel = 7 * 19
    weight = _random((7, 19), device=device).to(weight_dtype)
    index = _index(numel, 0.4, device)
    base = weight.view(-1)[index.long()].clone()
    delta = torch.zeros(index.shape, device=device)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    twin = torch.zeros(index.shape, device=device, requires_grad=True)
    hyper = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    torch_opt = torch.optim.AdamW([twin], foreach=False, **hyper)
    with sara_kernels.use_backend(backend):
        for step in range(1, 21):
            grad = _random(index.shape, device=device)
            twin.grad = grad.clone()
            torch_opt.step()
            sk.sparse_adamw_(
                weight,
                index,
                base,
                delta,
                grad,
                exp_avg,
                exp_avg_sq,
                step=step,
                lr=3e-2,
                beta1=0.9,
                beta2=0.99,
                eps=1e-8,
                weight_decay=weight_decay,
                maximize=maximize,
            )
    assert _ops.last_backend["sparse_adamw_"] == backend
    torch.testing.assert_close(delta, twin.detach(), rtol=1e-5, atol=1e-6)
    state = torch_opt.state[twin]
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    # The merged value is written into the weight; entries outside index are untouched.
    merged = (base.float() + delta).to(weight_dtype)
    assert torch.equal(weight.view(-1)[index.long()], merged)
    assert delta.abs().min() > 0  # every selected entry moved


# (weight shape, selected entries, weight dtype, index dtype, compact vectors 16-byte aligned)
MULTI_SETS = [
    ((7, 19), 53, torch.float32, torch.int32, True),
    ((33, 65), 1001, torch.bfloat16, torch.int64, True),
    ((5, 3), 0, torch.float16, torch.int32, True),
    ((4, 4), 1, torch.bfloat16, torch.int32, False),
    ((129, 17), 2047, torch.float16, torch.int32, False),
    ((3, 3, 3, 3), 81, torch.float32, torch.int32, True),  # every entry of a conv weight
]


def _misaligned(values: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that starts 4 bytes into its storage (not 16-byte aligned)."""
    storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    storage[1:].copy_(values)
    return storage[1:]


def _adam_set(device, shape, count, weight_dtype, index_dtype, aligned):
    """[weight, index, base, delta, grad, exp_avg, exp_avg_sq] with random non-zero state."""
    weight = _random(shape, device=device).to(weight_dtype)
    index = _index(weight.numel(), count, device, index_dtype)
    k = index.numel()
    place = (lambda t: t) if aligned else _misaligned
    return [
        weight,
        index,
        weight.view(-1)[index.long()].clone(),
        place(_random((k,), device=device, scale=0.01)),
        place(_random((k,), device=device)),
        place(_random((k,), device=device, scale=0.01)),
        place(_random((k,), device=device).abs() * 1e-3),
    ]


def _columns(sets):
    return [[s[j] for s in sets] for j in range(7)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.05, True)])
def test_sparse_adamw_multi_matches_one_call_per_set(device, backend, weight_decay, maximize):
    """Each set gets what sparse_adamw_ gives it at its own step: mixed weight and index dtypes,
    empty and one-entry sets, misaligned compact vectors, odd sizes."""
    sets = [_adam_set(device, *spec) for spec in MULTI_SETS]
    singles = [[t.clone() for t in s] for s in sets]
    reference_sets = [[t.clone() for t in s] for s in sets]
    hyper = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    first_step = [1, 4, 2, 9, 3, 1]  # each set at its own step count
    with sara_kernels.use_backend(backend):
        for it in range(4):
            steps = [s + it for s in first_step]
            grads = [_random((s[1].numel(),), device=device) for s in sets]
            for s, g in zip(sets, grads, strict=True):
                s[4].copy_(g)
            sk.sparse_adamw_multi_(*_columns(sets), steps=steps, **hyper)
            assert _ops.last_backend["sparse_adamw_multi_"] == backend
            for s, g, step in zip(singles, grads, steps, strict=True):
                s[4].copy_(g)
                sk.sparse_adamw_(*s, step=step, **hyper)
            for s, g, step in zip(reference_sets, grads, steps, strict=True):
                s[4].copy_(g)
                reference.sparse_adamw_(*s, step=float(step), **hyper)
    for got, single, want in zip(sets, singles, reference_sets, strict=True):
        for a, b, c in zip(got, single, want, strict=True):
            if backend == "cuda":  # other kernels: FMA contraction may differ in the last bit
                torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)
            else:
                assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        index = got[1].long()
        # Only the selected entries moved, and they hold base + delta.
        assert torch.equal(got[0].view(-1)[index], (got[2].float() + got[3]).to(got[0].dtype))
        if index.numel():
            assert (got[3] != single[3]).sum() == 0 and got[3].abs().min() > 0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sparse_adamw_multi_bad_input_names_the_entry_and_writes_nothing(device, backend):
    sets = [_adam_set(device, *spec) for spec in MULTI_SETS[:3]]
    before = [[t.clone() for t in s] for s in sets]
    hyper = dict(lr=1e-3)

    def call(columns, steps=(1, 1, 1)):
        sk.sparse_adamw_multi_(*columns, steps=list(steps), **hyper)

    cols = _columns(sets)
    unsorted = [c[:] for c in cols]
    unsorted[1] = cols[1][:1] + [cols[1][1].flip(0)] + cols[1][2:]
    cases = [
        (
            [c[:2] if i == 4 else c for i, c in enumerate(cols)],
            (1, 1, 1),
            ValueError,
            "grads has 2 entries but weights has 3",
        ),
        (cols, (1, 1), ValueError, "steps has 2 entries"),
        (cols, (1, 0, 1), ValueError, r"steps\[1\] must be >= 1"),
        (
            [c[:1] + [c[1].double()] + c[2:] if i == 4 else c for i, c in enumerate(cols)],
            (1, 1, 1),
            TypeError,
            r"grads\[1\] has dtype torch.float64",
        ),
        (unsorted, (1, 1, 1), ValueError, r"indices\[1\] must be sorted"),
        (
            [c[:2] + [c[0]] for c in cols],
            (1, 1, 1),
            ValueError,
            r"weights\[2\] and weights\[0\] share memory",
        ),
        (
            [[c[0].t()] + c[1:] if i == 0 else c for i, c in enumerate(cols)],
            (1, 1, 1),
            ValueError,
            r"weights\[0\] must be contiguous",
        ),
    ]
    with sara_kernels.use_backend(backend):
        for columns, steps, error, message in cases:
            with pytest.raises(error, match=message):
                call(columns, steps)
        sk.sparse_adamw_multi_([], [], [], [], [], [], [], steps=[], lr=1e-3)  # nothing to do
    for s, b in zip(sets, before, strict=True):
        for t, u in zip(s, b, strict=True):
            assert torch.equal(t, u)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("weight_dtype", FP + [torch.float64])
@pytest.mark.parametrize("density", [0, 1, 0.05, 1.0])
def test_scatter_merge_and_restore(device, backend, weight_dtype, density):
    weight = _random((13, 9), weight_dtype, device)
    original = weight.clone()
    index = _index(weight.numel(), density, device)
    base = weight.view(-1)[index.long()].clone()
    delta = _random(index.shape, device=device, scale=0.3)
    with sara_kernels.use_backend(backend):
        sk.scatter_merge_(weight, index, base, delta, alpha=0.5)
    expected = original.clone()
    acc = torch.float64 if weight_dtype == torch.float64 else torch.float32
    expected.view(-1)[index.long()] = (base.to(acc) + 0.5 * delta.to(acc)).to(weight_dtype)
    assert torch.equal(weight, expected)
    with sara_kernels.use_backend(backend):
        sk.restore_(weight, index, base)
    assert torch.equal(weight, original)


# ---------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels, autograd registration, aliasing
# ---------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    g, x = _random((6, 5), device=device), _random((6, 4), device=device)
    index = _index(20, 0.4, device)
    cx = _random((2, 4, 6, 6), device=device)
    cg = _random((2, 6, 3, 3), device=device)
    cindex = _index(6 * 2 * 3 * 3, 0.3, device)
    weight = _random((5, 4), device=device)
    base = weight.view(-1)[index.long()].clone()
    delta = _random(index.shape, device=device, scale=0.1)
    adam = [
        weight.clone(),
        index,
        base,
        delta.clone(),
        _random(index.shape, device=device),
        _random(index.shape, device=device, scale=0.01),
        _random(index.shape, device=device).abs() * 1e-3,
    ]
    adam_kwargs = dict(step=3.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)
    conv_w = _random((6, 2, 3, 3), device=device)
    conv_index = _index(conv_w.numel(), 0.3, device)
    conv_delta = _random(conv_index.shape, device=device, scale=0.1).requires_grad_()
    return [
        ("select_small_magnitude", (weight, None, 5), {}),
        ("sampled_weight_grad_linear", (g, x, index, 5, 4), {}),
        ("sampled_weight_grad_conv2d", (cg, cx, cindex, [6, 2, 3, 3], [2, 2], [1, 1], [1, 1], 2), {}),
        (
            "sparse_linear",
            (
                x.clone().requires_grad_(),
                weight,
                _random((5,), device=device).requires_grad_(),
                index,
                delta.clone().requires_grad_(),
            ),
            {},
        ),
        (
            "sparse_conv2d",
            (cx.clone().requires_grad_(), conv_w, None, conv_index, conv_delta, [2, 2], [1, 1], [1, 1], 2),
            {},
        ),
        ("sparse_adamw_", tuple(adam), adam_kwargs),
        (
            "sparse_adamw_multi_",
            tuple(_columns([_adam_set(device, *spec) for spec in MULTI_SETS[:2]])),
            dict(steps=[3.0, 1.0], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
        ),
        ("scatter_merge_", (weight.clone(), index, base, delta, 0.7), {}),
        ("restore_", (weight.clone(), index, base), {}),
    ]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck_every_op(device, backend):
    with sara_kernels.use_backend(backend):
        for name, args, kwargs in _opcheck_samples(device):
            op = getattr(torch.ops.sara_kernels, name).default
            tests = None
            if name == "select_small_magnitude":
                # Data-dependent output size: the fake kernel is exercised with k (static size).
                tests = ("test_schema", "test_autograd_registration", "test_faketensor")
            torch.library.opcheck(op, args, kwargs, **({"test_utils": tests} if tests else {}))


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_index_is_reported(device, backend):
    g, x = _random((4, 3), device=device), _random((4, 5), device=device)
    cases = [
        (torch.tensor([1, 2], dtype=torch.int16, device=device), TypeError, "index has dtype torch.int16"),
        (torch.tensor([0.0, 1.0], device=device), TypeError, "index has dtype torch.float32"),
        (
            torch.tensor([1, 15], dtype=torch.int32, device=device),
            IndexError,
            r"index holds values in \[1, 15\]",
        ),
        (torch.tensor([-1, 3], dtype=torch.int32, device=device), IndexError, "must lie in"),
        (torch.tensor([4, 2], dtype=torch.int32, device=device), ValueError, "strictly increasing"),
        (torch.tensor([2, 2], dtype=torch.int32, device=device), ValueError, "no duplicates"),
        (torch.tensor([[1, 2]], dtype=torch.int32, device=device), ValueError, "index must be 1-D"),
    ]
    with sara_kernels.use_backend(backend):
        for index, error, message in cases:
            with pytest.raises(error, match=message):
                sk.sampled_weight_grad_linear(g, x, index, 3, 5)
            weight = _random((3, 5), device=device)
            with pytest.raises(error, match=message):
                sk.restore_(weight, index, torch.zeros(index.shape[-1], device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_shapes_and_dtypes_are_reported(device, backend):
    g, x = _random((4, 3), device=device), _random((4, 5), device=device)
    index = _index(15, 4, device)
    with sara_kernels.use_backend(backend):
        with pytest.raises(ValueError, match="last dim must be out_features=4"):
            sk.sampled_weight_grad_linear(g, x, index, 4, 5)
        with pytest.raises(ValueError, match="leading"):
            sk.sampled_weight_grad_linear(g, _random((5, 5), device=device), index, 3, 5)
        with pytest.raises(TypeError, match="grad_out is torch.float16 but x is torch.float32"):
            sk.sampled_weight_grad_linear(g.half(), x, index, 3, 5)
        cx = _random((1, 4, 5, 5), device=device)
        with pytest.raises(ValueError, match="x has 4 channels"):
            sk.sampled_weight_grad_conv2d(_random((1, 2, 3, 3), device=device), cx, index, [2, 3, 3, 3])
        with pytest.raises(ValueError, match="grad_out has shape"):
            sk.sampled_weight_grad_conv2d(
                _random((1, 2, 4, 4), device=device), cx, _index(72, 3, device), [2, 4, 3, 3]
            )
        with pytest.raises(ValueError, match="groups=3"):
            sk.sampled_weight_grad_conv2d(
                _random((1, 2, 3, 3), device=device), cx, index, [2, 4, 3, 3], groups=3
            )
        weight = _random((3, 5), device=device)
        base = weight.view(-1)[index.long()].clone()
        with pytest.raises(TypeError, match="base is torch.float16 but weight is torch.float32"):
            sk.scatter_merge_(weight, index, base.half(), torch.zeros(4, device=device))
        with pytest.raises(ValueError, match="delta has shape"):
            sk.scatter_merge_(weight, index, base, torch.zeros(5, device=device))
        with pytest.raises(ValueError, match="weight must be contiguous"):
            sk.restore_(_random((5, 3), device=device).t(), index, base)
        z = torch.zeros(4, device=device)
        with pytest.raises(TypeError, match="grad has dtype torch.float16"):
            sk.sparse_adamw_(weight, index, base, z.clone(), z.half(), z.clone(), z.clone(), step=1, lr=1e-3)
        with pytest.raises(ValueError, match="step must be >= 1"):
            sk.sparse_adamw_(weight, index, base, z.clone(), z, z.clone(), z.clone(), step=0, lr=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_mixed_devices_are_reported():
    g, x = _random((4, 3)), _random((4, 5), device="cuda")
    with pytest.raises(RuntimeError, match="x is on cuda"):
        sk.sampled_weight_grad_linear(g, x, _index(15, 3), 3, 5)


# ---------------------------------------------------------------------------------------------
# Backend selection and forcing
# ---------------------------------------------------------------------------------------------
def test_backends_report_and_forcing():
    info = sara_kernels.backends()
    assert set(info["available"]) == {"reference", "cpu", "cuda", "triton"}
    assert info["ops"]["cpu"]["sampled_weight_grad_linear"] in ("cpu", "reference")
    with sara_kernels.use_backend("reference"):
        assert sara_kernels.backends()["ops"]["cpu"]["sparse_adamw_"] == "reference"
        g, x = _random((4, 3)), _random((4, 5))
        sk.sampled_weight_grad_linear(g, x, _index(15, 3), 3, 5)
        assert _ops.last_backend["sampled_weight_grad_linear"] == "reference"
    sk.sampled_weight_grad_linear(g, x, _index(15, 3), 3, 5)
    assert _ops.last_backend["sampled_weight_grad_linear"] == info["ops"]["cpu"]["sampled_weight_grad_linear"]


def _run_with_env(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_the_environment_forces_a_backend_at_import():
    """SARA_KERNELS_BACKEND is read once, at import (never per call); use_backend overrides it."""
    code = (
        "import torch, sara_kernels as sk\n"
        "from sara_kernels import _ops\n"
        "g, x, index = torch.randn(4, 3), torch.randn(4, 5), torch.tensor([0, 4, 9], dtype=torch.int32)\n"
        "assert sk.backends()['forced'] == 'reference'\n"
        "sk.ops.sampled_weight_grad_linear(g, x, index, 3, 5)\n"
        "assert _ops.last_backend['sampled_weight_grad_linear'] == 'reference'\n"
        "with sk.use_backend(None):\n"
        "    assert sk.backends()['forced'] == 'auto'\n"
        "    sk.ops.sampled_weight_grad_linear(g, x, index, 3, 5)\n"
        "    assert _ops.last_backend['sampled_weight_grad_linear'] == 'cpu'\n"
        "sk.ops.sampled_weight_grad_linear(g, x, index, 3, 5)\n"
        "assert _ops.last_backend['sampled_weight_grad_linear'] == 'reference'\n"
        "print('ok')\n"
    )
    done = _run_with_env(code, SARA_KERNELS_BACKEND="reference")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    done = _run_with_env("import sara_kernels", SARA_KERNELS_BACKEND="fastest")
    assert done.returncode != 0 and "SARA_KERNELS_BACKEND" in done.stderr


def test_an_inner_use_backend_wins_over_an_outer_one():
    """A native backend or auto forced inside another forced backend runs (the outer block's
    kernels do not shadow it), and the outer one is back when the inner block ends."""
    g, x = _random((4, 3)), _random((4, 5))
    index = _index(15, 3)
    native = sara_kernels.backends()["ops"]["cpu"]["sampled_weight_grad_linear"]

    def ran():
        sk.sampled_weight_grad_linear(g, x, index, 3, 5)
        return _ops.last_backend["sampled_weight_grad_linear"]

    with sara_kernels.use_backend("reference"):
        assert ran() == "reference"
        for inner in ("cpu", None):
            with sara_kernels.use_backend(inner):
                assert ran() == native
            assert ran() == "reference"
    assert ran() == native


def test_use_backend_blocks_in_threads_may_end_in_any_order():
    """The forced backend is process-wide; each block removes its own entry, so a block that ends
    first in one thread leaves another thread's block in force."""
    import threading

    entered, a_done = threading.Event(), threading.Event()
    seen = {}

    def b():
        with sara_kernels.use_backend("cpu"):
            entered.set()
            a_done.wait(30)
            seen["b"] = sara_kernels.backends()["forced"]

    thread = threading.Thread(target=b)
    with sara_kernels.use_backend("reference"):
        thread.start()
        assert entered.wait(30)
    a_done.set()
    thread.join(30)
    assert seen == {"b": "cpu"}
    assert sara_kernels.backends()["forced"] in (None, "auto")


def test_forcing_an_unusable_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend"):
        with sara_kernels.use_backend("mkl"):
            pass
    g, x = _random((4, 3)), _random((4, 5))
    with sara_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        sk.sampled_weight_grad_linear(g, x, _index(15, 3), 3, 5)


def test_index_checks_can_be_disabled_for_validated_indices():
    g, x = _random((4, 3)), _random((4, 5))
    unsorted = torch.tensor([4, 2], dtype=torch.int32)
    with sara_kernels.index_checks(False), sara_kernels.use_backend("reference"):
        # No data-dependent checks: the caller vouches for the index (the modules validate once).
        sk.sampled_weight_grad_linear(g, x, unsorted, 3, 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        sk.sampled_weight_grad_linear(g, x, unsorted, 3, 5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_a_step_between_forward_and_backward_is_refused(device, backend):
    """The in-place ops give what they write a new version, as torch's in-place ops do: a backward
    through a graph that saved the weight before a step or a merge rewrote it raises, on every
    backend, instead of computing x's gradient from the new weight."""
    layer = sara_kernels.SparseDeltaLinear.from_dense(torch.nn.Linear(6, 4, device=device), k=5)
    optimizer = sara_kernels.SparseAdamW([layer.sparse_delta], lr=0.1)
    x = _random((3, 6), device=device).requires_grad_()
    with sara_kernels.use_backend(backend):
        layer(x).sum().backward()
        out = layer(x)
        optimizer.step()  # writes the weight that out's graph saved
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        for write in (
            lambda w: sk.scatter_merge_(
                w, layer.sparse_index, layer.sparse_base, layer.sparse_delta.detach()
            ),
            lambda w: sk.restore_(w, layer.sparse_index, layer.sparse_base),
        ):
            version = layer.weight._version
            with torch.no_grad():
                write(layer.weight)
            assert layer.weight._version > version
