"""SwiGLU, ``silu(gate) * up``, in Triton: the Llama MLP's activation in one pass each way.

Entry points (the ``"triton"`` backend of ``fusedlm.ops.swiglu``), with the signatures, return
conventions and dtypes of the same functions in :mod:`fusedlm.reference`:

* ``swiglu_fwd(gate, up) -> out``
* ``swiglu_bwd(grad_out, gate, up) -> (dgate, dup)``

Operands are (N, W) (W: the MLP's intermediate width) with any row and column strides, one
float dtype; results come back (N, W) contiguous in that dtype, computed in float32 (float64
for float64 inputs).

Why: eager PyTorch runs ``F.silu(gate) * up`` as two kernels forward and three backward, and
autograd keeps ``silu(gate)`` alive for the product's backward: one more (N, W) activation per
layer. Here the forward reads gate and up once and writes the product; the backward reads the
three operands once, recomputes the sigmoid and writes both gradients.

Layout: a program takes a (ROWS, BLOCK_W) tile; ROWS > 1 when W is small.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter_fixes import patch_interpreter
from .launch import compute_type, device_context

TILE_ELEMENTS = 4096
MAX_BLOCK_W = 2048

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter()


@triton.jit
def _tile(pid, N, W, col_blocks, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """(rows (ROWS) int64, cols (BLOCK_W), mask (ROWS, BLOCK_W)) of program ``pid``."""
    rows = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)
    cols = (pid % col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < N)[:, None] & (cols < W)[None, :]
    return rows.to(tl.int64), cols, mask


@triton.jit
def swiglu_fwd_kernel(
    Gate, Up, Out, N, W, col_blocks, stride_gn, stride_gi, stride_un, stride_ui,
    COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Out = silu(Gate) * Up of one tile. Gate, Up (N, W) strided; Out (N, W) contiguous."""
    rows, cols, mask = _tile(tl.program_id(0), N, W, col_blocks, ROWS, BLOCK_W)
    cols64 = cols.to(tl.int64)  # (a column stride other than 1 times W may pass 2**31)
    g = tl.load(Gate + rows[:, None] * stride_gn + cols64[None, :] * stride_gi, mask=mask,
                other=0.0).to(COMPUTE)
    u = tl.load(Up + rows[:, None] * stride_un + cols64[None, :] * stride_ui, mask=mask,
                other=0.0).to(COMPUTE)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + rows[:, None] * W + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    DOut, Gate, Up, DGate, DUp, N, W, col_blocks, stride_dn, stride_di, stride_gn, stride_gi,
    stride_un, stride_ui,
    COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """DGate = DOut * Up * s * (1 + Gate * (1 - s)) with s = sigmoid(Gate), DUp = DOut *
    silu(Gate), of one tile. DOut, Gate, Up (N, W) strided; DGate, DUp (N, W) contiguous."""
    rows, cols, mask = _tile(tl.program_id(0), N, W, col_blocks, ROWS, BLOCK_W)
    cols64 = cols.to(tl.int64)  # (a column stride other than 1 times W may pass 2**31)
    dy = tl.load(DOut + rows[:, None] * stride_dn + cols64[None, :] * stride_di, mask=mask,
                 other=0.0).to(COMPUTE)
    g = tl.load(Gate + rows[:, None] * stride_gn + cols64[None, :] * stride_gi, mask=mask,
                other=0.0).to(COMPUTE)
    u = tl.load(Up + rows[:, None] * stride_un + cols64[None, :] * stride_ui, mask=mask,
                other=0.0).to(COMPUTE)
    s = 1.0 / (1.0 + tl.exp(-g))
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    dup = dy * g * s
    offsets = rows[:, None] * W + cols[None, :]
    tl.store(DGate + offsets, dgate.to(DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offsets, dup.to(DUp.dtype.element_ty), mask=mask)


def _check(name: str, t: Tensor, gate: Tensor) -> None:
    if t.dim() != 2 or t.dtype not in _DTYPES or t.shape != gate.shape or t.dtype != gate.dtype:
        raise ValueError(f"{name} must be a 2-D float tensor like gate ({gate.dtype} "
                         f"{list(gate.shape)}), got {t.dtype} {list(t.shape)}")


def _launch_shape(N: int, W: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_W, col_blocks, programs) for (N, W) operands."""
    block_w = min(triton.next_power_of_2(W), MAX_BLOCK_W)
    rows = max(1, min(TILE_ELEMENTS // block_w, triton.next_power_of_2(N)))
    col_blocks = triton.cdiv(W, block_w)
    return rows, block_w, col_blocks, triton.cdiv(N, rows) * col_blocks


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up (N, W) any strides -> silu(gate) * up (N, W) contiguous."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    N, W = gate.shape
    out = torch.empty((N, W), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    rows, block_w, col_blocks, programs = _launch_shape(N, W)
    with device_context(gate.device):
        swiglu_fwd_kernel[(programs,)](
            gate, up, out, N, W, col_blocks, *gate.stride(), *up.stride(),
            COMPUTE=compute_type(gate.dtype), ROWS=rows, BLOCK_W=block_w,
            num_warps=8 if rows * block_w >= 4096 else 4,
        )
    return out


def swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """grad_out, gate, up (N, W) any strides -> (dgate, dup) (N, W) contiguous."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    _check("grad_out", grad_out, gate)
    N, W = gate.shape
    dgate = torch.empty((N, W), dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel() == 0:
        return dgate, dup
    rows, block_w, col_blocks, programs = _launch_shape(N, W)
    with device_context(gate.device):
        swiglu_bwd_kernel[(programs,)](
            grad_out, gate, up, dgate, dup, N, W, col_blocks, *grad_out.stride(), *gate.stride(),
            *up.stride(), COMPUTE=compute_type(gate.dtype), ROWS=rows, BLOCK_W=block_w,
            num_warps=8 if rows * block_w >= 4096 else 4,
        )
    return dgate, dup
