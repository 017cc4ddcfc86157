"""Argument checks shared by the public functions in ``fusedlm.ops``: every bad input gets an
exception that names the argument and says what is wrong."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator

import torch
from torch import Tensor

from ..backends import BackendNotSupportedError, OpDispatch, requested_backend

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def describe(value: object) -> str:
    """What an error message says it got: a tensor by its dtype and shape (its repr runs to
    pages), anything else by its repr, cut to one short line."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    if len(text) <= 80 and "\n" not in text:
        return text
    return f"{text.splitlines()[0][:60]}... (a {type(value).__name__})"


_NO_CONTEXT = contextlib.nullcontext()
# Whether autocast is on for any device type, in one call (torch 2.4+; else assume it may be).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_off(device: torch.device):
    """A context that keeps autocast from recasting what an op's implementation runs: the
    kernels keep their own precision, and the torch reference's matmuls and norms would
    otherwise run in autocast's dtype (wrong results and a logsumexp dtype that is not the
    registered fake's). A no-op, and free, when autocast is off."""
    # (one cheap check for every device type first: `device.type` alone costs ~0.3 us)
    if _any_autocast() and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return _NO_CONTEXT


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as autocast hands them to an op on its lower-precision list (torch's SDPA is
    one): under autocast, floating tensors other than float64 cast to autocast's dtype."""
    if not _any_autocast():
        return tensors
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def check_float_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"argument '{name}' must be float64, float32, float16 or bfloat16, got {t.dtype}"
        )
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"argument '{name}' must be a dense (strided) tensor, got {t.layout}")
    return t


def check_same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
            "all tensors must be on one device"
        )


def check_finite_float(value: object, name: str, minimum: float | None = None) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"argument '{name}' must be a number or a 1-element tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"argument '{name}' must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"argument '{name}' must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"argument '{name}' must be >= {minimum}, got {value}")
    return value


def check_int(value: object, name: str) -> int:
    """An int argument as torch's int arguments take it (a Python or numpy int, a one-element
    integer tensor), within int64."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"argument '{name}' must be an int, got {type(value).__name__}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"argument '{name}' must fit in int64, got {value}")
    return value


def check_positive_int(value: object, name: str, owner: str = "argument",
                       optional: bool = False) -> int | None:
    """A size or count (a layer's width, a head count): a positive int, or None when
    ``optional``. ValueError otherwise, naming ``owner`` 'name'."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner} '{name}' must be a positive integer"
                         f"{' or None' if optional else ''}, got {describe(value)}")
    return int(value)


def check_reduction(reduction: object, allowed: tuple[str, ...]) -> str:
    """ValueError for any other value, str or not, as torch's losses raise."""
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"argument 'reduction' must be one of {allowed}, "
                         f"got {describe(reduction)}")
    return reduction


def check_scalar_tensor(t, name: str, params: list[Tensor], numel: int = 1,
                        allow_cpu: bool = False, float32: bool = False) -> None:
    """A scalar-like tensor argument: ``numel`` elements (one, or (numel,) when numel != 1),
    dense, on the params' device (or the CPU when ``allow_cpu``), float32 when ``float32``
    (else any float dtype). Used by the AdamW op's lr/step/GradScaler tensors."""
    if not isinstance(t, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != numel or (numel != 1 and t.dim() != 1):
        shape = "a one-element tensor" if numel == 1 else f"of shape ({numel},)"
        raise ValueError(f"argument '{name}' must be {shape}, got shape {list(t.shape)}")
    if t.layout != torch.strided:
        raise ValueError(f"argument '{name}' must be dense, got {t.layout}")
    if params and t.device != params[0].device and not (allow_cpu and t.device.type == "cpu"):
        raise ValueError(f"argument '{name}' is on {t.device} but must be on "
                         f"{params[0].device}" + (" (or the CPU)" if allow_cpu else ""))
    if float32 and t.dtype != torch.float32:
        raise TypeError(f"argument '{name}' must be float32, got {t.dtype}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"argument '{name}' must be a floating-point tensor, got {t.dtype}")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics (mean, rstd, lse) the kernels return for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_extension_kernels(dispatch, entry_point: str, supports=None, call=None) -> None:
    """Register ``fusedlm._C.<entry_point>`` as the ``cpu`` and ``cuda`` implementations of
    ``dispatch`` (the extension dispatches on the tensors' device). The ``cuda`` one serves
    only when this build has a CUDA kernel for the op (``fusedlm._C.cuda_ops()``). ``call``
    replaces the plain forwarding to the entry point (to adapt arguments)."""
    from .. import _ext

    if call is None:
        def call(*args, **kwargs):
            return getattr(_ext.load(), entry_point)(*args, **kwargs)

    def cuda_supports(*args) -> str | None:
        if entry_point not in _cuda_entry_points(_ext.load()):
            return f"this build of fusedlm._C has no CUDA kernel for {entry_point}"
        return supports(*args) if supports is not None else None

    dispatch.register("cpu", supports=supports)(call)
    dispatch.register("cuda", supports=cuda_supports)(call)


@functools.cache
def _cuda_entry_points(module) -> frozenset[str]:
    """``module.cuda_ops()`` of a loaded extension, asked once (it is asked on every call)."""
    return frozenset(module.cuda_ops())


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call on ``tensors`` must go through the op's ``autograd.Function``: grad mode
    is on and one of them requires grad. When not (inference, ``torch.no_grad()``), the public
    functions call the forward implementation directly: the ``autograd.Function`` costs ~10 us
    a call there for nothing (benchmarks/call_overhead.py)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def under_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jvp, ...) or a forward-mode AD
    dual level is active. The kernels have no batching or forward-mode rules (their
    ``autograd.Function`` would refuse the call), so the public functions then run the torch
    reference, whose ops compose with every transform."""
    # Should these torch internals move: a dual level is then assumed open (the kernels would
    # silently drop tangents; the reference is slow but right), and no functorch transform
    # active (a kernel handed a batched tensor fails loudly). tests/ops check both in eager mode.
    # Under torch.compile the answer is False: Dynamo's trace of peek_interpreter_stack is
    # never None, which sent compiled calls to the reference (the graph records our custom
    # op, as forward_for_call does, and torch.compile of a transform is torch's to handle).
    if torch.compiler.is_compiling():
        return False
    if getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:
        return True
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def reference_only(name: str, backend: str, why: str) -> None:
    """For a call only the torch reference can serve (``why`` says why): raises, as
    ``OpDispatch.select`` does, if a kernel backend is named by the caller or by
    ``FUSEDLM_BACKEND``; else records the choice of ``fusedlm.<name>``'s dispatch."""
    requested = requested_backend(backend)
    if requested not in ("auto", "torch"):
        source = "argument 'backend'" if backend != "auto" else "FUSEDLM_BACKEND"
        raise BackendNotSupportedError(
            f"fusedlm.{name}: {source} asks for backend {requested!r}, which cannot serve this "
            f"call: {why}")
    OpDispatch.last_choice[name] = "torch"


def transform_forward(dispatch, backend: str, reference_forward, backend_index: int = -1):
    """The forward to run under a transform (see ``under_transform``): ``reference_forward``
    (the op's arguments less ``backend``, at ``backend_index`` of them). A kernel backend
    named by the caller or by ``FUSEDLM_BACKEND`` cannot serve the call and raises."""
    reference_only(dispatch.name, backend,
                   "under torch.func transforms (vmap, grad, jacrev, jvp) and forward-mode AD only "
                   "the 'torch' backend runs (the kernels have no batching or forward-mode rules)")

    def forward(*args):
        arguments = list(args)
        del arguments[backend_index]
        return reference_forward(*arguments)

    return forward


def forward_for_call(dispatch, backend: str, function, forward_impl, reference_forward,
                     *tensors: Tensor | None, backend_index: int = -1):
    """The forward a public function runs for this call, each taking the op's arguments:
    under ``torch.compile`` the registered custom op ``torch.ops.fusedlm.<dispatch.name>`` (what
    the graph records); under a ``torch.func`` transform or forward-mode AD the torch reference
    (see ``under_transform``); in eager mode ``function.apply`` (the op's ``autograd.Function``)
    when ``tensors`` need autograd, else ``forward_impl`` directly."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fusedlm, dispatch.name)
    if under_transform():
        return transform_forward(dispatch, backend, reference_forward, backend_index)
    return function.apply if needs_autograd(*tensors) else forward_impl


def runs_eager_function(forward, function) -> bool:
    """Whether ``forward`` (from ``forward_for_call``) is the op's eager ``autograd.Function``
    (never under ``torch.compile``, which records the custom op instead). The compile test
    comes first: Dynamo cannot compare ``function.apply`` and would break the graph."""
    return not torch.compiler.is_compiling() and forward == function.apply


def extension_autograd(forward_dispatch, backward_dispatch, backend: str, device: torch.device,
                       forward_args: tuple, backward_args: tuple):
    """The loaded extension, when an eager call that needs autograd runs both passes on one of
    its backends (cpu, cuda): the public functions then call its C++ autograd entry point
    (``fusedlm._C.<op>_autograd``), whose backward runs without a Python callback; else None
    (the op's Python ``autograd.Function``). ``backward_args`` stand in for the backward's
    arguments (the gradient as a tensor shaped like the output)."""
    choice = forward_dispatch.choose(backend, device, *forward_args)
    if choice not in ("cpu", "cuda"):
        return None
    if backward_dispatch._why_not(choice, device, backward_args) is not None:
        return None
    OpDispatch.last_choice[backward_dispatch.name] = choice  # what the node's backward runs
    from .. import _ext

    return _ext.load()


def eager_autograd_function(name: str, forward_impl, setup_context, backward):
    """An ``autograd.Function`` that runs an op's implementation directly, with the same
    ``setup_context``/``backward`` as its custom op (``ctx.eager`` is True, so ``backward`` calls
    the backward implementation directly too).

    Why: a ``torch.library.custom_op`` with autograd costs ~350 us of Python dispatch per
    forward+backward on a small input, 3.5x torch's own LayerNorm (benchmarks/NOTES.md); this
    path costs about half. The public functions use it in eager mode and the custom op under
    ``torch.compile`` (``torch.compiler.is_compiling()``), which needs the registered op."""

    def forward(ctx, *inputs):
        ctx.eager = True
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # The kernels' gradients are not differentiable again: with create_graph=True (grad mode on
    # in backward) once_differentiable makes a second backward raise; without it, its wrapper
    # (~10 us a call) has nothing to do, so it is skipped.
    backward_once = torch.autograd.function.once_differentiable(backward)

    def backward_fast(ctx, *grads):
        return backward_once(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward_fast),
    })
