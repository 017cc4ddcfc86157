"""fusedlm: fused attention, LayerNorm/RMSNorm and AdamW kernels (C++, CUDA, Triton) as drop-in
replacements for their PyTorch counterparts.

    fusedlm.attention(q, k, v, causal=False, scale=None, backend="auto", window=None,
                      key_range=None)     # key_range: padded batches, packed documents
    fusedlm.key_range_from_padding_mask(attention_mask)   # (B, T) 0/1 -> (B, 2)
    fusedlm.key_range_from_document_ids(document_ids)     # (B, T) ids -> (B, T, 2)
    fusedlm.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)  # flash_attn_varlen_func
    fusedlm.scaled_dot_product_attention(...)      # torch's exact signature
    fusedlm.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend="auto")
    fusedlm.rms_norm(x, normalized_shape, weight=None, eps=None, backend="auto")
    fusedlm.add_layer_norm(x, residual, ...), fusedlm.add_rms_norm(x, residual, ...)
                                                   # -> (norm(x + residual), x + residual)
    fusedlm.cross_entropy(input, target, ...)     # torch's signature; the LM loss, no float32 copy
    fusedlm.linear_cross_entropy(input, weight, target, ...)  # the LM head + loss, no logits
    fusedlm.rotary_embedding(x, cos, sin, interleaved=False)  # RoPE on (B, H, T, D) q or k
    fusedlm.swiglu(gate, up)                       # silu(gate) * up, the Llama MLP's activation
    fusedlm.geglu(gate, up, approximate="none")    # gelu(gate) * up, Gemma's (approximate="tanh")
    fusedlm.nn.LayerNorm, fusedlm.nn.RMSNorm, fusedlm.nn.MultiheadAttention
    fusedlm.nn.CrossEntropyLoss, fusedlm.nn.LinearCrossEntropyLoss
    fusedlm.nn.CausalSelfAttention, fusedlm.nn.SwiGLUMLP, fusedlm.nn.GeGLUMLP
    fusedlm.optim.AdamW
    fusedlm.backends()                             # which backends work here, and why not
    fusedlm.patch(model), fusedlm.unpatch(model)   # swap a model's norms for ours, and back
    fusedlm.patch(model, attention=True)           # also its nn.MultiheadAttention and SDPA calls
    fusedlm.patch(model, mlp=True)                 # also its gated (SwiGLU, GeGLU) MLPs
    fusedlm.integrations.transformers.apply(model) # a Hugging Face model: attention, norms, MLPs

Importing registers the custom ops (torch.ops.fusedlm.*); the compiled extension loads on first
use.
"""

from . import nn, optim, reference
from .backends import BackendNotSupportedError, backends
from .integrations.patch import patch, unpatch  # torch only; transformers is not imported
from .ops import (
    add_layer_norm,
    add_rms_norm,
    attention,
    attention_varlen,
    cross_entropy,
    geglu,
    key_range_from_document_ids,
    key_range_from_padding_mask,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    rotary_embedding,
    scaled_dot_product_attention,
    swiglu,
)

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "attention_varlen",
    "backends",
    "cross_entropy",
    "geglu",
    "key_range_from_document_ids",
    "key_range_from_padding_mask",
    "layer_norm",
    "linear_cross_entropy",
    "nn",
    "optim",
    "patch",
    "reference",
    "rms_norm",
    "rotary_embedding",
    "scaled_dot_product_attention",
    "swiglu",
    "unpatch",
]
