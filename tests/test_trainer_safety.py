"""What real training scripts do to SaRA layers, and that none of it goes silently wrong: EMA,
checkpoint and resume (after re-selection too, in a fresh process), dense state dicts, writes
through ``.data``, dtype casts, shared weights and modules, layers whose weight is read outside
their forward, exact zeros, an atomic ``apply_sara``, unbatched and channels_last convolutions,
pickling. (DDP across re-selection: ``test_integration.py::test_distributed_data_parallel``; plain
optimizers and ``state_dict()`` right after ``step()``: ``test_sara_method.py``.)"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ConvNet
from torch import nn

import sara_kernels as sk
from sara_kernels.nn import SparseDeltaConv2d, SparseDeltaLinear, SparseStateWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(6, 20, 5)


CONFIG = dict(fraction=0.1)
LR = 2e-3  # re-selection after 4 steps keeps about 2/3 of the entries


def sara_net(seed: int = 0, **config) -> ConvNet:
    return sk.apply_sara(base_net(seed), sk.SaRAConfig(**(config or CONFIG)))


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, generator=g)


def train(model, opt, steps: int, ema=None, progressive=None, data=None):
    x, y = data or batch()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.step(model.parameters())
        if progressive is not None:
            progressive.step()


def assert_merged(model):
    """weight[index[j]] == base[j] + delta[j] (+ the frozen delta in the frozen slots, whose
    trainable delta is 0)."""
    for n, layer in sk.sparse_layers(model):
        k = layer.k
        total = layer.sparse_delta.detach().clone()
        assert not total[k:].any(), n
        total[k:] += layer.sparse_frozen_delta
        expected = (layer.sparse_base.float() + total).to(layer.weight.dtype)
        assert torch.equal(layer.weight.detach().reshape(-1)[layer.sparse_index.long()], expected), n


def dense_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for name, layer in list(sk.sparse_layers(twin)):
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, layer.to_dense())
    return twin


def trained_with_reselection(seed: int = 0):
    """A model trained 4 steps, re-selected (both outcomes occur), trained 2 more."""
    model = sara_net(seed)
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    train(model, opt, 4)
    summary = sk.reselect_(model, opt)
    assert summary.kept > 0 and summary.frozen > 0
    train(model, opt, 2)
    return model, opt


# ---------------------------------------------------------------------------------------------
# 1. EMA of the deltas
# ---------------------------------------------------------------------------------------------
def test_sparse_ema_follows_the_diffusers_schedule_and_stays_k_sized():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    model = sara_net(train_bias=True, **CONFIG)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = sk.SparseAdamW(params, lr=1e-2)
    ema = sk.SparseEMA(model, decay=0.95, update_after_step=1)
    # The same schedule on the same tensors with diffusers' EMAModel (over the trainable ones only).
    reference = EMAModel(params, decay=0.95, update_after_step=1)
    assert diffusers is not None
    for _ in range(6):
        train(model, opt, 1)
        ema.step(model.parameters())
        reference.step(params)
    assert ema.optimization_step == reference.optimization_step == 6
    assert ema.cur_decay_value == reference.cur_decay_value
    shadows = dict(zip([id(p) for p in params], reference.shadow_params, strict=True))
    for name, layer in sk.sparse_layers(model):
        torch.testing.assert_close(ema.shadow[name], shadows[id(layer.sparse_delta)], rtol=1e-6, atol=1e-8)
    for name, p in ema._params:
        torch.testing.assert_close(ema.shadow_params[name], shadows[id(p)], rtol=1e-6, atol=1e-8)
    n = sum(layer.adapted_count for _, layer in sk.sparse_layers(model))
    delta_bytes = sum(s.numel() * s.element_size() for s in ema.shadow.values())
    assert delta_bytes == 4 * n  # 4 bytes per adapted entry (the frozen dense weights are not copied)
    ema.store()
    stored = sum(s.numel() * s.element_size() for s in ema._stored["layers"].values())
    assert delta_bytes + stored <= 8 * n
    ema.restore()


def test_sparse_ema_validation_uses_the_ema_weights_and_restores_bit_for_bit():
    model = sara_net()
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    ema = sk.SparseEMA(model, decay=0.8)
    train(model, opt, 5, ema=ema)
    x, _ = batch()
    weights = {n: layer.weight.detach().clone() for n, layer in sk.sparse_layers(model)}
    deltas = {n: layer.sparse_delta.detach().clone() for n, layer in sk.sparse_layers(model)}
    training_out = model(x).detach()
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    for n, layer in sk.sparse_layers(model):
        want = (layer.sparse_base.float() + ema.shadow[n]).to(layer.weight.dtype)
        assert torch.equal(layer.weight.detach().reshape(-1)[layer.sparse_index.long()], want), n
        assert not torch.equal(layer.weight, weights[n]), n
    ema_out = model(x).detach()
    assert torch.equal(ema_out, dense_twin(model)(x).detach())
    assert not torch.equal(ema_out, training_out)
    ema.restore(model.parameters())
    for n, layer in sk.sparse_layers(model):
        assert torch.equal(layer.weight, weights[n]) and torch.equal(layer.sparse_delta, deltas[n]), n
    assert torch.equal(model(x).detach(), training_out)
    train(model, opt, 1, ema=ema)  # training continues from the restored state
    with pytest.raises(RuntimeError, match="nothing stored"):
        ema.restore()
    # diffusers' --offload_ema calls: to(device, non_blocking=True) (and pin_memory on CUDA)
    assert ema.to(device="cpu", non_blocking=True) is ema
    if torch.cuda.is_available():
        ema.pin_memory()
        assert all(s.is_pinned() for s in ema.shadow.values())


def test_sparse_ema_follows_reselection_and_round_trips(tmp_path):
    model = sara_net()
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    ema = sk.SparseEMA(model, decay=0.7)
    train(model, opt, 4, ema=ema)

    def by_entry(layer, values):  # the average of each flat entry, whatever the slot order
        order = torch.argsort(layer.sparse_index)
        return layer.sparse_index[order], values[order]

    before = {n: by_entry(layer, ema.shadow[n]) for n, layer in sk.sparse_layers(model)}
    summary = sk.reselect_(model, opt)
    assert summary.frozen > 0
    for n, layer in sk.sparse_layers(model):
        index, values = by_entry(layer, ema.shadow[n])
        assert torch.equal(index, before[n][0]) and torch.equal(values, before[n][1]), n
    train(model, opt, 2, ema=ema)
    ema.copy_to()
    assert_merged(model)
    ema.save(tmp_path / "ema.safetensors")
    other = sara_net()
    restored = sk.SparseEMA(other)
    sk.load_training_state(other, _save_state(model, tmp_path))
    restored.load(tmp_path / "ema.safetensors")
    assert restored.optimization_step == ema.optimization_step and restored.decay == ema.decay
    for n in ema.shadow:
        assert torch.equal(restored.shadow[n], ema.shadow[n]), n
    # An EMA state of another selection is refused, nothing changed.
    stranger = sk.SparseEMA(sara_net(fraction=0.2))
    with pytest.raises(sk.ema.EMAStateError, match="must be fp32|other entries"):
        stranger.load(tmp_path / "ema.safetensors")
    with pytest.raises(ValueError, match="not those of the model"):
        ema.step(sara_net().parameters())


def _save_state(model, tmp_path) -> str:
    path = str(tmp_path / "state.safetensors")
    sk.save_training_state(model, path)
    return path


# ---------------------------------------------------------------------------------------------
# 2 + 3. Checkpoint and resume, after re-selection too
# ---------------------------------------------------------------------------------------------
def test_resume_after_reselection_is_bit_exact(tmp_path):
    """The uninterrupted run against: checkpoint (model state dict, optimizer, EMA, re-selection
    schedule) after re-selection, a new model converted the same way, load, continue."""
    model = sara_net()
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    ema = sk.SparseEMA(model, decay=0.9)
    progressive = sk.ProgressiveReselection(model, opt, total_steps=10, at=3)
    train(model, opt, 5, ema=ema, progressive=progressive)
    assert progressive.summary is not None and progressive.summary.frozen > 0
    checkpoint = {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "ema": copy.deepcopy(ema.state_dict()),
        "progressive": progressive.state_dict(),
    }
    train(model, opt, 4, ema=ema, progressive=progressive)

    resumed = sara_net()
    r_opt = sk.SparseAdamW(sk.sparse_parameters(resumed), lr=LR)
    r_ema = sk.SparseEMA(resumed, decay=0.9)
    r_progressive = sk.ProgressiveReselection(resumed, r_opt, total_steps=10, at=3)
    resumed.load_state_dict(checkpoint["model"])  # strict: every key fits, after re-selection too
    r_opt.load_state_dict(checkpoint["optimizer"])
    r_ema.load_state_dict(checkpoint["ema"])
    r_progressive.load_state_dict(checkpoint["progressive"])
    assert sum(layer.frozen_count for _, layer in sk.sparse_layers(resumed)) == progressive.summary.frozen
    train(resumed, r_opt, 4, ema=r_ema, progressive=r_progressive)
    for (n, a), (_, b) in zip(sk.sparse_layers(model), sk.sparse_layers(resumed), strict=True):
        for name in ("weight", "sparse_index", "sparse_base", "sparse_delta", "sparse_frozen_delta"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (n, name)
        assert torch.equal(ema.shadow[n], r_ema.shadow[n]), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a.sparse_delta][key], r_opt.state[b.sparse_delta][key]), n


_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import sara_kernels as sk
    from test_trainer_safety import LR, sara_net, train
    checkpoint = torch.load({path!r})
    model = sara_net()
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert sum(layer.frozen_count for _, layer in sk.sparse_layers(model)) > 0
    train(model, opt, 3)
    torch.save({{n: layer.weight.detach().clone() for n, layer in sk.sparse_layers(model)}}, {out!r})
    """
)


def test_state_dict_round_trips_in_a_fresh_process(tmp_path):
    model, opt = trained_with_reselection()
    path, out = str(tmp_path / "checkpoint.pt"), str(tmp_path / "weights.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    train(model, opt, 3)
    code = _FRESH_PROCESS.format(tests=os.path.join(ROOT, "tests"), path=path, out=out)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = torch.load(out)
    for n, layer in sk.sparse_layers(model):
        assert torch.equal(weights[n], layer.weight), n


def test_a_dense_state_dict_converts_into_the_deltas():
    """diffusers' load hook loads a plain (merged) UNet's state dict into the SaRA model: the deltas
    are recovered, not lost (they used to come back 0 under the merged weights)."""
    model, _ = trained_with_reselection()
    dense = sk.merge_and_unload(copy.deepcopy(model)).state_dict()
    assert not any("sparse" in key for key in dense)
    fresh = sara_net()
    with pytest.warns(SparseStateWarning, match="dense state dict"):
        fresh.load_state_dict(dense)  # strict: the sparse keys are not missing
    x, _ = batch()
    for n, layer in sk.sparse_layers(fresh):
        trained = model.get_submodule(n)
        assert torch.equal(layer.weight, trained.weight), n
        (index, got, _), (want_index, want, _) = layer.adapter_state(), trained.adapter_state()
        assert torch.equal(index, want_index), n
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # fp32 weights: within rounding
    assert_merged(fresh)
    assert torch.equal(fresh(x), model(x))
    opt = sk.SparseAdamW(sk.sparse_parameters(fresh), lr=1e-2)
    train(fresh, opt, 1)  # the next step starts from the trained weights, not from the base
    for n, layer in sk.sparse_layers(fresh):
        assert (layer.weight - base_net().get_submodule(n).weight).abs().max() > 0, n
    # The base model's own state dict resets the deltas to 0, with no warning.
    reset = copy.deepcopy(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reset.load_state_dict(base_net().state_dict())
    assert all(not layer.total_delta().any() for _, layer in sk.sparse_layers(reset))


def test_a_dense_state_dict_of_another_model_is_refused():
    model = sara_net()
    weights = {n: layer.weight.detach().clone() for n, layer in sk.sparse_layers(model)}
    with pytest.raises(
        RuntimeError, match=r"fc1'.*differs from this layer's pre-trained weight at \d+ entries outside"
    ):
        model.load_state_dict(base_net(seed=7).state_dict())
    for n, layer in sk.sparse_layers(model):
        assert torch.equal(layer.weight, weights[n]), n


def test_a_sara_state_of_another_base_model_is_refused(tmp_path):
    per_layer = dict(fraction=0.1, budget_scope="per_layer")  # the same counts on any base
    model = sara_net(**per_layer)
    train(model, sk.SparseAdamW(sk.sparse_parameters(model), lr=LR), 2)
    path = _save_state(model, tmp_path)
    other = sara_net(seed=7, **per_layer)
    weights = {n: layer.weight.detach().clone() for n, layer in sk.sparse_layers(other)}
    with pytest.raises(
        sk.training_state.TrainingStateError,
        match="nothing was loaded: .*'conv': the checkpoint's pre-trained values",
    ):
        sk.load_training_state(other, path)
    for n, layer in sk.sparse_layers(other):
        assert torch.equal(layer.weight, weights[n]) and not layer.sparse_delta.any(), n
    path = _save_state(trained_with_reselection()[0], tmp_path)
    smaller = sara_net(fraction=0.05)
    with pytest.raises(
        sk.training_state.TrainingStateError, match=r"the checkpoint adapts \d+ entries but this layer \d+"
    ):
        sk.load_training_state(smaller, path)


def test_training_state_file(tmp_path):
    model = sara_net(train_bias=True, **CONFIG)
    opt = sk.SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train(model, opt, 3)
    sk.reselect_(model, opt)
    path = _save_state(model, tmp_path)
    tensors, metadata = sk.training_state.read_training_state(path)
    assert "fc1.weight" not in tensors and "fc1.bias" in tensors and "fc1.sparse_delta" in tensors
    assert metadata["format"] == "sara_kernels.training_state" and "sara_config" in metadata
    fresh = sara_net(train_bias=True, **CONFIG)
    sk.load_training_state(fresh, path)
    assert torch.equal(fresh.fc1.bias, model.fc1.bias)
    for (n, a), (_, b) in zip(sk.sparse_layers(model), sk.sparse_layers(fresh), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.sparse_index, b.sparse_index), n
    with pytest.raises(sk.training_state.TrainingStateError, match="missing"):
        sk.load_training_state(sara_net(), path)  # no trainable biases there: unexpected keys
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(sk.training_state.TrainingStateError, match="corrupted"):
        sk.load_training_state(fresh, broken)


def test_state_dict_of_the_layout_before_fixed_slots_loads():
    """State dicts written before re-selection kept fixed slots (trainable and frozen entries in
    separate tensors) load into the current layout."""
    model, _ = trained_with_reselection()
    legacy = {}
    for key, value in model.state_dict().items():
        legacy[key] = value
    for n, layer in sk.sparse_layers(model):
        k = layer.k
        legacy[f"{n}.sparse_index"] = layer.sparse_index[:k].clone()
        legacy[f"{n}.sparse_base"] = layer.sparse_base[:k].clone()
        legacy[f"{n}.sparse_delta"] = layer.sparse_delta.detach()[:k].clone()
        legacy[f"{n}.sparse_frozen_index"] = layer.sparse_index[k:].clone()
        legacy[f"{n}.sparse_frozen_base"] = layer.sparse_base[k:].clone()
    fresh = sara_net()
    fresh.load_state_dict(legacy)
    for (n, a), (_, b) in zip(sk.sparse_layers(model), sk.sparse_layers(fresh), strict=True):
        assert torch.equal(a.weight, b.weight) and b.frozen_count == a.frozen_count, n
        for got, want in zip(b.adapter_state(), a.adapter_state(), strict=True):
            assert torch.equal(got, want), n


# ---------------------------------------------------------------------------------------------
# 5. Writes through .data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["data.copy_", "data assignment", "data then add_"])
def test_writes_through_data_reach_the_next_forward_and_state_dict(route):
    model = sara_net()
    layer = model.fc1
    new = torch.randn(layer.adapted_count, generator=torch.Generator().manual_seed(3)) * 1e-2
    if route == "data.copy_":
        layer.sparse_delta.data.copy_(new)  # diffusers' EMAModel.copy_to / restore
    elif route == "data assignment":
        layer.sparse_delta.data = new.clone()
    else:
        data = layer.sparse_delta.data
        data.add_(new)
    saved = model.state_dict()["fc1.weight"].reshape(-1)[layer.sparse_index.long()]
    assert torch.equal(saved, layer.sparse_base + new)
    x, _ = batch()
    assert torch.equal(model(x), dense_twin(model)(x))
    assert_merged(model)


# ---------------------------------------------------------------------------------------------
# 7. Dtype casts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cast, dtype",
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.to("cpu", torch.float16), torch.float16),
    ],
    ids=["to(bf16)", "half", "bfloat16", "to(cpu, fp16)"],
)
def test_dtype_casts_keep_the_deltas_fp32(cast, dtype):
    model, opt = trained_with_reselection()
    deltas = {n: layer.sparse_delta.detach().clone() for n, layer in sk.sparse_layers(model)}
    frozen = {n: layer.sparse_frozen_delta.clone() for n, layer in sk.sparse_layers(model)}
    grads = {n: layer.sparse_delta.grad.clone() for n, layer in sk.sparse_layers(model)}
    base32 = {n: layer.sparse_base.clone() for n, layer in sk.sparse_layers(model)}
    assert cast(model) is model
    for n, layer in sk.sparse_layers(model):
        assert layer.weight.dtype == layer.sparse_base.dtype == dtype, n
        assert layer.sparse_delta.dtype == layer.sparse_frozen_delta.dtype == torch.float32, n
        assert torch.equal(layer.sparse_delta, deltas[n]) and torch.equal(
            layer.sparse_frozen_delta, frozen[n]
        ), n
        assert layer.sparse_delta.grad.dtype == torch.float32 and torch.equal(
            layer.sparse_delta.grad, grads[n]
        )
        assert torch.equal(layer.sparse_base, base32[n].to(dtype)), n
    assert_merged(model)  # the invariant holds exactly in the new dtype
    x, y = batch()
    with torch.autocast("cpu", dtype=dtype):
        F.mse_loss(model(x.to(dtype)).float(), y).backward()
    opt.step()  # SparseAdamW keeps working on the cast model
    assert_merged(model)
    plain = torch.optim.AdamW(sk.sparse_parameters(model), lr=1e-3)
    plain.step()
    assert all(layer.sparse_delta.dtype == torch.float32 for _, layer in sk.sparse_layers(model))
    assert_merged(model)
    model.float()
    assert all(layer.weight.dtype == torch.float32 for _, layer in sk.sparse_layers(model))
    assert_merged(model)


# ---------------------------------------------------------------------------------------------
# 8. Sharing: tied weights, a module under two names, a replaced weight
# ---------------------------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # one weight, two modules (and two biases)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


@pytest.mark.parametrize("optimizer", ["SparseAdamW", "AdamW"])
def test_modules_sharing_a_weight_share_one_delta(optimizer):
    model = sk.apply_sara(Tied(), sk.SaRAConfig(fraction=0.2))
    assert isinstance(model.a, SparseDeltaLinear) and isinstance(model.b, SparseDeltaLinear)
    assert model.a.sparse_delta is model.b.sparse_delta and model.a.weight is model.b.weight
    assert sk.sparse_parameters(model) == [model.a.sparse_delta]
    assert model.sara_summary.total_k == model.a.k and model.sara_summary.layers[1].shares_with == "a"
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    twin = Tied()  # dense twin: the shared weight's gradient is the sum over both uses
    twin.a.weight.requires_grad_(True)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    torch.testing.assert_close(
        model.a.sparse_delta.grad,
        twin.a.weight.grad.reshape(-1)[model.a.sparse_index.long()],
        rtol=1e-5,
        atol=1e-6,
    )
    cls = sk.SparseAdamW if optimizer == "SparseAdamW" else torch.optim.AdamW
    opt = cls(sk.sparse_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        model(x).square().sum().backward()
    assert_merged(model)
    assert model.a.sparse_delta.abs().max() > 0
    summary = sk.reselect_(model, opt, threshold=float(model.a.sparse_base.abs().max()))
    assert model.a.frozen_count == model.b.frozen_count == summary.frozen
    assert model.a.sparse_frozen_delta is model.b.sparse_frozen_delta
    assert_merged(model)


def test_a_module_under_two_names_is_converted_once_and_used_everywhere():
    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.first = nn.Linear(8, 8)
            self.again = self.first  # the same module, reached under a second name
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.again(F.gelu(self.first(x))))

    model = sk.apply_sara(TwoNames(), sk.SaRAConfig(fraction=0.3))
    assert isinstance(model.first, SparseDeltaLinear) and model.again is model.first
    entry = next(s for s in model.sara_summary.layers if s.name == "first")
    assert entry.aliases == ("again",)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    twin = TwoNames()
    twin.first.weight.requires_grad_(True)
    model(x).sum().backward()
    twin(x).sum().backward()
    torch.testing.assert_close(
        model.first.sparse_delta.grad,
        twin.first.weight.grad.reshape(-1)[model.first.sparse_index.long()],
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_replaced_or_resized_weight_is_an_error_naming_the_layer():
    model = sara_net()
    with pytest.raises(RuntimeError, match="SparseDeltaLinear 'fc1': cannot assign a new weight"):
        model.fc1.weight = nn.Parameter(torch.zeros(20, 96))
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=1e-2)
    train(model, opt, 1)
    model.fc2.weight.data = torch.zeros(5, 30)  # resized under the layer
    x, _ = batch()
    with pytest.raises(RuntimeError, match="SparseDeltaLinear 'fc2': its weight changed shape"):
        model(x)
    with pytest.raises(RuntimeError, match="'fc2': its weight changed shape"):
        opt.step()  # never a write at the old index into the new weight
    other = sara_net()
    other.fc1._parameters["weight"] = nn.Parameter(torch.zeros(20, 96), requires_grad=False)  # behind setattr
    with pytest.raises(RuntimeError, match="'fc1': its weight was replaced"):
        other(x)


# ---------------------------------------------------------------------------------------------
# 9. Layers that cannot be trained this way
# ---------------------------------------------------------------------------------------------
class Pooling(nn.Module):
    """Weights read outside the layers' forward, like HunyuanDiT's attention pooling."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.c_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = x.permute(1, 0, 2)
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=8, num_heads=2,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False,
        )  # fmt: skip
        return self.head(out[0])


class LoRALinear(nn.Linear):
    """A subclass with its own forward (like diffusers' LoRACompatibleLinear carrying a LoRA)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down, self.up = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x):
        return super().forward(x) + self.up(self.down(x))


def test_layers_read_outside_their_forward_or_overriding_it_are_skipped_with_a_warning():
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(pool=Pooling(), lora=LoRALinear(8, 8), attn=nn.MultiheadAttention(8, 2)))
    x = torch.randn(2, 5, 8)
    before = model["lora"](x).detach(), model["pool"](x).detach()
    with pytest.warns(UserWarning, match="not converted") as record:
        sk.apply_sara(model, sk.SaRAConfig(fraction=0.2))
    text = str(record[0].message)
    for name in ("pool.q_proj", "pool.k_proj", "pool.v_proj", "pool.c_proj", "lora", "attn.out_proj"):
        assert name in text, name
    skipped = {s.name: s.reason for s in model.sara_summary.skipped}
    assert "Pooling.forward" in skipped["pool.q_proj"]
    assert "overrides Linear.forward" in skipped["lora"]
    assert "MultiheadAttention" in skipped["attn.out_proj"]
    assert "not converted" in str(model.sara_summary)
    assert type(model["lora"]) is LoRALinear and not isinstance(model["pool"].q_proj, SparseDeltaLinear)
    assert isinstance(model["pool"].head, SparseDeltaLinear) and isinstance(
        model["lora"].down, SparseDeltaLinear
    )
    after = model["lora"](x).detach(), model["pool"](x).detach()
    assert torch.equal(before[0], after[0])  # the subclass keeps its own forward: output unchanged
    # (attention may pick another kernel once no input requires grad: equal up to rounding)
    torch.testing.assert_close(before[1], after[1], rtol=1e-6, atol=1e-7)


def test_diffusers_hunyuan_attention_pooling_is_skipped():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    torch.manual_seed(0)
    model = nn.Sequential(embeddings.HunyuanDiTAttentionPool(16, 8, 2, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="HunyuanDiTAttentionPool.forward"):
        sk.apply_sara(model, sk.SaRAConfig(fraction=0.2))
    assert {s.name for s in model.sara_summary.skipped} == {"0.q_proj", "0.k_proj", "0.v_proj", "0.c_proj"}


def test_layers_without_a_gradient_in_the_first_step_are_named():
    class Hidden(nn.Module):  # reads proj.weight in a helper method the static check does not see
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def project(self, x):
            return F.linear(x, self.proj.weight, self.proj.bias)

        def forward(self, x):
            return self.head(self.project(x))

    torch.manual_seed(0)
    model = sk.apply_sara(Hidden(), sk.SaRAConfig(fraction=0.3))
    opt = torch.optim.AdamW(sk.sparse_parameters(model), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    with pytest.warns(SparseStateWarning, match=r"1 sparse-delta layer\(s\) received no gradient.*'proj'"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # said once per optimizer


# ---------------------------------------------------------------------------------------------
# 10. Exact zeros (ControlNet's zero convolutions)
# ---------------------------------------------------------------------------------------------
def _tiny_controlnet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=8, in_channels=4,
    )  # fmt: skip


def test_controlnet_budget_is_not_spent_on_its_zero_convolutions():
    model = _tiny_controlnet()
    zero = {
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any()
    }
    assert {"controlnet_mid_block", "controlnet_cond_embedding.conv_out"} <= zero
    with pytest.warns(UserWarning, match=r"all-zero weights .*controlnet_mid_block"):
        sk.apply_sara(model, sk.SaRAConfig(fraction=0.05))
    summary = model.sara_summary
    assert set(summary.zero_layers) == zero and summary.zero_entries > 0.6 * summary.total_k
    for name, layer in sk.sparse_layers(model):
        assert bool((layer.sparse_base != 0).all()), name
        if name in zero:
            assert layer.k == 0, name
    assert all(layer.sparse_threshold > 1e-6 for _, layer in sk.sparse_layers(model))
    # A small step moves few entries past a threshold that is a real magnitude.
    with torch.no_grad():
        for _, layer in sk.sparse_layers(model):
            layer.sparse_delta.add_(1e-7)
    kept = sk.reselect_(model).kept
    assert kept > 0.9 * summary.total_k

    included = _tiny_controlnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.apply_sara(included, sk.SaRAConfig(fraction=0.05, include_zeros=True))
    in_zero = sum(layer.k for n, layer in sk.sparse_layers(included) if n in zero)
    assert in_zero > 0.6 * included.sara_summary.total_k  # what the default avoids


# ---------------------------------------------------------------------------------------------
# 11. apply_sara changes nothing when it fails
# ---------------------------------------------------------------------------------------------
def test_apply_sara_validates_everything_before_it_changes_anything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8).double())
    weights = [m.weight.detach().clone() for m in model]
    with pytest.raises(
        ValueError,
        match=r"cannot convert 1 targeted layer\(s\): '2' \(weight torch.float64\).*Nothing was changed",
    ):
        sk.apply_sara(model, sk.SaRAConfig(fraction=0.1))
    assert all(type(m) is nn.Linear for m in model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(m.weight, w) for m, w in zip(model, weights, strict=True))
    assert not hasattr(model, "sara_summary")
    sk.apply_sara(model, sk.SaRAConfig(fraction=0.1, exclude_modules=["2"]))  # the way out it names
    assert isinstance(model[0], SparseDeltaLinear) and type(model[2]) is nn.Linear


# ---------------------------------------------------------------------------------------------
# 12. Unbatched and channels_last convolutions
# ---------------------------------------------------------------------------------------------
def test_unbatched_conv_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = SparseDeltaConv2d.from_dense(copy.deepcopy(conv), k=20)
    x = torch.randn(3, 5, 5)
    out = layer(x)
    assert out.shape == conv(x).shape == (4, 5, 5)
    out.square().sum().backward()
    conv.weight.requires_grad_(True)
    conv(x).square().sum().backward()
    torch.testing.assert_close(
        layer.sparse_delta.grad, conv.weight.grad.reshape(-1)[layer.sparse_index.long()]
    )


def test_channels_last_convolutions_train_like_contiguous_ones():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1))
    reference = sk.apply_sara(copy.deepcopy(dense), sk.SaRAConfig(fraction=0.2))
    model = sk.apply_sara(
        copy.deepcopy(dense).to(memory_format=torch.channels_last), sk.SaRAConfig(fraction=0.2)
    )
    model.to(memory_format=torch.channels_last)  # again after conversion: the weights stay row-major
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    opts = [sk.SparseAdamW(sk.sparse_parameters(m), lr=1e-2) for m in (reference, model)]
    for _ in range(3):
        for m, opt in zip((reference, model), opts, strict=True):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, a), (_, b) in zip(sk.sparse_layers(reference), sk.sparse_layers(model), strict=True):
        assert b.weight.is_contiguous(), n
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.sparse_index, b.sparse_index), n
    assert_merged(model)


# ---------------------------------------------------------------------------------------------
# Whole-model pickling (torch.save(model)) and deepcopy
# ---------------------------------------------------------------------------------------------
def test_a_sara_model_pickles_and_deep_copies():
    model, _ = trained_with_reselection()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    x, _ = batch()
    for other in (loaded, twin):
        assert isinstance(other.fc1.sparse_delta, sk.DeltaParameter)
        assert torch.equal(other(x), model(x))
        opt = sk.SparseAdamW(sk.sparse_parameters(other), lr=1e-2)
        train(other, opt, 1)
        assert_merged(other)
    assert not torch.equal(twin.fc1.sparse_delta, model.fc1.sparse_delta)  # independent copies


# ---------------------------------------------------------------------------------------------
# accelerate's save_state / load_state with the library's hooks
# ---------------------------------------------------------------------------------------------
def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip


def _unet_run(tmp_path, steps: int, save_at: int | None = None, resume: str | None = None):
    accelerate = pytest.importorskip("accelerate")
    from sara_kernels.integrations.accelerate import register_checkpoint_hooks

    accelerator = accelerate.Accelerator(cpu=True)
    unet = sk.apply_sara(_tiny_unet(), sk.SaRAConfig(fraction=0.05))
    opt = sk.SparseAdamW(sk.sparse_parameters(unet), lr=1e-3)
    ema = sk.SparseEMA(unet, decay=0.9)
    progressive = sk.ProgressiveReselection(unet, opt, total_steps=steps, at=2)
    register_checkpoint_hooks(accelerator, ema=ema)
    unet, opt = accelerator.prepare(unet, opt)
    accelerator.register_for_checkpointing(progressive)
    start = 0
    if resume is not None:
        accelerator.load_state(resume)
        start = progressive.steps
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        x, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        cond, t = torch.randn(2, 3, 16, generator=g), torch.randint(0, 1000, (2,), generator=g)
        opt.zero_grad()
        accelerator.backward(F.mse_loss(unet(x + noise, t, cond).sample, noise))
        opt.step()
        ema.step(unet.parameters())
        progressive.step()
        if save_at is not None and step + 1 == save_at:
            accelerator.save_state(str(tmp_path / f"checkpoint-{save_at}"))
    return accelerator.unwrap_model(unet), ema


def test_accelerate_checkpoint_hooks_resume_bit_exact_across_reselection(tmp_path, caplog):
    diffusers = pytest.importorskip("diffusers")
    straight, straight_ema = _unet_run(tmp_path, steps=5, save_at=3)  # re-selection at step 2
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "unet" / "sara_training_state.safetensors").exists()
    assert (checkpoint / "sara_ema.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()  # the frozen model is not written again
    resumed, resumed_ema = _unet_run(tmp_path, steps=5, resume=str(checkpoint))
    assert sum(layer.frozen_count for _, layer in sk.sparse_layers(resumed)) > 0
    for (n, a), (_, b) in zip(sk.sparse_layers(straight), sk.sparse_layers(resumed), strict=True):
        for name in ("weight", "sparse_index", "sparse_delta", "sparse_frozen_delta"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (n, name)
        assert torch.equal(straight_ema.shadow[n], resumed_ema.shadow[n]), n
    # The checkpoint's plain copy opens in diffusers without sara_kernels' keys, merged.
    with caplog.at_level("WARNING"):
        plain = diffusers.UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    assert not [
        r for r in caplog.records if "unexpected" in r.getMessage().lower() or "not used" in r.getMessage()
    ]
    assert not any("sparse" in key for key in plain.state_dict())
    fresh = sk.apply_sara(_tiny_unet(), sk.SaRAConfig(fraction=0.05))
    sk.load_training_state(fresh, checkpoint / "unet" / "sara_training_state.safetensors")
    merged = sk.merge_and_unload(fresh).state_dict()
    assert merged.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, merged[key]), key


# ---------------------------------------------------------------------------------------------
# State that must stay consistent in less common routes
# ---------------------------------------------------------------------------------------------
class QuantizedStateAdam(torch.optim.Optimizer):
    """A toy 8-bit optimizer in the style of bitsandbytes': per-entry uint8 codes (code 128 is 0,
    code 0 is -scale) with one fp32 scale per block of 64 entries."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["codes"] = torch.full(p.shape, 128, dtype=torch.uint8)
                    state["absmax"] = torch.zeros(p.numel() // 64 + 1)
                scale = state["absmax"].repeat_interleave(64)[: p.numel()]
                m = 0.9 * (state["codes"].float() - 128.0) / 127.0 * scale + 0.1 * p.grad
                top = max(float(m.abs().max()), 1e-12)
                state["absmax"].fill_(top)
                state["codes"].copy_((m / top * 127.0 + 128.0).round().clamp(0, 255).to(torch.uint8))
                p.add_(m, alpha=-group["lr"])


def test_reselection_resets_the_state_of_an_optimizer_it_cannot_reorder():
    model = sara_net()
    opt = QuantizedStateAdam(sk.sparse_parameters(model))
    train(model, opt, 3)
    with pytest.warns(SparseStateWarning, match="QuantizedStateAdam keeps state that cannot move .*codes"):
        summary = sk.reselect_(model, opt)
    assert summary.frozen > 0
    train(model, opt, 2)
    for name, layer in sk.sparse_layers(model):
        assert not layer.sparse_delta[layer.k :].any(), name  # the frozen entries did not move
    assert_merged(model)


@pytest.mark.parametrize("cast", ["half", "clone"], ids=["half()", "a device move"])
def test_tied_layers_keep_sharing_their_state_through_casts_and_moves(cast):
    model = sk.apply_sara(Tied(), sk.SaRAConfig(fraction=0.3))
    if cast == "half":
        model.half()
    else:
        model._apply(lambda t: t.clone())  # what .to(another device) does to every buffer
    for name in ("sparse_index", "sparse_base", "sparse_frozen_delta"):
        assert getattr(model.a, name) is getattr(model.b, name), name
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(model.a.weight.dtype)
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().square().sum().backward()
        opt.step()
    sk.reselect_(model, opt, threshold=float(model.a.sparse_base.abs().float().median()))
    opt.zero_grad()
    model(x).float().square().sum().backward()
    opt.step()
    assert model.a.sparse_frozen_delta is model.b.sparse_frozen_delta and model.a.frozen_count > 0
    assert_merged(model)


def test_an_index_given_to_two_layers_belongs_to_each():
    index = torch.tensor([1, 5, 9, 20, 33], dtype=torch.int32)
    given = index.clone()
    torch.manual_seed(0)
    a = SparseDeltaLinear.from_dense(nn.Linear(8, 8), index=index)
    b = SparseDeltaLinear.from_dense(nn.Linear(8, 8), index=index)
    assert a.sparse_index is not index and a.sparse_index is not b.sparse_index
    with torch.no_grad():
        a.sparse_delta.copy_(torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5]))
    a.freeze_(torch.tensor([False, True, False, True, True]))
    assert torch.equal(index, given) and torch.equal(b.sparse_index, given)
    assert_merged(nn.Sequential(a, b))


def test_a_refused_full_state_dict_leaves_the_layer_as_it_was():
    model = sara_net()
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    train(model, opt, 2)
    x, _ = batch()
    out = model(x).detach()
    weights = {n: layer.weight.detach().clone() for n, layer in sk.sparse_layers(model)}
    other = sara_net(fraction=0.2)  # another selection: other entry counts
    with pytest.raises(RuntimeError, match=r"the checkpoint adapts \d+ entries but this layer \d+"):
        model.load_state_dict(other.state_dict())
    for n, layer in sk.sparse_layers(model):
        assert torch.equal(layer.weight, weights[n]), n
    assert_merged(model)
    assert torch.equal(model(x), out)


def test_a_fused_step_after_unmerge_keeps_the_frozen_entries_merged():
    model, opt = trained_with_reselection()
    x, y = batch()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    for _, layer in sk.sparse_layers(model):
        layer.unmerge_()  # between the backward and the step: no forward merges them first
    opt.step()
    assert_merged(model)


def test_a_child_named_module_is_part_of_the_model(tmp_path):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.module, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(F.gelu(self.module(x)))

    model = sk.apply_sara(Outer(), sk.SaRAConfig(fraction=0.3))
    ema = sk.SparseEMA(model)
    assert set(ema.shadow) == {"module", "head"}
    opt = sk.SparseAdamW(sk.sparse_parameters(model), lr=1e-2)
    x = torch.randn(4, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        ema.step()
    path = str(tmp_path / "state.safetensors")
    sk.save_training_state(model, path)
    fresh = sk.apply_sara(Outer(), sk.SaRAConfig(fraction=0.3))
    sk.load_training_state(fresh, path)
    assert torch.equal(fresh.head.sparse_delta, model.head.sparse_delta) and model.head.sparse_delta.any()


def test_load_training_state_writes_nothing_when_one_layer_does_not_fit(tmp_path):
    model = sara_net(train_bias=True, **CONFIG)
    opt = sk.SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train(model, opt, 2)
    path = _save_state(model, tmp_path)
    fresh = sara_net(train_bias=True, **CONFIG)
    with torch.no_grad():  # the last layer's pre-trained weights differ a little
        fresh.fc2.weight.add_(1e-3)
        fresh.fc2.sparse_base.add_(1e-3)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(sk.training_state.TrainingStateError, match="nothing was loaded.*'fc2'"):
        sk.load_training_state(fresh, path)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_module_already_converted_in_another_model_is_skipped():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    first = sk.apply_sara(nn.Sequential(shared, nn.Linear(8, 8)), sk.SaRAConfig(fraction=0.3))
    second = nn.Sequential(nn.Linear(8, 8), shared)  # still the dense module, its weight adapted
    with pytest.warns(UserWarning, match="already adapted by SparseDeltaLinear '0'"):
        sk.apply_sara(second, sk.SaRAConfig(fraction=0.3))
    assert isinstance(second[0], SparseDeltaLinear) and type(second[1]) is nn.Linear
    assert isinstance(first[0], SparseDeltaLinear)
