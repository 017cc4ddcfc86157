"""Cross-entropy over class logits in Triton: the language-model loss without the float32 copy.

Entry points (the ``"triton"`` backend of ``fusedlm.ops.cross_entropy``) have the signatures,
return conventions and dtypes of the same functions in :mod:`fusedlm.reference`:

* ``cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss=0.0)
  -> (loss, row_max, log_sum)``
* ``cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum, ignore_index,
  label_smoothing, out=None, z_loss=0.0) -> dlogits``

logits are (N, V) with any strides, in float16/bfloat16/float32/float64; target (N) int64;
loss, row_max and log_sum come back (N) in float32 (float64 for float64 logits), dlogits (N, V)
contiguous in the logits' dtype. All arithmetic is in that compute dtype. The logsumexp is
kept as row_max + log_sum (see fusedlm.reference.cross_entropy_fwd) so that neither pass loses
the digits one rounded logsumexp would where the logits are large.

Why: eager PyTorch computes the loss of bf16 logits as ``logits.float()`` then ``log_softmax``
then ``nll_loss``, and backward as the same chain in reverse: about eight float32 passes over
an (N, V) tensor that, for a GPT-2 vocabulary and 16k tokens, is 3.3 GB each, plus a saved
float32 copy. Here the forward reads the logits once (online max and sum of exponentials over
V in chunks, one exponential per element) and the backward reads them once and writes the
gradient once: three passes at the logits' own width.

Layout: a program takes ROWS rows (several when V is small, so each program moves a few
thousand elements) and walks V in BLOCK_V-column chunks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .interpreter_fixes import patch_interpreter
from .launch import LAUNCH_OPTIONS, compute_type, device_context

# Columns per chunk; a program holds (ROWS, BLOCK_V) values at once.
MAX_BLOCK_V = 4096
TILE_ELEMENTS = 4096
MAX_ROWS = 64

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter()


@triton.jit
def cross_entropy_fwd_kernel(
    X, Target, Loss, RowMax, LogSum,
    N, V, stride_xn, stride_xv, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    COMPUTE: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Loss (plus z_loss * logsumexp**2 when Z_LOSS), max and log of the sum of exp(x - max)
    of ROWS rows.

    X (N, V) strided, any float dtype; Target (N) int64; Loss, RowMax, LogSum (N) in COMPUTE.
    """
    smoothing = tl.full([], label_smoothing, COMPUTE)  # (float64 only where COMPUTE is)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xn  # (ROWS, 1) pointers; N * V may pass 2**31
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    running_max = tl.full([ROWS], neg_inf, COMPUTE)
    running_sum = tl.zeros([ROWS], COMPUTE)  # sum of exp(x - running_max)
    x_sum = tl.zeros([ROWS], COMPUTE)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = row_mask[:, None] & (c < V)[None, :]
        x = tl.load(x_rows + c.to(tl.int64)[None, :] * stride_xv, mask=mask,
                    other=neg_inf).to(COMPUTE)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # A row that has seen only -inf keeps a finite shift, so exp gives 0 rather than NaN.
        shift = tl.where(new_max == neg_inf, 0.0, new_max)
        running_sum = (running_sum * tl.exp(running_max - shift)
                       + tl.sum(tl.exp(x - shift[:, None]), axis=1))
        running_max = new_max
        if SMOOTHING:
            x_sum += tl.sum(tl.where(mask, x, 0.0), axis=1)
    shift = tl.where(running_max == neg_inf, 0.0, running_max)
    log_sum = tl.log(tl.where(row_mask, running_sum, 1.0))  # (rows past N: log(1), no warning)
    target = tl.load(Target + rows, mask=row_mask, other=ignore_index)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(x_rows + (tl.where(in_range, target, 0) * stride_xv)[:, None],
                       mask=(row_mask & valid & in_range)[:, None], other=0.0).to(COMPUTE)
    x_target = tl.sum(x_target, axis=1)  # (ROWS, 1) -> (ROWS)
    # (each term is small next to the logits: the loss keeps digits the logsumexp would round)
    loss = (1.0 - smoothing) * (shift - x_target) + log_sum
    if SMOOTHING:
        loss += smoothing * (shift - x_sum / V)
    if Z_LOSS:
        lse = shift + log_sum
        loss += tl.full([], z_loss, COMPUTE) * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(Loss + rows, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(RowMax + rows, shift, mask=row_mask)
    tl.store(LogSum + rows, log_sum, mask=row_mask)


@triton.jit
def cross_entropy_bwd_kernel(
    DLoss, X, Target, RowMax, LogSum, DX,
    N, V, stride_dloss, stride_xn, stride_xv, ignore_index, label_smoothing: tl.float64,
    z_loss: tl.float64,
    COMPUTE: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dX = dLoss * (scale * softmax(X) - (1 - s) * onehot(Target) - s / V) of ROWS rows, with
    scale = 1 + 2 * z_loss * logsumexp when Z_LOSS, else 1; 0 on ignored rows, NaN on rows
    whose target is outside [0, V).

    DLoss (N) strided (stride 0: one value for every row); X (N, V) strided; Target (N) int64;
    RowMax, LogSum (N) in COMPUTE; DX (N, V) contiguous in X's dtype.
    """
    smoothing = tl.full([], label_smoothing, COMPUTE)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    x_rows = X + rows64[:, None] * stride_xn
    dx_rows = DX + rows64[:, None] * V
    target = tl.load(Target + rows, mask=row_mask, other=ignore_index)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    grad = tl.load(DLoss + rows64 * stride_dloss, mask=row_mask, other=0.0).to(COMPUTE)
    grad = tl.where(valid, tl.where(in_range, grad, float("nan")), 0.0)
    row_max = tl.load(RowMax + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(LogSum + rows, mask=row_mask, other=0.0)
    if Z_LOSS:  # d(z * lse**2)/dx = 2 * z * lse * softmax(x)
        scale = 1.0 + 2.0 * tl.full([], z_loss, COMPUTE) * (row_max + log_sum)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = row_mask[:, None] & (c < V)[None, :]
        x = tl.load(x_rows + c.to(tl.int64)[None, :] * stride_xv, mask=mask,
                    other=0.0).to(COMPUTE)
        probs = tl.exp((x - row_max[:, None]) - log_sum[:, None])
        if Z_LOSS:
            probs *= scale[:, None]
        if SMOOTHING:
            probs -= smoothing / V
        probs = tl.where(c[None, :] == target[:, None], probs - (1.0 - smoothing), probs)
        # (ignored rows get exact zeros even where their softmax is NaN)
        dx = tl.where(valid[:, None], probs * grad[:, None], 0.0)
        tl.store(dx_rows + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def _launch_shape(N: int, V: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_V, num_warps, programs) for (N, V) logits."""
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    rows = max(1, min(MAX_ROWS, TILE_ELEMENTS // block_v, triton.next_power_of_2(N)))
    num_warps = 8 if rows * block_v >= 4096 else 4
    return rows, block_v, num_warps, triton.cdiv(N, rows)


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be a 2-D float tensor, got {logits.dtype} "
                         f"{list(logits.shape)}")
    if target.shape != logits.shape[:1] or target.dtype != torch.int64:
        raise ValueError(f"target must be int64 of shape {list(logits.shape[:1])}, got "
                         f"{target.dtype} {list(target.shape)}")


def cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V) any strides, target (N) int64 -> loss, row_max, log_sum (N) in the compute
    dtype."""
    _check(logits, target)
    N, V = logits.shape
    stat = reference.compute_dtype(logits.dtype)
    loss, row_max, log_sum = (torch.empty(N, dtype=stat, device=logits.device) for _ in range(3))
    rows, block_v, num_warps, programs = _launch_shape(N, V)
    target = target.contiguous()
    with device_context(logits.device):
        cross_entropy_fwd_kernel[(programs,)](
            logits, target, loss, row_max, log_sum, N, V, logits.stride(0), logits.stride(1),
            ignore_index, label_smoothing, z_loss,
            COMPUTE=compute_type(logits.dtype), SMOOTHING=label_smoothing != 0.0,
            Z_LOSS=z_loss != 0.0, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return loss, row_max, log_sum


def cross_entropy_bwd(
    grad_loss: Tensor, logits: Tensor, target: Tensor, row_max: Tensor, log_sum: Tensor,
    ignore_index: int, label_smoothing: float, out: Tensor | None = None, z_loss: float = 0.0,
) -> Tensor:
    """grad_loss (N) any stride, logits (N, V) any strides, target (N) int64, row_max and
    log_sum (N) from the forward -> dlogits (N, V) contiguous in the logits' dtype: ``out``
    when given, which may be the logits themselves (each program loads a chunk before it
    stores the chunk's gradient in its place)."""
    _check(logits, target)
    N, V = logits.shape
    if out is None:
        dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    else:
        reference.check_gradient_out(out, logits)
        dlogits = out
    rows, block_v, num_warps, programs = _launch_shape(N, V)
    target, row_max, log_sum = target.contiguous(), row_max.contiguous(), log_sum.contiguous()
    with device_context(logits.device):
        cross_entropy_bwd_kernel[(programs,)](
            grad_loss, logits, target, row_max, log_sum, dlogits, N, V, grad_loss.stride(0),
            logits.stride(0), logits.stride(1), ignore_index, label_smoothing, z_loss,
            COMPUTE=compute_type(logits.dtype), SMOOTHING=label_smoothing != 0.0,
            Z_LOSS=z_loss != 0.0, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return dlogits
