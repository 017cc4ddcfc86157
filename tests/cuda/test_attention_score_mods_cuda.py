"""Soft-capping and dropout in the CUDA attention kernels on a GPU (their kScoreMods instances:
the sm_80 forward, dK/dV and dQ kernels, and on Hopper the sm_90a forward and backward), through
``fusedlm.attention(..., backend="cuda")``: realistic and odd shapes, both dtypes, GQA, the
masks, both dQ paths, the decoding plan (packed query heads, key splits).

Truth: the naive math in float64 on the GPU (tests/helpers.naive_attention, soft-capped, with
fusedlm.reference.attention_dropout_keep's mask of the seed the call drew); baseline: the larger
error of that math at the input's dtype and of FlashAttention's formula at that dtype from the
kernels' out (fusedlm.reference.attention_bwd: its Delta = rowsum(dO * O) takes O as stored and
cancels where a row's softmax is peaked, as capped scores make them), as tests/test_fuzz.py's
attention tests. A kernel that drew another mask fails by far more than the rule's tolerance.
Scores are spread to several times the cap, so tanh saturates."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fusedlm
from fusedlm import _ext, reference
from fusedlm.backends import OpDispatch
from fusedlm.ops.attention import attention_mask_bounds
from tests.helpers import assert_close_rule, larger_error, naive_attention

pytestmark = pytest.mark.gpu

attention_ops = importlib.import_module("fusedlm.ops.attention")
LOW = (torch.float16, torch.bfloat16)
DTYPE = pytest.mark.parametrize("dtype", LOW, ids=str)
HOPPER = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the sm_90a kernels run on compute capability 9.0 devices only")
CAP = 5.0
# (softcap, dropout_p): each alone and both
MODS = pytest.mark.parametrize("mods", [(CAP, 0.0), (0.0, 0.3), (CAP, 0.15)],
                               ids=["softcap", "dropout", "softcap-dropout"])


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    module = _ext.load()
    assert module is not None, f"fusedlm._C does not load: {_ext.why_unavailable()}"
    assert module.built_with_cuda(), "fusedlm._C was built without CUDA"


def _check(shape, dtype, causal, softcap, dropout_p, seed=1, window=None, key_range=None):
    """fusedlm.attention(backend="cuda") forward and backward against truth and baseline."""
    B, Hq, Hkv, Tq, Tk, D = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad_out = (torch.randn(s, generator=gen, device="cuda", dtype=torch.float64)
                         for s in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D),
                                   (B, Hq, Tq, D)))
    q, k = q * 2.5, k * 2.5  # scores of ~6 standard deviations: past the cap
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    out = fusedlm.attention(*leaves, causal=causal, softcap=softcap, dropout_p=dropout_p,
                            backend="cuda", window=window, key_range=key_range)
    out.backward(grad_out)
    assert OpDispatch.last_choice["attention_bwd"] == "cuda"
    terms = {"causal": causal, "softcap": softcap or None, "window": window,
             "key_range": key_range}
    torch.manual_seed(seed)
    draw = attention_ops._dropout_seed(q.device) if dropout_p else 0
    if dropout_p:
        terms["dropout_keep"] = reference.attention_dropout_keep(B, Hq, Tq, Tk, dropout_p, draw,
                                                                 "cuda")
        terms["dropout_p"] = dropout_p
    results = {}
    for name, cast in (("truth", torch.float64), ("baseline", dtype)):
        lq, lk, lv = (t.to(cast).clone().requires_grad_() for t in (q, k, v))
        o = naive_attention(lq, lk, lv, **terms)
        results[name] = (o, *torch.autograd.grad(o, (lq, lk, lv), grad_out.to(cast)))
    # FlashAttention's formula at the input's dtype, from the kernels' out
    bounds = (*attention_mask_bounds(Tq, Tk, causal, window), key_range, softcap, dropout_p,
              draw)
    scale = 1 / math.sqrt(D)
    _, lse = reference.attention_fwd(q, k, v, scale, *bounds)
    flash = reference.attention_bwd(grad_out, q, k, v, out.detach(), lse, scale, *bounds[:4],
                                    None, *bounds[4:])
    truth, naive = results["truth"], results["baseline"]
    assert_close_rule(out, naive[0], truth[0], name="out")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_rule(leaves[i].grad, larger_error(naive[i + 1], flash[i], truth[i + 1]),
                          truth[i + 1], name=name)


SHAPES = [
    (1, 1, 1, 1, 5, 64),  # (Tk = 1: dq is 0 in truth, and rounding noise under dropout)
    (2, 4, 2, 17, 23, 40),
    (1, 6, 2, 200, 333, 96),
    (2, 8, 2, 1000, 1000, 128),
    (1, 4, 1, 257, 255, 256),
    (1, 8, 8, 2048, 2048, 64),
]


@MODS
@DTYPE
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s)
                                               for s in SHAPES])
def test_score_mods(shape, causal, dtype, mods):
    _check(shape, dtype, causal, *mods)


@MODS
@pytest.mark.parametrize("setting", ["0", "require"], ids=["sm80", "sm90"])
def test_hopper_and_sm80_kernels(setting, mods, monkeypatch):
    """On an sm_90 GPU, each path proven to run: FUSEDLM_ATTENTION_SM90=require fails rather
    than fall back to the sm_80 kernels, =0 takes them."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels run on compute capability 9.0 devices only")
    monkeypatch.setenv("FUSEDLM_ATTENTION_SM90", setting)
    _check((2, 4, 2, 700, 900, 128), torch.bfloat16, True, *mods)


@MODS
def test_deterministic_backward(mods):
    """The deterministic dQ kernel regenerates the mask by query rows: right, and repeatable."""
    torch.use_deterministic_algorithms(True)
    try:
        _check((1, 4, 2, 300, 500, 64), torch.float16, True, *mods)
    finally:
        torch.use_deterministic_algorithms(False)


@MODS
def test_with_window_and_documents(mods):
    """With a sliding window and per-query key ranges (packed documents)."""
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 300, 200])).reshape(1, -1)
    key_range = fusedlm.key_range_from_document_ids(ids.cuda())
    _check((1, 4, 2, 600, 600, 64), torch.bfloat16, True, *mods, window=(128, 0),
           key_range=key_range)


@MODS
@pytest.mark.parametrize("shape", [(1, 32, 8, 1, 4096, 128), (4, 8, 8, 1, 2048, 64)],
                         ids=["gqa-packed-split", "mha-split"])
def test_decode(shape, mods):
    """One query row over a long cache: the query heads packed into rows, the keys split over
    CTAs; the packed rows draw the unpacked rows' mask."""
    _check(shape, torch.bfloat16, False, *mods)
