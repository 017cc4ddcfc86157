"""Optimizers: ``fusedlm.optim.AdamW``, a drop-in for ``torch.optim.AdamW``."""

from .adamw import AdamW

__all__ = ["AdamW"]
