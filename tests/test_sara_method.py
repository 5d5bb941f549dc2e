"""The SaRA method around the sparse-delta layers: selection rules, module targeting, freezing,
the optimizer (against torch.optim.AdamW), resume, auto re-merge with plain optimizers, progressive
re-selection, and the errors for bad input."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread_per_module  # noqa: F401 (an autouse fixture)
from torch import nn

import sara_kernels as sk
from sara_kernels import _backend, _ops
from sara_kernels.nn import SparseDeltaConv2d, SparseDeltaLinear

# ---------------------------------------------------------------------------------------------
# A small model with the module kinds SaRA meets in a UNet: a conv, a norm, linears with and
# without bias, repeated blocks (for suffix / regex targeting).
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)

    def forward(self, h):
        return h + F.gelu(self.to_q(h)) * torch.tanh(self.to_k(h))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8 * 4 * 4, 32)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = F.gelu(self.norm(self.conv(x))).flatten(1)
        h = self.proj(h)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


DENSE_NAMES = ["conv", "proj", "blocks.0.to_q", "blocks.0.to_k", "blocks.1.to_q", "blocks.1.to_k", "head"]


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, generator=g)


def loss_of(model, x, y):
    return F.mse_loss(model(x), y)


def dense_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def native_cpu() -> bool:
    return _backend.native_available("cpu")


BACKENDS = ["reference"] + (["cpu"] if native_cpu() else [])


# ---------------------------------------------------------------------------------------------
# Selection rules
# ---------------------------------------------------------------------------------------------
THETA = 2.0**-6  # exactly representable: no fp32/fp64 ambiguity at the boundary


def test_threshold_selects_exactly_below_theta_per_layer():
    net = make_net()
    with torch.no_grad():  # entries exactly at +-theta must NOT be selected (strict <)
        net.proj.weight.view(-1)[:4] = torch.tensor([THETA, -THETA, THETA / 2, -THETA / 2])
    expected = {
        n: torch.nonzero(m.weight.detach().reshape(-1).abs() < THETA).flatten() for n, m in dense_layers(net)
    }
    assert sum(e.numel() for e in expected.values()) > 20
    sk.apply_sara(net, sk.SaRAConfig(threshold=THETA))
    for name, index in expected.items():
        layer = net.get_submodule(name)
        assert isinstance(layer, (SparseDeltaLinear, SparseDeltaConv2d))
        assert layer.sparse_index.dtype == torch.int32
        assert torch.equal(layer.sparse_index.long(), index), name
        assert torch.equal(layer.sparse_base, layer.weight.detach().reshape(-1)[index])
        assert layer.sparse_threshold == THETA
    proj_index = net.proj.sparse_index.tolist()
    assert 0 not in proj_index and 1 not in proj_index and 2 in proj_index and 3 in proj_index


def _quantized_net(step: float = 1 / 64) -> Net:
    """Magnitudes on a coarse grid: many exact ties (with both signs) at every magnitude."""
    net = make_net()
    with torch.no_grad():
        for _, m in dense_layers(net):
            m.weight.copy_(torch.round(m.weight / step) * step)
    return net


def _brute_force_global(net: Net, k: int, include_zeros: bool = True) -> dict[str, torch.Tensor]:
    """concat |w| over the layers (module order), stable sort, first k: ties go to the earlier
    layer, then the smaller index. Without ``include_zeros`` exact zeros sort last (never chosen)."""
    layers = dense_layers(net)
    mags = torch.cat([m.weight.detach().reshape(-1).abs() for _, m in layers])
    if not include_zeros:
        mags = torch.where(mags == 0, torch.full_like(mags, math.inf), mags)
    chosen = torch.sort(mags, stable=True).indices[:k]
    out, offset = {}, 0
    for name, m in layers:
        n = m.weight.numel()
        mine = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
        out[name] = torch.sort(mine).values
        offset += n
    return out


@pytest.mark.parametrize("include_zeros", [True, False])
@pytest.mark.parametrize("rule", ["count", "fraction"])
def test_global_budget_matches_brute_force_with_ties(rule, include_zeros):
    net = _quantized_net()
    mags = torch.cat([m.weight.detach().reshape(-1).abs() for _, m in dense_layers(net)])
    total = mags.numel()
    zeros = int((mags == 0).sum())
    ties = int((mags == 1 / 64).sum())
    assert zeros > 10 and ties > 10
    below = zeros if include_zeros else 0  # entries below the group of ties at 1/64
    if rule == "count":
        k = below + ties // 2  # the cut falls inside the group of ties at 1/64
        config = sk.SaRAConfig(count=k, include_zeros=include_zeros)
    else:
        fraction = (below + ties // 3) / total
        k = int(round(fraction * total))
        config = sk.SaRAConfig(fraction=fraction, include_zeros=include_zeros)
    assert below < k < below + ties
    expected = _brute_force_global(net, k, include_zeros)
    weights = {n: m.weight.detach().clone() for n, m in dense_layers(net)}
    sk.apply_sara(net, config)
    got = {n: net.get_submodule(n).sparse_index.long() for n in expected}
    assert sum(g.numel() for g in got.values()) == k == net.sara_summary.total_k
    # Tie-agnostic: exactly k entries, each selected |w| <= each unselected |w| (zeros aside).
    selected, rest = [], []
    for n, w in weights.items():
        flat = w.reshape(-1).abs()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[got[n]] = True
        selected.append(flat[mask])
        rest.append(flat[~mask] if include_zeros else flat[~mask & (flat != 0)])
    assert torch.cat(selected).max() <= torch.cat(rest).min()
    assert include_zeros or bool((torch.cat(selected) > 0).all())
    # And the documented deterministic tie-break (layer order, then index).
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    # The re-selection threshold keeps every selected entry, compared in fp32 as reselect_ does.
    for n in expected:
        layer = net.get_submodule(n)
        assert bool((weights[n].reshape(-1)[got[n]].abs() < layer.sparse_threshold).all()), n


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_budget_reselection_keeps_entries_at_the_cut(scope):
    """Right after a budget selection, an entry whose |w| sits exactly at the cut (many do on a
    quantized grid) is "still below" the threshold; only entries pushed out by their delta freeze."""
    net = sk.apply_sara(_quantized_net(), sk.SaRAConfig(fraction=0.1, budget_scope=scope))
    at_cut = sum(int((layer.sparse_base.abs() == 1 / 64).sum()) for _, layer in sk.sparse_layers(net))
    assert at_cut > 0
    with torch.no_grad():
        net.proj.sparse_delta[0] = 1.0  # "trained" out of the set
    summary = sk.reselect_(net)
    assert summary.frozen == 1 and summary.per_layer["proj"][1] == 1
    assert summary.kept == net.sara_summary.total_k - 1


def test_fraction_budget_on_random_weights_is_global_not_per_layer():
    net = make_net()
    layers = dense_layers(net)
    total = sum(m.weight.numel() for _, m in layers)
    k = int(round(0.05 * total))
    expected = _brute_force_global(net, k)
    sk.apply_sara(net, sk.SaRAConfig(fraction=0.05))
    counts = {n: net.get_submodule(n).k for n, _ in layers}
    assert sum(counts.values()) == k
    for n in expected:
        assert torch.equal(net.get_submodule(n).sparse_index.long(), expected[n])
    # global: the layers' densities differ (the conv has larger weights than proj)
    densities = [counts[n] / net.get_submodule(n).weight.numel() for n, _ in layers]
    assert max(densities) - min(densities) > 0.02


@pytest.mark.parametrize("include_zeros", [True, False])
@pytest.mark.parametrize("rule", [dict(fraction=0.1), dict(count=7)])
def test_per_layer_budget(rule, include_zeros):
    net = _quantized_net()
    expected = {}
    for n, m in dense_layers(net):
        numel = m.weight.numel()
        mags = m.weight.detach().reshape(-1).abs()
        available = numel if include_zeros else int((mags != 0).sum())
        k = int(round(rule["fraction"] * numel)) if "fraction" in rule else rule["count"]
        k = min(k, available)
        if not include_zeros:
            mags = torch.where(mags == 0, torch.full_like(mags, math.inf), mags)
        order = torch.sort(mags, stable=True).indices[:k]
        expected[n] = torch.sort(order).values
    assert any(int((m.weight == 0).sum()) for _, m in dense_layers(net))
    sk.apply_sara(net, sk.SaRAConfig(budget_scope="per_layer", include_zeros=include_zeros, **rule))
    for n, index in expected.items():
        layer = net.get_submodule(n)
        assert torch.equal(layer.sparse_index.long(), index), n
        # re-selection threshold: every selected entry is strictly below it
        assert layer.weight.detach().reshape(-1)[index].abs().max() < layer.sparse_threshold


# ---------------------------------------------------------------------------------------------
# Targeting, freezing, summary, module identity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, exclude, converted",
    [
        (["blocks.0.to_q"], None, ["blocks.0.to_q"]),  # full name
        ("to_q", None, ["blocks.0.to_q", "blocks.1.to_q"]),  # suffix, a plain string
        (
            [r"blocks\.\d+\.to_(q|k)"],
            None,
            ["blocks.0.to_q", "blocks.0.to_k", "blocks.1.to_q", "blocks.1.to_k"],
        ),
        (None, ["head", r"blocks\.1\..*"], ["conv", "proj", "blocks.0.to_q", "blocks.0.to_k"]),
        (["proj", "to_k"], ["blocks.1.to_k"], ["proj", "blocks.0.to_k"]),
    ],
)
def test_target_and_exclude_modules(target, exclude, converted):
    net = make_net()
    sk.apply_sara(net, sk.SaRAConfig(fraction=0.05, target_modules=target, exclude_modules=exclude))
    got = [n for n, _ in sk.sparse_layers(net)]
    assert got == converted
    for n, m in dense_layers(net):
        assert isinstance(m, SparseDeltaLinear | SparseDeltaConv2d) == (n in converted), n
    assert [layer.name for layer in net.sara_summary.layers] == converted


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_freezing_only_deltas_require_grad():
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    deltas = sorted(f"{n}.sparse_delta" for n in DENSE_NAMES)
    assert _trainable(net) == deltas
    assert [id(p) for p in sk.sparse_parameters(net)] == [
        id(net.get_submodule(n).sparse_delta) for n in DENSE_NAMES
    ]
    for layer in (net.get_submodule(n) for n in DENSE_NAMES):
        assert layer.sparse_delta.dtype == torch.float32 and not layer.sparse_delta.any()
        assert "sparse_index" in dict(layer.named_buffers()) and "sparse_base" in dict(layer.named_buffers())


def test_train_bias_and_train_norm_options():
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05, train_bias=True))
    trainable = set(_trainable(net))
    for n in DENSE_NAMES:
        if net.get_submodule(n).bias is not None:
            assert f"{n}.bias" in trainable
        assert f"{n}.weight" not in trainable
    assert "blocks.0.to_k.bias" not in dict(net.named_parameters())
    assert "norm.weight" not in trainable

    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05, train_norm=True))
    trainable = set(_trainable(net))
    assert {"norm.weight", "norm.bias"} <= trainable
    assert not any(n.endswith("bias") and not n.startswith("norm") for n in trainable)


def test_trainable_bias_and_norm_follow_torch_adamw():
    """With train_bias/train_norm, SparseAdamW over all trainable tensors (deltas fused, the rest
    plain AdamW) follows torch.optim.AdamW bit for bit (reference kernels)."""
    config = sk.SaRAConfig(fraction=0.05, train_bias=True, train_norm=True)
    a = sk.apply_sara(make_net(), config)
    b = sk.apply_sara(make_net(), copy.deepcopy(config))
    x, y = batch()
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    assert len(pa) > len(sk.sparse_parameters(a))
    opt_a = sk.SparseAdamW(pa, lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(pb, lr=1e-2, weight_decay=0.1, foreach=False)
    bias_before = a.head.bias.detach().clone()
    with sk.use_backend("reference"):
        for _ in range(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                opt.step()
    for p, q in zip(pa, pb, strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a.head.bias, bias_before)


def test_summary_numbers():
    net = make_net()
    n_params = sum(p.numel() for p in net.parameters())
    numels = {n: m.weight.numel() for n, m in dense_layers(net)}
    sk.apply_sara(net, sk.SaRAConfig(threshold=0.02))
    s = net.sara_summary
    assert net.sara_config.threshold == 2e-2
    assert (
        s.total_k
        == sum(net.get_submodule(n).k for n in DENSE_NAMES)
        == sum(p.numel() for p in sk.sparse_parameters(net))
    )
    assert s.targeted_entries == sum(numels.values())
    assert s.model_parameters == n_params
    assert s.threshold == 2e-2
    assert s.share_of_targeted == pytest.approx(s.total_k / sum(numels.values()))
    assert s.share_of_model == pytest.approx(s.total_k / n_params)
    assert [(layer.name, layer.kind, layer.numel, layer.k) for layer in s.layers] == [
        (n, "conv2d" if n == "conv" else "linear", numels[n], net.get_submodule(n).k) for n in DENSE_NAMES
    ]
    assert s.layers[0].shape == (8, 3, 3, 3)
    text = str(s)
    assert f"total: {s.total_k} trainable entries" in text and "blocks.1.to_k" in text


def test_isinstance_and_weight_storage_reused():
    net = make_net()
    before = {n: (m.weight, m.weight.data_ptr(), m.bias) for n, m in dense_layers(net)}
    sk.apply_sara(net, sk.SaRAConfig(fraction=0.05))
    for n, (weight, ptr, bias) in before.items():
        m = net.get_submodule(n)
        assert isinstance(m, nn.Conv2d if n == "conv" else nn.Linear)
        assert isinstance(m, SparseDeltaConv2d if n == "conv" else SparseDeltaLinear)
        assert m.weight is weight and m.weight.data_ptr() == ptr and not m.weight.requires_grad
        assert m.bias is bias


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------
def _two_group_optimizer(cls, params, **kw):
    return cls([{"params": params[:3], "lr": 2e-2}, {"params": params[3:]}], lr=5e-3, weight_decay=0.05, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_adamw_matches_torch_adamw_with_groups_and_scheduler(backend):
    """Same trajectory as torch.optim.AdamW on the deltas (which relies on the layers' re-merge):
    bit for bit with the reference kernels; the native fused kernel uses the CPU's sqrt, not
    MKL's, so it agrees to ~1e-7 relative per step."""
    a = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    b = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    pa, pb = sk.sparse_parameters(a), sk.sparse_parameters(b)
    opt_a = _two_group_optimizer(sk.SparseAdamW, pa)
    opt_b = _two_group_optimizer(torch.optim.AdamW, pb, foreach=False)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    x, y = batch()
    losses = []
    with sk.use_backend(backend):
        for _ in range(6):
            for model, opt, sched in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                opt.step()
                sched.step()
            losses.append(loss.item())
            for p, q in zip(pa, pb, strict=True):
                if backend == "reference":
                    assert torch.equal(p, q)
                else:
                    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert opt_a.param_groups[0]["lr"] == pytest.approx(2e-2 / 8)
        assert opt_a.param_groups[1]["lr"] == pytest.approx(5e-3 / 8)
        b(x)  # the torch.optim.AdamW model re-merges here
        for n in DENSE_NAMES:
            la, lb = a.get_submodule(n), b.get_submodule(n)
            if backend == "reference":
                assert torch.equal(la.weight, lb.weight)
            else:
                torch.testing.assert_close(la.weight, lb.weight, rtol=1e-5, atol=1e-7)
    assert losses[-1] < losses[0]
    assert all(p.abs().max() > 1e-3 for p in pa)  # every group moved


def _snapshot(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_optimizer_state_dict_resume_is_bit_identical():
    x, y = batch()

    def train(model, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
            sched.step()

    def fresh():
        model = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
        opt = _two_group_optimizer(sk.SparseAdamW, sk.sparse_parameters(model))
        return model, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    straight = fresh()
    train(*straight, 6)

    first = fresh()
    train(*first, 3)
    checkpoint = _snapshot(
        {"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}
    )
    del first
    resumed = fresh()
    loaded = torch.load(io.BytesIO(checkpoint))
    resumed[0].load_state_dict(loaded["model"])
    resumed[1].load_state_dict(loaded["opt"])
    resumed[2].load_state_dict(loaded["sched"])
    train(*resumed, 3)

    for p, q in zip(sk.sparse_parameters(straight[0]), sk.sparse_parameters(resumed[0]), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(straight[1].state[p]["exp_avg_sq"], resumed[1].state[q]["exp_avg_sq"])
        assert float(resumed[1].state[q]["step"]) == 6
    for n in DENSE_NAMES:
        assert torch.equal(straight[0].get_submodule(n).weight, resumed[0].get_submodule(n).weight)


def test_zero_grad():
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    opt = sk.SparseAdamW(sk.sparse_parameters(net), lr=1e-3)
    x, y = batch()
    loss_of(net, x, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sk.sparse_parameters(net))
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in sk.sparse_parameters(net))
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in net.parameters())


def _assert_merged(model):
    """The layer invariant: weight[index[j]] == base[j] + delta[j] (+ the frozen delta in the frozen
    slots j >= k, whose trainable delta is exactly 0)."""
    for n, layer in sk.sparse_layers(model):
        k = layer.k
        idx = layer.sparse_index.long()
        total = layer.sparse_delta.detach().clone()
        assert not total[k:].any(), n
        total[k:] += layer.sparse_frozen_delta
        expected = (layer.sparse_base.float() + total).to(layer.weight.dtype)
        assert torch.equal(layer.weight.detach().reshape(-1)[idx], expected), n


def _trainable_count(model) -> int:
    return sum(layer.k for _, layer in sk.sparse_layers(model))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        # fused kernels update the parameter without bumping its version counter
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    ],
    ids=["SGD", "SGD-fused", "AdamW", "AdamW-foreach", "AdamW-fused"],
)
def test_plain_torch_optimizers_auto_remerge(make_opt):
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    opt = make_opt(sk.sparse_parameters(net))
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(net, x, y)
        _assert_merged(net)  # after the forward: weight == base + delta at the index
        # the forward used the merged weight: same output as a dense layer holding it
        twin = copy.deepcopy(net)
        for n, layer in list(sk.sparse_layers(twin)):
            parent, _, child = n.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, layer.to_dense())
        torch.testing.assert_close(loss, loss_of(twin, x, y), rtol=0, atol=0)
        loss.backward()
        opt.step()
        # merged right after step(): a state_dict() / save_pretrained() here is current
        _assert_merged(net)
        for n, layer in sk.sparse_layers(net):
            saved = net.state_dict()[f"{n}.weight"].reshape(-1)[layer.sparse_index.long()]
            assert torch.equal(saved, layer.sparse_base + layer.sparse_delta.detach()), n
    assert any(p.abs().max() > 0 for p in sk.sparse_parameters(net))
    assert loss_of(net, x, y) < loss  # training works


def test_sparse_adamw_keeps_weight_merged_without_remerge(monkeypatch):
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    opt = sk.SparseAdamW(sk.sparse_parameters(net), lr=1e-2)
    x, y = batch()
    merges = []
    for cls in (SparseDeltaLinear, SparseDeltaConv2d):
        monkeypatch.setattr(
            cls, "merge_", lambda self, _orig=cls.merge_: (merges.append(self), _orig(self))[1]
        )
    for _ in range(3):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
        _assert_merged(net)  # written by the fused step itself, before any forward
    assert merges == []
    sgd = torch.optim.SGD(sk.sparse_parameters(net), lr=0.1)
    sgd.step()
    loss_of(net, x, y)
    assert len(merges) == len(DENSE_NAMES)  # a plain optimizer step: each layer re-merges once
    _assert_merged(net)


def _train_steps(net, opt, steps=4):
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_adamw_foreach_and_per_layer_calls_agree_bitwise(backend):
    """foreach (one sparse_adamw_multi_ call for all layers) and foreach=False (one sparse_adamw_
    per layer) run the same arithmetic: same deltas, moments, merged weights and step counts, with
    a trainable non-sparse parameter (plain AdamW) in the same group."""
    nets, opts = [], []
    for foreach in (None, False):
        net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
        net.norm.weight.requires_grad_(True)
        params = sk.sparse_parameters(net) + [net.norm.weight]
        nets.append(net)
        opts.append(
            sk.SparseAdamW([{"params": params[:3], "lr": 2e-2}, {"params": params[3:]}], foreach=foreach)
        )
    with sk.use_backend(backend):
        for net, opt in zip(nets, opts, strict=True):
            _train_steps(net, opt)
        if backend != "reference":
            assert _ops.last_backend["sparse_adamw_multi_"] == backend
    for n in DENSE_NAMES:
        la, lb = nets[0].get_submodule(n), nets[1].get_submodule(n)
        assert torch.equal(la.sparse_delta, lb.sparse_delta)
        assert torch.equal(la.weight, lb.weight)
        assert la.sparse_delta.abs().max() > 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opts[0].state[la.sparse_delta][key], opts[1].state[lb.sparse_delta][key])
        assert opts[0].state[la.sparse_delta]["step"] == 4.0
    assert torch.equal(nets[0].norm.weight, nets[1].norm.weight)
    _assert_merged(nets[0])


def test_sparse_adamw_tied_weights_step_one_layer_at_a_time():
    # Two layers sharing one weight cannot go into one multi-tensor call (it refuses a weight that
    # appears twice); the optimizer steps them one by one, as foreach=False does.
    def tied():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
        model[1].weight = model[0].weight
        return sk.apply_sara(model, sk.SaRAConfig(fraction=0.2))

    models = [tied(), tied()]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    for model, foreach in zip(models, (None, False), strict=True):
        opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=1e-2, foreach=foreach)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert models[0][0].weight.data_ptr() == models[0][1].weight.data_ptr()
    assert torch.equal(models[0][0].weight, models[1][0].weight)
    for a, b in zip(sk.sparse_parameters(models[0]), sk.sparse_parameters(models[1]), strict=True):
        assert torch.equal(a, b) and a.abs().max() > 0


def test_sparse_adamw_resumes_from_a_checkpoint_with_tensor_steps():
    # Checkpoints that hold the step count as a tensor (torch.optim's convention) still load; the
    # count continues as a Python float.
    straight_net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    straight = sk.SparseAdamW(sk.sparse_parameters(straight_net), lr=1e-2)
    _train_steps(straight_net, straight, 5)
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    opt = sk.SparseAdamW(sk.sparse_parameters(net), lr=1e-2)
    _train_steps(net, opt, 2)
    checkpoint = opt.state_dict()
    for state in checkpoint["state"].values():
        assert isinstance(state["step"], float)
        state["step"] = torch.tensor(state["step"])
    resumed = sk.SparseAdamW(sk.sparse_parameters(net), lr=1e-2)
    resumed.load_state_dict(checkpoint)
    _train_steps(net, resumed, 3)
    for p, q in zip(sk.sparse_parameters(straight_net), sk.sparse_parameters(net), strict=True):
        assert torch.equal(p, q)
        assert resumed.state[q]["step"] == 5.0 and isinstance(resumed.state[q]["step"], float)


def test_sparse_adamw_rejects_bad_foreach():
    with pytest.raises(ValueError, match="foreach must be None, True or False"):
        sk.SparseAdamW([nn.Parameter(torch.zeros(3))], foreach="yes")


def test_paper_learning_rate():
    assert sk.paper_learning_rate(2e-3) == pytest.approx(4.97e-4, rel=2e-3)
    assert sk.paper_learning_rate(2e-3) == pytest.approx(1e-3 * math.exp(-0.7), rel=1e-12)
    assert sk.paper_learning_rate(1e-2) < sk.paper_learning_rate(1e-3)


# ---------------------------------------------------------------------------------------------
# Progressive re-selection
# ---------------------------------------------------------------------------------------------
def _trained(theta=0.02, steps=6, lr=5e-3, reset_on_reselect=False):
    net = sk.apply_sara(make_net(), sk.SaRAConfig(threshold=theta, reset_state_on_reselect=reset_on_reselect))
    opt = sk.SparseAdamW(sk.sparse_parameters(net), lr=lr, weight_decay=0.0)
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
    return net, opt, x, y


def test_reselect_survivors_frozen_moments_and_adapter():
    theta = 0.02
    net, opt, x, y = _trained(theta)
    before = {}
    for n, layer in sk.sparse_layers(net):
        d = layer.sparse_delta
        before[n] = dict(
            index=layer.sparse_index.clone(),
            base=layer.sparse_base.clone(),
            delta=d.detach().clone(),
            exp_avg=opt.state[d]["exp_avg"].clone(),
            exp_avg_sq=opt.state[d]["exp_avg_sq"].clone(),
            step=float(opt.state[d]["step"]),
            adapter=[t.clone() for t in layer.adapter_state()],
            param=d,
        )
    summary = sk.reselect_(net, opt)
    assert summary.kept > 0 and summary.frozen > 0  # the test exercises both outcomes
    assert summary.kept + summary.frozen == sum(b["index"].numel() for b in before.values())
    for n, layer in sk.sparse_layers(net):
        b = before[n]
        keep = (b["base"].float() + b["delta"]).abs() < theta
        assert summary.per_layer[n] == (int(keep.sum()), int((~keep).sum()))
        assert layer.sparse_delta is b["param"]  # identity kept: the optimizer still holds it
        k = layer.k
        # Shapes unchanged; the survivors fill the first k slots, the frozen entries the rest.
        assert layer.sparse_delta.shape == b["delta"].shape and layer.adapted_count == b["index"].numel()
        assert torch.equal(layer.sparse_index[:k], b["index"][keep])
        assert torch.equal(layer.sparse_base[:k], b["base"][keep])
        assert torch.equal(layer.sparse_delta.detach()[:k], b["delta"][keep])
        assert not layer.sparse_delta.detach()[k:].any()
        assert torch.equal(layer.sparse_frozen_index, b["index"][~keep])
        assert torch.equal(layer.sparse_frozen_delta, b["delta"][~keep])
        assert torch.equal(layer.sparse_frozen_base, b["base"][~keep])
        flat = layer.weight.detach().reshape(-1)
        frozen_idx = b["index"][~keep].long()
        assert torch.equal(flat[frozen_idx], b["base"][~keep] + b["delta"][~keep])  # frozen stay merged
        for got, want in zip(layer.adapter_state(), b["adapter"], strict=True):  # the union, sorted
            assert torch.equal(got, want)
        state = opt.state[layer.sparse_delta]
        assert torch.equal(state["exp_avg"][:k], b["exp_avg"][keep]) and not state["exp_avg"][k:].any()
        assert (
            torch.equal(state["exp_avg_sq"][:k], b["exp_avg_sq"][keep]) and not state["exp_avg_sq"][k:].any()
        )
        assert float(state["step"]) == b["step"]
        grad = layer.sparse_delta.grad
        assert grad is None or not grad[k:].any()

    # training continues: grads are the dense gradient at the surviving entries
    frozen_values = {
        n: layer.weight.detach().reshape(-1)[layer.sparse_frozen_index.long()].clone()
        for n, layer in sk.sparse_layers(net)
    }
    twin = copy.deepcopy(net)
    for n, layer in list(sk.sparse_layers(twin)):
        dense = layer.to_dense()
        parent, _, child = n.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, dense)
    loss_of(twin, x, y).backward()
    opt.zero_grad()
    loss_of(net, x, y).backward()
    for n, layer in sk.sparse_layers(net):
        k = layer.k
        dense_grad = twin.get_submodule(n).weight.grad.reshape(-1)[layer.sparse_index[:k].long()]
        torch.testing.assert_close(layer.sparse_delta.grad[:k], dense_grad, rtol=1e-4, atol=1e-6)
        assert not layer.sparse_delta.grad[k:].any()  # no gradient reaches the frozen entries
    survivors_before = [p.detach().clone() for p in sk.sparse_parameters(net)]
    opt.step()
    for _ in range(2):
        opt.zero_grad()
        loss = loss_of(net, x, y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert any(
        not torch.equal(a, p) for a, p in zip(survivors_before, sk.sparse_parameters(net), strict=True)
    )
    _assert_merged(net)
    for n, layer in sk.sparse_layers(net):
        assert torch.equal(
            layer.weight.detach().reshape(-1)[layer.sparse_frozen_index.long()], frozen_values[n]
        )


def test_reselect_warns_when_it_freezes_almost_everything():
    # Learning rate far above the threshold: one stage moves (nearly) every entry past it.
    net, opt, _, _ = _trained(theta=0.02, steps=6, lr=0.2)
    with pytest.warns(
        UserWarning, match=r"reselect_: only \d+ of \d+ trained entries .*paper_learning_rate"
    ) as record:
        summary = sk.reselect_(net, opt)
    assert summary.kept < sk.sara.RESELECT_WARN_SHARE * (summary.kept + summary.frozen)
    assert f"the other {summary.frozen} are frozen" in str(record[0].message)
    # A re-selection that keeps most entries says nothing.
    net, opt, _, _ = _trained(theta=0.02, steps=2, lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = sk.reselect_(net, opt)
    assert summary.kept >= sk.sara.RESELECT_WARN_SHARE * (summary.kept + summary.frozen)


@pytest.mark.parametrize("via", ["argument", "config"])
def test_reselect_reset_state(via):
    net, opt, x, y = _trained(reset_on_reselect=(via == "config"))
    if via == "argument":
        sk.reselect_(net, opt, reset_state=True)
    else:
        sk.reselect_(net, opt)
    for p in sk.sparse_parameters(net):
        state = opt.state[p]
        assert (
            state["exp_avg"].shape == p.shape and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        )
        assert float(state["step"]) == 0
    opt.zero_grad()
    loss_of(net, x, y).backward()
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in sk.sparse_parameters(net))
    assert all(torch.isfinite(p).all() for p in sk.sparse_parameters(net))
    _assert_merged(net)


def test_reselect_twice_keeps_union():
    net, opt, x, y = _trained(steps=4)
    adapter0 = {n: [t.clone() for t in layer.adapter_state()] for n, layer in sk.sparse_layers(net)}
    sk.reselect_(net, opt)
    for _ in range(4):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
    sk.reselect_(net, opt, threshold=0.01)  # tighter: more freeze
    for n, layer in sk.sparse_layers(net):
        index, delta, base = layer.adapter_state()
        assert torch.equal(index, adapter0[n][0]) and torch.equal(base, adapter0[n][2])
        assert bool((torch.diff(layer.sparse_frozen_index.long()) > 0).all())
        assert layer.sparse_frozen_index.numel() + layer.k == adapter0[n][0].numel()


@pytest.mark.parametrize("at, total, expected", [(0.5, 10, 5), (3, None, 3), (None, 8, 4)])
def test_progressive_reselection_triggers_at_the_right_step(at, total, expected):
    net = sk.apply_sara(make_net(), sk.SaRAConfig(threshold=0.02))
    opt = sk.SparseAdamW(sk.sparse_parameters(net), lr=5e-3, weight_decay=0.0)
    progressive = sk.ProgressiveReselection(net, opt, total_steps=total, at=at)
    assert progressive.at == expected
    x, y = batch()
    fired = []
    k_before = net.sara_summary.total_k
    for step in range(1, 9):
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()
        k_now = _trainable_count(net)
        assert k_now == k_before  # nothing happens before step()
        if progressive.step():
            fired.append(step)
            assert progressive.summary is not None
            assert _trainable_count(net) == progressive.summary.kept < k_before
        else:
            assert (progressive.summary is None) == (step < expected)
        k_before = _trainable_count(net)
    assert fired == [expected]


def test_progressive_reselection_from_config():
    net = sk.apply_sara(make_net(), sk.SaRAConfig(threshold=0.02, progressive_at=0.25))
    opt = sk.SparseAdamW(sk.sparse_parameters(net))
    assert sk.ProgressiveReselection(net, opt, total_steps=20).at == 5
    net = sk.apply_sara(make_net(), sk.SaRAConfig(threshold=0.02, progressive_at=7))
    assert sk.ProgressiveReselection(net, None).at == 7


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, error, words",
    [
        ("2e-3", TypeError, "threshold must be a number"),
        (True, TypeError, "threshold must be a number"),
        (-1e-3, ValueError, "positive"),
        (0.0, ValueError, "positive"),
        (float("nan"), ValueError, "positive finite"),
        (float("inf"), ValueError, "positive finite"),
    ],
)
def test_bad_threshold(value, error, words):
    with pytest.raises(error, match=words):
        sk.SaRAConfig(threshold=value)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_out_of_range(value):
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        sk.SaRAConfig(fraction=value)


@pytest.mark.parametrize("value", [0, -5])
def test_count_not_positive(value):
    with pytest.raises(ValueError, match="count must be positive"):
        sk.SaRAConfig(count=value)


def test_count_wrong_type_and_too_large():
    with pytest.raises(TypeError, match="count must be an int"):
        sk.SaRAConfig(count=2.5)
    net = make_net()
    total = sum(m.weight.numel() for _, m in dense_layers(net))
    with pytest.raises(ValueError, match=f"exceeds the {total} selectable entries"):
        sk.apply_sara(net, sk.SaRAConfig(count=total + 1))
    assert not list(sk.sparse_layers(net))  # nothing converted


def test_two_rules_at_once():
    with pytest.raises(ValueError, match="give one of threshold, fraction or count.*threshold, fraction"):
        sk.SaRAConfig(threshold=1e-3, fraction=0.1)
    with pytest.raises(ValueError, match="fraction, count"):
        sk.SaRAConfig(fraction=0.1, count=3)


def test_target_modules_matching_nothing():
    net = make_net()
    with pytest.raises(
        ValueError,
        match=r"target_modules \['to_v'\] match no nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d or "
        r"nn.Embedding",
    ):
        sk.apply_sara(net, sk.SaRAConfig(target_modules=["to_v"]))
    assert not list(sk.sparse_layers(net)) and all(p.requires_grad for p in net.parameters())


def test_threshold_selecting_nothing_reports_threshold_and_smallest_weight():
    net = make_net()
    smallest = min(float(m.weight.detach().abs().min()) for _, m in dense_layers(net))
    theta = smallest / 3
    with pytest.raises(ValueError, match="selects no entry") as info:
        sk.apply_sara(net, sk.SaRAConfig(threshold=theta))
    numbers = [float(s) for s in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", str(info.value))]
    assert any(math.isclose(v, theta, rel_tol=1e-5) for v in numbers), str(info.value)
    assert any(math.isclose(v, smallest, rel_tol=1e-5) for v in numbers), str(info.value)
    assert not list(sk.sparse_layers(net)) and all(p.requires_grad for p in net.parameters())


def test_apply_sara_twice():
    net = sk.apply_sara(make_net(), sk.SaRAConfig(fraction=0.05))
    with pytest.raises(ValueError, match="already a sparse-delta layer"):
        sk.apply_sara(net, sk.SaRAConfig(fraction=0.05))


def test_reselect_before_training():
    net = sk.apply_sara(make_net(), sk.SaRAConfig(threshold=0.02))
    opt = sk.SparseAdamW(sk.sparse_parameters(net))
    with pytest.raises(RuntimeError, match="no delta has changed from 0 yet"):
        sk.reselect_(net, opt)
    with pytest.raises(ValueError, match="no sparse-delta layer"):
        sk.reselect_(make_net())


def test_sparse_adamw_rejects_non_fp32():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"must be fp32.*bfloat16"):
        sk.SparseAdamW([p])
    with pytest.raises(TypeError, match="fp32"):
        sk.SparseAdamW(
            [{"params": [nn.Parameter(torch.zeros(3))]}, {"params": [nn.Parameter(torch.zeros(2).half())]}]
        )


def test_from_dense_wrong_module():
    with pytest.raises(TypeError, match="expected nn.Linear, got Conv2d"):
        SparseDeltaLinear.from_dense(nn.Conv2d(2, 2, 1), threshold=0.1)
    with pytest.raises(TypeError, match="expected nn.Conv2d, got Linear"):
        SparseDeltaConv2d.from_dense(nn.Linear(2, 2), threshold=0.1)
    with pytest.raises(TypeError, match="expected nn.Linear, got GroupNorm"):
        SparseDeltaLinear.from_dense(nn.GroupNorm(1, 2), k=1)
