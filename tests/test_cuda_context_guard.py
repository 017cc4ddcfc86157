"""tests/cuda_context_guard.py, on the CPU: a fake CUDA context that a chosen test "breaks"
(the fake probe fails in the process that ran it) and a test that kills its worker, in a small
suite run by pytest in a subprocess, plainly and under pytest-xdist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CONFTEST = '''
import os

import tests.cuda_context_guard as guard
from tests.cuda_context_guard import (  # noqa: F401
    pytest_configure, pytest_runtest_setup, pytest_runtest_teardown)

BROKEN = os.path.join(os.path.dirname(__file__), "broken_pids")


def fake_context_error():
    """The probe fails in a process a test has broken, as a sticky CUDA error does."""
    try:
        with open(BROKEN) as f:
            pids = f.read().split()
    except OSError:
        return None
    if str(os.getpid()) in pids:
        return "RuntimeError: CUDA error: an illegal memory access was encountered"
    return None


guard.context_error = fake_context_error
guard.watched = lambda item: item.get_closest_marker("gpu") is not None
'''

SUITE = '''
import os

import pytest

BROKEN = os.path.join(os.path.dirname(__file__), "broken_pids")


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "case"), [("cuda", 1), ("cuda", 2), ("triton", 1)])
def test_kernel(backend, case):
    if (backend, case) == ("cuda", 1):  # the faulting kernel
        with open(BROKEN, "a") as f:
            f.write(f"{os.getpid()}\\n")


@pytest.mark.gpu
def test_other_kernel():
    pass


@pytest.mark.gpu
@pytest.mark.parametrize("case", [1, 2])
def test_segfaulting_kernel(case):
    if case == 1 and os.environ.get("PYTEST_XDIST_WORKER"):  # dies with no hook run
        os._exit(1)


def test_cpu():
    pass
'''


def _run_suite(tmp_path: Path, *args: str) -> tuple[dict[str, tuple[str, str]], list[dict]]:
    """Runs the suite; returns test name -> (outcome, message) and the quarantine records."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: fake GPU tests\n")
    (suite / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (suite / "test_suite.py").write_text(textwrap.dedent(SUITE))
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    # Not this run's xdist variables: under `pytest -n`, PYTEST_XDIST_WORKER would make the
    # plain run's suite take its worker-only branch (os._exit) and leave no junit XML.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONPATH=str(ROOT), FUSEDLM_TEST_QUARANTINE_DIR=str(quarantine))
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", *args], cwd=suite, env=env, capture_output=True,
                   text=True, timeout=300)
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = kind, node.get("message") or ""
        # a teardown error adds a second testcase entry of the same name: keep the worst
        if outcomes.get(case.get("name"), ("passed",))[0] == "passed":
            outcomes[case.get("name")] = (outcome, message)
    path = quarantine / "quarantine.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return outcomes, records


def test_a_plain_run_skips_the_later_gpu_tests_naming_the_culprit(tmp_path):
    outcomes, records = _run_suite(tmp_path)
    culprit = "test_kernel[cuda-1]"
    assert outcomes[culprit][0] == "error" and "broke the CUDA context" in outcomes[culprit][1]
    for name in ("test_kernel[cuda-2]", "test_kernel[triton-1]", "test_other_kernel",
                 "test_segfaulting_kernel[1]", "test_segfaulting_kernel[2]"):
        assert outcomes[name][0] == "skipped" and culprit in outcomes[name][1], outcomes[name]
    assert outcomes["test_cpu"][0] == "passed"
    assert [(r["test"].split("::")[-1], r["family"]) for r in records] == [
        (culprit, "test_suite.py::test_kernel[backend=cuda]")]


def test_an_xdist_worker_exits_and_its_kernel_family_is_quarantined(tmp_path):
    pytest.importorskip("xdist")
    # One worker, the default (load) scheduling, as benchmarks/gpu_check runs it: the tests in
    # file order, a crashed worker's pending tests handed to its replacement.
    outcomes, records = _run_suite(tmp_path, "-p", "xdist", "-n", "1")
    culprit = "test_kernel[cuda-1]"
    assert outcomes[culprit][0] in ("failure", "error") and "crashed" in outcomes[culprit][1]
    assert outcomes["test_kernel[cuda-2]"][0] == "skipped"
    assert "quarantined" in outcomes["test_kernel[cuda-2]"][1]
    # A fresh worker runs the other families.
    for name in ("test_kernel[triton-1]", "test_other_kernel", "test_cpu"):
        assert outcomes[name][0] == "passed", outcomes[name]
    # A worker that died with no hook run: the next test to start records it.
    assert "crashed" in outcomes["test_segfaulting_kernel[1]"][1]
    assert outcomes["test_segfaulting_kernel[2]"][0] == "skipped"
    assert "quarantined" in outcomes["test_segfaulting_kernel[2]"][1]
    assert [(r["test"].split("::")[-1], "died" in r["error"]) for r in records] == [
        (culprit, False), ("test_segfaulting_kernel[1]", True)]
    assert all(r["worker"] is not None for r in records)
