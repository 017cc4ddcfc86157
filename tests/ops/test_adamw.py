"""torch.ops.fusedlm.adamw_step against torch.optim.AdamW's own step (truth: float64; baseline:
torch at the parameter's dtype) and against fusedlm.reference.adamw_step."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.backends import OpDispatch
from tests.helpers import assert_close_rule, available_backends, device_of

BACKENDS = available_backends()

# Sizes: scalars, odd sizes, and one tensor over the cpu kernel's 32K-element chunk.
SHAPES = [(7,), (3, 5), (1,), (), (33000,)]
STEPS = [1, 3, 10, 2, 1000]


def _state(shape, param_dtype, state_dtype, device, amsgrad, fresh):
    """exp_avg, exp_avg_sq, max_exp_avg_sq (or None) as they would be before a step."""
    if fresh:
        zeros = torch.zeros(shape, dtype=state_dtype, device=device)
        return zeros, zeros.clone(), (zeros.clone() if amsgrad else None)
    m = (0.1 * torch.randn(shape, dtype=torch.float64)).to(device, state_dtype)
    v = (0.01 * torch.rand(shape, dtype=torch.float64)).to(device, state_dtype)
    vmax = (
        (v.double() + 0.01 * torch.rand(shape, dtype=torch.float64)).to(device, state_dtype)
        if amsgrad
        else None
    )
    return m, v, vmax


def _problem(param_dtype, state_dtype, device, amsgrad, fresh):
    params = [torch.randn(s, dtype=torch.float64).to(device, param_dtype) for s in SHAPES]
    grads = [(0.5 * torch.randn(s, dtype=torch.float64)).to(device, param_dtype) for s in SHAPES]
    states = [_state(s, param_dtype, state_dtype, device, amsgrad, fresh) for s in SHAPES]
    steps = [1] * len(SHAPES) if fresh else STEPS
    return params, grads, states, steps


def _torch_adamw(params, grads, states, steps, dtype, hyper):
    """One torch.optim.AdamW step (single-tensor implementation) in ``dtype``, from the given
    states; returns params and states after the step."""
    ps = [p.detach().to(dtype).clone() for p in params]
    opt = torch.optim.AdamW(ps, foreach=False, **hyper)
    for p, g, (m, v, vmax), step in zip(ps, grads, states, steps, strict=True):
        p.grad = g.to(dtype)
        state = {
            "step": torch.tensor(float(step - 1)),
            "exp_avg": m.to(dtype).clone(),
            "exp_avg_sq": v.to(dtype).clone(),
        }
        if hyper["amsgrad"]:
            state["max_exp_avg_sq"] = vmax.to(dtype).clone()
        opt.state[p] = state
    opt.step()
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper["amsgrad"] else [])
    return ps, [[opt.state[p][key] for p in ps] for key in keys]


def _call_op(params, grads, states, steps, hyper, backend, fn=None):
    ps = [p.clone() for p in params]
    ms = [s[0].clone() for s in states]
    vs = [s[1].clone() for s in states]
    vmaxs = [s[2].clone() for s in states] if hyper["amsgrad"] else []
    args = (
        ps,
        [g.clone() for g in grads],
        ms,
        vs,
        vmaxs,
        [float(s) for s in steps],
        hyper["lr"],
        hyper["betas"][0],
        hyper["betas"][1],
        hyper["eps"],
        hyper["weight_decay"],
        hyper["amsgrad"],
        hyper["maximize"],
    )
    if fn is None:
        torch.ops.fusedlm.adamw_step(*args, backend)
    else:
        fn(*args)
    return ps, [ms, vs] + ([vmaxs] if hyper["amsgrad"] else [])


def _hyper(amsgrad, maximize, weight_decay):
    return {
        "lr": 0.01,
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "weight_decay": weight_decay,
        "amsgrad": amsgrad,
        "maximize": maximize,
    }


DTYPE_CASES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]
DTYPE_IDS = [f"{str(p).split('.')[1]}-states_{str(s).split('.')[1]}" for p, s in DTYPE_CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fresh", [True, False], ids=["first_step", "later_step"])
def test_adamw_step_vs_torch(
    fresh, weight_decay, maximize, amsgrad, param_dtype, state_dtype, backend
):
    device = device_of(backend)
    hyper = _hyper(amsgrad, maximize, weight_decay)
    params, grads, states, steps = _problem(param_dtype, state_dtype, device, amsgrad, fresh)
    ours_p, ours_s = _call_op(params, grads, states, steps, hyper, backend)
    truth_p, truth_s = _torch_adamw(params, grads, states, steps, torch.float64, hyper)
    base_p, base_s = _torch_adamw(params, grads, states, steps, param_dtype, hyper)
    for i in range(len(params)):
        assert ours_p[i].dtype == param_dtype and ours_p[i].shape == params[i].shape
        assert_close_rule(ours_p[i], base_p[i], truth_p[i], name=f"params[{i}]")
        for name, ours, base, truth in zip(
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ours_s, base_s, truth_s, strict=False
        ):
            assert ours[i].dtype == state_dtype
            assert_close_rule(ours[i], base[i], truth[i], name=f"{name}[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES[:4], ids=DTYPE_IDS[:4])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adamw_step_vs_reference(amsgrad, param_dtype, state_dtype, backend):
    """Every backend agrees with fusedlm.reference.adamw_step to within rounding."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, True, 0.05)
    params, grads, states, steps = _problem(param_dtype, state_dtype, device, amsgrad, fresh=False)
    ours_p, ours_s = _call_op(params, grads, states, steps, hyper, backend)
    ref_p, ref_s = _call_op(params, grads, states, steps, hyper, backend, fn=reference.adamw_step)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(param_dtype, 1e-2)
    for i in range(len(params)):
        torch.testing.assert_close(ours_p[i], ref_p[i], rtol=tol, atol=tol)
        for ours, ref in zip(ours_s, ref_s, strict=True):
            torch.testing.assert_close(ours[i], ref[i], rtol=max(tol, 1e-6), atol=max(tol, 1e-7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_step_float32_matches_torch_closely(backend):
    """float32 params and states: within a few ulps of torch's single-tensor AdamW."""
    device = device_of(backend)
    hyper = _hyper(False, False, 0.1)
    params, grads, states, steps = _problem(
        torch.float32, torch.float32, device, False, fresh=False
    )
    ours_p, _ = _call_op(params, grads, states, steps, hyper, backend)
    base_p, _ = _torch_adamw(params, grads, states, steps, torch.float32, hyper)
    for ours, base in zip(ours_p, base_p, strict=True):
        torch.testing.assert_close(ours, base, rtol=1e-6, atol=1e-7)


def test_adamw_step_non_contiguous_goes_to_torch_under_auto():
    hyper = _hyper(False, False, 0.1)
    params, grads, states, steps = _problem(torch.float32, torch.float32, "cpu", False, fresh=True)
    params = [torch.randn(6, 5).t(), *params[1:]]
    grads = [torch.randn(6, 5).t().contiguous(), *grads[1:]]
    states = [(torch.zeros(5, 6), torch.zeros(5, 6), None), *states[1:]]
    ours_p, _ = _call_op(params, grads, states, steps, hyper, "auto")
    assert OpDispatch.last_choice["adamw_step"] == "torch"
    base_p, _ = _torch_adamw(params, grads, states, steps, torch.float32, hyper)
    for ours, base in zip(ours_p, base_p, strict=True):
        torch.testing.assert_close(ours, base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_step_empty_list_is_a_no_op(backend):
    torch.ops.fusedlm.adamw_step(
        [], [], [], [], [], [], 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_adamw_step(param_dtype, amsgrad, backend):
    device = device_of(backend)
    params, grads, states, steps = _problem(
        param_dtype, torch.float32, device, amsgrad, fresh=False
    )
    args = (
        params,
        grads,
        [s[0] for s in states],
        [s[1] for s in states],
        [s[2] for s in states] if amsgrad else [],
        [float(s) for s in steps],
        0.01,
        0.9,
        0.99,
        1e-8,
        0.1,
        amsgrad,
        False,
        backend,
    )
    torch.library.opcheck(torch.ops.fusedlm.adamw_step.default, copy.deepcopy(args))


def test_adamw_step_is_registered_custom_op():
    assert hasattr(torch.ops.fusedlm, "adamw_step")
    assert fusedlm.ops.adamw_step is not None
