"""In-place updates of the k selected weight entries: fused AdamW, merge, restore.

Each is one elementwise pass over the k compact vectors plus a scatter into ``weight.view(-1)``.
Indices are strictly increasing (checked by ``_ops.py``), so the scatter never writes one address twice.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from sara_kernels._checks import AdamWHyper

# Memory-bound elementwise kernels: 1024 entries per program, 4 warps (8 per thread).
BLOCK = 1024
NUM_WARPS = 4


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (CPU tensors under the interpreter need none)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as torch rounds a Python scalar applied to an fp32 tensor."""
    return torch.tensor(value, dtype=torch.float64).to(torch.float32).item()


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16, round to nearest even, by integer arithmetic (c10's round_to_nearest_even).

    ``x.to(tl.bfloat16)`` rounds to nearest even on GPUs, but the interpreter truncates; doing it by
    hand gives the same bits as torch everywhere, for a few integer ops on a memory-bound kernel.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = tl.where(x != x, 0x7FC00000, rounded)  # NaN -> canonical quiet NaN
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _block(k, BLOCK: tl.constexpr):
    """This program's entries (int64 offsets, so k may pass 2**31) and which of them exist."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < k


@triton.jit
def _round_to_weight(x, OUT_BF16: tl.constexpr, OUT_FP16: tl.constexpr):
    """Round an fp32/fp64 value for a store into the weight, as torch rounds it.

    fp64 -> fp16/bf16 goes through fp32 (c10::Half and c10::BFloat16 are built from a float), then
    rounds to nearest even. fp32/fp64 weights are left to tl.store's cast (round to nearest).
    """
    if OUT_BF16:
        y = _to_bf16_rtne(x.to(tl.float32))
    elif OUT_FP16:
        y = x.to(tl.float32).to(tl.float16)
    else:
        y = x
    return y


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sparse_adamw_kernel(
    weight_ptr,  # flat weight (fp32/bf16/fp16), written at index
    index_ptr,
    base_ptr,  # [k] frozen base values, weight dtype
    delta_ptr,  # [k] fp32, updated in place
    grad_ptr,  # [k] fp32
    exp_avg_ptr,  # [k] fp32, updated in place
    exp_avg_sq_ptr,  # [k] fp32, updated in place
    k,
    numel,  # weight entries: an index outside [0, numel) is never written (whatever the checks say)
    decay,  # 1 - lr * weight_decay
    lerp_weight,  # 1 - beta1
    beta2,
    one_minus_beta2,
    step_size,  # lr / (1 - beta1**step)
    bc2_sqrt,  # sqrt(1 - beta2**step)
    eps,
    MAXIMIZE: tl.constexpr,
    APPLY_DECAY: tl.constexpr,
    LERP_SMALL: tl.constexpr,  # |1 - beta1| < 0.5: which of torch.lerp's two formulas applies
    OUT_BF16: tl.constexpr,
    OUT_FP16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = _block(k, BLOCK)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g
    if APPLY_DECAY:
        delta = delta * decay
    # exp_avg.lerp_(grad, 1 - beta1), with torch's formula (fma, and the branch on the weight's size).
    if LERP_SMALL:
        m = tl.fma(g - m, lerp_weight, m)
    else:
        m = tl.fma(g - m, lerp_weight - 1.0, g)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): two roundings, as torch does.
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    # IEEE sqrt/div (sqrt_rn, div_rn): Triton's default '/' and sqrt are approximate on NVIDIA GPUs,
    # and torch's are correctly rounded.
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    delta = delta + tl.div_rn(-step_size * m, denom)
    tl.store(delta_ptr + offs, delta, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)

    idx = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    base = tl.load(base_ptr + offs, mask=mask, other=0.0)
    merged = base.to(tl.float32) + delta
    inside = mask & (idx >= 0) & (idx < numel)
    tl.store(weight_ptr + idx, _round_to_weight(merged, OUT_BF16, OUT_FP16), mask=inside)


def _written(*tensors: torch.Tensor) -> None:
    """New versions for the tensors a kernel writes, as an in-place torch op gives them (a graph
    that saved one before refuses to backward through it)."""
    torch.autograd.graph.increment_version(tensors)


def sparse_adamw_(weight, index, base, delta, grad, exp_avg, exp_avg_sq, *, step: float, **hyper) -> None:
    """One AdamW step on the compact fp32 vectors (in place), then weight[index] = base + delta."""
    _written(weight, delta, exp_avg, exp_avg_sq)
    k = index.numel()
    if k == 0:
        return
    lr, beta1, beta2, eps, weight_decay, maximize = AdamWHyper(**hyper)
    # Scalars in double in Python, as torch.optim.AdamW computes them; the kernel gets them as fp32,
    # which is also how torch applies a Python scalar to an fp32 tensor.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    lerp_weight = 1 - beta1
    index = index.contiguous()
    base = base.contiguous()
    with device_guard(weight):
        _sparse_adamw_kernel[(triton.cdiv(k, BLOCK),)](
            weight,
            index,
            base,
            delta,
            grad.contiguous(),
            exp_avg,
            exp_avg_sq,
            k,
            weight.numel(),
            1 - lr * weight_decay,
            lerp_weight,
            beta2,
            1 - beta2,
            lr / bias_correction1,
            math.sqrt(bias_correction2),
            eps,
            MAXIMIZE=bool(maximize),
            APPLY_DECAY=weight_decay != 0,
            LERP_SMALL=abs(lerp_weight) < 0.5,
            OUT_BF16=weight.dtype == torch.bfloat16,
            OUT_FP16=weight.dtype == torch.float16,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


def sparse_adamw_multi_(
    weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, *, steps, **hyper
) -> None:
    """:func:`sparse_adamw_` on each tensor set, one launch per set (set ``i`` at ``steps[i]``)."""
    for weight, index, base, delta, grad, exp_avg, exp_avg_sq, step in zip(
        weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        sparse_adamw_(weight, index, base, delta, grad, exp_avg, exp_avg_sq, step=step, **hyper)


# ---------------------------------------------------------------------------------------------
# Merge and restore
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scatter_merge_kernel(
    weight_ptr,
    index_ptr,
    base_ptr,  # [k], weight dtype
    delta_ptr,  # [k], fp32 or fp64
    k,
    numel,  # weight entries: an index outside [0, numel) is never written
    alpha_hi,
    alpha_lo,
    FP64: tl.constexpr,  # accumulate in fp64 (weight or delta is fp64)
    SCALE: tl.constexpr,  # alpha != 1
    OUT_BF16: tl.constexpr,
    OUT_FP16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = _block(k, BLOCK)
    idx = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    base = tl.load(base_ptr + offs, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
    if FP64:
        d = delta.to(tl.float64)
        if SCALE:
            # Float kernel arguments arrive as fp32; hi + lo restores alpha to ~48 bits. Both are
            # added onto an fp64 tensor so the sum is formed in fp64 (exactly: hi + lo fits in 53 bits).
            alpha = tl.zeros_like(d) + alpha_hi + alpha_lo
            d = d * alpha
        merged = base.to(tl.float64) + d
    else:
        d = delta.to(tl.float32)
        if SCALE:
            d = d * alpha_hi
        merged = base.to(tl.float32) + d
    inside = mask & (idx >= 0) & (idx < numel)
    tl.store(weight_ptr + idx, _round_to_weight(merged, OUT_BF16, OUT_FP16), mask=inside)


def scatter_merge_(
    weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0
) -> None:
    """weight.view(-1)[index] = base + alpha * delta, in fp32 (fp64 if weight or delta is fp64)."""
    _written(weight)
    k = index.numel()
    if k == 0:
        return
    alpha = float(alpha)
    alpha_hi = _fp32(alpha)
    alpha_lo = float(alpha - alpha_hi)
    fp64 = weight.dtype == torch.float64 or delta.dtype == torch.float64
    with device_guard(weight):
        _scatter_merge_kernel[(triton.cdiv(k, BLOCK),)](
            weight,
            index.contiguous(),
            base.contiguous(),
            delta.contiguous(),
            k,
            weight.numel(),
            alpha_hi,
            alpha_lo,
            FP64=fp64,
            SCALE=alpha != 1.0,
            OUT_BF16=weight.dtype == torch.bfloat16,
            OUT_FP16=weight.dtype == torch.float16,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            # torch rounds alpha * delta before adding base; an fma would round once and differ.
            enable_fp_fusion=False,
        )


@triton.jit
def _restore_kernel(weight_ptr, index_ptr, base_ptr, k, numel, BLOCK: tl.constexpr):
    offs, mask = _block(k, BLOCK)
    idx = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    base = tl.load(base_ptr + offs, mask=mask, other=0.0)
    tl.store(weight_ptr + idx, base, mask=mask & (idx >= 0) & (idx < numel))


def restore_(weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> None:
    """weight.view(-1)[index] = base (same dtype: a pure copy)."""
    _written(weight)
    k = index.numel()
    if k == 0:
        return
    with device_guard(weight):
        _restore_kernel[(triton.cdiv(k, BLOCK),)](
            weight, index.contiguous(), base.contiguous(), k, weight.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS
        )
