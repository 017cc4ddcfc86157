"""Op layer: each op is a ``torch.library.custom_op`` (``torch.ops.fusedlm.*``) with a fake
(meta) implementation and autograd, dispatching to the backend chosen by ``fusedlm.backends``.
Importing this package registers the ops; it runs no kernel."""

from .adamw import adamw_step
from .attention import (
    attention,
    attention_varlen,
    key_range_from_document_ids,
    key_range_from_padding_mask,
    scaled_dot_product_attention,
)
from .cross_entropy import cross_entropy
from .glu import geglu, swiglu
from .linear_cross_entropy import linear_cross_entropy
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .rotary import rotary_embedding

__all__ = [
    "adamw_step",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "attention_varlen",
    "cross_entropy",
    "geglu",
    "key_range_from_document_ids",
    "key_range_from_padding_mask",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "rotary_embedding",
    "scaled_dot_product_attention",
    "swiglu",
]
