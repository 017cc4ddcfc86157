"""Drop-in modules: ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``, ``CrossEntropyLoss``
(subclasses of torch's) and ``CausalSelfAttention``."""

from .attention import CausalSelfAttention
from .loss import CrossEntropyLoss
from .multihead_attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "CrossEntropyLoss", "LayerNorm", "MultiheadAttention",
           "RMSNorm"]
