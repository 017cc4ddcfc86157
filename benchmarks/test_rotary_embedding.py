"""pytest-benchmark: rotary position embeddings of one attention layer's q and k (Hugging Face
Llama's layout), forward and forward+backward, every provider of `fusedlm bench` (eager
PyTorch, its peers and fusedlm's backends) on the CPU and, marked ``gpu``, on CUDA.

    python -m pytest benchmarks/test_rotary_embedding.py --benchmark-group-by=group -m "not gpu"

Sizes are `fusedlm bench --quick`'s (FUSEDLM_BENCH_FULL=1: the full sweep).
"""

from __future__ import annotations

import pytest

from fusedlm.bench import pytest_suite


@pytest.mark.parametrize(("device", "case_index", "provider"),
                         pytest_suite.params("rotary_embedding"))
def test_rotary_embedding(benchmark, device, case_index, provider):
    pytest_suite.run(benchmark, "rotary_embedding", device, case_index, provider)
