"""The Triton flash-attention kernels (fusedlm/triton/attention.py), through the public API:
fusedlm.attention(..., backend="triton") and its autograd, and the custom ops.

Truth: the naive softmax(q k^T * scale) v of tests/helpers.py in float64; baseline: the same
naive math at the input's dtype (the numerics rule of DESIGN.md, as tests/ops/test_attention.py).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) on CPU
tensors: small, odd shapes in float32, float16 and bfloat16 (interpreter_fixes.py makes the
interpreter's bfloat16 casts and dots a GPU's), one small tile config. The tests marked
``gpu`` run realistic sizes, the autotuned configs and bfloat16 at scale on a CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.backends import OpDispatch  # noqa: E402
from tests.helpers import assert_close_rule, naive_attention  # noqa: E402
from tests.ops.test_attention import (  # noqa: E402
    _check_attention,
    _expected_visibility,
    _qkv,
    _randn,
    _visibility_probe,
    key_ranges,
    query_key_ranges,
    strided_layout,
)
from tests.triton import sm90_build  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BACKEND = "triton"

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)


# (B, Hq, Hkv, Tq, Tk, D): odd lengths (several tiles with ragged ends under the interpreter's
# 64/32 tiles; test_attention_other_tiles goes down to 16), padded head dims (40, 72 -> 64,
# 128), GQA and MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 16),  # one query, one key
    (2, 2, 2, 17, 17, 40),
    (1, 2, 2, 113, 113, 64),
    (1, 2, 2, 17, 113, 72),  # Tq < Tk
    (1, 2, 2, 113, 17, 40),  # Tq > Tk: causal rows that see no key
    (1, 4, 2, 33, 47, 64),  # GQA
    (2, 4, 1, 17, 30, 40),  # MQA
    (1, 1, 1, 17, 17, 128),
    (1, 1, 1, 9, 20, 256),  # largest head dim
]
SHAPE_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]


# float16 on a subset: the interpreter is slow, and the kernels' code is the same per dtype.
HALF_SHAPES = [SHAPES[i] for i in (1, 2, 5, 8)]
HALF_IDS = [SHAPE_IDS[i] for i in (1, 2, 5, 8)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attention_float32(shape, causal):
    q, k, v = _qkv(shape, torch.float32, DEVICE)
    _check_attention(q, k, v, causal, BACKEND)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=HALF_IDS)
def test_attention_float16(shape, causal):
    q, k, v = _qkv(shape, torch.float16, DEVICE)
    _check_attention(q, k, v, causal, BACKEND)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=HALF_IDS)
def test_attention_bfloat16(shape, causal):
    """bfloat16 (under the interpreter too: fusedlm/triton/interpreter_fixes.py makes its
    bfloat16 casts and dots a GPU's)."""
    q, k, v = _qkv(shape, torch.bfloat16, DEVICE)
    _check_attention(q, k, v, causal, BACKEND)


@pytest.mark.parametrize("head_dim", [1, 8, 96])
def test_attention_other_head_dims(head_dim):
    """Head dims padded to BLOCK_D = 16 and 128 (96 is one of the tuned sizes on GPU)."""
    q, k, v = _qkv((1, 2, 1, 20, 37, head_dim), torch.float32, DEVICE)
    _check_attention(q, k, v, True, BACKEND)


@pytest.mark.parametrize(
    ("layout", "causal"),
    [
        ("bthd_transposed", False),
        ("bthd_transposed", True),
        ("expanded_kv", True),
        ("sliced", True),
    ],
)
def test_attention_strided_inputs(layout, causal):
    """Non-contiguous q/k/v reach the kernels as they are: (B, T, H, D) tensors viewed as
    (B, H, T, D); k/v expanded from one head (stride 0); slices with a storage offset."""
    leaves, rebuild = strided_layout(layout, torch.float32, DEVICE)
    q, k, v = rebuild(leaves)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    _check_attention(q, k, v, causal, BACKEND, leaves=leaves, rebuild=rebuild)


def test_attention_non_contiguous_grad_out():
    """The backward reads grad_out through its strides too."""
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 2, 2, 21, 21, 32), torch.float32, DEVICE))
    out = fusedlm.attention(q, k, v, causal=True, backend=BACKEND)
    grad = _randn((1, 21, 2, 32), torch.float32, DEVICE).transpose(1, 2)
    ours = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    theirs = torch.autograd.grad(out, (q, k, v), grad.contiguous())
    for g, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(g, t, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_attention_scale(scale, dtype):
    q, k, v = _qkv((1, 2, 2, 20, 31, 16), dtype, DEVICE)
    _check_attention(q, k, v, True, BACKEND, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_large_logits(dtype):
    """Scores of magnitude ~100: the running-max softmax must not overflow (see the twin test
    in tests/ops/test_attention.py for the backward's absolute term)."""
    q, k, v = _qkv((1, 2, 2, 40, 50, 32), dtype, DEVICE)
    _check_attention(
        q * 4, k * 4, v, False, BACKEND, scale=1.0, backward=dtype == torch.float32,
        grad_atol_factor=10.0,
    )


# ---- causal alignment, masked rows, lse ------------------------------------------------------


@pytest.mark.parametrize(("Tq", "Tk"), [(3, 5), (5, 3), (1, 7), (40, 70), (70, 40)])
def test_attention_causal_is_bottom_right(Tq, Tk):
    q, k, v = _visibility_probe(Tq, Tk, torch.float32, DEVICE)
    out = fusedlm.attention(q, k, v, causal=True, backend=BACKEND)[0, 0].cpu()
    expected = _expected_visibility(Tq, Tk, Tk - Tq)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    if Tq > Tk:  # the first Tq - Tk queries see no key: their output is exactly 0
        assert torch.equal(out[: Tq - Tk], torch.zeros(Tq - Tk, Tk))


@pytest.mark.parametrize(("Tq", "Tk"), [(5, 3), (40, 70), (70, 40)])
def test_sdpa_is_causal_is_top_left(Tq, Tk, monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", BACKEND)
    q, k, v = _visibility_probe(Tq, Tk, torch.float32, DEVICE)
    OpDispatch.last_choice.pop("attention_fwd", None)
    out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0].cpu()
    assert OpDispatch.last_choice.get("attention_fwd") == BACKEND
    torch.testing.assert_close(out.double(), _expected_visibility(Tq, Tk, 0), rtol=1e-6, atol=1e-6)


def test_attention_fully_masked_rows_have_zero_grads():
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 2, 2, 41, 4, 8), torch.float32, DEVICE))
    out = fusedlm.attention(q, k, v, causal=True, backend=BACKEND)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out[:, :, :37], torch.zeros_like(out[:, :, :37]))
    assert torch.equal(dq[:, :, :37], torch.zeros_like(dq[:, :, :37]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize(
    ("offset", "dtype"),
    [(-40, torch.float32), (-3, torch.float32), (0, torch.float32), (60, torch.float32),
     (-3, torch.float16)],
    ids=str,
)
def test_attention_ops_any_causal_offset(offset, dtype):
    """The custom ops for any causal_offset (-40: no row sees a key; -3: the first rows see
    none; 0: top-left; 60: past Tk, every key visible): lse is the float32 logsumexp of the
    visible scores (-inf where none), out and the gradients follow the rule."""
    B, H, Tq, Tk, D = 1, 2, 37, 42, 16
    q, k, v = _qkv((B, H, H, Tq, Tk, D), dtype, DEVICE)
    scale = 0.3
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, scale, True, offset, BACKEND)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Tq)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    visible = (torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + offset).to(q.device)
    expected = scores.masked_fill(~visible, -math.inf).logsumexp(-1)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse.double()[finite], expected[finite], rtol=1e-5, atol=1e-5)

    leaves = tuple(t.double().requires_grad_(True) for t in (q, k, v))
    truth = naive_attention(*leaves, scale=scale, causal=True, causal_offset=offset)
    base_leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
    base = naive_attention(*base_leaves, scale=scale, causal=True, causal_offset=offset)
    assert_close_rule(out, base, truth, name=f"out (offset {offset})")
    grad_out = torch.randn_like(out)
    ours = torch.ops.fusedlm.attention_bwd(
        grad_out, q, k, v, out, lse, scale, True, offset, BACKEND
    )
    theirs = torch.autograd.grad(base, base_leaves, grad_out)
    truths = torch.autograd.grad(truth, leaves, grad_out.double())
    for name, g, gt, g64 in zip(("dq", "dk", "dv"), ours, theirs, truths, strict=True):
        assert g.dtype == dtype
        assert_close_rule(g, gt, g64, name=f"{name} (offset {offset})")


def _use_interpreter_tiles(monkeypatch, m: int, n: int) -> None:
    """The interpreter's configs with BLOCK_M = m, BLOCK_N = n (the dk/dv kernel transposed)."""
    from fusedlm.triton import attention as kernels

    configs = {
        "fwd": {"BLOCK_M": m, "BLOCK_N": n},
        "bwd_dq": {"BLOCK_M": m, "BLOCK_N": n},
        "bwd_dkdv": {"BLOCK_M": n, "BLOCK_N": m},
    }
    monkeypatch.setattr(kernels, "INTERPRETER_CONFIGS", {**kernels.INTERPRETER_CONFIGS, **configs})


@pytest.mark.parametrize(
    ("tiles", "shape"),
    [
        ((16, 32), (1, 2, 1, 45, 70, 16)),
        ((32, 16), (1, 2, 1, 70, 45, 16)),
        ((16, 16), (1, 2, 1, 37, 50, 16)),
    ],
    ids=["M16-N32-Tq45-Tk70", "M32-N16-Tq70-Tk45", "M16-N16-Tq37-Tk50"],
)
@pytest.mark.skipif(ON_GPU, reason="the interpreter's tile config")
def test_attention_other_tiles(tiles, shape, monkeypatch):
    """The causal block ranges for other BLOCK_M/BLOCK_N ratios than the default config
    (the dk/dv kernel gets the transposed ratio)."""
    _use_interpreter_tiles(monkeypatch, *tiles)
    q, k, v = _qkv(shape, torch.float32, DEVICE)
    _check_attention(q, k, v, True, BACKEND)


# Sliding windows: the window's lower edge cuts through tiles (masked), skips whole key blocks
# in the forward and dq kernels and whole query blocks in the dk/dv kernel, and leaves rows
# with no key; tile ratios both ways, so the edge blocks are counted off the square case.
WINDOW_CASES = [
    ((64, 32), (1, 2, 1, 150, 150, 40), (20, 0), True),
    ((64, 32), (1, 2, 2, 70, 130, 16), (7, None), False),
    ((64, 32), (1, 2, 2, 130, 70, 16), (33, 2), False),
    ((16, 32), (1, 2, 1, 100, 100, 16), (40, 9), True),
    ((32, 16), (2, 2, 2, 45, 70, 16), (0, 0), False),
    ((16, 16), (1, 1, 1, 1, 90, 16), (30, -1), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("tiles", "shape", "window", "causal"), WINDOW_CASES,
    ids=["M{}-N{}-Tq{}-Tk{}-w{}-{}".format(*t, *s[3:5], w, "causal" if c else "full")
         for t, s, w, c in WINDOW_CASES],
)
@pytest.mark.skipif(ON_GPU, reason="the interpreter's tile config")
def test_attention_sliding_window(tiles, shape, window, causal, dtype, monkeypatch):
    _use_interpreter_tiles(monkeypatch, *tiles)
    q, k, v = _qkv(shape, dtype, DEVICE)
    _check_attention(q, k, v, causal, BACKEND, window=window)


# Padded batches (key_range): ranges that start and end inside key blocks, on block edges,
# cover none of a block, leave rows (and whole query blocks) with no key, and meet a window.
KEY_RANGE_CASES = [
    ((64, 32), (3, 2, 1, 70, 100, 16), False, None, [[5, 100], [0, 64], [32, 33]]),
    ((64, 32), (3, 2, 2, 100, 70, 40), True, None, [[40, 70], [0, 37], [70, 70]]),
    ((16, 32), (2, 2, 1, 90, 90, 16), True, (20, 0), [[31, 90], [-4, 200]]),
    ((32, 16), (2, 2, 2, 45, 70, 16), False, (9, 4), [[16, 48], [60, 3]]),
    ((16, 16), (3, 1, 1, 1, 90, 16), True, None, [[80, 90], [0, 17], [0, 0]]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("tiles", "shape", "causal", "window", "ranges"), KEY_RANGE_CASES,
    ids=["M{}-N{}-Tq{}-Tk{}".format(*t, *s[3:5]) + ("-causal" if c else "-full")
         + (f"-w{w}" if w else "") for t, s, c, w, _ in KEY_RANGE_CASES],
)
@pytest.mark.skipif(ON_GPU, reason="the interpreter's tile config")
def test_attention_key_range(tiles, shape, causal, window, ranges, dtype, monkeypatch):
    _use_interpreter_tiles(monkeypatch, *tiles)
    q, k, v = _qkv(shape, dtype, DEVICE)
    _check_attention(q, k, v, causal, BACKEND, window=window, key_range=torch.tensor(ranges))


# Packed documents (per-query key ranges): document edges inside and on tile edges, one-token
# documents, Tq != Tk (the documents after Tk - Tq cached keys), and scattered ranges (unsorted,
# clamped, empty), which leave query blocks that meet no key of a key block (the dK/dV kernel
# skips them) and rows with no key.
QUERY_KEY_RANGE_CASES = [
    ((64, 32), (2, 2, 1, 150, 150, 16), True, None, "documents"),
    ((16, 32), (1, 2, 2, 100, 100, 40), False, None, "documents"),
    ((32, 16), (1, 2, 2, 70, 90, 16), True, (20, 0), "documents"),
    ((64, 32), (2, 2, 1, 70, 100, 16), False, None, "scattered"),
    ((32, 16), (1, 2, 2, 90, 45, 16), True, (9, 4), "scattered"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("tiles", "shape", "causal", "window", "kind"), QUERY_KEY_RANGE_CASES,
    ids=["M{}-N{}-Tq{}-Tk{}".format(*t, *s[3:5]) + ("-causal" if c else "-full")
         + (f"-w{w}" if w else "") + f"-{kind}" for t, s, c, w, kind in QUERY_KEY_RANGE_CASES],
)
@pytest.mark.skipif(ON_GPU, reason="the interpreter's tile config")
def test_attention_query_key_range(tiles, shape, causal, window, kind, dtype, monkeypatch):
    _use_interpreter_tiles(monkeypatch, *tiles)
    q, k, v = _qkv(shape, dtype, DEVICE)
    _check_attention(q, k, v, causal, BACKEND, window=window,
                     key_range=query_key_ranges(kind, shape[0], shape[3], shape[4]))


# Decoding (the plan of csrc/cuda/attention_fwd.cu, in attention_fwd): one query row packs its
# GQA group's query heads into the rows of one block; where the B * Hq query blocks leave SMs
# idle (INTERPRETER_SM_COUNT under the interpreter) the keys split over programs whose partial
# results are combined. (shape, causal, window, key range, expected (packed, splits))
DECODE_CASES = {
    "gqa": ((1, 8, 2, 1, 700, 64), True, None, None, (True, 5)),
    "mha-D40": ((2, 4, 4, 1, 600, 40), False, None, None, (False, 4)),
    "short-prompt-mqa": ((1, 3, 1, 40, 520, 16), True, None, None, (False, 4)),
    "window": ((1, 4, 2, 1, 900, 16), True, (599, 0), None, (False, 4)),
    # batch row 1 sees no key: every split's lse is -inf (out 0, lse -inf, zero gradients)
    "padded-gqa": ((2, 4, 2, 1, 650, 16), True, None, [[100, 650], [0, 0]], (True, 5)),
    "query-ranges-one-row": ((2, 4, 1, 1, 520, 16), True, None, [[[320, 520]], [[3, 300]]],
                             (True, 4)),
    "query-ranges-three-rows": ((1, 2, 1, 3, 520, 16), False, None,
                                [[[10, 500], [0, 0], [300, 520]]], (False, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
@pytest.mark.skipif(ON_GPU, reason="the interpreter's SM count and tile config")
def test_attention_decode(case, dtype):
    from fusedlm.triton import attention as kernels

    shape, causal, window, ranges, expected = case
    B, Hq, Hkv, Tq, Tk, D = shape
    window_offset = None if window is None else Tk - Tq - window[0]
    packed = kernels._packs_query_heads(Hq, Hkv, Tq, Tk, causal, Tk - Tq, window_offset)
    rows = Hq // Hkv if packed else Tq
    splits = kernels._key_splits(torch.device(DEVICE), B, Hkv if packed else Hq, rows, Tk,
                                 causal and not packed, Tk - Tq, window_offset)
    assert (packed, splits) == expected
    q, k, v = _qkv(shape, dtype, DEVICE)
    _check_attention(q, k, v, causal, BACKEND, window=window,
                     key_range=None if ranges is None else torch.tensor(ranges))


@pytest.mark.parametrize("per_query", [False, True], ids=["per_row", "per_query"])
def test_attention_op_key_range_past_int32(per_query):
    """The custom op takes int64 key ranges as they come (the public API clamps them; the op
    does not): bounds past int32 mean "before every key" / "past every key", as on the other
    backends, not what wrapping to int32 would make of them (2**40 -> 0: found by
    ``--fuzz-long``). Forward and backward against the reference backend."""
    B, H, Tq, Tk, D = 3, 2, 5, 9, 16
    q, k, v = _qkv((B, H, H, Tq, Tk, D), torch.float32, DEVICE)
    rows = torch.tensor([[0, 2**40], [-(2**40), 4], [2**40, 2**41]], device=DEVICE)
    key_range = rows[:, None].expand(B, Tq, 2).contiguous() if per_query else rows
    grad = torch.randn_like(q)
    results = []
    for backend in (BACKEND, "torch"):
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.25, False, 0, backend, None,
                                                   key_range)
        grads = torch.ops.fusedlm.attention_bwd(grad, q, k, v, out, lse, 0.25, False, 0, backend,
                                                None, key_range)
        results.append((out, lse, *grads))
    for name, ours, reference_value in zip(("out", "lse", "dq", "dk", "dv"), *results,
                                           strict=True):
        torch.testing.assert_close(ours, reference_value.to(ours.dtype), rtol=1e-5, atol=1e-5,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_decode_kv_cache_views(dtype):
    """A split, packed decoding step on a KV cache's filled positions (views of NaN-filled
    buffers with room for more, as fusedlm.models.KVCache hands them): the same output and lse
    as on contiguous copies, and nothing read past the filled part."""
    from fusedlm.triton import attention as kernels

    B, Hq, Hkv, Tk, D = 2, 8, 2, 700, 32
    assert kernels._packs_query_heads(Hq, Hkv, 1, Tk, True, Tk - 1, None)
    assert kernels._key_splits(torch.device(DEVICE), B, Hkv, Hq // Hkv, Tk, False, Tk - 1,
                               None) > 1
    q, k, v = _qkv((B, Hq, Hkv, 1, Tk, D), dtype, DEVICE)
    views = []
    for t in (k, v):
        buffer = torch.full((B, Hkv, Tk + 40, D), float("nan"), dtype=dtype, device=DEVICE)
        buffer[:, :, :Tk] = t
        views.append(buffer[:, :, :Tk])
    out, lse = torch.ops.fusedlm.attention_fwd(q, *views, D ** -0.5, True, Tk - 1, BACKEND)
    out_copy, lse_copy = torch.ops.fusedlm.attention_fwd(q, k, v, D ** -0.5, True, Tk - 1,
                                                         BACKEND)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # (bit for bit under the interpreter; on a GPU the autotuner may time another config)
    atol = 2e-3 if ON_GPU else 0.0
    torch.testing.assert_close(out, out_copy, rtol=0, atol=atol)
    torch.testing.assert_close(lse, lse_copy, rtol=0, atol=atol)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's SM count and tile config")
def test_attention_decode_plan_off(monkeypatch):
    """FUSEDLM_ATTENTION_DECODE=0: no packed query heads, no key split, the plain kernel."""
    from fusedlm.triton import attention as kernels

    monkeypatch.setenv("FUSEDLM_ATTENTION_DECODE", "0")
    assert not kernels._packs_query_heads(8, 2, 1, 700, True, 699, None)
    assert kernels._key_splits(torch.device(DEVICE), 1, 8, 1, 700, True, 699, None) == 1
    q, k, v = _qkv((1, 8, 2, 1, 700, 16), torch.float32, DEVICE)
    _check_attention(q, k, v, True, BACKEND)


@pytest.mark.parametrize("offset", [0, 30, -5], ids=["top-left", "offset30", "offset-5"])
@pytest.mark.skipif(ON_GPU, reason="the interpreter's SM count and tile config")
def test_attention_decode_causal_offsets(offset):
    """A few query rows against many keys with the causal limit inside the first key blocks:
    most splits see no key (their lse -inf must weigh nothing), or none does (offset -5: rows
    0..4 see nothing)."""
    from fusedlm.triton import attention as kernels

    B, H, Tq, Tk, D = 1, 2, 9, 700, 16
    assert kernels._key_splits(torch.device(DEVICE), B, H, Tq, Tk, True, offset, None) == 5
    q, k, v = _qkv((B, H, H, Tq, Tk, D), torch.float32, DEVICE)
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.25, True, offset, BACKEND)
    leaves = tuple(t.double() for t in (q, k, v))
    truth = naive_attention(*leaves, scale=0.25, causal=True, causal_offset=offset)
    base = naive_attention(q, k, v, scale=0.25, causal=True, causal_offset=offset)
    assert_close_rule(out, base, truth, name="out")
    scores = (leaves[0] @ leaves[1].transpose(-1, -2)) * 0.25
    visible = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + offset
    expected = scores.masked_fill(~visible, -math.inf).logsumexp(-1)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse.double()[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's tile config")
def test_attention_varlen(monkeypatch):
    """fusedlm.attention_varlen on Triton: the (1, H, total, D) transposed views of packed
    sequences and their per-query key ranges, against the reference backend (float64 on the
    same views, rule-free: the reference is exact there)."""
    _use_interpreter_tiles(monkeypatch, 32, 16)
    lens_q, lens_k = [20, 1, 45], [30, 1, 45]
    cu_q = torch.tensor([0, 20, 21, 66])
    cu_k = torch.tensor([0, 30, 31, 76], dtype=torch.int32)
    q = _randn((66, 4, 16), torch.float32, DEVICE).requires_grad_()
    k, v = (_randn((76, 2, 16), torch.float32, DEVICE).requires_grad_() for _ in range(2))
    grad = _randn((66, 4, 16), torch.float32, DEVICE)
    results = []
    for backend, cast in ((BACKEND, torch.float32), ("torch", torch.float64)):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fusedlm.attention_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k),
                                       causal=True, backend=backend)
        results.append([out, *torch.autograd.grad(out, leaves, grad.to(cast))])
    for name, ours, truth in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(ours.double(), truth, rtol=1e-4, atol=1e-5, msg=name)


def test_query_extents_bound_the_dkdv_query_loop():
    """The dK/dV kernel's query rows per 16-key chunk: for packed documents (sorted ranges)
    exactly the rows whose ranges meet the chunk; for unsorted ranges all rows (a narrower
    extent would drop gradient terms, a wider one only costs time)."""
    from fusedlm.triton.attention import _query_extents

    Tq, Tk = 70, 90
    for kind in ("documents", "scattered"):
        ranges = query_key_ranges(kind, 2, Tq, Tk).to(torch.int32)
        extents = _query_extents(ranges, Tq, Tk)
        assert extents.shape == (2, 6, 2) and extents.dtype == torch.int32
        ends = ranges[..., 1].clamp(0, Tk)
        starts = torch.minimum(ranges[..., 0].clamp(0, Tk), ends)
        for b in range(2):
            for chunk in range(6):
                c0, c1 = 16 * chunk, min(16 * chunk + 16, Tk)
                meets = ((starts[b] < ends[b]) & (starts[b] < c1) & (ends[b] > c0)).nonzero()
                first, end = extents[b, chunk].tolist()
                if kind == "scattered":
                    assert (first, end) == (0, Tq)
                elif len(meets):
                    assert (first, end) == (int(meets.min()), int(meets.max()) + 1)
                else:
                    assert first >= end


# ---- dispatch ------------------------------------------------------------------------------


def test_triton_backend_registered():
    info = fusedlm.backends()["triton"]
    assert info.available, info.reason
    assert {"attention_fwd", "attention_bwd"} <= set(info.ops)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "match"),
    [(torch.float64, 16, "float64"), (torch.float32, 300, "head dim")],
)
def test_triton_refuses_what_it_cannot_do(dtype, head_dim, match):
    """Named, the backend says why; a head dim over 256 is refused by the public API already,
    so the predicate is checked on the op."""
    q, k, v = _qkv((1, 1, 1, 4, 4, head_dim), dtype, DEVICE)
    with pytest.raises(fusedlm.BackendNotSupportedError, match=match):
        torch.ops.fusedlm.attention_fwd(q, k, v, 0.5, False, 0, BACKEND)


def test_attention_empty_inputs():
    for shape in [(0, 2, 2, 5, 5, 8), (1, 2, 2, 0, 5, 8), (1, 2, 2, 5, 0, 8)]:
        q, k, v = _qkv(shape, torch.float32, DEVICE)
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.5, False, 0, BACKEND)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
        if shape[4] == 0:
            assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())
        grads = torch.ops.fusedlm.attention_bwd(
            torch.ones_like(out), q, k, v, out, lse, 0.5, False, 0, BACKEND
        )
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_backward_is_deterministic():
    """dk/dv sum the query heads of a GQA group in registers: bitwise reproducible."""
    q, k, v = _qkv((1, 4, 1, 40, 40, 32), torch.float32, DEVICE)
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.2, True, 0, BACKEND)
    grad_out = torch.randn_like(out)
    first = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, 0.2, True, 0, BACKEND)
    second = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, 0.2, True, 0, BACKEND)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---- launch configs and GPU builds (checked without a GPU) --------------------------------

H100_SHARED, A100_SHARED, SMALL_SHARED = sm90_build.H100_SHARED, 166912, 101376


@pytest.mark.parametrize("max_shared", [H100_SHARED, A100_SHARED, SMALL_SHARED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
def test_fixed_config_fits_the_device(block_d, dtype, max_shared):
    from fusedlm.triton import attention as kernels

    elem = torch.empty((), dtype=dtype).element_size()
    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        cfg = kernels._fixed_config(name, block_d, dtype, max_shared)
        key = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
        assert kernels._shared_bytes(name, key, block_d, elem) <= max_shared, (name, cfg)
        if max_shared == H100_SHARED and dtype != torch.float32:  # the tuned tables' first entry
            assert key == kernels.HOPPER_CONFIGS[name][max(block_d, 64)][0]


def test_autotune_configs_are_pruned_to_the_device(monkeypatch):
    """Every Hopper config fits an H100 in 16 bits; the pruning drops what a smaller device
    cannot hold and always leaves one."""
    import triton

    from fusedlm.triton import attention as kernels

    q = torch.empty(1, 1, 1, 1, dtype=torch.float16)
    for name, per_d in kernels.HOPPER_CONFIGS.items():
        for size, table in per_d.items():
            configs = [
                triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in table
            ]
            prune = kernels._prune_configs(name)
            monkeypatch.setattr(kernels, "_max_shared_memory", lambda index: H100_SHARED)
            assert len(prune(configs, {"Q": q}, BLOCK_D=size)) == len(configs), (name, size)
            monkeypatch.setattr(kernels, "_max_shared_memory", lambda index: 64 * 1024)
            kept = prune(configs, {"Q": q}, BLOCK_D=size)
            assert kept and len(kept) <= len(configs)
            for c in kept:
                cfg = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                fits = kernels._shared_bytes(name, cfg, size, 2) <= 64 * 1024
                assert fits or cfg == kernels._SMALLEST


_SM90_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _sm90_launch(name, dtype, head_dim, causal, window=False, seqlen=2048, key_range=0,
                 split_keys=False, grad_lse=False, softcap=0.0):
    """The launch of kernel ``name`` ("preprocess" or a key of _KERNELS) on an H100 with the
    fixed config, on contiguous (B, H, T, D) tensors: unit head-dim strides, row strides D, the
    others T * D, 16-byte aligned pointers; lengths and head counts 17 (Triton specializes ints
    equal to 1 or divisible by 16, and real lengths are often neither)."""
    from fusedlm.triton import attention as kernels

    fn = kernels._KERNELS.get(name, kernels.attention_bwd_preprocess_kernel)
    block_d = kernels._block_d(head_dim)
    meta = {"BLOCK_D": block_d, "EVEN_D": block_d == head_dim}
    if name == "preprocess":  # (with grad_lse: the gradient of lse, return_lse / sinks)
        meta.update(BLOCK_M=64, num_warps=8, num_stages=1, HAS_GRAD_LSE=grad_lse)
    else:
        cfg = kernels._fixed_config(name, block_d, _SM90_TYPES[dtype], H100_SHARED)
        meta.update(CAUSAL=causal, WINDOW=window, KEY_RANGE=key_range,
                    DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", SOFTCAP=softcap > 0,
                    DROPOUT=False,
                    softcap=float(softcap), **cfg)
        if name == "fwd":
            meta["SPLIT_KEYS"] = split_keys
    for arg in fn.arg_names:
        if arg in meta:
            continue
        if arg.startswith("stride"):
            meta[arg] = {"d": 1, "m": head_dim, "n": head_dim}.get(arg[-1], seqlen * head_dim)
        elif arg in ("KeyRange", "QueryExtent"):
            meta[arg] = {"ptr": "i32", "aligned": True}
        elif arg == "DropoutSeed":
            meta[arg] = {"ptr": "i64", "aligned": True}
        elif arg[0].isupper():
            meta[arg] = {"ptr": "fp32" if arg in ("Lse", "Delta", "GradLse") else dtype,
                         "aligned": True}
        else:
            meta[arg] = 0.5 if arg.endswith("scale") else 17
    return sm90_build.launch(f"{kernels.__name__}:{fn.fn.__name__}", **meta)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the gpu tests run the real builds")
def test_kernels_build_for_sm90():
    """The interpreter runs Python, not Triton's compiler: build each kernel for sm_90 (MLIR,
    PTX, ptxas; no GPU needed) to catch what only the compiler rejects, shared memory over the
    H100's and register spills. Every kernel's fixed config at the tuned head dims in bfloat16
    must not spill more than a few bytes and must use wgmma; the odd cases (padded head dims,
    float32) only have to build: their fixed configs spill (D = 72: up to 196 bytes in
    bwd_dkdv; measured, in benchmarks/NOTES.md)."""
    sm90_build.require_nvidia_backend()
    tuned = [[name, "bf16", head_dim, causal] for name in ("fwd", "bwd_dkdv", "bwd_dq")
             for head_dim in (64, 128, 256) for causal in (False, True)]
    # Sliding windows (Mistral's, Gemma 3's local layers): causal, at the common head dims.
    tuned += [[name, "bf16", head_dim, True, True] for name in ("fwd", "bwd_dkdv", "bwd_dq")
              for head_dim in (64, 128)]
    # Padded batches (key ranges), causal and not, at the common head dims.
    tuned += [[name, "bf16", head_dim, causal, False, 2048, 1]
              for name in ("fwd", "bwd_dkdv", "bwd_dq") for head_dim in (64, 128)
              for causal in (False, True)]
    # Packed documents (per-query key ranges), causal, at the common head dims.
    tuned += [[name, "bf16", head_dim, True, False, 2048, 2]
              for name in ("fwd", "bwd_dkdv", "bwd_dq") for head_dim in (64, 128)]
    # Decoding: the forward with its keys split over programs, plain and padded.
    tuned += [["fwd", "bf16", head_dim, False, False, 2048, key_range, True]
              for head_dim in (64, 128) for key_range in (0, 1)]
    odd = [
        ["fwd", "bf16", 72, True],
        ["bwd_dkdv", "fp16", 96, True],
        ["bwd_dq", "fp32", 40, False],
        ["preprocess", "fp16", 72, False],
        ["preprocess", "bf16", 128, False, False, 2048, 0, False, True],
    ]
    launches = [_sm90_launch(*case) for case in tuned + odd]
    results = sm90_build.build_for_sm90(launches)
    n = len(tuned)
    failures = sm90_build.problems(launches[:n], results[:n], max_spill_bytes=16)
    failures += sm90_build.problems(launches[n:], results[n:], max_spill_bytes=None)
    assert not failures, "\n".join(failures)
    assert all(r["shared"] > 0 for r in results), results
    # Hopper's speed is in wgmma: a tuned 16-bit kernel that Triton lowered to the Ampere
    # mma.sync instead (a dot it cannot feed to wgmma, e.g. an M side under 64) would run at a
    # fraction of the rate. D = 256's dK/dV tiles are the exception (their fixed config keeps
    # 32 keys per program to hold two (32, 256) float32 accumulators: mma.sync; NOTES.md).
    for spec, r in zip(launches[:n], results[:n], strict=True):
        if spec["kwargs"]["BLOCK_D"] == 256 and "dkdv" in spec["kernel"]:
            continue
        assert r["wgmma"] > 0 and r["mma_sync"] == 0, (spec["kernel"], spec["kwargs"], r)


# ---- GPU: realistic sizes, autotuned configs, bfloat16 ---------------------------------------
#
# Compiles dominate the GPU time: the correctness matrix runs the fixed configs (one build per
# kernel and case); test_attention_gpu_autotuned tunes two cases, and test_every_hopper_config
# checks every config the tuner may pick.


@pytest.fixture
def untuned(monkeypatch):
    monkeypatch.setenv("FUSEDLM_TRITON_AUTOTUNE", "0")


# (B, Hq, Hkv, Tq, Tk, D): 16k query tokens or so each
GPU_SHAPES = [
    (8, 8, 2, 2048, 2048, 64),  # GQA
    (4, 4, 4, 4096, 4096, 128),
    (4, 4, 4, 1000, 3000, 128),  # Tq < Tk, ragged
    (4, 4, 2, 3000, 1000, 64),  # Tq > Tk, ragged; causal rows that see no key
    (8, 4, 4, 2048, 2048, 96),  # padded head dim
    (8, 2, 1, 2048, 2048, 256),  # MQA, largest head dim
]
GPU_SHAPE_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in GPU_SHAPES]


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=GPU_SHAPE_IDS)
def test_attention_gpu(shape, causal, dtype):
    q, k, v = _qkv(shape, dtype, "cuda")
    _check_attention(q, k, v, causal, BACKEND)


# Decoding steps on the device's SMs: packed GQA heads and split keys (the combine's float32
# partials), in bfloat16 (which the interpreter cannot check). (B, Hq, Hkv, Tq, Tk, D)
GPU_DECODE_SHAPES = [(1, 32, 8, 1, 4096, 128), (4, 16, 2, 1, 1000, 64), (2, 8, 8, 5, 3000, 96)]


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_DECODE_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in GPU_DECODE_SHAPES])
def test_attention_gpu_decode(shape, dtype):
    from fusedlm.triton import attention as kernels

    B, Hq, Hkv, Tq, Tk, D = shape
    heads = Hkv if Tq == 1 else Hq
    assert kernels._key_splits(torch.device("cuda"), B, heads, Tq * Hq // heads, Tk, Tq > 1,
                               Tk - Tq, None) > 1  # (on any GPU with more SMs than 16)
    q, k, v = _qkv(shape, dtype, "cuda")
    _check_attention(q, k, v, True, BACKEND)


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("kind", ["left", "mixed"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "dtype"),
                         [((8, 8, 2, 2048, 2048, 128), torch.bfloat16),
                          ((6, 4, 4, 1000, 1000, 64), torch.float16)],
                         ids=["B8-T2048-D128-GQA-bf16", "B6-T1000-D64-fp16"])
def test_attention_gpu_key_range(shape, dtype, causal, kind):
    """Padded batches as Hugging Face models run them (left padding for generation; "mixed":
    ranges inside the sequence, clamped, empty), fixed configs; one dtype per head dim (the
    compiles dominate gpu_check's pytest step)."""
    q, k, v = _qkv(shape, dtype, "cuda")
    _check_attention(q, k, v, causal, BACKEND,
                     key_range=key_ranges(kind, shape[0], shape[4], "cuda"))


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize(("shape", "dtype", "kind"),
                         [((4, 8, 2, 4096, 4096, 128), torch.bfloat16, "documents"),
                          ((2, 4, 4, 1000, 1500, 64), torch.float16, "scattered")],
                         ids=["B4-T4096-D128-documents-bf16", "B2-Tq1000-Tk1500-D64-scattered"])
def test_attention_gpu_query_key_range(shape, dtype, kind):
    """Packed documents as pretraining runs them (causal, about six documents per sequence),
    and scattered per-query ranges; fixed configs."""
    q, k, v = _qkv(shape, dtype, "cuda")
    _check_attention(q, k, v, kind == "documents", BACKEND,
                     key_range=query_key_ranges(kind, shape[0], shape[3], shape[4], "cuda"))


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("shape", "window", "causal"),
    [
        ((4, 8, 2, 4096, 4096, 128), (1023, 0), True),  # Mistral-style causal window
        ((4, 4, 4, 2048, 2048, 64), (127, 128), False),  # ModernBERT-style two-sided local
        ((2, 4, 2, 1000, 3000, 64), (511, None), True),  # Tq < Tk, ragged
    ],
    ids=["causal-w1024-T4096-D128", "local-128-T2048-D64", "causal-w512-Tq1000-Tk3000"],
)
def test_attention_gpu_sliding_window(shape, window, causal, dtype):
    q, k, v = _qkv(shape, dtype, "cuda")
    _check_attention(q, k, v, causal, BACKEND, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("shape", "causal", "dtype"),
    [
        ((4, 8, 2, 2048, 2048, 128), True, torch.bfloat16),
        ((4, 8, 8, 4096, 4096, 64), False, torch.float16),
    ],
    ids=["D128-causal-bf16", "D64-full-fp16"],
)
def test_attention_gpu_autotuned(shape, causal, dtype):
    from fusedlm.triton import attention as kernels

    q, k, v = _qkv(shape, dtype, "cuda")
    _check_attention(q, k, v, causal, BACKEND)
    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        tuner = kernels._autotuned(name, shape[-1])
        assert tuner.best_config is not None, f"{name} was not autotuned"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_hopper_config(head_dim, monkeypatch):
    """Each config the autotuner may pick gives the right answer (bfloat16, causal, ragged)."""
    from fusedlm.triton import attention as kernels

    q, k, v = _qkv((2, 4, 2, 700, 900, head_dim), torch.bfloat16, "cuda")
    names = ("fwd", "bwd_dkdv", "bwd_dq")
    tables = {name: kernels.HOPPER_CONFIGS[name][head_dim] for name in names}
    for i in range(max(len(table) for table in tables.values())):
        picked = {name: table[min(i, len(table) - 1)] for name, table in tables.items()}
        monkeypatch.setattr(
            kernels, "_fixed_config",
            lambda name, *_, picked=picked: kernels._config_kwargs(picked[name]),
        )
        _check_attention(q, k, v, True, BACKEND)


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_gpu_float32(causal):
    q, k, v = _qkv((2, 4, 2, 1500, 1500, 64), torch.float32, "cuda")
    _check_attention(q, k, v, causal, BACKEND)


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_gpu_bthd_layout(dtype):
    """(B, T, H, D) projections viewed as (B, H, T, D), as a model produces them."""
    B, T, Hq, Hkv, D = 4, 2048, 8, 2, 128
    leaves = tuple(_randn((B, T, h, D), dtype, "cuda") for h in (Hq, Hkv, Hkv))
    rebuild = lambda ls: tuple(t.transpose(1, 2) for t in ls)  # noqa: E731
    _check_attention(*rebuild(leaves), True, BACKEND, leaves=leaves, rebuild=rebuild)


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
def test_attention_gpu_offsets_past_int32():
    """Element offsets above 2**31 (q, k, v with a batch stride of 2**31 elements in one 4 GiB
    buffer): the kernels' head offsets are 64-bit."""
    B, H, T, D = 2, 2, 512, 64
    stride_b, head = 2**31, H * T * D
    buf = torch.empty(stride_b + 3 * head, dtype=torch.float16, device="cuda")
    q, k, v = (
        buf.as_strided((B, H, T, D), (stride_b, T * D, D, 1), storage_offset=i * head)
        for i in range(3)
    )
    for t in (q, k, v):
        t.copy_(torch.randn(B, H, T, D, device="cuda"))
    dense = [t.contiguous() for t in (q, k, v)]
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.125, True, 0, BACKEND)
    out_ref, lse_ref = torch.ops.fusedlm.attention_fwd(*dense, 0.125, True, 0, BACKEND)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    grad = torch.randn_like(out)
    grads = torch.ops.fusedlm.attention_bwd(grad, q, k, v, out, lse, 0.125, True, 0, BACKEND)
    grads_ref = torch.ops.fusedlm.attention_bwd(grad, *dense, out, lse, 0.125, True, 0, BACKEND)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
def test_attention_gpu_backward_is_deterministic():
    q, k, v = _qkv((2, 8, 2, 2048, 2048, 128), torch.bfloat16, "cuda")
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.1, True, 0, BACKEND)
    grad_out = torch.randn_like(out)
    first = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, 0.1, True, 0, BACKEND)
    second = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, 0.1, True, 0, BACKEND)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
