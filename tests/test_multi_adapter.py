"""Many resident adapters on one model: ``load_adapter(adapter_name=)``, ``set_adapters``,
``disable_adapters``, ``delete_adapter``, ``list_adapters`` (:mod:`sara_kernels.multi_adapter`).

The oracle for every active combination is the one-way path that existed before: loading the same
adapters with ``load_adapter(alpha=w, combine=True)`` into a fresh copy of the base and
``merge_and_unload`` — bit for bit, in fp32 and bf16.
"""

from __future__ import annotations

import copy
import gc
import io
import random
import threading
import types
import weakref

import pytest
import torch
from test_adapter import LAYERS, _adapted, _base_model, _input, _manual_weight, _random_index
from torch import nn

import sara_kernels as sk
from sara_kernels import multi_adapter
from sara_kernels.adapter import AdapterError, AdapterWarning, load_adapter, merge_and_unload, save_adapter

#: Entries per layer of the test adapters (of 135, 315, 1232 and 143 weight entries).
COUNTS = {"0": 17, "2": 40, "4": 150, "6": 21}


def _save(tmp_path, base, seed: int, name: str) -> str:
    """An adapter on ``base`` with its own random entries (overlapping the others' in part)."""
    model = _adapted(
        base, seed=seed, index_for=lambda n, layer: _random_index(layer, COUNTS[n], seed * 7 + int(n))
    )
    path = str(tmp_path / f"{name}.safetensors")
    save_adapter(model, path)
    return path


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def three(request, tmp_path):
    """(base, {name: path}) for three adapters on one base model."""
    base = _base_model(dtype=request.param)
    return base, {name: _save(tmp_path, base, seed, name) for seed, name in enumerate(["a", "b", "c"], 1)}


def _oracle(base, paths, combo) -> nn.Module:
    """The weights of ``combo`` ({name: w}) through load_adapter(combine=True) + merge_and_unload,
    loading in the order of ``paths`` (the load order of the model under test)."""
    model = copy.deepcopy(base)
    for i, name in enumerate(n for n in paths if n in combo):
        load_adapter(model, paths[name], alpha=combo[name], combine=i > 0)
    return merge_and_unload(model)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load_all(base, paths) -> nn.Module:
    model = copy.deepcopy(base)
    for name, path in paths.items():
        load_adapter(model, path, adapter_name=name)
    return model


# ---------------------------------------------------------------------------------------------
# Switching and mixing
# ---------------------------------------------------------------------------------------------
def test_every_combination_equals_merge_and_unload(three):
    base, paths = three
    model = _load_all(base, paths)
    assert all(type(model.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in LAYERS)  # stay plain
    combos = [
        {"a": 1.0},
        {"b": 0.5, "c": -0.7},
        {"a": 1.0, "b": 1.0, "c": 1.0},
        {"c": 0.3},
        {"c": 0.3, "a": 2.0},  # the sum runs in load order (a, then c) whatever the order given
        {"b": 0.0},
    ]
    for combo in combos:
        sk.set_adapters(model, list(combo), list(combo.values()))
        want = _oracle(base, paths, combo)
        assert _same_weights(model, want), combo
        assert torch.equal(model(_input(base[0].weight.dtype)), want(_input(base[0].weight.dtype)))
    sk.disable_adapters(model)
    assert _same_weights(model, base)


def test_disable_restores_the_base_bit_for_bit_after_any_sequence(three):
    base, paths = three
    model = _load_all(base, paths)
    rng = random.Random(0)
    names = list(paths)
    for step in range(40):
        chosen = rng.sample(names, rng.randint(0, 3))
        weights = [rng.choice([1.0, 0.5, -1.25, 3.0]) for _ in chosen]
        sk.set_adapters(model, chosen, weights)
        if step % 7 == 3:
            sk.disable_adapters(model)
            assert _same_weights(model, base), step
    sk.set_adapters(model, chosen, weights)
    assert _same_weights(model, _oracle(base, paths, dict(zip(chosen, weights, strict=True))))
    sk.disable_adapters(model)
    assert _same_weights(model, base)


def test_random_loads_deletes_and_switches(tmp_path):
    """The positions each adapter keeps into its layers' union move when another adapter is loaded
    (the union grows) or deleted (it shrinks): every state must still be the oracle's."""
    base = _base_model()
    paths = {n: _save(tmp_path, base, seed, n) for seed, n in enumerate("pqrst", 1)}
    model = copy.deepcopy(base)
    rng = random.Random(3)
    resident: list[str] = []  # load order
    for step in range(60):
        action = rng.choice(["load", "delete", "switch", "switch"])
        if action == "load" and len(resident) < len(paths):
            name = rng.choice([n for n in paths if n not in resident])
            load_adapter(model, paths[name], adapter_name=name, alpha=0.5, combine=rng.random() < 0.5)
            resident.append(name)
        elif action == "delete" and resident:
            name = rng.choice(resident)
            sk.delete_adapter(model, name)
            resident.remove(name)
        elif resident:
            chosen = rng.sample(resident, rng.randint(0, len(resident)))
            sk.set_adapters(model, chosen, [rng.choice([1.0, -0.5, 2.0]) for _ in chosen])
        active = {n: v["weight"] for n, v in sk.list_adapters(model).items() if v["active"]}
        assert list(sk.list_adapters(model)) == resident
        in_load_order = {n: paths[n] for n in resident}
        assert _same_weights(model, _oracle(base, in_load_order, active) if active else base), (step, active)


def test_a_named_load_is_active_alone_or_added_with_combine(three):
    base, paths = three
    model = copy.deepcopy(base)
    load_adapter(model, paths["a"], alpha=0.5, adapter_name="a")
    assert _same_weights(model, _oracle(base, paths, {"a": 0.5}))
    load_adapter(model, paths["b"], adapter_name="b")
    assert _same_weights(model, _oracle(base, paths, {"b": 1.0}))
    load_adapter(model, paths["c"], alpha=2.0, adapter_name="c", combine=True)
    assert _same_weights(model, _oracle(base, paths, {"b": 1.0, "c": 2.0}))
    listed = sk.list_adapters(model)
    assert list(listed) == ["a", "b", "c"]
    assert [(v["active"], v["weight"]) for v in listed.values()] == [(False, None), (True, 1.0), (True, 2.0)]
    assert listed["a"]["layers"] == len(LAYERS) and listed["a"]["entries"] == sum(COUNTS.values())


def test_switch_writes_only_the_entries_of_the_adapters_involved(three):
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, "a")
    poisoned = {}
    with torch.no_grad():  # mark every entry no adapter owns; a switch must not touch them
        for name in LAYERS:
            weight = model.get_submodule(name).weight
            owned = torch.zeros(weight.numel(), dtype=torch.bool)
            for path in paths.values():
                owned[sk.read_adapter(path)[0][f"{name}.index"].long()] = True
            poisoned[name] = ~owned
    registry = multi_adapter.registry_of(model)
    for name in LAYERS:
        slot = registry.slots[name]
        with torch.no_grad():
            model.get_submodule(name).weight.view(-1)[poisoned[name]] = 7.0
        slot.version = model.get_submodule(name).weight._version  # as if the registry wrote it
    sk.set_adapters(model, ["b", "c"], [0.5, 1.0])
    sk.disable_adapters(model)
    for name in LAYERS:
        flat = model.get_submodule(name).weight.detach().reshape(-1)
        assert bool((flat[poisoned[name]] == 7.0).all())
        assert torch.equal(
            flat[~poisoned[name]], base.get_submodule(name).weight.detach().reshape(-1)[~poisoned[name]]
        )


def test_merge_and_unload_keeps_the_active_combination(three):
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, ["a", "c"], [0.25, 1.5])
    hooks = len(model._forward_pre_hooks)
    merged = merge_and_unload(model)
    assert merged is model
    assert _same_weights(merged, _oracle(base, paths, {"a": 0.25, "c": 1.5}))
    assert sk.list_adapters(merged) == {}
    assert len(merged._forward_pre_hooks) == hooks - 1 and not merged._forward_hooks
    with pytest.raises(KeyError, match="no adapter is loaded"):
        sk.set_adapters(merged, "a")


def test_delete_adapter(three):
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, ["a", "b"], [1.0, 0.5])
    sk.delete_adapter(model, "a")  # active: taken out, b stays active
    assert _same_weights(model, _oracle(base, paths, {"b": 0.5}))
    assert list(sk.list_adapters(model)) == ["b", "c"]
    with pytest.raises(KeyError, match=r"no adapter named 'a' is loaded \(loaded: 'b', 'c'\)"):
        sk.set_adapters(model, ["a"])
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        sk.delete_adapter(model, "a")
    registry = multi_adapter.registry_of(model)
    for name in LAYERS:  # the union shrank to the entries b and c own
        owned = torch.unique(torch.cat([sk.read_adapter(paths[n])[0][f"{name}.index"] for n in ("b", "c")]))
        assert torch.equal(registry.slots[name].index, owned)
    sk.delete_adapter(model, ["b", "c"])
    assert _same_weights(model, base)
    assert multi_adapter.registry_of(model) is None and not model._forward_hooks
    load_adapter(model, paths["a"])  # a plain load works again on the clean model
    assert _same_weights(merge_and_unload(model), _oracle(base, paths, {"a": 1.0}))


def test_replace_an_adapter_by_name(three):
    base, paths = three
    model = _load_all(base, paths)
    with pytest.raises(AdapterError, match="an adapter named 'b' is already loaded; pass replace=True"):
        load_adapter(model, paths["c"], adapter_name="b")
    load_adapter(model, paths["c"], adapter_name="b", replace=True)
    sk.set_adapters(model, "b")
    assert _same_weights(model, _oracle(base, paths, {"c": 1.0}))
    sk.disable_adapters(model)
    assert _same_weights(model, base)


def test_memory_is_the_files_tensors(three):
    base, paths = three
    model = _load_all(base, paths)
    for name, info in sk.list_adapters(model).items():
        tensors, _ = sk.read_adapter(paths[name])
        assert info["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    registry = multi_adapter.registry_of(model)
    union = sum(s.index.numel() for s in registry.slots.values())
    itemsize = base[0].weight.element_size()
    adapters = sum(v["bytes"] for v in sk.list_adapters(model).values())
    assert multi_adapter.resident_bytes(model) == adapters + union * (4 + itemsize)
    assert union < sum(3 * c for c in COUNTS.values())  # overlapping entries are held once


# ---------------------------------------------------------------------------------------------
# Where it works: plain models, pipelines, casts, copies, compile
# ---------------------------------------------------------------------------------------------
def test_a_single_plain_layer_and_a_pipeline(tmp_path):
    layer = nn.Linear(29, 23)
    trained = sk.SparseDeltaLinear.from_dense(copy.deepcopy(layer), index=_random_index(layer, 40, 3))
    with torch.no_grad():
        trained.sparse_delta.normal_()
    trained.merge_()
    save_adapter(trained, tmp_path / "one.safetensors")
    pre = layer.weight.detach().clone()
    load_adapter(layer, tmp_path / "one.safetensors", adapter_name="x")  # the model itself: stays nn.Linear
    assert type(layer) is nn.Linear and torch.equal(layer.weight, trained.weight)
    sk.disable_adapters(layer)
    assert torch.equal(layer.weight, pre)

    pipe = types.SimpleNamespace(unet=nn.Sequential(copy.deepcopy(layer)))  # what a pipeline exposes
    save_adapter(nn.Sequential(trained), tmp_path / "seq.safetensors")
    load_adapter(pipe, tmp_path / "seq.safetensors", adapter_name="x")
    assert torch.equal(pipe.unet[0].weight, trained.weight)
    assert list(sk.list_adapters(pipe)) == ["x"]
    sk.disable_adapters(pipe)
    assert torch.equal(pipe.unet[0].weight, pre)
    with pytest.raises(TypeError, match=r"expected an nn.Module or a pipeline with a .unet or .transformer"):
        sk.set_adapters(object(), "x")


def test_dtype_cast_after_loading(tmp_path):
    base = _base_model()
    paths = {n: _save(tmp_path, base, s, n) for s, n in enumerate(["a", "b"], 1)}
    model = _load_all(base, paths)
    sk.set_adapters(model, ["a", "b"])
    model.to(torch.float16)
    sk.disable_adapters(model)
    assert _same_weights(model, copy.deepcopy(base).to(torch.float16))  # the base, cast
    sk.set_adapters(model, "a", 0.5)
    tensors, _ = sk.read_adapter(paths["a"])
    for name in LAYERS:
        pre16 = base.get_submodule(name).weight.to(torch.float16)
        want = _manual_weight(pre16, [(0.5, tensors[f"{name}.index"], tensors[f"{name}.delta"])])
        assert torch.equal(model.get_submodule(name).weight, want), name


def test_inside_inference_mode(three):
    base, paths = three
    model = copy.deepcopy(base)
    with torch.inference_mode():  # how servers run: loads and switches inside inference_mode
        load_adapter(model, paths["a"], adapter_name="a")
        load_adapter(model, paths["b"], adapter_name="b", combine=True)
        model(_input(base[0].weight.dtype))
    assert _same_weights(model, _oracle(base, paths, {"a": 1.0, "b": 1.0}))
    sk.set_adapters(model, "b")
    with torch.inference_mode():
        sk.disable_adapters(model)
    assert _same_weights(model, base)
    with torch.inference_mode():
        frozen = copy.deepcopy(base)
        frozen[0].weight = nn.Parameter(frozen[0].weight.detach().clone())  # an inference tensor
        with pytest.raises(AdapterError, match=r"the weight of layer '0' is an inference tensor"):
            load_adapter(frozen, paths["a"], adapter_name="a")


def test_deepcopy_and_torch_save_keep_working(three):
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, ["a", "b"], [1.0, -0.5])
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        sk.set_adapters(other, "c")
        assert _same_weights(other, _oracle(base, paths, {"c": 1.0}))
        sk.disable_adapters(other)
        assert _same_weights(other, base)
    assert _same_weights(model, _oracle(base, paths, {"a": 1.0, "b": -0.5}))  # the original is its own
    sk.delete_adapter(clone, ["a", "b", "c"])
    assert len(model._forward_hooks) == 1  # the copy's hooks were its own


def test_compiled_model_sees_the_switch(tmp_path):
    base = _base_model()
    paths = {n: _save(tmp_path, base, s, n) for s, n in enumerate(["a", "b"], 1)}
    model = _load_all(base, paths)
    compiled = torch.compile(model)
    x = _input()
    for names in (["a"], ["b"], ["a", "b"], []):
        sk.set_adapters(model, names)
        want = _oracle(base, paths, dict.fromkeys(names, 1.0)) if names else base
        torch.testing.assert_close(compiled(x), want(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def test_an_adapter_for_another_base_is_refused_and_nothing_changes(three, tmp_path):
    base, paths = three
    other = _base_model(seed=5, dtype=base[0].weight.dtype)
    model = copy.deepcopy(other)
    with pytest.raises(
        AdapterError, match="pre-trained weight differs from the one this adapter was trained on"
    ):
        load_adapter(model, paths["a"], adapter_name="a")
    assert multi_adapter.registry_of(model) is None and not model._forward_hooks
    assert _same_weights(model, other)

    model = _load_all(base, {"a": paths["a"]})
    foreign = _save(tmp_path, other, 9, "foreign")
    with pytest.raises(AdapterError, match="pre-trained weight differs"):
        load_adapter(model, foreign, adapter_name="f")
    assert list(sk.list_adapters(model)) == ["a"]
    sk.set_adapters(model, "a")
    assert _same_weights(model, _oracle(base, paths, {"a": 1.0}))


def test_a_second_adapter_is_checked_against_the_pretrained_weights(three):
    """With an adapter active the weights are not the pre-trained ones; the fingerprint of a second
    load must still be computed over the pre-trained values."""
    base, paths = three
    model = _load_all(base, {"a": paths["a"]})
    summary = load_adapter(model, paths["b"], adapter_name="b", combine=True)
    assert summary["fingerprint_mismatches"] == []


def test_bad_arguments(three):
    base, paths = three
    model = _load_all(base, paths)
    with pytest.raises(ValueError, match=r"an adapter is named twice"):
        sk.set_adapters(model, ["a", "a"])
    with pytest.raises(ValueError, match=r"2 adapter names but 3 weights"):
        sk.set_adapters(model, ["a", "b"], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"the weight of 'b' must be finite, got nan"):
        sk.set_adapters(model, ["a", "b"], [1.0, float("nan")])
    with pytest.raises(TypeError, match=r"the weight of 'a' must be a real number, got str"):
        sk.set_adapters(model, ["a"], ["1"])
    with pytest.raises(KeyError, match=r"no adapter named 'z'"):
        sk.set_adapters(model, ["a", "z"])
    with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string"):
        load_adapter(model, paths["a"], adapter_name="")
    with pytest.raises(ValueError, match=r"replace=True needs an adapter_name"):
        load_adapter(copy.deepcopy(base), paths["a"], replace=True)
    assert [v["active"] for v in sk.list_adapters(model).values()] == [False, False, True]  # untouched


def test_mixing_named_and_training_layers_is_refused(three):
    base, paths = three
    model = _load_all(base, {"a": paths["a"]})
    with pytest.raises(
        AdapterError, match=r"layer '0' holds named adapters \('a'\); load this one with adapter_name="
    ):
        load_adapter(model, paths["b"])
    with pytest.raises(ValueError, match=r"apply_sara: the model holds named adapters \('a'\)"):
        sk.apply_sara(model, sk.SaRAConfig(fraction=0.05))
    training = sk.apply_sara(copy.deepcopy(base), sk.SaRAConfig(fraction=0.05))
    with pytest.raises(
        AdapterError, match=r"is a SparseDeltaConv2d \(a model set up for training\); named adapters live"
    ):
        load_adapter(training, paths["a"], adapter_name="a")


def test_a_weight_written_behind_the_registry_is_refused(three):
    """load_state_dict (or an optimizer, or any write) after the load: the stored pre-trained values
    no longer describe the weights, and writing them back would mix two models silently."""
    base, paths = three
    model = _load_all(base, paths)
    other = _base_model(seed=8, dtype=base[0].weight.dtype)
    model.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match=r"the weight of layer '0' was written by something other than"):
        sk.set_adapters(model, "a")
    with pytest.raises(RuntimeError, match=r"was written by something other than"):
        sk.disable_adapters(model)
    assert _same_weights(model, other)  # nothing was written
    merge_and_unload(model)  # the way out: keep the weights as they are
    assert _same_weights(model, other)


def test_a_replaced_layer_is_refused(three):
    base, paths = three
    model = _load_all(base, paths)
    model[6] = nn.Linear(11, 13)
    with pytest.raises(RuntimeError, match=r"layer '6' was replaced since its adapters were loaded"):
        sk.set_adapters(model, "a")
    model = _load_all(base, paths)
    model[4].weight.data = torch.zeros(3, 5, dtype=base[0].weight.dtype)  # resized: the indices would not fit
    with pytest.raises(
        RuntimeError,
        match=r"disable_adapters: the weight of layer '4' changed shape since the load: \(11, 112\) -> \(3, 5\)",
    ):
        sk.disable_adapters(model)
    with pytest.warns(AdapterWarning, match=r"layer '4' changed shape since the load.*; left as it is"):
        sk.delete_adapter(model, ["a", "b", "c"])  # the way out: the broken layer is left alone
    assert multi_adapter.registry_of(model) is None
    assert _same_weights(model[:4], base[:4])


def test_tied_weights_are_refused_for_named_adapters(tmp_path):
    base = nn.Sequential(nn.Linear(19, 19), nn.Linear(19, 19))
    base[1].weight = base[0].weight
    trained = nn.Sequential(nn.Linear(19, 19), nn.Linear(19, 19))
    trained.load_state_dict(base.state_dict())
    for i in range(2):
        trained[i] = sk.SparseDeltaLinear.from_dense(trained[i], index=_random_index(trained[i], 30, i))
    save_adapter(trained, tmp_path / "tied.safetensors")
    with pytest.raises(AdapterError, match=r"layers '0' and '1' share one weight tensor"):
        load_adapter(base, tmp_path / "tied.safetensors", adapter_name="t")
    assert multi_adapter.registry_of(base) is None


def test_switching_while_a_forward_runs_in_another_thread_is_refused(three):
    base, paths = three
    model = _load_all(base, paths)
    inside, release = threading.Event(), threading.Event()

    def gate(module, args):  # runs inside the model's forward, before its first layer
        inside.set()
        release.wait(30)

    handle = model[0].register_forward_pre_hook(gate)
    worker = threading.Thread(target=lambda: model(_input(base[0].weight.dtype)))
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(RuntimeError, match=r"a forward through the model is running"):
            sk.set_adapters(model, "a")
    finally:
        release.set()
        worker.join(30)
        handle.remove()
    assert [v["active"] for v in sk.list_adapters(model).values()] == [False, False, True]


# ---------------------------------------------------------------------------------------------
# What a review found (each failed before its fix)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["data.copy_", "data[...]=", "data=", "vector_to_parameters"])
def test_writes_through_data_are_caught_and_the_base_can_be_loaded_again(three, how):
    """``.data`` writes (diffusers' EMAModel.copy_to, vector_to_parameters) bump no version
    counter; a switch must still not write stale pre-trained values over them."""
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, "a")
    weight = model[4].weight
    scaled = (weight.detach() * 1.01).to(weight.dtype)
    if how == "data.copy_":
        weight.data.copy_(scaled)
    elif how == "data[...]=":
        weight.data[:] = scaled
    elif how == "data=":
        weight.data = scaled.clone()
    else:
        params = list(model[4].parameters())
        torch.nn.utils.vector_to_parameters(
            torch.cat([scaled.reshape(-1), params[1].detach().reshape(-1)]), params
        )
    with pytest.raises(RuntimeError, match=r"the weight of layer '4' was written by something other than"):
        sk.disable_adapters(model)
    model.load_state_dict(base.state_dict())  # the base weights again: the way out the message names
    sk.set_adapters(model, ["b", "c"])
    assert _same_weights(model, _oracle(base, paths, {"b": 1.0, "c": 1.0}))
    sk.disable_adapters(model)
    assert _same_weights(model, base)


def test_an_interrupted_forward_does_not_block_switching(three):
    """KeyboardInterrupt skips the always_call hook; a pre-hook failing before the registry's
    runs its post-hook alone. Neither may leave switching refused for good."""
    base, paths = three
    model = _load_all(base, paths)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(_input(base[0].weight.dtype))
    handle.remove()
    sk.set_adapters(model, "a")  # refused forever before

    def fail(module, args):
        raise ValueError("a hook that fails")

    handle = model.register_forward_pre_hook(fail, prepend=True)  # before the registry's hook
    with pytest.raises(ValueError, match="a hook that fails"):
        model(_input(base[0].weight.dtype))
    handle.remove()
    sk.set_adapters(model, "b")
    assert _same_weights(model, _oracle(base, paths, {"b": 1.0}))


def test_compile_fullgraph(tmp_path):
    base = _base_model()
    paths = {n: _save(tmp_path, base, s, n) for s, n in enumerate(["a", "b"], 1)}
    model = _load_all(base, paths)
    compiled = torch.compile(model, fullgraph=True)  # the hooks' lock cannot be traced
    x = _input()
    for names in (["a"], ["a", "b"], []):
        sk.set_adapters(model, names)
        want = _oracle(base, paths, dict.fromkeys(names, 1.0)) if names else base
        torch.testing.assert_close(compiled(x), want(x), rtol=1e-5, atol=1e-6)


def test_deleting_the_model_frees_its_weights_without_the_cycle_collector(three):
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, ["a", "b"])
    sk.list_adapters(model)
    alive = weakref.ref(model[4].weight)
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_channels_last_weights(three):
    base, paths = three
    model = copy.deepcopy(base).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    for name, path in paths.items():
        load_adapter(model, path, adapter_name=name)  # refused: 'not contiguous' before
    for combo in ({"a": 1.0}, {"b": 0.5, "c": 2.0}):
        sk.set_adapters(model, list(combo), list(combo.values()))
        assert _same_weights(model, _oracle(base, paths, combo))
    model.to(memory_format=torch.contiguous_format)  # and back, between switches
    sk.set_adapters(model, "c")
    assert _same_weights(model, _oracle(base, paths, {"c": 1.0}))
    sk.disable_adapters(model)
    assert _same_weights(model, base)


def test_weights_as_numpy_and_tensor_scalars(three):
    np = pytest.importorskip("numpy")
    base, paths = three
    model = _load_all(base, paths)
    want = _oracle(base, paths, {"a": 0.5, "b": 2.0})
    for weights in ([np.float32(0.5), np.int64(2)], np.array([0.5, 2.0]), torch.tensor([0.5, 2.0])):
        sk.set_adapters(model, ["a", "b"], weights)
        assert _same_weights(model, want)
        sk.disable_adapters(model)
    sk.set_adapters(model, ["a", "b"], adapter_weights=[0.5, 2.0])  # diffusers' pipelines' name
    assert _same_weights(model, want)
    sk.set_adapters(model, ["c"], torch.tensor(0.25))
    assert _same_weights(model, _oracle(base, paths, {"c": 0.25}))


def test_delete_with_a_name_twice_changes_nothing(three):
    base, paths = three
    model = _load_all(base, paths)
    with pytest.raises(ValueError, match=r"delete_adapter: an adapter is named twice"):
        sk.delete_adapter(model, ["a", "a"])
    assert list(sk.list_adapters(model)) == ["a", "b", "c"]


def test_apply_sara_refuses_a_container_of_a_model_with_named_adapters(three):
    base, paths = three
    holder = nn.ModuleDict({"unet": _load_all(base, paths)})
    with pytest.raises(ValueError, match=r"apply_sara: 'unet' holds named adapters \('a', 'b', 'c'\)"):
        sk.apply_sara(holder, sk.SaRAConfig(fraction=0.05))


def test_setting_the_active_combination_again_writes_nothing(three, monkeypatch):
    base, paths = three
    model = _load_all(base, paths)
    sk.set_adapters(model, ["a", "b"], [1.0, 0.5])
    writes = []
    merge = multi_adapter._merge
    monkeypatch.setattr(multi_adapter, "_merge", lambda *args: writes.append(args) or merge(*args))
    sk.set_adapters(model, ["b", "a"], [0.5, 1.0])
    assert writes == []
    sk.set_adapters(model, ["b"], [0.5])
    assert len(writes) == 2 * len(LAYERS)  # a's entries restored, b's merged: per layer
    assert _same_weights(model, _oracle(base, paths, {"b": 0.5}))


def test_conv1d_conv3d_and_embedding_layers(tmp_path):
    """Named adapters on every layer kind an adapter file can hold."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(23, 9)
            self.conv1 = nn.Conv1d(9, 7, 3)
            self.conv3 = nn.Conv3d(7, 5, (2, 1, 1))

        def forward(self, tokens):  # tokens [N, 2, 12]
            x = self.embed(tokens).permute(0, 1, 3, 2).flatten(0, 1)  # [N*2, 9, 12]
            x = self.conv1(x)  # [N*2, 7, 10]
            x = x.reshape(-1, 2, 7, 10, 1).permute(0, 2, 1, 3, 4)  # [N, 7, 2, 10, 1]
            return self.conv3(x)

    torch.manual_seed(0)
    base = Net()
    paths = {}
    for seed, name in enumerate(["a", "b"], 1):
        trained = sk.apply_sara(copy.deepcopy(base), sk.SaRAConfig(fraction=0.2 + 0.1 * seed))
        with torch.no_grad():
            for p in sk.sparse_parameters(trained):
                p.normal_(0, 1e-2)
        trained(torch.randint(0, 23, (3, 2, 12)))  # merges
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_adapter(trained, paths[name])
    model = _load_all(base, paths)
    assert {type(m) for m in model.children()} == {nn.Embedding, nn.Conv1d, nn.Conv3d}
    tokens = torch.randint(0, 23, (3, 2, 12))
    for combo in ({"a": 1.0}, {"a": 0.5, "b": -1.0}, {"b": 2.0}):
        sk.set_adapters(model, list(combo), list(combo.values()))
        want = _oracle(base, paths, combo)
        assert _same_weights(model, want)
        assert torch.equal(model(tokens), want(tokens))
    sk.disable_adapters(model)
    assert _same_weights(model, base)
