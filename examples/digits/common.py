"""Data, models, cache and sampling for the digits study (no downloads: scikit-learn's bundled digits).

Everything here is seeded; the pre-trained UNet and the feature classifier are cached as
safetensors files keyed by a hash of their configuration, written atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
CACHE_VERSION = 1


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sara_kernels", "examples", "digits")


def config_key(config: dict) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **config}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(
            {k: v.detach().contiguous().clone() for k, v in tensors.items()},
            tmp,
            metadata={k: json.dumps(v) for k, v in metadata.items()},
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
IMAGE_SIZE = 16
SPLIT_SEED = 0
TRAIN_SHARE = 0.6


def load_digits_16(split_seed: int = SPLIT_SEED, train_share: float = TRAIN_SHARE) -> dict:
    """The 1,797 scikit-learn digits, 8x8 (0..16) upsampled bilinearly to 16x16 in [-1, 1].

    Split per class, seeded: ``train_share`` of each class to ``train``, the rest to ``test``.
    Returns ``{"train": (x, y), "test": (x, y)}`` with x ``[N, 1, 16, 16]`` float32, y int64.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(split_seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_train = int(round(train_share * idx.numel()))
        train_idx.append(idx[:n_train])
        test_idx.append(idx[n_train:])
    train_idx = torch.cat(train_idx).sort().values
    test_idx = torch.cat(test_idx).sort().values
    return {"train": (x[train_idx], y[train_idx]), "test": (x[test_idx], y[test_idx])}


def select_classes(split: tuple[torch.Tensor, torch.Tensor], classes) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split
    keep = torch.isin(y, torch.tensor(list(classes)))
    return x[keep], y[keep]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
#: The denoiser: a small diffusers UNet2DModel (16x16 -> 8x8 -> 4x4, self-attention at 8x8).
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)

#: The diffusion process: 1000-step DDPM, cosine schedule (better than linear at 16x16) and
#: v-prediction (with epsilon-prediction, 20-step DDIM sampling left speckled blobs in ~10% of
#: the samples of this small model; with v-prediction they are clean).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
)


def build_unet(config: dict | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or UNET_CONFIG))


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits; ``features`` (64-d, the penultimate layer) feeds the
    Fréchet distance, ``forward`` gives the 10 class logits."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(64 * 16, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FeatureExtractor(nn.Module):
    """The classifier's 64-d penultimate features, as torchmetrics' FID ``feature=`` module."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())


# ---------------------------------------------------------------------------------------------
# Training of the cached models
# ---------------------------------------------------------------------------------------------
def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def augment_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels (background -1 fills in)."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(n):
        out[i] = pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def train_classifier(data: dict, cfg: dict, log=print) -> DigitClassifier:
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    model = DigitClassifier()
    x, y = data["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    steps_per_epoch = math.ceil(x.shape[0] / cfg["batch"])
    total = cfg["epochs"] * steps_per_epoch
    step = 0
    model.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg["batch"] : (i + 1) * cfg["batch"]]
            xb = augment_shift(x[idx], g)
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * cosine_lr(step, total, warmup=min(20, total // 10 + 1))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    xt, yt = data["test"]
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    model.test_accuracy = acc
    log(f"classifier: {total} steps, held-out accuracy {acc:.2%}")
    return model


def pretrain_unet(data: dict, cfg: dict, log=print):
    """DDPM pre-training on ``cfg['classes']`` (train split); returns the EMA weights' model."""
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    model = build_unet(cfg["unet"])
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scheduler = build_scheduler()
    x, _ = select_classes(data["train"], cfg["classes"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg["steps"]):
        idx = torch.randint(0, x.shape[0], (cfg["batch"],), generator=g)
        loss = diffusion_loss(model, scheduler, x[idx], g)
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * cosine_lr(step, cfg["steps"], warmup=cfg["warmup"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        if (step + 1) % max(1, cfg["steps"] // 10) == 0:
            log(
                f"pre-training: step {step + 1}/{cfg['steps']} loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    model.load_state_dict(ema)
    model.eval()
    return model


def diffusion_loss(model, scheduler, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The DDPM loss (for the scheduler's prediction type) at uniformly drawn timesteps."""
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
    noisy = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif scheduler.config.prediction_type == "sample":
        target = x0
    else:
        target = noise
    return F.mse_loss(model(noisy, t).sample, target)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, n: int, steps: int, seed: int, batch: int = 500) -> torch.Tensor:
    """``n`` images in [-1, 1] by deterministic DDIM (eta=0) with ``steps`` steps, from noise
    seeded by ``seed`` (the same noise for every method: paired comparisons)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=True)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 1, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch):
        x = noise[start : start + batch]
        for t in ddim.timesteps:
            eps = model(x, t).sample
            x = ddim.step(eps, t, x).prev_sample
        out.append(x.clamp(-1.0, 1.0))
    model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
_libc = None


def malloc_trim() -> None:
    global _libc
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    """A kB field of ``/proc/self/status``; None off Linux."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class PeakRSS:
    """Peak resident memory of this process over a block, above the RSS at its start.

    Linux: resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads
    ``VmHWM``. Elsewhere falls back to ``resource.getrusage`` (a process-lifetime peak)."""

    def __enter__(self):
        malloc_trim()
        self.exact = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
            self.exact = hwm is not None and rss is not None and hwm <= rss + 64
        self.start = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_above_start = max(0, peak - self.start)
        return False
