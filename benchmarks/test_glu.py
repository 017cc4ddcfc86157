"""pytest-benchmark: the gated activations, SwiGLU (silu(gate) * up, Llama's) and GeGLU
(gelu(gate, approximate="tanh") * up, Gemma's), forward and forward+backward, every provider of
`fusedlm bench` (eager PyTorch, its peers and fusedlm's backends) on the CPU and, marked
``gpu``, on CUDA.

    python -m pytest benchmarks/test_glu.py --benchmark-group-by=group -m "not gpu"

Sizes are `fusedlm bench --quick`'s (FUSEDLM_BENCH_FULL=1: the full sweep).
"""

from __future__ import annotations

import pytest

from fusedlm.bench import pytest_suite


@pytest.mark.parametrize(("device", "case_index", "provider"), pytest_suite.params("swiglu"))
def test_swiglu(benchmark, device, case_index, provider):
    pytest_suite.run(benchmark, "swiglu", device, case_index, provider)


@pytest.mark.parametrize(("device", "case_index", "provider"), pytest_suite.params("geglu"))
def test_geglu(benchmark, device, case_index, provider):
    pytest_suite.run(benchmark, "geglu", device, case_index, provider)
