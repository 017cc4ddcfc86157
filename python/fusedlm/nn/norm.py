"""Drop-in ``LayerNorm`` and ``RMSNorm`` modules. They subclass torch's, so constructor
arguments, parameters, ``state_dict`` keys and ``isinstance`` checks are torch's own; only
``forward`` changes, to run fusedlm's kernels, and takes an optional ``residual``: with it the
module returns ``(norm(x + residual), x + residual)`` from one fused pass (a pre-norm block's
residual add and its next norm)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.norm import _shape_tuple, add_layer_norm, add_rms_norm, layer_norm, rms_norm


def _checked_shape(normalized_shape) -> tuple[int, ...]:
    """torch's constructors take any iterable and fail inside torch.empty; this names the
    argument."""
    shape = _shape_tuple(normalized_shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"argument 'normalized_shape' must not have negative sizes, got {shape}")
    return shape


def _rebind(cls, module: torch.nn.Module, backend: str):
    """A ``cls`` instance with ``module``'s attributes and the very same parameter tensors; the
    module containers are copied so that later changes to one module do not reach the other."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for container in ("_parameters", "_buffers", "_modules"):
        new.__dict__[container] = type(module.__dict__[container])(module.__dict__[container])
    new.backend = backend
    return new


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on fused kernels. Extra argument: ``backend``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(_checked_shape(normalized_shape), eps, elementwise_affine, bias, device,
                         dtype)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x (*, *normalized_shape) -> y; with ``residual`` (x's shape) -> (y, h) where
        h = x + residual and y is the norm of h (``fusedlm.add_layer_norm``)."""
        if residual is not None:
            return add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias,
                                  self.eps, self.backend)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm, backend: str = "auto") -> LayerNorm:
        """A fusedlm LayerNorm sharing ``module``'s parameters."""
        return _rebind(cls, module, backend)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on fused kernels. Extra argument: ``backend``."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(_checked_shape(normalized_shape), eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x (*, *normalized_shape) -> y; with ``residual`` -> (y, x + residual) as
        :meth:`LayerNorm.forward` (``fusedlm.add_rms_norm``)."""
        if residual is not None:
            return add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps,
                                self.backend)
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm, backend: str = "auto") -> RMSNorm:
        """A fusedlm RMSNorm sharing ``module``'s parameters."""
        return _rebind(cls, module, backend)
