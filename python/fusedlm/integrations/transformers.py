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
  ``key_range``), or shows each query one run of keys (packed sequences, whose position_ids
  restart per document: a block-diagonal causal mask, per-query ``key_range``), our fused
  kernels run (attention dropout in training included: ``fusedlm.attention``'s ``dropout_p``);
  any other mask (padding with gaps, custom patterns), ``position_bias``, paged caches, and
  inputs the kernels cannot take go, per call, to transformers' own
  ``sdpa_attention_forward``. :func:`attention_calls` counts both.
  Models transformers does not run on SDPA (``_supports_sdpa = False``) keep their attention.
  A model on ``"sdpa"`` whose attention does not go through ``AttentionInterface`` (BERT,
  RoBERTa, ModernBERT, ... in transformers 4.x) keeps it, and its
  ``F.scaled_dot_product_attention`` calls are routed to ``fusedlm.scaled_dot_product_attention``
  as ``fusedlm.patch(model, attention=True)`` does (counted by
  ``fusedlm.integrations.attention_calls(model)``).
* Loss: a model whose ``loss_function`` is transformers' ``ForCausalLMLoss`` or
  ``ForMaskedLMLoss`` gets :func:`causal_lm_loss` / :func:`masked_lm_loss` instead (set
  through ``loss_function``'s own setter): the same loss, from the logits as they are
  (``fusedlm.cross_entropy``'s kernels) instead of from their float32 copy, which for a
  large vocabulary is the biggest tensor of a training step. Models that compute their loss
  inline (``CrossEntropyLoss()(...)`` in their forward) are unaffected.
  :func:`linear_causal_lm_loss` goes further for causal LMs, called in place of
  ``model(**batch, labels=labels).loss``: the head fused into the loss, no logits at all.
* Norms: ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` and the model's own RMSNorm and
  LayerNorm classes (found by parameters, ``eps`` and a numeric probe; Gemma's ``1 + weight``
  handled) become fusedlm modules holding the same parameter tensors (``state_dict``
  unchanged). See :mod:`fusedlm.integrations.patch`.
* MLPs: gated MLPs with ``gate_proj`` / ``up_proj`` / ``down_proj`` (or Phi-3's fused
  ``gate_up_proj``) whose forward a numeric probe shows to be ``down_proj(act(gate) * up)``
  run their activation on ``fusedlm.swiglu`` (act silu: Llama, Qwen, Mistral, ...) or
  ``fusedlm.geglu`` (exact or tanh gelu: Gemma 1, 2, 3), same submodules, ``state_dict``
  unchanged; so do a mixture of experts' experts modules (Mixtral, Qwen3-MoE, DeepSeek-V3)
  through their ``_apply_gate``, which transformers' grouped_mm / batched_mm experts
  implementations call.

``fusedlm.unpatch(model)`` undoes all of it.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import math
import numbers
import sys
import typing
import weakref

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..backends import check_backend_name, requested_backend
from ..ops._common import FLOAT_DTYPES, describe
from ..ops.attention import (
    ATTENTION_FWD,
    MAX_HEAD_DIM,
    _attention,
    compiled_masked_attention,
    expand_key_range,
    mask_layout,
    mask_shape_refusal,
)
from ..ops.cross_entropy import language_model_loss
from ..ops.linear_cross_entropy import linear_cross_entropy
from .patch import (
    ATTN_PREVIOUS_KEY,
    LOSS_PREVIOUS_KEY,
    LeftAlone,
    PatchReport,
    swap_mlps,
    swap_norms,
)
from .sdpa_mode import route_attention

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


# ---- the attention function -----------------------------------------------------------------


# Model types whose attention SDPA cannot express only because of terms fusedlm takes:
# attention sinks (gpt-oss's ``s_aux``, one learned logit per head: ``fusedlm.attention(
# sinks=...)``) or logit soft-capping (Gemma 2's, VaultGemma's and T5Gemma's ``softcap``, the
# last in its encoder, decoder and cross attention: ``fusedlm.attention(softcap=...)``); calls
# our kernels cannot serve run the models' math in torch (_attention_math). apply() switches
# them although their classes say _supports_sdpa = False.
_SDPA_GAPS_FUSEDLM_TAKES = {"gpt_oss": "attention sinks", "gemma2": "logit soft-capping",
                            "vaultgemma": "logit soft-capping", "t5gemma": "logit soft-capping"}


def _unsupported(query, key, value, dropout, kwargs) -> str | None:
    if kwargs.get("position_bias") is not None:
        return "position_bias"
    if kwargs.get("cache") is not None:
        return "paged cache"
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
            0.0 <= dropout < 1.0):
        return "dropout outside [0, 1)"
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


def _terms_sdpa_cannot_take(model: torch.nn.Module, config) -> str | None:
    """Why the model's attention has terms neither our kernels nor SDPA take, or None. The
    class's own ``_supports_sdpa`` says so for most; logit soft-capping is also read from the
    config (transformers releases have marked Gemma 2 SDPA-capable (5.20) and not (5.25)):
    outside _SDPA_GAPS_FUSEDLM_TAKES, a model's attention is not known to hand its cap to the
    attention function (Gemma 3 keeps one in its config and never applies it)."""
    if getattr(config, "model_type", None) in _SDPA_GAPS_FUSEDLM_TAKES:
        return None
    if getattr(model, "_supports_sdpa", True) is False:
        return "_supports_sdpa is False"
    for part in (config, getattr(config, "text_config", None)):
        softcap = getattr(part, "attn_logit_softcapping", None)
        if softcap is not None:
            return f"attn_logit_softcapping is {softcap}"
    return None


def _reads_attention_interface(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` comes from a modeling file that looks attention
    functions up in transformers' ``ALL_ATTENTION_FUNCTIONS`` (every model in transformers 5;
    in 4.x not BERT, RoBERTa, ModernBERT, Nemotron, ..., which pick attention classes of their
    own when built)."""
    files = {type(module).__module__ for module in model.modules()}
    return any("ALL_ATTENTION_FUNCTIONS" in vars(sys.modules[name]) for name in files
               if name in sys.modules)


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
    our kernels cannot, except for the terms SDPA has no place for (attention sinks ``s_aux``,
    logit soft-capping ``softcap``): those calls run the models' own math in torch."""
    sinks = kwargs.pop("s_aux", None)  # gpt-oss's attention sinks: (Hq,) logits
    if sinks is not None:
        _check_s_aux(sinks, query)
    softcap = kwargs.pop("softcap", None)  # Gemma 2's attn_logit_softcapping
    if softcap is not None:
        softcap = _check_softcap_argument(softcap)
    reason = _unsupported(query, key, value, dropout, kwargs)
    # The kernels' terms: key j visible to query i iff (not causal or j <= i + causal_offset),
    # j >= i + window_offset (None: no limit) and, per batch row, inside key_range.
    causal, causal_offset, window_offset, key_range = False, 0, None, None
    runtime_mask = None
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
        elif not isinstance(attention_mask, Tensor):
            reason = "an attention mask that is not a tensor"
        else:
            if attention_mask.dim() == 4 and attention_mask.shape[-1] > kv_len:
                # transformers 4.x's own models (GPT-2 in 4.53) pass 4-D masks with more key
                # columns than keys, which its sdpa_attention_forward cuts to the keys.
                attention_mask = attention_mask[..., :kv_len]
            if torch.compiler.is_compiling():  # the mask is read at run time, by the op
                reason = mask_shape_refusal(attention_mask, query, key)
                if reason is None and dropout:
                    reason = "dropout with a mask read at run time (torch.compile)"
                runtime_mask = attention_mask
            else:
                layout = mask_layout(attention_mask, q_len, kv_len)
                if layout is None:
                    reason = ("an attention mask that is not one run of keys per query "
                              "(padding with gaps, a custom pattern)")
                elif layout[2] is not None and layout[2].shape[0] not in (1, query.shape[0]):
                    reason = "an attention mask whose batch size is not the query's"
                else:
                    mask_causal_offset, window_offset, key_range = layout
                    if mask_causal_offset is not None:
                        causal, causal_offset = True, mask_causal_offset
                    if key_range is not None:  # int32 within [0, kv_len] (mask_layout)
                        key_range = expand_key_range(key_range, query.shape[0]).contiguous()
    compiling = torch.compiler.is_compiling()
    if reason is None and requested_backend(backend) == "auto" and not compiling:
        # Our reference is no faster than torch's SDPA: use ours only where a kernel serves.
        if ATTENTION_FWD.auto_choice(query.device, query, key, value, window_offset,
                                     key_range, softcap or 0.0, float(dropout)) == "torch":
            reason = "no fusedlm kernel backend for these inputs"
    if ((sinks is not None or softcap is not None)
            and (reason is not None or runtime_mask is not None)):
        # SDPA has no sinks or cap (nor the compiled masked op): the model's math, in torch.
        if not torch.compiler.is_compiling():
            _CALLS[f"torch: {reason or 'a mask read at run time under torch.compile'}"] += 1
        return _attention_math(module, query, key, value, attention_mask, dropout, scaling,
                               is_causal, sinks, softcap)
    if reason is not None:
        if not torch.compiler.is_compiling():
            _CALLS[f"sdpa: {reason}"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    if not torch.compiler.is_compiling():
        _CALLS["fused"] += 1
    scale = 1.0 / math.sqrt(query.shape[3]) if scaling is None else float(scaling)
    if runtime_mask is not None:
        out = compiled_masked_attention(query, key, value, runtime_mask, scale, backend)
    else:
        out = _attention(query, key, value, scale, causal, causal_offset, backend,
                         window_offset, key_range, sinks, softcap=softcap or 0.0,
                         dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def _check_s_aux(sinks: object, query: Tensor) -> None:
    if (not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point
            or tuple(sinks.shape) != (query.shape[1],) or sinks.device != query.device):
        raise ValueError(
            f"fusedlm attention: argument 's_aux' (attention sinks) must be a float tensor of "
            f"shape (Hq,) = ({query.shape[1]},) on the query's device {query.device}, got "
            f"{describe(sinks)}")


def _check_softcap_argument(softcap: object) -> float:
    if (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
            or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"fusedlm attention: argument 'softcap' (logit soft-capping) must be a "
                         f"finite number > 0 or None, got {describe(softcap)}")
    return float(softcap)


def _attention_math(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, dropout: float, scaling: float | None,
                    is_causal: bool | None, sinks: Tensor | None,
                    softcap: float | None) -> tuple[Tensor, None]:
    """The models' eager attention with what SDPA lacks, in float32 or wider, for the calls our
    kernels cannot serve: the scores soft-capped (Gemma 2: softcap * tanh(s / softcap), before
    the mask) and with sinks (gpt-oss: one sink column per head, softmaxed, the column
    dropped). query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D), attention_mask None (causal as
    sdpa_attention_forward takes it: top-left, for Tq > 1), boolean (True: visible) or additive
    float, (B or 1, 1 or Hq, Tq, >= Tk). Returns (attn_output (B, Tq, Hq, D), None)."""
    groups = query.shape[1] // key.shape[1]
    compute = torch.promote_types(query.dtype, torch.float32)
    q = query.to(compute)
    k = key.repeat_interleave(groups, dim=1).to(compute)
    v = value.repeat_interleave(groups, dim=1).to(compute)
    scale = 1.0 / math.sqrt(query.shape[3]) if scaling is None else float(scaling)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, kv_len = scores.shape[-2:]
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(compute))
    elif q_len > 1 and (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        column = sinks.to(compute).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


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


def _vocabulary_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch,
                     ignore_index: int, backend: str) -> Tensor:
    """transformers' ``fixed_cross_entropy`` over flattened logits, in float32, on
    ``language_model_loss``: a mean over the labels not ignored, or with
    ``num_items_in_batch`` (gradient accumulation) a sum divided by it."""
    logits = logits.reshape(-1, vocab_size)
    labels = labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = language_model_loss(logits, labels, ignore_index, reduction, backend)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Tensor | None = None,
                   backend: str = "auto", **kwargs) -> Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same result) without its float32
    copy of the logits: logits (B, T, V) in any float dtype, labels (B, T), each position
    predicting the next label unless ``shift_labels`` is given."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return _vocabulary_loss(logits, shift_labels, vocab_size, num_items_in_batch, ignore_index,
                            backend)


def masked_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, backend: str = "auto", **kwargs) -> Tensor:
    """transformers' ``ForMaskedLMLoss`` (same arguments, same result) without its float32
    copy of the logits: logits (B, T, V), labels (B, T), no shift."""
    return _vocabulary_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                            backend)


def _current_loss(model: torch.nn.Module):
    """The function ``model.loss_function`` gives, found as the property finds it but without
    its warning for a model with no known ``loss_type`` (GPT2LMHeadModel: the property then
    gives the causal-LM loss), and transformers' vocabulary losses mapped to ours; (None, {})
    for transformers releases before ``loss_function`` (< 4.46: every loss inline)."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, ForMaskedLMLoss
    except ImportError:
        return None, {}
    ours = {ForCausalLMLoss: causal_lm_loss, ForMaskedLMLoss: masked_lm_loss}
    if "_loss_function" in model.__dict__:  # set through the property's setter
        current = model.__dict__["_loss_function"]
        return getattr(current, "func", current), ours  # (a partial of ours: an earlier apply)
    if not hasattr(type(model), "loss_function"):  # (not a PreTrainedModel)
        return None, ours
    return LOSS_MAPPING.get(getattr(model, "loss_type", None), ForCausalLMLoss), ours


def _swap_loss(model: torch.nn.Module, backend: str, report: PatchReport) -> None:
    """Point a transformers model's ``loss_function`` at our version of its vocabulary loss,
    keeping what to restore (``fusedlm.unpatch``)."""
    current, losses = _current_loss(model)
    ours = losses.get(current)
    if current in (causal_lm_loss, masked_lm_loss):  # an earlier apply: take this backend
        model.loss_function = functools.partial(current, backend=backend)
        report.notes.append(f"loss: already {current.__name__} (backend {backend!r})")
        return
    if ours is None:
        name = getattr(current, "__name__", None)
        report.left.append(LeftAlone(
            "", type(model).__qualname__,
            "loss: " + (f"{name} is not a cross-entropy over the vocabulary" if name else
                        "no transformers loss_function (no loss_type)")))
        return
    model.__dict__.setdefault(LOSS_PREVIOUS_KEY, model.__dict__.get("_loss_function"))
    model.loss_function = functools.partial(ours, backend=backend)
    report.notes.append(
        f"loss: loss_function {current.__name__} -> fusedlm's {ours.__name__} (the same loss "
        "from the logits as they are, without their float32 copy; used where the model calls "
        "self.loss_function)" + ("; linear_causal_lm_loss(model, labels, **batch) makes the "
                                 "loss with no logits at all" if ours is causal_lm_loss else ""))


# Per causal LM (the transformers model inside any DDP / PEFT wrapper): _UNCHECKED until its
# first call, then a _FusedHead where its logits were seen to come from F.linear(hidden,
# lm_head), else (a str) why linear_causal_lm_loss makes its logits.
_LINEAR_LOSS_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LINEAR_LOSS_LOGGED: weakref.WeakSet = weakref.WeakSet()
_UNCHECKED = "not yet checked"


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DistributedDataParallel / DataParallel and PEFT wrappers
    (whose forward the caller still runs: DDP's gradient hooks live there)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                              torch.nn.DataParallel)):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not (
                model):
            model = model.get_base_model()
        else:
            return model


def _check_causal_lm(model: torch.nn.Module) -> None:
    """Raise unless ``model``'s loss is transformers' causal-LM loss (what
    linear_causal_lm_loss computes): not an encoder-decoder, a masked LM or a plain module."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"argument 'model' must be a transformers causal LM (a *ForCausalLM decoder), got "
            f"{type(model).__name__}" + (" (an encoder-decoder)" if config is not None else ""))
    current, _ = _current_loss(model)
    from transformers.loss.loss_utils import ForCausalLMLoss
    if current not in (ForCausalLMLoss, causal_lm_loss):
        raise TypeError(f"argument 'model' must be a transformers causal LM: "
                        f"{type(model).__name__}'s loss_function is "
                        f"{getattr(current, '__name__', current)}, not ForCausalLMLoss")


def _linear_loss_obstacle(model: torch.nn.Module) -> str | None:
    """Why a causal LM has no head to fuse into the loss, or None."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return (f"its output embeddings are a {kind}, not a torch.nn.Linear (the head must be "
                "F.linear(hidden, weight, bias))")
    if any(type(p).__name__ == "DTensor" for p in (head.weight, head.bias) if p is not None):
        return "its head's parameters are DTensors (FSDP / tensor parallel), not read here"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    try:
        _decoder(model)
    except (AttributeError, NotImplementedError, ValueError) as error:
        return f"no decoder module found ({error})"
    return None


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is a causal LM's final hidden states (B, T, C). In transformers
    4.x GPT-2-style models (decoder ``model.transformer``) have no ``get_decoder()`` (4.53) or
    one that answers the model itself (4.57); their ``base_model`` is the decoder then."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    if decoder is model:
        decoder = getattr(model, "base_model", model)
    if decoder is model:
        raise ValueError(f"{type(model).__name__} answers itself for both get_decoder() and "
                         "base_model")
    return decoder


def _with_router_loss(loss: Tensor, outputs, model: torch.nn.Module) -> Tensor:
    """``loss`` plus a mixture of experts' router loss, as ``MixtralForCausalLM.forward`` (and
    every transformers MoE causal LM) adds it when given labels."""
    aux_loss = getattr(outputs, "aux_loss", None)
    if aux_loss is None:
        return loss
    if not hasattr(model, "router_aux_loss_coef"):
        raise ValueError(f"{type(model).__name__} gave a router loss (aux_loss) but has no "
                         "router_aux_loss_coef to weigh it by")
    return loss + model.router_aux_loss_coef * aux_loss.to(loss.device)


def _logit_scales(model: torch.nn.Module) -> list[float]:
    """The constant factors a transformers causal LM may put on its head's logits: Cohere's
    ``logit_scale`` (multiplied), Granite's ``config.logits_scaling`` (divided)."""
    config = getattr(model, "config", None)
    scales = [getattr(model, "logit_scale", None), getattr(config, "logit_scale", None)]
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, numbers.Real) and divisor != 0:
        scales.append(1.0 / divisor)
    return [float(s) for s in scales
            if isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s)
            and s not in (0, 1)]


class _FusedHead(typing.NamedTuple):
    """How a model's logits come from its head, as its first call showed: ``scale`` times
    F.linear(hidden, weight, bias), soft-capped by ``softcap`` (None: not)."""
    scale: float = 1.0
    softcap: float | None = None


def _head_verdict(model, head, hidden, logits: Tensor, decoder_calls: int) -> _FusedHead | str:
    """What the first call saw: a _FusedHead where the last position's logits are exactly
    F.linear(hidden, weight, bias); or that times a logit scale (a head without bias: Cohere,
    Granite) or soft-capped by the config's ``final_logit_softcapping`` (Gemma 2), each
    rounded once more, to within 4 ulps; else why not to fuse."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        return f"its decoder ran {decoder_calls} times or gave no (B, T, C) hidden states"
    with torch.no_grad():
        expected = torch.nn.functional.linear(hidden[:, -1:], head.weight, head.bias)
    if expected.shape != logits.shape:
        return f"its logits have shape {tuple(logits.shape)}, its head's {tuple(expected.shape)}"
    if torch.equal(expected.to(logits.dtype), logits):  # (a model may upcast its logits)
        return _FusedHead()
    tol = 4 * torch.finfo(logits.dtype).eps * logits.abs().max().float().item()

    def close(candidate: Tensor) -> bool:
        return (logits.float() - candidate.float()).abs().max().item() <= tol

    if head.bias is None:
        for scale in _logit_scales(model):
            if close(scale * expected):
                return _FusedHead(scale=scale)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if isinstance(cap, numbers.Real) and math.isfinite(cap) and cap > 0:
        with torch.no_grad():
            if close(torch.tanh(expected / cap) * cap):
                return _FusedHead(softcap=float(cap))
    return ("its logits are not F.linear(final hidden states, lm_head.weight, lm_head.bias), "
            "nor that times a logit scale or soft-capped by final_logit_softcapping (an "
            "adapter on the head?)")


def linear_causal_lm_loss(model: torch.nn.Module, labels: Tensor | None = None, *,
                          num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: Tensor | None = None, chunk_size: int | None = None,
                          backend: str = "auto", return_outputs: bool = False, **inputs):
    """``model(**inputs, labels=labels).loss`` of a transformers causal LM without its (B, T, V)
    logits: the model runs with ``logits_to_keep=1`` (its head makes the last position's logits
    only), a forward hook on its decoder keeps the final hidden states (B, T, C), and
    :func:`fusedlm.linear_cross_entropy` turns them and the head's weight into the loss in row
    chunks, forward and backward. The loss is transformers' ``ForCausalLMLoss``: labels (B, T)
    shifted so each position predicts the next (or ``shift_labels`` (B, T) as given),
    ``ignore_index`` skipped, a mean over the rest or, with ``num_items_in_batch`` (gradient
    accumulation), their sum divided by it; a mixture of experts' router loss
    (``output_router_logits=True``) is added as the model's forward adds it. float32 (float64
    for a float64 model).

    ``model`` may be wrapped in DistributedDataParallel, DataParallel or PEFT: the wrapper's
    forward runs. The first call per model checks that its last-position logits are exactly
    ``F.linear(hidden, lm_head.weight, lm_head.bias)``, or that times the model's logit scale
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``: the hidden states are then
    scaled before the head), or that soft-capped by ``config.final_logit_softcapping``
    (Gemma 2: ``fusedlm.linear_cross_entropy``'s ``softcap``). Where they are none of these
    (an adapter on the head) or the model has no such head or no ``logits_to_keep``, every
    call makes the logits and takes the loss from them (:func:`causal_lm_loss`), and the
    first logs why.
    ``chunk_size``: rows per chunk, as in ``fusedlm.linear_cross_entropy``. With
    ``return_outputs=True`` returns ``(loss, outputs)``; on the fused path ``outputs.logits``
    are the last position's only."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if labels is None and shift_labels is None:
        raise ValueError("argument 'labels' is required (or 'shift_labels', already shifted)")
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is not None and (not isinstance(value, Tensor) or value.dim() != 2
                                  or value.dtype.is_floating_point):
            raise ValueError(f"argument '{name}' must be a (B, T) integer tensor of token ids, "
                             f"got {describe(value)}")
    for name in ("logits_to_keep", "labels"):
        if name in inputs:
            raise ValueError(f"argument '{name}' is set here; do not pass it in the inputs")
    check_backend_name(backend)
    inner = _unwrapped(model)
    if inner not in _LINEAR_LOSS_VERDICTS:
        _check_causal_lm(inner)
        _LINEAR_LOSS_VERDICTS[inner] = _linear_loss_obstacle(inner) or _UNCHECKED
    verdict = _LINEAR_LOSS_VERDICTS[inner]
    if isinstance(verdict, str) and verdict is not _UNCHECKED:
        if inner not in _LINEAR_LOSS_LOGGED:
            _LINEAR_LOSS_LOGGED.add(inner)
            logger.warning("fusedlm: linear_causal_lm_loss makes %s's logits: %s",
                           type(inner).__name__, verdict)
        outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        loss = causal_lm_loss(logits, labels, logits.shape[-1], num_items_in_batch,
                              ignore_index, shift_labels, backend)
        loss = _with_router_loss(loss, outputs, inner)
        return (loss, outputs) if return_outputs else loss

    captured = []
    hook = _decoder(inner).register_forward_hook(
        lambda module, args, output: captured.append(output))
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[0] if len(captured) == 1 else None  # (B, T, C)
    hidden = hidden[0] if isinstance(hidden, tuple) else getattr(hidden, "last_hidden_state",
                                                                   hidden)
    head = inner.get_output_embeddings()
    if verdict is _UNCHECKED:  # the first call: are the logits the head's, exactly?
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]  # (B, 1, V)
        verdict = _head_verdict(inner, head, hidden, logits, len(captured))
        _LINEAR_LOSS_VERDICTS[inner] = verdict
        if isinstance(verdict, str):
            del outputs, logits, hidden, captured
            return linear_causal_lm_loss(
                model, labels, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                shift_labels=shift_labels, chunk_size=chunk_size, backend=backend,
                return_outputs=return_outputs, **inputs)

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:2]:
        raise ValueError(f"argument '{'labels' if labels is not None else 'shift_labels'}' "
                         f"must be (B, T) = {tuple(hidden.shape[:2])}, as the model's tokens, "
                         f"got {tuple(shift_labels.shape)}")
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if verdict.scale != 1.0:  # logits = scale * head(hidden) = head(scale * hidden), no bias
        hidden = hidden * verdict.scale
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight,
        shift_labels.reshape(-1).to(hidden.device), head.bias, ignore_index, reduction,
        chunk_size=chunk_size, backend=backend, softcap=verdict.softcap)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    loss = _with_router_loss(loss, outputs, inner)
    return (loss, outputs) if return_outputs else loss


def apply(model: torch.nn.Module, attention: bool = True, norms: bool = True,
          backend: str = "auto", loss: bool = True, mlp: bool = True) -> PatchReport:
    """Make a transformers model run fusedlm's kernels, in place.

    ``attention``: switch the model to fusedlm's attention (registered with
    ``AttentionInterface``; masks it cannot take fall back per call to transformers' SDPA);
    a model on ``"sdpa"`` that does not use ``AttentionInterface`` (BERT and others in
    transformers 4.x) gets its ``F.scaled_dot_product_attention`` calls routed instead.
    ``norms``: swap LayerNorm / RMSNorm modules (torch's and the model's own classes, found
    by a numeric probe) for fusedlm modules holding the same parameters. ``loss``: replace a
    ``ForCausalLMLoss`` / ``ForMaskedLMLoss`` ``loss_function`` by :func:`causal_lm_loss` /
    :func:`masked_lm_loss`. ``mlp``: swap gated MLPs (``LlamaMLP``, ``Qwen3MLP``, Phi-3's fused
    ``gate_up_proj``, ``GemmaMLP``, ...) whose forward a numeric probe shows to be
    ``down_proj(act(gate) * up)``, so their activation runs on ``fusedlm.swiglu`` (silu) or
    ``fusedlm.geglu`` (exact or tanh gelu; other activations are left alone). ``backend``: as
    in every fusedlm op.
    Returns a :class:`~fusedlm.integrations.patch.PatchReport`; ``fusedlm.unpatch`` undoes it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    report = PatchReport()
    route_sdpa_calls = False
    if attention:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            report.left.append(LeftAlone("", type(model).__qualname__,
                                         "attention: not a transformers model (no config)"))
        elif (why := _terms_sdpa_cannot_take(model, config)) is not None:
            # Its attention takes inputs SDPA has no place for (DeBERTa: relative positions):
            # our kernels and the SDPA fallback would drop them. (gpt-oss's attention sinks and
            # Gemma 2's logit soft-capping are taken: _SDPA_GAPS_FUSEDLM_TAKES.)
            report.left.append(LeftAlone(
                "", type(model).__qualname__,
                f"attention: {type(model).__name__} does not support SDPA-style attention "
                f"({why}: its attention has terms SDPA cannot take, such as attention sinks, "
                f"logit soft-capping or relative-position scores); still "
                f"{config._attn_implementation!r}",
            ))
        else:
            name = attention_name(backend)
            previous = config._attn_implementation
            # transformers 4.x switches the config of a model whose attention classes never
            # read AttentionInterface (4.53's ModernBERT then fails with KeyError 'fusedlm';
            # BERT builds masks for another implementation): only switch one that reads it.
            if previous != name and _reads_attention_interface(model):
                set_attention_implementation(model, name)
            if config._attn_implementation == name:
                if previous != name:
                    model.__dict__.setdefault(ATTN_PREVIOUS_KEY, previous)
                report.notes.append(
                    f"attention: implementation {previous!r} -> {name!r}; calls with no mask or "
                    "a causal / sliding-window / all-visible one, with left or right padding, "
                    "run fusedlm's kernels (dropout included), others (masks with gaps or "
                    "custom patterns, position_bias, ...) fall back per call to transformers' "
                    "sdpa_attention_forward; see attention_calls()"
                )
            elif config._attn_implementation == "sdpa":
                # Its attention classes call F.scaled_dot_product_attention themselves (BERT,
                # RoBERTa, ModernBERT, Nemotron, ... before transformers 5): route those calls,
                # after the swaps below, as patch() does (their probes then call modules with
                # no routing hooks on them).
                route_sdpa_calls = True
            else:
                report.left.append(LeftAlone(
                    "", type(model).__qualname__,
                    f"attention: {type(model).__name__} cannot switch its attention "
                    f"implementation (it does not use transformers' AttentionInterface); still "
                    f"{config._attn_implementation!r}",
                ))
    if norms:
        swap_norms(model, backend, custom_rmsnorm=True, report=report, custom_layernorm=True)
    if mlp:
        swap_mlps(model, backend, report)
    if route_sdpa_calls:
        routed = route_attention(model, backend)[1]
        report.notes.append(
            f"attention: {type(model).__name__} does not use transformers' AttentionInterface "
            f"in this transformers, so its 'sdpa' implementation stays; "
            f"{routed.removeprefix('attention: ')}")
    if loss:
        _swap_loss(model, backend, report)
    return report


__all__ = [
    "apply", "attention_calls", "attention_name", "causal_lm_loss", "fusedlm_attention_forward",
    "linear_causal_lm_loss", "masked_lm_loss", "reset_attention_calls",
    "set_attention_implementation",
]
