"""Sampled weight gradients: only the k selected entries of dL/dW, never the dense [out, in] gradient.

Both kernels are "direct": each program owns ``BLOCK_K`` selected entries and streams over the
reduction dimension (tokens for linear, (n, p, q) output positions for conv), gathering the two
operands of each entry's dot product and accumulating elementwise products in a 2-D register tile
that is reduced once at the end (a per-chunk ``tl.sum`` would pay a cross-lane reduction every
iteration).

Accumulation is fp32 for fp32/fp16/bf16 inputs (fp16 and bf16 products are exact in fp32) and fp64
for fp64 inputs; the accumulator takes the output pointer's element type, so one kernel body covers
both.

When k is small the ``cdiv(k, BLOCK_K)`` programs cannot fill the GPU, so the reduction dimension is
also split across a second grid axis. Each split writes its partial sums to its own row of a
``[splits, k]`` workspace, summed afterwards with torch: deterministic, unlike atomics, and still
O(k) memory rather than O(out * in).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

# Linear: a [BLOCK_N, BLOCK_K] fp32 tile is 4096 values = 32 registers/thread at 4 warps.
LINEAR_BLOCK_K = 64
LINEAR_BLOCK_N = 64
# Conv: [BLOCK_K, BLOCK_T] with the (n, p, q) axis last so that lanes walk contiguous q (coalesced
# grad_out loads, stride-sw x loads).
CONV_BLOCK_K = 32
CONV_BLOCK_T = 128
NUM_WARPS = 4
# A split must cover at least this many reduction chunks, or the workspace + sum costs more than it saves.
MIN_CHUNKS_PER_SPLIT = 4


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while launching: Triton launches on the current device.

    CPU tensors (the interpreter, ``TRITON_INTERPRET=1``) need no guard.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(t: torch.Tensor) -> int:
    """Programs that keep the device busy: a few waves of SMs on CUDA; 1 on the interpreter, which
    runs programs one after another, so splitting there only adds overhead."""
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return 1


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _num_splits(k_blocks: int, reduce_len: int, block: int, device_tensor: torch.Tensor) -> int:
    target = target_programs(device_tensor)
    if k_blocks >= target:
        return 1
    max_splits = max(1, triton.cdiv(reduce_len, block * MIN_CHUNKS_PER_SPLIT))
    return max(1, min(triton.cdiv(target, k_blocks), max_splits))


def _split_bounds(reduce_len: int, splits: int, block: int) -> tuple[int, int]:
    """(splits, per-split length); the length is a multiple of ``block`` so chunks never straddle."""
    per = triton.cdiv(triton.cdiv(reduce_len, splits), block) * block
    return triton.cdiv(reduce_len, per), per


def _finish(out: torch.Tensor, splits: int) -> torch.Tensor:
    return out[0] if splits == 1 else out.sum(0)


# ---------------------------------------------------------------------------------------------
# Linear: grad[j] = sum_n grad_out[n, r_j] * x[n, c_j],  (r_j, c_j) = divmod(index[j], in_features)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _entries(index_ptr, k, numel, BLOCK_K: tl.constexpr):
    """This program's reduction slice, its block of entries (offsets, which exist), their flat
    indices in int64, and which of those address the weight (an index outside [0, numel) reads
    nothing: its entry stays 0)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    idx = tl.load(index_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    return tl.program_id(1), offs_k, mask_k, idx, mask_k & (idx >= 0) & (idx < numel)


@triton.jit
def _sampled_grad_linear_kernel(
    g_ptr,  # [N, out] grad_out
    x_ptr,  # [N, in]
    index_ptr,  # [k] int32/int64, sorted flat indices into [out, in]
    out_ptr,  # [splits, k] fp32/fp64 partial sums (the accumulation dtype)
    k,
    N,
    numel,  # out * in: an index outside [0, numel) reads nothing (its entry is 0)
    in_features,
    stride_g,
    stride_x,
    g_step,  # BLOCK_N * stride_g
    x_step,  # BLOCK_N * stride_x
    n_per_split,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # int64 before any multiply: out * in (and N * stride) can exceed 2**31 on large layers.
    pid_s, offs_k, mask_k, idx, valid_k = _entries(index_ptr, k, numel, BLOCK_K)
    row = idx // in_features
    col = idx - row * in_features

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=out_ptr.dtype.element_ty)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    # Sorted indices mean neighbouring entries mostly share a row: the grad_out gathers hit the
    # same addresses (broadcast) and the x gathers walk nearby columns. The pointer tiles advance by
    # a fixed step (computed on the host, so BLOCK_N * stride cannot overflow int32 in the kernel)
    # instead of being recomputed from n every chunk.
    n64 = offs_n.to(tl.int64)[:, None]
    g_ptrs = g_ptr + n64 * stride_g + row[None, :]
    x_ptrs = x_ptr + n64 * stride_x + col[None, :]
    for n0 in range(n_start, n_end, BLOCK_N):  # noqa: B007  (offs_n carries the position)
        mask = (offs_n < n_end)[:, None] & valid_k[None, :]
        g = tl.load(g_ptrs, mask=mask, other=0.0)
        xv = tl.load(x_ptrs, mask=mask, other=0.0)
        acc += g.to(acc.dtype) * xv.to(acc.dtype)
        offs_n += BLOCK_N
        g_ptrs += g_step
        x_ptrs += x_step

    result = tl.sum(acc, axis=0)
    tl.store(out_ptr + pid_s.to(tl.int64) * k + offs_k, result, mask=mask_k)


def _run_split(kernel, grad_out, x, index, length, block_k, block_len, splits, geometry, **meta):
    """Launch a direct kernel on ``[k blocks, splits]`` programs, each summing one slice of the
    reduction of ``length`` terms, and add the slices: ``[k]`` (fp32, or fp64 for fp64 inputs).
    ``geometry(grad_out, x, per)`` gives the kernel's arguments after ``out, k`` (from the
    contiguous inputs); ``splits`` forces the number of slices (tests), else it fills the GPU."""
    acc = _acc_dtype(x)
    k = index.numel()
    if k == 0 or length == 0:
        return torch.zeros(k, dtype=acc, device=x.device)
    grad_out, x, index = grad_out.contiguous(), x.contiguous(), index.contiguous()
    k_blocks = triton.cdiv(k, block_k)
    if splits is None:
        splits = _num_splits(k_blocks, length, block_len, x)
    splits, per = _split_bounds(length, max(1, splits), block_len)
    out = torch.empty((splits, k), dtype=acc, device=x.device)
    with device_guard(x):
        kernel[(k_blocks, splits)](grad_out, x, index, out, k, *geometry(grad_out, x, per), **meta)
    return _finish(out, splits)


def _linear_direct(grad_out, x, index, out_features: int, in_features: int, splits: int | None = None):
    """The Triton kernel: grad_out: [N, out], x: [N, in], index: [k] -> [k]."""
    N = x.shape[0]

    def geometry(g, xx, per):
        s_g, s_x = g.stride(0), xx.stride(0)
        steps = LINEAR_BLOCK_N * s_g, LINEAR_BLOCK_N * s_x  # the pointer tiles' advance per chunk
        return N, out_features * in_features, in_features, s_g, s_x, *steps, per

    return _run_split(
        _sampled_grad_linear_kernel, grad_out, x, index, N, LINEAR_BLOCK_K, LINEAR_BLOCK_N, splits, geometry,
        BLOCK_K=LINEAR_BLOCK_K, BLOCK_N=LINEAR_BLOCK_N, num_warps=NUM_WARPS,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Conv2d: grad[(o, c, i, j)] = sum_{n,p,q} dy[n, o, p, q] * x[n, g*Cg + c, p*sh + i*dh - ph, q*sw + j*dw - pw]
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sampled_grad_conv2d_kernel(
    dy_ptr,  # [N, O, P, Q] contiguous
    x_ptr,  # [N, C, H, W] contiguous
    index_ptr,  # [k] flat indices into the weight [O, Cg, KH, KW]
    out_ptr,  # [splits, k] partial sums
    k,
    numel,  # O * Cg * KH * KW: an index outside [0, numel) reads nothing (its entry is 0)
    T,  # N * P * Q: the flattened reduction length
    O,
    C,
    H,
    W,
    P,
    Q,
    Cg,
    KH,
    KW,
    out_per_group,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    t_per_split,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Decode each entry once per program (int64: the weight may hold >= 2**31 entries).
    pid_s, offs_k, mask_k, idx, valid_k = _entries(index_ptr, k, numel, BLOCK_K)
    kj = idx % KW
    rest = idx // KW
    ki = rest % KH
    rest = rest // KH
    ci = rest % Cg
    o = rest // Cg
    channel = (o // out_per_group) * Cg + ci
    # Per-entry parts of the addresses and of the input coordinates.
    PQ = P * Q
    HW = H * W
    dy_entry = o * PQ
    x_entry = channel * HW
    # Tap offsets are small: int32 keeps the per-chunk [BLOCK_K, BLOCK_T] coordinate math cheap.
    h_off = (ki * dil_h - pad_h).to(tl.int32)
    w_off = (kj * dil_w - pad_w).to(tl.int32)

    acc = tl.zeros([BLOCK_K, BLOCK_T], dtype=out_ptr.dtype.element_ty)
    t_start = pid_s * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        # (n, p, q) of this chunk: computed once per chunk in 1-D, then broadcast against the entries.
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < t_end
        n = t // PQ
        pq = t - n * PQ
        p = pq // Q
        q = pq - p * Q
        n64 = n.to(tl.int64)
        h = p[None, :] * stride_h + h_off[:, None]
        w = q[None, :] * stride_w + w_off[:, None]
        inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        base_mask = valid_k[:, None] & mask_t[None, :]
        dy = tl.load(
            dy_ptr + (n64 * O * PQ + pq)[None, :] + dy_entry[:, None],
            mask=base_mask,
            other=0.0,
        )
        # Out-of-image taps are the zero padding: masked to 0, never dereferenced.
        xv = tl.load(
            x_ptr + (n64 * C * HW)[None, :] + x_entry[:, None] + h * W + w,
            mask=base_mask & inside,
            other=0.0,
        )
        acc += dy.to(acc.dtype) * xv.to(acc.dtype)

    result = tl.sum(acc, axis=1)
    tl.store(out_ptr + pid_s.to(tl.int64) * k + offs_k, result, mask=mask_k)


def _conv2d_direct(grad_out, x, index, weight_shape, stride, padding, dilation, groups: int, splits=None):
    """The Triton kernel: grad_out: [N, O, P, Q], x: [N, C, H, W], index: [k] -> [k] entries of the
    conv2d weight gradient."""
    N, C, H, W = x.shape
    O, Cg, KH, KW = (int(s) for s in weight_shape)
    P, Q = grad_out.shape[2], grad_out.shape[3]
    T = N * P * Q

    def geometry(g, xx, per):
        conv = [int(v) for v in (*stride, *padding, *dilation)]  # sh, sw, ph, pw, dh, dw
        return O * Cg * KH * KW, T, O, C, H, W, P, Q, Cg, KH, KW, O // groups, *conv, per

    return _run_split(
        _sampled_grad_conv2d_kernel, grad_out, x, index, T, CONV_BLOCK_K, CONV_BLOCK_T, splits, geometry,
        BLOCK_K=CONV_BLOCK_K, BLOCK_T=CONV_BLOCK_T, num_warps=NUM_WARPS,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# gemm variant and the backend's dispatch
# ---------------------------------------------------------------------------------------------
#: Bound of the dense gradient chunk the gemm variant forms (bytes), as the native backends'.
WORKSPACE_BYTES = 64 << 20
#: Conv auto rule: the Triton kernel below CONV_DIRECT_BASE + CONV_DIRECT_PER_SQRT_L / sqrt(N*P*Q)
#: density, the gemm variant above. Fitted to an H200 run (bf16, SD1.5 layers,
#: benchmarks/results/gpu_kernels_h200.json: the kernel was 0.13-0.93x the dense cuDNN gradient at
#: 0.1% and crossed the gemm variant at ~0.1-0.3% for N*P*Q >= 512, ~0.7-1.2% for 64-256). For
#: linear the kernel never beat the GEMM there (2.3-3.6x dense at 0.1%): auto always takes gemm.
CONV_DIRECT_BASE = 0.001
CONV_DIRECT_PER_SQRT_L = 0.07


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with an fp32 (fp64) result and fp32 (fp64) accumulation.

    fp16/bf16 on CUDA: tensor cores with an fp32 result (``out_dtype``, PyTorch >= 2.9); else the
    operands are upcast (their values are exact in fp32, and in TF32 too). fp32 operands follow
    ``torch.backends.cuda.matmul.allow_tf32`` like the dense gradient of the same layer would.
    """
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(a.to(acc), b.to(acc))


def _chunk_bounds(
    index: torch.Tensor, rows: int, per_row: int, chunk_rows: int
) -> list[tuple[int, int, int]]:
    """(first row, entry start, entry end) of each chunk of ``chunk_rows`` rows that holds entries
    (index sorted). One chunk needs no host sync."""
    if chunk_rows >= rows:
        return [(0, 0, index.numel())]
    starts = torch.arange(0, rows + chunk_rows, chunk_rows, device=index.device).clamp_max(rows) * per_row
    cuts = torch.searchsorted(index.to(torch.int64), starts).tolist()
    return [
        (r0, a, b) for r0, a, b in zip(range(0, rows, chunk_rows), cuts[:-1], cuts[1:], strict=False) if b > a
    ]


def _linear_gemm(grad_out, x, index, out_features, in_features):
    """The dense gradient in chunks of output rows (cuBLAS), then a gather of the entries."""
    acc = _acc_dtype(x)
    k = index.numel()
    out = torch.empty(k, dtype=acc, device=x.device)
    chunk_rows = max(1, WORKSPACE_BYTES // (torch.finfo(acc).bits // 8 * in_features))
    flat = index.to(torch.int64)
    for r0, a, b in _chunk_bounds(index, out_features, in_features, chunk_rows):
        r1 = min(out_features, r0 + chunk_rows)
        dense = _mm_acc(grad_out[:, r0:r1].t(), x, acc)  # [rows, in]
        out[a:b] = dense.reshape(-1)[flat[a:b] - r0 * in_features]
    return out


def _conv2d_gemm(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    """The dense weight gradient (cuDNN / oneDNN through aten.convolution_backward), in chunks of
    output channels when it exceeds the workspace bound, then a gather. fp16/bf16 on CUDA stay in
    their dtype (fp32 accumulation, each entry rounded once, like the dense gradient); elsewhere the
    inputs are upcast (exact fp32 sums, no TF32)."""
    acc = _acc_dtype(x)
    k = index.numel()
    O, Cg, KH, KW = (int(s) for s in weight_shape)
    lowp = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    dtype = x.dtype if lowp else acc
    xx = x if lowp else x.to(acc)
    gg = grad_out if lowp else grad_out.to(acc)
    per_row = Cg * KH * KW
    chunk_rows = O if groups > 1 else max(1, WORKSPACE_BYTES // (torch.finfo(dtype).bits // 8 * per_row))
    out = torch.empty(k, dtype=acc, device=x.device)
    flat = index.to(torch.int64)
    for r0, a, b in _chunk_bounds(index, O, per_row, chunk_rows):
        r1 = min(O, r0 + chunk_rows)
        shape_only = torch.empty((r1 - r0, Cg, KH, KW), dtype=dtype, device=x.device)
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=False,
        ):
            dense = torch.ops.aten.convolution_backward(
                gg[:, r0:r1] if chunk_rows < O else gg,
                xx,
                shape_only,
                None,
                [int(v) for v in stride],
                [int(v) for v in padding],
                [int(v) for v in dilation],
                False,
                [0, 0],
                groups,
                [False, True, False],
            )[1]
        out[a:b] = dense.reshape(-1)[flat[a:b] - r0 * per_row].to(acc)
    return out


def _check_variant(op: str, variant: int) -> None:
    """The Triton backend has auto (0), direct (1) and gemm (2); anything else is an error naming it."""
    if variant not in (0, 1, 2):
        name = {3: "tiled"}.get(variant, str(variant))
        raise ValueError(
            f"sara_kernels.{op}: variant '{name}' is not a Triton variant; use auto, direct or gemm"
        )


def sampled_weight_grad_linear(
    grad_out, x, index, out_features: int, in_features: int, *, splits: int | None = None, variant: int = 0
) -> torch.Tensor:
    """grad_out: [N, out], x: [N, in], index: [k] -> [k] (fp32, or fp64 for fp64 inputs).

    ``variant``: 0 auto (gemm), 1 direct (the Triton kernel), 2 gemm (cuBLAS over bounded row
    chunks, then a gather). ``splits`` forces the kernel's reduction splits (tests).
    """
    _check_variant("sampled_weight_grad_linear", variant)
    if index.numel() == 0 or x.shape[0] == 0:
        return torch.zeros(index.numel(), dtype=_acc_dtype(x), device=x.device)
    if variant == 1:
        return _linear_direct(grad_out, x, index, out_features, in_features, splits)
    return _linear_gemm(grad_out.contiguous(), x.contiguous(), index.contiguous(), out_features, in_features)


def sampled_weight_grad_conv2d(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    weight_shape,
    stride,
    padding,
    dilation,
    groups: int,
    *,
    splits: int | None = None,
    variant: int = 0,
) -> torch.Tensor:
    """grad_out: [N, O, P, Q], x: [N, C, H, W], index: [k] -> [k] entries of the conv2d weight gradient.

    ``variant``: 0 auto (the kernel below the fitted crossover density, gemm above), 1 direct (the
    Triton kernel), 2 gemm (the dense weight gradient, then a gather).
    """
    _check_variant("sampled_weight_grad_conv2d", variant)
    k = index.numel()
    N, P, Q = grad_out.shape[0], grad_out.shape[2], grad_out.shape[3]
    if k == 0 or N * P * Q == 0:
        return torch.zeros(k, dtype=_acc_dtype(x), device=x.device)
    if variant == 0:
        numel = math.prod(int(s) for s in weight_shape)
        crossover = CONV_DIRECT_BASE + CONV_DIRECT_PER_SQRT_L / math.sqrt(N * P * Q)
        variant = 1 if k / numel < crossover else 2
    if variant == 1:
        return _conv2d_direct(grad_out, x, index, weight_shape, stride, padding, dilation, groups, splits)
    return _conv2d_gemm(
        grad_out.contiguous(),
        x.contiguous(),
        index.contiguous(),
        weight_shape,
        stride,
        padding,
        dilation,
        groups,
    )
