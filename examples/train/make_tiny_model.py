#!/usr/bin/env python
"""Build a tiny local model folder and a matching data file for ``train_sara.py``, without a download.

Two families, as a pipeline folder lays them out:

* ``unet``: ``<folder>/unet`` (a ``UNet2DConditionModel`` with one cross-attention block per
  side) and ``<folder>/scheduler`` (``DDPMScheduler``);
* ``sd3``: ``<folder>/transformer`` (a two-block ``SD3Transformer2DModel``) and
  ``<folder>/scheduler`` (``FlowMatchEulerDiscreteScheduler``, shift 3 as in SD3).

The weights are drawn with a fixed seed, so the same call builds the same model bit for bit. The
data file holds random ``latents`` [N, 4, 8, 8], ``encoder_hidden_states`` [N, 8, 32] and, for
``sd3``, ``pooled_projections`` [N, 16], also from a fixed seed. Everything is small enough that a
training step takes milliseconds on a CPU::

    python examples/train/make_tiny_model.py --family sd3 --output_dir /tmp/tiny-sd3
    python examples/train/train_sara.py --pretrained_model_name_or_path /tmp/tiny-sd3 \\
        --train_data_file /tmp/tiny-sd3/train_data.safetensors --output_dir /tmp/run --max_train_steps 10

From Python: ``make_tiny_model(folder, "unet")`` and ``make_tiny_data(path, "unet")``.
"""

from __future__ import annotations

import argparse
import os

import torch

FAMILIES = ("unet", "sd3")
SUBFOLDERS = {"unet": "unet", "sd3": "transformer"}
LATENT_CHANNELS = 4
LATENT_SIZE = 8
TEXT_LENGTH = 8
TEXT_DIM = 32
POOLED_DIM = 16


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``family`` (``"unet"`` or ``"sd3"``), initialised from ``seed``."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(seed)
    if family == "unet":
        return UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=LATENT_SIZE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=16,  # = num_attention_heads * attention_head_dim
            pooled_projection_dim=POOLED_DIM,
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=16,
        )
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def make_tiny_model(folder: str | os.PathLike, family: str, seed: int = 0) -> str:
    """Write ``<folder>/<unet|transformer>`` and ``<folder>/scheduler``; returns ``folder``."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    folder = os.fspath(folder)
    model = tiny_model(family, seed)
    model.save_pretrained(os.path.join(folder, SUBFOLDERS[family]))
    if family == "unet":
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def tiny_data(family: str, num_samples: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors shaped like a data file for the tiny model of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    g = torch.Generator().manual_seed(seed)
    data = {
        "latents": torch.randn(num_samples, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=g),
        "encoder_hidden_states": torch.randn(num_samples, TEXT_LENGTH, TEXT_DIM, generator=g),
    }
    if family == "sd3":
        data["pooled_projections"] = torch.randn(num_samples, POOLED_DIM, generator=g)
    return data


def make_tiny_data(path: str | os.PathLike, family: str, num_samples: int = 16, seed: int = 0) -> str:
    """Write :func:`tiny_data` to the safetensors file ``path``; returns ``path``."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tiny_data(family, num_samples, seed), path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--output_dir", required=True, help="The model folder to write.")
    parser.add_argument(
        "--data_file", default=None, help="The data file (default: <output_dir>/train_data.safetensors)."
    )
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_tiny_model(args.output_dir, args.family, args.seed)
    data_file = args.data_file or os.path.join(args.output_dir, "train_data.safetensors")
    make_tiny_data(data_file, args.family, args.num_samples, args.seed)
    print(f"model: {args.output_dir}\ndata:  {data_file}")


if __name__ == "__main__":
    main()
