"""Drop-in modules: ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``, ``CrossEntropyLoss``
(subclasses of torch's), ``CausalSelfAttention``, ``LinearCrossEntropyLoss`` and ``SwiGLUMLP``
(Llama's MLP)."""

from .attention import CausalSelfAttention
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .mlp import SwiGLUMLP
from .multihead_attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "CrossEntropyLoss", "LayerNorm", "LinearCrossEntropyLoss",
           "MultiheadAttention", "RMSNorm", "SwiGLUMLP"]
