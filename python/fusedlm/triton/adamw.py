"""AdamW step in Triton: a whole list of tensors updated in one launch per dtype group.

Entry point ``adamw_step`` (the ``"triton"`` backend of ``fusedlm.ops.adamw``) has
:func:`fusedlm.reference.adamw_step`'s signature and semantics, which are torch.optim.AdamW's:
decoupled weight decay, bias correction with per-tensor step counts, amsgrad, maximize.

Multi-tensor scheme: tensors are grouped by (param, grad, state) dtypes; each group is one
launch over a device table of the tensors' addresses (int64 ``data_ptr()``s, cast in-kernel with
``.to(tl.pointer_type(...))``) and sizes, plus a chunk table mapping program id -> (tensor,
chunk): each program updates CHUNK elements of one tensor. The tables depend only on the
tensors' addresses and sizes, so they are built once and cached; a steady-state step does no
host-to-device copy when every tensor of a group has the same step count (the usual case: the
bias corrections go in as scalar arguments). Different step counts (e.g. parameters added to
the optimizer later) add a small (2, T) float64 table of bias corrections per step.

Extensions (keyword-only, the semantics of ``fusedlm._C.adamw_step``): ``lr_tensor``, a
one-element learning rate read in the kernel (a CPU one is read on the host); ``step_tensor``,
the (n,) step counts on the device, replacing ``steps`` (the bias corrections are then computed
in the kernel); GradScaler's ``grad_scale`` (grads divided by it in the kernel, the unscaled
grads stored back, as torch's fused AdamW does) and ``found_inf`` (nonzero: every program
returns at once, nothing changes). None of them makes the host wait for the device.

Arithmetic runs in float32 (float64 for float64 params) with IEEE-rounded sqrt and division,
in torch's order of operations, so float32 results match torch's within a few ulps. The scalars
(lr * weight_decay, lr / bias correction, ...) are computed in float64 in the kernel, then
rounded once to the compute dtype, as torch rounds its Python scalars.
"""

from __future__ import annotations

import collections
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._common import check_scalar_tensor
from .interpreter_fixes import patch_interpreter
from .launch import LAUNCH_OPTIONS, compute_type, device_context
from .norm import _INTERPRETED

# Elements per program (one chunk of one tensor), walked BLOCK at a time. 2048 elements over 4
# warps = 16 per thread: four 128-bit accesses per float32 tensor.
CHUNK = 32768
BLOCK = 2048
NUM_WARPS = 4
# Cached (pointer, chunk) tables: one entry per distinct set of tensors (param groups x dtype
# groups of the live optimizers).
TABLE_CACHE_SIZE = 64

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {
    torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32, torch.float64: tl.float64,
}

if _INTERPRETED:
    patch_interpreter()


# ---- kernel ---------------------------------------------------------------------------------


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, idx, end,
    decay, lerp_weight, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, scale,
    COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASKED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """One BLOCK of the update; MASKED only for the block that passes the tensor's end (the
    unmasked accesses of full blocks can be 128-bit). Written without nested helper calls: the
    interpreter re-patches triton.language on every call of a jit function."""
    if MASKED:
        mask = idx < end
        other = 0.0
    else:
        mask = None
        other = None
    p = tl.load(p_ptr + idx, mask=mask, other=other).to(COMPUTE)
    g = tl.load(g_ptr + idx, mask=mask, other=other).to(COMPUTE)
    m = tl.load(m_ptr + idx, mask=mask, other=other).to(COMPUTE)
    v = tl.load(v_ptr + idx, mask=mask, other=other).to(COMPUTE)
    if HAS_GRAD_SCALE:
        # Unscaled in the compute dtype and stored back (before maximize's negation), as
        # torch's fused AdamW does; the update uses the unrounded value.
        if COMPUTE == tl.float64:
            g = g / scale
        else:
            g = tl.div_rn(g, scale)
        tl.store(g_ptr + idx, g, mask=mask)
    if MAXIMIZE:
        g = -g
    p = p * decay
    # torch.lerp: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w).
    m = tl.where(lerp_weight < 0.5, m + lerp_weight * (g - m), g - (g - m) * (1 - lerp_weight))
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        v_hat = tl.maximum(tl.load(vmax_ptr + idx, mask=mask, other=other).to(COMPUTE), v,
                           propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + idx, v_hat, mask=mask)
    else:
        v_hat = v
    # IEEE sqrt and division, as torch: for float32 tl.sqrt and "/" are approximate.
    if COMPUTE == tl.float64:
        denom = tl.sqrt(v_hat) / bias_correction2_sqrt + eps
        p = p - step_size * m / denom
    else:
        denom = tl.div_rn(tl.sqrt_rn(v_hat), bias_correction2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + idx, p, mask=mask)
    tl.store(m_ptr + idx, m, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)


@triton.jit
def adamw_step_kernel(
    Ptrs, Numels, Index, ChunkTensor, ChunkIndex, BiasCorrections, Lr, Steps, GradScale,
    FoundInf, num_tensors,
    lr: tl.float64, weight_decay: tl.float64, lerp_weight: tl.float64, beta2: tl.float64,
    one_minus_beta2: tl.float64, eps: tl.float64, log_beta1: tl.float64,
    log_beta2: tl.float64, bias_correction1: tl.float64, bias_correction2_sqrt: tl.float64,
    PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, COMPUTE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STEPS: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """AdamW update of chunk ChunkIndex[pid] of tensor ChunkTensor[pid], in place.

    Ptrs int64 (5, num_tensors): addresses of params (PARAM), grads (GRAD), exp_avgs,
    exp_avg_sqs, max_exp_avg_sqs (STATE; the last row only when AMSGRAD). Numels int64
    (num_tensors); Index int64 (num_tensors): each tensor's position in the caller's lists.
    Step counts, by STEPS: 0, the scalar bias corrections (1 - beta1^step, sqrt(1 - beta2^step))
    serve every tensor; 1, BiasCorrections float64 (2, num_tensors) holds them per tensor; 2,
    Steps (the caller's (n,) step counts, float32, on the device) gives step = Steps[Index[t]]
    and the kernel computes them (beta^step = exp(step * log_beta)). HAS_LR: lr is Lr[0] (any
    float dtype) instead of the argument. HAS_GRAD_SCALE: grads are divided by GradScale[0]
    (float32) and stored back. HAS_FOUND_INF: nothing happens when FoundInf[0] (float32) != 0.
    lerp_weight = 1 - beta1. ALIGNED: every address is 16-byte aligned (128-bit accesses).
    """
    pid = tl.program_id(0)
    t = tl.load(ChunkTensor + pid)
    start = tl.load(ChunkIndex + pid) * CHUNK  # int64, a multiple of CHUNK
    end = tl.minimum(tl.load(Numels + t) - start, CHUNK).to(tl.int32)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(FoundInf) != 0, 0, end)  # GradScaler found inf/NaN: skip
    p_ptr = tl.load(Ptrs + t).to(tl.pointer_type(PARAM))
    g_ptr = tl.load(Ptrs + num_tensors + t).to(tl.pointer_type(GRAD))
    m_ptr = tl.load(Ptrs + 2 * num_tensors + t).to(tl.pointer_type(STATE))
    v_ptr = tl.load(Ptrs + 3 * num_tensors + t).to(tl.pointer_type(STATE))
    if AMSGRAD:
        vmax_ptr = tl.load(Ptrs + 4 * num_tensors + t).to(tl.pointer_type(STATE))
    else:
        vmax_ptr = v_ptr  # unused
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
    p_ptr += start
    g_ptr += start
    m_ptr += start
    v_ptr += start
    vmax_ptr += start
    # Scalars in float64, rounded once to COMPUTE.
    if HAS_LR:
        lr_v = tl.load(Lr).to(tl.float64)
    else:
        lr_v = tl.full([], lr, tl.float64)
    if STEPS == 2:
        step = tl.load(Steps + tl.load(Index + t)).to(tl.float64)
        bc1 = 1.0 - tl.exp(step * log_beta1)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2))
    elif STEPS == 1:
        bc1 = tl.load(BiasCorrections + t)
        bc2_sqrt = tl.load(BiasCorrections + num_tensors + t)
    else:
        bc1 = tl.full([], bias_correction1, tl.float64)
        bc2_sqrt = tl.full([], bias_correction2_sqrt, tl.float64)
    step_size_c = (lr_v / bc1).to(COMPUTE)
    bc2_c = bc2_sqrt.to(COMPUTE)
    decay_c = (1.0 - lr_v * weight_decay).to(COMPUTE)
    lerp_c = tl.full([], lerp_weight, COMPUTE)
    beta2_c = tl.full([], beta2, COMPUTE)
    one_minus_beta2_c = tl.full([], one_minus_beta2, COMPUTE)
    eps_c = tl.full([], eps, COMPUTE)
    if HAS_GRAD_SCALE:
        scale_c = tl.load(GradScale).to(COMPUTE)
    else:
        scale_c = tl.full([], 1.0, COMPUTE)  # unused
    for off in range(0, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        if off + BLOCK <= end:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, idx, end, decay_c, lerp_c,
                         beta2_c, one_minus_beta2_c, eps_c, step_size_c, bc2_c, scale_c,
                         COMPUTE, AMSGRAD, MAXIMIZE, False, HAS_GRAD_SCALE)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, idx, end, decay_c, lerp_c,
                         beta2_c, one_minus_beta2_c, eps_c, step_size_c, bc2_c, scale_c,
                         COMPUTE, AMSGRAD, MAXIMIZE, True, HAS_GRAD_SCALE)


# ---- tables ---------------------------------------------------------------------------------

_table_cache: collections.OrderedDict = collections.OrderedDict()


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to ``device`` without blocking the host on the device's queue."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _tables(device: torch.device, lists: list[list[Tensor]], indices: list[int],
            cache: bool) -> tuple:
    """(ptrs (len(lists), T), numels (T), index (T), chunk_tensor (C), chunk_index (C) on
    device, C, whether every address is 16-byte aligned). ``indices``: each tensor's position in
    the caller's lists. Cached by addresses, sizes and positions unless ``cache`` is False
    (tensors that live for one call only)."""
    numels = [t.numel() for t in lists[0]]
    ptrs = [t.data_ptr() for ts in lists for t in ts]
    key = (device, CHUNK, len(lists), tuple(ptrs), tuple(numels), tuple(indices))
    hit = _table_cache.get(key)
    if hit is not None:
        _table_cache.move_to_end(key)
        return hit
    T = len(numels)
    counts = torch.tensor([triton.cdiv(n, CHUNK) for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    C = chunk_tensor.numel()
    chunk_index = torch.arange(C, dtype=torch.int64) - first_chunk[chunk_tensor]
    host = torch.cat([torch.tensor(ptrs, dtype=torch.int64),
                      torch.tensor(numels, dtype=torch.int64),
                      torch.tensor(indices, dtype=torch.int64), chunk_tensor, chunk_index])
    table = _to_device(host, device)
    k = len(lists) * T
    aligned = all(ptr % 16 == 0 for ptr in ptrs)
    entry = (table[:k], table[k:k + T], table[k + T:k + 2 * T], table[k + 2 * T:k + 2 * T + C],
             table[k + 2 * T + C:], C, aligned)
    if cache:
        _table_cache[key] = entry
        if len(_table_cache) > TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    return entry


# ---- argument checks ------------------------------------------------------------------------


def _check_list(tensors, name: str, params: list[Tensor], is_state: bool) -> None:
    if len(tensors) != len(params):
        raise ValueError(
            f"argument '{name}' has {len(tensors)} tensors but 'params' has {len(params)}"
        )
    for i, (t, p) in enumerate(zip(tensors, params, strict=True)):
        where = f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"argument '{where}' must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(
                f"argument '{where}' has shape {list(t.shape)} but params[{i}] has {list(p.shape)}"
            )
        if t.device != p.device:
            raise ValueError(
                f"argument '{where}' is on {t.device} but params[{i}] is on {p.device}"
            )
        if t.is_sparse:
            raise ValueError(f"argument '{where}' is sparse; AdamW does not support sparse tensors")
        if is_state:
            if t.dtype not in (torch.float32, p.dtype):
                raise TypeError(f"argument '{where}' must be float32 or the dtype of its parameter "
                                f"({p.dtype}), got {t.dtype}")
        elif t.dtype != p.dtype:
            raise TypeError(f"argument '{where}' has dtype {t.dtype} but params[{i}] has {p.dtype}")


def _check_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                eps, weight_decay, amsgrad, lr_tensor=None, grad_scale=None, found_inf=None,
                step_tensor=None) -> None:
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"argument 'params[{i}]' must be a torch.Tensor, got {type(p).__name__}"
            )
        if p.dtype not in _DTYPES:
            raise TypeError(
                f"argument 'params[{i}]' must be float16, bfloat16, float32 or float64, "
                f"got {p.dtype}"
            )
        if p.device != params[0].device:
            raise ValueError(
                f"argument 'params[{i}]' is on {p.device} but params[0] is on {params[0].device}"
            )
    _check_list(grads, "grads", params, is_state=False)
    _check_list(exp_avgs, "exp_avgs", params, is_state=True)
    _check_list(exp_avg_sqs, "exp_avg_sqs", params, is_state=True)
    if amsgrad:
        _check_list(max_exp_avg_sqs, "max_exp_avg_sqs", params, is_state=True)
    elif len(max_exp_avg_sqs):
        raise ValueError("argument 'max_exp_avg_sqs' must be empty when amsgrad is False")
    # The kernel reads every state of param i with one element type.
    for i in range(len(params)):
        if exp_avg_sqs[i].dtype != exp_avgs[i].dtype:
            raise TypeError(f"argument 'exp_avg_sqs[{i}]' has dtype {exp_avg_sqs[i].dtype} but "
                            f"exp_avgs[{i}] has {exp_avgs[i].dtype}")
        if amsgrad and max_exp_avg_sqs[i].dtype != exp_avgs[i].dtype:
            raise TypeError(f"argument 'max_exp_avg_sqs[{i}]' has dtype {max_exp_avg_sqs[i].dtype} "
                            f"but exp_avgs[{i}] has {exp_avgs[i].dtype}")
    if step_tensor is not None:
        check_scalar_tensor(step_tensor, "step_tensor", params, numel=len(params), float32=True)
        if len(steps):
            raise ValueError("arguments 'steps' and 'step_tensor' exclude each other; 'steps' "
                             "must be empty when 'step_tensor' is given")
    else:
        if len(steps) != len(params):
            raise ValueError(
                f"argument 'steps' has {len(steps)} entries but 'params' has {len(params)}"
            )
        for i, s in enumerate(steps):
            if not (math.isfinite(s) and s >= 1):
                raise ValueError(f"argument 'steps[{i}]' must be finite and >= 1, got {s}")
    if lr_tensor is not None:
        on_device = bool(params) and lr_tensor.device == params[0].device
        check_scalar_tensor(lr_tensor, "lr_tensor", params, allow_cpu=True,
                          float32=on_device and lr_tensor.device.type != "cpu")
    if grad_scale is not None:
        check_scalar_tensor(grad_scale, "grad_scale", params, float32=True)
    if found_inf is not None:
        check_scalar_tensor(found_inf, "found_inf", params, float32=True)
    for name, value, ok, rule in (
        ("lr", lr, lr >= 0, ">= 0"), ("eps", eps, eps >= 0, ">= 0"),
        ("beta1", beta1, 0 <= beta1 < 1, "in [0, 1)"),
        ("beta2", beta2, 0 <= beta2 < 1, "in [0, 1)"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
    ):
        if not (ok and math.isfinite(value)):
            raise ValueError(f"argument '{name}' must be finite and {rule}, got {value}")


# ---- entry point ----------------------------------------------------------------------------


def adamw_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool, maximize: bool, *, lr_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    step_tensor: Tensor | None = None,
) -> None:
    """torch.optim.AdamW's update of every params[i], in place.

    params[i], grads[i]: same shape, float16/bfloat16/float32/float64 (grads in the param's
    dtype); exp_avgs[i], exp_avg_sqs[i] (and max_exp_avg_sqs[i] when amsgrad, else the list is
    empty): float32 or the param's dtype, one dtype per param. steps[i]: the step count of
    param i including this step. Any strides: non-contiguous tensors are updated through
    contiguous copies written back afterwards.

    Keyword-only: ``lr_tensor`` (one element; float32 on the params' device, read in the
    kernel, or any float dtype on the CPU, read on the host) replaces ``lr``; ``step_tensor``
    ((n,) float32 on the params' device, counts after the increment) replaces ``steps`` (then
    empty); ``grad_scale``, ``found_inf`` (one-element float32 on the params' device):
    GradScaler's, as torch's fused AdamW takes them (see the module docstring).
    """
    lr, beta1, beta2, eps, weight_decay = (float(v) for v in (lr, beta1, beta2, eps, weight_decay))
    amsgrad, maximize = bool(amsgrad), bool(maximize)
    steps = [float(s) for s in steps]
    _check_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                eps, weight_decay, amsgrad, lr_tensor, grad_scale, found_inf, step_tensor)
    if not params:
        return
    device = params[0].device
    if lr_tensor is not None and lr_tensor.device != device:
        lr = float(lr_tensor)  # a CPU lr for device params: a host read, no device sync
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"argument 'lr_tensor' must be finite and >= 0, got {lr}")
        lr_tensor = None
    state_lists = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    # Non-contiguous tensors are updated through contiguous stand-ins; the written ones (param,
    # states, and grads when they are unscaled) are copied back at the end.
    write_back: list[tuple[Tensor, Tensor]] = []

    def stand_ins(tensors: list[Tensor], written: bool) -> list[Tensor]:
        out = []
        for t in tensors:
            if not t.is_contiguous():
                c = t.contiguous()
                if written:
                    write_back.append((t, c))
                t = c
            out.append(t)
        return out

    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        key = (p.dtype, grads[i].dtype, exp_avgs[i].dtype)
        groups.setdefault(key, []).append(i)

    # beta^step = exp(step * log(beta)) in the kernel; log(0) = -inf gives 0 as 0.0**step does.
    log_beta1 = math.log(beta1) if beta1 > 0 else -math.inf
    log_beta2 = math.log(beta2) if beta2 > 0 else -math.inf
    with device_context(device):
        for (param_dtype, grad_dtype, state_dtype), indices in groups.items():
            originals = [[ts[i] for i in indices] for ts in (params, grads, *state_lists)]
            lists = [stand_ins(ts, written=k != 1 or grad_scale is not None)
                     for k, ts in enumerate(originals)]
            # Stand-ins live for this call only: their addresses are not worth caching.
            one_off = any(a is not b for ts, cs in zip(originals, lists, strict=True)
                          for a, b in zip(ts, cs, strict=True))
            ptrs, numels, index, chunk_tensor, chunk_index, num_chunks, aligned = _tables(
                device, lists, indices, cache=not one_off
            )
            dummy = numels
            bias_corrections = dummy
            bc1 = bc2_sqrt = 1.0
            if step_tensor is not None:
                step_source = 2
            else:
                group_steps = [steps[i] for i in indices]
                bc1 = 1 - beta1 ** group_steps[0]
                bc2_sqrt = math.sqrt(1 - beta2 ** group_steps[0])
                step_source = 0
                if any(s != group_steps[0] for s in group_steps):
                    step_source = 1
                    host = torch.tensor(
                        [1 - beta1**s for s in group_steps]
                        + [math.sqrt(1 - beta2**s) for s in group_steps],
                        dtype=torch.float64,
                    )
                    bias_corrections = _to_device(host, device)
            adamw_step_kernel[(num_chunks,)](
                ptrs, numels, index, chunk_tensor, chunk_index, bias_corrections,
                lr_tensor if lr_tensor is not None else dummy,
                step_tensor if step_tensor is not None else dummy,
                grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy,
                len(indices),
                lr, weight_decay, 1 - beta1, beta2, 1 - beta2, eps, log_beta1, log_beta2, bc1,
                bc2_sqrt,
                PARAM=_TL_DTYPE[param_dtype], GRAD=_TL_DTYPE[grad_dtype],
                STATE=_TL_DTYPE[state_dtype],
                COMPUTE=compute_type(param_dtype),
                AMSGRAD=amsgrad, MAXIMIZE=maximize, STEPS=step_source,
                HAS_LR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
            )
        for original, stand_in in write_back:
            original.copy_(stand_in)
