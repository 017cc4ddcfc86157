"""The multi-tensor CUDA AdamW kernel (csrc/cuda/adamw.cu on csrc/cuda/multi_tensor_apply.cuh)
and the keyword-only extensions of fusedlm._C.adamw_step (master weights, device step counts, a
device lr, GradScaler's grad_scale / found_inf), which the CPU path implements with the same
semantics around the CPU kernel.

GPU tests: a GPT-2-small parameter list (148 tensors, 124M elements; bfloat16 params with float32
master weights and states) against torch in float64 (truth) and torch's own fused AdamW in float32
(baseline), by the rule of tests/helpers.py; tables that overflow (many tensors, tensors over
many launches), misaligned and odd-sized tensors, mixed dtypes, and CUDA-graph capture with a
device lr and device step counts. The CUDA kernel is also compared with the CPU kernel, whose
arithmetic it mirrors op for op.
"""

from __future__ import annotations

import pytest
import torch

import fusedlm
from fusedlm import _ext
from tests.helpers import assert_close_rule

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _module():
    info = fusedlm.backends()["cpu"]
    if not info.available:
        pytest.skip(f"cpu backend: {info.reason}")
    return _ext.load()


def _cuda_module():
    module = _ext.load()
    assert module is not None, f"fusedlm._C does not load: {_ext.why_unavailable()}"
    assert module.built_with_cuda(), "fusedlm._C was built without CUDA"
    assert "adamw_step" in module.cuda_ops(), "no CUDA adamw_step in this build"
    return module


def gpt2_shapes(n_layer=12, d=768, vocab=50257, ctx=1024):
    """The parameter shapes of GPT-2 small (wte, wpe, 12 blocks, ln_f): 148 tensors."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [
            (d,),
            (d,),
            (d, 3 * d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (d, 4 * d),
            (4 * d,),
            (4 * d, d),
            (d,),
        ]
    return shapes + [(d,), (d,)]


class Problem:
    """Params, grads and states before a step (a later step: states nonzero)."""

    def __init__(
        self,
        shapes,
        param_dtype,
        state_dtype,
        device,
        amsgrad=False,
        master=False,
        steps=None,
        grad_scale=1.0,
    ):
        g = torch.Generator(device="cpu").manual_seed(1234)

        def rand(shape, scale=1.0, offset=0.0, uniform=False):
            t = torch.rand(shape, generator=g) if uniform else torch.randn(shape, generator=g)
            return (offset + scale * t).to(device)

        self.master = [rand(s, 0.05) for s in shapes] if master else []
        self.params = (
            [m.to(param_dtype) for m in self.master]
            if master
            else [rand(s, 0.05).to(param_dtype) for s in shapes]
        )
        self.grads = [(rand(s, 1e-3) * grad_scale).to(param_dtype) for s in shapes]
        self.exp_avgs = [rand(s, 1e-4).to(state_dtype) for s in shapes]
        self.exp_avg_sqs = [rand(s, 1e-7, uniform=True).to(state_dtype) for s in shapes]
        self.max_exp_avg_sqs = (
            [
                (v.double() + rand(v.shape, 1e-7, uniform=True).double()).to(state_dtype)
                for v in self.exp_avg_sqs
            ]
            if amsgrad
            else []
        )
        self.steps = (
            steps if steps is not None else [float(3 + (i % 5) * 7) for i in range(len(shapes))]
        )

    def clone(self):
        other = object.__new__(Problem)
        for key, value in self.__dict__.items():
            other.__dict__[key] = [t.clone() for t in value] if key != "steps" else list(value)
        return other

    def to(self, device):
        other = object.__new__(Problem)
        for key, value in self.__dict__.items():
            other.__dict__[key] = (
                [t.to(device, copy=True) for t in value] if key != "steps" else list(value)
            )
        return other

    def step(self, module, amsgrad=False, maximize=False, hyper=HYPER, **kwargs):
        if self.master:
            kwargs.setdefault("master_params", self.master)
        module.adamw_step(
            self.params,
            self.grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            self.max_exp_avg_sqs,
            [] if "step_tensors" in kwargs else self.steps,
            hyper["lr"],
            hyper["beta1"],
            hyper["beta2"],
            hyper["eps"],
            hyper["weight_decay"],
            amsgrad,
            maximize,
            **kwargs,
        )
        return self


def torch_adamw(prob, dtype, amsgrad=False, maximize=False, hyper=HYPER):
    """torch.optim.AdamW's single-tensor step in `dtype` from the problem's state (from the
    master weights when there are some); returns params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs."""
    source = prob.master or prob.params
    ps = [p.detach().to(dtype).clone() for p in source]
    opt = torch.optim.AdamW(
        ps,
        lr=hyper["lr"],
        betas=(hyper["beta1"], hyper["beta2"]),
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
        amsgrad=amsgrad,
        maximize=maximize,
        foreach=False,
    )
    for i, p in enumerate(ps):
        p.grad = prob.grads[i].to(dtype)
        state = {
            "step": torch.tensor(prob.steps[i] - 1.0),
            "exp_avg": prob.exp_avgs[i].to(dtype).clone(),
            "exp_avg_sq": prob.exp_avg_sqs[i].to(dtype).clone(),
        }
        if amsgrad:
            state["max_exp_avg_sq"] = prob.max_exp_avg_sqs[i].to(dtype).clone()
        opt.state[p] = state
    opt.step()
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    return [ps] + [[opt.state[p][k] for p in ps] for k in keys]


def torch_fused_adamw_f32(prob, amsgrad=False, maximize=False, hyper=HYPER):
    """torch's fused AdamW (the peer) in float32 from the problem's state."""
    source = prob.master or prob.params
    ps = [p.detach().float().clone() for p in source]
    gs = [g.float() for g in prob.grads]
    ms = [m.float().clone() for m in prob.exp_avgs]
    vs = [v.float().clone() for v in prob.exp_avg_sqs]
    xs = [x.float().clone() for x in prob.max_exp_avg_sqs]
    steps = [torch.tensor(s, device=ps[0].device) for s in prob.steps]
    torch._fused_adamw_(
        ps,
        gs,
        ms,
        vs,
        xs,
        steps,
        lr=hyper["lr"],
        beta1=hyper["beta1"],
        beta2=hyper["beta2"],
        weight_decay=hyper["weight_decay"],
        eps=hyper["eps"],
        amsgrad=amsgrad,
        maximize=maximize,
    )
    return [ps, ms, vs] + ([xs] if amsgrad else [])


def assert_lists_equal(ours, theirs, what):
    for name, a_list, b_list in zip(
        ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), ours, theirs, strict=False
    ):
        for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            assert torch.equal(a.cpu(), b.cpu()), f"{what}: {name}[{i}] differs"


def results(prob):
    return [prob.master or prob.params, prob.exp_avgs, prob.exp_avg_sqs] + (
        [prob.max_exp_avg_sqs] if prob.max_exp_avg_sqs else []
    )


# ---- GPU: a GPT-2-small step ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_gpt2_bf16_params_fp32_master_weights(amsgrad):
    module = _cuda_module()
    shapes = gpt2_shapes()
    prob = Problem(shapes, torch.bfloat16, torch.float32, "cuda", amsgrad=amsgrad, master=True)
    truth = torch_adamw(prob, torch.float64, amsgrad=amsgrad)
    base = torch_fused_adamw_f32(prob, amsgrad=amsgrad)
    ours = prob.clone().step(module, amsgrad=amsgrad)
    for name, o_list, b_list, t_list in zip(
        ("master", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: len(base)],
        results(ours),
        base,
        truth,
        strict=True,
    ):
        for i in range(len(shapes)):
            assert o_list[i].dtype == torch.float32
            assert_close_rule(o_list[i], b_list[i], t_list[i], name=f"{name}[{i}] {shapes[i]}")
    for i, (p, m) in enumerate(zip(ours.params, ours.master, strict=True)):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, m.to(torch.bfloat16)), f"params[{i}] is not its master's rounding"


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("param_dtype", "state_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["f32", "bf16-f32states", "f16-f32states", "bf16-bf16states"],
)
def test_gpt2_list_against_torch(param_dtype, state_dtype):
    module = _cuda_module()
    shapes = gpt2_shapes(n_layer=4)
    prob = Problem(shapes, param_dtype, state_dtype, "cuda")
    truth = torch_adamw(prob, torch.float64)
    base = torch_adamw(prob, param_dtype)
    ours = prob.clone().step(module)
    for name, o_list, b_list, t_list in zip(
        ("params", "exp_avg", "exp_avg_sq"), results(ours), base, truth, strict=True
    ):
        for i in range(len(shapes)):
            assert_close_rule(
                o_list[i], b_list[i].to(o_list[i].dtype), t_list[i], name=f"{name}[{i}]"
            )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("param_dtype", "state_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_cuda_matches_cpu_kernel(maximize, amsgrad, param_dtype, state_dtype):
    """Same arithmetic as the CPU kernel, op for op: agreement to a few ulps. Sizes cross the
    64K chunk, the 4-element vectors (odd sizes), and include empty and 0-d tensors."""
    module = _cuda_module()
    shapes = [(7,), (3, 5), (1,), (), (0,), (65536,), (65537,), (200003,), (300, 301)]
    prob = Problem(shapes, param_dtype, state_dtype, "cuda", amsgrad=amsgrad)
    cpu = prob.to("cpu").step(module, amsgrad=amsgrad, maximize=maximize)
    gpu = prob.clone().step(module, amsgrad=amsgrad, maximize=maximize)
    tol = {torch.float64: 1e-13, torch.float32: 2e-6}.get(param_dtype, 1e-2)
    for o_list, c_list in zip(results(gpu), results(cpu), strict=True):
        for o, c in zip(o_list, c_list, strict=True):
            torch.testing.assert_close(o.cpu(), c, rtol=tol, atol=tol * 1e-2)


@pytest.mark.gpu
def test_tables_overflow_many_tensors_and_long_tensors():
    """700 tensors (a launch's table holds 27 to 35) and a tensor over three launches' worth of
    chunks (320 chunks of 64K per launch): every element updated exactly once."""
    module = _cuda_module()
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 5000, (700,), generator=g).tolist()
    sizes[100] = 320 * 65536 * 2 + 12345
    sizes[101] = 320 * 65536
    shapes = [(s,) for s in sizes]
    prob = Problem(shapes, torch.float32, torch.float32, "cuda")
    cpu = prob.to("cpu").step(module)
    gpu = prob.clone().step(module)
    for o_list, c_list in zip(results(gpu), results(cpu), strict=True):
        for o, c in zip(o_list, c_list, strict=True):
            torch.testing.assert_close(o.cpu(), c, rtol=2e-6, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("master", [False, True])
def test_misaligned_tensors_use_the_scalar_path(master):
    """Params and states that are contiguous views at odd element offsets (no vector access)."""
    module = _cuda_module()
    shapes = [(1001,), (64, 65), (70000,)]
    prob = Problem(shapes, torch.bfloat16, torch.float32, "cuda", master=master)

    def misalign(ts):
        out = []
        for t in ts:
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            view = buf[1:].view(t.shape)
            view.copy_(t)
            out.append(view)
        return out

    shifted = prob.clone()
    for key in ("master", "params", "grads", "exp_avgs", "exp_avg_sqs"):
        setattr(shifted, key, misalign(getattr(shifted, key)))
    assert shifted.params[0].data_ptr() % 8 != 0
    aligned = prob.clone().step(module)
    shifted.step(module)
    for o_list, a_list in zip(results(shifted), results(aligned), strict=True):
        for o, a in zip(o_list, a_list, strict=True):
            assert torch.equal(o, a)


@pytest.mark.gpu
def test_mixed_dtypes_in_one_call():
    """float32 norms and bfloat16/float16 matrices in one list: one launch group per dtype pair."""
    module = _cuda_module()
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    probs = [Problem([(513,), (64, 129)], d, torch.float32, "cuda") for d in dtypes]
    joined = Problem([], torch.float32, torch.float32, "cuda")
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"):
        setattr(joined, key, [t for p in probs for t in getattr(p, key)])
    joined.step(module)
    for p in probs:
        p.step(module)
    separate = [t for p in probs for t in p.params]
    for a, b in zip(joined.params, separate, strict=True):
        assert torch.equal(a, b)


# ---- the extensions, on both devices -------------------------------------------------------------


def _small(device, **kwargs):
    shapes = [(7,), (3, 5), (1000,), (64, 33)]
    return Problem(
        shapes, kwargs.pop("param_dtype", torch.float32), torch.float32, device, **kwargs
    )


def _check_device(device):
    return _cuda_module() if device == "cuda" else _module()


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_unscales_in_place(device):
    """grads / grad_scale are used and stored back (torch's fused AdamW does the same); a
    power-of-two scale makes the step bitwise equal to the unscaled one."""
    module = _check_device(device)
    plain = _small(device)
    scaled = plain.clone()
    scaled.grads = [g * 1024 for g in scaled.grads]
    scale = torch.tensor(1024.0, device=device)
    found = torch.zeros((), device=device)
    scaled.step(module, grad_scale=scale, found_inf=found)
    plain.step(module)
    assert_lists_equal(results(scaled), results(plain), "scaled step")
    for a, b in zip(scaled.grads, plain.grads, strict=True):
        assert torch.equal(a, b), "grads were not unscaled in place"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("master", [False, True])
def test_found_inf_skips_everything(device, master):
    module = _check_device(device)
    prob = _small(device, param_dtype=torch.bfloat16, master=master)
    before = prob.clone()
    prob.step(
        module, grad_scale=torch.tensor(8.0, device=device), found_inf=torch.ones((), device=device)
    )
    assert_lists_equal(results(prob), results(before), "found_inf step")
    for a, b in zip(prob.grads, before.grads, strict=True):
        assert torch.equal(a, b), "grads changed on a skipped step"
    assert all(torch.equal(a, b) for a, b in zip(prob.params, before.params, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_matches_torch_fused(device):
    """Same grads/params/states as torch._fused_adamw_ with GradScaler arguments (float32)."""
    module = _check_device(device)
    prob = _small(device, grad_scale=3.0)
    scale = torch.tensor(3.0, device=device)
    found = torch.zeros((), device=device)
    ref = prob.clone()
    steps = [torch.tensor(s, device=device) for s in ref.steps]
    torch._fused_adamw_(
        ref.params,
        ref.grads,
        ref.exp_avgs,
        ref.exp_avg_sqs,
        [],
        steps,
        lr=HYPER["lr"],
        beta1=HYPER["beta1"],
        beta2=HYPER["beta2"],
        weight_decay=HYPER["weight_decay"],
        eps=HYPER["eps"],
        amsgrad=False,
        maximize=False,
        grad_scale=scale,
        found_inf=found,
    )
    prob.step(module, grad_scale=scale, found_inf=found)
    for a, b in zip(prob.grads, ref.grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for name, o_list, r_list in zip(
        ("params", "exp_avg", "exp_avg_sq"), results(prob), results(ref), strict=True
    ):
        for o, r in zip(o_list, r_list, strict=True):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_device", ["same", "cpu"])
def test_lr_tensor_and_step_tensors_equal_host_scalars(device, lr_device):
    module = _check_device(device)
    hyper = dict(HYPER, lr=2.0**-10)  # exactly a float32
    host = _small(device).step(module, hyper=hyper)
    dev = _small(device)
    lr = torch.tensor(hyper["lr"], device=device if lr_device == "same" else "cpu")
    steps = [torch.tensor(s, device=device) for s in dev.steps]
    dev.step(module, hyper=dict(hyper, lr=0.0), lr_tensor=lr, step_tensors=steps)
    assert_lists_equal(results(dev), results(host), "device scalars")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_master_weights_equal_a_float32_step(device, amsgrad, maximize):
    """With master weights the update is the float32 update of the masters (grads widened), and
    params get the masters' rounding."""
    module = _check_device(device)
    prob = _small(device, param_dtype=torch.bfloat16, master=True, amsgrad=amsgrad)
    f32 = prob.clone()
    f32.params, f32.master = f32.master, []
    f32.grads = [g.float() for g in f32.grads]
    f32.step(module, amsgrad=amsgrad, maximize=maximize)
    prob.step(module, amsgrad=amsgrad, maximize=maximize)
    assert_lists_equal(results(prob), results(f32), "master step")
    for p, m in zip(prob.params, prob.master, strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_extension_arguments_are_validated(device):
    module = _check_device(device)
    prob = _small(device)
    with pytest.raises(TypeError, match="master"):
        prob.clone().step(module, master_params=[p.clone() for p in prob.params])  # float32 params
    with pytest.raises(ValueError, match="grad_scale"):
        prob.clone().step(module, grad_scale=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="step"):
        module.adamw_step(
            prob.params,
            prob.grads,
            prob.exp_avgs,
            prob.exp_avg_sqs,
            [],
            prob.steps,
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.0,
            False,
            False,
            step_tensors=[torch.tensor(1.0, device=device)] * len(prob.params),
        )
    with pytest.raises(TypeError, match="found_inf"):
        prob.clone().step(module, found_inf=torch.zeros((), device=device, dtype=torch.float64))
    if device == "cuda":
        with pytest.raises(ValueError, match="grad_scale"):
            prob.clone().step(module, grad_scale=torch.ones(()))  # CPU scale for CUDA params


# ---- GPU: CUDA graphs ----------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_capture_with_device_lr_and_steps():
    """One captured step replays with new lr / step values written into the device scalars,
    matching eager steps bitwise."""
    module = _cuda_module()
    shapes = gpt2_shapes(n_layer=2)
    prob = Problem(shapes, torch.bfloat16, torch.float32, "cuda", master=True)
    eager = prob.clone()
    lr = torch.tensor(1e-3, device="cuda")
    steps = [torch.tensor(1.0, device="cuda") for _ in shapes]
    scale = torch.tensor(4.0, device="cuda")
    found = torch.zeros((), device="cuda")
    grads_static = [g.clone() for g in prob.grads]

    def run(p, lr_t, step_ts):
        p.step(
            module,
            hyper=dict(HYPER, lr=0.0),
            lr_tensor=lr_t,
            step_tensors=step_ts,
            grad_scale=scale,
            found_inf=found,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, then restore the state
        warm = prob.clone()
        run(warm, lr, steps)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(prob, lr, steps)
    for k, lr_value in enumerate([1e-3, 5e-4, 2.5e-4]):
        lr.fill_(lr_value)
        for s in steps:
            s.fill_(k + 1.0)
        for g, g0 in zip(prob.grads, grads_static, strict=True):
            g.copy_(g0 * (k + 1))  # grads written by the "backward", scaled by 4 * (k + 1) / 4
        graph.replay()
        eager.grads = [g0 * (k + 1) for g0 in grads_static]
        run(
            eager,
            torch.tensor(lr_value, device="cuda"),
            [torch.tensor(k + 1.0, device="cuda") for _ in shapes],
        )
        torch.cuda.synchronize()
        assert_lists_equal(results(prob), results(eager), f"replay {k}")
        assert all(torch.equal(a, b) for a, b in zip(prob.params, eager.params, strict=True))


@pytest.mark.gpu
def test_runs_on_the_current_stream():
    """On a busy side stream, the grads are doubled behind a long sleep and then the step runs:
    a kernel launched on any other stream would read the old grads."""
    module = _cuda_module()
    prob = Problem(gpt2_shapes(n_layer=1), torch.float32, torch.float32, "cuda")
    expected = prob.clone()
    expected.grads = [g * 2 for g in expected.grads]
    expected.step(module)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        torch._foreach_mul_(prob.grads, 2.0)
        prob.step(module)
    torch.cuda.current_stream().wait_stream(side)
    assert_lists_equal(results(prob), results(expected), "side stream")


@pytest.mark.gpu
def test_ops_layer_routes_cuda_tensors_to_the_kernel():
    from fusedlm.backends import OpDispatch

    prob = _small("cuda")
    torch.ops.fusedlm.adamw_step(
        prob.params,
        prob.grads,
        prob.exp_avgs,
        prob.exp_avg_sqs,
        [],
        prob.steps,
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.0,
        False,
        False,
        "auto",
        [],
    )
    assert OpDispatch.last_choice["adamw_step"] == "cuda"
