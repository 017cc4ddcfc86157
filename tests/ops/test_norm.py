"""fusedlm.layer_norm / fusedlm.rms_norm and the custom ops behind them, against torch's
F.layer_norm / F.rms_norm (truth: float64; baseline: the input's dtype)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from tests.helpers import (
    DTYPES,
    assert_close_rule,
    available_backends,
    device_of,
    kernel_backends,
)

BACKENDS = available_backends()

# (x shape, normalized_shape): hidden 1, 127, 4099; 1-D, 2-D, 3-D and 4-D x; 2-D normalized_shape.
SHAPES = [
    ((1, 1), (1,)),
    ((5, 1), (1,)),
    ((17, 127), (127,)),
    ((3, 4099), (4099,)),
    ((3, 5, 64), (64,)),
    ((2, 3, 4, 6), (4, 6)),
    ((8,), (8,)),
    # enough rows for the cpu kernels to split rows and dweight sums across threads:
    ((2, 600, 70), (70,)),
]
SHAPE_IDS = ["x".join(map(str, s)) + "-n" + "x".join(map(str, n)) for s, n in SHAPES]

LN_AFFINE = ["weight+bias", "weight", "bias", "none"]
RMS_AFFINE = ["weight", "none"]


def _params(normalized_shape, affine, dtype, device, param_dtype=None):
    param_dtype = dtype if param_dtype is None else param_dtype
    weight = bias = None
    if "weight" in affine:
        weight = (1 + 0.5 * torch.randn(normalized_shape, dtype=torch.float64)).to(
            device, param_dtype
        )
    if "bias" in affine:
        bias = (0.5 * torch.randn(normalized_shape, dtype=torch.float64)).to(device, param_dtype)
    return weight, bias


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _double_leaf(t):
    return None if t is None else t.detach().double().requires_grad_(True)


def _grads(out, grad_out, inputs):
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return [next(grads) if t is not None else None for t in inputs]


def _check_ln(x, normalized_shape, weight, bias, backend, eps=1e-5, backward=True):
    """Forward and (optionally) backward of fusedlm.layer_norm vs torch's, by the rule."""
    xs, ws, bs = _leaf(x), _leaf(weight), _leaf(bias)
    y = fusedlm.layer_norm(xs, normalized_shape, ws, bs, eps=eps, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device

    xt, wt, bt = _leaf(x), _leaf(weight), _leaf(bias)
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        # Mixed precision (float32 params, low-precision x): torch's CPU backward cannot do
        # bias-only mixed inputs, so the baseline is torch's float32 computation, rounded to x's
        # dtype (what its mixed-type kernel computes).
        y_torch = F.layer_norm(xt.float(), normalized_shape, wt, bt, eps).to(x.dtype)
    else:
        y_torch = F.layer_norm(xt, normalized_shape, wt, bt, eps)
    x64, w64, b64 = _double_leaf(x), _double_leaf(weight), _double_leaf(bias)
    y_truth = F.layer_norm(x64, normalized_shape, w64, b64, eps)
    assert_close_rule(y, y_torch, y_truth, name="y")
    if not backward:
        return
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(x.device, x.dtype)
    ours = _grads(y, grad_out, [xs, ws, bs])
    theirs = [
        None if g is None else g.to(src.dtype)
        for g, src in zip(_grads(y_torch, grad_out, [xt, wt, bt]), (x, weight, bias), strict=True)
    ]
    truth = _grads(y_truth, grad_out.double(), [x64, w64, b64])
    for name, g, g_torch, g_truth, src in zip(
        ("dx", "dweight", "dbias"), ours, theirs, truth, (x, weight, bias), strict=True
    ):
        if src is None:
            continue
        assert g.dtype == src.dtype, f"{name} has dtype {g.dtype}, expected {src.dtype}"
        assert_close_rule(g, g_torch, g_truth, name=name)


def _check_rms(x, normalized_shape, weight, backend, eps=None, backward=True):
    xs, ws = _leaf(x), _leaf(weight)
    y = fusedlm.rms_norm(xs, normalized_shape, ws, eps=eps, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device

    eps_value = torch.finfo(x.dtype).eps if eps is None else eps  # torch's default for eps=None
    xt, wt = _leaf(x), _leaf(weight)
    y_torch = F.rms_norm(xt, normalized_shape, wt, eps)
    x64, w64 = _double_leaf(x), _double_leaf(weight)
    y_truth = F.rms_norm(x64, normalized_shape, w64, eps_value)
    assert_close_rule(y, y_torch, y_truth, name="y")
    if not backward:
        return
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(x.device, x.dtype)
    ours = _grads(y, grad_out, [xs, ws])
    theirs = _grads(y_torch, grad_out, [xt, wt])
    truth = _grads(y_truth, grad_out.double(), [x64, w64])
    for name, g, g_torch, g_truth, src in zip(
        ("dx", "dweight"), ours, theirs, truth, (x, weight), strict=True
    ):
        if src is None:
            continue
        assert g.dtype == src.dtype, f"{name} has dtype {g.dtype}, expected {src.dtype}"
        assert_close_rule(g, g_torch, g_truth, name=name)


def _randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(device, dtype)


# ---- LayerNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", LN_AFFINE)
@pytest.mark.parametrize(("shape", "normalized_shape"), SHAPES, ids=SHAPE_IDS)
def test_layer_norm(shape, normalized_shape, affine, dtype, backend):
    device = device_of(backend)
    x = _randn(shape, dtype, device)
    weight, bias = _params(normalized_shape, affine, dtype, device)
    _check_ln(x, normalized_shape, weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "affine", ["weight+bias", "weight", "bias"]
)
def test_layer_norm_float32_params_low_precision_x(affine, dtype, backend):
    device = device_of(backend)
    x = _randn((9, 96), dtype, device)
    weight, bias = _params((96,), affine, dtype, device, param_dtype=torch.float32)
    _check_ln(x, (96,), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "row_stride", "transposed_3d"])
def test_layer_norm_non_contiguous(layout, dtype, backend):
    device = device_of(backend)
    if layout == "transposed":
        x = _randn((33, 12), dtype, device).t()  # (12, 33), strides (1, 12)
    elif layout == "row_stride":
        x = _randn((12, 66), dtype, device)[:, 5:38]  # (12, 33), strides (66, 1), offset 5
    else:
        x = _randn((2, 33, 6), dtype, device).transpose(1, 2)  # (2, 6, 33)
    assert not x.is_contiguous()
    weight, bias = _params((33,), "weight+bias", dtype, device)
    _check_ln(x, (33,), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_large_mean_offset(dtype, backend):
    """Rows of 1000 + N(0, 1): a one-pass E[x^2] - E[x]^2 variance cancels catastrophically."""
    device = device_of(backend)
    x = (1000 + torch.randn(16, 257, dtype=torch.float64)).to(device, dtype)
    weight, bias = _params((257,), "weight+bias", dtype, device)
    _check_ln(x, (257,), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_nan_inf_propagate_like_torch(dtype, backend):
    device = device_of(backend)
    x = _randn((5, 40), dtype, device)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    weight, bias = _params((40,), "weight+bias", dtype, device)
    y = fusedlm.layer_norm(x, (40,), weight, bias, backend=backend)
    y_torch = F.layer_norm(x, (40,), weight, bias)
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch)), "NaN pattern differs from torch's"
    assert torch.equal(torch.isinf(y), torch.isinf(y_torch)), "Inf pattern differs from torch's"
    _check_ln(x[3:], (40,), weight, bias, backend, backward=False)  # clean rows unaffected
    assert torch.equal(y[3:], fusedlm.layer_norm(x[3:], (40,), weight, bias, backend=backend))


# Parameters in float32 under an input of another dtype (which the API takes and torch's own
# norms refuse for float64 input) included: found by `tests/test_fuzz.py --fuzz-long`.
ZERO_ROWS_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float32),
                    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                    (torch.float64, torch.float64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, param_dtype", ZERO_ROWS_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=str)
def test_layer_norm_zero_rows(shape, dtype, param_dtype, backend):
    device = device_of(backend)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(8, device=device, dtype=param_dtype, requires_grad=True)
    bias = torch.randn(8, device=device, dtype=param_dtype, requires_grad=True)
    y = fusedlm.layer_norm(x, (8,), weight, bias, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    dx, dw, db = torch.autograd.grad(y.sum(), (x, weight, bias), allow_unused=True)
    assert dx is not None and dx.shape == x.shape
    for g in (dw, db):
        assert g is None or (torch.equal(g, torch.zeros_like(g)) and g.dtype == param_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_layer_norm_eps(eps, backend):
    device = device_of(backend)
    x = _randn((4, 10), torch.float64, device) * 0.1
    _check_ln(x, (10,), None, None, backend, eps=eps)


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("affine", LN_AFFINE)
def test_layer_norm_gradcheck(affine, backend):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = (_leaf(t) for t in _params((5,), affine, torch.float64, "cpu"))
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def fn(*args):
        it = iter(args)
        x_ = next(it)
        w_ = next(it) if weight is not None else None
        b_ = next(it) if bias is not None else None
        return fusedlm.layer_norm(x_, (5,), w_, b_, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


# ---- RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", RMS_AFFINE)
@pytest.mark.parametrize(("shape", "normalized_shape"), SHAPES, ids=SHAPE_IDS)
def test_rms_norm(shape, normalized_shape, affine, dtype, backend):
    device = device_of(backend)
    x = _randn(shape, dtype, device)
    weight, _ = _params(normalized_shape, affine, dtype, device)
    _check_rms(x, normalized_shape, weight, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rms_norm_float32_weight_low_precision_x(dtype, backend):
    device = device_of(backend)
    x = _randn((9, 96), dtype, device)
    weight, _ = _params((96,), "weight", dtype, device, param_dtype=torch.float32)
    _check_rms(x, (96,), weight, backend, eps=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "row_stride"])
def test_rms_norm_non_contiguous(layout, dtype, backend):
    device = device_of(backend)
    if layout == "transposed":
        x = _randn((33, 12), dtype, device).t()
    else:
        x = _randn((12, 66), dtype, device)[:, 5:38]
    assert not x.is_contiguous()
    weight, _ = _params((33,), "weight", dtype, device)
    _check_rms(x, (33,), weight, backend, eps=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_large_values(dtype, backend):
    device = device_of(backend)
    x = (1000 + torch.randn(16, 257, dtype=torch.float64)).to(device, dtype)
    weight, _ = _params((257,), "weight", dtype, device)
    _check_rms(x, (257,), weight, backend, eps=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_nan_inf_propagate_like_torch(dtype, backend):
    device = device_of(backend)
    x = _randn((5, 40), dtype, device)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    weight, _ = _params((40,), "weight", dtype, device)
    y = fusedlm.rms_norm(x, (40,), weight, eps=1e-6, backend=backend)
    y_torch = F.rms_norm(x, (40,), weight, 1e-6)
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch)), "NaN pattern differs from torch's"
    assert torch.equal(torch.isinf(y), torch.isinf(y_torch)), "Inf pattern differs from torch's"
    finite = torch.isfinite(y_torch)
    assert torch.equal(y[finite] == 0, y_torch[finite] == 0), (
        "zeros of inf rows differ from torch's"
    )
    _check_rms(x[3:], (40,), weight, backend, eps=1e-6, backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, param_dtype", ZERO_ROWS_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=str)
def test_rms_norm_zero_rows(shape, dtype, param_dtype, backend):
    device = device_of(backend)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(8, device=device, dtype=param_dtype, requires_grad=True)
    y = fusedlm.rms_norm(x, (8,), weight, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    dx, dw = torch.autograd.grad(y.sum(), (x, weight), allow_unused=True)
    assert dx is not None and dx.shape == x.shape
    assert dw is None or (torch.equal(dw, torch.zeros_like(dw)) and dw.dtype == param_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_default_eps_is_finfo_eps(backend):
    """eps=None means torch.finfo(x.dtype).eps: visible on rows of tiny values."""
    device = device_of(backend)
    x = torch.full((2, 4), 1e-4, device=device)
    y = fusedlm.rms_norm(x, (4,), backend=backend)
    eps = torch.finfo(torch.float32).eps
    expected = 1e-4 / (1e-8 + eps) ** 0.5
    torch.testing.assert_close(y, torch.full_like(y, expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("affine", RMS_AFFINE)
def test_rms_norm_gradcheck(affine, backend):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weight, _ = _params((5,), affine, torch.float64, "cpu")
    weight = _leaf(weight)
    inputs = (x,) if weight is None else (x, weight)

    def fn(*args):
        return fusedlm.rms_norm(
            args[0], (5,), args[1] if weight is not None else None, eps=1e-6, backend=backend
        )

    assert torch.autograd.gradcheck(fn, inputs)


# ---- custom ops: torch.library.opcheck ----------------------------------------------------------


OPCHECK_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
def test_opcheck_layer_norm(affine, dtype, backend):
    device = device_of(backend)
    x = _randn((6, 24), dtype, device).requires_grad_(True)
    weight, bias = (_leaf(t) for t in _params((24,), affine, dtype, device))
    torch.library.opcheck(
        torch.ops.fusedlm.layer_norm_fwd.default, (x, weight, bias, 1e-5, backend)
    )
    with torch.no_grad():
        _, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, weight, bias, 1e-5, backend)
    grad_y = _randn((6, 24), dtype, device)
    w = None if weight is None else weight.detach()
    torch.library.opcheck(
        torch.ops.fusedlm.layer_norm_bwd.default,
        (grad_y, x.detach(), mean, rstd, w, bias is not None, backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
@pytest.mark.parametrize("affine", RMS_AFFINE)
def test_opcheck_rms_norm(affine, dtype, backend):
    device = device_of(backend)
    x = _randn((6, 24), dtype, device).requires_grad_(True)
    weight, _ = _params((24,), affine, dtype, device)
    weight = _leaf(weight)
    torch.library.opcheck(torch.ops.fusedlm.rms_norm_fwd.default, (x, weight, 1e-6, backend))
    with torch.no_grad():
        _, rstd = torch.ops.fusedlm.rms_norm_fwd(x, weight, 1e-6, backend)
    grad_y = _randn((6, 24), dtype, device)
    w = None if weight is None else weight.detach()
    torch.library.opcheck(
        torch.ops.fusedlm.rms_norm_bwd.default, (grad_y, x.detach(), rstd, w, backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_fwd_op_statistics(backend):
    """mean and rstd returned by the op are the row statistics, in float32 for bf16 x."""
    device = device_of(backend)
    x = _randn((7, 50), torch.bfloat16, device)
    _, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, None, None, 1e-5, backend)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_without_autograd_skips_the_function(op, backend, monkeypatch):
    """Under torch.no_grad() or with no input requiring grad, the forward runs without an
    autograd.Function (it buys nothing there) and gives the grad-mode output
    bit for bit; a weight that requires grad alone still gets its gradient."""
    device = device_of(backend)
    x = _randn((5, 3, 40), torch.float32, device)
    weight, bias = _params((40,), "weight+bias", torch.float32, device)
    args = (weight, bias) if op == "layer_norm" else (weight,)
    fn = getattr(fusedlm, op)
    norm_module = fusedlm.ops.norm
    function = norm_module._LayerNormEager if op == "layer_norm" else norm_module._RmsNormEager
    expected = fn(x.requires_grad_(True), (40,), *args, backend=backend).detach()
    x.requires_grad_(False)

    def refuse(*_):
        raise AssertionError("the autograd.Function ran without autograd")

    with monkeypatch.context() as m:
        m.setattr(function, "apply", refuse)
        with torch.no_grad():
            no_grad = fn(x.clone().requires_grad_(True), (40,), *args, backend=backend)
        plain = fn(x, (40,), *args, backend=backend)
    for out in (no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    leaf = _leaf(weight)
    y = fn(x, (40,), leaf, *args[1:], backend=backend)
    assert y.grad_fn is not None
    y.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == (40,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_under_autocast_keeps_its_precision(op, backend):
    """Under autocast the norms run as without it (statistics in float32, output in x's dtype,
    as Apex's and Liger's fused norms; torch's own LayerNorm returns float32 there), forward
    and backward, bit for bit."""
    device = device_of(backend)
    x = _randn((6, 40), torch.bfloat16, device)
    weight, bias = _params((40,), "weight+bias", torch.bfloat16, device)
    args = (weight, bias) if op == "layer_norm" else (weight,)
    grad = _randn((6, 40), torch.bfloat16, device)
    results = []
    for autocast in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, *args)]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            y = getattr(fusedlm, op)(leaves[0], (40,), *leaves[1:], backend=backend)
        results.append((y, torch.autograd.grad(y, leaves, grad)))
    (y, grads), (y_autocast, grads_autocast) = results
    assert y_autocast.dtype == torch.bfloat16
    torch.testing.assert_close(y_autocast, y, rtol=0, atol=0)
    for g, g_autocast in zip(grads, grads_autocast, strict=True):
        torch.testing.assert_close(g_autocast, g, rtol=0, atol=0)


def _norm_call(op, backend):
    fn = getattr(fusedlm, op)
    return lambda x, w: fn(x, (8,), w, backend=backend)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_under_torch_func_transforms(op):
    """vmap, grad (per-sample gradients: vmap of grad), jacrev, jvp and forward-mode AD run the
    torch reference (the kernels have no batching or forward-mode rules) and agree with
    torch's own op under the same transform."""
    x = _randn((3, 4, 8), torch.float64, "cpu")
    weight = _randn((8,), torch.float64, "cpu")
    tangent = torch.randn_like(x)
    ours, theirs = _norm_call(op, "auto"), getattr(F, op)
    torch_op = lambda x, w: theirs(x, (8,), w)  # noqa: E731
    for transform in (
        lambda f: torch.vmap(f, in_dims=(0, None))(x, weight),
        lambda f: torch.vmap(torch.func.grad(lambda w, xi: f(xi, w).pow(2).sum()),
                             in_dims=(None, 0))(weight, x),
        lambda f: torch.func.jacrev(f, argnums=(0, 1))(x[0], weight),
        lambda f: torch.func.jvp(lambda xi: f(xi, weight), (x,), (tangent,))[1],
    ):
        torch.testing.assert_close(transform(ours), transform(torch_op), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        got = torch.autograd.forward_ad.unpack_dual(ours(dual, weight)).tangent
    expected = torch.func.jvp(lambda xi: torch_op(xi, weight), (x,), (tangent,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_transform_detection_is_off_in_eager_mode():
    """The transform check reads torch internals; should they move, eager calls must not
    silently fall back to the reference (this fails instead)."""
    from fusedlm.ops._common import under_transform

    assert not under_transform()
    with torch.autograd.forward_ad.dual_level():
        assert under_transform()
    assert torch.vmap(lambda t: torch.tensor(under_transform()))(torch.zeros(2)).all()
    assert not under_transform()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_kernel_backend_named_under_vmap_raises(op, backend):
    x = _randn((3, 4, 8), torch.float32, device_of(backend))
    with pytest.raises(fusedlm.BackendNotSupportedError, match="torch.func transforms"):
        torch.vmap(_norm_call(op, backend), in_dims=(0, None))(x, None)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_gradient_is_not_differentiable_again(op):
    """The kernels' gradients have no second derivative: with create_graph=True a first backward
    works and a second one raises, instead of returning a silently wrong (zero) Hessian term."""
    x = _randn((3, 8), torch.float32, "cpu").requires_grad_(True)
    weight = torch.ones(8, requires_grad=True)
    y = getattr(fusedlm, op)(x, (8,), weight)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    expected = torch.autograd.grad(
        getattr(torch.nn.functional, op)(x, (8,), weight).pow(2).sum(), x
    )[0]
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()
