"""The Triton backend against the pure-PyTorch reference.

Runs on CUDA tensors when a GPU is present, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported when there is no GPU). The
interpreter runs programs one by one in numpy, so shapes here are small but odd (1, 3, 17, 129,
non-square, leading batch dims) to exercise every mask.

Each op is called both through the public op (``torch.ops.sara_kernels.*`` under
``use_backend("triton")``, which also checks that the Triton kernel really ran) and through the
launchers in ``sara_kernels.triton`` directly (to force the split-reduction path).
"""

from __future__ import annotations

import math

import pytest
import torch

import sara_kernels
from sara_kernels import _backend, _ops, reference

DEVICES = []
if _backend.triton_available("cpu"):
    DEVICES.append("cpu")
if torch.cuda.is_available() and _backend.triton_available("cuda"):
    DEVICES.append("cuda")

pytestmark = pytest.mark.skipif(
    not DEVICES,
    reason="Triton unavailable: needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors "
    f"({_backend._triton_error or 'triton interpreter off'})",
)

if DEVICES:
    import sara_kernels.triton as st
else:  # pragma: no cover
    st = None

ops = torch.ops.sara_kernels
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DENSITIES = [0.0, "one", 0.001, 0.05, 0.5, 1.0]
# The Triton kernel ("direct") and the dense-GEMM-then-gather path ("gemm") of the backend.
GRAD_VARIANTS = ("direct", "gemm")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, device, gen):
    """Standard normal values, never exactly zero (a zero input would hide a dropped term)."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)
    return t.to(dtype).to(device)


def _index(numel: int, density, device, gen, dtype=torch.int64) -> torch.Tensor:
    """Sorted distinct flat indices: none, one, a fraction (at least one), or all."""
    if density == "one":
        count = 1
    elif density == 0.0:
        count = 0
    else:
        count = min(numel, max(1, round(numel * density)))
    index = torch.randperm(numel, generator=gen)[:count].sort().values
    return index.to(dtype).to(device)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_grad_close(got, want, bound, acc, rounded_to=None):
    """|got - want| <= tol * bound, with bound = sum of |products| per entry (the error scale of a
    sum regardless of cancellation); tol is a few hundred units in the last place of ``acc``, or
    half an ulp of ``rounded_to`` when each entry was rounded once to that dtype."""
    assert got.dtype == acc, (got.dtype, acc)
    assert got.shape == want.shape, (got.shape, want.shape)
    tol = 1e-5 if acc == torch.float32 else 1e-13
    if rounded_to is not None:
        tol += float(torch.finfo(rounded_to).eps)
    err = (got.double() - want.double()).abs()
    limit = tol * bound.double() + 1e-30
    bad = err > limit
    assert not bad.any(), (
        f"{int(bad.sum())}/{got.numel()} entries off; worst error {float((err - limit).max()):.3e} "
        f"over the limit"
    )


# ---------------------------------------------------------------------------------------------
# Linear sampled gradient
# ---------------------------------------------------------------------------------------------
def _linear_case(out_features, in_features, lead, density, dtype, device, seed, index_dtype=torch.int64):
    gen = _gen(seed)
    g = _randn((*lead, out_features), dtype, device, gen)
    x = _randn((*lead, in_features), dtype, device, gen)
    index = _index(out_features * in_features, density, device, gen, index_dtype)
    want = reference.sampled_weight_grad_linear(g, x, index, out_features, in_features)
    bound = reference.sampled_weight_grad_linear(
        g.double().abs(), x.double().abs(), index, out_features, in_features
    )
    return g, x, index, want, bound


LINEAR_SHAPES = [
    (1, 1, (5,)),
    (3, 17, (2, 3)),
    (17, 3, (129,)),
    (129, 33, (7,)),
    (20, 129, (3, 1, 23)),
]


@pytest.mark.parametrize("variant", GRAD_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_grad_matches_reference(shape, dtype, device, variant):
    out_features, in_features, lead = shape
    g, x, index, want, bound = _linear_case(out_features, in_features, lead, 0.05, dtype, device, 1)
    with sara_kernels.use_backend("triton"), sara_kernels.use_grad_variant(variant):
        got = ops.sampled_weight_grad_linear(g, x, index, out_features, in_features)
    assert _ops.last_backend["sampled_weight_grad_linear"] == "triton"
    _assert_grad_close(got, want, bound, _acc(dtype))


@pytest.mark.parametrize("variant", GRAD_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("density", DENSITIES, ids=str)
def test_linear_grad_densities(density, index_dtype, device, variant):
    g, x, index, want, bound = _linear_case(33, 19, (4, 17), density, torch.float32, device, 2, index_dtype)
    with sara_kernels.use_backend("triton"), sara_kernels.use_grad_variant(variant):
        got = ops.sampled_weight_grad_linear(g, x, index, 33, 19)
    _assert_grad_close(got, want, bound, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("splits", [1, 2, 5, 1000])
def test_linear_grad_split_reduction(splits, dtype, device):
    """The launcher's N-split path (partial sums per split, summed after) gives the same result."""
    g, x, index, want, bound = _linear_case(9, 14, (300,), 0.3, dtype, device, 3)
    got = st.sampled_weight_grad_linear(g, x, index, 9, 14, splits=splits, variant=1)
    _assert_grad_close(got, want, bound, _acc(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_grad_empty(device):
    gen = _gen(4)
    # k == 0
    g, x = _randn((6, 5), torch.float32, device, gen), _randn((6, 4), torch.float32, device, gen)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    with sara_kernels.use_backend("triton"):
        got = ops.sampled_weight_grad_linear(g, x, empty, 5, 4)
    assert got.shape == (0,) and got.dtype == torch.float32
    # N == 0: every selected entry's gradient is an empty sum
    index = _index(20, 0.5, device, gen)
    with sara_kernels.use_backend("triton"):
        got = ops.sampled_weight_grad_linear(
            torch.empty(0, 5, device=device, dtype=torch.float64),
            torch.empty(0, 4, device=device, dtype=torch.float64),
            index,
            5,
            4,
        )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.zeros(index.numel(), dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_grad_through_autograd(device):
    """sparse_linear's backward computes grad_delta with the Triton kernel."""
    gen = _gen(5)
    weight = _randn((13, 21), torch.float32, device, gen)
    x = _randn((3, 5, 21), torch.float32, device, gen).requires_grad_()
    index = _index(weight.numel(), 0.2, device, gen)
    delta = torch.zeros(index.numel(), device=device, requires_grad=True)
    with sara_kernels.use_backend("triton"):
        y = ops.sparse_linear(x, weight, None, index, delta)
        upstream = _randn(y.shape, torch.float32, device, gen)
        (y * upstream).sum().backward()
    assert _ops.last_backend["sampled_weight_grad_linear"] == "triton"
    dense = upstream.reshape(-1, 13).t().double() @ x.detach().reshape(-1, 21).double()
    torch.testing.assert_close(delta.grad.double(), dense.reshape(-1)[index], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Conv2d sampled gradient
# ---------------------------------------------------------------------------------------------
# (N, C, H, W, O, groups, kh, kw, stride, padding, dilation)
CONV_CASES = [
    (2, 4, 7, 9, 6, 1, 3, 3, (1, 1), (0, 0), (1, 1)),
    (1, 3, 5, 5, 3, 3, 3, 3, (2, 2), (1, 1), (1, 1)),  # depthwise
    (2, 4, 8, 7, 4, 2, 3, 3, (2, 1), (2, 1), (1, 2)),  # groups=2, asymmetric everything
    (3, 5, 6, 5, 7, 1, 1, 1, (2, 2), (0, 0), (1, 1)),  # 1x1, strided
    (1, 4, 9, 10, 8, 2, 3, 3, (1, 2), (2, 2), (2, 2)),  # padding 2, dilation 2
    (2, 4, 6, 6, 8, 4, 3, 3, (1, 1), (1, 0), (2, 1)),  # depthwise with channel multiplier 2
    (1, 1, 17, 3, 1, 1, 3, 1, (1, 1), (2, 0), (1, 1)),  # single channel, non-square kernel
]


def _conv_case(case, density, dtype, device, seed, index_dtype=torch.int64):
    n, c, h, w, o, groups, kh, kw, stride, padding, dilation = case
    gen = _gen(seed)
    weight_shape = [o, c // groups, kh, kw]
    x = _randn((n, c, h, w), dtype, device, gen)
    p, q = (
        (size + 2 * pad - dil * (kern - 1) - 1) // s + 1
        for size, pad, dil, kern, s in zip((h, w), padding, dilation, (kh, kw), stride, strict=True)
    )
    dy = _randn((n, o, p, q), dtype, device, gen)
    index = _index(math.prod(weight_shape), density, device, gen, index_dtype)
    args = (weight_shape, list(stride), list(padding), list(dilation), groups)
    want = reference.sampled_weight_grad_conv2d(dy, x, index, *args)
    bound = reference.sampled_weight_grad_conv2d(dy.double().abs(), x.double().abs(), index, *args)
    return dy, x, index, args, want, bound


@pytest.mark.parametrize("variant", GRAD_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_grad_matches_reference(case, dtype, device, variant):
    dy, x, index, args, want, bound = _conv_case(CONV_CASES[case], 0.5, dtype, device, 10 + case)
    with sara_kernels.use_backend("triton"), sara_kernels.use_grad_variant(variant):
        got = ops.sampled_weight_grad_conv2d(dy, x, index, *args)
    assert _ops.last_backend["sampled_weight_grad_conv2d"] == "triton"
    # On CUDA the gemm variant takes cuDNN's fp16/bf16 gradient: each entry rounded once.
    lowp = device == "cuda" and variant == "gemm" and dtype in (torch.float16, torch.bfloat16)
    _assert_grad_close(got, want, bound, _acc(dtype), rounded_to=dtype if lowp else None)


@pytest.mark.parametrize("variant", GRAD_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("density", DENSITIES, ids=str)
def test_conv_grad_densities(density, index_dtype, device, variant):
    case = (2, 6, 5, 6, 8, 2, 3, 3, (1, 2), (1, 1), (1, 1))
    dy, x, index, args, want, bound = _conv_case(case, density, torch.float32, device, 20, index_dtype)
    with sara_kernels.use_backend("triton"), sara_kernels.use_grad_variant(variant):
        got = ops.sampled_weight_grad_conv2d(dy, x, index, *args)
    _assert_grad_close(got, want, bound, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [2, 7])
def test_conv_grad_split_reduction(splits, device):
    case = (4, 4, 9, 8, 4, 2, 3, 3, (1, 1), (1, 1), (1, 1))  # N*P*Q = 288 > 2 chunks of 128
    dy, x, index, args, want, bound = _conv_case(case, 0.5, torch.float32, device, 30)
    got = st.sampled_weight_grad_conv2d(dy, x, index, *args, splits=splits, variant=1)
    _assert_grad_close(got, want, bound, torch.float32)


# ---------------------------------------------------------------------------------------------
# Fused AdamW
# ---------------------------------------------------------------------------------------------
WEIGHT_TOL = {torch.float32: 2e-7, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False),
        dict(lr=3e-3, beta1=0.3, beta2=0.95, eps=1e-6, weight_decay=0.0, maximize=True),
    ],
    ids=["decay", "maximize_lowbeta"],
)
def test_sparse_adamw_20_steps(hyper, weight_dtype, device):
    gen = _gen(40)
    weight = _randn((37, 29), weight_dtype, device, gen)
    index = _index(weight.numel(), 0.3, device, gen, torch.int32)
    k = index.numel()
    base = weight.view(-1)[index.long()].clone()
    state = [torch.zeros(k, device=device) for _ in range(3)]  # delta, exp_avg, exp_avg_sq
    ref_weight, ref_state = weight.clone(), [s.clone() for s in state]
    untouched = torch.ones(weight.numel(), dtype=torch.bool, device=device)
    untouched[index.long()] = False
    for step in range(1, 21):
        grad = _randn((k,), torch.float32, device, gen)
        with sara_kernels.use_backend("triton"):
            ops.sparse_adamw_(
                weight, index, base, state[0], grad, state[1], state[2], step=float(step), **hyper
            )
        assert _ops.last_backend["sparse_adamw_"] == "triton"
        reference.sparse_adamw_(
            ref_weight, index, base, ref_state[0], grad, ref_state[1], ref_state[2], step=float(step), **hyper
        )
        for got, want in zip(state, ref_state, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert state[0].abs().max() > 10 * hyper["lr"]  # the parameters really moved
    # The written entries are exactly base + delta rounded to the weight dtype...
    expected = (base.float() + state[0]).to(weight_dtype)
    assert torch.equal(weight.view(-1)[index.long()], expected)
    # ...every other entry is untouched...
    assert torch.equal(weight.view(-1)[untouched], ref_weight.view(-1)[untouched])
    # ...and the weight agrees with the reference to about one unit in the last place.
    tol = WEIGHT_TOL[weight_dtype]
    torch.testing.assert_close(weight, ref_weight, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_adamw_empty_and_single(device):
    gen = _gen(41)
    weight = _randn((5, 3), torch.bfloat16, device, gen)
    before = weight.clone()
    empty = torch.empty(0, dtype=torch.int64, device=device)
    z = torch.empty(0, device=device)
    hyper = dict(step=1.0, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    with sara_kernels.use_backend("triton"):
        ops.sparse_adamw_(weight, empty, z.to(torch.bfloat16), z, z, z, z, **hyper)
    assert torch.equal(weight, before)
    index = torch.tensor([7], device=device)
    base = weight.view(-1)[index].clone()
    delta, m, v = (torch.zeros(1, device=device) for _ in range(3))
    grad = torch.tensor([0.25], device=device)
    with sara_kernels.use_backend("triton"):
        ops.sparse_adamw_(weight, index, base, delta, grad, m, v, **hyper)
    # First AdamW step with zero state moves by lr * sign(grad) (up to eps): delta = -0.1.
    torch.testing.assert_close(delta, torch.tensor([-0.1], device=device), rtol=1e-6, atol=1e-6)
    assert torch.equal(weight.view(-1)[7:8], (base.float() + delta).to(torch.bfloat16))
    weight.view(-1)[7] = before.view(-1)[7]
    assert torch.equal(weight, before)


# ---------------------------------------------------------------------------------------------
# Merge and restore
# ---------------------------------------------------------------------------------------------
WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.0, 0.3, -2.5])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
def test_scatter_merge_matches_reference(weight_dtype, delta_dtype, alpha, device):
    gen = _gen(50)
    weight = _randn((17, 129), weight_dtype, device, gen)
    index = _index(weight.numel(), 0.3, device, gen)
    base = _randn((index.numel(),), weight_dtype, device, gen)
    delta = _randn((index.numel(),), delta_dtype, device, gen)
    want = weight.clone()
    reference.scatter_merge_(want, index, base, delta, alpha)
    with sara_kernels.use_backend("triton"):
        ops.scatter_merge_(weight, index, base, delta, alpha)
    assert _ops.last_backend["scatter_merge_"] == "triton"
    # Same arithmetic and rounding as torch: bit-exact, except that an fp64 alpha reaches the
    # kernel as fp32 hi + lo (~48 bits), which can move an fp64 result by an ulp or so.
    fp64_alpha = (weight_dtype == torch.float64 or delta_dtype == torch.float64) and alpha != 1.0
    rtol = 1e-14 if fp64_alpha and weight_dtype == torch.float64 else 0.0
    torch.testing.assert_close(weight, want, rtol=rtol, atol=0.0)
    assert not torch.equal(weight.view(-1)[index], base)  # the merge did move the entries


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", DENSITIES, ids=str)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_then_restore_roundtrip(weight_dtype, density, device):
    gen = _gen(51)
    weight = _randn((3, 5, 7, 9), weight_dtype, device, gen)  # conv-shaped weight
    original = weight.clone()
    index = _index(weight.numel(), density, device, gen, torch.int32)
    base = weight.view(-1)[index.long()].clone()
    delta = _randn((index.numel(),), torch.float32, device, gen)
    want = weight.clone()
    reference.scatter_merge_(want, index, base, delta, 0.5)
    with sara_kernels.use_backend("triton"):
        ops.scatter_merge_(weight, index, base, delta, 0.5)
    assert torch.equal(weight, want)
    assert torch.equal(
        weight.view(-1)[index.long()] != original.view(-1)[index.long()],
        (base.float() + 0.5 * delta).to(weight_dtype) != base,
    )
    with sara_kernels.use_backend("triton"):
        ops.restore_(weight, index, base)
    assert _ops.last_backend["restore_"] == "triton"
    assert torch.equal(weight, original)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
def test_restore_matches_reference(weight_dtype, device):
    gen = _gen(52)
    weight = _randn((129, 3), weight_dtype, device, gen)
    index = _index(weight.numel(), 0.5, device, gen)
    base = _randn((index.numel(),), weight_dtype, device, gen)
    want = weight.clone()
    reference.restore_(want, index, base)
    st.restore_(weight, index, base)
    assert torch.equal(weight, want)


def test_bf16_rounding_is_nearest_even():
    """The kernels round fp32 -> bf16 to nearest even by hand (the interpreter's cast truncates):
    ties, carries into the exponent, overflow to inf, subnormals and NaN all match torch."""
    device = DEVICES[0]
    one = 1.0
    values = torch.tensor(
        [
            one + 2**-8,
            one + 3 * 2**-8,
            one + 2**-8 + 2**-20,
            2 - 2**-9,
            3.4e38,
            -3.4e38,
            1e-40,
            -2.5,
            float("inf"),
            -float("inf"),
            float("nan"),
            (1 - 2**-9) * 2**-126,
        ],
        dtype=torch.float32,
        device=device,
    )
    weight = torch.zeros(values.numel(), dtype=torch.bfloat16, device=device)
    base = torch.zeros_like(weight)
    st.scatter_merge_(weight, torch.arange(values.numel(), device=device), base, values, 1.0)
    want = (base.float() + values).to(torch.bfloat16)
    nan = values.isnan()
    assert weight[nan].isnan().all()  # NaN stays NaN (payloads differ between torch's CPU and CUDA casts)
    assert torch.equal(weight[~nan].view(torch.int16), want[~nan].view(torch.int16)), (weight, want)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck with the Triton backend
# ---------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    gen = _gen(60)
    g = _randn((5, 6), torch.float32, device, gen)
    x = _randn((5, 7), torch.float32, device, gen)
    lin_index = _index(42, 0.3, device, gen)
    conv = _conv_case(CONV_CASES[2], 0.3, torch.float32, device, 61)
    weight = _randn((6, 7), torch.bfloat16, device, gen)
    index = _index(42, 0.3, device, gen)
    k = index.numel()
    base = weight.view(-1)[index].clone()
    delta = _randn((k,), torch.float32, device, gen)
    grad = _randn((k,), torch.float32, device, gen)
    m = _randn((k,), torch.float32, device, gen)
    v = _randn((k,), torch.float32, device, gen).abs()
    adam_kwargs = dict(step=3.0, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)
    return {
        "sampled_weight_grad_linear": ((g, x, lin_index, 6, 7), {}),
        "sampled_weight_grad_conv2d": ((conv[0], conv[1], conv[2], *conv[3]), {}),
        "sparse_adamw_": ((weight, index, base, delta, grad, m, v), adam_kwargs),
        "scatter_merge_": ((weight, index, base, delta, 0.5), {}),
        "restore_": ((weight, index, base), {}),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op",
    [
        "sampled_weight_grad_linear",
        "sampled_weight_grad_conv2d",
        "sparse_adamw_",
        "scatter_merge_",
        "restore_",
    ],
)
def test_opcheck(op, device):
    args, kwargs = _opcheck_cases(device)[op]
    with sara_kernels.use_backend("triton"):
        torch.library.opcheck(getattr(ops, op), args, kwargs)
        assert _ops.last_backend[op] == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_auto_takes_the_kernel_for_sparse_convs_and_gemm_above(device):
    # Conv: the Triton kernel below the fitted crossover density, the dense-gradient path above
    # (the results agree either way); linear: gemm. 'tiled' is not a Triton variant.
    case = (2, 6, 5, 6, 8, 1, 3, 3, (1, 1), (1, 1), (1, 1))
    for density in (0.005, 0.6):
        dy, x, index, args, want, bound = _conv_case(case, density, torch.float32, device, 30)
        with sara_kernels.use_backend("triton"):
            got = ops.sampled_weight_grad_conv2d(dy, x, index, *args)
        _assert_grad_close(got, want, bound, torch.float32)
    numel, L = 8 * 6 * 9, 2 * 5 * 6
    crossover = st.sampled_grad.CONV_DIRECT_BASE + st.sampled_grad.CONV_DIRECT_PER_SQRT_L / math.sqrt(L)
    assert 0.005 < crossover < 0.6 and numel == 432  # so the two densities above took both paths
    g, x, index, want, bound = _linear_case(9, 14, (6,), 0.2, torch.float32, device, 31)
    with sara_kernels.use_backend("triton"), sara_kernels.use_grad_variant("tiled"):
        with pytest.raises(ValueError, match="not a Triton variant"):
            ops.sampled_weight_grad_linear(g, x, index, 9, 14)
