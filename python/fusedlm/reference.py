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



# ---- residual add + LayerNorm / RMSNorm: h = x + residual, y = norm(h) ----------------------
# x (M, N) the branch output, in residual's dtype or 16-bit beside a float32 residual;
# residual (M, N); h and y (M, N) in residual's dtype (torch's promotion of the two).


def add_residual(x: Tensor, residual: Tensor) -> Tensor:
    """h = x + residual, computed in the compute dtype and rounded once to residual's dtype:
    what eager ``x + residual`` gives for the dtype pairs the kernels take."""
    dtype = compute_dtype(residual.dtype)
    return (x.to(dtype) + residual.to(dtype)).to(residual.dtype)


def add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns y (M, N) and h (M, N) in residual's dtype, mean (M) and rstd (M) in the compute
    dtype: y is layer_norm_fwd of the rounded h."""
    h = add_residual(x, residual)
    y, mean, rstd = layer_norm_fwd(h, weight, bias, eps)
    return y, h, mean, rstd


def _plus_grad_h(dh: Tensor, grad_h: Tensor | None, h: Tensor) -> Tensor:
    """The norm's gradient (compute dtype) plus h's own gradient, rounded once to h's dtype."""
    return (dh if grad_h is None else dh + grad_h.to(dh.dtype)).to(h.dtype)


def add_layer_norm_bwd(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, has_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Returns dh (M, N) in h's dtype: the gradient reaching h through the norm plus grad_h
    (None: zero), which is the gradient of both x and residual; dweight, dbias as
    layer_norm_bwd."""
    dh, dweight, dbias = layer_norm_bwd(grad_y, h.to(compute_dtype(h.dtype)), mean, rstd,
                                        weight, has_bias)
    return _plus_grad_h(dh, grad_h, h), dweight, dbias


def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (M, N) and h (M, N) in residual's dtype and rstd (M) in the compute dtype."""
    h = add_residual(x, residual)
    y, rstd = rms_norm_fwd(h, weight, eps)
    return y, h, rstd


def add_rms_norm_bwd(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Returns dh (M, N) in h's dtype (the norm's gradient plus grad_h) and dweight (N) or
    None."""
    dh, dweight = rms_norm_bwd(grad_y, h.to(compute_dtype(h.dtype)), rstd, weight)
    return _plus_grad_h(dh, grad_h, h), dweight

# ---- attention: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) ---------------------------------------


def _visible(Tq: int, Tk: int, causal: bool, causal_offset: int, window_offset: int | None,
             device, key_range: Tensor | None = None) -> Tensor | None:
    """Bool mask, True where key j is visible to query i: (not causal or j <= i +
    causal_offset) and (window_offset is None or j >= i + window_offset) and, with
    ``key_range`` (B, 2) integers, key_range[b, 0] <= j < key_range[b, 1] in batch row b, or
    (B, Tq, 2), key_range[b, i, 0] <= j < key_range[b, i, 1] for query i of batch row b.
    (Tq, Tk), or (B, 1, Tq, Tk) with a key range; None if all visible."""
    if not causal and window_offset is None and key_range is None:
        return None
    rows = torch.arange(Tq, device=device)[:, None]
    cols = torch.arange(Tk, device=device)[None, :]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        visible &= cols <= rows + causal_offset
    if window_offset is not None:
        visible &= cols >= rows + window_offset
    if key_range is not None:
        bounds = key_range.to(device=device, dtype=torch.int64)
        if bounds.dim() == 2:  # one range per batch row: (B, 1, Tk)
            bounds = bounds[:, None, :]
        # (B, 1 or Tq, Tk)
        in_range = (cols >= bounds[..., 0, None]) & (cols < bounds[..., 1, None])
        visible = visible[None, None] & in_range[:, None]
    return visible


# Attention dropout's random numbers, the same on every backend: Philox4x32-10 (Salmon et al.,
# Random123; the generator of Triton's tl.randint4x and of curand), key (seed & 0xffffffff,
# seed >> 32), counter (n & 0xffffffff, n >> 32, 0, 0) for the element (b, h, i, j) of the
# (B, Hq, Tq, Tk) probabilities with n = ((b * Hq + h) * Tq + i) * ceil(Tk / 4) + j // 4, which
# takes output word j % 4: one generator call serves four neighbouring keys. The element is kept
# iff its word >= dropout_threshold(p), and kept ones are scaled by 1 / (1 - p).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * m, for uint32 values ``a`` held in int64 and a 32-bit
    constant m, in 16-bit halves of m so that no product overflows int64."""
    low = a * (m & 0xFFFF)  # < 2^48
    middle = a * (m >> 16) + (low >> 16)  # (a * m) >> 16, < 2^49
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(seed: int | Tensor, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of the counters (n & 0xffffffff, n >> 32, 0, 0), n = ``counter`` (any
    shape, int64 >= 0), under the key (the low and the high 32 bits of ``seed``, an int64 as an
    int or a one-element tensor, whose bits are taken as they are, negative ones too): four
    int64 tensors of uint32 words."""
    c0, c1 = counter & _MASK32, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _MASK32, (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """The uint32 a random word must reach for its element to be kept: floor(p * 2^32)."""
    return int(dropout_p * 4294967296.0)


def attention_dropout_keep(B: int, Hq: int, Tq: int, Tk: int, dropout_p: float,
                           seed: int | Tensor, device=None) -> Tensor:
    """(B, Hq, Tq, Tk) bool: which probabilities attention dropout keeps (see above). ``seed``:
    an int64 as an int or a one-element int64 tensor (the kernels' seed, read where it lies:
    no host sync)."""
    if isinstance(seed, Tensor):
        seed = seed.reshape(())
    groups = (Tk + 3) // 4
    rows = torch.arange(B * Hq * Tq, dtype=torch.int64, device=device)[:, None]
    counter = rows * groups + torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    words = torch.stack(philox4x32(seed, counter), dim=-1).reshape(B * Hq * Tq, groups * 4)
    return (words[:, :Tk] >= dropout_threshold(dropout_p)).reshape(B, Hq, Tq, Tk)


def _dropped(probs: Tensor, dropout_p: float, dropout_seed: int | Tensor) -> Tensor:
    """The probabilities attention dropout leaves, scaled by 1 / (1 - p). (The seed may come
    as the one-element tensor the custom ops pass, on the probabilities' device.)"""
    if not dropout_p:
        return probs
    B, Hq, Tq, Tk = probs.shape
    keep = attention_dropout_keep(B, Hq, Tq, Tk, dropout_p, dropout_seed, probs.device)
    return torch.where(keep, probs / (1 - dropout_p), 0.0)


def _expand_kv(t: Tensor, Hq: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D): query head h reads kv head h // (Hq // Hkv)."""
    return t.repeat_interleave(Hq // t.shape[1], dim=1) if t.shape[1] != Hq else t


def _probabilities(q, k, scale, causal, causal_offset, window_offset, key_range=None,
                   softcap=0.0):
    """Probabilities and log-sum-exp in the compute dtype (fully masked rows get lse = -inf)
    and, with ``softcap`` > 0, tanh(scale * q.k / softcap) (else None), whose 1 - tanh^2 the
    backward needs: the scores are then ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2)."""
    dtype = compute_dtype(q.dtype)
    k_full = _expand_kv(k, q.shape[1]).to(dtype)
    scores = torch.matmul(q.to(dtype), k_full.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    tanh = None
    if softcap:
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    mask = _visible(q.shape[2], k.shape[2], causal, causal_offset, window_offset, q.device,
                    key_range)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Tq); -inf where no key is visible
    safe_lse = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])  # exp(-inf) = 0 on masked entries
    return probs, lse, tanh


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
    window_offset: int | None = None, key_range: Tensor | None = None, softcap: float = 0.0,
    dropout_p: float = 0.0, dropout_seed: int | Tensor = 0,
) -> tuple[Tensor, Tensor]:
    """Returns out (B, Hq, Tq, D) in q's dtype and lse (B, Hq, Tq) in the compute dtype. Key j
    is visible to query i iff (not causal or j <= i + causal_offset) and (window_offset is None
    or j >= i + window_offset) and, with ``key_range`` (B, 2) integers, key_range[b, 0] <= j <
    key_range[b, 1] in batch row b (padding keys outside it), or with (B, Tq, 2) integers,
    key_range[b, i, 0] <= j < key_range[b, i, 1] (packed documents); rows that see no key give
    0 and lse -inf. ``softcap`` > 0 caps the scores s = scale * q.k at softcap * tanh(s /
    softcap) before the masks and the softmax (Gemma 2's attn_logit_softcapping).
    ``dropout_p`` > 0 drops probabilities after the softmax (lse is that of the softmax) by the
    Philox stream of ``dropout_seed`` (see attention_dropout_keep), scaling the rest by
    1 / (1 - dropout_p)."""
    probs, lse, _ = _probabilities(q, k, scale, causal, causal_offset, window_offset, key_range,
                                   softcap)
    v_full = _expand_kv(v, q.shape[1]).to(probs.dtype)
    out = torch.matmul(_dropped(probs, dropout_p, dropout_seed), v_full)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    scale: float, causal: bool, causal_offset: int, window_offset: int | None = None,
    key_range: Tensor | None = None, grad_lse: Tensor | None = None, softcap: float = 0.0,
    dropout_p: float = 0.0, dropout_seed: int | Tensor = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv in the shapes and dtypes of q, k, v: the gradients of out, plus
    those of lse when ``grad_lse`` (B, Hq, Tq) is given. With dropout, out = (P * M) v, M the
    kept mask over 1 - p, so dv = (P * M)^T dO, dP = (dO v^T) * M, and the softmax term
    rowsum(dP * P) is still rowsum(dO * out)."""
    probs, _, tanh = _probabilities(q, k, scale, causal, causal_offset, window_offset,
                                    key_range, softcap)
    dtype = probs.dtype
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    dout = grad_out.to(dtype)
    v_full = _expand_kv(v, Hq).to(dtype)
    k_full = _expand_kv(k, Hq).to(dtype)
    kept = _dropped(probs, dropout_p, dropout_seed)
    dv_full = torch.matmul(kept.transpose(-1, -2), dout)  # (B, Hq, Tk, D)
    dprobs = torch.matmul(dout, v_full.transpose(-1, -2))  # (B, Hq, Tq, Tk)
    if dropout_p:
        dprobs = _dropped(dprobs, dropout_p, dropout_seed)
    delta = (dout * out.to(dtype)).sum(dim=-1, keepdim=True)  # (B, Hq, Tq, 1)
    if grad_lse is not None:  # d lse_i / d s_ij = P_ij: the same as lowering delta
        delta = delta - grad_lse.to(dtype)[..., None]
    dscores = probs * (dprobs - delta) * scale
    if tanh is not None:  # d(softcap * tanh(s / softcap)) / ds = 1 - tanh^2
        dscores = dscores * (1 - tanh * tanh)
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
    amsgrad: bool, maximize: bool, *, lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    step_tensor: Tensor | None = None, master_params: list[Tensor] | tuple = (),
) -> None:
    """torch.optim.AdamW's update, in place, one tensor at a time (states may be float32 for
    low-precision params; the arithmetic runs in the compute dtype).

    ``master_params`` (empty, or float32 master weights of bfloat16/float16 params, float32
    states): the update runs in float32 on master_params[i], which stores it, and params[i]
    receives its rounding (``param.copy_(master)``).

    Keyword-only extensions (the semantics of ``fusedlm._C.adamw_step``'s):
    ``lr_tensor`` (one element) replaces ``lr``: on the params' device it is used with tensor
    ops, never read on the host; ``step_tensor`` (n,) holds the step counts (after the
    increment) on the params' device and replaces ``steps`` (then empty); ``grad_scale`` (one
    element): grads are divided by it, stored back unscaled, and the step uses them;
    ``found_inf`` (one element): when nonzero nothing changes (params, states, grads), decided
    on the device with ``torch.where``."""
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, param in enumerate(params):
        dtype = compute_dtype(param.dtype)
        device = param.device
        # Scalars are Python floats (double) or float64 0-d tensors on the device, rounded once
        # to the compute dtype where they meet a tensor, as a Python scalar is.
        lr_i = lr
        if lr_tensor is not None:
            lr_i = (lr_tensor.reshape(()).to(torch.float64) if lr_tensor.device == device
                    else float(lr_tensor))
        step = steps[i] if step_tensor is None else step_tensor[i].to(torch.float64)
        if isinstance(step, Tensor):
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step).sqrt()
        else:
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        step_size = lr_i / bias_correction1
        decay = 1 - lr_i * weight_decay

        def scalar(x, dtype=dtype):
            return x.to(dtype) if isinstance(x, Tensor) else x

        grad = grads[i].to(dtype)
        if grad_scale is not None:
            # Unscaled in the compute dtype, used as is and stored in the grad's dtype (as
            # torch's fused AdamW and the CUDA kernel do).
            grad = grad / grad_scale.reshape(()).to(dtype)
            unscaled = grad
        if maximize:
            grad = -grad
        # A master (of a 16-bit param: the compute dtype is float32) replaces the param's value.
        master = master_params[i] if master_params else None
        p = (param if master is None else master).to(dtype)
        m = exp_avgs[i].to(dtype)
        v = exp_avg_sqs[i].to(dtype)
        p = p * scalar(decay)
        m = m.lerp(grad, 1 - beta1)
        v = v * beta2 + (1 - beta2) * grad * grad
        if amsgrad:
            v_max = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            denom = v_max.sqrt() / scalar(bias_correction2_sqrt) + eps
        else:
            denom = v.sqrt() / scalar(bias_correction2_sqrt) + eps
        p = p - scalar(step_size) * m / denom
        updates = [(param, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)]
        if master is not None:  # the master stores the update; the param gets its rounding
            updates.append((master, p))
        if amsgrad:
            updates.append((max_exp_avg_sqs[i], v_max))
        if grad_scale is not None:
            updates.append((grads[i], unscaled))
        if skip is not None:
            updates = [(old, torch.where(skip.to(device), old, new.to(old.dtype)))
                       for old, new in updates]
        for old, new in updates:
            old.copy_(new)


# ---- cross-entropy: logits (N, V), target (N) int64 -----------------------------------------


def _target_rows(target: Tensor, V: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(valid, in_range, safe target): rows whose target is not ignore_index, rows whose
    target is a class index in [0, V), and the target with other values replaced by 0."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    return valid, in_range, torch.where(in_range, target, 0)


def cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns the loss of each row (N), the row's max (N; 0 for a row of -inf) and log_sum,
    the log of the sum of exp(x - max) (N), in the compute dtype: logsumexp = max + log_sum,
    kept in two parts so the backward's exp(x - max - log_sum) keeps full precision where the
    logits are large.

    loss = lse - (1 - label_smoothing) * x[target] - label_smoothing / V * sum(x), which is
    torch's ``(1 - s) * nll + s * mean over classes of -log_softmax``, plus ``z_loss * lse**2``
    (PaLM's auxiliary z-loss, which keeps the logsumexp near 0). A row whose target is
    ``ignore_index`` has loss 0; one whose target is outside [0, V) otherwise has loss NaN; a
    row holding +inf or NaN has NaN, as torch's log_softmax gives."""
    x = logits.to(compute_dtype(logits.dtype))
    V = x.shape[1]
    valid, in_range, safe = _target_rows(target, V, ignore_index)
    row_max = x.amax(dim=1)
    shift = torch.where(row_max == -torch.inf, 0.0, row_max)
    log_sum = torch.exp(x - shift[:, None]).sum(dim=1).log()
    # (each term is small next to the logits: the loss keeps digits the logsumexp would round)
    loss = (1.0 - label_smoothing) * (shift - x.gather(1, safe[:, None]).squeeze(1)) + log_sum
    if label_smoothing != 0.0:
        loss = loss + label_smoothing * (shift - x.mean(dim=1))
    if z_loss != 0.0:
        loss = loss + z_loss * (shift + log_sum).square()
    loss = torch.where(in_range, loss, torch.nan)
    return torch.where(valid, loss, 0.0), shift, log_sum


def check_gradient_out(out: Tensor, logits: Tensor) -> None:
    """``out`` for a cross-entropy backward: (N, V) contiguous in the logits' dtype and device,
    and either the logits themselves (the gradient replaces them) or apart from them."""
    if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
            or not out.is_contiguous()):
        raise ValueError(f"argument 'out' must be a contiguous {logits.dtype} tensor of shape "
                         f"{list(logits.shape)} on {logits.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    if logits.numel() == 0 or (out.data_ptr() == logits.data_ptr()
                               and out.stride() == logits.stride()):
        return
    spans = []
    for t in (out, logits):  # the bytes each can reach
        start = t.data_ptr()
        reach = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        spans.append((start, start + (reach + 1) * t.element_size()))
    if spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]:
        raise ValueError("argument 'out' must be the logits themselves or not overlap them")


def cross_entropy_bwd(
    grad_loss: Tensor, logits: Tensor, target: Tensor, row_max: Tensor, log_sum: Tensor,
    ignore_index: int, label_smoothing: float, out: Tensor | None = None, z_loss: float = 0.0,
) -> Tensor:
    """grad_loss (N), the gradient of each row's loss (any strides: an expanded scalar for a
    reduced loss), and the forward's row_max, log_sum (N) -> dlogits (N, V) in the logits'
    dtype: grad_loss * ((1 + 2 * z_loss * lse) * softmax(x) - (1 - label_smoothing) *
    onehot(target) - label_smoothing / V), lse = row_max + log_sum; 0 on ignored rows, NaN on
    rows whose target is outside [0, V). Written into ``out`` when given (see
    ``check_gradient_out``; it may be the logits)."""
    if out is not None:
        check_gradient_out(out, logits)
        return out.copy_(cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum,
                                           ignore_index, label_smoothing, z_loss=z_loss))
    dtype = compute_dtype(logits.dtype)
    x = logits.to(dtype)
    V = x.shape[1]
    valid, in_range, safe = _target_rows(target, V, ignore_index)
    probs = torch.exp((x - row_max.to(dtype)[:, None]) - log_sum.to(dtype)[:, None])
    if z_loss != 0.0:  # d(z * lse**2)/dx = 2 * z * lse * softmax(x)
        probs = probs * (1.0 + 2.0 * z_loss * (row_max.to(dtype) + log_sum.to(dtype)))[:, None]
    if label_smoothing != 0.0:
        probs = probs - label_smoothing / V
    onehot = torch.zeros_like(probs).scatter_(1, safe[:, None], 1.0 - label_smoothing)
    g = torch.where(in_range, grad_loss.to(dtype), torch.nan)
    dx = (probs - onehot) * g[:, None]
    return torch.where(valid[:, None], dx, 0.0).to(logits.dtype)


def linear_cross_entropy(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                         ignore_index: int, label_smoothing: float, reduction: str,
                         softcap: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """The cross-entropy of ``input @ weight.T + bias`` (N, V) against target (N) (plus
    ``z_loss * logsumexp**2`` a row), reduced by ``reduction`` ("mean" over the rows not
    ignored, "sum", "none"), in the compute dtype; with ``softcap`` > 0 the logits z become
    ``softcap * tanh(z / softcap)`` first (Gemma 2)."""
    logits = torch.nn.functional.linear(input, weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss)[0]
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    return loss


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
                     conjugate: bool) -> Tensor:
    """x (B, H, T, D) with its first R = 2 * cos.shape[-1] features rotated by position: each
    pair (x1, x2) becomes (x1 * cos - x2 * sin, x2 * cos + x1 * sin), with cos, sin (T, R/2) or
    (B or 1, T, R/2) of each pair's angle; the other D - R features pass through. Pairs are
    (i, i + R/2) (GPT-NeoX and Hugging Face Llama) or, when ``interleaved``, (2i, 2i + 1)
    (GPT-J, Meta's Llama). ``conjugate`` rotates the other way (sin negated): the backward.
    Returns (B, H, T, D) contiguous in x's dtype, computed in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    half = cos.shape[-1]
    c, s = cos.to(dtype), sin.to(dtype)
    if conjugate:
        s = -s
    if c.dim() == 3:  # (B, T, R/2) -> (B, 1, T, R/2) against the heads
        c, s = c[:, None], s[:, None]
    rotated = x[..., :2 * half].to(dtype)
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., 2 * half:]), dim=-1).contiguous()


# The gate activations of the gated linear units (glu_fwd/bwd): silu (SwiGLU), exact gelu and
# tanh-approximated gelu (GeGLU; torch's F.gelu(approximate="tanh")).
GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_GELU_TANH_CUBIC = 0.044715


def check_glu_activation(activation: object) -> None:
    if not isinstance(activation, str) or activation not in GLU_ACTIVATIONS:
        raise ValueError("argument 'activation' must be one of "
                         f"{', '.join(repr(a) for a in GLU_ACTIVATIONS)}; got {activation!r}")


def _glu_activation(g: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu":
        return g * (0.5 * torch.erfc(-g * math.sqrt(0.5)))
    return g * torch.sigmoid(_gelu_tanh_two_u(g))


def _gelu_tanh_two_u(g: Tensor) -> Tensor:
    """2u of tanh-gelu, 0.5 g (1 + tanh(u)) = g sigmoid(2u): 2 sqrt(2/pi) (g + 0.044715 g^3)."""
    return 2 * math.sqrt(2 / math.pi) * g * (1 + _GELU_TANH_CUBIC * g * g)


def glu_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """act(gate) * up (any matching shape) in their dtype, computed in the compute dtype;
    act: ``activation``, one of GLU_ACTIVATIONS."""
    check_glu_activation(activation)
    dtype = compute_dtype(gate.dtype)
    g = gate.to(dtype)
    return (_glu_activation(g, activation) * up.to(dtype)).to(gate.dtype).contiguous()


def glu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor,
            activation: str) -> tuple[Tensor, Tensor]:
    """grad_out, gate, up (same shape) -> (dgate, dup) in gate's dtype: dgate = grad * up *
    act'(g), dup = grad * act(g), with act'(g) for silu ``s (1 + g (1 - s))``, s = sigmoid(g);
    gelu ``Phi(g) + g phi(g)`` (the normal CDF and density); gelu_tanh ``s + g (2u)' s (1 - s)``,
    s = sigmoid(2u), (2u)' = 2 sqrt(2/pi) (1 + 3 * 0.044715 g^2)."""
    check_glu_activation(activation)
    dtype = compute_dtype(gate.dtype)
    g, u, dy = gate.to(dtype), up.to(dtype), grad_out.to(dtype)
    if activation == "silu":
        sig = torch.sigmoid(g)
        act, slope = g * sig, sig * (1 + g * (1 - sig))
    elif activation == "gelu":
        cdf = 0.5 * torch.erfc(-g * math.sqrt(0.5))
        act = g * cdf
        slope = cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    else:
        two_u = _gelu_tanh_two_u(g)
        s = torch.sigmoid(two_u)
        act = g * s
        two_du = 2 * math.sqrt(2 / math.pi) * (1 + 3 * _GELU_TANH_CUBIC * g * g)
        slope = s + g * two_du * (s * torch.sigmoid(-two_u))  # (1 - s without cancellation)
    dgate = dy * u * slope
    dup = dy * act
    return dgate.to(gate.dtype).contiguous(), dup.to(gate.dtype).contiguous()
