"""Drop-in integrations: swap an existing model's layers for fusedlm's without copying its code.

* ``fusedlm.integrations.patch``: ``patch(model)`` / ``unpatch(model)`` for any ``torch.nn.Module``
  (torch only; also exported as ``fusedlm.patch`` / ``fusedlm.unpatch``).
* ``fusedlm.integrations.sdpa_mode``: ``FusedSDPAMode``, the torch function mode that sends
  ``F.scaled_dot_product_attention`` calls to fusedlm (``patch(model, attention=True)`` uses it),
  and ``attention_calls(model)``.
* ``fusedlm.integrations.transformers``: ``apply(model)`` for Hugging Face ``transformers``
  models (imports ``transformers``; import it explicitly).

Importing this package imports neither ``transformers`` nor anything heavy.
"""

from .patch import PatchReport, patch, unpatch
from .sdpa_mode import FusedSDPAMode, attention_calls

__all__ = ["FusedSDPAMode", "PatchReport", "attention_calls", "patch", "unpatch"]
