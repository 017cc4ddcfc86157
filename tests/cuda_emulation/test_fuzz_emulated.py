"""Shape fuzzing of the CUDA kernels under the CPU emulation (hypothesis; issue 8's fuzzing for
the backend CI cannot otherwise run): attention over sequence lengths around every tile size the
launchers use (16, 32, 64, 128), head dims 8..256 in steps of 8 (every template and the padded
ones between), GQA/MQA, arbitrary causal offsets, both memory layouts, both dQ paths, both
shared-memory sizes, soft-capping and dropout; the Hopper kernels over lengths around their
tiles and head dims up to 128; LayerNorm/RMSNorm over hidden sizes 1..70000 around every
launch-path boundary, every dtype, with and without weight/bias, aligned or not.

Derandomized with a few examples by default (CI); ``--fuzz-long[=N]`` as for tests/test_fuzz.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import assert_close_rule
from tests.test_fuzz import fuzz  # noqa: F401  (the fixture)

from .conftest import H100_SHARED_BYTES, SM86_SHARED_BYTES, guarded_copy
from .test_attention_emulated import (
    LOCKSTEP,
    WARPGROUPS_BACKWARD,
    WARPGROUPS_FORWARD,
    WARPS_BACKWARD,
    WARPS_FORWARD,
    _check,
    _plan,
)
from .test_norm_adamw_emulated import _norm

SEQ_LENS = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200]
HIDDEN = [1, 2, 7, 8, 9, 31, 33, 127, 256, 257, 512, 513, 1023, 1024, 1025, 4099, 8192, 8193,
          12289, 32768, 32769, 65536, 70000]


# The Hopper kernels' tiles: 128 queries x 128 keys forward, 128 keys x 64 queries backward,
# 2-stage rings.
HOPPER_SEQ_LENS = [1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300]


def _draw_key_range(data, B, Tq, Tk):
    """None; each batch row's keys [start, end) (a padded batch); or each query row's (packed
    documents, or scattered ranges): any ints, the kernels clamp them."""
    key_range = None
    kind = data.draw(st.sampled_from(["none", "padded", "per query"]), label="key range kind")
    bound = st.integers(-2, Tk + 2)
    if kind == "padded":
        key_range = data.draw(st.lists(st.lists(bound, min_size=2, max_size=2), min_size=B,
                                       max_size=B), label="key range")
    elif kind == "per query":
        if data.draw(st.booleans(), label="documents"):
            cuts = data.draw(st.lists(st.integers(0, Tk), max_size=4), label="cuts")
            edges = sorted({0, Tk, *cuts})
            positions = torch.arange(Tq) + (Tk - Tq)  # the queries' key positions, bottom-right
            document = torch.bucketize(positions.clamp(0, Tk - 1), torch.tensor(edges[1:]),
                                       right=True)
            edges = torch.tensor(edges)
            row = torch.stack([edges[document], edges[document + 1]], dim=1)
            key_range = row.expand(B, Tq, 2).to(torch.int32).contiguous()
        else:
            values = data.draw(st.lists(bound, min_size=2 * B * Tq, max_size=2 * B * Tq),
                               label="ranges")
            key_range = torch.tensor(values, dtype=torch.int32).reshape(B, Tq, 2)
    return key_range


def _fuzz_attention(library, data, seq_lens, max_head_dim, schedules, hopper):
    """One drawn case through _check: shape, causal offset, dtype, layout, timing, schedule,
    dQ path, a sliding window, key ranges (a padded batch, packed documents, scattered per
    query), a gradient of lse (return_lse, sinks), (sm_80 kernels) the device's shared memory,
    and soft-capping and dropout (the kScoreMods instances) or neither."""
    B = data.draw(st.integers(1, 2), label="B")
    Hkv = data.draw(st.integers(1, 2), label="Hkv")
    group = data.draw(st.integers(1, 3), label="group")
    Tq = data.draw(st.sampled_from(seq_lens), label="Tq")
    Tk = data.draw(st.sampled_from(seq_lens), label="Tk")
    D = data.draw(st.integers(1, max_head_dim // 8), label="D / 8") * 8
    causal = data.draw(st.booleans(), label="causal")
    offset = Tk - Tq
    if causal and data.draw(st.booleans(), label="random offset"):
        offset = data.draw(st.integers(-Tq, Tk), label="offset")
    window_offset = None  # sliding windows
    if data.draw(st.booleans(), label="sliding window"):
        window_offset = data.draw(st.integers(-Tq, Tk), label="window offset")
    key_range = _draw_key_range(data, B, Tq, Tk)
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]), label="dtype")
    layout = data.draw(st.sampled_from(["contiguous", "bthd"]), label="layout")
    late = data.draw(st.booleans(), label="copies (cp.async, TMA, wgmma) land late")
    schedule = data.draw(st.sampled_from(schedules), label="schedule")
    deterministic = data.draw(st.booleans(), label="deterministic")
    with_grad_lse = data.draw(st.booleans(), label="gradient of lse")
    shared = H100_SHARED_BYTES
    if not hopper:
        shared = data.draw(st.sampled_from([H100_SHARED_BYTES, SM86_SHARED_BYTES]),
                           label="shared bytes")
    softcap = data.draw(st.one_of(st.just(0.0), st.floats(0.25, 30.0)), label="softcap")
    dropout_p = data.draw(st.one_of(st.just(0.0), st.floats(0.01, 0.9)), label="dropout_p")
    # (any int64: its 64 bits key the stream, negative ones too)
    dropout_seed = data.draw(st.integers(-2**63, 2**63 - 1), label="dropout seed")
    _check(library, (B, Hkv * group, Hkv, Tq, Tk, D), causal, dtype, layout=layout, late=late,
           deterministic=deterministic, offset=offset, schedule=schedule, shared_bytes=shared,
           hopper=hopper, window_offset=window_offset, key_range=key_range,
           with_grad_lse=with_grad_lse, softcap=softcap, dropout_p=dropout_p,
           dropout_seed=dropout_seed)


def test_fuzz_attention(library, fuzz):  # noqa: F811
    @fuzz(16)
    @given(data=st.data())
    def run(data):
        _fuzz_attention(library, data, SEQ_LENS, 256, [LOCKSTEP, WARPS_FORWARD, WARPS_BACKWARD],
                        hopper=False)

    run()


def test_fuzz_attention_hopper(library, fuzz):  # noqa: F811
    @fuzz(8)
    @given(data=st.data())
    def run(data):
        _fuzz_attention(library, data, HOPPER_SEQ_LENS, 128,
                        [LOCKSTEP, WARPS_FORWARD, WARPS_BACKWARD, WARPGROUPS_FORWARD,
                         WARPGROUPS_BACKWARD], hopper=True)

    run()


# Decoding (attention_fwd_plan): few query rows over enough keys that the plan splits them over
# CTAs (at least 2 x 128 visible keys on the emulated 132 SMs) and packs a GQA group's heads
# into rows where there is one query row. Keys around the split shares' tile edges.
DECODE_QUERY_LENS = [1, 1, 2, 5, 63, 64]
DECODE_KEY_LENS = [256, 257, 383, 384, 385, 511, 640, 700, 1023, 1025]


def test_fuzz_decode(library, fuzz):  # noqa: F811
    """The decoding plan's packed and split forwards (and their combine) on drawn shapes: out and
    lse against the truth, on an sm_80 device and on an sm_90 one through the launcher's own
    choice. The draws must reach both rewrites (checked after the run)."""
    plans = []

    @fuzz(12)
    @given(data=st.data())
    def run(data):
        B = data.draw(st.integers(1, 2), label="B")
        Hkv = data.draw(st.integers(1, 2), label="Hkv")
        group = data.draw(st.sampled_from([1, 2, 4, 8]), label="group")
        Tq = data.draw(st.sampled_from(DECODE_QUERY_LENS), label="Tq")
        Tk = data.draw(st.sampled_from(DECODE_KEY_LENS), label="Tk")
        D = data.draw(st.integers(1, 32), label="D / 8") * 8
        causal = data.draw(st.booleans(), label="causal")
        offset = Tk - Tq
        if causal and data.draw(st.booleans(), label="random offset"):
            offset = data.draw(st.integers(-Tq, Tk), label="offset")
        window_offset = None
        if data.draw(st.booleans(), label="sliding window"):
            # the launchers' range (csrc/bindings.cpp clamps any offset into it; past it the
            # window hides every key or none, and the launchers refuse it: cudaErrorInvalidValue)
            window_offset = data.draw(st.integers(-Tq, Tk), label="window offset")
        key_range = _draw_key_range(data, B, Tq, Tk)
        if key_range is not None and not isinstance(key_range, torch.Tensor):
            key_range = torch.tensor(key_range, dtype=torch.int32).reshape(B, 2)
        kind = None if key_range is None else ("query" if key_range.dim() == 3 else "batch")
        shape = (B, Hkv * group, Hkv, Tq, Tk, D)
        _, packed, splits = _plan(library, shape, causal, offset, window_offset, kind)
        plans.append((packed, splits))
        _check(library, shape, causal,
               data.draw(st.sampled_from([torch.float16, torch.bfloat16]), label="dtype"),
               layout=data.draw(st.sampled_from(["contiguous", "bthd", "cache"]), label="layout"),
               late=data.draw(st.booleans(), label="copies land late"),
               schedule=data.draw(st.sampled_from([LOCKSTEP, WARPS_FORWARD, WARPS_BACKWARD]),
                                  label="schedule"),
               hopper=data.draw(st.sampled_from([False, "auto"]), label="device sm_90"),
               offset=offset, window_offset=window_offset, key_range=key_range, backward=False)

    run()
    assert any(packed for packed, _ in plans), f"no draw packed query heads: {plans}"
    assert any(splits > 1 for _, splits in plans), f"no draw split the keys: {plans}"


def test_fuzz_norm(library, fuzz):  # noqa: F811
    @fuzz(20)
    @given(data=st.data())
    def run(data):
        N = data.draw(st.sampled_from(HIDDEN), label="N")
        M = data.draw(st.integers(1, 3 if N > 8192 else 9), label="M")
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                           torch.float64]), label="dtype")
        rms = data.draw(st.booleans(), label="rms")
        has_weight = data.draw(st.booleans(), label="weight")
        has_bias = not rms and has_weight and data.draw(st.booleans(), label="bias")
        # float32 weights with 16-bit input are allowed (mixed precision)
        param_dtype = dtype
        if has_weight and dtype in (torch.float16, torch.bfloat16):
            param_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="param dtype")
        gen = torch.Generator().manual_seed(N * 31 + M)
        x64 = (torch.randn(M, N, generator=gen, dtype=torch.float64) * 3 - 1).to(dtype).double()
        dy64 = torch.randn(M, N, generator=gen, dtype=torch.float64).to(dtype).double()
        w64 = (1 + 0.2 * torch.randn(N, generator=gen, dtype=torch.float64)).to(param_dtype)
        b64 = (0.1 * torch.randn(N, generator=gen, dtype=torch.float64)).to(param_dtype)
        w64, b64 = w64.double(), b64.double()
        # Off 16-byte alignment (x, grad_y, y, dx by one element): the unvectorized paths.
        misalign = data.draw(st.sampled_from([0, 0, 1]), label="misalign")
        x = guarded_copy(x64.to(dtype), misalign)[0]
        dy = guarded_copy(dy64.to(dtype), misalign)[0]
        w = guarded_copy(w64.to(param_dtype))[0] if has_weight else None
        b = guarded_copy(b64.to(param_dtype))[0] if has_bias else None
        y, dx, dw, db = _norm(library, x, w, b, dy, rms, misalign=misalign)

        def torch_norm(xx, ww, bb):
            if rms:
                return F.rms_norm(xx, (N,), ww, eps=1e-5)
            return F.layer_norm(xx, (N,), ww, bb, eps=1e-5)

        params64 = [w64 if has_weight else None, b64 if has_bias else None]
        leaves64 = [x64.clone().requires_grad_(True)] + [
            None if p is None else p.clone().requires_grad_(True) for p in params64]
        truth = torch_norm(*leaves64)
        wanted64 = [t for t in leaves64 if t is not None]
        truth_grads = torch.autograd.grad(truth, wanted64, dy64)
        leaves = [x64.to(dtype).requires_grad_(True)] + [
            None if p is None else p.to(param_dtype).requires_grad_(True) for p in params64]
        base = torch_norm(*leaves)
        base_grads = torch.autograd.grad(base, [t for t in leaves if t is not None],
                                         dy64.to(dtype))
        assert_close_rule(y, base, truth, name="y")
        ours = [dx] + [g for g, p in ((dw, w), (db, b)) if p is not None]
        for name, g, gb, gt in zip(("dx", "dweight", "dbias"), ours, base_grads, truth_grads,
                                   strict=False):
            assert_close_rule(g, gb, gt, name=name)

    run()
