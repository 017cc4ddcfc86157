"""Attention logit soft-capping (Gemma 2's ``attn_logit_softcapping``) in the Triton
flash-attention kernels: fusedlm.triton.attention.attention_fwd / attention_bwd with
``softcap`` > 0, each score s = scale * q.k becoming softcap * tanh(s / softcap) before the
masks and the softmax.

Truth: ``fusedlm.reference.attention_fwd/attention_bwd(..., softcap)`` on float64 copies;
baseline: tests/helpers.naive_attention(softcap=) in the input dtype (autograd),
torch's own error at that precision (the numerics rule of DESIGN.md, tests/helpers.py's
assert_close_rule). The launchers are called directly (tests/ops/test_attention_softcap.py
goes through fusedlm.attention on every backend).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) on CPU
tensors: small, odd shapes in float32 and float16 (the interpreter's bfloat16 dot is not a
GPU's; test_attention.py covers bfloat16 through interpreter_fixes.py).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm import reference  # noqa: E402
from tests.helpers import assert_close_rule, naive_attention  # noqa: E402
from tests.ops.test_attention import query_key_ranges  # noqa: E402
from tests.triton import sm90_build  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16]

import triton  # noqa: E402  (after the skips; conftest.py has set the interpreter)
import triton.language as tl  # noqa: E402

from fusedlm.triton.attention import _softcap_tanh  # noqa: E402


@triton.jit
def _tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
    """Y = the kernels' tanh of X (qk_scale = log2(e), softcap = 1: tanh(x) itself)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, _softcap_tanh(x, 1.4426950408889634, 1.0), mask=offs < n)


def _kernels():
    from fusedlm.triton import attention  # imports triton: after conftest set the interpreter

    return attention


def _inputs(shape, dtype, softcap):
    """q, k, v with raw scores scale * q.k of about 1.5 * softcap in spread (scale = D^-0.5):
    a good part of them far enough out for the cap to bend them (tanh(1.5) = 0.9)."""
    B, Hq, Hkv, Tq, Tk, D = shape
    spread = math.sqrt(1.5 * softcap)

    def draw(*size, s=1.0):
        return (s * torch.randn(size, dtype=torch.float64)).to(DEVICE, dtype)

    return draw(B, Hq, Tq, D, s=spread), draw(B, Hkv, Tk, D, s=spread), draw(B, Hkv, Tk, D)


def _check_softcap(q, k, v, causal, softcap, causal_offset=None, window_offset=None,
                   key_range=None, grad_lse=False, scale=None):
    """Our out, lse, dq, dk, dv (the kernels) against the float64 reference and the torch
    baseline in q's dtype, by the rule."""
    kernels = _kernels()
    Tq, D, Tk = q.shape[2], q.shape[3], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    causal_offset = Tk - Tq if causal_offset is None else causal_offset
    masks = (scale, causal, causal_offset, window_offset, key_range)

    out, lse = kernels.attention_fwd(q, k, v, *masks, softcap=softcap)
    leaves64 = [t.double() for t in (q, k, v)]
    out64, lse64 = reference.attention_fwd(*leaves64, *masks, softcap=softcap)
    base_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_base, lse_base = naive_attention(
        *base_leaves, scale=scale, causal=causal, causal_offset=causal_offset,
        window_offset=window_offset, key_range=key_range, softcap=softcap, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close_rule(out, out_base, out64, name="out")
    assert_close_rule(lse, lse_base, lse64, name="lse")

    grad_out = torch.randn(out.shape, dtype=torch.float64).to(DEVICE, q.dtype)
    d_lse = torch.randn(lse.shape, dtype=torch.float64).to(DEVICE) if grad_lse else None
    ours = kernels.attention_bwd(grad_out, q, k, v, out, lse, *masks,
                                 grad_lse=None if d_lse is None else d_lse.float(),
                                 softcap=softcap)
    truths = reference.attention_bwd(grad_out.double(), *leaves64, out64, lse64, *masks,
                                     grad_lse=d_lse, softcap=softcap)
    outputs, grads = [out_base], [grad_out]
    if d_lse is not None:
        outputs.append(lse_base)
        grads.append(d_lse.to(lse_base.dtype))
    theirs = torch.autograd.grad(outputs, base_leaves, grads)
    for name, g, g_base, g64, src in zip(("dq", "dk", "dv"), ours, theirs, truths, (q, k, v),
                                         strict=True):
        assert g.dtype == src.dtype and g.shape == src.shape, name
        assert_close_rule(g, g_base, g64, name=name)
    return out64


# (B, Hq, Hkv, Tq, Tk, D): odd lengths over several ragged tiles (64 x 32 under the
# interpreter), a padded head dim; GQA and MHA.
SHAPES = [(1, 4, 2, 37, 53, 40), (2, 2, 2, 45, 29, 64)]
SHAPE_IDS = ["GQA-Tq37-Tk53-D40", "MHA-Tq45-Tk29-D64"]


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap(dtype, shape, causal, softcap):
    q, k, v = _inputs(shape, dtype, softcap)
    out64 = _check_softcap(q, k, v, causal, softcap)
    # The cap bends the scores enough to matter: the uncapped attention is another one.
    Tq, Tk = shape[3], shape[4]
    uncapped, _ = reference.attention_fwd(q.double(), k.double(), v.double(), shape[5] ** -0.5,
                                          causal, Tk - Tq)
    assert (uncapped - out64).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_sliding_window(dtype):
    """A causal sliding window (Gemma 2's local layers: softcap and window together) whose lower
    edge cuts through key and query blocks."""
    shape = (1, 2, 1, 100, 100, 32)
    q, k, v = _inputs(shape, dtype, 20.0)
    _check_softcap(q, k, v, True, 20.0, window_offset=-30)


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("per-row", torch.float32), ("per-row", torch.float16), ("per-query", torch.float32)],
)
def test_softcap_key_range(kind, dtype):
    """Padded batches ((B, 2) key ranges, one batch row seeing no key: out 0, lse -inf, zero
    gradients) and scattered per-query ranges ((B, Tq, 2))."""
    shape = (3, 2, 2, 40, 70, 16)
    q, k, v = _inputs(shape, dtype, 10.0)
    if kind == "per-row":
        key_range = torch.tensor([[5, 70], [0, 33], [70, 70]])
    else:
        key_range = query_key_ranges("scattered", 3, 40, 70)
    _check_softcap(q, k, v, False, 10.0, key_range=key_range)


# Decoding (one query row against many keys): the keys split over programs; with GQA, the
# group's query heads packed into the rows of one block. (shape, causal, key range,
# (packed, splits) under the interpreter's SM count)
DECODE_CASES = {
    "gqa-packed": ((1, 4, 2, 1, 300, 16), True, None, (True, 2)),
    "mha-D40": ((2, 2, 2, 1, 300, 40), False, None, (False, 2)),
    "gqa-padded": ((2, 4, 2, 1, 300, 16), True, [[50, 300], [0, 0]], (True, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_softcap_decode(case, dtype):
    kernels = _kernels()
    shape, causal, ranges, plan = case
    B, Hq, Hkv, Tq, Tk, D = shape
    packed = kernels._packs_query_heads(Hq, Hkv, Tq, Tk, causal, Tk - Tq, None)
    rows = Hq // Hkv if packed else Tq
    splits = kernels._key_splits(torch.device(DEVICE), B, Hkv if packed else Hq, rows, Tk,
                                 causal and not packed, Tk - Tq, None)
    if not ON_GPU:  # (a GPU's SM count gives other splits)
        assert (packed, splits) == plan
    q, k, v = _inputs(shape, dtype, 15.0)
    _check_softcap(q, k, v, causal, 15.0,
                   key_range=None if ranges is None else torch.tensor(ranges))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_grad_lse(dtype):
    """A gradient of lse too (return_lse, sinks): it enters dS before the cap's factor."""
    q, k, v = _inputs((1, 4, 2, 37, 53, 40), dtype, 5.0)
    _check_softcap(q, k, v, True, 5.0, grad_lse=True)


def test_softcap_any_causal_offset():
    """A causal limit that leaves the first rows with no key (offset -3) and a scale other than
    D^-0.5."""
    q, k, v = _inputs((1, 2, 2, 37, 42, 16), torch.float32, 8.0)
    _check_softcap(q, k, v, True, 8.0, causal_offset=-3, scale=0.4)


@pytest.mark.parametrize(
    ("shape", "causal", "window_offset", "key_range"),
    [
        ((1, 4, 2, 37, 53, 40), True, 0, None),
        ((2, 4, 2, 1, 300, 16), True, None, [[50, 300], [0, 200]]),  # decoding: packed, split
    ],
    ids=["window", "decode"],
)
def test_softcap_zero_is_no_softcap(shape, causal, window_offset, key_range):
    """softcap=0.0 is the uncapped computation, bit for bit."""
    kernels = _kernels()
    q, k, v = _inputs(shape, torch.float16, 2.0)
    Tq, Tk = shape[3], shape[4]
    masks = (shape[5] ** -0.5, causal, Tk - Tq, window_offset,
             None if key_range is None else torch.tensor(key_range))
    plain = kernels.attention_fwd(q, k, v, *masks)
    zero = kernels.attention_fwd(q, k, v, *masks, softcap=0.0)
    grad_out = torch.randn_like(plain[0])
    plain += kernels.attention_bwd(grad_out, q, k, v, *plain, *masks)
    zero += kernels.attention_bwd(grad_out, q, k, v, *zero[:2], *masks, softcap=0.0)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), plain, zero, strict=True):
        assert torch.equal(a, b), name


def test_softcap_empty_inputs():
    """No launch: the reference's empty results (out 0, lse -inf with no keys)."""
    kernels = _kernels()
    for shape in [(0, 2, 2, 5, 5, 8), (1, 2, 2, 0, 5, 8), (1, 2, 2, 5, 0, 8)]:
        q, k, v = _inputs(shape, torch.float32, 5.0)
        out, lse = kernels.attention_fwd(q, k, v, 0.5, False, 0, softcap=5.0)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
        if shape[4] == 0:
            assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())
        grads = kernels.attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.5, False, 0,
                                      softcap=5.0)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("softcap", [-1.0, math.inf, math.nan])
def test_softcap_bad_values(softcap):
    kernels = _kernels()
    q, k, v = _inputs((1, 1, 1, 4, 4, 16), torch.float32, 5.0)
    with pytest.raises(ValueError, match="softcap"):
        kernels.attention_fwd(q, k, v, 0.25, False, 0, softcap=softcap)


def test_softcap_saturates():
    """Raw scores thousands of times the cap (its tanh's exponent capped, nothing overflows):
    each row's softmax over scores at +-softcap, as the reference."""
    kernels = _kernels()
    q, k, v = _inputs((1, 2, 2, 20, 30, 16), torch.float32, 5.0)
    q, k = q * 100, k * 100  # raw scores ~ 1e5
    out, lse = kernels.attention_fwd(q, k, v, 0.25, False, 0, softcap=5.0)
    out64, lse64 = reference.attention_fwd(q.double(), k.double(), v.double(), 0.25, False, 0,
                                           softcap=5.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, rtol=0, atol=1e-5)


def test_softcap_tanh_is_accurate_to_a_few_ulps():
    """The kernels' tanh (exp2 and a series: triton.language has none) against float64, relative:
    at most 3e-7 (torch's float32 tanh: 6e-8) from 1e-12 to 12, both signs, both sides of its
    switch at 0.3. An absolute error would be multiplied by the cap: a cap of 1e4 once moved
    out by 1e-3 (1 - 2 / (e^2x + 1) alone, for every |x|)."""
    magnitudes = torch.cat([torch.logspace(-12, 0, 3001, dtype=torch.float64),
                            torch.linspace(0.25, 0.35, 1001, dtype=torch.float64),
                            torch.linspace(1, 12, 1001, dtype=torch.float64)])
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, 30.0, 1e5], dtype=torch.float64)])
    x32 = x.float().to(DEVICE)
    y = torch.empty_like(x32)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x32, y, x.numel(), BLOCK=1024)
    truth = torch.tanh(x32.double().cpu())
    relative = ((y.double().cpu() - truth).abs() / truth.abs().clamp_min(1e-300))
    assert relative.max() < 3e-7, (relative.max().item(), x[relative.argmax()].item())
    assert y[-1] == 1.0 and y[-3] == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_large_cap_is_as_accurate_as_no_cap(dtype):
    """With a cap of 1e4 over scores up to ~30 the capped kernels err against the float64
    reference about as the uncapped ones do (within 2x + 1e-6): an absolute error in tanh,
    multiplied by the cap, would show here (1 - 2 / (e^2x + 1) alone once moved out by 1e-3)."""
    kernels = _kernels()
    q, k, v = _inputs((1, 2, 2, 20, 30, 16), dtype, 5.0)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    errors = []
    for softcap in (0.0, 1e4):
        ours = kernels.attention_fwd(q, k, v, 0.25, True, 10, softcap=softcap)
        truth = reference.attention_fwd(q64, k64, v64, 0.25, True, 10, softcap=softcap)
        errors.append([(a.double() - b).abs().max().item()
                       for a, b in zip(ours, truth, strict=True)])
    for name, plain, capped in zip(("out", "lse"), *errors, strict=True):
        assert capped <= 2 * plain + 1e-6, (name, capped, plain)


# ---- GPU builds (checked without a GPU) ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the gpu tests run the real builds")
def test_softcap_kernels_build_for_sm90():
    """The soft-capped kernels (SOFTCAP) build for sm_90 with their fixed configs, with Hopper's
    wgmma, in the H100's shared memory, at Gemma 2's head dims (128: 27B; 256: 9B, with its
    local layers' window) and in the decoding forward (split keys, padded batch). Spills are
    bounded loosely: the cap's tanh tile costs the dK/dV kernel registers (D = 128, causal: 32
    bytes of spill stores with triton 3.6, where the uncapped kernel has none)."""
    from tests.triton.test_attention import _sm90_launch

    sm90_build.require_nvidia_backend()
    cases = [["fwd", "bf16", 128, True], ["bwd_dkdv", "bf16", 128, True],
             ["bwd_dq", "bf16", 128, True], ["fwd", "bf16", 256, True, True],
             ["fwd", "bf16", 128, False, False, 2048, 1, True]]
    launches = []
    for case in cases:
        spec = _sm90_launch(*case)
        spec["kwargs"].update(SOFTCAP=True, softcap=30.0)
        launches.append(spec)
    results = sm90_build.build_for_sm90(launches)
    failures = sm90_build.problems(launches, results, max_spill_bytes=64)
    assert not failures, "\n".join(failures)
    for spec, r in zip(launches, results, strict=True):
        assert r["shared"] > 0 and r["wgmma"] > 0 and r["mma_sync"] == 0, (spec["kernel"], r)
