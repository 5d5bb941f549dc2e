"""SaRA's nuclear-norm low-rank constraint on the sparse deltas.

The SaRA paper adds ``lambda * L_rank`` to the task loss, with ``L_rank = ||P_M||_*`` the nuclear norm
(sum of singular values) of a layer's trainable sparse matrix: the k-sized ``sparse_delta`` scattered
into a dense ``[out, rest]`` matrix (a Conv2d weight ``[out, in/groups, kh, kw]`` is read as
``out x (in/groups * kh * kw)``, i.e. row-major ``weight.view(out, -1)``), and ``lambda`` about
5e-4 ... 5e-3. :func:`nuclear_norm_loss` computes it so that its gradient reaches the deltas, and
only the deltas::

    optimizer = SparseAdamW(sparse_parameters(model), lr=...)
    loss = task_loss(model(x), y) + 1e-3 * nuclear_norm_loss(model, layers="random", method="polar")
    loss.backward()
    optimizer.step()

Gradient (both methods). The nuclear norm is not differentiable where the matrix is rank deficient;
its subdifferential at ``A = U diag(s) V^T`` is ``{U_r V_r^T + W : U_r^T W = 0, W V_r = 0, ||W||_2 <= 1}``
(``r`` = rank). Both methods give the delta the *minimum-norm* subgradient ``G = U_r V_r^T`` read at
the selected entries, ``grad[j] = G.view(-1)[index[j]]``; in particular the gradient is 0 while the
delta is 0 (the state every layer starts in). Autograd through ``torch.linalg.svdvals`` would instead
return ``U V^T`` with LAPACK's arbitrary basis of the null spaces (an identity pattern for a zero
matrix), which moves diagonal entries for no reason and can differ between LAPACK and cuSOLVER. Repeated
non-zero singular values are harmless (``U_r V_r^T`` does not depend on the basis chosen inside a
repeated singular subspace). The gradient is treated as locally constant: there is no second
derivative through the SVD or the iteration (``create_graph`` gives a zero Hessian).

``method="svd"``: exact. Value ``torch.linalg.svd(A).S.sum()`` (what
``torch.linalg.matrix_norm(A, ord="nuc")`` returns), ``r`` = the singular values above
``max(out, rest) * eps(dtype) * s_max`` (the :func:`torch.linalg.matrix_rank` default tolerance).
Costs a dense SVD per layer (comparatively slow on GPUs; same-shaped layers are batched).

``method="polar"``: matmuls only. ``G`` is the polar factor of the (detached) dense delta by the
Newton-Schulz iteration ``X0 = A / ||A||_F``, ``X <- 1.5 X - 0.5 X X^T X`` on the smaller side, and the
loss is ``sum_j G.view(-1)[index_j] * delta_j`` (= ``sum_i p(s_i) s_i``, which equals ``||A||_*`` when
``G = U_r V_r^T``), so its gradient with respect to the delta is ``G`` at the selected entries, with no
autograd graph through the dense matrix. A singular value ``s`` of ``A / ||A||_F`` grows by 1.5x per
step while small, then converges quadratically to 1 (zero singular values stay 0). With the default
``polar_steps=30``, every ``s >= 1.4e-5`` reaches ``1 - 1e-3`` (25 steps: ``s >= 1.1e-4``; 35 steps:
``s >= 1.9e-6``); singular values far below that count as (partly) zero, close to what ``svd``'s rank
tolerance does and near fp32 rounding (about 1e-7 relative) anyway. Measured against ``svd`` in fp64
(relative errors of the value and of the gradient at the selected entries; 28 random sparse matrices,
shapes 64x64, 320x320, 640x640, 320x1280, 1280x320, 320x2880, 768x3072, densities 0.5%, 2%, 10%,
50%), worst case over them:

=====  ===========  ==========
steps  value        gradient
=====  ===========  ==========
15     1.6e-3       9.3e-2
20     7.0e-5       4.0e-2
25     4.6e-6       2.3e-2
30     2.1e-7       4.5e-4
35     1.8e-7       4.0e-5
=====  ===========  ==========

At 30 steps every case but one has gradient error <= 3e-6; the exception (640x640, 0.5% dense) has
singular values around the fp32 rank tolerance, where even fp32 ``svd`` differs from fp64 by 3e-3.
More steps are not always better: fp32 rounding leaves about 1e-7 ``||A||_F`` in the singular values
that are exactly zero (other than those of empty rows / columns, which stay exactly 0), and each step
multiplies that by 1.5, so on an exactly rank-deficient matrix the iteration drifts from
``U_r V_r^T`` towards an arbitrary ``U V^T`` (measured gradient error on a rank-2 block: 2e-3 at 30
steps, 0.12 at 40, 0.7 at 60). 30 steps balance the two. Square layers are the slow ones
(smallest singular values ``~ n^-1.5 ||A||_F``); rectangular layers (a conv's ``out x 9 in``) converge
in 15-20 steps. ``dtype`` sets the matmul precision: ``torch.bfloat16`` (for tensor-core matmuls on
GPUs) measured value error <= 7e-4 and gradient error <= 6e-2 (typically 1e-2) on the same matrices
(on CPU). fp32 matmuls on CUDA follow ``torch.backends.cuda.matmul.allow_tf32``; TF32's 10-bit
mantissa limits the accuracy accordingly (not measured here).

Which layers: every :class:`~sara_kernels.nn.SparseDeltaLinear` / ``SparseDeltaConv2d`` in
``model.modules()`` (``model`` itself included) whose delta has ``k > 0`` entries and requires grad;
only the trainable ``sparse_delta`` enters the matrix (entries frozen by
:func:`~sara_kernels.reselect_` are not part of it).
"""

from __future__ import annotations

import torch
from torch import nn

from sara_kernels.nn import _SparseDeltaMixin

#: Newton-Schulz steps of ``method="polar"``; see the module docstring for the measured accuracy.
DEFAULT_POLAR_STEPS = 30

_METHODS = ("svd", "polar")
_POLAR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_SVD_DTYPES = (torch.float32, torch.float64)
#: At most this many elements per batch of same-shaped dense matrices (256 MiB in fp32).
_BATCH_ELEMENTS = 1 << 26


def polar_factor(
    matrix: torch.Tensor, steps: int = DEFAULT_POLAR_STEPS, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The polar factor ``U_r V_r^T`` of ``matrix`` (``[..., m, n]``) by ``steps`` Newton-Schulz steps.

    ``X0 = A / ||A||_F`` (per matrix; a zero matrix gives 0), then ``X <- 1.5 X - 0.5 X X^T X``,
    computed on the smaller side (transposed when ``m > n``) in ``dtype``. Returns fp32 (fp64 when
    ``dtype`` is fp64), not differentiable (computed under ``no_grad``).
    """
    if dtype not in _POLAR_DTYPES:
        raise ValueError(f"polar_factor: dtype must be one of {_POLAR_DTYPES}, got {dtype}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"polar_factor: steps must be a positive int, got {steps!r}")
    if matrix.dim() < 2:
        raise ValueError(f"polar_factor: expected a [..., m, n] matrix, got shape {tuple(matrix.shape)}")
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad():
        a = matrix.detach().to(out_dtype)
        transposed = a.shape[-2] > a.shape[-1]
        if transposed:
            a = a.mT
        norm = torch.linalg.matrix_norm(a).clamp_min(torch.finfo(out_dtype).tiny)
        x = (a / norm[..., None, None]).to(dtype)
        for _ in range(steps):
            x = 1.5 * x - 0.5 * ((x @ x.mT) @ x)
        x = x.to(out_dtype)
        return x.mT if transposed else x


def _sparse_layers(model: nn.Module) -> list[_SparseDeltaMixin]:
    """One layer per delta (modules sharing a weight share one delta, regularised once)."""
    found, seen = [], set()
    for m in model.modules():
        if isinstance(m, _SparseDeltaMixin) and id(m.sparse_delta) not in seen:
            seen.add(id(m.sparse_delta))
            found.append(m)
    return found


def _matrix_shape(layer: _SparseDeltaMixin) -> tuple[int, int]:
    out = layer.weight.shape[0]
    return out, layer.weight.numel() // max(1, out)


def _choose(candidates: list, layers, generator: torch.Generator | None) -> list:
    """The layers to regularise this call (in model order)."""
    if layers == "all" or not candidates:
        return candidates
    device = generator.device if generator is not None else "cpu"
    if layers == "random":
        picked = [int(torch.randint(len(candidates), (), generator=generator, device=device))]
    else:  # a validated positive int
        if layers > len(candidates):
            raise ValueError(
                f"nuclear_norm_loss: layers={layers} but the model has only {len(candidates)} sparse-delta "
                "layer(s) with a trainable non-empty delta"
            )
        picked = torch.randperm(len(candidates), generator=generator, device=device)[:layers].tolist()
    return [candidates[i] for i in sorted(picked)]


def _batched_dense(group: list, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``[B, m, n]`` dense delta matrices (detached) of same-shaped layers."""
    m, n = shape
    numel = m * n
    device = group[0].sparse_delta.device
    flat = torch.zeros(len(group) * numel, dtype=dtype, device=device)
    trainable = [layer.trainable_state() for layer in group]
    index = torch.cat([index.long() + b * numel for b, (index, _, _) in enumerate(trainable)])
    values = torch.cat([delta.detach() for _, _, delta in trainable]).to(dtype)
    flat.index_put_((index,), values)
    return flat.view(len(group), m, n)


def _svd_value_and_subgradient(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix of ``a [B, m, n]``: the nuclear norm [B] and ``U_r V_r^T`` [B, m, n]."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    tol = s[..., :1] * (max(a.shape[-2:]) * torch.finfo(a.dtype).eps)
    keep = (s > tol).to(a.dtype)
    return s.sum(-1), (u * keep[..., None, :]) @ vh


class _NuclearNormSVD(torch.autograd.Function):
    """Value: the exact nuclear norm; gradient w.r.t. the delta: ``U_r V_r^T`` at the selected entries."""

    @staticmethod
    def forward(ctx, delta, value, grad_at_index):
        ctx.save_for_backward(grad_at_index)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_at_index,) = ctx.saved_tensors
        return grad_output * grad_at_index, None, None


def nuclear_norm_loss(
    model: nn.Module,
    layers: str | int = "all",
    method: str = "svd",
    *,
    generator: torch.Generator | None = None,
    polar_steps: int = DEFAULT_POLAR_STEPS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum of the nuclear norms of the chosen sparse-delta layers' delta matrices (SaRA's ``L_rank``).

    Args:
        model: a module containing :class:`~sara_kernels.nn.SparseDeltaLinear` /
            ``SparseDeltaConv2d`` layers, or such a layer itself.
        layers: ``"all"``; ``"random"`` (one layer drawn uniformly per call, as the paper's code
            does); or an int ``n`` (``n`` distinct layers drawn per call). Drawn among the layers with
            a non-empty delta that requires grad; the others are skipped.
        method: ``"svd"`` (exact, dense SVD) or ``"polar"`` (Newton-Schulz, matmuls only).
        generator: random generator for ``"random"`` / ``n`` (default: torch's global one).
        polar_steps: Newton-Schulz steps of ``"polar"`` (default 30; accuracy in the module docs).
        dtype: compute dtype: fp32 (default) or fp64 for both methods; bf16 / fp16 for ``"polar"``
            (fast matmuls on GPUs; measured 1e-2 typical, up to 6e-2, relative gradient error).

    Returns:
        A scalar fp32 tensor on the first chosen layer's device, differentiable with respect to the
        chosen layers' ``sparse_delta`` only (gradient: the minimum-norm subgradient ``U_r V_r^T`` at
        the selected entries). 0 (no graph) when no layer has a trainable non-empty delta.

    Raises:
        ValueError: ``model`` has no sparse-delta layer, or a bad ``layers`` / ``method`` /
            ``polar_steps`` / ``dtype``.
    """
    where = "nuclear_norm_loss"
    if not (isinstance(method, str) and method in _METHODS):
        raise ValueError(f"{where}: method must be one of {_METHODS}, got {method!r}")
    valid_int = isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1
    if not (valid_int or (isinstance(layers, str) and layers in ("all", "random"))):
        raise ValueError(f"{where}: layers must be 'all', 'random' or a positive int, got {layers!r}")
    bad_steps = isinstance(polar_steps, bool) or not isinstance(polar_steps, int) or polar_steps < 1
    if method == "polar" and bad_steps:
        raise ValueError(f"{where}: polar_steps must be a positive int, got {polar_steps!r}")
    allowed = _SVD_DTYPES if method == "svd" else _POLAR_DTYPES
    if dtype not in allowed:
        raise ValueError(f"{where}: dtype for method={method!r} must be one of {allowed}, got {dtype}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )

    all_layers = _sparse_layers(model)
    if not all_layers:
        raise ValueError(
            f"{where}: {type(model).__name__} has no sparse-delta layer (SparseDeltaLinear / "
            "SparseDeltaConv2d); convert it first (sara_kernels.apply_sara)"
        )
    candidates = [m for m in all_layers if m.k > 0 and m.sparse_delta.requires_grad]
    chosen = _choose(candidates, layers, generator)
    if not chosen:
        return torch.zeros((), dtype=torch.float32, device=all_layers[0].sparse_delta.device)
    result_device = chosen[0].sparse_delta.device

    # Same-shaped layers on the same device share one batched SVD / iteration.
    groups: dict[tuple, list] = {}
    for layer in chosen:
        groups.setdefault((_matrix_shape(layer), layer.sparse_delta.device), []).append(layer)

    terms = []
    for (shape, _), group in groups.items():
        per_batch = max(1, _BATCH_ELEMENTS // (shape[0] * shape[1]))
        for start in range(0, len(group), per_batch):
            batch = group[start : start + per_batch]
            with torch.no_grad():
                if method == "svd":
                    values, g = _svd_value_and_subgradient(_batched_dense(batch, shape, dtype))
                else:
                    g = polar_factor(_batched_dense(batch, shape, torch.float32), polar_steps, dtype=dtype)
                g = g.reshape(len(batch), -1)
            for b, layer in enumerate(batch):
                # Only the trainable slots: entries frozen by re-selection get no gradient.
                index, _, delta = layer.trainable_state()
                with torch.no_grad():
                    g_at = g[b][index.long()].to(torch.float32)
                if method == "svd":
                    term = _NuclearNormSVD.apply(delta, values[b].to(torch.float32), g_at)
                else:
                    term = (g_at * delta).sum()
                terms.append(term.to(result_device))
    return torch.stack(terms).sum()


__all__ = ["DEFAULT_POLAR_STEPS", "nuclear_norm_loss", "polar_factor"]
