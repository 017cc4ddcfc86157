"""Attention: custom ops ``fusedlm::attention_fwd/bwd`` (flash-attention algorithm: output and
logsumexp forward, recomputation backward), their autograd, and the public
``fusedlm.attention`` and ``fusedlm.scaled_dot_product_attention``."""

from __future__ import annotations

import collections
import functools
import logging
import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import OpDispatch, check_backend_name, requested_backend
from ._common import (
    FLOAT_DTYPES,
    autocast_inputs,
    autocast_off,
    check_finite_float,
    check_float_tensor,
    check_same_device,
    describe,
    eager_autograd_function,
    extension_autograd,
    forward_for_call,
    register_extension_kernels,
    runs_eager_function,
    stat_dtype,
)

logger = logging.getLogger("fusedlm")

MAX_HEAD_DIM = 256

ATTENTION_FWD = OpDispatch("attention_fwd")
ATTENTION_BWD = OpDispatch("attention_bwd")
ATTENTION_FWD.register("torch")(reference.attention_fwd)
ATTENTION_BWD.register("torch")(reference.attention_bwd)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _extension_supports(q: Tensor, k: Tensor, v: Tensor, window_offset: int | None = None,
                        key_range: Tensor | None = None, softcap: float = 0.0,
                        dropout_p: float = 0.0) -> str | None:
    """The CPU kernels take every case; the CUDA ones (tensor-core mma.sync, wgmma on Hopper)
    fp16/bf16 on sm_80+, with every mask (sliding windows, key ranges per batch row or per
    query), softcap and dropout."""
    if q.device.type != "cuda":
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA attention kernels take float16 or bfloat16, not {q.dtype}"
    major, minor = _capability(q.device)
    if major < 8:
        return ("the CUDA attention kernels need compute capability 8.0 or newer, not "
                f"{major}.{minor}")
    return None


register_extension_kernels(ATTENTION_FWD, "attention_fwd", supports=_extension_supports)
register_extension_kernels(ATTENTION_BWD, "attention_bwd", supports=_extension_supports)


def _triton_supports(q: Tensor, k: Tensor, v: Tensor, window_offset: int | None = None,
                     key_range: Tensor | None = None, softcap: float = 0.0,
                     dropout_p: float = 0.0) -> str | None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32, float16 or bfloat16, not {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is over the Triton kernels' maximum of {MAX_HEAD_DIM}"
    return None


@ATTENTION_FWD.register("triton", supports=_triton_supports)
def _triton_attention_fwd(*args, **kwargs):
    from ..triton import attention as kernels  # imports triton: only on first use

    return kernels.attention_fwd(*args, **kwargs)


@ATTENTION_BWD.register("triton", supports=_triton_supports)
def _triton_attention_bwd(*args, **kwargs):
    from ..triton import attention as kernels

    return kernels.attention_bwd(*args, **kwargs)


def _mask_arguments(window_offset, key_range) -> tuple:
    """The optional trailing mask arguments to hand a kernel: none for the plain case (the
    kernels' original signature)."""
    if key_range is not None:
        return (window_offset, key_range)
    return () if window_offset is None else (window_offset,)


def _score_options(softcap, dropout_p, dropout_seed) -> dict:
    """The keyword arguments for a kernel's softcap and dropout, only those in use: the usual
    call stays the kernels' original one. dropout_seed: the (,) int64 tensor on q's device the
    public functions draw (_dropout_seed), which the kernels read."""
    if not softcap and not dropout_p:
        return {}
    options = {"softcap": softcap} if softcap else {}
    if dropout_p:
        options["dropout_p"] = dropout_p
        options["dropout_seed"] = dropout_seed
    return options


def _attention_fwd(q, k, v, scale, causal, causal_offset, backend, window_offset=None,
                   key_range=None, softcap=0.0, dropout_p=0.0, dropout_seed=None):
    impl = ATTENTION_FWD.select(backend, q.device, q, k, v, window_offset, key_range, softcap,
                                dropout_p)
    masks = _mask_arguments(window_offset, key_range)
    with autocast_off(q.device):
        if softcap or dropout_p:
            return impl(q, k, v, scale, causal, causal_offset, *masks,
                        **_score_options(softcap, dropout_p, dropout_seed))
        return impl(q, k, v, scale, causal, causal_offset, *masks)


def _attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset, backend,
                   window_offset=None, key_range=None, grad_lse=None, softcap=0.0,
                   dropout_p=0.0, dropout_seed=None):
    impl = ATTENTION_BWD.select(backend, q.device, q, k, v, window_offset, key_range, softcap,
                                dropout_p)
    # (grad_lse, softcap and dropout by keyword and only when in use: the usual call stays the
    # same)
    extra = _score_options(softcap, dropout_p, dropout_seed)
    if grad_lse is not None:
        extra["grad_lse"] = grad_lse
    with autocast_off(q.device):
        return impl(grad_out, q, k, v, out, lse, scale, causal, causal_offset,
                    *_mask_arguments(window_offset, key_range), **extra)


@torch.library.custom_op("fusedlm::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
    backend: str, window_offset: int | None = None, key_range: Tensor | None = None,
    softcap: float = 0.0, dropout_p: float = 0.0, dropout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), any strides. Key j is visible to query i iff
    (not causal or j <= i + causal_offset) and (window_offset is None or j >= i +
    window_offset) and, with key_range (B, 2) int32, key_range[b, 0] <= j < key_range[b, 1]
    in batch row b, or with key_range (B, Tq, 2) int32, key_range[b, i, 0] <= j <
    key_range[b, i, 1]. Returns out (B, Hq, Tq, D) in q's dtype and lse (B, Hq, Tq) float32
    (float64 for float64 inputs); rows that see no key get 0 and -inf. softcap > 0 caps each
    score s = scale * q.k at softcap * tanh(s / softcap) first (Gemma 2); 0: no capping.
    dropout_p in [0, 1) drops probabilities after the softmax by the Philox stream of
    dropout_seed, a (,) int64 tensor on q's device (see fusedlm.reference.attention_dropout_keep
    and _dropout_seed)."""
    return _attention_fwd(q, k, v, scale, causal, causal_offset, backend, window_offset,
                          key_range, softcap, dropout_p, dropout_seed)


@attention_fwd.register_fake
def _(q, k, v, scale, causal, causal_offset, backend, window_offset=None, key_range=None,
      softcap=0.0, dropout_p=0.0, dropout_seed=None):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fusedlm::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    causal: bool, causal_offset: int, backend: str, window_offset: int | None = None,
    key_range: Tensor | None = None, grad_lse: Tensor | None = None, softcap: float = 0.0,
    dropout_p: float = 0.0, dropout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv in the shapes and dtypes of q, k, v; dk and dv are summed over the
    query heads that share a kv head (GQA/MQA). ``grad_lse`` (B, Hq, Tq) in lse's dtype: the
    gradient of lse too (None: lse was not used). softcap and dropout: the forward's."""
    return _attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset, backend,
                          window_offset, key_range, grad_lse, softcap, dropout_p, dropout_seed)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, causal, causal_offset, backend, window_offset=None,
      key_range=None, grad_lse=None, softcap=0.0, dropout_p=0.0, dropout_seed=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset, backend, *optional = inputs
    defaults = (None, None, 0.0, 0.0, None)  # the trailing arguments a call may leave out
    window_offset, key_range, softcap, dropout_p, dropout_seed = (
        *optional, *defaults[len(optional):])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_range, dropout_seed)
    ctx.scale, ctx.causal, ctx.causal_offset, ctx.backend = scale, causal, causal_offset, backend
    ctx.window_offset, ctx.softcap, ctx.dropout_p = window_offset, softcap, dropout_p
    if getattr(ctx, "eager", False):
        # lse is differentiable (return_lse, sinks) but most calls never use it: its gradient
        # then stays None instead of a zero tensor the backward would read.
        ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_range, dropout_seed = ctx.saved_tensors
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    bwd = _attention_bwd if getattr(ctx, "eager", False) else torch.ops.fusedlm.attention_bwd
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.causal, ctx.causal_offset,
                     ctx.backend, ctx.window_offset, key_range, grad_lse, ctx.softcap,
                     ctx.dropout_p, dropout_seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)
_AttentionEager = eager_autograd_function(
    "_AttentionEager", _attention_fwd, _attention_setup_context, _attention_backward
)


# ---- public API -----------------------------------------------------------------------------


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    # The usual valid call in ~1 us; anything else takes the checks that name what is wrong.
    if (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and q.dim() == 4
            and q.dtype in FLOAT_DTYPES and q.dtype == k.dtype == v.dtype
            and q.layout == k.layout == v.layout == torch.strided
            and q.device == k.device == v.device):
        B, Hq, _, D = q.shape
        key_shape = k.shape
        if (key_shape == v.shape and len(key_shape) == 4 and key_shape[0] == B
                and key_shape[3] == D and D <= MAX_HEAD_DIM and key_shape[1] != 0
                and Hq % key_shape[1] == 0):
            return
    _check_qkv_in_full(q, k, v)


def _check_qkv_in_full(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(
                f"argument '{name}' must be 4-D (B, H, T, D), got shape {list(t.shape)}"
            )
    for name, t in (("k", k), ("v", v)):
        check_same_device(t, name, q, "q")
        if t.dtype != q.dtype:
            raise TypeError(
                f"argument '{name}' has dtype {t.dtype} but 'q' has {q.dtype}; they must match"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"argument 'v' must have the shape of 'k' {list(k.shape)}, got {list(v.shape)}"
        )
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: 'q' has {q.shape[0]}, 'k' and 'v' have {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(
            f"head dims differ: 'q' has D = {q.shape[3]}, 'k' and 'v' have {k.shape[3]}"
        )
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D = {q.shape[3]} is over the supported maximum of {MAX_HEAD_DIM}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value "
            f"heads ({hkv})"
        )


def _attention(q, k, v, scale, causal, causal_offset, backend, window_offset=None,
               key_range=None, sinks=None, return_lse=False, softcap=0.0, dropout_p=0.0):
    """out, or (out, lse) with ``return_lse``; with ``sinks`` (Hq,) both include the sinks."""
    # Under autocast, the inputs in autocast's dtype, as torch's SDPA takes them.
    q, k, v = autocast_inputs(q, k, v)
    want_lse = return_lse or sinks is not None
    if q.numel() == 0 or k.numel() == 0:  # empty results; the reference's torch ops give autograd
        out, lse = reference.attention_fwd(q, k, v, scale, causal, causal_offset, window_offset,
                                           key_range, softcap)
    else:
        fwd = forward_for_call(ATTENTION_FWD, backend, _AttentionEager, _attention_fwd,
                               reference.attention_fwd, q, k, v, backend_index=6)
        if not want_lse and runs_eager_function(fwd, _AttentionEager):
            # eager, with autograd: the C++ node if it can (it returns out alone)
            args = (q, k, v, window_offset, key_range, softcap, dropout_p)
            module = extension_autograd(ATTENTION_FWD, ATTENTION_BWD, backend, q.device, args,
                                        args)
            if module is not None:
                if not softcap and not dropout_p:  # (the usual call: the original signature)
                    return module.attention_autograd(q, k, v, scale, causal, causal_offset,
                                                     window_offset, key_range)
                return module.attention_autograd(
                    q, k, v, scale, causal, causal_offset, window_offset, key_range,
                    softcap=softcap, dropout_p=dropout_p,
                    dropout_seed=_dropout_seed(q.device) if dropout_p else None)
        if dropout_p:
            out, lse = fwd(q, k, v, scale, causal, causal_offset, backend, window_offset,
                           key_range, softcap, dropout_p, _dropout_seed(q.device))
        elif softcap:
            out, lse = fwd(q, k, v, scale, causal, causal_offset, backend, window_offset,
                           key_range, softcap)
        else:
            out, lse = fwd(q, k, v, scale, causal, causal_offset, backend, window_offset,
                           key_range)
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def _apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention sinks (GPT-OSS; StreamingLLM's learned sink): one more logit per head,
    sinks[h], in each row's softmax, with no value. Row i's probabilities shrink by
    exp(lse_i) / (exp(lse_i) + exp(sinks[h])) = sigmoid(lse_i - sinks[h]), so out scales by
    that and lse becomes logaddexp(lse_i, sinks[h]); autograd carries the gradients through
    lse into the kernels' backward (grad_lse). A row that sees no key gives 0 either way."""
    sink = sinks.to(lse.dtype)[None, :, None]  # (1, Hq, 1)
    # A row that sees no key in a head whose sink is -inf: lse - sink and logaddexp's gradient
    # would be NaN there, so those terms get finite stand-ins and the row keeps lse = -inf.
    empty = torch.isneginf(lse) & torch.isneginf(sink)  # (B, Hq, Tq)
    lse_safe, sink_safe = (torch.where(empty, 0.0, t) for t in (lse, sink))
    weight = torch.where(empty, 0.0, torch.sigmoid(lse_safe - sink_safe))  # 0 where lse is -inf
    combined = torch.where(empty, float("-inf"), torch.logaddexp(lse_safe, sink_safe))
    return (out * weight[..., None]).to(out.dtype), combined


def _check_sinks(sinks: object, q: Tensor) -> Tensor | None:
    if sinks is None:
        return None
    check_float_tensor(sinks, "sinks")
    check_same_device(sinks, "sinks", q, "q")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"argument 'sinks' must have shape (Hq,) = ({q.shape[1]},), one logit "
                         f"per query head, got {describe(sinks)}")
    return sinks


def _check_softcap(softcap: object) -> float:
    """``softcap`` as the kernels take it: 0.0 for none (None or 0), else a finite float > 0."""
    if softcap is None:
        return 0.0
    value = check_finite_float(softcap, "softcap")
    if value < 0:
        raise ValueError(f"argument 'softcap' must be > 0 (None or 0: no capping), got {value}")
    return value


def _check_dropout_p(dropout_p: object) -> float:
    """``dropout_p`` as the kernels take it: a float in [0, 1) (0: no dropout)."""
    value = check_finite_float(dropout_p, "dropout_p")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"argument 'dropout_p' must be in [0, 1), got {value}")
    return value


def _dropout_seed(device: torch.device) -> Tensor:
    """A seed for one call's dropout: a (,) int64 tensor in [0, 2^63) drawn on the inputs'
    device from its default generator (so ``torch.manual_seed`` makes runs repeat, and
    activation checkpointing, which restores the generators of the inputs' devices, recomputes
    the same mask). On the device, never read by the host: the kernels load it, so inside a
    captured CUDA graph the draw is one of the graph's kernels and each replay drops a new
    mask (a host int would be baked into the graph: one mask for every replay). A tensor, not
    an int, so that torch.compile records the draw instead of baking one seed into its graph."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device)


def _check_return_lse(return_lse: object) -> bool:
    if not isinstance(return_lse, bool):
        raise TypeError(f"argument 'return_lse' must be a bool, got {describe(return_lse)}")
    return return_lse


def _check_key_range(key_range: object, q: Tensor, Tk: int) -> Tensor | None:
    """``key_range`` as the kernels take it: (B, 2) or (B, Tq, 2) int32, contiguous, clamped
    to [0, Tk] (clamping changes no visible key), on q's device; None stays None."""
    if key_range is None:
        return None
    if not isinstance(key_range, Tensor):
        raise TypeError("argument 'key_range' must be a Tensor of (start, end) key indices or "
                        f"None, got {type(key_range).__name__}")
    if key_range.is_floating_point() or key_range.is_complex() or key_range.dtype == torch.bool:
        raise TypeError(f"argument 'key_range' must hold integers, got {key_range.dtype}")
    B, Tq = q.shape[0], q.shape[2]
    if list(key_range.shape) not in ([B, 2], [B, Tq, 2]):
        raise ValueError(f"argument 'key_range' must have shape (B, 2) = ({B}, 2) or "
                         f"(B, Tq, 2) = ({B}, {Tq}, 2), got {list(key_range.shape)}")
    check_same_device(key_range, "key_range", q, "q")
    return key_range.clamp(0, Tk).to(torch.int32).contiguous()


def _window_side(value: object, side: str) -> int | None:
    """One side of ``window``: a count of keys >= 0, or None / -1 for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"argument 'window' must hold ints or None, got {type(value).__name__} "
                        f"for its {side} side")
    if value < -1:
        raise ValueError(f"argument 'window' must hold counts >= 0 (or -1 / None for no limit), "
                         f"got {value} for its {side} side")
    return None if value == -1 else value


def _window_sides(window: object) -> tuple[int | None, int | None]:
    """``window`` checked: (left, right) key counts, None for no limit."""
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise TypeError("argument 'window' must be None or a pair (left, right) of key counts, "
                        f"got {describe(window)}")
    if window is None:
        return None, None
    return _window_side(window[0], "left"), _window_side(window[1], "right")


def attention_mask_bounds(
    Tq: int, Tk: int, causal: bool, window: tuple[int | None, int | None] | None
) -> tuple[bool, int, int | None]:
    """(causal, causal_offset, window_offset) of the kernels for ``fusedlm.attention``'s
    ``causal`` and ``window``, both aligned bottom-right (query i sits at key position
    p = i + Tk - Tq): key j is visible iff p - left <= j <= p + right, and j <= p if causal."""
    left, right = _window_sides(window)
    offset = Tk - Tq
    if right is not None:
        right = min(right, 0) if causal else right  # the intersection of the two limits
        causal = True
        offset = min(offset + right, Tk)  # past Tk - 1 every key is visible anyway
    window_offset = None
    if left is not None and Tk - Tq - left > 1 - Tq:  # else no query meets the lower limit
        window_offset = min(Tk - Tq - left, Tk)
    return causal, offset, window_offset


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
    backend: str = "auto", window: tuple[int | None, int | None] | None = None,
    key_range: Tensor | None = None, sinks: Tensor | None = None, return_lse: bool = False,
    softcap: float | None = None, dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused (flash) attention: softmax(q k^T * scale) v.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq % Hkv == 0 (GQA/MQA); any T; D <= 256;
    any strides; float64/float32/float16/bfloat16, all one dtype. ``scale`` defaults to
    1/sqrt(D). ``causal=True`` aligns the mask bottom-right, as FlashAttention does: query i
    sees keys j <= i + Tk - Tq, so the last query sees every key (rows that see none give 0).
    ``window=(left, right)`` (local / sliding-window attention, FlashAttention's
    ``window_size``) limits query i to keys p - left <= j <= p + right around its position
    p = i + Tk - Tq; a side that is None or -1 has no limit, and ``causal`` still applies (a
    causal sliding window of W keys, Mistral's ``sliding_window=W``, is ``causal=True,
    window=(W - 1, 0)``). ``key_range`` (B, 2) integers on q's device (padded batches): batch
    row b attends only to keys key_range[b, 0] <= j < key_range[b, 1], the rest being padding
    (left padding moves the start, right padding the end; see ``key_range_from_padding_mask``);
    or (B, Tq, 2) integers, one range per query (packed documents): query i of batch row b
    attends only to keys key_range[b, i, 0] <= j < key_range[b, i, 1] (see
    ``key_range_from_document_ids``; with ``causal=True``, each document's causal attention).
    Positions and the causal / window alignment stay those of all Tk keys. Rows left with no
    key give 0. ``sinks`` (Hq,) float (attention sinks, GPT-OSS's ``sinks`` parameter): one
    learned logit per query head joins every row's softmax with no value, which lowers the
    row's weights (differentiable; an op on the output and lse, not yet inside the kernels).
    Returns (B, Hq, Tq, D) in q's dtype; with ``return_lse=True`` (out, lse), lse (B, Hq, Tq)
    float32 (float64 for float64 inputs), each row's log-sum-exp of its scaled scores (sink
    included), -inf for a row that sees no key; gradients flow through both (as to combine
    partial attentions, ring attention's way). ``softcap`` > 0 (logit soft-capping, Gemma 2's
    ``attn_logit_softcapping``, FlashAttention's ``softcap``) caps each score s = scale *
    q.k at softcap * tanh(s / softcap) before the masks and the softmax (every backend).
    ``dropout_p`` in [0, 1) (attention dropout, SDPA's ``dropout_p``; pass 0 when not
    training) drops each probability with that chance after the softmax, inside the kernels,
    and scales the rest by 1 / (1 - dropout_p); lse stays the softmax's. The mask comes from a
    Philox stream seeded by a draw from the default generator of q's device, made on the
    device (``torch.manual_seed`` repeats it; a captured CUDA graph draws anew each replay;
    every backend drops the same elements for the same seed, torch's own SDPA others) and the
    backward regenerates it (every backend).
    """
    _check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"argument 'causal' must be a bool, got {type(causal).__name__}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else check_finite_float(scale, "scale")
    check_backend_name(backend)
    causal, causal_offset, window_offset = attention_mask_bounds(
        q.shape[2], k.shape[2], causal, window)
    key_range = _check_key_range(key_range, q, k.shape[2])
    sinks = _check_sinks(sinks, q)
    return_lse = _check_return_lse(return_lse)
    softcap = _check_softcap(softcap)
    dropout_p = _check_dropout_p(dropout_p)
    return _attention(q, k, v, scale, causal, causal_offset, backend, window_offset, key_range,
                      sinks, return_lse, softcap, dropout_p)


def _check_cu_seqlens(cu_seqlens: object, name: str, total: int, device) -> Tensor:
    """``cu_seqlens`` (S + 1,) integers: 0, then each sequence's end, nondecreasing, ending at
    ``total`` (checked on the host: one sync)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"argument '{name}' must be a 1-D tensor of S + 1 offsets, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"argument '{name}' must hold integers, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"argument '{name}' is on {cu_seqlens.device}, the inputs on {device}")
    offsets = cu_seqlens.long()
    if not bool((offsets[0] == 0) & (offsets[-1] == total) & (offsets.diff() >= 0).all()):
        raise ValueError(f"argument '{name}' must start at 0, never decrease and end at the "
                         f"number of tokens, {total}")
    return offsets


def attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool = False,
    scale: float | None = None, window: tuple[int | None, int | None] | None = None,
    backend: str = "auto", sinks: Tensor | None = None, return_lse: bool = False,
    softcap: float | None = None, dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over variable-length sequences packed without padding, as FlashAttention's
    ``flash_attn_varlen_func``: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence s holds
    queries cu_seqlens_q[s]:cu_seqlens_q[s + 1] and keys cu_seqlens_k[s]:cu_seqlens_k[s + 1]
    ((S + 1,) integer offsets from 0 to the totals) and its queries see only its keys, with
    ``causal`` and ``window`` aligned bottom-right within the sequence (as
    ``fusedlm.attention``). ``max_seqlen_*`` are accepted for compatibility and not needed.
    Runs ``fusedlm.attention`` on the (1, H, total, D) views with per-query key ranges (no copy
    of q, k, v). ``sinks`` (Hq,), ``softcap`` and ``dropout_p``: attention sinks, logit
    soft-capping and attention dropout, as in ``fusedlm.attention``. Returns
    (total_q, Hq, D); with ``return_lse=True`` (out, lse), lse (Hq, total_q) float32 (float64
    for float64 inputs), FlashAttention's varlen layout."""
    del max_seqlen_q, max_seqlen_k  # the offsets say everything
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(t, name)
        if t.dim() != 3:
            raise ValueError(f"argument '{name}' must be 3-D (total, H, D), got shape "
                             f"{list(t.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"argument 'causal' must be a bool, got {type(causal).__name__}")
    starts_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    starts_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    if starts_q.numel() != starts_k.numel():
        raise ValueError(f"arguments 'cu_seqlens_q' and 'cu_seqlens_k' must hold the same number "
                         f"of sequences, got {starts_q.numel() - 1} and {starts_k.numel() - 1}")
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, total, D) views
    _check_qkv(q4, k4, v4)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else check_finite_float(scale, "scale")
    check_backend_name(backend)
    sinks = _check_sinks(sinks, q4)
    return_lse = _check_return_lse(return_lse)
    softcap = _check_softcap(softcap)
    dropout_p = _check_dropout_p(dropout_p)
    # Each query's keys: its sequence's, cut by the causal / window limits around its position
    # p = (i - q_start) + (len_k - len_q) (bottom-right), as attention_mask_bounds aligns them.
    total_q = q.shape[0]
    rows = torch.arange(total_q, device=q.device)
    sequence = torch.searchsorted(starts_q[1:], rows, right=True)  # (total_q,)
    q_start, k_start, k_end = starts_q[sequence], starts_k[sequence], starts_k[sequence + 1]
    position = rows - q_start + (k_end - k_start) - (starts_q[sequence + 1] - q_start)
    left, right = _window_sides(window)
    if causal:  # the causal limit, and the window's right side if it is tighter
        right = 0 if right is None else min(right, 0)
    lo, hi = k_start, k_end
    if left is not None:
        lo = torch.maximum(lo, k_start + position - left)
    if right is not None:
        hi = torch.minimum(hi, k_start + position + right + 1)
    key_range = torch.stack([lo, torch.maximum(hi, lo)], dim=1)
    result = _attention(q4, k4, v4, scale, False, 0, backend, None,
                        key_range.to(torch.int32)[None], sinks, return_lse, softcap, dropout_p)
    if return_lse:
        return result[0][0].transpose(0, 1), result[1][0]
    return result[0].transpose(0, 1)


def key_range_from_padding_mask(attention_mask: Tensor) -> Tensor:
    """(B, 2) int32 ``key_range`` for ``fusedlm.attention`` from a tokenizer's (B, T)
    ``attention_mask`` (1 / True for tokens, 0 / False for padding), whose tokens must be one
    contiguous run per row (left or right padding). Reads the mask on the host (one device
    sync); a row with no token gets the empty range (0, 0)."""
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError("argument 'attention_mask' must be a (B, T) tensor, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"argument 'attention_mask' must hold 0/1 integers or bools, got "
                        f"{attention_mask.dtype}")
    tokens = attention_mask != 0
    ranges = _token_runs(tokens)
    if ranges is None:
        raise ValueError("argument 'attention_mask' must mark one contiguous run of tokens per "
                         "row (left or right padding); a row has tokens on both sides of a gap")
    return ranges


def key_range_from_document_ids(document_ids: Tensor) -> Tensor:
    """(B, T, 2) int32 ``key_range`` for ``fusedlm.attention`` (self-attention, Tq = Tk = T)
    from (B, T) integer ``document_ids`` of packed sequences: each token attends only to the
    tokens of its own document, a maximal run of equal consecutive ids (with ``causal=True``:
    to the earlier tokens of its document). From Hugging Face style ``position_ids`` that
    restart at 0 per document: ``document_ids = (position_ids == 0).cumsum(-1)``. Runs on
    the ids' device without a host sync."""
    if not isinstance(document_ids, Tensor) or document_ids.dim() != 2:
        raise ValueError("argument 'document_ids' must be a (B, T) tensor, got "
                         f"{getattr(document_ids, 'shape', type(document_ids).__name__)}")
    if document_ids.is_floating_point() or document_ids.is_complex():
        raise TypeError(f"argument 'document_ids' must hold integers, got {document_ids.dtype}")
    B, T = document_ids.shape
    if T == 0:
        return document_ids.new_zeros((B, 0, 2), dtype=torch.int32)
    positions = torch.arange(T, device=document_ids.device).expand(B, T)
    changes = document_ids[:, 1:] != document_ids[:, :-1]  # (B, T - 1): a new run at t + 1
    first = torch.ones(B, 1, dtype=torch.bool, device=document_ids.device)
    starts_run = torch.cat([first, changes], dim=1)  # (B, T)
    ends_run = torch.cat([changes, first], dim=1)    # (B, T)
    start = torch.where(starts_run, positions, 0).cummax(dim=1).values
    end = torch.where(ends_run, positions + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([start, end], dim=2).to(torch.int32)


def _token_runs(tokens: Tensor) -> Tensor | None:
    """(B, 2) int32 [start, end) of each row's True entries of the (B, T) bool ``tokens``, or
    None if a row's are not contiguous. Rows with none: (0, 0). Temporaries of one byte per
    entry (long masks: no (B, T) int64)."""
    B, T = tokens.shape
    counts = tokens.sum(dim=1)
    if T == 0:
        return torch.stack([counts, counts], dim=1).to(torch.int32)
    as_bytes = tokens.to(torch.uint8)
    start = as_bytes.argmax(dim=1)  # the first True (the first maximum)
    last = T - 1 - as_bytes.flip(1).argmax(dim=1)  # the last True
    start = torch.where(counts > 0, start, 0)
    if not bool(((counts == 0) | (last - start + 1 == counts)).all()):
        return None
    return torch.stack([start, start + counts], dim=1).to(torch.int32)


# ---- mask recognition -----------------------------------------------------------------------

# (weakref to mask, mask._version, q_len, kv_len, layout), newest last: a forward's layers share
# one mask object per kind (Gemma 3 alternates a sliding-window and a causal one).
_mask_cache: collections.deque = collections.deque(maxlen=4)

# (causal_offset, window_offset, key_range) of the kernels: key j visible to query i iff
# j <= i + causal_offset (None: no limit), j >= i + window_offset (None: no limit) and, with a
# key range ((N, 2) int32 [start, end) per batch row, or (N, q_len, 2) per query), start <= j <
# end.
Layout = tuple


def mask_layout(mask: Tensor, q_len: int, kv_len: int,
                as_4d: Tensor | None = None) -> Layout | None:
    """What ``mask`` (N, 1, q_len or 1, kv_len) is in the kernels' terms (see Layout), or None:
    a band of keys around each query's diagonal (all-visible, causal with any alignment, a
    sliding window, a two-sided local window), cut, where batch rows differ (padding), to one
    run of keys per row (key_range None when every row keeps all); failing that, one run of
    keys per query (packed documents' block-diagonal masks: key_range (N, q_len, 2), with the
    band that holds every visible entry as offsets, so the kernels skip what lies outside it).
    Boolean masks (True = visible) and additive float masks (0 visible, -inf or the dtype's min
    hidden; a row with no 0 must then be all -inf, as torch's SDPA gives such a row 0 only
    then). Cached for the mask object, which every layer of a forward shares; ``as_4d``: the
    mask viewed as 4-D, when it is not (the cache keys on ``mask``)."""
    key, mask = mask, (mask if as_4d is None else as_4d)
    if (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] not in (1, q_len)
            or mask.shape[3] != kv_len):
        return None
    for cached in _mask_cache:
        if cached[0]() is key and cached[1:4] == (key._version, q_len, kv_len):
            return cached[4]
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point():
        visible = mask == 0
        hidden = mask == float("-inf")
        if not bool((visible | hidden | (mask == torch.finfo(mask.dtype).min)).all()):
            visible = None
        # A row with no 0 entry gets torch's softmax over its finite ones (the dtype's min is
        # finite: about uniform weights), not the kernels' 0, unless all are -inf.
        elif not bool((visible.any(dim=-1) | hidden.all(dim=-1)).all()):
            visible = None
    else:
        visible = None
    layout = None
    if visible is not None:
        layout = _layout_of(visible.expand(mask.shape[0], 1, q_len, kv_len), q_len, kv_len)
    _mask_cache.append((weakref.ref(key), key._version, q_len, kv_len, layout))
    return layout


def _layout_of(visible: Tensor, q_len: int, kv_len: int) -> Layout | None:
    """The layout (see mask_layout) of a (N, 1, q_len, kv_len) boolean mask, or None. Works on
    each query row's run of visible keys (a row with a gap: None), so its temporaries are
    (N, q_len) integers and byte copies of the mask."""
    N = visible.shape[0]
    runs = _token_runs(visible[:, 0].reshape(N * q_len, kv_len))
    if runs is None:
        return None
    runs = runs.view(N, q_len, 2)
    start, end = runs[..., 0].long(), runs[..., 1].long()  # (N, q_len)
    seen = end > start
    if not bool(seen.any()):
        return None
    if bool(seen.all() & (start == 0).all() & (end == kv_len).all()):
        return None, None, None
    # Every visible entry has low <= j - i <= high (i the query, j the key).
    rows = torch.arange(q_len, device=visible.device)
    low = int((start - rows).masked_fill(~seen, kv_len).amin())
    high = int((end - 1 - rows).masked_fill(~seen, -q_len).amax())

    def matches(window_offset: int | None, causal_offset: int | None,
                kept: Tensor | None) -> bool:
        """Whether each row's run is the band's keys (cut to the batch row's ``kept`` run)."""
        lo = ((rows + window_offset).clamp(0, kv_len) if window_offset is not None
              else torch.zeros_like(rows))
        hi = ((rows + causal_offset + 1).clamp(0, kv_len) if causal_offset is not None
              else torch.full_like(rows, kv_len))
        lo, hi = lo.expand(N, q_len), hi.expand(N, q_len)
        if kept is not None:
            lo = torch.maximum(lo, kept[:, :1].long())
            hi = torch.minimum(hi, kept[:, 1:].long())
        band = hi > lo
        return bool(((band == seen) & (~seen | ((start == lo) & (end == hi)))).all())

    # Rows of the batch differ (padding) when the band alone does not give the mask: then each
    # batch row must keep one run of keys (those some query sees), else per-query runs.
    key_range = None
    if not matches(low, high, None):
        key_range = _token_runs(visible[:, 0].any(dim=1))
        if key_range is None or not matches(low, high, key_range):
            causal_offset = high if high < kv_len - 1 else None
            window_offset = low if low > 1 - q_len else None
            return causal_offset, window_offset, runs
    # An edge that cuts no visible key (within the kept runs): no limit, the kernels' fast path.
    window_offset = None if matches(None, high, key_range) else low
    causal_offset = None if matches(window_offset, None, key_range) else high
    return causal_offset, window_offset, key_range


def expand_key_range(key_range: Tensor | None, batch: int) -> Tensor | None:
    """A layout's key range (N, 2) or (N, q_len, 2), N = 1 or batch, with `batch` rows."""
    if key_range is None:
        return None
    return key_range.expand(batch, *key_range.shape[1:])


# ---- a mask decided at run time: torch.compile's route --------------------------------------
# Under torch.compile a mask's values cannot be read while tracing, so the graph records this
# op with the mask itself; at run time (the op is opaque) it inspects the mask as eager calls
# do (mask_layout, cached per mask tensor) and runs our kernels on its band and key runs, or
# torch's SDPA where they cannot serve it. Backward decides the same way.


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device (torch.compile's
    mode="reduce-overhead", transformers' compiled static-cache generation): reading the mask
    on the host would then break the capture."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _masked_route(q: Tensor, k: Tensor, mask: Tensor, backend: str) -> tuple | None:
    """(causal, causal_offset, window_offset, key_range) for our kernels, or None for torch's
    SDPA: q (B, Hq, Tq, D), k (B, Hkv, Tk, D), mask (B or 1, 1, Tq or 1, Tk). None while a
    CUDA graph is captured (no host read of the mask)."""
    if _capturing(q):
        return None
    layout = mask_layout(mask, q.shape[2], k.shape[2])
    if layout is None:
        return None
    causal_offset, window_offset, key_range = layout
    if key_range is not None:
        key_range = expand_key_range(key_range, q.shape[0]).contiguous()
    if (requested_backend(backend) == "auto"  # (our reference is no faster than torch's SDPA)
            and ATTENTION_FWD.auto_choice(q.device, q, k, k, window_offset, key_range)
            == "torch"):
        return None
    return causal_offset is not None, causal_offset or 0, window_offset, key_range


def _torch_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    with autocast_off(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


@torch.library.custom_op("fusedlm::attention_masked_fwd", mutates_args=())
def attention_masked_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                         backend: str) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), mask (B or 1, 1, Tq or 1, Tk) boolean (True =
    visible) or additive float in q's dtype -> out (B, Hq, Tq, D) contiguous and lse
    (B, Hq, Tq) float32 (float64 for float64 inputs): our kernels' where the mask is one run
    of keys per query, else torch's SDPA's output and an lse of +inf, which no real one is
    (the backward then takes its written-out gradients)."""
    route = _masked_route(q, k, mask, backend)
    if route is not None:
        return _attention_fwd(q, k, v, scale, *route[:2], backend, *route[2:])
    out = _torch_sdpa(q, k, v, mask, scale).contiguous()
    return out, q.new_full(q.shape[:3], math.inf, dtype=stat_dtype(q.dtype))


@attention_masked_fwd.register_fake
def _(q, k, v, mask, scale, backend):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fusedlm::attention_masked_bwd", mutates_args=())
def attention_masked_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, mask: Tensor, scale: float,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes and dtypes of q, k, v) of ``attention_masked_fwd``, by the route its
    forward took: the same mask gives the same route, except a forward captured in a CUDA
    graph, which took torch's (its lse is +inf; checked on the host, as this call is not
    captured then: one element, a device sync on a GPU)."""
    route = _masked_route(q, k, mask, backend)
    if route is not None and not (lse.numel() > 0 and bool(lse.reshape(-1)[0] == math.inf)):
        return _attention_bwd(grad_out, q, k, v, out, lse, scale, *route[:2], backend,
                              *route[2:])
    return _masked_attention_math_bwd(grad_out, q, k, v, mask, scale)


def _masked_attention_math_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                               mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of softmax(q k^T * scale + mask) v, written out (in float32 for half inputs):
    the backward of the masks our kernels cannot take. Autograd is off below a custom op, and
    torch.func's vjp there breaks under dispatch modes (FlopCounterMode, opcheck), so torch's
    SDPA backward is not recomputed. Rows that see no key get zero gradients, as in torch."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    q32, k32, v32, grad32 = (t.to(dtype) for t in (q, k, v, grad_out))
    k32, v32 = (t.repeat_interleave(group, dim=1) for t in (k32, v32))  # (B, Hq, Tk, D)
    scores = q32 @ k32.transpose(-1, -2) * scale  # (B, Hq, Tq, Tk)
    scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # (all -inf rows: NaN -> 0)
    grad_v = probs.transpose(-1, -2) @ grad32
    grad_probs = grad32 @ v32.transpose(-1, -2)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True)) * scale
    grad_q = grad_scores @ k32
    grad_k = grad_scores.transpose(-1, -2) @ q32

    def per_kv_head(t: Tensor) -> Tensor:  # (B, Hq, Tk, D) -> (B, Hkv, Tk, D), GQA's sum
        return t.unflatten(1, (k.shape[1], group)).sum(2)

    return (grad_q.to(q.dtype), per_kv_head(grad_k).to(k.dtype),
            per_kv_head(grad_v).to(v.dtype))


@attention_masked_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, scale, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_masked_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _attention_masked_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.fusedlm.attention_masked_bwd(grad_out, q, k, v, out, lse, mask,
                                                         ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


attention_masked_fwd.register_autograd(_attention_masked_backward,
                                       setup_context=_attention_masked_setup_context)


def compiled_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                              backend: str) -> Tensor:
    """For ``torch.compile`` (the caller has checked the mask's shape, dtype and device): q, k, v
    and a 4-D mask as ``attention_masked_fwd`` takes them -> out (B, Hq, Tq, D); the mask is
    read at run time."""
    q, k, v = autocast_inputs(q, k, v)
    return torch.ops.fusedlm.attention_masked_fwd(q, k, v, mask, float(scale), backend)[0]


def mask_shape_refusal(mask: Tensor, query: Tensor, key: Tensor) -> str | None:
    """Why a 4-D ``mask`` cannot go to ``attention_masked_fwd`` with 4-D query and key, from its
    static properties only (traceable), or None."""
    if mask.requires_grad:
        return "an attention mask that requires grad"
    if mask.device != query.device:
        return "an attention mask on another device"
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        return "an attention mask of another dtype"
    if (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, query.shape[0])
            or mask.shape[2] not in (1, query.shape[2]) or mask.shape[3] != key.shape[2]):
        return "an attention mask with a per-head or unexpected shape"
    return None


_sdpa_logged: set[str] = set()


def _sdpa_unsupported(query, key, value, attn_mask, dropout_p, enable_gqa) -> str | None:
    """Why our kernels cannot take this SDPA call (it then goes to torch's), or None. (An
    ``attn_mask`` is looked at by _sdpa_mask_layout.)"""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        return "a dropout_p that is not a number"
    if not 0.0 <= dropout_p < 1.0:
        return "dropout_p outside [0, 1)"
    tensors = (query, key, value)
    if not all(isinstance(t, Tensor) and t.dtype in FLOAT_DTYPES for t in tensors):
        return "non-floating or non-tensor inputs"
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        return "mixed dtypes or devices"
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        return "inputs that are not all 3-D or all 4-D"
    if key.shape != value.shape:
        return "value shaped unlike key"
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        return "batch or head-dim mismatch"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim over {MAX_HEAD_DIM}"
    if query.dim() == 4 and query.shape[1] != key.shape[1]:
        if not enable_gqa or key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
            return "different head counts without enable_gqa"
    if any(t.numel() == 0 for t in tensors):
        return "empty inputs"
    return None


def _sdpa_mask_layout(attn_mask: object, query: Tensor, key: Tensor,
                      is_causal: bool) -> Layout | Tensor | str:
    """The layout (see mask_layout) of an SDPA ``attn_mask`` for 3-D or 4-D ``query``, its batch
    rows expanded to the query's; under torch.compile the mask viewed as 4-D, to be read at run
    time (``compiled_masked_attention``); or why our kernels cannot take it."""
    if not isinstance(attn_mask, Tensor):
        return "a non-tensor attn_mask"
    if is_causal:
        return "attn_mask together with is_causal"  # torch's SDPA raises
    mask = attn_mask
    if query.dim() == 3 and mask.dim() == 3:  # (N, L, S): one head
        mask = mask.unsqueeze(1)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    as_4d = (lambda t: t.unsqueeze(1)) if query.dim() == 3 else (lambda t: t)
    refusal = mask_shape_refusal(mask, as_4d(query), as_4d(key))
    if refusal is not None:
        return refusal.replace("an attention mask", "an attn_mask")
    if torch.compiler.is_compiling():
        return mask
    layout = mask_layout(attn_mask, query.shape[-2], key.shape[-2], as_4d=mask)
    if layout is None:
        return ("an attn_mask that is not one run of keys per query (a bias, padding with "
                "gaps, a custom pattern)")
    causal_offset, window_offset, key_range = layout
    return causal_offset, window_offset, expand_key_range(key_range, query.shape[0])


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature, same
    meaning of every argument (``is_causal`` is aligned top-left when L != S, as in torch).

    query (N, H, L, E) or (N, L, E); key/value (N, Hkv, S, E) or (N, S, E). Calls our kernels
    when they can take the call: no mask, ``is_causal``, or an ``attn_mask`` (boolean, or
    float with 0 and -inf / the dtype's min) that shows each query one run of keys (causal,
    sliding window, all-visible, padding, packed documents' block-diagonal masks), shared by
    the heads. Other masks (biases, gaps, per-head patterns; a float mask's row holding the
    dtype's min but no 0, which torch's softmax spreads over the row), or anything else they
    cannot do go to torch's SDPA (logged once per reason). ``dropout_p`` runs in our kernels
    (see ``fusedlm.attention``: a Philox mask, not the one torch's SDPA would draw). A mask is
    inspected on the host once per mask tensor (a device sync), then cached while the tensor
    lives."""
    return sdpa_with_route(query, key, value, attn_mask, dropout_p, is_causal, scale,
                           enable_gqa)[0]


def sdpa_with_route(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False, backend: str = "auto",
) -> tuple[Tensor, bool]:
    """``scaled_dot_product_attention`` that also says which ran: (out, True) for fusedlm's
    kernels, (out, False) for torch's SDPA. A named ``backend`` (not "auto") runs every call
    our kernels can take on that backend, and raises where that backend cannot."""
    reason = _sdpa_unsupported(query, key, value, attn_mask, dropout_p, enable_gqa)
    causal_offset = window_offset = key_range = runtime_mask = None
    if reason is None and attn_mask is not None:
        layout = _sdpa_mask_layout(attn_mask, query, key, is_causal)
        if isinstance(layout, str):
            reason = layout
        elif isinstance(layout, Tensor):
            runtime_mask = layout
            if dropout_p:
                reason = "dropout_p with an attn_mask read at run time (torch.compile)"
        else:
            causal_offset, window_offset, key_range = layout
    if reason is None and not torch.compiler.is_compiling():
        # Our reference is no faster than torch's SDPA: use ours only where a kernel serves.
        auto = requested_backend(backend) == "auto"
        if auto and ATTENTION_FWD.auto_choice(query.device, query, key, value, window_offset,
                                              key_range, 0.0, dropout_p) == "torch":
            reason = "no fusedlm kernel backend for these inputs"
    if reason is not None:
        if reason not in _sdpa_logged and not torch.compiler.is_compiling():
            _sdpa_logged.add(reason)
            logger.info("fusedlm.scaled_dot_product_attention: %s -> torch's SDPA", reason)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        ), False
    three_d = query.dim() == 3
    q, k, v = (t.unsqueeze(1) for t in (query, key, value)) if three_d else (query, key, value)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if attn_mask is None:
        out = _attention(q, k, v, scale, bool(is_causal), 0, backend, dropout_p=dropout_p)
    elif runtime_mask is not None:  # under torch.compile
        out = compiled_masked_attention(q, k, v, runtime_mask, scale, backend)
    else:  # the mask's band and key runs (is_causal is False here)
        out = _attention(q, k, v, scale, causal_offset is not None, causal_offset or 0, backend,
                         window_offset, _check_key_range(key_range, q, k.shape[2]),
                         dropout_p=dropout_p)
    return (out.squeeze(1) if three_d else out), True
