"""Rotary position embeddings in Triton: q or k rotated in one pass.

Entry point (the ``"triton"`` backend of ``fusedlm.ops.rotary``), with the signature, return
convention and dtypes of :func:`fusedlm.reference.rotary_embedding`:

* ``rotary_embedding(x, cos, sin, interleaved, conjugate) -> out``

x is (B, H, T, D) with any strides, cos and sin (T, R/2) or (B or 1, T, R/2) with any strides and
any float dtype (R <= D); out comes back (B, H, T, D) contiguous in x's dtype, computed in
float32 (float64 for float64 x).

Why: eager PyTorch rotates with slices, four multiplies, two adds and a ``cat`` (Hugging Face
Llama's ``rotate_half`` adds a negation and another ``cat``): about eight passes over q and k
each, forward and backward. Here one pass reads x and the angles and writes the output.

Layout: a program takes BLOCK_T positions of one (b, h) row of heads; the first R features
are loaded as their two halves of each pair, the rest copied.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter_fixes import patch_interpreter
from .launch import LAUNCH_OPTIONS, compute_type, device_context

# Elements (pairs x 2) a program holds at once.
TILE_ELEMENTS = 4096

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter()


@triton.jit
def rotary_embedding_kernel(
    X, Cos, Sin, Out,
    H, T, D, HALF, t_blocks,
    stride_xb, stride_xh, stride_xt, stride_xd,
    stride_cb, stride_ct, stride_ci, stride_sb, stride_st, stride_si,
    COMPUTE: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    PASS_THROUGH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    """Out (BLOCK_T positions of head row b, h) = X rotated by the angles of Cos, Sin.

    X (B, H, T, D) strided; Cos, Sin (B, T, HALF) strided (B stride 0 for one shared table);
    Out (B, H, T, D) contiguous in X's dtype.
    """
    pid = tl.program_id(0)
    bh = pid // t_blocks
    b, h = bh // H, bh % H
    t = (pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    t_mask = t < T
    mask = t_mask[:, None] & (i < HALF)[None, :]
    t64 = t.to(tl.int64)
    x_rows = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + t64[:, None] * stride_xt
    out_rows = Out + (bh.to(tl.int64) * T + t64)[:, None] * D
    # (int64: a feature or angle stride other than 1 times D may pass 2**31)
    i64 = i.to(tl.int64)
    if INTERLEAVED:
        first, second = 2 * i64, 2 * i64 + 1
    else:
        first, second = i64, i64 + HALF
    x1 = tl.load(x_rows + first[None, :] * stride_xd, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x_rows + second[None, :] * stride_xd, mask=mask, other=0.0).to(COMPUTE)
    b64 = b.to(tl.int64)
    cos = tl.load(Cos + b64 * stride_cb + t64[:, None] * stride_ct + i64[None, :] * stride_ci,
                  mask=mask, other=0.0).to(COMPUTE)
    sin = tl.load(Sin + b64 * stride_sb + t64[:, None] * stride_st + i64[None, :] * stride_si,
                  mask=mask, other=0.0).to(COMPUTE)
    if CONJUGATE:
        sin = -sin
    out_type = Out.dtype.element_ty
    tl.store(out_rows + first[None, :], (x1 * cos - x2 * sin).to(out_type), mask=mask)
    tl.store(out_rows + second[None, :], (x2 * cos + x1 * sin).to(out_type), mask=mask)
    if PASS_THROUGH:
        j = 2 * HALF + tl.arange(0, BLOCK_REST).to(tl.int64)
        rest_mask = t_mask[:, None] & (j < D)[None, :]
        rest = tl.load(x_rows + j[None, :] * stride_xd, mask=rest_mask, other=0.0)
        tl.store(out_rows + j[None, :], rest, mask=rest_mask)


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
                     conjugate: bool) -> Tensor:
    """x (B, H, T, D) any strides; cos, sin (T, R/2) or (B, T, R/2) any strides -> (B, H, T, D)
    contiguous in x's dtype (see the module docstring)."""
    if x.dim() != 4 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be a 4-D float tensor, got {x.dtype} {list(x.shape)}")
    if cos.dim() not in (2, 3) or sin.shape != cos.shape or cos.shape[-2] != x.shape[2]:
        raise ValueError(f"cos and sin must be ({x.shape[2]}, R/2) or (B, {x.shape[2]}, R/2), "
                         f"got {list(cos.shape)} and {list(sin.shape)}")
    B, H, T, D = x.shape
    half = cos.shape[-1]
    if not 1 <= half <= D // 2:
        raise ValueError(f"cos and sin must have between 1 and {D // 2} angles, got {half}")
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if cos.dim() == 2:  # one table for every batch row
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # ((1, T, R/2): stride 0 over B)
    block_half = triton.next_power_of_2(half)
    block_t = max(1, min(TILE_ELEMENTS // (2 * block_half), triton.next_power_of_2(T)))
    rest = D - 2 * half
    t_blocks = triton.cdiv(T, block_t)
    compute = compute_type(x.dtype)
    with device_context(x.device):
        rotary_embedding_kernel[(B * H * t_blocks,)](
            x, cos, sin, out, H, T, D, half, t_blocks, *x.stride(), *cos.stride(), *sin.stride(),
            COMPUTE=compute, INTERLEAVED=interleaved, CONJUGATE=conjugate,
            PASS_THROUGH=rest > 0, BLOCK_T=block_t, BLOCK_HALF=block_half,
            BLOCK_REST=triton.next_power_of_2(max(rest, 1)),
            num_warps=4 if block_t * block_half >= 1024 else 2, **LAUNCH_OPTIONS,
        )
    return out

