"""AdamW step: the custom op ``fusedlm::adamw_step``, which updates a whole list of tensors
in place in one call (multi-tensor). ``fusedlm.optim.AdamW`` drives it."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import reference
from ..backends import OpDispatch
from ._common import FLOAT_DTYPES, check_scalar_tensor, register_extension_kernels

ADAMW_STEP = OpDispatch("adamw_step")
ADAMW_STEP.register("torch")(reference.adamw_step)


def _kernel_supports(*tensor_lists: list[Tensor]) -> str | None:
    for tensors in tensor_lists:
        if not all(map(Tensor.is_contiguous, tensors)):
            return "non-contiguous tensors"
    return None


def _extension_adamw_step(*args, step_tensor: Tensor | None = None, **kwargs) -> None:
    """``fusedlm._C.adamw_step``: its ``step_tensors`` is a list of one-element tensors (here,
    views of ``step_tensor``); None extensions are left out."""
    from .. import _ext

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if step_tensor is not None:
        kwargs["step_tensors"] = list(step_tensor.unbind(0))
    _ext.load().adamw_step(*args, **kwargs)


register_extension_kernels(ADAMW_STEP, "adamw_step", supports=_kernel_supports,
                           call=_extension_adamw_step)


def _triton_supports(*tensor_lists: list[Tensor]) -> str | None:
    """``tensor_lists``: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and (optionally)
    master_params, as the op passes them to ``select``."""
    if len(tensor_lists) > 5 and len(tensor_lists[5]):
        return "the Triton AdamW kernel has no master weights"
    # Non-contiguous tensors are fine: the Triton launcher updates them through contiguous copies.
    for tensors in tensor_lists:
        for t in tensors:
            if t.dtype not in FLOAT_DTYPES:
                return f"{t.dtype} is not supported by the Triton kernels"
    return None


@ADAMW_STEP.register("triton", supports=_triton_supports)
def _triton_adamw_step(*args, **kwargs):
    from ..triton import adamw  # imports triton: only when the backend is used

    return adamw.adamw_step(*args, **kwargs)


def _check_extensions(params: list[Tensor], steps: list[float], lr_tensor: Tensor | None,
                      grad_scale: Tensor | None, found_inf: Tensor | None,
                      step_tensor: Tensor | None) -> None:
    """The tensor extensions, checked alike for every backend (none is read on the host)."""
    if lr_tensor is not None:
        # float32 when the kernels read it on a device; any float dtype on the CPU
        on_device = bool(params) and lr_tensor.device == params[0].device
        check_scalar_tensor(lr_tensor, "lr_tensor", params, allow_cpu=True,
                            float32=on_device and lr_tensor.device.type != "cpu")
    if grad_scale is not None:
        check_scalar_tensor(grad_scale, "grad_scale", params, float32=True)
    if found_inf is not None:
        check_scalar_tensor(found_inf, "found_inf", params, float32=True)
    if step_tensor is not None:
        check_scalar_tensor(step_tensor, "step_tensor", params, numel=len(params), float32=True)
        if len(steps):
            raise ValueError("arguments 'steps' and 'step_tensor' exclude each other; 'steps' "
                             "must be empty when 'step_tensor' is given")


_MASTER_PARAM_DTYPES = (torch.bfloat16, torch.float16)


def _check_master_params(params: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                         master_params: list[Tensor]) -> None:
    """float32 master weights of 16-bit params, checked alike for every backend."""
    if not master_params:
        return
    if len(master_params) != len(params):
        raise ValueError(f"argument 'master_params' has {len(master_params)} tensors but "
                         f"'params' has {len(params)}; it must be empty or have one per param")
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
              "max_exp_avg_sqs": max_exp_avg_sqs}
    for i, (p, m) in enumerate(zip(params, master_params, strict=True)):
        where = f"master_params[{i}]"
        if not isinstance(m, Tensor):
            raise TypeError(f"argument '{where}' must be a torch.Tensor, got {type(m).__name__}")
        if p.dtype not in _MASTER_PARAM_DTYPES:
            raise TypeError(f"argument 'master_params' holds float32 master weights of bfloat16/"
                            f"float16 params, but params[{i}] is {p.dtype}")
        if m.dtype != torch.float32:
            raise TypeError(f"argument '{where}' must be float32, got {m.dtype}")
        if m.shape != p.shape:
            raise ValueError(f"argument '{where}' has shape {list(m.shape)} but params[{i}] has "
                             f"{list(p.shape)}")
        if m.device != p.device:
            raise ValueError(f"argument '{where}' is on {m.device} but params[{i}] is on "
                             f"{p.device}")
        if m.layout != torch.strided:
            raise ValueError(f"argument '{where}' must be dense, got {m.layout}")
        for name, tensors in states.items():
            if i < len(tensors) and tensors[i].dtype != torch.float32:
                raise TypeError(f"with argument 'master_params' the states must be float32; "
                                f"{name}[{i}] is {tensors[i].dtype}")


def _adamw_step_impl(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
    weight_decay, amsgrad, maximize, backend, master_params, lr_tensor=None, grad_scale=None,
    found_inf=None, step_tensor=None,
) -> None:
    """The body of the custom op ``fusedlm::adamw_step`` (see :func:`adamw_step_op`)."""
    _check_extensions(params, steps, lr_tensor, grad_scale, found_inf, step_tensor)
    _check_master_params(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params)
    if not params:
        return
    impl = ADAMW_STEP.select(backend, params[0].device, params, grads, exp_avgs, exp_avg_sqs,
                             max_exp_avg_sqs, master_params)
    # Only when there are masters: the Triton launcher takes no master_params.
    masters = {"master_params": master_params} if master_params else {}
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
         weight_decay, amsgrad, maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
         found_inf=found_inf, step_tensor=step_tensor, **masters)


@torch.library.custom_op(
    "fusedlm::adamw_step",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                  "master_params"),
)
def adamw_step_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, backend: str, master_params: list[Tensor],
    lr_tensor: Tensor | None = None, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None, step_tensor: Tensor | None = None,
) -> None:
    """One AdamW step, torch.optim.AdamW's arithmetic, in place.

    params[i], grads[i]: same shape, float64/float32/float16/bfloat16 (grads in the param's
    dtype); states exp_avgs[i], exp_avg_sqs[i] (and max_exp_avg_sqs[i] when amsgrad, else the
    list is empty): float32 or the param's dtype. steps[i]: param i's step count including
    this step. All tensors on one device; the C++ kernels take contiguous ones only ("auto"
    sends others elsewhere).

    ``master_params``: empty, or float32 master weights of bfloat16/float16 params (one per
    param, same shape and device; the states must then be float32): the update runs in float32
    on the master and the param receives its rounding (``param.copy_(master)``), so updates
    below the param's resolution accumulate. Required (torch.library has no default for a
    tensor list): pass ``[]`` for none. The "triton" backend has no master weights ("auto"
    moves on to the next backend).

    Optional tensors, none of them read on the host (so a step makes the host wait for nothing),
    with the semantics of torch's fused AdamW:

    * ``lr_tensor``: a one-element learning rate replacing ``lr`` (float32 on the params'
      device, or any float dtype on the CPU);
    * ``step_tensor``: (n,) float32 on the params' device, param i's step count including this
      step, replacing ``steps`` (which must then be empty);
    * ``grad_scale``: GradScaler's one-element float32 scale: grads are divided by it in place
      (the unscaled grads stay in ``grads``, as torch's fused AdamW leaves them) and the step
      uses them;
    * ``found_inf``: GradScaler's one-element float32 flag: when nonzero nothing changes
      (params, states, grads). Step counts are the caller's: torch increments them and then
      subtracts ``found_inf``.
    """
    _adamw_step_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                     beta2, eps, weight_decay, amsgrad, maximize, backend, master_params,
                     lr_tensor, grad_scale, found_inf, step_tensor)


@adamw_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, backend, master_params, lr_tensor=None, grad_scale=None,
      found_inf=None, step_tensor=None):
    return None


def adamw_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, backend: str, master_params: list[Tensor],
    lr_tensor: Tensor | None = None, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None, step_tensor: Tensor | None = None,
) -> None:
    """:func:`adamw_step_op` (``torch.ops.fusedlm.adamw_step``): same arguments and effect.

    Eager calls skip the custom-op dispatcher and bump the mutated tensors' version counters in
    one call: the dispatcher's schema handling and per-tensor version bumps cost ~10 us per
    parameter, several times the step of a small model (benchmarks/NOTES.md). Under
    ``torch.compile`` or a dispatch mode (FakeTensorMode, FlopCounterMode, ...) the registered
    op runs, so the step traces and the mode sees it."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        adamw_step_op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                      beta2, eps, weight_decay, amsgrad, maximize, backend, master_params,
                      lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                      step_tensor=step_tensor)
        return
    _adamw_step_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                     beta2, eps, weight_decay, amsgrad, maximize, backend, master_params,
                     lr_tensor, grad_scale, found_inf, step_tensor)
    _bump_versions([*params, *grads, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, *master_params])


def _bump_versions(tensors: list[Tensor]) -> None:
    """Marks ``tensors`` as modified in place, as the dispatcher does for a mutating op (so
    autograd still refuses a backward through a value the step overwrote)."""
    try:
        torch._C._increment_version(tensors)  # one call for the list (torch >= 2.6)
    except TypeError:
        for t in tensors:
            torch._C._increment_version(t)
