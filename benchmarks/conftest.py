"""pytest-benchmark suites: tests marked ``gpu`` are skipped without a CUDA GPU.

    python -m pytest benchmarks -m "not gpu" --benchmark-group-by=group   # CPU
    python -m pytest benchmarks -m gpu --benchmark-group-by=group         # GPU
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request):
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
