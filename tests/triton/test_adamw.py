"""The Triton AdamW kernel (python/fusedlm/triton/adamw.py): fusedlm.optim.AdamW(backend="triton")
step for step against torch.optim.AdamW (truth: torch's AdamW in float64; baseline: torch's
at the parameter's dtype, DESIGN.md's rule), and the op directly (per-tensor step counts).

Without a GPU the kernel runs under TRITON_INTERPRET=1 on CPU tensors; most tests shrink the
per-program chunk (CHUNK = 64 elements, BLOCK = 16) so small odd sizes cross chunk and block
boundaries, and one test runs the real 32768-element chunks. ``gpu`` tests run realistic sizes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm import reference  # noqa: E402
from fusedlm.backends import OpDispatch  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402
from tests.ops.test_adamw import _call_op, _hyper, _state, _torch_adamw  # noqa: E402

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import adamw as triton_adamw  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
# Sizes around the shrunk chunk (64) and block (16): 0-d, 1, odd, exact multiples, one past.
SHAPES = [(), (1,), (7,), (3, 5), (16,), (17,), (64,), (65,), (2, 65)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(triton_adamw, "CHUNK", 64)
    monkeypatch.setattr(triton_adamw, "BLOCK", 16)


def _grads_for(shapes, dtype, steps, device=DEVICE):
    return [[(0.5 * torch.randn(s, dtype=torch.float64)).to(device, dtype) for s in shapes]
            for _ in range(steps)]


def _run_optimizer(cls, params0, grads_seq, dtype, **kwargs):
    """Parameters (cast to dtype) after len(grads_seq) steps of cls, and the optimizer."""
    params = [torch.nn.Parameter(p.detach().to(dtype).clone()) for p in params0]
    opt = cls(params, **kwargs)
    for grads in grads_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(dtype).clone()
        opt.step()
    return params, opt


def _check_against_torch(params0, grads_seq, dtype, hyper):
    """fusedlm.optim.AdamW(backend="triton") vs torch.optim.AdamW after every step's sequence:
    parameters and moments by the rule."""
    OpDispatch.last_choice.clear()
    ours, ours_opt = _run_optimizer(fusedlm.optim.AdamW, params0, grads_seq, dtype, backend=B,
                                    **hyper)
    assert OpDispatch.last_choice["adamw_step"] == "triton"
    truth, truth_opt = _run_optimizer(torch.optim.AdamW, params0, grads_seq, torch.float64,
                                      foreach=False, **hyper)
    base, base_opt = _run_optimizer(torch.optim.AdamW, params0, grads_seq, dtype, foreach=False,
                                    **hyper)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper["amsgrad"] else [])
    for i, (o, t, b) in enumerate(zip(ours, truth, base, strict=True)):
        assert o.dtype == dtype and o.shape == params0[i].shape
        assert_close_rule(o, b, t, name=f"params[{i}]")
        for key in keys:
            state = ours_opt.state[o][key]
            assert_close_rule(state, base_opt.state[b][key].to(state.dtype),
                              truth_opt.state[t][key], name=f"{key}[{i}]")
    return ours, base


# ---- optimizer, step for step -----------------------------------------------------------------


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optimizer_matches_torch(weight_decay, maximize, amsgrad, dtype):
    params0 = [torch.randn(s, dtype=torch.float64).to(DEVICE) for s in SHAPES]
    grads_seq = _grads_for(SHAPES, dtype, steps=3)
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
                 amsgrad=amsgrad, maximize=maximize)
    ours, base = _check_against_torch(params0, grads_seq, dtype, hyper)
    if dtype == torch.float32:  # same dtype, same arithmetic order: a few ulps apart
        for o, b in zip(ours, base, strict=True):
            torch.testing.assert_close(o, b, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.5, 0.999), (0.9, 0.999)], ids=str)
def test_optimizer_betas(betas):
    """beta1 >= 0.5 and < 0.5 take torch.lerp's two formulas; beta = 0 degenerates cleanly."""
    params0 = [torch.randn(s, dtype=torch.float64).to(DEVICE) for s in SHAPES[:5]]
    hyper = dict(lr=0.3, betas=betas, eps=0.1, weight_decay=0.5, amsgrad=False, maximize=False)
    _check_against_torch(params0, _grads_for(SHAPES[:5], torch.float32, 2), torch.float32, hyper)


def test_optimizer_real_chunks():
    """The real CHUNK (32768) and BLOCK: a tensor over one chunk, with a masked tail block."""
    shapes = [(triton_adamw.CHUNK + 37,), (5,)]
    params0 = [torch.randn(s, dtype=torch.float64).to(DEVICE) for s in shapes]
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=True,
                 maximize=False)
    _check_against_torch(params0, _grads_for(shapes, torch.float32, 2), torch.float32, hyper)


@pytest.mark.usefixtures("small_chunks")
def test_optimizer_mixed_dtypes_in_one_group():
    """float32, float16 and float64 parameters in one group: one launch per dtype group."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(DEVICE, dt))
              for s, dt in [((7,), torch.float32), ((65,), torch.float16), ((3, 5), torch.float32),
                            ((17,), torch.float64), ((1,), torch.float16)]]
    reference_params = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    ours = fusedlm.optim.AdamW(params, lr=0.01, weight_decay=0.1, backend=B)
    truth = torch.optim.AdamW(reference_params, lr=0.01, weight_decay=0.1, foreach=False)
    base = [torch.nn.Parameter(p.detach().clone()) for p in params]
    base_opt = torch.optim.AdamW(base, lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(3):
        for p, r, b in zip(params, reference_params, base, strict=True):
            g = torch.randn(p.shape, dtype=torch.float64).to(DEVICE, p.dtype)
            p.grad, r.grad, b.grad = g.clone(), g.double(), g.clone()
        ours.step()
        truth.step()
        base_opt.step()
    for i, (p, r, b) in enumerate(zip(params, reference_params, base, strict=True)):
        assert_close_rule(p, b, r, name=f"params[{i}] ({p.dtype})")


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_optimizer_non_contiguous_params(layout):
    """Views: updated through contiguous copies (transposed, strided) or in place at an
    address that is not 16-byte aligned (offset)."""
    def make():
        if layout == "transposed":
            return torch.randn(9, 7, dtype=torch.float64).to(DEVICE).t()
        if layout == "strided":
            return torch.randn(9, 14, dtype=torch.float64).to(DEVICE)[:, ::2]
        return torch.randn(70, dtype=torch.float64).to(DEVICE)[3:68].view(5, 13)

    params0 = [make(), torch.randn(17, dtype=torch.float64).to(DEVICE)]
    grads = [[torch.randn(p.shape, dtype=torch.float64).to(DEVICE, torch.float32) for p in params0]
             for _ in range(2)]
    results = []
    for cls, kwargs in ((fusedlm.optim.AdamW, {"backend": B}),
                        (torch.optim.AdamW, {"foreach": False})):
        ps = []
        for p in params0:
            buf = (p._base if p._base is not None else p).to(torch.float32).clone()
            ps.append(torch.nn.Parameter(buf.as_strided(p.shape, p.stride(), p.storage_offset())))
        assert (layout == "offset") == ps[0].is_contiguous()
        opt = cls(ps, lr=0.01, weight_decay=0.1, amsgrad=True, **kwargs)
        for step_grads in grads:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(ps)
    for i, (ours, theirs) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=f"param {i}")


# ---- the op directly --------------------------------------------------------------------------


DTYPE_CASES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
]
DTYPE_IDS = [f"{str(p).split('.')[1]}-states_{str(s).split('.')[1]}" for p, s in DTYPE_CASES]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_op_per_tensor_steps(amsgrad, param_dtype, state_dtype):
    """Different step counts per tensor (a table of bias corrections) in one call."""
    steps = [1, 3, 10, 2, 1000, 7, 1, 50, 4]
    params = [torch.randn(s, dtype=torch.float64).to(DEVICE, param_dtype) for s in SHAPES]
    grads = [(0.5 * torch.randn(s, dtype=torch.float64)).to(DEVICE, param_dtype) for s in SHAPES]
    states = [_state(s, param_dtype, state_dtype, DEVICE, amsgrad, fresh=step == 1)
              for s, step in zip(SHAPES, steps, strict=True)]
    hyper = _hyper(amsgrad, maximize=True, weight_decay=0.05)
    ours_p, ours_s = _call_op(params, grads, states, steps, hyper, B)
    truth_p, truth_s = _torch_adamw(params, grads, states, steps, torch.float64, hyper)
    base_p, base_s = _torch_adamw(params, grads, states, steps, param_dtype, hyper)
    ref_p, _ = _call_op(params, grads, states, steps, hyper, B, fn=reference.adamw_step)
    for i in range(len(params)):
        assert_close_rule(ours_p[i], base_p[i], truth_p[i], name=f"params[{i}]")
        for name, ours, base, truth in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ours_s,
                                           base_s, truth_s, strict=False):
            assert ours[i].dtype == state_dtype
            assert_close_rule(ours[i], base[i], truth[i], name=f"{name}[{i}]")
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(param_dtype, 1e-2)
        torch.testing.assert_close(ours_p[i], ref_p[i], rtol=tol, atol=tol)


@pytest.mark.usefixtures("small_chunks")
def test_op_zero_size_and_empty_list():
    torch.ops.fusedlm.adamw_step([], [], [], [], [], [], 0.1, 0.9, 0.999, 1e-8, 0.0, False,
                                 False, B, [])
    empty, one = torch.empty(0, device=DEVICE), torch.ones(1, device=DEVICE)
    torch.ops.fusedlm.adamw_step(
        [empty, one], [empty.clone(), one.clone()], [empty.clone(), torch.zeros(1, device=DEVICE)],
        [empty.clone(), torch.zeros(1, device=DEVICE)], [], [1.0, 1.0], 0.1, 0.9, 0.999, 1e-8,
        0.0, False, False, B, [],
    )
    # First step, zero states: p - lr * g / (|g| + eps) = 1 - 0.1 * 1 / (1 + 1e-8).
    torch.testing.assert_close(one, torch.full((1,), 0.9, device=DEVICE), rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("small_chunks")
def test_tables_are_cached_per_tensor_set():
    """Repeated steps over the same tensors reuse the device tables; other tensors of the same
    sizes get their own (the table holds addresses)."""
    triton_adamw._table_cache.clear()
    p = [torch.randn(65, device=DEVICE), torch.randn(3, device=DEVICE)]
    args = lambda ps: (ps, [torch.ones_like(t) for t in ps], [torch.zeros_like(t) for t in ps],  # noqa: E731
                       [torch.zeros_like(t) for t in ps], [], [1.0, 1.0], 0.1, 0.9, 0.999, 1e-8,
                       0.0, False, False)
    a = args(p)
    triton_adamw.adamw_step(*a)
    assert len(triton_adamw._table_cache) == 1
    a[5][:] = [2.0, 2.0]
    triton_adamw.adamw_step(*a)
    assert len(triton_adamw._table_cache) == 1
    q = [t.clone() for t in p]
    expected = [t.clone() for t in q]
    reference.adamw_step(*args(expected))
    triton_adamw.adamw_step(*args(q))
    assert len(triton_adamw._table_cache) == 2
    for ours, ref in zip(q, expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def _adamw_args(**overrides):
    args = {
        "params": [torch.randn(4, device=DEVICE)], "grads": [torch.randn(4, device=DEVICE)],
        "exp_avgs": [torch.zeros(4, device=DEVICE)], "exp_avg_sqs": [torch.zeros(4, device=DEVICE)],
        "max_exp_avg_sqs": [], "steps": [1.0], "lr": 1e-3, "beta1": 0.9, "beta2": 0.999,
        "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False,
    }
    args.update(overrides)
    return list(args.values())


BAD_CASES = [
    ("grads_count", ValueError, "'grads'", {"grads": []}),
    ("grads_shape", ValueError, r"'grads\[0\]'", {"grads": [torch.randn(5, device=DEVICE)]}),
    ("grads_dtype", TypeError, r"'grads\[0\]'",
     {"grads": [torch.randn(4, dtype=torch.float64, device=DEVICE)]}),
    ("exp_avgs_dtype", TypeError, r"'exp_avgs\[0\]'",
     {"exp_avgs": [torch.zeros(4, dtype=torch.float64, device=DEVICE)]}),
    ("exp_avg_sqs_shape", ValueError, r"'exp_avg_sqs\[0\]'",
     {"exp_avg_sqs": [torch.zeros(2, 2, device=DEVICE)]}),
    ("exp_avg_sqs_16bit_under_float32", TypeError, r"'exp_avg_sqs\[0\]'",
     {"params": [torch.randn(4, dtype=torch.float16, device=DEVICE)],
      "grads": [torch.randn(4, dtype=torch.float16, device=DEVICE)],
      "exp_avg_sqs": [torch.zeros(4, dtype=torch.float16, device=DEVICE)]}),
    ("params_int", TypeError, r"'params\[0\]'",
     {"params": [torch.ones(4, dtype=torch.int32, device=DEVICE)]}),
    ("max_sqs_without_amsgrad", ValueError, "'max_exp_avg_sqs'",
     {"max_exp_avg_sqs": [torch.zeros(4, device=DEVICE)]}),
    ("max_sqs_missing_with_amsgrad", ValueError, "'max_exp_avg_sqs'", {"amsgrad": True}),
    ("steps_count", ValueError, "'steps'", {"steps": [1.0, 2.0]}),
    ("steps_zero", ValueError, "steps", {"steps": [0.0]}),
    ("steps_nan", ValueError, "steps", {"steps": [float("nan")]}),
    ("lr_negative", ValueError, "'lr'", {"lr": -1.0}),
    ("beta1_one", ValueError, "'beta1'", {"beta1": 1.0}),
    ("beta2_negative", ValueError, "'beta2'", {"beta2": -0.1}),
    ("eps_negative", ValueError, "'eps'", {"eps": -1e-8}),
    ("weight_decay_inf", ValueError, "'weight_decay'", {"weight_decay": float("inf")}),
]


@pytest.mark.parametrize(("exc", "argument", "overrides"), [c[1:] for c in BAD_CASES],
                         ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_the_argument_and_changes_nothing(exc, argument, overrides):
    args = _adamw_args(**overrides)
    before = [t.clone() for t in args[0]]
    with pytest.raises(exc, match=argument):
        triton_adamw.adamw_step(*args)
    for t, b in zip(args[0], before, strict=True):
        assert torch.equal(t, b)


# ---- sm_90 builds (no GPU needed) -------------------------------------------------------------

# (param dtype, state dtype, tensors, options): every dtype pair, each option on and off at
# least once (per_tensor_steps / step_tensor: the three STEPS modes; misaligned: ALIGNED off),
# one and several tensors (num_tensors 1 is specialized).
SM90_BUILDS = [
    (torch.float32, torch.float32, 2, ""),
    (torch.bfloat16, torch.float32, 1,
     "amsgrad maximize step_tensor lr_tensor grad_scale found_inf"),
    (torch.float16, torch.float16, 3, "amsgrad per_tensor_steps grad_scale misaligned"),
    (torch.bfloat16, torch.bfloat16, 2, "maximize lr_tensor found_inf misaligned"),
    (torch.float16, torch.float32, 2, "maximize step_tensor grad_scale"),
    (torch.float64, torch.float64, 2, "amsgrad maximize per_tensor_steps lr_tensor found_inf"),
    (torch.float64, torch.float32, 1, "step_tensor grad_scale misaligned"),
]


def _launch_for_sm90(param_dtype, state_dtype, tensors, options):
    """adamw_step on empty CPU tensors (the kernel is recorded, not run)."""
    options = options.split()

    def make(dtype):  # misaligned: one element past a 16-byte boundary
        return [torch.empty(1001, dtype=dtype)[1:] if "misaligned" in options
                else torch.empty(1000, dtype=dtype) for _ in range(tensors)]

    kwargs = {}
    steps = [3.0] * tensors
    if "per_tensor_steps" in options:
        steps = [float(i + 1) for i in range(tensors)]
    if "step_tensor" in options:
        steps, kwargs["step_tensor"] = [], torch.full((tensors,), 3.0)
    for name, value in (("lr_tensor", 1e-3), ("grad_scale", 2.0), ("found_inf", 0.0)):
        if name in options:
            kwargs[name] = torch.tensor([value])
    amsgrad = "amsgrad" in options
    triton_adamw.adamw_step(
        make(param_dtype), make(param_dtype), make(state_dtype), make(state_dtype),
        make(state_dtype) if amsgrad else [], steps, 1e-3, 0.9, 0.999, 1e-8, 0.01, amsgrad,
        "maximize" in options, **kwargs,
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the real builds")
def test_kernels_build_for_sm90(monkeypatch):
    """The interpreter runs Python, not Triton's compiler: build the kernel as the launcher
    calls it for sm_90 (MLIR, PTX, ptxas; no GPU needed) to catch what only the compiler
    rejects, shared memory over the H100's and register spills."""
    import collections

    from tests.triton.sm90_build import (
        build_for_sm90,
        problems,
        record_launches,
        require_nvidia_backend,
    )

    require_nvidia_backend()

    monkeypatch.setattr(triton_adamw, "_table_cache", collections.OrderedDict())
    launches = record_launches(monkeypatch, triton_adamw, "adamw_step_kernel")
    for case in SM90_BUILDS:
        _launch_for_sm90(*case)
    assert len(launches) == len(SM90_BUILDS)
    flags = ("AMSGRAD", "MAXIMIZE", "HAS_LR", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "ALIGNED")
    for name in flags:  # the cases reach each value
        assert {launch["kwargs"][name] for launch in launches} == {False, True}, name
    assert {launch["kwargs"]["STEPS"] for launch in launches} == {0, 1, 2}
    failures = problems(launches, build_for_sm90(launches))
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


# A GPT-2-small-like parameter list: embeddings, per-layer matrices, biases and norm weights.
GPU_SHAPES = [(50257, 768), (1024, 768)] + [(768, 2304), (2304,), (768, 768), (768,), (768,),
                                            (768, 3072), (3072,), (3072, 768), (768,)] * 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_gpu_optimizer_large(amsgrad, dtype):
    params0 = [torch.randn(s, dtype=torch.float64, device="cuda") for s in GPU_SHAPES]
    grads_seq = _grads_for(GPU_SHAPES, dtype, steps=3, device="cuda")
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
                 maximize=False)
    _check_against_torch(params0, grads_seq, dtype, hyper)


@pytest.mark.gpu
def test_gpu_matches_torch_fused_float32():
    """float32: within a few ulps of torch's own fused CUDA AdamW over 5 steps."""
    params0 = [torch.randn(s, dtype=torch.float64, device="cuda") for s in GPU_SHAPES]
    grads_seq = _grads_for(GPU_SHAPES, torch.float32, steps=5, device="cuda")
    ours, _ = _run_optimizer(fusedlm.optim.AdamW, params0, grads_seq, torch.float32, backend=B,
                             lr=1e-3, weight_decay=0.1)
    fused, _ = _run_optimizer(torch.optim.AdamW, params0, grads_seq, torch.float32, fused=True,
                              lr=1e-3, weight_decay=0.1)
    for o, f in zip(ours, fused, strict=True):
        torch.testing.assert_close(o, f, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_steady_state_step_does_no_host_sync():
    """With cached tables and equal step counts a step is one launch per dtype group, without
    host-to-device copies: it must be capturable by a CUDA graph."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in GPU_SHAPES[:6]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fusedlm.optim.AdamW(params, lr=1e-3, backend=B)
    opt.step()  # builds and caches the tables
    steps = [float(opt.state[p]["step"]) + 1 for p in params]
    args = (params, [p.grad for p in params], [opt.state[p]["exp_avg"] for p in params],
            [opt.state[p]["exp_avg_sq"] for p in params], [], steps, 1e-3, 0.9, 0.999, 1e-8,
            0.01, False, False)
    triton_adamw.adamw_step(*args)  # same tensors: a cache hit from here on
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_adamw.adamw_step(*args)
    graph.replay()
    torch.cuda.synchronize()


# ---- extensions: lr_tensor, step_tensor, grad_scale, found_inf --------------------------------

from tests.ops.test_adamw import (  # noqa: E402
    EXTENSION_CASES,
    _call_op_ext,
    _extensions,
    _grad_scale,
    _unscaled,
)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize(("param_dtype", "state_dtype"), DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("amsgrad", "maximize"), [(False, False), (True, True)],
                         ids=["adam-min", "amsgrad-max"])
@pytest.mark.parametrize("case", list(EXTENSION_CASES))
def test_op_extensions_vs_torch(case, maximize, amsgrad, param_dtype, state_dtype):
    """lr and per-tensor step counts read in the kernel, grads unscaled in it: torch's AdamW on
    the unscaled grads by the rule, the grads left unscaled, the reference within rounding."""
    steps = [1, 3, 10, 2, 1000, 7, 1, 50, 4]
    which = EXTENSION_CASES[case]
    params = [torch.randn(s, dtype=torch.float64).to(DEVICE, param_dtype) for s in SHAPES]
    grads = [(0.5 * torch.randn(s, dtype=torch.float64)).to(DEVICE, param_dtype) for s in SHAPES]
    states = [_state(s, param_dtype, state_dtype, DEVICE, amsgrad, fresh=step == 1)
              for s, step in zip(SHAPES, steps, strict=True)]
    hyper = _hyper(amsgrad, maximize, weight_decay=0.05)
    scale = _grad_scale(param_dtype)
    extensions = _extensions(which, steps, hyper, DEVICE, scale=scale)
    hyper = dict(hyper, lr=float(extensions[0].get("lr_tensor", hyper["lr"])))
    if "grad_scale" in which:
        given = [(g.double() * scale).to(param_dtype) for g in grads]
        unscaled, exact = _unscaled(given, scale), [g.double() / scale for g in given]
    else:
        given = unscaled = exact = grads
    ours_p, ours_s, ours_g = _call_op_ext(params, given, states, steps, hyper, B, extensions)
    truth_p, truth_s = _torch_adamw(params, exact, states, steps, torch.float64, hyper)
    base_p, base_s = _torch_adamw(params, unscaled, states, steps, param_dtype, hyper)
    ref_p, _, ref_g = _call_op_ext(params, given, states, steps, hyper, B, extensions,
                                   fn=reference.adamw_step)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(param_dtype, 1e-2)
    for i in range(len(params)):
        assert_close_rule(ours_p[i], base_p[i], truth_p[i], name=f"params[{i}]")
        for name, ours, base, truth in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ours_s,
                                           base_s, truth_s, strict=False):
            assert ours[i].dtype == state_dtype
            assert_close_rule(ours[i], base[i], truth[i], name=f"{name}[{i}]")
        torch.testing.assert_close(ours_p[i], ref_p[i], rtol=tol, atol=tol)
        torch.testing.assert_close(ours_g[i], unscaled[i], rtol=0, atol=0)
        torch.testing.assert_close(ref_g[i], unscaled[i], rtol=0, atol=0)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16], ids=str)
def test_op_found_inf_changes_nothing(param_dtype):
    params = [torch.randn(s, dtype=torch.float64).to(DEVICE, param_dtype) for s in SHAPES]
    grads = [torch.randn(s, dtype=torch.float64).to(DEVICE, param_dtype) for s in SHAPES]
    grads[2][0] = float("inf")
    states = [_state(s, param_dtype, torch.float32, DEVICE, True, fresh=False) for s in SHAPES]
    steps = [3] * len(SHAPES)
    hyper = _hyper(True, False, weight_decay=0.05)
    ours_p, ours_s, ours_g = _call_op_ext(
        params, grads, states, steps, hyper, B,
        _extensions(set(EXTENSION_CASES["all"]), steps, hyper, DEVICE, found=1.0),
    )
    for i in range(len(params)):
        assert torch.equal(ours_p[i], params[i]) and torch.equal(ours_g[i], grads[i])
        for k, ours in enumerate(ours_s):
            assert torch.equal(ours[i], states[i][k])


@pytest.mark.usefixtures("small_chunks")
def test_op_grad_scale_non_contiguous_grads_written_back():
    """A strided grad is unscaled through its contiguous stand-in and copied back."""
    p = torch.randn(9, 7, device=DEVICE).t()
    g = (4.0 * torch.randn(9, 7, device=DEVICE)).t()
    before = g.clone()
    torch.ops.fusedlm.adamw_step(
        [p], [g], [torch.zeros(9, 7, device=DEVICE).t()], [torch.zeros(9, 7, device=DEVICE).t()],
        [], [1.0], 0.01, 0.9, 0.999, 1e-8, 0.0, False, False, B, [],
        grad_scale=torch.tensor(4.0, device=DEVICE),
    )
    torch.testing.assert_close(g, before / 4.0, rtol=0, atol=0)


@pytest.mark.usefixtures("small_chunks")
def test_op_step_tensor_indexes_the_callers_list_across_dtype_groups():
    """Two dtype groups, one launch each: each tensor reads its own entry of step_tensor."""
    shapes_dtypes = [((7,), torch.float32), ((65,), torch.float16), ((3, 5), torch.float32),
                     ((17,), torch.float64), ((1,), torch.float16)]
    steps = [2, 9, 1, 30, 5]
    params = [torch.randn(s, dtype=torch.float64).to(DEVICE, d) for s, d in shapes_dtypes]
    grads = [torch.randn(s, dtype=torch.float64).to(DEVICE, d) for s, d in shapes_dtypes]
    states = [_state(s, d, torch.float32 if d != torch.float64 else d, DEVICE, False,
                     fresh=False) for s, d in shapes_dtypes]
    hyper = _hyper(False, False, 0.1)
    ours_p, _, _ = _call_op_ext(params, grads, states, steps, hyper, B,
                                _extensions({"step_tensor"}, steps, hyper, DEVICE))
    ref_p, _, _ = _call_op_ext(params, grads, states, steps, hyper, B,
                               ({}, [float(s) for s in steps], hyper["lr"]),
                               fn=reference.adamw_step)
    for ours, ref in zip(ours_p, ref_p, strict=True):
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(ours.dtype, 1e-2)
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("fused", [None, True], ids=["steps_on_host", "steps_on_device"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_optimizer_grad_scaler_matches_torch_non_fused(lr_kind, fused):
    """fusedlm.optim.AdamW(backend="triton") + GradScaler (scale and found_inf handled in the
    kernel) equals torch.optim.AdamW(fused=False) + GradScaler, with inf and NaN steps."""
    torch.manual_seed(0)
    shapes = [(65,), (3, 5), (17,)]
    params0 = [torch.randn(s) for s in shapes]
    lr = torch.tensor(0.01) if lr_kind == "tensor" else 0.01
    runs = []
    for cls, kwargs in ((fusedlm.optim.AdamW, {"backend": B, "fused": fused}),
                        (torch.optim.AdamW, {"foreach": False})):
        ps = [torch.nn.Parameter(p.clone().to(DEVICE)) for p in params0]
        opt = cls(ps, lr=lr, eps=1e-3, weight_decay=0.1, amsgrad=True, **kwargs)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**6, growth_interval=2)
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            loss = sum((p * torch.randn(p.shape, generator=g).to(DEVICE)).sum() ** 2 for p in ps)
            if step in (2, 3):
                loss = loss * (float("inf") if step == 2 else float("nan"))
            for p in ps:
                p.grad = None
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((ps, opt, scaler.get_scale()))
    (ours, ours_opt, ours_scale), (theirs, theirs_opt, theirs_scale) = runs
    assert ours_scale == theirs_scale
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert float(ours_opt.state[p]["step"]) == float(theirs_opt.state[q]["step"]) == 4.0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(ours_opt.state[p][key], theirs_opt.state[q][key],
                                       rtol=1e-5, atol=1e-7)
