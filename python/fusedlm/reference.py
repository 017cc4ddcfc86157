"""Pure-PyTorch versions of every op: the truth tests compare against (run in float64),
the baseline of benchmarks, and the ``"torch"`` backend that serves any call no kernel can.

Each function has the signature and return convention of the matching kernel entry point in
``fusedlm._C`` (see csrc/bindings.cpp). Low-precision inputs are computed in float32, as the
kernels do. Attention here materialises the (Tq, Tk) score matrix: it is the reference, not
the fast path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- LayerNorm / RMSNorm: x (M, N), weight/bias (N) -----------------------------------------


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (M, N) in x's dtype, mean (M) and rstd (M) in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    mean = xc.mean(dim=-1)
    var = (xc - mean[:, None]).square().mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
    y = (xc - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xc.dtype)
    if bias is not None:
        y = y + bias.to(xc.dtype)
    return y.to(x.dtype), mean, rstd


def layer_norm_bwd(
    grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, has_bias: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Returns dx (M, N), dweight (N) or None, dbias (N) or None; dweight and dbias in the
    weight's dtype (dbias in the compute dtype when there is no weight)."""
    dtype = compute_dtype(x.dtype)
    xc, dy = x.to(dtype), grad_y.to(dtype)
    xhat = (xc - mean[:, None].to(dtype)) * rstd[:, None].to(dtype)
    g = dy * weight.to(dtype) if weight is not None else dy
    dx = rstd[:, None].to(dtype) * (
        g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True)
    )
    param_dtype = weight.dtype if weight is not None else dtype
    dweight = (dy * xhat).sum(dim=0).to(param_dtype) if weight is not None else None
    dbias = dy.sum(dim=0).to(param_dtype) if has_bias else None
    return dx.to(x.dtype), dweight, dbias


def rms_norm_fwd(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Returns y (M, N) in x's dtype and rstd (M) in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    rstd = torch.rsqrt(xc.square().mean(dim=-1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xc.dtype)
    return y.to(x.dtype), rstd


def rms_norm_bwd(
    grad_y: Tensor, x: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Returns dx (M, N) and dweight (N) or None."""
    dtype = compute_dtype(x.dtype)
    xc, dy = x.to(dtype), grad_y.to(dtype)
    xhat = xc * rstd[:, None].to(dtype)
    g = dy * weight.to(dtype) if weight is not None else dy
    dx = rstd[:, None].to(dtype) * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    dweight = (dy * xhat).sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx.to(x.dtype), dweight


# ---- attention: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) ---------------------------------------


def _visible(Tq: int, Tk: int, causal: bool, causal_offset: int, device) -> Tensor | None:
    """(Tq, Tk) bool: key j visible to query i iff j <= i + causal_offset; None if all visible."""
    if not causal:
        return None
    rows = torch.arange(Tq, device=device)[:, None]
    cols = torch.arange(Tk, device=device)[None, :]
    return cols <= rows + causal_offset


def _expand_kv(t: Tensor, Hq: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D): query head h reads kv head h // (Hq // Hkv)."""
    return t.repeat_interleave(Hq // t.shape[1], dim=1) if t.shape[1] != Hq else t


def _probabilities(q, k, scale, causal, causal_offset):
    """Scores and log-sum-exp in the compute dtype; fully masked rows get lse = -inf."""
    dtype = compute_dtype(q.dtype)
    k_full = _expand_kv(k, q.shape[1]).to(dtype)
    scores = torch.matmul(q.to(dtype), k_full.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    mask = _visible(q.shape[2], k.shape[2], causal, causal_offset, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Tq); -inf where no key is visible
    safe_lse = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])  # exp(-inf) = 0 on masked entries
    return probs, lse


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int
) -> tuple[Tensor, Tensor]:
    """Returns out (B, Hq, Tq, D) in q's dtype and lse (B, Hq, Tq) in the compute dtype."""
    probs, lse = _probabilities(q, k, scale, causal, causal_offset)
    v_full = _expand_kv(v, q.shape[1]).to(probs.dtype)
    return torch.matmul(probs, v_full).to(q.dtype).contiguous(), lse.contiguous()


def attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    scale: float, causal: bool, causal_offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv in the shapes and dtypes of q, k, v."""
    probs, _ = _probabilities(q, k, scale, causal, causal_offset)
    dtype = probs.dtype
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    dout = grad_out.to(dtype)
    v_full = _expand_kv(v, Hq).to(dtype)
    k_full = _expand_kv(k, Hq).to(dtype)
    dv_full = torch.matmul(probs.transpose(-1, -2), dout)  # (B, Hq, Tk, D)
    dprobs = torch.matmul(dout, v_full.transpose(-1, -2))  # (B, Hq, Tq, Tk)
    delta = (dout * out.to(dtype)).sum(dim=-1, keepdim=True)  # (B, Hq, Tq, 1)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, k_full)
    dk_full = torch.matmul(dscores.transpose(-1, -2), q.to(dtype))
    group, Tk = (Hq // Hkv if Hkv else 1), k.shape[2]
    dk = dk_full.reshape(B, Hkv, group, Tk, D).sum(dim=2)
    dv = dv_full.reshape(B, Hkv, group, Tk, D).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- AdamW ----------------------------------------------------------------------------------


def adamw_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool, maximize: bool,
) -> None:
    """torch.optim.AdamW's update, in place, one tensor at a time (states may be float32 for
    low-precision params; the arithmetic runs in the compute dtype)."""
    for i, param in enumerate(params):
        dtype = compute_dtype(param.dtype)
        p = param.to(dtype)
        grad = grads[i].to(dtype)
        if maximize:
            grad = -grad
        m = exp_avgs[i].to(dtype)
        v = exp_avg_sqs[i].to(dtype)
        p = p * (1 - lr * weight_decay)
        m = m.lerp(grad, 1 - beta1)
        v = v * beta2 + (1 - beta2) * grad * grad
        step = steps[i]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if amsgrad:
            v_max = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            max_exp_avg_sqs[i].copy_(v_max)
            denom = v_max.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        p = p - step_size * m / denom
        param.copy_(p)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
