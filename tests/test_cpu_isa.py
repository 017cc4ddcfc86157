"""The CPU kernels' instruction-set paths: AVX-512, AVX2 and portable C++.

The kernels pick the best path the CPU has, so a test run reaches only that one. These tests
run the CPU kernel suites again with FUSEDLM_CPU_ISA capping the path at each lower level
(each in a subprocess, as the setting is read when the extension loads), and check the cap
itself: it takes effect, and a bad value is an error that names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusedlm import _ext
from tests.helpers import cpu_backend_available, cpu_unavailable_reason

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

ROOT = Path(__file__).resolve().parent.parent
LEVELS = ("generic", "avx2", "avx512")
# The suites that run the cpu backend's kernels against the reference (their -k cpu cases).
CPU_KERNEL_SUITES = ("tests/ops", "tests/optim", "tests/nn", "tests/test_fuzz.py")
# Their files in three parts of similar time (~35 s each at -k cpu, unsanitized), run as
# separate tests so that pytest-xdist workers take them side by side: as one subprocess they
# were the sanitized run's last 260 s, with the other worker idle. "rest" is every other file.
CPU_KERNEL_PARTS = {
    "attention": ("tests/ops/test_attention.py",),
    "adamw-norm-glu-linear_cross_entropy": ("tests/ops/test_adamw.py", "tests/ops/test_add_norm.py",
                                            "tests/ops/test_glu.py",
                                            "tests/ops/test_linear_cross_entropy.py"),
    "rest": (),
}


def _detected() -> str:
    return _ext.load().cpu_isa_detected()


def _lower_levels() -> list:
    return list(LEVELS[: LEVELS.index(_detected())])


def _part_files(part: str) -> list:
    if CPU_KERNEL_PARTS[part]:
        return list(CPU_KERNEL_PARTS[part])
    named = {f for files in CPU_KERNEL_PARTS.values() for f in files}
    files = []
    for suite in CPU_KERNEL_SUITES:
        path = ROOT / suite
        found = sorted(path.rglob("test_*.py")) if path.is_dir() else [path]
        files += [f for f in (p.relative_to(ROOT).as_posix() for p in found) if f not in named]
    return files


def _env(isa: str) -> dict:
    env = {**os.environ, "FUSEDLM_CPU_ISA": isa}
    env.pop("FUSEDLM_BACKEND", None)
    return env


def _python(code: str, isa: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(isa), cwd=ROOT, timeout=120)


def test_set_cpu_isa_caps_and_restores():
    module = _ext.load()
    before = module.cpu_isa()
    assert before in LEVELS
    try:
        for level in LEVELS[: LEVELS.index(_detected()) + 1]:
            module.set_cpu_isa(level)
            assert module.cpu_isa() == level
    finally:
        module.set_cpu_isa(before)
    assert module.cpu_isa() == before


def test_set_cpu_isa_rejects_unknown_name():
    with pytest.raises(ValueError, match="argument 'name'.*generic, avx2, avx512.*'sse4'"):
        _ext.load().set_cpu_isa("sse4")


def test_set_cpu_isa_rejects_more_than_the_cpu_has():
    if _detected() == "avx512":
        pytest.skip("this CPU has every level the kernels have code for")
    above = LEVELS[LEVELS.index(_detected()) + 1]
    with pytest.raises(ValueError, match=f"asks for {above} but this CPU's best is"):
        _ext.load().set_cpu_isa(above)


@pytest.mark.parametrize("isa", LEVELS)
def test_environment_variable_sets_the_level_at_load(isa):
    if isa not in LEVELS[: LEVELS.index(_detected()) + 1]:
        pytest.skip(f"this CPU has no {isa}")
    result = _python("import fusedlm._ext as e; print(e.load().cpu_isa())", isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa


def test_environment_variable_with_a_bad_value_names_it():
    result = _python("import fusedlm._ext as e; e.load()", "avx9000")
    assert result.returncode != 0
    assert "FUSEDLM_CPU_ISA='avx9000'" in result.stderr
    assert "must be one of generic, avx2, avx512" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("part", CPU_KERNEL_PARTS)
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_kernel_suites_pass_on_the_lower_paths(isa, part):
    """The CPU kernel tests again, capped at `isa` (each path below the one this CPU uses),
    one part of their files at a time."""
    if isa not in _lower_levels():
        pytest.skip(f"this CPU's best path is {_detected()}: the main run already tests {isa}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu",
         *_part_files(part)],
        capture_output=True, text=True, env=_env(isa), cwd=ROOT, timeout=900,
    )
    tail = "\n".join(result.stdout.splitlines()[-30:])
    assert result.returncode == 0, f"FUSEDLM_CPU_ISA={isa}:\n{tail}\n{result.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail, tail


def test_info_reports_the_level_and_the_cap():
    code = ("import json, contextlib, io, fusedlm.cli as c; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): c.main(['info', '--json'])\n"
            "print(json.loads(buf.getvalue())['cpu_kernel_isa'])")
    best = _detected()
    result = _python(code, best)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == best
    if _lower_levels():
        result = _python(code, "generic")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"generic (capped by FUSEDLM_CPU_ISA; the CPU has {best})"
