"""Worker process for the DDP / accelerate tests in ``tests/test_integration.py``.

Launched by ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py --mode M --out DIR``
(CPU, gloo). Each rank trains a small ``apply_sara``'d model with ``SparseAdamW`` on its shard of
a fixed batch and writes what the test checks to ``DIR/<mode>_rank<r>.pt``. The test imports
:func:`build_model`, :func:`make_batch` and :func:`train` to run the single-process reference on
the whole batch.
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
BATCH = 8  # split evenly over the ranks: the mean of the shard means is the full-batch mean


def build_model() -> nn.Module:
    torch.manual_seed(1234)
    return sk.apply_sara(ConvNet(6, 24, 3), sk.SaRAConfig(fraction=0.1))


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(BATCH, 3, 4, 4, generator=g), torch.randn(BATCH, 3, generator=g)


def train(model, optimizer, x, y, steps=STEPS, backward=None) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def delta_names(model: nn.Module) -> list[str]:
    return [f"{name}.sparse_delta" for name, _ in sk.sparse_layers(model)]


def report(model: nn.Module, trainable: list[str], losses: list[float], extra: dict) -> dict:
    return {
        "trainable": trainable,
        "delta_names": delta_names(model),
        "deltas": {
            f"{n}.sparse_delta": layer.sparse_delta.detach().clone() for n, layer in sk.sparse_layers(model)
        },
        "weights": {n: layer.weight.detach().clone() for n, layer in sk.sparse_layers(model)},
        "with_grad": [n for n, p in model.named_parameters() if p.grad is not None],
        "losses": losses,
        **extra,
    }


def train_with_reselection(model, optimizer, x, y, reselect: bool, backward=None) -> tuple[list[float], dict]:
    """STEPS steps; with ``reselect``, re-selection (progressive parameter adjustment) then STEPS
    more, on the same wrapped model and optimizer: nothing is rebuilt."""
    losses = train(model, optimizer, x, y, backward=backward)
    if not reselect:
        return losses, {}
    summary = sk.reselect_(getattr(model, "module", model), optimizer)
    losses += train(model, optimizer, x, y, backward=backward)
    return losses, {"kept": summary.kept, "frozen": summary.frozen}


def run_ddp(rank: int, world: int, reselect: bool = False) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    model = build_model()
    ddp = DDP(model)
    trainable = [n for n, p in ddp.module.named_parameters() if p.requires_grad]
    optimizer = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    x, y = make_batch()
    losses, extra = train_with_reselection(ddp, optimizer, x.chunk(world)[rank], y.chunk(world)[rank], reselect)
    logging = ddp._get_ddp_logging_data() if hasattr(ddp, "_get_ddp_logging_data") else {}
    extra.update(
        world=world,
        reducer_bytes=logging.get("total_parameter_size_bytes"),
        reducer_tensors=logging.get("num_parameter_tensors"),
    )
    out = report(model, trainable, losses, extra)
    dist.destroy_process_group()
    return out


def run_accelerate(rank: int, world: int, reselect: bool = False) -> dict:
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel as DDP

    accelerator = Accelerator(cpu=True)
    model = build_model()
    optimizer = sk.SparseAdamW(sk.sparse_parameters(model), lr=LR)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(wrapped)
    trainable = [n for n, p in inner.named_parameters() if p.requires_grad]
    x, y = make_batch()
    i, n = accelerator.process_index, accelerator.num_processes
    losses, extra = train_with_reselection(
        wrapped, optimizer, x.chunk(n)[i], y.chunk(n)[i], reselect, backward=accelerator.backward
    )
    extra.update(
        world=n,
        rank=i,
        distributed_type=str(accelerator.distributed_type),
        wrapped_in_ddp=isinstance(wrapped, DDP),
        same_module=inner is model,
    )
    out = report(model, trainable, losses, extra)
    accelerator.wait_for_everyone()
    # Tear the process group down before exit: left to the interpreter's shutdown, gloo's threads
    # can abort the process ("terminate called without an active exception") after the work is done.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "accelerate"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reselect", action="store_true", help="re-select half-way, keep training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = (run_ddp if args.mode == "ddp" else run_accelerate)(rank, world, args.reselect)
    torch.save(result, os.path.join(args.out, f"{args.mode}_rank{rank}.pt"))


if __name__ == "__main__":
    main()
