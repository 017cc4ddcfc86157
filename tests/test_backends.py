"""fusedlm.backends() and backend selection: explicit names, "auto", FUSEDLM_BACKEND, and a
build without the extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import cpu_backend_available, cpu_unavailable_reason

needs_cpu_backend = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())


def _call_every_op(backend):
    """One call of each public op with ``backend``; returns OpDispatch.last_choice for them."""
    OpDispatch.last_choice.clear()
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    fusedlm.layer_norm(x, 8, w, backend=backend).sum().backward()
    fusedlm.rms_norm(x, 8, w, backend=backend).sum().backward()
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    fusedlm.attention(q, k, v, causal=True, backend=backend).sum().backward()
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    fusedlm.optim.AdamW([p], backend=backend).step()
    return dict(OpDispatch.last_choice)


ALL_OPS = {
    "layer_norm_fwd",
    "layer_norm_bwd",
    "rms_norm_fwd",
    "rms_norm_bwd",
    "attention_fwd",
    "attention_bwd",
    "adamw_step",
}


def test_report_lists_every_backend():
    report = fusedlm.backends()
    assert list(report) == ["cuda", "triton", "cpu", "torch"]
    assert report["torch"].available
    assert set(report["torch"].ops) == ALL_OPS
    for name, info in report.items():
        assert isinstance(info.reason, str) and info.reason, name
    text = repr(report)
    assert all(name in text for name in report)


def test_cuda_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    info = fusedlm.backends()["cuda"]
    assert not info.available and info.reason


def test_cpu_backend_available_when_built():
    # Fails (rather than skips) when the extension is missing, so a broken build cannot pass CI
    # by skipping every cpu case; set FUSEDLM_DISABLE_EXTENSION=1 to test the fallback on purpose.
    if os.environ.get("FUSEDLM_DISABLE_EXTENSION", "") not in ("", "0"):
        pytest.skip("extension disabled on purpose")
    info = fusedlm.backends()["cpu"]
    assert info.available, info.reason
    assert set(info.ops) == ALL_OPS


def test_cpu_reported_with_reason_when_extension_unusable():
    info = fusedlm.backends()["cpu"]
    if info.available:
        assert fusedlm._ext.why_unavailable() is None
    else:
        assert info.reason == fusedlm._ext.why_unavailable()


@pytest.mark.parametrize(
    "op",
    [
        lambda b: fusedlm.layer_norm(torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.rms_norm(torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.attention(*(torch.randn(1, 1, 3, 4) for _ in range(3)), backend=b),
        lambda b: fusedlm.optim.AdamW([torch.nn.Parameter(torch.randn(2))], backend=b),
    ],
    ids=["layer_norm", "rms_norm", "attention", "AdamW"],
)
@pytest.mark.parametrize("name", ["nope", "", "CPU", None, 3])
def test_unknown_backend_name_raises_value_error(name, op):
    with pytest.raises(ValueError, match="'backend'"):
        op(name)


def test_auto_prefers_cpu_kernels_then_torch():
    choices = _call_every_op("auto")
    expected = "cpu" if cpu_backend_available() else "torch"
    assert choices == {op: expected for op in ALL_OPS}


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_backend)])
def test_named_backend_is_used(backend):
    assert _call_every_op(backend) == {op: backend for op in ALL_OPS}


def test_env_backend_torch_overrides_auto(monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", "torch")
    assert _call_every_op("auto") == {op: "torch" for op in ALL_OPS}


@needs_cpu_backend
def test_env_backend_does_not_override_explicit_name(monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", "torch")
    assert _call_every_op("cpu") == {op: "cpu" for op in ALL_OPS}


def test_env_backend_bad_value_raises(monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", "nope")
    with pytest.raises(ValueError, match="FUSEDLM_BACKEND"):
        fusedlm.layer_norm(torch.randn(2, 4), 4)


@pytest.fixture
def without_triton_interpreter(monkeypatch):
    """The suite sets TRITON_INTERPRET=1 without a GPU (conftest); these tests check what a user
    without it sees: GPU backends refuse CPU tensors."""
    from fusedlm.backends import _cached_backend_reason

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _cached_backend_reason.cache_clear()
    yield
    _cached_backend_reason.cache_clear()


@pytest.mark.usefixtures("without_triton_interpreter")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_env_backend_gpu_on_cpu_tensors_raises(name, monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", name)
    x = torch.randn(2, 4)
    with pytest.raises(fusedlm.BackendNotSupportedError, match="FUSEDLM_BACKEND") as info:
        fusedlm.layer_norm(x, 4)
    assert name in str(info.value)
    with pytest.raises(fusedlm.BackendNotSupportedError):
        fusedlm.attention(*(torch.randn(1, 1, 3, 4) for _ in range(3)))


@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize(
    "op",
    [
        lambda b: fusedlm.layer_norm(torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.rms_norm(torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.attention(*(torch.randn(1, 1, 3, 4) for _ in range(3)), backend=b),
    ],
    ids=["layer_norm", "rms_norm", "attention"],
)
@pytest.mark.usefixtures("without_triton_interpreter")
def test_gpu_backend_on_cpu_tensors_raises(op, name):
    with pytest.raises(fusedlm.BackendNotSupportedError, match="argument 'backend'"):
        op(name)


def test_backend_not_supported_is_a_value_error():
    assert issubclass(fusedlm.BackendNotSupportedError, ValueError)


@needs_cpu_backend
def test_cpu_backend_refuses_non_contiguous_adamw_but_auto_serves_it():
    p = torch.nn.Parameter(torch.randn(4, 3).t())
    p.grad = torch.randn(3, 4)

    def step(backend):
        states = [torch.zeros(3, 4)], [torch.zeros(3, 4)]
        torch.ops.fusedlm.adamw_step(
            [p.data], [p.grad], *states, [], [1.0], 0.1, 0.9, 0.999, 1e-8, 0.0, False, False,
            backend, [],
        )

    with pytest.raises(fusedlm.BackendNotSupportedError, match="non-contiguous"):
        step("cpu")
    step("auto")
    assert OpDispatch.last_choice["adamw_step"] == "torch"


_NO_EXTENSION_SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F
    import fusedlm
    from fusedlm.backends import OpDispatch
    report = fusedlm.backends()
    torch.manual_seed(0)
    x = torch.randn(6, 32, dtype=torch.float64)
    w = torch.randn(32, dtype=torch.float64)
    b = torch.randn(32, dtype=torch.float64)
    ln = (fusedlm.layer_norm(x, 32, w, b) - F.layer_norm(x, (32,), w, b)).abs().max().item()
    rms = (fusedlm.rms_norm(x, 32, w, eps=1e-6) - F.rms_norm(x, (32,), w, 1e-6)).abs().max().item()
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    att = (fusedlm.attention(q, k, v, causal=True)
           - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
    try:
        fusedlm.layer_norm(x, 32, backend="cpu")
        named = "no error"
    except fusedlm.BackendNotSupportedError as error:
        named = str(error)
    print(json.dumps({
        "cpu_available": report["cpu"].available, "cpu_reason": report["cpu"].reason,
        "torch_available": report["torch"].available, "errors": [ln, rms, att],
        "choices": dict(OpDispatch.last_choice), "named_cpu": named,
    }))
    """
)


def test_disabled_extension_falls_back_to_torch():
    env = {**os.environ, "FUSEDLM_DISABLE_EXTENSION": "1"}
    env.pop("FUSEDLM_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", _NO_EXTENSION_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cpu_available"] is False
    assert "FUSEDLM_DISABLE_EXTENSION" in report["cpu_reason"]
    assert report["torch_available"] is True
    assert max(report["errors"]) < 1e-12, report["errors"]
    assert set(report["choices"].values()) == {"torch"}
    assert (
        "argument 'backend'" in report["named_cpu"]
        and "FUSEDLM_DISABLE_EXTENSION" in report["named_cpu"]
    )


def test_environment_lookup_follows_os_environ(monkeypatch):
    """backends.environment (the ops' cheap os.environ.get) sees every write to os.environ."""
    from fusedlm.backends import environment

    monkeypatch.delenv("FUSEDLM_TEST_VARIABLE", raising=False)
    assert environment("FUSEDLM_TEST_VARIABLE") is None
    assert environment("FUSEDLM_TEST_VARIABLE", "default") == "default"
    monkeypatch.setenv("FUSEDLM_TEST_VARIABLE", "a value é")
    assert environment("FUSEDLM_TEST_VARIABLE") == "a value é"
    monkeypatch.setenv("FUSEDLM_TEST_VARIABLE", "")
    assert environment("FUSEDLM_TEST_VARIABLE", "default") == ""
    monkeypatch.delenv("FUSEDLM_TEST_VARIABLE")
    assert environment("FUSEDLM_TEST_VARIABLE", "default") == "default"
