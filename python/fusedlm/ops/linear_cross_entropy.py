"""A linear layer and the cross-entropy of its output, without the (N, V) logits: custom ops
``fusedlm::linear_cross_entropy_fwd/bwd``, their autograd, and the public
``fusedlm.linear_cross_entropy``.

Why: a language model's head maps (N, C) hidden states to (N, V) logits. For GPT-2's
vocabulary and 16k tokens those are 1.6 GB in bfloat16, their gradient as much again, and
eager code adds float32 copies (3.3 GB each) for the loss. Llama 3's vocabulary (128256) makes
that 2.5x worse. Here the rows go through in chunks: each chunk's logits are computed, turned
into the loss and, when a gradient will be asked for, into its own gradient (written over the
logits by the cross-entropy backward) and from there into the gradients of the hidden states,
weight and bias, and dropped. The peak is one chunk's logits, whatever N is, plus the
float32 gradient sums.

The gradients are computed in the forward (with "mean"/"sum", whose gradient with respect to
each row's loss is known then), so the head costs three matmuls, as unfused, rather than four;
backward only scales them by the incoming gradient. With ``reduction="none"`` the incoming
gradient differs per row, so backward recomputes each chunk's logits (a fourth matmul).

Matmuls are torch's (cuBLAS, MKL); the cross-entropy of each chunk runs on the backend chosen
for ``fusedlm.cross_entropy`` (its kernels read the chunk's logits at their own width).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import check_backend_name, requested_backend
from ._common import (
    autocast_inputs,
    autocast_off,
    check_float_tensor,
    check_int,
    check_reduction,
    check_same_device,
    describe,
    eager_autograd_function,
    stat_dtype,
    under_transform,
)
from .cross_entropy import (
    CROSS_ENTROPY_FWD,
    _check_targets,
    _cross_entropy_bwd,
    _cross_entropy_fwd,
    check_z_loss,
    language_model_loss,
    z_loss_part,
)

# Logits per chunk by default: 2**28 elements, 512 MiB in bfloat16 (their gradient is written
# over them). Fewer rows per chunk save memory but cost time: each chunk adds its (V, C) share
# of the weight gradient into a float32 sum, ~0.6 GB of traffic for GPT-2's head on a GPU
# (a separate float32 product, then the sum), against ~1.6 ms of matmuls for a 4096-row chunk
# at 16k tokens; and small matmuls run below peak. (benchmarks/NOTES.md, 2026-12-05.)
DEFAULT_CHUNK_ELEMENTS = 1 << 28

_REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(N: int, V: int) -> int:
    """Rows per chunk: the largest power of two (a multiple of the matmuls' tiles) whose
    logits stay within DEFAULT_CHUNK_ELEMENTS, and at most N."""
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(V, 1))
    return max(1, min(N, 1 << (rows.bit_length() - 1)))


def _product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b in ``dtype`` (float32/float64) without rounding it to a's lower precision first:
    on CUDA cuBLAS writes float16/bfloat16 products in float32 (``out_dtype``); elsewhere the
    operands are upcast."""
    if a.dtype == dtype:
        return a @ b
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=dtype)
    return a.to(dtype) @ b.to(dtype)


def _chunk_gradients(dlogits: Tensor, rows: Tensor, weight: Tensor, grads: list, start: int,
                     needs: tuple[bool, bool, bool]) -> None:
    """Adds one chunk's share to ``grads`` = [grad_input (N, C), grad_weight (V, C),
    grad_bias (V)] (float32/float64 sums), from dlogits (n, V) of the chunk's rows (n, C),
    which start at row ``start``."""
    dtype = grads[0].dtype if needs[0] else stat_dtype(rows.dtype)
    if needs[0]:  # each row's gradient is its own
        grads[0][start:start + dlogits.shape[0]] = _product(dlogits, weight, dtype)
    if needs[1]:
        if grads[1] is not None and dlogits.dtype == dtype:  # summed in place: no (V, C) temporary
            grads[1].addmm_(dlogits.t(), rows)
        else:
            product = _product(dlogits.t(), rows, dtype)
            grads[1] = product if grads[1] is None else grads[1].add_(product)
    if needs[2]:
        bias_part = dlogits.sum(dim=0, dtype=dtype)
        grads[2] = bias_part if grads[2] is None else grads[2].add_(bias_part)


def _new_gradients(input: Tensor, needs: tuple[bool, bool, bool]) -> list:
    """The sums ``_chunk_gradients`` fills: grad_input (N, C) allocated, the others None until
    the first chunk."""
    dtype = stat_dtype(input.dtype)
    return [input.new_empty(input.shape, dtype=dtype) if needs[0] else None, None, None]


def _gradient_sums(grads: list, input: Tensor, weight: Tensor, bias: Tensor | None,
                   needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The three sums in float32/float64: zeros for one asked for over no rows, an empty tensor
    for each not asked for."""
    dtype = stat_dtype(input.dtype)
    return tuple(
        input.new_empty(0, dtype=dtype) if not need
        else grad if grad is not None else like.new_zeros(like.shape, dtype=dtype)
        for grad, need, like in zip(grads, needs, (input, weight, bias), strict=True))


def _capped_logits(rows: Tensor, weight: Tensor, bias: Tensor | None,
                   softcap: float) -> tuple[Tensor, Tensor | None]:
    """(a chunk's logits (n, V) in the input's dtype, as unfused, soft-capped when ``softcap``:
    ``softcap * tanh(z / softcap)``, rounded op by op as Gemma 2's code rounds it; and then
    tanh(z / softcap), whose 1 - tanh^2 the gradient needs, else None)."""
    logits = F.linear(rows, weight, bias)
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _uncap_gradient(dlogits: Tensor, tanh: Tensor | None) -> Tensor:
    """The gradient with respect to the logits before the soft-capping: times 1 - tanh^2
    (``tanh``'s buffer is reused)."""
    if tanh is None:
        return dlogits
    return dlogits.mul_(tanh.square_().neg_().add_(1))


def _linear_cross_entropy_fwd(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
    label_smoothing: float, reduction: str, chunk_size: int, grad_input: bool,
    grad_weight: bool, grad_bias: bool, backend: str, softcap: float = 0.0, z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op's forward; see ``linear_cross_entropy_fwd``."""
    N = input.shape[0]
    dtype = stat_dtype(input.dtype)
    losses = input.new_empty(N, dtype=dtype)
    row_max, log_sum = torch.empty_like(losses), torch.empty_like(losses)
    needs = (grad_input, grad_weight, grad_bias and bias is not None)
    if reduction == "none":
        needs = (False, False, False)
    grads = _new_gradients(input, needs)
    count = (target != ignore_index).sum() if reduction == "mean" else None
    # d(loss)/d(each row's loss): 1, or 1/count for the mean (count stays on the device)
    row_grad = losses.new_ones(()) if count is None else 1.0 / count.to(dtype)
    with autocast_off(input.device):
        for start in range(0, N, chunk_size):
            rows, rows_target = input[start:start + chunk_size], target[start:start + chunk_size]
            n = rows.shape[0]
            logits, tanh = _capped_logits(rows, weight, bias, softcap)  # (n, V)
            part = _cross_entropy_fwd(logits, rows_target, ignore_index, label_smoothing, backend,
                                      z_loss)
            for out, value in zip((losses, row_max, log_sum), part, strict=True):
                out[start:start + n] = value
            if any(needs):  # the gradient replaces the logits: one (n, V) buffer a chunk
                dlogits = _cross_entropy_bwd(row_grad.expand(n), logits, rows_target, part[1],
                                             part[2], ignore_index, label_smoothing, backend,
                                             out=logits, z_loss=z_loss)
                _chunk_gradients(_uncap_gradient(dlogits, tanh), rows, weight, grads, start,
                                 needs)
    if reduction == "sum":
        loss = losses.sum()
    elif reduction == "mean":  # 0/0 = NaN when every row is ignored, as torch
        loss = losses.sum() / count
    else:
        loss = losses
    return (loss, row_max, log_sum) + _gradient_sums(grads, input, weight, bias, needs)


def _linear_cross_entropy_bwd(
    grad_loss: Tensor, input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
    row_max: Tensor, log_sum: Tensor, ignore_index: int, label_smoothing: float,
    chunk_size: int, grad_input: bool, grad_weight: bool, grad_bias: bool, backend: str,
    softcap: float = 0.0, z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op's backward for ``reduction="none"``; see ``linear_cross_entropy_bwd``."""
    needs = (grad_input, grad_weight, grad_bias and bias is not None)
    grads = _new_gradients(input, needs)
    with autocast_off(input.device):
        for start in range(0, input.shape[0], chunk_size):
            rows, rows_target = input[start:start + chunk_size], target[start:start + chunk_size]
            stop = start + rows.shape[0]
            logits, tanh = _capped_logits(rows, weight, bias, softcap)
            dlogits = _cross_entropy_bwd(grad_loss[start:stop], logits, rows_target,
                                         row_max[start:stop], log_sum[start:stop], ignore_index,
                                         label_smoothing, backend, out=logits, z_loss=z_loss)
            _chunk_gradients(_uncap_gradient(dlogits, tanh), rows, weight, grads, start, needs)
    sums = _gradient_sums(grads, input, weight, bias, needs)
    return tuple(s.to(t.dtype) if need else s
                 for s, t, need in zip(sums, (input, weight, bias), needs, strict=True))


@torch.library.custom_op("fusedlm::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
    label_smoothing: float, reduction: str, chunk_size: int, grad_input: bool,
    grad_weight: bool, grad_bias: bool, backend: str, softcap: float = 0.0, z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """input (N, C), weight (V, C), bias (V) or None, all one float dtype; target (N) int64 ->
    (loss, row_max (N), log_sum (N), grad_input (N, C), grad_weight (V, C), grad_bias (V)).

    loss is the cross-entropy of ``input @ weight.T + bias`` against target, reduced by
    ``reduction`` (a scalar, or (N) for "none"), in float32 (float64 for float64 input);
    row_max + log_sum is each row's logsumexp. With "mean"/"sum", the gradients of the loss
    that ``grad_input``/``grad_weight``/``grad_bias`` ask for, in float32 (float64), so that
    backward's scaling rounds them to the tensors' dtypes once; every other one, and all
    three with "none", come back empty (0 elements). ``softcap`` > 0: the logits z are
    ``softcap * tanh(z / softcap)`` (Gemma 2's final soft-capping). ``z_loss``: each row's
    loss includes ``z_loss * logsumexp**2``."""
    return _linear_cross_entropy_fwd(input, weight, bias, target, ignore_index, label_smoothing,
                                     reduction, chunk_size, grad_input, grad_weight, grad_bias,
                                     backend, softcap, z_loss)


@linear_cross_entropy_fwd.register_fake
def _(input, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_size,
      grad_input, grad_weight, grad_bias, backend, softcap=0.0, z_loss=0.0):
    dtype = stat_dtype(input.dtype)
    row_max = input.new_empty(input.shape[:1], dtype=dtype)
    loss = torch.empty_like(row_max) if reduction == "none" else row_max.new_empty(())
    needs = (grad_input, grad_weight, grad_bias and bias is not None)
    grads = tuple(
        t.new_empty(t.shape, dtype=dtype) if need and reduction != "none"
        else input.new_empty(0, dtype=dtype)
        for t, need in zip((input, weight, bias), needs, strict=True))
    return (loss, row_max, torch.empty_like(row_max)) + grads


@torch.library.custom_op("fusedlm::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    grad_loss: Tensor, input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
    row_max: Tensor, log_sum: Tensor, ignore_index: int, label_smoothing: float,
    chunk_size: int, grad_input: bool, grad_weight: bool, grad_bias: bool, backend: str,
    softcap: float = 0.0, z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_loss (N) of the unreduced loss -> (grad_input (N, C), grad_weight (V, C),
    grad_bias (V)), each empty where not asked for; recomputes each chunk's logits."""
    return _linear_cross_entropy_bwd(grad_loss, input, weight, bias, target, row_max, log_sum,
                                     ignore_index, label_smoothing, chunk_size, grad_input,
                                     grad_weight, grad_bias, backend, softcap, z_loss)


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, input, weight, bias, target, row_max, log_sum, ignore_index, label_smoothing,
      chunk_size, grad_input, grad_weight, grad_bias, backend, softcap=0.0, z_loss=0.0):
    empty = input.new_empty(0)
    return (
        torch.empty_like(input) if grad_input else empty,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else empty,
        torch.empty_like(bias) if grad_bias and bias is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    (input, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_size,
     grad_input, grad_weight, grad_bias, backend, *softcap_z_loss) = inputs
    _, row_max, log_sum, *grads = output
    ctx.input_count = len(inputs)  # (softcap and z_loss may be left to their defaults)
    ctx.reduction = reduction
    ctx.needs = (grad_input, grad_weight, grad_bias and bias is not None)
    ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
    if reduction == "none":  # backward recomputes the logits
        ctx.save_for_backward(input, weight, bias, target, row_max, log_sum)
        ctx.arguments = (ignore_index, label_smoothing, chunk_size, backend, *softcap_z_loss)
    else:
        ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(row_max, log_sum, *grads)


def _backward(ctx, grad_loss, *unused_grads):
    needs = ctx.needs
    if ctx.reduction == "none":
        input, weight, bias, target, row_max, log_sum = ctx.saved_tensors
        ignore_index, label_smoothing, chunk_size, backend, *softcap_z_loss = ctx.arguments
        bwd = (_linear_cross_entropy_bwd if getattr(ctx, "eager", False)
               else torch.ops.fusedlm.linear_cross_entropy_bwd)
        grads = bwd(grad_loss, input, weight, bias, target, row_max, log_sum, ignore_index,
                    label_smoothing, chunk_size, *needs, backend, *softcap_z_loss)
    else:  # the forward's gradients are for a loss gradient of 1: scale, round once
        grads = [(g * grad_loss).to(dtype) if need else None
                 for g, need, dtype in zip(ctx.saved_tensors, needs, ctx.dtypes, strict=True)]
    grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return (*grads, *[None] * (ctx.input_count - 3))


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
_LinearCrossEntropyEager = eager_autograd_function(
    "_LinearCrossEntropyEager", _linear_cross_entropy_fwd, _setup_context, _backward
)


# ---- public API -----------------------------------------------------------------------------

def _check_arguments(input, weight, target, bias, reduction, label_smoothing, chunk_size):
    check_float_tensor(input, "input")
    check_float_tensor(weight, "weight")
    if input.dim() < 1:
        raise ValueError("argument 'input' must have at least 1 dimension (..., C), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"argument 'weight' must be 2-D (V, C), got shape {list(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"argument 'weight' has {weight.shape[1]} input features (V, C) but "
                         f"'input' has {input.shape[-1]} (its last dimension)")
    if weight.shape[0] == 0:
        raise ValueError("argument 'weight' must have at least one class (V > 0), got 0 rows")
    check_same_device(weight, "weight", input, "input")
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"argument 'bias' must have shape ({weight.shape[0]},) (V), got "
                             f"{list(bias.shape)}")
        check_same_device(bias, "bias", input, "input")
    if not isinstance(target, Tensor):
        raise TypeError(f"argument 'target' must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"argument 'target' must be int64 class indices, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"argument 'target' must have shape {list(input.shape[:-1])} (the "
                         f"input's but the last), got {list(target.shape)}")
    check_same_device(target, "target", input, "input")
    check_reduction(reduction, _REDUCTIONS)
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"argument 'label_smoothing' must be a number in [0, 1], got "
                         f"{describe(label_smoothing)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"argument 'chunk_size' must be a positive int (rows per chunk) or "
                         f"None, got {describe(chunk_size)}")


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the logits.

    input (..., C) and weight (V, C) (and bias (V)) in one float dtype, or any under autocast,
    which casts them as it does for ``F.linear``; target (...) int64 class indices in [0, V)
    or ``ignore_index``. ``reduction`` "mean" (over the rows not ignored), "sum" or "none"
    (the loss of each row, shaped like target); ``label_smoothing`` as in torch.

    The rows go through ``chunk_size`` at a time (default: as many as keep a chunk's logits
    within 2**28 elements): peak memory is one chunk's logits (their gradient is written over
    them) and the float32 gradient sums, not N x V.
    The loss is float32 (float64 for float64 input), computed from the logits at their own
    width, as ``fusedlm.cross_entropy`` does; gradients come back in each tensor's dtype, the
    weight's summed over chunks in float32. ``backend`` picks the cross-entropy kernels
    (``fusedlm.cross_entropy``'s); the matmuls are torch's.

    ``softcap``: soft-cap the logits first, z -> ``softcap * tanh(z / softcap)`` (Gemma 2's
    ``final_logit_softcapping``), computed in the logits' dtype op by op, as its code does.

    ``z_loss``: each row's loss includes ``z_loss * logsumexp**2`` (PaLM's z-loss), in the
    cross-entropy kernels; ``return_z_loss=True`` returns ``(loss, z_part)``, z_part being that
    term reduced as the loss is and detached, for logging (see ``fusedlm.cross_entropy``).

    With "mean"/"sum" and grad mode on, the gradients are computed in the forward (so the
    backward is nearly free): a loss computed for evaluation only should be computed under
    ``torch.no_grad()``, or it pays for two matmuls it never uses.
    """
    check_backend_name(backend)
    _check_arguments(input, weight, target, bias, reduction, label_smoothing, chunk_size)
    ignore_index = check_int(ignore_index, "ignore_index")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"argument 'softcap' must be a positive finite number or None, got "
                         f"{describe(softcap)}")
    softcap = float(softcap or 0.0)
    z_loss = check_z_loss(z_loss, return_z_loss)
    if bias is None:
        input, weight = autocast_inputs(input, weight)
    else:
        input, weight, bias = autocast_inputs(input, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"argument '{name}' must have the dtype of 'input' ({input.dtype}, "
                            f"after any autocast cast), got {t.dtype}")
    shape = target.shape
    input, target = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    N, V = input.shape[0], weight.shape[0]
    if under_transform():  # torch.func / forward-mode AD: the composition of reference ops
        if return_z_loss:
            raise ValueError("fusedlm.linear_cross_entropy: return_z_loss=True is not "
                             "supported under torch.func transforms and forward-mode AD")
        loss = reference.linear_cross_entropy(input, weight, bias, target, ignore_index,
                                              float(label_smoothing), reduction, softcap, z_loss)
        return loss.view(shape) if reduction == "none" else loss
    _check_targets(target, V, ignore_index, "fusedlm.linear_cross_entropy")
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, V)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (input, weight, bias)]
    arguments = (input, weight, bias, target, ignore_index, float(label_smoothing),
                 reduction, max(1, chunk), *needs, backend, softcap, z_loss)
    if torch.compiler.is_compiling():
        loss, row_max, log_sum, *_ = torch.ops.fusedlm.linear_cross_entropy_fwd(*arguments)
    elif any(needs):
        loss, row_max, log_sum, *_ = _LinearCrossEntropyEager.apply(*arguments)
    else:
        loss, row_max, log_sum, *_ = _linear_cross_entropy_fwd(*arguments)
    if return_z_loss:
        part = z_loss_part(row_max, log_sum, target, ignore_index, z_loss, reduction)
        return (loss.view(shape), part.view(shape)) if reduction == "none" else (loss, part)
    return loss.view(shape) if reduction == "none" else loss


def language_model_head_loss(hidden: Tensor, weight: Tensor, target: Tensor,
                             ignore_index: int = -100, backend: str = "auto",
                             softcap: float | None = None, z_loss: float = 0.0,
                             return_z_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The mean cross-entropy of a language model's head, ``hidden @ weight.T`` (hidden (N, C),
    weight (V, C)), against target (N), as a float32 (float64) scalar, for training loops:
    ``linear_cross_entropy`` (no logits; ``softcap``, ``z_loss`` and ``return_z_loss`` as its:
    the logits soft-capped first, the z-loss added to each row's loss). A
    backend named here or by FUSEDLM_BACKEND whose cross-entropy kernels cannot serve the
    call (``cuda``: there is no CUDA C++ cross-entropy) does not raise: the head then makes
    the (capped) logits and takes ``language_model_loss``'s path (torch's, logged once), so a
    model run with FUSEDLM_BACKEND=cuda still trains."""
    check_backend_name(backend)
    requested = requested_backend(backend)
    if (requested != "auto" and not torch.compiler.is_compiling()
            and CROSS_ENTROPY_FWD._why_not(requested, hidden.device, ()) is not None):
        logits = F.linear(hidden, weight)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return language_model_loss(logits, target, ignore_index, backend=backend, z_loss=z_loss,
                                   return_z_loss=return_z_loss)
    return linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index,
                                backend=backend, softcap=softcap, z_loss=z_loss,
                                return_z_loss=return_z_loss)
