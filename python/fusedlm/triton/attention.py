"""Flash attention in Triton (FlashAttention-2): forward (output and logsumexp) and backward
(dq, dk, dv by recomputation), the ``"triton"`` backend of ``fusedlm.attention``.

Semantics are those of ``fusedlm.reference.attention_fwd/attention_bwd``: q (B, Hq, Tq, D),
k/v (B, Hkv, Tk, D) with Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)), any
strides (every stride goes to the kernels; nothing is copied), key j visible to query i iff not
causal or j <= i + causal_offset (and the sliding window and per-batch key range, when given);
rows that see no key give out 0, lse -inf and zero gradients.
D is 1..256 (padded to a power of two >= 16 in registers, masked in memory); float32, float16
and bfloat16. lse is float32, natural log.

Numerics: scores are kept in float32 and pre-multiplied by scale * log2(e) so the softmax uses
exp2 (FlashAttention-2's trick); accumulators are float32; p and ds are rounded to the input
dtype for the tensor-core dots, as FlashAttention does; float32 inputs use IEEE dots.

Soft-capping (``softcap`` > 0, Gemma 2's ``attn_logit_softcapping``): each score s = scale *
q.k becomes softcap * tanh(s / softcap) before the masks and the softmax; the backward scales
dS by 1 - tanh^2. It is a constexpr (SOFTCAP) of every kernel: softcap 0 builds the uncapped
kernels unchanged.

Dropout (``dropout_p`` > 0, attention dropout as in FlashAttention-2): the probabilities (after
the softmax, whose row sums and lse stay those of the undropped P) are multiplied by M / (1 -
p) before P @ V, M the keep mask of ``fusedlm.reference.attention_dropout_keep``: element (b,
h, i, j) of the (B, Hq, Tq, Tk) probabilities is kept iff word j % 4 of Philox4x32-10
(``tl.randint4x``) of the counter ((b * Hq + h) * Tq + i) * ceil(Tk / 4) + j // 4 under
``dropout_seed`` is >= floor(p * 2^32), so every backend drops the same elements. The
backward regenerates the mask (dV = (P M / (1 - p))^T dO, dP = (dO V^T) M / (1 - p)). It is
a constexpr (DROPOUT) of every kernel: dropout_p 0 builds the kernels without it, unchanged.
The seed is a one-element int64 tensor the kernels load (the ops layer draws it on the device:
inside a captured CUDA graph each replay then draws, and drops, anew).

Launch configs: on a GPU, 16-bit inputs with sequences of at least ``AUTOTUNE_MIN_SEQLEN`` are
autotuned (``triton.autotune`` over ``HOPPER_CONFIGS``, keyed on the padded head dim, causal,
a power-of-two sequence-length bucket and the dtypes; configs over the device's shared memory
are pruned); shorter sequences, float32 and ``FUSEDLM_TRITON_AUTOTUNE=0`` use a fixed config
that fits. Under ``TRITON_INTERPRET=1`` (tests without a GPU) one small config per kernel
(``INTERPRETER_CONFIGS``). All paths launch the same ``@triton.jit`` kernels.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..backends import environment, triton_interpreted
from .interpreter_fixes import patch_interpreter
from .launch import LAUNCH_OPTIONS

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)

MAX_HEAD_DIM = 256
AUTOTUNE_MIN_SEQLEN = 512  # shorter sequences: a fixed config (tuning them is not worth it)
_SEQ_BUCKET_MAX = 16384
# Dropout's threshold: not specialized (a new p must not recompile); the seed is read from device
# memory (DropoutSeed), so that a CUDA graph's replays can draw a new one each time.
_DROPOUT_ARGS = ["dropout_threshold"]


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; out-of-range rows (MASK_ROWS) and padded columns read 0."""
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            mask = (rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
            tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return tile


@triton.jit
def _kv_range(start_m, seqlen_k, causal_offset, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows [start_m, start_m + BLOCK_M): keys [0, full_end) are visible to every
    row and lie in whole blocks (no mask needed); keys [full_end, end) need the mask (causal
    diagonal, ragged end of the sequence); keys from `end` on are visible to none (skipped)."""
    if CAUSAL:
        end = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        full_end = tl.minimum(seqlen_k, tl.maximum(start_m + causal_offset + 1, 0))
    else:
        end = seqlen_k
        full_end = seqlen_k
    full_end = (full_end // BLOCK_N) * BLOCK_N
    return full_end, end


@triton.jit
def _query_key_ranges(KeyRange, b, rows, seqlen_q, seqlen_k):
    """Per-query key ranges (KeyRange (B, Tq, 2) int32 [start, end)) of batch row b's query
    rows `rows`, clamped to the sequence (start <= end); rows past Tq get the empty (0, 0)."""
    row_ok = rows < seqlen_q
    ptrs = KeyRange + (b.to(tl.int64) * seqlen_q + rows) * 2
    row_hi = tl.minimum(tl.maximum(tl.load(ptrs + 1, mask=row_ok, other=0), 0), seqlen_k)
    row_lo = tl.minimum(tl.maximum(tl.load(ptrs, mask=row_ok, other=0), 0), row_hi)
    return row_lo, row_hi


@triton.jit
def _key_bounds(KeyRange, b, offs_m, seqlen_q, seqlen_k, KEY_RANGE: tl.constexpr):
    """The keys of batch row b's query rows offs_m, clamped to the sequence, so no load leaves
    it: (kv_lo, kv_hi, inner_lo, inner_hi, row_lo, row_hi). No row sees a key outside
    [kv_lo, kv_hi); every row in the sequence sees [inner_lo, inner_hi) as far as the causal /
    window band lets it. KEY_RANGE 0: all of [0, Tk). 1: KeyRange (B, 2) int32 [start, end)
    per batch row. 2: KeyRange (B, Tq, 2) per query; row_lo, row_hi (BLOCK_M) each row's."""
    if KEY_RANGE == 2:
        row_lo, row_hi = _query_key_ranges(KeyRange, b, offs_m, seqlen_q, seqlen_k)
        empty = row_lo >= row_hi
        # Empty rows (and rows past Tq) widen no loop; a row in the sequence with no key
        # leaves no block unmasked.
        kv_lo = tl.min(tl.where(empty, seqlen_k, row_lo), 0)
        kv_hi = tl.max(tl.where(empty, 0, row_hi), 0)
        row_ok = offs_m < seqlen_q
        inner_lo = tl.max(tl.where(row_ok, tl.where(empty, seqlen_k, row_lo), 0), 0)
        inner_hi = tl.min(tl.where(row_ok, row_hi, seqlen_k), 0)
    elif KEY_RANGE == 1:
        kv_hi = tl.minimum(tl.maximum(tl.load(KeyRange + b * 2 + 1), 0), seqlen_k)
        kv_lo = tl.minimum(tl.maximum(tl.load(KeyRange + b * 2), 0), kv_hi)
        inner_lo, inner_hi, row_lo, row_hi = kv_lo, kv_hi, kv_lo, kv_hi
    else:
        kv_lo = 0
        kv_hi = seqlen_k
        inner_lo, inner_hi, row_lo, row_hi = kv_lo, kv_hi, kv_lo, kv_hi
    return kv_lo, kv_hi, inner_lo, inner_hi, row_lo, row_hi


@triton.jit
def _kv_window_range(start_m, kv_lo, kv_hi, inner_lo, inner_hi, causal_offset, window_offset,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """_kv_range of the keys [kv_lo, kv_hi) under a lower limit per row (a sliding window: key
    j visible to row i only if j >= i + window_offset; a key range: j >= its start), every row
    seeing [inner_lo, inner_hi) of them (see _key_bounds): whole key blocks [full_start, high)
    need no mask; the n_low masked blocks from `start` (the lower edge) and the masked blocks
    from `high` to `end` (causal diagonal, ragged end, key range ends) need it.
    Returns (start, n_low, full_start, high, end)."""
    full_end, end = _kv_range(start_m, kv_hi, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
    full_end = tl.minimum(full_end, (inner_hi // BLOCK_N) * BLOCK_N)
    if WINDOW:
        first_low = tl.maximum(start_m + window_offset, kv_lo)
        last_low = tl.maximum(start_m + BLOCK_M - 1 + window_offset, inner_lo)
    else:
        first_low = kv_lo
        last_low = inner_lo
    start = (tl.minimum(tl.maximum(first_low, 0), end) // BLOCK_N) * BLOCK_N
    # Keys from the last row's lower limit on are visible to every row (up to the upper one).
    full_start = tl.cdiv(tl.maximum(last_low, 0), BLOCK_N) * BLOCK_N
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    high = tl.maximum(tl.minimum(full_end, end), full_start)
    n_low = tl.cdiv(full_start - start, BLOCK_N)
    return start, n_low, full_start, high, end


@triton.jit
def _softcap_tanh(dots, qk_scale, softcap):
    """tanh(scale * dots / softcap) (qk_scale = scale * log2(e)): the soft-capped score over
    softcap, to a few float32 ulps relative (2.7e-7 at most against float64, torch's tanh 6e-8:
    benchmarks/NOTES.md), so the capped score errs like a rounded one at any cap, large caps
    included. triton.language has no tanh and libdevice's does not run under TRITON_INTERPRET=1:
    for |x| >= 0.3, 1 - 2 / (e^(2|x|) + 1) with the sign put back (the exponent capped at 64,
    past which tanh is 1.0 in float32, so e never overflows; NaN stays NaN); below 0.3, where
    that form would lose the digits of a small tanh to the 1 -, the odd Taylor series to x^11
    (the next term is under 2e-9 relative there)."""
    x = dots * (qk_scale / (softcap * _LOG2E))
    magnitude = tl.abs(x)
    e = tl.exp2(tl.minimum(magnitude * (2.0 * _LOG2E), 64.0, propagate_nan=tl.PropagateNan.ALL))
    large = 1.0 - 2.0 / (e + 1.0)
    x_small = tl.where(magnitude < 0.3, x, 0.0)  # (large |x| would overflow the unused series)
    x2 = x_small * x_small
    series = -1382.0 / 155925.0
    series = 62.0 / 2835.0 + x2 * series
    series = -17.0 / 315.0 + x2 * series
    series = 2.0 / 15.0 + x2 * series
    series = -1.0 / 3.0 + x2 * series
    small = x_small + x_small * x2 * series
    return tl.where(magnitude < 0.3, small, tl.where(x < 0.0, -large, large))


@triton.jit
def _dropout_keep(seed, threshold, rows, n_quads, start_n, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which probabilities attention dropout keeps, of the rows
    `rows` (BLOCK_M int64: (b * Hq + h) * Tq + i, the row of the (B, Hq, Tq, Tk) probabilities)
    and the keys [start_n, start_n + BLOCK_N), start_n a multiple of 4; n_quads = cdiv(Tk, 4).
    Key j takes word j % 4 of Philox4x32-10 (tl.randint4x) of the counter rows * n_quads + j //
    4 under the key (seed & 0xffffffff, seed >> 32), kept iff that word >= threshold (unsigned):
    fusedlm.reference.attention_dropout_keep. One generator call per four keys, its words
    interleaved: join(join(r0, r2), join(r1, r3)) holds r[2x + y] at [.., c, x, y], which the
    reshape puts at key start_n + 4c + 2x + y, so key j gets word j % 4. seed: the int64 the
    kernel loaded from DropoutSeed; threshold: the int32 bit pattern of the uint32 threshold
    (an i32 argument, not specialized)."""
    quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * n_quads + quads[None, :])
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return words >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _load_key_block(K_head, V_head, cols, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_k,
                    offs_d, head_dim, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) k and v tiles of keys ``cols`` (rows past seqlen_k read 0 when
    MASKED), for the forward and dQ blocks."""
    k = _load_tile(K_head + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   cols, seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
    v = _load_tile(V_head + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   cols, seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
    return k, v


@triton.jit
def _visible_keys(cols, offs_m, seqlen_k, kv_lo, row_lo, row_hi, causal_offset, window_offset,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_RANGE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: whether query row offs_m sees key cols, by the forward and dQ
    blocks' masks (keys past seqlen_k, the causal and window bands, kv_lo for KEY_RANGE 1,
    each row's [row_lo, row_hi) for KEY_RANGE 2). The dK/dV block's transposed tile has its
    own (query rows past Tq hidden instead of keys)."""
    visible = cols[None, :] < seqlen_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
    if WINDOW:
        visible = visible & (cols[None, :] >= offs_m[:, None] + window_offset)
    if KEY_RANGE == 2:
        visible = visible & ((cols[None, :] >= row_lo[:, None])
                             & (cols[None, :] < row_hi[:, None]))
    elif KEY_RANGE:
        visible = visible & (cols[None, :] >= kv_lo)
    return visible


@triton.jit
def _attention_fwd_block(
    acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, seqlen_k, head_dim,
    causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads, seed,
    threshold, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    KEY_RANGE: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block of the online softmax; m_i is the running max in the log2 domain.
    seqlen_k is the rows' last key end (loads stop there), kv_lo their start (KEY_RANGE 1),
    row_lo / row_hi each row's range (KEY_RANGE 2). DROPOUT: the rows' P @ V drops what
    _dropout_keep(seed, threshold, drop_rows, n_quads, start_n) does not keep (the
    row sums l_i keep it; the kernel scales by 1 / (1 - p) at the end)."""
    cols = start_n + offs_n
    k, v = _load_key_block(K_head, V_head, cols, stride_kn, stride_kd, stride_vn, stride_vd,
                           seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:  # capped before the masks, as the reference does
        s = _softcap_tanh(s, qk_scale, softcap) * (softcap * _LOG2E)
    else:
        s = s * qk_scale
    if MASKED:
        visible = _visible_keys(cols, offs_m, seqlen_k, kv_lo, row_lo, row_hi, causal_offset,
                                window_offset, CAUSAL, WINDOW, KEY_RANGE)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead (-inf - -inf is NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:  # (after the row sums: the softmax is that of every visible key)
        keep = _dropout_keep(seed, threshold, drop_rows, n_quads, start_n, BLOCK_M,
                             BLOCK_N)
        p = tl.where(keep, p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def attention_fwd_kernel(
    Q, K, V, Out, Lse, KeyRange,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, group, seqlen_q, seqlen_k, head_dim, causal_offset, window_offset, qk_scale,
    softcap, DropoutSeed, dropout_threshold, dropout_scale,
    n_splits, split_stride_o, split_stride_lse,
    seq_bucket,  # autotuning key only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_RANGE: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Out (B, Hq, Tq, D) in Q's dtype and Lse (B, Hq, Tq) float32 (contiguous) from Q
    (B, Hq, Tq, D), K/V (B, Hkv, Tk, D) and, with KEY_RANGE, KeyRange (see _key_bounds). One
    program per BLOCK_M query rows of one head; grid (cdiv(Tq, BLOCK_M) * B * Hq,).
    qk_scale = scale * log2(e). SOFTCAP: the scores are softcap * tanh(scale * q.k / softcap)
    (softcap > 0; without SOFTCAP the argument is not read).
    DROPOUT: P @ V takes the probabilities _dropout_keep keeps (DropoutSeed: a pointer to
    the int64 seed, read here; dropout_threshold: floor(p * 2^32) as an int32 bit pattern) times
    dropout_scale = 1 / (1 - p); Lse stays that of the undropped softmax. The rows of the
    counter are bh * seqlen_q + row in this launch's view, which is the true (b * Hq + h) *
    Tq + i also where a GQA group's heads are packed into the rows (Tq = 1: see
    _packs_query_heads). Without DROPOUT those four arguments are not read.
    SPLIT_KEYS (decoding: few query rows, many keys): grid (n_splits * cdiv(Tq, BLOCK_M) * B
    * Hq,); program `split` of a query block takes the split-th share of its key blocks and
    writes Out (n_splits, B, Hq, Tq, D) float32 (normalized by its own softmax sum) and Lse
    (n_splits, B, Hq, Tq) at split * split_stride_o / split_stride_lse, for _combine_splits."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    split = pid % n_splits
    if SPLIT_KEYS:
        pid = pid // n_splits
        Out += split.to(tl.int64) * split_stride_o
        Lse += split.to(tl.int64) * split_stride_lse
    # The last query blocks see the most keys under the causal mask: run them first.
    start_m = (num_m - 1 - pid % num_m) * BLOCK_M
    bh = pid // num_m
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    # int64 head offsets: B * H * T * D may pass 2**31 elements.
    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    O_head = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_lo, kv_hi, inner_lo, inner_hi, row_lo, row_hi = _key_bounds(
        KeyRange, b, offs_m, seqlen_q, seqlen_k, KEY_RANGE)
    if DROPOUT:  # the rows of the (B, Hq, Tq, Tk) probabilities, for _dropout_keep
        drop_rows = bh.to(tl.int64) * seqlen_q + offs_m
        n_quads = tl.cdiv(seqlen_k, 4)
        dropout_seed = tl.load(DropoutSeed)  # (device memory: CUDA graph replays draw anew)
    else:  # (not read)
        drop_rows = offs_m
        n_quads = seqlen_k
        dropout_seed = 0
    if SPLIT_KEYS:
        # This program's share of the key blocks the query block can see, as the keys' outer
        # bounds: the loops below start at a block edge >= split_lo, and loads and masks stop at
        # kv_hi, so the per-row and inner bounds need no cut.
        split_lo, split_hi = _split_key_range(
            split, n_splits, start_m, kv_lo, kv_hi, causal_offset, window_offset, CAUSAL, WINDOW,
            BLOCK_M, BLOCK_N)
        kv_lo = tl.maximum(kv_lo, split_lo)
        kv_hi = tl.maximum(tl.minimum(kv_hi, split_hi), kv_lo)
    if WINDOW or KEY_RANGE or SPLIT_KEYS:
        # Masked blocks at both edges share one loop (two masked call sites cost registers).
        start, n_low, full_start, high, end = _kv_window_range(
            start_m, kv_lo, kv_hi, inner_lo, inner_hi, causal_offset, window_offset, CAUSAL,
            WINDOW, BLOCK_M, BLOCK_N)
        for start_n in range(full_start, high, BLOCK_N):
            acc, m_i, l_i = _attention_fwd_block(
                acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, kv_hi,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, False, CAUSAL, WINDOW,
                KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
        for i in range(0, n_low + tl.cdiv(end - high, BLOCK_N)):
            start_n = tl.where(i < n_low, start + i * BLOCK_N, high + (i - n_low) * BLOCK_N)
            acc, m_i, l_i = _attention_fwd_block(
                acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, kv_hi,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, True, CAUSAL, WINDOW,
                KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
    else:
        full_end, end = _kv_range(start_m, seqlen_k, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attention_fwd_block(
                acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, seqlen_k,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, False, CAUSAL, WINDOW,
                KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
        for start_n in range(full_end, end, BLOCK_N):
            acc, m_i, l_i = _attention_fwd_block(
                acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, seqlen_k,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, True, CAUSAL, WINDOW,
                KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)

    # l_i is 0 exactly for rows that see no key (the max term alone contributes 1).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * dropout_scale
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    row_ok = offs_m < seqlen_q
    tl.store(Lse + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)
    o_ptrs = O_head + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if EVEN_D:
        o_mask = row_ok[:, None]
    else:
        o_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


@triton.jit
def _split_key_range(split, n_splits, start_m, kv_lo, kv_hi, causal_offset, window_offset,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Keys [split_lo, split_hi) of program `split` of the n_splits sharing the query rows
    [start_m, start_m + BLOCK_M): a run of whole key blocks, the runs sharing evenly the blocks
    from the rows' first visible key (key range start, sliding window) to their last (key
    range end, causal limit); past those, empty."""
    hi = kv_hi
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
    lo = kv_lo
    if WINDOW:
        lo = tl.maximum(lo, start_m + window_offset)
    first_block = tl.minimum(tl.maximum(lo, 0), hi) // BLOCK_N
    share = tl.cdiv(tl.maximum(tl.cdiv(hi, BLOCK_N) - first_block, 0), n_splits)
    split_lo = (first_block + split * share) * BLOCK_N
    return split_lo, split_lo + share * BLOCK_N


@triton.jit
def attention_bwd_preprocess_kernel(
    Out, DO, GradLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, seqlen_q, head_dim,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
):
    """Delta (B, Hq, Tq) float32 (contiguous) = rowsum(DO * Out), the softmax-backward term
    sum_j P_ij dP_ij, minus GradLse (B, Hq, Tq) float32 (contiguous) with HAS_GRAD_LSE: a
    gradient of lse adds GradLse * P to dS, the same as lowering Delta by it.
    Grid (cdiv(Tq, BLOCK_M) * B * Hq,)."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % num_m) * BLOCK_M
    bh = pid // num_m
    b = bh // n_heads
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                   + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + bh.to(tl.int64) * seqlen_q + offs_m, mask=offs_m < seqlen_q,
                         other=0.0)
    tl.store(Delta + bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attention_bwd_dkdv_block(
    dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, start_m, offs_m, offs_n, offs_d,
    stride_qm, stride_qd, stride_dom, stride_dod, row_lo, row_hi, seqlen_q, head_dim,
    causal_offset, window_offset, qk_scale, softcap, start_n, drop_row0, n_quads, seed,
    threshold, dropout_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, KEY_RANGE: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query block's contribution to dk (unscaled) and dv of a key block, transposed
    (keys along rows) so no accumulator needs a transpose. row_lo / row_hi: the block's
    per-query key ranges (KEY_RANGE 2). DROPOUT: the keys [start_n, start_n + BLOCK_N) and the
    query rows drop_row0 + start_m + offs_m of the (B, Hq, Tq, Tk) probabilities go through
    _dropout_keep's mask M: dv gets (P * M)^T dO (unscaled: the kernel scales dv by
    1 / (1 - p) at the end), dP = (dO V^T) * M / (1 - p)."""
    rows = start_m + offs_m
    q = _load_tile(Q_head + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, seqlen_q, offs_d, head_dim, MASKED, EVEN_D)
    do = _load_tile(DO_head + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    rows, seqlen_q, offs_d, head_dim, MASKED, EVEN_D)
    if MASKED:
        # Rows past the end: lse = +inf gives p = 0.
        lse = tl.load(Lse_row + rows, mask=rows < seqlen_q, other=float("inf"))
        delta = tl.load(Delta_row + rows, mask=rows < seqlen_q, other=0.0)
    else:
        lse = tl.load(Lse_row + rows)
        delta = tl.load(Delta_row + rows)
    if KEY_RANGE:
        # Rows that see no key (lse = -inf: e.g. left padding's queries) meet padding keys,
        # which no mask here hides: p = 0 for them, not inf (those keys' dk, dv are dropped).
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    if SOFTCAP:
        tanh_t = _softcap_tanh(s_t, qk_scale, softcap)
        p_t = tl.exp2(tanh_t * (softcap * _LOG2E) - lse[None, :] * _LOG2E)
    else:
        p_t = tl.exp2(s_t * qk_scale - lse[None, :] * _LOG2E)
    if MASKED:
        # Also zeroes rows with lse = -inf (they see no key, so only masked blocks have them).
        visible = rows[None, :] < seqlen_q
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= rows[None, :] + causal_offset)
        if WINDOW:
            visible = visible & (offs_n[:, None] >= rows[None, :] + window_offset)
        if KEY_RANGE == 2:
            visible = visible & ((offs_n[:, None] >= row_lo[None, :])
                                 & (offs_n[:, None] < row_hi[None, :]))
        p_t = tl.where(visible, p_t, 0.0)
    if DROPOUT:
        keep_t = tl.trans(_dropout_keep(seed, threshold, drop_row0 + rows, n_quads,
                                        start_n, BLOCK_M, BLOCK_N))
        dv = tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, dv,
                    input_precision=DOT_PRECISION)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:  # dS of the capped scores to dS of the raw ones: d(c tanh(x / c)) = 1 - tanh^2
        ds_t = ds_t * (1.0 - tanh_t * tanh_t)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KeyRange, QueryExtent,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_kv_heads, group, seqlen_q, seqlen_k, head_dim, causal_offset, window_offset, sm_scale,
    qk_scale, softcap, DropoutSeed, dropout_threshold, dropout_scale,
    seq_bucket,  # autotuning key only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_RANGE: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DK, DV (B, Hkv, Tk, D) in K's/V's dtype from Q, DO (B, Hq, Tq, D), K, V, Lse and Delta
    (B, Hq, Tq) float32 contiguous (KeyRange with KEY_RANGE: see _key_bounds; softcap with
    SOFTCAP, the dropout arguments with DROPOUT: see attention_fwd_kernel; each query head's
    own mask, regenerated). One program per BLOCK_N keys of one kv head; it loops
    over the Hq / Hkv query heads of its group and their query blocks, so the GQA sum happens in
    registers (deterministic, no atomics).
    Grid (cdiv(Tk, BLOCK_N) * B * Hkv,)."""
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    start_n = (pid % num_n) * BLOCK_N  # causal: the first key blocks are the busiest, run first
    bh = pid // num_n
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                   + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, seqlen_k, offs_d, head_dim, True, EVEN_D)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                   + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, seqlen_k, offs_d, head_dim, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks: [full, even_end) see all these keys and are whole: no mask. The rest need
    # the mask: [lo, diag_end) straddle the causal diagonal, [tail, end) is the ragged last
    # block; one masked loop walks both (a third loop costs registers: ptxas spills).
    # Keys past Tk need no mask here: their k, v read 0 and their dk, dv rows are not stored.
    end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    even_end = (seqlen_q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full = 0
    if WINDOW:
        # Query i sees key j only if i <= j - window_offset: queries past the block's last key's
        # limit see none of it (end drops to there), and whole query blocks up to the first
        # key's limit see all of it (unmasked ones stop there).
        end = tl.minimum(end, tl.cdiv(tl.maximum(start_n + BLOCK_N - window_offset, 0),
                                      BLOCK_M) * BLOCK_M)
        even_end = tl.minimum(even_end, (tl.maximum(start_n - window_offset + 1, 0) // BLOCK_M)
                              * BLOCK_M)
    if KEY_RANGE == 2:
        # Per-query ranges: only the query rows QueryExtent gives for these keys (the first
        # 16-key chunk's first row to the last chunk's end), every block through the mask,
        # skipped when no row's range meets these keys.
        chunks = tl.cdiv(seqlen_k, 16)
        extent = QueryExtent + b.to(tl.int64) * chunks * 2
        rows_first = tl.load(extent + (start_n // 16) * 2)
        rows_end = tl.load(extent + tl.minimum((start_n + BLOCK_N) // 16, chunks) * 2 - 1)
        lo = tl.maximum(lo, (rows_first // BLOCK_M) * BLOCK_M)
        end = tl.minimum(end, tl.cdiv(rows_end, BLOCK_M) * BLOCK_M)
        full = end
        even_end = end
    kv_lo, kv_hi, _, _, _, _ = _key_bounds(KeyRange, b, offs_m, seqlen_q, seqlen_k,
                                           KEY_RANGE if KEY_RANGE == 1 else 0)
    if KEY_RANGE == 1:
        # Padding keys (outside the batch row's range) get dk = dv = 0 at the store, whatever
        # was accumulated for them: a key's dk, dv rows depend on its own scores only, and a
        # key inside the range is visible exactly where the causal / window masks say. So a
        # block wholly outside needs no query block at all.
        outside = (start_n + BLOCK_N <= kv_lo) | (start_n >= kv_hi)
        end = tl.where(outside, 0, end)
        even_end = tl.where(outside, 0, even_end)
    tail = tl.maximum(full, even_end)
    n_diag = tl.maximum(tl.minimum(full, end) - lo, 0) // BLOCK_M
    n_masked = n_diag + tl.maximum(end - tail, 0) // BLOCK_M
    if DROPOUT:  # as in attention_fwd_kernel
        dropout_seed = tl.load(DropoutSeed)
    else:  # (not read)
        dropout_seed = 0

    for g in range(group):
        h = hk * group + g
        bhq = b * (n_kv_heads * group) + h
        Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DO_head = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        Lse_row = Lse + bhq.to(tl.int64) * seqlen_q
        Delta_row = Delta + bhq.to(tl.int64) * seqlen_q
        if DROPOUT:  # query head h's first row of the (B, Hq, Tq, Tk) probabilities
            drop_row0 = bhq.to(tl.int64) * seqlen_q
            n_quads = tl.cdiv(seqlen_k, 4)
        else:  # (not read)
            drop_row0 = bhq
            n_quads = seqlen_k
        for start_m in range(full, even_end, BLOCK_M):
            dk, dv = _attention_bwd_dkdv_block(
                dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, start_m, offs_m, offs_n,
                offs_d, stride_qm, stride_qd, stride_dom, stride_dod, kv_lo, kv_hi, seqlen_q,
                head_dim, causal_offset, window_offset, qk_scale, softcap, start_n, drop_row0,
                n_quads, dropout_seed, dropout_threshold, dropout_scale,
                False, CAUSAL, WINDOW, KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT,
                BLOCK_M, BLOCK_N)
        for i in range(0, n_masked):
            if WINDOW:  # the window's edge can leave several masked blocks from tail on
                start_m = tl.where(i < n_diag, lo + i * BLOCK_M, tail + (i - n_diag) * BLOCK_M)
            else:  # only the ragged last block
                start_m = tl.where(i < n_diag, lo + i * BLOCK_M, tail)
            if KEY_RANGE == 2:
                row_lo, row_hi = _query_key_ranges(KeyRange, b, start_m + offs_m, seqlen_q,
                                                   seqlen_k)
                meets = (row_lo < row_hi) & (row_lo < start_n + BLOCK_N) & (row_hi > start_n)
                if tl.max(meets.to(tl.int32), 0) > 0:
                    dk, dv = _attention_bwd_dkdv_block(
                        dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, start_m, offs_m,
                        offs_n, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, row_lo,
                        row_hi, seqlen_q, head_dim, causal_offset, window_offset, qk_scale, softcap,
                        start_n, drop_row0, n_quads, dropout_seed,
                        dropout_threshold, dropout_scale, True, CAUSAL, WINDOW, KEY_RANGE, EVEN_D,
                        DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
            else:
                dk, dv = _attention_bwd_dkdv_block(
                    dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, start_m, offs_m, offs_n,
                    offs_d, stride_qm, stride_qd, stride_dom, stride_dod, kv_lo, kv_hi, seqlen_q,
                    head_dim, causal_offset, window_offset, qk_scale, softcap, start_n, drop_row0,
                    n_quads, dropout_seed, dropout_threshold, dropout_scale,
                    True, CAUSAL, WINDOW, KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT,
                    BLOCK_M, BLOCK_N)

    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * dropout_scale
    if KEY_RANGE == 1:  # (where, not a multiply: a padding key's rows may hold inf or NaN)
        key_ok = (offs_n[:, None] >= kv_lo) & (offs_n[:, None] < kv_hi)
        dk = tl.where(key_ok, dk, 0.0)
        dv = tl.where(key_ok, dv, 0.0)
    row_ok = offs_n < seqlen_k
    if EVEN_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attention_bwd_dq_block(
    dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, seqlen_k, head_dim,
    causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads, seed,
    threshold, dropout_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    KEY_RANGE: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block's contribution to dq (unscaled); lse2 = lse * log2(e). seqlen_k, kv_lo,
    row_lo, row_hi, the dropout arguments: as in _attention_fwd_block; with DROPOUT, dP =
    (dO V^T) * M / (1 - p), M the same keep mask."""
    cols = start_n + offs_n
    k, v = _load_key_block(K_head, V_head, cols, stride_kn, stride_kd, stride_vn, stride_vd,
                           seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:
        tanh = _softcap_tanh(s, qk_scale, softcap)
        p = tl.exp2(tanh * (softcap * _LOG2E) - lse2[:, None])
    else:
        p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        visible = _visible_keys(cols, offs_m, seqlen_k, kv_lo, row_lo, row_hi, causal_offset,
                                window_offset, CAUSAL, WINDOW, KEY_RANGE)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, threshold, drop_rows, n_quads, start_n, BLOCK_M,
                             BLOCK_N)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # as in _attention_bwd_dkdv_block
        ds = ds * (1.0 - tanh * tanh)
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KeyRange,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, group, seqlen_q, seqlen_k, head_dim, causal_offset, window_offset, sm_scale,
    qk_scale, softcap, DropoutSeed, dropout_threshold, dropout_scale,
    seq_bucket,  # autotuning key only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KEY_RANGE: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DQ (B, Hq, Tq, D) in Q's dtype from Q, DO, K, V, Lse and Delta (B, Hq, Tq) float32
    contiguous (KeyRange with KEY_RANGE: see _key_bounds; softcap with SOFTCAP, the dropout
    arguments with DROPOUT: see attention_fwd_kernel; Delta is rowsum(dO * Out) of the dropped
    Out, as without dropout). One program per BLOCK_M query rows of one head, looping over key
    blocks. Grid (cdiv(Tq, BLOCK_M) * B * Hq,)."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (num_m - 1 - pid % num_m) * BLOCK_M
    bh = pid // num_m
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    K_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                   + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    row_ok = offs_m < seqlen_q
    # Rows past the end read lse = +inf (p = 0). Rows that see no key (lse = -inf) meet only
    # masked blocks, where p is zeroed.
    lse = tl.load(Lse + bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=float("inf"))
    lse2 = lse * _LOG2E
    delta = tl.load(Delta + bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_lo, kv_hi, inner_lo, inner_hi, row_lo, row_hi = _key_bounds(
        KeyRange, b, offs_m, seqlen_q, seqlen_k, KEY_RANGE)
    if DROPOUT:  # as in attention_fwd_kernel
        drop_rows = bh.to(tl.int64) * seqlen_q + offs_m
        n_quads = tl.cdiv(seqlen_k, 4)
        dropout_seed = tl.load(DropoutSeed)
    else:  # (not read)
        drop_rows = offs_m
        n_quads = seqlen_k
        dropout_seed = 0
    if WINDOW or KEY_RANGE:
        start, n_low, full_start, high, end = _kv_window_range(
            start_m, kv_lo, kv_hi, inner_lo, inner_hi, causal_offset, window_offset, CAUSAL,
            WINDOW, BLOCK_M, BLOCK_N)
        for start_n in range(full_start, high, BLOCK_N):
            dq = _attention_bwd_dq_block(
                dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, kv_hi,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, dropout_scale, False, CAUSAL,
                WINDOW, KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
        for i in range(0, n_low + tl.cdiv(end - high, BLOCK_N)):
            start_n = tl.where(i < n_low, start + i * BLOCK_N, high + (i - n_low) * BLOCK_N)
            dq = _attention_bwd_dq_block(
                dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, kv_hi,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, dropout_scale, True, CAUSAL,
                WINDOW, KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
    else:
        full_end, end = _kv_range(start_m, seqlen_k, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _attention_bwd_dq_block(
                dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, seqlen_k,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, dropout_scale, False, CAUSAL,
                WINDOW, KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)
        for start_n in range(full_end, end, BLOCK_N):
            dq = _attention_bwd_dq_block(
                dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_n, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, kv_lo, row_lo, row_hi, seqlen_k,
                head_dim, causal_offset, window_offset, qk_scale, softcap, drop_rows, n_quads,
                dropout_seed, dropout_threshold, dropout_scale, True, CAUSAL,
                WINDOW, KEY_RANGE, EVEN_D, DOT_PRECISION, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N)

    dq = dq * sm_scale
    if EVEN_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---- launch configs -------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and BLOCK_D (16 and 32 use the 64 list);
# BLOCK_M tiles queries and BLOCK_N keys in every kernel (the dk/dv kernel's program owns
# BLOCK_N keys and walks the queries). Picked from sm_90a builds by ptxas -v: on contiguous
# 16-bit inputs at D = 64/128/256 none spills more than 28 bytes (benchmarks/NOTES.md has the
# table; padded head dims such as 72 spill more, and the autotuner times them as they are).
# The first of each list is the untuned one; tests/triton builds those and bounds their spills.
HOPPER_CONFIGS = {
    "fwd": {
        64: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
             (128, 128, 8, 2), (64, 128, 4, 3)],
        128: [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4),
              (128, 128, 8, 2), (128, 32, 8, 3)],
        256: [(64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2),
              (128, 64, 8, 2)],
    },
    "bwd_dkdv": {
        64: [(32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2),
             (64, 64, 8, 2)],
        128: [(32, 64, 8, 2), (32, 32, 4, 2), (32, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 2),
              (16, 128, 8, 3)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2), (16, 16, 4, 2), (16, 64, 8, 2)],
    },
    "bwd_dq": {
        64: [(64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3),
             (128, 64, 8, 3)],
        128: [(64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3),
              (128, 64, 8, 2)],
        256: [(64, 32, 8, 2), (64, 16, 8, 2), (64, 32, 8, 3), (128, 16, 8, 2), (128, 32, 8, 2)],
    },
}
# float32 (IEEE dots on the FMA units: correct, not fast; untuned): one config each, small
# tiles, as the FMA dot holds operand rows in registers (larger ones spill in sm_90a builds).
FLOAT32_CONFIGS = {
    "fwd": {64: (32, 32, 4, 2), 128: (16, 16, 4, 2), 256: (16, 32, 8, 2)},
    "bwd_dkdv": {64: (16, 32, 4, 2), 128: (16, 16, 4, 2), 256: (16, 16, 8, 2)},
    "bwd_dq": {64: (32, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 32, 8, 2)},
}
_SMALLEST = (16, 16, 4, 1)  # when nothing else fits the device's shared memory
# Under the interpreter: the cost is per tile op, not per element, so tiles as large as the
# test sequences allow (they still get several, ragged, blocks), with BLOCK_M != BLOCK_N so the
# causal block arithmetic runs off the square case. tests/triton varies them.
INTERPRETER_CONFIGS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
    "bwd_dq": {"BLOCK_M": 64, "BLOCK_N": 32},
    "bwd_preprocess": {"BLOCK_M": 64},
}
_PREPROCESS_BLOCK_M = 64


def _shared_bytes(kernel: str, cfg: tuple, block_d: int, elem: int) -> int:
    """Shared memory a config needs: the tiles loaded once plus `num_stages` buffers of the
    tiles the loop streams (matches the sm_90a builds' metadata within 1 KiB)."""
    block_m, block_n, _, stages = cfg
    if kernel == "fwd":  # q once; k, v streamed
        tiles = block_m * block_d + stages * 2 * block_n * block_d
    elif kernel == "bwd_dkdv":  # k, v once; q, do streamed
        tiles = 2 * block_n * block_d + stages * 2 * block_m * block_d
    else:  # dq: q, do once; k, v streamed
        tiles = 2 * block_m * block_d + stages * 2 * block_n * block_d
    return tiles * elem + 1024


def _fits(kernel: str, cfg: tuple, block_d: int, elem: int, max_shared: int) -> bool:
    return _shared_bytes(kernel, cfg, block_d, elem) <= max_shared


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(props["max_shared_mem"])


def _config_kwargs(cfg: tuple) -> dict:
    block_m, block_n, warps, stages = cfg
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def _fixed_config(kernel: str, block_d: int, dtype: torch.dtype, max_shared: int) -> dict:
    """The untuned config: the first of the list that fits the device."""
    size = max(block_d, 64)
    if dtype == torch.float32:
        candidates = [FLOAT32_CONFIGS[kernel][size]]
    else:
        candidates = HOPPER_CONFIGS[kernel][size]
    elem = torch.empty((), dtype=dtype).element_size()
    for cfg in candidates:
        if _fits(kernel, cfg, block_d, elem, max_shared):
            return _config_kwargs(cfg)
    return _config_kwargs(_SMALLEST)


def _prune_configs(kernel: str):
    """early_config_prune for triton.autotune: drop configs over the device's shared memory."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        block_d = kwargs["BLOCK_D"] if "BLOCK_D" in kwargs else named_args["BLOCK_D"]
        max_shared = _max_shared_memory(q.device.index)
        kept = [
            c for c in configs
            if _fits(kernel, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages),
                     block_d, q.element_size(), max_shared)
        ]
        if kept:
            return kept
        block_m, block_n, warps, stages = _SMALLEST
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        return [triton.Config(meta, num_warps=warps, num_stages=stages)]

    return prune


_KERNELS = {
    "fwd": attention_fwd_kernel,
    "bwd_dkdv": attention_bwd_dkdv_kernel,
    "bwd_dq": attention_bwd_dq_kernel,
}


@functools.cache
def _autotuned(kernel: str, size: int):
    """``triton.autotune`` over HOPPER_CONFIGS[kernel][size], built on first use (GPU only)."""
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in HOPPER_CONFIGS[kernel][size]
    ]
    return triton.autotune(
        configs=configs,
        # the autotuner adds the dtypes
        key=["BLOCK_D", "CAUSAL", "WINDOW", "KEY_RANGE", "SPLIT_KEYS", "SOFTCAP", "DROPOUT",
             "seq_bucket"],
        prune_configs_by={"early_config_prune": _prune_configs(kernel)},
        cache_results=True,  # timings kept in Triton's disk cache: later processes skip them
    )(_KERNELS[kernel])


def _autotune_enabled() -> bool:
    value = environment("FUSEDLM_TRITON_AUTOTUNE", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def _seq_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Autotuning key: the longer length's power of two, capped (longer ones tune alike)."""
    return min(triton.next_power_of_2(max(seqlen_q, seqlen_k, 1)), _SEQ_BUCKET_MAX)


def _interpreter_ready(fn) -> None:
    """Triton decides at decoration time whether a kernel is interpreted: this module must
    first be imported with TRITON_INTERPRET=1 already set."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(fn, InterpretedFunction):
        raise RuntimeError(
            "fusedlm.triton.attention was imported before TRITON_INTERPRET=1 was set, so its "
            "kernels are compiled for a GPU; set TRITON_INTERPRET=1 before the first Triton call"
        )
    patch_interpreter()  # triton 3.6's interpreter: see interpreter_fixes.py


def _launch(
    kernel: str, grid_size, args: tuple, constexprs: dict, q: Tensor, seq_bucket: int
) -> None:
    """Run `kernel` on `grid_size(BLOCK_M, BLOCK_N)` programs with the config the situation
    calls for: the interpreter's, autotuned (16-bit inputs, long sequences) or fixed."""
    fn = _KERNELS[kernel]
    constexprs = {**constexprs, **LAUNCH_OPTIONS}
    if triton_interpreted():
        _interpreter_ready(fn)
        cfg = INTERPRETER_CONFIGS[kernel]
        fn[(grid_size(cfg["BLOCK_M"], cfg["BLOCK_N"]),)](*args, **constexprs, **cfg)
        return
    block_d = constexprs["BLOCK_D"]
    with torch.cuda.device(q.device):
        if q.dtype != torch.float32 and seq_bucket >= AUTOTUNE_MIN_SEQLEN and _autotune_enabled():
            tuned = _autotuned(kernel, max(block_d, 64))
            tuned[lambda meta: (grid_size(meta["BLOCK_M"], meta["BLOCK_N"]),)](*args, **constexprs)
        else:
            cfg = _fixed_config(kernel, block_d, q.dtype, _max_shared_memory(q.device.index))
            try:
                fn[(grid_size(cfg["BLOCK_M"], cfg["BLOCK_N"]),)](*args, **constexprs, **cfg)
            except triton.runtime.errors.OutOfResources:
                # The estimate let through a config the device cannot hold (raised when the
                # kernel loads, before it runs): the smallest one.
                cfg = _config_kwargs(_SMALLEST)
                fn[(grid_size(cfg["BLOCK_M"], cfg["BLOCK_N"]),)](*args, **constexprs, **cfg)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _common_constexprs(q: Tensor, causal: bool, window_offset: int | None,
                       key_range: Tensor | None, softcap: float, dropout_p: float = 0.0) -> dict:
    head_dim = q.shape[3]
    block_d = _block_d(head_dim)
    return {
        "CAUSAL": bool(causal),
        # softcap 0: the uncapped kernels, as built before soft-capping existed
        "SOFTCAP": softcap != 0.0,
        # dropout_p 0: the kernels without dropout, as built before it existed
        "DROPOUT": dropout_p != 0.0,
        "WINDOW": window_offset is not None,
        # 0: none; 1: (B, 2) per batch row; 2: (B, Tq, 2) per query
        "KEY_RANGE": 0 if key_range is None else key_range.dim() - 1,
        "BLOCK_D": block_d,
        "EVEN_D": block_d == head_dim,
        # float32: TF32 (and even 3xTF32, ~10x float32's rounding per product) would lose to
        # torch's float32 matmul on large logits; IEEE it is. 16-bit dots ignore the setting.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _check_softcap(softcap) -> float:
    """softcap as a float: finite and >= 0 (a negative cap would be the same as its absolute
    value, a sign of a mix-up: refused)."""
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"fusedlm.triton.attention: softcap must be a finite number >= 0 "
                         f"(0: no capping), got {softcap}")
    return softcap


def _check_dropout(dropout_p, dropout_seed, q: Tensor) -> tuple[float, Tensor | None]:
    """dropout_p as a float in [0, 1) and, with dropout, dropout_seed as the one-element int64
    tensor on q's device the kernels read (its 64 bits are Philox's key): given as such a
    tensor (the ops layer's draw: no host copy, so CUDA graphs can capture it) or as an int in
    [-2^63, 2^63), copied to the device here. None without dropout."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise ValueError(f"fusedlm.triton.attention: dropout_p must be a float in [0, 1), got "
                         f"{dropout_p!r}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # (NaN fails too)
        raise ValueError(f"fusedlm.triton.attention: dropout_p must be in [0, 1), got "
                         f"{dropout_p}")
    if not dropout_p:
        return dropout_p, None
    if isinstance(dropout_seed, Tensor):
        if (dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1
                or dropout_seed.device != q.device):
            raise ValueError(f"fusedlm.triton.attention: dropout_seed must be a one-element "
                             f"int64 tensor on q's device ({q.device}), got "
                             f"{list(dropout_seed.shape)} {dropout_seed.dtype} on "
                             f"{dropout_seed.device}")
        return dropout_p, dropout_seed
    if (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral)
            or not -2**63 <= int(dropout_seed) < 2**63):
        raise ValueError(f"fusedlm.triton.attention: dropout_seed must be an int64 (an int in "
                         f"[-2**63, 2**63) or a one-element int64 tensor), got "
                         f"{dropout_seed!r}")
    return dropout_p, torch.tensor(int(dropout_seed), dtype=torch.int64, device=q.device)


def _int32_bits(x: int) -> int:
    """The low 32 bits of x as a signed int32 value (how the kernels take uint32 words: always
    an i32 argument)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _dropout_args(dropout_p: float, dropout_seed: Tensor | None,
                  stand_in: Tensor) -> tuple[Tensor, int, float]:
    """The kernels' (DropoutSeed, dropout_threshold, dropout_scale); ``stand_in`` (never read)
    for DropoutSeed without dropout."""
    return (stand_in if dropout_seed is None else dropout_seed,
            _int32_bits(reference.dropout_threshold(dropout_p)), 1.0 / (1.0 - dropout_p))


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fusedlm.triton.attention: float32/float16/bfloat16 only, got {q.dtype}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"fusedlm.triton.attention: head dim {q.shape[3]} > {MAX_HEAD_DIM}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"fusedlm.triton.attention: Hq = {q.shape[1]} is not a multiple of Hkv = {k.shape[1]}"
        )


# ---- entry points ---------------------------------------------------------------------------


def _clamped_offsets(causal_offset: int, window_offset: int | None, Tq: int, Tk: int):
    """Offsets clamped to [-Tq, Tk] (past those bounds a limit excludes all keys or none), so
    they fit the kernels' int32 arithmetic; window_offset 0 when there is no window."""
    clamp = lambda x: max(-Tq, min(Tk, int(x)))  # noqa: E731
    return clamp(causal_offset), 0 if window_offset is None else clamp(window_offset)


def _key_range_argument(key_range: Tensor | None, q: Tensor, stand_in: Tensor) -> Tensor:
    """The KeyRange kernel argument: key_range as contiguous int32 on q's device (the kernels
    clamp int32 values themselves), or ``stand_in`` (never read) without one. Wider integers
    are clamped to [0, int32 max] first, as the C++ bindings do: a bound past int32, such as
    2**40 for "every key", would wrap in the conversion (found by ``--fuzz-long``)."""
    if key_range is None:
        return stand_in
    B, Tq = q.shape[0], q.shape[2]
    if key_range.shape not in ((B, 2), (B, Tq, 2)) or key_range.is_floating_point():
        raise ValueError(f"fusedlm.triton.attention: key_range must be (B, 2) = ({B}, 2) or "
                         f"(B, Tq, 2) = ({B}, {Tq}, 2) integers, got {list(key_range.shape)} "
                         f"{key_range.dtype}")
    if key_range.dtype != torch.int32:
        key_range = key_range.clamp(0, torch.iinfo(torch.int32).max)
    return key_range.to(device=q.device, dtype=torch.int32).contiguous()


def _query_extents(key_range: Tensor, Tq: int, Tk: int) -> Tensor:
    """The dK/dV kernel's QueryExtent for per-query key ranges (B, Tq, 2) int32: (B,
    cdiv(Tk, 16), 2) int32, for each chunk of 16 keys the query rows [first, end) whose ranges
    can meet it. Exact (binary searches) for batch rows whose starts and ends never decrease
    along the queries (packed documents, padding); all of [0, Tq) for the other rows, which
    the kernel then scans block by block. On the device, no host sync."""
    B = key_range.shape[0]
    ends = key_range[..., 1].clamp(0, Tk)
    starts = torch.minimum(key_range[..., 0].clamp(0, Tk), ends)
    sorted_rows = ((starts[:, 1:] >= starts[:, :-1]).all(dim=1)
                   & (ends[:, 1:] >= ends[:, :-1]).all(dim=1))  # (B,)
    chunk_start = torch.arange(0, Tk, 16, device=key_range.device, dtype=torch.int32)
    chunk_start = chunk_start.expand(B, -1).contiguous()
    chunk_end = (chunk_start + 16).clamp(max=Tk)
    # First row whose range ends past the chunk's start; first row whose range starts at or
    # past the chunk's end.
    first = torch.searchsorted(ends.contiguous(), chunk_start, right=True)
    end = torch.searchsorted(starts.contiguous(), chunk_end, right=False)
    first = torch.where(sorted_rows[:, None], first, 0)
    end = torch.where(sorted_rows[:, None], end, Tq)
    return torch.stack([first, end], dim=2).to(torch.int32).contiguous()


# ---- decoding: query heads packed into rows, keys split over programs -------------------------
# The policy of csrc/cuda/attention_fwd.cu (attention_fwd_plan), so both backends run a decoding
# step alike: a split keeps at least MIN_KEYS_PER_SPLIT keys, at most MAX_KEY_SPLITS splits, and
# splits fill up to two programs per SM.
MIN_KEYS_PER_SPLIT = 128
MAX_KEY_SPLITS = 64
INTERPRETER_SM_COUNT = 132  # under TRITON_INTERPRET=1 (no GPU): as on an H100 SXM


def decode_plan_enabled() -> bool:
    """False under FUSEDLM_ATTENTION_DECODE=0: no packing, no split (to time the plain kernels
    on the same build; the CUDA launcher reads the same variable)."""
    return environment("FUSEDLM_ATTENTION_DECODE", "1").strip() != "0"


def _packs_query_heads(Hq: int, Hkv: int, Tq: int, Tk: int, causal: bool, causal_offset: int,
                       window_offset: int | None) -> bool:
    """Whether a GQA group's query heads become the rows of one kv head's query block: one query
    row, and every packed row sees what it saw (causal hiding nothing: bottom-right, the row
    sees every key; no window that hides keys; a key range per batch row, or per query, which
    for one row is the same array). Dropout packs too: with one query row, packed row r of kv
    head hk is query head hk * group + r, so the packed launch's dropout counters are the true
    ones (see attention_fwd_kernel)."""
    return (decode_plan_enabled() and Tq == 1 and Hq != Hkv
            and (not causal or causal_offset >= Tk - 1)
            and (window_offset is None or window_offset <= 0))


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if triton_interpreted():
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _key_splits(device: torch.device, B: int, Hq: int, Tq: int, Tk: int, causal: bool,
                causal_offset: int, window_offset: int | None) -> int:
    """Programs sharing each query block's keys (1: none): where the B * Hq blocks of at most 64
    rows leave SMs idle and there are keys to share. (Unlike the CUDA kernels, per-query key
    ranges split too: each program cuts every row's range to its share.)"""
    if Tq > 64 or not decode_plan_enabled():
        return 1
    sms = _sm_count(device.index)
    blocks = B * Hq
    if blocks >= sms:
        return 1
    span = Tk
    if window_offset is not None:  # what the window leaves of the keys (cf. visible_key_span)
        first = max(window_offset, 0)
        last = min(Tq - 1 + causal_offset if causal else Tk - 1, Tk - 1)
        span = max(last - first + 1, 1)
    splits = min(2 * sms // blocks, span // MIN_KEYS_PER_SPLIT, MAX_KEY_SPLITS)
    return max(splits, 1)


def _combine_splits(part_out: Tensor, part_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """out (B, H, T, D) and lse (B, H, T) from the splits' partial outputs (S, B, H, T, D) and
    logsumexps (S, B, H, T), float32: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse)
    out_s, rounded to out's dtype once. Rows no split saw a key for: 0 and -inf."""
    torch.logsumexp(part_lse, dim=0, out=lse)
    weights = torch.exp(part_lse - lse.masked_fill(lse == float("-inf"), 0.0))  # -inf parts: 0
    out.copy_(torch.einsum("sbht,sbhtd->bhtd", weights, part_out))


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
    window_offset: int | None = None, key_range: Tensor | None = None, softcap: float = 0.0,
    dropout_p: float = 0.0, dropout_seed: int | Tensor = 0,
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), any strides; key_range (B, 2) or (B, Tq, 2)
    integers, or None. softcap > 0 caps each score s = scale * q.k at softcap * tanh(s /
    softcap) before the masks and the softmax (Gemma 2's attn_logit_softcapping); 0: none.
    dropout_p in [0, 1) drops probabilities after the softmax (the elements
    fusedlm.reference.attention_dropout_keep(..., dropout_p, dropout_seed) does not keep) and
    scales the others by 1 / (1 - dropout_p); lse is that of the undropped softmax.
    Returns out (B, Hq, Tq, D) contiguous in q's dtype and lse (B, Hq, Tq) float32 (natural
    log; -inf for rows that see no key, whose out is 0).
    Decoding steps (few query rows, many keys) take the plan of csrc/cuda/attention_fwd.cu:
    one query row packs its GQA group's heads into rows, and the keys of each query block split
    over several programs whose partial results are combined (_combine_splits)."""
    softcap = _check_softcap(softcap)
    dropout_p, dropout_seed = _check_dropout(dropout_p, dropout_seed, q)
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch; the reference's empty results
        return reference.attention_fwd(q, k, v, scale, causal, causal_offset, window_offset,
                                       key_range, softcap=softcap, dropout_p=dropout_p,
                                       dropout_seed=dropout_seed)
    _check(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    key_range = None if key_range is None else _key_range_argument(key_range, q, lse)
    kernel_out, kernel_lse = out, lse
    if _packs_query_heads(Hq, Hkv, Tq, Tk, causal, causal_offset, window_offset):
        # (With dropout too: for Tq = 1 the packed view's rows b * Hkv * group + hk * group + r
        # are the true b * Hq + h, so the kernel's dropout counters are the true ones.)
        group = Hq // Hkv  # query head h = kv head * group + row: rows read through q's head stride
        q = q.as_strided((B, Hkv, group, D), (q.stride(0), q.stride(1) * group, q.stride(1),
                                              q.stride(3)))
        kernel_out, kernel_lse = out.view(B, Hkv, group, D), lse.view(B, Hkv, group)
        causal, window_offset, Hq, Tq = False, None, Hkv, group
        if key_range is not None:
            key_range = key_range.view(B, 2)
    splits = _key_splits(q.device, B, Hq, Tq, Tk, causal, causal_offset, window_offset)
    constexprs = _common_constexprs(q, causal, window_offset, key_range, softcap, dropout_p)
    constexprs["SPLIT_KEYS"] = splits > 1
    if splits > 1:
        part_out = torch.empty((splits, B, Hq, Tq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, B, Hq, Tq), dtype=torch.float32, device=q.device)
        target, split_strides = (part_out, part_lse), (part_out.stride(0), part_lse.stride(0))
    else:
        target, split_strides = (kernel_out, kernel_lse), (0, 0)
    offsets = _clamped_offsets(causal_offset, window_offset, Tq, Tk)
    args = (
        q, k, v, *target, key_range if key_range is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *target[0].stride()[-4:],
        Hq, Hq // Hkv, Tq, Tk, D, *offsets, float(scale) * LOG2E, softcap,
        *_dropout_args(dropout_p, dropout_seed, lse), splits,
        *split_strides,
        _seq_bucket(Tq, Tk),
    )
    grid_size = lambda bm, bn: splits * triton.cdiv(Tq, bm) * B * Hq  # noqa: E731
    _launch("fwd", grid_size, args, constexprs, q, _seq_bucket(Tq, Tk))
    if splits > 1:
        _combine_splits(part_out, part_lse, kernel_out, kernel_lse)
    return out, lse


def attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    scale: float, causal: bool, causal_offset: int, window_offset: int | None = None,
    key_range: Tensor | None = None, grad_lse: Tensor | None = None, softcap: float = 0.0,
    dropout_p: float = 0.0, dropout_seed: int | Tensor = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_fwd's out (and, given grad_lse (B, Hq, Tq), of its lse): dq, dk,
    dv (contiguous) in the shapes and dtypes of q, k, v; dk, dv summed over the query heads
    sharing a kv head. out and lse are attention_fwd's, with the same softcap (the scores'
    gradient then carries the cap's factor 1 - tanh^2) and the same dropout_p and dropout_seed
    (the kernels regenerate its mask M: dv = (P M / (1 - p))^T dO, dP = (dO v^T) M / (1 - p))."""
    softcap = _check_softcap(softcap)
    dropout_p, dropout_seed = _check_dropout(dropout_p, dropout_seed, q)
    if q.numel() == 0 or k.numel() == 0:
        return reference.attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset,
                                       window_offset, key_range, grad_lse, softcap=softcap,
                                       dropout_p=dropout_p, dropout_seed=dropout_seed)
    _check(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    lse = lse.to(torch.float32).contiguous()  # ours already is: no copy
    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Tk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Tk, D), dtype=v.dtype, device=q.device)
    constexprs = _common_constexprs(q, causal, window_offset, key_range, softcap, dropout_p)
    offsets = _clamped_offsets(causal_offset, window_offset, Tq, Tk)
    key_range_arg = _key_range_argument(key_range, q, lse)
    block_d, even_d = constexprs["BLOCK_D"], constexprs["EVEN_D"]
    bucket = _seq_bucket(Tq, Tk)
    qk_scale = float(scale) * LOG2E
    dropout = _dropout_args(dropout_p, dropout_seed, lse)

    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    pre_args = (out, grad_out, delta if grad_lse is None else grad_lse, delta,
                *out.stride(), *grad_out.stride(), Hq, Tq, D)
    pre_constexprs = {"BLOCK_D": block_d, "EVEN_D": even_d, "HAS_GRAD_LSE": grad_lse is not None}
    if triton_interpreted():
        _interpreter_ready(attention_bwd_preprocess_kernel)
        block_m = INTERPRETER_CONFIGS["bwd_preprocess"]["BLOCK_M"]
        attention_bwd_preprocess_kernel[(triton.cdiv(Tq, block_m) * B * Hq,)](
            *pre_args, **pre_constexprs, BLOCK_M=block_m, **LAUNCH_OPTIONS
        )
    else:
        block_m = _PREPROCESS_BLOCK_M
        with torch.cuda.device(q.device):
            attention_bwd_preprocess_kernel[(triton.cdiv(Tq, block_m) * B * Hq,)](
                *pre_args, **pre_constexprs, BLOCK_M=block_m,
                num_warps=4 if block_d <= 64 else 8, **LAUNCH_OPTIONS,
            )

    extent_arg = lse if key_range is None or key_range.dim() != 3 else _query_extents(
        key_range_arg, Tq, Tk)
    dkdv_args = (
        q, k, v, grad_out, lse, delta, dk, dv, key_range_arg, extent_arg,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        Hkv, group, Tq, Tk, D, *offsets, float(scale), qk_scale, softcap, *dropout, bucket,
    )
    grid_size = lambda bm, bn: triton.cdiv(Tk, bn) * B * Hkv  # noqa: E731
    _launch("bwd_dkdv", grid_size, dkdv_args, constexprs, q, bucket)
    dq_args = (
        q, k, v, grad_out, lse, delta, dq, key_range_arg,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        Hq, group, Tq, Tk, D, *offsets, float(scale), qk_scale, softcap, *dropout, bucket,
    )
    grid_size = lambda bm, bn: triton.cdiv(Tq, bm) * B * Hq  # noqa: E731
    _launch("bwd_dq", grid_size, dq_args, constexprs, q, bucket)
    return dq, dk, dv


__all__ = [
    "attention_bwd",
    "attention_bwd_dkdv_kernel",
    "attention_bwd_dq_kernel",
    "attention_bwd_preprocess_kernel",
    "attention_fwd",
    "attention_fwd_kernel",
]
