"""Gated MLPs, ``down_proj(act(gate_proj(x)) * up_proj(x))``, with the gated activation on
fusedlm's GLU kernels (one pass each way; autograd keeps gate and up only):

* ``SwiGLUMLP``: act = silu (``fusedlm.swiglu``), the Llama-family MLP;
* ``GeGLUMLP``: act = gelu (``fusedlm.geglu``), tanh-approximated by default, Gemma's MLP.

Their parameters and ``state_dict`` keys are those of Hugging Face's ``LlamaMLP`` / ``GemmaMLP``
(and Mistral's, Qwen's, ...), so such a checkpoint loads as is."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import check_backend_name
from ..ops._common import check_positive_int, describe
from ..ops.glu import geglu, swiglu


class _GatedMLP(torch.nn.Module):
    """x (..., hidden_size) -> (..., hidden_size) through ``gate_proj`` and ``up_proj``
    (hidden_size -> intermediate_size) and ``down_proj`` (back), each an ``nn.Linear`` with a
    bias when ``bias``; the subclass's ``_activate(gate, up)`` in between."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        hidden_size = check_positive_int(hidden_size, "hidden_size")
        intermediate_size = check_positive_int(intermediate_size, "intermediate_size")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.backend = backend

    def _activate(self, gate: Tensor, up: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self._activate(self.gate_proj(x), self.up_proj(x)))


class SwiGLUMLP(_GatedMLP):
    """Llama's MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))``: x (..., hidden_size) ->
    (..., hidden_size) through ``gate_proj`` and ``up_proj`` (hidden_size -> intermediate_size)
    and ``down_proj`` (back), each an ``nn.Linear`` with a bias when ``bias``. Extra argument:
    ``backend`` (of the activation)."""

    def _activate(self, gate: Tensor, up: Tensor) -> Tensor:
        return swiglu(gate, up, self.backend)


class GeGLUMLP(_GatedMLP):
    """Gemma's MLP, ``down_proj(gelu(gate_proj(x), approximate) * up_proj(x))``, with the same
    layers and arguments as :class:`SwiGLUMLP`, plus ``approximate`` (after ``bias``), as
    ``F.gelu``'s: ``"tanh"`` by default, to match Gemma 1, 2 and 3, whose configs say
    ``hidden_activation="gelu_pytorch_tanh"``; ``"none"`` (exact gelu) for a model with Hugging
    Face's ``"gelu"``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 approximate: str = "tanh", device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"argument 'approximate' must be 'none' or 'tanh' (as F.gelu's), "
                             f"got {describe(approximate)}")
        super().__init__(hidden_size, intermediate_size, bias, device, dtype, backend=backend)
        self.approximate = approximate

    def _activate(self, gate: Tensor, up: Tensor) -> Tensor:
        return geglu(gate, up, self.approximate, self.backend)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"
