"""Fixtures shared by the whole suite.

* ``available_backends(device="cpu")`` (from tests/helpers.py): the backends to parametrize over.
* every test runs with a fixed seed derived from its node id (reproducible, yet each test draws
  different inputs).
* tests marked ``gpu`` are skipped when torch.cuda.is_available() is False; with CUDA, a test
  that breaks the CUDA context is contained (tests/cuda_context_guard.py).
* without a GPU, ``TRITON_INTERPRET=1`` is set before anything imports triton, so the Triton
  kernels run on CPU tensors through Triton's interpreter (tests/triton).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n logical`), the workers share the machine's cores: each
# takes its share of torch's threads, since two workers of two OpenMP threads each on two cores
# stall on each other's barriers. FUSEDLM_TEST_THREADS=N sets N instead (CI's sanitized run
# under xdist, which still exercises the CPU kernels' multi-threaded partitions, with
# OMP_WAIT_POLICY=passive so that the idle threads sleep at a barrier rather than spin against
# the other worker's: see .ci/run). Without xdist: torch's default.
if os.environ.get("FUSEDLM_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["FUSEDLM_TEST_THREADS"]))
elif os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))

from tests.cuda_context_guard import (  # noqa: F401  (pytest hooks, see its docstring)
    pytest_configure,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)
from tests.helpers import available_backends, device_of  # noqa: F401  (re-exported)


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-long", dest="fuzz_long", nargs="?", type=int, const=5000, default=None,
        metavar="N",
        help="tests/test_fuzz.py: draw N random examples per fuzz test (5000 when N is omitted) "
        "instead of the bounded, derandomized default",
    )


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """torch.manual_seed(crc32(test id)) before each test; the seed is returned for reuse."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request):
    """Skips ``gpu`` tests without CUDA, except, with FUSEDLM_TEST_TRITON_ON_CPU=1, those
    parametrized with backend "triton": they then run through Triton's interpreter on CPU
    tensors (tests/helpers.device_of), which checks the GPU test matrix's own logic (which
    cases it feeds, skips and compares) without a GPU. Slow (``-m gpu -n 2``, pytest-xdist:
    16 minutes on 2 cores); not part of CI."""
    if request.node.get_closest_marker("gpu") is None or torch.cuda.is_available():
        return
    callspec = getattr(request.node, "callspec", None)
    if (os.environ.get("FUSEDLM_TEST_TRITON_ON_CPU") == "1" and callspec is not None
            and callspec.params.get("backend") == "triton"):
        return  # (bfloat16 included: fusedlm/triton/interpreter_fixes.py)
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; an FUSEDLM_BACKEND from the caller's shell must not
    change what "auto" means inside them."""
    monkeypatch.delenv("FUSEDLM_BACKEND", raising=False)
