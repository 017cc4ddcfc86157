"""Gated linear units, ``act(gate) * up``: custom ops ``fusedlm::glu_fwd/bwd`` over (N, I)
operands with the activation by name (``"silu"``, ``"gelu"``, ``"gelu_tanh"``), their autograd,
and the public ``fusedlm.swiglu`` (silu: Llama's MLP) and ``fusedlm.geglu`` (gelu: Gemma's), any
matching shapes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..backends import OpDispatch, check_backend_name
from ._common import (
    autocast_off,
    check_float_tensor,
    check_same_device,
    describe,
    eager_autograd_function,
    extension_autograd,
    forward_for_call,
    register_extension_kernels,
    runs_eager_function,
)

GLU_FWD = OpDispatch("glu_fwd")
GLU_BWD = OpDispatch("glu_bwd")

GLU_FWD.register("torch")(reference.glu_fwd)
GLU_BWD.register("torch")(reference.glu_bwd)
# The C++ CPU kernels (the "cuda" backend steps aside: CUDA tensors take the Triton kernels).
for _dispatch in (GLU_FWD, GLU_BWD):
    register_extension_kernels(_dispatch, _dispatch.name)


def _triton_impl(name: str):
    def call(*args):
        from ..triton import glu  # imports triton: only when the backend is used

        return getattr(glu, name)(*args)

    return call


for _dispatch in (GLU_FWD, GLU_BWD):
    _dispatch.register("triton")(_triton_impl(_dispatch.name))

# F.gelu's ``approximate`` -> the op's activation
_GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def _glu_fwd(gate, up, activation, backend):
    reference.check_glu_activation(activation)
    impl = GLU_FWD.select(backend, gate.device, gate, up, activation)
    with autocast_off(gate.device):
        return impl(gate, up, activation)


def _glu_bwd(grad_out, gate, up, activation, backend):
    reference.check_glu_activation(activation)
    impl = GLU_BWD.select(backend, gate.device, grad_out, gate, up, activation)
    with autocast_off(gate.device):
        return impl(grad_out, gate, up, activation)


@torch.library.custom_op("fusedlm::glu_fwd", mutates_args=())
def glu_fwd(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    """gate, up (N, I) -> act(gate) * up (N, I) contiguous in their dtype; activation "silu",
    "gelu" or "gelu_tanh"."""
    return _glu_fwd(gate, up, activation, backend)


@glu_fwd.register_fake
def _(gate, up, activation, backend):
    reference.check_glu_activation(activation)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fusedlm::glu_bwd", mutates_args=())
def glu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str,
            backend: str) -> tuple[Tensor, Tensor]:
    """grad_out, gate, up (N, I) -> dgate, dup (N, I) contiguous in gate's dtype."""
    return _glu_bwd(grad_out, gate, up, activation, backend)


@glu_bwd.register_fake
def _(grad_out, gate, up, activation, backend):
    reference.check_glu_activation(activation)
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.save_for_backward(gate, up)  # (not the output: the backward recomputes the activation)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    bwd = _glu_bwd if getattr(ctx, "eager", False) else torch.ops.fusedlm.glu_bwd
    dgate, dup = bwd(grad_out, gate, up, ctx.activation, ctx.backend)
    return dgate, dup, None, None


glu_fwd.register_autograd(_backward, setup_context=_setup_context)
_GluEager = eager_autograd_function("_GluEager", _glu_fwd, _setup_context, _backward)


def _glu(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    """act(gate) * up for the public functions: checks, then the (N, I) op."""
    gate, up = check_float_tensor(gate, "gate"), check_float_tensor(up, "up")
    check_same_device(up, "up", gate, "gate")
    if up.shape != gate.shape:
        raise ValueError(f"argument 'up' must have the shape of 'gate' {list(gate.shape)}, got "
                         f"{list(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"argument 'up' has dtype {up.dtype} but 'gate' has {gate.dtype}; they "
                        "must match")
    if gate.dim() == 0:
        raise ValueError("argument 'gate' must have at least one dimension, got a 0-d tensor")
    check_backend_name(backend)
    rows = (math.prod(gate.shape[:-1]), gate.shape[-1])  # (not -1: a width of 0 is allowed)
    rows_gate = gate if gate.dim() == 2 else gate.reshape(rows)
    rows_up = up if up.dim() == 2 else up.reshape(rows)
    fwd = forward_for_call(GLU_FWD, backend, _GluEager, _glu_fwd, reference.glu_fwd, gate, up)
    out = None
    if runs_eager_function(fwd, _GluEager):  # eager, with autograd: the C++ node if it can
        module = extension_autograd(GLU_FWD, GLU_BWD, backend, gate.device,
                                    (rows_gate, rows_up, activation),
                                    (rows_gate, rows_gate, rows_up, activation))
        if module is not None:  # (the entry point checks the activation's name)
            out = module.glu_autograd(rows_gate, rows_up, activation)
    if out is None:
        out = fwd(rows_gate, rows_up, activation, backend)
    return out if out.shape == gate.shape else out.view(gate.shape)


def swiglu(gate: Tensor, up: Tensor, backend: str = "auto") -> Tensor:
    """``F.silu(gate) * up``, the activation of the Llama-family MLP, in one pass each way.

    gate, up: the same shape (any) and float dtype (float64/float32/float16/bfloat16), on one
    device, any strides with a unit stride along the last dim kept in place (the two halves
    of a fused gate-and-up projection are read where they lie). Returns their shape and
    dtype, computed in float32 (float64 for float64): one rounding, where eager code rounds
    silu(gate) before the product. Autograd saves gate and up only (eager code also keeps
    silu(gate)); the backward recomputes the sigmoid.
    """
    return _glu(gate, up, "silu", backend)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none", backend: str = "auto") -> Tensor:
    """``F.gelu(gate, approximate=approximate) * up``, the activation of Gemma's MLP (which
    uses ``approximate="tanh"``, Hugging Face's ``gelu_pytorch_tanh``), in one pass each way.

    approximate: ``"none"`` (exact gelu, ``gate * Phi(gate)`` with the normal CDF) or
    ``"tanh"``, as ``F.gelu``'s. Everything else as :func:`swiglu`: any matching shapes and
    strides, float64/float32/float16/bfloat16, computed in float32 (float64 for float64) with
    one rounding; autograd saves gate and up only and the backward recomputes the gelu.
    """
    activation = _GELU_ACTIVATIONS.get(approximate) if isinstance(approximate, str) else None
    if activation is None:
        raise ValueError(f"argument 'approximate' must be 'none' or 'tanh' (as F.gelu's), got "
                         f"{describe(approximate)}")
    return _glu(gate, up, activation, backend)
