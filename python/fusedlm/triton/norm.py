"""LayerNorm and RMSNorm in Triton: forward, and backward with a deterministic two-stage
reduction for dweight/dbias.

Entry points (the ``"triton"`` backend of ``fusedlm.ops.norm``) have the signatures, return
conventions and dtypes of the same functions in :mod:`fusedlm.reference`:

* ``layer_norm_fwd(x, weight, bias, eps) -> (y, mean, rstd)``
* ``layer_norm_bwd(grad_y, x, mean, rstd, weight, has_bias) -> (dx, dweight | None, dbias | None)``
* ``rms_norm_fwd(x, weight, eps) -> (y, rstd)``
* ``rms_norm_bwd(grad_y, x, rstd, weight) -> (dx, dweight | None)``
* ``add_layer_norm_fwd(x, residual, weight, bias, eps) -> (y, h, mean, rstd)`` and
  ``add_rms_norm_fwd(x, residual, weight, eps) -> (y, h, rstd)``: the norm of h = x + residual
  (the residual add of a pre-norm block fused in front), h returned;
  ``add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias)`` /
  ``add_rms_norm_bwd(grad_y, grad_h, h, rstd, weight)``: dh, the norm's gradient plus
  grad_h (h's own, or None), with the parameter grads. Same kernels (HAS_BRANCH, HAS_GRAD_H).

x and grad_y are (M, N) with any strides; y and dx come back contiguous in x's dtype. weight and
bias are (N) in x's dtype or float32. Arithmetic and statistics are float32 (float64 for float64
x). One kernel serves both norms (``IS_RMS``).

Schemes, picked by :func:`norm_config` from the hidden size N (no autotuning: it would compile
and time every config, and under ``TRITON_INTERPRET=1`` run each one slowly):

* N <= FWD_SINGLE_TILE_MAX_N (forward) / BWD_SINGLE_TILE_MAX_N (backward): a program holds a
  (BLOCK_M, next_pow2(N)) tile of whole rows in registers; several rows per program when N is
  small so every program moves a few thousand elements.
* larger N: rows are streamed in LOOP_BLOCK_N-column chunks. The forward pass takes the
  statistics in one sweep (Chan's pairwise combination of per-chunk mean and M2, numerically
  as stable as two passes) and normalizes in a second. The backward pass takes the two row
  sums of dx in a first sweep, then walks column chunks outermost so each program keeps its
  dweight/dbias partial sums for a chunk in registers.

dweight/dbias: program p reduces its own contiguous range of rows into row p of a
(num_programs, k, N) buffer in the compute dtype, and ``sum(0)`` finishes: deterministic (no
atomics) and cheap because num_programs is about two per SM.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .interpreter_fixes import patch_interpreter
from .launch import LAUNCH_OPTIONS, compute_type, device_context

# Hidden sizes up to which a whole row is held in registers. Backward keeps about three times
# as many live values per element (x, dy, weight, xhat, partial sums), hence the lower limit.
FWD_SINGLE_TILE_MAX_N = 16384
BWD_SINGLE_TILE_MAX_N = 8192
# Columns per chunk when rows are streamed.
LOOP_BLOCK_N = 4096
# Elements per single-tile program the row blocking aims at (forward, backward).
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
MAX_BLOCK_M = 64
# Backward programs per SM: each program adds one (k, N) float32 row of partial sums, so more
# programs buy latency hiding with extra partial-sum traffic.
BWD_PROGRAMS_PER_SM = 2
# Under the interpreter programs run one after another: few programs, each over several row
# blocks, keeps tests fast and still exercises the cross-program reduction.
INTERPRETER_BWD_PROGRAMS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


if _INTERPRETED:
    patch_interpreter()


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _load_input(x_rows, branch_rows, c, mask, stride_xn, stride_bn, HAS_BRANCH: tl.constexpr,
                COMPUTE: tl.constexpr):
    """The norm's input tile for columns c: x, or with HAS_BRANCH h = branch + x computed in
    COMPUTE and rounded once to x's dtype (eager ``branch + x``). Returns (h in x's dtype, the
    input in COMPUTE)."""
    x = tl.load(x_rows + c[None, :] * stride_xn, mask=mask, other=0.0)
    if HAS_BRANCH:
        b = tl.load(branch_rows + c[None, :] * stride_bn, mask=mask, other=0.0)
        x = (b.to(COMPUTE) + x.to(COMPUTE)).to(x.dtype)
    return x, x.to(COMPUTE)


@triton.jit
def norm_fwd_kernel(
    X, Branch, Y, H, W, B, Mean, Rstd,
    M, N, stride_xm, stride_xn, stride_bm, stride_bn, eps: tl.float64,
    IS_RMS: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """LayerNorm (or RMSNorm when IS_RMS) forward of BLOCK_M rows.

    X (M, N) strided, any float dtype; Y (M, N) contiguous in X's dtype; W, B (N) or unused;
    Mean (M) (LayerNorm only), Rstd (M) in COMPUTE (float32, or float64 for float64 X).
    HAS_BRANCH (the fused residual add): X is the residual, Branch (M, N) strided in X's dtype
    or 16-bit beside a float32 X, and h = Branch + X, stored to H (M, N) contiguous in X's
    dtype, is what is normalized.
    SINGLE_TILE: N <= BLOCK_N, rows live in registers; else rows are streamed in BLOCK_N chunks.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)  # M * N may pass 2**31
    x_rows = X + rows64[:, None] * stride_xm
    branch_rows = Branch + rows64[:, None] * stride_bm
    y_rows = Y + rows64[:, None] * N
    h_rows = H + rows64[:, None] * N
    cols = tl.arange(0, BLOCK_N)
    eps_c = tl.full([], eps, COMPUTE)
    if SINGLE_TILE:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        h, x = _load_input(x_rows, branch_rows, cols, mask, stride_xn, stride_bn, HAS_BRANCH,
                           COMPUTE)
        if HAS_BRANCH:
            tl.store(h_rows + cols[None, :], h, mask=mask)
        if IS_RMS:
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps_c)
            # tl.where keeps padding lanes at 0 even when rstd is inf (eps = 0, zero row).
            xhat = tl.where(mask, x * rstd[:, None], 0.0)
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / N + eps_c)
            xhat = xc * rstd[:, None]
            tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = xhat
        if HAS_W:
            y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
        tl.store(y_rows + cols[None, :], y, mask=mask)
    else:
        if IS_RMS:
            sum_sq = tl.zeros([BLOCK_M], COMPUTE)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                _, x = _load_input(x_rows, branch_rows, c, mask, stride_xn, stride_bn,
                                   HAS_BRANCH, COMPUTE)
                sum_sq += tl.sum(x * x, axis=1)
            mean = tl.zeros([BLOCK_M], COMPUTE)
            rstd = tl.math.rsqrt(sum_sq / N + eps_c)
        else:
            # Chan et al.: fold each chunk's (count, mean, M2) into the running ones.
            mean = tl.zeros([BLOCK_M], COMPUTE)
            m2 = tl.zeros([BLOCK_M], COMPUTE)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                _, x = _load_input(x_rows, branch_rows, c, mask, stride_xn, stride_bn,
                                   HAS_BRANCH, COMPUTE)
                n_a = tl.cast(start, COMPUTE)
                n_b = tl.cast(tl.minimum(N - start, BLOCK_N), COMPUTE)
                n_ab = n_a + n_b
                mean_b = tl.sum(x, axis=1) / n_b
                xc = tl.where(mask, x - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean = mean + delta * (n_b / n_ab)
                m2 = m2 + tl.sum(xc * xc, axis=1) + delta * delta * (n_a * n_b / n_ab)
            rstd = tl.math.rsqrt(m2 / N + eps_c)
            tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_mask = c < N
            mask = row_mask[:, None] & col_mask[None, :]
            # (h is recomputed rather than read back: other threads of the program wrote it)
            h, x = _load_input(x_rows, branch_rows, c, mask, stride_xn, stride_bn, HAS_BRANCH,
                               COMPUTE)
            if HAS_BRANCH:
                tl.store(h_rows + c[None, :], h, mask=mask)
            if IS_RMS:
                xhat = tl.where(mask, x * rstd[:, None], 0.0)
            else:
                xhat = (x - mean[:, None]) * rstd[:, None]
            y = xhat
            if HAS_W:
                y = y * tl.load(W + c, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
            if HAS_B:
                y = y + tl.load(B + c, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
            tl.store(y_rows + c[None, :], y, mask=mask)


@triton.jit
def _load_rows(DY, X, Mean, Rstd, dy_rows, x_rows, rows, c, mask, row_mask,
               stride_dyn, stride_xn, IS_RMS: tl.constexpr, COMPUTE: tl.constexpr):
    """dy, xhat tiles and rstd for rows x columns c (masked entries 0). One call per tile: the
    interpreter re-patches triton.language on every call of a jit function."""
    x = tl.load(x_rows + c[None, :] * stride_xn, mask=mask, other=0.0).to(COMPUTE)
    dy = tl.load(dy_rows + c[None, :] * stride_dyn, mask=mask, other=0.0).to(COMPUTE)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0).to(COMPUTE)
    if IS_RMS:
        xhat = tl.where(mask, x * rstd[:, None], 0.0)
    else:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0).to(COMPUTE)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return dy, xhat, rstd


@triton.jit
def norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, GradH, Partial, RowSums,
    M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_ghm, stride_ghn,
    rows_per_program,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    HAS_GRAD_H: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """LayerNorm (or RMSNorm when IS_RMS) backward of rows [pid * rows_per_program, ...).

    DY, X (M, N) strided; DX (M, N) contiguous in X's dtype; W (N) or unused; Mean, Rstd (M).
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w (RMSNorm: no mean(g)),
    plus GradH (M, N) strided in X's dtype when HAS_GRAD_H (the fused residual add's h, whose
    own gradient joins the norm's before dx's one rounding).
    Partial (num_programs, HAS_DW + HAS_DB, N) in COMPUTE: this program's sums over its rows of
    dy * xhat (dweight) then dy (dbias). RowSums (2, M) COMPUTE scratch for the row sums when
    rows are streamed (not SINGLE_TILE).
    """
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    partial_dw = Partial + pid.to(tl.int64) * ((HAS_DW + HAS_DB) * N)
    partial_db = partial_dw + HAS_DW * N
    if SINGLE_TILE:
        col_mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], COMPUTE)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], COMPUTE)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            mask = row_mask[:, None] & col_mask[None, :]
            dy, xhat, rstd = _load_rows(
                DY, X, Mean, Rstd, DY + rows64[:, None] * stride_dym,
                X + rows64[:, None] * stride_xm, rows, cols, mask, row_mask,
                stride_dyn, stride_xn, IS_RMS, COMPUTE,
            )
            g = dy * w[None, :] if HAS_W else dy
            c2 = tl.sum(g * xhat, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c2[:, None]) * rstd[:, None]
            else:
                c1 = tl.sum(g, axis=1) / N
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            if HAS_GRAD_H:
                dx += tl.load(GradH + rows64[:, None] * stride_ghm + cols[None, :] * stride_ghn,
                              mask=mask, other=0.0).to(COMPUTE)
            tl.store(DX + rows64[:, None] * N + cols[None, :], dx, mask=mask)
            if HAS_DW:
                dw_acc += dy * xhat
            if HAS_DB:
                db_acc += dy
        if HAS_DW:
            tl.store(partial_dw + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if HAS_DB:
            tl.store(partial_db + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        # Sweep 1: mean(g) and mean(g * xhat) of each row, to RowSums.
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            sum_g = tl.zeros([BLOCK_M], COMPUTE)
            sum_gx = tl.zeros([BLOCK_M], COMPUTE)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                col_mask = c < N
                mask = row_mask[:, None] & col_mask[None, :]
                dy, xhat, rstd = _load_rows(
                    DY, X, Mean, Rstd, DY + rows64[:, None] * stride_dym,
                    X + rows64[:, None] * stride_xm, rows, c, mask, row_mask,
                    stride_dyn, stride_xn, IS_RMS, COMPUTE,
                )
                if HAS_W:
                    w = tl.load(W + c, mask=col_mask, other=0.0).to(COMPUTE)
                    g = dy * w[None, :]
                else:
                    g = dy
                sum_g += tl.sum(g, axis=1)
                sum_gx += tl.sum(g * xhat, axis=1)
            tl.store(RowSums + rows, sum_g / N, mask=row_mask)
            tl.store(RowSums + M + rows, sum_gx / N, mask=row_mask)
        # Other threads of this program read the row sums just written.
        tl.debug_barrier()
        # Sweep 2: column chunks outermost, so the partial sums of a chunk stay in registers.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_mask = c < N
            if HAS_W:
                w = tl.load(W + c, mask=col_mask, other=0.0).to(COMPUTE)
            dw_acc = tl.zeros([BLOCK_M, BLOCK_N], COMPUTE)
            db_acc = tl.zeros([BLOCK_M, BLOCK_N], COMPUTE)
            for r0 in range(row_start, row_end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_mask = rows < row_end
                rows64 = rows.to(tl.int64)
                mask = row_mask[:, None] & col_mask[None, :]
                dy, xhat, rstd = _load_rows(
                    DY, X, Mean, Rstd, DY + rows64[:, None] * stride_dym,
                    X + rows64[:, None] * stride_xm, rows, c, mask, row_mask,
                    stride_dyn, stride_xn, IS_RMS, COMPUTE,
                )
                g = dy * w[None, :] if HAS_W else dy
                c2 = tl.load(RowSums + M + rows, mask=row_mask, other=0.0)
                if IS_RMS:
                    dx = (g - xhat * c2[:, None]) * rstd[:, None]
                else:
                    c1 = tl.load(RowSums + rows, mask=row_mask, other=0.0)
                    dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                if HAS_GRAD_H:
                    dx += tl.load(GradH + rows64[:, None] * stride_ghm + c[None, :] * stride_ghn,
                                  mask=mask, other=0.0).to(COMPUTE)
                tl.store(DX + rows64[:, None] * N + c[None, :], dx, mask=mask)
                if HAS_DW:
                    dw_acc += dy * xhat
                if HAS_DB:
                    db_acc += dy
            if HAS_DW:
                tl.store(partial_dw + c, tl.sum(dw_acc, axis=0), mask=col_mask)
            if HAS_DB:
                tl.store(partial_db + c, tl.sum(db_acc, axis=0), mask=col_mask)


# ---- launch configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class NormConfig:
    """How a norm kernel is launched for hidden size N."""

    block_m: int  # rows per tile
    block_n: int  # columns per tile (next_pow2(N) for a single tile, else the chunk width)
    single_tile: bool  # whole rows in registers
    num_warps: int


def norm_config(N: int, backward: bool, fp64: bool = False) -> NormConfig:
    """Heuristic launch config for hidden size ``N``.

    Single tile while next_pow2(N) <= FWD_SINGLE_TILE_MAX_N (16384) forward /
    BWD_SINGLE_TILE_MAX_N (8192) backward, with BLOCK_M = FWD_TILE_ELEMENTS (4096) /
    BWD_TILE_ELEMENTS (2048) // BLOCK_N rows (1..64) per tile; larger rows are streamed in
    LOOP_BLOCK_N (4096) columns, one row per program. num_warps = tile elements / 512,
    clamped to 1..16: 8..32 elements per thread per live tensor, enough loads in flight to
    cover memory latency on Hopper. ptxas for sm_90a (tests/triton/test_norm.py builds them):
    no spills forward; backward, the 16-warp (128-register) tiles spill at most 4 bytes on
    contiguous inputs and up to 124 bytes (float64) on strided ones.
    float64 takes two registers per value, so it gets half of each limit.
    """
    if N < 1:
        raise ValueError(f"argument 'x' must have a non-empty normalized dimension, got N = {N}")
    scale = 2 if fp64 else 1
    block_n = triton.next_power_of_2(N)
    limit = (BWD_SINGLE_TILE_MAX_N if backward else FWD_SINGLE_TILE_MAX_N) // scale
    if block_n <= limit:
        target = (BWD_TILE_ELEMENTS if backward else FWD_TILE_ELEMENTS) // scale
        block_m = min(MAX_BLOCK_M, max(1, target // block_n))
        single_tile = True
    else:
        block_n, block_m, single_tile = LOOP_BLOCK_N // scale, 1, False
    num_warps = min(16, max(1, block_m * block_n * scale // 512))
    return NormConfig(block_m, block_n, single_tile, num_warps)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(M: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(num_programs, rows_per_program) for the backward kernel; rows_per_program is a multiple
    of block_m so only the last program has a partial row block."""
    tiles = triton.cdiv(M, block_m)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = BWD_PROGRAMS_PER_SM * _sm_count(index)
    else:
        cap = INTERPRETER_BWD_PROGRAMS
    programs = max(1, min(tiles, cap))
    rows_per_program = triton.cdiv(tiles, programs) * block_m
    return triton.cdiv(M, rows_per_program), rows_per_program


# ---- argument checks ------------------------------------------------------------------------


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"argument '{name}' must be 2-D (M, N), got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"argument '{name}' must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"argument '{name}' must have a non-empty normalized dimension")


def _check_param(p: Tensor | None, name: str, x: Tensor) -> Tensor | None:
    if p is None:
        return None
    if not isinstance(p, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != (x.shape[1],):
        raise ValueError(f"argument '{name}' must have shape [{x.shape[1]}], got {list(p.shape)}")
    if p.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"argument '{name}' must have the dtype of 'x' ({x.dtype}) or float32, got {p.dtype}"
        )
    if p.device != x.device:
        raise ValueError(f"argument '{name}' is on {p.device} but 'x' is on {x.device}")
    return p.contiguous()


def _check_like_x(t: Tensor, name: str, x: Tensor, x_name: str = "x") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(
            f"argument '{name}' has shape {list(t.shape)} but '{x_name}' has {list(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"argument '{name}' has dtype {t.dtype} but '{x_name}' has {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"argument '{name}' is on {t.device} but '{x_name}' is on {x.device}")


def _check_stats(t: Tensor, name: str, x: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"argument '{name}' must have shape [{x.shape[0]}], got {list(t.shape)}")
    want = reference.compute_dtype(x.dtype)
    if t.dtype != want:
        raise TypeError(f"argument '{name}' must be {want} for {x.dtype} x, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"argument '{name}' is on {t.device} but 'x' is on {x.device}")
    return t.contiguous()


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not (eps >= 0.0 and eps != float("inf")):
        raise ValueError(f"argument 'eps' must be finite and >= 0, got {eps}")
    return eps


def _strides(t: Tensor) -> tuple[Tensor, int, int]:
    """t and its (row, column) strides, copied when column offsets could overflow int32."""
    if t.shape[1] > 1 and (t.shape[1] - 1) * t.stride(1) >= 2**31:
        t = t.contiguous()
    return t, t.stride(0), (t.stride(1) if t.shape[1] > 1 else 1)


# ---- launchers ------------------------------------------------------------------------------


def _norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
              branch: Tensor | None = None):
    """y, mean, rstd, and h = branch + x (None without a branch)."""
    M, N = x.shape
    compute = reference.compute_dtype(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, N), dtype=x.dtype, device=x.device) if branch is not None else None
    mean = torch.empty(M, dtype=compute, device=x.device)
    rstd = torch.empty(M, dtype=compute, device=x.device)
    if M == 0:
        return y, mean, rstd, h
    cfg = norm_config(N, backward=False, fp64=x.dtype == torch.float64)
    x, stride_xm, stride_xn = _strides(x)
    branch, stride_bm, stride_bn = _strides(branch) if branch is not None else (x, 0, 0)
    with device_context(x.device):
        norm_fwd_kernel[(triton.cdiv(M, cfg.block_m),)](
            x, branch, y, h if h is not None else y, weight if weight is not None else x,
            bias if bias is not None else x,
            mean, rstd, M, N, stride_xm, stride_xn, stride_bm, stride_bn, eps,
            IS_RMS=is_rms, HAS_BRANCH=h is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, COMPUTE=compute_type(x.dtype), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile, num_warps=cfg.num_warps,
            **LAUNCH_OPTIONS,
        )
    return y, mean, rstd, h


def _norm_bwd(grad_y, x, mean, rstd, weight, has_bias: bool, is_rms: bool, grad_h=None):
    M, N = x.shape
    compute = reference.compute_dtype(x.dtype)
    param_dtype = weight.dtype if weight is not None else compute
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    num_sums = int(weight is not None) + int(has_bias)
    if M == 0:
        sums = [torch.zeros(N, dtype=param_dtype, device=x.device) for _ in range(num_sums)]
    else:
        cfg = norm_config(N, backward=True, fp64=x.dtype == torch.float64)
        programs, rows_per_program = _bwd_programs(M, cfg.block_m, x.device)
        partial = (
            torch.empty((programs, num_sums, N), dtype=compute, device=x.device) if num_sums else dx
        )
        row_sums = (
            torch.empty((2, M), dtype=compute, device=x.device) if not cfg.single_tile else dx
        )
        x, stride_xm, stride_xn = _strides(x)
        grad_y, stride_dym, stride_dyn = _strides(grad_y)
        grad_h, stride_ghm, stride_ghn = _strides(grad_h) if grad_h is not None else (None, 0, 0)
        with device_context(x.device):
            norm_bwd_kernel[(programs,)](
                grad_y, x, weight if weight is not None else x,
                mean if mean is not None else rstd, rstd, dx,
                grad_h if grad_h is not None else dx, partial, row_sums,
                M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_ghm, stride_ghn,
                rows_per_program,
                IS_RMS=is_rms, HAS_W=weight is not None, HAS_DW=weight is not None,
                HAS_DB=has_bias, HAS_GRAD_H=grad_h is not None, COMPUTE=compute_type(x.dtype),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile,
                num_warps=cfg.num_warps, **LAUNCH_OPTIONS,
            )
        # One reduction per output: views of one tensor would alias (custom ops forbid that).
        sums = [partial[:, k].sum(dim=0).to(param_dtype) for k in range(num_sums)]
    dweight = sums[0] if weight is not None else None
    dbias = sums[num_sums - 1] if has_bias else None
    return dx, dweight, dbias


# ---- entry points (fusedlm.reference's signatures) ------------------------------------------


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, N), weight/bias (N) or None -> y (M, N) in x's dtype, mean (M), rstd (M) in
    float32 (float64 for float64 x)."""
    _check_x(x)
    weight = _check_param(weight, "weight", x)
    bias = _check_param(bias, "bias", x)
    if weight is not None and bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"argument 'bias' has dtype {bias.dtype} but 'weight' has {weight.dtype}")
    y, mean, rstd, _ = _norm_fwd(x, weight, bias, _check_eps(eps), is_rms=False)
    return y, mean, rstd


def layer_norm_bwd(
    grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, has_bias: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Returns dx (M, N) in x's dtype, dweight (N) or None, dbias (N) or None; dweight and dbias
    in the weight's dtype (dbias in float32/float64 when there is no weight)."""
    _check_x(x)
    _check_like_x(grad_y, "grad_y", x)
    mean = _check_stats(mean, "mean", x)
    rstd = _check_stats(rstd, "rstd", x)
    weight = _check_param(weight, "weight", x)
    return _norm_bwd(grad_y, x, mean, rstd, weight, bool(has_bias), is_rms=False)


def rms_norm_fwd(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """x (M, N), weight (N) or None -> y (M, N) in x's dtype, rstd (M) in float32 (float64
    for float64 x)."""
    _check_x(x)
    weight = _check_param(weight, "weight", x)
    y, _, rstd, _ = _norm_fwd(x, weight, None, _check_eps(eps), is_rms=True)
    return y, rstd


def rms_norm_bwd(
    grad_y: Tensor, x: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Returns dx (M, N) in x's dtype and dweight (N) in the weight's dtype, or None."""
    _check_x(x)
    _check_like_x(grad_y, "grad_y", x)
    rstd = _check_stats(rstd, "rstd", x)
    weight = _check_param(weight, "weight", x)
    dx, dweight, _ = _norm_bwd(grad_y, x, None, rstd, weight, False, is_rms=True)
    return dx, dweight


def _check_residual_pair(x: Tensor, residual: Tensor) -> None:
    _check_x(residual, "residual")
    if not isinstance(x, Tensor):
        raise TypeError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != residual.shape:
        raise ValueError(f"argument 'x' has shape {list(x.shape)} but 'residual' has "
                         f"{list(residual.shape)}")
    if not (x.dtype == residual.dtype or (residual.dtype == torch.float32
                                          and x.dtype in (torch.float16, torch.bfloat16))):
        raise TypeError(f"argument 'x' must have the dtype of 'residual' ({residual.dtype}), or "
                        f"be bfloat16/float16 beside a float32 'residual', got {x.dtype}")
    if x.device != residual.device:
        raise ValueError(f"argument 'x' is on {x.device} but 'residual' is on {residual.device}")


def _check_grads_of_h(grad_y: Tensor, grad_h: Tensor | None, h: Tensor) -> None:
    _check_x(h, "h")
    _check_like_x(grad_y, "grad_y", h, "h")
    if grad_h is not None:
        _check_like_x(grad_h, "grad_h", h, "h")


def add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h = x + residual (rounded once to residual's dtype) and y = LayerNorm(h) in one pass.
    x (M, N) in residual's dtype, or 16-bit beside a float32 residual -> y, h (M, N) in
    residual's dtype, mean, rstd (M)."""
    _check_residual_pair(x, residual)
    weight = _check_param(weight, "weight", residual)
    bias = _check_param(bias, "bias", residual)
    if weight is not None and bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"argument 'bias' has dtype {bias.dtype} but 'weight' has {weight.dtype}")
    y, mean, rstd, h = _norm_fwd(residual, weight, bias, _check_eps(eps), is_rms=False,
                                 branch=x)
    return y, h, mean, rstd


def add_layer_norm_bwd(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, has_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Returns dh (M, N) in h's dtype (the norm's gradient plus grad_h, or the norm's alone for
    None: the gradient of both x and residual), dweight, dbias as layer_norm_bwd."""
    _check_grads_of_h(grad_y, grad_h, h)
    mean = _check_stats(mean, "mean", h)
    rstd = _check_stats(rstd, "rstd", h)
    weight = _check_param(weight, "weight", h)
    return _norm_bwd(grad_y, h, mean, rstd, weight, bool(has_bias), is_rms=False, grad_h=grad_h)


def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """h = x + residual and y = RMSNorm(h) in one pass -> y, h (M, N), rstd (M)."""
    _check_residual_pair(x, residual)
    weight = _check_param(weight, "weight", residual)
    y, _, rstd, h = _norm_fwd(residual, weight, None, _check_eps(eps), is_rms=True, branch=x)
    return y, h, rstd


def add_rms_norm_bwd(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Returns dh (M, N) in h's dtype (the norm's gradient plus grad_h) and dweight or None."""
    _check_grads_of_h(grad_y, grad_h, h)
    rstd = _check_stats(rstd, "rstd", h)
    weight = _check_param(weight, "weight", h)
    dh, dweight, _ = _norm_bwd(grad_y, h, None, rstd, weight, False, is_rms=True, grad_h=grad_h)
    return dh, dweight
