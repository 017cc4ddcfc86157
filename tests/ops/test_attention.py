"""fusedlm.attention / fusedlm.scaled_dot_product_attention and the attention custom ops.

Truth: the naive softmax(q k^T * scale) v of tests/helpers.py in float64 (or torch's SDPA in
float64); baseline: the same naive math at the input's dtype (or torch's SDPA at that dtype)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import (
    assert_close_rule,
    atol_for,
    attention_refusal,
    available_backends,
    cpu_backend_available,
    device_of,
    larger_error,
    naive_attention,
)

BACKENDS = available_backends()

# (B, Hq, Hkv, Tq, Tk, D)
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 2, 17, 17, 40),
    (1, 2, 2, 113, 113, 64),
    (1, 2, 2, 17, 113, 72),  # Tq < Tk
    (1, 2, 2, 113, 17, 64),  # Tq > Tk: causal rows that see no key
    (1, 2, 2, 1, 33, 8),  # one query (decoding)
    (1, 6, 2, 17, 40, 64),  # GQA
    (2, 4, 1, 33, 17, 40),  # MQA, Tq > Tk
    (1, 1, 1, 17, 17, 256),  # largest head dim
    (1, 2, 1, 150, 270, 40),  # several (partial) query and key tiles, MQA
    (1, 2, 2, 270, 140, 72),  # several tiles, Tq > Tk
]
SHAPE_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]


def _randn(shape, dtype, device, scale=1.0):
    return (scale * torch.randn(shape, dtype=torch.float64)).to(device, dtype)


def _qkv(shape, dtype, device):
    B, Hq, Hkv, Tq, Tk, D = shape
    return (
        _randn((B, Hq, Tq, D), dtype, device),
        _randn((B, Hkv, Tk, D), dtype, device),
        _randn((B, Hkv, Tk, D), dtype, device),
    )


@contextlib.contextmanager
def _num_threads(threads: int):
    """torch's CPU thread count set to `threads` inside the block (the cpu kernels tile by it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _identity(leaves):
    return leaves


def _check_attention(
    q,
    k,
    v,
    causal,
    backend,
    scale=None,
    backward=True,
    leaves=None,
    rebuild=_identity,
    grad_atol_factor=1.0,
    window=None,
    key_range=None,
):
    """fusedlm.attention vs the naive truth (float64) and the naive baseline (q's dtype), forward
    and backward (with ``window``, sliding-window attention; with ``key_range``, padding).

    Gradients are taken with respect to ``leaves`` (default: q, k, v); ``rebuild(leaves)`` gives
    q, k, v (views such as transposes or expands of the leaves)."""
    if leaves is None:
        leaves = (q, k, v)
    dtype = q.dtype

    def run(fn, cast):
        ls = tuple(t.detach().to(cast).requires_grad_(backward) for t in leaves)
        return ls, fn(*rebuild(ls))

    ours_leaves, out = run(
        lambda a, b, c: fusedlm.attention(a, b, c, causal=causal, scale=scale, backend=backend,
                                          window=window, key_range=key_range),
        dtype,
    )
    base_leaves, out_torch = run(
        lambda a, b, c: naive_attention(a, b, c, scale=scale, causal=causal, window=window,
                                        key_range=key_range), dtype
    )
    truth_leaves, out_truth = run(
        lambda a, b, c: naive_attention(a, b, c, scale=scale, causal=causal, window=window,
                                        key_range=key_range),
        torch.float64,
    )
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    # bfloat16 (forward only): a looser absolute term, its 8-bit mantissa dominates.
    atol = 1e-2 * max(1.0, out_truth.abs().max().item()) if dtype == torch.bfloat16 else None
    assert_close_rule(out, out_torch, out_truth, atol=atol, name="out")
    if not backward:
        return
    grad_out = _randn(out.shape, torch.float64, "cpu").to(q.device, dtype)
    ours = torch.autograd.grad(out, ours_leaves, grad_out)
    theirs = torch.autograd.grad(out_torch, base_leaves, grad_out)
    truth = torch.autograd.grad(out_truth, truth_leaves, grad_out.double())
    for name, g, g_torch, g_truth, src in zip(
        ("dq", "dk", "dv"), ours, theirs, truth, leaves, strict=True
    ):
        assert g.dtype == src.dtype and g.shape == src.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert_close_rule(
            g, g_torch, g_truth, atol=atol_for(dtype, g_truth, grad_atol_factor), name=name
        )


# The dtype each test with a ``backend`` but no ``dtype`` parameter feeds the backend (checked
# complete by test_every_backend_test_says_what_it_feeds, so the GPU runs skip the right cases).
_FEEDS_DTYPE = {
    "test_attention_bfloat16_forward": torch.bfloat16,
    "test_attention_under_autocast_is_attention_in_its_dtype": torch.bfloat16,
    **dict.fromkeys((
        "test_attention_key_range_is_padding", "test_attention_documents_are_independent",
        "test_attention_causal_is_bottom_right", "test_sdpa_is_causal_is_top_left",
        "test_attention_gradcheck", "test_attention_gradcheck_through_lse_and_sinks",
    ), torch.float64),
    **dict.fromkeys((
        "test_attention_grouped_query_heads_short_sequence",
        "test_attention_keys_split_across_threads",
        "test_attention_sliding_window_keys_split_across_threads",
        "test_attention_sliding_window_is_mistral_sliding_window",
        "test_attention_key_range_keys_split_across_threads",
        "test_attention_query_key_range_keys_split_across_threads",
        "test_attention_key_range_bad_inputs", "test_attention_long_sequence",
        "test_attention_backward_recomputes_the_forward_scores",
        "test_attention_fully_masked_rows_have_zero_grads", "test_sdpa_falls_back_to_torch",
        "test_sdpa_float_mask_row_with_no_visible_key",
        "test_attention_empty_inputs", "test_attention_without_autograd_skips_the_function",
        "test_attention_kernel_backend_named_under_vmap_raises",
        "test_cpu_attention_memory_is_not_quadratic",
    ), torch.float32),
}

@pytest.fixture(autouse=True)
def _skip_cases_a_gpu_backend_refuses(request):
    """The Triton attention kernels refuse float64; the CUDA ones take only float16/bfloat16
    (BackendNotSupportedError, tested in tests/triton and tests/cuda, which also cover the
    long-sequence, fully-masked and empty cases in half precision): skip those cases here."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    backend, name = params.get("backend"), request.node.originalname
    if backend not in ("cuda", "triton"):
        return
    reason = attention_refusal(backend, params.get("dtype", _FEEDS_DTYPE.get(name)))
    if reason is not None:
        pytest.skip(reason)


def test_every_backend_test_says_what_it_feeds():
    """Runs without a GPU: each test taking a backend declares its dtype (a parameter or
    _FEEDS_DTYPE); otherwise the GPU runs would feed the kernels dtypes they refuse."""
    import inspect

    module = sys.modules[__name__]
    for name, fn in vars(module).items():
        if not name.startswith("test_") or not callable(fn):
            continue
        arguments = inspect.signature(fn).parameters
        if "backend" not in arguments:
            continue
        if "dtype" not in arguments:
            assert name in _FEEDS_DTYPE, f"{name}: add the dtype it feeds to _FEEDS_DTYPE"
        else:
            assert name not in _FEEDS_DTYPE, f"{name} has a dtype parameter: not in _FEEDS_DTYPE"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attention(shape, causal, dtype, backend):
    q, k, v = _qkv(shape, dtype, device_of(backend))
    _check_attention(q, k, v, causal, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attention_bfloat16_forward(shape, causal, backend):
    q, k, v = _qkv(shape, torch.bfloat16, device_of(backend))
    _check_attention(q, k, v, causal, backend, backward=False)


# A few query rows (decoding) against many keys: the cpu kernels take those scores as dot
# products with the key rows in place (up to 4 rows), the GEMM path from 5; head dims that are
# not multiples of 8 reach the vector tail.
FEW_ROW_SHAPES = [
    (1, 4, 2, 1, 300, 13),
    (2, 2, 2, 3, 150, 37),
    (1, 2, 1, 4, 129, 72),
    (1, 2, 2, 5, 40, 21),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("keys", ["contiguous", "transposed", "one_key_expanded"])
@pytest.mark.parametrize("shape", FEW_ROW_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in FEW_ROW_SHAPES])
def test_attention_few_query_rows(shape, keys, causal, dtype, backend):
    B, Hq, Hkv, Tq, Tk, D = shape
    device = device_of(backend)
    q, k, v = _qkv(shape, dtype, device)
    if keys == "transposed":  # k with stride 1 along T, not D
        leaves = (q, _randn((B, Hkv, D, Tk), dtype, device), v)
        rebuild = lambda ls: (ls[0], ls[1].transpose(-1, -2), ls[2])  # noqa: E731
    elif keys == "one_key_expanded":  # k with stride 0 along T
        leaves = (q, _randn((B, Hkv, 1, D), dtype, device), v)
        rebuild = lambda ls: (ls[0], ls[1].expand(B, Hkv, Tk, D), ls[2])  # noqa: E731
    else:
        leaves, rebuild = (q, k, v), _identity
    _check_attention(*rebuild(leaves), causal, backend, leaves=leaves, rebuild=rebuild)


# GQA/MQA with a short query sequence: the cpu forward puts several query heads of a group
# in one tile (their rows sharing each K/V block) when they fit 128 rows and leave work for
# every thread (with these few keys, a tile per thread); the head count per tile depends on
# the thread count, so both are run. Tq = 43 x 3
# heads is just past one tile, 42 x 3 just inside; 64 x 2 fills it.
GROUPED_SHAPES = [
    (1, 8, 1, 1, 200, 16),
    (2, 12, 2, 3, 70, 24),
    (1, 6, 2, 43, 90, 8),
    (1, 6, 2, 42, 42, 8),
    (1, 4, 1, 64, 64, 8),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("query_layout", ["BHTD", "BTHD"])
@pytest.mark.parametrize("shape", GROUPED_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in GROUPED_SHAPES])
def test_attention_grouped_query_heads_short_sequence(shape, query_layout, causal, threads,
                                                      backend):
    B, Hq, Hkv, Tq, Tk, D = shape
    q, k, v = _qkv(shape, torch.float32, device_of(backend))
    if query_layout == "BTHD":  # q as a transposed view of (B, T, H, D) storage
        leaves = (q.transpose(1, 2).contiguous(), k, v)
        rebuild = lambda ls: (ls[0].transpose(1, 2), ls[1], ls[2])  # noqa: E731
    else:
        leaves, rebuild = (q, k, v), _identity
    with _num_threads(threads):
        _check_attention(*rebuild(leaves), causal, backend, leaves=leaves, rebuild=rebuild)


# Fewer forward tiles than threads (a batch of one decoding with few kv heads): the cpu forward
# splits each tile's keys across threads (at least 256 keys a split) and merges the splits'
# rows by their max and sum. The backward reads the merged logsumexp, so it checks that too.
# Across 2-4 threads these run with 1 to 4 splits (with as many tiles as threads, none); the
# last two also put a GQA group's heads in one tile, as long as key splits leave every thread
# work.
SPLIT_KEY_SHAPES = [
    (1, 1, 1, 1, 1000, 16),
    (1, 2, 1, 3, 700, 24),
    (1, 4, 2, 1, 2000, 8),
    (2, 1, 1, 2, 513, 40),
    (1, 3, 3, 5, 600, 8),
    (1, 8, 1, 1, 2000, 8),
    (1, 4, 2, 2, 1500, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SPLIT_KEY_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SPLIT_KEY_SHAPES])
def test_attention_keys_split_across_threads(shape, causal, threads, backend):
    with _num_threads(threads):
        _check_attention(*_qkv(shape, torch.float32, device_of(backend)), causal, backend)


# Sliding-window (local) attention, FlashAttention's window_size: (left, right) keys around each
# query's bottom-right-aligned position. Shapes with several (ragged) query and key tiles, so
# the window's edges cut through tiles, skip whole ones, and leave rows with no key (Tq > Tk).
WINDOW_SHAPES = [
    (2, 2, 2, 17, 17, 40),
    (1, 2, 1, 150, 270, 40),  # Tq < Tk, MQA
    (1, 2, 2, 270, 140, 72),  # Tq > Tk
    (1, 6, 2, 1, 300, 16),  # decoding, GQA
]
WINDOWS = [(0, 0), (7, None), (None, 5), (33, 2), (64, -1), (1000, 1000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("shape", WINDOW_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in WINDOW_SHAPES])
def test_attention_sliding_window(shape, window, causal, dtype, backend):
    q, k, v = _qkv(shape, dtype, device_of(backend))
    _check_attention(q, k, v, causal, backend, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("window", [(100, 0), (300, 40)], ids=str)
def test_attention_sliding_window_keys_split_across_threads(window, threads, backend):
    """Decoding over 1500 keys: the cpu forward splits the keys across threads; the window
    leaves some splits with no visible key at all."""
    with _num_threads(threads):
        _check_attention(*_qkv((1, 2, 1, 2, 1500, 16), torch.float32, device_of(backend)),
                         True, backend, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_sliding_window_is_mistral_sliding_window(backend):
    """causal=True, window=(W - 1, 0) is a causal sliding window of W keys: each query sees
    itself and the W - 1 keys before it, and no more (Mistral's sliding_window = W). With v
    the identity, each output row is that query's probabilities: positive exactly there."""
    device = device_of(backend)
    q, k, _ = _qkv((1, 1, 1, 12, 12, 12), torch.float32, device)
    v = torch.eye(12, device=device)[None, None]
    out = fusedlm.attention(q, k, v, causal=True, window=(3, 0), backend=backend)
    expected = torch.tensor([[0 <= i - j <= 3 for j in range(12)] for i in range(12)])
    assert torch.equal(out[0, 0].cpu() > 0, expected)


# Padded batches: key_range (B, 2) keeps batch row b to keys [start, end). Left padding moves
# the start, right padding the end; "mixed" has a row with no key at all, an int64 range past
# the sequence at both ends (clamped) and an inverted one (empty).
def key_ranges(kind: str, B: int, Tk: int, device="cpu") -> torch.Tensor:
    """(B, 2) int64 [start, end) per batch row for the padding ``kind``."""
    rows = []
    for b in range(B):
        if kind == "left":
            rows.append((b * Tk // (B + 1), Tk))
        elif kind == "right":
            rows.append((0, Tk - b * Tk // (B + 1)))
        else:
            rows.append([(Tk // 3, Tk - Tk // 4), (-5, Tk + 100), (Tk, Tk), (Tk // 2, 1)][b % 4])
    return torch.tensor(rows, dtype=torch.int64, device=device)


KEY_RANGE_SHAPES = [
    (3, 2, 2, 17, 17, 40),
    (2, 2, 1, 150, 270, 40),  # Tq < Tk, MQA, several key tiles
    (2, 2, 2, 270, 140, 72),  # Tq > Tk: rows that see no key
    (4, 6, 2, 1, 300, 16),  # decoding over a padded batch, GQA
]
KEY_RANGE_MASKS = [(False, None), (True, None), (True, (33, 0)), (False, (20, 9))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["left", "right", "mixed"])
@pytest.mark.parametrize(("causal", "window"), KEY_RANGE_MASKS,
                         ids=["full", "causal", "causal-w33", "local-20-9"])
@pytest.mark.parametrize("shape", KEY_RANGE_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in KEY_RANGE_SHAPES])
def test_attention_key_range(shape, causal, window, kind, dtype, backend):
    q, k, v = _qkv(shape, dtype, device_of(backend))
    _check_attention(q, k, v, causal, backend, window=window,
                     key_range=key_ranges(kind, shape[0], shape[4], q.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [2, 3])
def test_attention_key_range_keys_split_across_threads(threads, backend):
    """Decoding a padded batch over 1500 keys: the cpu forward splits the keys across threads,
    and the padding leaves some splits with no visible key."""
    with _num_threads(threads):
        q, k, v = _qkv((3, 2, 1, 2, 1500, 16), torch.float32, device_of(backend))
        ranges = torch.tensor([[1100, 1500], [0, 90], [700, 701]], device=q.device)
        _check_attention(q, k, v, True, backend, key_range=ranges)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_key_range_is_padding(backend):
    """Left padding: a batch row's output equals attention over its tokens alone (the padding
    keys dropped, the queries at their positions); padding keys get zero dk, dv."""
    device = device_of(backend)
    q, k, v = (t.requires_grad_() for t in _qkv((2, 2, 2, 20, 20, 16), torch.float64, device))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0  # row 1: seven padding tokens on the left
    ranges = fusedlm.key_range_from_padding_mask(mask.to(device))
    out = fusedlm.attention(q, k, v, causal=True, key_range=ranges, backend=backend)
    alone = fusedlm.attention(q[1:, :, 7:], k[1:, :, 7:], v[1:, :, 7:], causal=True,
                              backend=backend)
    torch.testing.assert_close(out[1:, :, 7:], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0], fusedlm.attention(q[:1], k[:1], v[:1], causal=True,
                                                         backend=backend)[0])
    assert torch.equal(out[1, :, :7], torch.zeros_like(out[1, :, :7]))  # rows with no key
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    assert torch.equal(dk[1, :, :7], torch.zeros_like(dk[1, :, :7]))
    assert torch.equal(dv[1, :, :7], torch.zeros_like(dv[1, :, :7]))


def test_key_range_from_padding_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = [[2, 5], [0, 3], [0, 5], [0, 0]]
    for m in (mask, mask.bool()):
        ranges = fusedlm.key_range_from_padding_mask(m)
        assert ranges.dtype == torch.int32 and ranges.tolist() == expected
    with pytest.raises(ValueError, match="contiguous run"):
        fusedlm.key_range_from_padding_mask(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        fusedlm.key_range_from_padding_mask(torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="attention_mask"):
        fusedlm.key_range_from_padding_mask(torch.ones(2, 3))


# Packed documents: key_range (B, Tq, 2) keeps query i of batch row b to its own keys.
# "documents": runs of tokens of uneven lengths (one token long too), as
# key_range_from_document_ids makes them, with Tk - Tq extra keys before the first document
# (a KV cache's); "scattered": any ranges, neither sorted nor inside the sequence (clamped),
# some inverted (empty).
def query_key_ranges(kind: str, B: int, Tq: int, Tk: int, device="cpu") -> torch.Tensor:
    """(B, Tq, 2) int64 [start, end) per query for the ``kind``."""
    generator = torch.Generator().manual_seed(B * 1000 + Tq * 10 + Tk)
    if kind == "documents":
        cuts = torch.rand(B, Tq, generator=generator) < 6.0 / max(Tq, 1)
        cuts[:, Tq // 2] = True  # at least two documents
        ids = torch.cumsum(cuts, dim=1)
        ranges = fusedlm.key_range_from_document_ids(ids).long() + max(Tk - Tq, 0)
        return ranges.clamp(max=Tk).to(device)
    ranges = torch.randint(-3, Tk + 4, (B, Tq, 2), generator=generator)
    return ranges.to(device)


QUERY_KEY_RANGE_SHAPES = [
    (2, 2, 2, 17, 17, 40),
    (2, 2, 1, 150, 150, 40),  # several query and key tiles, MQA
    (1, 4, 2, 270, 300, 72),  # Tq < Tk, GQA
    (2, 2, 2, 130, 60, 16),  # Tq > Tk: rows that see no key
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["documents", "scattered"])
@pytest.mark.parametrize(("causal", "window"), KEY_RANGE_MASKS,
                         ids=["full", "causal", "causal-w33", "local-20-9"])
@pytest.mark.parametrize("shape", QUERY_KEY_RANGE_SHAPES,
                         ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s)
                              for s in QUERY_KEY_RANGE_SHAPES])
def test_attention_query_key_range(shape, causal, window, kind, dtype, backend):
    q, k, v = _qkv(shape, dtype, device_of(backend))
    _check_attention(q, k, v, causal, backend, window=window,
                     key_range=query_key_ranges(kind, shape[0], shape[3], shape[4], q.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [2, 3])
def test_attention_query_key_range_keys_split_across_threads(threads, backend):
    """Decoding two queries over 1500 keys with a range each: the cpu forward splits the keys
    across threads, and most splits hold no key of one of the rows."""
    with _num_threads(threads):
        q, k, v = _qkv((2, 2, 1, 2, 1500, 16), torch.float32, device_of(backend))
        ranges = torch.tensor([[[1100, 1500], [0, 90]], [[700, 701], [5, 1400]]],
                              device=q.device)
        _check_attention(q, k, v, False, backend, key_range=ranges)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_documents_are_independent(backend):
    """Packed documents with causal=True: each document's output and gradients equal causal
    attention over that document alone, as if it were its own sequence."""
    device = device_of(backend)
    lengths = [1, 40, 7, 70, 2]
    T = sum(lengths)
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 2, T, T, 16), torch.float64, device))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    ranges = fusedlm.key_range_from_document_ids(ids.to(device))
    out = fusedlm.attention(q, k, v, causal=True, key_range=ranges, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    start = 0
    for length in lengths:
        piece = slice(start, start + length)
        alone_leaves = tuple(t[:, :, piece].detach().requires_grad_() for t in (q, k, v))
        alone = fusedlm.attention(*alone_leaves, causal=True, backend=backend)
        torch.testing.assert_close(out[:, :, piece], alone, rtol=1e-12, atol=1e-12)
        alone_grads = torch.autograd.grad(alone, alone_leaves, grad_out[:, :, piece])
        for g, g_alone in zip(grads, alone_grads, strict=True):
            torch.testing.assert_close(g[:, :, piece], g_alone, rtol=1e-11, atol=1e-12)
        start += length


def test_key_range_from_document_ids():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 1, 1, 3, 3]])
    expected = [
        [[0, 3], [0, 3], [0, 3], [3, 5], [3, 5], [5, 6]],
        [[0, 6]] * 6,
        [[0, 1], [1, 2], [2, 4], [2, 4], [4, 6], [4, 6]],  # a repeated id is a new document
    ]
    ranges = fusedlm.key_range_from_document_ids(ids)
    assert ranges.dtype == torch.int32 and ranges.tolist() == expected
    assert fusedlm.key_range_from_document_ids(ids.int()).tolist() == expected
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert fusedlm.key_range_from_document_ids(empty).shape == (2, 0, 2)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])  # Hugging Face's packed positions
    assert fusedlm.key_range_from_document_ids((position_ids == 0).cumsum(-1)).tolist() == [
        expected[0]]
    with pytest.raises(ValueError, match="document_ids"):
        fusedlm.key_range_from_document_ids(torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="document_ids.*integers"):
        fusedlm.key_range_from_document_ids(torch.zeros(1, 6))


# Variable-length sequences packed without padding (flash_attn_varlen_func's layout): query
# and key lengths differ per sequence (Tq < Tk, Tq > Tk, an empty one, one token).
VARLEN_LENGTHS = [([5, 0, 40, 3, 1], [5, 2, 70, 3, 1]), ([33, 17, 70], [20, 17, 70])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("causal", "window"), KEY_RANGE_MASKS,
                         ids=["full", "causal", "causal-w33", "local-20-9"])
@pytest.mark.parametrize("lengths", VARLEN_LENGTHS, ids=["ragged", "Tq>Tk"])
def test_attention_varlen_is_attention_per_sequence(lengths, causal, window, dtype, backend):
    """fusedlm.attention_varlen: each sequence's rows equal fusedlm.attention over that
    sequence alone (the reference backend, float64), forward and gradients, by the rule
    against the naive attention at the input's dtype."""
    device = device_of(backend)
    lens_q, lens_k = (torch.tensor(n) for n in lengths)
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long), lens_q.cumsum(0)]).to(device)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), lens_k.cumsum(0)]).to(device, torch.int32)
    Hq, Hkv, D = 4, 2, 24
    q = _randn((int(cu_q[-1]), Hq, D), dtype, device).requires_grad_()
    k = _randn((int(cu_k[-1]), Hkv, D), dtype, device).requires_grad_()
    v = _randn((int(cu_k[-1]), Hkv, D), dtype, device).requires_grad_()
    out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, int(lens_q.max()), int(lens_k.max()),
                                   causal=causal, window=window, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    grad = _randn(out.shape, dtype, device)
    grads = torch.autograd.grad(out, (q, k, v), grad)

    def per_sequence(cast, attention):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        pieces = []
        for s in range(len(lengths[0])):
            rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
            qs, ks, vs = (t[r].transpose(0, 1)[None]
                          for t, r in zip(leaves, (rows, keys, keys), strict=True))
            pieces.append(attention(qs, ks, vs)[0].transpose(0, 1))
        result = torch.cat(pieces)
        return result, torch.autograd.grad(result, leaves, grad.to(cast))

    truth, truth_grads = per_sequence(
        torch.float64, lambda a, b, c: naive_attention(a, b, c, causal=causal, window=window))
    base, base_grads = per_sequence(
        dtype, lambda a, b, c: naive_attention(a, b, c, causal=causal, window=window))
    assert_close_rule(out, base, truth, name="out")
    for name, g, gb, gt in zip(("dq", "dk", "dv"), grads, base_grads, truth_grads, strict=True):
        assert_close_rule(g, gb, gt, name=name)


def test_attention_varlen_bad_inputs():
    q, k, v = torch.randn(7, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3, 7]), torch.tensor([0, 4, 9])
    with pytest.raises(ValueError, match="'q'.*3-D"):
        fusedlm.attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        fusedlm.attention_varlen(q, k, v, torch.tensor([0, 3, 6]), cu_k)  # ends short of 7
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fusedlm.attention_varlen(q, k, v, cu_q, torch.tensor([0, 5, 4, 9]))  # decreasing
    with pytest.raises(ValueError, match="same number"):
        fusedlm.attention_varlen(q, k, v, cu_q, torch.tensor([0, 2, 4, 9]))
    with pytest.raises(TypeError, match="cu_seqlens_q.*integers"):
        fusedlm.attention_varlen(q, k, v, cu_q.float(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fusedlm.attention_varlen(q, k, v, cu_q, cu_k[None])
    with pytest.raises(TypeError, match="'window'"):
        fusedlm.attention_varlen(q, k, v, cu_q, cu_k, window=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_key_range_bad_inputs(backend):
    q, k, v = _qkv((2, 2, 2, 5, 7, 8), torch.float32, device_of(backend))
    with pytest.raises(TypeError, match="key_range"):
        fusedlm.attention(q, k, v, key_range=[[0, 7], [0, 7]], backend=backend)
    with pytest.raises(TypeError, match="key_range.*integers"):
        fusedlm.attention(q, k, v, key_range=torch.zeros(2, 2), backend=backend)
    with pytest.raises(TypeError, match="key_range.*integers"):
        fusedlm.attention(q, k, v, key_range=torch.ones(2, 2, dtype=torch.bool), backend=backend)
    for shape in ((2,), (3, 2), (2, 3), (2, 2, 1), (2, 7, 2), (2, 5, 3), (2, 5, 2, 1)):
        with pytest.raises(ValueError, match=r"key_range.*\(B, 2\).*\(B, Tq, 2\)"):
            fusedlm.attention(q, k, v, key_range=torch.zeros(shape, dtype=torch.long),
                              backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_long_sequence(causal, backend):
    q, k, v = _qkv((1, 1, 1, 1000, 1000, 64), torch.float32, device_of(backend))
    _check_attention(q, k, v, causal, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_attention_scale(scale, dtype, backend):
    q, k, v = _qkv((1, 2, 2, 20, 31, 16), dtype, device_of(backend))
    _check_attention(q, k, v, True, backend, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_large_logits(dtype, backend):
    """Scores of magnitude ~100 overflow exp() without a running-max softmax. The backward
    recomputes the probabilities from a float32 logsumexp of magnitude ~100, whose rounding
    (~1e-5 relative) the naive softmax does not have: its absolute term is 10x the default."""
    q, k, v = _qkv((1, 2, 2, 70, 90, 32), dtype, device_of(backend))
    _check_attention(
        q * 4,
        k * 4,
        v,
        False,
        backend,
        scale=1.0,
        backward=dtype == torch.float32,
        grad_atol_factor=10.0,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lse_gradient", [False, True], ids=["out", "lse"])
def test_attention_backward_recomputes_the_forward_scores(lse_gradient, backend):
    """The backward's P = exp(S - lse) holds only if it recomputes the scores S exactly as the
    forward rounded them into lse. Scores of magnitude ~50 (q and k constant along D: large,
    same-sign products) make a few ulps of S ~1e-5 relative in P: the cpu kernels once scaled
    q before the product in the forward and the scores after it in the backward, which erred
    1.1e-4 relative in dq here against torch's 3.5e-6 (4.5e-5 with only lse's gradient)."""
    device = device_of(backend)
    B, H, Tq, Tk, D = 2, 2, 33, 63, 72
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, H, T, 1, generator=gen).expand(B, H, T, D).contiguous().to(device)
            for T in (Tq, Tk))
    v = torch.randn(B, H, Tk, D, generator=gen).to(device)
    grad_out = torch.randn(B, H, Tq, D, generator=gen).to(device)
    grad_lse = torch.randn(B, H, Tq, generator=gen).to(device)
    results = []
    for dtype, attend in ((None, fusedlm.attention), (torch.float32, naive_attention),
                          (torch.float64, naive_attention)):
        leaves = [t.to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        if attend is fusedlm.attention:
            out, lse = attend(*leaves, causal=True, return_lse=True, backend=backend)
        else:
            out, lse = attend(*leaves, causal=True, return_lse=True)
        loss = ((lse * grad_lse.to(lse.dtype)).sum() if lse_gradient
                else (out * grad_out.to(out.dtype)).sum())
        results.append(torch.autograd.grad(loss, leaves[:2]))
    for name, ours, theirs, truth in zip(("dq", "dk"), *results, strict=True):
        assert_close_rule(ours, theirs, truth, name=name)


def strided_layout(layout: str, dtype, device):
    """Leaf tensors and the function that views them as non-contiguous (q, k, v) of shape
    (2, 4|2, 19|23, 40): "bthd_transposed" ((B, T, H, D) viewed as (B, H, T, D)),
    "expanded_kv" (k/v expanded from one head: stride 0) or sliced (storage offsets)."""
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 19, 23, 40
    if layout == "bthd_transposed":
        leaves = (
            _randn((B, Tq, Hq, D), dtype, device),
            _randn((B, Tk, Hkv, D), dtype, device),
            _randn((B, Tk, Hkv, D), dtype, device),
        )
        rebuild = lambda ls: tuple(t.transpose(1, 2) for t in ls)  # noqa: E731
    elif layout == "expanded_kv":
        leaves = (
            _randn((B, Hq, Tq, D), dtype, device),
            _randn((B, 1, Tk, D), dtype, device),
            _randn((B, 1, Tk, D), dtype, device),
        )
        rebuild = lambda ls: (ls[0], ls[1].expand(B, Hkv, Tk, D), ls[2].expand(B, Hkv, Tk, D))  # noqa: E731
    else:
        leaves = (
            _randn((B, Hq, Tq + 3, 2 * D), dtype, device),
            _randn((B, Hkv, Tk + 1, 2 * D), dtype, device),
            _randn((B, Hkv, Tk + 1, 2 * D), dtype, device),
        )
        rebuild = lambda ls: (ls[0][:, :, 3:, D:], ls[1][:, :, 1:, :D], ls[2][:, :, 1:, 3 : D + 3])  # noqa: E731
    return leaves, rebuild


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["bthd_transposed", "expanded_kv", "sliced"])
def test_attention_strided_inputs(layout, causal, dtype, backend):
    """Non-contiguous q/k/v: (B, T, H, D) tensors viewed as (B, H, T, D); k/v expanded from one
    head (stride 0); slices with a storage offset."""
    leaves, rebuild = strided_layout(layout, dtype, device_of(backend))
    q, k, v = rebuild(leaves)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    _check_attention(q, k, v, causal, backend, leaves=leaves, rebuild=rebuild)


# ---- causal alignment ----------------------------------------------------------------------


def _visibility_probe(Tq, Tk, dtype, device):
    """q = 0 gives uniform attention over the visible keys; v = one-hot of the key index, so
    out[i, j] = 1 / (number of keys row i sees) if j is visible to i, else 0."""
    q = torch.zeros(1, 1, Tq, Tk, dtype=dtype, device=device)
    k = torch.randn(1, 1, Tk, Tk, dtype=dtype, device=device)
    v = torch.eye(Tk, dtype=dtype, device=device)[None, None]
    return q, k, v


def _expected_visibility(Tq, Tk, offset):
    visible = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + offset
    counts = visible.sum(-1, keepdim=True).clamp(min=1)
    return visible.double() / counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("Tq", "Tk"), [(3, 5), (5, 3), (4, 4), (1, 7), (70, 130), (130, 70)])
def test_attention_causal_is_bottom_right(Tq, Tk, backend):
    q, k, v = _visibility_probe(Tq, Tk, torch.float64, device_of(backend))
    out = fusedlm.attention(q, k, v, causal=True, backend=backend)[0, 0].cpu()
    torch.testing.assert_close(out, _expected_visibility(Tq, Tk, Tk - Tq), rtol=1e-12, atol=1e-12)
    if Tq > Tk:  # the first Tq - Tk queries see no key: their output is exactly 0
        assert torch.equal(out[: Tq - Tk], torch.zeros(Tq - Tk, Tk, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_fully_masked_rows_have_zero_grads(backend):
    device = device_of(backend)
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 2, 2, 9, 4, 8), torch.float32, device))
    out = fusedlm.attention(q, k, v, causal=True, backend=backend)
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("Tq", "Tk"), [(3, 5), (5, 3), (70, 130), (130, 70)])
def test_sdpa_is_causal_is_top_left(Tq, Tk, backend, monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    q, k, v = _visibility_probe(Tq, Tk, torch.float64, device_of(backend))
    OpDispatch.last_choice.pop("attention_fwd", None)
    out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0].cpu()
    assert OpDispatch.last_choice.get("attention_fwd") == backend, (
        "the call did not reach fusedlm's kernels"
    )
    torch.testing.assert_close(out, _expected_visibility(Tq, Tk, 0), rtol=1e-12, atol=1e-12)


# ---- fusedlm.scaled_dot_product_attention == torch's ---------------------------------------

# (query shape, key shape, kwargs)
SDPA_CASES = [
    ((2, 3, 17, 32), (2, 3, 17, 32), {}),
    ((2, 3, 17, 32), (2, 3, 29, 32), {"is_causal": True}),
    ((2, 3, 29, 32), (2, 3, 17, 32), {"is_causal": True}),
    ((1, 2, 40, 64), (1, 2, 40, 64), {"is_causal": True, "scale": 0.3}),
    ((1, 2, 11, 40), (1, 2, 23, 40), {"scale": 2.0}),
    ((2, 6, 21, 16), (2, 2, 33, 16), {"is_causal": True, "enable_gqa": True}),
    ((1, 4, 9, 16), (1, 1, 9, 16), {"enable_gqa": True}),
    ((3, 17, 24), (3, 25, 24), {}),
    ((3, 25, 24), (3, 17, 24), {"is_causal": True}),
]
SDPA_IDS = [
    "q{}-k{}-{}".format(
        "x".join(map(str, q)), "x".join(map(str, k)), "-".join(f"{a}={b}" for a, b in kw.items())
    )
    for q, k, kw in SDPA_CASES
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("q_shape", "k_shape", "kwargs"), SDPA_CASES, ids=SDPA_IDS)
def test_sdpa_matches_torch(q_shape, k_shape, kwargs, dtype, backend, monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    device = device_of(backend)
    q = _randn(q_shape, dtype, device).requires_grad_(True)
    k = _randn(k_shape, dtype, device).requires_grad_(True)
    v = _randn(k_shape, dtype, device).requires_grad_(True)
    OpDispatch.last_choice.pop("attention_fwd", None)
    out = fusedlm.scaled_dot_product_attention(q, k, v, **kwargs)
    assert OpDispatch.last_choice.get("attention_fwd") == backend, (
        "the call did not reach fusedlm's kernels"
    )
    _check_sdpa_against_torch(out, q, k, v, kwargs)


def _check_sdpa_against_torch(out, q, k, v, kwargs, flash_grads=None) -> None:
    """Our SDPA output ``out`` and its gradients against torch's SDPA with ``kwargs``, in
    float64 (truth) and at q's dtype (baseline); a float attn_mask goes to float64 too.
    ``flash_grads(grad, out)``: dq, dk, dv by FlashAttention's formula at q's dtype from our
    ``out``, or None; where given, each gradient's baseline is the further from the truth of
    the two (larger_error)."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    qt, kt, vt = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    kwargs64 = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs64["attn_mask"] = mask.double()
    truth = F.scaled_dot_product_attention(q64, k64, v64, **kwargs64)
    same = F.scaled_dot_product_attention(qt, kt, vt, **kwargs)
    assert out.shape == same.shape and out.dtype == same.dtype
    assert_close_rule(out, same, truth, name="out")
    # the gradients of the inputs that require one (out has none when no input does)
    wanted = [i for i, t in enumerate((q, k, v)) if t.requires_grad]
    assert out.requires_grad == bool(wanted)
    if not wanted:
        return
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [(q, k, v)[i] for i in wanted], grad)
    theirs = torch.autograd.grad(same, [(qt, kt, vt)[i] for i in wanted], grad)
    truths = torch.autograd.grad(truth, [(q64, k64, v64)[i] for i in wanted], grad.double())
    second = flash_grads(grad, out) if flash_grads is not None else None
    for i, g, gt, g64 in zip(wanted, ours, theirs, truths, strict=True):
        gt = larger_error(gt, None if second is None else second[i], g64)
        assert_close_rule(g, gt, g64, name=f"d{'qkv'[i]}")


def _sdpa_mask(kind: str, q_shape, k_shape, dtype, device) -> torch.Tensor:
    """An SDPA attn_mask our kernels take: a band of keys around the diagonal (any alignment),
    cut to one run of keys per batch row, or to one run per query (packed documents), as a
    bool or an additive float mask."""
    L, S, N = q_shape[-2], k_shape[-2], q_shape[0]
    rows, cols = torch.arange(L)[:, None], torch.arange(S)[None, :]
    if kind.startswith("causal"):  # top-left, as is_causal
        visible = (cols <= rows).expand(N, 1, L, S)
    elif kind.startswith("window"):  # bottom-right causal window of 5 keys
        visible = ((cols <= rows + S - L) & (cols > rows + S - L - 5)).expand(N, 1, L, S)
    else:
        visible = torch.ones(N, 1, L, S, dtype=torch.bool)
    if "padding" in kind:  # left padding in row 0, right padding in row 1
        visible = visible.clone()
        visible[0, ..., :3] = False
        if N > 1:
            visible[1, ..., S - 4:] = False
    if "documents" in kind:  # packed documents (L = S), split differently per batch row
        document = torch.stack([torch.arange(S) // (4 + b) for b in range(N)])  # (N, S)
        visible = visible & (document[:, None, :, None] == document[:, None, None, :])
    if "2d" in kind:
        visible = visible[0, 0]
    elif "3d" in kind:
        visible = visible[:, 0]
    if kind.endswith("float"):
        return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, -math.inf).to(device)
    return visible.to(device)


SDPA_MASK_CASES = [
    ((2, 3, 17, 32), (2, 3, 29, 32), "padding"),
    ((2, 3, 17, 32), (2, 3, 17, 32), "causal-padding-float"),
    ((2, 3, 29, 32), (2, 3, 17, 32), "causal-2d"),
    ((2, 6, 21, 16), (2, 2, 33, 16), "window-padding"),
    ((3, 17, 24), (3, 25, 24), "window-padding-3d-float"),
    ((1, 2, 40, 64), (1, 2, 40, 64), "all-visible-float"),
    ((2, 3, 23, 16), (2, 3, 23, 16), "causal-documents"),
    ((2, 2, 30, 16), (2, 2, 30, 16), "documents-float"),
    ((2, 2, 30, 16), (2, 2, 30, 16), "window-documents"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("q_shape", "k_shape", "kind"), SDPA_MASK_CASES,
                         ids=[c[2] for c in SDPA_MASK_CASES])
def test_sdpa_masks_run_the_kernels(q_shape, k_shape, kind, dtype, backend, monkeypatch):
    """Causal, sliding-window, padding and packed documents' masks (bool or float, 2-D to 4-D)
    reach our kernels and give torch's result (rows with no visible key: 0, as torch)."""
    monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    device = device_of(backend)
    q = _randn(q_shape, dtype, device).requires_grad_(True)
    k = _randn(k_shape, dtype, device).requires_grad_(True)
    v = _randn(k_shape, dtype, device).requires_grad_(True)
    mask = _sdpa_mask(kind, q_shape, k_shape, dtype, device)
    gqa = {"enable_gqa": True} if q_shape[1] != k_shape[1] and len(q_shape) == 4 else {}
    OpDispatch.last_choice.pop("attention_fwd", None)
    out = fusedlm.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    assert OpDispatch.last_choice.get("attention_fwd") == backend, (
        "the call did not reach fusedlm's kernels"
    )
    _check_sdpa_against_torch(out, q, k, v, {"attn_mask": mask, **gqa})


def _compiled_sdpa(q, k, v, mask, gqa):
    """fusedlm.scaled_dot_product_attention under torch.compile(fullgraph=True), after
    checking the traced graph records the run-time-masked op (the mask is not read while
    tracing)."""
    def fn(q, k, v, mask):
        return fusedlm.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(q, k, v, mask)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert "fusedlm.attention_masked_fwd" in explanation.graphs[0].code
    return torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, mask)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.compile's torch.jit ones)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("q_shape", "k_shape", "kind"), SDPA_MASK_CASES,
                         ids=[c[2] for c in SDPA_MASK_CASES])
def test_compiled_sdpa_masks_run_the_kernels(q_shape, k_shape, kind, dtype, backend,
                                             monkeypatch):
    """Under torch.compile the mask is read when the graph runs: the same masks as
    test_sdpa_masks_run_the_kernels reach our kernels, forward and backward, and give torch's
    result by the rule."""
    monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    device = device_of(backend)
    q, k, v = (_randn(shape, dtype, device).requires_grad_(True)
               for shape in (q_shape, k_shape, k_shape))
    mask = _sdpa_mask(kind, q_shape, k_shape, dtype, device)
    gqa = {"enable_gqa": True} if q_shape[1] != k_shape[1] and len(q_shape) == 4 else {}
    for op in ("attention_fwd", "attention_bwd"):
        OpDispatch.last_choice.pop(op, None)
    out = _compiled_sdpa(q, k, v, mask, gqa)
    assert OpDispatch.last_choice.get("attention_fwd") == backend
    _check_sdpa_against_torch(out, q, k, v, {"attn_mask": mask, **gqa})
    assert OpDispatch.last_choice.get("attention_bwd") == backend


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["random-bool", "float-bias", "min-row"])
def test_compiled_sdpa_masks_our_kernels_cannot_take_give_torchs(kind):
    """Under torch.compile a mask that is not one run of keys per query (found at run time)
    gives exactly torch's SDPA forward, and gradients (written out in float32) that pass the
    rule against torch's (float64 as the truth)."""
    heads = (4, 2) if kind == "random-bool" else (2, 2)  # (grouped-query heads)
    q, k, v = (t.requires_grad_(True) for t in _qkv((2, *heads, 13, 17, 16), torch.float32,
                                                     "cpu"))
    gqa = {"enable_gqa": True} if heads[0] != heads[1] else {}
    torch.manual_seed(3)
    if kind == "random-bool":
        mask = torch.rand(13, 17) > 0.3
        mask[2] = False  # a query that sees no key: 0 out, no gradient
    elif kind == "float-bias":
        mask = torch.randn(2, 1, 13, 17)
    else:  # a row holding the dtype's min and no 0: torch spreads it over the row
        mask = torch.zeros(13, 17).masked_fill(torch.ones(13, 17, dtype=torch.bool).triu(5),
                                               -math.inf)
        mask[4] = torch.finfo(torch.float32).min
    OpDispatch.last_choice.pop("attention_fwd", None)
    ours = _compiled_sdpa(q, k, v, mask, gqa)
    assert "attention_fwd" not in OpDispatch.last_choice
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if kind != "min-row":  # (that row's scores round to the mask's value, and each
        # implementation's backward makes its own gradient of the rounding: no truth to hold)
        _check_sdpa_against_torch(ours, q, k, v, {"attn_mask": mask, **gqa})


@pytest.mark.parametrize("captured", ["forward", "backward"])
def test_masked_op_across_a_cuda_graph_capture(captured, monkeypatch):
    """A CUDA graph capture (mode="reduce-overhead") forbids reading the mask on the host:
    the captured pass takes torch's route. Forward captured, backward not: the backward sees
    the forward's +inf lse and stays on torch's route; backward captured: its written-out
    gradients need nothing of the forward. Either way the gradients pass the rule. (Simulated
    on the CPU; the GPU test below captures for real.)"""
    attention_ops = sys.modules["fusedlm.ops.attention"]  # (the package exports a function of
    # that name)
    q, k, v = _qkv((2, 4, 2, 11, 11, 16), torch.float32, "cpu")
    mask = _sdpa_mask("causal-padding", q.shape, k.shape, torch.float32, "cpu")
    backend = "cpu" if cpu_backend_available() else "torch"
    monkeypatch.setattr(attention_ops, "_capturing", lambda t: captured == "forward")
    out, lse = torch.ops.fusedlm.attention_masked_fwd(q, k, v, mask, 0.25, backend)
    assert bool((lse == math.inf).all()) == (captured == "forward")
    monkeypatch.setattr(attention_ops, "_capturing", lambda t: captured == "backward")
    grad = torch.randn_like(out)
    ours = torch.ops.fusedlm.attention_masked_bwd(grad, q, k, v, out, lse, mask, 0.25, backend)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(
        *leaves, attn_mask=mask, scale=0.25, enable_gqa=True), leaves, grad)
    truth = torch.autograd.grad(F.scaled_dot_product_attention(
        *leaves64, attn_mask=mask, scale=0.25, enable_gqa=True), leaves64, grad.double())
    for name, a, b, c in zip("qkv", ours, theirs, truth, strict=True):
        assert_close_rule(a, b, c, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compiled_sdpa_mask_under_cuda_graphs(dtype):
    """torch.compile(mode="reduce-overhead") with a padding mask: warm-up, recording and
    replays run (no host read of the mask inside a capture), forward and backward, and match
    torch's SDPA by the rule."""
    q, k, v = (t.requires_grad_(True) for t in _qkv((2, 4, 2, 64, 64, 64), dtype, "cuda"))
    mask = _sdpa_mask("causal-padding", q.shape, k.shape, dtype, "cuda")

    def fn(q, k, v):
        return fusedlm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(q, k, v).clone()
        _check_sdpa_against_torch(out, q, k, v, {"attn_mask": mask, "enable_gqa": True})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", ["-inf", "min", "-inf and min"])
def test_sdpa_float_mask_row_with_no_visible_key(hidden, backend, monkeypatch):
    """An additive mask's row with no 0 entry: torch's SDPA gives 0 where the row is all -inf
    (our kernels too), but a softmax over the row's finite entries where it holds the dtype's
    min (about the mean of v, not 0): such a mask goes to torch. (Found by
    test_fuzz_sdpa_masks: our kernels gave 0 there.)"""
    monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    device = device_of(backend)
    dtype = torch.float32
    q, k, v = _qkv((2, 2, 2, 5, 7, 16), dtype, device)
    minimum = torch.finfo(dtype).min
    visible = torch.ones(5, 7, dtype=torch.bool).tril(2)  # causal (bottom-right)...
    visible[3] = False  # ...with row 3 empty
    mask = torch.zeros(5, 7, dtype=dtype).masked_fill(~visible, -math.inf)
    if hidden == "min":
        mask = mask.masked_fill(~visible, minimum)
    elif hidden == "-inf and min":
        mask[3, :3] = minimum
    mask = mask.to(device)
    OpDispatch.last_choice.pop("attention_fwd", None)
    ours = fusedlm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reached_kernels = OpDispatch.last_choice.get("attention_fwd") == backend
    assert reached_kernels == (hidden == "-inf")
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if hidden == "-inf":
        assert (ours[:, :, 3] == 0).all()
        _check_sdpa_against_torch(ours, q, k, v, {"attn_mask": mask})  # DESIGN.md's rule
    else:
        assert (theirs[:, :, 3] != 0).any()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_mask_layout_of_packed_documents():
    """A block-diagonal causal mask (Hugging Face's packed sequences) becomes per-query key
    ranges plus the causal offset that bounds them; a mask with a gap in a row stays None."""
    from fusedlm.ops.attention import mask_layout

    document = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    visible = (document[:, None] == document[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    causal_offset, window_offset, key_range = mask_layout(visible[None, None], 8, 8)
    assert (causal_offset, window_offset) == (0, -2)
    assert key_range.dtype == torch.int32 and key_range.shape == (1, 8, 2)
    starts = fusedlm.key_range_from_document_ids(document[None])[..., 0]
    assert torch.equal(key_range[..., 0], starts)  # each query's run: its document's start..
    assert torch.equal(key_range[0, :, 1], torch.arange(1, 9, dtype=torch.int32))  # ..itself
    gap = visible.clone()
    gap[7, 0] = True  # row 7 sees keys 0 and 5..7
    assert mask_layout(gap[None, None], 8, 8) is None


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"attn_mask": "bool", "scale": 0.5},
        {"dropout_p": 1.0, "is_causal": True},
    ],
    ids=["bool_mask", "float_mask", "bool_mask_scale", "dropout_one"],
)
def test_sdpa_falls_back_to_torch(kwargs, backend, monkeypatch):
    """What the kernels cannot do (masks that are no band of keys: random patterns, biases;
    dropout_p = 1) gives exactly torch's result. (Dropout below 1 runs in our kernels:
    tests/ops/test_attention_dropout.py.)"""
    if backend != "auto":
        monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    device = device_of(backend) if backend != "auto" else "cpu"
    q, k, v = _qkv((2, 2, 2, 13, 17, 16), torch.float32, device)
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(13, 17, device=device) > 0.3
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 13, 17, device=device)
    torch.manual_seed(1234)
    ours = fusedlm.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.manual_seed(1234)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def test_sdpa_head_mismatch_without_enable_gqa_raises_like_torch():
    q, k, v = _qkv((1, 4, 2, 5, 5, 8), torch.float32, "cpu")
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(type(theirs.value)):
        fusedlm.scaled_dot_product_attention(q, k, v)


def test_sdpa_signature_is_torchs():
    import inspect

    ours = inspect.signature(fusedlm.scaled_dot_product_attention)
    names = list(ours.parameters)
    assert names == [
        "query",
        "key",
        "value",
        "attn_mask",
        "dropout_p",
        "is_causal",
        "scale",
        "enable_gqa",
    ]
    defaults = {
        n: p.default for n, p in ours.parameters.items() if p.default is not inspect.Parameter.empty
    }
    assert defaults == {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }


# ---- gradcheck / opcheck -------------------------------------------------------------------


GRADCHECK_SHAPES = [(1, 2, 1, 3, 5, 4), (1, 2, 2, 5, 3, 4), (2, 1, 1, 4, 4, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "shape",
    GRADCHECK_SHAPES,
    ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in GRADCHECK_SHAPES],
)
def test_attention_gradcheck(shape, causal, backend):
    q, k, v = (t.requires_grad_(True) for t in _qkv(shape, torch.float64, device_of(backend)))
    assert torch.autograd.gradcheck(
        lambda a, b, c: fusedlm.attention(a, b, c, causal=causal, backend=backend), (q, k, v)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_attention(causal, dtype, backend):
    device = device_of(backend)
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 4, 2, 7, 9, 16), dtype, device))
    scale, offset = 0.25, 9 - 7
    torch.library.opcheck(
        torch.ops.fusedlm.attention_fwd.default, (q, k, v, scale, causal, offset, backend)
    )
    with torch.no_grad():
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, scale, causal, offset, backend)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fusedlm.attention_bwd.default,
        (grad_out, q.detach(), k.detach(), v.detach(), out, lse, scale, causal, offset, backend),
    )
    # A sliding window: the optional last argument, key j visible only from i + window_offset.
    window_offset = offset - 3
    torch.library.opcheck(
        torch.ops.fusedlm.attention_fwd.default,
        (q, k, v, scale, causal, offset, backend, window_offset),
    )
    with torch.no_grad():
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, scale, causal, offset, backend,
                                                   window_offset)
    torch.library.opcheck(
        torch.ops.fusedlm.attention_bwd.default,
        (grad_out, q.detach(), k.detach(), v.detach(), out, lse, scale, causal, offset, backend,
         window_offset),
    )
    # A key range (padded batch): the optional argument after the window.
    key_range = torch.tensor([[1, 5]] * q.shape[0], dtype=torch.int32, device=q.device)
    torch.library.opcheck(
        torch.ops.fusedlm.attention_fwd.default,
        (q, k, v, scale, causal, offset, backend, window_offset, key_range),
    )
    with torch.no_grad():
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, scale, causal, offset, backend,
                                                   window_offset, key_range)
    torch.library.opcheck(
        torch.ops.fusedlm.attention_bwd.default,
        (grad_out, q.detach(), k.detach(), v.detach(), out, lse, scale, causal, offset, backend,
         window_offset, key_range),
    )
    # A gradient of lse (return_lse, sinks): the last optional argument.
    torch.library.opcheck(
        torch.ops.fusedlm.attention_bwd.default,
        (grad_out, q.detach(), k.detach(), v.detach(), out, lse, scale, causal, offset, backend,
         window_offset, key_range, torch.randn_like(lse)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_gradcheck_through_lse_and_sinks(causal, backend):
    """Numerical gradients of (out, lse) with sinks, float64: q, k, v and the sinks."""
    q, k, v = (t.requires_grad_(True)
               for t in _qkv((1, 4, 2, 4, 6, 3), torch.float64, device_of(backend)))
    sinks = torch.randn(4, dtype=torch.float64, device=q.device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, s: fusedlm.attention(a, b, c, causal=causal, sinks=s, return_lse=True,
                                             backend=backend), (q, k, v, sinks))
    assert torch.autograd.gradcheck(
        lambda a, b, c: fusedlm.attention(a, b, c, causal=causal, return_lse=True,
                                          backend=backend)[1], (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["causal-padding", "documents-float", "gaps"])
def test_opcheck_attention_masked(kind, dtype, backend):
    """The run-time-masked op (torch.compile's route for masks): its schema, fake and
    autograd registration hold for a mask our kernels take and one they do not ("gaps")."""
    device = device_of(backend)
    q, k, v = (t.requires_grad_(True) for t in _qkv((2, 4, 2, 9, 9, 16), dtype, device))
    if kind == "gaps":  # (every query sees itself: no row of NaN)
        mask = ((torch.rand(2, 1, 9, 9) > 0.4) | torch.eye(9, dtype=torch.bool)).to(device)
    else:
        mask = _sdpa_mask(kind, q.shape, k.shape, dtype, device)
    torch.library.opcheck(torch.ops.fusedlm.attention_masked_fwd.default,
                          (q, k, v, mask, 0.25, backend))
    with torch.no_grad():
        out, lse = torch.ops.fusedlm.attention_masked_fwd(q, k, v, mask, 0.25, backend)
    assert (lse == math.inf).all() == (kind == "gaps")  # torch's SDPA gives no lse
    torch.library.opcheck(torch.ops.fusedlm.attention_masked_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           mask, 0.25, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_attention_fwd_op_lse(dtype, backend):
    """The op's lse is logsumexp of the visible scores (float32, float64 for float64 inputs),
    -inf on rows that see no key, for any causal_offset (top-left 0 included)."""
    device = device_of(backend)
    q, k, v = _qkv((1, 2, 2, 9, 6, 8), dtype, device)
    for offset in (-3, 0, 6 - 9):
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.5, True, offset, backend)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        scores = (q.double() @ k.double().transpose(-1, -2)) * 0.5
        visible = torch.arange(6)[None, :] <= torch.arange(9)[:, None] + offset
        expected = scores.masked_fill(~visible.to(device), -math.inf).logsumexp(-1)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(lse.double(), expected, rtol=tol, atol=tol)
        truth = naive_attention(
            q.double(), k.double(), v.double(), scale=0.5, causal=True, causal_offset=offset
        )
        base = naive_attention(q, k, v, scale=0.5, causal=True, causal_offset=offset)
        atol = 1e-2 if dtype == torch.bfloat16 else None
        assert_close_rule(out, base, truth, atol=atol, name=f"out (offset {offset})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_empty_inputs(backend):
    device = device_of(backend)
    for shape in [(0, 2, 2, 5, 5, 8), (1, 2, 2, 0, 5, 8), (1, 2, 2, 5, 0, 8)]:
        q, k, v = (t.requires_grad_(True) for t in _qkv(shape, torch.float32, device))
        out = fusedlm.attention(q, k, v, causal=False, backend=backend)
        assert out.shape == q.shape
        out.sum().backward()
        if shape[4] == 0:  # no keys: every row sees nothing and gives 0
            assert torch.equal(out, torch.zeros_like(out))


# ---- memory: the cpu kernels never hold a T x T matrix ---------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, fusedlm

    def status_kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    backend, backward = sys.argv[1], sys.argv[2] == "1"
    T = 8192
    q, k, v = (torch.randn(1, 1, T, 64, requires_grad=backward) for _ in range(3))
    fusedlm.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True, backend=backend)
    # Reset the peak-RSS mark to the current RSS, so the growth is measured from here rather
    # than from the import's peak (which the process may since have fallen well below).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = status_kib("VmHWM")
    out = fusedlm.attention(q, k, v, causal=True, backend=backend)
    if backward:
        out.sum().backward()
    print((status_kib("VmHWM") - before) * 1024)
    """
)


def _peak_rss_growth(backend: str, backward: bool) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("FUSEDLM_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, backend, "1" if backward else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


TXT_BYTES = 8192 * 8192 * 4  # one float32 T x T matrix: 256 MiB


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_cpu_attention_memory_is_not_quadratic(backend):
    growth = _peak_rss_growth(backend, backward=True)
    assert growth < TXT_BYTES // 4, (
        f"attention forward+backward at T=8192 grew peak RSS by {growth / 2**20:.0f} MiB; a T x T "
        f"float32 buffer is {TXT_BYTES / 2**20:.0f} MiB"
    )


@pytest.mark.slow
def test_memory_probe_sees_a_quadratic_buffer():
    """Control for the test above: the torch reference materialises the T x T scores, and the
    same measurement reports it. It holds at least two T x T float32 buffers at once (512 MiB);
    the bound is half that, twice the cpu test's limit, leaving room for file pages (torch's
    libraries) the kernel may evict from this process under memory pressure during the call.
    The probe once measured from ru_maxrss, whose import-time peak hid most of the growth (121
    MiB seen on CI); it now resets the high-water mark just before the call."""
    growth = _peak_rss_growth("torch", backward=False)
    assert growth >= TXT_BYTES // 2, f"peak RSS grew by only {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_without_autograd_skips_the_function(backend, monkeypatch):
    """Under torch.no_grad() or with no input requiring grad (inference, generation), the
    forward runs without an autograd.Function and gives the grad-mode output bit for bit; a
    key alone requiring grad still gets its gradient."""
    device = device_of(backend)
    q, k, v = _qkv((2, 4, 2, 9, 9, 16), torch.float32, device)
    expected = fusedlm.attention(q.requires_grad_(True), k, v, causal=True,
                                 backend=backend).detach()
    q.requires_grad_(False)

    def refuse(*_):
        raise AssertionError("the autograd.Function ran without autograd")

    with monkeypatch.context() as m:
        # (fusedlm.ops.attention is the function; the module is in sys.modules)
        m.setattr(sys.modules["fusedlm.ops.attention"]._AttentionEager, "apply", refuse)
        with torch.no_grad():
            no_grad = fusedlm.attention(q.clone().requires_grad_(True), k, v, causal=True,
                                        backend=backend)
        plain = fusedlm.attention(q, k, v, causal=True, backend=backend)
    for out in (no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    key = k.clone().requires_grad_(True)
    out = fusedlm.attention(q, key, v, causal=True, backend=backend)
    out.sum().backward()
    assert key.grad is not None and key.grad.shape == k.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_under_autocast_is_attention_in_its_dtype(backend):
    """Under bfloat16 autocast, float32 q, k, v are cast to bfloat16 as torch's SDPA casts them,
    and the result is the plain bfloat16 call's, bit for bit (autocast does not recast what
    the kernels or the torch reference run inside; the op's lse stays float32); gradients
    reach the float32 leaves in float32."""
    device = device_of(backend)
    device_type = torch.device(device).type
    leaves = [t.requires_grad_(True) for t in _qkv((2, 4, 2, 21, 21, 16), torch.float32, device)]
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = fusedlm.attention(*leaves, causal=True, backend=backend)
        sdpa = fusedlm.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        _, lse = torch.ops.fusedlm.attention_fwd(*(t.detach().bfloat16() for t in leaves),
                                                 0.25, True, 0, backend)
    half = [t.detach().bfloat16().requires_grad_(True) for t in leaves]
    expected = fusedlm.attention(*half, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16 and sdpa.dtype == torch.bfloat16
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    expected_grads = torch.autograd.grad(expected, half, grad)
    for g, g_half in zip(grads, expected_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_half.float(), rtol=0, atol=0)


def test_attention_under_torch_func_transforms():
    """vmap, jacrev, jvp and forward-mode AD run the torch reference (the kernels have no
    batching or forward-mode rules) and agree with the naive softmax(q k^T) v under the same
    transform."""
    q, k, v = _qkv((3, 2, 2, 5, 7, 16), torch.float64, "cpu")
    tangent = torch.randn_like(q)

    def ours(q, k, v):
        return fusedlm.attention(q[None], k[None], v[None], causal=True)[0]

    def theirs(q, k, v):  # (torch's CPU SDPA has no forward-mode AD)
        return naive_attention(q[None], k[None], v[None], causal=True)[0]

    for transform in (
        lambda f: torch.vmap(f)(q, k, v),
        lambda f: torch.func.jacrev(f, argnums=(0, 1, 2))(q[0], k[0], v[0]),
        lambda f: torch.func.jvp(lambda qi: f(qi, k[0], v[0]), (q[0],), (tangent[0],))[1],
    ):
        torch.testing.assert_close(transform(ours), transform(theirs), rtol=1e-10, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q[0], tangent[0])
        got = torch.autograd.forward_ad.unpack_dual(ours(dual, k[0], v[0])).tangent
    expected = torch.func.jvp(lambda qi: theirs(qi, k[0], v[0]), (q[0],), (tangent[0],))[1]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_attention_kernel_backend_named_under_vmap_raises(backend):
    q, k, v = _qkv((3, 2, 2, 5, 7, 16), torch.float32, device_of(backend))
    with pytest.raises(fusedlm.BackendNotSupportedError, match="torch.func transforms"):
        torch.vmap(lambda q, k, v: fusedlm.attention(q[None], k[None], v[None], backend=backend))(
            q, k, v
        )


def test_attention_gradient_is_not_differentiable_again():
    """With create_graph=True a first backward works and a second one raises, instead of
    returning a silently wrong (zero) second derivative."""
    q, k, v = _qkv((1, 2, 2, 5, 5, 16), torch.float32, "cpu")
    q.requires_grad_(True)
    (dq,) = torch.autograd.grad(fusedlm.attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()
