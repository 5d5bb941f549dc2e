"""The CUDA kernels (csrc/cuda) against the pure-PyTorch reference, on CUDA tensors.

Skipped unless a CUDA device is present and the extension was built with its CUDA kernels.
Every op runs through the public op with ``use_backend("cuda")`` (and each sampled-gradient
variant), or straight through ``torch.ops.sara_kernels_C``, on random inputs that are never
exactly zero, and is compared with ``sara_kernels.reference``. The sampled gradients are compared
with the reference evaluated in fp64 on the CPU (the CUDA reference's fp32 convolution may run in
TF32 under cuDNN). The chunked paths of the gemm variants, which only large layers reach with the
64 MiB workspace, are forced on small shapes by shrinking it
(``SARA_KERNELS_CUDA_WORKSPACE_BYTES``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sara_kernels
from sara_kernels import _backend, _ops, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not _backend.native_available("cuda"),
        reason="the native extension sara_kernels._C was built without its CUDA kernels",
    ),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VARIANTS = ("direct", "gemm", "auto")
LINEAR_VARIANTS = VARIANTS + ("tiled",)
DENSITIES = ("none", "one", 0.001, 0.05, 0.5, 1.0)
INDEX_DTYPES = (torch.int32, torch.int64)


def native():
    return torch.ops.sara_kernels_C


def rand(*shape, dtype=torch.float32, gen=None, device="cuda"):
    """Random normal values, never exactly zero (so a missing term always shows)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)
    return t.to(dtype).to(device)


def make_index(numel: int, density, gen, dtype=torch.int32, device="cuda") -> torch.Tensor:
    if density == "none":
        k = 0
    elif density == "one":
        k = 1
    else:
        k = max(1, round(density * numel))
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(dtype).to(device)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_tol(dtype, terms: int):
    """fp32 (fp64) sums of `terms` products against the exact fp64 sum."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-10 * max(terms, 1))
    return dict(rtol=1e-4, atol=1e-6 + 2e-6 * max(terms, 1))


def conv_tol(dtype, terms: int, variant: str):
    """The conv gemm variant takes cuDNN's dense fp16/bf16 gradient (fp32 accumulation, each entry
    rounded once to the input dtype, like the dense weight gradient): half an ulp of the dtype on
    top of the fp32 summation error. auto may take it."""
    tol = grad_tol(dtype, terms)
    if variant != "direct" and dtype in (torch.float16, torch.bfloat16):
        tol["rtol"] = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    return tol


@pytest.fixture
def small_workspace(monkeypatch):
    monkeypatch.setenv("SARA_KERNELS_CUDA_WORKSPACE_BYTES", "4096")


# ---------------------------------------------------------------------------------------------
# select_small_magnitude
# ---------------------------------------------------------------------------------------------
def _weight_with_specials(shape, dtype, gen):
    w = rand(*shape, dtype=dtype, gen=gen) * 0.05
    flat = w.view(-1)
    n = flat.numel()
    if n >= 8:
        flat[1] = float("nan")
        flat[n // 2] = -flat[n // 3]  # a tie between +x and -x
        flat[n // 4] = flat[n // 3]
        flat[-1] = float("inf")
        flat[-2] = -0.0
        flat[3] = 0.0
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (17, 129), (5, 3, 3, 3), (129, 1)])
def test_select_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(1)
    w = _weight_with_specials(shape, dtype, gen)
    n = w.numel()
    with sara_kernels.use_backend("cuda"):
        for k in sorted({0, 1, n // 3, n}):
            got = sara_kernels.ops.select_small_magnitude(w, k=k)
            assert _ops.last_backend["select_small_magnitude"] == "cuda"
            want = reference.select_small_magnitude(w, k=k)
            assert got.device == w.device and got.dtype == torch.int32
            assert torch.equal(got, want), (k, got, want)
        for threshold in (1e-6, 0.01, 0.05, 10.0):
            got = sara_kernels.ops.select_small_magnitude(w, threshold=threshold)
            want = reference.select_small_magnitude(w, threshold=threshold)
            assert got.dtype == torch.int32
            assert torch.equal(got, want), (threshold, got, want)


def test_select_ties_go_to_smaller_index():
    w = torch.tensor([0.5, -0.1, 0.1, 0.2, -0.1, 0.0, 0.3], device="cuda")
    with sara_kernels.use_backend("cuda"):
        got = sara_kernels.ops.select_small_magnitude(w, k=3)
    assert got.tolist() == [1, 2, 5]
    got = native().select_small_magnitude(w.view(7, 1), None, 4)
    assert got.tolist() == [1, 2, 4, 5]


def test_select_non_contiguous_weight():
    gen = torch.Generator().manual_seed(2)
    w = rand(13, 7, gen=gen).t()
    with sara_kernels.use_backend("cuda"):
        got = sara_kernels.ops.select_small_magnitude(w, k=20)
    assert torch.equal(got, reference.select_small_magnitude(w, k=20))


# ---------------------------------------------------------------------------------------------
# sampled_weight_grad_linear
# ---------------------------------------------------------------------------------------------
def _linear_oracle(g, x, index, out_f, in_f):
    return reference.sampled_weight_grad_linear(g.cpu().double(), x.cpu().double(), index.cpu(), out_f, in_f)


def _run_linear(g, x, index, out_f, in_f, variant):
    with sara_kernels.use_backend("cuda"), sara_kernels.use_grad_variant(variant):
        got = sara_kernels.ops.sampled_weight_grad_linear(g, x, index, out_f, in_f)
    assert _ops.last_backend["sampled_weight_grad_linear"] == "cuda"
    return got


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize(
    "out_f,in_f,lead", [(1, 1, (1,)), (3, 17, (5,)), (17, 3, (2, 3)), (129, 64, (33,)), (64, 129, (300,))]
)
def test_linear_matches_reference(variant, dtype, density, out_f, in_f, lead):
    gen = torch.Generator().manual_seed(3)
    g = rand(*lead, out_f, dtype=dtype, gen=gen)
    x = rand(*lead, in_f, dtype=dtype, gen=gen)
    index = make_index(out_f * in_f, density, gen)
    got = _run_linear(g, x, index, out_f, in_f, variant)
    assert got.dtype == acc_dtype(dtype) and got.device == g.device and got.shape == index.shape
    n = g.numel() // out_f
    torch.testing.assert_close(
        got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(dtype, n)
    )


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 255, 257, 2000])
def test_linear_tokens_and_index_dtype(variant, index_dtype, tokens):
    # Few entries and many tokens: the direct kernel splits the tokens over blockIdx.y.
    gen = torch.Generator().manual_seed(4)
    out_f, in_f = 19, 23
    g = rand(tokens, out_f, gen=gen)
    x = rand(tokens, in_f, gen=gen)
    for density in ("one", 0.01, 0.3):
        index = make_index(out_f * in_f, density, gen, dtype=index_dtype)
        got = _run_linear(g, x, index, out_f, in_f, variant)
        want = _linear_oracle(g, x, index, out_f, in_f)
        torch.testing.assert_close(got.cpu().double(), want, **grad_tol(torch.float32, tokens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "workspace,out_f,in_f,n",
    [
        ("1", 3, 5, 4),  # below one element: 1 x 1 chunks of one token each
        ("256", 37, 53, 61),  # rows of one, columns and tokens in chunks
        ("4096", 37, 53, 61),
        ("65536", 37, 53, 61),
    ],
)
def test_linear_chunked_paths(dtype, workspace, out_f, in_f, n, monkeypatch):
    # A tiny workspace forces row, column and token chunks.
    monkeypatch.setenv("SARA_KERNELS_CUDA_WORKSPACE_BYTES", workspace)
    gen = torch.Generator().manual_seed(5)
    g = rand(n, out_f, dtype=dtype, gen=gen)
    x = rand(n, in_f, dtype=dtype, gen=gen)
    for density in (0.02, 0.5, 1.0):
        index = make_index(out_f * in_f, density, gen, dtype=torch.int64)
        got = _run_linear(g, x, index, out_f, in_f, "gemm")
        torch.testing.assert_close(
            got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(dtype, n)
        )


def test_linear_auto_picks_both_variants_consistently():
    gen = torch.Generator().manual_seed(6)
    g, x = rand(64, 200, gen=gen), rand(64, 300, gen=gen)
    for density in (0.001, 0.005, 0.02, 0.2):
        index = make_index(200 * 300, density, gen)
        results = [_run_linear(g, x, index, 200, 300, v) for v in LINEAR_VARIANTS]
        want = _linear_oracle(g, x, index, 200, 300)
        for got in results:
            torch.testing.assert_close(got.cpu().double(), want, **grad_tol(torch.float32, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_linear_tiled_skewed_selection(dtype, index_dtype):
    # A skewed selection: dense in a few rows, sparse elsewhere, so that entry groups span very
    # different numbers of rows (in_features large, every row still fits one window).
    gen = torch.Generator().manual_seed(41)
    out_f, in_f, n = 1001, 1203, 37
    g = rand(n, out_f, dtype=dtype, gen=gen)
    x = rand(n, in_f, dtype=dtype, gen=gen)
    dense_rows = torch.arange(5 * in_f, 9 * in_f)
    sparse = torch.randperm(out_f * in_f, generator=gen)[:3000]
    index = torch.unique(torch.cat([dense_rows, sparse])).to(index_dtype)
    got = _run_linear(g, x, index, out_f, in_f, "tiled")
    torch.testing.assert_close(
        got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(dtype, n)
    )


def test_linear_tiled_needs_all_rows_in_one_window():
    # More output rows than shared memory holds next to the x rows: the tiled variant refuses by
    # name (auto takes gemm there).
    gen = torch.Generator().manual_seed(45)
    out_f, in_f, n = 3001, 1203, 5
    g, x = rand(n, out_f, gen=gen), rand(n, in_f, gen=gen)
    index = make_index(out_f * in_f, 0.001, gen)
    with pytest.raises(ValueError, match=r"variant 3 \(tiled\) needs .* out_features=3001"):
        _run_linear(g, x, index, out_f, in_f, "tiled")
    got = _run_linear(g, x, index, out_f, in_f, "auto")
    torch.testing.assert_close(
        got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(torch.float32, n)
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_linear_tiled_unaligned_and_odd(dtype):
    # Base pointers off the 16-byte grid and feature counts that are not multiples of the vector
    # width take the scalar staging path; token counts that are not multiples of the chunk leave a
    # zero-padded tail.
    gen = torch.Generator().manual_seed(42)
    out_f, in_f, n = 45, 77, 70
    g = rand(n * out_f + 1, dtype=dtype, gen=gen)[1:].view(n, out_f)
    x = rand(n * in_f + 3, dtype=dtype, gen=gen)[3:].view(n, in_f)
    index = make_index(out_f * in_f, 0.3, gen)
    got = _run_linear(g, x, index, out_f, in_f, "tiled")
    torch.testing.assert_close(
        got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(dtype, n)
    )


@pytest.mark.parametrize("workspace", ["16", "4096"])
def test_linear_tiled_bounded_partials(workspace, monkeypatch):
    # The [splits, k] partial buffer stays within the workspace bound (down to one split).
    monkeypatch.setenv("SARA_KERNELS_CUDA_WORKSPACE_BYTES", workspace)
    gen = torch.Generator().manual_seed(43)
    out_f, in_f, n = 64, 96, 3000
    g, x = rand(n, out_f, gen=gen), rand(n, in_f, gen=gen)
    index = make_index(out_f * in_f, 0.05, gen)
    got = _run_linear(g, x, index, out_f, in_f, "tiled")
    torch.testing.assert_close(
        got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(torch.float32, n)
    )


def test_linear_tiled_rejects_too_wide_layers():
    # in_features whose x rows alone exceed shared memory: a clear error naming the variant, and
    # auto falls back to gemm.
    gen = torch.Generator().manual_seed(44)
    out_f, in_f, n = 3, 4000, 2
    g, x = rand(n, out_f, gen=gen), rand(n, in_f, gen=gen)
    index = make_index(out_f * in_f, 0.001, gen)
    with pytest.raises(ValueError, match=r"variant 3 \(tiled\) needs"):
        _run_linear(g, x, index, out_f, in_f, "tiled")
    got = _run_linear(g, x, index, out_f, in_f, "auto")
    torch.testing.assert_close(
        got.cpu().double(), _linear_oracle(g, x, index, out_f, in_f), **grad_tol(torch.float32, n)
    )


# ---------------------------------------------------------------------------------------------
# sampled_weight_grad_conv2d
# ---------------------------------------------------------------------------------------------
def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _conv_case(n, cin, cout, hw, kernel, stride, padding, dilation, groups, dtype, gen):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x = rand(n, cin, *hw, dtype=dtype, gen=gen)
    wshape = [cout, cin // groups, *kernel]
    out_hw = [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    g = rand(n, cout, *out_hw, dtype=dtype, gen=gen)
    return g, x, wshape, (stride, padding, dilation, groups)


def _conv_oracle(g, x, index, wshape, conv):
    return reference.sampled_weight_grad_conv2d(
        g.cpu().double(), x.cpu().double(), index.cpu(), wshape, *conv
    )


def _run_conv(g, x, index, wshape, conv, variant):
    with sara_kernels.use_backend("cuda"), sara_kernels.use_grad_variant(variant):
        got = sara_kernels.ops.sampled_weight_grad_conv2d(g, x, index, wshape, *conv)
    assert _ops.last_backend["sampled_weight_grad_conv2d"] == "cuda"
    return got


def _conv_terms(g):
    return g.shape[0] * g.shape[2] * g.shape[3]


@pytest.mark.parametrize("variant", ("direct", "gemm"))
@pytest.mark.parametrize("stride", [1, 2, (1, 2)])
@pytest.mark.parametrize("padding", [0, 1, 2, (2, 0)])
@pytest.mark.parametrize("dilation", [1, 2, (2, 1)])
@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 5), (2, 4, 6), (4, 4, 8)])  # (4, 4, 8): depthwise x2
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (2, 3)])
def test_conv_geometry_matches_reference(variant, stride, padding, dilation, groups, cin, cout, kernel):
    gen = torch.Generator().manual_seed(7)
    g, x, wshape, conv = _conv_case(
        2, cin, cout, (7, 9), kernel, stride, padding, dilation, groups, torch.float32, gen
    )
    numel = cout * (cin // groups) * kernel[0] * kernel[1]
    for density in ("one", 0.1, 1.0):
        index = make_index(numel, density, gen)
        got = _run_conv(g, x, index, wshape, conv, variant)
        torch.testing.assert_close(
            got.cpu().double(),
            _conv_oracle(g, x, index, wshape, conv),
            **grad_tol(torch.float32, _conv_terms(g)),
        )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize(
    "n,cin,cout,hw,kernel,stride,padding,dilation,groups",
    [
        (1, 1, 1, (1, 1), (1, 1), 1, 0, 1, 1),
        (3, 3, 17, (5, 6), (3, 3), 1, 1, 1, 1),
        (2, 6, 6, (17, 3), (3, 1), 2, 1, 1, 6),  # depthwise
        (4, 8, 4, (9, 9), (3, 3), 2, 2, 2, 2),
        (0, 3, 4, (5, 5), (3, 3), 1, 1, 1, 1),  # empty batch
    ],
)
def test_conv_dtypes_densities(
    variant, dtype, density, n, cin, cout, hw, kernel, stride, padding, dilation, groups
):
    gen = torch.Generator().manual_seed(8)
    g, x, wshape, conv = _conv_case(n, cin, cout, hw, kernel, stride, padding, dilation, groups, dtype, gen)
    numel = cout * (cin // groups) * kernel[0] * kernel[1]
    index = make_index(numel, density, gen, dtype=torch.int64 if cin == 8 else torch.int32)
    got = _run_conv(g, x, index, wshape, conv, variant)
    assert got.dtype == acc_dtype(dtype) and got.shape == index.shape
    torch.testing.assert_close(
        got.cpu().double(),
        _conv_oracle(g, x, index, wshape, conv),
        **conv_tol(dtype, _conv_terms(g), variant),
    )


@pytest.mark.parametrize("variant", ("direct", "auto"))
def test_conv_many_samples_few_entries(variant):
    # Few entries, many samples: the direct kernel splits the samples over blockIdx.y.
    gen = torch.Generator().manual_seed(9)
    g, x, wshape, conv = _conv_case(64, 3, 4, (6, 5), (3, 3), 1, 1, 1, 1, torch.float32, gen)
    for density in ("one", 0.05):
        index = make_index(4 * 3 * 9, density, gen)
        got = _run_conv(g, x, index, wshape, conv, variant)
        torch.testing.assert_close(
            got.cpu().double(),
            _conv_oracle(g, x, index, wshape, conv),
            **grad_tol(torch.float32, _conv_terms(g)),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workspace", ["4", "512", "4096", "65536"])
@pytest.mark.parametrize("groups", [1, 3])
def test_conv_chunked_paths(dtype, workspace, groups, monkeypatch):
    # A tiny workspace forces output-channel, input-channel and sample chunks.
    monkeypatch.setenv("SARA_KERNELS_CUDA_WORKSPACE_BYTES", workspace)
    gen = torch.Generator().manual_seed(10)
    g, x, wshape, conv = _conv_case(5, 6, 9, (6, 7), (3, 2), (2, 1), 1, (1, 2), groups, dtype, gen)
    numel = 9 * (6 // groups) * 3 * 2
    for density in (0.05, 0.5, 1.0):
        index = make_index(numel, density, gen)
        got = _run_conv(g, x, index, wshape, conv, "gemm")
        torch.testing.assert_close(
            got.cpu().double(),
            _conv_oracle(g, x, index, wshape, conv),
            **conv_tol(dtype, _conv_terms(g), "gemm"),
        )


def test_sampled_grads_feed_sparse_linear_backward():
    # The autograd op's backward goes through the CUDA sampled gradient.
    gen = torch.Generator().manual_seed(11)
    weight = rand(12, 10, gen=gen)
    index = make_index(120, 0.2, gen)
    delta = torch.zeros(index.numel(), device="cuda", requires_grad=True)
    x = rand(4, 7, 10, gen=gen)
    with sara_kernels.use_backend("cuda"):
        out = sara_kernels.ops.sparse_linear(x, weight, None, index, delta)
        out.square().sum().backward()
    dense = (2 * out.detach()).reshape(-1, 12).t().double() @ x.reshape(-1, 10).double()
    torch.testing.assert_close(delta.grad.double(), dense.reshape(-1)[index.long()], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# sparse_adamw_, scatter_merge_, restore_
# ---------------------------------------------------------------------------------------------
def _compact(values: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """A contiguous copy; misaligned: starting 4 bytes into its storage (no float4 path)."""
    if not misaligned:
        return values.clone()
    storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    out = storage[1:]
    out.copy_(values)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("wdtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("maximize", (False, True))
@pytest.mark.parametrize("weight_decay", (0.0, 0.1))
@pytest.mark.parametrize("betas", ((0.9, 0.999), (0.4, 0.9)))  # lerp weight below / above 0.5
@pytest.mark.parametrize("layout", ("aligned", "misaligned", "one", "none"))
def test_sparse_adamw_matches_reference_20_steps(wdtype, index_dtype, maximize, weight_decay, betas, layout):
    gen = torch.Generator().manual_seed(12)
    shape = (37, 29)
    numel = shape[0] * shape[1]
    density = {"one": "one", "none": "none"}.get(layout, 0.3)
    index = make_index(numel, density, gen, dtype=index_dtype)
    k = index.numel()
    w_ref = rand(*shape, dtype=wdtype, gen=gen)
    w_cuda = w_ref.clone()
    base = w_ref.view(-1)[index.long()].clone()
    misaligned = layout == "misaligned"
    init = rand(k, gen=gen) * 0.01
    ref_state = [init.clone(), torch.zeros(k, device="cuda"), torch.zeros(k, device="cuda")]
    cuda_state = [_compact(t, misaligned) for t in ref_state]
    hyper = dict(
        lr=1e-2, beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=weight_decay, maximize=maximize
    )
    for step in range(1, 21):
        grad = rand(k, gen=gen) * 0.1
        with sara_kernels.use_backend("cuda"):
            sara_kernels.ops.sparse_adamw_(
                w_cuda,
                index,
                base,
                cuda_state[0],
                _compact(grad, misaligned),
                cuda_state[1],
                cuda_state[2],
                step=step,
                **hyper,
            )
        assert _ops.last_backend["sparse_adamw_"] == "cuda"
        reference.sparse_adamw_(
            w_ref, index, base, ref_state[0], grad, ref_state[1], ref_state[2], step=float(step), **hyper
        )
    for got, want in zip(cuda_state, ref_state, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_cuda, w_ref)
    # Entries outside the index are untouched.
    outside = torch.ones(numel, dtype=torch.bool, device="cuda")
    outside[index.long()] = False
    assert torch.equal(w_cuda.view(-1)[outside], w_ref.view(-1)[outside])


def _multi_sets(count: int, gen):
    """`count` sets [weight, index, base, delta, grad, exp_avg, exp_avg_sq] and their steps: mixed
    weight and index dtypes, aligned and misaligned compact vectors, 0, 1 and up to 1e5 entries."""
    wdtypes = (torch.float32, torch.bfloat16, torch.float16)
    sets, steps = [], []
    for i in range(count):
        numel = (7, 1, 300, 4099, 250_000)[i % 5]
        density = ("none", "one", 0.3, 0.5, 0.4)[i % 5]
        index = make_index(numel, density, gen, dtype=INDEX_DTYPES[i % 2])
        k = index.numel()
        weight = rand(numel, dtype=wdtypes[i % 3], gen=gen)
        state = [
            rand(k, gen=gen) * 0.01,
            rand(k, gen=gen),
            rand(k, gen=gen) * 0.01,
            rand(k, gen=gen).abs() * 1e-3,
        ]
        misaligned = i % 4 == 3
        sets.append([weight, index, weight[index.long()].clone()] + [_compact(t, misaligned) for t in state])
        steps.append(float(1 + i % 7))
    return sets, steps


def _columns(sets):
    return [[s[j] for s in sets] for j in range(7)]


def _assert_sets_close(got_sets, want_sets, originals):
    for got, want, original in zip(got_sets, want_sets, originals, strict=True):
        weight, index, base, delta = got[:4]
        for a, b in zip(got[3:], want[3:], strict=True):  # delta and the moments
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)
        # The weight holds base + delta at the index (as its own delta rounds) and nothing else moved.
        assert torch.equal(weight[index.long()], (base.float() + delta).to(weight.dtype))
        outside = torch.ones(weight.numel(), dtype=torch.bool, device="cuda")
        outside[index.long()] = False
        assert torch.equal(weight[outside], original[outside])


HP = (1e-2, 0.9, 0.999, 1e-8, 0.01, False)


def test_sparse_adamw_multi_matches_one_call_per_set():
    # 45 sets: two launches (at most 40 sets each), several kernel instantiations (dtypes,
    # alignment), sets of many blocks, each set at its own step.
    sets, steps = _multi_sets(45, torch.Generator().manual_seed(31))
    originals = [s[0].clone() for s in sets]
    singles = [[t.clone() for t in s] for s in sets]
    native().sparse_adamw_multi_(*_columns(sets), steps, *HP)
    for s, step in zip(singles, steps, strict=True):
        native().sparse_adamw_(*s, step, *HP)
    _assert_sets_close(sets, singles, originals)
    assert all(s[3].abs().min() > 0 for s in sets if s[1].numel())


def test_sparse_adamw_multi_in_a_cuda_graph():
    # The sets travel in the kernel's parameters: a captured launch replays on the same tensors.
    sets, steps = _multi_sets(12, torch.Generator().manual_seed(32))
    originals = [s[0].clone() for s in sets]
    eager = [[t.clone() for t in s] for s in sets]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        native().sparse_adamw_multi_(*_columns(sets), steps, *HP)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        native().sparse_adamw_multi_(*_columns(sets), steps, *HP)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for _ in range(3):  # the warm-up and two replays
        native().sparse_adamw_multi_(*_columns(eager), steps, *HP)
    _assert_sets_close(sets, eager, originals)


def test_sparse_adamw_multi_sync_index_check_names_the_op(monkeypatch):
    monkeypatch.setenv("SARA_KERNELS_CUDA_INDEX_CHECK", "sync")
    sets, steps = _multi_sets(3, torch.Generator().manual_seed(33))
    before = [[t.clone() for t in s] for s in sets]
    cols = _columns(sets)
    cols[1][2] = sets[2][1].flip(0)
    with pytest.raises(ValueError, match="sparse_adamw_multi_: index must be sorted"):
        native().sparse_adamw_multi_(*cols, steps, *HP)
    cols[1][2] = sets[2][1] + 1000
    with pytest.raises(IndexError, match="sparse_adamw_multi_: index holds values outside"):
        native().sparse_adamw_multi_(*cols, steps, *HP)
    for s, b in zip(sets, before, strict=True):  # validated before anything is written
        for t, u in zip(s, b, strict=True):
            assert torch.equal(t, u)


def test_sparse_adamw_multi_bad_input():
    sets, steps = _multi_sets(3, torch.Generator().manual_seed(34))

    def with_entry(j, i, t):
        cols = _columns(sets)
        cols[j][i] = t
        return cols

    cases = [
        ((_columns(sets), steps[:2]), "steps has 2 entries but weights has 3"),
        ((_columns(sets), [1.0, 0.0, 1.0]), r"steps\[1\] must be >= 1"),
        ((with_entry(4, 2, sets[2][4].double()), steps), r"grads\[2\] has dtype"),
        ((with_entry(6, 2, sets[2][6].cpu()), steps), r"exp_avg_sqs\[2\] must be a CUDA tensor"),
        ((with_entry(0, 2, sets[2][0].double()), steps), r"weights\[2\] has dtype"),
        ((with_entry(5, 2, sets[2][5][:1]), steps), r"exp_avgs\[2\] has shape"),
        ((with_entry(3, 2, sets[2][3].view(1, -1)), steps), r"deltas\[2\] has shape"),
    ]
    for (cols, st), match in cases:
        with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
            native().sparse_adamw_multi_(*cols, st, *HP)
    twice = [c + [c[2]] for c in _columns(sets)]
    with pytest.raises(ValueError, match=r"weights\[3\] and weights\[2\] share memory"):
        native().sparse_adamw_multi_(*twice, steps + [1.0], *HP)


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("ddtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("alpha", (1.0, 0.37, -2.0))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("density", ("none", "one", 0.05, 1.0))
def test_scatter_merge_and_restore(wdtype, ddtype, alpha, index_dtype, density):
    gen = torch.Generator().manual_seed(13)
    w0 = rand(17, 129, dtype=wdtype, gen=gen)
    index = make_index(w0.numel(), density, gen, dtype=index_dtype)
    base = w0.view(-1)[index.long()].clone()
    delta = rand(index.numel(), dtype=ddtype, gen=gen) * 0.1
    w_cuda, w_ref = w0.clone(), w0.clone()
    with sara_kernels.use_backend("cuda"):
        sara_kernels.ops.scatter_merge_(w_cuda, index, base, delta, alpha)
    assert _ops.last_backend["scatter_merge_"] == "cuda"
    reference.scatter_merge_(w_ref, index, base, delta, alpha)
    torch.testing.assert_close(w_cuda, w_ref, rtol=0, atol=0)
    with sara_kernels.use_backend("cuda"):
        sara_kernels.ops.restore_(w_cuda, index, base)
    assert _ops.last_backend["restore_"] == "cuda"
    assert torch.equal(w_cuda, w0)


def test_inplace_non_contiguous_base():
    gen = torch.Generator().manual_seed(14)
    w0 = rand(64, gen=gen)
    index = make_index(64, 0.25, gen)
    k = index.numel()
    base_storage = torch.zeros(2 * k, device="cuda")
    base = base_storage[::2]
    base.copy_(w0[index.long()] + 1)
    delta = rand(k, gen=gen)
    w_cuda, w_ref = w0.clone(), w0.clone()
    native().scatter_merge_(w_cuda, index, base, delta, 0.5)
    reference.scatter_merge_(w_ref, index, base, delta, 0.5)
    torch.testing.assert_close(w_cuda, w_ref, rtol=0, atol=0)
    native().restore_(w_cuda, index, base)
    reference.restore_(w_ref, index, base)
    assert torch.equal(w_cuda, w_ref)


# ---------------------------------------------------------------------------------------------
# opcheck and bad input straight to the native ops
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    # The native ops have no fake kernels of their own (the public ops do), so the schema and
    # autograd-registration checks run here; the fake-tensor checks belong to the public ops.
    utils = ("test_schema", "test_autograd_registration")
    gen = torch.Generator().manual_seed(15)
    ops = native()
    w = rand(9, 11, gen=gen)
    index = make_index(99, 0.3, gen)
    k = index.numel()
    g, x = rand(5, 9, gen=gen), rand(5, 11, gen=gen)
    gc, xc, wshape, conv = _conv_case(2, 4, 6, (5, 5), (3, 3), 1, 1, 1, 2, torch.float32, gen)
    cindex = make_index(6 * 2 * 9, 0.3, gen)
    base = w.view(-1)[index.long()].clone()

    def compact():
        return rand(k, gen=gen) * 0.1

    samples = [
        (ops.select_small_magnitude, (w, None, 10)),
        (ops.select_small_magnitude, (w, 0.5, None)),
        (ops.sampled_weight_grad_linear, (g, x, index, 9, 11, 1)),
        (ops.sampled_weight_grad_linear, (g, x, index, 9, 11, 2)),
        (ops.sampled_weight_grad_conv2d, (gc, xc, cindex, wshape, *conv, 1)),
        (ops.sampled_weight_grad_conv2d, (gc, xc, cindex, wshape, *conv, 2)),
        (
            ops.sparse_adamw_,
            (
                w.clone(),
                index,
                base,
                compact(),
                compact(),
                compact(),
                compact().abs(),
                3.0,
                1e-3,
                0.9,
                0.999,
                1e-8,
                0.01,
                False,
            ),
        ),
        (ops.scatter_merge_, (w.clone(), index, base, compact(), 0.5)),
        (ops.restore_, (w.clone(), index, base)),
    ]
    # Inputs that require grad: the native ops have no autograd kernel, and their outputs must
    # not require grad (the ATen calls inside the gemm variants run below autograd).
    gr, xr = g.clone().requires_grad_(), x.clone().requires_grad_()
    gcr, xcr = gc.clone().requires_grad_(), xc.clone().requires_grad_()
    for variant in (1, 2):
        samples.append((ops.sampled_weight_grad_linear, (gr, xr, index, 9, 11, variant)))
        samples.append((ops.sampled_weight_grad_conv2d, (gcr, xcr, cindex, wshape, *conv, variant)))
    samples.append((ops.sampled_weight_grad_linear, (gr, xr, index, 9, 11, 3)))
    samples.append((ops.sampled_weight_grad_linear, (g, x, index, 9, 11, 3)))
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=utils)


def _linear_args(**over):
    gen = torch.Generator().manual_seed(16)
    args = dict(
        grad_out=rand(4, 6, gen=gen),
        x=rand(4, 5, gen=gen),
        index=torch.tensor([0, 7, 29], dtype=torch.int32, device="cuda"),
        out_features=6,
        in_features=5,
        variant=0,
    )
    args.update(over)
    return list(args.values())


# Overrides are built lazily (lambdas): collection must not touch CUDA on a machine without it.
@pytest.mark.parametrize(
    "over,match",
    [
        (lambda: dict(x=torch.ones(4, 5)), "x must be a CUDA tensor"),
        (lambda: dict(x=torch.ones(4, 5, dtype=torch.float64, device="cuda")), "x has dtype"),
        (lambda: dict(grad_out=torch.ones(4, 6, dtype=torch.int32, device="cuda")), "grad_out has dtype"),
        (lambda: dict(x=torch.ones(5, 4, device="cuda").t()), "x must be contiguous"),
        (lambda: dict(grad_out=torch.ones(4, 7, device="cuda")), "grad_out has shape"),
        (lambda: dict(x=torch.ones(3, 5, device="cuda")), "same number of rows"),
        (lambda: dict(x=torch.ones(4, 5, 1, device="cuda")), "x must be 2-D"),
        (lambda: dict(index=torch.tensor([0.0], device="cuda")), "index has dtype"),
        (lambda: dict(index=torch.tensor([[0]], dtype=torch.int32, device="cuda")), "index must be 1-D"),
        (lambda: dict(index=torch.tensor([0], dtype=torch.int32)), "index must be a CUDA tensor"),
        (lambda: dict(variant=4), "variant"),
        (lambda: dict(out_features=0), "out_features"),
    ],
)
def test_linear_bad_input(over, match):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        native().sampled_weight_grad_linear(*_linear_args(**over()))


def test_conv_bad_input():
    gen = torch.Generator().manual_seed(17)
    g, x, wshape, (stride, padding, dilation, groups) = _conv_case(
        2, 4, 6, (5, 5), (3, 3), 1, 1, 1, 2, torch.float32, gen
    )
    index = torch.tensor([0, 5], dtype=torch.int32, device="cuda")
    op = native().sampled_weight_grad_conv2d
    cases = [
        ((g, x, index, [6, 2, 3], stride, padding, dilation, groups, 0), "weight_shape"),
        ((g, x, index, wshape, [0, 1], padding, dilation, groups, 0), "stride"),
        ((g, x, index, wshape, stride, [-1, 0], dilation, groups, 0), "padding"),
        ((g, x, index, wshape, stride, padding, [1], groups, 0), "dilation"),
        ((g, x, index, wshape, stride, padding, dilation, 4, 0), "groups"),
        ((g, x, index, [6, 4, 3, 3], stride, padding, dilation, groups, 0), "channels"),
        ((g[:, :, :4], x, index, wshape, stride, padding, dilation, groups, 0), "grad_out"),
        ((g, x.cpu(), index, wshape, stride, padding, dilation, groups, 0), "x must be a CUDA tensor"),
        ((g, x.half(), index, wshape, stride, padding, dilation, groups, 0), "x has dtype"),
        ((g, x[..., :4], index, wshape, stride, padding, dilation, groups, 0), "x must be contiguous"),
        ((g, x, index.float(), wshape, stride, padding, dilation, groups, 0), "index has dtype"),
        ((g, x, index, wshape, stride, padding, dilation, groups, 7), "variant"),
        ((g, x, index, wshape, stride, padding, dilation, groups, 3), "tiled, is a linear-only"),
    ]
    for args, match in cases:
        with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
            op(*args)


def test_inplace_bad_input():
    ops = native()
    w = torch.zeros(4, 5, device="cuda")
    index = torch.tensor([0, 3], dtype=torch.int32, device="cuda")
    base = torch.zeros(2, device="cuda")
    v = torch.zeros(2, device="cuda")
    scalars = (1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    cases = [
        (ops.restore_, (w, index, base.double()), "base has dtype"),
        (ops.restore_, (w, index, torch.zeros(3, device="cuda")), "base has shape"),
        (ops.restore_, (w.t(), index, base), "weight must be contiguous"),
        (ops.restore_, (w, index.cpu(), base), "index must be a CUDA tensor"),
        (ops.restore_, (w, index, base.cpu()), "base must be a CUDA tensor"),
        (ops.restore_, (w.int(), index, base.int()), "weight has dtype"),
        (ops.scatter_merge_, (w, index, base, v.half(), 1.0), "delta has dtype"),
        (ops.scatter_merge_, (w, index, base, torch.zeros(3, device="cuda"), 1.0), "delta has shape"),
        (ops.sparse_adamw_, (w.double(), index, base.double(), v, v, v, v, *scalars), "weight has dtype"),
        (ops.sparse_adamw_, (w, index, base, v.double(), v, v, v, *scalars), "delta has dtype"),
        (ops.sparse_adamw_, (w, index, base, v, v[:1], v, v, *scalars), "grad has shape"),
        (
            ops.sparse_adamw_,
            (w, index, base, v, v, torch.zeros(4, device="cuda")[::2], v, *scalars),
            "exp_avg must be contiguous",
        ),
        (ops.sparse_adamw_, (w, index, base, v, v, v, v.cpu(), *scalars), "exp_avg_sq must be a CUDA tensor"),
        (ops.sparse_adamw_, (w, index, base, v, v, v, v, 0.0, *scalars[1:]), "step"),
        (ops.sparse_adamw_, (w, index, base, v, v, v, v, 1.0, 1e-3, 1.0, 0.999, 1e-8, 0.0, False), "betas"),
    ]
    for op, args, match in cases:
        with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
            op(*args)
    assert torch.equal(w, torch.zeros(4, 5, device="cuda"))


def test_select_bad_input():
    ops = native()
    w = torch.ones(3, 4, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="exactly one"):
        ops.select_small_magnitude(w, None, None)
    with pytest.raises((RuntimeError, ValueError), match="exactly one"):
        ops.select_small_magnitude(w, 0.5, 2)
    with pytest.raises((RuntimeError, ValueError), match="k=13"):
        ops.select_small_magnitude(w, None, 13)
    with pytest.raises((RuntimeError, ValueError), match="threshold"):
        ops.select_small_magnitude(w, -1.0, None)
    with pytest.raises((RuntimeError, TypeError), match="weight has dtype"):
        ops.select_small_magnitude(w.int(), None, 1)


def test_public_op_bad_index_names_argument():
    w = torch.zeros(4, 5, device="cuda")
    base = torch.zeros(2, device="cuda")
    with sara_kernels.use_backend("cuda"):
        with pytest.raises(IndexError, match="index"):
            sara_kernels.ops.restore_(w, torch.tensor([0, 20], dtype=torch.int32, device="cuda"), base)
        with pytest.raises(ValueError, match="increasing"):
            sara_kernels.ops.restore_(w, torch.tensor([3, 1], dtype=torch.int32, device="cuda"), base)


# ---------------------------------------------------------------------------------------------
# Index validation inside the native ops (SARA_KERNELS_CUDA_INDEX_CHECK)
# ---------------------------------------------------------------------------------------------
def _all_native_calls(index):
    """Each native op that takes an index, called with ``index`` on small inputs."""
    gen = torch.Generator().manual_seed(18)
    k = index.numel()
    ops = native()
    w = rand(4, 5, gen=gen)
    g, x = rand(3, 4, gen=gen), rand(3, 5, gen=gen)
    gc, xc, wshape, conv = _conv_case(1, 2, 2, (3, 3), (2, 2), 1, 0, 1, 1, torch.float32, gen)  # numel 16
    v = torch.zeros(k, device="cuda")
    return {
        "linear_direct": lambda: ops.sampled_weight_grad_linear(g, x, index, 4, 5, 1),
        "linear_gemm": lambda: ops.sampled_weight_grad_linear(g, x, index, 4, 5, 2),
        "linear_tiled": lambda: ops.sampled_weight_grad_linear(g, x, index, 4, 5, 3),
        "conv_direct": lambda: ops.sampled_weight_grad_conv2d(gc, xc, index, wshape, *conv, 1),
        "conv_gemm": lambda: ops.sampled_weight_grad_conv2d(gc, xc, index, wshape, *conv, 2),
        "adamw": lambda: ops.sparse_adamw_(
            w,
            index,
            v.clone(),
            v.clone(),
            v + 1,
            v.clone(),
            v.clone(),
            1.0,
            0.1,
            0.9,
            0.999,
            1e-8,
            0.0,
            False,
        ),
        "merge": lambda: ops.scatter_merge_(w, index, v + 5, v + 1, 1.0),
        "restore": lambda: ops.restore_(w, index, v + 7),
    }, w


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sync_index_check_raises(index_dtype, monkeypatch):
    monkeypatch.setenv("SARA_KERNELS_CUDA_INDEX_CHECK", "sync")
    # 20 is out of range for every op here (linear and weight: 20 entries, conv: 16).
    for values, error, match in (
        ([0, 20], IndexError, "outside"),
        ([-1, 2], IndexError, "outside"),
        ([3, 3], ValueError, "increasing"),
        ([5, 2], ValueError, "increasing"),
    ):
        index = torch.tensor(values, dtype=index_dtype, device="cuda")
        calls, w = _all_native_calls(index)
        before = w.clone()
        for call in calls.values():
            with pytest.raises(error, match=match):
                call()
        assert torch.equal(w, before)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_kernels_skip_out_of_range_indices(index_dtype, monkeypatch):
    # With the validation off, the kernels themselves skip an out-of-range index: the sampled
    # gradients give 0 there, the in-place ops leave the weight alone, and valid entries are right.
    monkeypatch.setenv("SARA_KERNELS_CUDA_INDEX_CHECK", "off")
    index = torch.tensor([-7, 1, 15, 20, 2**20], dtype=index_dtype, device="cuda")
    calls, w = _all_native_calls(index)
    valid_calls, _ = _all_native_calls(index[1:3].clone())
    before = w.clone()
    for name in ("linear_direct", "linear_gemm", "linear_tiled", "conv_direct", "conv_gemm"):
        got = calls[name]()
        assert torch.equal(got[[0, 3, 4]], torch.zeros(3, dtype=got.dtype, device="cuda")), name
        torch.testing.assert_close(got[1:3], valid_calls[name](), rtol=1e-6, atol=1e-6)
    calls["restore"]()
    expected = before.clone()
    expected.view(-1)[[1, 15]] = 7.0
    assert torch.equal(w, expected)
    calls["merge"]()
    expected.view(-1)[[1, 15]] = 6.0
    assert torch.equal(w, expected)
    calls["adamw"]()
    changed = (w != expected).view(-1).nonzero().flatten().tolist()
    assert set(changed) <= {1, 15}
    torch.cuda.synchronize()


def test_unsorted_valid_index_in_kernels(monkeypatch):
    # Sorting is a contract checked by the validation, not something the kernels rely on for the
    # values they compute: with the check off, an unsorted index still gives the right numbers.
    monkeypatch.setenv("SARA_KERNELS_CUDA_INDEX_CHECK", "off")
    gen = torch.Generator().manual_seed(19)
    g, x = rand(33, 12, gen=gen), rand(33, 10, gen=gen)
    index = torch.randperm(120, generator=gen)[:50].to(torch.int32).cuda()
    want = _linear_oracle(g, x, index, 12, 10)
    for variant in (1, 2):
        got = native().sampled_weight_grad_linear(g, x, index, 12, 10, variant)
        torch.testing.assert_close(got.cpu().double(), want, **grad_tol(torch.float32, 33))


ASYNC_ASSERT_CALLS = {
    # restore_ runs the separate validation kernel; sparse_adamw_multi_ checks inside its own.
    "restore_": "torch.ops.sara_kernels_C.restore_(w, index, torch.ones(2, device='cuda'))",
    "sparse_adamw_multi_": (
        "v = torch.zeros(2, device='cuda'); "
        "torch.ops.sara_kernels_C.sparse_adamw_multi_([w], [index], [v + 1], [v], [v + 1], [v.clone()], "
        "[v.clone()], [1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)"
    ),
}


@pytest.mark.parametrize("op", sorted(ASYNC_ASSERT_CALLS))
@pytest.mark.parametrize("bad", ("out_of_range", "unsorted"))
def test_async_index_check_is_a_device_assert(op, bad):
    # The default (async) validation fires a device-side assertion, which poisons the CUDA
    # context: run it in a child process.
    values = "[0, 20]" if bad == "out_of_range" else "[3, 1]"
    script = textwrap.dedent(
        f"""
        import torch, sara_kernels
        w = torch.zeros(4, 5, device="cuda")
        index = torch.tensor({values}, dtype=torch.int32, device="cuda")
        {ASYNC_ASSERT_CALLS[op]}
        torch.cuda.synchronize()
        print("NO-ASSERT")
        """
    )
    env = dict(os.environ)
    env.pop("SARA_KERNELS_CUDA_INDEX_CHECK", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert "NO-ASSERT" not in proc.stdout
    assert proc.returncode != 0
    assert "assert" in (proc.stderr + proc.stdout).lower()


def test_bad_env_values_raise(monkeypatch):
    index = torch.tensor([0, 3], dtype=torch.int32, device="cuda")
    calls, _ = _all_native_calls(index)
    monkeypatch.setenv("SARA_KERNELS_CUDA_INDEX_CHECK", "maybe")
    with pytest.raises(ValueError, match="SARA_KERNELS_CUDA_INDEX_CHECK"):
        calls["restore"]()
    monkeypatch.setenv("SARA_KERNELS_CUDA_INDEX_CHECK", "off")
    monkeypatch.setenv("SARA_KERNELS_CUDA_WORKSPACE_BYTES", "-5")
    with pytest.raises(ValueError, match="SARA_KERNELS_CUDA_WORKSPACE_BYTES"):
        calls["linear_gemm"]()
