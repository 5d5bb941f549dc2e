"""What the Conv3d sampled weight gradient costs next to the dense one, on SVD/Wan-like shapes (CPU).

    python benchmarks/bench_conv3d_sampled_grad.py [--threads 1] [--repeats 5] [--out FILE.json]

For each shape and density: the median time of ``torch.nn.grad.conv3d_weight`` (the dense
``[O, C/g, kT, kH, kW]`` gradient, what a dense Conv3d's backward computes for its weight) and of
``sara_kernels.ops.sampled_weight_grad_conv3d`` (one conv2d sampled gradient per temporal tap over
the frames that tap reads) on the native CPU backend, plus the bytes each result holds. Both
results are checked against each other first. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import torch

import sara_kernels as sk
from sara_kernels import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _unet_bench as ub  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    x_shape: tuple[int, ...]  # [N, C, T, H, W]
    out_channels: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    density: float


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    entries: int
    dense_ms: float
    sampled_ms: float
    dense_bytes: int
    sampled_bytes: int


def get_configs() -> list[Config]:
    shapes = [
        # SVD's temporal ResNet conv (kernel 3x1x1 over 14 frames), first and second level at a
        # 64x64 latent cut to 16x16 / 8x8 to fit a CPU run
        ("svd temporal 320ch", (1, 320, 14, 16, 16), 320, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
        ("svd temporal 640ch", (1, 640, 14, 8, 8), 640, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
        # Wan's patch embedding (1x2x2, stride 1x2x2) into 1536 channels
        ("wan patch embed", (1, 16, 5, 32, 32), 1536, (1, 2, 2), (1, 2, 2), (0, 0, 0)),
        # a full 3x3x3 convolution
        ("3x3x3 conv 64ch", (1, 64, 8, 16, 16), 64, (3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ]
    return [Config(*shape, density) for shape in shapes for density in (0.01, 0.05)]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median([ub.timed(fn) * 1e3 for _ in range(repeats)])


def run_experiment(config: Config, repeats: int) -> Result:
    torch.manual_seed(0)
    x = torch.randn(config.x_shape)
    weight_shape = [config.out_channels, config.x_shape[1], *config.kernel]
    out = torch.nn.functional.conv3d(x, torch.zeros(weight_shape), None, config.stride, config.padding)
    grad = torch.randn(out.shape)
    numel = torch.Size(weight_shape).numel()
    k = max(1, round(config.density * numel))
    index = torch.randperm(numel)[:k].sort().values.to(torch.int32)
    args = (list(config.stride), list(config.padding), [1, 1, 1], 1)

    def dense():
        return torch.nn.grad.conv3d_weight(x, weight_shape, grad, *args)

    def sampled():
        return ops.sampled_weight_grad_conv3d(grad, x, index, weight_shape, *args)

    with sk.use_backend("cpu"):
        torch.testing.assert_close(sampled(), dense().reshape(-1)[index.long()], rtol=1e-4, atol=1e-3)
        sampled_ms = _median_ms(sampled, repeats)
    dense_ms = _median_ms(dense, repeats)
    return Result(config, k, dense_ms, sampled_ms, numel * 4, k * 4)


def print_results(results: list[Result]) -> None:
    print(f"{'shape':<22} {'density':>7} {'k':>9} {'dense ms':>9} {'sampled ms':>10} {'ratio':>6}")
    for r in results:
        c = r.config
        ratio = r.sampled_ms / r.dense_ms
        print(
            f"{c.name:<22} {c.density:>7.0%} {r.entries:>9} {r.dense_ms:>9.1f} "
            f"{r.sampled_ms:>10.1f} {ratio:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "conv3d_sampled_grad_cpu.json"),
    )
    args = parser.parse_args()
    if not sk.backends()["native"]["loaded"]:
        raise SystemExit("the native CPU backend is not built; build the extension first")
    torch.set_num_threads(args.threads)
    results = [run_experiment(config, args.repeats) for config in get_configs()]
    print_results(results)
    report = {
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "results": [
            {
                **dataclasses.asdict(r.config),
                **{k: v for k, v in dataclasses.asdict(r).items() if k != "config"},
            }
            for r in results
        ],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
