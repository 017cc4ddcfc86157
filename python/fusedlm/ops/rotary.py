"""Rotary position embeddings: the custom op ``fusedlm::rotary_embedding`` over (B, H, T, D)
inputs, its autograd (the backward is the same op rotating the other way), and the public
``fusedlm.rotary_embedding``."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpDispatch, check_backend_name
from ._common import (
    autocast_off,
    check_float_tensor,
    check_same_device,
    eager_autograd_function,
    extension_autograd,
    forward_for_call,
    reference_only,
    register_extension_kernels,
    runs_eager_function,
)

ROTARY_EMBEDDING = OpDispatch("rotary_embedding")
ROTARY_EMBEDDING.register("torch")(reference.rotary_embedding)
# The C++ CPU kernel (the "cuda" backend steps aside: CUDA tensors take the Triton kernel).
register_extension_kernels(ROTARY_EMBEDDING, "rotary_embedding")


@ROTARY_EMBEDDING.register("triton")
def _triton_rotary_embedding(*args):
    from ..triton import rotary  # imports triton: only when the backend is used

    return rotary.rotary_embedding(*args)


def _rotary_embedding(x, cos, sin, interleaved, conjugate, backend):
    impl = ROTARY_EMBEDDING.select(backend, x.device, x, cos, sin)
    with autocast_off(x.device):
        return impl(x, cos, sin, interleaved, conjugate)


@torch.library.custom_op("fusedlm::rotary_embedding", mutates_args=())
def rotary_embedding_op(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool,
                        backend: str) -> Tensor:
    """x (B, H, T, D), cos and sin (T, R/2) or (B, T, R/2) -> (B, H, T, D) contiguous in x's
    dtype (see fusedlm.reference.rotary_embedding)."""
    return _rotary_embedding(x, cos, sin, interleaved, conjugate, backend)


@rotary_embedding_op.register_fake
def _(x, cos, sin, interleaved, conjugate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, cos, sin, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.conjugate, ctx.backend = interleaved, conjugate, backend


def _backward(ctx, grad_out):
    # A rotation's transpose is the rotation the other way.
    cos, sin = ctx.saved_tensors
    rotate = _rotary_embedding if getattr(ctx, "eager", False) else rotary_embedding_op
    dx = rotate(grad_out, cos, sin, ctx.interleaved, not ctx.conjugate, ctx.backend)
    return dx, None, None, None, None, None


rotary_embedding_op.register_autograd(_backward, setup_context=_setup_context)
_RotaryEmbeddingEager = eager_autograd_function(
    "_RotaryEmbeddingEager", _rotary_embedding, _setup_context, _backward
)


def _check_angles(t: object, name: str, x: Tensor) -> Tensor:
    t = check_float_tensor(t, name)
    check_same_device(t, name, x, "x")
    B, _, T, D = x.shape
    if t.dim() not in (2, 3):
        raise ValueError(f"argument '{name}' must be 2-D (T, R/2) or 3-D (B, T, R/2), got shape "
                         f"{list(t.shape)}")
    if t.shape[-2] != T:
        raise ValueError(f"argument '{name}' has {t.shape[-2]} positions but 'x' has T = {T}")
    if t.dim() == 3 and t.shape[0] not in (1, B):
        raise ValueError(f"argument '{name}' has {t.shape[0]} batch rows but 'x' has B = {B} "
                         "(one row is shared by all)")
    if not 1 <= t.shape[-1] <= D // 2:
        raise ValueError(f"argument '{name}' must have between 1 and D/2 = {D // 2} angles per "
                         f"position, got {t.shape[-1]}")
    return t


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                     backend: str = "auto") -> Tensor:
    """Rotary position embeddings (RoPE) applied to queries or keys in one pass.

    x: (B, H, T, D), any strides (a (B, T, H, D) projection's ``transpose(1, 2)`` view is
    read in place), float64/float32/float16/bfloat16. cos, sin: (T, R/2), or (B, T, R/2) for
    per-row positions ((1, T, R/2): one row for all), any float dtype and strides, the cosine
    and sine of each pair's angle, R <= D.
    Each pair (x1, x2) of the first R features becomes (x1 * cos - x2 * sin, x2 * cos +
    x1 * sin); the other D - R features pass through (partial rotary, as GPT-NeoX and Phi).
    Pairs are (i, i + R/2), the layout of GPT-NeoX and Hugging Face Llama checkpoints
    (``rotate_half``), or (2i, 2i + 1) with ``interleaved=True`` (GPT-J, Meta's Llama).

    Returns (B, H, T, D) contiguous in x's dtype, computed in float32 (float64 for float64 x):
    one rounding, where eager code rounds after each multiply in x's dtype. Gradients flow to
    x through the kernels (the backward rotates the other way); cos or sin that require grad
    take the torch reference (a kernel backend named then raises), so their gradients are
    right too.
    """
    x = check_float_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"argument 'x' must be 4-D (B, H, T, D), got shape {list(x.shape)}")
    cos, sin = _check_angles(cos, "cos", x), _check_angles(sin, "sin", x)
    if sin.shape != cos.shape:
        raise ValueError(f"argument 'sin' must have the shape of 'cos' {list(cos.shape)}, got "
                         f"{list(sin.shape)}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"argument 'interleaved' must be a bool, got {type(interleaved).__name__}")
    check_backend_name(backend)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        reference_only(ROTARY_EMBEDDING.name, backend, "'cos' or 'sin' requires grad, and only "
                       "the 'torch' backend differentiates the angle tables")
        return reference.rotary_embedding(x, cos, sin, interleaved, False)
    fwd = forward_for_call(ROTARY_EMBEDDING, backend, _RotaryEmbeddingEager, _rotary_embedding,
                           reference.rotary_embedding, x)
    if runs_eager_function(fwd, _RotaryEmbeddingEager):  # eager, with autograd: the C++ node
        # (the backward is the same op the other way round: its dispatch serves both passes)
        module = extension_autograd(ROTARY_EMBEDDING, ROTARY_EMBEDDING, backend, x.device,
                                    (x, cos, sin), (x, cos, sin))
        if module is not None:
            return module.rotary_embedding_autograd(x, cos, sin, interleaved)
    return fwd(x, cos, sin, interleaved, False, backend)
