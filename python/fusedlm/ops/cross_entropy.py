"""Cross-entropy over class logits: custom ops ``fusedlm::cross_entropy_fwd/bwd`` over (N, V)
logits and int64 targets, their autograd, and the public ``fusedlm.cross_entropy`` (torch's
signature; what the kernels do not take goes to ``torch.nn.functional.cross_entropy``)."""

from __future__ import annotations

import logging

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


def _cross_entropy_fwd(logits, target, ignore_index, label_smoothing, backend):
    impl = CROSS_ENTROPY_FWD.select(backend, logits.device, logits, target)
    with autocast_off(logits.device):
        return impl(logits, target, ignore_index, label_smoothing)


def _cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum, ignore_index,
                       label_smoothing, backend, out=None):
    """dlogits; written into ``out`` when given, which may be the logits themselves (the
    gradient then replaces them: fusedlm.linear_cross_entropy's chunks)."""
    impl = CROSS_ENTROPY_BWD.select(backend, logits.device, grad_loss, logits, target)
    extra = {} if out is None else {"out": out}
    with autocast_off(logits.device):
        return impl(grad_loss, logits, target, row_max, log_sum, ignore_index, label_smoothing,
                    **extra)


@torch.library.custom_op("fusedlm::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V), target (N) int64 -> loss (N), row_max (N) and log_sum (N) (logsumexp =
    row_max + log_sum), float32 (float64 for float64 logits). Rows whose target is
    ignore_index have loss 0."""
    return _cross_entropy_fwd(logits, target, ignore_index, label_smoothing, backend)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, backend):
    loss = logits.new_empty(logits.shape[:1], dtype=stat_dtype(logits.dtype))
    return loss, torch.empty_like(loss), torch.empty_like(loss)


@torch.library.custom_op("fusedlm::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    grad_loss: Tensor, logits: Tensor, target: Tensor, row_max: Tensor, log_sum: Tensor,
    ignore_index: int, label_smoothing: float, backend: str,
) -> Tensor:
    """grad_loss (N) -> dlogits (N, V) in the logits' dtype."""
    return _cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum, ignore_index,
                              label_smoothing, backend)


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, row_max, log_sum, ignore_index, label_smoothing, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, backend = inputs
    _, row_max, log_sum = output
    ctx.save_for_backward(logits, target, row_max, log_sum)
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend
    ctx.mark_non_differentiable(row_max, log_sum)


def _backward(ctx, grad_loss, grad_row_max, grad_log_sum):
    logits, target, row_max, log_sum = ctx.saved_tensors
    eager = getattr(ctx, "eager", False)
    bwd = _cross_entropy_bwd if eager else torch.ops.fusedlm.cross_entropy_bwd
    dlogits = bwd(grad_loss, logits, target, row_max, log_sum, ctx.ignore_index,
                  ctx.label_smoothing, ctx.backend)
    return dlogits, None, None, None, None


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
) -> Tensor:
    """Drop-in for ``torch.nn.functional.cross_entropy``: same signature and meaning of every
    argument, plus ``backend``.

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
    """
    check_backend_name(backend)
    ignore_index = check_int(ignore_index, "ignore_index")
    if size_average is None and reduce is None:  # (the deprecated pair overrides reduction)
        check_reduction(reduction, _REDUCTIONS)
    reason = _why_torchs(backend, input, target, weight, size_average, reduce, reduction,
                         label_smoothing)
    if reason is not None:
        if reason not in _fallback_logged and not torch.compiler.is_compiling():
            _fallback_logged.add(reason)
            logger.info("fusedlm.cross_entropy: %s -> torch.nn.functional.cross_entropy", reason)
        return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                               reduction, label_smoothing)
    loss = _reduced_loss(input, target, ignore_index, reduction, float(label_smoothing),
                         backend)
    return loss.to(_loss_dtype(input))


def _reduced_loss(logits: Tensor, target: Tensor, ignore_index: int, reduction: str,
                  label_smoothing: float, backend: str) -> Tensor:
    """The op's loss, reduced, in its compute dtype (float32, float64 for float64 logits)."""
    # The C++ CPU kernel checks the targets itself, in its loop (~10 us less a call). Under
    # torch.func transforms the reference runs, which gives a bad target's row NaN: vmap has
    # no batching rule for the assert.
    if not under_transform() and (
            torch.compiler.is_compiling()
            or CROSS_ENTROPY_FWD.choose(backend, logits.device, logits, target) != "cpu"):
        _check_targets(target, logits.shape[1], ignore_index)
    fwd = forward_for_call(CROSS_ENTROPY_FWD, backend, _CrossEntropyEager, _cross_entropy_fwd,
                           reference.cross_entropy_fwd, logits)
    loss = fwd(logits, target, ignore_index, label_smoothing, backend)[0]
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":  # over the rows not ignored (0/0 = NaN when all are, as torch)
        return loss.sum() / (target != ignore_index).sum()
    return loss


def language_model_loss(logits: Tensor, target: Tensor, ignore_index: int = -100,
                        reduction: str = "mean", backend: str = "auto") -> Tensor:
    """The cross-entropy of (N, V) logits against (N) int64 targets, reduced by "mean" or
    "sum", as a float32 (float64 for float64 logits) scalar, for training loops:
    ``fusedlm.cross_entropy``'s kernels when a kernel backend serves the call (they compute
    in float32 from logits of any width), else torch's on a float32 copy, which is what
    eager training code writes (``logits.float()``, as transformers' losses do), so
    bfloat16 logits never give a bfloat16-rounded loss.

    Unlike ``fusedlm.cross_entropy``, a backend named here or by FUSEDLM_BACKEND that cannot
    serve the call (``cuda``: there is no CUDA C++ cross-entropy; Triton serves CUDA tensors)
    does not raise: the loss then takes torch's path, logged once, so a model run with
    FUSEDLM_BACKEND=cuda still trains."""
    check_backend_name(backend)
    check_reduction(reduction, ("mean", "sum"))
    ignore_index = check_int(ignore_index, "ignore_index")
    reason = _why_torchs(backend, logits, target, None, None, None, reduction, 0.0)
    if reason is None and not torch.compiler.is_compiling():
        requested = requested_backend(backend)
        if requested != "auto":
            why = CROSS_ENTROPY_FWD._why_not(requested, logits.device, (logits, target))
            reason = None if why is None else f"backend {requested!r} cannot serve it: {why}"
    if reason is None:
        return _reduced_loss(logits, target, ignore_index, reduction, 0.0, backend)
    if reason not in _fallback_logged:
        _fallback_logged.add(reason)
        logger.info("fusedlm language-model loss: %s -> torch.nn.functional.cross_entropy on a "
                    "float32 copy", reason)
    return F.cross_entropy(logits.to(stat_dtype(logits.dtype)), target, ignore_index=ignore_index,
                           reduction=reduction)
