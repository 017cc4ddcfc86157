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
        torch.ops.fusedlm.adamw_step(*args, backend, [])
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
        [], [], [], [], [], [], 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, backend, []
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
        [],
    )
    torch.library.opcheck(torch.ops.fusedlm.adamw_step.default, copy.deepcopy(args))


def test_adamw_step_is_registered_custom_op():
    assert hasattr(torch.ops.fusedlm, "adamw_step")
    assert fusedlm.ops.adamw_step is not None


# ---- fusedlm.ops.adamw_step: the eager entry point that skips the dispatcher -----------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES[1:4], ids=DTYPE_IDS[1:4])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_eager_adamw_step_equals_the_registered_op(amsgrad, param_dtype, state_dtype, backend):
    """fusedlm.ops.adamw_step (no dispatcher) and torch.ops.fusedlm.adamw_step run the same
    kernel: bit-identical params and states."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, maximize=False, weight_decay=0.1)
    problem = _problem(param_dtype, state_dtype, device, amsgrad, fresh=False)
    via_op = _call_op(*problem, hyper, backend)
    eager = _call_op(*problem, hyper, backend,
                     fn=lambda *args: fusedlm.ops.adamw_step(*args, backend, []))
    for ours, theirs in zip([eager[0], *eager[1]], [via_op[0], *via_op[1]], strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_eager_adamw_step_bumps_every_mutated_version(amsgrad, backend):
    """The eager entry point marks what it writes as modified, as the dispatcher does for a
    mutating op: every tensor's version counter moves, and autograd refuses a backward through
    a parameter value the step overwrote."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, maximize=False, weight_decay=0.0)
    params, grads, states, steps = _problem(torch.float32, torch.float32, device, amsgrad,
                                            fresh=False)
    leaf = params[0].clone().requires_grad_(True)
    params[0] = leaf.detach()  # shares leaf's version counter
    saved = (leaf * leaf).sum()  # saves leaf for its backward
    lists = [params, grads, [s[0] for s in states], [s[1] for s in states],
             [s[2] for s in states] if amsgrad else []]
    before = [[t._version for t in ts] for ts in lists]
    fusedlm.ops.adamw_step(*lists, [float(s) for s in steps], hyper["lr"], *hyper["betas"],
                           hyper["eps"], 0.0, amsgrad, False, backend, [])
    for name, ts, versions in zip(("params", "grads", "exp_avgs", "exp_avg_sqs",
                                   "max_exp_avg_sqs"), lists, before, strict=True):
        for i, (t, version) in enumerate(zip(ts, versions, strict=True)):
            assert t._version > version, f"{name}[{i}]'s version did not move"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_eager_adamw_step_under_a_dispatch_mode_goes_through_the_op():
    """Under a TorchDispatchMode (FakeTensorMode, FlopCounterMode, a tracer) the eager entry
    point calls the registered op, so the mode sees fusedlm::adamw_step; under FakeTensorMode
    no kernel touches the fake tensors' (absent) data."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def step(n):
        params = [torch.randn(n), torch.randn(3, n)]
        fusedlm.ops.adamw_step(params, [torch.randn_like(p) for p in params],
                               [torch.zeros_like(p) for p in params],
                               [torch.zeros_like(p) for p in params], [], [1.0, 1.0], 1e-3,
                               0.9, 0.999, 1e-8, 0.0, False, False, "auto", [])
        return params

    with Recorder() as recorder:
        step(5)
    assert "fusedlm.adamw_step.default" in recorder.ops
    with FakeTensorMode():
        params = step(7)
    assert params[1].shape == (3, 7)


# ---- extensions: lr_tensor, step_tensor, grad_scale, found_inf --------------------------------



def _grad_scale(dtype):
    """GradScaler's scale for grads of ``dtype``: not a power of two for float32/float64, so that
    unscaling rounds and a scale used the wrong way shows; a power of two (as GradScaler's always
    is) for 16-bit grads, whose unscaled values the C++ CPU path rounds to the grad's dtype before
    the update (torch's fused AdamW, the CUDA and Triton kernels and the reference do not)."""
    return 4.0 if dtype in (torch.float16, torch.bfloat16) else 3.0

EXTENSION_CASES = {
    "lr_tensor": {"lr_tensor"},
    "step_tensor": {"step_tensor"},
    "grad_scale": {"grad_scale"},
    "grad_scale-no_inf": {"grad_scale", "found_inf"},
    "all": {"lr_tensor", "step_tensor", "grad_scale", "found_inf"},
}


def _extensions(which, steps, hyper, device, found=0.0, scale=3.0):
    """The op's keyword arguments for the extensions in ``which``, and the host ``steps`` and
    ``lr`` to pass with them (``steps`` empty with a step tensor, ``lr`` 0 with an lr tensor)."""
    kwargs = {}
    lr = hyper["lr"]
    if "lr_tensor" in which:
        kwargs["lr_tensor"] = torch.tensor(lr, dtype=torch.float32, device=device)
        lr = 0.0
    if "step_tensor" in which:
        kwargs["step_tensor"] = torch.tensor([float(s) for s in steps], device=device)
        steps = []
    if "grad_scale" in which:
        kwargs["grad_scale"] = torch.tensor(scale, device=device)
    if "found_inf" in which:
        kwargs["found_inf"] = torch.tensor(found, device=device)
    return kwargs, [float(s) for s in steps], lr


def _call_op_ext(params, grads, states, steps, hyper, backend, extensions, fn=None):
    """Like _call_op, with extension keyword arguments; returns params, states, grads after."""
    ps = [p.clone() for p in params]
    gs = [g.clone() for g in grads]
    ms = [s[0].clone() for s in states]
    vs = [s[1].clone() for s in states]
    vmaxs = [s[2].clone() for s in states] if hyper["amsgrad"] else []
    kwargs, host_steps, lr = extensions
    args = (ps, gs, ms, vs, vmaxs, host_steps, lr, hyper["betas"][0], hyper["betas"][1],
            hyper["eps"], hyper["weight_decay"], hyper["amsgrad"], hyper["maximize"])
    if fn is None:
        torch.ops.fusedlm.adamw_step(*args, backend, [], **kwargs)
    else:
        fn(*args, **kwargs)
    return ps, [ms, vs] + ([vmaxs] if hyper["amsgrad"] else []), gs


def _unscaled(grads, scale):
    """What the op must leave in grads: grad / scale in the compute dtype, rounded once."""
    return [(g.to(reference.compute_dtype(g.dtype)) / scale).to(g.dtype) for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("case", list(EXTENSION_CASES))
def test_adamw_step_extensions_vs_torch(case, maximize, amsgrad, param_dtype, state_dtype,
                                        backend):
    """With a tensor lr, device step counts, GradScaler's grad_scale (and a found_inf of 0) the
    step is torch.optim.AdamW's on the unscaled grads (truth float64, baseline at the dtype), and
    the grads are left unscaled."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, maximize, 0.1)
    which = EXTENSION_CASES[case]
    params, grads, states, steps = _problem(param_dtype, state_dtype, device, amsgrad, False)
    scale = _grad_scale(param_dtype)
    extensions = _extensions(which, steps, hyper, device, scale=scale)
    # torch's lr is the value the op reads: the float32 tensor's (or the float) as a double.
    hyper = dict(hyper, lr=float(extensions[0].get("lr_tensor", hyper["lr"])))
    if "grad_scale" in which:
        given = [(g.double() * scale).to(param_dtype) for g in grads]
        unscaled = _unscaled(given, scale)
    else:
        given = unscaled = grads
    step_tensor = extensions[0].get("step_tensor")
    step_tensor_before = None if step_tensor is None else step_tensor.clone()
    ours_p, ours_s, ours_g = _call_op_ext(params, given, states, steps, hyper, backend,
                                          extensions)
    truth_p, truth_s = _torch_adamw(params, [g.double() / scale for g in given]
                                    if "grad_scale" in which else grads, states, steps,
                                    torch.float64, hyper)
    base_p, base_s = _torch_adamw(params, unscaled, states, steps, param_dtype, hyper)
    for i in range(len(params)):
        assert_close_rule(ours_p[i], base_p[i], truth_p[i], name=f"params[{i}]")
        for name, ours, base, truth in zip(
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ours_s, base_s, truth_s, strict=False
        ):
            assert ours[i].dtype == state_dtype
            assert_close_rule(ours[i], base[i], truth[i], name=f"{name}[{i}]")
        torch.testing.assert_close(ours_g[i], unscaled[i], rtol=0, atol=0,
                                   msg=lambda m, i=i: f"grads[{i}] after the step: {m}")
    if step_tensor is not None:  # the counts are read, never written
        assert torch.equal(step_tensor, step_tensor_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["grad_scale", "no_grad_scale"])
def test_adamw_step_found_inf_changes_nothing(with_scale, amsgrad, param_dtype, state_dtype,
                                              backend):
    """found_inf = 1: params, states and grads keep their exact bits (torch's fused AdamW
    returns before touching anything), even with inf/NaN grads."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, False, 0.1)
    params, grads, states, steps = _problem(param_dtype, state_dtype, device, amsgrad, False)
    grads[0][0] = float("inf")
    grads[1][1, 2] = float("nan")
    which = {"found_inf", "lr_tensor", "step_tensor"} | ({"grad_scale"} if with_scale else set())
    ours_p, ours_s, ours_g = _call_op_ext(
        params, grads, states, steps, hyper, backend,
        _extensions(which, steps, hyper, device, found=1.0),
    )
    before_s = [[s[k] for s in states] for k in range(3 if amsgrad else 2)]
    for i in range(len(params)):
        assert torch.equal(ours_p[i], params[i]), f"params[{i}] changed"
        assert torch.equal(ours_g[i].nan_to_num(), grads[i].nan_to_num()), f"grads[{i}] changed"
        for k, ours in enumerate(ours_s):
            assert torch.equal(ours[i], before_s[k][i]), f"state {k} of param {i} changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("found", [0.0, 1.0], ids=["no_inf", "inf"])
def test_adamw_step_extensions_match_torch_fused_kernel(found, amsgrad, dtype, backend):
    """The same call into torch's own fused AdamW kernel (torch._fused_adamw_, what
    torch.optim.AdamW(fused=True) runs) gives the same params, states and grads."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, True, 0.1)
    params, grads, states, steps = _problem(dtype, dtype, device, amsgrad, False)
    grads = [(g.double() * 3.0).to(dtype) for g in grads]
    which = {"lr_tensor", "step_tensor", "grad_scale", "found_inf"}
    extensions = _extensions(which, steps, hyper, device, found=found)
    ours_p, ours_s, ours_g = _call_op_ext(params, grads, states, steps, hyper, backend,
                                          extensions)
    kwargs = extensions[0]
    ps, gs = [p.clone() for p in params], [g.clone() for g in grads]
    ss = [[s[k].clone() for s in states] for k in range(3 if amsgrad else 2)]
    torch._fused_adamw_(
        ps, gs, ss[0], ss[1], ss[2] if amsgrad else [], list(kwargs["step_tensor"].unbind()),
        lr=kwargs["lr_tensor"], beta1=hyper["betas"][0], beta2=hyper["betas"][1],
        weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=amsgrad, maximize=True,
        grad_scale=kwargs["grad_scale"], found_inf=kwargs["found_inf"],
    )
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    for i in range(len(params)):
        torch.testing.assert_close(ours_p[i], ps[i], rtol=tol, atol=tol)
        torch.testing.assert_close(ours_g[i], gs[i], rtol=0, atol=0)
        for ours, theirs in zip(ours_s, ss, strict=True):
            torch.testing.assert_close(ours[i], theirs[i], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_step_cpu_lr_tensor_of_any_float_dtype(backend):
    """A CPU lr tensor may be float64 (read as a double on the host, not rounded to float32)."""
    device = device_of(backend)
    hyper = _hyper(False, False, 0.1)
    params, grads, states, steps = _problem(torch.float64, torch.float64, device, False, False)
    lr = torch.tensor(0.0123, dtype=torch.float64)
    ours_p, _, _ = _call_op_ext(params, grads, states, steps, hyper, backend,
                                ({"lr_tensor": lr}, [float(s) for s in steps], 0.0))
    truth_p, _ = _torch_adamw(params, grads, states, steps, torch.float64, dict(hyper, lr=0.0123))
    for ours, truth in zip(ours_p, truth_p, strict=True):
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-12)


BAD_EXTENSIONS = [
    ("grad_scale_two_elements", ValueError, "grad_scale", {"grad_scale": torch.ones(2)}),
    ("grad_scale_float64", TypeError, "grad_scale",
     {"grad_scale": torch.ones((), dtype=torch.float64)}),
    ("found_inf_int", TypeError, "found_inf", {"found_inf": torch.zeros((), dtype=torch.int32)}),
    ("lr_tensor_int", TypeError, "lr_tensor", {"lr_tensor": torch.ones((), dtype=torch.int64)}),
    ("lr_tensor_shape", ValueError, "lr_tensor", {"lr_tensor": torch.ones(3)}),
    ("step_tensor_length", ValueError, "step_tensor", {"step_tensor": torch.ones(2)}),
    ("step_tensor_float64", TypeError, "step_tensor",
     {"step_tensor": torch.ones(1, dtype=torch.float64)}),
    ("step_tensor_with_steps", ValueError, "step_tensor", {"step_tensor": torch.ones(1),
                                                           "steps": [1.0]}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("exc", "argument", "kwargs"), [c[1:] for c in BAD_EXTENSIONS],
                         ids=[c[0] for c in BAD_EXTENSIONS])
def test_adamw_step_bad_extension_names_it_and_changes_nothing(kwargs, argument, exc, backend):
    kwargs = dict(kwargs)
    steps = kwargs.pop("steps", [] if "step_tensor" in kwargs else [1.0])
    p, g = torch.randn(4), torch.randn(4)
    before = (p.clone(), g.clone())
    with pytest.raises(exc, match=argument):
        torch.ops.fusedlm.adamw_step([p], [g], [torch.zeros(4)], [torch.zeros(4)], [], steps,
                                     1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, backend, [],
                                     **kwargs)
    assert torch.equal(p, before[0]) and torch.equal(g, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("found", [0.0, 1.0], ids=["no_inf", "inf"])
def test_opcheck_adamw_step_extensions(found, backend):
    device = device_of(backend)
    hyper = _hyper(True, False, 0.1)
    params, grads, states, steps = _problem(torch.float32, torch.float32, device, True, False)
    kwargs, host_steps, lr = _extensions(set(EXTENSION_CASES["all"]), steps, hyper, device,
                                         found=found)
    args = (params, grads, [s[0] for s in states], [s[1] for s in states],
            [s[2] for s in states], host_steps, lr, 0.9, 0.99, 1e-8, 0.1, True, False, backend,
            [])
    torch.library.opcheck(torch.ops.fusedlm.adamw_step.default, copy.deepcopy(args),
                          copy.deepcopy(kwargs))


# ---- master_params: float32 master weights of bfloat16/float16 params -------------------------

# The Triton kernel has no master weights (see test_triton_backend_refuses_master_params).
MASTER_BACKENDS = [b for b in BACKENDS if b.id != "triton"]
TRITON_BACKENDS = [b for b in BACKENDS if b.id == "triton"]
MASTER_DTYPES = [torch.bfloat16, torch.float16]


def _master_problem(param_dtype, device, n_steps, seed=0):
    """16-bit params and a sequence of 16-bit grads (one list per step)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=torch.float64, generator=g).to(device, param_dtype)
              for s in SHAPES]
    grads_seq = [[(0.5 * torch.randn(s, dtype=torch.float64, generator=g)).to(device, param_dtype)
                  for s in SHAPES] for _ in range(n_steps)]
    return params, grads_seq


def _torch_run(params, grads_seq, dtype, hyper):
    """torch.optim.AdamW (single-tensor) over the grads, on ``dtype`` copies of the params."""
    ps = [p.detach().to(dtype).clone() for p in params]
    opt = torch.optim.AdamW(ps, foreach=False, **hyper)
    for grads in grads_seq:
        for p, grad in zip(ps, grads, strict=True):
            p.grad = grad.to(dtype)
        opt.step()
    return ps


def _op_run_with_masters(params, grads_seq, hyper, backend, extended=False, fn=None):
    """The op over the grads, with float32 masters (copies of the params) and float32 states;
    ``extended``: a tensor lr, device step counts and GradScaler's tensors (scale 4, no inf).
    Returns params, masters, states after the last step."""
    device = params[0].device
    ps = [p.clone() for p in params]
    masters = [p.float() for p in params]
    ms = [torch.zeros_like(m) for m in masters]
    vs = [torch.zeros_like(m) for m in masters]
    vmaxs = [torch.zeros_like(m) for m in masters] if hyper["amsgrad"] else []
    for step, grads in enumerate(grads_seq, start=1):
        kwargs, steps, lr, gs = {}, [float(step)] * len(ps), hyper["lr"], [g.clone() for g in grads]
        if extended:
            kwargs = {"lr_tensor": torch.tensor(lr, device=device),
                      "step_tensor": torch.full((len(ps),), float(step), device=device),
                      "grad_scale": torch.tensor(4.0, device=device),
                      "found_inf": torch.tensor(0.0, device=device)}
            steps, lr, gs = [], 0.0, [g * 4 for g in gs]  # exact: a power of two
        args = (ps, gs, ms, vs, vmaxs, steps, lr, hyper["betas"][0], hyper["betas"][1],
                hyper["eps"], hyper["weight_decay"], hyper["amsgrad"], hyper["maximize"])
        if fn is None:
            torch.ops.fusedlm.adamw_step(*args, backend, masters, **kwargs)
        else:
            fn(*args, master_params=masters, **kwargs)
    return ps, masters, [ms, vs] + ([vmaxs] if hyper["amsgrad"] else [])


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("param_dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("extended", [False, True], ids=["plain", "extensions"])
def test_adamw_step_master_params_follow_torch_float32(extended, maximize, amsgrad, param_dtype,
                                                       backend):
    """Over several steps the float32 master is torch.optim.AdamW's float32 run on float32 copies
    of the 16-bit params (the rule: truth float64), and each 16-bit param is its master rounded."""
    device = device_of(backend)
    hyper = _hyper(amsgrad, maximize, 0.1)
    params, grads_seq = _master_problem(param_dtype, device, n_steps=5)
    ours_p, ours_m, ours_s = _op_run_with_masters(params, grads_seq, hyper, backend, extended)
    if extended:  # the lr the op reads is the float32 tensor's
        hyper = dict(hyper, lr=float(torch.tensor(hyper["lr"])))
    truth = _torch_run(params, grads_seq, torch.float64, hyper)
    base = _torch_run(params, grads_seq, torch.float32, hyper)
    for i in range(len(params)):
        assert ours_m[i].dtype == torch.float32 and ours_p[i].dtype == param_dtype
        assert_close_rule(ours_m[i], base[i], truth[i], name=f"master_params[{i}]")
        assert torch.equal(ours_p[i], ours_m[i].to(param_dtype)), f"params[{i}] != its master"
        for state in ours_s:
            assert state[i].dtype == torch.float32
        # the masters moved (the test is not vacuous)
        assert not torch.equal(ours_m[i], params[i].float())


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("param_dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adamw_step_master_params_vs_reference(amsgrad, param_dtype, backend):
    device = device_of(backend)
    hyper = _hyper(amsgrad, True, 0.05)
    params, grads_seq = _master_problem(param_dtype, device, n_steps=3)
    ours = _op_run_with_masters(params, grads_seq, hyper, backend, extended=True)
    ref = _op_run_with_masters(params, grads_seq, hyper, backend, extended=True,
                               fn=reference.adamw_step)
    for i in range(len(params)):
        torch.testing.assert_close(ours[1][i], ref[1][i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours[0][i].float(), ref[0][i].float(), rtol=1e-2, atol=1e-2)
        for a, b in zip(ours[2], ref[2], strict=True):
            torch.testing.assert_close(a[i], b[i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("param_dtype", MASTER_DTYPES, ids=str)
def test_adamw_step_master_params_found_inf_changes_nothing(param_dtype, backend):
    device = device_of(backend)
    params, (grads,) = _master_problem(param_dtype, device, n_steps=1)
    grads[0][0] = float("inf")
    masters = [(p.double() + 1e-4).float() for p in params]  # not the params' values
    states = [torch.full_like(m, 0.1) for m in masters], [torch.full_like(m, 0.01) for m in masters]
    before = [[t.clone() for t in ts] for ts in (params, masters, grads, *states)]
    torch.ops.fusedlm.adamw_step(
        params, grads, *states, [], [2.0] * len(params), 0.01, 0.9, 0.99, 1e-8, 0.1, False, False,
        backend, masters, grad_scale=torch.tensor(4.0, device=device),
        found_inf=torch.tensor(1.0, device=device),
    )
    for name, now, then in zip(("params", "master_params", "grads", "exp_avgs", "exp_avg_sqs"),
                               (params, masters, grads, *states), before, strict=True):
        for i, (a, b) in enumerate(zip(now, then, strict=True)):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name}[{i}] changed"


def _bad_master_case(param_dtype=torch.bfloat16, state_dtype=torch.float32, masters=None):
    p = torch.randn(4).to(param_dtype)
    if masters is None:
        masters = [p.float()]
    return p, torch.randn(4).to(param_dtype), state_dtype, masters


BAD_MASTERS = [
    ("count", ValueError, r"'master_params' has 2 tensors", {"masters": [torch.zeros(4)] * 2}),
    ("float64", TypeError, r"'master_params\[0\]' must be float32",
     {"masters": [torch.zeros(4, dtype=torch.float64)]}),
    ("bfloat16", TypeError, r"'master_params\[0\]' must be float32",
     {"masters": [torch.zeros(4, dtype=torch.bfloat16)]}),
    ("shape", ValueError, r"'master_params\[0\]' has shape", {"masters": [torch.zeros(2, 2)]}),
    ("float32_param", TypeError, r"'master_params'.*params\[0\] is torch.float32",
     {"param_dtype": torch.float32}),
    ("16bit_states", TypeError, r"'master_params' the states must be float32",
     {"state_dtype": torch.bfloat16}),
    ("not_a_tensor", TypeError, r"master_params", {"masters": [[0.0] * 4]}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("exc", "match", "kwargs"), [c[1:] for c in BAD_MASTERS],
                         ids=[c[0] for c in BAD_MASTERS])
def test_adamw_step_bad_master_params_names_it_and_changes_nothing(kwargs, match, exc, backend):
    p, g, state_dtype, masters = _bad_master_case(**kwargs)
    before = [t.clone() for t in (p, g, *masters) if isinstance(t, torch.Tensor)]
    with pytest.raises((exc, RuntimeError), match=match) as info:
        torch.ops.fusedlm.adamw_step([p], [g], [torch.zeros(4, dtype=state_dtype)],
                                     [torch.zeros(4, dtype=state_dtype)], [], [1.0], 1e-3, 0.9,
                                     0.999, 1e-8, 0.0, False, False, backend, masters)
    if kwargs.get("masters") != [[0.0] * 4]:  # a list of numbers fails the schema (RuntimeError)
        assert info.type is exc
    after = [t for t in (p, g, *masters) if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_adamw_step_master_params_on_another_device_names_it():
    """(Checked on the op's own check: a meta tensor in the call would dispatch to the fake
    implementation, and this machine may have no second device.)"""
    from fusedlm.ops.adamw import _check_master_params

    p = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"'master_params\[0\]' is on meta"):
        _check_master_params([p], [torch.zeros(4)], [torch.zeros(4)], [],
                             [torch.zeros(4, device="meta")])


@pytest.mark.parametrize("backend", MASTER_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("extended", [False, True], ids=["plain", "extensions"])
def test_opcheck_adamw_step_master_params(extended, amsgrad, backend):
    device = device_of(backend)
    hyper = _hyper(amsgrad, False, 0.1)
    params, grads, states, steps = _problem(torch.bfloat16, torch.float32, device, amsgrad, False)
    kwargs, host_steps, lr = _extensions(set(EXTENSION_CASES["all"]) if extended else set(),
                                         steps, hyper, device, scale=4.0)
    masters = [(p.double() + 1e-3).float() for p in params]
    args = (params, grads, [s[0] for s in states], [s[1] for s in states],
            [s[2] for s in states] if amsgrad else [], host_steps, lr, 0.9, 0.99, 1e-8, 0.1,
            amsgrad, False, backend, masters)
    torch.library.opcheck(torch.ops.fusedlm.adamw_step.default, copy.deepcopy(args),
                          copy.deepcopy(kwargs))


def test_triton_supports_refuses_master_params():
    """The Triton kernel has no master weights: its support check says so, so "auto" moves on
    and backend="triton" raises BackendNotSupportedError (on a GPU: the test below)."""
    from fusedlm.ops.adamw import _triton_supports

    p = torch.zeros(3, dtype=torch.bfloat16)
    lists = ([p], [p.clone()], [torch.zeros(3)], [torch.zeros(3)], [])
    assert _triton_supports(*lists) is None
    assert _triton_supports(*lists, []) is None
    assert _triton_supports(*lists, [torch.zeros(3)]) == (
        "the Triton AdamW kernel has no master weights"
    )


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_backend_refuses_master_params(backend):
    device = device_of(backend)
    hyper = _hyper(False, False, 0.1)
    params, grads_seq = _master_problem(torch.bfloat16, device, n_steps=1)
    with pytest.raises(fusedlm.BackendNotSupportedError, match="no master weights"):
        _op_run_with_masters(params, grads_seq, hyper, backend)
    ours = _op_run_with_masters(params, grads_seq, hyper, "auto")
    assert OpDispatch.last_choice["adamw_step"] != "triton"
    ref = _op_run_with_masters(params, grads_seq, hyper, "torch")
    for a, b in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
