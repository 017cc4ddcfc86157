"""AdamW step: the custom op ``fusedlm::adamw_step``, which updates a whole list of tensors
in place in one call (multi-tensor). ``fusedlm.optim.AdamW`` drives it."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpDispatch
from ._common import FLOAT_DTYPES, register_extension_kernels

ADAMW_STEP = OpDispatch("adamw_step")
ADAMW_STEP.register("torch")(reference.adamw_step)


def _kernel_supports(*tensor_lists: list[Tensor]) -> str | None:
    for tensors in tensor_lists:
        if not all(t.is_contiguous() for t in tensors):
            return "non-contiguous tensors"
    return None


register_extension_kernels(ADAMW_STEP, "adamw_step", supports=_kernel_supports)


def _triton_supports(*tensor_lists: list[Tensor]) -> str | None:
    # Non-contiguous tensors are fine: the Triton launcher updates them through contiguous copies.
    for tensors in tensor_lists:
        for t in tensors:
            if t.dtype not in FLOAT_DTYPES:
                return f"{t.dtype} is not supported by the Triton kernels"
    return None


@ADAMW_STEP.register("triton", supports=_triton_supports)
def _triton_adamw_step(*args):
    from ..triton import adamw  # imports triton: only when the backend is used

    return adamw.adamw_step(*args)


@torch.library.custom_op(
    "fusedlm::adamw_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
)
def adamw_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, backend: str,
) -> None:
    """One AdamW step, torch.optim.AdamW's arithmetic, in place.

    params[i], grads[i]: same shape, float64/float32/float16/bfloat16 (grads in the param's
    dtype); states exp_avgs[i], exp_avg_sqs[i] (and max_exp_avg_sqs[i] when amsgrad, else the
    list is empty): float32 or the param's dtype. steps[i]: param i's step count including
    this step. All tensors contiguous and on one device."""
    if not params:
        return
    impl = ADAMW_STEP.select(backend, params[0].device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
         weight_decay, amsgrad, maximize)


@adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, backend):
    return None
