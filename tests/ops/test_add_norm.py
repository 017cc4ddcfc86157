"""fusedlm.add_layer_norm / fusedlm.add_rms_norm (a pre-norm block's residual add fused into
the next norm) and the custom ops behind them (fusedlm::add_layer_norm_fwd/bwd,
fusedlm::add_rms_norm_fwd/bwd), against eager ``h = x + residual; F.layer_norm(h, ...)`` /
``F.rms_norm(h, ...)`` by DESIGN.md's rule: truth in float64, baseline the same eager code at
the inputs' dtypes. h must be eager's ``x + residual`` bit for bit.

The C++ kernels take CPU tensors, the Triton ones CUDA tensors (there is no CUDA C++ kernel):
the "triton" cases here are ``gpu`` tests; tests/triton/test_add_norm.py runs the Triton
kernels under the interpreter (streamed rows, strides, sm_90 builds, realistic GPU sizes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import BackendNotSupportedError, OpDispatch
from tests.helpers import assert_close_rule, device_of, kernel_backends, needs_cpu_backend

BACKENDS = [*kernel_backends(), pytest.param("triton", marks=pytest.mark.gpu, id="triton"),
            "torch"]
OPS = ["layer_norm", "rms_norm"]

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# (x dtype, residual dtype) pairs the kernels take as they are: one dtype, or a 16-bit branch
# output beside a float32 residual stream (autocast's).
PAIRS = [(f32, f32), (f16, f16), (bf16, f32), (f16, f32), (f64, f64), (bf16, bf16)]
# Pairs the op layer casts first (to torch's promoted dtype; a 16-bit x beside it stays).
PROMOTED_PAIRS = [(f32, bf16), (f16, bf16), (bf16, f16), (f32, f16), (f64, f32), (f32, f64),
                  (bf16, f64)]


def pair_id(pair) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in pair)


# (x shape, normalized_shape): hidden 1, 7, 300, 1000; 3-D and 4-D x with a 2-D normalized
# shape; hidden above the Triton single-tile limits (8192 backward, 16384 forward: streamed).
# (test_add_norm_many_rows: enough rows for the cpu kernels to split across threads.)
SHAPES = [
    ((1, 1), (1,)),
    ((4, 7), (7,)),
    ((3, 300), (300,)),
    ((2, 1000), (1000,)),
    ((2, 3, 7), (7,)),
    ((2, 3, 4, 6), (4, 6)),
    ((2, 8200), (8200,)),
    ((1, 16411), (16411,)),
]
SHAPE_IDS = ["x".join(map(str, s)) + "-n" + "x".join(map(str, n)) for s, n in SHAPES]


def randn(shape, dtype, device="cpu", scale=1.0):
    return (scale * torch.randn(shape, dtype=torch.float64)).to(device, dtype)


def make_params(op, normalized_shape, affine, dtype, device):
    """weight (1 + N(0, 0.25)) and bias (N(0, 0.25)) as ``affine`` says ("weight+bias",
    "weight", "bias", "none"; RMSNorm has no bias), in ``dtype``."""
    weight = bias = None
    if "weight" in affine:
        weight = randn(normalized_shape, torch.float64).mul(0.5).add(1).to(device, dtype)
    if "bias" in affine and op == "layer_norm":
        bias = randn(normalized_shape, dtype, device, scale=0.5)
    return weight, bias


def add_norm(op, x, residual, normalized_shape, weight=None, bias=None, eps=None,
             backend="auto"):
    """fusedlm.add_layer_norm / add_rms_norm; eps None: the op's default."""
    if op == "layer_norm":
        return fusedlm.add_layer_norm(x, residual, normalized_shape, weight, bias,
                                      1e-5 if eps is None else eps, backend=backend)
    assert bias is None
    return fusedlm.add_rms_norm(x, residual, normalized_shape, weight, eps, backend=backend)


def eager_add_norm(op, x, residual, normalized_shape, weight=None, bias=None, eps=None):
    """The eager code the op replaces: h = x + residual, then torch's norm of h. Parameters in
    another dtype than h (float32 ones beside a 16-bit or float64 h, which torch's CPU norms
    refuse or warn about) are applied in promote(h, float32), rounded once to h's dtype: what
    a mixed-precision norm computes. eps None: 1e-5 for LayerNorm, finfo(h).eps for RMSNorm."""
    h = x + residual
    if eps is None:
        eps = 1e-5 if op == "layer_norm" else torch.finfo(h.dtype).eps
    params = [p for p in (weight, bias) if p is not None]
    compute = h.dtype
    if any(p.dtype != h.dtype for p in params):
        compute = torch.promote_types(h.dtype, torch.float32)
    hc = h.to(compute)
    w = None if weight is None else weight.to(compute)
    if op == "layer_norm":
        b = None if bias is None else bias.to(compute)
        y = F.layer_norm(hc, normalized_shape, w, b, eps)
    else:
        y = F.rms_norm(hc, normalized_shape, w, eps)
    return y.to(h.dtype), h


def check_add_norm(op, x, residual, normalized_shape, weight=None, bias=None, backend="auto",
                   eps=None, grad_h=True, views=None, backward=True):
    """Forward and backward of the fused op against eager, by the rule.

    y, h: h's dtype (torch's promotion of x's and residual's), x's shape; h equal to eager
    ``x + residual``. Backward with a random grad_y and, if ``grad_h``, a random grad_h (else h
    is unused: only y in the loss); dx, dresidual, dweight, dbias in their inputs' dtypes.
    ``views``: (x view, residual view) functions applied to the leaves (x, residual are then
    the bases), so strided tensors reach the op and gradients come back through the views."""
    views = views or (lambda t: t, lambda t: t)
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    inputs = [x, residual, weight, bias]
    shape = views[0](x).shape
    device = x.device
    grad_y = randn(shape, h_dtype, device)
    grad_hh = randn(shape, h_dtype, device) if grad_h else None

    def run(fn, cast):
        leaves = [None if t is None else t.detach().to(cast or t.dtype).requires_grad_(True)
                  for t in inputs]
        xs, rs = views[0](leaves[0]), views[1](leaves[1])
        y, h = fn(op, xs, rs, normalized_shape, leaves[2], leaves[3], eps=eps)
        if not backward:
            return y, h, xs, rs, []
        outs, grads = ([y, h], [grad_y, grad_hh]) if grad_h else ([y], [grad_y])
        present = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outs, present,
                                       [g.to(o.dtype) for g, o in zip(grads, outs, strict=True)]))
        return y, h, xs, rs, [next(got) if t is not None else None for t in leaves]

    def ours(*args, eps):
        return add_norm(*args, eps=eps, backend=backend)

    y, h, xs, rs, grads = run(ours, None)
    assert y.dtype == h.dtype == h_dtype, (y.dtype, h.dtype, h_dtype)
    assert y.shape == h.shape == shape and y.device == h.device == xs.device
    y_torch, h_torch, _, _, grads_torch = run(eager_add_norm, None)
    assert torch.equal(h, h_torch), "h differs from eager x + residual"
    assert torch.equal(h, xs.detach() + rs.detach())
    eps_truth = eps
    if eps is None and op == "rms_norm":  # (the truth takes h's eps, not float64's)
        eps_truth = torch.finfo(h_dtype).eps
    y_truth, _, _, _, grads_truth = run(
        lambda *a, eps: eager_add_norm(*a, eps=eps_truth), torch.float64)
    assert_close_rule(y, y_torch, y_truth, name="y")
    for name, g, g_torch, g_truth, src in zip(("dx", "dresidual", "dweight", "dbias"), grads,
                                              grads_torch, grads_truth, inputs, strict=True):
        if src is None:
            continue
        assert g.dtype == src.dtype, f"{name} has dtype {g.dtype}, expected {src.dtype}"
        assert g.shape == src.shape, f"{name} has shape {g.shape}, expected {src.shape}"
        assert_close_rule(g, g_torch, g_truth, name=name)


def dh_truth(op, h, weight, bias, grad_y, grad_h, eps):
    """The float64 gradient of h (M, N): the norm's at the returned (rounded) h, plus grad_h."""
    h64 = h.detach().double().requires_grad_(True)
    w64, b64 = (None if p is None else p.double() for p in (weight, bias))
    n = h.shape[-1:]
    y64 = (F.layer_norm(h64, n, w64, b64, eps) if op == "layer_norm"
           else F.rms_norm(h64, n, w64, eps))
    return torch.autograd.grad(y64, h64, grad_y.double())[0] + grad_h.double()


def _inputs(shape, pair, device):
    return randn(shape, pair[0], device), randn(shape, pair[1], device)


# ---- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize(("shape", "normalized_shape"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_add_norm(op, shape, normalized_shape, pair, affine, backend):
    device = device_of(backend)
    x, residual = _inputs(shape, pair, device)
    h_dtype = torch.promote_types(*pair)
    weight, bias = make_params(op, normalized_shape, affine, h_dtype, device)
    OpDispatch.last_choice.clear()
    check_add_norm(op, x, residual, normalized_shape, weight, bias, backend)
    assert OpDispatch.last_choice[f"add_{op}_fwd"] == backend
    assert OpDispatch.last_choice[f"add_{op}_bwd"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [(f32, f32), (bf16, f32), (bf16, bf16)], ids=pair_id)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_many_rows(op, pair, backend):
    """1200 rows of 70: the cpu kernels split the rows, and the backward its dweight/dbias
    partial sums, across threads (32768 elements a task)."""
    device = device_of(backend)
    x, residual = _inputs((2, 600, 70), pair, device)
    weight, bias = make_params(op, (70,), "weight+bias", torch.promote_types(*pair), device)
    check_add_norm(op, x, residual, (70,), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize(("shape", "normalized_shape"), [((3, 300), (300,)), ((2, 3, 7), (7,)),
                                                         ((2, 8200), (8200,))], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_h_unused(op, shape, normalized_shape, pair, backend):
    """Only y in the loss: h's gradient is zero (or absent) and dx = dresidual is the norm's."""
    device = device_of(backend)
    x, residual = _inputs(shape, pair, device)
    weight, bias = make_params(op, normalized_shape, "weight+bias", torch.promote_types(*pair),
                               device)
    check_add_norm(op, x, residual, normalized_shape, weight, bias, backend, grad_h=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [(f32, f32), (bf16, f32), (f16, f16)], ids=pair_id)
@pytest.mark.parametrize("affine", ["weight", "bias"])
def test_add_layer_norm_weight_or_bias_alone(affine, pair, backend):
    device = device_of(backend)
    x, residual = _inputs((5, 3, 40), pair, device)
    weight, bias = make_params("layer_norm", (40,), affine, torch.promote_types(*pair), device)
    check_add_norm("layer_norm", x, residual, (40,), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias"])
@pytest.mark.parametrize("pair", [(f16, f16), (bf16, bf16), (f64, f64)], ids=pair_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_add_norm_float32_params(op, pair, affine, backend):
    """float32 weight/bias beside a 16-bit (or float64) h, as mixed-precision modules hold
    them; their gradients come back in float32."""
    if op == "rms_norm" and affine == "bias":
        pytest.skip("RMSNorm has no bias")
    device = device_of(backend)
    x, residual = _inputs((9, 96), pair, device)
    weight, bias = make_params(op, (96,), affine, torch.float32, device)
    check_add_norm(op, x, residual, (96,), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PROMOTED_PAIRS, ids=pair_id)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_promoted_pairs(op, pair, backend):
    """Pairs the kernels do not take (float32 x + bfloat16 residual, float16 + bfloat16, a
    float64 one) are cast in the op layer: h has torch's promoted dtype, the kernels still
    run, and each gradient comes back in its input's dtype."""
    device = device_of(backend)
    x, residual = _inputs((6, 3, 50), pair, device)
    weight, bias = make_params(op, (50,), "weight+bias", torch.promote_types(*pair), device)
    OpDispatch.last_choice.clear()
    check_add_norm(op, x, residual, (50,), weight, bias, backend)
    assert OpDispatch.last_choice[f"add_{op}_fwd"] == backend
    assert OpDispatch.last_choice[f"add_{op}_bwd"] == backend


# Strided views of a leaf: base tensor shape and base -> view, all (12, 33) (2, 6, 33 for 3-D).
LAYOUTS = {
    "transposed": ((33, 12), lambda b: b.t()),  # strides (1, 12)
    "row_stride": ((12, 66), lambda b: b[:, 5:38]),  # strides (66, 1), storage offset 5
    "col_stride": ((12, 66), lambda b: b[:, ::2]),  # strides (66, 2)
    "expanded_rows": ((1, 33), lambda b: b.expand(12, 33)),  # row stride 0
    "offset": ((400,), lambda b: b[3:399].view(12, 33)),  # contiguous at storage offset 3
    "transposed_3d": ((2, 33, 6), lambda b: b.transpose(1, 2)),  # (2, 6, 33)
    "permuted_3d": ((33, 2, 6), lambda b: b.permute(1, 2, 0)),  # (2, 6, 33)
}
LAYOUT_PAIRS = [("transposed", "row_stride"), ("row_stride", "transposed"),
                ("col_stride", "expanded_rows"), ("expanded_rows", "offset"),
                ("offset", "col_stride"), ("transposed_3d", "permuted_3d")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [(f32, f32), (bf16, f32), (f16, f16)], ids=pair_id)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_non_contiguous(op, layouts, pair, backend):
    """x and residual as non-contiguous views (transposed, sliced at a storage offset, strided
    columns, expanded rows): forward and the gradients of their bases."""
    device = device_of(backend)
    (x_shape, x_view), (r_shape, r_view) = (LAYOUTS[name] for name in layouts)
    x, residual = randn(x_shape, pair[0], device), randn(r_shape, pair[1], device)
    assert not x_view(x).is_contiguous() or x_view(x).storage_offset() > 0
    assert not r_view(residual).is_contiguous() or r_view(residual).storage_offset() > 0
    weight, bias = make_params(op, (33,), "weight+bias", torch.promote_types(*pair), device)
    check_add_norm(op, x, residual, (33,), weight, bias, backend, views=(x_view, r_view))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [(f32, f32), (bf16, f32), (f16, f16), (f64, f64)],
                         ids=pair_id)
@pytest.mark.parametrize("op", OPS)
def test_norm_reads_the_rounded_h(op, pair, backend):
    """The add is rounded once to h's dtype and the norm reads that h: y, mean and rstd are
    those of the plain norm of the returned h, bit for bit, on the same backend; and the
    backward without grad_h is the plain norm's backward of h."""
    device = device_of(backend)
    x, residual = _inputs((7, 3, 129), pair, device)
    weight, bias = make_params(op, (129,), "weight+bias", torch.promote_types(*pair), device)
    with torch.no_grad():
        y, h = add_norm(op, x, residual, 129, weight, bias, backend=backend)
        if op == "layer_norm":
            plain = fusedlm.layer_norm(h, 129, weight, bias, backend=backend)
        else:
            plain = fusedlm.rms_norm(h, 129, weight, backend=backend)
    assert torch.equal(y, plain)
    rows, res = x.reshape(-1, 129), residual.reshape(-1, 129)
    grad = randn(rows.shape, h.dtype, device)
    if op == "layer_norm":
        y2, h2, mean, rstd = torch.ops.fusedlm.add_layer_norm_fwd(rows, res, weight, bias, 1e-5,
                                                                 backend)
        _, mean_plain, rstd_plain = torch.ops.fusedlm.layer_norm_fwd(h2, weight, bias, 1e-5,
                                                                     backend)
        assert torch.equal(mean, mean_plain)
        fused = torch.ops.fusedlm.add_layer_norm_bwd(grad, None, h2, mean, rstd, weight, True,
                                                     backend)
        plain_grads = torch.ops.fusedlm.layer_norm_bwd(grad, h2, mean, rstd, weight, True,
                                                       backend)
    else:
        eps = torch.finfo(h.dtype).eps
        y2, h2, rstd = torch.ops.fusedlm.add_rms_norm_fwd(rows, res, weight, eps, backend)
        _, rstd_plain = torch.ops.fusedlm.rms_norm_fwd(h2, weight, eps, backend)
        fused = torch.ops.fusedlm.add_rms_norm_bwd(grad, None, h2, rstd, weight, backend)
        plain_grads = torch.ops.fusedlm.rms_norm_bwd(grad, h2, rstd, weight, backend)
    assert torch.equal(h2, h.reshape(-1, 129)) and torch.equal(y2, y.reshape(-1, 129))
    assert torch.equal(rstd, rstd_plain)
    assert len(fused) == len(plain_grads)
    for a, b in zip(fused, plain_grads, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_half_h_is_rounded_before_the_norm():
    """A float16 case where normalizing the unrounded float32 sum gives another y: the fused
    op (every backend) follows eager, which normalizes the rounded h."""
    # 1 + 2^-11 is a float16 tie: it rounds to 1, so h's row is [1, 1, 1, 1 - 2^-10 ...]
    x = torch.tensor([[1.0, 2**-11, 0.5, -0.25]], dtype=f16)
    residual = torch.tensor([[0.0, 1.0, 0.5, 1.25]], dtype=f16)
    h = x + residual
    assert h.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    for backend in ["torch", *(["cpu"] if fusedlm.backends()["cpu"].available else [])]:
        y, h_ours = fusedlm.add_layer_norm(x, residual, 4, backend=backend)
        assert torch.equal(h_ours, h)
        assert torch.equal(y, torch.zeros_like(y)), (backend, y)  # a constant row: all 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_eps(op, backend):
    device = device_of(backend)
    x, residual = _inputs((4, 10), (f64, f64), device)
    for eps in (0.0, 1e-2, 0.5):
        check_add_norm(op, 0.1 * x, 0.1 * residual, (10,), None, None, backend, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_default_eps_is_finfo_of_h(backend):
    """eps=None: torch.finfo(h.dtype).eps, h's dtype (float32 for a bfloat16 x beside a float32
    residual), visible on rows of tiny values."""
    device = device_of(backend)
    x = torch.zeros((2, 4), dtype=bf16, device=device)
    residual = torch.full((2, 4), 1e-4, device=device)
    y, h = fusedlm.add_rms_norm(x, residual, 4, backend=backend)
    assert y.dtype == h.dtype == f32 and torch.equal(h, residual)
    expected = 1e-4 / (1e-8 + torch.finfo(f32).eps) ** 0.5  # (bfloat16's eps: 0.0011)
    torch.testing.assert_close(y, torch.full_like(y, expected), rtol=1e-5, atol=0)


ZERO_CASES = [((0, 8), (f32, f32), f32), ((2, 0, 8), (bf16, f32), f32),
              ((0, 8), (f16, f16), f32), ((2, 0, 8), (f64, f64), f64),
              ((0, 8), (f32, bf16), f32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "pair", "param_dtype"), ZERO_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_zero_rows(op, shape, pair, param_dtype, backend):
    """numel 0: torch's ops serve the call; shapes and dtypes as for a non-empty one, zero
    parameter gradients in the parameters' dtype."""
    device = device_of(backend)
    x, residual = (randn(shape, d, device).requires_grad_(True) for d in pair)
    weight = randn(8, param_dtype, device).requires_grad_(True)
    bias = randn(8, param_dtype, device).requires_grad_(True) if op == "layer_norm" else None
    y, h = add_norm(op, x, residual, (8,), weight, bias, backend=backend)
    h_dtype = torch.promote_types(*pair)
    assert y.shape == h.shape == shape and y.dtype == h.dtype == h_dtype
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    grads = torch.autograd.grad((y.sum() + h.sum()), leaves, allow_unused=True)
    for g, leaf in zip(grads, leaves, strict=True):
        assert g is None or (g.shape == leaf.shape and g.dtype == leaf.dtype
                             and torch.equal(g, torch.zeros_like(g)))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("op", OPS)
def test_add_norm_gradcheck(op, affine, backend):
    """float64 gradcheck through both outputs (y and h)."""
    if op == "rms_norm" and affine == "bias":
        pytest.skip("RMSNorm has no bias")
    x, residual = (torch.randn(3, 5, dtype=f64, requires_grad=True) for _ in range(2))
    weight, bias = make_params(op, (5,), affine, f64, "cpu")
    params = [t.requires_grad_(True) for t in (weight, bias) if t is not None]

    def fn(x, residual, *params):
        it = iter(params)
        w = next(it) if weight is not None else None
        b = next(it) if bias is not None else None
        return add_norm(op, x, residual, (5,), w, b, eps=1e-5, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, residual, *params))


# ---- backend selection ----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_takes_the_cpu_kernels(op):
    x, residual = (randn((4, 3, 9), f32).requires_grad_(True) for _ in range(2))
    for name in (f"add_{op}_fwd", f"add_{op}_bwd"):
        OpDispatch.last_choice.pop(name, None)
    y, h = add_norm(op, x, residual, 9)
    (y.sum() + h.pow(2).sum()).backward()
    expected = "cpu" if fusedlm.backends()["cpu"].available else "torch"
    assert OpDispatch.last_choice[f"add_{op}_fwd"] == expected
    assert OpDispatch.last_choice[f"add_{op}_bwd"] == expected


@pytest.mark.parametrize("op", OPS)
def test_named_backend_that_cannot_serve_raises(op, monkeypatch):
    """There is no CUDA C++ kernel: "cuda" named for CPU tensors (and on CUDA tensors, see
    test_gpu_cuda_backend_steps_aside) raises BackendNotSupportedError naming the argument, or
    FUSEDLM_BACKEND when that asked."""
    x, residual = randn((4, 9), f32), randn((4, 9), f32)
    with pytest.raises(BackendNotSupportedError,
                       match="argument 'backend' asks for backend 'cuda', which cannot serve"):
        add_norm(op, x, residual, 9, backend="cuda")
    monkeypatch.setenv("FUSEDLM_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError, match="FUSEDLM_BACKEND asks for backend 'cuda'"):
        add_norm(op, x, residual, 9)
    monkeypatch.setenv("FUSEDLM_BACKEND", "torch")
    OpDispatch.last_choice.clear()
    add_norm(op, x, residual, 9)
    assert OpDispatch.last_choice[f"add_{op}_fwd"] == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_cuda_backend_steps_aside(op):
    """On CUDA tensors "auto" takes the Triton kernels (no CUDA C++ kernel for the fused add);
    "cuda" named raises."""
    x, residual = randn((4, 64), bf16, "cuda"), randn((4, 64), f32, "cuda")
    OpDispatch.last_choice.clear()
    add_norm(op, x.requires_grad_(True), residual, 64)[0].sum().backward()
    assert OpDispatch.last_choice[f"add_{op}_fwd"] == "triton"
    assert OpDispatch.last_choice[f"add_{op}_bwd"] == "triton"
    with pytest.raises(BackendNotSupportedError, match="argument 'backend'"):
        add_norm(op, x, residual, 64, backend="cuda")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("op", OPS)
def test_kernel_backend_named_under_vmap_raises(op, backend):
    x = randn((3, 4, 8), f32, device_of(backend))
    with pytest.raises(BackendNotSupportedError, match="torch.func transforms"):
        torch.vmap(lambda t: add_norm(op, t, t, 8, backend=backend))(x)


@pytest.mark.parametrize("op", OPS)
def test_under_torch_func_transforms(op):
    """vmap, grad, jacrev, jvp and forward-mode AD run the torch reference and agree with the
    eager code under the same transform."""
    x, residual = randn((3, 4, 8), f64), randn((3, 4, 8), f64)
    weight = randn((8,), f64)
    tangent = torch.randn_like(x)

    def ours(x, r, w):
        y, h = add_norm(op, x, r, 8, w, eps=1e-6)
        return y + 0.5 * h

    def eager(x, r, w):
        y, h = eager_add_norm(op, x, r, (8,), w, eps=1e-6)
        return y + 0.5 * h

    for transform in (
        lambda f: torch.vmap(f, in_dims=(0, 0, None))(x, residual, weight),
        lambda f: torch.vmap(torch.func.grad(lambda w, xi, ri: f(xi, ri, w).pow(2).sum()),
                             in_dims=(None, 0, 0))(weight, x, residual),
        lambda f: torch.func.jacrev(f, argnums=(0, 1, 2))(x[0], residual[0], weight),
        lambda f: torch.func.jvp(lambda xi: f(xi, residual, weight), (x,), (tangent,))[1],
    ):
        torch.testing.assert_close(transform(ours), transform(eager), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(residual, tangent)
        got = torch.autograd.forward_ad.unpack_dual(ours(x, dual, weight)).tangent
    expected = torch.func.jvp(lambda r: eager(x, r, weight), (residual,), (tangent,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_without_autograd_gives_the_grad_mode_result(op, backend):
    """Under torch.no_grad() or with nothing requiring grad, the forward runs without the
    autograd.Function and gives the same y and h bit for bit; a weight alone requiring grad
    still gets its gradient."""
    device = device_of(backend)
    x, residual = _inputs((5, 3, 40), (bf16, f32), device)
    weight, bias = make_params(op, (40,), "weight+bias", f32, device)
    expected = [t.detach() for t in add_norm(op, x.clone().requires_grad_(True), residual, 40,
                                             weight, bias, backend=backend)]
    with torch.no_grad():
        no_grad = add_norm(op, x.clone().requires_grad_(True), residual, 40, weight, bias,
                           backend=backend)
    plain = add_norm(op, x, residual, 40, weight, bias, backend=backend)
    for outs in (no_grad, plain):
        for out, exp in zip(outs, expected, strict=True):
            assert out.grad_fn is None and not out.requires_grad
            assert torch.equal(out, exp)
    leaf = weight.clone().requires_grad_(True)
    y, h = add_norm(op, x, residual, 40, leaf, bias, backend=backend)
    assert y.grad_fn is not None
    y.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == (40,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_under_autocast_keeps_its_precision(op, backend):
    """A bfloat16 autocast branch beside a float32 stream: under autocast the op runs as without
    it (h and y float32), forward and backward, bit for bit."""
    device = device_of(backend)
    x, residual = _inputs((6, 40), (bf16, f32), device)
    weight, bias = make_params(op, (40,), "weight+bias", f32, device)
    grads = [randn((6, 40), f32, device) for _ in range(2)]
    results = []
    for autocast in (False, True):
        leaves = [t.detach().clone().requires_grad_(True)
                  for t in (x, residual, weight, bias) if t is not None]
        with torch.autocast(torch.device(device).type, dtype=bf16, enabled=autocast):
            y, h = add_norm(op, *leaves[:2], 40, *leaves[2:], backend=backend)
        results.append((y, h, torch.autograd.grad((y, h), leaves, grads)))
    (y, h, g), (y_a, h_a, g_a) = results
    assert y_a.dtype == h_a.dtype == f32
    assert torch.equal(y_a, y) and torch.equal(h_a, h)
    for a, b in zip(g, g_a, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ---- custom ops: torch.library.opcheck ------------------------------------------------------


OPCHECK_PAIRS = [(f32, f32), (bf16, f32), (f64, f64), (bf16, bf16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", OPCHECK_PAIRS, ids=pair_id)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, affine, pair, backend):
    """The custom ops' fakes, schemas and autograd registration, grad_h given or None."""
    device = device_of(backend)
    x, residual = (t.requires_grad_(True) for t in _inputs((6, 24), pair, device))
    weight, bias = (None if t is None else t.requires_grad_(True)
                    for t in make_params(op, (24,), affine, pair[1], device))
    w = None if weight is None else weight.detach()
    grad_y = randn((6, 24), pair[1], device)
    if op == "layer_norm":
        torch.library.opcheck(torch.ops.fusedlm.add_layer_norm_fwd.default,
                              (x, residual, weight, bias, 1e-5, backend))
        with torch.no_grad():
            _, h, mean, rstd = torch.ops.fusedlm.add_layer_norm_fwd(x, residual, weight, bias,
                                                                    1e-5, backend)
        for grad_h in (None, randn((6, 24), pair[1], device)):
            torch.library.opcheck(torch.ops.fusedlm.add_layer_norm_bwd.default,
                                  (grad_y, grad_h, h, mean, rstd, w, bias is not None, backend))
    else:
        torch.library.opcheck(torch.ops.fusedlm.add_rms_norm_fwd.default,
                              (x, residual, weight, 1e-6, backend))
        with torch.no_grad():
            _, h, rstd = torch.ops.fusedlm.add_rms_norm_fwd(x, residual, weight, 1e-6, backend)
        for grad_h in (None, randn((6, 24), pair[1], device)):
            torch.library.opcheck(torch.ops.fusedlm.add_rms_norm_bwd.default,
                                  (grad_y, grad_h, h, rstd, w, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [(f32, f32), (bf16, f32), (f16, f16), (f64, f64)],
                         ids=pair_id)
def test_add_layer_norm_fwd_op_statistics(pair, backend):
    """mean and rstd are h's row statistics, float32 (float64 for float64)."""
    device = device_of(backend)
    x, residual = _inputs((7, 50), pair, device)
    _, h, mean, rstd = torch.ops.fusedlm.add_layer_norm_fwd(x, residual, None, None, 1e-5,
                                                            backend)
    stat = f64 if pair[1] == f64 else f32
    assert mean.dtype == rstd.dtype == stat and mean.shape == rstd.shape == (7,)
    h64 = (x + residual).double()
    torch.testing.assert_close(mean.double(), h64.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (h64.var(-1, unbiased=False) + 1e-5).rsqrt(),
                               rtol=1e-5, atol=1e-6)


# ---- bad inputs -----------------------------------------------------------------------------


def _t(*shape, dtype=f32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


X = lambda: _t(3, 8)  # noqa: E731
W = lambda dtype=f32, n=8: _t(n, dtype=dtype)  # noqa: E731

BAD_INPUTS = [
    # (id, exception, argument named, call of f(x, residual, normalized_shape, ...))
    ("x_int", TypeError, "'x'", lambda f: f(X().long(), X(), 8)),
    ("x_bool", TypeError, "'x'", lambda f: f(X() > 0, X(), 8)),
    ("x_complex", TypeError, "'x'", lambda f: f(X().to(torch.complex64), X(), 8)),
    ("x_list", TypeError, "'x'", lambda f: f(X().tolist(), X(), 8)),
    ("x_none", TypeError, "'x'", lambda f: f(None, X(), 8)),
    ("x_sparse", ValueError, "'x'", lambda f: f(X().to_sparse(), X(), 8)),
    ("residual_int", TypeError, "'residual'", lambda f: f(X(), X().int(), 8)),
    ("residual_bool", TypeError, "'residual'", lambda f: f(X(), X() > 0, 8)),
    ("residual_list", TypeError, "'residual'", lambda f: f(X(), X().tolist(), 8)),
    ("residual_none", TypeError, "'residual'", lambda f: f(X(), None, 8)),
    ("residual_shape", ValueError, "'residual'", lambda f: f(X(), _t(3, 9), 9)),
    ("residual_broadcastable", ValueError, "'residual'", lambda f: f(X(), _t(1, 8), 8)),
    ("residual_rank", ValueError, "'residual'", lambda f: f(X(), _t(1, 3, 8), 8)),
    ("residual_on_meta", ValueError, "'residual'", lambda f: f(X(), _t(3, 8, device="meta"), 8)),
    ("x_on_meta", ValueError, "'residual'", lambda f: f(_t(3, 8, device="meta"), X(), 8)),
    ("shape_mismatch", ValueError, "'normalized_shape'", lambda f: f(X(), X(), 7)),
    ("shape_too_long", ValueError, "'normalized_shape'", lambda f: f(X(), X(), (2, 3, 8))),
    ("shape_2d_mismatch", ValueError, "'normalized_shape'",
     lambda f: f(_t(2, 4, 6), _t(2, 4, 6), (6, 4))),
    ("shape_empty", ValueError, "'normalized_shape'", lambda f: f(X(), X(), ())),
    ("shape_none", TypeError, "'normalized_shape'", lambda f: f(X(), X(), None)),
    ("shape_float", TypeError, "'normalized_shape'", lambda f: f(X(), X(), 8.0)),
    ("shape_str", TypeError, "'normalized_shape'", lambda f: f(X(), X(), "abc")),
    ("weight_shape", ValueError, "'weight'", lambda f: f(X(), X(), 8, W(n=7))),
    ("weight_2d", ValueError, "'weight'", lambda f: f(X(), X(), 8, _t(1, 8))),
    ("weight_int", TypeError, "'weight'", lambda f: f(X(), X(), 8, W().int())),
    ("weight_float64_h_float32", TypeError, "'weight'", lambda f: f(X(), X(), 8, W(f64))),
    ("weight_bf16_h_float32", TypeError, "'weight'", lambda f: f(X(), X(), 8, W(bf16))),
    # a bfloat16 x beside a float32 residual: h is float32, so is the weight
    ("weight_of_x_dtype_not_h", TypeError, "'weight'",
     lambda f: f(X().bfloat16(), X(), 8, W(bf16))),
    ("weight_not_tensor", TypeError, "'weight'", lambda f: f(X(), X(), 8, [1.0] * 8)),
    ("weight_on_meta", ValueError, "'weight'", lambda f: f(X(), X(), 8, _t(8, device="meta"))),
    ("eps_negative", ValueError, "'eps'", lambda f: f(X(), X(), 8, eps=-1e-5)),
    ("eps_nan", ValueError, "'eps'", lambda f: f(X(), X(), 8, eps=float("nan"))),
    ("eps_inf", ValueError, "'eps'", lambda f: f(X(), X(), 8, eps=float("inf"))),
    ("eps_str", TypeError, "'eps'", lambda f: f(X(), X(), 8, eps="1e-5")),
    ("backend_unknown", ValueError, "'backend'", lambda f: f(X(), X(), 8, backend="gpu")),
    ("backend_none", ValueError, "'backend'", lambda f: f(X(), X(), 8, backend=None)),
    ("backend_cuda", BackendNotSupportedError, "'backend'",
     lambda f: f(X(), X(), 8, backend="cuda")),
]

LN_BAD_INPUTS = [
    ("bias_shape", ValueError, "'bias'", lambda: fusedlm.add_layer_norm(X(), X(), 8, W(), W(n=4))),
    ("bias_int", TypeError, "'bias'",
     lambda: fusedlm.add_layer_norm(X(), X(), 8, W(), W().long())),
    ("bias_dtype_differs_from_weight", TypeError, "'bias'",
     lambda: fusedlm.add_layer_norm(X().double(), X().double(), 8, W(f64), W(f32))),
    ("bias_on_meta", ValueError, "'bias'",
     lambda: fusedlm.add_layer_norm(X(), X(), 8, W(), _t(8, device="meta"))),
    ("bias_float64_no_weight", TypeError, "'bias'",
     lambda: fusedlm.add_layer_norm(X(), X(), 8, None, W(f64))),
    ("bias_bf16_h_float32", TypeError, "'bias'",
     lambda: fusedlm.add_layer_norm(X().bfloat16(), X(), 8, None, W(bf16))),
]


def _raises(exc, argument, call, *args):
    with pytest.raises(exc) as info:
        call(*args)
    message = str(info.value)
    assert argument in message, f"{type(info.value).__name__} does not name {argument!r}: {message}"


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("function", ["add_layer_norm", "add_rms_norm"])
def test_bad_input_names_the_argument(function, exc, argument, call):
    _raises(exc, argument, call, getattr(fusedlm, function))


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in LN_BAD_INPUTS],
                         ids=[c[0] for c in LN_BAD_INPUTS])
def test_add_layer_norm_bad_bias(exc, argument, call):
    _raises(exc, argument, call)


# ---- the C++ entry points directly ----------------------------------------------------------


def _ext():
    return fusedlm._ext.load()


def _fwd(op, x, residual, weight=None, bias=None, eps=1e-5):
    e = _ext()
    if op == "layer_norm":
        return e.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return e.add_rms_norm_fwd(x, residual, weight, eps)


def _bwd(op, grad_y, grad_h, fwd_out, weight=None, has_bias=False):
    """fusedlm._C.add_*_bwd from an _fwd result."""
    e = _ext()
    if op == "layer_norm":
        _, h, mean, rstd = fwd_out
        return e.add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias)
    _, h, rstd = fwd_out
    return e.add_rms_norm_bwd(grad_y, grad_h, h, rstd, weight)


@needs_cpu_backend
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("op", OPS)
def test_entry_point_grad_h_none_is_zeros(op, pair):
    """grad_h None and grad_h zeros give the same dh (and parameter grads); a grad_h adds to
    dh before its one rounding (float64: exactly the sum)."""
    x, residual = _inputs((37, 90), pair, "cpu")
    weight, bias = make_params(op, (90,), "weight+bias", pair[1], "cpu")
    out = _fwd(op, x, residual, weight, bias)
    assert out[1].dtype == pair[1] and torch.equal(out[1], x + residual)
    grad_y = randn((37, 90), pair[1])
    has_bias = bias is not None
    none = _bwd(op, grad_y, None, out, weight, has_bias)
    zeros = _bwd(op, grad_y, torch.zeros_like(grad_y), out, weight, has_bias)
    assert len(none) == len(zeros)
    for a, b in zip(none, zeros, strict=True):
        assert (a is None) == (b is None)
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b))
    assert none[0].dtype == pair[1] and none[0].shape == (37, 90)
    grad_h = randn((37, 90), pair[1])
    with_h = _bwd(op, grad_y, grad_h, out, weight, has_bias)
    # baseline: eager's separately rounded sum
    truth = dh_truth(op, out[1], weight, bias, grad_y, grad_h, 1e-5)
    assert_close_rule(with_h[0], none[0] + grad_h, truth, name="dh")
    for a, b in zip(with_h[1:], none[1:], strict=True):  # parameter grads do not see grad_h
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@needs_cpu_backend
@pytest.mark.parametrize("op", OPS)
def test_entry_points_take_any_layout(op):
    """Strided x, residual, grad_y and grad_h give the result of contiguous copies."""
    base = randn((2, 30, 16), f64)
    views = {"transposed": base.transpose(0, 1).reshape(30, 32)[:, ::2].t(),  # (16, 30)
             "expanded": base[0, :1].expand(16, 16),
             "offset": randn((500,), f64)[7:7 + 16 * 16].view(16, 16)}
    x = views["expanded"]
    residual = randn((16, 32), f64)[:, 3:19]
    weight = randn((16,), f64)
    grad_y = views["offset"]
    grad_h = randn((16, 16), f64).t()
    strided = _fwd(op, x, residual, weight, weight if op == "layer_norm" else None)
    contiguous = _fwd(op, x.contiguous(), residual.contiguous(), weight,
                      weight if op == "layer_norm" else None)
    for a, b in zip(strided, contiguous, strict=True):
        assert torch.equal(a, b)
    has_bias = op == "layer_norm"
    for g in (None, grad_h):
        got = _bwd(op, grad_y, g, strided, weight, has_bias)
        want = _bwd(op, grad_y.contiguous(), None if g is None else g.contiguous(), contiguous,
                    weight, has_bias)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert views["transposed"].shape == (16, 30)
    y, h = _fwd(op, views["transposed"], randn((16, 30), f64))[:2]
    assert y.is_contiguous() and h.is_contiguous()


@needs_cpu_backend
@pytest.mark.parametrize("op", OPS)
def test_entry_points_zero_rows(op):
    x = torch.empty((0, 9))
    weight = randn((9,), f32)
    out = _fwd(op, x, x.bfloat16().float(), weight, weight if op == "layer_norm" else None)
    assert out[0].shape == out[1].shape == (0, 9) and all(s.shape == (0,) for s in out[2:])
    grads = _bwd(op, x, None, out, weight, op == "layer_norm")
    assert grads[0].shape == (0, 9)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros(9))


ENTRY_BAD_GRAD_H = [
    ("shape", ValueError, lambda t: t[:2]),
    ("transposed_shape", ValueError, lambda t: t.t()),
    ("3d", ValueError, lambda t: t[None]),
    ("dtype", TypeError, lambda t: t.double()),
    ("half", TypeError, lambda t: t.half()),
    ("int", TypeError, lambda t: t.int()),
    ("meta", ValueError, lambda t: t.to("meta")),
]


@needs_cpu_backend
@pytest.mark.parametrize(("exc", "bad"), [c[1:] for c in ENTRY_BAD_GRAD_H],
                         ids=[c[0] for c in ENTRY_BAD_GRAD_H])
@pytest.mark.parametrize("op", OPS)
def test_entry_point_bad_grad_h_names_it(op, exc, bad):
    x, residual = X(), X()
    out = _fwd(op, x, residual)
    _raises(exc, "'grad_h'", lambda: _bwd(op, X(), bad(X()), out))


@needs_cpu_backend
@pytest.mark.parametrize(("x_dtype", "residual_dtype"),
                         [(f32, bf16), (f16, bf16), (f64, f32), (f32, f64), (bf16, f16),
                          (f32, f16)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_entry_point_takes_only_kernel_pairs(op, x_dtype, residual_dtype):
    """The entry points take x in residual's dtype or 16-bit beside float32 (the op layer casts
    every other pair); another pair raises naming 'x'."""
    _raises(TypeError, "'x'", lambda: _fwd(op, X().to(x_dtype), X().to(residual_dtype)))
