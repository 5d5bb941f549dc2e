"""SparseDeltaConv1d, SparseDeltaConv3d and SparseDeltaEmbedding: gradients against the dense layers
on every backend, their sampled-gradient ops against the reference (itself checked against loops),
gradcheck, state dicts, adapters, re-selection, casts, tied weights, and apply_sara on models with
these layers (diffusers' SVD UNet, Wan and PixArt transformers) and bare parameters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS
from helpers import build_tiny
from helpers import random_index as _index
from helpers import random_values as _random
from test_trainer_safety import assert_merged
from torch import nn

import sara_kernels as sk
from sara_kernels import _autograd, _ops, reference
from sara_kernels import ops as sk_ops
from sara_kernels.nn import SparseDeltaConv1d, SparseDeltaConv3d, SparseDeltaEmbedding

# Mixed holds a bare parameter on purpose (the summary lists it; the warning has its own test).
pytestmark = pytest.mark.filterwarnings("ignore:apply_sara.*stay frozen:UserWarning")

# (layer kwargs, input shape): odd sizes, strides, dilations, groups, padding strings and modes,
# unbatched inputs.
CONV1D_CASES = [
    (dict(in_channels=3, out_channels=5, kernel_size=3), (2, 3, 11)),
    (
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2),
        (3, 4, 13),
    ),
    (dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="reflect"), (2, 3, 9)),
    (dict(in_channels=3, out_channels=2, kernel_size=2, padding="valid", bias=False), (3, 7)),
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"), (1, 2, 5)),
]
CONV3D_CASES = [
    (dict(in_channels=3, out_channels=4, kernel_size=(3, 1, 1), padding=(1, 0, 0)), (2, 3, 5, 3, 4)),
    (
        dict(
            in_channels=4,
            out_channels=6,
            kernel_size=(3, 2, 3),
            stride=(2, 1, 2),
            padding=(1, 0, 2),
            dilation=(2, 1, 1),
            groups=2,
        ),
        (2, 4, 7, 5, 7),
    ),
    (
        dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", padding_mode="replicate"),
        (1, 3, 4, 5, 6),
    ),
    (dict(in_channels=2, out_channels=3, kernel_size=(1, 3, 3), stride=(1, 2, 2), bias=False), (2, 5, 7, 6)),
    (
        dict(in_channels=3, out_channels=2, kernel_size=(2, 3, 2), padding="valid", dilation=(1, 2, 1)),
        (2, 3, 5, 7, 4),
    ),
]
EMBEDDING_CASES = [
    (dict(num_embeddings=13, embedding_dim=5), (3, 7)),
    (dict(num_embeddings=11, embedding_dim=6, padding_idx=2), (4, 9)),
    (dict(num_embeddings=9, embedding_dim=4, padding_idx=-1, scale_grad_by_freq=True), (2, 3, 5)),
    (dict(num_embeddings=17, embedding_dim=3, scale_grad_by_freq=True), (23,)),
]


def _fill(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters bounded away from zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(_random(p.shape))
    return module


def _input_for(dense: nn.Module, shape, device, dtype=torch.float32):
    if isinstance(dense, nn.Embedding):
        tokens = torch.randint(0, dense.num_embeddings, shape, device=device)
        if dense.padding_idx is not None:
            tokens.view(-1)[::3] = dense.padding_idx  # the padding row is looked up, gets no gradient
        tokens.view(-1)[1::4] = tokens.view(-1)[0]  # repeated tokens (scale_grad_by_freq counts them)
        return tokens
    return _random(shape, dtype=dtype, device=device)


def _compare_with_dense(cls, kwargs, shape, device, backend, dtype=torch.float32, density=0.4):
    dense = _fill(cls._dense_type(**kwargs)).to(device=device, dtype=dtype)
    twin = copy.deepcopy(dense)
    layer = cls.from_dense(dense, index=_index(dense.weight.numel(), density, device))
    x = _input_for(dense, shape, device, dtype)
    x_ours = x.clone().requires_grad_(x.is_floating_point())
    x_twin = x.clone().requires_grad_(x.is_floating_point())
    with sk.use_backend(backend):
        y = layer(x_ours)
        g = _random(y.shape, dtype=y.dtype, device=device)
        y.backward(g)
    y_twin = twin(x_twin)
    y_twin.backward(g)
    return layer, twin, x_ours, x_twin, y, y_twin, g


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "cls,kwargs,shape",
    [(SparseDeltaConv1d, *c) for c in CONV1D_CASES] + [(SparseDeltaConv3d, *c) for c in CONV3D_CASES],
)
def test_conv_layers_match_the_dense_layer(device, backend, cls, kwargs, shape):
    layer, twin, x, x_twin, y, y_twin, g = _compare_with_dense(cls, kwargs, shape, device, backend)
    assert _ops.last_backend["sampled_weight_grad_conv2d"] == backend  # reduced to the conv2d op
    assert torch.equal(y, y_twin)  # the forward is the dense layer's, on the merged weight
    torch.testing.assert_close(x.grad, x_twin.grad)
    want = twin.weight.grad.reshape(-1)[layer.sparse_index.long()]
    torch.testing.assert_close(layer.sparse_delta.grad, want, rtol=1e-5, atol=1e-5)
    if twin.bias is not None:  # from_dense freezes the weight only (apply_sara freezes the bias)
        torch.testing.assert_close(layer.bias.grad, twin.bias.grad)
    assert layer.weight.grad is None


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("kwargs,shape", EMBEDDING_CASES)
def test_embedding_layer_matches_the_dense_layer(device, backend, kwargs, shape):
    layer, twin, _, _, y, y_twin, g = _compare_with_dense(
        SparseDeltaEmbedding, kwargs, shape, device, backend, density=0.5
    )
    assert torch.equal(y, y_twin)
    index = layer.sparse_index.long()
    torch.testing.assert_close(
        layer.sparse_delta.grad, twin.weight.grad.reshape(-1)[index], rtol=1e-6, atol=1e-6
    )
    if twin.padding_idx is not None:
        in_padding_row = index // twin.embedding_dim == twin.padding_idx
        assert in_padding_row.any() and not layer.sparse_delta.grad[in_padding_row].any()
    assert layer.weight.grad is None


@pytest.mark.parametrize("backend", [b for d, b in DEVICE_BACKENDS if d == "cpu"])
@pytest.mark.parametrize(
    "cls,kwargs,shape",
    [(SparseDeltaConv1d, *c) for c in CONV1D_CASES[1:3]]
    + [(SparseDeltaConv3d, *c) for c in CONV3D_CASES[1:3]],
)
def test_conv_layers_in_bfloat16(backend, cls, kwargs, shape):
    """bf16 weight and input: the delta's gradient (fp32 accumulation) is at least as close to the
    fp64 gradient as the dense bf16 layer's own."""
    dense = _fill(cls._dense_type(**kwargs)).bfloat16()
    twin = copy.deepcopy(dense)
    layer = cls.from_dense(dense, index=_index(dense.weight.numel(), 0.4))
    x = _random(shape, torch.bfloat16)
    with sk.use_backend(backend):
        y = layer(x)
        g = _random(y.shape, torch.bfloat16)
        y.backward(g)
    twin(x).backward(g)
    exact = copy.deepcopy(twin).double()
    exact.weight.grad = None
    exact(x.double()).backward(g.double())
    index = layer.sparse_index.long()
    want = exact.weight.grad.reshape(-1)[index]
    ours = (layer.sparse_delta.grad.double() - want).abs().max()
    dense_error = (twin.weight.grad.double().reshape(-1)[index] - want).abs().max()
    assert ours <= 2 * dense_error + 1e-6 * want.abs().max(), (float(ours), float(dense_error))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs,shape", EMBEDDING_CASES[1:3])
def test_embedding_layer_in_half_precision(dtype, kwargs, shape):
    """The delta's gradient (fp32 sums) is at least as close to the fp64 gradient as the dense
    half-precision layer's own."""
    layer, twin, tokens, _, y, y_twin, g = _compare_with_dense(
        SparseDeltaEmbedding, kwargs, shape, "cpu", "reference", dtype
    )
    assert y.dtype == dtype and torch.equal(y, y_twin)
    exact = copy.deepcopy(twin).double()
    exact.weight.grad = None
    exact(tokens).backward(g.double())
    index = layer.sparse_index.long()
    want = exact.weight.grad.reshape(-1)[index]
    ours = (layer.sparse_delta.grad.double() - want).abs().max()
    dense_error = (twin.weight.grad.double().reshape(-1)[index] - want).abs().max()
    assert ours <= 2 * dense_error + 1e-6 * want.abs().max(), (float(ours), float(dense_error))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "dims,case",
    [
        (1, CONV1D_CASES[0]),
        (1, CONV1D_CASES[1]),
        (3, CONV3D_CASES[0]),
        (3, (CONV3D_CASES[1][0], (1, 4, 5, 3, 5))),  # small: gradcheck perturbs every input
    ],
)
def test_conv_function_gradcheck(device, backend, dims, case):
    kwargs, shape = case
    dense = cls_for(dims)._dense_type(**kwargs)
    w0 = _random(dense.weight.shape, torch.float64, device)
    index = _index(w0.numel(), 0.3, device)
    stride, padding, dilation, groups = (
        list(dense.stride),
        list(dense.padding),
        list(dense.dilation),
        dense.groups,
    )

    def f(x, b, delta):
        w = w0.clone()
        w.view(-1)[index.long()] += delta.detach()
        return _autograd.SparseConvFunction.apply(x, w, b, index, delta, stride, padding, dilation, groups)

    x = _random((1, *shape[-(dims + 1) :]), torch.float64, device).requires_grad_()
    b = _random((dense.out_channels,), torch.float64, device).requires_grad_()
    delta = _random(index.shape, torch.float64, device, 0.1).requires_grad_()
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, b, delta))


def cls_for(dims):
    return {1: SparseDeltaConv1d, 3: SparseDeltaConv3d}[dims]


# padding_idx and scale_grad_by_freq change nn.Embedding's gradient away from the derivative (checked
# against nn.Embedding above); gradcheck covers the plain lookup.
@pytest.mark.parametrize(
    "kwargs,shape", [EMBEDDING_CASES[0], (dict(num_embeddings=7, embedding_dim=3), (2, 3, 4))]
)
def test_embedding_function_gradcheck(kwargs, shape):
    dense = nn.Embedding(**kwargs)
    w0 = _random(dense.weight.shape, torch.float64)
    index = _index(w0.numel(), 0.5)
    tokens = _input_for(dense, shape, "cpu")

    def f(delta):
        w = w0.clone()
        w.view(-1)[index.long()] += delta.detach()
        return _autograd.SparseEmbeddingFunction.apply(
            tokens, w, index, delta, dense.padding_idx, dense.scale_grad_by_freq
        )

    delta = _random(index.shape, torch.float64, scale=0.1).requires_grad_()
    assert torch.autograd.gradcheck(f, (delta,))


# ---------------------------------------------------------------------------------------------
# The sampled-gradient ops against the reference; the reference against loops
# ---------------------------------------------------------------------------------------------
def test_reference_conv3d_and_embedding_grads_match_loops():
    x, g = _random((2, 2, 4, 3, 3)).double(), None
    w_shape = [2, 2, 2, 2, 2]
    stride, padding, dilation = [1, 2, 1], [1, 0, 1], [2, 1, 1]
    g = _random(
        F.conv3d(x, torch.zeros(w_shape, dtype=torch.float64), None, stride, padding, dilation).shape
    ).double()
    index = torch.arange(0, 32, 3, dtype=torch.int32)
    got = reference.sampled_weight_grad_conv_nd(g, x, index, w_shape, stride, padding, dilation, 1)
    xp = F.pad(x, (1, 1, 0, 0, 1, 1))
    for j, flat in enumerate(index.tolist()):
        o, rest = divmod(flat, 16)
        c, rest = divmod(rest, 8)
        t, rest = divmod(rest, 4)
        h, w = divmod(rest, 2)
        total = 0.0
        for n in range(2):
            for a in range(g.shape[2]):
                for b in range(g.shape[3]):
                    for e in range(g.shape[4]):
                        value = xp[
                            n, c, a * stride[0] + t * dilation[0], b * stride[1] + h, e * stride[2] + w
                        ]
                        total += float(g[n, o, a, b, e] * value)
        assert abs(float(got[j]) - total) < 1e-10
    tokens = torch.tensor([[3, 1, 3], [0, 3, 2]])
    go = _random((2, 3, 4)).double()
    index = torch.arange(0, 16, dtype=torch.int32)
    for padding_idx, scale in ((None, False), (1, True)):
        got = reference.sampled_weight_grad_embedding(go, tokens, index, 4, 4, padding_idx, scale)
        for flat in range(16):
            r, c = divmod(flat, 4)
            hits = [(n, m) for n in range(2) for m in range(3) if int(tokens[n, m]) == r]
            want = 0.0 if r == padding_idx else sum(float(go[n, m, c]) for n, m in hits)
            if scale and hits:
                want /= len(hits)
            assert abs(float(got[flat]) - want) < 1e-12


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("density", [0, 1, 0.3, 1.0])
def test_sampled_conv1d_and_conv3d_ops_match_the_reference(device, backend, index_dtype, density):
    for dims, (kwargs, shape) in [(1, CONV1D_CASES[1]), (3, CONV3D_CASES[1]), (3, CONV3D_CASES[0])]:
        conv = cls_for(dims)._dense_type(**kwargs)
        x = _random(shape, device=device)
        g = _random(conv.to(device)(x).shape, device=device)
        index = _index(conv.weight.numel(), density, device, index_dtype)
        args = [
            list(conv.weight.shape),
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            conv.groups,
        ]
        op = sk_ops.sampled_weight_grad_conv1d if dims == 1 else sk_ops.sampled_weight_grad_conv3d
        with sk.use_backend(backend):
            got = op(g, x, index, *args)
        want = reference.sampled_weight_grad_conv_nd(g, x, index, *args)
        assert got.dtype == torch.float32 and got.shape == index.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", sorted({d for d, _ in DEVICE_BACKENDS}))
@pytest.mark.parametrize("kwargs,shape", EMBEDDING_CASES)
def test_sampled_embedding_op_matches_the_reference(device, kwargs, shape):
    dense = nn.Embedding(**kwargs)
    tokens = _input_for(dense, shape, device)
    g = _random((*shape, dense.embedding_dim), device=device)
    for density in (0, 1, 0.5, 1.0):
        index = _index(dense.weight.numel(), density, device)
        args = (dense.num_embeddings, dense.embedding_dim, dense.padding_idx, dense.scale_grad_by_freq)
        got = sk_ops.sampled_weight_grad_embedding(g, tokens, index, *args)
        torch.testing.assert_close(got, reference.sampled_weight_grad_embedding(g, tokens, index, *args))
    # padding_idx as nn.Embedding accepts it (negative: counted from the end)
    index = _index(dense.weight.numel(), 1.0, device)
    neg = sk_ops.sampled_weight_grad_embedding(
        g, tokens, index, dense.num_embeddings, dense.embedding_dim, -1
    )
    pos = sk_ops.sampled_weight_grad_embedding(
        g, tokens, index, dense.num_embeddings, dense.embedding_dim, dense.num_embeddings - 1
    )
    assert torch.equal(neg, pos)


def test_bad_input_names_the_argument():
    x, g = _random((2, 3, 11)), _random((2, 5, 9))
    index = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="sampled_weight_grad_conv1d: x must be 3-D"):
        sk_ops.sampled_weight_grad_conv1d(g, x[0], index, [5, 3, 3])
    with pytest.raises(ValueError, match="sampled_weight_grad_conv1d: grad_out has shape"):
        sk_ops.sampled_weight_grad_conv1d(g, x, index, [5, 3, 4])
    with pytest.raises(ValueError, match="sampled_weight_grad_conv1d: weight_shape must be 3 positive"):
        sk_ops.sampled_weight_grad_conv1d(g, x, index, [5, 3, 1, 3])
    with pytest.raises(ValueError, match="sampled_weight_grad_conv3d: stride must be an int or 3 ints"):
        sk_ops.sampled_weight_grad_conv3d(
            _random((1, 2, 3, 3, 3)), _random((1, 2, 3, 3, 3)), index, [2, 2, 1, 1, 1], stride=(1, 1)
        )
    with pytest.raises(ValueError, match="sampled_weight_grad_conv3d: x has 2 channels"):
        sk_ops.sampled_weight_grad_conv3d(
            _random((1, 2, 3, 3, 3)), _random((1, 2, 3, 3, 3)), index, [2, 3, 1, 1, 1]
        )
    with pytest.raises(IndexError, match="sampled_weight_grad_conv3d"):
        sk_ops.sampled_weight_grad_conv3d(
            _random((1, 2, 3, 3, 3)), _random((1, 2, 3, 3, 3)), torch.tensor([0, 4]), [2, 2, 1, 1, 1]
        )
    tokens = torch.tensor([[1, 2, 9]])
    with pytest.raises(IndexError, match="sampled_weight_grad_embedding.*indices"):
        sk_ops.sampled_weight_grad_embedding(_random((1, 3, 4)), tokens, index, 9, 4)
    with pytest.raises(ValueError, match="sampled_weight_grad_embedding: grad_out has shape"):
        sk_ops.sampled_weight_grad_embedding(_random((1, 3, 5)), tokens.clamp(max=8), index, 9, 4)
    with pytest.raises(TypeError, match="sampled_weight_grad_embedding: indices has dtype"):
        sk_ops.sampled_weight_grad_embedding(_random((1, 3, 4)), tokens.float(), index, 9, 4)


def test_embedding_refuses_max_norm_and_sparse_and_wrong_modules():
    with pytest.raises(ValueError, match="max_norm=1.0 is not supported"):
        SparseDeltaEmbedding.from_dense(nn.Embedding(5, 3, max_norm=1.0), k=3)
    with pytest.raises(ValueError, match="sparse=True"):
        SparseDeltaEmbedding(5, 3, sparse=True, k=3)
    with pytest.raises(TypeError, match=r"SparseDeltaConv3d.from_dense: expected nn.Conv3d, got Conv2d"):
        SparseDeltaConv3d.from_dense(nn.Conv2d(2, 2, 1), k=1)
    with pytest.raises(TypeError, match="already a SparseDeltaConv1d"):
        SparseDeltaConv1d.from_dense(SparseDeltaConv1d(2, 2, 1, k=1))


# ---------------------------------------------------------------------------------------------
# Layer state: training, state dicts, adapters, re-selection, casts, tied weights
# ---------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    """A model with the three new layer kinds (and a bare parameter)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(19, 6, padding_idx=0)
        self.temporal = nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.video = nn.Conv3d(1, 3, (3, 2, 2), padding=(1, 0, 0))
        self.table = nn.Parameter(torch.randn(3, 6))
        self.head = nn.Linear(6, 4)

    def forward(self, tokens):
        h = self.embed(tokens)  # [N, L, 6]
        h = self.temporal(h.transpose(1, 2)).transpose(1, 2)  # [N, L, 6]
        v = self.video(h.unsqueeze(1).unsqueeze(-1).expand(-1, -1, -1, -1, 2))  # [N, 3, L, 5, 1]
        v = v.mean((-1, -2)).transpose(1, 2)  # [N, L, 3]
        return self.head(h + v @ self.table)


def _mixed(seed=0):
    return _fill(Mixed(), seed)


def _tokens(seed=1):
    return torch.randint(0, 19, (3, 8), generator=torch.Generator().manual_seed(seed))


def _trained(model, steps=3, reselect=False):
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=5e-2)
    tokens = _tokens()
    for step in range(steps):
        model(tokens).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if reselect and step == 1:
            sk.reselect_(model, opt, threshold=0.2)
    return opt


def test_apply_sara_converts_conv1d_conv3d_and_embedding():
    """These layers used to be left frozen without a word."""
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    assert isinstance(model.embed, SparseDeltaEmbedding)
    assert isinstance(model.temporal, SparseDeltaConv1d)
    assert isinstance(model.video, SparseDeltaConv3d)
    kinds = {layer.name: layer.kind for layer in model.sara_summary.layers}
    assert kinds == {"embed": "embedding", "temporal": "conv1d", "video": "conv3d", "head": "linear"}
    frozen = {(f.module_type, f.parameter): f for f in model.sara_summary.frozen}
    assert frozen[("Mixed", "table")].unsupported and frozen[("Mixed", "table")].numel == 18
    assert "Mixed.table x1: 18" in str(model.sara_summary)


def test_training_keeps_the_invariant_and_matches_dense_training():
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    twin = copy.deepcopy(model)
    _trained(model, steps=3)
    assert_merged(model)
    # the same steps with torch.optim.AdamW on the deltas (the layers merge after each step)
    opt = torch.optim.AdamW(sk.sparse_parameters(twin), lr=5e-2)
    for _ in range(3):
        twin(_tokens()).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert_merged(twin)
    for (name, a), (_, b) in zip(sk.sparse_layers(model), sk.sparse_layers(twin), strict=True):
        torch.testing.assert_close(a.sparse_delta, b.sparse_delta, rtol=1e-5, atol=1e-6, msg=name)
        assert a.sparse_delta.abs().sum() > 0, name


def test_state_dict_round_trip():
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    _trained(model, reselect=True)
    state = model.state_dict()
    fresh = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    fresh.load_state_dict(state)
    assert_merged(fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh(_tokens()), model(_tokens()))


def test_adapter_round_trip_and_merge_and_unload(tmp_path):
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    _trained(model)
    want = model(_tokens()).detach()
    path = tmp_path / "mixed.safetensors"
    sk.save_adapter(model, path, include_base=True)
    plain = _mixed()
    summary = sk.load_adapter(plain, path)
    assert sorted(summary["converted"]) == ["embed", "head", "temporal", "video"]
    assert isinstance(plain.video, SparseDeltaConv3d) and isinstance(plain.embed, SparseDeltaEmbedding)
    for name in ("embed", "temporal", "video", "head"):  # bit for bit: the same merged weights
        assert torch.equal(getattr(plain, name).weight, getattr(model, name).weight), name
    # (outputs up to rounding: torch may pick another conv kernel when the bias requires grad)
    torch.testing.assert_close(plain(_tokens()), want)
    merged = sk.merge_and_unload(plain)
    assert type(merged.embed) is nn.Embedding and type(merged.temporal) is nn.Conv1d
    assert type(merged.video) is nn.Conv3d and merged.embed.padding_idx == 0
    torch.testing.assert_close(merged(_tokens()), want)
    # to_dense gives the same plain layers
    for name in ("embed", "temporal", "video"):
        dense = getattr(model, name).to_dense()
        assert type(dense) is type(getattr(merged, name))
        assert torch.equal(dense.weight, getattr(merged, name).weight)


def test_reselect_and_casts_keep_the_invariant():
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    _trained(model, steps=4, reselect=True)
    assert any(layer.frozen_count for _, layer in sk.sparse_layers(model))
    assert_merged(model)
    before = model(_tokens()).detach()
    model.to(torch.bfloat16)
    for _, layer in sk.sparse_layers(model):
        assert layer.weight.dtype == torch.bfloat16 and layer.sparse_delta.dtype == torch.float32
    assert_merged(model)
    model.float()
    assert_merged(model)
    torch.testing.assert_close(model(_tokens()), before, rtol=2e-2, atol=2e-2)


def test_unbatched_inputs():
    for cls, (kwargs, shape) in ((SparseDeltaConv1d, CONV1D_CASES[3]), (SparseDeltaConv3d, CONV3D_CASES[3])):
        assert len(shape) == cls._dims + 1
        layer, twin, x, x_twin, y, y_twin, g = _compare_with_dense(cls, kwargs, shape, "cpu", "reference")
        assert y.shape == y_twin.shape and torch.equal(y, y_twin)
        torch.testing.assert_close(x.grad, x_twin.grad)
        torch.testing.assert_close(
            layer.sparse_delta.grad,
            twin.weight.grad.reshape(-1)[layer.sparse_index.long()],
            rtol=1e-5,
            atol=1e-5,
        )


def test_tied_embedding_and_output_projection_share_one_delta():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 5)
            self.out = nn.Linear(5, 11, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(torch.tanh(self.embed(tokens)))

    dense = _fill(Tied())
    twin = copy.deepcopy(dense)
    model = sk.apply_sara(dense, sk.SaRAConfig(fraction=0.4))
    assert model.embed.sparse_delta is model.out.sparse_delta
    tokens = _tokens() % 11
    model(tokens).square().sum().backward()
    twin(tokens).square().sum().backward()
    index = model.embed.sparse_index.long()
    torch.testing.assert_close(model.embed.sparse_delta.grad, twin.embed.weight.grad.reshape(-1)[index])


def test_autocast_matches_the_dense_layer():
    for cls, (kwargs, shape) in ((SparseDeltaConv1d, CONV1D_CASES[1]), (SparseDeltaConv3d, CONV3D_CASES[1])):
        dense = _fill(cls._dense_type(**kwargs))
        twin = copy.deepcopy(dense)
        layer = cls.from_dense(dense, k=20)
        x = _random(shape)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_twin = layer(x), twin(x)
        assert y.dtype == y_twin.dtype == torch.bfloat16
        assert torch.equal(y, y_twin)


# ---------------------------------------------------------------------------------------------
# apply_sara: switches, train_parameters, the summary of what stays frozen
# ---------------------------------------------------------------------------------------------
def test_convert_embeddings_switch():
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3, convert_embeddings=False))
    assert type(model.embed) is nn.Embedding and not model.embed.weight.requires_grad
    frozen = {(f.module_type, f.parameter): f.reason for f in model.sara_summary.frozen}
    assert "convert_embeddings=False" in frozen[("Embedding", "weight")]


def test_embeddings_with_max_norm_are_skipped_with_a_reason():
    model = _mixed()
    model.embed.max_norm = 1.0
    with pytest.warns(UserWarning, match="max_norm"):
        sk.apply_sara(model, sk.SaRAConfig(fraction=0.3))
    assert type(model.embed) is nn.Embedding
    assert "max_norm" in {s.name: s.reason for s in model.sara_summary.skipped}["embed"]


def test_train_parameters_are_trained_densely(tmp_path):
    model = _mixed()
    table = model.table
    model = sk.apply_sara(model, sk.SaRAConfig(fraction=0.3, train_parameters=["table"]))
    assert table.requires_grad and model.sara_summary.trained_parameters == [("table", 18)]
    params = sk.sparse_parameters(model)
    assert params[-1] is table and sum(p is table for p in params) == 1
    assert not any(f.parameter == "table" for f in model.sara_summary.frozen)
    assert "trained densely (train_parameters): 1 parameter(s), 18 values: table" in str(model.sara_summary)
    before = table.detach().clone()
    _trained(model, steps=2)
    assert not torch.equal(table, before)
    assert_merged(model)
    # a training state carries them (every trainable parameter); an adapter file does not
    sk.save_training_state(model, tmp_path / "state.safetensors")
    resumed = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3, train_parameters=["table"]))
    sk.load_training_state(resumed, tmp_path / "state.safetensors")
    assert torch.equal(resumed.table, table) and resumed.table.requires_grad


def test_train_parameters_bad_entries_change_nothing():
    model = _mixed()
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        sk.apply_sara(model, sk.SaRAConfig(train_parameters=["nope"]))
    with pytest.raises(ValueError, match="'embed.weight', the weight of a layer that apply_sara converts"):
        sk.apply_sara(model, sk.SaRAConfig(train_parameters=["*.weight"]))
    assert not list(sk.sparse_layers(model)) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="train_parameters must be a string or a list"):
        sk.SaRAConfig(train_parameters=[3])
    # the weight of a layer left out may be trained densely
    model = sk.apply_sara(
        model, sk.SaRAConfig(fraction=0.3, exclude_modules=["video"], train_parameters=["video.weight"])
    )
    assert model.video.weight.requires_grad and type(model.video) is nn.Conv3d


def test_a_large_frozen_share_warns_and_a_small_one_does_not():
    class Big(nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.table = nn.Parameter(torch.randn(rows, 8))
            self.act = nn.PReLU(8)

    with pytest.warns(UserWarning, match=r"stay frozen because SaRA cannot adapt them.*Big.table") as record:
        model = sk.apply_sara(Big(rows=4), sk.SaRAConfig(fraction=0.5))
    assert len(record) == 1
    frozen = {(f.module_type, f.parameter): f for f in model.sara_summary.frozen}
    assert frozen[("PReLU", "weight")].reason == "no sparse-delta layer for PReLU"
    assert frozen[("PReLU", "weight")].unsupported and frozen[("Big", "table")].unsupported
    assert not frozen[("Linear", "bias")].unsupported
    assert model.sara_summary.unsupported_share == pytest.approx((32 + 8) / (64 + 8 + 32 + 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        sk.apply_sara(small, sk.SaRAConfig(fraction=0.5))
        sk.apply_sara(Big(rows=4), sk.SaRAConfig(fraction=0.5, train_parameters=["table", "act.weight"]))


# ---------------------------------------------------------------------------------------------
# Tiny diffusers models (built from configs, no downloads)
# ---------------------------------------------------------------------------------------------
def _count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


def test_svd_unet_converts_every_conv3d():
    pytest.importorskip("diffusers")
    unet = build_tiny("svd")
    conv3d = _count(unet, nn.Conv3d)
    assert conv3d > 0
    sk.apply_sara(unet, sk.SaRAConfig(fraction=0.05))
    assert _count(unet, SparseDeltaConv3d) == conv3d == _count(unet, nn.Conv3d)
    assert sum(layer.kind == "conv3d" for layer in unet.sara_summary.layers) == conv3d
    assert _count(unet, (nn.Linear, nn.Conv2d, nn.Conv3d)) == len(unet.sara_summary.layers)
    # every Linear/ConvNd/Embedding is converted: only biases, norms and the AlphaBlenders' mix
    # factors stay frozen
    frozen = {(f.module_type, f.parameter) for f in unet.sara_summary.frozen}
    assert frozen <= {(t, "bias") for t in ("Linear", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")} | {
        ("GroupNorm", "weight"),
        ("LayerNorm", "weight"),
        ("AlphaBlender", "mix_factor"),
    }
    assert ("AlphaBlender", "mix_factor") in frozen
    # a training step reaches every Conv3d delta
    sample = torch.randn(1, 2, 4, 8, 8)
    out = unet(
        sample, 10, encoder_hidden_states=torch.randn(1, 1, 16), added_time_ids=torch.randn(1, 3)
    ).sample
    out.square().mean().backward()
    for name, layer in sk.sparse_layers(unet):
        if isinstance(layer, SparseDeltaConv3d) and layer.k:
            assert layer.sparse_delta.grad is not None and layer.sparse_delta.grad.abs().sum() > 0, name


def test_wan_transformer_patch_embedding_and_scale_shift_tables():
    pytest.importorskip("diffusers")
    wan = build_tiny("wan")
    sk.apply_sara(wan, sk.SaRAConfig(fraction=0.1))
    assert isinstance(wan.patch_embedding, SparseDeltaConv3d)
    tables = {
        (f.module_type, f.parameter): f for f in wan.sara_summary.frozen if f.parameter == "scale_shift_table"
    }
    assert tables[("WanTransformerBlock", "scale_shift_table")].count == 2
    assert tables[("WanTransformer3DModel", "scale_shift_table")].unsupported
    # trained densely instead
    wan = build_tiny("wan")
    sk.apply_sara(wan, sk.SaRAConfig(fraction=0.1, train_parameters=["scale_shift_table"]))
    names = [name for name, _ in wan.sara_summary.trained_parameters]
    assert names == ["scale_shift_table", "blocks.0.scale_shift_table", "blocks.1.scale_shift_table"]
    assert not any(f.parameter == "scale_shift_table" for f in wan.sara_summary.frozen)
    params = sk.sparse_parameters(wan)
    assert {id(wan.scale_shift_table), id(wan.blocks[1].scale_shift_table)} <= {id(p) for p in params}
    out = wan(torch.randn(1, 4, 2, 4, 4), torch.tensor([10]), torch.randn(1, 3, 16)).sample
    out.square().mean().backward()
    assert wan.patch_embedding.sparse_delta.grad.abs().sum() > 0
    assert wan.blocks[0].scale_shift_table.grad.abs().sum() > 0


def test_pixart_scale_shift_tables_by_pattern():
    pytest.importorskip("diffusers")
    pixart = build_tiny("pixart")
    linear_and_conv = _count(pixart, (nn.Linear, nn.Conv2d))
    sk.apply_sara(
        pixart, sk.SaRAConfig(fraction=0.1, train_parameters="transformer_blocks.*.scale_shift_table")
    )
    assert len(pixart.sara_summary.layers) == linear_and_conv
    assert [n for n, _ in pixart.sara_summary.trained_parameters] == [
        "transformer_blocks.0.scale_shift_table",
        "transformer_blocks.1.scale_shift_table",
    ]
    left = [f for f in pixart.sara_summary.frozen if f.parameter == "scale_shift_table"]
    assert [(f.module_type, f.count) for f in left] == [("PixArtTransformer2DModel", 1)]
    assert "PixArtTransformer2DModel.scale_shift_table x1" in str(pixart.sara_summary)


def test_unet1d_converts_every_conv1d_and_trains_it():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet1DModel(
        block_out_channels=(8, 8, 16, 16),
        in_channels=14,
        out_channels=14,
        time_embedding_type="positional",
        use_timestep_embedding=True,
        flip_sin_to_cos=False,
        freq_shift=1.0,
        out_block_type="OutConv1DBlock",
        mid_block_type="MidResTemporalBlock1D",
        down_block_types=("DownResnetBlock1D",) * 4,
        up_block_types=("UpResnetBlock1D",) * 3,
        act_fn="swish",
    )
    conv1d = _count(unet, nn.Conv1d)
    assert conv1d > 0
    sk.apply_sara(unet, sk.SaRAConfig(fraction=0.05))
    assert _count(unet, SparseDeltaConv1d) == conv1d
    assert sum(layer.kind == "conv1d" for layer in unet.sara_summary.layers) == conv1d
    unet(torch.randn(2, 14, 16), torch.tensor([3, 5])).sample.square().mean().backward()
    trained = [
        layer for _, layer in sk.sparse_layers(unet) if isinstance(layer, SparseDeltaConv1d) and layer.k
    ]
    assert trained and all(layer.sparse_delta.grad is not None for layer in trained)


def test_unet2d_class_embedding_is_converted():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        num_class_embeds=10,
    )
    unet = diffusers.UNet2DConditionModel(**config)
    sk.apply_sara(unet, sk.SaRAConfig(fraction=0.1))
    assert isinstance(unet.class_embedding, SparseDeltaEmbedding)
    assert "class_embedding" in {layer.name for layer in unet.sara_summary.layers}
    out = unet(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 3, 16), class_labels=torch.tensor([1, 7])).sample
    out.square().mean().backward()
    grad = unet.class_embedding.sparse_delta.grad
    rows = unet.class_embedding.sparse_index.long() // unet.class_embedding.embedding_dim
    assert grad[(rows == 1) | (rows == 7)].abs().sum() > 0 and not grad[(rows != 1) & (rows != 7)].any()
    unet = diffusers.UNet2DConditionModel(**config)
    sk.apply_sara(unet, sk.SaRAConfig(fraction=0.1, convert_embeddings=False))
    assert type(unet.class_embedding) is nn.Embedding


def test_torch_compile_matches_eager():
    model = sk.apply_sara(_mixed(), sk.SaRAConfig(fraction=0.3))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(_tokens()).square().mean().backward()
    twin(_tokens()).square().mean().backward()
    for (name, a), (_, b) in zip(sk.sparse_layers(model), sk.sparse_layers(twin), strict=True):
        torch.testing.assert_close(a.sparse_delta.grad, b.sparse_delta.grad, msg=name)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: torch.nn.Linear(7, 5), (3, 7)),
        (lambda: torch.nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
        (lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
        (lambda: torch.nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1)), (1, 2, 4, 5, 5)),
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d"],
)
def test_second_order_gradients_match_the_dense_layer(make, shape):
    """A gradient penalty (create_graph=True, then a gradient of the gradients) equals the dense
    layer's whose weight is base + scatter(delta): the penalty reaches delta through the weight
    and through delta's own gradient, and x through both."""
    dense = make()
    layer = sk.apply_sara(torch.nn.Sequential(dense), sk.SaRAConfig(fraction=0.3))[0]
    assert type(layer).__name__.startswith("SparseDelta")
    with torch.no_grad():
        layer.sparse_delta.copy_(_random(layer.sparse_delta.shape, scale=0.1))
    x = _random(shape).requires_grad_()
    gx, gd = torch.autograd.grad(layer(x).square().sum(), [x, layer.sparse_delta], create_graph=True)
    hx, hd = torch.autograd.grad(gx.square().sum() + gd.square().sum(), [x, layer.sparse_delta])

    index = layer.sparse_index.long()
    base = layer.weight.detach().clone().reshape(-1)
    base[index] = layer.sparse_base
    d2 = layer.sparse_delta.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    weight = base.index_add(0, index, d2).view(layer.weight.shape)
    bias = layer.bias.detach()
    forward = {
        torch.nn.Linear: lambda: F.linear(x2, weight, bias),
        torch.nn.Conv1d: lambda: F.conv1d(x2, weight, bias, layer.stride, layer.padding),
        torch.nn.Conv2d: lambda: F.conv2d(x2, weight, bias, layer.stride, layer.padding),
        torch.nn.Conv3d: lambda: F.conv3d(x2, weight, bias, layer.stride, layer.padding),
    }[type(dense)]
    gx2, gw2 = torch.autograd.grad(forward().square().sum(), [x2, weight], create_graph=True)
    gd2 = gw2.reshape(-1)[index]
    hx2, hd2 = torch.autograd.grad(gx2.square().sum() + gd2.square().sum(), [x2, d2])
    torch.testing.assert_close(gd.detach(), gd2.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hx, hx2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hd, hd2, rtol=1e-4, atol=1e-5)
    assert hd.abs().max() > 0 and hx.abs().max() > 0
