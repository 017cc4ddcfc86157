"""The emulated Hopper primitives (sm90_emulation.h: TMA, mbarriers, wgmma) against plain torch
math, through the small kernels of sm90_primitives_emulated.cpp, independently of any attention
kernel.

Why: the sm_90a attention forward is only as trustworthy as the emulation it runs on in CI; each
primitive here is checked from its PTX ISA definition (the 128-byte swizzle TMA writes, the
descriptor layouts wgmma reads, the accumulator fragments, mbarrier phases), under every schedule
and with copies/MMAs completing early (at issue) and late (at the wait), and the misuses the
emulation must fault on are provoked one by one.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

LOCKSTEP, WARPS_FORWARD, WARPS_BACKWARD = 0, 1, 2  # emu::Schedule
SCHEDULES = [LOCKSTEP, WARPS_FORWARD, WARPS_BACKWARD]
DTYPES = {torch.float16: 0, torch.bfloat16: 1}
CUDA_ERROR_INVALID_VALUE = 1


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _layout(x: torch.Tensor):
    """(dims, strides) of a (B, H, T, D) 16-bit tensor as encode_tile_map takes them."""
    B, H, T, D = x.shape
    dims = (ctypes.c_uint64 * 4)(D, T, H, B)
    strides = (ctypes.c_uint64 * 3)(*(2 * x.stride(i) for i in (2, 1, 0)))
    return dims, strides


def _ints(*values):
    return (ctypes.c_int * len(values))(*values)


def _fault(lib) -> str:
    return lib.sm90_fault().decode()


def _box(x: torch.Tensor, c0: int, c1: int, c2: int, c3: int, rows: int) -> torch.Tensor:
    """The (rows, 64) box of x (B, H, T, D) at coordinates (D, T, H, B) = (c0, c1, c2, c3),
    zeros out of bounds."""
    B, H, T, D = x.shape
    out = torch.zeros(rows, 64, dtype=x.dtype)
    if not (0 <= c2 < H and 0 <= c3 < B):
        return out
    t = torch.arange(rows) + c1
    d = torch.arange(64) + c0
    inside = ((t >= 0) & (t < T))[:, None] & ((d >= 0) & (d < D))[None, :]
    values = x[c3, c2][t.clamp(0, T - 1)][:, d.clamp(0, D - 1)]
    return torch.where(inside, values, out)


def _unswizzle(raw: torch.Tensor, tile_offset: int, rows: int) -> torch.Tensor:
    """The (rows, 64) 16-bit elements of a tile whose logical byte r*128 + c*2 sits at the
    swizzled shared address a ^ (((a >> 7) & 7) << 4), a = tile_offset + logical."""
    a = tile_offset + 2 * torch.arange(rows * 64)
    physical = a ^ (((a >> 7) & 7) << 4)
    return raw.view(torch.int16)[(physical - tile_offset) // 2].view(rows, 64)


# ---- (a) TMA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("tile_offset", [1024, 5120])
@pytest.mark.parametrize(
    "coords,rows",
    [((0, 0, 1, 0), 64), ((64, 80, 2, 1), 64), ((-16, -10, 0, 1), 24), ((32, 3, 3, 0), 8),
     ((0, 40, 1, 1), 256)],
)
def test_tma_box_swizzled_with_zero_fill(sm90_library, late, tile_offset, coords, rows):
    lib = sm90_library
    lib.sm90_configure(int(late), WARPS_FORWARD)
    x = torch.randn(2, 3, 100, 96).to(torch.float16)
    dims, strides = _layout(x)
    raw = torch.full((rows * 128,), 0xAB, dtype=torch.uint8)
    status = lib.sm90_tma_box(0, _ptr(x), dims, strides, rows, _ints(*coords), tile_offset,
                              _ptr(raw))
    assert status == 0, _fault(lib)
    expected = _box(x, *coords, rows)
    got = _unswizzle(raw, tile_offset, rows)
    assert torch.equal(got, expected.view(torch.int16))


def test_tma_box_of_a_strided_view(sm90_library):
    """Memory (B, T, H, D), viewed as (B, H, T, D): the map's strides, not contiguity, count."""
    lib = sm90_library
    lib.sm90_configure(1, LOCKSTEP)
    x = torch.randn(2, 70, 3, 64).to(torch.bfloat16).transpose(1, 2)
    dims, strides = _layout(x)
    raw = torch.zeros(64 * 128, dtype=torch.uint8)
    coords = (0, 20, 2, 1)
    assert lib.sm90_tma_box(1, _ptr(x), dims, strides, 64, _ints(*coords), 1024, _ptr(raw)) == 0
    assert torch.equal(_unswizzle(raw, 1024, 64), _box(x, *coords, 64).view(torch.int16))


def test_encode_tile_map_validates_like_the_driver(sm90_library):
    lib = sm90_library
    x = torch.zeros(4096, dtype=torch.float16)
    good = dict(dtype=0, base=x.data_ptr(), dims=(64, 16, 2, 2),
                strides=(128, 2048, 4096), box_rows=64, map_misalign=0)

    def encode(**change):
        a = {**good, **change}
        return lib.sm90_encode(a["dtype"], ctypes.c_void_p(a["base"]),
                               (ctypes.c_uint64 * 4)(*a["dims"]),
                               (ctypes.c_uint64 * 3)(*a["strides"]), a["box_rows"],
                               a["map_misalign"])

    assert encode() == 0
    assert encode(box_rows=256) == 0 and encode(box_rows=1) == 0
    assert encode(dims=(64, 16, 2, 2**32)) == 0
    for bad in [dict(base=x.data_ptr() + 8), dict(strides=(136, 2048, 4096)),
                dict(strides=(128, 2**40, 4096)), dict(dims=(64, 0, 2, 2)),
                dict(dims=(64, 16, 2**32 + 1, 2)), dict(box_rows=0), dict(box_rows=257),
                dict(dtype=2), dict(map_misalign=32)]:
        assert encode(**bad) == CUDA_ERROR_INVALID_VALUE, bad


# ---- (b) SS wgmma ------------------------------------------------------------------------------

def _ss(lib, dtype, N, trans_a, trans_b, K, a, b, a_coords, b_coords):
    """D (64 x N) = A (64 x K) B (K x N) by sm90_ss from the tiles of a and b at (t, h, b)
    a_coords / b_coords, laid out as ss_kernel says; returns (status, D, expected)."""
    a_dims, a_strides = _layout(a)
    b_dims, b_strides = _layout(b)
    out = torch.full((64, N), float("nan"))
    status = lib.sm90_ss(DTYPES[dtype], N, int(trans_a), int(trans_b), K, _ptr(a), a_dims,
                         a_strides, _ptr(b), b_dims, b_strides, _ints(*a_coords),
                         _ints(*b_coords), _ptr(out))
    if trans_a:  # K rows of the 64 M elements
        a_tile = _box(a, 0, *a_coords, K).T
    else:  # 64 rows of K
        a_tile = torch.cat([_box(a, c, *a_coords, 64) for c in range(0, K, 64)], dim=1)
    if trans_b:  # K rows of N elements, in 64-column slabs
        b_tile = torch.cat([_box(b, c, *b_coords, K) for c in range(0, N, 64)], dim=1)
    else:  # N rows of K
        b_tile = torch.cat([_box(b, c, *b_coords, N) for c in range(0, K, 64)], dim=1).T
    return status, out, a_tile.double() @ b_tile.double()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("N", [64, 128])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_ss_matches_q_k_transposed(sm90_library, dtype, D, N, late, schedule):
    """K-major A and B (kTransA = kTransB = 0): S = Q K^T, Q and K both rows of D."""
    lib = sm90_library
    lib.sm90_configure(int(late), schedule)
    q = torch.randn(1, 2, 70, D).to(dtype)
    k = torch.randn(2, 2, 150, D).to(dtype)
    status, out, expected = _ss(lib, dtype, N, False, False, D, q, k, (10, 1, 0), (40, 0, 1))
    assert status == 0, _fault(lib)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("trans_a,trans_b", [(1, 1), (1, 0), (0, 1)])
@pytest.mark.parametrize("N", [64, 128])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_ss_mn_major_operands(sm90_library, dtype, K, N, trans_a, trans_b, late,
                                    schedule):
    """MN-major ("transposed") operands: an MN-major A is K rows of 64 M-contiguous elements
    (dS stored (keys, queries) as the A of dQ = dS K), an MN-major B K rows of N contiguous
    elements in 64-column slabs LBO apart (K as the B of dQ); K-major ones as above."""
    lib = sm90_library
    lib.sm90_configure(int(late), schedule)
    a = torch.randn(1, 2, 150, 64 if trans_a else K).to(dtype)
    b = torch.randn(2, 2, 150, N if trans_b else K).to(dtype)
    status, out, expected = _ss(lib, dtype, N, trans_a, trans_b, K, a, b, (100, 1, 0),
                                (30, 0, 1))
    assert status == 0, _fault(lib)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


# ---- (c) RS wgmma ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("N", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_rs_matches_p_v(sm90_library, dtype, N, late, schedule):
    lib = sm90_library
    lib.sm90_configure(int(late), schedule)
    p = torch.rand(64, 64).to(dtype)
    v = torch.randn(1, 3, 90, N).to(dtype)
    v_dims, v_strides = _layout(v)
    partial = torch.full((64, N), float("nan"))
    out = torch.full((64, N), float("nan"))
    status = lib.sm90_rs(DTYPES[dtype], N, _ptr(p), _ptr(v), v_dims, v_strides,
                         _ints(30, 2, 0), _ptr(partial), _ptr(out))
    assert status == 0, _fault(lib)
    v_tile = torch.cat([_box(v, c, 30, 2, 0, 64) for c in range(0, N, 64)], dim=1).double()
    expected = p.double() @ v_tile
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    # After warpgroup_wait<1> the second commit group is still in flight: late, its MMAs have
    # not happened yet; early, they happened at issue.
    first_half = p.double()[:, :32] @ v_tile[:32]
    torch.testing.assert_close(partial.double(), first_half if late else expected,
                               rtol=1e-5, atol=1e-4)


# ---- (d) an mbarrier pipeline ------------------------------------------------------------------

def _pipeline(lib, late, schedule, release_early, dtype=torch.float16, tiles=5):
    lib.sm90_configure(int(late), schedule)
    q = torch.randn(1, 2, 64, 64).to(dtype)
    k = torch.randn(1, 2, 600, 64).to(dtype)
    q_dims, q_strides = _layout(q)
    k_dims, k_strides = _layout(k)
    out = torch.full((64, 128), float("nan"))
    status = lib.sm90_pipeline(DTYPES[dtype], _ptr(q), q_dims, q_strides, _ptr(k), k_dims,
                               k_strides, _ints(0, 1, 0), tiles, int(release_early), _ptr(out))
    k_sum = sum(_box(k, 0, 128 * j, 1, 0, 128).double() for j in range(tiles))
    return status, out, q[0, 1].double() @ k_sum.T


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mbarrier_pipeline_two_stages(sm90_library, dtype, late, schedule):
    status, out, expected = _pipeline(sm90_library, late, schedule, False, dtype)
    assert status == 0, _fault(sm90_library)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


def test_pipeline_releasing_a_stage_before_its_wgmma_retires_faults(sm90_library):
    """A consumer arriving on the 'empty' barrier before warpgroup_wait lets TMA refill a buffer
    an in-flight wgmma still reads: some schedule must catch it, none may give wrong numbers."""
    faults = []
    for late, schedule in itertools.product([False, True], SCHEDULES):
        status, out, expected = _pipeline(sm90_library, late, schedule, True)
        if status != 0:
            faults.append(_fault(sm90_library))
        else:
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)
    assert faults, "the racecheck missed a buffer refilled under an in-flight wgmma"
    for fault in faults:
        assert "racecheck: TMA overwrites shared memory an in-flight wgmma reads" in fault


# ---- (e) faults --------------------------------------------------------------------------------

SCENARIOS = {
    0: "racecheck: wgmma reads shared memory whose TMA copy has not completed",
    1: "deadlock: no thread can run; 128 thread(s) wait on the mbarrier at shared offset 0",
    2: "TMA destination outside the dynamic shared memory or not 1024-byte aligned",
    3: "mbarrier used before mbarrier_init",
    4: "mbarrier: more arrivals than expected in a phase",
    5: "mbarrier: tx count went negative",
    6: "a thread exited with wgmma operations its warpgroup never waited for",
    7: "wgmma without a warpgroup_fence",
    8: "a block exited with a TMA copy whose mbarrier phase no thread waited for",
    10: "racecheck: wgmma reads shared memory whose TMA copy has not completed",
    11: "deadlock: no thread can run; 64 thread(s) wait at a collective of warpgroup 0 "
        "(64 of its threads exited)",
    13: "an RS wgmma's A registers changed before the warpgroup_wait that retires it",
    14: "wgmma reads shared memory that threads stored to (store_shared_for_async) without a "
        "fence.proxy.async",
    16: "a thread wrote the accumulators of a wgmma in flight",
    17: "racecheck: store_shared_for_async overwrites shared memory an in-flight wgmma reads",
    18: "racecheck: wgmma reads shared memory that threads stored to (store_shared_for_async) "
        "with no barrier between their fence.proxy.async and every thread",
    19: "racecheck: wgmma reads shared memory that threads stored to (store_shared_for_async) "
        "with no barrier between their fence.proxy.async and every thread",
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("which", sorted(SCENARIOS))
def test_misuse_faults(sm90_library, which, late, schedule):
    lib = sm90_library
    lib.sm90_configure(int(late), schedule)
    tensor = torch.randn(128, 64).to(torch.float16)
    flag = ctypes.c_int(0)
    assert lib.sm90_scenario(which, _ptr(tensor), ctypes.byref(flag)) == 1
    assert SCENARIOS[which] in _fault(lib)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("which", [9, 12, 15])
def test_correct_uses_do_not_fault(sm90_library, which, late, schedule):
    """9: waiting for parity 1 of a fresh barrier returns at once (phase 0 is in progress, so
    the phase with parity 1 counts as completed); 12: a tile read after its wait; 15: threads'
    stores read by a wgmma after a fence.proxy.async and a barrier."""
    lib = sm90_library
    lib.sm90_configure(int(late), schedule)
    tensor = torch.randn(128, 64).to(torch.float16)
    flag = ctypes.c_int(0)
    assert lib.sm90_scenario(which, _ptr(tensor), ctypes.byref(flag)) == 0, _fault(lib)
    assert flag.value == 1


# ---- (f) named barriers ------------------------------------------------------------------------

def _named_barriers(lib, late, schedule, mode, rounds=4):
    lib.sm90_configure(int(late), schedule)
    state = torch.zeros(4 + 2 * rounds + 2, dtype=torch.int32)
    status = lib.sm90_named_barriers(rounds, mode, _ptr(state))
    return status, state


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_named_barriers_ping_pong_two_warpgroups(sm90_library, schedule):
    """bar.sync of one warpgroup completes with bar.arrive of the other: the turns alternate,
    each warpgroup seeing all of the other's previous turn."""
    lib = sm90_library
    rounds = 4
    status, state = _named_barriers(lib, True, schedule, 0, rounds)
    assert status == 0, _fault(lib)
    assert state[2].item() == 0, "a turn began before the other warpgroup's previous one ended"
    assert state[0].item() == state[1].item() == 128 * rounds
    assert state[3].item() == 2 * rounds
    assert state[4:4 + 2 * rounds].tolist() == [0, 1] * rounds
    # fence_view_async_shared is only counted (generic -> async proxy ordering is not checked).
    lib.sm90_async_fences.restype = ctypes.c_longlong
    assert lib.sm90_async_fences(0) == lib.sm90_async_fences(1) == 128 * rounds


NAMED_BARRIER_MISUSES = {
    1: "deadlock: no thread can run; 128 thread(s) wait at named barrier 1 (128 of 256 arrived);",
    2: "a block exited with arrivals at named barrier 1 that never completed",
    3: "named barrier used with two thread counts",
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mode", sorted(NAMED_BARRIER_MISUSES))
def test_named_barrier_misuses_fault(sm90_library, mode, schedule):
    """1: the first arrive missing (both warpgroups wait forever); 2: one arrive too many (its
    arrivals dangle at exit); 3: one barrier used with two thread counts."""
    lib = sm90_library
    status, _ = _named_barriers(lib, False, schedule, mode)
    assert status == 1
    assert NAMED_BARRIER_MISUSES[mode] in _fault(lib)
