"""The CUDA attention kernels of csrc/cuda (sm_80 path: mma.sync, ldmatrix, cp.async; the
Hopper forward: TMA, mbarriers, wgmma, named barriers), run unchanged on the CPU by the
warp-level emulation of warp_emulation.h and sm90_emulation.h, against the float64 truth by the
rule of tests/helpers.py.

Why: CI has no GPU, and these kernels' correctness hangs on fragment layouts, shared-memory
address formulas and a cp.async double-buffering protocol that only run on a GPU otherwise. The
emulation implements each PTX instruction from its ISA definition, so a wrong formula gives a
wrong answer here. Every tensor sits inside a NaN-filled guard buffer: a read outside a tensor
poisons the result, a write outside it shows in the guard. A racecheck on the cp.async/ldmatrix
traffic faults a tile read before its wait or without a barrier after it, and a tile refilled
while another warp may still read it, whatever the schedule. Copies land late (at cp.async's wait)
or early (at issue): the first catches a tile read before its wait, the second a tile
overwritten while still being read. What the emulation cannot show: timing, performance,
bank conflicts, and inter-block races (blocks run one after another).
"""

from __future__ import annotations

import ctypes
import math
import os
import zlib

import pytest
import torch

from fusedlm import reference
from tests.helpers import assert_close_rule, larger_error, naive_attention

from .conftest import (
    GUARD,
    H100_SHARED_BYTES,
    SM86_SHARED_BYTES,
)
from .conftest import check_guard as _check_guard
from .conftest import guarded_output as _output


def _guarded(values: torch.Tensor, layout: str = "contiguous") -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): ``values`` copied into a NaN-filled buffer, 16-byte aligned, as a
    (B, H, T, D) view in ``layout``: "contiguous", "bthd" (memory (B, T, H, D), the layout of
    a transposed projection) or "cache" (the first T positions of a (B, H, T + 40, D) buffer,
    as GPT's KV cache hands attention; the NaN positions past T must stay unread)."""
    B, H, T, D = values.shape
    capacity = T + 40 if layout == "cache" else T
    buffer = torch.full((B * H * capacity * D + 2 * GUARD,), float("nan"), dtype=values.dtype)
    assert buffer.data_ptr() % 16 == 0
    if layout == "contiguous":
        strides = (H * T * D, T * D, D, 1)
    elif layout == "cache":
        strides = (H * capacity * D, capacity * D, D, 1)
    else:
        strides = (T * H * D, D, H * D, 1)
    view = buffer.as_strided(values.shape, strides, GUARD)
    view.copy_(values)
    return view, buffer


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*[0 if t.shape[i] == 1 else t.stride(i) for i in range(3)])


def _shape_arg(B, Hq, Hkv, Tq, Tk, D, causal, offset, window_offset=None, per_query=False):
    windowed = window_offset is not None
    return (ctypes.c_int64 * 11)(B, Hq, Hkv, Tq, Tk, D, int(causal), offset, int(windowed),
                                 window_offset if windowed else 0, int(per_query))


LOCKSTEP, WARPS_FORWARD, WARPS_BACKWARD, WARPGROUPS_FORWARD, WARPGROUPS_BACKWARD = range(5)
CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported


def _key_range_arg(key_range):
    """(B, 2) int32 [start, end) per batch row, or (B, Tq, 2) per query, as the kernels take it
    (a pointer), or None.
    The tensor must outlive the call: the caller keeps ``key_range``."""
    if key_range is None:
        return None
    assert key_range.dtype == torch.int32 and key_range.is_contiguous()
    return ctypes.cast(_ptr(key_range), ctypes.POINTER(ctypes.c_int32))


def _run(lib, q, k, v, grad_out, causal, offset, late, deterministic, schedule=WARPS_FORWARD,
         shared_bytes=H100_SHARED_BYTES, hopper=False, window_offset=None, key_range=None,
         backward=True, grad_lse=None, softcap=0.0, dropout_p=0.0, dropout_seed=0):
    """Forward and backward through the emulated launchers; with ``hopper``, on an emulated
    sm_90 device under FUSEDLM_ATTENTION_SM90=require: the forward on the sm_90a kernel alone
    (no sm_80 fallback), the backward through the launcher, which must take the sm_90a kernel;
    with ``hopper="auto"``, on an emulated sm_90 device through the launchers' own choices.
    ``key_range``: (B, 2) or (B, Tq, 2) int32; ``grad_lse``: (B, Hq, Tq) float32, a gradient
    of lse for the backward; ``softcap``, ``dropout_p``, ``dropout_seed``: the score modifiers.
    Returns out, lse, dq, dk, dv (the gradients None without ``backward``)."""
    lib.emulated_configure(int(late), schedule, shared_bytes)
    lib.emulated_set_score_mods(softcap, dropout_p, dropout_seed)
    try:
        return _run_launchers(lib, q, k, v, grad_out, causal, offset, deterministic, hopper,
                              window_offset, key_range, backward, grad_lse)
    finally:
        lib.emulated_set_score_mods(0.0, 0.0, 0)


def _run_launchers(lib, q, k, v, grad_out, causal, offset, deterministic, hopper, window_offset,
                   key_range, backward, grad_lse):
    lib.emulated_set_compute_capability(90 if hopper else 80)
    # Hopper: the backward must take the sm_90a kernel too (it fails rather than fall back).
    if hopper is True:
        os.environ["FUSEDLM_ATTENTION_SM90"] = "require"
    else:
        os.environ.pop("FUSEDLM_ATTENTION_SM90", None)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dtype_code = 0 if q.dtype == torch.float16 else 1
    scale = 1.0 / math.sqrt(D)
    per_query = key_range is not None and key_range.dim() == 3
    shape = _shape_arg(B, Hq, Hkv, Tq, Tk, D, causal, offset, window_offset, per_query)
    out, out_buffer = _output((B, Hq, Tq, D), q.dtype)
    lse, lse_buffer = _output((B, Hq, Tq), torch.float32)
    status = lib.emulated_attention_fwd(
        shape, ctypes.c_double(scale), dtype_code, int(hopper is True), _ptr(q), _strides(q),
        _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out),
        ctypes.cast(_ptr(lse), ctypes.POINTER(ctypes.c_float)), _key_range_arg(key_range))
    assert status == 0, f"attention_fwd: cudaError {status}: {lib.emulated_fault().decode()}"
    _check_guard(out_buffer, out.numel(), "out")
    _check_guard(lse_buffer, lse.numel(), "lse")
    if not backward:
        return out, lse, None, None, None
    grads = [_output(t.shape, t.dtype) for t in (q, k, v)]
    status = lib.emulated_attention_bwd(
        shape, ctypes.c_double(scale), dtype_code, int(deterministic), _ptr(q),
        _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out), _strides(out),
        _ptr(grad_out), _strides(grad_out), ctypes.cast(_ptr(lse), ctypes.POINTER(ctypes.c_float)),
        *[_ptr(g) for g, _ in grads], _key_range_arg(key_range),
        None if grad_lse is None else ctypes.cast(_ptr(grad_lse), ctypes.POINTER(ctypes.c_float)))
    assert status == 0, f"attention_bwd: cudaError {status}: {lib.emulated_fault().decode()}"
    for name, (g, buffer) in zip(("dq", "dk", "dv"), grads, strict=True):
        _check_guard(buffer, g.numel(), name)
    return out, lse, *[g for g, _ in grads]


def _check(lib, shape, causal, dtype, layout="contiguous", late=True, deterministic=False,
           offset=None, schedule=WARPS_FORWARD, shared_bytes=H100_SHARED_BYTES, hopper=False,
           window_offset=None, key_range=None, backward=True, with_grad_lse=False, softcap=0.0,
           dropout_p=0.0, dropout_seed=0):
    """Forward (and with ``backward`` the backward from the kernel's own out and lse) of seeded
    inputs of ``shape`` = (B, Hq, Hkv, Tq, Tk, D) against the float64 truth by DESIGN.md's rule;
    lse against the float64 logsumexp, -inf exactly where a row sees no key. With
    ``with_grad_lse`` the backward also takes a random gradient of lse. ``softcap`` and
    ``dropout_p`` (with ``dropout_seed``): truth and baseline soft-cap the scores and take
    fusedlm.reference.attention_dropout_keep's mask, the stream every backend shares."""
    B, Hq, Hkv, Tq, Tk, D = shape
    offset = Tk - Tq if offset is None else offset
    # crc32, not hash(): str hashes are salted per process, which drew new inputs every run.
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, causal, dtype)).encode()))
    values = [torch.randn(s, generator=gen, dtype=torch.float64)
              for s in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, Hq, Tq, D))]
    q64, k64, v64, do64 = (t.to(dtype).double() for t in values)  # the values the kernel sees
    q, k, v, grad_out = (_guarded(t.to(dtype), layout)[0] for t in (q64, k64, v64, do64))
    if key_range is not None and not isinstance(key_range, torch.Tensor):
        key_range = torch.tensor(key_range, dtype=torch.int32).reshape(B, 2)
    grad_lse = torch.randn((B, Hq, Tq), generator=gen).contiguous() if with_grad_lse else None
    out, lse, dq, dk, dv = _run(lib, q, k, v, grad_out, causal, offset, late, deterministic,
                                schedule, shared_bytes, hopper, window_offset, key_range,
                                backward, grad_lse, softcap, dropout_p, dropout_seed)

    masks = {"causal": causal, "causal_offset": offset, "window_offset": window_offset,
             "key_range": key_range, "softcap": softcap or None}
    if dropout_p:
        masks["dropout_p"] = dropout_p
        masks["dropout_keep"] = reference.attention_dropout_keep(B, Hq, Tq, Tk, dropout_p,
                                                                 dropout_seed, "cpu")
    leaves64 = [t.clone().requires_grad_(backward) for t in (q64, k64, v64)]
    truth, lse64 = naive_attention(*leaves64, **masks, return_lse=True)
    leaves = [t.to(dtype).requires_grad_(backward) for t in (q64, k64, v64)]
    baseline, lse_baseline = naive_attention(*leaves, **masks, return_lse=True)

    assert_close_rule(out, baseline, truth, name="out")
    scores = (q64 @ k64.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) / math.sqrt(D)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    rows, cols = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    if causal:
        scores = scores.masked_fill(cols > rows + offset, float("-inf"))
    if window_offset is not None:
        scores = scores.masked_fill(cols < rows + window_offset, float("-inf"))
    if key_range is not None:
        per_row = key_range.long() if key_range.dim() == 3 else key_range[:, None].long()
        start, end = (per_row[:, None, :, i, None] for i in (0, 1))  # (B, 1, Tq or 1, 1)
        scores = scores.masked_fill((cols < start) | (cols >= end), float("-inf"))
    lse_truth = torch.logsumexp(scores, dim=-1)
    seen = torch.isfinite(lse_truth)
    assert torch.equal(torch.isfinite(lse), seen), "lse: -inf rows differ"
    assert (lse[~seen] == float("-inf")).all()
    torch.testing.assert_close(lse[seen].double(), lse_truth[seen], rtol=0, atol=2e-3)
    if not backward:
        return
    if grad_lse is None:
        truth_grads = torch.autograd.grad(truth, leaves64, do64)
        baseline_grads = torch.autograd.grad(baseline, leaves, do64.to(dtype))
    else:
        truth_grads = torch.autograd.grad((truth, lse64), leaves64, (do64, grad_lse.double()))
        baseline_grads = torch.autograd.grad((baseline, lse_baseline), leaves,
                                             (do64.to(dtype), grad_lse.to(dtype)))
    if softcap or dropout_p:
        # The baseline is also FlashAttention's formula at the input's dtype from the kernels'
        # out (as tests/test_fuzz.py's): its Delta = rowsum(dO * O) takes O as stored and
        # cancels in peaked rows (capped scores) and in rows whose dq is 0 (one key), with
        # dropout's 1 / (1 - p) amplifying the rounding.
        flash = reference.attention_bwd(
            do64.to(dtype), *(t.to(dtype) for t in (q64, k64, v64)), out, lse, 1 / math.sqrt(D),
            causal, offset, window_offset, key_range, grad_lse, softcap, dropout_p, dropout_seed)
        baseline_grads = [larger_error(g_base, g_flash, g_truth) for g_base, g_flash, g_truth
                          in zip(baseline_grads, flash, truth_grads, strict=True)]
    for name, g, g_base, g_truth in zip(("dq", "dk", "dv"), (dq, dk, dv), baseline_grads,
                                        truth_grads, strict=True):
        assert_close_rule(g, g_base, g_truth, name=name)


# (B, Hq, Hkv, Tq, Tk, D): every head-dim template (32, 64, 96, 128, 192, 256, D padded up to
# it), ragged tiles on both sides, Tq > Tk and Tq < Tk, GQA and MQA, several query/key tiles.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 1, 17, 40, 40),
    (1, 1, 1, 150, 150, 64),
    (1, 2, 2, 70, 33, 72),
    (1, 3, 1, 33, 100, 128),
    (1, 1, 1, 20, 37, 160),
    (1, 1, 1, 40, 70, 256),
]
IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_attention_float16(library, shape, causal):
    _check(library, shape, causal, torch.float16)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_attention_bfloat16(library, shape):
    _check(library, shape, True, torch.bfloat16)


# (copies land at the wait, schedule): late copies catch a tile read before its wait; copies at
# issue with warps drifting apart (either order) catch a buffer refilled while still being read.
TIMINGS = [(True, LOCKSTEP), (True, WARPS_BACKWARD), (False, WARPS_FORWARD),
           (False, WARPS_BACKWARD)]
TIMING_IDS = ["at_wait-lockstep", "at_wait-warps_backward", "at_issue-warps_forward",
              "at_issue-warps_backward"]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("timing", TIMINGS, ids=TIMING_IDS)
def test_copy_timing_and_schedules(library, timing, deterministic):
    """The cp.async/__syncthreads protocol under every copy timing and warp schedule, over
    several key and query tiles, both dQ paths."""
    late, schedule = timing
    _check(library, (1, 2, 1, 150, 130, 64), True, torch.float16, late=late,
           deterministic=deterministic, schedule=schedule)


@pytest.mark.parametrize("hopper", [False, "auto"], ids=["sm80", "sm90"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_gradient_of_lse(library, deterministic, hopper):
    """A gradient of lse (return_lse, attention sinks) lowers the delta kernel's rows by it:
    dq and dk against the truth's, both dQ paths, the launchers' own choice of kernels."""
    _check(library, (2, 4, 2, 70, 90, 64), True, torch.float16, deterministic=deterministic,
           hopper=hopper, with_grad_lse=True)


def test_strided_layout(library):
    """q, k, v, grad_out read in place from (B, T, H, D) memory through their strides."""
    _check(library, (2, 2, 2, 40, 50, 64), True, torch.float16, layout="bthd")


# Sliding windows (key j hidden before i + window_offset) on the sm_80 kernels: the forward and
# dQ kernels start at the window's first key tile (the double buffer's parity counted from
# there), the dK/dV kernel stops at the window's last query tile; the window's edge cuts tiles
# (masked) and leaves rows with no key. (B, Hq, Hkv, Tq, Tk, D, causal, window_offset)
WINDOW_CASES = [
    (1, 2, 1, 300, 300, 64, True, -100),  # Mistral-style: 101 keys, 128-row tiles
    (1, 1, 1, 150, 260, 128, False, 60),  # Tq < Tk, two-sided with the causal limit off
    (1, 2, 2, 260, 150, 32, True, -130),  # Tq > Tk: rows that see no key
    (1, 3, 1, 5, 400, 96, True, 300),  # decoding: 64-row tiles, the window's last 100 keys
    (2, 2, 2, 70, 70, 72, False, -5),  # padded head dim, window only
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("case", WINDOW_CASES,
                         ids=["Tq{}-Tk{}-D{}-{}-w{}".format(*c[3:6], "causal" if c[6] else "full",
                                                            c[7]) for c in WINDOW_CASES])
def test_sliding_window(library, case, deterministic):
    *shape, causal, window_offset = case
    _check(library, tuple(shape), causal, torch.float16, deterministic=deterministic,
           window_offset=window_offset)


@pytest.mark.parametrize("case", [WINDOW_CASES[0], WINDOW_CASES[1], WINDOW_CASES[3]],
                         ids=["mistral-D64", "two-sided-D128", "decode-D96"])
def test_hopper_sliding_window(library, case):
    """The sm_90a kernels (TMA, mbarriers, wgmma emulated): the forward's pipeline starting at the
    window's first key tile, the backward's query tiles stopping at the window's last."""
    *shape, causal, window_offset = case
    _check(library, tuple(shape), causal, torch.float16, hopper=True, window_offset=window_offset)


@pytest.mark.parametrize("timing", TIMINGS, ids=TIMING_IDS)
def test_sliding_window_copy_timing(library, timing):
    """The prefetch protocol when the key loop starts past tile 0 (buffer parity from there)."""
    late, schedule = timing
    _check(library, (1, 2, 1, 300, 300, 64), True, torch.float16, late=late, schedule=schedule,
           window_offset=-90)


# Key ranges (padded batches: key j of batch row b visible only in [start, end)) on the bounded
# kernel instances: the forward and dQ key loops start at the range's first key tile and stop
# at its last, the dK/dV kernel gives tiles outside the range no query tile (zero gradients)
# and masks the tiles the range cuts; rows left with no key. With a sliding window too.
# (B, Hq, Hkv, Tq, Tk, D, causal, window_offset, key_range rows)
KEY_RANGE_CASES = [
    (3, 2, 1, 150, 150, 64, True, None, [[70, 150], [0, 41], [150, 150]]),  # left/right/empty
    (2, 2, 2, 70, 200, 128, False, None, [[65, 130], [-9, 999]]),  # mid-sequence, clamped ends
    (2, 3, 1, 5, 300, 96, True, 240, [[100, 300], [10, 262]]),  # decoding, window + padding
    (2, 1, 1, 90, 90, 40, True, -20, [[30, 31], [89, 2]]),  # one key; inverted (empty)
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("case", KEY_RANGE_CASES,
                         ids=["Tq{}-Tk{}-D{}-{}".format(*c[3:6], "causal" if c[6] else "full")
                              + ("" if c[7] is None else f"-w{c[7]}") for c in KEY_RANGE_CASES])
def test_key_range(library, case, deterministic):
    *shape, causal, window_offset, ranges = case
    _check(library, tuple(shape), causal, torch.float16, deterministic=deterministic,
           window_offset=window_offset, key_range=ranges)


@pytest.mark.parametrize("case", [KEY_RANGE_CASES[0], KEY_RANGE_CASES[2]],
                         ids=["padded-D64", "decode-window-D96"])
def test_hopper_key_range(library, case):
    """The sm_90a forward's pipeline over the key range's tiles only; the sm_90a backward with no
    query tile for a key tile outside the range (zero dK, dV) and masks where it cuts one."""
    *shape, causal, window_offset, ranges = case
    _check(library, tuple(shape), causal, torch.float16, hopper=True,
           window_offset=window_offset, key_range=ranges)


@pytest.mark.parametrize("timing", TIMINGS, ids=TIMING_IDS)
def test_key_range_copy_timing(library, timing):
    """The prefetch protocol when the key loop starts past tile 0 and stops early."""
    late, schedule = timing
    _check(library, (2, 2, 1, 130, 300, 64), True, torch.float16, late=late, schedule=schedule,
           key_range=[[90, 250], [0, 300]])


def document_key_ranges(B, Tq, Tk, lengths_per_row):
    """(B, Tq, 2) int32: packed documents (each query sees its own document's keys, queries and
    keys aligned bottom-right), from each batch row's document lengths over the keys."""
    ranges = torch.zeros(B, Tq, 2, dtype=torch.int32)
    for b, lengths in enumerate(lengths_per_row):
        assert sum(lengths) == Tk
        starts = torch.tensor([0, *lengths]).cumsum(0)
        for i in range(Tq):
            p = i + Tk - Tq  # the query's key position
            d = int(torch.searchsorted(starts, torch.tensor(max(p, 0)), right=True)) - 1
            d = min(d, len(lengths) - 1)
            ranges[b, i] = torch.tensor([starts[d], starts[d + 1]])
    return ranges


def scattered_key_ranges(B, Tq, Tk, seed):
    """(B, Tq, 2) int32 of any values per query: unsorted, empty, inverted and out of range."""
    gen = torch.Generator().manual_seed(seed)
    ranges = torch.randint(-3, Tk + 3, (B, Tq, 2), generator=gen, dtype=torch.int32)
    ranges[:, ::7] = torch.tensor([Tk // 3, Tk // 3])  # empty
    return ranges


# Per-query key ranges (packed documents: key j visible to query i only in [start_i, end_i)) on
# the sm_80 kernels: the forward and dQ kernels bound their key loops by the tile's rows'
# ranges, the dK/dV kernel runs only the query tiles query_extent gives for its key tile, and
# every tile a range cuts is masked per row. Documents end inside tiles and on tile edges (16,
# 32, 64, 128), one-token documents, and scattered ranges that no monotone search would find.
def edge_key_ranges(Tq, Tk):
    """(1, Tq, 2) int32: every query sees keys [0, 64) but two, each the only query to see a
    key tile (64 keys), by one key on its edge: row Tq - 50 sees key 128 (a tile's first), row
    10 key 127 (a tile's last)."""
    ranges = torch.tensor([0, 64], dtype=torch.int32).repeat(1, Tq, 1)
    ranges[0, Tq - 50] = torch.tensor([128, 129])
    ranges[0, 10] = torch.tensor([127, 128])
    return ranges


def tile_edge_key_ranges():
    """(2, 256, 2) int32 over 384 keys whose tile bounds sit one key off the 128-key tile edges
    of the sm_90a forward (and on the 64-key ones of the sm_80 kernels). Batch row 0: query tile
    0's rows all start at key 127 (their first key tile is tile 0, by one key), and one row of
    query tile 1 ends at 255 (key tile 1 needs its mask for that row alone). Batch row 1: one
    row of query tile 0 starts at 129 (key tile 1 masked for it alone) and query tile 1 reaches
    key 256 (tile 2, by one key)."""
    ranges = torch.zeros(2, 256, 2, dtype=torch.int32)
    ranges[0, :128] = torch.tensor([127, 384])
    ranges[0, 128:] = torch.tensor([0, 256])
    ranges[0, 200] = torch.tensor([0, 255])
    ranges[1, :128] = torch.tensor([0, 384])
    ranges[1, 7] = torch.tensor([129, 384])
    ranges[1, 128:] = torch.tensor([0, 257])
    return ranges


# (B, Hq, Hkv, Tq, Tk, D, causal, window_offset, key ranges)
PER_QUERY_CASES = [
    (2, 2, 1, 150, 150, 64, True, None,
     document_key_ranges(2, 150, 150, [[37, 27, 86], [1, 128, 21]])),
    (1, 3, 1, 130, 130, 128, False, None, document_key_ranges(1, 130, 130, [[64, 1, 65]])),
    (1, 2, 2, 300, 300, 32, True, -40, document_key_ranges(1, 300, 300, [[100, 150, 50]])),
    (2, 2, 1, 5, 300, 96, True, None, document_key_ranges(2, 5, 300, [[298, 2], [150, 150]])),
    (2, 3, 1, 70, 200, 128, False, None, scattered_key_ranges(2, 70, 200, 3)),
    (1, 1, 1, 90, 90, 40, True, -20, scattered_key_ranges(1, 90, 90, 4)),
    (1, 2, 1, 200, 200, 64, False, None, edge_key_ranges(200, 200)),
    (2, 1, 1, 256, 384, 64, False, None, tile_edge_key_ranges()),
]
PER_QUERY_IDS = ["documents-causal-D64", "documents-full-D128", "documents-window-D32",
                 "documents-decode-D96", "scattered-full-D128", "scattered-window-D40",
                 "single-key-edges-D64", "tile-bound-edges-D64"]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("case", PER_QUERY_CASES, ids=PER_QUERY_IDS)
def test_per_query_key_range(library, case, deterministic):
    *shape, causal, window_offset, ranges = case
    _check(library, tuple(shape), causal, torch.float16, deterministic=deterministic,
           window_offset=window_offset, key_range=ranges)


def test_per_query_key_range_bfloat16_small_tiles(library):
    """bfloat16, and the 99 KiB device's smaller tiles (other tile edges for the documents)."""
    shape = (1, 2, 1, 150, 150, 128)
    ranges = document_key_ranges(1, 150, 150, [[31, 33, 86]])
    _check(library, shape, True, torch.bfloat16, key_range=ranges,
           shared_bytes=SM86_SHARED_BYTES)


@pytest.mark.parametrize("timing", TIMINGS, ids=TIMING_IDS)
def test_per_query_key_range_copy_timing(library, timing):
    """The prefetch protocol when each query tile's key loop starts and stops at its own
    documents' tiles."""
    late, schedule = timing
    _check(library, (1, 2, 1, 300, 300, 64), True, torch.float16, late=late, schedule=schedule,
           key_range=document_key_ranges(1, 300, 300, [[90, 70, 140]]))


@pytest.mark.parametrize("offset", [-20, 0, 90], ids=["offset-20", "offset0", "offset90"])
def test_causal_offsets(library, offset):
    """Top-left (0), rows that see nothing (negative) and offsets past Tk."""
    _check(library, (1, 1, 1, 70, 60, 32), True, torch.float16, offset=offset)


def test_deterministic_backward_is_bitwise_repeatable(library):
    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (_guarded(torch.randn(s, generator=gen).half())[0]
                   for s in ((1, 2, 80, 64), (1, 1, 90, 64), (1, 1, 90, 64), (1, 2, 80, 64)))
    first = _run(library, q, k, v, do, True, 10, True, True, LOCKSTEP)
    second = _run(library, q, k, v, do, True, 10, False, True, WARPS_BACKWARD)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 70, 90, 128), (1, 1, 1, 40, 50, 160),
                                   (1, 1, 1, 35, 45, 256)], ids=["D128", "D160", "D256"])
def test_small_shared_memory_tiles(library, shape, deterministic):
    """A device with 99 KiB of shared memory per block (sm_86, sm_89) gets the smaller tiles at
    D = 128, 192 and 256; they too must be right (on an H100 they never run)."""
    _check(library, shape, True, torch.float16, deterministic=deterministic,
           shared_bytes=SM86_SHARED_BYTES)


# ---- decoding: query heads packed into rows, keys split over CTAs (attention_fwd_plan) ----------
EMULATED_SMS = 132  # what the emulated device reports (an H100 SXM)


def _plan(lib, shape, causal, offset=None, window_offset=None, key_range=None, sms=EMULATED_SMS):
    """attention_fwd_plan of a call: (the shape the kernels see as a dict, heads packed, key
    splits). ``key_range``: None, "batch" or "query"."""
    B, Hq, Hkv, Tq, Tk, D = shape
    offset = Tk - Tq if offset is None else offset
    plan = (ctypes.c_int64 * 12)()
    lib.emulated_attention_fwd_plan(
        _shape_arg(B, Hq, Hkv, Tq, Tk, D, causal, offset, window_offset, key_range == "query"),
        int(key_range is not None), sms, plan)
    names = ("B", "Hq", "Hkv", "Tq", "Tk", "causal", "causal_offset", "windowed",
             "window_offset", "key_range_per_query")
    return dict(zip(names, plan[:10], strict=True)), bool(plan[10]), plan[11]


def test_decode_plan(library):
    """Which calls pack a GQA group's query heads into rows and how many CTAs share the keys."""
    # Llama-style decoding step: 16 query heads on 2 kv heads, one query row, 4096 cached keys
    # (causal, bottom-right: the row sees every key). Packed: 2 tiles of 8 rows, causal dropped;
    # 2 CTAs fill nothing of 132 SMs: the keys split 32 ways (4096 / 128 keys per split at least).
    shape, packed, splits = _plan(library, (1, 16, 2, 1, 4096, 128), True)
    assert packed and (shape["Hq"], shape["Tq"], shape["causal"]) == (2, 8, 0)
    assert splits == 32
    # The split count: two CTAs per SM at most over the unsplit grid (264 // 12 = 22)...
    assert _plan(library, (1, 12, 12, 1, 8192, 64), True)[2] == 22
    # ...none once the grid fills the SMs, or with too few keys to share (< 2 x 128)...
    assert _plan(library, (11, 12, 12, 1, 8192, 64), True)[2] == 1
    assert _plan(library, (1, 12, 12, 1, 255, 64), True)[2] == 1
    # ...and none past 64 query rows (prefill: 128-row tiles fill the device their own way) or
    # with per-query key ranges on more than one row.
    assert _plan(library, (1, 2, 2, 65, 8192, 64), True)[2] == 1
    assert _plan(library, (1, 2, 2, 2, 8192, 64), True, key_range="query")[2] == 1
    # A sliding window caps the keys to share: row i sees [7000 + i, 7995 + i], 1000 in all.
    assert _plan(library, (1, 2, 2, 5, 8000, 64), True, window_offset=7000)[2] == 7
    # Packing needs every packed row to see what the one row saw: top-left causal (the row sees
    # key 0 only) or a window hiding keys would differ row by row; a key range per batch row is
    # shared, and per-query ranges of one row are the same array.
    assert not _plan(library, (1, 8, 2, 1, 4096, 64), True, offset=0)[1]
    assert not _plan(library, (1, 8, 2, 1, 4096, 64), True, window_offset=100)[1]
    shape, packed, _ = _plan(library, (1, 8, 2, 1, 4096, 64), True, window_offset=-3)
    assert packed and shape["windowed"] == 0
    shape, packed, _ = _plan(library, (1, 8, 2, 1, 4096, 64), False, key_range="query")
    assert packed and shape["key_range_per_query"] == 0
    assert not _plan(library, (1, 8, 8, 1, 4096, 64), True)[1]  # no GQA: nothing to pack
    assert not _plan(library, (1, 8, 2, 2, 4096, 64), True)[1]  # two rows: masks differ per row
    # FUSEDLM_ATTENTION_DECODE=0 turns both off (fusedlm bench's fusedlm-cuda-no-decode-plan).
    os.environ["FUSEDLM_ATTENTION_DECODE"] = "0"
    try:
        shape, packed, splits = _plan(library, (1, 16, 2, 1, 4096, 128), True)
    finally:
        del os.environ["FUSEDLM_ATTENTION_DECODE"]
    assert (shape["Hq"], shape["Tq"], packed, splits) == (16, 1, False, 1)


# (B, Hq, Hkv, Tq, Tk, D, causal, causal offset or None (bottom-right), window_offset, key_range
# rows or "documents", expected (heads packed, key splits) on the emulated 132 SMs)
DECODE_CASES = {
    "gqa-D64": (1, 8, 2, 1, 700, 64, True, None, None, None, (True, 5)),
    "mha-D128": (2, 4, 4, 1, 600, 128, False, None, None, None, (False, 4)),
    "short-prompt-gqa-D96": (1, 3, 1, 40, 520, 96, True, None, None, None, (False, 4)),
    # top-left causal: row i sees keys 0..i, all in the first tile: three splits see no key
    "top-left-empty-splits-D32": (1, 2, 1, 40, 520, 32, True, 0, None, None, (False, 4)),
    "gqa-D256": (1, 2, 1, 1, 300, 256, True, None, None, None, (True, 2)),
    "D160": (1, 1, 1, 5, 400, 160, False, None, None, None, (False, 3)),
    "window-D64": (1, 4, 2, 1, 900, 64, True, None, 300, None, (False, 4)),
    # padding: batch row 1 sees no key at all (every split's lse -inf: out 0, lse -inf)
    "padded-gqa-D64": (2, 4, 2, 1, 650, 64, True, None, None, [[100, 650], [0, 0]], (True, 5)),
    "documents-gqa-D64": (2, 4, 1, 1, 520, 64, True, None, None, "documents", (True, 4)),
}


@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_decode(library, case):
    """Few query rows over many keys, through the launcher: the plan is the one expected (so the
    packed and split paths are the ones checked), and out, lse and the backward from that lse
    match the truth."""
    *shape, causal, offset, window_offset, ranges, expected = case
    B, Hq, Hkv, Tq, Tk, D = shape
    key_range = None
    if ranges == "documents":  # per query: the query's document is its batch row's last keys
        key_range = torch.tensor([[[Tk - 200 - 50 * b, Tk]] for b in range(B)], dtype=torch.int32)
    elif ranges is not None:
        key_range = torch.tensor(ranges, dtype=torch.int32)
    kind = None if key_range is None else ("query" if key_range.dim() == 3 else "batch")
    _, packed, splits = _plan(library, tuple(shape), causal, offset, window_offset, kind)
    assert (packed, splits) == expected
    for dtype in (torch.float16, torch.bfloat16):
        _check(library, tuple(shape), causal, dtype, offset=offset, window_offset=window_offset,
               key_range=key_range)


def test_decode_most_splits(library):
    """The most splits (64), more than a warp's lanes: the combine's lanes each take two
    splits' logsumexps, and 64 shares of 2 key tiles each."""
    assert _plan(library, (1, 1, 1, 1, 8192, 32), False)[1:] == (False, 64)
    _check(library, (1, 1, 1, 1, 8192, 32), False, torch.float16)


@pytest.mark.parametrize("timing", TIMINGS, ids=TIMING_IDS)
def test_decode_copy_timing(library, timing):
    """The split CTAs' prefetch protocol when a share starts past key tile 0."""
    late, schedule = timing
    assert _plan(library, (1, 4, 1, 1, 1000, 64), True)[1:] == (True, 7)
    _check(library, (1, 4, 1, 1, 1000, 64), True, torch.float16, late=late, schedule=schedule)


@pytest.mark.parametrize(("Tk", "setting", "splits"), [(200, None, 1), (200, "require", 1),
                                                      (700, None, 5), (700, "require", 5)],
                         ids=["short-cache", "short-cache-require", "split", "split-require"])
def test_decode_on_hopper(library, Tk, setting, splits):
    """On an sm_90 device the launcher packs the query heads first, so the sm_90a forward reads
    the packed rows too (through TMA, the token stride being q's head stride); a call whose keys
    split takes the sm_80 split kernels unless FUSEDLM_ATTENTION_SM90=require."""
    B, Hq, Hkv, Tq, D = 1, 8, 2, 1, 64
    assert _plan(library, (B, Hq, Hkv, Tq, Tk, D), True)[1:] == (True, splits)
    gen = torch.Generator().manual_seed(Tk)
    q64, k64, v64 = (torch.randn(s, generator=gen, dtype=torch.float64).half().double()
                     for s in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))
    q, k, v = (_guarded(t.half())[0] for t in (q64, k64, v64))
    out, out_buffer = _output((B, Hq, Tq, D), torch.float16)
    lse, lse_buffer = _output((B, Hq, Tq), torch.float32)
    library.emulated_configure(1, WARPS_FORWARD, H100_SHARED_BYTES)
    library.emulated_set_compute_capability(90)
    if setting is None:
        os.environ.pop("FUSEDLM_ATTENTION_SM90", None)
    else:
        os.environ["FUSEDLM_ATTENTION_SM90"] = setting
    try:
        status = library.emulated_attention_fwd(
            _shape_arg(B, Hq, Hkv, Tq, Tk, D, True, Tk - Tq), ctypes.c_double(D ** -0.5), 0, 0,
            _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out),
            ctypes.cast(_ptr(lse), ctypes.POINTER(ctypes.c_float)), None)
    finally:
        os.environ.pop("FUSEDLM_ATTENTION_SM90", None)
        library.emulated_set_compute_capability(80)
    assert status == 0, f"attention_fwd: cudaError {status}: {library.emulated_fault().decode()}"
    _check_guard(out_buffer, out.numel(), "out")
    _check_guard(lse_buffer, lse.numel(), "lse")
    truth = naive_attention(q64, k64, v64, causal=True)
    baseline = naive_attention(q64.half(), k64.half(), v64.half(), causal=True)
    assert_close_rule(out, baseline, truth, name="out")
    scores = (q64 @ k64.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=0, atol=2e-3)


def test_decode_layouts(library):
    """Packed query heads read through q's head stride from (B, T, H, D) memory too, and a
    split step reads a KV cache's filled positions only (views of longer buffers)."""
    assert _plan(library, (2, 6, 2, 1, 800, 64), True)[1:] == (True, 6)
    _check(library, (2, 6, 2, 1, 800, 64), True, torch.float16, layout="bthd")
    _check(library, (2, 6, 2, 1, 800, 64), True, torch.bfloat16, layout="cache")


# ---- the Hopper kernels (attention_fwd_sm90.cu, attention_bwd_sm90.cu: TMA, mbarriers, wgmma) ---
# Forward and backward under FUSEDLM_ATTENTION_SM90=require. (B, Hq, Hkv, Tq, Tk, D): both
# head-dim templates (64, 128; D padded up by TMA's zero fill), ragged query and key tiles, more
# key tiles than ring stages (the producer waits for the consumers to free a buffer), GQA, MQA.
HOPPER_SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 1, 17, 40, 40),
    (1, 1, 1, 150, 300, 64),
    (1, 2, 2, 70, 33, 72),
    (1, 3, 1, 33, 100, 128),
    (1, 1, 1, 200, 520, 128),
]
HOPPER_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in HOPPER_SHAPES]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=HOPPER_IDS)
def test_hopper_forward_float16(library, shape, causal):
    _check(library, shape, causal, torch.float16, hopper=True)


@pytest.mark.parametrize("shape", [HOPPER_SHAPES[1], HOPPER_SHAPES[5]],
                         ids=[HOPPER_IDS[1], HOPPER_IDS[5]])
def test_hopper_forward_bfloat16(library, shape):
    _check(library, shape, True, torch.bfloat16, hopper=True)


# The Hopper kernels' warpgroups also drift apart as whole warpgroups: a consumer reading the
# other consumer's half of dS^T before it is written shows.
HOPPER_TIMINGS = TIMINGS + [(True, WARPGROUPS_FORWARD), (False, WARPGROUPS_BACKWARD),
                            (True, WARPGROUPS_BACKWARD)]
HOPPER_TIMING_IDS = TIMING_IDS + ["at_wait-warpgroups_forward", "at_issue-warpgroups_backward",
                                  "at_wait-warpgroups_backward"]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("timing", HOPPER_TIMINGS, ids=HOPPER_TIMING_IDS)
def test_hopper_copy_timing_and_schedules(library, timing, head_dim):
    """The mbarrier ring under every timing (TMA tiles and wgmma results landing at issue or as
    late as the protocol allows) and warp schedule, over more key tiles than stages."""
    late, schedule = timing
    _check(library, (1, 2, 1, 130, 400, head_dim), True, torch.float16, late=late,
           schedule=schedule, hopper=True)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_deterministic_backward(library, head_dim):
    """dK, dV on the Hopper kernel without dQ, dQ by the atomic-free sm_80 kernel: right, and
    bitwise the same under two timings and schedules."""
    shape = (1, 4, 2, 150, 270, head_dim)
    _check(library, shape, True, torch.float16, deterministic=True, hopper=True)
    gen = torch.Generator().manual_seed(11)
    q, k, v, do = (_guarded(torch.randn(s, generator=gen).half())[0]
                   for s in ((1, 4, 150, head_dim), (1, 2, 270, head_dim), (1, 2, 270, head_dim),
                             (1, 4, 150, head_dim)))
    first = _run(library, q, k, v, do, True, 120, True, True, WARPGROUPS_FORWARD, hopper=True)
    second = _run(library, q, k, v, do, True, 120, False, True, WARPS_BACKWARD, hopper=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", PER_QUERY_CASES, ids=PER_QUERY_IDS)
def test_hopper_per_query_key_range(library, case):
    """Per-query key ranges on the sm_90a kernels. Forward: warp 0 reduces the 128-row tile's
    ranges into its key-tile bounds for producer and consumers, and each row of a tile a range
    cuts is masked by its own range. Backward: each 128-key tile walks the union of its two
    64-key tiles' query extents, every element masked by its query's range."""
    *shape, causal, window_offset, ranges = case
    _check(library, tuple(shape), causal, torch.float16, hopper=True,
           window_offset=window_offset, key_range=ranges)


# (shape..., causal, window_offset), key_range: one case of each bounded kind.
BOUNDED_DETERMINISTIC_CASES = {
    "window-D128": (WINDOW_CASES[1], None),
    "padded-D128": (KEY_RANGE_CASES[1][:-1], KEY_RANGE_CASES[1][-1]),
    "documents-D64": (PER_QUERY_CASES[0][:-1], PER_QUERY_CASES[0][-1]),
}


@pytest.mark.parametrize("case", list(BOUNDED_DETERMINISTIC_CASES.values()),
                         ids=list(BOUNDED_DETERMINISTIC_CASES))
def test_hopper_bounded_deterministic_backward(library, case):
    """The bounded sm_90a backward without dQ (dK, dV; dQ by the sm_80 atomic-free kernel)."""
    (*shape, causal, window_offset), key_range = case
    _check(library, tuple(shape), causal, torch.float16, deterministic=True, hopper=True,
           window_offset=window_offset, key_range=key_range)


@pytest.mark.parametrize("timing", HOPPER_TIMINGS, ids=HOPPER_TIMING_IDS)
def test_hopper_per_query_key_range_copy_timing(library, timing):
    """The mbarrier ring when each query tile's key loop starts and stops at its own documents'
    tiles (more key tiles than stages), under every timing and warp schedule; bfloat16."""
    late, schedule = timing
    ranges = document_key_ranges(1, 260, 520, [[130, 200, 60, 130]])
    _check(library, (1, 2, 1, 260, 520, 64), True, torch.bfloat16, late=late, schedule=schedule,
           hopper=True, key_range=ranges)


def test_hopper_strided_layout(library):
    """q, k, v read through a tensor map over (B, T, H, D) memory."""
    _check(library, (2, 2, 2, 40, 150, 128), True, torch.float16, layout="bthd", hopper=True)


@pytest.mark.parametrize("offset", [-20, 0, 90], ids=["offset-20", "offset0", "offset90"])
def test_hopper_causal_offsets(library, offset):
    """Top-left (0), rows that see nothing (negative: whole CTAs without a key tile) and offsets
    past Tk."""
    _check(library, (1, 1, 1, 70, 160, 64), True, torch.float16, offset=offset, hopper=True)


def test_hopper_is_not_taken_where_it_does_not_apply(library):
    """D > 128 and non-Hopper devices get cudaErrorNotSupported (the launcher then runs the sm_80
    kernel): nothing is launched, nothing written."""
    q = _guarded(torch.randn(1, 1, 16, 160).half())[0]
    out, _ = _output((1, 1, 16, 160), torch.float16)
    lse, _ = _output((1, 1, 16), torch.float32)
    strides = _strides(q)
    for capability, D in ((90, 160), (80, 64)):
        library.emulated_set_compute_capability(capability)
        status = library.emulated_attention_fwd(
            _shape_arg(1, 1, 1, 16, 16, D, False, 0), ctypes.c_double(0.1), 0, 1, _ptr(q), strides,
            _ptr(q), strides, _ptr(q), strides, _ptr(out),
            ctypes.cast(_ptr(lse), ctypes.POINTER(ctypes.c_float)), None)
        assert status == CUDA_ERROR_NOT_SUPPORTED
        assert torch.isnan(out).all() and torch.isnan(lse).all()
    library.emulated_set_compute_capability(80)
