"""What several test modules, and the distributed workers they launch, build the same way: random
inputs (values never zero, sorted indices without duplicates) and the tolerances of the sampled
gradients, a thread limit, a small conv + MLP net, the tiny diffusers models, loading a script as a
module, and a 2-process ``torch.distributed.run`` launch on the CPU.

The tests import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``); the workers, run as
scripts from ``tests/``, find it next to them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def random_values(shape, dtype=torch.float32, device="cpu", scale=1.0, *, generator=None) -> torch.Tensor:
    """Random values bounded away from zero (|v| in [0.1, 1] * scale, either sign): a missing or
    extra term always shows."""
    t = torch.rand(shape, dtype=torch.float64, generator=generator) * 0.9 + 0.1
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()
    return (t * sign * scale).to(dtype=dtype, device=device)


def random_normal(*shape, dtype=torch.float32, gen=None, device="cpu") -> torch.Tensor:
    """Random normal values, never exactly zero (|v| < 1e-3 becomes 0.5)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)
    return t.to(dtype).to(device)


def random_index(
    numel: int, density, device="cpu", dtype=torch.int32, *, generator=None, minimum=0
) -> torch.Tensor:
    """A random index into ``numel`` entries, sorted, without duplicates. ``density``: a fraction,
    an int count, ``"none"`` or ``"one"``; at least ``minimum`` entries."""
    if density == "none":
        k = 0
    elif density == "one":
        k = 1
    elif isinstance(density, int):
        k = density
    else:
        k = round(numel * density)
    k = max(minimum, min(numel, k))
    return torch.randperm(numel, generator=generator)[:k].sort().values.to(dtype=dtype, device=device)


def grad_tol(device: str, dtype, terms: int) -> dict:
    """fp32 (fp64) sums of ``terms`` products against the exact fp64 sum: the CPU kernels sum in
    a fixed order close to the reference's, the CUDA kernels in split / tensor-core orders."""
    t = max(terms, 1)
    if device == "cpu":
        if dtype == torch.float64:
            return dict(rtol=1e-10, atol=1e-10 * t)
        return dict(rtol=2e-5, atol=2e-6 * t)
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-10 * t)
    return dict(rtol=1e-4, atol=1e-6 + 2e-6 * t)


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


class ConvNet(nn.Module):
    """``conv`` (3 -> ``channels``, 3x3) -> ``norm`` (GroupNorm(2), or none) -> GELU -> ``fc1`` ->
    GELU -> ``fc2`` on (N, 3, 4, 4) inputs: the module kinds SaRA meets in a UNet, small."""

    def __init__(self, channels: int, hidden: int, outputs: int, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels) if norm else None
        self.fc1 = nn.Linear(channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x):
        h = self.conv(x)
        if self.norm is not None:
            h = self.norm(h)
        h = F.gelu(h).flatten(1)
        return self.fc2(F.gelu(self.fc1(h)))


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


# ---------------------------------------------------------------------------------------------
# Scripts and processes
# ---------------------------------------------------------------------------------------------
def load_module(name: str, path: str) -> ModuleType:
    """The Python file at ``path``, imported as a module called ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script: str, *args: str, processes: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` on this host, ``processes`` ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args,
    ]  # fmt: skip


def run_workers(worker: str, mode: str, out, *args: str) -> list[dict]:
    """Runs ``tests/<worker> --mode <mode> --out <out> [args]`` on 2 CPU ranks (one thread each) and
    returns what each rank saved as ``<out>/<mode>_rank<r>.pt``."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    cmd = torchrun_command(os.path.join(HERE, worker), "--mode", mode, "--out", str(out), *args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"{mode}_rank{r}.pt") for r in range(2)]
