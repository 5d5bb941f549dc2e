"""Worker side of ``benchmarks/bench_unet.py``: workloads, methods and measurements.

Package-private helper: ``bench_unet.py`` runs every method in a fresh process
(``bench_unet.py --worker METHOD ...``), which calls :func:`run_worker` and prints one JSON object.
Nothing here is part of the ``sara_kernels`` API.

Measurement definitions (also in the JSON under ``"definitions"``):

* ``trainable``: entries the method trains (for ``dense_mask`` the selected entries, although its
  dense weights carry ``requires_grad``; ``dense_weight_grad_entries`` gives that count).
* ``state_bytes``: bytes of every tensor training holds: the trainable parameters, every ``.grad``,
  every tensor in the optimizer state, and the method's mask/index/base buffers; each storage
  counted once (by ``untyped_storage().data_ptr()``). Taken right after ``optimizer.step()`` and
  before ``zero_grad()``, when gradients are alive.
* ``peak_overhead_bytes``: CPU: peak RSS during the training/forward steps (``VmHWM`` after
  resetting it with ``echo 5 > /proc/self/clear_refs``; ``ru_maxrss`` if that is unavailable)
  minus the RSS right after the model is built (before the method is applied, so masks, indices
  and adapters count as overhead). ``malloc_trim(0)`` runs before both readings so that memory
  freed during set-up is not hiding in the baseline. GPU: ``torch.cuda.max_memory_allocated``
  minus ``memory_allocated`` after the build, same points.
* ``step_ms``: forward + noise-prediction MSE loss + backward + optimizer step + ``zero_grad``
  (set_to_none), one process, after ``warmup`` steps; ``fwd_ms``: the training forward alone
  (autograd recording, graph dropped), ``fwd_nograd_ms``: under ``torch.no_grad()``.
* ``activation_estimate`` (``frozen`` only): what full fine-tuning must additionally keep alive
  for its weight gradients: during one training forward of the frozen model, forward hooks
  collect the input of every Linear/Conv2d and a ``saved_tensors_hooks`` pack hook collects every
  tensor autograd saves; the estimate is the bytes of the distinct inputs whose storage is not
  among the saved ones (an input that the frozen graph already keeps, e.g. for a normalisation
  backward, costs nothing extra). Given for all Linear/Conv2d layers (``sara``'s floor) and for the
  attention linears (``sara_linear``'s). On the tiny UNet every Conv2d input turns out to be saved
  already by the frozen graph (convolution's autograd keeps its input even when only the input
  gradient is needed), so the whole estimate comes from Linear inputs.
* ``error: out of memory`` (with ``--memory-cap-gib``): after the build the worker's address space
  may grow by the cap minus its RSS (RLIMIT_AS), and the parent stops a worker whose RSS passes
  the cap; a failed allocation is reported as the method not fitting, with the allocator's message.
* DiT workloads (``flux_tiny``, ``sd3_tiny``, ``sd3_medium``): the same methods and measurements;
  the inputs are the model's own (packed latents and rotary ids for Flux, latents for SD3, text
  states and pooled projections, timesteps on the model's scale), the loss is the MSE of the
  output against noise of its shape.
* ``dense_mask`` keeps compact (k-sized) Adam moments, the lean form of the scheme; the official
  repository's ``optim/adamw2.py`` keeps dense moments and int32 masks, which costs far more memory
  (an earlier measurement of that variant: 682 MiB peak overhead on ``tiny``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
_SD15_COMMON = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    use_linear_projection=False,
)

class Workload(NamedTuple):
    config: dict  # the model class's constructor arguments
    latent: int  # latent height = width (before a DiT's patching)
    batch: int
    tokens: int  # text tokens
    family: str = "unet"  # "unet" (UNet2DConditionModel), "flux" (FluxTransformer2DModel), "sd3" (SD3Transformer2DModel)


#: Flux.1-dev's transformer is patch_size 1 on 2x2-packed 16-channel latents (in_channels 64),
#: 24 heads x 128, 19 double-stream and 38 single-stream blocks; the tiny one keeps the layout.
_FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True,
                  axes_dims_rope=(16, 24, 24))
_SD3_TINY = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=8, attention_head_dim=64, num_attention_heads=4,
                 joint_attention_dim=512, caption_projection_dim=256, pooled_projection_dim=256, out_channels=16,
                 pos_embed_max_size=64)
#: stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2.03B parameters).
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)

WORKLOADS = {
    "tiny": Workload(dict(_SD15_COMMON, sample_size=32, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256), 32, 2, 77),
    "sd15": Workload(dict(_SD15_COMMON, sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768), 64, 2, 77),
    "flux_tiny": Workload(_FLUX_TINY, 32, 2, 77, "flux"),
    "sd3_tiny": Workload(_SD3_TINY, 32, 2, 77, "sd3"),
    "sd3_medium": Workload(SD3_MEDIUM, 128, 1, 77, "sd3"),
}

#: Linear modules of the attention blocks (Super-Tuning / SHiRA / sara_linear targets). In the
#: SD1.5 config (use_linear_projection=False) proj_in/proj_out are 1x1 convolutions.
ATTN_LINEARS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
#: LoRA targets: attention linears, the transformer's proj_in/out, the resnets' convolutions.
LORA_TARGETS = ATTN_LINEARS + ["proj_in", "proj_out", "conv1", "conv2"]
#: DiT attention and feed-forward linears, for every Linear-only method and LoRA: the image
#: stream's q/k/v/out, the text stream's add_q/k/v_proj and to_add_out (joint attention), both
#: streams' feed-forwards, and Flux's single-stream MLP (proj_mlp, proj_out; the name proj_out
#: also takes the model's final output projection, a small layer). Not targeted: the AdaLN
#: modulation linears (norm1.linear, ...), the embedders and the time/text projections, which
#: diffusers' DreamBooth LoRA scripts leave out too; SaRA (sara) selects over every Linear.
DIT_LINEARS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]


def linear_targets(workload: str) -> list[str]:
    """The attention linears of ``workload``: Super-Tuning / SHiRA / sara_linear targets."""
    return ATTN_LINEARS if WORKLOADS[workload].family == "unet" else DIT_LINEARS


def lora_targets(workload: str) -> list[str]:
    return LORA_TARGETS if WORKLOADS[workload].family == "unet" else DIT_LINEARS


PAPER_THRESHOLD = 2e-3


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _rescale_std(fan_in: int) -> float:
    """Per-layer weight std of the synthetic 'pre-trained' UNet: 0.6/sqrt(fan_in) clamped to
    [0.02, 0.05] (trained SD UNet layers sit around 0.02-0.05)."""
    return min(0.05, max(0.02, 0.6 / math.sqrt(fan_in)))


@torch.no_grad()
def rescale_pretrained_like(model: nn.Module) -> None:
    """Rescale every Linear/Conv2d weight (diffusers' uniform Kaiming init) to the std of
    :func:`_rescale_std`; the shape of the distribution is kept, only its scale changes."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight
            fan_in = w[0].numel()
            std = float(w.float().std())
            if std > 0:
                w.mul_(_rescale_std(fan_in) / std)


def build_model(workload: str, pretrained: str | None, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``workload`` with random weights rescaled to a trained-model-like std, or a
    local checkpoint. Built directly in ``dtype`` (a 2B-parameter DiT would need 8 GB in fp32)."""
    import diffusers

    wl = WORKLOADS[workload]
    cls = {"unet": diffusers.UNet2DConditionModel, "flux": diffusers.FluxTransformer2DModel,
           "sd3": diffusers.SD3Transformer2DModel}[wl.family]
    torch.manual_seed(seed)
    if pretrained:
        sub = next((s for s in ("unet", "transformer") if os.path.isdir(os.path.join(pretrained, s))), None)
        return cls.from_pretrained(pretrained, subfolder=sub, torch_dtype=dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(**wl.config)
    finally:
        torch.set_default_dtype(default)
    rescale_pretrained_like(model)
    return model


def make_inputs(workload: str, config, batch: int, latent: int, generator: torch.Generator) -> tuple[dict, str, tuple]:
    """Random inputs of one training step: (forward keyword arguments, the name of the input that
    requires grad for ``frozen``, the shape of the noise target). Timesteps as each model expects
    them: integer 0-999 (UNet, through its own scheduler convention), float 0-1000 (SD3),
    float 0-1 (Flux, which multiplies by 1000)."""
    wl = WORKLOADS[workload]
    g = generator
    if wl.family == "unet":
        x = torch.randn(batch, config.in_channels, latent, latent, generator=g)
        kwargs = dict(sample=x, timestep=torch.randint(0, 1000, (batch,), generator=g),
                      encoder_hidden_states=torch.randn(batch, wl.tokens, config.cross_attention_dim, generator=g))
        return kwargs, "sample", (batch, config.out_channels, latent, latent)
    text = torch.randn(batch, wl.tokens, config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=g)
    if wl.family == "sd3":
        x = torch.randn(batch, config.in_channels, latent, latent, generator=g)
        kwargs = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=torch.rand(batch, generator=g) * 1000)
        return kwargs, "hidden_states", (batch, config.out_channels, latent, latent)
    # Flux: 2x2-packed latents, one token per packed pixel; rotary ids (0, row, col) / zeros for text.
    side = latent // 2
    x = torch.randn(batch, side * side, config.in_channels, generator=g)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    kwargs = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.rand(batch, generator=g), img_ids=img_ids, txt_ids=torch.zeros(wl.tokens, 3))
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return kwargs, "hidden_states", (batch, side * side, config.out_channels or config.in_channels)


def linear_conv_layers(model: nn.Module, linear_only: bool = False, targets: list[str] | None = None):
    types = (nn.Linear,) if linear_only else (nn.Linear, nn.Conv2d)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, types) and (targets is None or _matches(name, targets)):
            out.append((name, module))
    return out


# ---------------------------------------------------------------------------------------------
# Memory and timing helpers
# ---------------------------------------------------------------------------------------------
_libc = None


def malloc_trim() -> None:
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def proc_kib(path: str, field: str) -> int | None:
    """The kB value of ``field`` in a /proc file (``/proc/self/status``, ``/proc/meminfo``, ...); None
    where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _status_kib(field: str) -> int | None:
    return proc_kib("/proc/self/status", field)


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: fall back to the peak (the best we can read portably)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64  # reset took effect


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def limit_address_space(cap_bytes: int) -> None:
    """Let this process's resident memory grow to about ``cap_bytes`` and no further: the address
    space may grow by ``cap_bytes`` minus the current RSS (RLIMIT_AS), so an allocation past it
    fails with an out-of-memory error inside the process instead of swapping the machine."""
    size, rss = _status_kib("VmSize"), _status_kib("VmRSS")
    if size is None or rss is None:
        return
    limit = size * 1024 + max(0, cap_bytes - rss * 1024)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak_reset = True

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        malloc_trim()
        return rss_bytes()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            malloc_trim()
            self.peak_reset = reset_peak_rss()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn()`` takes, between two ``sync()`` calls when given. What ``fn``
    returns is released after the clock stops."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    seconds = time.perf_counter() - t0
    del out
    return seconds


def summarize(times_s: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times_s)
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return dict(median=statistics.median(ms), min=ms[0], max=ms[-1], q1=q[0], q3=q[2], n=len(ms), all=ms)


def tensor_bytes_once(tensors) -> tuple[int, int]:
    """(bytes, distinct storages) of ``tensors``, each storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        n = storage.nbytes()
        if n == 0:
            continue
        key = (str(t.device), storage.data_ptr())
        seen[key] = max(seen.get(key, 0), n)
    return sum(seen.values()), len(seen)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
METHODS = (
    "frozen",
    "full",
    "lora",
    "supertuning",
    "shira",
    "sara_linear",
    "dense_mask",
    "sara",
    "sara_torch_adamw",
    "sara_reference",
)

METHOD_HELP = {
    "frozen": "no trainable parameter; the input latents require grad so backward runs through the whole net (the floor)",
    "full": "torch.optim.AdamW on every parameter",
    "lora": "PEFT LoRA on attention linears, proj_in/out and resnet conv1/conv2, rank matched to K",
    "supertuning": "PEFT Super-Tuning (select_top=False: smallest |w|), attention linears only, sparsity matched to K",
    "shira": "PEFT SHiRA (random mask), attention linears only, r matched to K",
    "sara_linear": "sara_kernels + SparseAdamW on the same attention linears with the same K (like-for-like with supertuning/shira)",
    "dense_mask": "the official SaRA code's approach: dense weights trainable, dense bool masks, gradient gathered by mask, AdamW over compact moments",
    "sara": "sara_kernels + SparseAdamW, global count K over every Linear/Conv2d",
    "sara_torch_adamw": "sara_kernels with stock torch.optim.AdamW on the deltas",
    "sara_reference": "sara with SARA_KERNELS_BACKEND=reference (pure-PyTorch ops)",
}


@dataclasses.dataclass
class Setup:
    optimizer: torch.optim.Optimizer | None
    params: list[torch.Tensor]
    buffers: Callable[[], list[torch.Tensor]]
    save: Callable[[str], int] | None  # writes the adapter under a temp dir, returns its bytes
    trainable: int
    info: dict
    input_requires_grad: bool = False


def _file_or_dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _global_kth_abs(weights: list[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| over several tensors (bisection on float32 bit patterns)."""
    lo, hi = 0, 0x7F800000
    bits = lambda w: w.detach().reshape(-1).abs().float().view(torch.int32)  # noqa: E731
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(int((bits(w) <= mid).sum()) for w in weights) >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))


class DenseMaskAdamW(torch.optim.Optimizer):
    """The official SaRA repository's scheme, small: every targeted weight stays a dense trainable
    tensor (autograd forms its dense gradient), a dense bool mask per weight marks the selected
    entries, the gradient is masked (gathered at the mask) and AdamW runs over compact moments
    (k entries); the update is scattered back through the mask."""

    def __init__(self, weights, masks, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(list(weights), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.masks = {id(w): m for w, m in zip(self.param_groups[0]["params"], masks, strict=False)}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self.masks[id(p)]
                grad = p.grad[mask]  # the masked gradient, compact [k]
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
                state["step"] += 1
                step = float(state["step"])
                values = p[mask].float()
                values.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(grad.float(), 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad.float(), grad.float(), value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                values.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
                p[mask] = values.to(p.dtype)


def lora_rank(targets, K: int) -> int:
    """The LoRA rank whose A and B matrices over ``targets`` ((name, module) pairs) hold about K
    parameters."""
    per_rank = 0
    for _, m in targets:
        if isinstance(m, nn.Linear):
            per_rank += m.in_features + m.out_features
        else:
            per_rank += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
    return max(1, round(K / per_rank))


def setup_method(method: str, model: nn.Module, args, K: int, K_linear: int) -> Setup:
    lr = args.lr
    attn_linears, lora_modules = linear_targets(args.workload), lora_targets(args.workload)
    if method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return Setup(None, [], list, None, 0, {}, input_requires_grad=True)

    if method == "full":
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=lr)

        def save(d):
            path = os.path.join(d, "unet_state_dict.pt")
            torch.save(model.state_dict(), path)
            return os.path.getsize(path)

        return Setup(opt, params, list, save, sum(p.numel() for p in params), {"optimizer": "torch.optim.AdamW (defaults)"})

    if method in ("sara", "sara_torch_adamw", "sara_reference", "sara_linear"):
        import sara_kernels as sk

        if method == "sara_linear":
            cfg = sk.SaRAConfig(count=K_linear, target_modules=attn_linears)
        else:
            cfg = sk.SaRAConfig(count=K)
        sk.apply_sara(model, cfg)
        deltas = sk.sparse_parameters(model)
        if method == "sara_torch_adamw":
            opt = torch.optim.AdamW(deltas, lr=lr)
        else:
            opt = sk.SparseAdamW(deltas, lr=lr)
        layers = [m for _, m in sk.sparse_layers(model)]

        def buffers():
            out = []
            for m in layers:
                out += [m.sparse_index, m.sparse_base, m.sparse_frozen_delta]
            return out

        def save(d):
            path = os.path.join(d, "adapter.safetensors")
            sk.save_adapter(model, path)
            return os.path.getsize(path)

        summary = model.sara_summary
        info = {
            "optimizer": type(opt).__module__ + "." + type(opt).__name__,
            "layers": len(layers),
            "backend": os.environ.get("SARA_KERNELS_BACKEND", "auto"),
            "selection_threshold": summary.layers and float(layers[0].sparse_threshold or 0.0),
            "share_of_targeted": summary.share_of_targeted,
        }
        return Setup(opt, deltas, buffers, save, summary.total_k, info)

    if method == "dense_mask":
        layers = linear_conv_layers(model)
        weights = [m.weight for _, m in layers]
        kth = _global_kth_abs(weights, K)
        for p in model.parameters():
            p.requires_grad_(False)
        masks = []
        for w in weights:
            masks.append(w.detach().abs() <= kth)
            w.requires_grad_(True)
        opt = DenseMaskAdamW(weights, masks, lr=lr)
        selected = sum(int(m.sum()) for m in masks)

        def save(d):
            path = os.path.join(d, "sara_official_style.pt")
            names = [n for n, _ in layers]
            torch.save({n: {"values": w.detach()[m].clone(), "mask": m} for n, w, m in zip(names, weights, masks, strict=False)}, path)
            return os.path.getsize(path)

        info = {"dense_weight_grad_entries": sum(w.numel() for w in weights), "optimizer": "DenseMaskAdamW (benchmark)"}
        return Setup(opt, weights, lambda: masks, save, selected, info)

    # PEFT methods
    import peft

    for p in model.parameters():
        p.requires_grad_(False)
    if method == "lora":
        targets = linear_conv_layers(model, targets=lora_modules)
        r = lora_rank(targets, K)
        config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=lora_modules, init_lora_weights=True)
        info = {"rank": r, "targeted_layers": len(targets)}
    elif method == "supertuning":
        targets = linear_conv_layers(model, linear_only=True, targets=attn_linears)
        n = sum(m.weight.numel() for _, m in targets)
        config = peft.SupertuningConfig(target_modules=attn_linears, sparsity=1.0 - K_linear / n, select_top=False)
        info = {"sparsity": config.sparsity, "targeted_layers": len(targets)}
    elif method == "shira":
        targets = linear_conv_layers(model, linear_only=True, targets=attn_linears)
        per_rank = sum(m.in_features + m.out_features for _, m in targets)
        r = max(1, round(K_linear / per_rank))
        config = peft.ShiraConfig(r=r, target_modules=attn_linears, random_seed=args.seed)
        info = {"r": r, "targeted_layers": len(targets)}
    else:
        raise ValueError(f"unknown method {method!r}")
    peft_model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def buffers():
        out = [b for n, b in model.named_buffers() if "supertuning_indices" in n]
        for m in model.modules():
            idx = getattr(m, "shira_indices", None)
            if isinstance(idx, dict):
                out += [v for v in idx.values() if isinstance(v, torch.Tensor)]
        return out

    def save(d):
        peft_model.save_pretrained(d)
        files = [f for f in os.listdir(d) if f.startswith("adapter_model")]
        return sum(os.path.getsize(os.path.join(d, f)) for f in files)

    info["optimizer"] = "torch.optim.AdamW (defaults)"
    info["peft_version"] = peft.__version__
    return Setup(opt, params, buffers, save, sum(p.numel() for p in params), info)


# ---------------------------------------------------------------------------------------------
# Activation estimate (frozen worker)
# ---------------------------------------------------------------------------------------------
def activation_estimate(model: nn.Module, forward: Callable[[], torch.Tensor], attn_linears: list[str]) -> dict:
    saved: set[int] = set()
    inputs: dict[int, torch.Tensor] = {}  # storage ptr -> largest input tensor seen on it
    attn_ptrs: set[int] = set()  # storages consumed by an attention linear (sara_linear's layers)
    keep: list[torch.Tensor] = []

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    def make_hook(is_attn: bool):
        def hook(module, args, _out):
            x = args[0]
            keep.append(x)  # hold every input until the end, so no storage address is reused
            ptr = x.untyped_storage().data_ptr()
            if ptr not in inputs or inputs[ptr].numel() < x.numel():
                inputs[ptr] = x
            if is_attn:
                attn_ptrs.add(ptr)

        return hook

    handles = [
        m.register_forward_hook(make_hook(isinstance(m, nn.Linear) and _matches(n, attn_linears)))
        for n, m in linear_conv_layers(model)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    finally:
        for h in handles:
            h.remove()
    size = lambda x: x.numel() * x.element_size()  # noqa: E731
    extra_all = sum(size(x) for p, x in inputs.items() if p not in saved)
    extra_attn = sum(size(x) for p, x in inputs.items() if p not in saved and p in attn_ptrs)
    result = {
        "extra_bytes_all": extra_all,
        "extra_bytes_linear": extra_attn,
        "layer_input_bytes": sum(size(x) for x in inputs.values()),
        "distinct_inputs": len(inputs),
        "already_saved_inputs": sum(1 for p in inputs if p in saved),
    }
    keep.clear()
    del out
    return result


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------
def progress(msg: str) -> None:
    print("@progress " + msg, file=sys.stderr, flush=True)


def run_worker(method: str, args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = MemoryMeter(device)

    phases = {}
    t_phase = time.perf_counter()
    progress("building model")
    model = build_model(args.workload, args.pretrained, args.seed, dtype).to(device=device, dtype=dtype)
    model.train()
    layers = linear_conv_layers(model)
    entries = sum(m.weight.numel() for _, m in layers)
    attn_linears = linear_targets(args.workload)
    lin_entries = sum(m.weight.numel() for _, m in linear_conv_layers(model, linear_only=True, targets=attn_linears))
    K = int(round(args.budget * entries))
    # The Linear-only methods (supertuning, shira, sara_linear) get the same K on the attention
    # linears ('same-k', default) or the same density of them ('same-density').
    K_linear = K if args.linear_budget == "same-k" else int(round(args.budget * lin_entries))
    K_linear = min(K_linear, lin_entries)
    below = sum(int((m.weight.detach().abs() < PAPER_THRESHOLD).sum()) for _, m in layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_params = sum(p.numel() for p in model.parameters())

    wl = WORKLOADS[args.workload]
    latent = getattr(args, "latent", None) or wl.latent
    batch = args.batch or wl.batch
    g = torch.Generator().manual_seed(args.seed)
    inputs, grad_input, noise_shape = make_inputs(args.workload, model.config, batch, latent, g)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() and k not in ("timestep", "img_ids", "txt_ids")
              else v.to(device) for k, v in inputs.items()}
    noise = torch.randn(noise_shape, generator=g).to(device, dtype)
    latents = inputs[grad_input]

    baseline = meter.current()
    if getattr(args, "memory_cap_gib", None) and device.type == "cpu":
        limit_address_space(int(args.memory_cap_gib * 1024**3))
    phases["build"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()
    progress("applying method")
    setup = setup_method(method, model, args, K, K_linear)
    if setup.input_requires_grad:
        latents.requires_grad_(True)
    after_setup = meter.current()
    phases["setup"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()
    opt = setup.optimizer

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward():
        return model(**inputs).sample

    state = {}
    losses = []

    def step(account: bool = False):
        out = forward()
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        if opt is not None:
            opt.step()
        if account:
            trainable = list(setup.params)
            grads = [p.grad for p in trainable]
            opt_state = []
            if opt is not None:
                for s in opt.state.values():
                    opt_state += [v for v in s.values() if isinstance(v, torch.Tensor)]
            buffers = setup.buffers()
            parts = {
                "params": tensor_bytes_once(trainable)[0],
                "grads": tensor_bytes_once(grads)[0],
                "optimizer": tensor_bytes_once(opt_state)[0],
                "buffers": tensor_bytes_once(buffers)[0],
            }
            total, storages = tensor_bytes_once(trainable + grads + opt_state + buffers)
            state.update(bytes=total, storages=storages, parts=parts)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        latents.grad = None
        losses.append(float(loss))
        del out, loss

    meter.reset_peak()
    n_warm = max(1, args.warmup)
    for i in range(n_warm):
        progress(f"warm-up {i + 1}/{n_warm}")
        step(account=(i == n_warm - 1))
    times = []
    for i in range(args.steps):
        progress(f"step {i + 1}/{args.steps}")
        times.append(timed(step, sync))
    fwd_times, fwd_ng_times = [], []
    for i in range(args.fwd_steps):
        progress(f"forward {i + 1}/{args.fwd_steps}")
        fwd_times.append(timed(forward, sync))  # the graph is dropped after the clock stops
        with torch.no_grad():
            fwd_ng_times.append(timed(forward, sync))
    peak = meter.peak()
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    phases["measure"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()
    profiles = {}
    if getattr(args, "profile", False):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        for name, fn in (("step", step), ("forward", lambda: forward().sum().item())):
            progress(f"profiling {name}")
            with profile(activities=activities) as prof:
                fn()
                sync()
            profiles[name] = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60)

    result = {
        "method": method,
        "workload": args.workload if not args.pretrained else f"pretrained:{args.pretrained}",
        "family": wl.family,
        "model_params": model_params,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "latent": latent,
        "trainable": setup.trainable,
        "K": K,
        "K_linear": K_linear,
        "linear_conv_entries": entries,
        "attn_linear_entries": lin_entries,
        "share_below_paper_threshold": below / entries,
        "model_param_bytes": model_bytes,
        "state_bytes": state.get("bytes"),
        "state_parts": state.get("parts"),
        "state_storages": state.get("storages"),
        "baseline_bytes": baseline,
        "after_setup_bytes": after_setup,
        "peak_bytes": peak,
        "peak_overhead_bytes": peak - baseline,
        "peak_reset_ok": meter.peak_reset,
        "load_average_after_timing": load_after,  # > the CPU count: other processes shared the cores
        "step_ms": summarize(times),
        "fwd_ms": summarize(fwd_times),
        "fwd_nograd_ms": summarize(fwd_ng_times),
        "losses": losses,
        "info": setup.info,
    }
    if profiles:
        result["profile"] = profiles
    if setup.save is not None and not getattr(args, "no_adapter_size", False):
        progress("saving adapter")
        with tempfile.TemporaryDirectory() as d:
            result["adapter_bytes"] = setup.save(d)
    if method == "frozen":
        progress("activation estimate")
        result["activation_estimate"] = activation_estimate(model, forward, linear_targets(args.workload))
    phases["profile_save_estimate"] = time.perf_counter() - t_phase
    result["phase_s"] = phases
    return result


def environment() -> dict:
    import diffusers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import importlib.metadata as md

        env["peft"] = md.version("peft")
        env["sara_kernels"] = md.version("sara_kernels")
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def dump(result: dict) -> None:
    print(json.dumps(result), flush=True)

