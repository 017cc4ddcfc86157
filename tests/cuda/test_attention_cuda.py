"""The CUDA flash-attention kernels (csrc/cuda/attention_fwd.cu, attention_bwd.cu) through
``fusedlm.attention(..., backend="cuda")`` and the ``fusedlm::attention_fwd/bwd`` ops: odd and
realistic shapes (up to 16k tokens), every head dim template and the padded ones, GQA/MQA,
Tq != Tk both ways, the logsumexp, rows that see no key, strided/packed/expanded/misaligned
inputs, 64-bit offsets, many heads, sliding windows, key ranges per batch row and per query,
determinism, the current stream, CUDA-graph capture, and what the backend refuses.

Truth: the naive softmax(q k^T * scale) v in float64 on the GPU, computed in chunks of query
rows (``_truth``): a query row's output, logsumexp and dq depend on that row alone, and dk/dv
are sums over rows, so chunking changes nothing but the order of a float64 sum, and the truth
stays exact at 16k tokens (whose float64 score matrix, 32 GiB per 16 heads, cannot be held
whole). Baseline: torch's own SDPA at the input's precision (``_sdpa_baseline``: flash or
memory-efficient where torch picks them, its math path with float16/bfloat16 reductions
otherwise). A result passes by the rule of tests/helpers.py (err <= 2 * baseline err + atol).

Everything here needs a GPU and a CUDA build of fusedlm._C with the attention kernels: a GPU
without them fails these tests rather than skipping them (CUDA code must pass on a GPU to count).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import fusedlm
from fusedlm import _ext
from fusedlm.backends import OpDispatch
from tests.helpers import assert_close_rule, atol_for, naive_attention

pytestmark = pytest.mark.gpu

ATTENTION_OPS = ("attention_fwd", "attention_bwd")
LOW = (torch.float16, torch.bfloat16)
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
DTYPE = pytest.mark.parametrize("dtype", LOW, ids=str)


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    module = _ext.load()
    assert module is not None, f"fusedlm._C does not load: {_ext.why_unavailable()}"
    assert module.built_with_cuda(), "fusedlm._C was built without CUDA"
    missing = [op for op in ATTENTION_OPS if op not in module.cuda_ops()]
    assert not missing, f"no CUDA kernels for {missing} in this build"


# ---- inputs, truth, baseline, comparison -----------------------------------------------------


def _randn(shape, dtype, scale=1.0):
    return (scale * torch.randn(shape, dtype=torch.float64, device="cuda")).to(dtype)


def _qkv(shape, dtype, scale=1.0):
    B, Hq, Hkv, Tq, Tk, D = shape
    return (
        _randn((B, Hq, Tq, D), dtype, scale),
        _randn((B, Hkv, Tk, D), dtype, scale),
        _randn((B, Hkv, Tk, D), dtype),
    )


def _ids(shapes):
    return ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in shapes]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _default_scale(q):
    return 1.0 / math.sqrt(q.shape[-1])


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled), restored afterwards. Only fusedlm's kernels
    may run inside: torch's cuBLAS matmuls (the truth) raise under it without
    CUBLAS_WORKSPACE_CONFIG, and torch's flash backward (the baseline) warns."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _truth(q, k, v, scale, causal, causal_offset=None, grad_out=None, chunk_elems=1 << 27):
    """float64 (out, lse, (dq, dk, dv) or None) of the naive math, in chunks of query rows of
    at most ``chunk_elems`` scores each (1 GiB of float64; autograd holds a few of them).

    GQA without repeating k/v: q (B, Hq, Tq, D) is viewed as (B, Hkv, G * rows, D), query head
    h = kv * G + g using kv head h // G, as repeat_interleave would pair them. Key j is visible
    to query i iff not causal or j <= i + causal_offset (default Tk - Tq: bottom-right); a row
    that sees no key has out 0, lse -inf and zero grads."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if causal_offset is None:
        causal_offset = Tk - Tq
    backward = grad_out is not None
    q5 = q.detach().double().reshape(B, Hkv, G, Tq, D)
    k64 = k.detach().double().requires_grad_(backward)
    v64 = v.detach().double().requires_grad_(backward)
    out = torch.empty(B, Hq, Tq, D, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float64, device=q.device)
    grads = None
    if backward:
        dq = torch.empty_like(out)
        dk, dv = torch.zeros_like(k64), torch.zeros_like(v64)
    rows = max(1, chunk_elems // max(1, B * Hq * Tk))
    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        n = r1 - r0
        qc = q5[:, :, :, r0:r1].contiguous().requires_grad_(backward)
        scores = (qc.reshape(B, Hkv, G * n, D) @ k64.transpose(-1, -2)).view(B, Hkv, G, n, Tk)
        scores = scores * scale
        if causal:
            i = torch.arange(r0, r1, device=q.device)[:, None]
            visible = torch.arange(Tk, device=q.device)[None, :] <= i + causal_offset
            scores = scores.masked_fill(~visible, -math.inf)
        lse[:, :, r0:r1] = torch.logsumexp(scores.detach(), dim=-1).reshape(B, Hq, n)
        probs = torch.softmax(scores, dim=-1)
        if causal:
            probs = probs.masked_fill(~visible.any(dim=-1)[:, None], 0.0)
        oc = (probs.reshape(B, Hkv, G * n, Tk) @ v64).view(B, Hkv, G, n, D)
        out[:, :, r0:r1] = oc.detach().reshape(B, Hq, n, D)
        if backward:
            go = grad_out[:, :, r0:r1].double().reshape(B, Hkv, G, n, D)
            gq, gk, gv = torch.autograd.grad(oc, (qc, k64, v64), go)
            dq[:, :, r0:r1] = gq.reshape(B, Hq, n, D)
            dk += gk
            dv += gv
        del scores, probs, oc
    if backward:
        grads = (dq, dk, dv)
    return out, lse, grads


def _sdpa_baseline(q, k, v, scale, causal, top_left=False):
    """torch's SDPA at q's dtype (autograd-able), causal bottom-right (or torch's own top-left).
    k/v are repeated to Hq heads (autograd sums their grads back). Tq < Tk uses torch's
    lower-right CausalBias; for Tq > Tk the first Tq - Tk rows see no key and are 0, and the
    rest is a square causal problem. Its math path (for shapes flash and memory-efficient
    refuse) is told to reduce in the input's precision, as those kernels do, rather than in
    float32."""
    B, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tk = k.shape[2]
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if Tq == Tk or top_left:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if Tq < Tk:
            mask = causal_lower_right(Tq, Tk)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        blind = Tq - Tk
        tail = F.scaled_dot_product_attention(q[:, :, blind:], k, v, is_causal=True, scale=scale)
        return torch.cat([tail.new_zeros(B, Hq, blind, D), tail], dim=2)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def _ours(q, k, v, causal, scale=None, grad_out=None):
    """fusedlm.attention(backend="cuda") on fresh leaves: out, and (dq, dk, dv) or None."""
    leaves = tuple(_leaf(t) for t in (q, k, v))
    out = fusedlm.attention(*leaves, causal=causal, scale=scale, backend="cuda")
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, leaves, grad_out)
    for name, g, src in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
        assert g.dtype == src.dtype and g.shape == src.shape, (
            f"{name}: {g.dtype} {tuple(g.shape)}, expected {src.dtype} {tuple(src.shape)}"
        )
    return out.detach(), grads


def _out_atol(dtype, truth):
    """bfloat16 forward: a looser absolute term (its 8-bit mantissa dominates), as in
    tests/ops/test_attention.py; the default of the rule otherwise."""
    return 1e-2 * max(1.0, truth.abs().max().item()) if dtype == torch.bfloat16 else None


def compare(q, k, v, causal, out, grads, grad_out=None, scale=None):
    """``out``/``grads`` (from ``_ours``) against the float64 truth by the rule, with torch's
    SDPA at q's dtype as the baseline. Runs torch's kernels: call outside ``deterministic()``."""
    scale = _default_scale(q) if scale is None else scale
    base_leaves = tuple(_leaf(t) for t in (q, k, v))
    out_base = _sdpa_baseline(*base_leaves, scale, causal)
    truth, _, truth_grads = _truth(q, k, v, scale, causal, grad_out=grad_out)
    assert_close_rule(out, out_base, truth, atol=_out_atol(q.dtype, truth), name="out")
    del truth
    if grads is None:
        return
    base_grads = torch.autograd.grad(out_base, base_leaves, grad_out)
    for name, g, g_base, g_truth in zip(("dq", "dk", "dv"), grads, base_grads, truth_grads,
                                        strict=True):
        assert_close_rule(g, g_base, g_truth, atol=atol_for(q.dtype, g_truth), name=name)


def check_attention(q, k, v, causal, scale=None, backward=True):
    grad_out = _randn(q.shape, q.dtype) if backward else None
    out, grads = _ours(q, k, v, causal, scale, grad_out)
    compare(q, k, v, causal, out, grads, grad_out, scale)


def compare_op(q, k, v, scale, causal, offset, out, grads=None, grad_out=None):
    """Op-level results for any ``causal_offset`` (torch's SDPA has no such argument) by the
    rule, with the naive math of tests/helpers.py at q's dtype as the baseline, as in
    tests/ops/test_attention.py."""
    leaves = tuple(_leaf(t) for t in (q, k, v))
    base = naive_attention(*leaves, scale=scale, causal=causal, causal_offset=offset)
    truth, _, truth_grads = _truth(q, k, v, scale, causal, offset, grad_out)
    assert_close_rule(out, base, truth, atol=_out_atol(q.dtype, truth), name="out")
    if grads is None:
        return
    base_grads = torch.autograd.grad(base, leaves, grad_out)
    for name, g, g_base, g_truth in zip(("dq", "dk", "dv"), grads, base_grads, truth_grads,
                                        strict=True):
        assert_close_rule(g, g_base, g_truth, atol=atol_for(q.dtype, g_truth), name=name)


# ---- forward + backward against the truth ----------------------------------------------------

# (B, Hq, Hkv, Tq, Tk, D): tiny and odd sizes
SHAPES = [
    (1, 1, 1, 1, 1, 64),  # one query, one key
    (2, 2, 2, 17, 17, 40),
    (1, 3, 3, 113, 113, 72),
    (1, 2, 2, 1000, 1000, 64),
    (3, 4, 2, 1000, 1000, 8),  # small head dim, GQA
    (1, 2, 2, 17, 113, 16),  # Tq < Tk
    (1, 2, 2, 113, 17, 160),  # Tq > Tk: causal rows that see no key
    (1, 2, 2, 1, 1000, 128),  # one query row (decoding)
    (2, 2, 2, 1000, 1, 32),  # one key: causal, only the last row sees it
    (1, 6, 2, 200, 333, 96),  # GQA (3 query heads per kv head)
    (2, 8, 1, 129, 65, 192),  # MQA, Tq > Tk, one row past a tile
    (1, 2, 2, 17, 17, 256),  # largest head dim
    (1, 4, 1, 257, 255, 256),  # MQA, several tiles of the largest head dim
    (1, 2, 2, 113, 113, 1),  # smallest head dim
    (1, 2, 2, 100, 77, 33),  # odd head dim (rows not 16-byte multiples: copied and padded)
]


@DTYPE
@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_attention(shape, causal, dtype):
    check_attention(*_qkv(shape, dtype), causal)


# Every fast template (32/64/96/128/192/256), dims padded up to each, and the edges around them.
HEAD_DIMS = [2, 24, 31, 32, 33, 48, 63, 64, 65, 80, 96, 100, 127, 128, 129, 176, 192, 200, 255]


@DTYPE
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(head_dim, dtype):
    check_attention(*_qkv((1, 4, 2, 150, 190, head_dim), dtype), True)


# Realistic sizes, 4k-16k tokens a batch (and a decoding step against 16k keys), checked
# whole: the truth is chunked (see _truth).
REALISTIC = [
    (1, 16, 16, 16384, 16384, 128),  # one 16k sequence
    (4, 16, 4, 4096, 4096, 64),  # GQA
    (2, 8, 1, 4096, 8192, 128),  # MQA, Tq < Tk (a prompt after a cached prefix)
    (4, 8, 2, 3000, 1000, 64),  # Tq > Tk, ragged: causal rows that see no key
    (8, 12, 12, 2048, 2048, 64),  # GPT-2 small
    (4, 8, 8, 2048, 2048, 96),
    (2, 8, 8, 2048, 2048, 192),
    (2, 8, 2, 2048, 2048, 256),  # largest head dim, GQA
    (2, 32, 8, 1, 16384, 128),  # decoding one token against 16k keys
]


@DTYPE
@CAUSAL
@pytest.mark.parametrize("shape", REALISTIC, ids=_ids(REALISTIC))
def test_attention_realistic(shape, causal, dtype):
    check_attention(*_qkv(shape, dtype), causal)


# Decoding (attention_fwd.cu's plan): with one query row a GQA group's query heads are packed
# into the rows of one tile, and where the grid leaves SMs idle the keys split over CTAs whose
# partial results a second kernel combines. (B, Hq, Hkv, Tq, Tk, D)
DECODE = [
    (1, 32, 8, 1, 4096, 128),  # Llama-style GQA step: packed, split
    (1, 12, 12, 1, 2048, 64),  # GPT-2 small step: split
    (4, 16, 2, 1, 1000, 96),  # packed, split
    (1, 8, 1, 7, 3000, 256),  # seven rows (speculative decoding), MQA, largest head dim: split
    (2, 4, 4, 33, 777, 192),  # a short prompt after a cached prefix: split
    (64, 12, 12, 1, 1024, 64),  # a batch that fills the SMs: neither
]


@DTYPE
@CAUSAL
@pytest.mark.parametrize("shape", DECODE, ids=_ids(DECODE))
def test_decode(shape, causal, dtype):
    check_attention(*_qkv(shape, dtype), causal)


@DTYPE
@pytest.mark.parametrize("Tk", [700, 16384])
def test_decode_on_kv_cache_views(Tk, dtype):
    """Decoding steps (packed, split) on a KV cache's filled positions, views of NaN-filled
    buffers with room for more (fusedlm.models.KVCache): the output and lse of contiguous copies
    (within rounding: the launcher may pick another kernel for other strides), and nothing read
    past the filled part."""
    B, Hq, Hkv, D = 2, 32, 8, 128
    q, k, v = _qkv((B, Hq, Hkv, 1, Tk, D), dtype)
    views = []
    for t in (k, v):
        buffer = torch.full((B, Hkv, Tk + 40, D), float("nan"), dtype=dtype, device="cuda")
        buffer[:, :, :Tk] = t
        views.append(buffer[:, :, :Tk])
    out, lse = torch.ops.fusedlm.attention_fwd(q, *views, D ** -0.5, True, Tk - 1, "cuda")
    out_copy, lse_copy = torch.ops.fusedlm.attention_fwd(q, k, v, D ** -0.5, True, Tk - 1, "cuda")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, out_copy, rtol=0, atol=atol_for(dtype, out_copy))
    torch.testing.assert_close(lse, lse_copy, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_scale(scale):
    check_attention(*_qkv((1, 2, 2, 70, 90, 64), torch.float16), True, scale=scale)


@DTYPE
def test_large_logits(dtype):
    """Scores of magnitude ~100 overflow exp() without a running-max softmax (forward; the
    low-precision backward of such peaked softmaxes is rounding noise for every kernel)."""
    q, k, v = _qkv((1, 2, 2, 300, 500, 64), dtype, scale=2.0)
    check_attention(q, k, v, False, scale=1.0, backward=False)


# ---- the logsumexp (op level) ----------------------------------------------------------------


def _assert_lse(lse, truth, name="lse"):
    """float32 lse vs the float64 truth: -inf exactly where the truth is -inf; elsewhere within
    1e-4 + 1e-5 |truth| (scores accumulate in float32 from exact products of the low-precision
    inputs, so this is float32 rounding of the scores and of the running sum, not the inputs')."""
    assert lse.dtype == torch.float32, f"{name}: dtype {lse.dtype}, expected float32"
    assert lse.shape == truth.shape, f"{name}: shape {tuple(lse.shape)} != {tuple(truth.shape)}"
    blind = torch.isneginf(truth)
    assert torch.equal(torch.isneginf(lse), blind), (
        f"{name}: -inf at {int(torch.isneginf(lse).sum())} rows, the truth at {int(blind.sum())}"
    )
    assert torch.isfinite(lse[~blind]).all(), f"{name}: NaN/Inf on rows that see keys"
    torch.testing.assert_close(lse[~blind].double(), truth[~blind], rtol=1e-5, atol=1e-4)


LSE_CASES = [
    # (shape, causal, causal_offset or None for bottom-right)
    ((2, 4, 2, 300, 500, 64), False, None),
    ((2, 4, 2, 300, 500, 64), True, None),
    ((1, 4, 1, 500, 130, 128), True, None),  # Tq > Tk: -inf rows
    ((1, 4, 4, 500, 130, 40), True, 0),  # top-left (what fusedlm.scaled_dot_product_attention uses)
    ((1, 2, 2, 200, 300, 96), True, -70),  # the first 70 rows see nothing, the last keys no row
    ((2, 2, 2, 1, 4000, 256), False, None),
]


@DTYPE
@pytest.mark.parametrize(("shape", "causal", "offset"), LSE_CASES,
                         ids=[f"{_ids([s])[0]}-{c}-{o}" for s, c, o in LSE_CASES])
def test_lse(shape, causal, offset, dtype):
    """torch.ops.fusedlm.attention_fwd returns lse (B, Hq, Tq) float32, natural log, -inf for
    rows that see no key, and an out that matches fusedlm.attention's and the truth."""
    q, k, v = _qkv(shape, dtype)
    scale = 0.3
    if offset is None:
        offset = shape[4] - shape[3]
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, scale, causal, offset, "cuda")
    _, lse_truth, _ = _truth(q, k, v, scale, causal, causal_offset=offset)
    _assert_lse(lse, lse_truth)
    assert out.dtype == dtype and out.shape == q.shape
    blind = torch.isneginf(lse_truth)
    assert torch.equal(out[blind], torch.zeros_like(out[blind])), "rows that see no key are not 0"
    compare_op(q, k, v, scale, causal, offset, out)
    if offset == shape[4] - shape[3]:
        public = fusedlm.attention(q, k, v, causal=causal, scale=scale, backend="cuda")
        assert torch.equal(out, public), "the op and fusedlm.attention differ"


@DTYPE
def test_lse_large_logits(dtype):
    q, k, v = _qkv((1, 2, 2, 200, 300, 64), dtype, scale=2.0)
    _, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 1.0, True, 100, "cuda")
    _assert_lse(lse, _truth(q, k, v, 1.0, True, causal_offset=100)[1])


# ---- rows that see no key ----------------------------------------------------------------------


def _poison_allocator():
    """Leave NaN in the caching allocator's free blocks (large and small pools): the kernels'
    outputs are allocated from them next, so a row or tile a kernel skips without writing shows
    up as NaN rather than as a lucky zero."""
    torch.cuda.empty_cache()  # the only free blocks left are the poisoned ones
    big = torch.full((64 << 20,), math.nan, dtype=torch.float16, device="cuda")
    small = [torch.full((n,), math.nan, device="cuda") for n in (1 << 17, 1 << 15, 1 << 12)]
    del big, small


@DTYPE
@pytest.mark.parametrize(("Tq", "Tk"), [(1000, 100), (130, 120), (17, 1), (300, 299)])
def test_rows_that_see_no_key(Tq, Tk, dtype):
    """Causal with Tq > Tk: the first Tq - Tk queries see no key (whole tiles of them for
    1000/100). Their output and dq are exactly 0, their lse -inf, and nothing anywhere is NaN."""
    q, k, v = _qkv((2, 8, 2, Tq, Tk, 64), dtype)
    grad_out = _randn(q.shape, dtype)
    blind = Tq - Tk
    _poison_allocator()
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.125, True, Tk - Tq, "cuda")
    _poison_allocator()
    dq, dk, dv = torch.ops.fusedlm.attention_bwd(
        grad_out, q, k, v, out, lse, 0.125, True, Tk - Tq, "cuda"
    )
    torch.cuda.synchronize()
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name}: {int(torch.isnan(t).sum())} NaN"
        assert torch.isfinite(t).all(), f"{name}: Inf"
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all()
    assert torch.isfinite(lse[:, :, blind:]).all()
    _poison_allocator()
    out_public, grads = _ours(q, k, v, True, None, grad_out)  # the public path, by the rule
    assert torch.equal(out_public, out)
    for name, g in zip(("dq", "dk", "dv"), grads, strict=True):
        assert torch.isfinite(g).all(), f"public {name}: NaN/Inf"
    assert torch.equal(grads[0][:, :, :blind], torch.zeros_like(grads[0][:, :, :blind]))
    compare(q, k, v, True, out_public, grads, grad_out)


@DTYPE
def test_keys_no_row_sees_have_zero_grads(dtype):
    """causal_offset = -70 (op level): the first 70 rows see no key and the last 70 keys are
    seen by no row, so their dk and dv are exactly 0."""
    Tq = Tk = 300
    q, k, v = _qkv((1, 4, 2, Tq, Tk, 64), dtype)
    grad_out = _randn(q.shape, dtype)
    _poison_allocator()
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.125, True, -70, "cuda")
    _poison_allocator()
    dq, dk, dv = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, 0.125, True, -70,
                                                 "cuda")
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: NaN/Inf"
    for name, t in (("out", out[:, :, :70]), ("dq", dq[:, :, :70]), ("dk", dk[:, :, -70:]),
                    ("dv", dv[:, :, -70:])):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} is not 0 where nothing is seen"
    compare_op(q, k, v, 0.125, True, -70, out, (dq, dk, dv), grad_out)


# ---- strided inputs ----------------------------------------------------------------------------
#
# A layout the kernel reads natively (last dim contiguous, (B, H, T) strides multiples of 8
# elements, 16-byte aligned base) and one the launcher copies first feed the kernel the same
# values, and the kernel's arithmetic (template, tiles, reduction order) depends on D, the
# dtype, causal and the lengths, never on strides. So the forward, and the backward in its
# deterministic mode, must equal the contiguous result bit for bit, whichever path a layout
# takes. (The default backward's dq sums with float atomics, whose order varies run to run: it
# is checked against the truth by the rule instead.)

B_, HQ_, HKV_, TQ_, TK_ = 2, 4, 2, 150, 190


def strided_layout(layout, dtype, D):
    """Non-contiguous (q, k, v) of shapes (2, 4, 150, D), (2, 2, 190, D) (k/v with 4 heads
    for "packed_qkv" and "expanded_mqa", q with 190 rows for "packed_qkv")."""
    B, Hq, Hkv, Tq, Tk = B_, HQ_, HKV_, TQ_, TK_
    if layout == "bthd":  # (B, T, H, D) projections viewed as (B, H, T, D): read natively
        return tuple(_randn((B, t, h, D), dtype).transpose(1, 2)
                     for t, h in ((Tq, Hq), (Tk, Hkv), (Tk, Hkv)))
    if layout == "packed_qkv":  # q, k, v of one (B, T, 3, H, D) projection (Tq = Tk, MHA)
        qkv = _randn((B, Tk, 3, Hq, D), dtype)
        return tuple(t.transpose(1, 2) for t in qkv.unbind(2))
    if layout == "packed_gqa":  # one (B, T, Hq + 2 Hkv, D) projection split along heads
        qkv = _randn((B, Tk, Hq + 2 * Hkv, D), dtype).transpose(1, 2)
        return qkv[:, :Hq, -Tq:], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    if layout == "expanded_kv":  # k/v expanded from one head: stride 0 along H
        return (_randn((B, Hq, Tq, D), dtype),
                _randn((B, 1, Tk, D), dtype).expand(B, Hkv, Tk, D),
                _randn((B, 1, Tk, D), dtype).expand(B, Hkv, Tk, D))
    if layout == "expanded_mqa":  # MQA written as k/v expanded to every query head
        return (_randn((B, Hq, Tq, D), dtype),
                _randn((B, 1, Tk, D), dtype).expand(B, Hq, Tk, D),
                _randn((B, 1, Tk, D), dtype).expand(B, Hq, Tk, D))
    if layout == "sliced_t":  # a slice along T: storage offsets, still aligned
        return (_randn((B, Hq, Tq + 8, D), dtype)[:, :, 8:],
                _randn((B, Hkv, Tk + 16, D), dtype)[:, :, :Tk],
                _randn((B, Hkv, Tk + 24, D), dtype)[:, :, 24:])
    if layout == "misaligned":  # a 1-element storage offset: no 16-byte access is aligned
        def off(shape):
            return _randn((math.prod(shape) + 1,), dtype)[1:].view(shape)

        return off((B, Hq, Tq, D)), off((B, Hkv, Tk, D)), off((B, Hkv, Tk, D))
    if layout == "odd_row_stride":  # rows of D + 1 elements: strides not multiples of 8
        return (_randn((B, Hq, Tq, D + 1), dtype)[..., :D],
                _randn((B, Hkv, Tk, D + 1), dtype)[..., 1:],
                _randn((B, Hkv, Tk, D + 1), dtype)[..., :D])
    if layout == "strided_last_dim":  # last dim with stride 2
        return (_randn((B, Hq, Tq, 2 * D), dtype)[..., ::2],
                _randn((B, Hkv, Tk, 2 * D), dtype)[..., 1::2],
                _randn((B, Hkv, Tk, D, 2), dtype)[..., 0])
    raise ValueError(layout)


LAYOUTS = ["bthd", "packed_qkv", "packed_gqa", "expanded_kv", "expanded_mqa", "sliced_t",
           "misaligned", "odd_row_stride", "strided_last_dim"]


def _view_leaves(ts):
    """The views themselves as autograd leaves (their bases do not require grad), so the
    grads are the kernel's, not torch's sums over an expand."""
    return tuple(t.requires_grad_(True) for t in ts)


@DTYPE
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout, head_dim, dtype):
    q, k, v = strided_layout(layout, dtype, head_dim)
    assert any(not t.is_contiguous() or t.data_ptr() % 16 for t in (q, k, v))
    dense = tuple(t.contiguous() for t in (q, k, v))
    grad_out = _randn(q.shape, dtype)
    grad_out_t = grad_out.transpose(1, 2).contiguous().transpose(1, 2)  # a strided grad_out
    with deterministic():
        ours = _view_leaves(tuple(t.detach() for t in (q, k, v)))
        out = fusedlm.attention(*ours, causal=True, backend="cuda")
        grads = torch.autograd.grad(out, ours, grad_out_t)
        ref_leaves = _view_leaves(tuple(t.clone() for t in dense))
        out_ref = fusedlm.attention(*ref_leaves, causal=True, backend="cuda")
        grads_ref = torch.autograd.grad(out_ref, ref_leaves, grad_out)
    assert torch.equal(out, out_ref), (
        f"{layout}: forward differs from the contiguous inputs' by up to "
        f"{(out.double() - out_ref.double()).abs().max().item():.3e}"
    )
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        assert torch.equal(g, g_ref), (
            f"{layout}: deterministic {name} differs from the contiguous inputs' by up to "
            f"{(g.double() - g_ref.double()).abs().max().item():.3e}"
        )
    # the default (atomic dq) backward on the strided inputs, by the rule
    leaves = _view_leaves(tuple(t.detach() for t in (q, k, v)))
    out = fusedlm.attention(*leaves, causal=True, backend="cuda")
    compare(dense[0], dense[1], dense[2], True, out.detach(),
            torch.autograd.grad(out, leaves, grad_out_t), grad_out)


def test_offsets_past_int32():
    """Element offsets above 2**31 (a batch stride of 2**31 elements in one 4 GiB buffer): the
    kernels' and the launcher's offsets are 64-bit."""
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
    grad = _randn((B, H, T, D), torch.float16)
    with deterministic():
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.125, True, 0, "cuda")
        out_ref, lse_ref = torch.ops.fusedlm.attention_fwd(*dense, 0.125, True, 0, "cuda")
        grads = torch.ops.fusedlm.attention_bwd(grad, q, k, v, out, lse, 0.125, True, 0, "cuda")
        grads_ref = torch.ops.fusedlm.attention_bwd(grad, *dense, out, lse, 0.125, True, 0,
                                                    "cuda")
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)
    del buf, q, k, v
    check_attention(*dense, True)


MANY_HEADS = [(70000, 1, 1, 8, 8, 32), (1100, 64, 64, 8, 8, 32)]


@pytest.mark.parametrize("shape", MANY_HEADS, ids=_ids(MANY_HEADS))
def test_many_heads(shape):
    """B * H = 70000 and more (in B, then in H, for query and kv heads alike): more blocks than
    a 65535-block grid dimension holds. The baseline is the naive math (compare_op): torch's
    flash kernel may itself put the batch in a 65535-limited grid dimension."""
    q, k, v = _qkv(shape, torch.bfloat16)
    grad_out = _randn(q.shape, torch.bfloat16)
    out, grads = _ours(q, k, v, True, None, grad_out)
    compare_op(q, k, v, _default_scale(q), True, 0, out, grads, grad_out)


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5, 64), (1, 2, 2, 0, 5, 64), (1, 2, 2, 5, 0, 64)],
                         ids=["B0", "Tq0", "Tk0"])
def test_empty_inputs_op_level(shape):
    """The ops themselves take empty inputs (no zero-block launch): no keys gives out 0 and lse
    -inf; the grads have q/k/v's shapes (and are 0 without keys)."""
    q, k, v = _qkv(shape, torch.float16)
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.5, True, shape[4] - shape[3], "cuda")
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    if shape[4] == 0:
        assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    grads = torch.ops.fusedlm.attention_bwd(
        torch.ones_like(out), q, k, v, out, lse, 0.5, True, shape[4] - shape[3], "cuda"
    )
    torch.cuda.synchronize()
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    if shape[4] == 0:
        assert torch.equal(grads[0], torch.zeros_like(grads[0]))


# ---- determinism -----------------------------------------------------------------------------

DETERMINISM_SHAPES = [
    (2, 8, 2, 2048, 2048, 128),  # GQA: dk/dv summed over 4 query heads
    (1, 16, 4, 1000, 3000, 64),  # Tq < Tk
    (4, 8, 1, 777, 777, 96),  # MQA, padded head dim
]


@pytest.mark.parametrize(("shape", "causal", "dtype"), [
    (DETERMINISM_SHAPES[0], True, torch.bfloat16),
    (DETERMINISM_SHAPES[1], False, torch.float16),
    (DETERMINISM_SHAPES[2], True, torch.float16),
], ids=_ids(DETERMINISM_SHAPES))
def test_deterministic_backward(shape, causal, dtype):
    """Under torch.use_deterministic_algorithms(True), repeated backward calls give bitwise
    identical dq/dk/dv, and those pass the rule like the default (atomic) ones."""
    q, k, v = _qkv(shape, dtype)
    grad_out = _randn(q.shape, dtype)
    with deterministic():
        out, first = _ours(q, k, v, causal, None, grad_out)
        for _ in range(2):
            out_again, again = _ours(q, k, v, causal, None, grad_out)
            assert torch.equal(out, out_again)
            for name, a, b in zip(("dq", "dk", "dv"), first, again, strict=True):
                assert torch.equal(a, b), (
                    f"deterministic {name} differs between calls by up to "
                    f"{(a.double() - b.double()).abs().max().item():.3e}"
                )
    assert not torch.are_deterministic_algorithms_enabled()
    compare(q, k, v, causal, out, first, grad_out)


@pytest.mark.parametrize("shape", [
    (2, 8, 2, 2048, 2048, 128),
    (4, 32, 8, 1, 16384, 128),  # decoding: where a split over keys would be tempting
    (2, 4, 4, 100, 5000, 256),
], ids=_ids([(2, 8, 2, 2048, 2048, 128), (4, 32, 8, 1, 16384, 128), (2, 4, 4, 100, 5000, 256)]))
def test_forward_is_deterministic(shape):
    """The forward (out and lse) is bitwise reproducible without deterministic mode."""
    assert not torch.are_deterministic_algorithms_enabled()
    q, k, v = _qkv(shape, torch.bfloat16)
    offset = shape[4] - shape[3]
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.1, True, offset, "cuda")
    for _ in range(3):
        out2, lse2 = torch.ops.fusedlm.attention_fwd(q, k, v, 0.1, True, offset, "cuda")
        assert torch.equal(out, out2) and torch.equal(lse, lse2)


# ---- streams, CUDA graphs, host syncs ----------------------------------------------------------


def test_runs_on_the_current_stream():
    """On a busy side stream, v is changed behind a long sleep and then the ops run: a kernel
    launched on any other stream would read the old v."""
    q, k, v = _qkv((2, 8, 2, 1024, 1024, 128), torch.bfloat16)
    grad_out = _randn(q.shape, torch.bfloat16)
    args = (0.1, True, 0)
    with deterministic():
        v1 = v + 1
        expected = torch.ops.fusedlm.attention_fwd(q, k, v1, *args, "cuda")
        expected_bwd = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v1, *expected, *args,
                                                       "cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            v.add_(1)
            out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
            grads = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, *args, "cuda")
        torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    for got, want in zip(grads, expected_bwd, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1200, 64), (1, 32, 8, 1, 4096, 128)],
                         ids=["prefill", "decode-split"])
def test_cuda_graph_forward(shape):
    """The forward launches on the capturing stream (a launch on the legacy default stream
    makes capture fail) and a replay recomputes from the static inputs; a decoding step's
    split-key scratch comes from the graph's memory pool."""
    q, k, v = _qkv(shape, torch.float16)
    args = (0.125, True, shape[4] - shape[3])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
        assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])


@pytest.mark.parametrize("mode", ["deterministic", "atomic"])
def test_cuda_graph_backward(mode):
    """The backward has no host syncs and captures; a replay recomputes the grads from the
    static inputs. Replayed twice: a dq accumulator zeroed outside the graph would double.
    Deterministic mode: equal to eager bit for bit; atomic mode: to float rounding."""
    q, k, v = _qkv((2, 8, 2, 1000, 1000, 128), torch.bfloat16)
    grad_out = _randn(q.shape, torch.bfloat16)
    args = (0.1, True, 0)
    with deterministic(mode == "deterministic"):
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, out, lse, *args, "cuda")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_lse = torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
            grads = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, g_out, g_lse, *args,
                                                    "cuda")
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn_like(t))
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_lse = torch.ops.fusedlm.attention_fwd(q, k, v, *args, "cuda")
        eager = torch.ops.fusedlm.attention_bwd(grad_out, q, k, v, eager_out, eager_lse, *args,
                                                "cuda")
    assert torch.equal(g_out, eager_out)
    for name, got, want in zip(("dq", "dk", "dv"), grads, eager, strict=True):
        if mode == "deterministic":
            assert torch.equal(got, want), f"replayed {name} differs from eager"
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * scale, msg=name)


def test_no_host_syncs():
    """Forward and backward (both modes) make no synchronizing torch call (.item(), a
    device-to-host copy, ...)."""
    q, k, v = (_leaf(t) for t in _qkv((2, 4, 2, 300, 400, 64), torch.float16))
    grad_out = _randn(q.shape, torch.float16)
    for det in (False, True):
        with deterministic(det):
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = fusedlm.attention(q, k, v, causal=True, backend="cuda")
                torch.autograd.grad(out, (q, k, v), grad_out)
            finally:
                torch.cuda.set_sync_debug_mode("default")


# ---- what the cuda backend refuses, and "auto" ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_backend_refuses_float32_and_float64(dtype):
    """backend="cuda" with float32/float64 raises BackendNotSupportedError naming the dtype (the
    cuda backend's support check refuses them, which is also what lets "auto" pass them on)."""
    q, k, v = _qkv((1, 2, 2, 17, 17, 64), dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(fusedlm.BackendNotSupportedError, match=name):
        fusedlm.attention(q, k, v, causal=True, backend="cuda")
    with pytest.raises(fusedlm.BackendNotSupportedError, match=name):
        torch.ops.fusedlm.attention_fwd(q, k, v, 0.125, True, 0, "cuda")


@pytest.mark.parametrize("head_dim", [257, 512])
def test_head_dim_over_256_raises(head_dim):
    q, k, v = _qkv((1, 2, 2, 17, 17, head_dim), torch.float16)
    with pytest.raises(ValueError, match=str(head_dim)):
        fusedlm.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=str(head_dim)):
        torch.ops.fusedlm.attention_fwd(q, k, v, 0.125, False, 0, "cuda")


def test_cpu_tensors_with_backend_cuda_raise():
    q, k, v = (t.cpu() for t in _qkv((1, 2, 2, 17, 17, 64), torch.float16))
    with pytest.raises(fusedlm.BackendNotSupportedError, match="cuda"):
        fusedlm.attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_float32_goes_elsewhere_and_is_right(causal):
    """A float32 CUDA tensor under "auto" is served by another backend, correctly."""
    shape = (2, 4, 2, 300, 257, 64)
    q, k, v = _qkv(shape, torch.float32)
    leaves = tuple(_leaf(t) for t in (q, k, v))
    out = fusedlm.attention(*leaves, causal=causal, backend="auto")
    assert OpDispatch.last_choice["attention_fwd"] != "cuda"
    grad_out = _randn(q.shape, torch.float32)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert OpDispatch.last_choice["attention_bwd"] != "cuda"
    compare(q, k, v, causal, out.detach(), grads, grad_out)


@DTYPE
def test_auto_picks_cuda_for_half_precision(dtype):
    q, k, v = (_leaf(t) for t in _qkv((1, 4, 2, 64, 64, 64), dtype))
    OpDispatch.last_choice.pop("attention_fwd", None)
    OpDispatch.last_choice.pop("attention_bwd", None)
    out = fusedlm.attention(q, k, v, causal=True, backend="auto")
    out.backward(torch.randn_like(out))
    assert OpDispatch.last_choice["attention_fwd"] == "cuda"
    assert OpDispatch.last_choice["attention_bwd"] == "cuda"


@pytest.mark.parametrize(("Tq", "Tk"), [(300, 300), (200, 700), (700, 200)])
def test_sdpa_drop_in_reaches_cuda(Tq, Tk):
    """fusedlm.scaled_dot_product_attention (is_causal top-left, causal_offset 0) on float16
    CUDA tensors runs the cuda kernels and matches torch's SDPA by the rule."""
    q, k, v = _qkv((2, 6, 2, Tq, Tk, 64), torch.float16)
    leaves = tuple(_leaf(t) for t in (q, k, v))
    OpDispatch.last_choice.pop("attention_fwd", None)
    out = fusedlm.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    assert OpDispatch.last_choice.get("attention_fwd") == "cuda"
    grad_out = _randn(out.shape, torch.float16)
    grads = torch.autograd.grad(out, leaves, grad_out)
    scale = _default_scale(q)
    base = tuple(_leaf(t) for t in (q, k, v))
    out_base = _sdpa_baseline(*base, scale, True, top_left=True)
    base_grads = torch.autograd.grad(out_base, base, grad_out)
    truth, _, truth_grads = _truth(q, k, v, scale, True, causal_offset=0, grad_out=grad_out)
    assert_close_rule(out, out_base, truth, name="out")
    for name, g, gb, gt in zip(("dq", "dk", "dv"), grads, base_grads, truth_grads, strict=True):
        assert_close_rule(g, gb, gt, atol=atol_for(q.dtype, gt), name=name)


# ---- the Hopper kernels (attention_fwd_sm90.cu, attention_bwd_sm90.cu) -------------------------
# On a compute capability 9.0 GPU the forward and the backward (the deterministic one: its dK
# and dV) take the sm_90a kernels for D <= 128 (the tests above then run them too);
# FUSEDLM_ATTENTION_SM90=require makes a call that would fall back to the sm_80 kernels fail
# instead, so these prove which kernels ran.

HOPPER = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the sm_90a forward runs on compute capability 9.0 devices only")

HOPPER_SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 2, 2, 17, 17, 40),
    (1, 3, 3, 113, 113, 72),
    (3, 4, 2, 1000, 1000, 8),
    (1, 2, 2, 1, 1000, 128),  # decoding: one query tile, mostly empty
    (1, 6, 2, 200, 333, 96),
    (2, 4, 2, 700, 300, 64),  # Tq > Tk: causal CTAs without a key tile
    (1, 4, 1, 1000, 2500, 128),  # MQA, Tq < Tk, many key tiles around the ring
]
# (On an sm_90 GPU every test above with D <= 128 also runs this kernel, by default: these only
# add the proof that it, and not the sm_80 fallback, ran.)


@HOPPER
@DTYPE
@CAUSAL
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=_ids(HOPPER_SHAPES))
def test_hopper_forward(shape, causal, dtype, monkeypatch):
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", "require")
    check_attention(*_qkv(shape, dtype), causal)


@HOPPER
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_forward_strided(head_dim, monkeypatch):
    """q, k, v as (B, T, H, D) memory viewed as (B, H, T, D): TMA reads them through strides."""
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", "require")
    q, k, v = (_randn((2, 300, 4, head_dim), torch.bfloat16).transpose(1, 2) for _ in range(3))
    check_attention(q, k, v, True)


@HOPPER
@DTYPE
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_and_sm80_forwards_agree(head_dim, dtype, monkeypatch):
    """The two kernels on one input: both by the rule, and their logsumexps within float32
    rounding of each other."""
    q, k, v = _qkv((2, 4, 2, 777, 1500, head_dim), dtype)
    results = {}
    for setting in ("require", "0"):
        monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", setting)
        out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, _default_scale(q), True, 1500 - 777,
                                                   "cuda")
        compare_op(q, k, v, _default_scale(q), True, 1500 - 777, out)
        results[setting] = lse
    torch.testing.assert_close(results["require"], results["0"], rtol=0, atol=1e-4)


@HOPPER
@DTYPE
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_and_sm80_backwards_agree(head_dim, dtype, monkeypatch):
    """Both backwards by the rule on one input (GQA, Tq != Tk)."""
    q, k, v = _qkv((1, 6, 2, 300, 700, head_dim), dtype)
    grad_out = _randn(q.shape, dtype)
    for setting in ("require", "0"):
        monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", setting)
        out, grads = _ours(q, k, v, True, grad_out=grad_out)
        monkeypatch.delenv("FUSEDLM_ATTENTION_SM90")
        compare(q, k, v, True, out, grads, grad_out)


@HOPPER
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_deterministic_backward(head_dim, monkeypatch):
    """dK, dV on the Hopper kernel (no dQ), dQ by the atomic-free sm_80 kernel: right, and
    bitwise repeatable."""
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", "require")
    q, k, v = _qkv((2, 8, 2, 700, 900, head_dim), torch.bfloat16)
    grad_out = _randn(q.shape, torch.bfloat16)
    with deterministic():
        out, grads = _ours(q, k, v, True, grad_out=grad_out)
        _, again = _ours(q, k, v, True, grad_out=grad_out)
    for a, b in zip(grads, again, strict=True):
        assert torch.equal(a, b)
    compare(q, k, v, True, out, grads, grad_out)


@HOPPER
def test_hopper_require_fails_where_it_does_not_apply(monkeypatch):
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", "require")
    q, k, v = _qkv((1, 2, 2, 64, 64, 192), torch.float16)
    with pytest.raises(RuntimeError, match="not supported"):
        fusedlm.attention(q, k, v, causal=True, backend="cuda")


# Sliding windows, padded batches and packed documents: the bounded kernel instances (on Hopper
# the sm_90a ones for D <= 128, forward and backward).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "window", "causal"),
    [
        ((2, 8, 2, 2048, 2048, 128), (511, 0), True),  # Mistral-style causal window
        ((2, 4, 4, 1024, 1024, 64), (64, 64), False),  # ModernBERT-style two-sided local
        ((1, 4, 2, 700, 1900, 96), (300, None), True),  # Tq < Tk, padded head dim
        ((1, 2, 1, 3, 3000, 64), (999, 0), True),  # decoding with a window
    ],
    ids=["causal-w512-T2048-D128", "local-64-T1024-D64", "w301-Tq700-Tk1900-D96",
         "decode-w1000"],
)
def test_attention_sliding_window(shape, window, causal, dtype):
    from tests.ops.test_attention import _check_attention

    q, k, v = _qkv(shape, dtype)
    _check_attention(q, k, v, causal, "cuda", window=window, backward=dtype == torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["left", "right", "mixed"])
@pytest.mark.parametrize(
    ("shape", "window", "causal"),
    [
        ((8, 8, 2, 1024, 1024, 128), None, True),  # padded training batch, GQA
        ((6, 4, 4, 777, 777, 64), None, False),  # bidirectional (BERT-style), ragged
        ((4, 4, 2, 2048, 2048, 128), (511, 0), True),  # padding and a sliding window
        ((8, 2, 1, 1, 3000, 64), None, True),  # decoding a left-padded batch
    ],
    ids=["causal-T1024-D128", "full-T777-D64", "causal-w512-T2048-D128", "decode-T3000"],
)
def test_attention_key_range(shape, window, causal, kind, dtype):
    """Padded batches on the bounded (sliding-window) kernel instances."""
    from tests.ops.test_attention import _check_attention, key_ranges

    q, k, v = _qkv(shape, dtype)
    OpDispatch.last_choice.pop("attention_fwd", None)
    _check_attention(q, k, v, causal, "cuda", window=window, backward=dtype == torch.float16,
                     key_range=key_ranges(kind, shape[0], shape[4], "cuda"))
    assert OpDispatch.last_choice["attention_fwd"] == "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["documents", "scattered"])
@pytest.mark.parametrize(
    ("shape", "window", "causal"),
    [
        ((2, 8, 2, 2048, 2048, 128), None, True),  # packed pretraining documents, GQA
        ((4, 4, 4, 777, 777, 64), None, False),  # bidirectional, ragged
        ((1, 8, 2, 4096, 4096, 64), (1023, 0), True),  # documents and a sliding window
        ((2, 4, 1, 700, 1900, 96), None, True),  # Tq < Tk, padded head dim
    ],
    ids=["causal-T2048-D128", "full-T777-D64", "causal-w1024-T4096-D64", "Tq700-Tk1900-D96"],
)
def test_attention_per_query_key_range(shape, window, causal, kind, dtype):
    """Per-query key ranges (packed documents; scattered ranges that no monotone search finds):
    the forward, and the backward over the query tiles the query extents give each key tile;
    "auto" picks the cuda backend."""
    from tests.ops.test_attention import _check_attention, query_key_ranges

    q, k, v = _qkv(shape, dtype)
    OpDispatch.last_choice.pop("attention_fwd", None)
    ranges = query_key_ranges(kind, shape[0], shape[3], shape[4], "cuda")
    _check_attention(q, k, v, causal, "auto", window=window, backward=dtype == torch.float16,
                     key_range=ranges)
    assert OpDispatch.last_choice["attention_fwd"] == "cuda"


@HOPPER
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "kind", "causal"),
    [
        ((2, 8, 2, 2048, 2048, 128), "documents", True),
        ((2, 4, 4, 777, 1200, 64), "scattered", False),
    ],
    ids=["documents-causal-T2048-D128", "scattered-full-Tq777-Tk1200-D64"],
)
def test_hopper_forward_per_query_key_range(shape, kind, causal, dtype, monkeypatch):
    """Packed documents on the sm_90a forward (require: proof that it ran) by the rule, and its
    lse equal to the sm_80 forward's within float32 rounding."""
    from tests.ops.test_attention import _check_attention, query_key_ranges

    q, k, v = _qkv(shape, dtype)
    ranges = query_key_ranges(kind, shape[0], shape[3], shape[4], "cuda")
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", "require")
    _check_attention(q, k, v, causal, "cuda", backward=False, key_range=ranges)
    lse = {}
    for setting in ("require", "0"):
        monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", setting)
        lse[setting] = torch.ops.fusedlm.attention_fwd(
            q, k, v, _default_scale(q), causal, shape[4] - shape[3], "cuda", None, ranges)[1]
    torch.testing.assert_close(lse["require"], lse["0"], rtol=0, atol=1e-4)


@HOPPER
@pytest.mark.parametrize("kind", ["window", "padded", "documents"])
def test_hopper_bounded_backward(kind, monkeypatch):
    """Windows, padded batches and packed documents through the sm_90a backward (require: proof
    that it ran) by the rule; under torch.use_deterministic_algorithms (dK, dV on it without dQ,
    dQ by the sm_80 atomic-free kernel) the same gradients within fp16 rounding of the sums'
    order."""
    from tests.ops.test_attention import _check_attention, key_ranges, query_key_ranges

    B, Hq, Hkv, T, D = 2, 8, 2, 1500, 128
    q, k, v = _qkv((B, Hq, Hkv, T, T, D), torch.float16)
    options = {
        "window": {"window": (400, 0)},
        "padded": {"key_range": key_ranges("mixed", B, T, "cuda")},
        "documents": {"key_range": query_key_ranges("documents", B, T, T, "cuda")},
    }[kind]
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", "require")
    _check_attention(q, k, v, True, "cuda", **options)
    grad_out = _randn(q.shape, torch.float16)
    grads = {}
    for mode in (False, True):
        leaves = [_leaf(t) for t in (q, k, v)]
        with deterministic(mode):
            out = fusedlm.attention(*leaves, causal=True, backend="cuda", **options)
            grads[mode] = torch.autograd.grad(out, leaves, grad_out)
    for name, atomic, ordered in zip(("dq", "dk", "dv"), grads[False], grads[True], strict=True):
        torch.testing.assert_close(ordered, atomic, rtol=2e-3, atol=1e-4, msg=name)


def test_attention_per_query_key_range_deterministic_is_repeatable():
    """torch.use_deterministic_algorithms: the per-query backward (extent kernel, dK/dV, dQ
    without atomics) gives bitwise the same gradients twice."""
    from tests.ops.test_attention import query_key_ranges

    q, k, v = (t.requires_grad_() for t in _qkv((2, 4, 2, 1000, 1000, 64), torch.bfloat16))
    ranges = query_key_ranges("documents", 2, 1000, 1000, "cuda")
    grad_out = torch.randn_like(q)
    results = []
    with deterministic():
        for _ in range(2):
            out = fusedlm.attention(q, k, v, causal=True, key_range=ranges, backend="cuda")
            results.append(torch.autograd.grad(out, (q, k, v), grad_out))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)

