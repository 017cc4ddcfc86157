"""The Triton kernels of the fused residual add + LayerNorm/RMSNorm (python/fusedlm/triton/norm.py,
HAS_BRANCH forward and HAS_GRAD_H backward) through the public API with backend="triton",
against eager ``h = x + residual; F.layer_norm(h, ...)`` by DESIGN.md's rule (helpers of
tests/ops/test_add_norm.py).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors:
small row counts, float32/float16 (a float16 branch beside a float32 residual too) and a little
float64. The streamed schemes are reached at their real thresholds (hidden 8200: backward
streams; 16411: forward streams too) and with the thresholds lowered. ``gpu`` tests run
realistic sizes in bfloat16 (a bfloat16 branch beside a float32 stream, as under autocast).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.backends import OpDispatch  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402
from tests.ops.test_add_norm import (  # noqa: E402
    LAYOUT_PAIRS,
    LAYOUTS,
    add_norm,
    check_add_norm,
    dh_truth,
    make_params,
    pair_id,
    randn,
)

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import norm as triton_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
OPS = ["layer_norm", "rms_norm"]
f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# Interpreter pairs; bfloat16 ones run in the gpu tests.
PAIRS = [(f32, f32), (f16, f16), (f16, f32)]
# (rows, hidden): hidden 1, 7 (several rows per tile), 300, 1000, 4099 (one row per tile),
# 8200 (the backward streams), 16411 (both stream); 113 rows: several row blocks per program.
SHAPES = [(1, 1), (113, 7), (9, 300), (3, 1000), (2, 4099), (2, 8200), (1, 16411)]


def _cases(ops):
    """Every shape with and without parameters; the big (slow) ones with parameters only."""
    cases = [(op, s, a) for op in ops for s in SHAPES
             for a in (["weight+bias", "none"] if s[1] <= 4099 else ["weight+bias"])]
    return cases, [f"{op}-{m}x{n}-{a}" for op, (m, n), a in cases]


CASES, CASE_IDS = _cases(OPS)


@pytest.fixture
def streamed(monkeypatch):
    """Rows of more than 16 (forward) / 8 (backward) elements streamed in chunks of 8 columns
    (hidden 17: two full chunks and a 1-column tail)."""
    monkeypatch.setattr(triton_norm, "FWD_SINGLE_TILE_MAX_N", 16)
    monkeypatch.setattr(triton_norm, "BWD_SINGLE_TILE_MAX_N", 8)
    monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 8)


def _inputs(shape, pair):
    return randn(shape, pair[0], DEVICE), randn(shape, pair[1], DEVICE)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize(("op", "shape", "affine"), CASES, ids=CASE_IDS)
def test_add_norm(op, shape, affine, pair):
    x, residual = _inputs(shape, pair)
    weight, bias = make_params(op, shape[1:], affine, pair[1], DEVICE)
    OpDispatch.last_choice.clear()
    check_add_norm(op, x, residual, shape[1:], weight, bias, B)
    assert OpDispatch.last_choice[f"add_{op}_fwd"] == "triton"
    assert OpDispatch.last_choice[f"add_{op}_bwd"] == "triton"


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", [(17, 300), (2, 8200)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_h_unused(op, shape, pair):
    """Only y in the loss."""
    x, residual = _inputs(shape, pair)
    weight, bias = make_params(op, shape[1:], "weight+bias", pair[1], DEVICE)
    check_add_norm(op, x, residual, shape[1:], weight, bias, B, grad_h=False)


@pytest.mark.usefixtures("streamed")
@pytest.mark.parametrize("grad_h", [True, False], ids=["grad_h", "h_unused"])
@pytest.mark.parametrize("pair", [*PAIRS, (f64, f64)], ids=pair_id)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("shape", [(1, 17), (5, 20)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_streamed(op, shape, affine, pair, grad_h):
    """The streamed schemes (h stored chunk by chunk, statistics from the rounded h; grad_h
    added in the backward's second sweep)."""
    assert not triton_norm.norm_config(shape[1], backward=False).single_tile
    x, residual = _inputs(shape, pair)
    weight, bias = make_params(op, shape[1:], affine, pair[1], DEVICE)
    check_add_norm(op, x, residual, shape[1:], weight, bias, B, grad_h=grad_h)


@pytest.mark.parametrize("pair", [(f16, f16), (f64, f64)], ids=pair_id)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_add_norm_float32_params(op, affine, pair):
    if op == "rms_norm" and affine == "bias":
        pytest.skip("RMSNorm has no bias")
    x, residual = _inputs((9, 96), pair)
    weight, bias = make_params(op, (96,), affine, f32, DEVICE)
    check_add_norm(op, x, residual, (96,), weight, bias, B)


@pytest.mark.parametrize("pair", [(f32, f32), (f16, f32)], ids=pair_id)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_non_contiguous(op, layouts, pair):
    """x and residual reach the kernels as strided views (row and column strides, storage
    offsets, stride-0 rows); gradients come back through the views."""
    (x_shape, x_view), (r_shape, r_view) = (LAYOUTS[name] for name in layouts)
    x, residual = randn(x_shape, pair[0], DEVICE), randn(r_shape, pair[1], DEVICE)
    weight, bias = make_params(op, (33,), "weight+bias", pair[1], DEVICE)
    check_add_norm(op, x, residual, (33,), weight, bias, B, views=(x_view, r_view))


@pytest.mark.parametrize("shape", [(17, 127), (3, 8200)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_add_norm_float64(op, shape):
    """float64 in float64 (statistics too), single tile and streamed."""
    x, residual = _inputs(shape, (f64, f64))
    weight, bias = make_params(op, shape[1:], "weight+bias", f64, DEVICE)
    check_add_norm(op, x, residual, shape[1:], weight, bias, B)


@pytest.mark.parametrize("streaming", [False, True], ids=["single_tile", "streamed"])
@pytest.mark.parametrize("pair", [(f32, f32), (f16, f16), (f16, f32), (f64, f64)],
                         ids=pair_id)
@pytest.mark.parametrize("op", OPS)
def test_norm_reads_the_rounded_h(op, pair, streaming, monkeypatch):
    """y, mean, rstd are the plain norm's of the returned h, bit for bit, and h is eager's
    x + residual: the norm reads the rounded h (the streamed forward recomputes h in its
    second sweep: the same rounding)."""
    if streaming:
        monkeypatch.setattr(triton_norm, "FWD_SINGLE_TILE_MAX_N", 64)
        monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 64)
    x, residual = _inputs((6, 257), pair)
    weight, bias = make_params(op, (257,), "weight+bias", pair[1], DEVICE)
    if op == "layer_norm":
        y, h, mean, rstd = triton_norm.add_layer_norm_fwd(x, residual, weight, bias, 1e-5)
        y_plain, mean_plain, rstd_plain = triton_norm.layer_norm_fwd(h, weight, bias, 1e-5)
        assert torch.equal(mean, mean_plain)
    else:
        y, h, rstd = triton_norm.add_rms_norm_fwd(x, residual, weight, 1e-6)
        y_plain, rstd_plain = triton_norm.rms_norm_fwd(h, weight, 1e-6)
    assert h.dtype == y.dtype == pair[1] and torch.equal(h, x + residual)
    assert torch.equal(y, y_plain) and torch.equal(rstd, rstd_plain)


def test_half_h_is_rounded_before_the_norm():
    """A float16 row whose unrounded sum is not constant but whose rounded h is: y = 0."""
    x = torch.tensor([[1.0, 2**-11, 0.5, -0.25]], dtype=f16, device=DEVICE)
    residual = torch.tensor([[0.0, 1.0, 0.5, 1.25]], dtype=f16, device=DEVICE)
    y, h = fusedlm.add_layer_norm(x, residual, 4, backend=B)
    assert h.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("shape", [(113, 127), (3, 8200)], ids=str)
def test_add_layer_norm_bwd_is_deterministic(shape):
    """dh, dweight and dbias are bitwise equal from run to run (fixed-order partial sums)."""
    x, residual = _inputs(shape, (f32, f32))
    weight, bias = make_params("layer_norm", shape[1:], "weight+bias", f32, DEVICE)
    _, h, mean, rstd = triton_norm.add_layer_norm_fwd(x, residual, weight, bias, 1e-5)
    grad_y, grad_h = randn(shape, f32, DEVICE), randn(shape, f32, DEVICE)
    first = triton_norm.add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, True)
    second = triton_norm.add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_add_norm_gradcheck(op):
    """float64 gradcheck through both outputs."""
    x, residual = (torch.randn(3, 5, dtype=f64, device=DEVICE, requires_grad=True)
                   for _ in range(2))
    weight = torch.randn(5, dtype=f64, device=DEVICE, requires_grad=True)

    def fn(x, residual, weight):
        return add_norm(op, x, residual, (5,), weight, eps=1e-5, backend=B)

    assert torch.autograd.gradcheck(fn, (x, residual, weight))


# ---- the entry points directly ----------------------------------------------------------------


def _fwd(op, x, residual, weight=None, bias=None, eps=1e-5):
    if op == "layer_norm":
        return triton_norm.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return triton_norm.add_rms_norm_fwd(x, residual, weight, eps)


def _bwd(op, grad_y, grad_h, fwd_out, weight=None, has_bias=False):
    if op == "layer_norm":
        _, h, mean, rstd = fwd_out
        return triton_norm.add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias)
    _, h, rstd = fwd_out
    return triton_norm.add_rms_norm_bwd(grad_y, grad_h, h, rstd, weight)


@pytest.mark.parametrize("streaming", [False, True], ids=["single_tile", "streamed"])
@pytest.mark.parametrize("pair", [(f32, f32), (f16, f16), (f16, f32), (f64, f64)],
                         ids=pair_id)
@pytest.mark.parametrize("op", OPS)
def test_entry_point_grad_h_none_is_zeros(op, pair, streaming, monkeypatch):
    """grad_h None and grad_h zeros give the same dh and parameter grads; a strided grad_h is
    read in place and adds to dh."""
    if streaming:
        monkeypatch.setattr(triton_norm, "BWD_SINGLE_TILE_MAX_N", 16)
        monkeypatch.setattr(triton_norm, "LOOP_BLOCK_N", 16)
    x, residual = _inputs((5, 45), pair)
    weight, bias = make_params(op, (45,), "weight+bias", pair[1], DEVICE)
    out = _fwd(op, x, residual, weight, bias)
    grad_y = randn((5, 45), pair[1], DEVICE)
    has_bias = bias is not None
    none = _bwd(op, grad_y, None, out, weight, has_bias)
    zeros = _bwd(op, grad_y, torch.zeros_like(grad_y), out, weight, has_bias)
    for a, b in zip(none, zeros, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    grad_h = randn((45, 5), pair[1], DEVICE).t()  # strides (1, 5)
    with_h = _bwd(op, grad_y, grad_h, out, weight, has_bias)
    contiguous = _bwd(op, grad_y, grad_h.contiguous(), out, weight, has_bias)
    assert torch.equal(with_h[0], contiguous[0])
    # baseline: eager's separately rounded sum
    truth = dh_truth(op, out[1], weight, bias, grad_y, grad_h, 1e-5)
    assert_close_rule(with_h[0], none[0] + grad_h, truth, name="dh")
    for a, b in zip(with_h[1:], none[1:], strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("op", OPS)
def test_entry_points_zero_rows(op):
    x = torch.empty((0, 9), device=DEVICE)
    weight = torch.randn(9, device=DEVICE)
    out = _fwd(op, x, x.clone(), weight, weight if op == "layer_norm" else None)
    assert out[0].shape == out[1].shape == (0, 9) and all(s.shape == (0,) for s in out[2:])
    grads = _bwd(op, x, x.clone(), out, weight, op == "layer_norm")
    assert grads[0].shape == (0, 9)
    for g in grads[1:]:
        if g is not None:
            assert torch.equal(g, torch.zeros(9, device=DEVICE))


def _t(*shape, dtype=f32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def _ln_out():
    return triton_norm.add_layer_norm_fwd(_t(4, 6), _t(4, 6), None, None, 1e-5)


def _rms_out():
    return triton_norm.add_rms_norm_fwd(_t(4, 6), _t(4, 6), None, 1e-5)


BAD_CALLS = [
    ("x_dtype_pair", TypeError, "'x'",
     lambda: triton_norm.add_layer_norm_fwd(_t(2, 3), _t(2, 3, dtype=bf16), None, None, 1e-5)),
    ("x_float64_residual_float32", TypeError, "'x'",
     lambda: triton_norm.add_rms_norm_fwd(_t(2, 3, dtype=f64), _t(2, 3), None, 1e-5)),
    ("x_int", TypeError, "'x'",
     lambda: triton_norm.add_rms_norm_fwd(_t(2, 3).int(), _t(2, 3), None, 1e-5)),
    ("x_shape", ValueError, "'x'",
     lambda: triton_norm.add_layer_norm_fwd(_t(2, 4), _t(2, 3), None, None, 1e-5)),
    ("x_not_tensor", TypeError, "'x'",
     lambda: triton_norm.add_layer_norm_fwd([[1.0]], _t(1, 1), None, None, 1e-5)),
    ("residual_3d", ValueError, "'residual'",
     lambda: triton_norm.add_layer_norm_fwd(_t(2, 3, 4), _t(2, 3, 4), None, None, 1e-5)),
    ("residual_int", TypeError, "'residual'",
     lambda: triton_norm.add_rms_norm_fwd(_t(2, 3), _t(2, 3).int(), None, 1e-5)),
    ("residual_empty_hidden", ValueError, "'residual'",
     lambda: triton_norm.add_rms_norm_fwd(_t(2, 0), _t(2, 0), None, 1e-5)),
    ("weight_shape", ValueError, "'weight'",
     lambda: triton_norm.add_layer_norm_fwd(_t(2, 3), _t(2, 3), _t(4), None, 1e-5)),
    ("weight_dtype_of_x_not_residual", TypeError, "'weight'",
     lambda: triton_norm.add_rms_norm_fwd(_t(2, 3, dtype=f16), _t(2, 3), _t(3, dtype=f16),
                                          1e-5)),
    ("bias_dtype", TypeError, "'bias'",
     lambda: triton_norm.add_layer_norm_fwd(_t(2, 3), _t(2, 3), None, _t(3, dtype=f64), 1e-5)),
    ("eps_negative", ValueError, "'eps'",
     lambda: triton_norm.add_rms_norm_fwd(_t(2, 3), _t(2, 3), None, -1.0)),
    ("eps_inf", ValueError, "'eps'",
     lambda: triton_norm.add_layer_norm_fwd(_t(2, 3), _t(2, 3), None, None, float("inf"))),
    ("grad_h_shape", ValueError, "'grad_h'",
     lambda: triton_norm.add_layer_norm_bwd(_t(4, 6), _t(4, 5), *_ln_out()[1:], None, False)),
    ("grad_h_transposed", ValueError, "'grad_h'",
     lambda: triton_norm.add_rms_norm_bwd(_t(4, 6), _t(4, 6).t(), *_rms_out()[1:], None)),
    ("grad_h_dtype", TypeError, "'grad_h'",
     lambda: triton_norm.add_layer_norm_bwd(_t(4, 6), _t(4, 6, dtype=f16), *_ln_out()[1:], None,
                                            False)),
    ("grad_h_not_tensor", TypeError, "'grad_h'",
     lambda: triton_norm.add_rms_norm_bwd(_t(4, 6), 0.0, *_rms_out()[1:], None)),
    ("grad_y_shape", ValueError, "'grad_y'",
     lambda: triton_norm.add_rms_norm_bwd(_t(4, 5), None, *_rms_out()[1:], None)),
    ("grad_y_dtype", TypeError, "'grad_y'",
     lambda: triton_norm.add_layer_norm_bwd(_t(4, 6, dtype=f64), None, *_ln_out()[1:], None,
                                            False)),
    ("h_int", TypeError, "'h'",
     lambda: triton_norm.add_rms_norm_bwd(_t(4, 6).int(), None, _t(4, 6).int(),
                                          torch.ones(4, device=DEVICE), None)),
    ("h_3d", ValueError, "'h'",
     lambda: triton_norm.add_rms_norm_bwd(_t(1, 4, 6), None, _t(1, 4, 6),
                                          torch.ones(4, device=DEVICE), None)),
    ("mean_shape", ValueError, "'mean'",
     lambda: triton_norm.add_layer_norm_bwd(_t(4, 6), None, _ln_out()[1], _t(3),
                                            _ln_out()[3], None, False)),
    ("rstd_dtype", TypeError, "'rstd'",
     lambda: triton_norm.add_rms_norm_bwd(_t(4, 6), None, _rms_out()[1],
                                          _rms_out()[2].double(), None)),
]


@pytest.mark.parametrize(("exc", "argument", "call"), [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_names_the_argument(exc, argument, call):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert argument in message, f"{type(info.value).__name__} does not name {argument!r}: {message}"


def test_auto_does_not_pick_triton_for_cpu_tensors():
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only")
    OpDispatch.last_choice.clear()
    fusedlm.add_layer_norm(torch.randn(3, 8), torch.randn(3, 8), 8)
    fusedlm.add_rms_norm(torch.randn(3, 8), torch.randn(3, 8), 8)
    assert OpDispatch.last_choice["add_layer_norm_fwd"] != "triton"
    assert OpDispatch.last_choice["add_rms_norm_fwd"] != "triton"


# ---- sm_90 builds (no GPU needed) -------------------------------------------------------------

# (entry point, x dtype, residual dtype, hidden, weight/bias dtype or None, bias, grad_h):
# each scheme (single tile, the largest single tile, streamed) with the branch (forward) and
# grad_h (backward), 16-bit branches beside float32 residuals, float64.
SM90_BUILDS = [
    ("add_layer_norm_fwd", bf16, bf16, 16384, bf16, True, False),  # largest forward tile
    ("add_layer_norm_fwd", bf16, f32, 4096, f32, True, False),  # autocast branch
    ("add_layer_norm_fwd", f16, f16, 127, None, True, False),  # several rows per tile
    ("add_layer_norm_fwd", bf16, f32, 16385, f32, True, False),  # streamed
    ("add_layer_norm_fwd", f64, f64, 8192, f32, True, False),  # largest float64 tile
    ("add_layer_norm_fwd", f64, f64, 8193, f64, True, False),  # float64 streamed
    ("add_rms_norm_fwd", f16, f32, 16384, f32, False, False),
    ("add_rms_norm_fwd", bf16, bf16, 65536, bf16, False, False),
    ("add_rms_norm_fwd", f32, f32, 1, None, False, False),
    ("add_layer_norm_bwd", None, bf16, 8192, bf16, True, True),  # largest backward tile
    ("add_layer_norm_bwd", None, f32, 8192, f32, True, True),
    ("add_layer_norm_bwd", None, bf16, 16385, f32, True, True),  # streamed
    ("add_layer_norm_bwd", None, f32, 1024, None, True, False),  # grad_h None
    ("add_layer_norm_bwd", None, f64, 4096, f64, False, True),  # largest float64 tile
    ("add_layer_norm_bwd", None, f64, 65536, None, False, True),  # float64 streamed
    ("add_rms_norm_bwd", None, bf16, 8192, f32, False, True),
    ("add_rms_norm_bwd", None, f16, 16385, f16, False, True),
    ("add_rms_norm_bwd", None, f32, 127, f32, False, True),
]


def _launch_for_sm90(op, x_dtype, dtype, N, param_dtype, bias, grad_h, M=1000, strided=False):
    """Call entry point ``op`` on empty (M, N) CPU tensors (the kernels are recorded, not run)."""
    def rows(d):
        return torch.empty(M, 2 * N, dtype=d)[:, ::2] if strided else torch.empty(M, N, dtype=d)

    residual = rows(dtype)
    w = torch.empty(N, dtype=param_dtype) if param_dtype is not None else None
    b = torch.empty(N, dtype=param_dtype or dtype) if bias else None
    stats = torch.empty(M, dtype=f64 if dtype == f64 else f32)
    if op == "add_layer_norm_fwd":
        triton_norm.add_layer_norm_fwd(rows(x_dtype), residual, w, b, 1e-5)
    elif op == "add_rms_norm_fwd":
        triton_norm.add_rms_norm_fwd(rows(x_dtype), residual, w, 1e-5)
    elif op == "add_layer_norm_bwd":
        triton_norm.add_layer_norm_bwd(residual, rows(dtype) if grad_h else None, residual,
                                       stats, stats, w, bias)
    else:
        triton_norm.add_rms_norm_bwd(residual, rows(dtype) if grad_h else None, residual, stats,
                                     w)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the real builds")
def test_kernels_build_for_sm90(monkeypatch):
    """Build the HAS_BRANCH / HAS_GRAD_H variants as the launchers call them for sm_90 (MLIR,
    PTX, ptxas; no GPU needed): what only the compiler rejects, shared memory over the H100's
    and register spills (the plain norms' limit: a few bytes, tests/triton/test_norm.py)."""
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
    # strided branch/residual and grad_h
    _launch_for_sm90("add_rms_norm_fwd", bf16, f32, 4096, f32, False, False, strided=True)
    _launch_for_sm90("add_layer_norm_bwd", None, bf16, 1024, bf16, True, True, strided=True)
    assert len(launches) == len(SM90_BUILDS) + 2
    for kernel, flags in (("norm_fwd_kernel", ("IS_RMS", "HAS_W", "HAS_B", "SINGLE_TILE")),
                          ("norm_bwd_kernel", ("IS_RMS", "HAS_W", "HAS_DB", "HAS_GRAD_H",
                                               "SINGLE_TILE"))):
        metas = [launch["kwargs"] for launch in launches if launch["kernel"].endswith(kernel)]
        for name in flags:  # the cases reach each value
            assert {meta[name] for meta in metas} == {False, True}, (kernel, name)
        assert {meta["COMPUTE"]["tl"] for meta in metas} == {"fp32", "fp64"}, kernel
    fwd = [launch for launch in launches if launch["kernel"].endswith("norm_fwd_kernel")]
    assert all(launch["kwargs"]["HAS_BRANCH"] for launch in fwd)
    # the branch pointer (argument 1) in 16-bit beside a float32 residual (argument 0)
    assert {(a["args"][0]["ptr"], a["args"][1]["ptr"]) for a in fwd} >= {("fp32", "bf16"),
                                                                          ("fp32", "fp16")}
    failures = problems(launches, build_for_sm90(launches), max_spill_bytes=8)
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


GPU_HIDDEN = [768, 1024, 4096, 5120, 8192, 12288, 16384, 32768, 65536]


def _gpu_rows(N):
    return min(4096, 2**27 // N)  # float64 truths of 2**27 elements stay well inside memory


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [(bf16, f32), (bf16, bf16), (f16, f16)], ids=pair_id)
@pytest.mark.parametrize("N", GPU_HIDDEN)
@pytest.mark.parametrize("op", OPS)
def test_gpu_add_norm_large(op, N, pair):
    x, residual = randn((_gpu_rows(N), N), pair[0], "cuda"), randn((_gpu_rows(N), N), pair[1],
                                                                   "cuda")
    weight, bias = make_params(op, (N,), "weight+bias", pair[1], "cuda")
    check_add_norm(op, x, residual, (N,), weight, bias, B)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4096, 65536])
@pytest.mark.parametrize("op", OPS)
def test_gpu_add_norm_float32_params_bf16(op, N):
    x, residual = (randn((_gpu_rows(N), N), bf16, "cuda") for _ in range(2))
    weight, bias = make_params(op, (N,), "weight+bias", f32, "cuda")
    check_add_norm(op, x, residual, (N,), weight, bias, B)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4096, 32768])
@pytest.mark.parametrize("op", OPS)
def test_gpu_add_norm_strided_rows(op, N):
    """x a (M, N) slice of a wider buffer (a fused projection's output), residual float32."""
    views = (lambda b: b[:, 32:32 + N], lambda b: b)
    x = randn((2048, N + 64), bf16, "cuda")
    residual = randn((2048, N), f32, "cuda")
    weight, bias = make_params(op, (N,), "weight+bias", f32, "cuda")
    check_add_norm(op, x, residual, (N,), weight, bias, B, views=views)


@pytest.mark.gpu
def test_gpu_add_layer_norm_bwd_is_deterministic_at_scale():
    x, residual = randn((8192, 4096), bf16, "cuda"), randn((8192, 4096), f32, "cuda")
    weight, bias = make_params("layer_norm", (4096,), "weight+bias", f32, "cuda")
    _, h, mean, rstd = torch.ops.fusedlm.add_layer_norm_fwd(x, residual, weight, bias, 1e-5, B)
    grad_y, grad_h = randn((8192, 4096), f32, "cuda"), randn((8192, 4096), f32, "cuda")
    first = torch.ops.fusedlm.add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, True, B)
    second = torch.ops.fusedlm.add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, True, B)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
