"""The Triton rotary-embedding kernel (python/fusedlm/triton/rotary.py) through the public API
with backend="triton", against the eager rotation of tests/ops/test_rotary.py by DESIGN.md's
rule (truth: float64; baseline: eager code in x's dtype).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors. It
uses no ``tl.dot``, so bfloat16 runs there too. A program takes BLOCK_T positions of one
(b, h) row; lowering TILE_ELEMENTS makes small inputs take several position blocks with a
ragged last one. ``gpu`` tests run realistic sizes in bfloat16/float16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.backends import BackendNotSupportedError, OpDispatch  # noqa: E402
from tests.ops.test_rotary import (  # noqa: E402
    TABLE_LAYOUTS,
    X_LAYOUTS,
    _tables_in_layout,
    _x_in_layout,
    check_rotary,
    randn,
    rope_angles,
)

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import rotary as triton_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, T, D, R): one position, odd T, head dims 40/72/256 (half 128: 16 positions a
# program), partial rotary, an odd D, and T = 1000 with D = 8 (512 positions a program: a
# ragged second block).
SHAPES = [(1, 1, 1, 2, 2), (2, 3, 17, 40, 40), (1, 2, 113, 72, 72), (1, 1, 17, 256, 256),
          (2, 3, 17, 72, 32), (1, 2, 5, 7, 4), (1, 1, 1000, 8, 8)]
SHAPE_IDS = ["B{}-H{}-T{}-D{}-R{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rotary_embedding(shape, interleaved, dtype):
    Bs, H, T, D, R = shape
    cos, sin = rope_angles(T, R // 2, device=DEVICE)
    check_rotary(randn((Bs, H, T, D), dtype, DEVICE), cos, sin, interleaved, B)


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["(T,R/2)", "(B,T,R/2)"])
def test_angle_tables(per_row, table_dtype):
    cos, sin = rope_angles(17, 12, 3 if per_row else None, table_dtype, DEVICE)
    for dtype in (torch.float32, torch.float16):
        check_rotary(randn((3, 2, 17, 30), dtype, DEVICE), cos, sin, per_row, B)


@pytest.mark.parametrize("table_layout", TABLE_LAYOUTS)
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
def test_strided_inputs(x_layout, table_layout):
    x = _x_in_layout(x_layout, 2, 3, 17, 24, torch.float32, DEVICE)
    cos, sin = _tables_in_layout(table_layout, 2, 17, 8, DEVICE)
    check_rotary(x, cos, sin, x_layout in ("fused_qkv", "offset"), B)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_several_position_blocks(interleaved, monkeypatch):
    """32-element tiles: 4 positions a program (half 4), T = 17 in five blocks, the last one
    position; a per-row table; partial rotary (the pass-through block masked by T too)."""
    monkeypatch.setattr(triton_rotary, "TILE_ELEMENTS", 32)
    cos, sin = rope_angles(17, 4, 2, device=DEVICE)
    check_rotary(randn((2, 3, 17, 11), torch.float32, DEVICE), cos, sin, interleaved, B)


def test_float64():
    """float64 runs in float64 (its tables read in float64), to float64 accuracy."""
    cos, sin = rope_angles(33, 20, 2, torch.float64, DEVICE)
    for interleaved in (False, True):
        check_rotary(randn((2, 3, 33, 48), torch.float64, DEVICE), cos, sin, interleaved, B)


def test_conjugate_undoes_the_rotation():
    x = randn((2, 2, 9, 16), torch.float32, DEVICE)
    cos, sin = rope_angles(9, 8, device=DEVICE)
    for interleaved in (False, True):
        turned = triton_rotary.rotary_embedding(x, cos, sin, interleaved, False)
        back = triton_rotary.rotary_embedding(turned, cos, sin, interleaved, True)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
        expected = torch.ops.fusedlm.rotary_embedding(x, cos, sin, interleaved, True, "torch")
        torch.testing.assert_close(
            triton_rotary.rotary_embedding(x, cos, sin, interleaved, True), expected)


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8)],
                         ids=["B0", "H0", "T0"])
def test_empty_inputs(shape):
    cos, sin = rope_angles(shape[2], 4, shape[0], device=DEVICE)
    x = randn(shape, torch.float32, DEVICE).requires_grad_(True)
    out = fusedlm.rotary_embedding(x, cos, sin, backend=B)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape


def test_bad_entry_point_inputs_name_the_argument():
    x = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="x must be a 4-D float tensor"):
        triton_rotary.rotary_embedding(x[0], torch.zeros(3, 4), torch.zeros(3, 4), False, False)
    with pytest.raises(ValueError, match="x must be a 4-D float tensor"):
        triton_rotary.rotary_embedding(x.long(), torch.zeros(3, 4), torch.zeros(3, 4), False,
                                       False)
    with pytest.raises(ValueError, match="cos and sin must be"):
        triton_rotary.rotary_embedding(x, torch.zeros(4, 4), torch.zeros(4, 4), False, False)
    with pytest.raises(ValueError, match="cos and sin must be"):
        triton_rotary.rotary_embedding(x, torch.zeros(3, 4), torch.zeros(3, 3), False, False)
    with pytest.raises(ValueError, match="between 1 and 4 angles"):
        triton_rotary.rotary_embedding(x, torch.zeros(3, 5), torch.zeros(3, 5), False, False)


def test_auto_does_not_pick_triton_for_cpu_tensors():
    cos, sin = rope_angles(5, 4)
    OpDispatch.last_choice.pop("rotary_embedding", None)
    fusedlm.rotary_embedding(torch.randn(1, 2, 5, 8), cos, sin)
    assert OpDispatch.last_choice["rotary_embedding"] != "triton"


# ---- sm_90 builds (no GPU needed) -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the real builds")
def test_kernel_builds_for_sm90(monkeypatch):
    """Build the kernel as the launcher calls it for sm_90 (no GPU needed): what only the
    compiler rejects, shared memory and register spills (see tests/triton/sm90_build.py)."""
    from tests.triton.sm90_build import (
        build_for_sm90,
        problems,
        record_launches,
        require_nvidia_backend,
    )

    require_nvidia_backend()
    launches = record_launches(monkeypatch, triton_rotary, "rotary_embedding_kernel")
    for dtype, (Bs, H, T, D, R), interleaved, per_row in [
        (torch.bfloat16, (4, 32, 2048, 128, 128), False, False),
        (torch.float16, (2, 8, 1000, 128, 64), True, True),
        (torch.float32, (1, 4, 17, 72, 72), False, True),
        (torch.float64, (1, 2, 33, 256, 256), True, False),
    ]:
        x = torch.empty(Bs, T, H, D, dtype=dtype).transpose(1, 2)
        cos = torch.empty((Bs, T, R // 2) if per_row else (T, R // 2))
        triton_rotary.rotary_embedding(x, cos, cos, interleaved, False)
    assert len(launches) == 4
    failures = problems(launches, build_for_sm90(launches), max_spill_bytes=0)
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_gpu_llama_queries(interleaved, dtype):
    """Llama-sized queries: B=4, H=32, T=2048, D=128, as the (B, T, H, D) projection's
    transpose view, one float32 table."""
    cos, sin = rope_angles(2048, 64, device="cuda")
    x = randn((4, 2048, 32, 128), dtype, "cuda").transpose(1, 2)
    check_rotary(x, cos, sin, interleaved, B)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_per_row_positions_and_partial_rotary(dtype):
    """Per-row (B, T, R/2) tables in the model's dtype, and partial rotary (R = 64 of D = 128,
    GPT-NeoX / Phi) on keys with 8 KV heads."""
    cos, sin = rope_angles(4096, 32, 2, dtype, "cuda")
    check_rotary(randn((2, 8, 4096, 128), dtype, "cuda"), cos, sin, False, B)


@pytest.mark.gpu
def test_gpu_auto_takes_triton_and_cuda_has_no_kernel():
    """On CUDA tensors "auto" takes the Triton kernel (there is no CUDA C++ one); naming
    "cuda" raises."""
    cos, sin = rope_angles(64, 32, device="cuda")
    x = randn((2, 4, 64, 64), torch.bfloat16, "cuda").requires_grad_(True)
    OpDispatch.last_choice.pop("rotary_embedding", None)
    fusedlm.rotary_embedding(x, cos, sin).sum().backward()
    assert OpDispatch.last_choice["rotary_embedding"] == "triton"
    with pytest.raises(BackendNotSupportedError, match="argument 'backend'"):
        fusedlm.rotary_embedding(x, cos, sin, backend="cuda")


@pytest.mark.gpu
def test_gpu_second_device_tensors():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    cos, sin = rope_angles(100, 32, device="cuda:1")
    check_rotary(randn((2, 4, 100, 64), torch.bfloat16, "cuda:1"), cos, sin, False, B)
