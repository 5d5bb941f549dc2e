"""The training example (examples/train/train_sara.py) run the way users run it, on tiny local models.

For each model family (a UNet2DConditionModel and an SD3Transformer2DModel), four launches of the
script cover everything; the tests below read what they wrote:

* ``full``: 6 steps, a checkpoint every 2, re-selection at step 3 (between checkpoint-2 and
  checkpoint-4), the low-rank term, an EMA and a validation every 2 steps;
* ``resume2``: the same run resumed from ``full/checkpoint-2`` (before the re-selection), with a
  checkpoint limit of 1;
* ``resume4``: resumed with ``latest`` from a copy of ``full/checkpoint-4`` (after the
  re-selection), without EMA and without validation;
* ``ddp``: the same run on two processes (torch.distributed.run, gloo).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import load_module, one_thread, torchrun_command

import sara_kernels as sk
from sara_kernels.training_state import FILE_NAME, read_training_state

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train")
SCRIPT = os.path.join(EXAMPLE, "train_sara.py")

FAMILIES = ["unet", "sd3"]
#: The SD3 runs accumulate two micro-batches per step (and so cross two epoch boundaries).
ACCUMULATION = {"unet": 1, "sd3": 2}
STEPS, CHECKPOINT_EVERY, RESELECT_AT = 6, 2, 3
THRESHOLD = 2e-3
SEED = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The subprocesses run with one thread: so do the recomputations here (bit-exact comparisons)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def example():
    """The script and the tiny-model builder as modules (importing the script configures logging)."""
    root_level = logging.getLogger().level
    modules = (
        load_module("train_sara_example", SCRIPT),
        load_module("make_tiny_model_example", os.path.join(EXAMPLE, "make_tiny_model.py")),
    )
    logging.getLogger().setLevel(root_level)
    return modules


def _launch(args: list[str], log: str, processes: int = 1) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    if processes == 1:
        command = [sys.executable, SCRIPT, *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"  # accelerate's multi-CPU (gloo) mode under torchrun
        command = torchrun_command(SCRIPT, *args, processes=processes)
    handle = open(log, "w")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return proc, log


def _wait(*launched) -> None:
    for proc, log in launched:
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0:
            with open(log) as f:
                raise AssertionError(f"{log} (exit {proc.returncode}):\n" + f.read()[-6000:])


@pytest.fixture(scope="module", params=FAMILIES)
def runs(request, tmp_path_factory, example):
    """The four launches of one family (see the module docstring); the folders they wrote."""
    family = request.param
    _, tiny = example
    base = tmp_path_factory.mktemp(f"train_{family}")
    model_dir = tiny.make_tiny_model(base / "model", family, seed=0)
    train_file = tiny.make_tiny_data(base / "train.safetensors", family, num_samples=8, seed=0)
    val_file = tiny.make_tiny_data(base / "val.safetensors", family, num_samples=4, seed=1)
    common = [
        "--pretrained_model_name_or_path", model_dir, "--train_data_file", train_file,
        "--seed", str(SEED), "--train_batch_size", "2", "--max_train_steps", str(STEPS),
        "--gradient_accumulation_steps", str(ACCUMULATION[family]),
        "--checkpointing_steps", str(CHECKPOINT_EVERY), "--progressive_at", str(RESELECT_AT),
        "--sara_threshold", str(THRESHOLD), "--learning_rate", "1e-3",
        "--lr_scheduler", "linear", "--lr_warmup_steps", "1", "--lambda_rank", "1e-3",
    ]  # fmt: skip
    ema = ["--use_ema", "--validation_steps", "2", "--validation_data_file", val_file]
    out = {name: base / name for name in ("full", "resume2", "resume4", "ddp")}

    full = _launch([*common, *ema, "--output_dir", str(out["full"])], str(base / "full.log"))
    ddp = _launch([*common, *ema, "--output_dir", str(out["ddp"])], str(base / "ddp.log"), processes=2)
    _wait(full)
    shutil.copytree(out["full"] / "checkpoint-4", out["resume4"] / "checkpoint-4")
    resume2 = _launch(
        [*common, *ema, "--output_dir", str(out["resume2"]), "--checkpoints_total_limit", "1",
         "--resume_from_checkpoint", str(out["full"] / "checkpoint-2")],
        str(base / "resume2.log"),
    )  # fmt: skip
    _wait(ddp)
    resume4 = _launch(
        [*common, "--output_dir", str(out["resume4"]), "--resume_from_checkpoint", "latest"],
        str(base / "resume4.log"),
    )
    _wait(resume2, resume4)
    return {"family": family, "model": model_dir, "val": val_file, **out}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _subfolder(family: str) -> str:
    return "unet" if family == "unet" else "transformer"


def _model_class(family: str):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    return UNet2DConditionModel if family == "unet" else SD3Transformer2DModel


def _state(path) -> dict[str, torch.Tensor]:
    return read_training_state(path)[0]


def _assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:4]}"


def _jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _frozen(state: dict) -> int:
    return sum(t.numel() for k, t in state.items() if k.endswith("sparse_frozen_delta"))


def _sara_model(runs, training_state=None):
    """The base model converted as the script converts it, with a training state loaded."""
    sub = _subfolder(runs["family"])
    model = _model_class(runs["family"]).from_pretrained(runs["model"], subfolder=sub)
    model = sk.apply_sara(model, sk.SaRAConfig(threshold=THRESHOLD, progressive_at=RESELECT_AT))
    if training_state is not None:
        sk.load_training_state(model, training_state)
    return model


@contextlib.contextmanager
def _diffusers_warnings():
    """Collect what diffusers logs at WARNING and above (missing / unexpected keys among it)."""
    import diffusers

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        diffusers.utils.logging.set_verbosity(verbosity)


def _load_plain(runs, folder):
    """``from_pretrained`` of a plain diffusers folder: no missing / unexpected key, no warning."""
    with _diffusers_warnings() as warned:
        model, info = _model_class(runs["family"]).from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    assert info["mismatched_keys"] == [] and info["error_msgs"] == [], info
    assert not warned, [r.getMessage() for r in warned]
    assert not any(isinstance(m, sk.SparseDeltaLinear | sk.SparseDeltaConv2d) for m in model.modules())
    return model


def _validation_loss(example, runs, model) -> float:
    train, _ = example
    objective = train.make_objective(runs["family"], runs["model"])
    batch = train.load_data(runs["val"], runs["family"])
    return train.validation_loss(model.eval(), objective, batch, SEED)


# ---------------------------------------------------------------------------------------------
# a + b. Resume from a checkpoint before and after the re-selection: bit-exact
# ---------------------------------------------------------------------------------------------
def test_resume_is_bit_exact_before_and_after_reselection(runs):
    full, sub = runs["full"], _subfolder(runs["family"])
    log = _jsonl(full / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    reselected = [r for r in log if "reselection" in r]
    assert [r["step"] for r in reselected] == [RESELECT_AT] and reselected[0]["reselection"]["frozen"] > 0
    # checkpoint-2 precedes the re-selection, checkpoint-4 follows it
    assert _frozen(_state(full / "checkpoint-2" / sub / FILE_NAME)) == 0
    assert _frozen(_state(full / "checkpoint-4" / sub / FILE_NAME)) > 0

    final = _state(full / "final_state.safetensors")
    assert _frozen(final) > 0
    assert any(bool(t.abs().sum() > 0) for k, t in final.items() if k.endswith("sparse_delta"))
    for name, first in (("resume2", 3), ("resume4", 5)):
        _assert_equal_tensors(_state(runs[name] / "final_state.safetensors"), final, name)
        resumed = _jsonl(runs[name] / "train_log.jsonl")
        assert resumed == log[first - 1 :], name  # the same losses and learning rates, step by step
    # resumed before the re-selection: it re-selects; after: it does not re-select again
    assert [r["step"] for r in _jsonl(runs["resume2"] / "train_log.jsonl") if "reselection" in r] == [3]

    # resume2 continued the EMA too (its validations and its EMA adapter match), and pruned to 1
    assert _jsonl(runs["resume2"] / "validation.jsonl") == _jsonl(full / "validation.jsonl")[1:]
    adapter_full = sk.read_adapter(full / "sara_adapter.safetensors")[0]
    _assert_equal_tensors(
        sk.read_adapter(runs["resume2"] / "sara_adapter.safetensors")[0], adapter_full, "EMA"
    )
    assert sorted(p.name for p in runs["resume2"].glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
    assert sorted(p.name for p in full.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


# ---------------------------------------------------------------------------------------------
# c. Two processes: the ranks end bit-identical, with a re-selection during the run
# ---------------------------------------------------------------------------------------------
def test_two_processes_end_bit_identical(runs):
    ddp, sub = runs["ddp"], _subfolder(runs["family"])
    rank0 = _state(ddp / "final_state.safetensors")
    rank1 = _state(ddp / "final_state.rank1.safetensors")  # only written with several processes
    _assert_equal_tensors(rank1, rank0, "rank 1 vs rank 0")
    assert _frozen(rank0) > 0
    assert [r["step"] for r in _jsonl(ddp / "train_log.jsonl") if "reselection" in r] == [RESELECT_AT]
    assert (ddp / "checkpoint-2" / "random_states_1.pkl").exists()
    assert (ddp / "checkpoint-4" / sub / FILE_NAME).exists()
    # Each process trained on its own shard: twice the global batch of the one-process run.
    single = _state(runs["full"] / "final_state.safetensors")
    assert any(not torch.equal(rank0[k], single[k]) for k in rank0 if k.endswith("sparse_delta"))


# ---------------------------------------------------------------------------------------------
# d. Validation with the EMA weights; the training weights come back bit for bit
# ---------------------------------------------------------------------------------------------
def test_validation_uses_the_ema_weights_and_restores_the_training_weights(runs, example):
    full, sub = runs["full"], _subfolder(runs["family"])
    records = _jsonl(full / "validation.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["ema"] for r in records)
    for record in records:
        step = record["step"]
        checkpoint = full / f"checkpoint-{step}"
        model = _sara_model(runs, checkpoint / sub / FILE_NAME)
        # recomputed here from the checkpoint: the training weights' loss ...
        assert _validation_loss(example, runs, model) == record["loss_training_weights"], step
        # ... and, with the checkpoint's EMA copied in, the recorded validation loss
        ema = sk.SparseEMA(model)
        ema.load(checkpoint / "sara_ema.safetensors")
        ema.copy_to(model.parameters())
        assert _validation_loss(example, runs, model) == record["loss"], step
        assert record["loss"] != record["loss_training_weights"], step

    # The training weights after the last validation are the final state's ...
    final = _sara_model(runs, full / "final_state.safetensors")
    assert _validation_loss(example, runs, final) == records[-1]["loss_training_weights"]
    # ... and the same as those of a run without EMA or validation after step 4 (resume4): every
    # validation restored them exactly (a validation at step 4 that left them changed would have
    # changed steps 5 and 6 of the full run).
    _assert_equal_tensors(
        _state(runs["resume4"] / "final_state.safetensors"),
        _state(full / "final_state.safetensors"),
        "resume4",
    )
    # The final model holds the EMA weights: its loss is the last EMA validation loss.
    plain = _load_plain(runs, full / sub)
    assert _validation_loss(example, runs, plain) == records[-1]["loss"]


# ---------------------------------------------------------------------------------------------
# e. The merged models open in plain diffusers and hold the SaRA model's merged weights
# ---------------------------------------------------------------------------------------------
def test_merged_models_load_in_plain_diffusers(runs):
    full, sub = runs["full"], _subfolder(runs["family"])
    plain = _load_plain(runs, full / sub).state_dict()

    # = the base model with the saved adapter (the EMA deltas) merged in ...
    base = _model_class(runs["family"]).from_pretrained(runs["model"], subfolder=sub)
    sk.load_adapter(base, full / "sara_adapter.safetensors")
    _assert_equal_tensors(sk.merge_and_unload(base).state_dict(), plain, "base + adapter")
    # ... = the EMA of the last checkpoint copied into its training state, merged
    model = _sara_model(runs, full / f"checkpoint-{STEPS}" / sub / FILE_NAME)
    ema = sk.SparseEMA(model)
    ema.load(full / f"checkpoint-{STEPS}" / "sara_ema.safetensors")
    ema.copy_to(model.parameters())
    _assert_equal_tensors(sk.merge_and_unload(model).state_dict(), plain, "checkpoint + EMA")
    # without EMA (resume4) the final model is the training weights
    trained = sk.merge_and_unload(_sara_model(runs, runs["resume4"] / "final_state.safetensors")).state_dict()
    _assert_equal_tensors(_load_plain(runs, runs["resume4"] / sub).state_dict(), trained, "resume4")
    assert any(not torch.equal(trained[k], plain[k]) for k in plain)

    # The checkpoints' plain copies: the merged training weights at that step
    for step in (2, 4):
        folder = full / f"checkpoint-{step}" / sub
        state = sk.merge_and_unload(_sara_model(runs, folder / FILE_NAME)).state_dict()
        _assert_equal_tensors(_load_plain(runs, folder).state_dict(), state, f"checkpoint-{step}")
