"""``apply_sara`` on thirteen diffusers architectures built from tiny configs (``helpers.TINY_MODELS``, no downloads): every
Linear / Conv1d / Conv2d / Conv3d / Embedding is converted or listed in the summary with a reason,
and every other parameter is accounted for in ``sara_summary.frozen`` (nothing is frozen silently).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_MODELS, build_tiny
from torch import nn

import sara_kernels as sk
from sara_kernels.nn import (
    SparseDeltaConv1d,
    SparseDeltaConv2d,
    SparseDeltaConv3d,
    SparseDeltaEmbedding,
    SparseDeltaLinear,
)

pytest.importorskip("diffusers")

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
SPARSE = (SparseDeltaLinear, SparseDeltaConv1d, SparseDeltaConv2d, SparseDeltaConv3d, SparseDeltaEmbedding)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_adaptable_layer_is_converted_or_reported(name):
    model = build_tiny(name)
    before = {n: type(m) for n, m in model.named_modules() if isinstance(m, ADAPTABLE)}
    parameters = {n: p.numel() for n, p in model.named_parameters()}
    with torch.no_grad():  # no exact zeros (a ControlNet's zero convolutions would be left out)
        for p in model.parameters():
            p.add_(torch.where(p == 0, 1e-3, 0.0))
    sk.apply_sara(model, sk.SaRAConfig(fraction=0.05))
    summary = model.sara_summary
    skipped = {s.name for s in summary.skipped}
    converted = {n for n, m in model.named_modules() if isinstance(m, SPARSE)}
    assert converted, name
    for module_name, kind in before.items():
        assert module_name in converted or module_name in skipped, (name, module_name, kind.__name__)
    assert {layer.name for layer in summary.layers} <= converted
    # every parameter is adapted, trained densely or listed as frozen
    adapted = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, SPARSE))
    frozen = sum(f.numel for f in summary.frozen)
    trained = sum(count for _, count in summary.trained_parameters)
    weights_of_converted = sum(
        parameters[f"{n}.weight" if n else "weight"]
        for n in converted
        if (f"{n}.weight" if n else "weight") in parameters
    )
    assert adapted == weights_of_converted
    assert adapted + frozen + trained == sum(parameters.values()), (name, adapted, frozen, trained)
    # one step of the optimizer touches only the deltas (and what the config trains densely)
    params = sk.sparse_parameters(model)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)
