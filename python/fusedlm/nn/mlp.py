"""``SwiGLUMLP``: the Llama-family MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))``, with its
activation on ``fusedlm.swiglu`` (one pass each way; autograd keeps gate and up only). Its
parameters and ``state_dict`` keys are those of Hugging Face's ``LlamaMLP`` (and Mistral's,
Qwen's, ...), so such a checkpoint loads as is."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import check_backend_name
from ..ops.swiglu import swiglu


class SwiGLUMLP(torch.nn.Module):
    """x (..., hidden_size) -> (..., hidden_size) through ``gate_proj`` and ``up_proj``
    (hidden_size -> intermediate_size) and ``down_proj`` (back), each an ``nn.Linear`` with a
    bias when ``bias``. Extra argument: ``backend`` (of the activation)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.backend))
