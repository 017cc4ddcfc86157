"""Drop-in ``CrossEntropyLoss``: a subclass of torch's, so constructor arguments, the ``weight``
buffer and ``isinstance`` checks are torch's own; only ``forward`` changes, to run
``fusedlm.cross_entropy``. And ``LinearCrossEntropyLoss``: a language model's head and loss in
one, without the logits (``fusedlm.linear_cross_entropy``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on fused kernels (for (N, C) logits and int64 class
    targets; anything else runs torch's function, see ``fusedlm.cross_entropy``). Extra
    arguments: ``backend``, and ``z_loss``/``return_z_loss`` (the z-loss added to each row's
    loss; with ``return_z_loss`` the call returns ``(loss, z_part)``)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: str = "auto", z_loss: float = 0.0, return_z_loss: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend, self.z_loss, self.return_z_loss = backend, z_loss, return_z_loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             backend=self.backend, z_loss=self.z_loss,
                             return_z_loss=self.return_z_loss)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``loss(input, weight, target, bias=None)`` = the cross-entropy of
    ``F.linear(input, weight, bias)`` against target, computed in row chunks so the (N, V)
    logits never exist (see ``fusedlm.linear_cross_entropy``). The head's weight is an
    argument, not a parameter of this module, so a model keeps (and ties) its own.

    input (..., C), weight (V, C), bias (V), target (...) int64. The loss is float32 (float64
    for float64 input). ``softcap``: the logits soft-capped first (Gemma 2's
    ``final_logit_softcapping``). ``z_loss``/``return_z_loss``: as ``CrossEntropyLoss``'s."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, chunk_size: int | None = None, *,
                 backend: str = "auto", softcap: float | None = None, z_loss: float = 0.0,
                 return_z_loss: bool = False) -> None:
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_size, self.backend = label_smoothing, chunk_size, backend
        self.softcap, self.z_loss, self.return_z_loss = softcap, z_loss, return_z_loss

    def forward(self, input: Tensor, weight: Tensor, target: Tensor,
                bias: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return linear_cross_entropy(input, weight, target, bias, self.ignore_index,
                                    self.reduction, self.label_smoothing, self.chunk_size,
                                    self.backend, self.softcap, self.z_loss, self.return_z_loss)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"
                + (f", softcap={self.softcap}" if self.softcap is not None else "")
                + (f", z_loss={self.z_loss}" if self.z_loss else ""))
