"""Drop-in modules: ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``, ``CrossEntropyLoss``
(subclasses of torch's), ``CausalSelfAttention`` and ``LinearCrossEntropyLoss``."""

from .attention import CausalSelfAttention
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .multihead_attention import MultiheadAttention
from .norm import LayerNorm, RMSNorm

__all__ = ["CausalSelfAttention", "CrossEntropyLoss", "LayerNorm", "LinearCrossEntropyLoss",
           "MultiheadAttention", "RMSNorm"]
