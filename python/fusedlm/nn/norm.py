"""Drop-in ``LayerNorm`` and ``RMSNorm`` modules. They subclass torch's, so constructor
arguments, parameters, ``state_dict`` keys and ``isinstance`` checks are torch's own; only
``forward`` changes, to run fusedlm's kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.norm import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on fused kernels. Extra argument: ``backend``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm, backend: str = "auto") -> LayerNorm:
        """A fusedlm LayerNorm sharing ``module``'s parameters."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.backend = backend
        return new


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on fused kernels. Extra argument: ``backend``."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm, backend: str = "auto") -> RMSNorm:
        """A fusedlm RMSNorm sharing ``module``'s parameters."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.backend = backend
        return new
