"""fusedlm.linear_cross_entropy with backend="triton": the Triton cross-entropy kernels fed one
chunk of logits at a time (each a fresh matmul output; with a reduced loss the backward kernel
gets the loss's gradient as an expanded scalar). Under TRITON_INTERPRET=1 on CPU tensors
without a GPU; tests/ops/test_linear_cross_entropy.py has the GPU-sized case."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from tests.ops.test_linear_cross_entropy import (  # noqa: E402
    check_linear_cross_entropy,
    make_head,
)

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)

from fusedlm.triton import cross_entropy as triton_ce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunks_through_the_triton_kernels(reduction, dtype):
    """Ragged last chunk (37 rows, 8 a chunk), bias, ignored rows, label smoothing."""
    input, weight, bias, target = make_head(37, 24, 131, dtype, DEVICE, bias=True,
                                            ignore_every=4)
    check_linear_cross_entropy(input, weight, bias, target, B, reduction, label_smoothing=0.1,
                               chunk_size=8)


def test_vocabulary_past_one_kernel_chunk(monkeypatch):
    """Kernel column chunks of 8 inside row chunks of 5: both loops ragged."""
    monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 8)
    input, weight, _, target = make_head(23, 6, 45, torch.float32, DEVICE, ignore_every=6)
    check_linear_cross_entropy(input, weight, None, target, B, "mean", chunk_size=5)
