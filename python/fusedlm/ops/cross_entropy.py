"""Cross-entropy over class logits: custom ops ``fusedlm::cross_entropy_fwd/bwd`` over (N, V)
logits and int64 targets, their autograd, and the public ``fusedlm.cross_entropy`` (torch's
signature; what the kernels do not take goes to ``torch.nn.functional.cross_entropy``)."""

from __future__ import annotations

import logging
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import OpDispatch, check_backend_name, requested_backend
from ._common import (
    FLOAT_DTYPES,
    autocast_off,
    check_int,
    check_reduction,
    describe,
    eager_autograd_function,
    forward_for_call,
    register_extension_kernels,
    stat_dtype,
    under_transform,
)

logger = logging.getLogger("fusedlm")

CROSS_ENTROPY_FWD = OpDispatch("cross_entropy_fwd")
CROSS_ENTROPY_BWD = OpDispatch("cross_entropy_bwd")

CROSS_ENTROPY_FWD.register("torch")(reference.cross_entropy_fwd)
CROSS_ENTROPY_BWD.register("torch")(reference.cross_entropy_bwd)
# The C++ CPU kernels (the "cuda" backend steps aside: CUDA tensors take the Triton kernels).
for _dispatch in (CROSS_ENTROPY_FWD, CROSS_ENTROPY_BWD):
    register_extension_kernels(_dispatch, _dispatch.name)


def _triton_impl(name: str):
    def call(*args, **kwargs):
        from ..triton import cross_entropy  # imports triton: only when the backend is used

        return getattr(cross_entropy, name)(*args, **kwargs)

    return call


for _dispatch in (CROSS_ENTROPY_FWD, CROSS_ENTROPY_BWD):
    _dispatch.register("triton")(_triton_impl(_dispatch.name))


def _cross_entropy_fwd(logits, target, ignore_index, label_smoothing, backend, z_loss=0.0):
    impl = CROSS_ENTROPY_FWD.select(backend, logits.device, logits, target)
    with autocast_off(logits.device):
        return impl(logits, target, ignore_index, label_smoothing, z_loss=z_loss)


def _cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum, ignore_index,
                       label_smoothing, backend, out=None, z_loss=0.0):
    """dlogits; written into ``out`` when given, which may be the logits themselves (the
    gradient then replaces them: fusedlm.linear_cross_entropy's chunks)."""
    impl = CROSS_ENTROPY_BWD.select(backend, logits.device, grad_loss, logits, target)
    extra = {} if out is None else {"out": out}
    with autocast_off(logits.device):
        return impl(grad_loss, logits, target, row_max, log_sum, ignore_index, label_smoothing,
                    z_loss=z_loss, **extra)


@torch.library.custom_op("fusedlm::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, backend: str,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V), target (N) int64 -> loss (N), row_max (N) and log_sum (N) (logsumexp =
    row_max + log_sum), float32 (float64 for float64 logits). Rows whose target is
    ignore_index have loss 0; the others' loss includes ``z_loss * logsumexp**2``."""
    return _cross_entropy_fwd(logits, target, ignore_index, label_smoothing, backend, z_loss)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, backend, z_loss=0.0):
    loss = logits.new_empty(logits.shape[:1], dtype=stat_dtype(logits.dtype))
    return loss, torch.empty_like(loss), torch.empty_like(loss)


@torch.library.custom_op("fusedlm::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    grad_loss: Tensor, logits: Tensor, target: Tensor, row_max: Tensor, log_sum: Tensor,
    ignore_index: int, label_smoothing: float, backend: str, z_loss: float = 0.0,
) -> Tensor:
    """grad_loss (N) -> dlogits (N, V) in the logits' dtype."""
    return _cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum, ignore_index,
                              label_smoothing, backend, z_loss=z_loss)


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, row_max, log_sum, ignore_index, label_smoothing, backend,
      z_loss=0.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, backend, *z_loss = inputs
    _, row_max, log_sum = output
    ctx.save_for_backward(logits, target, row_max, log_sum)
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend
    ctx.z_loss = z_loss[0] if z_loss else 0.0  # (a caller may leave it to its default)
    ctx.input_count = len(inputs)
    ctx.mark_non_differentiable(row_max, log_sum)


def _backward(ctx, grad_loss, grad_row_max, grad_log_sum):
    logits, target, row_max, log_sum = ctx.saved_tensors
    eager = getattr(ctx, "eager", False)
    bwd = _cross_entropy_bwd if eager else torch.ops.fusedlm.cross_entropy_bwd
    dlogits = bwd(grad_loss, logits, target, row_max, log_sum, ctx.ignore_index,
                  ctx.label_smoothing, ctx.backend, z_loss=ctx.z_loss)
    return (dlogits, *[None] * (ctx.input_count - 1))


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
_CrossEntropyEager = eager_autograd_function(
    "_CrossEntropyEager", _cross_entropy_fwd, _setup_context, _backward
)


# ---- public API -----------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")
_fallback_logged: set[str] = set()


def _unsupported(input, target, weight, size_average, reduce, reduction,
                 label_smoothing) -> str | None:
    """Why the kernels cannot take this call (it then goes to torch's cross_entropy), or None."""
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return "non-tensor inputs"
    if input.dtype not in FLOAT_DTYPES or input.layout != torch.strided:
        return "logits that are not a dense float tensor"
    if input.dim() != 2:
        return "logits that are not 2-D (N, C)"  # (C) and (N, C, d1, ...) layouts
    if target.dtype != torch.int64 or target.dim() != 1 or target.shape[0] != input.shape[0]:
        return "targets that are not int64 class indices of shape (N)"  # probabilities, too
    if target.device != input.device or target.layout != torch.strided:
        return "targets on another device or not dense"
    if weight is not None:
        return "class weights"
    if size_average is not None or reduce is not None:
        return "the deprecated size_average/reduce arguments"
    if reduction not in _REDUCTIONS:
        return f"reduction {reduction!r}"
    if not (isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
            and 0.0 <= label_smoothing <= 1.0):
        return "a label_smoothing that is not a number in [0, 1]"
    if input.numel() == 0:
        return "empty inputs"
    return None


def _why_torchs(backend: str, input, target, *arguments) -> str | None:
    """Why this call goes to torch's cross_entropy: the kernels cannot take it
    (``_unsupported(input, target, *arguments)``), or "auto" would give it the torch
    reference, which is no faster than torch's own function. None: it runs on the op."""
    reason = _unsupported(input, target, *arguments)
    if (reason is None and not torch.compiler.is_compiling()
            and requested_backend(backend) == "auto"
            and CROSS_ENTROPY_FWD.auto_choice(input.device, input, target) == "torch"):
        return "no fusedlm kernel backend for these inputs"
    return reason


def _check_targets(target: Tensor, classes: int, ignore_index: int,
                   op: str = "fusedlm.cross_entropy") -> None:
    """Raises (on the CPU) or asserts on the device, without a host sync (on a GPU, as
    torch's own kernel does), if a target other than ignore_index is outside [0, classes)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    torch._assert_async(
        ~bad.any(),
        f"{op}: argument 'target' holds a class index outside [0, {classes}) "
        f"that is not ignore_index ({ignore_index})",
    )


def check_z_loss(z_loss: object, return_z_loss: object) -> float:
    """The z-loss weight as a float (a finite real number >= 0), and ``return_z_loss`` a bool;
    a ValueError/TypeError naming the argument otherwise."""
    # (comparisons, not math.isfinite: torch.compile traces a float argument symbolically)
    if (isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real)
            or not 0.0 <= z_loss < math.inf):
        raise ValueError(f"argument 'z_loss' must be a finite number >= 0 (the weight of "
                         f"logsumexp**2 in each row's loss), got {describe(z_loss)}")
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"argument 'return_z_loss' must be a bool, got {describe(return_z_loss)}")
    return float(z_loss)


def reduce_rows(values: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Per-row values (N) reduced as the loss is: "sum", "mean" over the rows whose target is
    not ignore_index (0/0 = NaN when all are, as torch), or "none" (unchanged)."""
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / (target != ignore_index).sum()
    return values


def z_loss_part(row_max: Tensor, log_sum: Tensor, target: Tensor, ignore_index: int,
                z_loss: float, reduction: str) -> Tensor:
    """The z-loss term the kernels added to a loss, ``z_loss * logsumexp**2`` on each row not
    ignored, reduced as the loss is, detached (for logging: the loss already holds it)."""
    lse = (row_max + log_sum).detach()
    part = torch.where(target != ignore_index, z_loss * lse.square(), 0.0)
    return reduce_rows(part, target, ignore_index, reduction)


def torch_z_loss(logits: Tensor, target: Tensor, ignore_index: int, z_loss: float,
                 reduction: str) -> Tensor:
    """``z_loss * logsumexp(logits)**2`` of (N, V) logits on each row not ignored, reduced,
    differentiable, in plain torch ops (the paths that run torch's cross_entropy)."""
    lse = torch.logsumexp(logits, dim=-1)
    part = torch.where(target != ignore_index, z_loss * lse.square(), 0.0)
    return reduce_rows(part, target, ignore_index, reduction)


def _loss_dtype(logits: Tensor) -> torch.dtype:
    """torch's: the logits' dtype, or float32 where autocast runs cross_entropy (on its float32
    list) and the logits are float16/bfloat16."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        device_type = logits.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.float32
    return logits.dtype


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str = "auto",
    z_loss: float = 0.0,
    return_z_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop-in for ``torch.nn.functional.cross_entropy``: same signature and meaning of every
    argument, plus ``backend``, ``z_loss`` and ``return_z_loss``.

    The kernels take the language-model case: input (N, C) logits in float16/bfloat16/
    float32/float64 with any strides, target (N) int64 class indices, ``ignore_index``,
    ``reduction`` "mean"/"sum"/"none" and ``label_smoothing``. They compute in float32
    (float64 for float64) straight from the logits, without the float32 copy torch makes, and
    return the gradient in the logits' dtype. The loss has torch's dtype: the logits', or
    float32 under autocast for float16/bfloat16 logits. Anything else (class weights,
    probability targets, (N, C, d1, ...) inputs, the deprecated arguments) goes to torch's
    function (logged once per reason), as does every call ``"auto"`` would give the torch
    reference (torch's own function is the faster of the two there). A target outside
    [0, C) other than ``ignore_index`` raises, as in torch (on a GPU through a device-side
    assert, so the check needs no host sync).

    ``z_loss``: adds ``z_loss * logsumexp(row)**2`` to each row's loss (PaLM's auxiliary
    z-loss, which keeps the softmax normalizer near 1 in long training runs; 1e-4 is usual),
    inside the kernels: the backward scales each row's softmax by ``1 + 2 * z_loss *
    logsumexp``, with no extra pass. ``return_z_loss=True`` returns ``(loss, z_part)``:
    z_part is that term, reduced as the loss is and detached, for logging (the loss already
    holds it). Both need the kernels' case; anything else raises.
    """
    check_backend_name(backend)
    ignore_index = check_int(ignore_index, "ignore_index")
    if size_average is None and reduce is None:  # (the deprecated pair overrides reduction)
        check_reduction(reduction, _REDUCTIONS)
    z_loss = check_z_loss(z_loss, return_z_loss)
    arguments = (weight, size_average, reduce, reduction, label_smoothing)
    with_z = bool(z_loss or return_z_loss)
    if with_z:
        unsupported = _unsupported(input, target, *arguments)
        if unsupported not in (None, "empty inputs"):
            raise ValueError(f"fusedlm.cross_entropy: argument 'z_loss' (and return_z_loss) "
                             f"needs (N, C) logits, int64 class targets, no class weights and "
                             f"a reduction of {_REDUCTIONS}; this call has {unsupported}")
        # torch's function has no z-loss: the op runs even where "auto" would give the call to
        # it (on the torch reference); an empty batch takes torch's path with the term added
        reason = unsupported
    else:
        reason = _why_torchs(backend, input, target, *arguments)
    if reason is not None:
        if reason not in _fallback_logged and not torch.compiler.is_compiling():
            _fallback_logged.add(reason)
            logger.info("fusedlm.cross_entropy: %s -> torch.nn.functional.cross_entropy", reason)
        loss = F.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                               reduction, label_smoothing)
        if not with_z:
            return loss
        part = torch_z_loss(input, target, ignore_index, z_loss, reduction)
        return (loss + part, part.detach()) if return_z_loss else loss + part
    loss = _reduced_loss(input, target, ignore_index, reduction, float(label_smoothing),
                         backend, z_loss, return_z_loss)
    if return_z_loss:
        return loss[0].to(_loss_dtype(input)), loss[1].to(_loss_dtype(input))
    return loss.to(_loss_dtype(input))


def _reduced_loss(logits: Tensor, target: Tensor, ignore_index: int, reduction: str,
                  label_smoothing: float, backend: str, z_loss: float = 0.0,
                  return_z_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The op's loss, reduced, in its compute dtype (float32, float64 for float64 logits); with
    ``return_z_loss``, (loss, its z-loss part)."""
    # The C++ CPU kernel checks the targets itself, in its loop (~10 us less a call). Under
    # torch.func transforms the reference runs, which gives a bad target's row NaN: vmap has
    # no batching rule for the assert.
    if not under_transform() and (
            torch.compiler.is_compiling()
            or CROSS_ENTROPY_FWD.choose(backend, logits.device, logits, target) != "cpu"):
        _check_targets(target, logits.shape[1], ignore_index)
    fwd = forward_for_call(CROSS_ENTROPY_FWD, backend, _CrossEntropyEager, _cross_entropy_fwd,
                           reference.cross_entropy_fwd, logits, backend_index=-2)
    loss, row_max, log_sum = fwd(logits, target, ignore_index, label_smoothing, backend, z_loss)
    loss = reduce_rows(loss, target, ignore_index, reduction)
    if return_z_loss:
        return loss, z_loss_part(row_max, log_sum, target, ignore_index, z_loss, reduction)
    return loss


def language_model_loss(logits: Tensor, target: Tensor, ignore_index: int = -100,
                        reduction: str = "mean", backend: str = "auto", z_loss: float = 0.0,
                        return_z_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The cross-entropy of (N, V) logits against (N) int64 targets, reduced by "mean" or
    "sum", as a float32 (float64 for float64 logits) scalar, for training loops:
    ``fusedlm.cross_entropy``'s kernels when a kernel backend serves the call (they compute
    in float32 from logits of any width), else torch's on a float32 copy, which is what
    eager training code writes (``logits.float()``, as transformers' losses do), so
    bfloat16 logits never give a bfloat16-rounded loss.

    Unlike ``fusedlm.cross_entropy``, a backend named here or by FUSEDLM_BACKEND that cannot
    serve the call (``cuda``: there is no CUDA C++ cross-entropy; Triton serves CUDA tensors)
    does not raise: the loss then takes torch's path, logged once, so a model run with
    FUSEDLM_BACKEND=cuda still trains. ``z_loss``/``return_z_loss`` as in
    ``fusedlm.cross_entropy`` (torch's path adds the same term in torch ops)."""
    check_backend_name(backend)
    check_reduction(reduction, ("mean", "sum"))
    ignore_index = check_int(ignore_index, "ignore_index")
    z_loss = check_z_loss(z_loss, return_z_loss)
    reason = _why_torchs(backend, logits, target, None, None, None, reduction, 0.0)
    if reason is None and not torch.compiler.is_compiling():
        requested = requested_backend(backend)
        if requested != "auto":
            why = CROSS_ENTROPY_FWD._why_not(requested, logits.device, (logits, target))
            reason = None if why is None else f"backend {requested!r} cannot serve it: {why}"
    if reason is None:
        return _reduced_loss(logits, target, ignore_index, reduction, 0.0, backend, z_loss,
                             return_z_loss)
    if reason not in _fallback_logged:
        _fallback_logged.add(reason)
        logger.info("fusedlm language-model loss: %s -> torch.nn.functional.cross_entropy on a "
                    "float32 copy", reason)
    logits = logits.to(stat_dtype(logits.dtype))
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    if not (z_loss or return_z_loss):
        return loss
    part = torch_z_loss(logits, target, ignore_index, z_loss, reduction)
    return (loss + part, part.detach()) if return_z_loss else loss + part
