"""A seeded fuzz over the ops' inputs on every backend available here.

Each case draws an op, a backend, the index-check setting and one mutation of otherwise valid
random inputs (odd shapes, every weight and index dtype, empty selections). It holds:

* the tensors an op writes sit inside larger buffers whose guard ends never change, whatever the
  inputs and the switches (no write outside a tensor, on any backend);
* valid inputs give the reference's result;
* a mutation that the cheap checks catch (dtype, shape, device, layout, overlap, non-finite
  hyperparameters, a non-tensor) is always an error that names an argument, and nothing is written;
* a bad index (out of range, negative, unsorted, duplicated) is such an error whenever the index
  checks are on; with them off the call may run, but still never writes outside its tensors.

``SARA_KERNELS_FUZZ_CASES`` (default 4000, about 5 s on 2 CPU cores) and ``SARA_KERNELS_FUZZ_SEED`` set
the run; the test prints what it tried and what happened (``pytest -s``).
"""

from __future__ import annotations

import collections
import os
import random

import pytest
import torch
from conftest import backends_for

import sara_kernels
from sara_kernels import ops as sk

CASES = int(os.environ.get("SARA_KERNELS_FUZZ_CASES", "4000"))
SEED = int(os.environ.get("SARA_KERNELS_FUZZ_SEED", "0"))
PAD = 11
ERRORS = (TypeError, ValueError, IndexError, RuntimeError)

#: Argument names per op: an error must name one of them.
ARGUMENTS = {
    "scatter_merge_": ("weight", "index", "base", "delta", "alpha"),
    "restore_": ("weight", "index", "base"),
    "sparse_adamw_": ("weight", "index", "base", "delta", "grad", "exp_avg", "exp_avg_sq", "step", "lr",
                      "beta1", "beta2", "eps", "weight_decay", "betas"),
    "sparse_adamw_multi_": ("weights", "indices", "bases", "deltas", "grads", "exp_avgs", "exp_avg_sqs",
                            "steps", "lr", "beta1", "beta2", "eps", "weight_decay", "betas"),
    "sampled_weight_grad_linear": ("grad_out", "x", "index", "out_features", "in_features"),
}  # fmt: skip
STATIC = ("weight_dtype", "base_dtype", "delta_dtype", "index_dtype", "index_2d", "shape", "meta", "alias",
          "nan_hyper", "noncontiguous", "not_tensor")  # fmt: skip
DATA = ("index_oob", "index_negative", "index_unsorted", "index_duplicate")


class Guarded:
    """A tensor placed inside a larger buffer with random guard values at both ends."""

    def __init__(self, values: torch.Tensor, rng: torch.Generator):
        n = values.numel()
        if values.is_floating_point():
            self.buffer = torch.randn(n + 2 * PAD, generator=rng).to(values.dtype)
        else:
            self.buffer = torch.randint(-99, 99, (n + 2 * PAD,), generator=rng).to(values.dtype)
        self.buffer[PAD : PAD + n] = values.reshape(-1)
        self.tensor = self.buffer[PAD : PAD + n].view(values.shape)
        self.guard = self.ends()

    def ends(self) -> torch.Tensor:
        return torch.cat([self.buffer[:PAD], self.buffer[-PAD:]]).clone()

    def intact(self) -> bool:
        return torch.equal(self.ends(), self.guard)


def _random_set(rng: random.Random, g: torch.Generator, shape=None):
    shape = shape or rng.choice([(1, 1), (3, 5), (7, 3), (2, 3, 3, 3), (11,), (4, 9)])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    index_dtype = rng.choice([torch.int32, torch.int64])
    weight = (torch.rand(shape, generator=g) * 0.9 + 0.1).to(dtype)
    numel = weight.numel()
    k = rng.choice([0, 1, max(1, numel // 3), numel])
    index = torch.randperm(numel, generator=g)[:k].sort().values.to(index_dtype)
    return [
        weight,
        index,
        weight.view(-1)[index.long()].clone(),
        torch.randn(k, generator=g) * 1e-2,
        torch.randn(k, generator=g),
        torch.randn(k, generator=g) * 1e-2,
        torch.rand(k, generator=g) * 1e-3,
    ]


def _mutate_index(index: torch.Tensor, numel: int, how: str, rng: random.Random) -> torch.Tensor | None:
    """A bad version of a sorted index, or None when ``how`` cannot apply (too few entries)."""
    index = index.clone()
    if how == "index_oob" and index.numel():
        index[-1] = numel + rng.choice([0, 1, 10**6])
    elif how == "index_negative" and index.numel():
        index[0] = -rng.choice([1, 3])
    elif how == "index_unsorted" and index.numel() >= 2 and index[0] != index[-1]:
        index[0], index[-1] = index[-1].clone(), index[0].clone()
    elif how == "index_duplicate" and index.numel() >= 2:
        index[1] = index[0]
    else:
        return None
    return index


def _case(i: int, backends: list[str]):
    rng = random.Random(SEED * 1_000_003 + i)
    g = torch.Generator().manual_seed(SEED * 7919 + i)
    op = rng.choice(list(ARGUMENTS))
    backend = rng.choice(backends)
    checks = rng.random() < 0.7
    mutation = rng.choice(["none"] * 4 + list(STATIC) + list(DATA) * 2)
    return rng, g, op, backend, checks, mutation


def _prepare(op, rng, g, mutation):
    """(kwargs for the call, the Guarded written tensors, whether the mutation applied)."""
    hyper = dict(
        lr=rng.choice([1e-3, 0.0, 0.3]),
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=rng.choice([0.0, 0.01]),
    )
    if op == "sampled_weight_grad_linear":
        out_f, in_f, n = rng.choice([1, 3, 7]), rng.choice([1, 4, 9]), rng.choice([1, 5])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64])
        grad_out, x = (
            torch.randn(n, out_f, generator=g).to(dtype),
            torch.randn(n, in_f, generator=g).to(dtype),
        )
        k = rng.choice([0, 1, max(1, out_f * in_f // 2)])
        index = (
            torch.randperm(out_f * in_f, generator=g)[:k]
            .sort()
            .values.to(rng.choice([torch.int32, torch.int64]))
        )
        args = dict(grad_out=grad_out, x=x, index=index, out_features=out_f, in_features=in_f)
        applied = True
        if mutation in DATA:
            bad = _mutate_index(index, out_f * in_f, mutation, rng)
            applied = bad is not None
            if applied:
                args["index"] = bad
        elif mutation in ("weight_dtype", "base_dtype", "delta_dtype"):
            args["x"] = x.to(torch.float16 if dtype != torch.float16 else torch.float32)
        elif mutation == "index_dtype":
            args["index"] = index.float()
        elif mutation == "index_2d":
            args["index"] = index.view(1, -1)
        elif mutation == "shape":
            args["x"] = torch.randn(n + 1, in_f, generator=g).to(dtype)
        elif mutation == "meta":
            args["x"] = x.to("meta")
        elif mutation == "not_tensor":
            args["index"] = index.tolist()
        else:
            applied = False  # no written tensor to alias, no hyperparameter, layout handled by the op
        return args, [], applied

    sets = [_random_set(rng, g) for _ in range(rng.choice([1, 2, 3]) if op == "sparse_adamw_multi_" else 1)]
    written = []
    for one in sets:  # the tensors the op writes live inside guarded buffers
        for j in (0, 3, 5, 6) if op.startswith("sparse_adamw") else (0,):
            guarded = Guarded(one[j], g)
            one[j] = guarded.tensor
            written.append(guarded)
    applied = True
    target = sets[rng.randrange(len(sets))]
    weight, index = target[0], target[1]
    if mutation in DATA:
        bad = _mutate_index(index, weight.numel(), mutation, rng)
        applied = bad is not None
        if applied:
            target[1] = bad
    elif mutation == "weight_dtype":
        target[0] = weight.to(torch.int32) if rng.random() < 0.5 else weight.double()
        if target[0].is_floating_point():
            target[2] = target[2].to(target[0].dtype)
        applied = not (op in ("scatter_merge_", "restore_") and target[0].dtype == torch.float64)
    elif mutation == "base_dtype":
        target[2] = target[2].to(torch.float16 if weight.dtype != torch.float16 else torch.float32)
    elif mutation == "delta_dtype":
        applied = op != "restore_"
        target[3] = target[3].to(torch.float16)
    elif mutation == "index_dtype":
        target[1] = index.float()
    elif mutation == "index_2d":
        target[1] = index.view(1, -1)
    elif mutation == "shape":
        extra = target[2][:1] if target[2].numel() else torch.zeros(1, dtype=target[2].dtype)
        target[2] = torch.cat([target[2], extra])
    elif mutation == "meta":
        position = rng.choice([0, 1, 2, 3] if op != "restore_" else [0, 1, 2])
        target[position] = target[position].to("meta")
    elif mutation == "alias":
        if target[1].numel() == 0:
            applied = False
        elif op in ("restore_", "scatter_merge_"):
            target[2] = target[0].view(-1)[: target[1].numel()]  # base is a view of the weight
        else:
            target[5] = target[3]  # exp_avg is delta
    elif mutation == "nan_hyper":
        if op == "restore_":
            applied = False
        elif op == "scatter_merge_":
            hyper = dict(alpha=float("nan"))
        else:
            hyper[rng.choice(list(hyper))] = rng.choice([float("nan"), float("inf")])
    elif mutation == "noncontiguous":
        if weight.dim() >= 2 and weight.shape[0] > 1 and weight.shape[1] > 1:
            target[0] = weight.transpose(0, 1)
        else:
            applied = False
    elif mutation == "not_tensor":
        target[2] = target[2].tolist()

    if op == "scatter_merge_":
        w, idx, base, delta = sets[0][:4]
        args = dict(
            weight=w, index=idx, base=base, delta=delta, alpha=hyper.get("alpha", rng.choice([1.0, 0.5]))
        )
    elif op == "restore_":
        w, idx, base = sets[0][:3]
        args = dict(weight=w, index=idx, base=base)
    elif op == "sparse_adamw_":
        hyper.pop("alpha", None)
        args = dict(
            zip(("weight", "index", "base", "delta", "grad", "exp_avg", "exp_avg_sq"), sets[0], strict=True)
        )
        args.update(step=float(rng.choice([1, 3])), **hyper)
        if mutation == "nan_hyper" and rng.random() < 0.3:
            args["step"] = float("nan")
    else:
        hyper.pop("alpha", None)
        names = ("weights", "indices", "bases", "deltas", "grads", "exp_avgs", "exp_avg_sqs")
        args = {name: [s[j] for s in sets] for j, name in enumerate(names)}
        args.update(steps=[float(rng.choice([1, 2])) for _ in sets], **hyper)
    return args, written, applied


def _call(op: str, args: dict):
    return getattr(sk, op)(**args)


def _snapshot(args: dict) -> dict:
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone() if v.device.type != "meta" else v
        if isinstance(v, list):
            return [copy(x) for x in v]
        return v

    return {k: copy(v) for k, v in args.items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _compare(op: str, got, args: dict, expected_args: dict, expected) -> bool:
    if op == "sampled_weight_grad_linear":
        return _close(got, expected)
    for key, value in args.items():
        want = expected_args[key]
        values = value if isinstance(value, list) else [value]
        wants = want if isinstance(want, list) else [want]
        for v, w in zip(values, wants, strict=True):
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not _close(v, w):
                return False
    return True


@pytest.mark.parametrize("device", ["cpu"])
def test_fuzz_ops(device, capsys):
    backends = backends_for(device)
    outcomes = collections.Counter()
    findings = []
    for i in range(CASES):
        rng, g, op, backend, checks, mutation = _case(i, backends)
        args, written, applied = _prepare(op, rng, g, mutation)
        if not applied:
            mutation = "none (skipped: " + mutation + ")"
        before = _snapshot(args)
        expected, expected_args = None, None
        if mutation == "none":
            expected_args = _snapshot(args)
            with sara_kernels.use_backend("reference"):
                expected = _call(op, expected_args)
        error = None
        with sara_kernels.use_backend(backend), sara_kernels.index_checks(checks):
            try:
                got = _call(op, args)
            except ERRORS as exc:  # noqa: PERF203
                error, got = exc, None
        where = f"case {i}: {op} on {backend}, checks {'on' if checks else 'off'}, mutation {mutation}"
        assert all(w.intact() for w in written), f"{where}: wrote outside a tensor"
        if mutation == "none" or mutation.startswith("none (skipped"):
            if mutation == "none":
                assert error is None, f"{where}: valid inputs raised {error!r}"
                assert _compare(op, got, args, expected_args, expected), (
                    f"{where}: differs from the reference"
                )
            outcomes["valid: matches the reference" if mutation == "none" else "mutation not applicable"] += 1
            continue
        if mutation in STATIC or checks:
            assert error is not None, f"{where}: accepted"
            message = str(error)
            assert any(name in message for name in ARGUMENTS[op]) or "meta" in message, (
                f"{where}: the error does not name an argument: {message}"
            )
            if mutation != "not_tensor":
                for key, value in args.items():  # nothing written
                    old = before[key]
                    values = value if isinstance(value, list) else [value]
                    olds = old if isinstance(old, list) else [old]
                    for v, o in zip(values, olds, strict=True):
                        if isinstance(v, torch.Tensor) and v.device.type != "meta" and v.dtype == o.dtype:
                            assert torch.equal(v, o), f"{where}: {key} was written before the error"
            outcomes[
                f"{'static' if mutation in STATIC else 'bad index, checks on'}: refused naming the argument"
            ] += 1
        else:
            key = "bad index, checks off: " + (
                "refused" if error is not None else "ran, wrote nothing outside"
            )
            outcomes[key] += 1
            if error is None and mutation in ("index_oob", "index_negative"):
                findings.append(where)
    with capsys.disabled():
        print(f"\nfuzz: {CASES} cases (seed {SEED}) over {len(ARGUMENTS)} ops x backends {backends}")
        for what, count in sorted(outcomes.items()):
            print(f"  {count:5d}  {what}")
        if findings:
            print(f"  ran with an out-of-range index and checks off (masked in the kernel): {len(findings)}")
    assert sum(outcomes.values()) == CASES
