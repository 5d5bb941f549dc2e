"""What several test modules build the same way: a thread limit and the tiny diffusers models.

The tests import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside the block; the previous count restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Autouse in the modules that import it. The models there are tiny: one intra-op thread avoids
    OpenMP barrier stalls (tens of ms per op) when the CPU is shared, and makes the suite's runtime
    predictable."""
    with one_thread():
        yield



# ---------------------------------------------------------------------------------------------
# Tiny diffusers models (no downloads)
# ---------------------------------------------------------------------------------------------
#: The down path of the tiny SD1.5-style UNet (its ControlNet copies it).
SD15_ENCODER = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
)

#: name: (diffusers class, tiny config)
TINY_MODELS = {
    "sd15_unet": (
        "UNet2DConditionModel",
        dict(SD15_ENCODER, sample_size=8, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    ),
    "sdxl_unet": (
        "UNet2DConditionModel",
        dict(  # the SD1.5 widths; SDXL's block order, heads, depths and text-time conditioning
            SD15_ENCODER,
            sample_size=8,
            attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 16,
        ),
    ),
    "sd3": (
        "SD3Transformer2DModel",
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=16,
        ),
    ),
    "flux": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        ),
    ),
    "pixart": (
        "PixArtTransformer2DModel",
        dict(
            sample_size=8,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=16,
            caption_channels=16,
            norm_num_groups=1,
            patch_size=2,
        ),
    ),
    "sana": (
        "SanaTransformer2DModel",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            patch_size=1,
        ),
    ),
    "wan": (
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        ),
    ),
    "cogvideox": (
        "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=1,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=8,
        ),
    ),
    "svd": (
        "UNetSpatioTemporalConditionModel",
        dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 32),
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=12,
            layers_per_block=1,
            cross_attention_dim=16,
            transformer_layers_per_block=1,
            num_attention_heads=(2, 2),
        ),
    ),
    "unet2d": (
        "UNet2DModel",
        dict(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        ),
    ),
    "vae": (
        "AutoencoderKL",
        dict(
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        ),
    ),
    "controlnet": (
        "ControlNetModel",
        dict(SD15_ENCODER, conditioning_embedding_out_channels=(8, 16)),
    ),
    "hunyuandit": (
        "HunyuanDiT2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            patch_size=2,
            sample_size=8,
            hidden_size=16,
            num_layers=2,
            cross_attention_dim=16,
            cross_attention_dim_t5=16,
            pooled_projection_dim=8,
            text_len=4,
            text_len_t5=4,
        ),
    ),
}


def build_tiny(name: str) -> nn.Module:
    """The tiny model of ``TINY_MODELS[name]`` (seed 0)."""
    import diffusers

    cls_name, config = TINY_MODELS[name]
    torch.manual_seed(0)
    return getattr(diffusers, cls_name)(**config)
