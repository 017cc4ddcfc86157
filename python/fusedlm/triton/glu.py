"""Gated linear units, ``act(gate) * up``, in Triton: SwiGLU (act = silu, the Llama MLP's
activation) and GeGLU (act = exact or tanh-approximated gelu, Gemma's) in one pass each way.

Entry points (the ``"triton"`` backend of ``fusedlm.ops.glu``), with the signatures, return
conventions and dtypes of the same functions in :mod:`fusedlm.reference`:

* ``glu_fwd(gate, up, activation) -> out``
* ``glu_bwd(grad_out, gate, up, activation) -> (dgate, dup)``

activation: ``"silu"``, ``"gelu"`` or ``"gelu_tanh"``, a constexpr of the one kernel per pass.
Operands are (N, W) (W: the MLP's intermediate width) with any row and column strides, one
float dtype; results come back (N, W) contiguous in that dtype, computed in float32 (float64
for float64 inputs).

Why: eager PyTorch runs ``F.silu(gate) * up`` (or ``F.gelu``) as two kernels forward and three
backward, and autograd keeps ``act(gate)`` alive for the product's backward: one more (N, W)
activation per layer. Here the forward reads gate and up once and writes the product; the
backward reads the three operands once, recomputes the activation and writes both gradients.

Layout: a program takes a (ROWS, BLOCK_W) tile; ROWS > 1 when W is small.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter_fixes import patch_interpreter
from .launch import LAUNCH_OPTIONS, compute_type, device_context

TILE_ELEMENTS = 4096
MAX_BLOCK_W = 2048

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")

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
def _gelu_tanh_two_u(g):
    """2u of tanh-gelu, 0.5 g (1 + tanh(u)) = g sigmoid(2u): 2 sqrt(2/pi) g (1 + 0.044715 g^2)."""
    return 1.5957691216057308 * g * (1.0 + 0.044715 * g * g)


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """act(g): silu g sigmoid(g); gelu g Phi(g) (0.5 (1 + erf(g / sqrt(2))), as torch's CUDA
    kernel); gelu_tanh g sigmoid(2u)."""
    if ACTIVATION == "silu":
        act = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu":
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        act = g / (1.0 + tl.exp(-_gelu_tanh_two_u(g)))
    return act


@triton.jit
def _activation_and_slope(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)): silu s (1 + g (1 - s)), s = sigmoid(g); gelu Phi(g) + g phi(g);
    gelu_tanh s + g (2u)' s (1 - s), s = sigmoid(2u), 1 - s = e s with e = exp(-2u) (no
    cancellation where s is near 1; 1 where s is 0, e having overflowed)."""
    if ACTIVATION == "silu":
        s = 1.0 / (1.0 + tl.exp(-g))
        act = g * s
        slope = s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        slope = cdf + g * (0.3989422804014327 * tl.exp(-0.5 * g * g))
    else:
        e = tl.exp(-_gelu_tanh_two_u(g))
        s = 1.0 / (1.0 + e)
        one_minus_s = tl.where(s > 0.0, e * s, 1.0)
        two_du = 1.5957691216057308 * (1.0 + 0.134145 * g * g)
        act = g * s
        slope = s + g * two_du * (s * one_minus_s)
    return act, slope


@triton.jit
def glu_fwd_kernel(
    Gate, Up, Out, N, W, col_blocks, stride_gn, stride_gi, stride_un, stride_ui,
    ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Out = act(Gate) * Up of one tile. Gate, Up (N, W) strided; Out (N, W) contiguous."""
    rows, cols, mask = _tile(tl.program_id(0), N, W, col_blocks, ROWS, BLOCK_W)
    cols64 = cols.to(tl.int64)  # (a column stride other than 1 times W may pass 2**31)
    g = tl.load(Gate + rows[:, None] * stride_gn + cols64[None, :] * stride_gi, mask=mask,
                other=0.0).to(COMPUTE)
    u = tl.load(Up + rows[:, None] * stride_un + cols64[None, :] * stride_ui, mask=mask,
                other=0.0).to(COMPUTE)
    out = _activation(g, ACTIVATION) * u
    tl.store(Out + rows[:, None] * W + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(
    DOut, Gate, Up, DGate, DUp, N, W, col_blocks, stride_dn, stride_di, stride_gn, stride_gi,
    stride_un, stride_ui,
    ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """DGate = DOut * Up * act'(Gate), DUp = DOut * act(Gate), of one tile. DOut, Gate, Up
    (N, W) strided; DGate, DUp (N, W) contiguous."""
    rows, cols, mask = _tile(tl.program_id(0), N, W, col_blocks, ROWS, BLOCK_W)
    cols64 = cols.to(tl.int64)  # (a column stride other than 1 times W may pass 2**31)
    dy = tl.load(DOut + rows[:, None] * stride_dn + cols64[None, :] * stride_di, mask=mask,
                 other=0.0).to(COMPUTE)
    g = tl.load(Gate + rows[:, None] * stride_gn + cols64[None, :] * stride_gi, mask=mask,
                other=0.0).to(COMPUTE)
    u = tl.load(Up + rows[:, None] * stride_un + cols64[None, :] * stride_ui, mask=mask,
                other=0.0).to(COMPUTE)
    act, slope = _activation_and_slope(g, ACTIVATION)
    dgate = dy * u * slope
    dup = dy * act
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


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError("argument 'activation' must be one of "
                         f"{', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")


def glu_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """gate, up (N, W) any strides -> act(gate) * up (N, W) contiguous."""
    _check_activation(activation)
    _check("gate", gate, gate)
    _check("up", up, gate)
    N, W = gate.shape
    out = torch.empty((N, W), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    rows, block_w, col_blocks, programs = _launch_shape(N, W)
    with device_context(gate.device):
        glu_fwd_kernel[(programs,)](
            gate, up, out, N, W, col_blocks, *gate.stride(), *up.stride(),
            ACTIVATION=activation, COMPUTE=compute_type(gate.dtype), ROWS=rows, BLOCK_W=block_w,
            num_warps=8 if rows * block_w >= 4096 else 4, **LAUNCH_OPTIONS,
        )
    return out


def glu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """grad_out, gate, up (N, W) any strides -> (dgate, dup) (N, W) contiguous."""
    _check_activation(activation)
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
        glu_bwd_kernel[(programs,)](
            grad_out, gate, up, dgate, dup, N, W, col_blocks, *grad_out.stride(), *gate.stride(),
            *up.stride(), ACTIVATION=activation, COMPUTE=compute_type(gate.dtype), ROWS=rows,
            BLOCK_W=block_w, num_warps=8 if rows * block_w >= 4096 else 4, **LAUNCH_OPTIONS,
        )
    return dgate, dup
