"""pytest-benchmark: attention while decoding (one query row per sequence against a KV cache,
GQA, forward), every provider of `fusedlm bench` (eager PyTorch, SDPA's backends, fusedlm's
backends) on the CPU and, marked ``gpu``, on CUDA.

    python -m pytest benchmarks/test_attention_decode.py --benchmark-group-by=group -m "not gpu"

Sizes are `fusedlm bench --quick`'s (FUSEDLM_BENCH_FULL=1: the full sweep).
"""

from __future__ import annotations

import pytest

from fusedlm.bench import pytest_suite


@pytest.mark.parametrize(("device", "case_index", "provider"),
                         pytest_suite.params("attention_decode"))
def test_attention_decode(benchmark, device, case_index, provider):
    pytest_suite.run(benchmark, "attention_decode", device, case_index, provider)
