"""The Triton GLU kernels (python/fusedlm/triton/glu.py: SwiGLU and GeGLU, the activation a
constexpr) through the public API with backend="triton", against eager ``F.silu(gate) * up`` /
``F.gelu(gate, approximate=...) * up`` by DESIGN.md's rule (truth: float64; baseline: eager code
in the inputs' dtype).

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
from tests.ops.test_glu import (  # noqa: E402
    ACTIVATIONS,
    LAYOUTS,
    _operands_in_layout,
    check_glu,
    glu,
    randn,
)

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import glu as triton_glu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Width 1 (4096 rows a tile), 127 (32 rows a tile), 2048 (one full column block), 4099 (three
# column blocks); 17 and 113 rows (a ragged last row block); a 3-D input.
SHAPES = [(1, 1), (113, 1), (17, 127), (113, 127), (3, 2048), (5, 4099), (2, 3, 64)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu(activation, shape, dtype):
    check_glu(randn(shape, dtype, DEVICE, 3.0), randn(shape, dtype, DEVICE), B, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(9, 17), (37, 8), (5, 1)], ids=["9x17", "37x8", "5x1"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_small_tiles(activation, shape, dtype, monkeypatch):
    """Tiles of 32 elements, 8 columns at most: 17 columns in three blocks (a 1-column tail),
    37 rows of 8 in ten row blocks (a 1-row tail), width 1 at 32 rows a tile."""
    monkeypatch.setattr(triton_glu, "MAX_BLOCK_W", 8)
    monkeypatch.setattr(triton_glu, "TILE_ELEMENTS", 32)
    check_glu(randn(shape, dtype, DEVICE, 3.0), randn(shape, dtype, DEVICE), B, activation)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_strided_inputs(activation, layout):
    for N, W in ((17, 127), (3, 4099)):
        gate, up = _operands_in_layout(layout, N, W, torch.float32, DEVICE)
        check_glu(gate, up, B, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64(activation):
    """float64 runs in float64, to float64 accuracy."""
    for shape in ((17, 127), (3, 4099)):
        check_glu(randn(shape, torch.float64, DEVICE, 3.0), randn(shape, torch.float64, DEVICE),
                  B, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saturated_gates(activation):
    gate = torch.cat([torch.linspace(-80, -10, 40), torch.linspace(10, 80, 40)]).to(DEVICE)
    extremes = torch.tensor([-1e4, -100.0, -89.0, 89.0, 100.0, 1e4, 0.0, 0.0], device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        g = torch.cat([gate, extremes]).to(dtype).reshape(2, 44)
        check_glu(g, randn(g.shape, dtype, DEVICE), B, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_broadcast_grad_of_a_reduced_loss(activation):
    """A sum's gradient reaches the backward kernel expanded (stride 0 both ways)."""
    gate, up = randn((6, 50), torch.float32, DEVICE, 3.0), randn((6, 50), torch.float32, DEVICE)
    grad = torch.tensor(0.25, device=DEVICE).expand(6, 50)
    assert grad.stride() == (0, 0)
    dgate, dup = triton_glu.glu_bwd(grad, gate, up, activation)
    expected = torch.ops.fusedlm.glu_bwd(grad.contiguous(), gate, up, activation, "torch")
    for got, want in zip((dgate, dup), expected, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_inputs(activation):
    for shape in ((0, 5), (5, 0), (0, 3, 4)):
        gate, up = (randn(shape, torch.float32, DEVICE).requires_grad_(True) for _ in range(2))
        out = glu(gate, up, activation, B)
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
    assert triton_glu._launch_shape(N, W) == expected


def test_bad_entry_point_inputs_name_the_argument():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="gate must be a 2-D float tensor"):
        triton_glu.glu_fwd(x[None], x[None], "silu")
    with pytest.raises(ValueError, match="gate must be a 2-D float tensor"):
        triton_glu.glu_fwd(x.long(), x.long(), "gelu")
    with pytest.raises(ValueError, match="up must be a 2-D float tensor like gate"):
        triton_glu.glu_fwd(x, x.double(), "gelu_tanh")
    with pytest.raises(ValueError, match="up must be a 2-D float tensor like gate"):
        triton_glu.glu_fwd(x, x[:, :3], "silu")
    with pytest.raises(ValueError, match="grad_out must be a 2-D float tensor like gate"):
        triton_glu.glu_bwd(x[:2], x, x, "silu")
    for bad in ("relu", "gelu_new", ""):
        with pytest.raises(ValueError, match="argument 'activation' must be one of 'silu'"):
            triton_glu.glu_fwd(x, x, bad)
        with pytest.raises(ValueError, match="argument 'activation' must be one of 'silu'"):
            triton_glu.glu_bwd(x, x, x, bad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_auto_does_not_pick_triton_for_cpu_tensors(activation):
    OpDispatch.last_choice.pop("glu_fwd", None)
    glu(torch.randn(3, 4), torch.randn(3, 4), activation)
    assert OpDispatch.last_choice["glu_fwd"] != "triton"


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
    launches = record_launches(monkeypatch, triton_glu, "glu_fwd_kernel", "glu_bwd_kernel")
    for activation in ACTIVATIONS:
        for dtype, N, W, halves in [(torch.bfloat16, 16384, 8192, True),
                                    (torch.float16, 1000, 127, False),
                                    (torch.float32, 4096, 4099, True),
                                    (torch.float64, 64, 2048, False)]:
            if halves:
                gate, up = torch.empty(N, 2 * W, dtype=dtype).chunk(2, dim=-1)
            else:
                gate, up = torch.empty(N, W, dtype=dtype), torch.empty(N, W, dtype=dtype)
            triton_glu.glu_fwd(gate, up, activation)
            triton_glu.glu_bwd(torch.empty(N, W, dtype=dtype), gate, up, activation)
    assert len(launches) == 8 * len(ACTIVATIONS)
    failures = problems(launches, build_for_sm90(launches), max_spill_bytes=0)
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_llama_mlp(activation, dtype):
    """A Llama (Gemma) MLP's activation at 16384 tokens of width 8192."""
    check_glu(randn((16384, 8192), dtype, "cuda", 3.0), randn((16384, 8192), dtype, "cuda"), B,
              activation)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_fused_projection_halves(activation):
    """The two halves of a fused (B, T, 2W) gate-and-up projection (Llama-7B's W = 11008),
    read in place."""
    gate, up = randn((2, 2048, 2 * 11008), torch.bfloat16, "cuda", 3.0).chunk(2, dim=-1)
    check_glu(gate, up, B, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_float64(activation):
    """float64 on the GPU (libdevice's erf and exp in double)."""
    check_glu(randn((64, 1000), torch.float64, "cuda", 3.0), randn((64, 1000), torch.float64,
                                                                   "cuda"), B, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_auto_takes_triton_and_cuda_has_no_kernel(activation):
    """On CUDA tensors "auto" takes the Triton kernels (there are no CUDA C++ ones); naming
    "cuda" raises."""
    gate, up = (randn((64, 256), torch.bfloat16, "cuda").requires_grad_(True) for _ in range(2))
    for op in ("glu_fwd", "glu_bwd"):
        OpDispatch.last_choice.pop(op, None)
    glu(gate, up, activation).sum().backward()
    assert OpDispatch.last_choice["glu_fwd"] == OpDispatch.last_choice["glu_bwd"] == "triton"
    with pytest.raises(BackendNotSupportedError, match="argument 'backend'"):
        glu(gate, up, activation, "cuda")


@pytest.mark.gpu
def test_gpu_second_device_tensors():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for activation in ACTIVATIONS:
        check_glu(randn((64, 1000), torch.bfloat16, "cuda:1", 3.0),
                  randn((64, 1000), torch.bfloat16, "cuda:1"), B, activation)
