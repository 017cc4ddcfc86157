"""``MultiheadAttention``: ``torch.nn.MultiheadAttention`` whose attention runs on fusedlm's
kernels when the call lets it (``need_weights=False``, as ``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer`` and torchvision's ViT call it)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import sdpa_with_route
from .norm import _rebind

# Merged masks of live input masks: [input refs, their _versions, (N, L, S, dtype), merged],
# newest last. nn.TransformerEncoder hands every layer the same masks: the layers after the
# first get the same merged tensor, whose layout the drop-in has cached (one host sync per
# forward, not per layer). An entry leaves when an input mask is freed.
_merged_masks: list = []
_MERGED_MASKS_MAX = 4


def _forget(entry: list) -> None:
    for i, cached in enumerate(_merged_masks):
        if cached is entry:  # identity: list equality would compare the tensors
            del _merged_masks[i]
            return


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` (same parameters, ``state_dict`` and arguments) with the
    attention of a call on ``fusedlm.scaled_dot_product_attention`` when:

    - ``need_weights=False`` (weights need the full score matrix: torch computes them);
    - batched inputs (N, L, E) with ``batch_first`` or (L, N, E), not nested tensors;
    - no ``bias_k`` / ``bias_v`` / ``add_zero_attn`` (attention dropout in training runs in
      our kernels: ``fusedlm.attention``'s ``dropout_p``, a Philox mask, not torch's draw);
    - ``attn_mask`` None or (L, S) and ``key_padding_mask`` None or (N, S), each boolean (True:
      hidden) or of the query's dtype (added to the scores).

    Other calls run ``torch.nn.MultiheadAttention.forward`` unchanged. The masks are merged as
    torch merges them (additive floats, a boolean mask's True entries -inf) into one
    (N, 1, L, S) mask shared by the heads; the drop-in runs our kernels when that mask shows
    each query one run of keys (causal, padding, windows) and torch's SDPA otherwise. The
    merged mask is inspected on the host (a device sync) once per set of input masks: layers
    given the same, unmodified mask tensors (as ``nn.TransformerEncoder`` gives its layers)
    reuse the first layer's merge and its inspection. ``is_causal=True`` with no
    ``key_padding_mask`` uses the causal kernel and, as torch does, trusts the hint without
    reading ``attn_mask``. In ``eval()`` without grad, ``nn.TransformerEncoderLayer`` may take
    torch's fused inference path, which does not call its attention module at all.
    Extra argument: ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention,
                   backend: str = "auto") -> MultiheadAttention:
        """A fusedlm MultiheadAttention sharing ``module``'s parameters."""
        return _rebind(cls, module, backend)

    def _fused_call(self, query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None, need_weights: bool,
                    attn_mask: Tensor | None, is_causal: bool) -> bool:
        if need_weights:
            return False
        if self.bias_k is not None or self.bias_v is not None or self.add_zero_attn:
            return False
        tensors = (query, key, value)
        if not all(isinstance(t, Tensor) and t.dim() == 3 and not t.is_nested for t in tensors):
            return False
        if is_causal and attn_mask is None:
            return False  # torch raises: the hint needs a mask
        batch = query.shape[0] if self.batch_first else query.shape[1]
        source = key.shape[1] if self.batch_first else key.shape[0]
        target = query.shape[1] if self.batch_first else query.shape[0]
        for mask, shape in ((attn_mask, (target, source)), (key_padding_mask, (batch, source))):
            if mask is None:
                continue
            if mask.dtype not in (torch.bool, query.dtype) or tuple(mask.shape) != shape:
                return False
        return query.shape[-1] == self.embed_dim

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (N, L, E) with ``batch_first`` else (L, N, E); key/value (N, S, kdim/vdim) or
        (S, N, ...). Returns (output shaped like query, None) on the fused path."""
        if not self._fused_call(query, key, value, key_padding_mask, need_weights, attn_mask,
                                is_causal):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, E = query.shape
        S, H = key.shape[1], self.num_heads
        D = E // H
        if self._qkv_same_embed_dim and query is key and key is value:  # one matmul
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        else:
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            weights = (self.in_proj_weight.chunk(3) if self._qkv_same_embed_dim
                       else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            q, k, v = (F.linear(x, w, b)
                       for x, w, b in zip((query, key, value), weights, biases, strict=True))
        q = q.view(N, L, H, D).transpose(1, 2)
        k = k.view(N, S, H, D).transpose(1, 2)
        v = v.view(N, S, H, D).transpose(1, 2)
        mask = None
        if is_causal and key_padding_mask is None:
            attn_mask = None  # torch uses the hint and ignores the mask's contents
        else:
            is_causal = False
        if attn_mask is not None or key_padding_mask is not None:
            mask = _cached_merged_mask(attn_mask, key_padding_mask, N, L, S, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out = sdpa_with_route(q, k, v, mask, dropout_p, is_causal, backend=self.backend)[0]
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int, L: int,
                 S: int, dtype: torch.dtype) -> Tensor:
    """torch's merge of the two masks, shared by the heads: (N or 1, 1, L, S) additive floats,
    a boolean mask's True entries -inf."""
    merged = None
    for mask, shape in ((attn_mask, (1, 1, L, S)), (key_padding_mask, (N, 1, 1, S))):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                mask, float("-inf"))
        else:  # a copy: a view would keep the input alive from _merged_masks
            mask = mask.clone()
        mask = mask.view(shape)
        merged = mask if merged is None else merged + mask
    return merged.expand(-1, 1, L, S)


def _cached_merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int,
                        L: int, S: int, dtype: torch.dtype) -> Tensor:
    """_merged_mask, the same tensor again for the same live (unmodified) input masks."""
    if torch.compiler.is_compiling():
        return _merged_mask(attn_mask, key_padding_mask, N, L, S, dtype)
    inputs = (attn_mask, key_padding_mask)
    versions = tuple(None if m is None else m._version for m in inputs)
    for refs, cached_versions, shape, merged in _merged_masks:
        if (shape == (N, L, S, dtype) and cached_versions == versions
                and all((None if r is None else r()) is m for r, m in zip(refs, inputs,
                                                                           strict=True))):
            return merged
    entry: list = []
    refs = tuple(None if m is None else weakref.ref(m, lambda _, e=entry: _forget(e))
                 for m in inputs)
    merged = _merged_mask(attn_mask, key_padding_mask, N, L, S, dtype)
    entry.extend((refs, versions, (N, L, S, dtype), merged))
    _merged_masks.append(entry)
    if len(_merged_masks) > _MERGED_MASKS_MAX:
        del _merged_masks[0]
    return merged
