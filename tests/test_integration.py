"""SaRA training works with the rest of the PyTorch / diffusers stack: gradient accumulation,
gradient clipping, autocast, gradient checkpointing, torch.compile, DDP and accelerate, a diffusers
UNet end to end (train, merge, save/load, adapters), and the training memory scales with k."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_MODELS,
    load_module,
    one_thread_per_module,  # noqa: F401 (an autouse fixture)
    run_workers,
)
from torch import nn

import sara_kernels as sk
from sara_kernels.nn import SparseDeltaConv2d, SparseDeltaLinear

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = F.gelu(self.norm(self.conv(x))).flatten(1)
        h = F.gelu(self.fc1(h))
        return self.head(h + torch.tanh(self.fc2(h)))


def make_net(fraction: float = 0.1, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return sk.apply_sara(Net(), sk.SaRAConfig(fraction=fraction))


def batch(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, generator=g)


def deltas(model):
    return sk.sparse_parameters(model)


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every sparse-delta layer replaced by a plain layer holding the
    merged weight, trainable (its weight gradient is the dense one)."""
    twin = copy.deepcopy(model)
    for name, layer in list(sk.sparse_layers(twin)):
        dense = layer.to_dense()
        dense.weight.requires_grad_(True)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, dense)
    return twin


def train_steps(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------------------------------
# 1. Gradient accumulation
# ---------------------------------------------------------------------------------------------
def test_gradient_accumulation_equals_one_big_batch():
    x, y = batch(12)
    acc, big = make_net(), make_net()
    for xs, ys in zip(x.chunk(3), y.chunk(3), strict=True):
        (F.mse_loss(acc(xs), ys) / 3).backward()  # accumulates into .grad
    F.mse_loss(big(x), y).backward()
    for p, q in zip(deltas(acc), deltas(big), strict=True):
        assert p.grad.abs().max() > 1e-4
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)
    opts = [sk.SparseAdamW(deltas(m), lr=1e-3) for m in (acc, big)]
    for opt in opts:
        opt.step()
    for p, q in zip(deltas(acc), deltas(big), strict=True):
        assert p.abs().max() > 5e-4  # moved
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for (_, la), (_, lb) in zip(sk.sparse_layers(acc), sk.sparse_layers(big), strict=True):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. Gradient clipping
# ---------------------------------------------------------------------------------------------
def test_clip_grad_norm_clips_the_deltas():
    x, y = batch()
    a, b = make_net(), make_net()
    for m in (a, b):
        F.mse_loss(m(x), y).backward()
    norm_before = torch.linalg.vector_norm(torch.cat([p.grad for p in deltas(a)]))
    max_norm = float(norm_before) / 4
    total = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm)  # frozen weights included
    torch.nn.utils.clip_grad_norm_(deltas(b), max_norm)  # the deltas only
    torch.testing.assert_close(total, norm_before)
    norm_after = torch.linalg.vector_norm(torch.cat([p.grad for p in deltas(a)]))
    assert float(norm_after) == pytest.approx(max_norm, rel=1e-5)
    for p, q in zip(deltas(a), deltas(b), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    # Below the limit nothing changes.
    before = [p.grad.clone() for p in deltas(a)]
    torch.nn.utils.clip_grad_norm_(a.parameters(), 10 * max_norm)
    assert all(torch.equal(p.grad, g) for p, g in zip(deltas(a), before, strict=True))


# ---------------------------------------------------------------------------------------------
# 3. Autocast
# ---------------------------------------------------------------------------------------------
def test_autocast_bf16_matches_dense_model():
    model = make_net()
    x, y = batch()
    opt = sk.SparseAdamW(deltas(model), lr=1e-2)
    train_steps(model, opt, x, y, 2)  # non-zero, merged deltas
    opt.zero_grad()
    twin = dense_twin(model)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xa)
        ref = twin(xb)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    assert xa.grad.dtype == torch.float32
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    for name, layer in sk.sparse_layers(model):
        grad = layer.sparse_delta.grad
        assert grad is not None and grad.dtype == torch.float32 and layer.weight.grad is None
        dense = twin.get_submodule(name).weight.grad.reshape(-1)[layer.sparse_index.long()]
        # The sampled gradient accumulates the bf16 products in fp32; the dense one is rounded to bf16.
        torch.testing.assert_close(grad, dense.float(), rtol=2e-2, atol=2e-2 * float(dense.abs().max()))
    # the fp32 parameters are still fp32 and the optimizer steps on them
    sk.SparseAdamW(deltas(model), lr=1e-3).step()
    assert all(p.dtype == torch.float32 for p in deltas(model))


# ---------------------------------------------------------------------------------------------
# Tiny diffusers UNet
# ---------------------------------------------------------------------------------------------
#: The SD1.5-style tiny UNet with wider attention (32 context channels, heads of 8).
UNET_CONFIG = dict(
    TINY_MODELS["sd15_unet"][1], in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=8
)
TYPICAL_ABS_W = 0.03  # with theta = 2e-3 about 3-4% of a uniform-ish weight is selected


@pytest.fixture(scope="module")
def unet_state():
    """Pre-trained weights of the tiny UNet, rescaled so that the paper's theta selects a few %."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(TYPICAL_ABS_W / m.weight.abs().mean())
    return {k: v.clone() for k, v in unet.state_dict().items()}


def make_unet(state, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(state)
    return unet if dtype == torch.float32 else unet.to(dtype)


def unet_batch(n=2, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    cond = torch.randn(n, 5, 32, generator=g)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    return latents.to(dtype), noise.to(dtype), cond.to(dtype), timesteps


# ---------------------------------------------------------------------------------------------
# 4. Gradient checkpointing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_unet(unet_state, reentrant):
    latents, noise, cond, t = unet_batch()
    grads, calls = [], []
    for checkpointing in (False, True):
        unet = sk.apply_sara(make_unet(unet_state), sk.SaRAConfig(threshold=2e-3))
        unet.train()
        if checkpointing:
            if reentrant:
                unet.enable_gradient_checkpointing(
                    lambda module, *args: torch.utils.checkpoint.checkpoint(
                        module.__call__, *args, use_reentrant=True
                    )
                )
            else:
                unet.enable_gradient_checkpointing()
        count = [0]
        layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
        assert isinstance(layer, SparseDeltaConv2d)
        layer.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        out = unet(latents, t, cond).sample
        F.mse_loss(out, noise).backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block really ran its forward again in backward
    plain, ckpt = grads
    assert sorted(plain) == sorted(ckpt) and all(n.endswith("sparse_delta") for n in plain)
    assert len(plain) == len(list(sk.sparse_layers(unet)))
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-8)
    assert any(g.abs().max() > 0 for g in plain.values())


# ---------------------------------------------------------------------------------------------
# 5. torch.compile
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    base = MLP()
    eager = sk.apply_sara(copy.deepcopy(base), sk.SaRAConfig(fraction=0.1))
    model = sk.apply_sara(copy.deepcopy(base), sk.SaRAConfig(fraction=0.1))
    compiled = torch.compile(model, fullgraph=True)  # a graph break is an error
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)

    def step(m, opt=None):
        if opt is not None:
            opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
        return loss

    torch.testing.assert_close(step(compiled), step(eager), rtol=1e-6, atol=1e-7)
    for p, q in zip(deltas(model), deltas(eager), strict=True):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)

    opt_c, opt_e = sk.SparseAdamW(deltas(model), lr=1e-2), sk.SparseAdamW(deltas(eager), lr=1e-2)
    opt_c.step(), opt_e.step()
    for _ in range(3):
        torch.testing.assert_close(step(compiled, opt_c), step(eager, opt_e), rtol=1e-5, atol=1e-6)
    for p, q in zip(deltas(model), deltas(eager), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for (_, la), (_, lb) in zip(sk.sparse_layers(model), sk.sparse_layers(eager), strict=True):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-5, atol=1e-6)

    # A plain optimizer does not write the weight: the compiled forward must merge by itself.
    before = eager(x).detach()
    sgd_c, sgd_e = torch.optim.SGD(deltas(model), lr=0.5), torch.optim.SGD(deltas(eager), lr=0.5)
    sgd_c.step(), sgd_e.step()
    after = eager(x).detach()
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(compiled(x).detach(), after, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before + 1  # no recompilation

    # After progressive re-selection and unmerge_, the compiled forward merges the frozen entries too.
    summaries = [sk.reselect_(m, opt, threshold=0.05) for m, opt in ((model, opt_c), (eager, opt_e))]
    assert summaries[0].frozen == summaries[1].frozen > 0 and summaries[0].kept > 0
    for m in (model, eager):
        for _, layer in sk.sparse_layers(m):
            layer.unmerge_()
    torch.testing.assert_close(step(compiled, opt_c), step(eager, opt_e), rtol=1e-5, atol=1e-6)
    for p, q in zip(deltas(model), deltas(eager), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(x).detach(), eager(x).detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 6. DDP and accelerate (2 CPU processes, gloo)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reselect", [False, True], ids=["plain", "reselect"])
@pytest.mark.parametrize("mode", ["ddp", "accelerate"])
def test_distributed_data_parallel(mode, reselect, tmp_path):
    """Two ranks train one model; with ``reselect``, progressive re-selection half-way through,
    without rebuilding the DDP wrapper or the optimizer: the ranks stay bit-identical and follow
    the single-process run on the whole batch."""
    if mode == "accelerate":
        pytest.importorskip("accelerate")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = run_workers("ddp_worker.py", mode, tmp_path, *(["--reselect"] if reselect else []))

    worker = load_module("sara_ddp_worker", os.path.join(HERE, "ddp_worker.py"))
    reference = worker.build_model()
    opt = sk.SparseAdamW(sk.sparse_parameters(reference), lr=worker.LR)
    x, y = worker.make_batch()
    _, summary = worker.train_with_reselection(reference, opt, x, y, reselect)
    if reselect:  # both outcomes happen, and on every rank the same way
        assert summary["kept"] > 0 and summary["frozen"] > 0
        assert all(r["kept"] == summary["kept"] and r["frozen"] == summary["frozen"] for r in ranks)

    names = worker.delta_names(reference)
    assert len(names) == 3
    for r, result in enumerate(ranks):
        assert result["world"] == 2
        # DDP registers (and all-reduces) exactly the trainable parameters: the deltas
        assert result["trainable"] == result["delta_names"] == names
        assert result["with_grad"] == names  # no dense gradient on any rank
        for name, layer in sk.sparse_layers(reference):
            key = f"{name}.sparse_delta"
            assert torch.equal(result["deltas"][key], ranks[0]["deltas"][key]), (r, key)
            assert torch.equal(result["weights"][name], ranks[0]["weights"][name]), (r, name)
            assert layer.total_delta().abs().max() > 1e-2  # trained
            torch.testing.assert_close(
                result["deltas"][key], layer.sparse_delta.detach(), rtol=1e-6, atol=1e-6
            )
            torch.testing.assert_close(result["weights"][name], layer.weight.detach(), rtol=1e-6, atol=1e-6)
    k = sum(p.numel() for p in sk.sparse_parameters(reference))
    if mode == "ddp":
        if ranks[0]["reducer_bytes"] is not None:  # what the DDP reducer buckets: k fp32 entries
            assert ranks[0]["reducer_bytes"] == 4 * k and ranks[0]["reducer_tensors"] == 3
    else:
        assert ranks[0]["distributed_type"].endswith("MULTI_CPU")
        assert ranks[0]["wrapped_in_ddp"] and ranks[0]["same_module"]
        assert {ranks[0]["rank"], ranks[1]["rank"]} == {0, 1}


# ---------------------------------------------------------------------------------------------
# 7. diffusers end to end
# ---------------------------------------------------------------------------------------------
def test_diffusers_unet_end_to_end(unet_state, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = sk.apply_sara(make_unet(unet_state), sk.SaRAConfig(threshold=2e-3))
    share = unet.sara_summary.share_of_targeted
    assert 0.01 < share < 0.10, share
    assert any(isinstance(m, SparseDeltaLinear) for m in unet.modules())
    assert any(isinstance(m, SparseDeltaConv2d) for m in unet.modules())

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    latents, noise, cond, t = unet_batch(n=2)
    noisy = scheduler.add_noise(latents, noise, t)
    opt = sk.SparseAdamW(sk.sparse_parameters(unet), lr=sk.paper_learning_rate(2e-3) * 20)
    unet.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.mse_loss(unet(noisy, t, cond).sample, noise).item())
    assert losses[-1] < losses[0] * 0.99, losses
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses

    unet.eval()
    with torch.no_grad():
        reference = unet(noisy, t, cond).sample

    adapter = pytest.importorskip("sara_kernels.adapter")
    # Adapter round trip into a fresh base UNet.
    path = tmp_path / "unet_sara.safetensors"
    adapter.save_adapter(unet, path)
    fresh = make_unet(unet_state).eval()
    info = adapter.load_adapter(fresh, path)
    assert info["entries"] == unet.sara_summary.total_k
    with torch.no_grad():
        assert torch.equal(fresh(noisy, t, cond).sample, reference)

    # merge_and_unload -> save_pretrained -> from_pretrained of a plain UNet.
    merged = adapter.merge_and_unload(unet)
    assert not list(sk.sparse_layers(merged))
    merged.save_pretrained(tmp_path / "merged")
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, (SparseDeltaLinear, SparseDeltaConv2d)) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(merged(noisy, t, cond).sample, reference)
        assert torch.equal(loaded(noisy, t, cond).sample, reference)
        base = make_unet(unet_state).eval()
        assert not torch.equal(base(noisy, t, cond).sample, reference)  # the adapter matters


# ---------------------------------------------------------------------------------------------
# 8. Memory scales with k
# ---------------------------------------------------------------------------------------------
def _storage_bytes(tensors, seen) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _frozen_model_bytes(model, exclude=()) -> int:
    skip = {id(t) for t in exclude}
    tensors = [p for p in model.parameters() if id(p) not in skip] + [
        b for b in model.buffers() if id(b) not in skip
    ]
    return _storage_bytes(tensors, set())


def training_state(model, opt) -> dict:
    """Bytes held for training beyond the frozen model, each storage counted once."""
    seen: set[int] = set()
    layers = [layer for _, layer in sk.sparse_layers(model)]
    buffers = []
    for layer in layers:
        buffers += [layer.sparse_index, layer.sparse_base, layer.sparse_frozen_delta]
    state_tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    scalars = [v for v in state_tensors if v.dim() == 0]
    return {
        "deltas": _storage_bytes([layer.sparse_delta for layer in layers], seen),
        "grads": _storage_bytes([p.grad for p in model.parameters()], seen),
        "optimizer_scalars": _storage_bytes(scalars, seen),
        "optimizer": _storage_bytes(state_tensors, seen),
        "buffers": _storage_bytes(buffers, seen),
        "k": sum(layer.k for layer in layers),
        "layers": len(layers),
    }


@pytest.mark.parametrize(
    "dtype, per_entry", [(torch.float32, 24), (torch.bfloat16, 22)], ids=["fp32", "bf16"]
)
def test_training_memory_scales_with_k(unet_state, dtype, per_entry):
    unet = make_unet(unet_state, dtype)
    frozen_before = _frozen_model_bytes(unet)
    ptrs = {n: m.weight.data_ptr() for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    sk.apply_sara(unet, sk.SaRAConfig(threshold=2e-3))
    layers = [layer for _, layer in sk.sparse_layers(unet)]
    assert {n: layer.weight.data_ptr() for n, layer in sk.sparse_layers(unet)} == {
        n: ptrs[n] for n, _ in sk.sparse_layers(unet)
    }
    extra = [layer.sparse_delta for layer in layers]
    for layer in layers:
        extra += [layer.sparse_index, layer.sparse_base, layer.sparse_frozen_delta]
    assert _frozen_model_bytes(unet, exclude=extra) == frozen_before  # no weight copy anywhere

    latents, noise, cond, t = unet_batch(dtype=dtype)
    opt = sk.SparseAdamW(sk.sparse_parameters(unet), lr=1e-3)
    unet.train()
    loss = F.mse_loss(unet(latents, t, cond).sample.float(), noise.float())
    loss.backward()
    # no dense gradient anywhere: only the deltas have a .grad
    with_grad = [n for n, p in unet.named_parameters() if p.grad is not None]
    assert with_grad == [f"{n}.sparse_delta" for n, _ in sk.sparse_layers(unet)]
    opt.step()

    state = training_state(unet, opt)
    k = state["k"]
    assert k == unet.sara_summary.total_k and k > 1000
    assert state["optimizer_scalars"] == 0  # the step count per delta is a Python float, no tensor
    assert all(isinstance(s["step"], float) for s in opt.state.values())
    per_k = state["deltas"] + state["grads"] + state["optimizer"] + state["buffers"]
    total = per_k + state["optimizer_scalars"]
    assert per_k == per_entry * k, state
    assert total <= per_entry * k + 4 * state["layers"]
    assert state["deltas"] == 4 * k and state["grads"] == 4 * k and state["optimizer"] == 8 * k
    assert state["buffers"] == (4 + torch.tensor([], dtype=dtype).element_size()) * k
