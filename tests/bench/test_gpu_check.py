"""benchmarks/gpu_check's pytest step, on the CPU: the arguments that contain a broken CUDA
context or a hung kernel (tests/cuda_context_guard.py), and the quarantine records it reads."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    """benchmarks/gpu_check (a script without a .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "benchmarks" /
                                                                   "gpu_check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_pytest_step_replaces_crashed_workers_and_ends_hangs():
    pytest.importorskip("xdist")
    pytest.importorskip("pytest_timeout")
    args = _gpu_check()._pytest_speedup_args()
    assert args[args.index("-n") + 1].isdigit()
    # xdist's default (4 restarts per worker) would end the run after a few faulting families
    assert int(args[args.index("--max-worker-restart") + 1]) >= 32
    # the signal method cannot interrupt a test blocked in a CUDA call on a hung kernel
    assert args[args.index("--timeout-method") + 1] == "thread"


def test_quarantine_records_survive_a_half_written_line(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    record = {"test": "t.py::test_a[cuda]", "family": "t.py::test_a[backend=cuda]",
              "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    path.write_text(json.dumps(record) + "\n" + '{"test": "t.py::te')
    assert _gpu_check()._read_jsonl(path) == [record]
    assert _gpu_check()._read_jsonl(tmp_path / "missing.jsonl") == []


def test_pytest_step_runs_every_gpu_test_the_kernels_own_first():
    """The ordered targets collect exactly the GPU tests of ``tests`` (none lost, none twice),
    tests/cuda's first."""
    import subprocess
    import sys

    def collected(*targets):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                              "-p", "no:cacheprovider", *targets], cwd=ROOT, capture_output=True,
                             text=True, timeout=600).stdout
        return [line for line in out.splitlines() if "::" in line]

    ordered = collected(*_gpu_check()._pytest_targets())
    assert ordered[0].startswith("tests/cuda/")
    assert len(ordered) == len(set(ordered))
    assert sorted(ordered) == sorted(collected("tests"))


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    """benchmarks/gpu_check as the device runs it, less the build (CI built the extension
    already): every step's code that does not need a GPU runs (a Python error in it would cost
    the first GPU run that step), and the files it leaves say what ran and why not."""
    import os
    import subprocess
    import sys
    import tarfile

    from fusedlm.bench import schema

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    env.pop("TRITON_INTERPRET", None)  # as on the device: the bench must not run interpreted
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check"), "--steps",
                             "pytest,sanitizer,bench", "--quick", "--budget-s", "400"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["statuses"] == {"pytest": "ok", "sanitizer": steps["sanitizer"]["status"],
                                  "bench": "ok"}, result.stdout[-3000:]
    # no GPU: every GPU test skipped, none failed; no broken context to report
    summary = steps["pytest"]["summary"]
    assert summary["tests"] > 1000 and summary["failures"] == summary["errors"] == 0
    assert steps["pytest"]["cuda_context_broken_by"] == []
    assert steps["sanitizer"]["status"].startswith("skipped")
    assert {c["backend"]: c["status"] for c in steps["sanitizer"]["plain"]["cases"]} == {
        "cuda": "skipped: no CUDA GPU", "triton": "skipped: no CUDA GPU"}
    bench = json.loads((out / "bench.json").read_text())
    assert schema.validate(bench) == []
    assert {r["op"] for r in bench["rows"]} == {"attention", "layer_norm", "rms_norm", "adamw",
                                                 "gpt", "cross_entropy", "linear_cross_entropy",
                                                 "rotary_embedding", "swiglu", "geglu",
                                                 "add_rms_norm", "attention_decode",
                                                 "attention_sinks", "attention_dropout",
                                                 "attention_softcap"}
    assert len(list(out.iterdir())) <= 8
    assert result.returncode == 1  # the sanitizer step did not run: not all ok
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/pytest-gpu-junit.xml" in names and "logs/pytest.log" in names
    if importlib.util.find_spec("matplotlib") is None:
        # (a machine without it, as the GPU machine may be: bench.json stands, and
        # record_results.py draws the plots from it)
        assert not list(out.glob("*.png")) and "matplotlib" in steps["bench"]["plots_error"]
        return
    # $OUT brings back 8 files: the first 5 ops' plots there, the others' in logs.tar.gz
    assert {p.name for p in out.glob("*.png")} == {f"{op}.png" for op in
                                                   ("attention", "layer_norm", "rms_norm",
                                                    "adamw", "gpt")}
    assert steps["bench"]["plots_in_logs"] == ["cross_entropy.png", "linear_cross_entropy.png",
                                               "rotary_embedding.png", "swiglu.png",
                                               "geglu.png", "add_rms_norm.png",
                                               "attention_decode.png", "attention_sinks.png",
                                               "attention_dropout.png", "attention_softcap.png"]
    assert "logs/plots/attention_decode.png" in names
    assert "logs/plots/attention_sinks.png" in names
    assert "logs/plots/attention_dropout.png" in names
    assert "logs/plots/attention_softcap.png" in names


def test_bench_step_runs_every_op_attention_decode_sinks_dropout_and_softcap_last():
    """The bench step's ops are fusedlm bench's, each with a share of its time; the decoding
    rows, then the attention-sinks, the attention-dropout and the attention-softcap rows come
    last, after the main attention rows (a step short of time skips them first; the last op
    runs on what the others left)."""
    from fusedlm.bench import cases

    gpu_check = _gpu_check()
    assert sorted(gpu_check.OPS) == sorted(cases.OPS)
    assert set(gpu_check.OP_SHARE) == set(gpu_check.OPS)
    assert sum(gpu_check.OP_SHARE.values()) == pytest.approx(1.0)
    assert all(share > 0 for share in gpu_check.OP_SHARE.values())
    # geglu's rows are swiglu's at Gemma's widths: a small share, as swiglu's
    assert gpu_check.OP_SHARE["geglu"] <= gpu_check.OP_SHARE["swiglu"]
    assert gpu_check.OPS.index("attention_decode") > gpu_check.OPS.index("attention")
    assert gpu_check.OPS[-4:] == ("attention_decode", "attention_sinks", "attention_dropout",
                                  "attention_softcap")


def test_bench_step_keeps_out_to_eight_files(tmp_path):
    """gpu_check.json, bench.json, logs.tar.gz and the first MAX_PLOTS plots in $OUT (the
    device tool brings back 8 files), the other plots in logs.tar.gz."""
    gpu_check = _gpu_check()
    check = gpu_check.Check(tmp_path / "out", budget_s=600, quick=True)
    check.out.mkdir()
    made = tmp_path / "plots"
    made.mkdir()
    plots = []
    for op in gpu_check.OPS:
        (made / f"{op}.png").write_bytes(b"png")
        plots.append(made / f"{op}.png")
    placed = check.place_plots(plots)
    assert placed["plots"] == [f"{op}.png" for op in gpu_check.OPS[:gpu_check.MAX_PLOTS]]
    assert placed["plots_in_logs"] == [f"{op}.png" for op in gpu_check.OPS[gpu_check.MAX_PLOTS:]]
    check.save()
    assert 3 + gpu_check.MAX_PLOTS <= 8
    assert len(list(check.out.iterdir())) == 2 + gpu_check.MAX_PLOTS  # no bench.json here
    import tarfile

    with tarfile.open(check.out / "logs.tar.gz") as tar:
        assert {f"logs/plots/{name}" for name in placed["plots_in_logs"]} <= set(tar.getnames())


def test_build_step_falls_back_to_cmake_when_pip_fails(tmp_path, monkeypatch):
    """Should pip fail on the GPU machine (its setuptools, say), the build step builds the
    extension with CMake directly, and the later steps import it from python/fusedlm (here a
    temporary folder stands in for it). The CMake folder is the editable install's, so the
    build is incremental."""
    gpu_check = _gpu_check()
    monkeypatch.setenv("FUSEDLM_GPU_CHECK_PIP_FAILS", "1")
    monkeypatch.setenv("FUSEDLM_CUDA", "OFF")  # CI's torch is a CPU build
    check = gpu_check.Check(tmp_path / "out", budget_s=600, quick=True)
    check.extension_dir = tmp_path / "extension"
    check.extension_dir.mkdir()
    check.ptxas_report = lambda later: {"skipped": "not this test's concern"}
    check.build(later=())
    step = check.report["steps"]["build"]
    assert "made to fail on purpose" in step["tail"]
    fallback = step["cmake_fallback"]
    assert fallback["rc"] == 0, fallback["tail"]
    assert (check.extension_dir / fallback["copied"]).is_file()
    assert step["rc"] == 0
    # The step's status follows the extension the later steps import (ROOT/python/fusedlm's,
    # not this test's temporary folder): no CUDA kernels, and it says so rather than passing.
    import torch

    built_with_cuda = step["extension"]["built_with_cuda"]
    assert step["status"] == ("ok" if built_with_cuda else "failed")
    if torch.version.cuda is None:  # CI: a CPU torch builds no CUDA kernels
        assert built_with_cuda is False


@pytest.mark.slow
def test_ptxas_keeps_the_hopper_wgmmas_asynchronous(tmp_path):
    """gpu_check's ptxas report, run here with CI's nvcc: both sm_90a attention kernels compile
    and ptxas notes no "Potential Performance Loss" (C7514 and its neighbours: wgmmas
    serialized because accumulators are touched mid-pipeline, a divergent branch, ...). That
    would cost the Hopper kernels much of their speed with no error anywhere, so it fails here,
    without a GPU, rather than showing up as a slow benchmark. (Rescaling O before the P V
    wgmma's wait, for one, gives C7514.)"""
    import shutil

    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc not found")
    check = _gpu_check().Check(tmp_path / "out", budget_s=600, quick=True)
    report = check.ptxas_report(later=())
    assert set(report) == {"attention_fwd_sm90.cu", "attention_bwd_sm90.cu"}, report
    for source, result in report.items():
        assert result["rc"] == 0, (source, result)
        assert result["registers"], (source, result)
        assert result["performance_loss"] == {}, (source, result)
        assert result["wgmma_serialized"] == 0, (source, result)
    # Spills, as benchmarks/NOTES.md records them: in the instances without score modifiers,
    # none in the forward and in the backward only the per-query (packed documents) D = 128
    # ones, 28 and 52 bytes; the kScoreMods instances (soft-capping, dropout: the last template
    # argument) at most 100 bytes in the forward and 400 in the backward. More is a regression
    # to decide on, not to find on a GPU.
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found (the spill limits go by demangled kernel names)")
    limits = {("attention_fwd_sm90.cu", False): 0, ("attention_bwd_sm90.cu", False): 52,
              ("attention_fwd_sm90.cu", True): 100, ("attention_bwd_sm90.cu", True): 400}
    for source, result in report.items():
        for kernel, spilled in result["spills_by_kernel"].items():
            assert kernel.endswith(("true>", "false>")), kernel
            assert spilled <= limits[source, kernel.endswith("true>")], (source, kernel, spilled)


@pytest.mark.parametrize("output, expected", [
    ("9.0\n", "9.0a"),                 # H100/H200: the Hopper kernels need sm_90a
    ("8.0\n8.0\n", "8.0"),             # two A100s
    ("8.6\n9.0\n", "8.6;9.0a"),
    ("", "9.0a"),                      # nothing said: the lent machines' GPU
    ("No devices were found\n", "9.0a"),
])
def test_build_step_targets_the_gpus_here(tmp_path, output, expected):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '{output}'\n")
    fake.chmod(0o755)
    assert _gpu_check()._device_arch_list(str(fake)) == expected
    assert _gpu_check()._device_arch_list(str(tmp_path / "missing")) == "9.0a"
