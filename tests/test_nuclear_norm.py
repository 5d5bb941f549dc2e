"""SaRA's nuclear-norm constraint (sara_kernels.regularizers): value, gradient, layer choice, and its
effect on training."""

import functools

import pytest
import torch
from helpers import one_thread
from torch import nn

from sara_kernels.nn import SparseDeltaConv2d, SparseDeltaLinear
from sara_kernels.optim import SparseAdamW
from sara_kernels.regularizers import nuclear_norm_loss, polar_factor

METHODS = ["svd", "polar"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: one intra-op thread is faster, and robust to a busy machine."""
    with one_thread():
        yield


def _linear(out_f, in_f, density, *, seed=0, bias=True, scale=1e-2):
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_f, in_f, generator=gen))
    layer = SparseDeltaLinear.from_dense(dense, k=max(1, int(density * out_f * in_f)))
    with torch.no_grad():
        layer.sparse_delta.copy_(torch.randn(layer.k, generator=gen) * scale)
    return layer


def _dense_delta(layer):
    """The delta matrix built independently of the module under test: out x rest, row-major."""
    w = torch.zeros(layer.weight.numel(), dtype=torch.float64)
    w[layer.sparse_index.long()] = layer.sparse_delta.detach().double()
    return w.view(layer.weight.shape[0], -1)


def _value_and_grad(module, layer, **kwargs):
    layer.sparse_delta.grad = None
    value = nuclear_norm_loss(module, **kwargs)
    value.backward()
    return value.detach().double(), layer.sparse_delta.grad.detach().double().clone()


def _min_norm_subgradient(matrix):
    """U_r V_r^T in fp64 (rank tolerance as torch.linalg.matrix_rank, at fp32 precision)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s > s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps
    return u[:, keep] @ vh[keep]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- method="svd": exact ----------------------------------------------------------------------
@pytest.mark.parametrize("shape,density",
                         [((24, 40), 0.3), ((40, 24), 0.1), ((32, 32), 0.05), ((8, 64), 1.0)])
def test_svd_value_is_matrix_nuclear_norm(shape, density):
    layer = _linear(*shape, density)
    value = nuclear_norm_loss(layer, method="svd")
    assert value.dtype == torch.float32 and value.dim() == 0
    expected = torch.linalg.matrix_norm(_dense_delta(layer).float(), ord="nuc")
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=0)


def test_svd_gradient_is_svdvals_gradient_for_full_rank():
    layer = _linear(24, 40, 0.5)
    dense = _dense_delta(layer).float().requires_grad_()
    assert torch.linalg.matrix_rank(dense.detach()) == 24
    torch.linalg.svdvals(dense).sum().backward()
    _, grad = _value_and_grad(layer, layer, method="svd")
    expected = dense.grad.view(-1)[layer.sparse_index.long()]
    torch.testing.assert_close(grad.float(), expected, rtol=1e-4, atol=1e-5)


def test_gradient_is_minimum_norm_subgradient_when_rank_deficient():
    # A 16 x 20 matrix whose only entries are an exactly rank-2 4 x 6 block (integer factors, exact in
    # fp32) plus one selected entry held at 0 whose row and column are otherwise empty. Its null spaces
    # reach the selected entries, where svdvals' autograd adds LAPACK's arbitrary null-space basis.
    gen = torch.Generator().manual_seed(5)
    index = torch.tensor([r * 20 + c for r in range(4) for c in range(6)] + [5 * 20 + 7], dtype=torch.int32)
    layer = SparseDeltaLinear.from_dense(nn.Linear(20, 16), index)
    left = torch.randint(-3, 4, (4, 2), generator=gen).float()
    block = left @ torch.randint(-3, 4, (2, 6), generator=gen).float()
    with torch.no_grad():
        layer.sparse_delta[:24] = block.reshape(-1)
        layer.sparse_delta[24] = 0.0
    matrix = _dense_delta(layer)
    assert torch.linalg.matrix_rank(matrix) == 2
    expected = _min_norm_subgradient(matrix).reshape(-1)[layer.sparse_index.long()]
    assert expected[-1] == 0
    dense = matrix.float().requires_grad_()
    torch.linalg.svdvals(dense).sum().backward()
    assert _rel(dense.grad.view(-1)[layer.sparse_index.long()].double(), expected) > 0.1  # measured 1.0
    _, grad = _value_and_grad(layer, layer, method="svd")
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    # polar: fp32 rounding in the null space grows 1.5x per step (measured 2e-3 at 30 steps, 0.12 at 40).
    _, grad = _value_and_grad(layer, layer, method="polar")
    assert _rel(grad, expected) < 1e-2
    assert grad[-1] == 0  # an empty row / column stays exactly 0


@pytest.mark.parametrize("method", METHODS)
def test_zero_delta_gives_zero_value_and_zero_gradient(method):
    layer = SparseDeltaLinear.from_dense(nn.Linear(12, 10), k=30)  # deltas start at 0
    value, grad = _value_and_grad(layer, layer, method=method)
    assert value == 0
    assert torch.equal(grad, torch.zeros_like(grad))


# -- method="polar": Newton-Schulz ------------------------------------------------------------
# (shape, density, gradient tolerance). Measured at 30 fp32 steps: value error <= 2e-7, gradient error
# <= 3.2e-7, except 128x128 at 1%: 6.2e-4, from a singular value at 2.5e-6 ||A||_F (under the fp32 rank
# tolerance, so U_r V_r^T leaves it out; 30 steps take it about half way to 1).
POLAR_CASES = [((64, 64), 0.02, 1e-5), ((64, 64), 0.5, 1e-5), ((96, 96), 0.1, 1e-5), ((48, 160), 0.05, 1e-5),
               ((160, 48), 0.2, 1e-5), ((32, 288), 0.1, 1e-5), ((128, 128), 0.01, 2e-3)]


@pytest.mark.parametrize("shape,density,grad_tol", POLAR_CASES)
def test_polar_matches_svd_value_and_gradient(shape, density, grad_tol):
    layer = _linear(*shape, density, seed=sum(shape))
    v_ref, g_ref = _value_and_grad(layer, layer, method="svd", dtype=torch.float64)
    v, g = _value_and_grad(layer, layer, method="polar")
    assert abs(v - v_ref) / v_ref < 1e-6
    assert _rel(g, g_ref) < grad_tol
    # The iteration count matters: 5 steps are far from converged (measured >= 0.1 value, 0.12 gradient).
    v5, g5 = _value_and_grad(layer, layer, method="polar", polar_steps=5)
    assert abs(v5 - v_ref) / v_ref > 1e-2 and _rel(g5, g_ref) > 1e-2


def test_polar_bf16_is_within_a_few_percent():
    layer = _linear(64, 96, 0.2)
    v_ref, g_ref = _value_and_grad(layer, layer, method="svd", dtype=torch.float64)
    v, g = _value_and_grad(layer, layer, method="polar", dtype=torch.bfloat16)
    # Measured: value 3.3e-4, gradient 1.0e-2.
    assert abs(v - v_ref) / v_ref < 5e-3
    assert _rel(g, g_ref) < 5e-2


def test_polar_factor_is_u_vt():
    gen = torch.Generator().manual_seed(3)
    for shape in [(20, 50), (50, 20), (30, 30)]:
        a = torch.randn(*shape, generator=gen, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        torch.testing.assert_close(polar_factor(a, dtype=torch.float64), u @ vh, rtol=0, atol=1e-8)
    batch = torch.randn(3, 10, 14, generator=gen)
    g = polar_factor(batch)
    assert g.shape == batch.shape and g.dtype == torch.float32
    torch.testing.assert_close(g @ g.mT, torch.eye(10).expand(3, 10, 10), rtol=0, atol=1e-5)
    assert torch.equal(polar_factor(torch.zeros(4, 6)), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="steps"):
        polar_factor(batch, 0)


# -- what the loss is taken of ----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_conv_delta_is_out_by_rest(method):
    dense = nn.Conv2d(6, 8, kernel_size=3, groups=2, bias=True)  # weight [8, 3, 3, 3]
    conv = SparseDeltaConv2d.from_dense(dense, k=100)
    with torch.no_grad():
        conv.sparse_delta.copy_(torch.randn(conv.k))
    manual = torch.zeros(8, 3, 3, 3, dtype=torch.float64)
    manual.view(-1)[conv.sparse_index.long()] = conv.sparse_delta.detach().double()
    matrix = manual.reshape(8, 27)
    value, grad = _value_and_grad(conv, conv, method=method)
    torch.testing.assert_close(value, torch.linalg.matrix_norm(matrix, ord="nuc"), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, _min_norm_subgradient(matrix).reshape(-1)[conv.sparse_index.long()],
                               rtol=1e-3, atol=1e-4)
    # Another reading of the same weight (out*kh x in*kw) has another nuclear norm: the check can fail.
    other = manual.permute(0, 2, 1, 3).reshape(24, 9)
    assert abs(torch.linalg.matrix_norm(other, ord="nuc") - value) > 1e-3 * value


class _Mixed(nn.Module):
    """Two sparse Linear layers, one sparse Conv2d, one dense Linear, and an empty (k=0) sparse layer."""

    def __init__(self):
        super().__init__()
        self.a = _linear(16, 12, 0.3, seed=1)
        self.b = _linear(16, 12, 0.3, seed=2)  # same shape as a (batched together)
        self.conv = SparseDeltaConv2d.from_dense(nn.Conv2d(3, 4, 3), k=40)
        with torch.no_grad():
            self.conv.sparse_delta.normal_()
        self.dense = nn.Linear(12, 12)
        self.empty = SparseDeltaLinear.from_dense(nn.Linear(12, 12))  # k == 0
        self.sparse = [self.a, self.b, self.conv]


def _per_layer_norms(model):
    return [torch.linalg.matrix_norm(_dense_delta(m), ord="nuc").item() for m in model.sparse]


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_only_the_deltas(method):
    model = _Mixed()
    loss = nuclear_norm_loss(model, method=method)
    torch.testing.assert_close(loss.item(), sum(_per_layer_norms(model)), rtol=1e-5, atol=0)
    loss.backward()
    deltas = {id(m.sparse_delta) for m in model.sparse} | {id(model.empty.sparse_delta)}
    for name, p in model.named_parameters():
        if id(p) in deltas:
            continue
        assert p.grad is None, name
    for m in model.sparse + [model.empty]:
        assert not m.weight.requires_grad and m.weight.grad is None
        assert m.sparse_base.grad is None
    for m in model.sparse:
        assert m.sparse_delta.grad is not None and m.sparse_delta.grad.abs().sum() > 0
    assert model.empty.sparse_delta.grad is None


@pytest.mark.parametrize("method", METHODS)
def test_layers_random_picks_one_layer(method):
    model = _Mixed()
    norms = _per_layer_norms(model)
    gen = torch.Generator().manual_seed(7)
    picked = []
    for _ in range(30):
        for m in model.sparse:
            m.sparse_delta.grad = None
        loss = nuclear_norm_loss(model, "random", method, generator=gen)
        loss.backward()
        with_grad = [i for i, m in enumerate(model.sparse) if m.sparse_delta.grad is not None]
        assert len(with_grad) == 1
        torch.testing.assert_close(loss.item(), norms[with_grad[0]], rtol=1e-5, atol=0)
        picked.append(with_grad[0])
    assert set(picked) == {0, 1, 2}  # uniform over the three non-empty layers; never the k=0 one
    # The same seed draws the same sequence.
    gen = torch.Generator().manual_seed(7)
    again = [nuclear_norm_loss(model, "random", method, generator=gen).item() for _ in range(30)]
    torch.testing.assert_close(again, [norms[i] for i in picked], rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_layers_int_picks_n_distinct_layers(n):
    model = _Mixed()
    norms = _per_layer_norms(model)
    gen = torch.Generator().manual_seed(11)
    seen = set()
    for _ in range(10):
        for m in model.sparse:
            m.sparse_delta.grad = None
        loss = nuclear_norm_loss(model, n, "svd", generator=gen)
        loss.backward()
        with_grad = [i for i, m in enumerate(model.sparse) if m.sparse_delta.grad is not None]
        assert len(with_grad) == n
        torch.testing.assert_close(loss.item(), sum(norms[i] for i in with_grad), rtol=1e-5, atol=0)
        seen.add(tuple(with_grad))
    assert n == 3 or len(seen) > 1
    with pytest.raises(ValueError, match="layers=4"):
        nuclear_norm_loss(model, 4)


def test_all_equals_sum_of_layers_and_skips_empty():
    model = _Mixed()
    each = sum(nuclear_norm_loss(m).item() for m in model.sparse)
    torch.testing.assert_close(nuclear_norm_loss(model).item(), each, rtol=1e-6, atol=0)
    empty_only = SparseDeltaLinear.from_dense(nn.Linear(5, 5))
    assert nuclear_norm_loss(empty_only).item() == 0.0
    assert nuclear_norm_loss(empty_only, "random", "polar").item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="no sparse-delta layer"):
        nuclear_norm_loss(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    layer = _linear(6, 6, 0.5)
    for bad in ["some", "ALL", 0, -2, True, 1.5, None]:
        with pytest.raises(ValueError, match="layers"):
            nuclear_norm_loss(layer, layers=bad)
    for bad in ["nuclear", "SVD", None]:
        with pytest.raises(ValueError, match="method"):
            nuclear_norm_loss(layer, method=bad)
    with pytest.raises(ValueError, match="polar_steps"):
        nuclear_norm_loss(layer, method="polar", polar_steps=0)
    with pytest.raises(ValueError, match="dtype"):
        nuclear_norm_loss(layer, method="svd", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="generator"):
        nuclear_norm_loss(layer, "random", generator=7)


# -- it changes training ----------------------------------------------------------------------
@functools.cache
def _train(method, lam, layers="all", steps=40):
    """Fine-tune two sparse Linear layers (k and threshold selection) towards a small residual target."""
    torch.manual_seed(0)
    model = nn.Sequential(SparseDeltaLinear.from_dense(nn.Linear(16, 32), k=160), nn.Tanh(),
                          SparseDeltaLinear.from_dense(nn.Linear(32, 8), threshold=0.05))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=gen)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(8, 8, generator=gen)
    deltas = [model[0].sparse_delta, model[2].sparse_delta]
    assert all(d.numel() > 0 for d in deltas)
    optimizer = SparseAdamW(deltas, lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        if lam:
            loss = loss + lam * nuclear_norm_loss(model, layers, method, generator=gen)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        task = nn.functional.mse_loss(model(x), y).item()
    return [d.detach().clone() for d in deltas], nuclear_norm_loss(model, method="svd").item(), task


@pytest.mark.parametrize("method,layers", [("svd", "all"), ("polar", "all"), ("polar", "random")])
def test_constraint_changes_training_and_lowers_nuclear_norm(method, layers):
    _, _, start_task = _train("svd", 0.0, steps=0)
    plain, plain_nuc, plain_task = _train("svd", 0.0)  # no constraint (cached across cases)
    reg, reg_nuc, reg_task = _train(method, 1e-3, layers)  # lambda in the paper's range
    for a, b in zip(plain, reg, strict=True):
        assert a.abs().sum() > 0
        assert not torch.allclose(a, b, rtol=0, atol=1e-4)
    # Measured: 4.03 without; 2.82 with the constraint on all layers (both methods), 3.44 with it
    # on one random layer per step.
    assert reg_nuc < (0.85 if layers == "all" else 0.9) * plain_nuc, (reg_nuc, plain_nuc)
    # It still fits the task (measured: 0.0122 at the start, 0.0002 without, 0.0004 with).
    assert reg_task < 0.2 * start_task, (reg_task, start_task)
