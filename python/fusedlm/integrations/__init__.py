"""Drop-in integrations: swap an existing model's layers for fusedlm's without copying its code.

* ``fusedlm.integrations.patch``: ``patch(model)`` / ``unpatch(model)`` for any ``torch.nn.Module``
  (torch only; also exported as ``fusedlm.patch`` / ``fusedlm.unpatch``).
* ``fusedlm.integrations.transformers``: ``apply(model)`` for Hugging Face ``transformers``
  models (imports ``transformers``; import it explicitly).

Importing this package imports neither ``transformers`` nor anything heavy.
"""

from .patch import PatchReport, patch, unpatch

__all__ = ["PatchReport", "patch", "unpatch"]
