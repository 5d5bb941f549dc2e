"""Adapter files: save/load round trips, scaling, combining, unloading, atomic writes and every
error path of :mod:`sara_kernels.adapter`.

Models are small ``nn.Sequential`` stacks (odd sizes) with weights bounded away from zero and scaled
so the threshold selects a few percent of each weight; an "adapter" is made by converting every
layer with ``from_dense`` and writing random deltas.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import sara_kernels
from sara_kernels import adapter as A
from sara_kernels.adapter import (
    AdapterError,
    AdapterWarning,
    load_adapter,
    merge_and_unload,
    read_adapter,
    save_adapter,
)
from sara_kernels.nn import SparseDeltaConv2d, SparseDeltaLinear

SCALE = 0.05
#: |w| is uniform in [0.1, 1] * SCALE: this threshold selects about 6% of the entries.
THRESHOLD = SCALE * (0.1 + 0.9 * 0.06)
SPARSE = (SparseDeltaLinear, SparseDeltaConv2d)


def _randw(shape, generator, scale=SCALE) -> torch.Tensor:
    """Values with |w| in [0.1, 1] * scale and random signs (never zero)."""
    mag = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.9 + 0.1
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()
    return (mag * sign * scale).float()


def _base_model(seed: int = 0, dtype=torch.float32, out_features: int = 13) -> nn.Sequential:
    """Conv(3->5) ReLU Conv(5->7, stride 2) Flatten Linear(112->11) GELU Linear(11->out); input
    [N, 3, 9, 9]."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 7, 3, stride=2),
        nn.Flatten(),
        nn.Linear(7 * 4 * 4, 11),
        nn.GELU(),
        nn.Linear(11, out_features),
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(_randw(m.weight.shape, g))
                m.bias.copy_(_randw(m.bias.shape, g))
    return model.to(dtype)


LAYERS = ["0", "2", "4", "6"]


def _input(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 3, 9, 9, generator=g).to(dtype)


def _random_delta(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _randw((n,), g, scale=0.01)


def _convert(model: nn.Sequential, index_for=None) -> nn.Sequential:
    """Convert every Linear/Conv2d in place (threshold rule, or ``index_for(name, layer)``)."""
    for name, layer in list(model.named_children()):
        cls = SparseDeltaLinear if isinstance(layer, nn.Linear) else SparseDeltaConv2d
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            if index_for is None:
                new = cls.from_dense(layer, threshold=THRESHOLD)
            else:
                new = cls.from_dense(layer, index=index_for(name, layer))
            assert 0 < new.k < layer.weight.numel() // 5, (name, new.k)
            setattr(model, name, new)
    return model


def _adapted(base: nn.Module, seed: int = 1, index_for=None) -> nn.Sequential:
    """A copy of ``base`` with every layer converted and random deltas."""
    model = _convert(copy.deepcopy(base), index_for)
    with torch.no_grad():
        for i, name in enumerate(LAYERS):
            layer = model.get_submodule(name)
            layer.sparse_delta.copy_(_random_delta(layer.k, seed * 100 + i))
    for name in LAYERS:
        model.get_submodule(name).merge_()  # as after training (a forward would do it too)
    return model


def _random_index(layer: nn.Module, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(layer.weight.numel(), generator=g)[:count].sort().values.to(torch.int32)


def _manual_weight(pretrained: torch.Tensor, parts) -> torch.Tensor:
    """``P + sum(alpha_i * ΔP_i)``: the deltas summed in fp32 first, then added to the pre-trained
    value in fp32 and rounded to the weight dtype (the library's merge rule)."""
    total = torch.zeros(pretrained.numel(), dtype=torch.float32)
    touched = torch.zeros(pretrained.numel(), dtype=torch.bool)
    for alpha, index, delta in parts:
        index = index.long()
        total[index] += alpha * delta
        touched[index] = True
    flat = pretrained.detach().reshape(-1).clone()
    flat[touched] = (flat[touched].float() + total[touched]).to(flat.dtype)
    return flat.view_as(pretrained)


def _plain_types(model: nn.Module) -> list[type]:
    return [type(model.get_submodule(n)) for n in LAYERS]


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    base = _base_model(dtype=dtype)
    trained = _adapted(base)
    x = _input(dtype)
    expected = trained(x)
    path = tmp_path / "adapter.safetensors"
    save_adapter(trained, path)

    fresh = copy.deepcopy(base)
    summary = load_adapter(fresh, path)
    assert summary["layers"] == LAYERS and summary["converted"] == LAYERS
    assert summary["entries"] == sum(trained.get_submodule(n).k for n in LAYERS)
    for name in LAYERS:
        got, want = fresh.get_submodule(name), trained.get_submodule(name)
        assert type(got) is type(want)
        assert torch.equal(got.sparse_index, want.sparse_index)
        assert got.sparse_index.dtype == torch.int32
        assert torch.equal(got.sparse_delta, want.sparse_delta)
        assert torch.equal(got.sparse_base, want.sparse_base)
        assert torch.equal(got.weight, want.weight)
        assert not torch.equal(got.weight, base.get_submodule(name).weight)  # the adapter did something
    assert torch.equal(fresh(x), expected)


def test_saved_tensors_and_metadata(tmp_path):
    trained = _adapted(_base_model())
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    tensors, meta = read_adapter(path)
    assert set(tensors) == {f"{n}.{t}" for n in LAYERS for t in ("index", "delta")}
    assert meta["format"] == "sara_kernels.adapter" and meta["format_version"] == "1"
    assert meta["sara_kernels_version"] == sara_kernels.__version__
    assert "sara_config" not in meta
    assert json.loads(meta["layers"]) == LAYERS
    for name in LAYERS:
        layer = trained.get_submodule(name)
        assert tensors[f"{name}.index"].dtype == torch.int32
        assert tensors[f"{name}.delta"].dtype == torch.float32
        assert torch.equal(tensors[f"{name}.delta"], layer.sparse_delta.detach())
        record = json.loads(meta[f"layer/{name}"])
        assert record["kind"] == ("linear" if isinstance(layer, nn.Linear) else "conv2d")
        assert record["weight_shape"] == list(layer.weight.shape)
        assert record["weight_dtype"] == "float32"
        assert record["entries"] == layer.k
        fp = record["fingerprint"]
        assert fp["sara_kernels_version"] == sara_kernels.__version__
        assert fp["shape"] == list(layer.weight.shape) and fp["dtype"] == "float32"
        # the fingerprint is the PRE-TRAINED weight's, not the merged one's
        assert fp == A.weight_fingerprint(_base_model().get_submodule(name).weight)
        assert fp != A.weight_fingerprint(layer.weight)


def test_config_is_stored_when_a_dataclass(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        threshold: float = 2e-3
        targets: tuple = ("linear", "conv2d")

    trained = _adapted(_base_model())
    trained.sara_config = Cfg()
    save_adapter(trained, tmp_path / "a.safetensors")
    _, meta = read_adapter(tmp_path / "a.safetensors")
    assert json.loads(meta["sara_config"]) == {"threshold": 2e-3, "targets": ["linear", "conv2d"]}


def test_include_base(tmp_path):
    base = _base_model()
    trained = _adapted(base)
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path, include_base=True)
    tensors, meta = read_adapter(path)
    for name in LAYERS:
        layer = trained.get_submodule(name)
        assert torch.equal(tensors[f"{name}.base"], layer.sparse_base)
        assert torch.equal(
            tensors[f"{name}.base"], base.get_submodule(name).weight.reshape(-1)[layer.sparse_index.long()]
        )
        assert json.loads(meta[f"layer/{name}"])["has_base"] is True
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    assert torch.equal(fresh(_input()), trained(_input()))


def test_base_values_catch_what_the_sampled_fingerprint_misses(tmp_path):
    """A weight above 65,536 entries: a tiny change at an adapted, unsampled entry passes the
    fingerprint (sample + tolerant |w| sum) but not the stored base values."""
    g = torch.Generator().manual_seed(5)
    base = nn.Sequential(nn.Linear(300, 251))
    with torch.no_grad():
        base[0].weight.copy_(_randw(base[0].weight.shape, g))
    trained = copy.deepcopy(base)
    trained[0] = SparseDeltaLinear.from_dense(trained[0], threshold=THRESHOLD)
    with torch.no_grad():
        trained[0].sparse_delta.copy_(_random_delta(trained[0].k, 9))
    sampled = set(A._sample_positions(base[0].weight.numel()).tolist())
    victim = next(i for i in trained[0].sparse_index.tolist() if i not in sampled)

    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed[0].weight.view(-1)[victim] += 1e-4
    save_adapter(trained, tmp_path / "plain.safetensors")
    save_adapter(trained, tmp_path / "based.safetensors", include_base=True)
    load_adapter(copy.deepcopy(changed), tmp_path / "plain.safetensors")  # not detected: a sample
    with pytest.raises(AdapterError, match=r"layer '0'.*stored pre-trained values \(base\) differ"):
        load_adapter(copy.deepcopy(changed), tmp_path / "based.safetensors")
    load_adapter(copy.deepcopy(base), tmp_path / "based.safetensors")


# ---------------------------------------------------------------------------------------------
# Atomic write
# ---------------------------------------------------------------------------------------------
def test_atomic_write_leaves_no_temp_and_replaces_whole_file(tmp_path, monkeypatch):
    trained = _adapted(_base_model())
    reference_path = tmp_path / "ref" / "a.safetensors"
    reference_path.parent.mkdir()
    save_adapter(trained, reference_path)

    target = tmp_path / "out" / "a.safetensors"
    target.parent.mkdir()
    target.write_bytes(os.urandom(1 << 20))  # an existing, larger file
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    save_adapter(trained, str(target))
    assert synced, "the data must be fsynced before the rename"
    assert os.listdir(target.parent) == ["a.safetensors"]
    # same content (safetensors writes the metadata keys in no fixed order: compare parsed)
    assert target.stat().st_size == reference_path.stat().st_size < 1 << 20
    got, want = read_adapter(target), read_adapter(reference_path)
    assert got[1] == want[1] and got[0].keys() == want[0].keys()
    assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])


def test_failing_save_keeps_the_old_file(tmp_path, monkeypatch):
    base = _base_model()
    path = tmp_path / "a.safetensors"
    save_adapter(_adapted(base, seed=1), path)
    old = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_adapted(base, seed=2), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["a.safetensors"]
    monkeypatch.undo()
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    assert torch.equal(fresh(_input()), _adapted(base, seed=1)(_input()))


# ---------------------------------------------------------------------------------------------
# Scaling and combining
# ---------------------------------------------------------------------------------------------
def test_alpha_scales_the_delta_exactly(tmp_path):
    base = _base_model()
    trained = _adapted(base)
    save_adapter(trained, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a.safetensors", alpha=0.5)
    dense = copy.deepcopy(base)
    for name in LAYERS:
        layer = trained.get_submodule(name)
        pre = base.get_submodule(name).weight
        want = _manual_weight(pre, [(0.5, layer.sparse_index, layer.sparse_delta.detach())])
        got = fresh.get_submodule(name).weight
        assert torch.equal(got, want)
        idx = layer.sparse_index.long()
        f64 = pre.reshape(-1)[idx].double() + 0.5 * layer.sparse_delta.detach().double()
        torch.testing.assert_close(got.reshape(-1)[idx].double(), f64, rtol=1e-6, atol=1e-9)
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(want)
    torch.testing.assert_close(fresh(_input()), dense(_input()), rtol=1e-6, atol=1e-6)


def test_combine_adds_scaled_adapters(tmp_path):
    base = _base_model()
    counts = {"0": 9, "2": 21, "4": 61, "6": 5}

    def overlapping(shift):  # entries [shift, shift + c) of one random permutation per layer
        def index_for(name, layer):
            perm = torch.randperm(layer.weight.numel(), generator=torch.Generator().manual_seed(int(name)))
            c = counts[name]
            return perm[shift * c // 2 : shift * c // 2 + c].sort().values.to(torch.int32)

        return index_for

    one = _adapted(base, seed=1, index_for=overlapping(0))
    two = _adapted(base, seed=2, index_for=overlapping(1))
    save_adapter(one, tmp_path / "one.safetensors")
    save_adapter(two, tmp_path / "two.safetensors")
    a1, a2 = 0.75, -1.5

    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "one.safetensors", alpha=a1)
    with pytest.raises(
        AdapterError,
        match=r"layer '0' already carries an adapter; call merge_and_unload "
        r"first, or pass combine=True to add this one",
    ):
        load_adapter(model, tmp_path / "two.safetensors", alpha=a2)
    summary = load_adapter(model, tmp_path / "two.safetensors", alpha=a2, combine=True)
    assert summary["combined"] == LAYERS
    dense = copy.deepcopy(base)
    for name in LAYERS:
        l1, l2, got = (m.get_submodule(name) for m in (one, two, model))
        union = torch.unique(torch.cat([l1.sparse_index, l2.sparse_index]).long())
        assert l1.k + l2.k > union.numel() > max(l1.k, l2.k)  # overlapping, not nested
        assert torch.equal(got.sparse_index.long(), union)
        pre = base.get_submodule(name).weight
        assert torch.equal(got.sparse_base, pre.reshape(-1)[union])
        want = _manual_weight(
            pre,
            [
                (a1, l1.sparse_index, l1.sparse_delta.detach()),
                (a2, l2.sparse_index, l2.sparse_delta.detach()),
            ],
        )
        assert torch.equal(got.weight, want)
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(want)
    torch.testing.assert_close(model(_input()), dense(_input()), rtol=1e-6, atol=1e-6)

    # the combined model saves and reloads as one adapter
    save_adapter(model, tmp_path / "both.safetensors")
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "both.safetensors")
    assert torch.equal(again(_input()), model(_input()))


def test_load_into_untrained_sparse_layers_takes_the_file_selection(tmp_path):
    base = _base_model()
    trained = _adapted(base, index_for=lambda n, l: _random_index(l, 7, int(n)))
    save_adapter(trained, tmp_path / "a.safetensors")
    fresh = _convert(copy.deepcopy(base))  # threshold selection, zero deltas (as after apply_sara)
    summary = load_adapter(fresh, tmp_path / "a.safetensors")
    assert summary["converted"] == [] and summary["combined"] == []
    for name in LAYERS:
        assert torch.equal(fresh.get_submodule(name).sparse_index, trained.get_submodule(name).sparse_index)
    assert torch.equal(fresh(_input()), trained(_input()))


def _with_frozen(layer, frozen: torch.Tensor, frozen_delta: torch.Tensor) -> None:
    """Freeze the ``frozen`` entries (a subset of the index) with the deltas ``frozen_delta``, as
    re-selection does."""
    layer.freeze_(~torch.isin(layer.sparse_index, frozen))
    total = layer.total_delta()
    total[layer.k :] = frozen_delta
    layer.set_total_delta_(total)


def test_frozen_entries_are_saved_and_combined(tmp_path):
    base = nn.Sequential(_base_model()[6])
    one = copy.deepcopy(base)
    one[0] = SparseDeltaLinear.from_dense(
        one[0], index=torch.tensor([1, 4, 9, 20, 33, 50], dtype=torch.int32)
    )
    with torch.no_grad():
        one[0].sparse_delta.copy_(_random_delta(6, 1))
    _with_frozen(one[0], torch.tensor([4, 33], dtype=torch.int32), torch.tensor([0.003, -0.007]))
    x = torch.randn(3, 11)
    one(x)
    save_adapter(one, tmp_path / "one.safetensors")
    index, delta, _ = one[0].adapter_state()
    assert torch.equal(index, torch.tensor([1, 4, 9, 20, 33, 50], dtype=torch.int32))
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "one.safetensors")
    assert torch.equal(fresh[0].weight, _manual_weight(base[0].weight, [(1.0, index, delta)]))
    assert torch.equal(fresh(x), one(x))

    two = copy.deepcopy(base)
    two[0] = SparseDeltaLinear.from_dense(two[0], index=torch.tensor([0, 4, 20, 21], dtype=torch.int32))
    with torch.no_grad():
        two[0].sparse_delta.copy_(_random_delta(4, 2))
    save_adapter(two, tmp_path / "two.safetensors")
    load_adapter(one, tmp_path / "two.safetensors", alpha=2.0, combine=True)
    assert torch.equal(one[0].sparse_frozen_index, torch.tensor([4, 33], dtype=torch.int32))
    assert torch.equal(one[0].sparse_index[: one[0].k], torch.tensor([0, 1, 9, 20, 21, 50], dtype=torch.int32))
    want = _manual_weight(
        base[0].weight, [(1.0, index, delta), (2.0, two[0].sparse_index, two[0].sparse_delta.detach())]
    )
    assert torch.equal(one[0].weight, want)
    one[0].unmerge_()
    assert torch.equal(one[0].weight, base[0].weight)


# ---------------------------------------------------------------------------------------------
# merge_and_unload
# ---------------------------------------------------------------------------------------------
def test_merge_and_unload_gives_plain_layers_on_the_same_storage(tmp_path):
    base = _base_model()
    trained = _adapted(base)
    save_adapter(trained, tmp_path / "a.safetensors")
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "a.safetensors")
    x = _input()
    expected = model(x)
    weights = {n: model.get_submodule(n).weight for n in LAYERS}
    ptrs = {n: w.data_ptr() for n, w in weights.items()}
    merged = {n: w.detach().clone() for n, w in weights.items()}

    assert merge_and_unload(model) is model
    assert _plain_types(model) == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    for name in LAYERS:
        layer = model.get_submodule(name)
        assert layer.weight.data_ptr() == ptrs[name]
        assert layer.weight.requires_grad and isinstance(layer.weight, nn.Parameter)
        assert torch.equal(layer.weight, merged[name])
        assert not any(k.startswith("sparse") for k, _ in layer.named_buffers())
    assert set(model.state_dict()) == set(base.state_dict())
    assert torch.equal(model(x), expected)
    # now a plain model again: an adapter loads on top of the merged weights only if they match
    with pytest.raises(AdapterError, match="pre-trained weight differs"):
        load_adapter(model, tmp_path / "a.safetensors")


def test_merge_and_unload_of_a_single_layer():
    layer = SparseDeltaConv2d.from_dense(_base_model()[2], threshold=THRESHOLD)
    with torch.no_grad():
        layer.sparse_delta.copy_(_random_delta(layer.k, 3))
    x = torch.randn(2, 5, 7, 7)
    expected = layer(x)
    ptr = layer.weight.data_ptr()
    plain = merge_and_unload(layer)
    assert type(plain) is nn.Conv2d and plain.weight.data_ptr() == ptr and plain.weight.requires_grad
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-6)


def test_root_sparse_layer_round_trip(tmp_path):
    dense = _base_model()[4]
    layer = SparseDeltaLinear.from_dense(copy.deepcopy(dense), threshold=THRESHOLD)
    with torch.no_grad():
        layer.sparse_delta.copy_(_random_delta(layer.k, 4))
    layer.merge_()
    save_adapter(layer, tmp_path / "a.safetensors")
    tensors, _ = read_adapter(tmp_path / "a.safetensors")
    assert set(tensors) == {"index", "delta"}
    target = SparseDeltaLinear.from_dense(copy.deepcopy(dense), index=torch.empty(0, dtype=torch.int32))
    load_adapter(target, tmp_path / "a.safetensors")
    assert torch.equal(target.weight, layer.weight)
    with pytest.raises(AdapterError, match="the model itself is a plain Linear"):
        load_adapter(copy.deepcopy(dense), tmp_path / "a.safetensors")


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------
def test_fingerprint_of_adapted_layer_is_the_pretrained_one_and_touches_nothing(monkeypatch):
    g = torch.Generator().manual_seed(7)
    weight = _randw((259, 263), g)  # 68,117 entries: strided sample
    index = torch.randperm(weight.numel(), generator=g)[:3000].sort().values.to(torch.int32)
    base = weight.reshape(-1)[index.long()].clone()
    expected = A.weight_fingerprint(weight)
    assert expected["sample_count"] == A.FINGERPRINT_SAMPLES
    merged = weight.clone()
    merged.view(-1)[index.long()] += 0.25
    before = merged.clone()
    monkeypatch.setattr(A, "_CHUNK", 1000)  # many chunks, adapted entries in each
    got = A.weight_fingerprint(merged, index, base)
    assert torch.equal(merged, before)
    assert got["sample_sha256"] == expected["sample_sha256"]
    assert A.fingerprint_differences(expected, got) == []
    assert A.fingerprint_differences(expected, A.weight_fingerprint(merged)) != []


def test_fingerprint_tolerance():
    fp = A.weight_fingerprint(_randw((31, 17), torch.Generator().manual_seed(1)))
    assert A.fingerprint_differences(fp, {**fp, "abs_sum": fp["abs_sum"] * (1 + 1e-8)}) == []
    diffs = A.fingerprint_differences(fp, {**fp, "abs_sum": fp["abs_sum"] * (1 + 1e-4)})
    assert len(diffs) == 1 and "sum of |w|" in diffs[0]
    diffs = A.fingerprint_differences(fp, {**fp, "dtype": "bfloat16", "sample_sha256": "0" * 64})
    assert diffs == [
        "sampled entries differ from the adapter's pre-trained weights cast to bfloat16 (the adapter "
        "was trained on float32 weights)"
    ]
    old_file = {k: v for k, v in fp.items() if k != "sample_sha256_as"}  # written before the cast hashes
    diffs = A.fingerprint_differences(old_file, {**fp, "dtype": "bfloat16", "sample_sha256": "0" * 64})
    assert diffs == ["weight dtype float32 vs bfloat16"]


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
def test_an_adapter_loads_into_the_base_cast_to_half_precision(tmp_path, model_dtype, named):
    """from_pretrained(torch_dtype=fp16) + an adapter trained in fp32: the fingerprint matches the
    cast weights (it was refused as a different base model before); another base is still refused."""
    base = _base_model()
    save_adapter(_adapted(base), tmp_path / "a.safetensors")
    save_adapter(_adapted(base), tmp_path / "with_base.safetensors", include_base=True)
    kwargs = {"adapter_name": "a"} if named else {}
    for file in ("a", "with_base"):
        model = copy.deepcopy(base).to(model_dtype)
        summary = load_adapter(model, tmp_path / f"{file}.safetensors", **kwargs)
        assert summary["fingerprint_mismatches"] == []
        tensors, _ = read_adapter(tmp_path / f"{file}.safetensors")
        for name in LAYERS:
            pre = base.get_submodule(name).weight.to(model_dtype)
            want = _manual_weight(pre, [(1.0, tensors[f"{name}.index"], tensors[f"{name}.delta"])])
            assert torch.equal(model.get_submodule(name).weight, want), name
    other = _base_model(seed=4).to(model_dtype)
    with pytest.raises(AdapterError, match="sampled entries differ from the adapter's pre-trained weights cast to"):
        load_adapter(other, tmp_path / "a.safetensors", **kwargs)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    base = _base_model()
    trained = _adapted(base)
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    return base, trained, path


def test_wrong_model_shape_is_an_error_and_leaves_the_model_untouched(saved):
    _, _, path = saved
    other = _base_model(out_features=8)
    with pytest.raises(
        AdapterError,
        match=r"layer '6': weight shape differs: the adapter expects \(13, 11\), "
        r"the model has \(8, 11\)",
    ) as info:
        load_adapter(other, path)
    assert str(path) in str(info.value)
    assert _plain_types(other) == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    with pytest.raises(AdapterError, match="weight shape differs"):
        load_adapter(other, path, strict=False)


def test_wrong_layer_kind(saved):
    _, _, path = saved
    model = _base_model()
    model[6] = nn.ReLU()
    with pytest.raises(
        AdapterError, match=r"layer '6': the adapter is for a Linear but the model has a ReLU"
    ):
        load_adapter(model, path)


def test_missing_layer(saved):
    base, trained, path = saved
    model = copy.deepcopy(base)[:5]
    with pytest.raises(AdapterError, match=r"layer '6' is not in the model"):
        load_adapter(model, path)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Flatten, nn.Linear]
    with pytest.warns(AdapterWarning, match=r"layer '6' is not in the model.*skipped"):
        summary = load_adapter(model, path, strict=False)
    assert summary["skipped"] == ["6"] and summary["layers"] == ["0", "2", "4"]
    assert torch.equal(model[4].weight, trained[4].weight)


def test_different_base_weights(saved):
    _, trained, path = saved
    other = _base_model(seed=99)
    with pytest.raises(
        AdapterError, match=r"layer '0': the model's pre-trained weight differs .*sampled entries"
    ):
        load_adapter(other, path)
    assert _plain_types(other) == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    with pytest.warns(AdapterWarning, match="pre-trained weight differs"):
        summary = load_adapter(other, path, strict=False)
    assert summary["fingerprint_mismatches"] == LAYERS
    for name in LAYERS:  # loaded anyway, on the model's own weights
        assert torch.equal(other.get_submodule(name).sparse_delta, trained.get_submodule(name).sparse_delta)


def test_a_single_changed_weight_is_detected(saved):
    base, _, path = saved
    model = copy.deepcopy(base)
    with torch.no_grad():
        model[4].weight.view(-1)[17] *= -1  # |w| sum unchanged, the hash is not
    with pytest.raises(AdapterError, match=r"layer '4'.*sampled entries differ"):
        load_adapter(model, path)


def test_truncated_file(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    for cut in (len(data) - 3, len(data) // 2, 5, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(AdapterError, match="not a sara_kernels adapter or corrupted") as info:
            load_adapter(_base_model(), bad)
        assert str(bad) in str(info.value)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x17\x00\x00\x00\x00\x00\x00\x00" + os.urandom(200))
    with pytest.raises(AdapterError, match="not a sara_kernels adapter or corrupted"):
        read_adapter(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_adapter(tmp_path / "missing.safetensors")


def test_flipped_data_byte_is_detected(saved, tmp_path):
    _, _, path = saved
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40  # inside the last tensor's bytes; the header stays valid
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="corrupted: layer .* do not match their SHA-256"):
        read_adapter(bad)


def test_file_without_sara_metadata(tmp_path):
    bad = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(
        {"0.index": torch.arange(3, dtype=torch.int32), "0.delta": torch.ones(3)}, bad
    )
    with pytest.raises(AdapterError, match="not a sara_kernels adapter .*'format' metadata"):
        load_adapter(_base_model(), bad)


def _rewrite(path, out, tensors=None, **meta):
    """A copy of the adapter with some tensors or metadata replaced, its SHA-256 records updated (a
    consistently written but invalid file, as a buggy writer would make)."""
    old_tensors, old_meta = read_adapter(path)
    tensors = {**old_tensors, **(tensors or {})}
    meta = {**old_meta, **meta}
    for name in json.loads(old_meta["layers"]):
        record = json.loads(meta[f"layer/{name}"])
        record["tensors_sha256"] = A._tensor_digest(tensors[f"{name}.index"], tensors[f"{name}.delta"])
        meta[f"layer/{name}"] = json.dumps(record)
    safetensors.torch.save_file(tensors, out, metadata=meta)
    return out


def test_wrong_format_name_or_version(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(AdapterError, match=r"format is 'peft'"):
        read_adapter(_rewrite(path, tmp_path / "b.safetensors", format="peft"))
    with pytest.raises(AdapterError, match=r"format version '2' is not supported"):
        read_adapter(_rewrite(path, tmp_path / "c.safetensors", format_version="2"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "0.index",
            torch.tensor([0.0, 1.0]),
            r"layer '0': index has dtype torch.float32; expected int32 or int64",
        ),
        ("2.index", None, r"layer '2': index is not sorted"),
        (
            "4.index",
            None,
            r"layer '4': index holds values in \[\d+, 1232\] but the weight of shape \(11, 112\) has 1232",
        ),
        ("6.delta", "float64", r"layer '6': delta has dtype torch.float64; expected float32"),
        ("6.delta", "short", r"layer '6': delta has shape \(\d+,\) but index has \d+ entries"),
    ],
)
def test_invalid_tensors(saved, tmp_path, key, value, message):
    _, _, path = saved
    tensors, _ = read_adapter(path)
    t = tensors[key]
    if key == "2.index":
        value = t.flip(0).contiguous()
    elif key == "4.index":
        value = t.clone()
        value[-1] = 11 * 112
    elif value == "float64":
        value = t.double()
    elif value == "short":
        value = t[:-1].clone()
    with pytest.raises(AdapterError, match=message):
        load_adapter(_base_model(), _rewrite(path, tmp_path / "bad.safetensors", {key: value}))


def test_save_without_sparse_layers(tmp_path):
    with pytest.raises(AdapterError, match="Sequential has no sparse-delta layer"):
        save_adapter(_base_model(), tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_alpha_must_be_finite(saved):
    _, _, path = saved
    with pytest.raises(ValueError, match="alpha must be finite"):
        load_adapter(_base_model(), path, alpha=float("nan"))
