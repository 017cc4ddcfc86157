"""Drop-in ``CrossEntropyLoss``: a subclass of torch's, so constructor arguments, the ``weight``
buffer and ``isinstance`` checks are torch's own; only ``forward`` changes, to run
``fusedlm.cross_entropy``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.cross_entropy import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on fused kernels (for (N, C) logits and int64 class
    targets; anything else runs torch's function, see ``fusedlm.cross_entropy``). Extra
    argument: ``backend``."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: str = "auto") -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             backend=self.backend)
