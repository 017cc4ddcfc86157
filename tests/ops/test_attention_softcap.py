"""fusedlm.attention's ``softcap`` (logit soft-capping: each score s = scale * q.k becomes
softcap * tanh(s / softcap) before the masks and the softmax, Gemma 2's attn_logit_softcapping)
on every backend, with the masks, sinks and lse, through attention_varlen, torch.compile and
the custom ops' opcheck.

Truth: tests/helpers.naive_attention(softcap=) in float64 (Gemma 2's eager code); baseline: the
same naive math at the input's dtype. The inputs are scaled so that the scores reach several
times the cap: the tanh's saturation (and its gradient's 1 - tanh^2) matters."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.backends import OpDispatch
from tests.helpers import (
    assert_close_rule,
    atol_for,
    available_backends,
    device_of,
    kernel_backends,
    naive_attention,
)
from tests.ops.test_attention_lse_and_sinks import _inputs as unit_inputs
from tests.ops.test_attention_lse_and_sinks import _skip_if_refused

BACKENDS = available_backends()
CUDA = [param for param in available_backends("cuda") if param.id == "cuda"]
attention_ops = importlib.import_module("fusedlm.ops.attention")  # (the package exports a function
# of that name)

# (B, Hq, Hkv, Tq, Tk, D): one element; odd sizes; GQA; Tq > Tk (causal rows that see no key);
# several partial query and key tiles with MQA; decoding (one query row, the cpu kernels' key
# splits and shared GQA tiles).
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 17, 23, 40),
    (1, 2, 2, 70, 17, 64),
    (1, 2, 1, 150, 270, 40),
    (1, 8, 2, 1, 700, 64),
]
SHAPE_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]
DTYPES = [torch.float64, torch.float32, torch.float16]


def _inputs(shape, dtype, device, spread=3.0, seed=0):
    """q, k (scores of ~spread^2 standard deviations), v, sinks, grad_out, grad_lse."""
    q, k, *rest = unit_inputs(shape, dtype, device, seed)
    return [q * spread, k * spread, *rest]


def _check(shape, dtype, backend, softcap, use_sinks=False, use_lse=False, spread=3.0,
           dropout_p=0.0, dropout_seed=0, **masks):
    """out (and lse) and the gradients of q, k, v (and sinks) against truth and baseline. With
    ``dropout_p`` (tests/ops/test_attention_dropout.py), truth and baseline take the keep mask
    of ``dropout_seed``, the seed the caller has pinned fusedlm.attention's draw to."""
    _skip_if_refused(backend, dtype)
    q, k, v, sinks, grad_out, grad_lse = _inputs(shape, dtype, device_of(backend), spread)
    terms = {"softcap": softcap, **masks}
    if dropout_p:
        B, Hq, Tq = q.shape[:3]
        keep = reference.attention_dropout_keep(B, Hq, Tq, k.shape[2], dropout_p, dropout_seed,
                                                q.device)
    results = {}
    for name in ("ours", "baseline", "truth"):
        cast = torch.float64 if name == "truth" else dtype
        lq, lk, lv, ls = (t.to(cast).clone().requires_grad_() for t in (q, k, v, sinks))
        s = ls if use_sinks else None
        if name == "ours":
            out, lse = fusedlm.attention(lq, lk, lv, sinks=s, return_lse=True, backend=backend,
                                         dropout_p=dropout_p, **terms)
        else:
            dropout = {"dropout_keep": keep, "dropout_p": dropout_p} if dropout_p else {}
            out, lse = naive_attention(lq, lk, lv, sinks=s, return_lse=True, **terms, **dropout)
        loss = (out * grad_out.to(cast)).sum()
        if use_lse:
            loss = loss + (lse * grad_lse.to(lse.dtype)).sum()
        wrt = [lq, lk, lv] + ([ls] if use_sinks else [])
        results[name] = out, lse, torch.autograd.grad(loss, wrt)

    (out, lse, grads), (out_base, lse_base, grads_base), (out_truth, lse_truth, grads_truth) = (
        results["ours"], results["baseline"], results["truth"])
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rule(out, out_base, out_truth, name="out")
    assert_close_rule(lse, lse_base, lse_truth, name="lse")
    names = ("dq", "dk", "dv", "dsinks")[:len(grads)]
    for name, g, g_base, g_truth in zip(names, grads, grads_base, grads_truth, strict=True):
        assert g.dtype == dtype, f"{name}: {g.dtype}"
        assert_close_rule(g, g_base, g_truth, atol=atol_for(dtype, g_truth), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_softcap(shape, causal, dtype, backend):
    _check(shape, dtype, backend, 5.0, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=SHAPE_IDS[1:4])
def test_softcap_bfloat16_forward(shape, causal, backend):
    """bfloat16, forward only (as tests/ops/test_attention.py's bfloat16 case): the absolute
    term 1e-2 * max|out|, its 8-bit mantissa dominating."""
    q, k, v, *_ = _inputs(shape, torch.bfloat16, device_of(backend))
    out = fusedlm.attention(q, k, v, causal=causal, softcap=5.0, backend=backend)
    out_base = naive_attention(q, k, v, causal=causal, softcap=5.0)
    truth = naive_attention(q.double(), k.double(), v.double(), causal=causal, softcap=5.0)
    assert out.dtype == torch.bfloat16
    assert_close_rule(out, out_base, truth, atol=1e-2 * max(1.0, truth.abs().max().item()),
                      name="out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [0.5, 30.0, 50.0])
def test_softcap_values(softcap, backend):
    """A cap far below the scores (nearly every score saturates: tanh's gradient ~0), Gemma 2's
    50.0 and 30.0 (its final cap) on scores that reach it."""
    _check((2, 4, 2, 33, 47, 32), torch.float32, backend, softcap, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("masks", ["window", "key_range", "documents"])
def test_softcap_with_windows_and_key_ranges(masks, dtype, backend):
    """Gemma 2 alternates sliding-window and global layers, both capped; padded and packed
    batches have rows that see few keys or none. The cap comes before the masks."""
    B, Tq = 2, 41
    shape = (B, 4, 2, Tq, Tq, 24)
    device = device_of(backend)
    if masks == "window":
        _check(shape, dtype, backend, 5.0, causal=True, window=(7, 0))
    elif masks == "key_range":
        key_range = torch.tensor([[5, 41], [0, 0]], dtype=torch.int32, device=device)
        _check(shape, dtype, backend, 5.0, causal=True, key_range=key_range)
    else:
        starts = torch.tensor([0, 10, 29], device=device)
        document = torch.searchsorted(starts, torch.arange(Tq, device=device), right=True) - 1
        ends = torch.tensor([10, 29, Tq], device=device)
        per_query = torch.stack([starts[document], ends[document]], dim=-1)
        key_range = per_query.to(torch.int32)[None].expand(B, Tq, 2).contiguous()
        _check(shape, dtype, backend, 5.0, causal=True, key_range=key_range)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_sinks", [False, True], ids=["lse", "sinks_and_lse"])
def test_softcap_with_lse_gradient_and_sinks(use_sinks, backend):
    """The capped scores' lse takes a gradient (grad_lse) and joins the sinks' softmax."""
    _check((2, 4, 2, 29, 37, 16), torch.float32, backend, 5.0, use_sinks=use_sinks,
           use_lse=True, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_softcap_is_plain_attention_bit_for_bit(backend):
    """softcap None and 0 are no capping: the uncapped kernels run (the same bits)."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((2, 4, 2, 19, 23, 16), torch.float32, device_of(backend))
    plain = fusedlm.attention(q, k, v, causal=True, backend=backend)
    for softcap in (None, 0, 0.0):
        assert torch.equal(fusedlm.attention(q, k, v, causal=True, backend=backend,
                                             softcap=softcap), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cap_far_above_the_scores_changes_little(backend):
    """softcap * tanh(s / softcap) = s (1 - s^2 / (3 softcap^2) + ...): with |s| < 12 and a
    cap of 1e4 the scores move by < 6e-7, so the output is plain attention's up to rounding,
    and capping does move it when the cap is low."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((2, 4, 2, 19, 23, 16), torch.float32, device_of(backend))
    plain = fusedlm.attention(q, k, v, causal=True, backend=backend)
    high = fusedlm.attention(q, k, v, causal=True, backend=backend, softcap=1e4)
    low = fusedlm.attention(q, k, v, causal=True, backend=backend, softcap=2.0)
    torch.testing.assert_close(high, plain, rtol=1e-5, atol=1e-5)
    assert (low - plain).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cap_is_accurate_to_a_few_ulps(backend):
    """With one key, lse is the capped score itself: softcap * tanh(s / softcap) for s over
    1e-12..12 times the cap, both signs, against float64, relative. The cpu kernels compute
    tanh from exp and a series on AVX2 / AVX-512 (tests/test_cpu_isa.py reruns this per
    instruction set): at most 4e-7 (torch's float32 tanh: 6e-8); an absolute error in tanh
    would be multiplied by the cap."""
    _skip_if_refused(backend, torch.float32)
    device = device_of(backend)
    softcap = 50.0
    magnitudes = torch.cat([torch.logspace(-12, 0, 2001, dtype=torch.float64),
                            torch.linspace(0.25, 0.35, 501, dtype=torch.float64),
                            torch.linspace(1, 12, 501, dtype=torch.float64)])
    scores = softcap * torch.cat([magnitudes, -magnitudes, torch.zeros(1, dtype=torch.float64)])
    q = scores.float().reshape(1, 1, -1, 1).to(device)  # D = 1, k = 1, scale 1: s = q
    k, v = torch.ones(1, 1, 1, 1, device=device), torch.ones(1, 1, 1, 1, device=device)
    _, lse = fusedlm.attention(q, k, v, scale=1.0, softcap=softcap, return_lse=True,
                               backend=backend)
    truth = softcap * torch.tanh(q.double().cpu().flatten() / softcap)
    relative = (lse.double().cpu().flatten() - truth).abs() / truth.abs().clamp_min(1e-300)
    assert relative.max() < 4e-7, (relative.max().item(), q.flatten()[relative.argmax()].item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_softcap_is_each_sequences(backend):
    """attention_varlen with softcap: each sequence's own capped attention."""
    _skip_if_refused(backend, torch.float32)
    device = device_of(backend)
    lengths_q, lengths_k = [5, 1, 12], [7, 3, 12]
    Hq, Hkv, D = 4, 2, 16
    gen = torch.Generator().manual_seed(1)
    q = (3 * torch.randn(sum(lengths_q), Hq, D, generator=gen)).to(device).requires_grad_()
    k = (3 * torch.randn(sum(lengths_k), Hkv, D, generator=gen)).to(device).requires_grad_()
    v = torch.randn(sum(lengths_k), Hkv, D, generator=gen).to(device).requires_grad_()
    cu_q = torch.tensor([0, 5, 6, 18], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 10, 22], dtype=torch.int32, device=device)
    out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, causal=True, softcap=4.0,
                                   backend=backend)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    loss = 0
    for s in range(3):
        rows_q = slice(cu_q[s].item(), cu_q[s + 1].item())
        rows_k = slice(cu_k[s].item(), cu_k[s + 1].item())
        one = [t[rows].transpose(0, 1)[None]
               for t, rows in zip(leaves, (rows_q, rows_k, rows_k), strict=True)]
        out_s = fusedlm.attention(*one, causal=True, softcap=4.0, backend=backend)
        torch.testing.assert_close(out[rows_q], out_s[0].transpose(0, 1))
        loss = loss + out_s.square().sum()
    loss.backward()
    for name, g, leaf in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_compile_fullgraph(backend):
    """Under torch.compile (the registered custom ops carry softcap): eager's numbers, forward
    and backward."""
    _skip_if_refused(backend, torch.float32)
    torch._dynamo.reset()
    q, k, v, _, grad_out, _ = _inputs((2, 4, 2, 13, 21, 16), torch.float32, device_of(backend))

    def step(q, k, v):
        return (fusedlm.attention(q, k, v, causal=True, softcap=5.0, backend=backend)
                * grad_out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for name, eager, traced in zip(("loss", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(traced, eager, msg=name)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_with_softcap(backend):
    """torch.library.opcheck of fusedlm::attention_fwd/bwd with a softcap (schema, fake
    tensors, autograd registration)."""
    q, k, v, _, grad_out, grad_lse = _inputs((1, 4, 2, 9, 11, 8), torch.float32, "cpu")
    window_offset, key_range = None, None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fusedlm.attention_fwd.default,
                          (*leaves, 0.35, True, 2, backend, window_offset, key_range, 5.0))
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, 0.35, True, 2, backend, None, None, 5.0)
    torch.library.opcheck(torch.ops.fusedlm.attention_bwd.default,
                          (grad_out, q, k, v, out, lse, 0.35, True, 2, backend, None, None,
                           grad_lse.float(), 5.0))


@pytest.mark.parametrize("softcap, error, match", [
    (-1.0, ValueError, "argument 'softcap' must be > 0"),
    (math.inf, ValueError, "softcap"),
    (math.nan, ValueError, "softcap"),
    ("5", TypeError, "softcap"),
    (True, TypeError, "softcap"),
])
def test_bad_softcap_is_named(softcap, error, match):
    q, k, v, *_ = _inputs((1, 2, 2, 4, 4, 8), torch.float32, "cpu")
    with pytest.raises(error, match=match):
        fusedlm.attention(q, k, v, softcap=softcap)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(error, match=match):
        fusedlm.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                 v[0].transpose(0, 1), cu, cu, softcap=softcap)


@pytest.mark.parametrize("backend", kernel_backends())
def test_extension_entry_points_check_softcap(backend):
    """fusedlm._C.attention_fwd/bwd name a negative or non-finite softcap."""
    from fusedlm import _ext

    C = _ext.load()
    q, k, v, _, grad_out, _ = _inputs((1, 2, 2, 4, 4, 8), torch.float32, "cpu")
    out, lse = C.attention_fwd(q, k, v, 0.5, False, 0, softcap=3.0)
    for bad in (-1.0, math.inf):
        with pytest.raises(ValueError, match="softcap"):
            C.attention_fwd(q, k, v, 0.5, False, 0, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            C.attention_bwd(grad_out, q, k, v, out, lse, 0.5, False, 0, softcap=bad)


@pytest.mark.parametrize("backend", CUDA)
def test_auto_takes_the_cuda_kernels(backend):
    """On a GPU a capped fp16 call with backend auto runs the CUDA kernels (which soft-cap in
    their kScoreMods instances), forward and backward."""
    q, k, v, _, grad_out, _ = _inputs((1, 4, 2, 17, 23, 64), torch.float16, "cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fusedlm.attention(*leaves, causal=True, softcap=5.0)
    assert OpDispatch.last_choice["attention_fwd"] == "cuda"
    out.backward(grad_out)
    assert OpDispatch.last_choice["attention_bwd"] == "cuda"
    truth = naive_attention(q.double(), k.double(), v.double(), causal=True, softcap=5.0)
    assert_close_rule(out, naive_attention(q, k, v, causal=True, softcap=5.0), truth, name="out")


def test_cuda_kernels_take_capped_calls(monkeypatch):
    """The CUDA kernels' support check takes a cap (fp16 on sm_80+), so auto prefers them on a
    GPU; their numerics are tests/cuda_emulation/test_attention_score_mods_emulated.py's."""
    monkeypatch.setattr(attention_ops, "_capability", lambda device: (9, 0))
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16,
                              shape=(1, 4, 17, 64))
    assert attention_ops._extension_supports(q, q, q, None, None, 5.0) is None
