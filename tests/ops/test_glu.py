"""fusedlm.swiglu, fusedlm.geglu and the custom ops behind them (fusedlm::glu_fwd / glu_bwd,
activation "silu", "gelu" or "gelu_tanh"), against eager ``F.silu(gate) * up`` /
``F.gelu(gate, approximate=...) * up`` by DESIGN.md's rule: truth in float64, baseline the same
eager code in the inputs' dtype. The Triton kernels' own cases (interpreter runs, realistic
sizes on a GPU) are in tests/triton/test_glu.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import BackendNotSupportedError, OpDispatch
from tests.helpers import DTYPES, assert_close_rule, device_of, kernel_backends

glu_ops = sys.modules["fusedlm.ops.glu"]

# The C++ kernels take CPU tensors, the Triton ones CUDA tensors (there is no CUDA C++ kernel).
BACKENDS = [*kernel_backends(), pytest.param("triton", marks=pytest.mark.gpu, id="triton"),
            "torch"]

# Widths 1, 127, 4099; one row; 1-D, 3-D and 4-D inputs; enough elements for the CPU kernels
# to split rows across threads (32768 elements a task).
SHAPES = [(1, 1), (5, 1), (17, 127), (3, 4099), (8,), (2, 3, 64), (2, 3, 5, 33), (150, 250)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def randn(shape, dtype, device="cpu", scale=1.0):
    return (scale * torch.randn(shape, dtype=torch.float64)).to(device, dtype)


# The op's activations; the public function of each: fusedlm.swiglu, or fusedlm.geglu with
# F.gelu's approximate.
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def glu(gate, up, activation="silu", backend="auto"):
    """The public function of ``activation``."""
    if activation == "silu":
        return fusedlm.swiglu(gate, up, backend=backend)
    return fusedlm.geglu(gate, up, approximate=APPROXIMATE[activation], backend=backend)


def eager_act(gate, activation="silu"):
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate=APPROXIMATE[activation])


def eager_glu(gate, up, activation="silu"):
    return eager_act(gate, activation) * up


def check_glu(gate, up, backend, activation="silu", backward=True, grad=None):
    """fusedlm.swiglu / geglu(gate, up) and its dgate, dup against eager act(gate) * up by the
    rule. ``grad`` (default: random in the inputs' dtype) is the output's gradient."""
    leaves = [t.detach().requires_grad_(backward) for t in (gate, up)]
    out = glu(*leaves, activation, backend)
    assert out.dtype == gate.dtype and out.shape == gate.shape and out.device == gate.device
    assert out.is_contiguous()
    leaves64 = [t.detach().double().requires_grad_(backward) for t in (gate, up)]
    truth = eager_glu(*leaves64, activation)
    leaves_t = [t.detach().clone().requires_grad_(backward) for t in (gate, up)]
    baseline = eager_glu(*leaves_t, activation)
    assert_close_rule(out, baseline, truth, name="out")
    if not backward:
        return out
    if grad is None:
        grad = randn(gate.shape, gate.dtype, gate.device)
    ours = torch.autograd.grad(out, leaves, grad)
    truths = torch.autograd.grad(truth, leaves64, grad.double())
    theirs = torch.autograd.grad(baseline, leaves_t, grad)
    for name, g, gt, g64 in zip(("dgate", "dup"), ours, theirs, truths, strict=True):
        assert g.dtype == gate.dtype and g.shape == gate.shape, name
        assert_close_rule(g, gt, g64, name=name)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu(activation, shape, dtype, backend):
    device = device_of(backend)
    # gate over the activation's whole range (|gate| up to ~12), up ~ N(0, 1)
    check_glu(randn(shape, dtype, device, 3.0), randn(shape, dtype, device), backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saturated_gates(activation, dtype, backend):
    """Gates far into the activation's tails (|gate| 10 to 1e4, past float32's exp overflow at
    88.7 and gelu's normal CDF underflow): act -> gate or -> 0 (no overflow into NaN), and the
    gradient's tails; 8-wide groups and a tail (the CPU kernels' AVX2 loop and its scalar
    remainder)."""
    device = device_of(backend)
    extremes = torch.tensor([-1e4, -100.0, -89.0, -88.7, -87.0, 87.0, 88.7, 89.0, 100.0, 1e4])
    gate = torch.cat([torch.linspace(-80, -10, 50), torch.linspace(10, 80, 50), extremes,
                      torch.zeros(1)]).to(device, dtype).reshape(1, -1).expand(3, -1)
    check_glu(gate, randn(gate.shape, dtype, device), backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_lower_tail_and_transition(activation, dtype, backend):
    """Every gate from -14 to 6 in steps of 1/64 (where the normal CDF and the tanh-gelu's
    sigmoid run from 1e-44 to 1: the erfc polynomial's range, the sigmoid's 1 - s), 8-lane
    groups and a tail; and the relative error of gelu's lower tail, which 1 + erf(g / sqrt(2))
    loses to cancellation (torch's kernels) and the C++ kernels keep (erfc): within 1e-4 of the
    truth down to gate -9 (values ~1e-19) in float32. (The Triton kernels compute 1 + erf, as
    torch's CUDA kernel: the rule alone.)"""
    device = device_of(backend)
    gate = torch.arange(-14 * 64, 6 * 64 + 3, dtype=torch.float64).div(64).to(device, dtype)
    gate = gate.reshape(1, -1).expand(2, -1)
    check_glu(gate, randn(gate.shape, dtype, device), backend, activation)
    if activation == "gelu" and backend == "cpu":
        tail = torch.linspace(-9, -1, 801, dtype=torch.float64)
        ones = torch.ones_like(tail)
        out = glu(tail.to(dtype), ones.to(dtype), activation, backend).double()
        truth = tail * 0.5 * torch.erfc(-tail / 2**0.5)  # (F.gelu cancels in float64 too)
        assert ((out - truth).abs() / truth.abs()).max() < 1e-4


# gate and up as a model hands them over: the two halves of one fused (N, 2W) projection
# (torch.chunk), transposed, every other column, rows expanded (stride 0), a storage offset.
LAYOUTS = ["chunk_halves", "transposed", "column_stride", "expanded_rows", "offset"]


def _operands_in_layout(layout, N, W, dtype, device):
    if layout == "chunk_halves":
        return randn((N, 2 * W), dtype, device, 2.0).chunk(2, dim=-1)
    if layout == "transposed":
        return tuple(randn((W, N), dtype, device, 2.0).t() for _ in range(2))
    if layout == "column_stride":
        return tuple(randn((N, 2 * W), dtype, device, 2.0)[:, ::2] for _ in range(2))
    if layout == "expanded_rows":
        return tuple(randn((1, W), dtype, device, 2.0).expand(N, W) for _ in range(2))
    flats = [randn((N * W + 3,), dtype, device, 2.0) for _ in range(2)]
    return tuple(f[3:].view(N, W) for f in flats)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_contiguous_inputs(activation, layout, dtype, backend):
    device = device_of(backend)
    for N, W in ((17, 127), (4, 4099)):
        gate, up = _operands_in_layout(layout, N, W, dtype, device)
        assert not gate.is_contiguous() or layout == "offset"
        check_glu(gate, up, backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_chunk_halves_of_a_3d_projection(activation, backend):
    """(B, T, 2W) chunked along the last dim (rows 2W apart: flattened as a view), and its
    (T, B, W) transpose, whose rows are not one stride apart (flattened by a copy)."""
    device = device_of(backend)
    h = randn((2, 9, 2 * 40), torch.float32, device, 2.0)
    gate, up = h.chunk(2, dim=-1)
    check_glu(gate, up, backend, activation)
    check_glu(gate.transpose(0, 1), up.transpose(0, 1), backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reduced_loss_gradient(activation, backend):
    """A summed loss's gradient reaches the backward expanded (every stride 0), 2-D and 3-D."""
    device = device_of(backend)
    for shape in ((13, 70), (2, 5, 33)):
        gate, up = randn(shape, torch.float32, device, 3.0), randn(shape, torch.float32, device)
        grad = torch.ones((), device=device).expand(shape)
        check_glu(gate, up, backend, activation, grad=grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 3, 4), (2, 0, 7)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_inputs(activation, shape, backend):
    device = device_of(backend)
    gate, up = (randn(shape, torch.float32, device).requires_grad_(True) for _ in range(2))
    out = glu(gate, up, activation, backend)
    assert out.shape == shape and out.dtype == torch.float32
    out.sum().backward()
    assert gate.grad.shape == shape and up.grad.shape == shape


@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
@pytest.mark.parametrize("shape", [(0,), (2, 3, 0)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_last_dim_beyond_2d(activation, shape, backend):
    """F.silu(gate) * up (F.gelu) takes any empty shape; so must fusedlm.swiglu (geglu)."""
    gate, up = torch.randn(shape), torch.randn(shape)
    assert glu(gate, up, activation, backend).shape == eager_glu(gate, up, activation).shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_only_where_asked(activation, backend):
    device = device_of(backend)
    gate, up = randn((6, 20), torch.float32, device, 3.0), randn((6, 20), torch.float32, device)
    for requires in ((True, False), (False, True)):
        leaves = [t.clone().requires_grad_(r) for t, r in zip((gate, up), requires, strict=True)]
        glu(*leaves, activation, backend).sum().backward()
        reference = [t.clone().requires_grad_(r) for t, r in zip((gate, up), requires,
                                                                   strict=True)]
        eager_glu(*reference, activation).sum().backward()
        for leaf, ref in zip(leaves, reference, strict=True):
            if ref.grad is None:
                assert leaf.grad is None
            else:
                torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_geglu_defaults_to_exact_gelu_as_f_gelu():
    """fusedlm.geglu's approximate defaults to "none", as F.gelu's: the exact gelu, which the
    tanh approximation misses by up to ~5e-4 around |gate| ~ 2."""
    gate, up = torch.linspace(-4, 4, 801, dtype=torch.float64), torch.ones(801, dtype=torch.float64)
    default = fusedlm.geglu(gate, up)
    torch.testing.assert_close(default, F.gelu(gate), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(default, fusedlm.geglu(gate, up, approximate="none"), rtol=0,
                               atol=0)
    tanh = fusedlm.geglu(gate, up, approximate="tanh")
    torch.testing.assert_close(tanh, F.gelu(gate, approximate="tanh"), rtol=1e-12, atol=1e-12)
    assert (tanh - default).abs().max() > 1e-4


# ---- gradients: gradcheck, opcheck, memory ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 9), (2, 3, 7), (11,)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation, shape, backend):
    device = device_of(backend)
    gate, up = (randn(shape, torch.float64, device, 2.0).requires_grad_(True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda g, u: glu(g, u, activation, backend), (gate, up))
    # the two halves of one fused projection (a leaf of (N, 2W))
    h = randn((4, 14), torch.float64, device, 2.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: glu(*t.chunk(2, dim=-1), activation, backend),
                                    (h,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck(activation, dtype, backend):
    device = device_of(backend)
    gate, up = (randn((7, 13), dtype, device, 2.0).requires_grad_(True) for _ in range(2))
    fwd, bwd = torch.ops.fusedlm.glu_fwd.default, torch.ops.fusedlm.glu_bwd.default
    torch.library.opcheck(fwd, (gate, up, activation, backend))
    halves = randn((7, 26), dtype, device).requires_grad_(True).chunk(2, dim=-1)
    torch.library.opcheck(fwd, (*halves, activation, backend))
    grad = randn((7, 13), dtype, device)
    torch.library.opcheck(bwd, (grad, gate.detach(), up.detach(), activation, backend))
    torch.library.opcheck(bwd, (grad.t().contiguous().t(), *(h.detach() for h in halves),
                                activation, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 20), (2, 3, 20)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saves_only_gate_and_up(activation, shape, backend):
    """Autograd keeps gate and up alone (views of them, no copy); eager act(gate) * up keeps
    act(gate) too, one more activation-sized tensor per MLP."""
    device = device_of(backend)
    gate, up = (randn(shape, torch.float32, device).requires_grad_(True) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = glu(gate, up, activation, backend)
    assert len(saved) == 2, [tuple(t.shape) for t in saved]
    assert sorted(t.data_ptr() for t in saved) == sorted((gate.data_ptr(), up.data_ptr()))
    assert all(t.numel() == gate.numel() for t in saved)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(up.grad, eager_act(gate.detach(), activation))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        eager_glu(gate, up, activation)
    assert len(saved) == 3


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_is_not_differentiable_again(activation):
    """The kernels' gradients have no second derivative: with create_graph=True a first backward
    works and a second one raises (once_differentiable), instead of a silently wrong (zero)
    term."""
    gate, up = (randn((4, 9), torch.float32).requires_grad_(True) for _ in range(2))
    (dgate,) = torch.autograd.grad(glu(gate, up, activation).pow(2).sum(), gate,
                                   create_graph=True)
    expected = torch.autograd.grad(eager_glu(gate, up, activation).pow(2).sum(), gate)[0]
    torch.testing.assert_close(dgate, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dgate.sum().backward()


# ---- dispatch: no_grad, autocast, backends, transforms ----------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_without_autograd_skips_the_function(activation, backend, monkeypatch):
    """Under torch.no_grad() or with no input requiring grad, the forward runs without the
    autograd.Function and gives the grad-mode output bit for bit."""
    device = device_of(backend)
    gate, up = randn((2, 5, 40), torch.float32, device, 3.0), randn((2, 5, 40), torch.float32,
                                                                    device)
    expected = glu(gate.clone().requires_grad_(True), up, activation, backend)
    assert expected.grad_fn is not None

    def refuse(*_):
        raise AssertionError("the autograd.Function ran without autograd")

    with monkeypatch.context() as m:
        m.setattr(glu_ops._GluEager, "apply", refuse)
        with torch.no_grad():
            no_grad = glu(gate.clone().requires_grad_(True), up, activation, backend)
        plain = glu(gate, up, activation, backend)
    for out in (no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_leaves_the_dtype_alone(activation, dtype, backend):
    """fusedlm.swiglu / geglu are on none of autocast's cast lists, as eager act(gate) * up is
    not: under bfloat16 autocast they run in their inputs' dtype (float32 stays float32,
    bfloat16 stays bfloat16), forward and gradients bit for bit the call without autocast."""
    device = device_of(backend)
    device_type = torch.device(device).type
    gate, up = randn((6, 40), dtype, device, 3.0), randn((6, 40), dtype, device)
    grad = randn((6, 40), dtype, device)
    results = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (gate, up)]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled):
            out = glu(*leaves, activation, backend)
            eager_dtype = eager_glu(*leaves, activation).dtype
        results.append((out, torch.autograd.grad(out, leaves, grad)))
        assert out.dtype == eager_dtype == dtype
    (out, grads), (out_autocast, grads_autocast) = results
    torch.testing.assert_close(out_autocast, out, rtol=0, atol=0)
    for g, g_autocast in zip(grads, grads_autocast, strict=True):
        assert g_autocast.dtype == dtype
        torch.testing.assert_close(g_autocast, g, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_auto_on_cpu_takes_the_cpu_kernels(activation):
    gate, up = (randn((4, 9), torch.float32).requires_grad_(True) for _ in range(2))
    for op in ("glu_fwd", "glu_bwd"):
        OpDispatch.last_choice.pop(op, None)
    glu(gate, up, activation).sum().backward()
    expected = "cpu" if fusedlm.backends()["cpu"].available else "torch"
    assert OpDispatch.last_choice["glu_fwd"] == expected
    assert OpDispatch.last_choice["glu_bwd"] == expected


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_named_backend_that_cannot_serve_raises(activation):
    gate, up = randn((4, 9), torch.float32), randn((4, 9), torch.float32)
    with pytest.raises(BackendNotSupportedError,
                       match="argument 'backend' asks for backend 'cuda', which cannot serve"):
        glu(gate, up, activation, "cuda")
    with pytest.raises(ValueError, match="argument 'backend'"):
        glu(gate, up, activation, "fast")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_under_torch_func_transforms(activation):
    """vmap, grad, jacrev, jvp and forward-mode AD run the torch reference and agree with eager
    act(gate) * up under the same transform."""
    gate, up = randn((3, 4, 6), torch.float64, scale=2.0), randn((3, 4, 6), torch.float64)
    tangent = torch.randn_like(gate)

    def ours(g, u):
        return glu(g, u, activation)

    def eager(g, u):
        return eager_glu(g, u, activation)

    for transform in (
        lambda f: torch.vmap(f)(gate, up),
        lambda f: torch.vmap(torch.func.grad(lambda g, u: f(g, u).sum()))(gate, up),
        lambda f: torch.func.jacrev(f, argnums=(0, 1))(gate[0], up[0]),
        lambda f: torch.func.jvp(lambda g: f(g, up), (gate,), (tangent,))[1],
    ):
        torch.testing.assert_close(transform(ours), transform(eager), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(gate, tangent)
        got = torch.autograd.forward_ad.unpack_dual(ours(dual, up)).tangent
    expected = torch.func.jvp(lambda g: eager(g, up), (gate,), (tangent,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_backend_named_under_vmap_raises(activation, backend):
    gate = randn((3, 4, 6), torch.float32, device_of(backend))
    with pytest.raises(BackendNotSupportedError, match="torch.func transforms"):
        torch.vmap(lambda g: glu(g, g, activation, backend))(gate)


# ---- bad inputs ---------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


BAD_INPUTS = [
    # (id, exception, argument named, call)
    ("gate_list", TypeError, "'gate'", lambda f: f([[1.0, 2.0]], _t(1, 2))),
    ("gate_none", TypeError, "'gate'", lambda f: f(None, _t(1, 2))),
    ("gate_int", TypeError, "'gate'", lambda f: f(_t(3, 4).long(), _t(3, 4))),
    ("gate_bool", TypeError, "'gate'", lambda f: f(_t(3, 4) > 0, _t(3, 4))),
    ("gate_complex", TypeError, "'gate'", lambda f: f(_t(3, 4).to(torch.complex64), _t(3, 4))),
    ("gate_sparse", ValueError, "'gate'", lambda f: f(_t(3, 4).to_sparse(), _t(3, 4))),
    ("gate_0d", ValueError, "'gate'", lambda f: f(torch.tensor(1.0), torch.tensor(2.0))),
    ("up_list", TypeError, "'up'", lambda f: f(_t(3, 4), _t(3, 4).tolist())),
    ("up_int", TypeError, "'up'", lambda f: f(_t(3, 4), _t(3, 4).int())),
    ("up_shape", ValueError, "'up'", lambda f: f(_t(3, 4), _t(3, 5))),
    ("up_broadcastable", ValueError, "'up'", lambda f: f(_t(3, 4), _t(1, 4))),
    ("up_rank", ValueError, "'up'", lambda f: f(_t(3, 4), _t(1, 3, 4))),
    ("up_dtype", TypeError, "'up'", lambda f: f(_t(3, 4), _t(3, 4, dtype=torch.bfloat16))),
    ("up_float64", TypeError, "'up'", lambda f: f(_t(3, 4), _t(3, 4, dtype=torch.float64))),
    ("up_on_meta", ValueError, "'up'", lambda f: f(_t(3, 4), _t(3, 4, device="meta"))),
    ("gate_on_meta", ValueError, "'up'", lambda f: f(_t(3, 4, device="meta"), _t(3, 4))),
    ("backend_unknown", ValueError, "'backend'", lambda f: f(_t(3, 4), _t(3, 4), backend="gpu")),
    ("backend_none", ValueError, "'backend'", lambda f: f(_t(3, 4), _t(3, 4), backend=None)),
    ("backend_cuda", BackendNotSupportedError, "'backend'",
     lambda f: f(_t(3, 4), _t(3, 4), backend="cuda")),
]


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("function", ["swiglu", "geglu"])
def test_bad_input_names_the_argument(function, exc, argument, call):
    with pytest.raises(exc) as info:
        call(getattr(fusedlm, function))
    message = str(info.value)
    assert argument in message, f"{type(info.value).__name__} does not name {argument!r}: {message}"


@pytest.mark.parametrize("approximate", ["sigmoid", "Tanh", "", None, True, 0.5])
def test_geglu_bad_approximate_names_the_argument(approximate):
    with pytest.raises(ValueError, match="argument 'approximate' must be 'none' or 'tanh'"):
        fusedlm.geglu(_t(3, 4), _t(3, 4), approximate=approximate)
    with pytest.raises(ValueError, match="argument 'approximate'"):
        fusedlm.nn.GeGLUMLP(4, 8, approximate=approximate)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("activation", ["relu", "gelu_new", "", "SILU"])
def test_op_with_unknown_activation_names_the_argument(activation, backend):
    """The custom ops (and the forward's fake, under torch.compile's fake tensors) refuse an
    activation other than "silu", "gelu", "gelu_tanh" on every backend, before any kernel
    runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _t(3, 4, device=device_of(backend))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        for call in (lambda: torch.ops.fusedlm.glu_fwd(fake, fake, activation, backend),
                     lambda: torch.ops.fusedlm.glu_bwd(fake, fake, fake, activation, backend)):
            with pytest.raises(ValueError, match="argument 'activation' must be one of 'silu'"):
                call()
    for call in (lambda: torch.ops.fusedlm.glu_fwd(x, x, activation, backend),
                 lambda: torch.ops.fusedlm.glu_bwd(x, x, x, activation, backend)):
        with pytest.raises(ValueError, match="argument 'activation' must be one of 'silu'"):
            call()
