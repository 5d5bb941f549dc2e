"""The C++/OpenMP CPU kernels (csrc/cpu) against the pure-PyTorch reference.

Every op runs through the public op with ``use_backend("cpu")`` (and each sampled-gradient
variant), or straight through ``torch.ops.sara_kernels_C``, on random non-zero inputs, and is
compared with ``sara_kernels.reference`` called directly. The chunked paths of the sampled
gradients (row / channel / token blocks), which only large layers reach with the default 32 MiB
workspace, are forced on small shapes by shrinking the workspace
(``SARA_KERNELS_CPU_WORKSPACE_BYTES``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import sara_kernels
from sara_kernels import _ops, reference

pytestmark = pytest.mark.skipif(
    not sara_kernels.backends()["native"]["loaded"],
    reason="the native extension sara_kernels._C is not built",
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VARIANTS = ("direct", "gemm", "auto")
DENSITIES = ("none", "one", 0.001, 0.05, 0.5, 1.0)


def native():
    return torch.ops.sara_kernels_C


def rand(*shape, dtype=torch.float32, gen=None):
    """Random normal values, never exactly zero (so a missing term always shows)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)
    return t.to(dtype)


def make_index(numel: int, density, gen, dtype=torch.int32) -> torch.Tensor:
    if density == "none":
        k = 0
    elif density == "one":
        k = 1
    else:
        k = max(1, round(density * numel))
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(dtype)


def grad_tol(dtype, terms: int):
    """Sums of `terms` products of N(0,1) values differ by summation order only."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 * max(terms, 1))
    return dict(rtol=2e-5, atol=2e-6 * max(terms, 1))


@pytest.fixture
def small_workspace(monkeypatch):
    monkeypatch.setenv("SARA_KERNELS_CPU_WORKSPACE_BYTES", "4096")


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
@pytest.mark.parametrize("shape", [(1,), (3,), (17, 3), (129, 65), (64, 3, 3, 3), (20000,)])
def test_select_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(1)
    w = _weight_with_specials(shape, dtype, gen)
    n = w.numel()
    with sara_kernels.use_backend("cpu"):
        for threshold in (1e-3, 2e-2, 0.05, 10.0):
            got = sara_kernels.ops.select_small_magnitude(w, threshold=threshold)
            want = reference.select_small_magnitude(w, threshold=threshold)
            assert got.dtype == want.dtype == torch.int32
            assert torch.equal(got, want), (threshold, got, want)
        for k in sorted({0, 1, min(2, n), n // 7, n // 2, max(n - 1, 0), n}):
            got = sara_kernels.ops.select_small_magnitude(w, k=k)
            want = reference.select_small_magnitude(w, k=k)
            assert got.dtype == want.dtype and got.numel() == k
            assert torch.equal(got, want), (k, got, want)
    assert _ops.last_backend["select_small_magnitude"] == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_ties_and_threshold_rounding(dtype):
    gen = torch.Generator().manual_seed(2)
    # Many exact ties: k cuts through a run of equal magnitudes, ties go to the smaller index.
    w = (rand(5000, gen=gen) * 3).round().to(dtype)
    w[::97] = float("nan")
    for k in (1, 100, 1234, 4000, 4990, 5000):
        assert torch.equal(
            native().select_small_magnitude(w, None, k), reference.select_small_magnitude(w, k=k)
        )
    # Values at the threshold rounded to the weight dtype (|w| < threshold compares in that dtype).
    t = 2e-3
    near = t * (1 + torch.arange(-40, 41, dtype=torch.float64) * 2.0**-11)  # neighbours of t in dtype
    w = torch.cat([near, -near, rand(300, dtype=torch.float64, gen=gen) * 4e-3]).to(dtype)
    assert torch.equal(
        native().select_small_magnitude(w, t, None), reference.select_small_magnitude(w, threshold=t)
    )


def test_select_errors():
    w = torch.randn(10)
    with pytest.raises(RuntimeError, match="exactly one of threshold or k"):
        native().select_small_magnitude(w, 0.1, 3)
    with pytest.raises(RuntimeError, match="exactly one of threshold or k"):
        native().select_small_magnitude(w, None, None)
    with pytest.raises(RuntimeError, match="k=11"):
        native().select_small_magnitude(w, None, 11)
    with pytest.raises(RuntimeError, match="threshold must be a positive"):
        native().select_small_magnitude(w, -1.0, None)
    with pytest.raises(RuntimeError, match="weight has dtype Int"):
        native().select_small_magnitude(torch.ones(3, dtype=torch.int32), 0.1, None)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        native().select_small_magnitude(torch.randn(4, 5).t(), 0.1, None)


# ---------------------------------------------------------------------------------------------
# sampled_weight_grad_linear
# ---------------------------------------------------------------------------------------------
LINEAR_SHAPES = [  # (out, in, tokens as leading dims)
    (1, 1, (1,)),
    (3, 17, (5,)),
    (17, 3, (2, 3)),
    (129, 65, (33,)),
    (40, 129, (3, 7)),
    (64, 64, (0,)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f,lead", LINEAR_SHAPES)
def test_linear_matches_reference(dtype, out_f, in_f, lead):
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f)
    g = rand(*lead, out_f, dtype=dtype, gen=gen)
    x = rand(*lead, in_f, dtype=dtype, gen=gen)
    n = g.numel() // out_f
    for density, variant in itertools.product(DENSITIES, VARIANTS):
        index = make_index(out_f * in_f, density, gen)
        want = reference.sampled_weight_grad_linear(g, x, index, out_f, in_f)
        with sara_kernels.use_backend("cpu"), sara_kernels.use_grad_variant(variant):
            got = sara_kernels.ops.sampled_weight_grad_linear(g, x, index, out_f, in_f)
        assert _ops.last_backend["sampled_weight_grad_linear"] == "cpu"
        assert got.dtype == want.dtype and got.shape == index.shape
        torch.testing.assert_close(got, want, **grad_tol(dtype, n), msg=lambda m: f"{density} {variant}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_chunked_paths(dtype, small_workspace):
    """4 KiB workspace: the direct variant runs in token chunks, gemm in row and token blocks."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f, n = 129, 65, 37
    g = rand(n, out_f, dtype=dtype, gen=gen)
    x = rand(n, in_f, dtype=dtype, gen=gen)
    for density, index_dtype in itertools.product((0.01, 0.3, 1.0), (torch.int32, torch.int64)):
        index = make_index(out_f * in_f, density, gen, index_dtype)
        # Entries in a few rows far apart: gemm skips the empty rows between blocks.
        if density == 0.01:
            index = torch.tensor([5, 6, 70 * in_f + 3, 128 * in_f + 64], dtype=index_dtype)
        want = reference.sampled_weight_grad_linear(g, x, index, out_f, in_f)
        for v in (1, 2, 0):
            got = native().sampled_weight_grad_linear(g, x, index, out_f, in_f, v)
            torch.testing.assert_close(got, want, **grad_tol(dtype, n))


def test_linear_large_workspace_bound():
    """A layer whose dense gradient (8.4M entries) exceeds the 32 MiB workspace: row blocks."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f, n = 4100, 2049, 3
    g, x = rand(n, out_f, gen=gen), rand(n, in_f, gen=gen)
    index = make_index(out_f * in_f, 0.02, gen)
    want = reference.sampled_weight_grad_linear(g, x, index, out_f, in_f)
    for v in (1, 2, 0):
        torch.testing.assert_close(native().sampled_weight_grad_linear(g, x, index, out_f, in_f, v), want)


# ---------------------------------------------------------------------------------------------
# sampled_weight_grad_conv2d
# ---------------------------------------------------------------------------------------------
def _conv_case(n, cin, cout, hw, k, stride, padding, dilation, groups, dtype, gen):
    x = rand(n, cin, *hw, dtype=dtype, gen=gen)
    wshape = [cout, cin // groups, *k]
    y = F.conv2d(
        x.double(), torch.zeros(wshape, dtype=torch.float64), None, stride, padding, dilation, groups
    )
    g = rand(*y.shape, dtype=dtype, gen=gen)
    return g, x, wshape


CONV_GEOMETRY = list(
    itertools.product(
        (1, 2),  # stride
        (0, 1, 2),  # padding
        (1, 2),  # dilation
        ("g1", "g2", "depthwise"),
        ((1, 1), (3, 3)),
    )
)


@pytest.mark.parametrize("stride,padding,dilation,groups,kernel", CONV_GEOMETRY)
def test_conv_geometry_matches_reference(stride, padding, dilation, groups, kernel):
    gen = torch.Generator().manual_seed(stride * 100 + padding * 10 + dilation)
    cin, cout = (4, 6) if groups != "depthwise" else (6, 12)
    groups = {"g1": 1, "g2": 2, "depthwise": cin}[groups]
    g, x, wshape = _conv_case(
        2, cin, cout, (9, 7), kernel, stride, padding, dilation, groups, torch.float32, gen
    )
    numel = wshape[0] * wshape[1] * wshape[2] * wshape[3]
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    for density in (0.05, 0.5, 1.0):
        index = make_index(numel, density, gen)
        want = reference.sampled_weight_grad_conv2d(g, x, index, wshape, *args)
        for variant in VARIANTS:
            with sara_kernels.use_backend("cpu"), sara_kernels.use_grad_variant(variant):
                got = sara_kernels.ops.sampled_weight_grad_conv2d(g, x, index, wshape, *args)
            torch.testing.assert_close(got, want, **grad_tol(torch.float32, g[:, 0].numel()))
    assert _ops.last_backend["sampled_weight_grad_conv2d"] == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,cin,cout,hw,kernel,stride,padding,dilation,groups",
    [
        (1, 1, 1, (1, 1), (1, 1), 1, 0, 1, 1),
        (3, 3, 17, (5, 11), (3, 3), 1, 1, 1, 1),
        (2, 16, 8, (8, 8), (3, 3), 2, 1, 1, 2),
        (2, 8, 8, (7, 9), (3, 3), 1, 2, 1, 8),
        (2, 5, 7, (6, 6), (1, 3), 2, 0, 1, 1),
    ],
)
def test_conv_dtypes_densities(dtype, n, cin, cout, hw, kernel, stride, padding, dilation, groups):
    gen = torch.Generator().manual_seed(cin * 31 + cout)
    g, x, wshape = _conv_case(n, cin, cout, hw, kernel, stride, padding, dilation, groups, dtype, gen)
    numel = wshape[0] * wshape[1] * wshape[2] * wshape[3]
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    for density, variant in itertools.product(DENSITIES, VARIANTS):
        index = make_index(numel, density, gen)
        want = reference.sampled_weight_grad_conv2d(g, x, index, wshape, *args)
        with sara_kernels.use_backend("cpu"), sara_kernels.use_grad_variant(variant):
            got = sara_kernels.ops.sampled_weight_grad_conv2d(g, x, index, wshape, *args)
        assert got.dtype == want.dtype and got.shape == index.shape
        torch.testing.assert_close(
            got, want, **grad_tol(dtype, g[:, 0].numel()), msg=lambda m: f"{density} {variant}: {m}"
        )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_conv_chunked_paths(dtype, small_workspace):
    """4 KiB workspace: gemm splits output channels, input channels and samples; direct (fp16/bf16)
    converts one sample at a time."""
    gen = torch.Generator().manual_seed(5)
    for groups, density, index_dtype in (
        (1, 0.3, torch.int32),
        (2, 1.0, torch.int64),
        (1, 0.01, torch.int64),
    ):
        g, x, wshape = _conv_case(3, 8, 10, (7, 7), (3, 3), 1, 1, 1, groups, dtype, gen)
        numel = wshape[0] * wshape[1] * 9
        index = make_index(numel, density, gen, index_dtype)
        args = ([1, 1], [1, 1], [1, 1], groups)
        want = reference.sampled_weight_grad_conv2d(g, x, index, wshape, *args)
        for v in (1, 2, 0):
            got = native().sampled_weight_grad_conv2d(g, x, index, wshape, *args, v)
            torch.testing.assert_close(got, want, **grad_tol(dtype, 3 * 49))


# ---------------------------------------------------------------------------------------------
# sparse_adamw_, scatter_merge_, restore_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wdtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64))
@pytest.mark.parametrize("maximize,weight_decay", [(False, 0.01), (True, 0.0)])
def test_sparse_adamw_matches_reference_20_steps(wdtype, index_dtype, maximize, weight_decay):
    gen = torch.Generator().manual_seed(6)
    weight = rand(37, 129, dtype=wdtype, gen=gen)
    index = make_index(weight.numel(), 0.3, gen, index_dtype)
    k = index.numel()
    base = weight.view(-1)[index.long()].clone()
    states = []
    for _ in range(2):
        states.append([weight.clone(), torch.zeros(k), torch.zeros(k), torch.zeros(k)])
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    for step in range(1, 21):
        grad = rand(k, gen=gen) * 0.1
        (w_c, d_c, m_c, v_c), (w_r, d_r, m_r, v_r) = states
        with sara_kernels.use_backend("cpu"):
            sara_kernels.ops.sparse_adamw_(w_c, index, base, d_c, grad, m_c, v_c, step=step, **hp)
        reference.sparse_adamw_(w_r, index, base, d_r, grad, m_r, v_r, step=float(step), **hp)
    assert _ops.last_backend["sparse_adamw_"] == "cpu"
    (w_c, d_c, m_c, v_c), (w_r, d_r, m_r, v_r) = states
    assert d_c.abs().min() > 0  # every entry moved
    # torch's sqrt (MKL) is 1 ulp off in ~20% of entries, so agreement is ~1e-7 relative; delta
    # passes through zero (weight decay vs the update), so its check adds a few ulps of lr*steps.
    torch.testing.assert_close(m_c, m_r, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v_c, v_r, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(d_c, d_r, rtol=1e-6, atol=1e-7)
    if wdtype == torch.float32:
        torch.testing.assert_close(w_c, w_r, rtol=1e-6, atol=1e-8)
    else:  # (base + delta) rounded to 8 / 11 bits: at most one ulp apart
        torch.testing.assert_close(w_c.float(), w_r.float(), rtol=2**-7, atol=1e-6)
    untouched = torch.ones(weight.numel(), dtype=torch.bool)
    untouched[index.long()] = False
    assert torch.equal(w_c.view(-1)[untouched], weight.view(-1)[untouched])


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("ddtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("alpha", (1.0, 0.37))
def test_scatter_merge_and_restore(wdtype, ddtype, alpha):
    gen = torch.Generator().manual_seed(7)
    weight = rand(3, 17, 129, dtype=wdtype, gen=gen)
    for density in ("none", "one", 0.05, 1.0):
        index = make_index(weight.numel(), density, gen)
        base = weight.view(-1)[index.long()].clone()
        delta = rand(index.numel(), dtype=ddtype, gen=gen)
        got, want = weight.clone(), weight.clone()
        with sara_kernels.use_backend("cpu"):
            sara_kernels.ops.scatter_merge_(got, index, base, delta, alpha)
        reference.scatter_merge_(want, index, base, delta, alpha)
        assert torch.equal(got, want)
        if index.numel():
            assert not torch.equal(got, weight)
        with sara_kernels.use_backend("cpu"):
            sara_kernels.ops.restore_(got, index, base)
        assert torch.equal(got, weight)
    assert _ops.last_backend["restore_"] == "cpu"


# ---------------------------------------------------------------------------------------------
# opcheck and bad input straight to the native ops
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    # The native ops have no fake kernels of their own (the public ops do), so the schema and
    # autograd-registration checks run here; the fake-tensor checks belong to the public ops.
    utils = ("test_schema", "test_autograd_registration")
    gen = torch.Generator().manual_seed(8)
    ops = native()
    w = rand(9, 11, gen=gen)
    index = make_index(99, 0.3, gen)
    k = index.numel()
    g, x = rand(5, 9, gen=gen), rand(5, 11, gen=gen)
    gc, xc, wshape = _conv_case(2, 4, 6, (5, 5), (3, 3), 1, 1, 1, 2, torch.float32, gen)
    cindex = make_index(6 * 2 * 9, 0.3, gen)
    samples = [
        (ops.select_small_magnitude, (w, 0.5, None)),
        (ops.select_small_magnitude, (w, None, 7)),
        (ops.sampled_weight_grad_linear, (g, x, index, 9, 11, 1)),
        (ops.sampled_weight_grad_linear, (g, x, index, 9, 11, 2)),
        (ops.sampled_weight_grad_conv2d, (gc, xc, cindex, wshape, [1, 1], [1, 1], [1, 1], 2, 0)),
        (
            ops.sparse_adamw_,
            (
                w.clone(),
                index,
                w.view(-1)[index.long()].clone(),
                torch.zeros(k),
                rand(k, gen=gen),
                torch.zeros(k),
                torch.zeros(k),
                1.0,
                1e-3,
                0.9,
                0.999,
                1e-8,
                0.01,
                False,
            ),
        ),
        (ops.scatter_merge_, (w.clone(), index, w.view(-1)[index.long()].clone(), rand(k, gen=gen), 0.5)),
        (ops.restore_, (w.clone(), index, w.view(-1)[index.long()].clone())),
    ]
    # Inputs that require grad (what sparse_linear's backward passes under create_graph=True): the
    # ATen GEMMs / oneDNN calls inside run below autograd, so no variant fails on them and no
    # output requires grad (autograd_registration checks that).
    gr, xr = g.clone().requires_grad_(), x.clone().requires_grad_()
    gcr, xcr = gc.clone().requires_grad_(), xc.clone().requires_grad_()
    for variant in (0, 1, 2):
        samples.append((ops.sampled_weight_grad_linear, (gr, xr, index, 9, 11, variant)))
        samples.append(
            (ops.sampled_weight_grad_conv2d, (gcr, xcr, cindex, wshape, [1, 1], [1, 1], [1, 1], 2, variant))
        )
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=utils)


def _linear_args(**over):
    gen = torch.Generator().manual_seed(9)
    args = dict(
        grad_out=rand(4, 6, gen=gen),
        x=rand(4, 5, gen=gen),
        index=torch.tensor([0, 7, 29], dtype=torch.int32),
        out_features=6,
        in_features=5,
        variant=0,
    )
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(index=torch.tensor([0, 7, 29], dtype=torch.int16)), "index has dtype Short"),
        (dict(index=torch.tensor([0.0, 1.0])), "index has dtype Float"),
        (dict(index=torch.tensor([0, 7, 30], dtype=torch.int32)), r"index\[2\] = 30 is out of range"),
        (dict(index=torch.tensor([-1, 7], dtype=torch.int64)), r"index\[0\] = -1 is out of range"),
        (
            dict(index=torch.tensor([0, 9, 7], dtype=torch.int32)),
            "index must be sorted in strictly increasing",
        ),
        (dict(index=torch.tensor([3, 3], dtype=torch.int32)), "index must be sorted in strictly increasing"),
        (dict(index=torch.tensor([[1, 2]], dtype=torch.int32)), "index must be 1-D"),
        (dict(index=torch.arange(0, 8, 2, dtype=torch.int32)[::2]), "index must be contiguous"),
        (dict(x=torch.randn(4, 5, dtype=torch.float64)), "grad_out has dtype Float but x has dtype Double"),
        (dict(x=torch.randn(3, 5)), "same number of tokens"),
        (dict(x=torch.randn(4, 6)), "x has shape .* in_features=5"),
        (dict(grad_out=torch.randn(4, 7)), "grad_out has shape .* out_features=6"),
        (dict(grad_out=torch.randn(6, 4).t()), "grad_out must be contiguous"),
        (dict(grad_out=torch.ones(4, 6, dtype=torch.int32)), "grad_out has dtype Int"),
        (dict(x=torch.randn(4, 1, 5)), "x must be 2-D"),
        (dict(variant=3), "variant=3"),
    ],
)
def test_linear_bad_input(over, match):
    with pytest.raises(RuntimeError, match=f"sampled_weight_grad_linear: .*{match}"):
        native().sampled_weight_grad_linear(*_linear_args(**over))


def test_conv_bad_input():
    ops = native()
    x, g = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    idx = torch.tensor([0, 5], dtype=torch.int32)
    conv = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"index\[1\] = 216 is out of range"):
        ops.sampled_weight_grad_conv2d(g, x, torch.tensor([0, 216]), [6, 4, 3, 3], *conv, 1, 0)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        ops.sampled_weight_grad_conv2d(g, x, torch.tensor([5, 0]), [6, 4, 3, 3], *conv, 1, 0)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        ops.sampled_weight_grad_conv2d(torch.randn(2, 6, 4, 5), x, idx, [6, 4, 3, 3], *conv, 1, 0)
    with pytest.raises(RuntimeError, match="x has 4 channels"):
        ops.sampled_weight_grad_conv2d(g, x, idx, [6, 3, 3, 3], *conv, 1, 0)
    with pytest.raises(RuntimeError, match="groups=4"):
        ops.sampled_weight_grad_conv2d(g, x, idx, [6, 1, 3, 3], *conv, 4, 0)
    with pytest.raises(RuntimeError, match="stride must be"):
        ops.sampled_weight_grad_conv2d(g, x, idx, [6, 4, 3, 3], [0, 1], [1, 1], [1, 1], 1, 0)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.sampled_weight_grad_conv2d(g, x[0], idx, [6, 4, 3, 3], *conv, 1, 0)
    with pytest.raises(RuntimeError, match="grad_out has dtype Half but x has dtype Float"):
        ops.sampled_weight_grad_conv2d(g.half(), x, idx, [6, 4, 3, 3], *conv, 1, 0)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        ops.sampled_weight_grad_conv2d(
            g, x[:, :, :1, :1].contiguous(), idx, [6, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1, 0
        )


def test_error_messages_spell_numbers_and_shapes():
    """The messages format numbers and shapes themselves (csrc/message.h), as the stream would."""
    ops = native()
    with pytest.raises(RuntimeError, match=r"x has shape \[4, 6\] but in_features=5$"):
        ops.sampled_weight_grad_linear(*_linear_args(x=torch.randn(4, 6)))
    x, g = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    idx = torch.tensor([0, 5], dtype=torch.int32)
    want = (
        r"grad_out has shape \[2, 6, 4, 5\] but the convolution of x \[2, 4, 5, 5\] with weight_shape "
        r"\[6, 4, 3, 3\] gives \[2, 6, 5, 5\]$"
    )
    with pytest.raises(RuntimeError, match=want):
        ops.sampled_weight_grad_conv2d(
            torch.randn(2, 6, 4, 5), x, idx, [6, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1, 0
        )
    want = r"the kernel \[3, 3\] \(dilation \[1, 1\]\) is larger than the padded input \[1, 1\] \(padding \[0, 0\]\)"
    with pytest.raises(RuntimeError, match=want):
        ops.sampled_weight_grad_conv2d(
            g, x[:, :, :1, :1].contiguous(), idx, [6, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1, 0
        )
    w, index = torch.randn(4, 5), torch.tensor([1, 3, 19], dtype=torch.int32)
    base, z = torch.randn(3), torch.zeros(3)

    def adamw(step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        state = [z.clone() for _ in range(4)]
        ops.sparse_adamw_(w, index, base, *state, step, lr, beta1, beta2, eps, weight_decay, False)

    with pytest.raises(RuntimeError, match=r"got \(0\.95, 1\.5\)$"):
        adamw(beta1=0.95, beta2=1.5)
    with pytest.raises(
        RuntimeError, match=r"lr=-0\.001, eps=1e-08 and weight_decay=0\.25 must be non-negative"
    ):
        adamw(lr=-1e-3, weight_decay=0.25)
    with pytest.raises(RuntimeError, match=r"step must be >= 1 \(AdamW counts from 1\), got 0\.5$"):
        adamw(step=0.5)
    with pytest.raises(RuntimeError, match=r"k=-3 must lie in \[0, 20\]"):
        ops.select_small_magnitude(w, None, -3)
    with pytest.raises(RuntimeError, match=r"index\[3\] = 7 and index\[4\] = 7"):
        ops.restore_(torch.randn(3, 4), torch.tensor([0, 1, 2, 7, 7]), torch.randn(5))


def test_inplace_bad_input():
    ops = native()
    w = torch.randn(4, 5)
    idx = torch.tensor([1, 3, 19], dtype=torch.int32)
    base, d = torch.randn(3), torch.randn(3)
    z = torch.zeros(3)
    hp = (1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(RuntimeError, match=r"scatter_merge_: index\[2\] = 20 is out of range"):
        ops.scatter_merge_(w, torch.tensor([1, 3, 20]), base, d, 1.0)
    with pytest.raises(RuntimeError, match="restore_: index must be sorted"):
        ops.restore_(w, torch.tensor([3, 1, 2]), base)
    with pytest.raises(RuntimeError, match="restore_: base has dtype Double"):
        ops.restore_(w, idx, base.double())
    with pytest.raises(RuntimeError, match="restore_: base has 2 entries but index has 3"):
        ops.restore_(w, idx, base[:2])
    with pytest.raises(RuntimeError, match="scatter_merge_: delta has dtype Half"):
        ops.scatter_merge_(w, idx, base, d.half(), 1.0)
    with pytest.raises(RuntimeError, match="scatter_merge_: weight must be contiguous"):
        ops.scatter_merge_(torch.randn(5, 4).t(), idx, base, d, 1.0)
    with pytest.raises(RuntimeError, match="sparse_adamw_: exp_avg_sq has 2 entries"):
        ops.sparse_adamw_(w, idx, base, z.clone(), d, z.clone(), torch.zeros(2), *hp)
    with pytest.raises(RuntimeError, match="sparse_adamw_: grad has dtype Double"):
        ops.sparse_adamw_(w, idx, base, z.clone(), d.double(), z.clone(), z.clone(), *hp)
    with pytest.raises(RuntimeError, match="sparse_adamw_: weight dtype Double is not supported"):
        ops.sparse_adamw_(w.double(), idx, base.double(), z.clone(), d, z.clone(), z.clone(), *hp)
    with pytest.raises(RuntimeError, match="sparse_adamw_: index has dtype Short"):
        ops.sparse_adamw_(w, idx.short(), base, z.clone(), d, z.clone(), z.clone(), *hp)
    with pytest.raises(RuntimeError, match="sparse_adamw_: index must be sorted"):
        ops.sparse_adamw_(w, torch.tensor([1, 1, 2]), base, z.clone(), d, z.clone(), z.clone(), *hp)
    with pytest.raises(RuntimeError, match="sparse_adamw_: step must be >= 1"):
        ops.sparse_adamw_(w, idx, base, z.clone(), d, z.clone(), z.clone(), 0.0, *hp[1:])
    before = w.clone()
    with pytest.raises(RuntimeError, match="out of range"):  # nothing written on a bad index
        ops.sparse_adamw_(w, torch.tensor([1, 3, 20]), base, z.clone(), d, z.clone(), z.clone(), *hp)
    assert torch.equal(w, before)


def _multi_sets(gen, specs):
    """[weight, index, base, delta, grad, exp_avg, exp_avg_sq] per (numel, k, weight dtype, index dtype)."""
    sets = []
    for numel, k, wdtype, index_dtype in specs:
        weight = rand(numel, dtype=wdtype, gen=gen)
        index = torch.randperm(numel, generator=gen)[:k].sort().values.to(index_dtype)
        sets.append(
            [
                weight,
                index,
                weight[index.long()].clone(),
                rand(k, gen=gen) * 0.01,
                rand(k, gen=gen),
                rand(k, gen=gen) * 0.01,
                rand(k, gen=gen).abs() * 1e-3,
            ]
        )
    return sets


def test_sparse_adamw_multi_spans_sets_across_threads():
    # Sets far below and far above the parallel grain, so the one parallel range starts and ends
    # inside sets and spans many: every set must get exactly its own sparse_adamw_ (bitwise).
    gen = torch.Generator().manual_seed(21)
    specs = [(300, 7, torch.float32, torch.int32)] * 5
    specs += [(200_000, 90_001, torch.bfloat16, torch.int64), (9, 9, torch.float16, torch.int32)]
    specs += [(70_000, 33_333, torch.float32, torch.int32), (5, 0, torch.bfloat16, torch.int32)]
    sets = _multi_sets(gen, specs)
    singles = [[t.clone() for t in s] for s in sets]
    steps = [float(1 + i % 4) for i in range(len(sets))]
    hp = (1e-2, 0.9, 0.999, 1e-8, 0.01, False)
    native().sparse_adamw_multi_(*[[s[j] for s in sets] for j in range(7)], steps, *hp)
    for s, step in zip(singles, steps, strict=True):
        native().sparse_adamw_(*s, step, *hp)
    for got, want in zip(sets, singles, strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert all(s[3].abs().min() > 0 for s in sets if s[1].numel())


def test_sparse_adamw_multi_bad_input_names_the_entry():
    ops = native()
    gen = torch.Generator().manual_seed(22)
    sets = _multi_sets(gen, [(40, 5, torch.float32, torch.int32), (50, 6, torch.bfloat16, torch.int32)])
    before = [[t.clone() for t in s] for s in sets]
    hp = (1e-3, 0.9, 0.999, 1e-8, 0.0, False)

    def cols():
        return [[s[j] for s in sets] for j in range(7)]

    def with_entry(j, i, t):  # the lists, with entry i of list j replaced
        out = cols()
        out[j][i] = t
        return out

    cases = [
        ((cols(), [1.0]), "sparse_adamw_multi_: steps has 1 entries but weights has 2"),
        ((cols(), [1.0, 0.0]), r"sparse_adamw_multi_: steps\[1\] must be >= 1"),
        ((with_entry(4, 1, sets[1][4].double()), [1.0, 1.0]), r"grads\[1\] has dtype Double"),
        ((with_entry(1, 1, sets[1][1].flip(0)), [1.0, 1.0]), r"indices\[1\] must be sorted"),
        ((with_entry(1, 0, sets[0][1] + 100), [1.0, 1.0]), r"indices\[0\]\[0\] = \d+ is out of range"),
        (
            (with_entry(0, 1, sets[1][0].double()), [1.0, 1.0]),
            r"weights\[1\] has dtype Double|weights\[1\] dtype",
        ),
        ((with_entry(5, 1, sets[1][5][:2]), [1.0, 1.0]), r"exp_avgs\[1\] has 2 entries but index has 6"),
        ((with_entry(3, 1, sets[0][3]), [1.0, 1.0]), "share memory|has 5 entries"),
    ]
    for (columns, steps), match in cases:
        with pytest.raises(RuntimeError, match=match):
            ops.sparse_adamw_multi_(*columns, steps, *hp)
    same = [[s[j] for s in sets] + [sets[0][j]] for j in range(7)]  # set 0 listed twice
    with pytest.raises(ValueError, match=r"weights\[2\] and weights\[0\] share memory"):
        ops.sparse_adamw_multi_(*same, [1.0, 1.0, 1.0], *hp)
    for s, b in zip(sets, before, strict=True):  # every check runs before anything is written
        for t, u in zip(s, b, strict=True):
            assert torch.equal(t, u)


def test_backends_reports_the_variant_each_sampled_gradient_ran():
    # sara_kernels.backends() says which algorithm auto picked for the latest call of each op,
    # which variant is forced, and the auto rules.
    gen = torch.Generator().manual_seed(60)
    g, x = rand(64, 40, gen=gen), rand(64, 50, gen=gen)
    sparse = make_index(40 * 50, 0.01, gen)  # below the CPU gemm crossover (12%)
    dense = make_index(40 * 50, 0.5, gen)
    gc, xc = rand(2, 8, 6, 6, gen=gen), rand(2, 8, 6, 6, gen=gen)
    csparse, cdense = make_index(8 * 8 * 9, 0.01, gen), make_index(8 * 8 * 9, 0.6, gen)

    def last():
        return sara_kernels.backends()["grad_variant"]["last"]

    with sara_kernels.use_backend("cpu"):
        sara_kernels.ops.sampled_weight_grad_linear(g, x, sparse, 40, 50)
        assert last()["sampled_weight_grad_linear"] == "direct"
        sara_kernels.ops.sampled_weight_grad_linear(g, x, dense, 40, 50)
        assert last()["sampled_weight_grad_linear"] == "gemm"
        sara_kernels.ops.sampled_weight_grad_conv2d(gc, xc, csparse, [8, 8, 3, 3], 1, 1, 1, 1)
        assert last()["sampled_weight_grad_conv2d"] == "direct"
        sara_kernels.ops.sampled_weight_grad_conv2d(gc, xc, cdense, [8, 8, 3, 3], 1, 1, 1, 1)
        assert last()["sampled_weight_grad_conv2d"] == "gemm"
        with sara_kernels.use_grad_variant("direct"):
            assert sara_kernels.backends()["grad_variant"]["forced"] == "direct"
            sara_kernels.ops.sampled_weight_grad_linear(g, x, dense, 40, 50)
            assert last()["sampled_weight_grad_linear"] == "direct"
    info = sara_kernels.backends()["grad_variant"]
    assert info["forced"] == "auto"
    assert set(info["auto_rules"]) == {"cpu", "cuda", "triton"}
    with pytest.raises(ValueError, match="op must be"):
        native().last_grad_variant("select_small_magnitude")
