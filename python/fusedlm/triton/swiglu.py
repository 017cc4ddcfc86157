"""SwiGLU, ``silu(gate) * up``, in Triton: the Llama MLP's activation in one pass each way.

Entry points (the ``"triton"`` backend of ``fusedlm.ops.swiglu``), with the signatures, return
conventions and dtypes of the same functions in :mod:`fusedlm.reference`:

* ``swiglu_fwd(gate, up) -> out``
* ``swiglu_bwd(grad_out, gate, up) -> (dgate, dup)``

Operands are (N, I) with any row stride and column stride, one float dtype; results come back
(N, I) contiguous in that dtype, computed in float32 (float64 for float64 inputs).

Why: eager PyTorch runs ``F.silu(gate) * up`` as two kernels forward and three backward, and
autograd keeps ``silu(gate)`` alive for the product's backward: one more (N, I) activation per
layer. Here the forward reads gate and up once and writes the product; the backward reads the
three operands once, recomputes the sigmoid and writes both gradients.

Layout: a program takes a (ROWS, BLOCK_I) tile; ROWS > 1 when I is small.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter_fixes import patch_interpreter

TILE_ELEMENTS = 4096
MAX_BLOCK_I = 2048

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter()


@triton.jit
def _tile(pid, N, I, col_blocks, ROWS: tl.constexpr, BLOCK_I: tl.constexpr):
    """(rows (ROWS) int64, cols (BLOCK_I), mask (ROWS, BLOCK_I)) of program ``pid``."""
    rows = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)
    cols = (pid % col_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    return rows.to(tl.int64), cols, mask


@triton.jit
def swiglu_fwd_kernel(
    Gate, Up, Out, N, I, col_blocks, stride_gn, stride_gi, stride_un, stride_ui,
    COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Out = silu(Gate) * Up of one tile. Gate, Up (N, I) strided; Out (N, I) contiguous."""
    rows, cols, mask = _tile(tl.program_id(0), N, I, col_blocks, ROWS, BLOCK_I)
    g = tl.load(Gate + rows[:, None] * stride_gn + cols[None, :] * stride_gi, mask=mask,
                other=0.0).to(COMPUTE)
    u = tl.load(Up + rows[:, None] * stride_un + cols[None, :] * stride_ui, mask=mask,
                other=0.0).to(COMPUTE)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + rows[:, None] * I + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    DOut, Gate, Up, DGate, DUp, N, I, col_blocks, stride_dn, stride_di, stride_gn, stride_gi,
    stride_un, stride_ui,
    COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """DGate = DOut * Up * s * (1 + Gate * (1 - s)) with s = sigmoid(Gate), DUp = DOut *
    silu(Gate), of one tile. DOut, Gate, Up (N, I) strided; DGate, DUp (N, I) contiguous."""
    rows, cols, mask = _tile(tl.program_id(0), N, I, col_blocks, ROWS, BLOCK_I)
    dy = tl.load(DOut + rows[:, None] * stride_dn + cols[None, :] * stride_di, mask=mask,
                 other=0.0).to(COMPUTE)
    g = tl.load(Gate + rows[:, None] * stride_gn + cols[None, :] * stride_gi, mask=mask,
                other=0.0).to(COMPUTE)
    u = tl.load(Up + rows[:, None] * stride_un + cols[None, :] * stride_ui, mask=mask,
                other=0.0).to(COMPUTE)
    s = 1.0 / (1.0 + tl.exp(-g))
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    dup = dy * g * s
    offsets = rows[:, None] * I + cols[None, :]
    tl.store(DGate + offsets, dgate.to(DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offsets, dup.to(DUp.dtype.element_ty), mask=mask)


def _check(name: str, t: Tensor, gate: Tensor) -> None:
    if t.dim() != 2 or t.dtype not in _DTYPES or t.shape != gate.shape or t.dtype != gate.dtype:
        raise ValueError(f"{name} must be a 2-D float tensor like gate ({gate.dtype} "
                         f"{list(gate.shape)}), got {t.dtype} {list(t.shape)}")


def _launch_shape(N: int, I: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_I, col_blocks, programs) for (N, I) operands."""
    block_i = min(triton.next_power_of_2(I), MAX_BLOCK_I)
    rows = max(1, min(TILE_ELEMENTS // block_i, triton.next_power_of_2(N)))
    col_blocks = triton.cdiv(I, block_i)
    return rows, block_i, col_blocks, triton.cdiv(N, rows) * col_blocks


def _device_context(device: torch.device):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up (N, I) any strides -> silu(gate) * up (N, I) contiguous."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    N, I = gate.shape
    out = torch.empty((N, I), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    rows, block_i, col_blocks, programs = _launch_shape(N, I)
    with _device_context(gate.device):
        swiglu_fwd_kernel[(programs,)](
            gate, up, out, N, I, col_blocks, *gate.stride(), *up.stride(),
            COMPUTE=_compute(gate.dtype), ROWS=rows, BLOCK_I=block_i,
            num_warps=8 if rows * block_i >= 4096 else 4,
        )
    return out


def swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """grad_out, gate, up (N, I) any strides -> (dgate, dup) (N, I) contiguous."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    _check("grad_out", grad_out, gate)
    N, I = gate.shape
    dgate = torch.empty((N, I), dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel() == 0:
        return dgate, dup
    rows, block_i, col_blocks, programs = _launch_shape(N, I)
    with _device_context(gate.device):
        swiglu_bwd_kernel[(programs,)](
            grad_out, gate, up, dgate, dup, N, I, col_blocks, *grad_out.stride(), *gate.stride(),
            *up.stride(), COMPUTE=_compute(gate.dtype), ROWS=rows, BLOCK_I=block_i,
            num_warps=8 if rows * block_i >= 4096 else 4,
        )
    return dgate, dup
