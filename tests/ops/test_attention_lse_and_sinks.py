"""fusedlm.attention's ``return_lse=True`` (a differentiable log-sum-exp per row) and ``sinks``
(attention sinks, GPT-OSS's learned per-head logit), on every backend, and the same through
attention_varlen and torch.compile.

Truth: tests/helpers.naive_attention with sinks / lse in float64; baseline: the same naive math
at the input's dtype. Gradients are those of sum(out * grad_out) + sum(lse * grad_lse), so the
kernels' backward sees a gradient of lse (grad_lse), and of the sinks."""

from __future__ import annotations

import importlib

import pytest
import torch

import fusedlm
from tests.helpers import (
    assert_close_rule,
    atol_for,
    attention_refusal,
    available_backends,
    device_of,
    naive_attention,
)

BACKENDS = available_backends()
attention_ops = importlib.import_module("fusedlm.ops.attention")  # (the package exports a function
# of that name)

# (B, Hq, Hkv, Tq, Tk, D): one element; odd sizes; GQA; Tq > Tk (causal rows that see no key);
# several partial query and key tiles with MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 2, 17, 17, 40),
    (1, 6, 2, 17, 40, 64),
    (1, 2, 2, 113, 17, 64),
    (1, 2, 1, 150, 270, 40),
]
SHAPE_IDS = ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}".format(*s) for s in SHAPES]
DTYPES = [torch.float64, torch.float32, torch.float16]


def _skip_if_refused(backend, dtype):
    reason = attention_refusal(backend, dtype)
    if reason is not None:
        pytest.skip(reason)


def _inputs(shape, dtype, device, seed=0):
    B, Hq, Hkv, Tq, Tk, D = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64)
               for s in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))
    sinks = 2 * torch.randn(Hq, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(B, Hq, Tq, D, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Tq, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (q, k, v, sinks, grad_out, grad_lse)]


def _check(shape, dtype, backend, use_sinks, use_out=True, **masks):
    """out, lse and the gradients of q, k, v (and sinks) against truth and baseline."""
    _skip_if_refused(backend, dtype)
    q, k, v, sinks, grad_out, grad_lse = _inputs(shape, dtype, device_of(backend))
    leaves_of = {
        "ours": [t.clone().requires_grad_() for t in (q, k, v, sinks)],
        "baseline": [t.clone().requires_grad_() for t in (q, k, v, sinks)],
        "truth": [t.double().requires_grad_() for t in (q, k, v, sinks)],
    }
    results = {}
    for name, (lq, lk, lv, ls) in leaves_of.items():
        s = ls if use_sinks else None
        if name == "ours":
            out, lse = fusedlm.attention(lq, lk, lv, sinks=s, return_lse=True, backend=backend,
                                         **masks)
        else:
            out, lse = naive_attention(lq, lk, lv, sinks=s, return_lse=True, **masks)
        loss = (lse * grad_lse.to(lse.dtype)).sum()
        if use_out:
            loss = loss + (out * grad_out.to(out.dtype)).sum()
        wrt = [lq, lk, lv] + ([ls] if use_sinks else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        results[name] = out, lse, [torch.zeros_like(t) if g is None else g
                                   for g, t in zip(grads, wrt, strict=True)]

    out, lse, grads = results["ours"]
    out_base, lse_base, grads_base = results["baseline"]
    out_truth, lse_truth, grads_truth = results["truth"]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == q.shape[:3]
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
def test_return_lse_is_differentiable(shape, causal, dtype, backend):
    _check(shape, dtype, backend, use_sinks=False, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_sinks(shape, causal, dtype, backend):
    _check(shape, dtype, backend, use_sinks=True, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_sinks", [False, True], ids=["lse", "sinks"])
def test_lse_alone_takes_a_gradient(use_sinks, backend):
    """Only lse reaches the loss: the backward's output gradient is absent (zeros inside)."""
    _check((1, 4, 2, 33, 50, 16), torch.float32, backend, use_sinks, use_out=False, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("masks", ["window", "key_range", "documents"])
def test_sinks_with_windows_and_key_ranges(masks, dtype, backend):
    """GPT-OSS alternates sliding-window and full causal layers, both with sinks; padded and
    packed batches have rows that see few keys (or none: all the weight on the sink)."""
    B, Tq = 2, 41
    shape = (B, 4, 2, Tq, Tq, 24)
    device = device_of(backend)
    if masks == "window":
        _check(shape, dtype, backend, use_sinks=True, causal=True, window=(7, 0))
    elif masks == "key_range":
        key_range = torch.tensor([[5, 41], [0, 0]], dtype=torch.int32, device=device)
        _check(shape, dtype, backend, use_sinks=True, causal=True, key_range=key_range)
    else:
        starts = torch.tensor([0, 10, 29], device=device)
        document = torch.searchsorted(starts, torch.arange(Tq, device=device), right=True) - 1
        ends = torch.tensor([10, 29, Tq], device=device)
        per_query = torch.stack([starts[document], ends[document]], dim=-1)
        key_range = per_query.to(torch.int32)[None].expand(B, Tq, 2).contiguous()
        _check(shape, dtype, backend, use_sinks=True, causal=True, key_range=key_range)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_of_minus_infinity_change_nothing(backend):
    """A sink of -inf takes no weight: the result is plain attention's, bit for bit in out."""
    _skip_if_refused(backend, torch.float32)
    q, k, v, *_ = _inputs((2, 4, 2, 19, 23, 16), torch.float32, device_of(backend))
    sinks = torch.full((4,), float("-inf"), device=q.device)
    out, lse = fusedlm.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    out_sinks, lse_sinks = fusedlm.attention(q, k, v, causal=True, backend=backend, sinks=sinks,
                                             return_lse=True)
    assert torch.equal(out_sinks, out) and torch.equal(lse_sinks, lse)
    assert torch.equal(fusedlm.attention(q, k, v, causal=True, backend=backend), out)


def test_an_unused_lse_gives_the_backward_no_grad_lse(monkeypatch):
    """Most calls never read lse: their backward must not get (and read) a zero grad_lse."""
    seen = []
    real = attention_ops._attention_bwd

    def spy(*args):
        seen.append(args[12])  # grad_out, q, k, v, out, lse, scale, ..., key_range, grad_lse
        return real(*args)

    monkeypatch.setattr(attention_ops, "_attention_bwd", spy)
    q, k, v, sinks, *_ = _inputs((1, 2, 2, 9, 9, 8), torch.float32, "cpu")
    q.requires_grad_()
    fusedlm.attention(q, k, v, causal=True, backend="torch").sum().backward()
    out, _ = fusedlm.attention(q, k, v, backend="torch", return_lse=True)
    out.sum().backward()
    assert seen == [None, None]
    _, lse = fusedlm.attention(q, k, v, backend="torch", return_lse=True)
    lse.sum().backward()
    assert seen[-1] is not None and seen[-1].shape == (1, 2, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_sinks_and_lse_are_each_sequences(backend):
    """attention_varlen with sinks and return_lse: each sequence's own attention, lse in
    FlashAttention's varlen layout (Hq, total_q)."""
    _skip_if_refused(backend, torch.float32)
    device = device_of(backend)
    lengths_q, lengths_k = [5, 1, 12], [7, 3, 12]
    Hq, Hkv, D = 4, 2, 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lengths_q), Hq, D, generator=gen).to(device).requires_grad_()
    k = torch.randn(sum(lengths_k), Hkv, D, generator=gen).to(device).requires_grad_()
    v = torch.randn(sum(lengths_k), Hkv, D, generator=gen).to(device).requires_grad_()
    sinks = torch.randn(Hq, generator=gen).to(device).requires_grad_()
    cu_q = torch.tensor([0, 5, 6, 18], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 10, 22], dtype=torch.int32, device=device)
    out, lse = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, causal=True, sinks=sinks,
                                        return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
    (out.square().sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v, sinks)]

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    loss = 0
    for s in range(3):
        rows_q = slice(cu_q[s].item(), cu_q[s + 1].item())
        rows_k = slice(cu_k[s].item(), cu_k[s + 1].item())
        one = [t[rows].transpose(0, 1)[None]
               for t, rows in zip(leaves[:3], (rows_q, rows_k, rows_k), strict=True)]
        out_s, lse_s = fusedlm.attention(*one, causal=True, sinks=leaves[3], return_lse=True,
                                         backend=backend)
        torch.testing.assert_close(out[rows_q], out_s[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, rows_q], lse_s[0])
        loss = loss + out_s.square().sum() + lse_s.sum()
    loss.backward()
    for name, g, leaf in zip(("dq", "dk", "dv", "dsinks"), grads, leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_and_lse_compile_fullgraph(backend):
    """Under torch.compile (the registered custom ops; the lse gradient is a materialized tensor
    there), eager's numbers, forward and backward."""
    _skip_if_refused(backend, torch.float32)
    torch._dynamo.reset()
    q, k, v, sinks, grad_out, grad_lse = _inputs((2, 4, 2, 13, 21, 16), torch.float32,
                                                 device_of(backend))

    def step(q, k, v, sinks):
        out, lse = fusedlm.attention(q, k, v, causal=True, sinks=sinks, return_lse=True,
                                     backend=backend)
        return (out * grad_out).sum() + (lse * grad_lse).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for name, eager, traced in zip(("loss", "dq", "dk", "dv", "dsinks"), *results, strict=True):
        torch.testing.assert_close(traced, eager, msg=name)
