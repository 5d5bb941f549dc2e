"""FSDP2 (``fully_shard``) on the CPU with gloo and 2 processes (``tests/fsdp_worker.py``): the
sharded run must follow the single-process run on the whole batch; unsupported uses are errors."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import load_module, run_workers

import sara_kernels as sk

HERE = os.path.dirname(os.path.abspath(__file__))


def _skip_without_fsdp2() -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")


def _launch(mode: str, out) -> list[dict]:
    _skip_without_fsdp2()
    return run_workers("fsdp_worker.py", mode, out)


def _worker():
    return load_module("sara_fsdp_worker", os.path.join(HERE, "fsdp_worker.py"))


@pytest.mark.parametrize("optimizer", ["sparse_adamw", "adamw"])
def test_fully_shard_matches_single_process(optimizer, tmp_path):
    """Weights sharded on dim 0 (uneven shards), deltas replicated: after 4 steps on half the batch
    each, both ranks hold the single-process deltas and merged weights."""
    ranks = _launch(optimizer, tmp_path)
    worker = _worker()
    reference = worker.build_model()
    opt = worker.make_optimizer(reference, optimizer)
    x, y = worker.make_batch()
    losses = worker.train(reference, opt, x, y)

    layers = dict(sk.sparse_layers(reference))
    assert sorted(layers) == ["conv", "fc1", "fc2"]
    for r, result in enumerate(ranks):
        assert result["world"] == 2
        types = result["param_types"]
        assert all(
            types[f"{n}.weight"] == "DTensor" and types[f"{n}.sparse_delta"] == "DeltaParameter"
            for n in layers
        )
        # each rank holds its torch.chunk share of the rows (5, 15, 3 rows: uneven)
        assert result["local_rows"] == (
            {"conv": 3, "fc1": 8, "fc2": 2} if r == 0 else {"conv": 2, "fc1": 7, "fc2": 1}
        )
        for name, layer in layers.items():
            assert layer.total_delta().abs().max() > 1e-3  # trained
            assert torch.equal(result["deltas"][name], ranks[0]["deltas"][name]), (r, name)
            assert torch.equal(result["weights"][name], ranks[0]["weights"][name]), (r, name)
            torch.testing.assert_close(
                result["deltas"][name], layer.sparse_delta.detach(), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(result["weights"][name], layer.weight.detach(), rtol=1e-5, atol=1e-6)
            # merged invariant in the gathered weight
            merged = layer.sparse_base.float() + result["deltas"][name]
            assert torch.equal(result["weights"][name].view(-1)[layer.sparse_index.long()], merged)
        assert "fc1.sparse_delta" in result["state_dict_keys"] and "fc1.weight" in result["state_dict_keys"]
        # re-selection on a sharded model is refused with a message, nothing changed
        assert "not supported after prepare_fsdp" in result["reselect_error"]
    # each rank's loss is over half the batch: their mean is the full-batch loss
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-5, atol=1e-6)

    # deltas written through .data after training: the next forward merges them on every rank
    worker.edit_deltas(reference)
    with torch.no_grad():
        edited = reference(x)
    for result in ranks:
        torch.testing.assert_close(result["edited_output"], edited, rtol=1e-5, atol=1e-6)
        for name, layer in layers.items():
            torch.testing.assert_close(
                result["edited_weights"][name], layer.weight.detach(), rtol=1e-5, atol=1e-6
            )

    # the adapter written by rank 0 gives a fresh single-process model the reference weights
    fresh = worker.build_model()
    sk.load_adapter(fresh, tmp_path / f"{optimizer}.safetensors")
    for name, layer in sk.sparse_layers(fresh):
        torch.testing.assert_close(layer.weight.detach(), layers[name].weight.detach(), rtol=1e-5, atol=1e-6)


def test_fully_shard_without_prepare_is_an_error(tmp_path):
    ranks = _launch("unprepared", tmp_path)
    for result in ranks:
        assert "SparseDeltaLinear 'fc1'" in result["error"] and "prepare_fsdp" in result["error"]


def test_fully_shard_sharding_the_deltas_is_an_error(tmp_path):
    ranks = _launch("not_ignored", tmp_path)
    for result in ranks:
        assert "'fc1'" in result["error"] and "ignored_params" in result["error"]


def test_fully_shard_on_another_dim_is_an_error(tmp_path):
    ranks = _launch("shard_dim1", tmp_path)
    for result in ranks:
        assert "'fc1'" in result["error"] and "Shard(0)" in result["error"]
