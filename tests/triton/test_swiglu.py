"""The Triton SwiGLU kernels (python/fusedlm/triton/swiglu.py) through the public API with
backend="triton", against eager ``F.silu(gate) * up`` by DESIGN.md's rule (truth: float64;
baseline: eager code in the inputs' dtype).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors.
They use no ``tl.dot``, so bfloat16 runs there too. A program takes a (ROWS, BLOCK_W) tile,
BLOCK_W up to 2048 columns (4099: three column blocks, a 3-column tail) and ROWS > 1 when the
width is small; lowering the limits makes small inputs take several blocks both ways. ``gpu``
tests run realistic sizes in bfloat16/float16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.backends import BackendNotSupportedError, OpDispatch  # noqa: E402
from tests.ops.test_swiglu import LAYOUTS, _operands_in_layout, check_swiglu, randn  # noqa: E402

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import swiglu as triton_swiglu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Width 1 (4096 rows a tile), 127 (32 rows a tile), 2048 (one full column block), 4099 (three
# column blocks); 17 and 113 rows (a ragged last row block); a 3-D input.
SHAPES = [(1, 1), (113, 1), (17, 127), (113, 127), (3, 2048), (5, 4099), (2, 3, 64)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_swiglu(shape, dtype):
    check_swiglu(randn(shape, dtype, DEVICE, 3.0), randn(shape, dtype, DEVICE), B)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(9, 17), (37, 8), (5, 1)], ids=["9x17", "37x8", "5x1"])
def test_small_tiles(shape, dtype, monkeypatch):
    """Tiles of 32 elements, 8 columns at most: 17 columns in three blocks (a 1-column tail),
    37 rows of 8 in ten row blocks (a 1-row tail), width 1 at 32 rows a tile."""
    monkeypatch.setattr(triton_swiglu, "MAX_BLOCK_W", 8)
    monkeypatch.setattr(triton_swiglu, "TILE_ELEMENTS", 32)
    check_swiglu(randn(shape, dtype, DEVICE, 3.0), randn(shape, dtype, DEVICE), B)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout):
    for N, W in ((17, 127), (3, 4099)):
        gate, up = _operands_in_layout(layout, N, W, torch.float32, DEVICE)
        check_swiglu(gate, up, B)


def test_float64():
    """float64 runs in float64, to float64 accuracy."""
    for shape in ((17, 127), (3, 4099)):
        check_swiglu(randn(shape, torch.float64, DEVICE, 3.0), randn(shape, torch.float64, DEVICE),
                     B)


def test_saturated_gates():
    gate = torch.cat([torch.linspace(-80, -10, 40), torch.linspace(10, 80, 40)]).to(DEVICE)
    for dtype in (torch.float32, torch.float16):
        g = gate.to(dtype).reshape(2, 40)
        check_swiglu(g, randn(g.shape, dtype, DEVICE), B)


def test_broadcast_grad_of_a_reduced_loss():
    """A sum's gradient reaches the backward kernel expanded (stride 0 both ways)."""
    gate, up = randn((6, 50), torch.float32, DEVICE, 3.0), randn((6, 50), torch.float32, DEVICE)
    grad = torch.tensor(0.25, device=DEVICE).expand(6, 50)
    assert grad.stride() == (0, 0)
    dgate, dup = triton_swiglu.swiglu_bwd(grad, gate, up)
    expected = torch.ops.fusedlm.swiglu_bwd(grad.contiguous(), gate, up, "torch")
    for got, want in zip((dgate, dup), expected, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)


def test_empty_inputs():
    for shape in ((0, 5), (5, 0), (0, 3, 4)):
        gate, up = (randn(shape, torch.float32, DEVICE).requires_grad_(True) for _ in range(2))
        out = fusedlm.swiglu(gate, up, backend=B)
        assert out.shape == shape
        out.sum().backward()
        assert gate.grad.shape == shape and up.grad.shape == shape


@pytest.mark.parametrize(("N", "W", "expected"), [
    (1, 1, (1, 1, 1, 1)),
    (7, 1, (8, 1, 1, 1)),
    (1000, 127, (32, 128, 1, 32)),
    (5, 4099, (2, 2048, 3, 9)),
    (16384, 8192, (2, 2048, 4, 32768)),
])
def test_launch_shape(N, W, expected):
    """(rows per tile, columns per tile, column blocks, programs): 4096 elements a tile."""
    assert triton_swiglu._launch_shape(N, W) == expected


def test_bad_entry_point_inputs_name_the_argument():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="gate must be a 2-D float tensor"):
        triton_swiglu.swiglu_fwd(x[None], x[None])
    with pytest.raises(ValueError, match="gate must be a 2-D float tensor"):
        triton_swiglu.swiglu_fwd(x.long(), x.long())
    with pytest.raises(ValueError, match="up must be a 2-D float tensor like gate"):
        triton_swiglu.swiglu_fwd(x, x.double())
    with pytest.raises(ValueError, match="up must be a 2-D float tensor like gate"):
        triton_swiglu.swiglu_fwd(x, x[:, :3])
    with pytest.raises(ValueError, match="grad_out must be a 2-D float tensor like gate"):
        triton_swiglu.swiglu_bwd(x[:2], x, x)


def test_auto_does_not_pick_triton_for_cpu_tensors():
    OpDispatch.last_choice.pop("swiglu_fwd", None)
    fusedlm.swiglu(torch.randn(3, 4), torch.randn(3, 4))
    assert OpDispatch.last_choice["swiglu_fwd"] != "triton"


# ---- sm_90 builds (no GPU needed) -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the real builds")
def test_kernels_build_for_sm90(monkeypatch):
    """Build both kernels as the launchers call them for sm_90 (no GPU needed): what only the
    compiler rejects, shared memory and register spills (see tests/triton/sm90_build.py)."""
    from tests.triton.sm90_build import (
        build_for_sm90,
        problems,
        record_launches,
        require_nvidia_backend,
    )

    require_nvidia_backend()
    launches = record_launches(monkeypatch, triton_swiglu, "swiglu_fwd_kernel",
                               "swiglu_bwd_kernel")
    for dtype, N, W, halves in [(torch.bfloat16, 16384, 8192, True),
                                (torch.float16, 1000, 127, False),
                                (torch.float32, 4096, 4099, True),
                                (torch.float64, 64, 2048, False)]:
        if halves:
            gate, up = torch.empty(N, 2 * W, dtype=dtype).chunk(2, dim=-1)
        else:
            gate, up = torch.empty(N, W, dtype=dtype), torch.empty(N, W, dtype=dtype)
        triton_swiglu.swiglu_fwd(gate, up)
        triton_swiglu.swiglu_bwd(torch.empty(N, W, dtype=dtype), gate, up)
    assert len(launches) == 8
    failures = problems(launches, build_for_sm90(launches), max_spill_bytes=0)
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_llama_mlp(dtype):
    """A Llama MLP's activation at 16384 tokens of width 8192."""
    check_swiglu(randn((16384, 8192), dtype, "cuda", 3.0), randn((16384, 8192), dtype, "cuda"), B)


@pytest.mark.gpu
def test_gpu_fused_projection_halves():
    """The two halves of a fused (B, T, 2W) gate-and-up projection (Llama-7B's W = 11008),
    read in place."""
    gate, up = randn((2, 2048, 2 * 11008), torch.bfloat16, "cuda", 3.0).chunk(2, dim=-1)
    check_swiglu(gate, up, B)


@pytest.mark.gpu
def test_gpu_auto_takes_triton_and_cuda_has_no_kernel():
    """On CUDA tensors "auto" takes the Triton kernels (there are no CUDA C++ ones); naming
    "cuda" raises."""
    gate, up = (randn((64, 256), torch.bfloat16, "cuda").requires_grad_(True) for _ in range(2))
    for op in ("swiglu_fwd", "swiglu_bwd"):
        OpDispatch.last_choice.pop(op, None)
    fusedlm.swiglu(gate, up).sum().backward()
    assert OpDispatch.last_choice["swiglu_fwd"] == OpDispatch.last_choice["swiglu_bwd"] == "triton"
    with pytest.raises(BackendNotSupportedError, match="argument 'backend'"):
        fusedlm.swiglu(gate, up, backend="cuda")


@pytest.mark.gpu
def test_gpu_second_device_tensors():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    check_swiglu(randn((64, 1000), torch.bfloat16, "cuda:1", 3.0),
                 randn((64, 1000), torch.bfloat16, "cuda:1"), B)
