"""The Triton LayerNorm/RMSNorm kernels (python/fusedlm/triton/norm.py) through the public API
with backend="triton", against torch's F.layer_norm / F.rms_norm by DESIGN.md's rule (truth:
float64; baseline: torch at the input's dtype).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors:
small odd shapes, float32/float16 (and a little float64). The streamed (large hidden size)
schemes are reached both at their real thresholds (hidden 8200: backward streams; 16411: forward
streams too) and with the thresholds lowered so small rows take them. ``gpu`` tests run
realistic sizes in bfloat16/float16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.backends import OpDispatch  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402
from tests.ops.test_norm import _check_ln, _check_rms, _params, _randn  # noqa: E402

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import norm as triton_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
# bfloat16 under the interpreter too (fusedlm/triton/interpreter_fixes.py: its casts round as a
# GPU's do).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, hidden): hidden 1, 127 (several rows per tile), 4099 (one row per tile), 8200 (the
# backward streams), 16411 (both stream); rows 1, 17, 113 (several row blocks per program).
SHAPES = [(1, 1), (113, 1), (17, 127), (113, 127), (5, 4099), (3, 8200), (2, 16411)]
LN_AFFINE = ["weight+bias", "weight", "bias", "none"]


@pytest.fixture
def streamed(monkeypatch):
    """Lower the single-tile limits so rows of more than 16 (forward) / 8 (backward) elements
    are streamed in chunks of 8 columns (hidden 17: two full chunks and a 1-column tail)."""
    monkeypatch.setattr(triton_norm, "FWD_SINGLE_TILE_MAX_N", 16)
    monkeypatch.setattr(triton_norm, "BWD_SINGLE_TILE_MAX_N", 8)
    monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 8)



# Every affine combination on the small shapes; the big ones (slow under the interpreter) take
# the full one.
def _cases(affines):
    cases = [(s, a) for s in SHAPES for a in (affines if s[1] <= 4099 else affines[:1])]
    return cases, [f"{m}x{n}-{a}" for (m, n), a in cases]


LN_CASES, LN_IDS = _cases(LN_AFFINE)
RMS_CASES, RMS_IDS = _cases(["weight", "none"])


# ---- LayerNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "affine"), LN_CASES, ids=LN_IDS)
def test_layer_norm(shape, affine, dtype):
    x = _randn(shape, dtype, DEVICE)
    weight, bias = _params(shape[1:], affine, dtype, DEVICE)
    OpDispatch.last_choice.clear()
    _check_ln(x, shape[1:], weight, bias, B)
    assert OpDispatch.last_choice["layer_norm_fwd"] == "triton"
    assert OpDispatch.last_choice["layer_norm_bwd"] == "triton"


@pytest.mark.usefixtures("streamed")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", LN_AFFINE)
@pytest.mark.parametrize("shape", [(1, 17), (5, 20)], ids=str)
def test_layer_norm_streamed(shape, affine, dtype):
    assert not triton_norm.norm_config(shape[1], backward=False).single_tile
    x = _randn(shape, dtype, DEVICE)
    weight, bias = _params(shape[1:], affine, dtype, DEVICE)
    _check_ln(x, shape[1:], weight, bias, B)


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias"])
def test_layer_norm_float32_params_low_precision_x(affine, dtype):
    x = _randn((9, 96), dtype, DEVICE)
    weight, bias = _params((96,), affine, dtype, DEVICE, param_dtype=torch.float32)
    _check_ln(x, (96,), weight, bias, B)


# Views that reach the kernel as they are (tests/ops' helpers clone x, which makes sliced and
# expanded tensors contiguous): base tensor shape and base -> x.
LAYOUTS = {
    "transposed": ((33, 12), lambda b: b.t()),  # (12, 33), strides (1, 12)
    "row_stride": ((12, 66), lambda b: b[:, 5:38]),  # strides (66, 1), storage offset 5
    "col_stride": ((12, 66), lambda b: b[:, ::2]),  # strides (66, 2)
    "expanded_rows": ((1, 33), lambda b: b.expand(12, 33)),  # row stride 0
    "transposed_3d": ((2, 33, 6), lambda b: b.transpose(1, 2)),  # (2, 6, 33)
}


def _check_view(layout, dtype, rms=False):
    """Norm of a non-contiguous view of a leaf, forward and backward (gradients w.r.t. the base,
    weight and bias), against torch by the rule."""
    shape, view = LAYOUTS[layout]
    base = _randn(shape, dtype, DEVICE)
    N = view(base).shape[-1]
    weight, bias = _params((N,), "weight" if rms else "weight+bias", dtype, DEVICE)
    grad = _randn(view(base).shape, dtype, DEVICE)

    def run(cast, fn):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (base, weight, bias)
                  if t is not None]
        x = view(leaves[0])
        assert not x.is_contiguous()
        y = fn(x, leaves)
        return [y, *torch.autograd.grad(y, leaves, grad.to(cast))]

    if rms:
        ours = run(dtype, lambda x, p: fusedlm.rms_norm(x, (N,), p[1], eps=1e-6, backend=B))
        base_out = run(dtype, lambda x, p: F.rms_norm(x, (N,), p[1], 1e-6))
        truth = run(torch.float64, lambda x, p: F.rms_norm(x, (N,), p[1], 1e-6))
    else:
        ours = run(dtype, lambda x, p: fusedlm.layer_norm(x, (N,), p[1], p[2], backend=B))
        base_out = run(dtype, lambda x, p: F.layer_norm(x, (N,), p[1], p[2]))
        truth = run(torch.float64, lambda x, p: F.layer_norm(x, (N,), p[1], p[2]))
    # RMSNorm has no dbias: zip stops at the shorter list.
    for name, o, b, t in zip(("y", "dbase", "dweight", "dbias"), ours, base_out, truth,
                             strict=False):
        assert o.dtype == dtype, name
        assert_close_rule(o, b, t, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_norm_non_contiguous(layout, dtype):
    _check_view(layout, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_broadcast_grad(dtype):
    """y.sum().backward() hands the kernel a grad_y with strides (0, 0)."""
    x = _randn((7, 45), dtype, DEVICE).requires_grad_(True)
    weight, bias = (t.requires_grad_(True) for t in _params((45,), "weight+bias", dtype, DEVICE))
    fusedlm.layer_norm(x, (45,), weight, bias, backend=B).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    F.layer_norm(leaves[0].float(), (45,), leaves[1].float(), leaves[2].float()).sum().backward()
    for name, ours, theirs in zip(("dx", "dweight", "dbias"), (x, weight, bias), leaves,
                                  strict=True):
        torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), rtol=2e-3, atol=2e-3,
                                   msg=name)


@pytest.mark.parametrize("streaming", [False, True], ids=["single_tile", "streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_large_mean_offset(dtype, streaming, monkeypatch):
    """Rows of 1000 + N(0, 1): a one-pass E[x^2] - E[x]^2 variance cancels catastrophically; the
    streamed scheme's per-chunk combination must not."""
    if streaming:  # 257 columns in chunks of 64: four full chunks and a 1-column tail
        monkeypatch.setattr(triton_norm, "FWD_SINGLE_TILE_MAX_N", 64)
        monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 64)
    x = (1000 + torch.randn(16, 257, dtype=torch.float64)).to(DEVICE, dtype)
    weight, bias = _params((257,), "weight+bias", dtype, DEVICE)
    _check_ln(x, (257,), weight, bias, B)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf
@pytest.mark.parametrize("streaming", [False, True], ids=["single_tile", "streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_nan_inf_propagate_like_torch(dtype, streaming, monkeypatch):
    if streaming:
        monkeypatch.setattr(triton_norm, "FWD_SINGLE_TILE_MAX_N", 16)
        monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 16)
    x = _randn((5, 40), dtype, DEVICE)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    weight, bias = _params((40,), "weight+bias", dtype, DEVICE)
    y = fusedlm.layer_norm(x, (40,), weight, bias, backend=B)
    y_torch = F.layer_norm(x.float(), (40,), weight.float(), bias.float()).to(dtype)
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch)), "NaN pattern differs from torch's"
    assert torch.equal(torch.isinf(y), torch.isinf(y_torch)), "Inf pattern differs from torch's"
    _check_ln(x[3:], (40,), weight, bias, B, backward=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_layer_norm_eps(eps):
    x = _randn((4, 10), torch.float32, DEVICE) * 0.1
    _check_ln(x, (10,), None, None, B, eps=eps)


@pytest.mark.parametrize(("shape", "affine"), [((17, 127), "weight+bias"), ((17, 127), "none"),
                                              ((3, 8200), "weight+bias")], ids=str)
def test_layer_norm_float64(shape, affine):
    """float64 runs in float64 (statistics too), to float64 accuracy."""
    x = _randn(shape, torch.float64, DEVICE)
    weight, bias = _params(shape[1:], affine, torch.float64, DEVICE)
    _check_ln(x, shape[1:], weight, bias, B)
    _, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, weight, bias, 1e-5, B)
    assert mean.dtype == rstd.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_layer_norm_fwd_op_statistics(dtype):
    """mean and rstd of the op are the row statistics, float32 for low-precision x."""
    x = _randn((7, 50), dtype, DEVICE)
    _, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, None, None, 1e-5, B)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("shape", [(113, 127), (3, 8200)], ids=str)
def test_layer_norm_bwd_is_deterministic(shape):
    """dweight/dbias come from per-program partial sums reduced in a fixed order: bitwise equal
    from run to run."""
    x = _randn(shape, torch.float32, DEVICE)
    weight, _ = _params(shape[1:], "weight", torch.float32, DEVICE)
    grad = _randn(shape, torch.float32, DEVICE)
    _, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, weight, None, 1e-5, B)
    first = torch.ops.fusedlm.layer_norm_bwd(grad, x, mean, rstd, weight, True, B)
    second = torch.ops.fusedlm.layer_norm_bwd(grad, x, mean, rstd, weight, True, B)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_layer_norm_zero_rows_ops_direct():
    x = torch.empty((0, 9), device=DEVICE)
    weight = torch.randn(9, device=DEVICE)
    y, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, weight, weight, 1e-5, B)
    assert y.shape == (0, 9) and mean.shape == rstd.shape == (0,)
    dx, dweight, dbias = torch.ops.fusedlm.layer_norm_bwd(x, x, mean, rstd, weight, True, B)
    assert dx.shape == (0, 9)
    assert torch.equal(dweight, torch.zeros(9, device=DEVICE)) and torch.equal(dbias, dweight)


# ---- RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "affine"), RMS_CASES, ids=RMS_IDS)
def test_rms_norm(shape, affine, dtype):
    x = _randn(shape, dtype, DEVICE)
    weight, _ = _params(shape[1:], affine, dtype, DEVICE)
    OpDispatch.last_choice.clear()
    _check_rms(x, shape[1:], weight, B)
    assert OpDispatch.last_choice["rms_norm_fwd"] == "triton"
    assert OpDispatch.last_choice["rms_norm_bwd"] == "triton"


@pytest.mark.usefixtures("streamed")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["weight", "none"])
@pytest.mark.parametrize("shape", [(1, 17), (5, 20)], ids=str)
def test_rms_norm_streamed(shape, affine, dtype):
    x = _randn(shape, dtype, DEVICE)
    weight, _ = _params(shape[1:], affine, dtype, DEVICE)
    _check_rms(x, shape[1:], weight, B, eps=1e-6)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rms_norm_float32_weight_low_precision_x():
    x = _randn((9, 96), torch.float16, DEVICE)
    weight, _ = _params((96,), "weight", torch.float16, DEVICE, param_dtype=torch.float32)
    _check_rms(x, (96,), weight, B, eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rms_norm_non_contiguous(layout, dtype):
    _check_view(layout, dtype, rms=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf
@pytest.mark.parametrize("streaming", [False, True], ids=["single_tile", "streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_nan_inf_propagate_like_torch(dtype, streaming, monkeypatch):
    if streaming:
        monkeypatch.setattr(triton_norm, "FWD_SINGLE_TILE_MAX_N", 16)
        monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 16)
    x = _randn((5, 40), dtype, DEVICE)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    weight, _ = _params((40,), "weight", dtype, DEVICE)
    y = fusedlm.rms_norm(x, (40,), weight, eps=1e-6, backend=B)
    y_torch = F.rms_norm(x.float(), (40,), weight.float(), 1e-6).to(dtype)
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch)), "NaN pattern differs from torch's"
    assert torch.equal(torch.isinf(y), torch.isinf(y_torch)), "Inf pattern differs from torch's"
    finite = torch.isfinite(y_torch)
    assert torch.equal(y[finite] == 0, y_torch[finite] == 0), (
        "zeros of inf rows differ from torch's"
    )
    _check_rms(x[3:], (40,), weight, B, eps=1e-6, backward=False)


def test_rms_norm_default_eps_is_finfo_eps():
    x = torch.full((2, 4), 1e-4, device=DEVICE)
    y = fusedlm.rms_norm(x, (4,), backend=B)
    expected = 1e-4 / (1e-8 + torch.finfo(torch.float32).eps) ** 0.5
    torch.testing.assert_close(y, torch.full_like(y, expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(17, 127), (3, 8200)], ids=str)
def test_rms_norm_float64(shape):
    x = _randn(shape, torch.float64, DEVICE)
    weight, _ = _params(shape[1:], "weight", torch.float64, DEVICE)
    _check_rms(x, shape[1:], weight, B, eps=1e-6)


# ---- configuration and bad inputs -----------------------------------------------------------


@pytest.mark.parametrize("fp64", [False, True])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("N", [1, 2, 127, 1024, 4099, 8192, 8193, 16384, 16385, 65536])
def test_norm_config(N, backward, fp64):
    cfg = triton_norm.norm_config(N, backward, fp64)
    limit = triton_norm.BWD_SINGLE_TILE_MAX_N if backward else triton_norm.FWD_SINGLE_TILE_MAX_N
    limit //= 2 if fp64 else 1
    assert cfg.single_tile == (triton_norm.triton.next_power_of_2(N) <= limit)
    if cfg.single_tile:
        assert cfg.block_n >= N
    else:
        assert cfg.block_m == 1 and cfg.block_n < N
    for value in (cfg.block_m, cfg.block_n, cfg.num_warps):
        assert value & (value - 1) == 0, cfg  # powers of two
    assert 1 <= cfg.num_warps <= 16
    assert cfg.block_m * cfg.block_n <= limit


def _ln_args():
    x = torch.randn(4, 6, device=DEVICE)
    _, mean, rstd = triton_norm.layer_norm_fwd(x, None, None, 1e-5)
    return x, mean, rstd


BAD_CALLS = [
    ("x_3d", ValueError, "'x'",
     lambda: triton_norm.layer_norm_fwd(torch.randn(2, 3, 4, device=DEVICE), None, None, 1e-5)),
    ("x_int", TypeError, "'x'",
     lambda: triton_norm.rms_norm_fwd(torch.ones(2, 3, dtype=torch.int32, device=DEVICE), None,
                                      1e-5)),
    ("x_empty_hidden", ValueError, "'x'",
     lambda: triton_norm.rms_norm_fwd(torch.randn(2, 0, device=DEVICE), None, 1e-5)),
    ("weight_shape", ValueError, "'weight'",
     lambda: triton_norm.layer_norm_fwd(torch.randn(2, 3, device=DEVICE),
                                        torch.randn(4, device=DEVICE), None, 1e-5)),
    ("bias_dtype", TypeError, "'bias'",
     lambda: triton_norm.layer_norm_fwd(torch.randn(2, 3, device=DEVICE), None,
                                        torch.randn(3, dtype=torch.float64, device=DEVICE), 1e-5)),
    ("eps_negative", ValueError, "'eps'",
     lambda: triton_norm.rms_norm_fwd(torch.randn(2, 3, device=DEVICE), None, -1.0)),
    ("eps_nan", ValueError, "'eps'",
     lambda: triton_norm.layer_norm_fwd(torch.randn(2, 3, device=DEVICE), None, None,
                                        float("nan"))),
    ("grad_y_shape", ValueError, "'grad_y'",
     lambda: triton_norm.layer_norm_bwd(torch.randn(4, 5, device=DEVICE), *_ln_args(), None,
                                        False)),
    ("grad_y_dtype", TypeError, "'grad_y'",
     lambda: triton_norm.layer_norm_bwd(torch.randn(4, 6, dtype=torch.float16, device=DEVICE),
                                        *_ln_args(), None, False)),
    ("rstd_dtype", TypeError, "'rstd'",
     lambda: triton_norm.rms_norm_bwd(torch.randn(4, 6, device=DEVICE), _ln_args()[0],
                                      _ln_args()[2].double(), None)),
    ("mean_shape", ValueError, "'mean'",
     lambda: triton_norm.layer_norm_bwd(torch.randn(4, 6, device=DEVICE), _ln_args()[0],
                                        torch.zeros(3, device=DEVICE), _ln_args()[2], None, False)),
]


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_names_the_argument(exc, argument, call):
    with pytest.raises(exc, match=argument):
        call()


def test_auto_does_not_pick_triton_for_cpu_tensors():
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only")
    OpDispatch.last_choice.clear()
    fusedlm.layer_norm(torch.randn(3, 8), 8)
    assert OpDispatch.last_choice["layer_norm_fwd"] != "triton"


# ---- sm_90 builds (no GPU needed) -------------------------------------------------------------

# (entry point, x dtype, hidden, weight/bias dtype or None, bias): each scheme of each kernel
# (single tile, the largest single tile, streamed), each dtype, with and without weight and bias
# (float32 ones for 16-bit and float64 x too).
SM90_BUILDS = [
    ("layer_norm_fwd", torch.bfloat16, 16384, torch.bfloat16, True),  # largest forward tile
    ("layer_norm_fwd", torch.float16, 127, None, True),  # several rows per tile, bias only
    ("layer_norm_fwd", torch.float16, 4096, torch.float32, True),  # one row per tile
    ("layer_norm_fwd", torch.float32, 16385, None, False),  # streamed
    ("layer_norm_fwd", torch.float64, 8192, torch.float32, True),  # largest float64 tile
    ("layer_norm_fwd", torch.float64, 8193, torch.float64, True),  # float64 streamed
    ("rms_norm_fwd", torch.float16, 16384, torch.float32, False),
    ("rms_norm_fwd", torch.bfloat16, 65536, torch.bfloat16, False),
    ("rms_norm_fwd", torch.float32, 1, None, False),
    ("rms_norm_fwd", torch.float64, 1, torch.float64, False),
    ("layer_norm_bwd", torch.float16, 8192, torch.float16, True),  # largest backward tile
    ("layer_norm_bwd", torch.bfloat16, 16385, torch.float32, True),  # streamed
    ("layer_norm_bwd", torch.float32, 1024, None, True),
    ("layer_norm_bwd", torch.bfloat16, 127, torch.float32, True),  # several rows per tile
    ("layer_norm_bwd", torch.float64, 4096, torch.float64, False),  # largest float64 tile
    ("layer_norm_bwd", torch.float64, 4096, torch.float32, False),  # 4 bytes of spill
    ("layer_norm_bwd", torch.float32, 16385, None, True),  # streamed, bias only: 4 bytes
    ("layer_norm_bwd", torch.float64, 65536, None, False),  # float64 streamed
    ("rms_norm_bwd", torch.bfloat16, 8192, torch.float32, False),
    ("rms_norm_bwd", torch.float16, 16385, torch.float16, False),
    ("rms_norm_bwd", torch.float16, 65536, torch.float32, False),  # 4 bytes of spill
    ("rms_norm_bwd", torch.float32, 1, torch.float32, False),
    ("rms_norm_bwd", torch.float64, 8193, None, False),  # float64 streamed
]


def _launch_for_sm90(op, dtype, N, param_dtype, bias, M=1000, strided=False):
    """Call entry point ``op`` on empty (M, N) CPU tensors (the kernels are recorded, not run)."""
    x = torch.empty(M, 2 * N, dtype=dtype)[:, ::2] if strided else torch.empty(M, N, dtype=dtype)
    w = torch.empty(N, dtype=param_dtype) if param_dtype is not None else None
    b = torch.empty(N, dtype=param_dtype or dtype) if bias else None
    stats = torch.empty(M, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if op == "layer_norm_fwd":
        triton_norm.layer_norm_fwd(x, w, b, 1e-5)
    elif op == "rms_norm_fwd":
        triton_norm.rms_norm_fwd(x, w, 1e-5)
    elif op == "layer_norm_bwd":
        triton_norm.layer_norm_bwd(x, x, stats, stats, w, bias)
    else:
        triton_norm.rms_norm_bwd(x, x, stats, w)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the real builds")
def test_kernels_build_for_sm90(monkeypatch):
    """The interpreter runs Python, not Triton's compiler: build the kernels as the launchers
    call them for sm_90 (MLIR, PTX, ptxas; no GPU needed) to catch what only the compiler
    rejects, shared memory over the H100's and register spills."""
    from tests.triton.sm90_build import (
        build_for_sm90,
        problems,
        record_launches,
        require_nvidia_backend,
    )

    require_nvidia_backend()

    monkeypatch.setattr(triton_norm, "INTERPRETER_BWD_PROGRAMS", 2 * 132)  # an H100's 132 SMs
    launches = record_launches(monkeypatch, triton_norm, "norm_fwd_kernel", "norm_bwd_kernel")
    for case in SM90_BUILDS:
        _launch_for_sm90(*case)
    # One row (M and rows per program specialized to 1), strided x.
    _launch_for_sm90("layer_norm_bwd", torch.bfloat16, 16385, torch.bfloat16, True, M=1)
    _launch_for_sm90("rms_norm_fwd", torch.float16, 4096, torch.float16, False, strided=True)
    _launch_for_sm90("layer_norm_bwd", torch.float32, 1024, torch.float32, True, strided=True)
    assert len(launches) == len(SM90_BUILDS) + 3
    for kernel, flags in (("norm_fwd_kernel", ("IS_RMS", "HAS_W", "HAS_B", "SINGLE_TILE")),
                          ("norm_bwd_kernel", ("IS_RMS", "HAS_W", "HAS_DB", "SINGLE_TILE"))):
        metas = [launch["kwargs"] for launch in launches if launch["kernel"].endswith(kernel)]
        for name in flags:  # the cases reach each value
            assert {meta[name] for meta in metas} == {False, True}, (kernel, name)
        assert {meta["COMPUTE"]["tl"] for meta in metas} == {"fp32", "fp64"}, kernel
    # The register-capped backward configs spill up to 4 bytes on contiguous inputs (strided
    # ones: up to 124 bytes in float64, benchmarks/NOTES.md); more would mean a config change.
    failures = problems(launches, build_for_sm90(launches), max_spill_bytes=8)
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


GPU_HIDDEN = [768, 1024, 4096, 5120, 8192, 12288, 16384, 32768, 65536]


def _gpu_rows(N):
    return min(4096, 2**27 // N)  # float64 truths of 2**27 elements stay well inside memory


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N", GPU_HIDDEN)
def test_gpu_layer_norm_large(N, dtype):
    x = _randn((_gpu_rows(N), N), dtype, "cuda")
    weight, bias = _params((N,), "weight+bias", dtype, "cuda")
    _check_ln(x, (N,), weight, bias, B)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N", GPU_HIDDEN)
def test_gpu_rms_norm_large(N, dtype):
    x = _randn((_gpu_rows(N), N), dtype, "cuda")
    weight, _ = _params((N,), "weight", dtype, "cuda")
    _check_rms(x, (N,), weight, B, eps=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4096, 65536])
def test_gpu_layer_norm_float32_params_bf16_x(N):
    x = _randn((_gpu_rows(N), N), torch.bfloat16, "cuda")
    weight, bias = _params((N,), "weight+bias", torch.bfloat16, "cuda", param_dtype=torch.float32)
    _check_ln(x, (N,), weight, bias, B)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4096, 32768])
def test_gpu_layer_norm_strided_rows(N):
    """A (M, N) slice of a wider buffer, as a fused QKV/MLP output gives."""
    x = _randn((2048, N + 64), torch.bfloat16, "cuda")[:, 32:32 + N]
    weight, bias = _params((N,), "weight+bias", torch.bfloat16, "cuda")
    _check_ln(x, (N,), weight, bias, B)


@pytest.mark.gpu
def test_gpu_bwd_is_deterministic_at_scale():
    x = _randn((8192, 4096), torch.bfloat16, "cuda")
    weight, _ = _params((4096,), "weight", torch.bfloat16, "cuda")
    grad = _randn((8192, 4096), torch.bfloat16, "cuda")
    _, mean, rstd = torch.ops.fusedlm.layer_norm_fwd(x, weight, None, 1e-5, B)
    first = torch.ops.fusedlm.layer_norm_bwd(grad, x, mean, rstd, weight, True, B)
    second = torch.ops.fusedlm.layer_norm_bwd(grad, x, mean, rstd, weight, True, B)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_second_device_tensors():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = _randn((64, 1024), torch.bfloat16, "cuda:1")
    y = fusedlm.layer_norm(x, (1024,), backend=B)
    assert y.device == x.device
    assert_close_rule(y, F.layer_norm(x, (1024,)), F.layer_norm(x.double(), (1024,)))
