"""The Triton cross-entropy kernels (python/fusedlm/triton/cross_entropy.py) through the public
API with backend="triton", against torch's F.cross_entropy by DESIGN.md's rule (truth:
float64; baseline: torch at the input's dtype).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors. The
kernels use no ``tl.dot``, so bfloat16 runs there too. Rows are walked in chunks of up to 4096
columns: a GPT-2 vocabulary (50257) takes 13, and lowering the chunk size makes small rows take
several. ``gpu`` tests run realistic sizes in bfloat16/float16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from tests.ops.test_cross_entropy import check_cross_entropy, make_inputs  # noqa: E402

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import cross_entropy as triton_ce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, V): several rows per program (V 1, 127), one row per program (4099: two chunks), the
# GPT-2 vocabulary (13 chunks, a ragged last one), and 17/113 rows (a ragged last program).
SHAPES = [(1, 1), (113, 1), (17, 127), (113, 127), (5, 4099), (3, 50257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("N", "V"), SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
def test_cross_entropy(N, V, dtype):
    logits, target = make_inputs(N, V, dtype, DEVICE, ignore_every=4)
    for reduction in ("mean", "none"):
        check_cross_entropy(logits, target, B, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [8, 9, 17, 40])
def test_chunked_rows(V, dtype, monkeypatch):
    """Chunks of 8 columns: full chunks, a 1-column tail, the running max moving between
    chunks (a row's largest logit placed in its last chunk), label smoothing's row sum."""
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 8)
    logits, target = make_inputs(37, V, dtype, DEVICE, ignore_every=5)
    with torch.no_grad():
        logits[::2, -1] = 20.0
    check_cross_entropy(logits, target, B, "mean")
    check_cross_entropy(logits, target, B, "sum", label_smoothing=0.2)
    check_cross_entropy(logits, target, B, "none", label_smoothing=0.2, z_loss=0.05)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("N", "V"), [(17, 127), (5, 4099)], ids=["17x127", "5x4099"])
def test_z_loss(N, V, dtype):
    """The z-loss term in the forward and the softmax's scale in the backward, with rows per
    program and with two chunks a row; logits offset so logsumexp is far from 0."""
    logits, target = make_inputs(N, V, dtype, DEVICE, ignore_every=4)
    logits = (logits.detach() + 3.0).requires_grad_(True)
    for reduction, z_loss in (("mean", 1e-4), ("none", 0.3)):
        check_cross_entropy(logits, target, B, reduction, label_smoothing=0.1, z_loss=z_loss)


def test_chunked_row_with_masked_leading_chunks(monkeypatch):
    """A row whose first chunks hold only -inf (a masked vocabulary prefix): the running sum
    must stay 0 there, not NaN."""
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 8)
    logits = torch.randn(3, 30, device=DEVICE)
    logits[:, :16] = float("-inf")
    logits.requires_grad_(True)
    target = torch.tensor([20, 29, 16], device=DEVICE)
    check_cross_entropy(logits, target, B, "none")


def test_large_logits_are_shifted():
    """Logits around 1e4 (float32): no overflow in the exponentials."""
    logits, target = make_inputs(9, 300, torch.float32, DEVICE)
    with torch.no_grad():
        logits += 1e4
    check_cross_entropy(logits, target, B)


def test_float64():
    logits, target = make_inputs(11, 4099, torch.float64, DEVICE, ignore_every=3)
    check_cross_entropy(logits, target, B, "mean", label_smoothing=0.05)


def test_broadcast_grad_of_a_reduced_loss():
    """A mean's gradient reaches the backward kernel as an expanded (stride 0) row vector."""
    logits, target = make_inputs(6, 50, torch.float32, DEVICE)
    _, row_max, log_sum = torch.ops.fusedlm.cross_entropy_fwd(logits.detach(), target, -100, 0.0,
                                                              B)
    grad = torch.tensor(0.25, device=DEVICE).expand(6)
    assert grad.stride() == (0,)
    dx = triton_ce.cross_entropy_bwd(grad, logits.detach(), target, row_max, log_sum, -100, 0.0)
    expected = torch.ops.fusedlm.cross_entropy_bwd(grad.contiguous(), logits.detach(), target,
                                                   row_max, log_sum, -100, 0.0, "torch")
    torch.testing.assert_close(dx, expected)


@pytest.mark.parametrize(("N", "V", "expected"), [
    (1, 1, (1, 1, 4, 1)),
    (1000, 1, (64, 1, 4, 16)),
    (1000, 127, (32, 128, 8, 32)),
    (7, 127, (8, 128, 4, 1)),
    (1000, 4096, (1, 4096, 8, 1000)),
    (3, 50257, (1, 4096, 8, 3)),
])
def test_launch_shape(N, V, expected):
    """(rows per program, chunk, warps, programs): a few thousand elements a program."""
    assert triton_ce._launch_shape(N, V) == expected


def test_bad_entry_point_inputs_name_the_argument():
    with pytest.raises(ValueError, match="logits must be a 2-D float tensor"):
        triton_ce.cross_entropy_fwd(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.int64),
                                    -100, 0.0)
    with pytest.raises(ValueError, match="target must be int64 of shape"):
        triton_ce.cross_entropy_fwd(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32),
                                    -100, 0.0)


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
    launches = record_launches(monkeypatch, triton_ce, "cross_entropy_fwd_kernel",
                               "cross_entropy_bwd_kernel")
    target = torch.zeros(4096, dtype=torch.int64)
    for dtype, V, smoothing, strided, z_loss in [(torch.bfloat16, 50304, 0.0, False, 0.0),
                                                 (torch.float16, 127, 0.1, False, 0.0),
                                                 (torch.float32, 50257, 0.1, True, 0.0),
                                                 (torch.float64, 4099, 0.0, False, 0.0),
                                                 (torch.bfloat16, 128256, 0.1, False, 1e-4)]:
        x = torch.empty(4096, 2 * V, dtype=dtype)[:, ::2] if strided else torch.empty(4096, V,
                                                                                      dtype=dtype)
        stats = torch.empty(4096, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        triton_ce.cross_entropy_fwd(x, target, -100, smoothing, z_loss)
        triton_ce.cross_entropy_bwd(stats[:1].expand(4096) if strided else stats, x, target,
                                    stats, stats, -100, smoothing, z_loss=z_loss)
    assert len(launches) == 10
    failures = problems(launches, build_for_sm90(launches), max_spill_bytes=0)
    assert not failures, "\n".join(failures)


# ---- GPU: realistic sizes ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [50257, 50304, 128256, 32000])
def test_gpu_language_model_vocabularies(V, dtype):
    N = 2**26 // V  # (the float64 truth and its gradient stay under 2 GB)
    logits, target = make_inputs(N, V, dtype, "cuda", ignore_every=7)
    check_cross_entropy(logits, target, B, "mean")
    check_cross_entropy(logits, target, B, "sum", label_smoothing=0.1)
    check_cross_entropy(logits, target, B, "mean", z_loss=1e-4)


@pytest.mark.gpu
def test_gpu_second_device_tensors():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    logits, target = make_inputs(64, 1000, torch.bfloat16, "cuda:1")
    check_cross_entropy(logits, target, B)
