"""Attention dropout in the Triton flash-attention kernels: fusedlm.triton.attention.attention_fwd
/ attention_bwd with ``dropout_p`` > 0, the probabilities (after the softmax; lse is that of the
undropped softmax) multiplied by M / (1 - p) before P @ V, M the keep mask of
``fusedlm.reference.attention_dropout_keep`` (Philox4x32-10 under ``dropout_seed``).

Truth: ``fusedlm.reference.attention_fwd/attention_bwd(..., dropout_p, dropout_seed)`` on
float64 copies: the same elements dropped, exactly; baseline: tests/helpers.naive_attention
(dropout_keep=, dropout_p=) in the input dtype (autograd), torch's own error at that precision
(the numerics rule of DESIGN.md, tests/helpers.py's assert_close_rule); for the gradients the
further from the truth of that and FlashAttention's formula from the stored out
(_flash_formula_grads, as tests/helpers.flash_formula_attention, which has no dropout). The
launchers are called directly.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) on CPU
tensors: small, odd shapes in float32 and float16 (the interpreter's bfloat16 dot is not a
GPU's).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm import reference  # noqa: E402
from tests.helpers import (  # noqa: E402
    _masked_scores,
    assert_close_rule,
    larger_error,
    naive_attention,
)
from tests.ops.test_attention import query_key_ranges  # noqa: E402
from tests.triton import sm90_build  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16]

import triton  # noqa: E402  (after the skips; conftest.py has set the interpreter)
import triton.language as tl  # noqa: E402

from fusedlm.triton.attention import _dropout_keep, _int32_bits  # noqa: E402


@triton.jit
def _keep_kernel(Rows, Keep, Seed, threshold, n_quads, start_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep (BLOCK_M, BLOCK_N) int8 = the kernels' _dropout_keep of the rows Rows (BLOCK_M
    int64) and the keys [start_n, start_n + BLOCK_N), the seed loaded from Seed as the
    kernels load it."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.load(Rows + offs_m)
    keep = _dropout_keep(tl.load(Seed), threshold, rows, n_quads, start_n, BLOCK_M, BLOCK_N)
    tl.store(Keep + offs_m[:, None] * BLOCK_N + offs_n[None, :], keep.to(tl.int8))


def _kernels():
    from fusedlm.triton import attention  # imports triton: after conftest set the interpreter

    return attention


def _inputs(shape, dtype):
    B, Hq, Hkv, Tq, Tk, D = shape

    def draw(*size):
        return torch.randn(size, dtype=torch.float64).to(DEVICE, dtype)

    return draw(B, Hq, Tq, D), draw(B, Hkv, Tk, D), draw(B, Hkv, Tk, D)


def _flash_formula_grads(q, k, v, out, grad_out, d_lse, masks, keep, dropout_p):
    """dq, dk, dv by FlashAttention's dropout backward in float32 or wider from ``out`` as stored
    (q's dtype): P = exp(S - lse), Delta = rowsum(dO * out) - grad_lse, dV = (P M / (1 - p))^T
    dO, dS = P ((dO V^T) M / (1 - p) - Delta) (times 1 - tanh^2 with a cap). Torch's own error
    for a flash backward: where a row's softmax is one key (Tk = 1), dS is 0 exactly in the
    naive backward but Delta - dP cancels only to out's rounding here."""
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    scores, _ = _masked_scores(qc, kc, **masks)
    hidden = torch.isneginf(scores).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(scores.masked_fill(hidden, 0.0), dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(hidden, 0.0)
    k_full, v_full = (t.repeat_interleave(group, dim=1) for t in (kc, vc))
    dout = grad_out.to(compute)
    delta = (dout * out.to(compute)).sum(-1, keepdim=True)
    if d_lse is not None:
        delta = delta - torch.where(hidden, 0.0, d_lse.to(compute)[..., None])
    drop = keep.to(compute) / (1 - dropout_p)
    dscores = probs * ((dout @ v_full.transpose(-1, -2)) * drop - delta)
    scale = masks["scale"]
    if masks.get("softcap"):
        tanh = torch.tanh(qc @ k_full.transpose(-1, -2) * scale / masks["softcap"])
        dscores = dscores * (1 - tanh * tanh)
    B, Hkv, Tk, D = k.shape

    def per_kv_head(t):  # GQA's sum
        return t.reshape(B, Hkv, group, Tk, D).sum(dim=2)

    dq = (dscores @ k_full) * scale
    dk = per_kv_head(dscores.transpose(-1, -2) @ qc) * scale
    dv = per_kv_head((probs * drop).transpose(-1, -2) @ dout)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check_dropout(q, k, v, causal, dropout_p, seed, causal_offset=None, window_offset=None,
                   key_range=None, grad_lse=False, softcap=0.0):
    """Our out, lse, dq, dk, dv (the kernels) against the float64 reference with the same
    dropout_p and seed and the torch baseline in q's dtype (with the reference's mask), by the
    rule. Returns the float64 out."""
    kernels = _kernels()
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D ** -0.5
    causal_offset = Tk - Tq if causal_offset is None else causal_offset
    masks = (scale, causal, causal_offset, window_offset, key_range)
    drop = {"dropout_p": dropout_p, "dropout_seed": seed}

    out, lse = kernels.attention_fwd(q, k, v, *masks, softcap=softcap, **drop)
    leaves64 = [t.double() for t in (q, k, v)]
    out64, lse64 = reference.attention_fwd(*leaves64, *masks, softcap=softcap, **drop)
    keep = reference.attention_dropout_keep(B, Hq, Tq, Tk, dropout_p, seed, DEVICE)
    base_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_base, lse_base = naive_attention(
        *base_leaves, scale=scale, causal=causal, causal_offset=causal_offset,
        window_offset=window_offset, key_range=key_range, softcap=softcap or None,
        return_lse=True, dropout_keep=keep, dropout_p=dropout_p)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close_rule(out, out_base, out64, name="out")
    assert_close_rule(lse, lse_base, lse64, name="lse")

    grad_out = torch.randn(out.shape, dtype=torch.float64).to(DEVICE, q.dtype)
    d_lse = torch.randn(lse.shape, dtype=torch.float64).to(DEVICE) if grad_lse else None
    ours = kernels.attention_bwd(grad_out, q, k, v, out, lse, *masks,
                                 grad_lse=None if d_lse is None else d_lse.float(),
                                 softcap=softcap, **drop)
    truths = reference.attention_bwd(grad_out.double(), *leaves64, out64, lse64, *masks,
                                     grad_lse=d_lse, softcap=softcap, **drop)
    outputs, grads = [out_base], [grad_out]
    if d_lse is not None:
        outputs.append(lse_base)
        grads.append(d_lse.to(lse_base.dtype))
    theirs = torch.autograd.grad(outputs, base_leaves, grads)
    flash = _flash_formula_grads(
        q, k, v, out, grad_out, d_lse,
        {"scale": scale, "causal": causal, "causal_offset": causal_offset,
         "window_offset": window_offset, "key_range": key_range, "softcap": softcap or None},
        keep, dropout_p)
    for name, g, g_base, g_flash, g64, src in zip(("dq", "dk", "dv"), ours, theirs, flash,
                                                  truths, (q, k, v), strict=True):
        assert g.dtype == src.dtype and g.shape == src.shape, name
        assert_close_rule(g, larger_error(g_base, g_flash, g64), g64, name=name)
    return out64


# (B, Hq, Hkv, Tq, Tk, D): lengths neither multiples of 4 nor of the interpreter's tiles (64 x
# 32 forward, 32 x 64 dK/dV), one key alone, a padded head dim; GQA and MHA.
SHAPES = [(1, 4, 2, 37, 67, 40), (2, 2, 2, 45, 5, 64), (1, 4, 2, 19, 1, 16)]
SHAPE_IDS = ["GQA-Tq37-Tk67-D40", "MHA-Tq45-Tk5-D64", "GQA-Tq19-Tk1-D16"]


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout(dtype, shape, causal, dropout_p):
    q, k, v = _inputs(shape, dtype)
    seed = 1234567 + shape[3]
    out64 = _check_dropout(q, k, v, causal, dropout_p, seed)
    # The dropout matters: without it the attention is another one (rows with a single
    # visible key can survive unchanged, but not all of them).
    Tq, Tk = shape[3], shape[4]
    plain, _ = reference.attention_fwd(q.double(), k.double(), v.double(), shape[5] ** -0.5,
                                       causal, Tk - Tq)
    assert (plain - out64).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_sliding_window_softcap(dtype):
    """A causal sliding window whose lower edge cuts through key and query blocks, with
    soft-capping (Gemma 2's local layers), and a seed past 2^32."""
    q, k, v = _inputs((1, 2, 1, 100, 100, 32), dtype)
    _check_dropout(q, k, v, True, 0.3, 2**40 + 77, window_offset=-30, softcap=20.0)


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("per-row", torch.float32), ("per-row", torch.float16), ("per-query", torch.float32)],
)
def test_dropout_key_range(kind, dtype):
    """Padded batches ((B, 2) key ranges, one batch row seeing no key: out 0, lse -inf, zero
    gradients) and scattered per-query ranges ((B, Tq, 2)), with a cap."""
    q, k, v = _inputs((3, 2, 2, 40, 70, 16), dtype)
    if kind == "per-row":
        key_range = torch.tensor([[5, 70], [0, 33], [70, 70]])
    else:
        key_range = query_key_ranges("scattered", 3, 40, 70)
    _check_dropout(q, k, v, False, 0.4, 99, key_range=key_range, softcap=10.0)


# Decoding (one query row against many keys): the keys split over programs; with GQA, the
# group's query heads packed into the rows of one block (the packed rows' counters are those of
# the true heads). (shape, causal, key range, (packed, splits) under the interpreter's SM count)
DECODE_CASES = {
    "gqa-packed": ((1, 4, 2, 1, 300, 16), True, None, (True, 2)),
    "mha-D40": ((2, 2, 2, 1, 300, 40), False, None, (False, 2)),
    "gqa-padded": ((2, 4, 2, 1, 300, 16), True, [[50, 300], [0, 0]], (True, 2)),
    "gqa-Tq3": ((1, 4, 2, 3, 301, 16), True, None, (False, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_dropout_decode(case, dtype):
    kernels = _kernels()
    shape, causal, ranges, plan = case
    B, Hq, Hkv, Tq, Tk, D = shape
    packed = kernels._packs_query_heads(Hq, Hkv, Tq, Tk, causal, Tk - Tq, None)
    rows = Hq // Hkv if packed else Tq
    splits = kernels._key_splits(torch.device(DEVICE), B, Hkv if packed else Hq, rows, Tk,
                                 causal and not packed, Tk - Tq, None)
    if not ON_GPU:  # (a GPU's SM count gives other splits)
        assert (packed, splits) == plan
    q, k, v = _inputs(shape, dtype)
    _check_dropout(q, k, v, causal, 0.25, 2**33 + 5,
                   key_range=None if ranges is None else torch.tensor(ranges))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_grad_lse(dtype):
    """A gradient of lse too (return_lse, sinks): lse is that of the undropped softmax."""
    q, k, v = _inputs((1, 4, 2, 37, 53, 40), dtype)
    _check_dropout(q, k, v, True, 0.2, 5, grad_lse=True)


def _revealed_mask(shape, dropout_p, seed, causal=False):
    """The kernels' dropped probabilities, read off the output: q = k = 0 (each row's softmax
    uniform over its visible keys) and v = the identity (B, Hkv, Tk, D >= Tk), so out[b, h, i,
    j] = M[b, h, i, j] / (n_i (1 - p)), n_i the keys row i sees. Returns (out * n_i * (1 - p)
    rounded, the float out)."""
    B, Hq, Hkv, Tq, Tk, D = shape
    q = torch.zeros((B, Hq, Tq, D), device=DEVICE)
    k = torch.zeros((B, Hkv, Tk, D), device=DEVICE)
    v = torch.eye(Tk, D, device=DEVICE).expand(B, Hkv, Tk, D)
    out, lse = _kernels().attention_fwd(q, k, v, 0.5, causal, Tk - Tq, dropout_p=dropout_p,
                                        dropout_seed=seed)
    seen = torch.exp(lse)[..., None]  # exp(lse) = n_i for zero scores
    return (out[..., :Tk] * seen * (1 - dropout_p)).round(), out


@pytest.mark.parametrize("seed", [0, 77, 2**31 + 3, 2**32 + 1, 2**63 - 1, -3])
def test_dropout_mask_is_the_reference_mask(seed):
    """The elements the forward drops are exactly attention_dropout_keep's, at seeds on both
    sides of 2^31 and 2^32 (the key's high word) and a negative one, over GQA heads and batch
    rows."""
    shape = (2, 4, 2, 19, 37, 40)
    dropout_p = 0.5
    mask, _ = _revealed_mask(shape, dropout_p, seed)
    B, Hq, _, Tq, Tk, _ = shape
    keep = reference.attention_dropout_keep(B, Hq, Tq, Tk, dropout_p, seed, DEVICE)
    assert torch.equal(mask, keep.to(mask.dtype))


def test_dropout_mask_is_the_reference_mask_causal():
    """Causal: the hidden keys stay 0; the visible ones dropped as the reference drops them."""
    shape = (1, 2, 2, 21, 30, 32)
    mask, _ = _revealed_mask(shape, 0.3, 11, causal=True)
    keep = reference.attention_dropout_keep(1, 2, 21, 30, 0.3, 11, DEVICE)
    visible = torch.ones(21, 30, dtype=torch.bool, device=DEVICE).tril(30 - 21)
    assert torch.equal(mask, (keep & visible).to(mask.dtype))


@pytest.mark.parametrize("seed", [3, 2**32 + 9, 2**62 + 2**31, -1, -2**63, -2**40 - 7])
def test_dropout_keep_helper_large_counters(seed):
    """The kernels' mask helper against the reference's Philox at counters past 2^32 (large B *
    Hq * Tq, given as row numbers, not tensors) and key blocks past the first; negative seeds
    key the stream with their two's-complement bits, as in the reference."""
    block_m, block_n = 16, 32
    rows = torch.tensor([0, 1, 7, 2**20 + 3, 2**31 - 1, 2**31, 2**32 + 5, 3 * 2**32 + 17,
                         2**40 + 1, 2**45 - 1, 123456789012, 5, 6, 2**33, 2**34 + 1, 99],
                        dtype=torch.int64, device=DEVICE)
    n_quads = 257  # Tk = 1025 or so
    for start_n, dropout_p in [(0, 0.1), (96, 0.5), (992, 0.9)]:
        threshold = reference.dropout_threshold(dropout_p)
        keep = torch.empty((block_m, block_n), dtype=torch.int8, device=DEVICE)
        seed_tensor = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
        _keep_kernel[(1,)](rows, keep, seed_tensor, _int32_bits(threshold), n_quads, start_n,
                           BLOCK_M=block_m, BLOCK_N=block_n)
        cols = torch.arange(start_n, start_n + block_n, device=DEVICE)
        counter = rows[:, None] * n_quads + (cols // 4)[None, :]
        words = torch.stack(reference.philox4x32(seed, counter), dim=-1)  # (M, N, 4)
        word = words.gather(-1, (cols % 4).expand(block_m, -1)[..., None])[..., 0]
        assert torch.equal(keep.bool(), word >= threshold), (start_n, dropout_p)


def test_dropout_seeds():
    """The same seed gives the same outputs and gradients bit for bit; another seed other ones;
    dropout_p = 0 is the call without dropout, bit for bit, whatever the seed."""
    kernels = _kernels()
    shape = (1, 4, 2, 37, 53, 40)
    q, k, v = _inputs(shape, torch.float16)
    masks = (40 ** -0.5, True, 16, None, None)
    grad_out = torch.randn(q.shape, dtype=torch.float16, device=DEVICE)

    def run(**drop):
        out, lse = kernels.attention_fwd(q, k, v, *masks, **drop)
        return (out, lse, *kernels.attention_bwd(grad_out, q, k, v, out, lse, *masks, **drop))

    first = run(dropout_p=0.3, dropout_seed=42)
    again = run(dropout_p=0.3, dropout_seed=42)
    # (the seed as the ops layer hands it: a tensor on the device, read by the kernels)
    as_tensor = run(dropout_p=0.3, dropout_seed=torch.tensor(42, device=DEVICE))
    other = run(dropout_p=0.3, dropout_seed=43)
    for name, a, b, t, c in zip(("out", "lse", "dq", "dk", "dv"), first, again, as_tensor, other,
                                strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(a, t), name
        if name != "lse":  # (lse is the undropped softmax's: the same)
            assert not torch.equal(a, c), name
    assert torch.equal(first[1], other[1])
    plain = run()
    for seed in (0, 42):
        zero = run(dropout_p=0.0, dropout_seed=seed)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), plain, zero, strict=True):
            assert torch.equal(a, b), (name, seed)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_fraction(dropout_p):
    """About a fraction p of the probabilities dropped (5624 of them: the standard deviation of
    the fraction is under 0.007; bounds at 0.04), the output unbiased on average."""
    shape = (2, 4, 2, 19, 37, 40)
    mask, out = _revealed_mask(shape, dropout_p, 2024)
    dropped = 1.0 - mask.mean().item()
    assert abs(dropped - dropout_p) < 0.04, dropped
    # Each row of out sums to (kept / Tk) / (1 - p), whose mean over the rows is about 1.
    assert abs(out.sum(-1).mean().item() - 1.0) < 0.15


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"dropout_p": -0.1}, "dropout_p"), ({"dropout_p": 1.0}, "dropout_p"),
     ({"dropout_p": 1.5}, "dropout_p"), ({"dropout_p": math.nan}, "dropout_p"),
     ({"dropout_p": "0.1"}, "dropout_p"), ({"dropout_p": True}, "dropout_p"),
     ({"dropout_p": 0.1, "dropout_seed": -2**63 - 1}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": 2**63}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": 1.5}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": "7"}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": torch.tensor(7, dtype=torch.int32)}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": torch.tensor([7, 8])}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": torch.tensor(7, device="meta")}, "dropout_seed")],
    ids=["p-negative", "p-one", "p-over-one", "p-nan", "p-str", "p-bool", "seed-below-int64",
         "seed-2^63", "seed-float", "seed-str", "seed-int32-tensor", "seed-two-elements",
         "seed-other-device"],
)
def test_dropout_bad_values(kwargs, name):
    kernels = _kernels()
    q, k, v = _inputs((1, 1, 1, 4, 4, 16), torch.float32)
    with pytest.raises(ValueError, match=name):
        kernels.attention_fwd(q, k, v, 0.25, False, 0, **kwargs)
    out, lse = kernels.attention_fwd(q, k, v, 0.25, False, 0)
    with pytest.raises(ValueError, match=name):
        kernels.attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.25, False, 0, **kwargs)


def test_dropout_empty_inputs():
    """No launch: the reference's empty results (out 0, lse -inf with no keys)."""
    kernels = _kernels()
    for shape in [(0, 2, 2, 5, 5, 8), (1, 2, 2, 0, 5, 8), (1, 2, 2, 5, 0, 8)]:
        q, k, v = _inputs(shape, torch.float32)
        out, lse = kernels.attention_fwd(q, k, v, 0.5, False, 0, dropout_p=0.5, dropout_seed=1)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
        grads = kernels.attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.5, False, 0,
                                      dropout_p=0.5, dropout_seed=1)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


# ---- GPU builds (checked without a GPU) ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the gpu tests run the real builds")
def test_dropout_kernels_build_for_sm90():
    """The dropout kernels (DROPOUT: Philox per four keys, its words interleaved by join and
    reshape, the dK/dV kernel's mask transposed) build for sm_90 with their fixed configs, with
    Hopper's wgmma, in the H100's shared memory, at head dims 64 and 128, causal and not, and
    in the decoding forward (split keys, padded batch). Spills are bounded loosely: the mask
    costs the dK/dV kernel registers (40 bytes of spill stores at D = 128, causal, triton 3.6;
    none without dropout)."""
    from tests.triton.test_attention import _sm90_launch

    sm90_build.require_nvidia_backend()
    cases = [["fwd", "bf16", 128, True], ["bwd_dkdv", "bf16", 128, True],
             ["bwd_dq", "bf16", 128, True], ["fwd", "bf16", 64, False],
             ["bwd_dkdv", "bf16", 64, False], ["bwd_dq", "bf16", 64, False],
             ["fwd", "bf16", 128, False, False, 2048, 1, True]]
    launches = []
    for case in cases:
        spec = _sm90_launch(*case)
        spec["kwargs"].update(DROPOUT=True, dropout_threshold=-2**31, dropout_scale=2.0)
        launches.append(spec)
    results = sm90_build.build_for_sm90(launches)
    failures = sm90_build.problems(launches, results, max_spill_bytes=64)
    assert not failures, "\n".join(failures)
    for spec, r in zip(launches, results, strict=True):
        assert r["shared"] > 0 and r["wgmma"] > 0 and r["mma_sync"] == 0, (spec["kernel"], r)
