"""Drop-in modules: ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``, ``CrossEntropyLoss``
(subclasses of torch's), ``CausalSelfAttention``, ``LinearCrossEntropyLoss``, ``SwiGLUMLP``
(Llama's MLP) and ``GeGLUMLP`` (Gemma's)."""

from .attention import CausalSelfAttention
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .mlp import GeGLUMLP, SwiGLUMLP
from .multihead_attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "CrossEntropyLoss", "GeGLUMLP", "LayerNorm",
           "LinearCrossEntropyLoss", "MultiheadAttention", "RMSNorm", "SwiGLUMLP"]
