"""The CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm.cu) at realistic sizes, through every
launch path: warp per row (forward N <= 1024, backward N <= 512), block per row (forward
N <= 32768, backward N <= 8192), and the generic kernels (larger N, odd N, misaligned rows,
float64), plus the two-stage dweight/dbias reduction, grid-stride loops over many rows,
determinism, the current stream and CUDA-graph capture.

Truth: torch in float64; baseline: torch at the input's precision; the rule of tests/helpers.py.
Everything here needs a GPU and a CUDA build of fusedlm._C (a GPU without the CUDA kernels
fails these tests rather than skipping them: CUDA code must pass on a GPU to count).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import _ext
from tests.helpers import assert_close_rule

pytestmark = pytest.mark.gpu

NORM_OPS = ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd")
LOW = (torch.bfloat16, torch.float16)
REALISTIC_N = [256, 512, 768, 1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536]
M = 4096


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    module = _ext.load()
    assert module is not None, f"fusedlm._C does not load: {_ext.why_unavailable()}"
    assert module.built_with_cuda(), "fusedlm._C was built without CUDA"
    missing = [op for op in NORM_OPS if op not in module.cuda_ops()]
    assert not missing, f"no CUDA kernels for {missing} in this build"


def _randn(shape, dtype, scale=1.0, offset=0.0):
    return (offset + scale * torch.randn(shape, dtype=torch.float64, device="cuda")).to(dtype)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _grads(out, grad_out, inputs):
    present = [t for t in inputs if t is not None]
    it = iter(torch.autograd.grad(out, present, grad_out))
    return [next(it) if t is not None else None for t in inputs]


def check_layer_norm(x, weight, bias, eps=1e-5, backward=True):
    """fusedlm.layer_norm(backend="cuda") forward and backward against torch, by the rule."""
    n = x.shape[-1]
    xs, ws, bs = _leaf(x), _leaf(weight), _leaf(bias)
    y = fusedlm.layer_norm(xs, (n,), ws, bs, eps=eps, backend="cuda")
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_cuda
    xt, wt, bt = _leaf(x), _leaf(weight), _leaf(bias)
    mixed = any(p is not None and p.dtype != x.dtype for p in (weight, bias))
    y_torch = (
        F.layer_norm(xt.float(), (n,), wt, bt, eps).to(x.dtype)
        if mixed
        else F.layer_norm(xt, (n,), wt, bt, eps)
    )
    x64, w64, b64 = (
        None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight, bias)
    )
    y_truth = F.layer_norm(x64, (n,), w64, b64, eps)
    assert_close_rule(y, y_torch, y_truth, name="y")
    if not backward:
        return
    grad_out = _randn(x.shape, x.dtype)
    ours = _grads(y, grad_out, [xs, ws, bs])
    theirs = _grads(y_torch, grad_out, [xt, wt, bt])
    truth = _grads(y_truth, grad_out.double(), [x64, w64, b64])
    for name, g, g_torch, g_truth, src in zip(
        ("dx", "dweight", "dbias"), ours, theirs, truth, (x, weight, bias), strict=True
    ):
        if src is None:
            continue
        assert g.dtype == src.dtype, f"{name}: dtype {g.dtype}, expected {src.dtype}"
        assert_close_rule(g, g_torch.to(src.dtype), g_truth, name=name)


def check_rms_norm(x, weight, eps=1e-6, backward=True):
    n = x.shape[-1]
    xs, ws = _leaf(x), _leaf(weight)
    y = fusedlm.rms_norm(xs, (n,), ws, eps=eps, backend="cuda")
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_cuda
    xt, wt = _leaf(x), _leaf(weight)
    mixed = weight is not None and weight.dtype != x.dtype
    y_torch = (
        F.rms_norm(xt.float(), (n,), wt, eps).to(x.dtype)
        if mixed
        else F.rms_norm(xt, (n,), wt, eps)
    )
    x64, w64 = (
        None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight)
    )
    y_truth = F.rms_norm(x64, (n,), w64, eps)
    assert_close_rule(y, y_torch, y_truth, name="y")
    if not backward:
        return
    grad_out = _randn(x.shape, x.dtype)
    ours = _grads(y, grad_out, [xs, ws])
    theirs = _grads(y_torch, grad_out, [xt, wt])
    truth = _grads(y_truth, grad_out.double(), [x64, w64])
    for name, g, g_torch, g_truth, src in zip(
        ("dx", "dweight"), ours, theirs, truth, (x, weight), strict=True
    ):
        if src is None:
            continue
        assert g.dtype == src.dtype, f"{name}: dtype {g.dtype}, expected {src.dtype}"
        assert_close_rule(g, g_torch.to(src.dtype), g_truth, name=name)


def _params(n, dtype, weight=True, bias=True):
    w = _randn((n,), dtype, scale=0.5, offset=1.0) if weight else None
    b = _randn((n,), dtype, scale=0.5) if bias else None
    return w, b


# ---- realistic sizes: M = 4096 rows, N = 256 .. 65536 -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", REALISTIC_N)
def test_layer_norm_realistic(n, dtype):
    x = _randn((M, n), dtype)
    check_layer_norm(x, *_params(n, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", REALISTIC_N)
def test_rms_norm_realistic(n, dtype):
    x = _randn((M, n), dtype)
    check_rms_norm(x, _params(n, dtype, bias=False)[0])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("n", [256, 768, 1024, 4096, 8192, 16384, 65536])
def test_float32_params_low_precision_x(n, dtype):
    x = _randn((M, n), dtype)
    w, b = _params(n, torch.float32)
    check_layer_norm(x, w, b)
    check_rms_norm(x, w)


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("n", [512, 4096, 16384])  # backward: warp, block, generic
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same", "f32"])
def test_layer_norm_affine_variants(affine, n, param_dtype):
    dtype = torch.bfloat16
    w, b = _params(n, param_dtype or dtype, weight="weight" in affine, bias="bias" in affine)
    check_layer_norm(_randn((1000, n), dtype), w, b)


@pytest.mark.parametrize("n", [512, 4096, 16384])
def test_rms_norm_no_weight(n):
    check_rms_norm(_randn((1000, n), torch.bfloat16), None)


# ---- odd sizes, misaligned rows, float64, few rows -------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("n", [1, 7, 40, 127, 1000, 4099, 40000])
def test_odd_sizes(n, dtype):
    x = _randn((67, n), dtype)
    w, b = _params(n, dtype)
    check_layer_norm(x, w, b)
    check_rms_norm(x, w)


@pytest.mark.parametrize("m", [1, 3, 5, 9, 4097])
@pytest.mark.parametrize("n", [64, 768, 2048, 65536])
def test_row_counts(m, n):
    x = _randn((m, n), torch.bfloat16)
    w, b = _params(n, torch.bfloat16)
    check_layer_norm(x, w, b)
    check_rms_norm(x, w)


@pytest.mark.parametrize("n", [256, 2048, 65536])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_misaligned_rows_and_params(n, dtype):
    """x, grad_y and weights at a 1-element storage offset: no 16-byte vector access allowed."""
    m = 33
    x = _randn((m * n + 1,), dtype)[1:].view(m, n)
    w = _randn((n + 1,), dtype, scale=0.5, offset=1.0)[1:]
    b = _randn((n + 1,), dtype, scale=0.5)[1:]
    assert x.data_ptr() % 16 != 0 and w.data_ptr() % 16 != 0
    check_layer_norm(x, w, b)
    check_rms_norm(x, w)


def test_non_contiguous_input():
    x = _randn((1024, 512), torch.bfloat16).t()  # (512, 1024), strides (1, 512)
    w, b = _params(1024, torch.bfloat16)
    check_layer_norm(x, w, b)
    check_rms_norm(x, w)


def test_float64_x_with_float32_params_op_level():
    """The op accepts float32 params for float64 x; the CUDA path computes in float64 and
    returns grads in the params' dtype, like the CPU kernel."""
    module = _ext.load()
    x = _randn((50, 300), torch.float64)
    w, b = _params(300, torch.float32)
    y, mean, rstd = module.layer_norm_fwd(x, w, b, 1e-5)
    y_cpu, mean_cpu, rstd_cpu = module.layer_norm_fwd(x.cpu(), w.cpu(), b.cpu(), 1e-5)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-12, atol=1e-12)
    assert mean.dtype == rstd.dtype == torch.float64
    dy = _randn((50, 300), torch.float64)
    dx, dw, db = module.layer_norm_bwd(dy, x, mean, rstd, w, True)
    dx_c, dw_c, db_c = module.layer_norm_bwd(dy.cpu(), x.cpu(), mean_cpu, rstd_cpu, w.cpu(), True)
    assert dw.dtype == db.dtype == torch.float32
    torch.testing.assert_close(dx.cpu(), dx_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw.cpu(), dw_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(db.cpu(), db_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [257, 1024, 8192])
def test_large_mean_offset(n):
    """Rows of 1000 + N(0, 1): variance from the centred values, not E[x^2] - E[x]^2."""
    x = _randn((512, n), torch.float32, offset=1000.0)
    w, b = _params(n, torch.float32)
    check_layer_norm(x, w, b)


@pytest.mark.parametrize("n", [40, 1024, 4096, 40000])
def test_nan_inf_rows_like_torch(n):
    x = _randn((8, n), torch.float32)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    w, b = _params(n, torch.float32)
    y = fusedlm.layer_norm(x, (n,), w, b, backend="cuda")
    y_torch = F.layer_norm(x, (n,), w, b)
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch))
    assert torch.equal(torch.isinf(y), torch.isinf(y_torch))
    r = fusedlm.rms_norm(x, (n,), w, eps=1e-6, backend="cuda")
    r_torch = F.rms_norm(x, (n,), w, 1e-6)
    assert torch.equal(torch.isnan(r), torch.isnan(r_torch))
    finite = torch.isfinite(r_torch)
    assert torch.equal(r[finite] == 0, r_torch[finite] == 0)
    # the clean rows are unaffected by their neighbours
    assert torch.equal(y[3:], fusedlm.layer_norm(x[3:], (n,), w, b, backend="cuda"))


def test_zero_rows():
    x = torch.randn(0, 768, device="cuda", requires_grad=True)
    w = torch.randn(768, device="cuda", requires_grad=True)
    b = torch.randn(768, device="cuda", requires_grad=True)
    y = fusedlm.layer_norm(x, (768,), w, b, backend="cuda")
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(dw))
    assert torch.equal(db, torch.zeros_like(db))


# ---- grid-stride loops: more rows than the capped grid ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("m", "n"), [((1 << 22) + 13, 8), ((1 << 20) + 5, 1032)], ids=["warp_rows", "block_rows"]
)
def test_more_rows_than_grid(m, n):
    """Grids are capped at 2^20 blocks (kMaxGridBlocks); rows past it come from the loop."""
    dtype = torch.bfloat16
    x = _randn((m, n), dtype)
    w, b = _params(n, dtype)
    module = _ext.load()
    y, mean, rstd = module.layer_norm_fwd(x, w, b, 1e-5)
    rows = torch.cat(
        [
            torch.arange(64, device="cuda"),
            torch.arange(m - 64, m, device="cuda"),
            torch.randint(0, m, (256,), device="cuda"),
        ]
    )
    ref = F.layer_norm(x[rows].double(), (n,), w.double(), b.double(), 1e-5)
    base = F.layer_norm(x[rows], (n,), w, b, 1e-5)
    assert_close_rule(y[rows], base, ref, name="y rows")
    dy = _randn((m, n), dtype)
    dx, dw, db = module.layer_norm_bwd(dy, x, mean, rstd, w, True)
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    dw_ref = (dy.float() * xhat).sum(0)
    db_ref = dy.float().sum(0)
    torch.testing.assert_close(dw.float(), dw_ref, rtol=2e-2, atol=2e-2 * dw_ref.abs().max().item())
    torch.testing.assert_close(db.float(), db_ref, rtol=2e-2, atol=2e-2 * db_ref.abs().max().item())
    x64 = x[rows].double().requires_grad_(True)
    (g,) = torch.autograd.grad(
        F.layer_norm(x64, (n,), w.double(), b.double(), 1e-5), x64, dy[rows].double()
    )
    torch.testing.assert_close(dx[rows].double(), g, rtol=3e-2, atol=3e-2 * g.abs().max().item())


# ---- determinism, streams, CUDA graphs, errors ------------------------------------------------


@pytest.mark.parametrize("n", [512, 4096, 16384])
def test_backward_is_deterministic(n):
    module = _ext.load()
    x = _randn((3000, n), torch.bfloat16)
    w, b = _params(n, torch.float32)
    _, mean, rstd = module.layer_norm_fwd(x, w, b, 1e-5)
    dy = _randn((3000, n), torch.bfloat16)
    first = module.layer_norm_bwd(dy, x, mean, rstd, w, True)
    for _ in range(3):
        again = module.layer_norm_bwd(dy, x, mean, rstd, w, True)
        for a, b_ in zip(first, again, strict=True):
            assert torch.equal(a, b_)


def test_runs_on_the_current_stream():
    """On a busy side stream, the weight is changed behind a long sleep and then the op runs:
    a kernel launched on any other stream would read the old weight."""
    module = _ext.load()
    x = _randn((4096, 2048), torch.bfloat16)
    w, b = _params(2048, torch.bfloat16)
    expected = module.layer_norm_fwd(x, w + 1, b, 1e-5)[0]
    dy = _randn((4096, 2048), torch.bfloat16)
    _, mean, rstd = module.layer_norm_fwd(x, w, b, 1e-5)
    expected_bwd = module.layer_norm_bwd(dy, x, mean, rstd, w + 1, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        w.add_(1)
        y = module.layer_norm_fwd(x, w, b, 1e-5)[0]
        grads = module.layer_norm_bwd(dy, x, mean, rstd, w, True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, expected)
    for got, want in zip(grads, expected_bwd, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("n", [768, 4096, 16384])
def test_cuda_graph_capture(n):
    """Forward and backward launch on the capturing stream (a kernel on the legacy default
    stream would make the capture fail), and replays recompute from the static inputs."""
    module = _ext.load()
    x = _randn((512, n), torch.bfloat16)
    dy = _randn((512, n), torch.bfloat16)
    w, b = _params(n, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up of every captured op, outside the capture
        _, mean0, rstd0 = module.layer_norm_fwd(x, w, b, 1e-5)
        module.layer_norm_bwd(dy, x, mean0, rstd0, w, True)
        module.rms_norm_bwd(dy, x, module.rms_norm_fwd(x, w, 1e-6)[1], w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, mean, rstd = module.layer_norm_fwd(x, w, b, 1e-5)
        dx, dw, db = module.layer_norm_bwd(dy, x, mean, rstd, w, True)
        r_y, r_rstd = module.rms_norm_fwd(x, w, 1e-6)
        r_dx, r_dw = module.rms_norm_bwd(dy, x, r_rstd, w)
    x.copy_(_randn((512, n), torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    eager = module.layer_norm_fwd(x, w, b, 1e-5)
    assert torch.equal(y, eager[0]) and torch.equal(rstd, eager[2])
    for got, want in zip(
        (dx, dw, db), module.layer_norm_bwd(dy, x, eager[1], eager[2], w, True), strict=True
    ):
        assert torch.equal(got, want)
    r_eager = module.rms_norm_fwd(x, w, 1e-6)
    assert torch.equal(r_y, r_eager[0])
    for got, want in zip((r_dx, r_dw), module.rms_norm_bwd(dy, x, r_eager[1], w), strict=True):
        assert torch.equal(got, want)


def test_statistics_dtype_and_values():
    module = _ext.load()
    x = _randn((300, 1000), torch.bfloat16)
    _, mean, rstd = module.layer_norm_fwd(x, None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6
    )


def test_mixed_devices_rejected_before_the_kernel():
    module = _ext.load()
    x = _randn((4, 8), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        module.layer_norm_fwd(x, torch.ones(8), None, 1e-5)
    with pytest.raises(TypeError, match="weight"):
        module.layer_norm_fwd(x, torch.ones(8, device="cuda", dtype=torch.bfloat16), None, 1e-5)


def test_backend_cuda_is_chosen_by_auto():
    from fusedlm.backends import OpDispatch

    x = _randn((64, 768), torch.bfloat16)
    fusedlm.layer_norm(x, (768,), backend="auto")
    assert OpDispatch.last_choice["layer_norm_fwd"] == "cuda"
