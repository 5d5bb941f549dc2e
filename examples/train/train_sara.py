#!/usr/bin/env python
"""Fine-tune a diffusers UNet or SD3 transformer with SaRA (sparse low-rank adaptation).

SaRA trains only the weight entries of the pre-trained model whose magnitude lies below a threshold
(``--sara_threshold``, the paper's 2e-3, or a share ``--sara_fraction`` of the smallest entries),
optionally re-selects them once during the run (``--progressive_at``) and adds a nuclear-norm
low-rank term (``--lambda_rank``). Everything else follows diffusers'
``examples/text_to_image/train_text_to_image.py``: the same flags, 🤗 accelerate for devices,
processes, mixed precision and gradient accumulation, ``checkpoint-<step>`` folders with
``--checkpoints_total_limit`` and ``--resume_from_checkpoint``, and a diffusers model folder at the end.

Model families (chosen by what the model folder holds):

* ``unet/``: a ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x style), trained with the
  epsilon-prediction objective (or the scheduler's ``v_prediction``), noise added by the
  ``DDPMScheduler`` of ``scheduler/``;
* ``transformer/``: an ``SD3Transformer2DModel`` (a DiT), trained with the rectified-flow objective:
  ``noisy = (1 - s) * latents + s * noise``, target ``noise - latents``, timestep ``1000 * s``, with
  ``s`` drawn logit-normal and shifted by the ``scheduler/`` config's ``shift`` (3.0 for SD3).

Data: the script trains on precomputed latents and text embeddings (encoding images and captions
once, as diffusers' scripts do when they cache them), read from one safetensors file
(``--train_data_file``) holding ``latents`` [N, C, H, W], ``encoder_hidden_states`` [N, L, D] and,
for SD3, ``pooled_projections`` [N, P]. To make it from your images and captions with the
pipeline's own VAE and text encoders::

    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float16).to("cuda")
    vae = pipe.vae
    latents, text, pooled = [], [], []
    for pixels, caption in my_data:  # pixels: [1, 3, H, W] in [-1, 1], H and W multiples of 8
        with torch.no_grad():
            z = vae.encode(pixels.to("cuda", torch.float16)).latent_dist.sample()
            z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
            if hasattr(pipe, "text_encoder_3"):  # SD3: prompt embeddings and pooled embeddings
                emb, _, pool, _ = pipe.encode_prompt(
                    caption, caption, caption, device="cuda", do_classifier_free_guidance=False
                )
                pooled.append(pool.float().cpu())
            else:  # Stable Diffusion 1.x / 2.x
                emb, _ = pipe.encode_prompt(caption, "cuda", 1, do_classifier_free_guidance=False)
        latents.append(z.float().cpu())
        text.append(emb.float().cpu())
    data = {"latents": torch.cat(latents), "encoder_hidden_states": torch.cat(text)}
    if pooled:
        data["pooled_projections"] = torch.cat(pooled)
    save_file(data, "train_data.safetensors")

(All samples need the same latent size and text length; drop captions at random beforehand if
you want classifier-free guidance dropout, e.g. by encoding "" for 10% of them.)

Reproducibility: the samples of every micro-batch and the noise and timesteps of every step are a
function of ``(--seed, global step, process index)`` alone (a ``torch.Generator`` seeded per step;
no dataloader or global RNG), and each process takes its own shard of each global batch. So a run
resumed from ``checkpoint-N`` continues exactly as the uninterrupted run would, bit for bit on the
same hardware and process count, re-selection included.

Outputs in ``--output_dir``:

* ``checkpoint-<step>/``: ``accelerator.save_state`` (optimizer, LR scheduler, re-selection
  progress, RNG), ``<unet|transformer>/sara_training_state.safetensors`` (the trained state) next
  to a plain diffusers copy of the merged model, and ``sara_ema.safetensors`` with ``--use_ema``;
* ``validation.jsonl``: the validation loss on a fixed held-out batch with fixed noise (with the EMA
  weights under ``--use_ema``; ``loss_training_weights`` is the same loss with the training weights);
* ``train_log.jsonl``: the loss and learning rate of every step, and the re-selection;
* ``sara_summary.txt``: which layers were adapted, how many entries each;
* ``final_state.safetensors``: the final trained state (training weights, before any EMA copy),
  loadable with ``sara_kernels.load_training_state``; with several processes every process writes
  its own (``final_state.rank<i>.safetensors`` for the others), so they can be compared;
* ``sara_adapter.safetensors``: the adapter (EMA weights under ``--use_ema``), for
  ``sara_kernels.load_adapter`` on the base model;
* ``<unet|transformer>/``: the merged model as plain diffusers files: ``from_pretrained`` opens it
  without sara_kernels.

Launch: ``accelerate launch train_sara.py ...`` (or ``python train_sara.py ...``); see README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

import sara_kernels as sk
from sara_kernels.integrations.accelerate import register_checkpoint_hooks

logger = get_logger(__name__, log_level="INFO")

#: family -> (subfolder, model class, data keys the model needs)
FAMILIES = {
    "unet": ("unet", UNet2DConditionModel, ("latents", "encoder_hidden_states")),
    "sd3": ("transformer", SD3Transformer2DModel, ("latents", "encoder_hidden_states", "pooled_projections")),
}


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def _step_or_fraction(value: str) -> int | float:
    """``--progressive_at``: ``0.5`` (a fraction of the run) or ``2500`` (a step number)."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1) or a step number, got {value!r}"
        ) from None


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Fine-tune a diffusion model with SaRA.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Path to a pretrained model folder or a model id from huggingface.co/models; it must hold "
        "a `unet` (UNet2DConditionModel) or a `transformer` (SD3Transformer2DModel) subfolder.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument(
        "--train_data_file",
        type=str,
        required=True,
        help="A safetensors file with `latents`, `encoder_hidden_states` (and `pooled_projections` for SD3); "
        "see the script's docstring for how to make it.",
    )
    parser.add_argument(
        "--validation_data_file",
        type=str,
        default=None,
        help="A data file like --train_data_file for the validation loss (default: hold out the last "
        "--num_validation_samples samples of the training file).",
    )
    parser.add_argument(
        "--num_validation_samples",
        type=int,
        default=4,
        help="Samples held out of --train_data_file for validation when --validation_steps is set and "
        "no --validation_data_file is given.",
    )
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Compute the validation loss every X steps and at the end (with the EMA weights under "
        "--use_ema). Off by default.",
    )
    parser.add_argument(
        "--output_dir", type=str, default="sara-model", help="Where checkpoints and the model go."
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="The seed of the run: the batches, noise and timesteps of every step derive from it.",
    )
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size (per device).")
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of training steps to perform. If provided, overrides num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of update steps to accumulate before performing a backward/update pass.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Initial learning rate (after the potential warmup period). Default: the SaRA paper's rule "
        "1e-3 * exp(-350 * threshold) with --sara_threshold (4.97e-4 at 2e-3), 1e-4 with --sara_fraction.",
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='The scheduler type to use. Choose between ["linear", "cosine", "cosine_with_restarts", "polynomial",'
        ' "constant", "constant_with_warmup"]',
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler."
    )
    parser.add_argument(
        "--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer."
    )
    parser.add_argument(
        "--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer."
    )
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    parser.add_argument(
        "--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer"
    )
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="UNet only: the prediction target (default: the scheduler's, epsilon for Stable Diffusion 1.x).",
    )
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=["logit_normal", "none"],
        help="SD3 only: how the flow time s is drawn (logit-normal as in SD3, or uniform with 'none').",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="SD3 only: mean of the logit-normal.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="SD3 only: std of the logit-normal.")
    parser.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training.",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Number of subprocesses to use for data loading. 0 means that the data will be loaded in the main process.",
    )
    parser.add_argument(
        "--logging_dir",
        type=str,
        default="logs",
        help="TensorBoard log directory, relative to --output_dir.",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Whether to use mixed precision (default: the accelerate config's). The SaRA deltas and the "
        "optimizer state stay fp32.",
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="none",
        help='The integration to report the results and logs to: "tensorboard", "wandb", "comet_ml", "all" '
        'or "none" (the default).',
    )
    parser.add_argument("--tracker_project_name", type=str, default="sara-fine-tune")
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a checkpoint of the training state every X updates, as checkpoint-<step> in --output_dir.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Max number of checkpoints to store (the oldest are removed first).",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder (a path, or the name of a folder in --output_dir), or "latest" '
        "for the newest checkpoint in --output_dir.",
    )
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the SaRA deltas (SparseEMA).")
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="The EMA's maximum decay.")

    sara = parser.add_argument_group("SaRA")
    selection = sara.add_mutually_exclusive_group()
    selection.add_argument(
        "--sara_threshold",
        type=float,
        default=None,
        help="Train every weight entry with |w| below this (global, absolute; default 2e-3 as in the paper).",
    )
    selection.add_argument(
        "--sara_fraction",
        type=float,
        default=None,
        help="Or train this share of the weight entries, the smallest |w| first (e.g. 0.05).",
    )
    sara.add_argument(
        "--progressive_at",
        type=_step_or_fraction,
        default=None,
        help="Progressive re-selection: at this fraction of the run (e.g. 0.5, as in the paper) or step "
        "(e.g. 2500), keep training only the entries still below the threshold. Off by default.",
    )
    sara.add_argument(
        "--lambda_rank",
        type=float,
        default=0.0,
        help="Weight of the nuclear-norm low-rank term on the deltas (the paper: about 5e-4 to 5e-3; 0 = off).",
    )
    sara.add_argument(
        "--rank_method",
        type=str,
        default="svd",
        choices=["svd", "polar"],
        help="How the low-rank term is computed: exact SVD, or Newton-Schulz matmuls (faster on GPUs).",
    )

    args = parser.parse_args(input_args)
    if args.sara_threshold is None and args.sara_fraction is None:
        args.sara_threshold = 2e-3
    if args.learning_rate is None:
        args.learning_rate = (
            sk.paper_learning_rate(args.sara_threshold) if args.sara_threshold is not None else 1e-4
        )
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.lambda_rank < 0:
        parser.error("--lambda_rank must be non-negative")
    return args


# ---------------------------------------------------------------------------------------------
# Model family and objective
# ---------------------------------------------------------------------------------------------
def detect_family(path: str, revision: str | None = None) -> str:
    """``"unet"`` or ``"sd3"``, from the subfolders of the model folder (or the hub's model_index.json)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "unet", "config.json")):
            return "unet"
        config_file = os.path.join(path, "transformer", "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                class_name = json.load(f).get("_class_name")
            if class_name != "SD3Transformer2DModel":
                raise ValueError(
                    f"{path}/transformer holds a {class_name}; this script trains SD3Transformer2DModel"
                )
            return "sd3"
        raise ValueError(f"{path} holds neither a unet/ nor a transformer/ model folder")
    index = diffusers.DiffusionPipeline.load_config(path, revision=revision)
    if "unet" in index:
        return "unet"
    if "transformer" in index:
        class_name = index["transformer"][1]
        if class_name != "SD3Transformer2DModel":
            raise ValueError(
                f"{path}'s transformer is a {class_name}; this script trains SD3Transformer2DModel"
            )
        return "sd3"
    raise ValueError(f"{path} has neither a unet nor a transformer")


def seed_for(seed: int, *parts) -> int:
    """A 63-bit seed from the run's seed and a label (the same in every process and Python version)."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_for` (draws are device-independent)."""
    return torch.Generator().manual_seed(seed_for(seed, *parts))


class EpsilonObjective:
    """UNet: DDPM noise at a uniform timestep; predict the noise (or the velocity)."""

    def __init__(self, scheduler: DDPMScheduler, prediction_type: str | None = None):
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = batch["latents"]
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        pred = model(noisy, timesteps, batch["encoder_hidden_states"], return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float(), reduction="mean")


class FlowObjective:
    """SD3: rectified flow. ``noisy = (1 - s) latents + s noise``, target ``noise - latents``,
    timestep ``1000 s``; ``s`` logit-normal (or uniform), then shifted as SD3's scheduler does
    (``shift * s / (1 + (shift - 1) * s)``)."""

    def __init__(self, shift: float = 1.0, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0):
        self.shift = float(shift)
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = batch["latents"]
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        if self.weighting_scheme == "logit_normal":
            s = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(bsz, generator=generator))
        else:
            s = torch.rand(bsz, generator=generator)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        s = s.to(latents.device, latents.dtype)
        sigma = s.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - sigma) * latents + sigma * noise
        pred = model(
            hidden_states=noisy,
            timestep=s * 1000.0,
            encoder_hidden_states=batch["encoder_hidden_states"],
            pooled_projections=batch["pooled_projections"],
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), (noise - latents).float(), reduction="mean")


def make_objective(
    family: str,
    path: str,
    revision: str | None = None,
    prediction_type: str | None = None,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
):
    """The training objective of ``family``, configured by the model folder's ``scheduler/``
    (defaults when it has none)."""
    if family == "unet":
        try:
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        except (OSError, ValueError):
            logger.warning(f"{path} has no scheduler/ config: using DDPMScheduler's defaults")
            scheduler = DDPMScheduler()
        return EpsilonObjective(scheduler, prediction_type)
    try:
        config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(
            path, subfolder="scheduler", revision=revision
        )
        shift = float(config.get("shift", 1.0))
    except (OSError, ValueError):
        logger.warning(f"{path} has no scheduler/ config: using shift 1.0")
        shift = 1.0
    return FlowObjective(shift, weighting_scheme, logit_mean, logit_std)


# ---------------------------------------------------------------------------------------------
# Data: precomputed latents and embeddings, batches a function of (seed, step, process)
# ---------------------------------------------------------------------------------------------
def load_data(path: str, family: str) -> dict[str, torch.Tensor]:
    """The tensors of a data file that ``family`` needs, checked."""
    tensors = load_file(path)
    keys = FAMILIES[family][2]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing {missing} (a {family} data file holds {list(keys)})")
    data = {k: tensors[k].float() for k in keys}
    sizes = {k: v.shape[0] for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{path}: the tensors hold different numbers of samples: {sizes}")
    if data["latents"].dim() != 4 or data["encoder_hidden_states"].dim() != 3:
        raise ValueError(f"{path}: latents must be [N, C, H, W] and encoder_hidden_states [N, L, D]")
    return data


def split_data(data: dict, num_validation: int) -> tuple[dict, dict]:
    """(training samples, the last ``num_validation`` samples held out)."""
    n = data["latents"].shape[0]
    if not 0 < num_validation < n:
        raise ValueError(f"cannot hold out {num_validation} of {n} samples for validation")
    return {k: v[: n - num_validation] for k, v in data.items()}, {
        k: v[n - num_validation :] for k, v in data.items()
    }


class TensorDictDataset(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.size = next(iter(tensors.values())).shape[0]

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


class StepBatchSampler(Sampler):
    """This process's sample indices for micro-batches ``start, start + 1, ..., stop - 1``.

    The samples are shuffled once per epoch by a generator seeded with ``(seed, epoch)``; micro-batch
    ``m`` is the ``m``-th global batch of ``batch_size * num_processes`` samples of that order (the
    incomplete last one of an epoch is dropped), and process ``i`` takes its ``i``-th slice. So the
    batches depend only on the seed and the step, never on where a run started.
    """

    def __init__(self, num_samples, batch_size, num_processes, process_index, seed, start, stop):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = num_samples // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(
                f"{num_samples} training samples do not fill one global batch of {batch_size} x "
                f"{num_processes} processes"
            )
        self._order = (None, None)

    def __len__(self):
        return max(0, self.stop - self.start)

    def indices(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (
                epoch,
                torch.randperm(self.num_samples, generator=generator_for(self.seed, "epoch", epoch)),
            )
        begin = (position * self.num_processes + self.process_index) * self.batch_size
        return self._order[1][begin : begin + self.batch_size].tolist()

    def __iter__(self):
        for m in range(self.start, self.stop):
            yield self.indices(m)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model, objective, batch: dict, seed: int) -> float:
    """The loss on the held-out ``batch`` with fixed noise and timesteps (a function of the weights)."""
    return float(objective.loss(model, batch, generator_for(seed, "validation")))


def run_validation(accelerator, model, objective, batch, args, ema, global_step) -> dict:
    """Validation loss at ``global_step`` with the training weights and, under EMA, with the EMA
    weights (``ema.store`` / ``copy_to`` / ``restore``: the training weights come back bit for bit)."""
    inner = accelerator.unwrap_model(model)
    model.eval()
    with accelerator.autocast():
        record = {"step": global_step, "ema": ema is not None}
        record["loss_training_weights"] = validation_loss(inner, objective, batch, args.seed)
        if ema is not None:
            ema.store(inner.parameters())
            ema.copy_to(inner.parameters())
            record["loss"] = validation_loss(inner, objective, batch, args.seed)
            ema.restore(inner.parameters())
        else:
            record["loss"] = record["loss_training_weights"]
    model.train()
    with open(os.path.join(args.output_dir, "validation.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    accelerator.log({"validation_loss": record["loss"]}, step=global_step)
    logger.info(
        f"validation at step {global_step}: loss {record['loss']:.6f}" + (" (EMA weights)" if ema else "")
    )
    return record


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def list_checkpoints(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [d for d in os.listdir(folder) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return sorted(names, key=lambda x: int(x.split("-")[1]))


def resolve_checkpoint(resume: str, output_dir: str) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names (None: "latest" and there is none)."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return os.path.join(output_dir, found[-1]) if found else None
    if os.path.isdir(resume):
        return resume
    candidate = os.path.join(output_dir, os.path.basename(os.path.normpath(resume)))
    if os.path.isdir(candidate):
        return candidate
    raise FileNotFoundError(f"checkpoint {resume!r} does not exist (nor in {output_dir})")


def prune_checkpoints(output_dir: str, total_limit: int) -> None:
    """Remove the oldest checkpoints so that saving one more keeps ``total_limit`` (diffusers' rule)."""
    checkpoints = list_checkpoints(output_dir)
    if len(checkpoints) >= total_limit:
        num_to_remove = len(checkpoints) - total_limit + 1
        removing = checkpoints[:num_to_remove]
        logger.info(f"{len(checkpoints)} checkpoints already exist, removing {len(removing)} checkpoints")
        logger.info(f"removing checkpoints: {', '.join(removing)}")
        for name in removing:
            shutil.rmtree(os.path.join(output_dir, name))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    # No buffer broadcast before each forward: the SaRA layers' index and pre-trained values are
    # buffers (n entries each, twice the gradient all-reduce), identical on every process anyway.
    ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=accelerator_project_config,
        kwargs_handlers=[ddp_kwargs],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        # torchrun on a machine without GPUs: accelerate picks the multi-CPU (gloo) mode only when
        # told to; otherwise every process would train alone into the same output_dir.
        raise RuntimeError(
            f"launched as {launched} processes but accelerate runs {accelerator.num_processes}: for "
            "processes on the CPU set ACCELERATE_USE_CPU=1 in the environment (see README.md)"
        )

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_info()
    else:
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # The model, converted to SaRA: only the selected entries train, everything else is frozen.
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    subfolder, model_class, _ = FAMILIES[family]
    model = model_class.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision, variant=args.variant
    )
    config = sk.SaRAConfig(
        threshold=args.sara_threshold, fraction=args.sara_fraction, progressive_at=args.progressive_at
    )
    model = sk.apply_sara(model, config)
    summary = model.sara_summary
    if accelerator.is_main_process:
        table = str(summary)
        with open(os.path.join(args.output_dir, "sara_summary.txt"), "w") as f:
            f.write(table + "\n")
        logger.info(
            f"SaRA ({family}, {subfolder}): {summary.total_k} trainable entries in {len(summary.layers)} layers, "
            f"{summary.share_of_targeted:.2%} of the targeted weights, {summary.share_of_model:.2%} of the "
            f"model's {summary.model_parameters} parameters"
        )
        for line in table.splitlines()[len(summary.layers) + 2 :]:
            logger.info(line)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    objective = make_objective(
        family,
        args.pretrained_model_name_or_path,
        revision=args.revision,
        prediction_type=args.prediction_type,
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
    )

    ema = None
    if args.use_ema:
        ema = sk.SparseEMA(model, decay=args.ema_decay)
        ema.to(accelerator.device)

    # Checkpoints: the SaRA state (and the EMA) through the hooks; accelerate saves the rest.
    register_checkpoint_hooks(accelerator, ema=ema)

    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate
            * args.gradient_accumulation_steps
            * args.train_batch_size
            * accelerator.num_processes
        )
    optimizer = sk.SparseAdamW(
        sk.sparse_parameters(model),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Data.
    data = load_data(args.train_data_file, family)
    validation_batch = None
    if args.validation_steps is not None:
        if args.validation_data_file is not None:
            validation_batch = load_data(args.validation_data_file, family)
        else:
            data, validation_batch = split_data(data, args.num_validation_samples)
        validation_batch = {k: v.to(accelerator.device) for k, v in validation_batch.items()}
    num_samples = data["latents"].shape[0]
    global_batch = args.train_batch_size * accelerator.num_processes
    micro_per_epoch = num_samples // global_batch
    if micro_per_epoch == 0:
        raise ValueError(f"{num_samples} training samples do not fill one global batch of {global_batch}")
    num_update_steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    progressive = None
    if args.progressive_at is not None:
        progressive = sk.ProgressiveReselection(model, optimizer, total_steps=args.max_train_steps)
        accelerator.register_for_checkpointing(progressive)

    # The dataloader is not prepared: the sampler already gives each process its own shard.
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    params_to_clip = sk.sparse_parameters(unwrapped)

    if accelerator.is_main_process:
        tracker_config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
        }
        accelerator.init_trackers(args.tracker_project_name, tracker_config)

    total_batch_size = global_batch * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_samples}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Learning rate = {args.learning_rate:.4g}")
    global_step = 0

    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if path is None:
            accelerator.print(
                f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run."
            )
            args.resume_from_checkpoint = None
        else:
            accelerator.print(f"Resuming from checkpoint {path}")
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
    initial_global_step = global_step

    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=initial_global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )

    sampler = StepBatchSampler(
        num_samples,
        args.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        args.seed,
        start=initial_global_step * args.gradient_accumulation_steps,
        stop=args.max_train_steps * args.gradient_accumulation_steps,
    )
    # A generator of its own: creating the iterator does not draw from the global RNG.
    train_dataloader = DataLoader(
        TensorDictDataset(data),
        batch_sampler=sampler,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )

    def log_line(record: dict) -> None:
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "train_log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    last_validation = None
    model.train()
    train_loss = 0.0
    micro_step = sampler.start
    for batch in train_dataloader:
        step, micro = divmod(micro_step, args.gradient_accumulation_steps)  # step: the update being built
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.accumulate(model):
            noise_generator = generator_for(args.seed, "noise", step, micro, accelerator.process_index)
            loss = objective.loss(model, batch, noise_generator)
            if args.lambda_rank > 0:
                # The same layer on every process (no process index in the seed).
                rank_term = sk.nuclear_norm_loss(
                    unwrapped,
                    layers="random",
                    method=args.rank_method,
                    generator=generator_for(args.seed, "rank", step, micro),
                )
                loss = loss + args.lambda_rank * rank_term

            # Gather the losses across all processes for logging (if we use distributed training).
            avg_loss = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
            train_loss += avg_loss.item() / args.gradient_accumulation_steps

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step += 1

        # Checks if the accelerator has performed an optimization step behind the scenes
        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(model.parameters())
            record = {"step": global_step + 1, "loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}
            if progressive is not None and progressive.step():
                result = progressive.summary
                record["reselection"] = {"kept": result.kept, "frozen": result.frozen}
                logger.info(f"step {global_step + 1}: {result}")
            progress_bar.update(1)
            global_step += 1
            accelerator.log({"train_loss": train_loss}, step=global_step)
            log_line(record)
            train_loss = 0.0

            if global_step % args.checkpointing_steps == 0:
                if accelerator.is_main_process and args.checkpoints_total_limit is not None:
                    prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
                accelerator.wait_for_everyone()
                save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                accelerator.save_state(save_path)  # every process (each saves its RNG state)
                logger.info(f"Saved state to {save_path}")

            if validation_batch is not None and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    run_validation(accelerator, model, objective, validation_batch, args, ema, global_step)
                last_validation = global_step

        logs = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
        progress_bar.set_postfix(**logs)
        if global_step >= args.max_train_steps:
            break
    progress_bar.close()

    accelerator.wait_for_everyone()
    if validation_batch is not None and last_validation != global_step and accelerator.is_main_process:
        run_validation(accelerator, model, objective, validation_batch, args, ema, global_step)

    # The final trained state (training weights), per process when there are several.
    if accelerator.is_main_process or accelerator.num_processes > 1:
        name = "final_state.safetensors"
        if accelerator.process_index > 0:
            name = f"final_state.rank{accelerator.process_index}.safetensors"
        sk.save_training_state(unwrapped, os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        sk.save_adapter(unwrapped, os.path.join(args.output_dir, "sara_adapter.safetensors"))
        merged = sk.merge_and_unload(unwrapped)
        merged.save_pretrained(os.path.join(args.output_dir, subfolder))
        logger.info(f"Saved the merged model to {os.path.join(args.output_dir, subfolder)}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
