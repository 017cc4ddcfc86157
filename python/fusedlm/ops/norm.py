"""LayerNorm and RMSNorm: custom ops ``fusedlm::layer_norm_fwd/bwd`` and
``fusedlm::rms_norm_fwd/bwd`` over 2-D ``(M, N)`` inputs, their autograd, and the public
``fusedlm.layer_norm`` / ``fusedlm.rms_norm`` (any leading shape, torch's arguments); the same
with the residual add of a pre-norm block fused in front (``fusedlm::add_layer_norm_fwd/bwd``,
``fusedlm::add_rms_norm_fwd/bwd``; ``fusedlm.add_layer_norm`` / ``fusedlm.add_rms_norm``)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import OpDispatch, check_backend_name
from ._common import (
    FLOAT_DTYPES,
    autocast_off,
    check_finite_float,
    check_float_tensor,
    check_same_device,
    describe,
    eager_autograd_function,
    extension_autograd,
    forward_for_call,
    register_extension_kernels,
    runs_eager_function,
    stat_dtype,
)

LAYER_NORM_FWD = OpDispatch("layer_norm_fwd")
LAYER_NORM_BWD = OpDispatch("layer_norm_bwd")
RMS_NORM_FWD = OpDispatch("rms_norm_fwd")
RMS_NORM_BWD = OpDispatch("rms_norm_bwd")

# h = x + residual, then the norm of h. The C++ kernels are CPU only: on CUDA tensors the
# "cuda" backend steps aside (not in fusedlm._C.cuda_ops()) and auto takes the Triton ones.
ADD_LAYER_NORM_FWD = OpDispatch("add_layer_norm_fwd")
ADD_LAYER_NORM_BWD = OpDispatch("add_layer_norm_bwd")
ADD_RMS_NORM_FWD = OpDispatch("add_rms_norm_fwd")
ADD_RMS_NORM_BWD = OpDispatch("add_rms_norm_bwd")
_DISPATCHES = (LAYER_NORM_FWD, LAYER_NORM_BWD, RMS_NORM_FWD, RMS_NORM_BWD, ADD_LAYER_NORM_FWD,
               ADD_LAYER_NORM_BWD, ADD_RMS_NORM_FWD, ADD_RMS_NORM_BWD)

for _dispatch in _DISPATCHES:
    _dispatch.register("torch")(getattr(reference, _dispatch.name))
    register_extension_kernels(_dispatch, _dispatch.name)


def _triton_supports(*tensors: Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.dtype not in FLOAT_DTYPES:
            return f"{t.dtype} is not supported by the Triton kernels"
    return None


def _triton_impl(name: str):
    def call(*args):
        from ..triton import norm  # imports triton: only when the backend is used

        return getattr(norm, name)(*args)

    return call


for _dispatch in _DISPATCHES:
    _dispatch.register("triton", supports=_triton_supports)(_triton_impl(_dispatch.name))


def _present(*tensors: Tensor | None) -> list[Tensor]:
    return [t for t in tensors if t is not None]


# ---- LayerNorm ------------------------------------------------------------------------------


def _layer_norm_fwd(x, weight, bias, eps, backend):
    impl = LAYER_NORM_FWD.select(backend, x.device, x, weight, bias)
    with autocast_off(x.device):
        return impl(x, weight, bias, eps)


def _layer_norm_bwd(grad_y, x, mean, rstd, weight, has_bias, backend):
    impl = LAYER_NORM_BWD.select(backend, x.device, grad_y, x, weight)
    with autocast_off(x.device):
        return _present(*impl(grad_y, x, mean, rstd, weight, has_bias))


@torch.library.custom_op("fusedlm::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, N), weight/bias (N) or None -> y (M, N) in x's dtype, mean (M), rstd (M) float32
    (float64 for float64 x)."""
    return _layer_norm_fwd(x, weight, bias, eps, backend)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    stats = x.new_empty(x.shape[:1], dtype=stat_dtype(x.dtype))
    return (torch.empty_like(x, memory_format=torch.contiguous_format), stats,
            torch.empty_like(stats))


@torch.library.custom_op("fusedlm::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
    has_bias: bool, backend: str,
) -> list[Tensor]:
    """Returns [dx (M, N)] + [dweight (N)] if weight + [dbias (N)] if has_bias; dweight and
    dbias in the weight's dtype (dbias in float32/float64 when there is no weight)."""
    return _layer_norm_bwd(grad_y, x, mean, rstd, weight, has_bias, backend)


def _norm_grads_fake(x: Tensor, weight: Tensor | None, has_bias: bool) -> list[Tensor]:
    """The backward outputs' fakes: [dx] + [dweight] if weight + [dbias] if has_bias."""
    grads = [torch.empty_like(x, memory_format=torch.contiguous_format)]
    param_dtype = weight.dtype if weight is not None else stat_dtype(x.dtype)
    if weight is not None:
        grads.append(x.new_empty(x.shape[1:], dtype=param_dtype))
    if has_bias:
        grads.append(x.new_empty(x.shape[1:], dtype=param_dtype))
    return grads


@layer_norm_bwd.register_fake
def _(grad_y, x, mean, rstd, weight, has_bias, backend):
    return _norm_grads_fake(x, weight, has_bias)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    bwd = _layer_norm_bwd if getattr(ctx, "eager", False) else torch.ops.fusedlm.layer_norm_bwd
    grads = iter(bwd(grad_y, x, mean, rstd, weight, ctx.has_bias, ctx.backend))
    dx = next(grads)
    dweight = next(grads) if weight is not None else None
    dbias = next(grads) if ctx.has_bias else None
    if dbias is not None and dbias.dtype != ctx.bias_dtype:  # (no weight: dbias came in float32)
        dbias = dbias.to(ctx.bias_dtype)
    return dx, dweight, dbias, None, None


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)
_LayerNormEager = eager_autograd_function(
    "_LayerNormEager", _layer_norm_fwd, _layer_norm_setup_context, _layer_norm_backward
)


# ---- RMSNorm --------------------------------------------------------------------------------


def _rms_norm_fwd(x, weight, eps, backend):
    impl = RMS_NORM_FWD.select(backend, x.device, x, weight)
    with autocast_off(x.device):
        return impl(x, weight, eps)


def _rms_norm_bwd(grad_y, x, rstd, weight, backend):
    impl = RMS_NORM_BWD.select(backend, x.device, grad_y, x, weight)
    with autocast_off(x.device):
        return _present(*impl(grad_y, x, rstd, weight))


@torch.library.custom_op("fusedlm::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    """x (M, N), weight (N) or None -> y (M, N) in x's dtype, rstd (M) float32 (float64 for
    float64 x)."""
    return _rms_norm_fwd(x, weight, eps, backend)


@rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:1], dtype=stat_dtype(x.dtype)))


@torch.library.custom_op("fusedlm::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    grad_y: Tensor, x: Tensor, rstd: Tensor, weight: Tensor | None, backend: str
) -> list[Tensor]:
    """Returns [dx (M, N)] + [dweight (N)] if weight."""
    return _rms_norm_bwd(grad_y, x, rstd, weight, backend)


@rms_norm_bwd.register_fake
def _(grad_y, x, rstd, weight, backend):
    return _norm_grads_fake(x, weight, False)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, backend = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    bwd = _rms_norm_bwd if getattr(ctx, "eager", False) else torch.ops.fusedlm.rms_norm_bwd
    grads = bwd(grad_y, x, rstd, weight, ctx.backend)
    return grads[0], (grads[1] if weight is not None else None), None, None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)
_RmsNormEager = eager_autograd_function(
    "_RmsNormEager", _rms_norm_fwd, _rms_norm_setup_context, _rms_norm_backward
)


# ---- residual add + LayerNorm / RMSNorm ----------------------------------------------------
# x (M, N) the branch output in residual's dtype, or 16-bit beside a float32 residual (a bf16
# autocast branch on a float32 stream); h = x + residual and y in residual's dtype.


def _add_layer_norm_fwd(x, residual, weight, bias, eps, backend):
    impl = ADD_LAYER_NORM_FWD.select(backend, x.device, x, residual, weight, bias)
    with autocast_off(x.device):
        return impl(x, residual, weight, bias, eps)


def _add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias, backend):
    impl = ADD_LAYER_NORM_BWD.select(backend, h.device, grad_y, grad_h, h, weight)
    with autocast_off(h.device):
        return _present(*impl(grad_y, grad_h, h, mean, rstd, weight, has_bias))


@torch.library.custom_op("fusedlm::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual (M, N) -> y = LayerNorm(h), h = x + residual (M, N) in residual's dtype,
    mean, rstd (M) float32 (float64 for float64)."""
    return _add_layer_norm_fwd(x, residual, weight, bias, eps, backend)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, backend):
    stats = residual.new_empty(residual.shape[:1], dtype=stat_dtype(residual.dtype))
    return (torch.empty_like(residual, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format), stats,
            torch.empty_like(stats))


@torch.library.custom_op("fusedlm::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, has_bias: bool, backend: str,
) -> list[Tensor]:
    """Returns [dh (M, N)] (the gradient of x and residual: the norm's plus grad_h) +
    [dweight (N)] if weight + [dbias (N)] if has_bias, as layer_norm_bwd."""
    return _add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias, backend)


@add_layer_norm_bwd.register_fake
def _(grad_y, grad_h, h, mean, rstd, weight, has_bias, backend):
    return _norm_grads_fake(h, weight, has_bias)


def _setup_add_norm_context(ctx, x: Tensor) -> None:
    """What both residual-add norms keep besides their saved tensors: x's dtype (dx's), and
    no materialized zero gradients: an output nothing reads hands the backward None, so an h
    thrown away (a model's last norm) costs the backward no (M, N) read."""
    ctx.set_materialize_grads(False)
    ctx.x_dtype = x.dtype


def _add_norm_backward_result(ctx, dh: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dresidual) from dh: x's in x's dtype (a 16-bit branch beside a float32 stream)."""
    if dh is None:
        return None, None
    return (dh if ctx.x_dtype == dh.dtype else dh.to(ctx.x_dtype)), dh


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, backend = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    _setup_add_norm_context(ctx, x)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, grad_y, grad_h, grad_mean, grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if grad_y is None:  # only h is read downstream: the norm passes no gradient
        return (*_add_norm_backward_result(ctx, grad_h), None, None, None, None)
    bwd = (_add_layer_norm_bwd if getattr(ctx, "eager", False)
           else torch.ops.fusedlm.add_layer_norm_bwd)
    grads = iter(bwd(grad_y, grad_h, h, mean, rstd, weight, ctx.has_bias, ctx.backend))
    dx, dresidual = _add_norm_backward_result(ctx, next(grads))
    dweight = next(grads) if weight is not None else None
    dbias = next(grads) if ctx.has_bias else None
    if dbias is not None and dbias.dtype != ctx.bias_dtype:  # (no weight: dbias came in float32)
        dbias = dbias.to(ctx.bias_dtype)
    return dx, dresidual, dweight, dbias, None, None


add_layer_norm_fwd.register_autograd(_add_layer_norm_backward,
                                     setup_context=_add_layer_norm_setup_context)
_AddLayerNormEager = eager_autograd_function(
    "_AddLayerNormEager", _add_layer_norm_fwd, _add_layer_norm_setup_context,
    _add_layer_norm_backward
)


def _add_rms_norm_fwd(x, residual, weight, eps, backend):
    impl = ADD_RMS_NORM_FWD.select(backend, x.device, x, residual, weight)
    with autocast_off(x.device):
        return impl(x, residual, weight, eps)


def _add_rms_norm_bwd(grad_y, grad_h, h, rstd, weight, backend):
    impl = ADD_RMS_NORM_BWD.select(backend, h.device, grad_y, grad_h, h, weight)
    with autocast_off(h.device):
        return _present(*impl(grad_y, grad_h, h, rstd, weight))


@torch.library.custom_op("fusedlm::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual (M, N) -> y = RMSNorm(h), h = x + residual (M, N) in residual's dtype,
    rstd (M)."""
    return _add_rms_norm_fwd(x, residual, weight, eps, backend)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, backend):
    return (torch.empty_like(residual, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format),
            residual.new_empty(residual.shape[:1], dtype=stat_dtype(residual.dtype)))


@torch.library.custom_op("fusedlm::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, rstd: Tensor, weight: Tensor | None,
    backend: str,
) -> list[Tensor]:
    """Returns [dh (M, N)] + [dweight (N)] if weight."""
    return _add_rms_norm_bwd(grad_y, grad_h, h, rstd, weight, backend)


@add_rms_norm_bwd.register_fake
def _(grad_y, grad_h, h, rstd, weight, backend):
    return _norm_grads_fake(h, weight, False)


def _add_rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, eps, backend = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    _setup_add_norm_context(ctx, x)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)


def _add_rms_norm_backward(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    if grad_y is None:  # only h is read downstream
        return (*_add_norm_backward_result(ctx, grad_h), None, None, None)
    bwd = _add_rms_norm_bwd if getattr(ctx, "eager", False) else torch.ops.fusedlm.add_rms_norm_bwd
    grads = bwd(grad_y, grad_h, h, rstd, weight, ctx.backend)
    dx, dresidual = _add_norm_backward_result(ctx, grads[0])
    return dx, dresidual, (grads[1] if weight is not None else None), None, None


add_rms_norm_fwd.register_autograd(_add_rms_norm_backward,
                                   setup_context=_add_rms_norm_setup_context)
_AddRmsNormEager = eager_autograd_function(
    "_AddRmsNormEager", _add_rms_norm_fwd, _add_rms_norm_setup_context, _add_rms_norm_backward
)


# ---- public API -----------------------------------------------------------------------------


def _shape_tuple(normalized_shape) -> tuple[int, ...]:
    try:  # a tuple of types, not `A | B`: torch 2.8's dynamo cannot trace a types.UnionType
        if not isinstance(normalized_shape, bool) and hasattr(type(normalized_shape), "__index__"):
            # An int-like scalar (numpy's too); a tensor's __index__ raises TypeError unless
            # it holds one integer.
            return (operator.index(normalized_shape),)
        if isinstance(normalized_shape, (str, bytes, bool)) or any(
            isinstance(s, bool) for s in normalized_shape
        ):
            raise TypeError
        return tuple(operator.index(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(
            "argument 'normalized_shape' must be an int or a sequence of ints, got "
            f"{describe(normalized_shape)}"
        ) from None


def _usual_parameter(param: Tensor | None, x: Tensor, n: int) -> bool:
    """Whether ``param`` is None or a 1-D dense (n,) tensor on x's device, in x's dtype or
    float32 (what every nn.LayerNorm / nn.RMSNorm passes)."""
    return param is None or (
        isinstance(param, Tensor) and param.dim() == 1 and param.shape[0] == n
        and (param.dtype == x.dtype or param.dtype == torch.float32)
        and param.layout == torch.strided and param.device == x.device)


def _check_norm_args(
    x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None,
    bias: Tensor | None, x_name: str = "x",
) -> tuple[int, ...]:
    """normalized_shape as a tuple, the arguments checked. The usual call (one normalized dim
    given as an int or a 1-tuple, parameters as modules hold them) in ~1 us; anything else
    takes the checks that name what is wrong."""
    if type(normalized_shape) is int:
        shape = (normalized_shape,)
    elif (type(normalized_shape) is tuple and len(normalized_shape) == 1
          and type(normalized_shape[0]) is int):
        shape = normalized_shape
    else:
        shape = None
    if (shape is not None and type(x) is Tensor and x.dtype in FLOAT_DTYPES
            and x.layout == torch.strided and x.dim() >= 1 and x.shape[-1] == shape[0]
            and _usual_parameter(weight, x, shape[0]) and _usual_parameter(bias, x, shape[0])
            and (weight is None or bias is None or weight.dtype == bias.dtype)):
        return shape
    return _check_norm_args_in_full(x, normalized_shape, weight, bias, x_name)


def _check_norm_args_in_full(
    x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None,
    bias: Tensor | None, x_name: str = "x",
) -> tuple[int, ...]:
    """x_name: what the messages call the normalized tensor."""
    check_float_tensor(x, x_name)
    # (the common spellings, an int or a tuple of ints, skip the general conversion)
    if type(normalized_shape) is int:
        normalized_shape = (normalized_shape,)
    elif type(normalized_shape) is not tuple or any(type(s) is not int for s in normalized_shape):
        normalized_shape = _shape_tuple(normalized_shape)
    n = len(normalized_shape)
    if n == 0 or n > x.dim() or x.shape[x.dim() - n:] != normalized_shape:
        raise ValueError(
            f"argument 'normalized_shape' {list(normalized_shape)} does not match the last "
            f"dimensions of '{x_name}', which has shape {list(x.shape)}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_float_tensor(param, name)
        check_same_device(param, name, x, x_name)
        if param.shape != normalized_shape:
            raise ValueError(
                f"argument '{name}' must have shape normalized_shape = {list(normalized_shape)}, "
                f"got {list(param.shape)}"
            )
        if param.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"argument '{name}' must have the dtype of '{x_name}' ({x.dtype}) or float32, got "
                f"{param.dtype}"
            )
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(
            f"argument 'bias' has dtype {bias.dtype} but 'weight' has {weight.dtype}; "
            "they must match"
        )
    return normalized_shape


# Reshape only when needed: each view adds an autograd node, which costs more than the kernel
# on small inputs.
def _flat(param: Tensor | None) -> Tensor | None:
    return param if param is None or param.dim() == 1 else param.reshape(-1)


def _as_rows(x: Tensor, normalized_shape: tuple[int, ...]) -> Tensor:
    """x (*, *normalized_shape) -> (M, N)."""
    return (x if x.dim() == 2 and len(normalized_shape) == 1
            else x.reshape(-1, math.prod(normalized_shape)))


def _in_dtype(param: Tensor | None, x: Tensor) -> Tensor | None:
    """A float32 weight or bias of a lower- or higher-precision x, cast to x's dtype where
    torch's norms would refuse the mix (float64 x; the empty-input path hands them over)."""
    return param if param is None or param.dtype == x.dtype else param.to(x.dtype)


def _like(y: Tensor, x: Tensor) -> Tensor:
    return y if y.shape == x.shape else y.view(x.shape)


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.layer_norm`` with fused kernels.

    x: (*, *normalized_shape), float64/float32/float16/bfloat16. weight, bias:
    normalized_shape, in x's dtype or float32. Returns y with x's shape and dtype.
    Statistics are computed in float32 (float64 for float64 x).
    """
    normalized_shape = _check_norm_args(x, normalized_shape, weight, bias)
    if not (type(eps) is float and 0.0 <= eps < math.inf):  # (the usual eps skips the call)
        eps = check_finite_float(eps, "eps", minimum=0.0)
    check_backend_name(backend)
    if x.numel() == 0:  # torch's op gives the empty result its autograd
        return F.layer_norm(x, normalized_shape, _in_dtype(weight, x), _in_dtype(bias, x), eps)
    fwd = forward_for_call(LAYER_NORM_FWD, backend, _LayerNormEager, _layer_norm_fwd,
                           reference.layer_norm_fwd, x, weight, bias)
    rows, weight, bias = _as_rows(x, normalized_shape), _flat(weight), _flat(bias)
    if runs_eager_function(fwd, _LayerNormEager):  # eager, with autograd: the C++ node if it can
        module = extension_autograd(LAYER_NORM_FWD, LAYER_NORM_BWD, backend, x.device,
                                    (rows, weight, bias), (rows, rows, weight))
        if module is not None:
            return _like(module.layer_norm_autograd(rows, weight, bias, eps), x)
    y, _, _ = fwd(rows, weight, bias, eps, backend)
    return _like(y, x)


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.rms_norm`` with fused kernels: y = x / sqrt(mean(x^2) + eps) * weight.

    x: (*, *normalized_shape); weight: normalized_shape in x's dtype or float32. ``eps=None``
    means ``torch.finfo(x.dtype).eps``, as in torch. Returns y with x's shape and dtype.
    """
    normalized_shape = _check_norm_args(x, normalized_shape, weight, None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    elif not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = check_finite_float(eps, "eps", minimum=0.0)
    check_backend_name(backend)
    if x.numel() == 0:
        return F.rms_norm(x, normalized_shape, _in_dtype(weight, x), eps)
    fwd = forward_for_call(RMS_NORM_FWD, backend, _RmsNormEager, _rms_norm_fwd,
                           reference.rms_norm_fwd, x, weight)
    rows, weight = _as_rows(x, normalized_shape), _flat(weight)
    if runs_eager_function(fwd, _RmsNormEager):  # eager, with autograd: the C++ node if it can
        module = extension_autograd(RMS_NORM_FWD, RMS_NORM_BWD, backend, x.device,
                                    (rows, weight), (rows, rows, weight))
        if module is not None:
            return _like(module.rms_norm_autograd(rows, weight, eps), x)
    y, _ = fwd(rows, weight, eps, backend)
    return _like(y, x)


_H = "x + residual"  # what the messages call h


def _residual_pair(x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """x and residual checked and, where the kernels do not take the pair, cast so that
    residual has h's dtype (torch's promotion of the two) and x has it too or is 16-bit beside
    a float32 residual."""
    if type(x) is not Tensor or x.dtype not in FLOAT_DTYPES or x.layout != torch.strided:
        check_float_tensor(x, "x")
    if (type(residual) is not Tensor or residual.dtype not in FLOAT_DTYPES
            or residual.layout != torch.strided):
        check_float_tensor(residual, "residual")
    check_same_device(residual, "residual", x, "x")
    if residual.shape != x.shape:
        raise ValueError(f"argument 'residual' must have the shape of 'x' {list(x.shape)}, got "
                         f"{list(residual.shape)}")
    if x.dtype == residual.dtype:
        return x, residual
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    if residual.dtype != h_dtype:
        residual = residual.to(h_dtype)
    if x.dtype != h_dtype and not (h_dtype == torch.float32
                                   and x.dtype in (torch.float16, torch.bfloat16)):
        x = x.to(h_dtype)
    return x, residual


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The residual add of a pre-norm block and the next LayerNorm in one pass each way:
    ``h = x + residual; return F.layer_norm(h, normalized_shape, weight, bias, eps), h``.

    x (a block's output) and residual (the stream it adds to): the same shape
    (*, *normalized_shape), float64/float32/float16/bfloat16, any strides; h and y have
    torch's promoted dtype of the two (a bfloat16 autocast branch beside a float32 stream is
    read as it is). weight, bias: normalized_shape in h's dtype or float32. The add is
    rounded once to h's dtype, as eager code rounds it, and the norm reads the rounded h.
    Autograd saves h (not x, residual): the gradient of x and residual is the norm's plus h's
    own, in one pass.
    """
    x, residual = _residual_pair(x, residual)
    normalized_shape = _check_norm_args(residual, normalized_shape, weight, bias, _H)
    if not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = check_finite_float(eps, "eps", minimum=0.0)
    check_backend_name(backend)
    if x.numel() == 0:
        h = x + residual
        return F.layer_norm(h, normalized_shape, _in_dtype(weight, h), _in_dtype(bias, h), eps), h
    fwd = forward_for_call(ADD_LAYER_NORM_FWD, backend, _AddLayerNormEager, _add_layer_norm_fwd,
                           reference.add_layer_norm_fwd, x, residual, weight, bias)
    x_rows, rows = _as_rows(x, normalized_shape), _as_rows(residual, normalized_shape)
    weight, bias = _flat(weight), _flat(bias)
    if runs_eager_function(fwd, _AddLayerNormEager):  # with autograd: the C++ node if it can
        module = extension_autograd(ADD_LAYER_NORM_FWD, ADD_LAYER_NORM_BWD, backend, x.device,
                                    (x_rows, rows, weight, bias), (rows, rows, rows, weight))
        if module is not None:
            y, h = module.add_layer_norm_autograd(x_rows, rows, weight, bias, eps)
            return _like(y, residual), _like(h, residual)
    y, h, _, _ = fwd(x_rows, rows, weight, bias, eps, backend)
    return _like(y, residual), _like(h, residual)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``h = x + residual; return F.rms_norm(h, normalized_shape, weight, eps), h`` in one pass
    each way; arguments as :func:`add_layer_norm`. ``eps=None`` means
    ``torch.finfo(h.dtype).eps``, as in torch.
    """
    x, residual = _residual_pair(x, residual)
    normalized_shape = _check_norm_args(residual, normalized_shape, weight, None, _H)
    if eps is None:
        eps = torch.finfo(residual.dtype).eps
    elif not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = check_finite_float(eps, "eps", minimum=0.0)
    check_backend_name(backend)
    if x.numel() == 0:
        h = x + residual
        return F.rms_norm(h, normalized_shape, _in_dtype(weight, h), eps), h
    fwd = forward_for_call(ADD_RMS_NORM_FWD, backend, _AddRmsNormEager, _add_rms_norm_fwd,
                           reference.add_rms_norm_fwd, x, residual, weight)
    x_rows, rows, weight = (_as_rows(x, normalized_shape), _as_rows(residual, normalized_shape),
                            _flat(weight))
    if runs_eager_function(fwd, _AddRmsNormEager):  # with autograd: the C++ node if it can
        module = extension_autograd(ADD_RMS_NORM_FWD, ADD_RMS_NORM_BWD, backend, x.device,
                                    (x_rows, rows, weight), (rows, rows, rows, weight))
        if module is not None:
            y, h = module.add_rms_norm_autograd(x_rows, rows, weight, eps)
            return _like(y, residual), _like(h, residual)
    y, h, _ = fwd(x_rows, rows, weight, eps, backend)
    return _like(y, residual), _like(h, residual)
