"""Shared test helpers: backend parametrization and the numerics rule of DESIGN.md.

The rule (FlashAttention's): a kernel's output ``out`` passes when

    max|out - truth| <= 2 * max|out_torch - truth| + atol

where ``truth`` is the op computed in float64 and ``out_torch`` is PyTorch's own computation at
the input's precision. ``atol`` scales with the magnitude of the truth.

The truths used here are computed independently of ``fusedlm.reference`` (torch's own
functions in float64, or the naive math written out in this file), so that the ``"torch"``
backend, which *is* ``fusedlm.reference``, is tested too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import triton_interpreted

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# Absolute slack of the rule, relative to max(1, max|truth|). For the half types it is at
# least the rounding of the result itself (half an ulp at magnitude 1: 2^-11 float16, 2^-8
# bfloat16): a result stored in that type cannot be closer to the truth, and on small tensors
# the torch baseline's max error, taken over few entries, may happen to be smaller. (bfloat16
# was 1e-3, a quarter of its own rounding: a tiny emulated CUDA backward, Tq=17 Tk=15 D=8,
# failed with 4.1e-3 where a float64 model of the flash algorithm's bfloat16 roundings gives
# 4.1e-3 too.)
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 2**-8,
}

# Backends that run on a device other than the CPU.
_GPU_BACKENDS = ("cuda", "triton")


def device_of(backend: str) -> str:
    """The device the tests feed ``backend``'s kernels with: CPU tensors for the Triton
    kernels under ``TRITON_INTERPRET=1`` (see tests/conftest.py's FUSEDLM_TEST_TRITON_ON_CPU)."""
    if backend == "triton" and triton_interpreted():
        return "cpu"
    return "cuda" if backend in _GPU_BACKENDS else "cpu"


def attention_refusal(backend: str, dtype: torch.dtype) -> str | None:
    """Why ``backend``'s attention kernels refuse ``dtype`` (BackendNotSupportedError, tested in
    tests/cuda and tests/triton), or None: the GPU tests skip those cases."""
    if backend == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda attention backend takes float16 and bfloat16 only, not {dtype}"
    if backend == "triton" and dtype == torch.float64:
        return "the triton attention backend does not take float64"
    return None


def refuse_host_reads(patch) -> None:
    """Makes every way of turning a tensor into a Python value raise (``patch``: a monkeypatch
    context): on a GPU each is a wait for the device."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy"):
        patch.setattr(torch.Tensor, name, refuse)


def available_backends(device: str = "cpu") -> list:
    """``pytest.param`` per backend to test: "cpu" (skipped with fusedlm.backends()'s reason when
    the extension is not usable) and "torch" always; "triton"/"cuda" only when available (they
    run on CUDA tensors and carry the ``gpu`` mark). ``device="cuda"`` lists the GPU ones."""
    report = fusedlm.backends()
    params = []
    if device == "cpu":
        info = report["cpu"]
        params.append(
            pytest.param(
                "cpu",
                marks=pytest.mark.skipif(not info.available, reason=f"cpu backend: {info.reason}"),
                id="cpu",
            )
        )
    for name in _GPU_BACKENDS:
        if report[name].available:
            params.append(pytest.param(name, marks=pytest.mark.gpu, id=name))
    params.append(pytest.param("torch", id="torch"))
    return params


def kernel_backends() -> list:
    """Backends for tests that need the compiled extension itself (opcheck, gradcheck of "cpu")."""
    info = fusedlm.backends()["cpu"]
    return [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(not info.available, reason=f"cpu backend: {info.reason}"),
            id="cpu",
        )
    ]


def cpu_backend_available() -> bool:
    return fusedlm.backends()["cpu"].available


def cpu_unavailable_reason() -> str:
    return f"cpu backend: {fusedlm.backends()['cpu'].reason}"


# For tests that name the cpu backend (its kernels must run, not a fallback).
needs_cpu_backend = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())


def atol_for(dtype: torch.dtype, truth: torch.Tensor, factor: float = 1.0) -> float:
    """``ATOL[dtype] * factor`` scaled by max(1, max|finite truth|)."""
    magnitude = truth.detach().abs()
    if not torch.isfinite(magnitude).all():
        magnitude = magnitude[torch.isfinite(magnitude)]
    scale = max(1.0, magnitude.max().item()) if magnitude.numel() else 1.0
    return ATOL[dtype] * scale * factor


def assert_close_rule(
    out: torch.Tensor,
    out_torch: torch.Tensor,
    truth: torch.Tensor,
    atol: float | None = None,
    name: str = "output",
    factor: float = 2.0,
) -> None:
    """max|out - truth| <= factor * max|out_torch - truth| + atol, with both errors reported.

    ``out`` and ``out_torch`` must have truth's shape; NaN/Inf must sit where the truth has them
    (and match its sign for Inf), a truth past the range of ``out``'s dtype counting as the
    infinity it rounds to (a float16 AdamW step whose true result is -1.5e6 is -inf in float16,
    torch's too). ``atol`` defaults to ``ATOL[out.dtype]`` times the truth's scale.
    """
    assert isinstance(out, torch.Tensor), f"{name}: expected a tensor, got {type(out).__name__}"
    assert out.shape == truth.shape, (
        f"{name}: shape {tuple(out.shape)} != expected {tuple(truth.shape)}"
    )
    assert out_torch.shape == truth.shape, (
        f"{name}: torch baseline shape {tuple(out_torch.shape)} != {tuple(truth.shape)}"
    )
    out64, torch64, truth64 = (t.detach().to("cpu", torch.float64) for t in (out, out_torch, truth))
    if out.dtype.is_floating_point and out.dtype != torch.float64:
        rounded = truth64.to(out.dtype).to(torch.float64)
        truth64 = torch.where(torch.isfinite(truth64) & torch.isinf(rounded), rounded, truth64)
    if atol is None:
        atol = atol_for(out.dtype, truth64)
    if out64.numel() == 0:
        return
    if torch.isfinite(truth64).all():
        bad = ~torch.isfinite(out64)
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} non-finite values where the truth is finite, first at "
            f"{tuple(torch.nonzero(bad)[0].tolist())}"
        )
        err = (out64 - truth64).abs().max().item()
        torch_err = torch.nan_to_num((torch64 - truth64).abs(), nan=0.0, posinf=0.0).max().item()
    else:
        nan_truth, nan_out = torch.isnan(truth64), torch.isnan(out64)
        assert torch.equal(nan_out, nan_truth), (
            f"{name}: NaN pattern differs from the truth: {int(nan_out.sum())} NaN in output, "
            f"{int(nan_truth.sum())} in truth, first mismatch at "
            f"{tuple(torch.nonzero(nan_out != nan_truth)[0].tolist())}"
        )
        inf_truth = torch.isinf(truth64)
        assert torch.equal(torch.isinf(out64), inf_truth) and torch.equal(
            out64[inf_truth], truth64[inf_truth]
        ), f"{name}: Inf entries differ from the truth"
        finite = torch.isfinite(truth64)
        if not finite.any():
            return
        err = (out64[finite] - truth64[finite]).abs().max().item()
        torch_err = (
            torch.nan_to_num((torch64[finite] - truth64[finite]).abs(), nan=0.0, posinf=0.0)
            .max()
            .item()
        )
    bound = factor * torch_err + atol
    assert err <= bound, (
        f"{name} ({out.dtype}): max|out - truth| = {err:.3e} exceeds {factor} * "
        f"max|torch - truth| + atol = {factor} * {torch_err:.3e} + {atol:.1e} = {bound:.3e}"
    )


# ---- independent truths --------------------------------------------------------------------


def larger_error(a, b, truth):
    """Whichever of the baselines ``a``, ``b`` (``b`` may be None) is further from ``truth``:
    the rule's "torch's own error" where torch has two ways to compute a thing (attention
    gradients: the naive softmax backward, or FlashAttention's formula, whose
    Delta = rowsum(dO * O) takes O as stored and cancels where a row's softmax is peaked)."""
    if b is None or not truth.numel():
        return a
    errors = [torch.nan_to_num((x.double() - truth.double()).abs(), nan=0.0, posinf=0.0).max()
              for x in (a, b)]
    return b if errors[1] > errors[0] else a


def _masked_scores(q, k, scale=None, causal=False, causal_offset=None, window=None,
                   window_offset=None, key_range=None, softcap=None):
    """(scores (B, Hq, Tq, Tk) = q k^T * scale (with ``softcap``: softcap * tanh(that /
    softcap), Gemma 2's code) with -inf where a key is hidden, no_key (B or 1, 1, Tq, 1) bool
    or None when nothing is hidden): naive_attention's terms."""
    Tq, D = q.shape[2], q.shape[3]
    Tk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if causal_offset is None:
        causal_offset = Tk - Tq
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if not (causal or window is not None or window_offset is not None or key_range is not None):
        return scores, None
    rows = torch.arange(Tq, device=q.device)[:, None]
    cols = torch.arange(Tk, device=q.device)[None, :]
    visible = cols <= rows + causal_offset if causal else torch.ones_like(cols == rows)
    for side, limit in zip((-1, 1), window or (None, None), strict=True):
        if limit is not None and limit != -1:  # side -1: j >= p - left; 1: j <= p + right
            visible = visible & (side * (cols - rows - (Tk - Tq)) <= limit)
    if window_offset is not None:
        visible = visible & (cols >= rows + window_offset)
    if key_range is not None:  # (Tq, Tk) -> (B, 1, Tq, Tk)
        per_row = key_range.to(q.device)  # (B, 1 or Tq, 2)
        per_row = per_row if per_row.dim() == 3 else per_row[:, None]
        start, end = (per_row[:, None, :, i, None] for i in (0, 1))
        visible = visible & (cols >= start) & (cols < end)
    return scores.masked_fill(~visible, float("-inf")), ~visible.any(dim=-1)[..., None]


def naive_attention(q, k, v, scale=None, causal=False, causal_offset=None, window=None,
                    window_offset=None, key_range=None, sinks=None, return_lse=False,
                    softcap=None, dropout_keep=None, dropout_p=0.0):
    """softmax(q k^T * scale) v written out with torch ops in q's dtype (autograd-able).

    q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D). Key j is visible to query i iff not causal or
    j <= i + causal_offset (default Tk - Tq, bottom-right), and, with ``window=(left, right)``
    (None or -1: no limit on that side), p - left <= j <= p + right where p = i + Tk - Tq, and
    with ``window_offset`` (the custom op's form) j >= i + window_offset, and with
    ``key_range`` ((B, 2) integers) key_range[b, 0] <= j < key_range[b, 1] in batch row b, or
    ((B, Tq, 2) integers) key_range[b, i, 0] <= j < key_range[b, i, 1]. Rows that see no key
    give 0. ``sinks`` (Hq,): one more logit per head in each row's softmax, with no value
    (GPT-OSS's eager attention: the scores with the sink as a last column, softmaxed, the
    column dropped). ``softcap``: the scores soft-capped, softcap * tanh(s / softcap), before
    the masks. ``dropout_keep`` (B, Hq, Tq, Tk) bool with ``dropout_p``: attention dropout,
    the probabilities outside the mask zeroed and the rest scaled by 1 / (1 - dropout_p)
    before the product with v (lse is the softmax's). With ``return_lse``, (out, lse), lse
    each row's logsumexp (sink included)."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    group = Hq // k.shape[1]
    v = v.repeat_interleave(group, dim=1)
    scores, no_key = _masked_scores(q, k, scale, causal, causal_offset, window, window_offset,
                                    key_range, softcap)
    if sinks is not None:
        column = sinks.to(scores.dtype).reshape(1, Hq, 1, 1).expand(B, Hq, Tq, 1)
        scores = torch.cat([scores, column], dim=-1)
        # A row with no key puts all its weight on the sink; with a sink of -inf too it gives
        # 0 (a softmax of -inf alone is NaN, its gradient too: it takes stand-in scores).
        hidden = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(hidden, 0.0), dim=-1)[..., :Tk]
        probs = probs.masked_fill(hidden, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
        if no_key is not None:  # a softmax of -inf alone is NaN; such rows give 0
            probs = probs.masked_fill(no_key, 0.0)
    if dropout_keep is not None:
        probs = probs.masked_fill(~dropout_keep, 0.0) / (1 - dropout_p)
    out = probs @ v
    if not return_lse:
        return out
    # A row of -inf alone has lse -inf and no gradient (logsumexp's own would be NaN there).
    hidden = torch.isneginf(scores).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(scores.masked_fill(hidden, 0.0), dim=-1)
    return out, lse.masked_fill(hidden[..., 0], float("-inf"))


class _FlashFormula(torch.autograd.Function):
    """q, k, v -> (out, lse) of naive_attention computed in float32 or wider (out in q's
    dtype), whose backward is FlashAttention's formula in that precision: P = exp(S - lse)
    from the stored lse, Delta = rowsum(dO * O) - grad_lse, dS = P (dP - Delta) (times
    1 - tanh^2 of the scores with ``softcap`` among the masks)."""

    @staticmethod
    def forward(ctx, q, k, v, masks):
        compute = torch.promote_types(q.dtype, torch.float32)
        out, lse = naive_attention(q.to(compute), k.to(compute), v.to(compute), **masks,
                                   return_lse=True)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks = masks
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        compute = lse.dtype
        group = q.shape[1] // k.shape[1]
        qc, kc, vc = (t.to(compute) for t in (q, k, v))
        scores, _ = _masked_scores(qc, kc, **ctx.masks)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows of -inf: 0
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dout = grad_out.to(compute)
        k_full, v_full = (t.repeat_interleave(group, dim=1) for t in (kc, vc))
        delta = (dout * out.to(compute)).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - torch.where(torch.isfinite(lse), grad_lse, 0.0)[..., None]
        dscores = probs * (dout @ v_full.transpose(-1, -2) - delta)
        scale = ctx.masks.get("scale") or 1.0 / math.sqrt(q.shape[3])
        if ctx.masks.get("softcap"):
            tanh = torch.tanh(qc @ k_full.transpose(-1, -2) * scale / ctx.masks["softcap"])
            dscores = dscores * (1 - tanh * tanh)
        dq = (dscores @ k_full) * scale
        B, Hkv, Tk, D = k.shape

        def per_kv_head(t):  # (B, Hq, Tk, D) -> (B, Hkv, Tk, D): GQA's sum
            return t.reshape(B, Hkv, group, Tk, D).sum(dim=2)

        dk = per_kv_head(dscores.transpose(-1, -2) @ qc) * scale
        dv = per_kv_head(probs.transpose(-1, -2) @ dout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def flash_formula_attention(q, k, v, sinks=None, return_lse=True, **masks):
    """(out, lse) as ``naive_attention(q, k, v, sinks=sinks, return_lse=True, **masks)`` gives
    them, with gradients by FlashAttention's formula in float32 or wider: torch's own error for
    a flash backward, whose probabilities come from a rounded lse (relative error about
    |lse| * eps where scores are large, which a softmax over S - max does not have). The sinks
    are folded in afterwards: out * sigmoid(lse - sink), lse = logaddexp(lse, sink).
    (``return_lse`` must be True: naive_attention's signature.)"""
    assert return_lse, "flash_formula_attention returns (out, lse)"
    out, lse = _FlashFormula.apply(q, k, v, masks)
    if sinks is None:
        return out, lse
    sink = sinks.to(lse.dtype)[None, :, None].expand_as(lse)
    both_hidden = torch.isneginf(lse) & torch.isneginf(sink)
    lse_, sink_ = (torch.where(both_hidden, 0.0, t) for t in (lse, sink))
    weight = torch.where(both_hidden, 0.0, torch.sigmoid(lse_ - sink_))
    combined = torch.where(both_hidden, float("-inf"), torch.logaddexp(lse_, sink_))
    return (out * weight[..., None]).to(out.dtype), combined


def sdpa_truth_and_torch(q, k, v, **kwargs):
    """(truth in float64, torch's own at q's dtype) for F.scaled_dot_product_attention."""
    with torch.no_grad():
        truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs)
        same = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return truth, same
