"""The fine-tuning methods of the digits study, all at one trainable budget K.

K is the trainable parameter count of PEFT LoRA at rank ``LORA_RANK`` on every Linear and Conv2d
layer of the UNet; SaRA (and its ablations) train exactly K weight entries of the same layers,
PEFT Super-Tuning K entries of the Linear layers (it supports nn.Linear only), and full
fine-tuning trains every parameter (the usual reference, not at the budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import sara_kernels as sk

#: LoRA rank that sets the budget K (rank 2 = 5% of the targeted weights in this UNet).
LORA_RANK = 2

#: Weight of SaRA's nuclear-norm term (the library README's value; one random layer per step,
#: as the paper's code does).
NUCLEAR_WEIGHT = 5e-4

#: (kind, progressive re-selection, low-rank constraint); the display name is in LABELS.
METHODS: dict[str, tuple[str, bool, bool]] = {
    "full": ("full", False, False),
    "lora": ("lora", False, False),
    "supertuning": ("supertuning", False, False),
    "sara": ("sara", True, True),
    "sara_no_progressive": ("sara", False, True),
    "sara_no_lowrank": ("sara", True, False),
    "sara_plain": ("sara", False, False),
}

LABELS = {
    "pretrained": "pre-trained (no fine-tuning)",
    "full": "full fine-tuning",
    "lora": f"LoRA (PEFT, r={LORA_RANK})",
    "supertuning": "Super-Tuning (PEFT, Linear only)",
    "sara": "SaRA",
    "sara_no_progressive": "SaRA w/o progressive",
    "sara_no_lowrank": "SaRA w/o low-rank",
    "sara_plain": "SaRA w/o both",
}

#: Learning rates per task: the best of the grid {3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1} for each
#: method (``run_study.py --tune``: same steps, batch, schedule, seed and criterion for every
#: method; results/tuning.md). SaRA's ablations use SaRA's rate.
LEARNING_RATES = {
    "backbone": {"full": 3e-4, "lora": 1e-2, "supertuning": 1e-2, "sara": 1e-2},
    "downstream": {"full": 3e-3, "lora": 3e-2, "supertuning": 3e-2, "sara": 3e-2},
}


def supertuning_available() -> bool:
    import peft

    return hasattr(peft, "SupertuningConfig")


def learning_rate(method: str, task: str) -> float:
    rates = LEARNING_RATES[task]
    return rates.get(method, rates[METHODS[method][0]])


def target_layers(model: nn.Module, linear_only: bool = False) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / nn.Conv2d of the UNet (the common target set), in model order."""
    types = (nn.Linear,) if linear_only else (nn.Linear, nn.Conv2d)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


def lora_parameters_per_rank(model: nn.Module) -> int:
    """LoRA trainable parameters per unit of rank over the target layers (A: in -> r with the
    layer's kernel, B: r -> out 1x1)."""
    total = 0
    for _, m in target_layers(model):
        if isinstance(m, nn.Linear):
            total += m.in_features + m.out_features
        else:
            total += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
    return total


def budget(model: nn.Module) -> int:
    return LORA_RANK * lora_parameters_per_rank(model)


@dataclasses.dataclass
class Setup:
    model: nn.Module  # what to call (a PeftModel wraps the UNet)
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    trainable: int
    after_step: Callable[[], None]
    regularizer: Callable[[], torch.Tensor] | None
    info: dict


def setup_method(method: str, unet: nn.Module, *, k: int, lr: float, steps: int, seed: int) -> Setup:
    """Convert / wrap ``unet`` in place for ``method`` and build its optimizer."""
    kind, progressive, lowrank = METHODS[method]
    torch.manual_seed(seed)  # LoRA's A initialisation
    names = [name for name, _ in target_layers(unet)]
    info: dict = {"lr": lr}

    if kind == "full":
        params = list(unet.parameters())
        opt = torch.optim.AdamW(params, lr=lr)
        return Setup(unet, params, opt, sum(p.numel() for p in params), lambda: None, None, info)

    if kind == "sara":
        sk.apply_sara(unet, sk.SaRAConfig(count=k, target_modules=names))
        params = sk.sparse_parameters(unet)
        opt = sk.SparseAdamW(params, lr=lr)
        summary = unet.sara_summary
        threshold = max(float(m.sparse_threshold) for _, m in sk.sparse_layers(unet))
        info.update(
            share_of_targeted=summary.share_of_targeted,
            selection_threshold=threshold,
            paper_learning_rate=sk.paper_learning_rate(threshold),
            progressive=progressive,
            lowrank=lowrank,
        )
        after = lambda: None  # noqa: E731
        if progressive:
            schedule = sk.ProgressiveReselection(unet, opt, total_steps=steps, at=0.5)

            def after():
                if schedule.step():
                    info["reselection_kept"] = schedule.summary.kept
                    info["reselection_frozen"] = schedule.summary.frozen

        regularizer = None
        if lowrank:
            g = torch.Generator().manual_seed(10_000 + seed)

            def regularizer():
                return NUCLEAR_WEIGHT * sk.nuclear_norm_loss(unet, layers="random", method="svd", generator=g)

        return Setup(unet, params, opt, summary.total_k, after, regularizer, info)

    import peft

    if kind == "lora":
        config = peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=names, init_lora_weights=True
        )
        info["rank"] = LORA_RANK
    elif kind == "supertuning":
        linears = target_layers(unet, linear_only=True)
        n = sum(m.weight.numel() for _, m in linears)
        # Smallest magnitudes, like SaRA's rule (the "-bottom" variant of the paper).
        config = peft.SupertuningConfig(
            target_modules=[name for name, _ in linears], sparsity=1.0 - k / n, select_top=False
        )
        info.update(sparsity=config.sparsity, linear_entries=n)
    else:
        raise ValueError(f"unknown method {method!r}")
    wrapped = peft.get_peft_model(unet, config)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    info["peft_version"] = peft.__version__
    return Setup(wrapped, params, opt, sum(p.numel() for p in params), lambda: None, None, info)
