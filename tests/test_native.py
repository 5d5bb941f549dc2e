"""The native C++ kernels (csrc/cpu and csrc/cuda) against the pure-PyTorch reference.

The compiled extension registers its kernels as the CPU and CUDA kernels of the public ops
(``torch.ops.sara_kernels.<op>``); every test here calls the public op under
``sara_kernels.use_backend(device)`` (so a call that the native kernel cannot take fails instead of
falling back), on random inputs that are never exactly zero (a missing term always shows), and
compares with ``sara_kernels.reference``. The sampled gradients are compared with the reference
evaluated in fp64 on the CPU (the CUDA reference's fp32 convolution may run in TF32 under cuDNN).

Tests shared by both native backends are parametrized by device: ``cpu`` always, ``cuda`` skipped
without a CUDA device (or without the extension's CUDA kernels). Device-specific tests are marked:
the CPU's thread-spanning multi-set AdamW and large-layer workspace bound, and CUDA's tiled
variant, index-check modes (async / sync / off) and graph capture.

Process-wide settings stand in for the former per-call environment variables and the ops'
trailing variant argument: ``sara_kernels.use_grad_variant`` picks the sampled-gradient
algorithm, and ``sara_kernels._backend.native_settings`` shrinks the workspace
(``workspace_bytes``: CPU honours >= 1024, CUDA > 0), which forces on small shapes the chunked paths
that only large layers reach, and sets the CUDA index checks (``index_checks``: 0 off, 1 async,
2 sync; the CPU kernels always check their index).

The shared helpers (``rand``, ``make_index``, the tolerances) are defined at the top of this file:
``tests/helpers.py`` does not exist on this branch.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import grad_tol, random_index
from helpers import random_normal as rand

import sara_kernels
from sara_kernels import _backend, _ops, reference

pytestmark = pytest.mark.skipif(
    not sara_kernels.backends()["native"]["loaded"],
    reason="the native extension sara_kernels._C is not built",
)

HAVE_CUDA = torch.cuda.is_available() and _backend.native_available("cuda")
CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HAVE_CUDA,
        reason="no CUDA device, or the native extension was built without its CUDA kernels",
    ),
]
MARKS = {"cpu": [], "cuda": CUDA_MARKS}


def on(device: str, *values):
    """A parameter set whose first value is ``device``, with that device's marks."""
    return pytest.param(device, *values, marks=MARKS[device], id="-".join([device, *map(str, values)]))


def cuda_only(fn):
    for mark in CUDA_MARKS:
        fn = mark(fn)
    return fn


DEVICES = [on("cpu"), on("cuda")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
DENSITIES = ("none", "one", 0.001, 0.05, 0.5, 1.0)
#: The sampled-gradient variants each native backend has ('tiled': CUDA, linear only).
VARIANTS = {"cpu": ("direct", "gemm", "auto"), "cuda": ("direct", "gemm", "auto", "tiled")}
CONV_VARIANTS = ("direct", "gemm", "auto")
#: What 'auto' may pick, per device and op (sara_kernels.backends()["grad_variant"]["auto_rules"]).
AUTO_PICKS = {
    "cpu": {
        "sampled_weight_grad_linear": {"direct", "gemm"},
        "sampled_weight_grad_conv2d": {"direct", "gemm"},
    },
    "cuda": {
        "sampled_weight_grad_linear": {"gemm", "tiled"},
        "sampled_weight_grad_conv2d": {"direct", "gemm"},
    },
}
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)


# ---------------------------------------------------------------------------------------------
# Helpers (tests/helpers.py does not exist on this branch)
# ---------------------------------------------------------------------------------------------
def make_index(numel: int, density, gen, dtype=torch.int32, device="cpu") -> torch.Tensor:
    """A random sorted index without duplicates: none, one, or a density (at least one entry)."""
    return random_index(numel, density, device, dtype, generator=gen, minimum=0 if density == "none" else 1)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_tol(device: str, dtype, terms: int, variant: str):
    """The CUDA conv gemm variant takes cuDNN's dense fp16/bf16 gradient (fp32 accumulation, each
    entry rounded once to the input dtype, like the dense weight gradient): half an ulp of the dtype
    on top of the fp32 summation error; auto may take it. The CPU gemm variant accumulates in fp32."""
    tol = grad_tol(device, dtype, terms)
    if device == "cuda" and variant != "direct" and dtype in (torch.float16, torch.bfloat16):
        tol["rtol"] = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    return tol


def _check_ran(op: str, device: str, variant: str, ran_variant: bool) -> None:
    """The op ran on the native ``device`` kernel, with the forced variant (or one auto may pick)."""
    backend, picked = _backend.last_run(op)
    assert backend == device and _ops.last_backend[op] == device
    if not ran_variant:  # no entries or no tokens: the kernels return before choosing
        return
    if variant == "auto":
        assert picked in AUTO_PICKS[device][op], picked
    else:
        assert picked == variant, (picked, variant)


def run_linear(device, g, x, index, out_f, in_f, variant):
    with sara_kernels.use_backend(device), sara_kernels.use_grad_variant(variant):
        got = sara_kernels.ops.sampled_weight_grad_linear(g, x, index, out_f, in_f)
    _check_ran("sampled_weight_grad_linear", device, variant, index.numel() > 0 and g.numel() > 0)
    assert got.device == g.device and got.shape == index.shape and got.dtype == acc_dtype(g.dtype)
    return got


def linear_oracle(g, x, index, out_f, in_f):
    return reference.sampled_weight_grad_linear(g.cpu().double(), x.cpu().double(), index.cpu(), out_f, in_f)


def check_linear(device, g, x, index, out_f, in_f, variant, dtype=None):
    got = run_linear(device, g, x, index, out_f, in_f, variant)
    terms = g.numel() // out_f
    torch.testing.assert_close(
        got.cpu().double(),
        linear_oracle(g, x, index, out_f, in_f),
        **grad_tol(device, dtype or g.dtype, terms),
        msg=lambda m: f"{variant} k={index.numel()}: {m}",
    )


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def conv_case(n, cin, cout, hw, kernel, stride, padding, dilation, groups, dtype, gen, device):
    """(grad_out, x, weight_shape, (stride, padding, dilation, groups)) of a random conv2d."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x = rand(n, cin, *hw, dtype=dtype, gen=gen, device=device)
    wshape = [cout, cin // groups, *kernel]
    out_hw = [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    g = rand(n, cout, *out_hw, dtype=dtype, gen=gen, device=device)
    return g, x, wshape, (stride, padding, dilation, groups)


def conv_numel(wshape) -> int:
    return wshape[0] * wshape[1] * wshape[2] * wshape[3]


def run_conv(device, g, x, index, wshape, conv, variant):
    with sara_kernels.use_backend(device), sara_kernels.use_grad_variant(variant):
        got = sara_kernels.ops.sampled_weight_grad_conv2d(g, x, index, wshape, *conv)
    _check_ran("sampled_weight_grad_conv2d", device, variant, index.numel() > 0 and g.numel() > 0)
    assert got.device == g.device and got.shape == index.shape and got.dtype == acc_dtype(g.dtype)
    return got


def conv_oracle(g, x, index, wshape, conv):
    return reference.sampled_weight_grad_conv2d(
        g.cpu().double(), x.cpu().double(), index.cpu(), wshape, *conv
    )


def check_conv(device, g, x, index, wshape, conv, variant):
    got = run_conv(device, g, x, index, wshape, conv, variant)
    terms = g.shape[0] * g.shape[2] * g.shape[3]
    torch.testing.assert_close(
        got.cpu().double(),
        conv_oracle(g, x, index, wshape, conv),
        **conv_tol(device, g.dtype, terms, variant),
        msg=lambda m: f"{variant} k={index.numel()}: {m}",
    )


def compact(values: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """A contiguous copy; misaligned: starting 4 bytes into its storage (CUDA: no float4 path)."""
    if not misaligned:
        return values.clone()
    storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    out = storage[1:]
    out.copy_(values)
    assert out.is_contiguous() and (out.numel() == 0 or out.data_ptr() % 16 != 0)
    return out


# ---------------------------------------------------------------------------------------------
# select_small_magnitude
# ---------------------------------------------------------------------------------------------
def _weight_with_specials(shape, dtype, gen, device):
    w = rand(*shape, dtype=dtype, gen=gen, device=device) * 0.05
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


def select(device, w, **kwargs):
    with sara_kernels.use_backend(device):
        got = sara_kernels.ops.select_small_magnitude(w, **kwargs)
    assert _ops.last_backend["select_small_magnitude"] == device
    assert got.device == w.device and got.dtype == torch.int32
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1,), (3,), (17, 3), (17, 129), (129, 1), (129, 65), (5, 3, 3, 3), (64, 3, 3, 3), (20000,)]
)
def test_select_matches_reference(device, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    w = _weight_with_specials(shape, dtype, gen, device)
    n = w.numel()
    for threshold in (1e-6, 1e-3, 0.01, 2e-2, 0.05, 10.0):
        got = select(device, w, threshold=threshold)
        want = reference.select_small_magnitude(w, threshold=threshold)
        assert torch.equal(got.cpu(), want.cpu()), (threshold, got, want)
    for k in sorted({0, 1, min(2, n), n // 7, n // 3, n // 2, max(n - 1, 0), n}):
        got = select(device, w, k=k)
        want = reference.select_small_magnitude(w, k=k)
        assert got.numel() == k
        assert torch.equal(got.cpu(), want.cpu()), (k, got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_ties_and_threshold_rounding(device, dtype):
    gen = torch.Generator().manual_seed(2)
    # Many exact ties: k cuts through a run of equal magnitudes, ties go to the smaller index.
    w = (rand(5000, gen=gen) * 3).round().to(dtype)
    w[::97] = float("nan")
    w = w.to(device)
    for k in (1, 100, 1234, 4000, 4990, 5000):
        assert torch.equal(select(device, w, k=k).cpu(), reference.select_small_magnitude(w, k=k).cpu())
    # Values at the threshold rounded to the weight dtype (|w| < threshold compares in that dtype).
    t = 2e-3
    near = t * (1 + torch.arange(-40, 41, dtype=torch.float64) * 2.0**-11)  # neighbours of t in dtype
    w = torch.cat([near, -near, rand(300, dtype=torch.float64, gen=gen) * 4e-3]).to(dtype).to(device)
    want = reference.select_small_magnitude(w, threshold=t)
    assert torch.equal(select(device, w, threshold=t).cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_select_ties_go_to_smaller_index(device):
    w = torch.tensor([0.5, -0.1, 0.1, 0.2, -0.1, 0.0, 0.3], device=device)
    assert select(device, w, k=3).tolist() == [1, 2, 5]
    assert select(device, w.view(7, 1), k=4).tolist() == [1, 2, 4, 5]


@pytest.mark.parametrize("device", DEVICES)
def test_select_non_contiguous_weight(device):
    # Read-only, so a strided weight is accepted (the kernels read a contiguous copy).
    gen = torch.Generator().manual_seed(2)
    w = rand(13, 7, gen=gen, device=device).t()
    assert not w.is_contiguous()
    for kwargs in (dict(k=20), dict(threshold=0.5)):
        got = select(device, w, **kwargs)
        assert torch.equal(got.cpu(), reference.select_small_magnitude(w, **kwargs).cpu())
        assert torch.equal(got, select(device, w.contiguous(), **kwargs))


@pytest.mark.parametrize("device", DEVICES)
def test_select_bad_input(device):
    w = torch.randn(10, device=device)
    cases = [
        (dict(threshold=0.1, k=3), ValueError, "give exactly one of threshold or k$"),
        (dict(), ValueError, "give exactly one of threshold or k$"),
        (dict(k=11), ValueError, r"k=11 must lie in \[0, 10\] \(the weight's entry count\)$"),
        (dict(k=-3), ValueError, r"k=-3 must lie in \[0, 10\]"),
        (dict(threshold=-1.5), ValueError, "threshold must be a positive number, got -1.5$"),
        (dict(threshold=float("nan")), ValueError, "threshold must be a positive number, got nan$"),
    ]
    with sara_kernels.use_backend(device):
        for kwargs, error, match in cases:
            with pytest.raises(error, match=f"^sara_kernels.select_small_magnitude: {match}"):
                sara_kernels.ops.select_small_magnitude(w, **kwargs)
        with pytest.raises(
            TypeError,
            match="select_small_magnitude: weight has dtype torch.int32; expected one of float32, float16, "
            "bfloat16, float64$",
        ):
            sara_kernels.ops.select_small_magnitude(
                torch.ones(3, dtype=torch.int32, device=device), threshold=0.1
            )


# ---------------------------------------------------------------------------------------------
# sampled_weight_grad_linear
# ---------------------------------------------------------------------------------------------
LINEAR_SHAPES = [  # (out, in, tokens as leading dims)
    (1, 1, (1,)),
    (3, 17, (5,)),
    (17, 3, (2, 3)),
    (129, 64, (33,)),
    (129, 65, (33,)),
    (40, 129, (3, 7)),
    (64, 129, (300,)),
    (64, 64, (0,)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f,lead", LINEAR_SHAPES)
def test_linear_matches_reference(device, dtype, out_f, in_f, lead):
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f)
    g = rand(*lead, out_f, dtype=dtype, gen=gen, device=device)
    x = rand(*lead, in_f, dtype=dtype, gen=gen, device=device)
    for density, variant in itertools.product(DENSITIES, VARIANTS[device]):
        index = make_index(out_f * in_f, density, gen, device=device)
        check_linear(device, g, x, index, out_f, in_f, variant)


@pytest.mark.parametrize("device,variant", [on(d, v) for d in ("cpu", "cuda") for v in VARIANTS[d]])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 255, 257, 2000])
def test_linear_tokens_and_index_dtype(device, variant, index_dtype, tokens):
    # Few entries and many tokens: the CUDA direct kernel splits the tokens over blockIdx.y.
    gen = torch.Generator().manual_seed(4)
    out_f, in_f = 19, 23
    g = rand(tokens, out_f, gen=gen, device=device)
    x = rand(tokens, in_f, gen=gen, device=device)
    for density in ("one", 0.01, 0.3):
        index = make_index(out_f * in_f, density, gen, dtype=index_dtype, device=device)
        check_linear(device, g, x, index, out_f, in_f, variant)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_non_contiguous_inputs(device):
    # grad_out, x and index are read-only: strided ones are accepted and read as contiguous copies.
    gen = torch.Generator().manual_seed(40)
    out_f, in_f, n = 13, 11, 9
    g = rand(out_f, n, gen=gen, device=device).t()
    x = rand(2 * n, in_f, gen=gen, device=device)[::2]
    index = make_index(out_f * in_f * 2, 0.3, gen, device=device)
    index = (index[index < out_f * in_f * 2] // 2).unique()[::2]  # strided, sorted, no duplicates
    assert not (g.is_contiguous() or x.is_contiguous() or index.is_contiguous())
    for variant in VARIANTS[device]:
        got = run_linear(device, g, x, index, out_f, in_f, variant)
        want = run_linear(device, g.contiguous(), x.contiguous(), index.contiguous(), out_f, in_f, variant)
        assert torch.equal(got, want), variant
        torch.testing.assert_close(
            got.cpu().double(), linear_oracle(g, x, index, out_f, in_f), **grad_tol(device, g.dtype, n)
        )


LINEAR_CHUNKS = [  # (workspace bytes, out, in, tokens); the CPU honours workspaces >= 1024 only
    on("cpu", 4096, 129, 65, 37),
    on("cpu", 1024, 37, 53, 61),
    on("cuda", 1, 3, 5, 4),  # below one element: 1 x 1 chunks of one token each
    on("cuda", 256, 37, 53, 61),  # rows of one, columns and tokens in chunks
    on("cuda", 4096, 37, 53, 61),
    on("cuda", 4096, 129, 65, 37),
    on("cuda", 65536, 37, 53, 61),
]


@pytest.mark.parametrize("device,workspace,out_f,in_f,n", LINEAR_CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_chunked_paths(device, workspace, out_f, in_f, n, dtype):
    """A small workspace: the direct variant (CPU) runs in token chunks, gemm in row, column and
    token blocks."""
    gen = torch.Generator().manual_seed(3)
    g = rand(n, out_f, dtype=dtype, gen=gen, device=device)
    x = rand(n, in_f, dtype=dtype, gen=gen, device=device)
    cases = [
        ("rows", torch.int64),
        (0.02, torch.int32),
        (0.3, torch.int64),
        (0.5, torch.int32),
        (1.0, torch.int64),
    ]
    with _backend.native_settings(workspace_bytes=workspace):
        assert _backend.native_setting("workspace_bytes") == workspace
        for density, index_dtype in cases:
            if density == "rows":  # entries in a few rows far apart: gemm skips the empty rows between blocks
                flat = [0, 1, (out_f // 2) * in_f + in_f // 2, out_f * in_f - 1]
                index = torch.tensor(sorted(set(flat)), dtype=index_dtype, device=device)
            else:
                index = make_index(out_f * in_f, density, gen, index_dtype, device)
            for variant in ("direct", "gemm", "auto"):
                check_linear(device, g, x, index, out_f, in_f, variant)
    assert _backend.native_setting("workspace_bytes") == 0  # restored


def test_linear_large_workspace_bound():
    """A layer whose dense gradient (8.4M fp32 entries) exceeds the CPU's 32 MiB workspace: row blocks."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f, n = 4100, 2049, 3
    g, x = rand(n, out_f, gen=gen), rand(n, in_f, gen=gen)
    index = make_index(out_f * in_f, 0.02, gen)
    for variant in VARIANTS["cpu"]:
        check_linear("cpu", g, x, index, out_f, in_f, variant)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_auto_picks_both_variants_consistently(device):
    gen = torch.Generator().manual_seed(6)
    g, x = rand(64, 200, gen=gen, device=device), rand(64, 300, gen=gen, device=device)
    for density in (0.001, 0.005, 0.02, 0.2):
        index = make_index(200 * 300, density, gen, device=device)
        for variant in VARIANTS[device]:
            check_linear(device, g, x, index, 200, 300, variant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_tiled_variant_is_refused_where_it_does_not_exist(device, op):
    # 'tiled' is a CUDA linear kernel: the CPU kernels and the CUDA conv kernel refuse it by name.
    if device == "cuda" and op == "linear":
        pytest.skip("the CUDA linear kernel has a tiled variant (tested below)")
    gen = torch.Generator().manual_seed(46)
    with sara_kernels.use_backend(device), sara_kernels.use_grad_variant("tiled"):
        if op == "linear":
            g, x = rand(4, 6, gen=gen, device=device), rand(4, 5, gen=gen, device=device)
            with pytest.raises(
                ValueError, match="sampled_weight_grad_linear: the 'tiled' variant is a CUDA linear"
            ):
                sara_kernels.ops.sampled_weight_grad_linear(
                    g, x, make_index(30, 0.3, gen, device=device), 6, 5
                )
        else:
            g, x, wshape, conv = conv_case(1, 2, 2, (4, 4), (3, 3), 1, 1, 1, 1, torch.float32, gen, device)
            want = (
                "the 'tiled' variant is a CUDA linear"
                if device == "cpu"
                else "the 'tiled' variant is a linear-only"
            )
            with pytest.raises(
                ValueError, match=f"sampled_weight_grad_conv2d: {want} kernel; use auto, direct or gemm"
            ):
                sara_kernels.ops.sampled_weight_grad_conv2d(
                    g, x, make_index(36, 0.3, gen, device=device), wshape, *conv
                )


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_linear_tiled_skewed_selection(dtype, index_dtype):
    # A skewed selection: dense in a few rows, sparse elsewhere, so that entry groups span very
    # different numbers of rows (in_features large, every row still fits one window).
    gen = torch.Generator().manual_seed(41)
    out_f, in_f, n = 1001, 1203, 37
    g = rand(n, out_f, dtype=dtype, gen=gen, device="cuda")
    x = rand(n, in_f, dtype=dtype, gen=gen, device="cuda")
    dense_rows = torch.arange(5 * in_f, 9 * in_f)
    sparse = torch.randperm(out_f * in_f, generator=gen)[:3000]
    index = torch.unique(torch.cat([dense_rows, sparse])).to(index_dtype).cuda()
    check_linear("cuda", g, x, index, out_f, in_f, "tiled")


@cuda_only
@pytest.mark.parametrize(
    "seed,out_f,in_f,n,match",
    [
        # More output rows than shared memory holds next to the x rows.
        (45, 3001, 1203, 5, r"variant 3 \(tiled\) needs .* out_features=3001"),
        # in_features whose x rows alone exceed shared memory.
        (44, 3, 4000, 2, r"variant 3 \(tiled\) needs"),
    ],
    ids=["too-many-rows", "too-wide"],
)
def test_linear_tiled_refuses_layers_it_cannot_stage(seed, out_f, in_f, n, match):
    # The tiled variant refuses by name; auto takes gemm there.
    gen = torch.Generator().manual_seed(seed)
    g, x = rand(n, out_f, gen=gen, device="cuda"), rand(n, in_f, gen=gen, device="cuda")
    index = make_index(out_f * in_f, 0.001, gen, device="cuda")
    with pytest.raises(ValueError, match=match):
        run_linear("cuda", g, x, index, out_f, in_f, "tiled")
    check_linear("cuda", g, x, index, out_f, in_f, "auto")
    assert _backend.last_run("sampled_weight_grad_linear") == ("cuda", "gemm")


@cuda_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_linear_tiled_unaligned_and_odd(dtype):
    # Base pointers off the 16-byte grid and feature counts that are not multiples of the vector
    # width take the scalar staging path; token counts that are not multiples of the chunk leave a
    # zero-padded tail.
    gen = torch.Generator().manual_seed(42)
    out_f, in_f, n = 45, 77, 70
    g = rand(n * out_f + 1, dtype=dtype, gen=gen, device="cuda")[1:].view(n, out_f)
    x = rand(n * in_f + 3, dtype=dtype, gen=gen, device="cuda")[3:].view(n, in_f)
    index = make_index(out_f * in_f, 0.3, gen, device="cuda")
    check_linear("cuda", g, x, index, out_f, in_f, "tiled")


@cuda_only
@pytest.mark.parametrize("workspace", [16, 4096])
def test_linear_tiled_bounded_partials(workspace):
    # The [splits, k] partial buffer stays within the workspace bound (down to one split).
    gen = torch.Generator().manual_seed(43)
    out_f, in_f, n = 64, 96, 3000
    g, x = rand(n, out_f, gen=gen, device="cuda"), rand(n, in_f, gen=gen, device="cuda")
    index = make_index(out_f * in_f, 0.05, gen, device="cuda")
    with _backend.native_settings(workspace_bytes=workspace):
        check_linear("cuda", g, x, index, out_f, in_f, "tiled")


# ---------------------------------------------------------------------------------------------
# sampled_weight_grad_conv2d
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2, (1, 2)])
@pytest.mark.parametrize("padding", [0, 1, 2, (2, 0)])
@pytest.mark.parametrize("dilation", [1, 2, (2, 1)])
@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 5), (1, 4, 6), (2, 4, 6), (4, 4, 8), (6, 6, 12)])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (2, 3)])
def test_conv_geometry_matches_reference(device, stride, padding, dilation, groups, cin, cout, kernel):
    # (4, 4, 8) and (6, 6, 12): depthwise with two filters per channel.
    gen = torch.Generator().manual_seed(7)
    g, x, wshape, conv = conv_case(
        2, cin, cout, (9, 7), kernel, stride, padding, dilation, groups, torch.float32, gen, device
    )
    for density in ("one", 0.05, 0.1, 0.5, 1.0):
        index = make_index(conv_numel(wshape), density, gen, device=device)
        for variant in CONV_VARIANTS:
            check_conv(device, g, x, index, wshape, conv, variant)


CONV_CASES = [  # n, cin, cout, hw, kernel, stride, padding, dilation, groups
    (1, 1, 1, (1, 1), (1, 1), 1, 0, 1, 1),
    (3, 3, 17, (5, 11), (3, 3), 1, 1, 1, 1),
    (3, 3, 17, (5, 6), (3, 3), 1, 1, 1, 1),
    (2, 16, 8, (8, 8), (3, 3), 2, 1, 1, 2),
    (2, 8, 8, (7, 9), (3, 3), 1, 2, 1, 8),  # depthwise
    (2, 6, 6, (17, 3), (3, 1), 2, 1, 1, 6),  # depthwise
    (2, 5, 7, (6, 6), (1, 3), 2, 0, 1, 1),
    (4, 8, 4, (9, 9), (3, 3), 2, 2, 2, 2),
    (0, 3, 4, (5, 5), (3, 3), 1, 1, 1, 1),  # empty batch
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-g{c[-1]}")
def test_conv_dtypes_densities(device, dtype, case):
    gen = torch.Generator().manual_seed(8)
    g, x, wshape, conv = conv_case(*case, dtype, gen, device)
    index_dtype = torch.int64 if case[1] == 8 else torch.int32
    for density, variant in itertools.product(DENSITIES, CONV_VARIANTS):
        index = make_index(conv_numel(wshape), density, gen, dtype=index_dtype, device=device)
        check_conv(device, g, x, index, wshape, conv, variant)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(47)
    g, x, wshape, conv = conv_case(3, 4, 6, (6, 5), (3, 3), 1, 1, 1, 2, torch.float32, gen, device)
    gs = g.transpose(2, 3).contiguous().transpose(2, 3)
    xs = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    index = make_index(2 * conv_numel(wshape), 0.4, gen, device=device)
    index = (index // 2).unique()[::2]
    assert not (gs.is_contiguous() or xs.is_contiguous() or index.is_contiguous())
    for variant in CONV_VARIANTS:
        got = run_conv(device, gs, xs, index, wshape, conv, variant)
        assert torch.equal(got, run_conv(device, g, x, index.contiguous(), wshape, conv, variant)), variant
        torch.testing.assert_close(
            got.cpu().double(), conv_oracle(g, x, index, wshape, conv), **grad_tol(device, torch.float32, 90)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ("direct", "auto"))
def test_conv_many_samples_few_entries(device, variant):
    # Few entries, many samples: the CUDA direct kernel splits the samples over blockIdx.y.
    gen = torch.Generator().manual_seed(9)
    g, x, wshape, conv = conv_case(64, 3, 4, (6, 5), (3, 3), 1, 1, 1, 1, torch.float32, gen, device)
    for density in ("one", 0.05):
        index = make_index(4 * 3 * 9, density, gen, device=device)
        check_conv(device, g, x, index, wshape, conv, variant)


CONV_CHUNKS = [on("cpu", w) for w in (1024, 4096)] + [on("cuda", w) for w in (4, 512, 4096, 65536)]
CONV_CHUNK_CASES = {  # name: (n, cin, cout, hw, kernel, stride, padding, dilation)
    "3x3": (3, 8, 10, (7, 7), (3, 3), 1, 1, 1),
    "strided": (5, 6, 9, (6, 7), (3, 2), (2, 1), 1, (1, 2)),
}


@pytest.mark.parametrize("device,workspace", CONV_CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,groups", [("3x3", 1), ("3x3", 2), ("strided", 1), ("strided", 3)])
def test_conv_chunked_paths(device, workspace, dtype, case, groups):
    """A small workspace: gemm splits output channels, input channels and samples; the CPU direct
    variant (fp16/bf16) converts one sample at a time."""
    gen = torch.Generator().manual_seed(10)
    g, x, wshape, conv = conv_case(*CONV_CHUNK_CASES[case], groups, dtype, gen, device)
    with _backend.native_settings(workspace_bytes=workspace):
        for density, index_dtype in (
            (0.01, torch.int64),
            (0.05, torch.int32),
            (0.3, torch.int32),
            (1.0, torch.int64),
        ):
            index = make_index(conv_numel(wshape), density, gen, index_dtype, device)
            for variant in CONV_VARIANTS:
                check_conv(device, g, x, index, wshape, conv, variant)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_grads_feed_sparse_linear_backward(device):
    # The autograd op's backward goes through the native sampled gradient.
    gen = torch.Generator().manual_seed(11)
    weight = rand(12, 10, gen=gen, device=device)
    index = make_index(120, 0.2, gen, device=device)
    delta = torch.zeros(index.numel(), device=device, requires_grad=True)
    x = rand(4, 7, 10, gen=gen, device=device)
    with sara_kernels.use_backend(device):
        out = sara_kernels.ops.sparse_linear(x, weight, None, index, delta)
        out.square().sum().backward()
    assert _ops.last_backend["sampled_weight_grad_linear"] == device
    dense = (2 * out.detach()).reshape(-1, 12).t().double() @ x.reshape(-1, 10).double()
    torch.testing.assert_close(delta.grad.double(), dense.reshape(-1)[index.long()], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# sparse_adamw_, sparse_adamw_multi_, scatter_merge_, restore_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("maximize", (False, True))
@pytest.mark.parametrize("weight_decay", (0.0, 0.01, 0.1))
@pytest.mark.parametrize("betas", ((0.9, 0.999), (0.4, 0.9)))  # lerp weight below / above 0.5
@pytest.mark.parametrize("layout", ("aligned", "misaligned", "one", "none"))
def test_sparse_adamw_matches_reference_20_steps(
    device, wdtype, index_dtype, maximize, weight_decay, betas, layout
):
    gen = torch.Generator().manual_seed(12)
    weight = rand(37, 129, dtype=wdtype, gen=gen, device=device)
    density = {"one": "one", "none": "none"}.get(layout, 0.3)
    index = make_index(weight.numel(), density, gen, index_dtype, device)
    k = index.numel()
    base = weight.view(-1)[index.long()].clone()
    misaligned = layout == "misaligned"
    w_ref, w_nat = weight.clone(), weight.clone()
    ref_state = [torch.zeros(k, device=device) for _ in range(3)]  # delta, exp_avg, exp_avg_sq
    nat_state = [compact(t, misaligned) for t in ref_state]
    hp = dict(lr=1e-2, beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    for step in range(1, 21):
        grad = rand(k, gen=gen, device=device) * 0.1
        d, m, v = nat_state
        with sara_kernels.use_backend(device):
            sara_kernels.ops.sparse_adamw_(
                w_nat, index, base, d, compact(grad, misaligned), m, v, step=step, **hp
            )
        assert _ops.last_backend["sparse_adamw_"] == device
        reference.sparse_adamw_(
            w_ref, index, base, ref_state[0], grad, *ref_state[1:], step=float(step), **hp
        )
    (d_n, m_n, v_n), (d_r, m_r, v_r) = nat_state, ref_state
    if k:
        assert d_n.abs().min() > 0  # every entry moved
    if device == "cpu":
        # torch's sqrt (MKL) is 1 ulp off in ~20% of entries, so agreement is ~1e-7 relative; delta
        # passes through zero (weight decay vs the update), so its check adds a few ulps of lr*steps.
        torch.testing.assert_close(m_n, m_r, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(v_n, v_r, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(d_n, d_r, rtol=1e-6, atol=1e-7)
        if wdtype == torch.float32:
            torch.testing.assert_close(w_nat, w_ref, rtol=1e-6, atol=1e-8)
        else:  # (base + delta) rounded to 8 / 11 bits: at most one ulp apart
            torch.testing.assert_close(w_nat.float(), w_ref.float(), rtol=2**-7, atol=1e-6)
    else:
        for got, want in zip(nat_state, ref_state, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w_nat, w_ref)
    # Entries outside the index are untouched.
    outside = torch.ones(weight.numel(), dtype=torch.bool, device=device)
    outside[index.long()] = False
    assert torch.equal(w_nat.view(-1)[outside], weight.view(-1)[outside])


def adam_sets(specs, gen, device):
    """[weight, index, base, delta, grad, exp_avg, exp_avg_sq] per (numel, density, weight dtype,
    index dtype, misaligned compact vectors)."""
    sets = []
    for numel, density, wdtype, index_dtype, misaligned in specs:
        weight = rand(numel, dtype=wdtype, gen=gen, device=device)
        index = make_index(numel, density, gen, index_dtype, device)
        k = index.numel()
        state = [
            rand(k, gen=gen, device=device) * 0.01,
            rand(k, gen=gen, device=device),
            rand(k, gen=gen, device=device) * 0.01,
            rand(k, gen=gen, device=device).abs() * 1e-3,
        ]
        sets.append([weight, index, weight[index.long()].clone()] + [compact(t, misaligned) for t in state])
    return sets


def mixed_sets(count: int, gen, device):
    """``count`` sets and their steps: mixed weight and index dtypes, aligned and misaligned
    compact vectors, 0, 1 and up to 1e5 entries."""
    wdtypes = (torch.float32, torch.bfloat16, torch.float16)
    specs = [
        (
            (7, 1, 300, 4099, 250_000)[i % 5],
            ("none", "one", 0.3, 0.5, 0.4)[i % 5],
            wdtypes[i % 3],
            INDEX_DTYPES[i % 2],
            i % 4 == 3,
        )
        for i in range(count)
    ]
    return adam_sets(specs, gen, device), [float(1 + i % 7) for i in range(count)]


def columns(sets):
    return [[s[j] for s in sets] for j in range(7)]


def adamw_multi(device, sets_or_columns, steps, hp=HP, *, are_columns=False):
    cols = sets_or_columns if are_columns else columns(sets_or_columns)
    with sara_kernels.use_backend(device):
        sara_kernels.ops.sparse_adamw_multi_(*cols, steps=steps, **hp)
    assert _ops.last_backend["sparse_adamw_multi_"] == device


def adamw_singles(device, sets, steps, hp=HP):
    with sara_kernels.use_backend(device):
        for s, step in zip(sets, steps, strict=True):
            sara_kernels.ops.sparse_adamw_(*s, step=step, **hp)


def assert_sets_close(got_sets, want_sets, originals):
    for got, want, original in zip(got_sets, want_sets, originals, strict=True):
        weight, index, base, delta = got[:4]
        for a, b in zip(got[3:], want[3:], strict=True):  # delta and the moments
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)
        # The weight holds base + delta at the index (as its own delta rounds) and nothing else moved.
        assert torch.equal(weight[index.long()], (base.float() + delta).to(weight.dtype))
        outside = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
        outside[index.long()] = False
        assert torch.equal(weight[outside], original[outside])


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_adamw_multi_matches_one_call_per_set(device):
    # 45 sets: on CUDA two launches (at most 40 sets each), several kernel instantiations (dtypes,
    # alignment), sets of many blocks, each set at its own step.
    sets, steps = mixed_sets(45, torch.Generator().manual_seed(31), device)
    originals = [s[0].clone() for s in sets]
    singles = [[t.clone() for t in s] for s in sets]
    adamw_multi(device, sets, steps)
    adamw_singles(device, singles, steps)
    assert_sets_close(sets, singles, originals)
    assert all(s[3].abs().min() > 0 for s in sets if s[1].numel())


def test_sparse_adamw_multi_spans_sets_across_threads():
    # CPU: sets far below and far above the parallel grain, so the one parallel range starts and
    # ends inside sets and spans many: every set must get exactly its own sparse_adamw_ (bitwise).
    gen = torch.Generator().manual_seed(21)
    specs = [(300, 7 / 300, torch.float32, torch.int32, False)] * 5
    specs += [
        (200_000, 0.450005, torch.bfloat16, torch.int64, False),
        (9, 1.0, torch.float16, torch.int32, False),
    ]
    specs += [
        (70_000, 33_333 / 70_000, torch.float32, torch.int32, True),
        (5, "none", torch.bfloat16, torch.int32, False),
    ]
    sets = adam_sets(specs, gen, "cpu")
    assert [s[1].numel() for s in sets] == [7] * 5 + [90_001, 9, 33_333, 0]
    singles = [[t.clone() for t in s] for s in sets]
    steps = [float(1 + i % 4) for i in range(len(sets))]
    adamw_multi("cpu", sets, steps)
    adamw_singles("cpu", singles, steps)
    for got, want in zip(sets, singles, strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert all(s[3].abs().min() > 0 for s in sets if s[1].numel())


@cuda_only
def test_sparse_adamw_multi_in_a_cuda_graph():
    # The sets travel in the kernel's parameters: a captured launch replays on the same tensors.
    sets, steps = mixed_sets(12, torch.Generator().manual_seed(32), "cuda")
    originals = [s[0].clone() for s in sets]
    eager = [[t.clone() for t in s] for s in sets]
    op = torch.ops.sara_kernels.sparse_adamw_multi_
    with sara_kernels.use_backend("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture
            op(*columns(sets), steps=steps, **HP)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            op(*columns(sets), steps=steps, **HP)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        for _ in range(3):  # the warm-up and two replays
            op(*columns(eager), steps=steps, **HP)
    assert _ops.last_backend["sparse_adamw_multi_"] == "cuda"
    assert_sets_close(sets, eager, originals)


@pytest.mark.parametrize(
    "device",
    [
        on("cpu"),
        pytest.param("cuda", marks=CUDA_MARKS, id="cuda"),
    ],
)
def test_sparse_adamw_multi_bad_index_names_the_entry(device):
    sets, steps = mixed_sets(3, torch.Generator().manual_seed(33), device)
    before = [[t.clone() for t in s] for s in sets]
    cols = columns(sets)
    with _backend.native_settings(index_checks=2):  # CUDA: raise (sync); the CPU always checks
        cols[1][2] = sets[2][1].flip(0)
        with pytest.raises(
            ValueError,
            match=r"^sara_kernels.sparse_adamw_multi_: indices\[2\] must be sorted in strictly increasing",
        ):
            adamw_multi(device, cols, steps, are_columns=True)
        cols[1][2] = sets[2][1] + 1000
        with pytest.raises(
            IndexError,
            match=r"^sara_kernels.sparse_adamw_multi_: indices\[2\] holds values in \[\d+, \d+\] but must lie in "
            r"\[0, 300\) \(the weight has 300 entries\)$",
        ):
            adamw_multi(device, cols, steps, are_columns=True)
    for s, b in zip(sets, before, strict=True):  # validated before anything is written
        for t, u in zip(s, b, strict=True):
            assert torch.equal(t, u)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_adamw_multi_bad_input(device):
    gen = torch.Generator().manual_seed(34)
    specs = [
        (40, 5 / 40, torch.float32, torch.int32, False),
        (50, 6 / 50, torch.bfloat16, torch.int32, False),
    ]
    specs += [(60, 0.1, torch.float16, torch.int64, False)]
    sets = adam_sets(specs, gen, device)
    steps = [1.0, 1.0, 1.0]
    before = [[t.clone() for t in s] for s in sets]

    def with_entries(*replacements):  # the lists, with entry i of list j replaced by t
        cols = columns(sets)
        for j, i, t in replacements:
            cols[j][i] = t
        return cols

    cases = [
        (
            (columns(sets), steps[:2]),
            ValueError,
            "steps has 2 entries but weights has 3; every list needs one entry per weight$",
        ),
        (
            (columns(sets)[:1] + [columns(sets)[1][:2]] + columns(sets)[2:], steps),
            ValueError,
            "indices has 2 entries but weights has 3",
        ),
        (
            (columns(sets), [1.0, 0.5, 1.0]),
            ValueError,
            r"steps\[1\] must be >= 1 \(AdamW counts from 1\), got 0.5$",
        ),
        ((columns(sets), [1.0, 1.0, float("nan")]), ValueError, r"steps\[2\] must be finite, got nan$"),
        (
            (with_entries((4, 2, sets[2][4].double())), steps),
            TypeError,
            r"grads\[2\] has dtype torch.float64; expected one of float32$",
        ),
        (
            (with_entries((0, 1, sets[1][0].double())), steps),
            TypeError,
            r"bases\[1\] is torch.bfloat16 but weights\[1\] is torch.float64",
        ),
        (
            (with_entries((0, 1, sets[1][0].double()), (2, 1, sets[1][2].double())), steps),
            TypeError,
            r"weights\[1\] dtype float64 is not supported; use fp32, bf16 or fp16$",
        ),
        ((with_entries((1, 1, sets[1][1].short())), steps), TypeError, r"indices\[1\] has dtype torch.int16"),
        (
            (with_entries((5, 1, sets[1][5][:2])), steps),
            ValueError,
            r"exp_avgs\[1\] has shape \(2,\) but indices\[1\] has \(6,\)$",
        ),
        (
            (with_entries((3, 2, sets[2][3].view(1, -1))), steps),
            ValueError,
            r"deltas\[2\] must be 1-D, got shape \(1, 6\)$",
        ),
        (
            (with_entries((3, 1, sets[0][3])), steps),
            ValueError,
            r"deltas\[1\] has shape \(5,\) but indices\[1\] has \(6,\)$",
        ),
        (
            (with_entries((6, 0, torch.zeros(10, device=device)[::2])), steps),
            ValueError,
            r"exp_avg_sqs\[0\] must be contiguous$",
        ),
    ]
    if device == "cuda":
        cases.append(
            (
                (with_entries((6, 2, sets[2][6].cpu())), steps),
                RuntimeError,
                r"exp_avg_sqs\[2\] is on cpu but weights\[2\] is on cuda:0; all tensors must be on one device$",
            )
        )
    with _backend.native_settings(index_checks=2):
        for (cols, st), error, match in cases:
            with pytest.raises(error, match=f"^sara_kernels.sparse_adamw_multi_: {match}"):
                adamw_multi(device, cols, st, are_columns=True)
        twice = [c + [c[2]] for c in columns(sets)]  # set 2 listed twice
        with pytest.raises(
            ValueError,
            match=r"^sara_kernels.sparse_adamw_multi_: weights\[3\] and weights\[2\] share memory; a tensor the op "
            r"writes must not overlap any other argument",
        ):
            adamw_multi(device, twice, steps + [1.0], are_columns=True)
    for s, b in zip(sets, before, strict=True):  # every check runs before anything is written
        for t, u in zip(s, b, strict=True):
            assert torch.equal(t, u)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("ddtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("alpha", (1.0, 0.37, -2.0))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_scatter_merge_and_restore(device, wdtype, ddtype, alpha, index_dtype):
    gen = torch.Generator().manual_seed(13)
    weight = rand(3, 17, 129, dtype=wdtype, gen=gen, device=device)
    for density in ("none", "one", 0.05, 1.0):
        index = make_index(weight.numel(), density, gen, index_dtype, device)
        base = weight.view(-1)[index.long()].clone()
        delta = rand(index.numel(), dtype=ddtype, gen=gen, device=device) * 0.1
        got, want = weight.clone(), weight.clone()
        with sara_kernels.use_backend(device):
            sara_kernels.ops.scatter_merge_(got, index, base, delta, alpha)
        assert _ops.last_backend["scatter_merge_"] == device
        reference.scatter_merge_(want, index, base, delta, alpha)
        assert torch.equal(got, want), density
        if index.numel():
            assert not torch.equal(got, weight)
        with sara_kernels.use_backend(device):
            sara_kernels.ops.restore_(got, index, base)
        assert _ops.last_backend["restore_"] == device
        assert torch.equal(got, weight)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_and_restore_non_contiguous_index(device):
    # The index is read-only: a strided one is read as a contiguous copy.
    gen = torch.Generator().manual_seed(14)
    w0 = rand(64, gen=gen, device=device)
    index = make_index(64, 0.5, gen, device=device)[::2]
    assert not index.is_contiguous()
    k = index.numel()
    base = w0[index.long()] + 1
    delta = rand(k, gen=gen, device=device)
    got, want = w0.clone(), w0.clone()
    with sara_kernels.use_backend(device):
        sara_kernels.ops.scatter_merge_(got, index, base, delta, 0.5)
    reference.scatter_merge_(want, index, base, delta, 0.5)
    assert torch.equal(got, want) and not torch.equal(got, w0)
    with sara_kernels.use_backend(device):
        sara_kernels.ops.restore_(got, index, base)
    reference.restore_(want, index, base)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_non_contiguous_base(device):
    gen = torch.Generator().manual_seed(14)
    w0 = rand(64, gen=gen, device=device)
    index = make_index(64, 0.25, gen, device=device)
    k = index.numel()
    base = torch.zeros(2 * k, device=device)[::2]
    base.copy_(w0[index.long()] + 1)
    delta = rand(k, gen=gen, device=device)
    got, want = w0.clone(), w0.clone()
    reference.scatter_merge_(want, index, base, delta, 0.5)
    with sara_kernels.use_backend(device):
        sara_kernels.ops.scatter_merge_(got, index, base, delta, 0.5)
    assert torch.equal(got, want)
    reference.restore_(want, index, base)
    with sara_kernels.use_backend(device):
        sara_kernels.ops.restore_(got, index, base)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_adamw_non_contiguous_index(device):
    gen = torch.Generator().manual_seed(15)
    ((weight, index, base, *state),) = adam_sets([(80, 0.5, torch.float32, torch.int32, False)], gen, device)
    index, base = index[::2], base[::2].clone()
    state = [t[::2].clone() for t in state]
    assert not index.is_contiguous()
    ref = [weight.clone(), index, base] + [t.clone() for t in state]
    reference.sparse_adamw_(*ref, step=3.0, **HP)
    with sara_kernels.use_backend(device):
        sara_kernels.ops.sparse_adamw_(weight, index, base, *state, step=3.0, **HP)
    for a, b in zip([weight] + state, [ref[0]] + ref[3:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # Schema, autograd registration and fake-kernel agreement of the public ops on their native
    # kernels, each sampled-gradient variant forced (tests/test_ops.py runs the full opcheck,
    # aot_dispatch included, with the default variant).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    gen = torch.Generator().manual_seed(8)
    ops = torch.ops.sara_kernels
    w = rand(9, 11, gen=gen, device=device)
    index = make_index(99, 0.3, gen, device=device)
    k = index.numel()
    g, x = rand(5, 9, gen=gen, device=device), rand(5, 11, gen=gen, device=device)
    gc, xc, wshape, conv = conv_case(2, 4, 6, (5, 5), (3, 3), 1, 1, 1, 2, torch.float32, gen, device)
    cindex = make_index(6 * 2 * 9, 0.3, gen, device=device)
    base = w.view(-1)[index.long()].clone()

    def vec():
        return rand(k, gen=gen, device=device) * 0.1

    adam = dict(step=3.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)
    samples = [
        ("auto", ops.select_small_magnitude.default, (w,), dict(k=10)),
        ("auto", ops.sparse_adamw_.default, (w.clone(), index, base, vec(), vec(), vec(), vec().abs()), adam),
        (
            "auto",
            ops.sparse_adamw_multi_.default,
            ([w.clone()], [index], [base], [vec()], [vec()], [vec()], [vec().abs()]),
            {**{name: v for name, v in adam.items() if name != "step"}, "steps": [3.0]},
        ),
        ("auto", ops.scatter_merge_.default, (w.clone(), index, base, vec(), 0.5), {}),
        ("auto", ops.restore_.default, (w.clone(), index, base), {}),
    ]
    # Inputs that require grad (what sparse_linear's backward passes under create_graph=True): the
    # ATen GEMMs / oneDNN / cuDNN calls inside run below autograd, so no variant fails on them and
    # no output requires grad (autograd_registration checks that).
    gr, xr = g.clone().requires_grad_(), x.clone().requires_grad_()
    gcr, xcr = gc.clone().requires_grad_(), xc.clone().requires_grad_()
    for variant in VARIANTS[device]:
        for gg, xx in ((g, x), (gr, xr)):
            samples.append((variant, ops.sampled_weight_grad_linear.default, (gg, xx, index, 9, 11), {}))
        if variant in CONV_VARIANTS:
            for gg, xx in ((gc, xc), (gcr, xcr)):
                samples.append(
                    (variant, ops.sampled_weight_grad_conv2d.default, (gg, xx, cindex, wshape, *conv), {})
                )
    with sara_kernels.use_backend(device):
        for variant, op, args, kwargs in samples:
            with sara_kernels.use_grad_variant(variant):
                torch.library.opcheck(op, args, kwargs, test_utils=utils)
    assert _ops.last_backend["sampled_weight_grad_conv2d"] == device
    assert _ops.last_backend["sparse_adamw_multi_"] == device


# ---------------------------------------------------------------------------------------------
# Bad input: the native kernels raise the Python validator's errors (type and message)
# ---------------------------------------------------------------------------------------------
def _linear_args(device, **over):
    gen = torch.Generator().manual_seed(9)
    args = dict(
        grad_out=rand(4, 6, gen=gen, device=device),
        x=rand(4, 5, gen=gen, device=device),
        index=torch.tensor([0, 7, 29], dtype=torch.int32, device=device),
        out_features=6,
        in_features=5,
    )
    args.update(over)
    return list(args.values())


# Overrides are built lazily (functions of the device): collection must not touch CUDA.
LINEAR_BAD = [
    (
        lambda d: dict(index=torch.tensor([0, 7, 29], dtype=torch.int16, device=d)),
        TypeError,
        r"index has dtype torch.int16; expected one of int32, int64$",
    ),
    (lambda d: dict(index=torch.tensor([0.0, 1.0], device=d)), TypeError, "index has dtype torch.float32"),
    (
        lambda d: dict(index=torch.tensor([0, 7, 30], dtype=torch.int32, device=d)),
        IndexError,
        r"index holds values in \[0, 30\] but must lie in \[0, 30\) \(the weight has 30 entries\)$",
    ),
    (
        lambda d: dict(index=torch.tensor([-1, 7], device=d)),
        IndexError,
        r"index holds values in \[-1, 7\] but must lie in \[0, 30\)",
    ),
    (
        lambda d: dict(index=torch.tensor([0, 9, 7], dtype=torch.int32, device=d)),
        ValueError,
        r"index must be sorted in strictly increasing order \(no duplicates\); sort it with torch.unique\(index\)",
    ),
    (
        lambda d: dict(index=torch.tensor([3, 3], dtype=torch.int32, device=d)),
        ValueError,
        "index must be sorted in strictly increasing",
    ),
    (
        lambda d: dict(index=torch.tensor([[1, 2]], dtype=torch.int32, device=d)),
        ValueError,
        r"index must be 1-D, got shape \(1, 2\)$",
    ),
    (
        lambda d: dict(x=torch.randn(4, 5, dtype=torch.float64, device=d)),
        TypeError,
        "grad_out is torch.float32 but x is torch.float64$",
    ),
    (
        lambda d: dict(x=torch.randn(3, 5, device=d)),
        ValueError,
        r"grad_out \(4, 6\) and x \(3, 5\) must share their leading \(token\) dims$",
    ),
    (
        lambda d: dict(x=torch.randn(4, 1, 5, device=d)),
        ValueError,
        r"grad_out \(4, 6\) and x \(4, 1, 5\) must share their leading",
    ),
    (
        lambda d: dict(x=torch.randn(4, 6, device=d)),
        ValueError,
        r"x has shape \(4, 6\); its last dim must be in_features=5$",
    ),
    (
        lambda d: dict(grad_out=torch.randn(4, 7, device=d)),
        ValueError,
        r"grad_out has shape \(4, 7\); its last dim must be out_features=6$",
    ),
    (
        lambda d: dict(grad_out=torch.tensor(1.0, device=d)),
        ValueError,
        r"grad_out has shape \(\); its last dim must be out_features=6$",
    ),
    (
        lambda d: dict(grad_out=torch.ones(4, 6, dtype=torch.int32, device=d)),
        TypeError,
        "grad_out has dtype torch.int32; expected one of float32, float16, bfloat16, float64$",
    ),
    (lambda d: dict(out_features=0), ValueError, "out_features=0 and in_features=5 must be positive$"),
]
LINEAR_BAD_CUDA = [  # mixed devices: the CUDA kernel runs (the highest-priority device) and refuses
    (
        lambda d: dict(x=torch.ones(4, 5)),
        RuntimeError,
        "x is on cpu but grad_out is on cuda:0; all tensors must be on one device$",
    ),
    (
        lambda d: dict(index=torch.tensor([0], dtype=torch.int32)),
        RuntimeError,
        "index is on cpu but grad_out is on cuda:0",
    ),
]


@pytest.mark.parametrize(
    "device,case",
    [on("cpu", i) for i in range(len(LINEAR_BAD))]
    + [on("cuda", i) for i in range(len(LINEAR_BAD) + len(LINEAR_BAD_CUDA))],
)
def test_linear_bad_input(device, case):
    over, error, match = (LINEAR_BAD + LINEAR_BAD_CUDA)[case]
    # Sync index checks: the CUDA kernels raise on a bad index (the CPU kernels always do).
    with _backend.native_settings(index_checks=2), sara_kernels.use_backend(device):
        with pytest.raises(error, match=f"^sara_kernels.sampled_weight_grad_linear: {match}"):
            torch.ops.sara_kernels.sampled_weight_grad_linear(*_linear_args(device, **over(device)))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bad_input(device):
    gen = torch.Generator().manual_seed(17)
    x, g = rand(2, 4, 5, 5, gen=gen, device=device), rand(2, 6, 5, 5, gen=gen, device=device)
    idx = torch.tensor([0, 5], dtype=torch.int32, device=device)
    w = [6, 4, 3, 3]
    c = ([1, 1], [1, 1], [1, 1])

    def t(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    cases = [
        (
            (g, x, t([0, 216]), w, *c, 1),
            IndexError,
            r"index holds values in \[0, 216\] but must lie in \[0, 216\) \(the weight has 216 entries\)$",
        ),
        ((g, x, t([5, 0]), w, *c, 1), ValueError, "index must be sorted in strictly increasing order"),
        (
            (g, x, idx.float(), w, *c, 1),
            TypeError,
            "index has dtype torch.float32; expected one of int32, int64$",
        ),
        ((g, x, idx.view(1, 2), w, *c, 1), ValueError, r"index must be 1-D, got shape \(1, 2\)$"),
        (
            (g[:, :, :4], x, idx, w, *c, 1),
            ValueError,
            r"grad_out has shape \(2, 6, 4, 5\) but the convolution of x \(2, 4, 5, 5\) with weight_shape \[6, 4, 3, 3\] gives \(2, 6, 5, 5\)$",
        ),
        (
            (g, x, idx, [6, 3, 3, 3], *c, 1),
            ValueError,
            r"x has 4 channels but weight_shape \[6, 3, 3, 3\] with groups=1 expects 3$",
        ),
        (
            (g, x, idx, [6, 1, 3, 3], *c, 4),
            ValueError,
            "groups=4 must be positive and divide the 6 output channels$",
        ),
        (
            (g, x, idx, [6, 2, 3], *c, 2),
            ValueError,
            r"weight_shape must be 4 positive ints \[out, in/groups, kh, kw\], got \[6, 2, 3\]$",
        ),
        ((g, x, idx, w, [0, 1], [1, 1], [1, 1], 1), ValueError, r"stride must be positive, got \[0, 1\]$"),
        (
            (g, x, idx, w, [1, 1], [-1, 0], [1, 1], 1),
            ValueError,
            r"padding must be non-negative, got \[-1, 0\]$",
        ),
        ((g, x, idx, w, [1, 1], [1, 1], [1], 1), ValueError, r"dilation must have 2 entries, got \[1\]$"),
        ((g, x[0], idx, w, *c, 1), ValueError, r"x must be 4-D, got shape \(4, 5, 5\)$"),
        ((g.half(), x, idx, w, *c, 1), TypeError, "grad_out is torch.float16 but x is torch.float32$"),
        ((g.int(), x.int(), idx, w, *c, 1), TypeError, "grad_out has dtype torch.int32; expected one of"),
        (
            (g, x[:, :, :1, :1].contiguous(), idx, w, [1, 1], [0, 0], [1, 1], 1),
            ValueError,
            r"the kernel \(3, 3\) \(dilation \[1, 1\]\) is larger than the padded input \(1, 1\) \(padding \[0, 0\]\)$",
        ),
    ]
    if device == "cuda":
        cases.append(
            (
                (g, x.cpu(), idx, w, *c, 1),
                RuntimeError,
                "x is on cpu but grad_out is on cuda:0; all tensors must be on one device$",
            )
        )
    with _backend.native_settings(index_checks=2), sara_kernels.use_backend(device):
        for args, error, match in cases:
            with pytest.raises(error, match=f"^sara_kernels.sampled_weight_grad_conv2d: {match}"):
                torch.ops.sara_kernels.sampled_weight_grad_conv2d(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_bad_input(device):
    ops = torch.ops.sara_kernels
    w = torch.randn(4, 5, device=device)
    idx = torch.tensor([1, 3, 19], dtype=torch.int32, device=device)
    base, d = torch.randn(3, device=device), torch.randn(3, device=device)

    def z(n=3):
        return torch.zeros(n, device=device)

    hp = dict(step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)

    def adamw(weight=w, index=idx, base=base, delta=None, grad=d, exp_avg=None, exp_avg_sq=None, **over):
        delta, exp_avg, exp_avg_sq = (z() if t is None else t for t in (delta, exp_avg, exp_avg_sq))
        return lambda: ops.sparse_adamw_(
            weight, index, base, delta, grad, exp_avg, exp_avg_sq, **{**hp, **over}
        )

    def t(values):
        return torch.tensor(values, device=device)

    shared = z()
    cases = [
        (
            "scatter_merge_",
            lambda: ops.scatter_merge_(w, t([1, 3, 20]), base, d, 1.0),
            IndexError,
            r"index holds values in \[1, 20\] but must lie in \[0, 20\) \(the weight has 20 entries\)$",
        ),
        (
            "scatter_merge_",
            lambda: ops.scatter_merge_(w, idx, base, d.half(), 1.0),
            TypeError,
            "delta has dtype torch.float16; expected one of float32, float64$",
        ),
        (
            "scatter_merge_",
            lambda: ops.scatter_merge_(w, idx, base, z(4), 1.0),
            ValueError,
            r"delta has shape \(4,\) but index has \(3,\)$",
        ),
        (
            "scatter_merge_",
            lambda: ops.scatter_merge_(w, idx, base, z(6)[::2], 1.0),
            ValueError,
            "delta must be contiguous$",
        ),
        (
            "scatter_merge_",
            lambda: ops.scatter_merge_(torch.randn(5, 4, device=device).t(), idx, base, d, 1.0),
            ValueError,
            r"weight must be contiguous \(indices address weight.view\(-1\)\); got strides \(1, 4\) for shape \(4, 5\)$",
        ),
        (
            "scatter_merge_",
            lambda: ops.scatter_merge_(w, idx, base, d, float("inf")),
            ValueError,
            "alpha must be finite, got inf$",
        ),
        (
            "restore_",
            lambda: ops.restore_(w, t([3, 1, 2]), base),
            ValueError,
            "index must be sorted in strictly increasing order",
        ),
        (
            "restore_",
            lambda: ops.restore_(w, idx, base.double()),
            TypeError,
            "base is torch.float64 but weight is torch.float32; they must match$",
        ),
        (
            "restore_",
            lambda: ops.restore_(w, idx, base[:2]),
            ValueError,
            r"base has shape \(2,\) but index has \(3,\)$",
        ),
        (
            "restore_",
            lambda: ops.restore_(w, idx, base.view(1, 3)),
            ValueError,
            r"base must be 1-D, got shape \(1, 3\)$",
        ),
        (
            "restore_",
            lambda: ops.restore_(w.int(), idx, base.int()),
            TypeError,
            "weight has dtype torch.int32; expected one of float32, float16, bfloat16, float64$",
        ),
        (
            "restore_",
            lambda: ops.restore_(w, idx.view(3, 1), base),
            ValueError,
            r"index must be 1-D, got shape \(3, 1\)$",
        ),
        (
            "sparse_adamw_",
            adamw(exp_avg_sq=z(2)),
            ValueError,
            r"exp_avg_sq has shape \(2,\) but index has \(3,\)$",
        ),
        ("sparse_adamw_", adamw(grad=d[:1]), ValueError, r"grad has shape \(1,\) but index has \(3,\)$"),
        ("sparse_adamw_", adamw(exp_avg=z(6)[::2]), ValueError, "exp_avg must be contiguous$"),
        (
            "sparse_adamw_",
            adamw(grad=d.double()),
            TypeError,
            "grad has dtype torch.float64; expected one of float32$",
        ),
        (
            "sparse_adamw_",
            adamw(delta=z().double()),
            TypeError,
            "delta has dtype torch.float64; expected one of float32$",
        ),
        (
            "sparse_adamw_",
            adamw(weight=w.double(), base=base.double()),
            TypeError,
            "weight dtype float64 is not supported; use fp32, bf16 or fp16$",
        ),
        (
            "sparse_adamw_",
            adamw(index=idx.short()),
            TypeError,
            "index has dtype torch.int16; expected one of int32, int64$",
        ),
        (
            "sparse_adamw_",
            adamw(index=t([1, 1, 2])),
            ValueError,
            "index must be sorted in strictly increasing order",
        ),
        (
            "sparse_adamw_",
            adamw(step=0.5),
            ValueError,
            r"step must be >= 1 \(AdamW counts from 1\), got 0.5$",
        ),
        ("sparse_adamw_", adamw(beta1=1.0), ValueError, r"betas must lie in \[0, 1\)"),
        ("sparse_adamw_", adamw(eps=float("nan")), ValueError, "eps must be finite, got nan$"),
        (
            "sparse_adamw_",
            adamw(delta=shared, exp_avg=shared),
            ValueError,
            r"exp_avg and delta share memory; a tensor the op writes must not overlap any other argument \(pass separate tensors, e\.g\. \.clone\(\)\)$",
        ),
        (
            "sparse_adamw_",
            adamw(index=t([1, 3, 20])),
            IndexError,
            r"index holds values in \[1, 20\] but must lie in \[0, 20\)",
        ),
    ]
    if device == "cuda":
        cases += [
            (
                "restore_",
                lambda: ops.restore_(w, idx.cpu(), base),
                RuntimeError,
                "index is on cpu but weight is on cuda:0; all tensors must be on one device$",
            ),
            (
                "restore_",
                lambda: ops.restore_(w, idx, base.cpu()),
                RuntimeError,
                "base is on cpu but weight is on cuda:0",
            ),
            (
                "sparse_adamw_",
                adamw(exp_avg_sq=z().cpu()),
                RuntimeError,
                "exp_avg_sq is on cpu but weight is on cuda:0",
            ),
        ]
    before = w.clone()
    with _backend.native_settings(index_checks=2), sara_kernels.use_backend(device):
        for op, call, error, match in cases:
            with pytest.raises(error, match=f"^sara_kernels.{op}: {match}"):
                call()
    assert torch.equal(w, before)  # nothing written on any bad call (a bad index included)


@pytest.mark.parametrize("device", DEVICES)
def test_error_messages_spell_numbers_and_shapes(device):
    """The native messages format numbers and shapes themselves (csrc/message.h, never a numeric
    stream insertion), spelled as Python spells them: whole messages, anchored."""
    ops = torch.ops.sara_kernels
    gen = torch.Generator().manual_seed(18)
    x, g = rand(2, 4, 5, 5, gen=gen, device=device), rand(2, 6, 5, 5, gen=gen, device=device)
    idx = torch.tensor([0, 5], dtype=torch.int32, device=device)
    w, index = rand(4, 5, gen=gen, device=device), torch.tensor([1, 3, 19], dtype=torch.int32, device=device)
    base = rand(3, gen=gen, device=device)

    def z():
        return torch.zeros(3, device=device)

    def adamw(step=1.0, **hyper):
        hyper = {**dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0), **hyper}
        ops.sparse_adamw_(w, index, base, z(), z(), z(), z(), step=step, maximize=False, **hyper)

    cases = [
        (
            lambda: ops.sampled_weight_grad_linear(*_linear_args(device, x=torch.randn(4, 6, device=device))),
            r"sampled_weight_grad_linear: x has shape \(4, 6\); its last dim must be in_features=5",
        ),
        (
            lambda: ops.sampled_weight_grad_conv2d(
                g[:, :, :4], x, idx, [6, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1
            ),
            r"sampled_weight_grad_conv2d: grad_out has shape \(2, 6, 4, 5\) but the convolution of x \(2, 4, 5, 5\) "
            r"with weight_shape \[6, 4, 3, 3\] gives \(2, 6, 5, 5\)",
        ),
        (
            lambda: ops.sampled_weight_grad_conv2d(
                g, x[:, :, :1, :1].contiguous(), idx, [6, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1
            ),
            r"sampled_weight_grad_conv2d: the kernel \(3, 3\) \(dilation \[1, 1\]\) is larger than the padded input "
            r"\(1, 1\) \(padding \[0, 0\]\)",
        ),
        (
            lambda: adamw(beta1=0.95, beta2=1.5),
            r"sparse_adamw_: betas must lie in \[0, 1\), got \(0\.95, 1\.5\)",
        ),
        (
            lambda: adamw(lr=-1e-3, weight_decay=0.25),
            r"sparse_adamw_: lr=-0\.001, eps=1e-08 and weight_decay=0\.25 must be non-negative",
        ),
        (lambda: adamw(step=0.5), r"sparse_adamw_: step must be >= 1 \(AdamW counts from 1\), got 0\.5"),
        (lambda: adamw(step=float("inf")), r"sparse_adamw_: step must be finite, got inf"),
        (
            lambda: ops.select_small_magnitude(w, None, -3),
            r"select_small_magnitude: k=-3 must lie in \[0, 20\] \(the weight's entry count\)",
        ),
        (
            lambda: ops.select_small_magnitude(w, 1e-300 * -1, None),
            r"select_small_magnitude: threshold must be a positive number, got -1e-300",
        ),
        (
            lambda: ops.restore_(
                torch.randn(3, 4, device=device),
                torch.tensor([0, 1, 2, 12], device=device),
                torch.randn(4, device=device),
            ),
            r"restore_: index holds values in \[0, 12\] but must lie in \[0, 12\) \(the weight has 12 entries\)",
        ),
        (
            lambda: ops.restore_(
                torch.randn(2**20 + 3, device=device),
                torch.tensor([2**40], device=device),
                torch.randn(1, device=device),
            ),
            r"restore_: index holds values in \[1099511627776, 1099511627776\] but must lie in \[0, 1048579\) "
            r"\(the weight has 1048579 entries\)",
        ),
    ]
    with _backend.native_settings(index_checks=2), sara_kernels.use_backend(device):
        for call, message in cases:
            with pytest.raises((TypeError, ValueError, IndexError), match=f"^sara_kernels.{message}$"):
                call()


@pytest.mark.parametrize("device", DEVICES)
def test_native_errors_match_the_validator(device):
    """A bad call raises the same exception type and message whichever backend runs it."""
    ops = torch.ops.sara_kernels
    gen = torch.Generator().manual_seed(19)
    x, g = rand(2, 4, 5, 5, gen=gen, device=device), rand(2, 6, 5, 5, gen=gen, device=device)
    w = rand(4, 5, gen=gen, device=device)
    idx = torch.tensor([1, 3, 19], dtype=torch.int32, device=device)
    base = rand(3, gen=gen, device=device)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)

    def z(n=3):
        return torch.zeros(n, device=device)

    def t(values):
        return torch.tensor(values, device=device)

    calls = [
        lambda: ops.select_small_magnitude(w, 0.5, 2),
        lambda: ops.select_small_magnitude(w, None, 21),
        lambda: ops.select_small_magnitude(w.int(), 0.5, None),
        lambda: ops.sampled_weight_grad_linear(*_linear_args(device, index=t([0, 30]))),
        lambda: ops.sampled_weight_grad_linear(*_linear_args(device, index=t([4, 2]))),
        lambda: ops.sampled_weight_grad_linear(
            *_linear_args(device, x=torch.randn(4, 5, device=device).half())
        ),
        lambda: ops.sampled_weight_grad_linear(*_linear_args(device, x=torch.randn(2, 2, 5, device=device))),
        lambda: ops.sampled_weight_grad_linear(*_linear_args(device, in_features=-1)),
        lambda: ops.sampled_weight_grad_conv2d(g, x, t([0, 216]), [6, 4, 3, 3], *conv),
        lambda: ops.sampled_weight_grad_conv2d(g, x, t([0, 2]), [6, 4, 3, 3], [1, 1], [1, 1], [1, 0], 1),
        lambda: ops.sampled_weight_grad_conv2d(g, x, t([0, 2]), [6, 2, 3, 3], [1, 1], [1, 1], [1, 1], 3),
        lambda: ops.sampled_weight_grad_conv2d(
            g, x[:, :, :1, :1].contiguous(), t([0]), [6, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1
        ),
        # Two faults at once: the first one checked is the same on both paths (stride's length).
        lambda: ops.sampled_weight_grad_conv2d(g, x, t([0, 2]), [6, 4, 3], [1, 1, 1], [1, 1], [1, 1], 1),
        # A written tensor that shares memory with a strided read-only one.
        lambda: ops.restore_(w.view(-1), t([1, 3, 5]), w.view(-1)[10:16:2]),
        lambda: ops.sparse_adamw_multi_(
            [w.clone(), w.clone()],
            [idx, idx],
            [base, base],
            [z(), z()],
            [z(), z()],
            [z(), z()],
            [z(), z()],
            steps=[1.0, 0.0],
            **hp,
        ),  # fmt: skip
        lambda: ops.scatter_merge_(w.clone(), idx, base, z().half(), 1.0),
        lambda: ops.scatter_merge_(w.clone(), idx, base, z(), float("nan")),
        lambda: ops.restore_(w.clone(), t([1, 3, 20]), base),
        lambda: ops.restore_(w.t(), idx, base),
        lambda: ops.restore_(w.clone(), idx, base.double()),
        lambda: ops.sparse_adamw_(w.clone(), idx, base, z(), z(), z(), z(2), step=1.0, **hp),
        lambda: ops.sparse_adamw_(w.clone(), idx, base, z(), z(), z(), z(), step=0.5, **hp),
        lambda: ops.sparse_adamw_(w.clone(), idx, base, z(), z(), z(), z(), step=1.0, **{**hp, "beta2": 1.5}),
        lambda: ops.sparse_adamw_(w.clone(), t([3, 3, 4]), base, z(), z(), z(), z(), step=1.0, **hp),
        lambda: ops.sparse_adamw_multi_(
            [w.clone()], [idx], [base], [z()], [z()], [z()], [z()], steps=[1.0, 2.0], **hp
        ),
        lambda: ops.sparse_adamw_multi_(
            [w.clone()], [idx], [base], [z()], [z().double()], [z()], [z()], steps=[1.0], **hp
        ),
    ]

    def outcome(backend, call):
        with sara_kernels.use_backend(backend):
            try:
                call()
            except (TypeError, ValueError, IndexError, RuntimeError) as error:
                return type(error), str(error).splitlines()[0]
        return None

    with _backend.native_settings(index_checks=2):
        for i, call in enumerate(calls):
            native = outcome(device, call)
            assert native is not None and native[1].startswith("sara_kernels."), (i, native)
            assert native == outcome("reference", call), i


def test_whole_floats_spelled_as_python():
    w = torch.randn(4, 5)
    z = [torch.zeros(3) for _ in range(4)]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False)
    with sara_kernels.use_backend("cpu"):
        with pytest.raises(ValueError, match=r"step must be >= 1 \(AdamW counts from 1\), got 0\.0$"):
            torch.ops.sara_kernels.sparse_adamw_(
                w, torch.tensor([0, 1, 2]), torch.zeros(3), *z, step=0.0, **hp
            )


# ---------------------------------------------------------------------------------------------
# Settings: the index checks, the workspace, the variant, and what ran last
# ---------------------------------------------------------------------------------------------
def test_native_settings_are_checked_and_restored():
    names = ("grad_variant", "index_checks", "index_checks_default", "workspace_bytes")
    before = {name: _backend.native_setting(name) for name in names}
    seen = []  # a new thread has not set its own: the process default holds there
    worker = threading.Thread(target=lambda: seen.append(_backend.native_setting("index_checks")))
    worker.start()
    worker.join()
    assert seen == [-1]
    cases = (
        ("index_checks", 3, r"\[-1, 2\]"),
        ("index_checks_default", -1, r"\[0, 2\]"),
        ("grad_variant", 4, r"\[0, 3\]"),
        ("workspace_bytes", -5, r"\[0, "),
    )
    for name, bad, allowed in cases:
        with pytest.raises(
            ValueError, match=f"^sara_kernels._setting: {name}={bad} is out of range {allowed}"
        ):
            _backend.native_setting(name, bad)
    with pytest.raises(ValueError, match="^sara_kernels._setting: unknown setting 'workspace'"):
        _backend.native_setting("workspace", 1)
    with pytest.raises(RuntimeError, match="inside"):
        with _backend.native_settings(workspace_bytes=4096, index_checks=0):
            assert _backend.native_setting("workspace_bytes") == 4096
            assert _backend.native_setting("index_checks") == 0
            raise RuntimeError("inside")
    with sara_kernels.use_grad_variant("gemm"):
        assert _backend.native_setting("grad_variant") == 2
        with pytest.raises(ValueError, match="use_grad_variant: unknown variant 'fast'"):
            with sara_kernels.use_grad_variant("fast"):
                pass
        assert _backend.native_setting("grad_variant") == 2
    assert {name: _backend.native_setting(name) for name in names} == before


def test_index_check_default_is_read_once_from_the_environment():
    # SARA_KERNELS_CHECK_INDEX at import gives the process default of the native index checks:
    # 0 / off / false -> 0, sync -> 2, unset / async -> 1; a bad value is an error naming it.
    script = textwrap.dedent(
        """
        import os
        from sara_kernels import _backend
        seen = _backend.native_setting("index_checks_default"), _backend.native_setting("index_checks")
        os.environ["SARA_KERNELS_CHECK_INDEX"] = "sync" if seen[0] != 2 else "off"
        assert _backend.native_setting("index_checks_default") == seen[0]  # not read per call
        print(*seen)
        """
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SARA_KERNELS_")}
    values = {None: 1, "async": 1, "0": 0, "off": 0, "FALSE": 0, "sync": 2, "maybe": None}
    procs = {}
    for value in values:  # the children run side by side
        env = dict(base_env, **({} if value is None else {"SARA_KERNELS_CHECK_INDEX": value}))
        procs[value] = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    for value, expected in values.items():
        out, err = procs[value].communicate(timeout=300)
        if expected is None:
            assert procs[value].returncode != 0
            assert "ValueError: environment variable SARA_KERNELS_CHECK_INDEX: index checks 'maybe'" in err
        else:
            assert procs[value].returncode == 0, err
            assert out.split() == [str(expected), "-1"], value


def test_cpu_kernels_check_the_index_whatever_the_setting():
    w, base = torch.randn(4, 5), torch.randn(2)
    g, x = torch.randn(3, 4), torch.randn(3, 5)
    for checks in (0, 1, 2):
        with _backend.native_settings(index_checks=checks), sara_kernels.use_backend("cpu"):
            with pytest.raises(IndexError, match=r"restore_: index holds values in \[0, 20\]"):
                sara_kernels.ops.restore_(w, torch.tensor([0, 20]), base)
            with pytest.raises(ValueError, match="restore_: index must be sorted"):
                sara_kernels.ops.restore_(w, torch.tensor([3, 1]), base)
            for variant in VARIANTS["cpu"]:
                with (
                    sara_kernels.use_grad_variant(variant),
                    pytest.raises(IndexError, match="holds values in"),
                ):
                    sara_kernels.ops.sampled_weight_grad_linear(g, x, torch.tensor([-1, 2]), 4, 5)


def _all_native_calls(index, device):
    """Each native op that takes an index, called with ``index`` on small inputs (and the variant
    each sampled-gradient call forces)."""
    gen = torch.Generator().manual_seed(18)
    k = index.numel()
    ops = sara_kernels.ops
    w = rand(4, 5, gen=gen, device=device)
    g, x = rand(3, 4, gen=gen, device=device), rand(3, 5, gen=gen, device=device)
    gc, xc, wshape, conv = conv_case(
        1, 2, 2, (3, 3), (2, 2), 1, 0, 1, 1, torch.float32, gen, device
    )  # numel 16
    v = torch.zeros(k, device=device)

    def forced(variant, fn):
        def call():
            with sara_kernels.use_backend(device), sara_kernels.use_grad_variant(variant):
                return fn()

        return call

    calls = {}
    for variant in VARIANTS[device]:
        calls[f"linear_{variant}"] = forced(
            variant, lambda: ops.sampled_weight_grad_linear(g, x, index, 4, 5)
        )
        if variant in CONV_VARIANTS:
            calls[f"conv_{variant}"] = forced(
                variant, lambda: ops.sampled_weight_grad_conv2d(gc, xc, index, wshape, *conv)
            )
    calls["adamw"] = forced(
        "auto",
        lambda: ops.sparse_adamw_(
            w, index, v.clone(), v.clone(), v + 1, v.clone(), v.clone(), step=1.0, lr=0.1, weight_decay=0.0
        ),
    )
    calls["adamw_multi"] = forced(
        "auto",
        lambda: ops.sparse_adamw_multi_(
            [w], [index], [v.clone()], [v.clone()], [v + 1], [v.clone()], [v.clone()], steps=[1.0], lr=0.1
        ),
    )
    calls["merge"] = forced("auto", lambda: ops.scatter_merge_(w, index, v + 5, v + 1, 1.0))
    calls["restore"] = forced("auto", lambda: ops.restore_(w, index, v + 7))
    return calls, w


OP_OF_CALL = {
    "linear": "sampled_weight_grad_linear",
    "conv": "sampled_weight_grad_conv2d",
    "adamw": "sparse_adamw_",
    "merge": "scatter_merge_",
    "restore": "restore_",
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sync_index_check_raises(device, index_dtype):
    # CUDA under index_checks=2 (sync) raises like the CPU kernels, which always check: 20 is out
    # of range for every op here (linear and weight: 20 entries, conv: 16).
    for values, error, match in (
        ([0, 20], IndexError, r"index holds values in \[0, 20\] but must lie in \[0, (16|20)\)"),
        ([-1, 2], IndexError, r"index holds values in \[-1, 2\] but must lie in \[0, (16|20)\)"),
        ([3, 3], ValueError, "index must be sorted in strictly increasing order"),
        ([5, 2], ValueError, "index must be sorted in strictly increasing order"),
    ):
        index = torch.tensor(values, dtype=index_dtype, device=device)
        calls, w = _all_native_calls(index, device)
        before = w.clone()
        with _backend.native_settings(index_checks=2):
            for name, call in calls.items():
                if (
                    name == "adamw_multi"
                ):  # names the set's index: test_sparse_adamw_multi_bad_index_names_the_entry
                    continue
                with pytest.raises(error, match=f"^sara_kernels.{OP_OF_CALL[name.split('_')[0]]}: {match}"):
                    call()
        assert torch.equal(w, before)


@cuda_only
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_kernels_skip_out_of_range_indices(index_dtype):
    # With the validation off, the CUDA kernels themselves skip an out-of-range index: the sampled
    # gradients give 0 there, the in-place ops leave the weight alone, and valid entries are right.
    index = torch.tensor([-7, 1, 15, 20, 2**20], dtype=index_dtype, device="cuda")
    with _backend.native_settings(index_checks=0):
        calls, w = _all_native_calls(index, "cuda")
        valid_calls, _ = _all_native_calls(index[1:3].clone(), "cuda")
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


@cuda_only
def test_unsorted_valid_index_in_kernels():
    # Sorting is a contract checked by the validation, not something the CUDA kernels rely on for
    # the values they compute: with the check off, an unsorted index still gives the right numbers.
    gen = torch.Generator().manual_seed(19)
    g, x = rand(33, 12, gen=gen, device="cuda"), rand(33, 10, gen=gen, device="cuda")
    index = torch.randperm(120, generator=gen)[:50].to(torch.int32).cuda()
    want = linear_oracle(g, x, index, 12, 10)
    with _backend.native_settings(index_checks=0):
        for variant in ("direct", "gemm"):
            got = run_linear("cuda", g, x, index, 12, 10, variant)
            torch.testing.assert_close(got.cpu().double(), want, **grad_tol("cuda", torch.float32, 33))


ASYNC_ASSERT_CALLS = {
    # restore_ runs the separate validation kernel; sparse_adamw_multi_ checks inside its own.
    "restore_": "torch.ops.sara_kernels.restore_(w, index, torch.ones(2, device='cuda'))",
    "sparse_adamw_multi_": (
        "v = torch.zeros(2, device='cuda'); "
        "torch.ops.sara_kernels.sparse_adamw_multi_([w], [index], [v + 1], [v], [v + 1], [v.clone()], "
        "[v.clone()], steps=[1.0], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)"
    ),
}


@cuda_only
@pytest.mark.parametrize("op", sorted(ASYNC_ASSERT_CALLS))
@pytest.mark.parametrize("bad", ("out_of_range", "unsorted"))
def test_async_index_check_is_a_device_assert(op, bad):
    # The default (async) validation fires a device-side assertion, which poisons the CUDA
    # context: run it in a child process.
    values = "[0, 20]" if bad == "out_of_range" else "[3, 1]"
    script = textwrap.dedent(
        f"""
        import torch, sara_kernels
        from sara_kernels import _backend, _ops
        assert _backend.native_setting("index_checks") == 1  # async, the default
        w = torch.zeros(4, 5, device="cuda")
        index = torch.tensor({values}, dtype=torch.int32, device="cuda")
        {ASYNC_ASSERT_CALLS[op]}
        assert _ops.last_backend["{op}"] == "cuda"
        torch.cuda.synchronize()
        print("NO-ASSERT")
        """
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("SARA_KERNELS_CHECK_INDEX", "SARA_KERNELS_BACKEND")
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert "NO-ASSERT" not in proc.stdout
    assert proc.returncode != 0
    assert "assert" in (proc.stderr + proc.stdout).lower()
    assert "AssertionError" not in proc.stderr  # the device assertion, not the script's own


@pytest.mark.parametrize("device", DEVICES)
def test_backends_reports_the_variant_each_sampled_gradient_ran(device):
    # sara_kernels.backends() says which algorithm auto picked for the latest call of each op,
    # which variant is forced, and the auto rules.
    gen = torch.Generator().manual_seed(60)
    in_f = 50 if device == "cpu" else 1024  # CUDA auto: tiled below 0.3% density from 1024 inputs
    g, x = rand(64, 40, gen=gen, device=device), rand(64, in_f, gen=gen, device=device)
    sparse = make_index(40 * in_f, 0.01 if device == "cpu" else 0.001, gen, device=device)
    dense = make_index(40 * in_f, 0.5, gen, device=device)
    gc, xc = rand(2, 8, 6, 6, gen=gen, device=device), rand(2, 8, 6, 6, gen=gen, device=device)
    csparse, cdense = (
        make_index(8 * 8 * 9, 0.01, gen, device=device),
        make_index(8 * 8 * 9, 0.6, gen, device=device),
    )
    expect = {  # (sparse, dense) picks of auto
        "cpu": {"linear": ("direct", "gemm"), "conv": ("direct", "gemm")},
        "cuda": {"linear": ("tiled", "gemm"), "conv": ("direct", "gemm")},
    }[device]

    def last(op):
        reported = sara_kernels.backends()["grad_variant"]["last"][op]
        assert _backend.last_run(op) == (device, reported)
        return reported

    linear, conv = "sampled_weight_grad_linear", "sampled_weight_grad_conv2d"
    with sara_kernels.use_backend(device):
        sara_kernels.ops.sampled_weight_grad_linear(g, x, sparse, 40, in_f)
        assert last(linear) == expect["linear"][0]
        sara_kernels.ops.sampled_weight_grad_linear(g, x, dense, 40, in_f)
        assert last(linear) == expect["linear"][1]
        sara_kernels.ops.sampled_weight_grad_conv2d(gc, xc, csparse, [8, 8, 3, 3], 1, 1, 1, 1)
        assert last(conv) == expect["conv"][0]
        sara_kernels.ops.sampled_weight_grad_conv2d(gc, xc, cdense, [8, 8, 3, 3], 1, 1, 1, 1)
        assert last(conv) == expect["conv"][1]
        for variant in VARIANTS[device]:
            if variant == "auto":
                continue
            with sara_kernels.use_grad_variant(variant):
                assert sara_kernels.backends()["grad_variant"]["forced"] == variant
                sara_kernels.ops.sampled_weight_grad_linear(
                    g, x, dense if variant != "tiled" else sparse, 40, in_f
                )
                assert last(linear) == variant
        # An empty index: the kernel runs (and is recorded) but picks no variant.
        sara_kernels.ops.sampled_weight_grad_linear(g, x, sparse[:0], 40, in_f)
        assert last(linear) is None
    with sara_kernels.use_backend("reference"):
        sara_kernels.ops.sampled_weight_grad_conv2d(gc, xc, cdense, [8, 8, 3, 3], 1, 1, 1, 1)
    assert _backend.last_run(conv) == ("reference", None)
    assert _ops.last_backend[conv] == "reference"
    info = sara_kernels.backends()["grad_variant"]
    assert info["forced"] == "auto" and info["last"][conv] is None
    assert set(info["auto_rules"]) == {"cpu", "cuda", "triton"}
    assert _backend.last_run("sparse_linear") == (None, None)  # an op no kernel recorded


def test_asking_what_ran_never_changes_the_record():
    """Reading the record of an op that never ran allocates nothing: any number of reads leaves
    every kernel recording as before."""
    for i in range(100):
        assert _backend.last_run(f"never_ran_{i}") == (None, None)
    g, x = rand(4, 3), rand(4, 5)
    with sara_kernels.use_backend("cpu"):
        sara_kernels.ops.sampled_weight_grad_linear(g, x, make_index(15, 0.5, None), 3, 5)
    assert _backend.last_run("sampled_weight_grad_linear")[0] == "cpu"
