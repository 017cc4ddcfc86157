"""pytest-benchmark: attention forward and forward+backward (full and causal), every provider of
`fusedlm bench` (eager PyTorch, its peers and fusedlm's backends) on the CPU and, marked
``gpu``, on CUDA.

    python -m pytest benchmarks/test_attention.py --benchmark-group-by=group -m "not gpu"

Sizes are `fusedlm bench --quick`'s (FUSEDLM_BENCH_FULL=1: the full sweep).
"""

from __future__ import annotations

import pytest

from fusedlm.bench import pytest_suite


@pytest.mark.parametrize(("device", "case_index", "provider"), pytest_suite.params("attention"))
def test_attention(benchmark, device, case_index, provider):
    pytest_suite.run(benchmark, "attention", device, case_index, provider)
