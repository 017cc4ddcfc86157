"""SwiGLU, ``silu(gate) * up``: custom ops ``fusedlm::swiglu_fwd/bwd`` over (N, I) operands,
their autograd, and the public ``fusedlm.swiglu`` (any matching shapes)."""

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
    eager_autograd_function,
    forward_for_call,
    register_extension_kernels,
)

SWIGLU_FWD = OpDispatch("swiglu_fwd")
SWIGLU_BWD = OpDispatch("swiglu_bwd")

SWIGLU_FWD.register("torch")(reference.swiglu_fwd)
SWIGLU_BWD.register("torch")(reference.swiglu_bwd)
# The C++ CPU kernels (the "cuda" backend steps aside: CUDA tensors take the Triton kernels).
for _dispatch in (SWIGLU_FWD, SWIGLU_BWD):
    register_extension_kernels(_dispatch, _dispatch.name)


def _triton_impl(name: str):
    def call(*args):
        from ..triton import swiglu  # imports triton: only when the backend is used

        return getattr(swiglu, name)(*args)

    return call


for _dispatch in (SWIGLU_FWD, SWIGLU_BWD):
    _dispatch.register("triton")(_triton_impl(_dispatch.name))


def _swiglu_fwd(gate, up, backend):
    impl = SWIGLU_FWD.select(backend, gate.device, gate, up)
    with autocast_off(gate.device):
        return impl(gate, up)


def _swiglu_bwd(grad_out, gate, up, backend):
    impl = SWIGLU_BWD.select(backend, gate.device, grad_out, gate, up)
    with autocast_off(gate.device):
        return impl(grad_out, gate, up)


@torch.library.custom_op("fusedlm::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    """gate, up (N, I) -> silu(gate) * up (N, I) contiguous in their dtype."""
    return _swiglu_fwd(gate, up, backend)


@swiglu_fwd.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fusedlm::swiglu_bwd", mutates_args=())
def swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """grad_out, gate, up (N, I) -> dgate, dup (N, I) contiguous in gate's dtype."""
    return _swiglu_bwd(grad_out, gate, up, backend)


@swiglu_bwd.register_fake
def _(grad_out, gate, up, backend):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)  # (not the output: the backward recomputes the sigmoid)
    ctx.backend = backend


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    bwd = _swiglu_bwd if getattr(ctx, "eager", False) else torch.ops.fusedlm.swiglu_bwd
    dgate, dup = bwd(grad_out, gate, up, ctx.backend)
    return dgate, dup, None


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)
_SwigluEager = eager_autograd_function("_SwigluEager", _swiglu_fwd, _setup_context, _backward)


def swiglu(gate: Tensor, up: Tensor, backend: str = "auto") -> Tensor:
    """``F.silu(gate) * up``, the activation of the Llama-family MLP, in one pass each way.

    gate, up: the same shape (any) and float dtype (float64/float32/float16/bfloat16), on one
    device, any strides with a unit stride along the last dim kept in place (the two halves
    of a fused gate-and-up projection are read where they lie). Returns their shape and
    dtype, computed in float32 (float64 for float64): one rounding, where eager code rounds
    silu(gate) before the product. Autograd saves gate and up only (eager code also keeps
    silu(gate)); the backward recomputes the sigmoid.
    """
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
    fwd = forward_for_call(SWIGLU_FWD, backend, _SwigluEager, _swiglu_fwd, reference.swiglu_fwd,
                           gate, up)
    out = fwd(rows_gate, rows_up, backend)
    return out if out.shape == gate.shape else out.view(gate.shape)
