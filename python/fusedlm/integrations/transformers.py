"""fusedlm for Hugging Face ``transformers`` models, with one line and no model code copied:

    report = fusedlm.integrations.transformers.apply(model)

* Attention: registers ``fusedlm_attention_forward`` with ``transformers.AttentionInterface``
  (and transformers' SDPA mask builder with ``AttentionMaskInterface``) under the name
  ``"fusedlm"`` (``"fusedlm_<backend>"`` for a named backend) and switches the model to it with
  ``model.set_attn_implementation``. No model class or forward method is patched.
  Each call takes the semantics of transformers' ``sdpa_attention_forward`` exactly: when the
  mask is absent (no padding: transformers then relies on ``is_causal``) or is a band of keys
  around each query (all-visible, causal, a causal sliding window as Mistral's, Gemma 3's and
  Qwen's local layers, or ModernBERT's two-sided local window) cut, per batch row, to one
  contiguous run of keys (a tokenizer's left or right padding: ``fusedlm.attention``'s
  ``key_range``), our fused kernels run; any other mask (padding with gaps, custom patterns),
  dropout, ``position_bias``, paged caches, and inputs the kernels cannot take go, per call, to
  transformers' own ``sdpa_attention_forward``. :func:`attention_calls` counts both.
  Models transformers does not run on SDPA (``_supports_sdpa = False``) keep their attention.
* Norms: ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` and the model's own RMSNorm and
  LayerNorm classes (found by parameters, ``eps`` and a numeric probe; Gemma's ``1 + weight``
  handled) become fusedlm modules holding the same parameter tensors (``state_dict``
  unchanged). See :mod:`fusedlm.integrations.patch`. ``fusedlm.unpatch(model)`` undoes all of
  it.
"""

from __future__ import annotations

import collections
import logging
import weakref

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..backends import check_backend_name, requested_backend
from ..ops._common import FLOAT_DTYPES
from ..ops.attention import ATTENTION_FWD, MAX_HEAD_DIM, _token_runs, attention_mask_bounds
from ..ops.attention import attention as fused_attention
from .patch import ATTN_PREVIOUS_KEY, LeftAlone, PatchReport, swap_norms

try:  # transformers >= 4.53 builds masks through AttentionMaskInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # older versions build SDPA-style 4-D masks for any custom name
    AttentionMaskInterface = sdpa_mask = None

logger = logging.getLogger("fusedlm")

ATTENTION_NAME = "fusedlm"

_CALLS: collections.Counter = collections.Counter()


def attention_calls() -> collections.Counter:
    """Calls of the registered attention function since the last :func:`reset_attention_calls`:
    ``"fused"`` for calls our kernels served, ``"sdpa: <reason>"`` for per-call fallbacks."""
    return collections.Counter(_CALLS)


def reset_attention_calls() -> None:
    _CALLS.clear()


# ---- mask recognition -----------------------------------------------------------------------

# (weakref to mask, mask._version, q_len, kv_len, layout), newest last: a forward's layers share
# one mask object per kind (Gemma 3 alternates a sliding-window and a causal one).
_mask_cache: collections.deque = collections.deque(maxlen=4)

Band = tuple  # (left, right): key j visible to query i iff p - left <= j <= p + right
Layout = tuple  # (Band, key_range: (N, 2) int32 [start, end) per batch row, or None)


def _mask_layout(mask: Tensor, q_len: int, kv_len: int) -> Layout | None:
    """What ``mask`` (N, 1, q_len or 1, kv_len) is, in the kernels' terms, or None: a band
    (left, right), where query i at position p = i + kv_len - q_len (bottom-right aligned) sees
    the keys p - left <= j <= p + right, a side being None where it cuts nothing (all-visible:
    (None, None); causal: (None, 0); a causal sliding window of W keys: (W - 1, 0)), and, when
    batch rows differ (padding), the run of keys [start, end) each row keeps (None when every
    row keeps all). Boolean masks (True = visible) and additive float masks (0 visible, -inf or
    the dtype's min hidden). Cached for the mask object, which every layer of a forward
    shares."""
    if (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] not in (1, q_len)
            or mask.shape[3] != kv_len):
        return None
    for cached in _mask_cache:
        if cached[0]() is mask and cached[1:4] == (mask._version, q_len, kv_len):
            return cached[4]
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point():
        visible = mask == 0
        hidden = mask[~visible]
        if hidden.numel() and not bool(
            ((hidden == float("-inf")) | (hidden == torch.finfo(mask.dtype).min)).all()
        ):
            visible = None
    else:
        visible = None
    layout = None
    if visible is not None:
        layout = _layout_of(visible.expand(mask.shape[0], 1, q_len, kv_len), q_len, kv_len)
    _mask_cache.append((weakref.ref(mask), mask._version, q_len, kv_len, layout))
    return layout


def _layout_of(visible: Tensor, q_len: int, kv_len: int) -> Layout | None:
    """The layout (see _mask_layout) of a (N, 1, q_len, kv_len) boolean mask, or None."""
    if bool(visible.all()):
        return (None, None), None
    if not bool(visible.any()):
        return None
    # relative[i, j] = j - p(i); the band's sides are the extremes over the visible entries.
    device = visible.device
    relative = (torch.arange(kv_len, device=device)[None, :]
                - torch.arange(q_len, device=device)[:, None] - (kv_len - q_len))
    left = -int(relative.masked_fill(~visible, kv_len).amin())
    right = int(relative.masked_fill(~visible, -kv_len - q_len).amax())
    if left < 0 or right < 0:  # every query sees only keys strictly after (before) itself
        return None
    key_range, kept = None, None
    if not bool((visible == ((relative >= -left) & (relative <= right))).all()):
        # Rows differ: padding, if each row keeps one run of keys (those some query sees).
        key_range = _token_runs(visible.any(dim=2)[:, 0])
        if key_range is None:
            return None
        cols = torch.arange(kv_len, device=device)
        kept = ((cols >= key_range[:, :1]) & (cols < key_range[:, 1:]))[:, None, None, :]

    def matches(lo: int | None, hi: int | None) -> bool:
        band = torch.ones_like(relative, dtype=torch.bool)
        if lo is not None:
            band &= relative >= -lo
        if hi is not None:
            band &= relative <= hi
        return bool((visible == (band if kept is None else band & kept)).all())

    if not matches(left, right):
        return None
    # A side that cuts no visible key (within the kept runs): unbounded, the kernels' fast path.
    lo = None if matches(None, right) else left
    hi = None if matches(lo, None) else right
    return (lo, hi), key_range


# ---- the attention function -----------------------------------------------------------------


# Attention-function arguments that change the result and that neither our kernels nor the
# SDPA fallback take (transformers marks such models _supports_sdpa = False): dropping one would
# be silently wrong, so a call that passes one fails instead.
_NO_FALLBACK = {"s_aux": "attention sinks", "softcap": "logit soft-capping"}


def _unsupported(query, key, value, dropout, kwargs) -> str | None:
    if kwargs.get("position_bias") is not None:
        return "position_bias"
    if kwargs.get("cache") is not None:
        return "paged cache"
    if dropout:
        return "dropout > 0"
    if torch.jit.is_tracing():
        return "torch.jit tracing"
    tensors = (query, key, value)
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in tensors):
        return "inputs that are not 4-D tensors"
    if not all(t.dtype in FLOAT_DTYPES for t in tensors) or len({t.dtype for t in tensors}) != 1:
        return "mixed or unsupported dtypes"
    if len({t.device for t in tensors}) != 1:
        return "mixed devices"
    if key.shape != value.shape:
        return "value shaped unlike key (e.g. a different value head dim)"
    if query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        return "batch or head-dim mismatch"
    if query.shape[3] > MAX_HEAD_DIM:
        return f"head dim over {MAX_HEAD_DIM}"
    hq, hkv = query.shape[1], key.shape[1]
    if hkv == 0 or hq % hkv != 0:
        return "query heads not a multiple of key/value heads"
    if any(t.numel() == 0 for t in tensors):
        return "empty inputs"
    return None


def fusedlm_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``): query (B, Hq, Tq, D),
    key/value (B, Hkv, Tk, D) -> (attn_output (B, Tq, Hq, D), None), with the semantics of
    ``transformers.integrations.sdpa_attention.sdpa_attention_forward``, which serves every call
    our kernels cannot."""
    for argument, what in _NO_FALLBACK.items():
        if kwargs.get(argument) is not None:
            raise NotImplementedError(
                f"fusedlm attention: argument {argument!r} ({what}, from "
                f"{type(module).__name__}) is not supported; keep this model on its 'eager' or "
                "flash attention implementation (fusedlm.integrations.transformers.apply "
                "leaves the attention of models without SDPA support alone)")
    reason = _unsupported(query, key, value, dropout, kwargs)
    causal, window, key_range = False, None, None
    if reason is None:
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None:
            # sdpa_attention_forward: is_causal only for q_len > 1 (a single query sees every
            # cached key, i.e. bottom-right); a causal prefill with kv_len > q_len (an empty
            # static cache) is top-left aligned, so the keys past q_len are dropped.
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            causal = bool(q_len > 1 and is_causal)
            if causal and kv_len > q_len:
                key, value = key[:, :, :q_len], value[:, :, :q_len]
        elif torch.compiler.is_compiling() or not isinstance(attention_mask, Tensor):
            reason = "an attention mask (not inspected under torch.compile)"
        else:
            layout = _mask_layout(attention_mask, q_len, kv_len)
            if layout is None:
                reason = ("an attention mask that is not a band of keys cut to one run per "
                          "batch row (padding with gaps, a custom pattern)")
            elif layout[1] is not None and layout[1].shape[0] not in (1, query.shape[0]):
                reason = "an attention mask whose batch size is not the query's"
            else:
                window, key_range = layout
                window = None if window == (None, None) else window
                if key_range is not None:
                    key_range = key_range.expand(query.shape[0], 2)
    compiling = torch.compiler.is_compiling()
    if reason is None and requested_backend(backend) == "auto" and not compiling:
        # Our reference is no faster than torch's SDPA: use ours only where a kernel serves.
        _, _, window_offset = attention_mask_bounds(q_len, key.shape[2], causal, window)
        if ATTENTION_FWD.auto_choice(query.device, query, key, value, window_offset,
                                     key_range) == "torch":
            reason = "no fusedlm kernel backend for these inputs"
    if reason is not None:
        if not torch.compiler.is_compiling():
            _CALLS[f"sdpa: {reason}"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    if not torch.compiler.is_compiling():
        _CALLS["fused"] += 1
    out = fused_attention(query, key, value, causal=causal, scale=scaling, backend=backend,
                          window=window, key_range=key_range)
    return out.transpose(1, 2).contiguous(), None


def attention_name(backend: str = "auto") -> str:
    """Register (idempotently) and return the implementation name for ``backend``."""
    check_backend_name(backend)
    name = ATTENTION_NAME if backend == "auto" else f"{ATTENTION_NAME}_{backend}"
    if backend == "auto":
        fn = fusedlm_attention_forward
    else:
        def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
            return fusedlm_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                is_causal=is_causal, backend=backend, **kwargs,
            )
        fn.__name__ = f"fusedlm_attention_forward_{backend}"
    AttentionInterface.register(name, fn)
    if AttentionMaskInterface is not None:
        # Masks exactly as for "sdpa": None where is_causal suffices, else a boolean 4-D mask.
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


def set_attention_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: set it on every config of the model
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name


def apply(model: torch.nn.Module, attention: bool = True, norms: bool = True,
          backend: str = "auto") -> PatchReport:
    """Make a transformers model run fusedlm's kernels, in place.

    ``attention``: switch the model to fusedlm's attention (registered with
    ``AttentionInterface``; masks it cannot take fall back per call to transformers' SDPA).
    ``norms``: swap LayerNorm / RMSNorm modules (torch's and the model's own classes, found
    by a numeric probe) for fusedlm modules holding the same parameters. ``backend``: as in
    every fusedlm op.
    Returns a :class:`~fusedlm.integrations.patch.PatchReport`; ``fusedlm.unpatch`` undoes it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    report = PatchReport()
    if attention:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            report.left.append(LeftAlone("", type(model).__qualname__,
                                         "attention: not a transformers model (no config)"))
        elif getattr(model, "_supports_sdpa", True) is False:
            # Its attention takes inputs SDPA has no place for (gpt-oss: per-head sink logits;
            # Gemma 2: logit soft-capping): our kernels and the SDPA fallback would drop them.
            report.left.append(LeftAlone(
                "", type(model).__qualname__,
                f"attention: {type(model).__name__} does not support SDPA-style attention "
                f"(_supports_sdpa is False: its attention has terms SDPA cannot take, such as "
                f"attention sinks, logit soft-capping or relative-position scores); still "
                f"{config._attn_implementation!r}",
            ))
        else:
            name = attention_name(backend)
            previous = config._attn_implementation
            if previous != name:
                set_attention_implementation(model, name)
            if config._attn_implementation == name:
                if previous != name:
                    model.__dict__.setdefault(ATTN_PREVIOUS_KEY, previous)
                report.notes.append(
                    f"attention: implementation {previous!r} -> {name!r}; calls with no mask or "
                    "a causal / sliding-window / all-visible one, with left or right padding, "
                    "run fusedlm's kernels, others (masks with gaps or custom patterns, "
                    "dropout, position_bias, ...) fall back per call to transformers' "
                    "sdpa_attention_forward; see attention_calls()"
                )
            else:
                report.left.append(LeftAlone(
                    "", type(model).__qualname__,
                    f"attention: {type(model).__name__} cannot switch its attention "
                    f"implementation (it does not use transformers' AttentionInterface); still "
                    f"{config._attn_implementation!r}",
                ))
    if norms:
        swap_norms(model, backend, custom_rmsnorm=True, report=report, custom_layernorm=True)
    return report


__all__ = [
    "apply", "attention_calls", "attention_name", "fusedlm_attention_forward",
    "reset_attention_calls", "set_attention_implementation",
]
