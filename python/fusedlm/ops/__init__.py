"""Op layer: each op is a ``torch.library.custom_op`` (``torch.ops.fusedlm.*``) with a fake
(meta) implementation and autograd, dispatching to the backend chosen by ``fusedlm.backends``.
Importing this package registers the ops; it runs no kernel."""

from .adamw import adamw_step
from .attention import attention, scaled_dot_product_attention
from .norm import layer_norm, rms_norm

__all__ = ["adamw_step", "attention", "layer_norm", "rms_norm", "scaled_dot_product_attention"]
