"""Worker process for ``tests/test_fsdp.py`` (FSDP2 ``fully_shard``, CPU, gloo).

Launched by ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py --mode M --out DIR``.
Each rank trains the sharded model on its half of a fixed batch and writes what the test checks to
``DIR/<mode>_rank<r>.pt``; the test imports :func:`build_model`, :func:`make_batch`,
:func:`make_optimizer` and :func:`train` for the single-process run on the whole batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from helpers import ConvNet  # noqa: E402

import sara_kernels as sk  # noqa: E402

STEPS = 4
LR = 1e-2
BATCH = 8


def build_model() -> nn.Module:
    torch.manual_seed(1234)
    # Weights of 5, 15 and 3 rows: uneven dim-0 shards over 2 ranks (3+2, 8+7, 2+1).
    model = ConvNet(5, 15, 3, norm=False)
    return sk.apply_sara(model, sk.SaRAConfig(fraction=0.3))  # every layer has entries in both shards


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(BATCH, 3, 4, 4, generator=g), torch.randn(BATCH, 3, generator=g)


def make_optimizer(model: nn.Module, optimizer: str):
    params = sk.sparse_parameters(model)
    if optimizer == "sparse_adamw":
        return sk.SparseAdamW(params, lr=LR)
    return torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)  # merged by the post-step hook


def train(model, optimizer, x, y, steps=STEPS) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def edit_deltas(model: nn.Module) -> None:
    """Write every delta through ``.data`` (as diffusers' ``EMAModel.copy_to`` does)."""
    for _, layer in sk.sparse_layers(model):
        layer.sparse_delta.data.add_(0.01)


def _error(fn) -> str | None:
    try:
        fn()
    except RuntimeError as error:
        return str(error)
    return None


def run(mode: str, rank: int, world: int, out: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sara_kernels.integrations.fsdp import prepare_fsdp, save_adapter, shard_sara_model

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    result: dict = {"world": world}
    if mode == "unprepared":
        result["error"] = _error(lambda: fully_shard(model.fc1, mesh=mesh))
    elif mode == "not_ignored":
        prepare_fsdp(model, mesh)
        result["error"] = _error(lambda: fully_shard(model.fc1, mesh=mesh))
    elif mode == "shard_dim1":
        from torch.distributed.tensor import Shard

        deltas = prepare_fsdp(model, mesh)
        result["error"] = _error(
            lambda: fully_shard(
                model.fc1, mesh=mesh, ignored_params=deltas, shard_placement_fn=lambda p: Shard(p.dim() - 1)
            )
        )
    else:
        shard_sara_model(model, mesh, blocks=[model.conv, model.fc1, model.fc2])
        result["param_types"] = {n: type(p).__name__ for n, p in model.named_parameters()}
        optimizer = make_optimizer(model, mode)
        x, y = make_batch()
        result["losses"] = train(model, optimizer, x.chunk(world)[rank], y.chunk(world)[rank])
        layers = dict(sk.sparse_layers(model))
        result["deltas"] = {n: layer.sparse_delta.detach().clone() for n, layer in layers.items()}
        result["weights"] = {n: layer.weight.full_tensor().detach().clone() for n, layer in layers.items()}
        result["local_rows"] = {n: layer.weight.to_local().shape[0] for n, layer in layers.items()}
        edit_deltas(model)
        with torch.no_grad():  # the stale deltas are merged in this forward, shard and gathered weight
            result["edited_output"] = model(x)
        result["edited_weights"] = {
            n: layer.weight.full_tensor().detach().clone() for n, layer in layers.items()
        }
        result["state_dict_keys"] = sorted(model.state_dict().keys())
        result["reselect_error"] = _error(lambda: sk.reselect_(model, optimizer))
        save_adapter(model, os.path.join(out, f"{mode}.safetensors"))  # every rank; rank 0 writes
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode", choices=["sparse_adamw", "adamw", "unprepared", "not_ignored", "shard_dim1"], required=True
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = run(args.mode, rank, world, args.out)
    torch.save(result, os.path.join(args.out, f"{args.mode}_rank{rank}.pt"))


if __name__ == "__main__":
    main()
