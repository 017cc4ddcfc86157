"""Drop-in modules: ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention`` (subclasses of torch's)
and ``CausalSelfAttention``."""

from .attention import CausalSelfAttention
from .multihead_attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "LayerNorm", "MultiheadAttention", "RMSNorm"]
