"""The CUDA LayerNorm/RMSNorm kernels (csrc/cuda/norm.cu: warp per row, block per row, generic,
two-stage dweight/dbias) and the multi-tensor AdamW kernel (csrc/cuda/adamw.cu through
multi_tensor_apply.cuh), run unchanged on the CPU by the warp-level emulation, against float64
truth by the rule of tests/helpers.py. Every tensor sits in a NaN guard buffer (see
test_attention_emulated.py for what the emulation shows and what it cannot)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_rule

from .conftest import check_guard, guarded_copy, guarded_output

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _p(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _norm(lib, x, weight, bias, grad_y, rms, eps=1e-5, misalign=0):
    """Forward and backward through the emulated launchers: y, dx, dweight, dbias (y and dx
    `misalign` elements off 16-byte alignment)."""
    M, N = x.shape
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    param_dtype = weight.dtype if weight is not None else x.dtype
    y, y_buffer = guarded_output((M, N), x.dtype, misalign)
    mean, _ = guarded_output((M,), stat)
    rstd, _ = guarded_output((M,), stat)
    status = lib.emulated_norm_fwd(
        _p(x), _p(weight), _p(bias), _p(y), _p(None if rms else mean), _p(rstd),
        ctypes.c_int64(M), ctypes.c_int64(N), ctypes.c_double(eps), DTYPE_CODES[x.dtype],
        DTYPE_CODES[param_dtype], int(rms))
    assert status == 0, f"norm_fwd: cudaError {status}: {lib.emulated_fault().decode()}"
    check_guard(y_buffer, y.numel(), "y", misalign)
    dx, dx_buffer = guarded_output((M, N), x.dtype, misalign)
    dweight = guarded_output((N,), param_dtype) if weight is not None else (None, None)
    dbias = guarded_output((N,), param_dtype) if bias is not None else (None, None)
    status = lib.emulated_norm_bwd(
        _p(grad_y), _p(x), _p(None if rms else mean), _p(rstd), _p(weight), _p(dx),
        _p(dweight[0]), _p(dbias[0]), ctypes.c_int64(M), ctypes.c_int64(N),
        DTYPE_CODES[x.dtype], DTYPE_CODES[param_dtype], int(rms))
    assert status == 0, f"norm_bwd: cudaError {status}: {lib.emulated_fault().decode()}"
    check_guard(dx_buffer, dx.numel(), "dx", misalign)
    return y, dx, dweight[0], dbias[0]


# (M, N): warp per row (small N), block per row (N in the thousands), the generic kernels (odd N,
# N = 1, large N), several rows per warp/block grid.
NORM_SHAPES = [(5, 1), (9, 127), (33, 256), (4, 1000), (3, 4096), (2, 4099), (2, 12288)]


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=[f"M{m}-N{n}" for m, n in NORM_SHAPES])
def test_norm(library, shape, dtype, rms):
    _check_norm(library, shape, dtype, rms)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(3, 1024), (2, 4096)], ids=["M3-N1024", "M2-N4096"])
def test_norm_misaligned_rows(library, shape, rms):
    """x, grad_y, y and dx one element off 16-byte alignment: sizes the vectorized kernels take,
    pointers they cannot, so the generic scalar path runs."""
    _check_norm(library, shape, torch.float16, rms, misalign=1)


def _check_norm(library, shape, dtype, rms, misalign=0):
    M, N = shape
    gen = torch.Generator().manual_seed(M * 1000 + N)
    x64 = (torch.randn(M, N, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype).double()
    w64 = (1 + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype).double()
    b64 = (0.2 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype).double()
    dy64 = torch.randn(M, N, generator=gen, dtype=torch.float64).to(dtype).double()
    x, dy = (guarded_copy(t.to(dtype), misalign)[0] for t in (x64, dy64))
    w, b = (guarded_copy(t.to(dtype))[0] for t in (w64, b64))
    y, dx, dw, db = _norm(library, x, w, None if rms else b, dy, rms, misalign=misalign)

    def torch_norm(xx, ww, bb):
        if rms:
            return F.rms_norm(xx, (N,), ww, eps=1e-5)
        return F.layer_norm(xx, (N,), ww, bb, eps=1e-5)

    leaves64 = [t.clone().requires_grad_(True) for t in (x64, w64, b64)]
    truth = torch_norm(*leaves64)
    truth_grads = torch.autograd.grad(truth, leaves64[:2] if rms else leaves64, dy64)
    leaves = [t.to(dtype).requires_grad_(True) for t in (x64, w64, b64)]
    base = torch_norm(*leaves)
    base_grads = torch.autograd.grad(base, leaves[:2] if rms else leaves, dy64.to(dtype))
    assert_close_rule(y, base, truth, name="y")
    ours = (dx, dw) if rms else (dx, dw, db)
    for name, g, gb, gt in zip(("dx", "dweight", "dbias"), ours, base_grads, truth_grads,
                               strict=False):
        assert_close_rule(g, gb, gt, name=name, factor=2.0)


def _adamw(lib, params, grads, states, step, lr, betas, eps, wd, amsgrad, maximize,
           grad_scale=None, found_inf=None, masters=None):
    count = len(params)
    arrays = []
    for tensors in (params, grads, states["exp_avg"], states["exp_avg_sq"],
                    states["max_exp_avg_sq"] if amsgrad else params):
        arrays.append((ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors]))
    arrays.append(None if masters is None else
                  (ctypes.c_void_p * count)(*[t.data_ptr() for t in masters]))
    numels = (ctypes.c_int64 * count)(*[t.numel() for t in params])
    as_float = ctypes.POINTER(ctypes.c_float)
    status = lib.emulated_adamw_step(
        DTYPE_CODES[params[0].dtype], DTYPE_CODES[states["exp_avg"][0].dtype], count, *arrays,
        numels, ctypes.c_double(step), ctypes.c_double(lr), ctypes.c_double(betas[0]),
        ctypes.c_double(betas[1]), ctypes.c_double(eps), ctypes.c_double(wd), int(amsgrad),
        int(maximize), ctypes.cast(_p(grad_scale), as_float), ctypes.cast(_p(found_inf), as_float))
    assert status == 0, f"adamw_step: cudaError {status}: {lib.emulated_fault().decode()}"


ADAMW_NUMELS = [1, 7, 1000, 70001]  # 70001: several chunks of one tensor


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_adamw_matches_torch(library, dtype, amsgrad, maximize):
    """Three steps over a list of odd-sized tensors vs torch.optim.AdamW in float64 (truth) and
    at the param dtype (baseline); states float32 (float64 params: float64)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).double()
            for n in ADAMW_NUMELS]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [guarded_copy(p.to(dtype))[0] for p in init]
    states = {name: [guarded_copy(torch.zeros(n, dtype=state_dtype))[0] for n in ADAMW_NUMELS]
              for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    truth_params = [p.clone().requires_grad_(True) for p in init]
    base_params = [p.to(dtype).requires_grad_(True) for p in init]
    truth_opt = torch.optim.AdamW(truth_params, amsgrad=amsgrad, maximize=maximize, **hyper)
    base_opt = torch.optim.AdamW(base_params, amsgrad=amsgrad, maximize=maximize, foreach=False,
                                 **hyper)
    for step in range(1, 4):
        grads64 = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).double()
                   for n in ADAMW_NUMELS]
        grads = [guarded_copy(g.to(dtype))[0] for g in grads64]
        _adamw(library, params, grads, states, float(step), hyper["lr"], hyper["betas"],
               hyper["eps"], hyper["weight_decay"], amsgrad, maximize)
        for p, g in zip(truth_params, grads64, strict=True):
            p.grad = g.clone()
        for p, g in zip(base_params, grads64, strict=True):
            p.grad = g.to(dtype)
        truth_opt.step()
        base_opt.step()
    for i, (ours, base, truth) in enumerate(zip(params, base_params, truth_params, strict=True)):
        assert_close_rule(ours, base.detach(), truth.detach(), name=f"param[{i}]")


def test_adamw_found_inf_changes_nothing_and_grad_scale_unscales(library):
    """GradScaler's found_inf skips the step; grad_scale divides the grads (written back)."""
    params = [guarded_copy(torch.randn(n))[0] for n in (5, 3000)]
    before = [p.clone() for p in params]
    grads = [guarded_copy(torch.randn(n) * 8)[0] for n in (5, 3000)]
    states = {name: [guarded_copy(torch.zeros(n))[0] for n in (5, 3000)]
              for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    scale = guarded_copy(torch.tensor([8.0]))[0]
    inf = guarded_copy(torch.tensor([1.0]))[0]
    _adamw(library, params, grads, states, 1.0, 1e-2, (0.9, 0.99), 1e-8, 0.1, False, False,
           grad_scale=scale, found_inf=inf)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    for s in states["exp_avg"] + states["exp_avg_sq"]:
        assert torch.equal(s, torch.zeros_like(s))
    unscaled = [g.clone() / 8 for g in grads]
    inf.zero_()
    _adamw(library, params, grads, states, 1.0, 1e-2, (0.9, 0.99), 1e-8, 0.1, False, False,
           grad_scale=scale, found_inf=inf)
    for g, u in zip(grads, unscaled, strict=True):
        torch.testing.assert_close(g, u, rtol=0, atol=0)
    for p, b in zip(params, before, strict=True):
        assert not torch.equal(p, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adamw_master_weights(library, dtype):
    """16-bit params with float32 master weights: the update runs on the master, which follows
    torch's float32 AdamW on float32 copies of the params, and each param is its master rounded.
    At lr 1e-4 on values near 1 most updates are below bfloat16's resolution, so a master-less
    16-bit run could not follow."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).float()
            for n in ADAMW_NUMELS]
    params = [guarded_copy(p.to(dtype))[0] for p in init]
    masters = [guarded_copy(p)[0] for p in init]
    states = {name: [guarded_copy(torch.zeros(n))[0] for n in ADAMW_NUMELS]
              for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    hyper = {"lr": 1e-4, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    truth_params = [p.double().requires_grad_(True) for p in init]
    base_params = [p.clone().requires_grad_(True) for p in init]  # float32: the baseline
    truth_opt = torch.optim.AdamW(truth_params, **hyper)
    base_opt = torch.optim.AdamW(base_params, foreach=False, **hyper)
    for step in range(1, 5):
        grads32 = [torch.randn(n, generator=gen).to(dtype).float() for n in ADAMW_NUMELS]
        grads = [guarded_copy(g.to(dtype))[0] for g in grads32]
        _adamw(library, params, grads, states, float(step), hyper["lr"], hyper["betas"],
               hyper["eps"], hyper["weight_decay"], False, False, masters=masters)
        for p, g in zip(truth_params, grads32, strict=True):
            p.grad = g.double()
        for p, g in zip(base_params, grads32, strict=True):
            p.grad = g.clone()
        truth_opt.step()
        base_opt.step()
    for i, (param, master, base, truth) in enumerate(
            zip(params, masters, base_params, truth_params, strict=True)):
        assert_close_rule(master, base.detach(), truth.detach(), name=f"master[{i}]")
        assert torch.equal(param, master.to(dtype)), f"param[{i}] is not its master rounded"
        moved = (master.double() - init[i].double()).abs().max()
        assert moved > 0, f"master[{i}] did not move"
