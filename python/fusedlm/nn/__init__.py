"""Drop-in modules: ``LayerNorm``, ``RMSNorm`` (subclasses of torch's) and
``CausalSelfAttention``."""

from .attention import CausalSelfAttention
from .norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "LayerNorm", "RMSNorm"]
