"""pytest-benchmark: attention with attention sinks (gpt-oss: causal, GQA, sinks (Hq,), full and
sliding window, forward and forward+backward), every provider of `fusedlm bench` (gpt-oss's
eager attention, torch.compile of it, fusedlm's backends; no SDPA: it takes no sinks) on the
CPU and, marked ``gpu``, on CUDA.

    python -m pytest benchmarks/test_attention_sinks.py --benchmark-group-by=group -m "not gpu"

Sizes are `fusedlm bench --quick`'s (FUSEDLM_BENCH_FULL=1: the full sweep).
"""

from __future__ import annotations

import pytest

from fusedlm.bench import pytest_suite


@pytest.mark.parametrize(("device", "case_index", "provider"),
                         pytest_suite.params("attention_sinks"))
def test_attention_sinks(benchmark, device, case_index, provider):
    pytest_suite.run(benchmark, "attention_sinks", device, case_index, provider)
