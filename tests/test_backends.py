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
from tests.helpers import cpu_backend_available, needs_cpu_backend


def _call_every_op(backend):
    """One call of each public op with ``backend``; returns OpDispatch.last_choice for them."""
    OpDispatch.last_choice.clear()
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    fusedlm.layer_norm(x, 8, w, backend=backend).sum().backward()
    fusedlm.rms_norm(x, 8, w, backend=backend).sum().backward()
    for add_norm in (fusedlm.add_layer_norm, fusedlm.add_rms_norm):
        y, h = add_norm(x, torch.randn(4, 8), 8, w, backend=backend)
        (y.sum() + h.pow(2).sum()).backward()
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    fusedlm.attention(q, k, v, causal=True, backend=backend).sum().backward()
    logits = torch.randn(6, 10, requires_grad=True)
    fusedlm.cross_entropy(logits, torch.randint(0, 10, (6,)), backend=backend).backward()
    cos, sin = torch.randn(5, 4), torch.randn(5, 4)
    fusedlm.rotary_embedding(q, cos, sin, backend=backend).sum().backward()
    gate, up = (torch.randn(4, 6, requires_grad=True) for _ in range(2))
    fusedlm.swiglu(gate, up, backend=backend).sum().backward()
    fusedlm.geglu(gate, up, approximate="tanh", backend=backend).sum().backward()
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    fusedlm.optim.AdamW([p], backend=backend).step()
    return dict(OpDispatch.last_choice)


ALL_OPS = {
    "cross_entropy_fwd",
    "cross_entropy_bwd",
    "layer_norm_fwd",
    "layer_norm_bwd",
    "rms_norm_fwd",
    "rms_norm_bwd",
    "add_layer_norm_fwd",
    "add_layer_norm_bwd",
    "add_rms_norm_fwd",
    "add_rms_norm_bwd",
    "attention_fwd",
    "attention_bwd",
    "adamw_step",
    "rotary_embedding",
    "glu_fwd",
    "glu_bwd",
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
        lambda b: fusedlm.add_layer_norm(torch.randn(2, 4), torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.add_rms_norm(torch.randn(2, 4), torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.attention(*(torch.randn(1, 1, 3, 4) for _ in range(3)), backend=b),
        lambda b: fusedlm.optim.AdamW([torch.nn.Parameter(torch.randn(2))], backend=b),
        lambda b: fusedlm.cross_entropy(torch.randn(2, 3), torch.tensor([0, 2]), backend=b),
        lambda b: fusedlm.rotary_embedding(torch.randn(1, 1, 3, 4), torch.randn(3, 2),
                                           torch.randn(3, 2), backend=b),
        lambda b: fusedlm.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend=b),
        lambda b: fusedlm.geglu(torch.randn(2, 4), torch.randn(2, 4), backend=b),
    ],
    ids=["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "attention", "AdamW",
         "cross_entropy", "rotary_embedding",
         "swiglu", "geglu"],
)
@pytest.mark.parametrize("name", ["nope", "", "CPU", None, 3])
def test_unknown_backend_name_raises_value_error(name, op):
    with pytest.raises(ValueError, match="'backend'"):
        op(name)


def test_auto_prefers_cpu_kernels_then_torch():
    choices = _call_every_op("auto")
    if cpu_backend_available():
        assert choices == {op: "cpu" for op in ALL_OPS}
    else:  # (where "auto" would give the reference, cross_entropy calls torch's own function)
        assert choices == {op: "torch" for op in ALL_OPS if not op.startswith("cross_entropy")}


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
        lambda b: fusedlm.add_layer_norm(torch.randn(2, 4), torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.add_rms_norm(torch.randn(2, 4), torch.randn(2, 4), 4, backend=b),
        lambda b: fusedlm.attention(*(torch.randn(1, 1, 3, 4) for _ in range(3)), backend=b),
        lambda b: fusedlm.rotary_embedding(torch.randn(1, 1, 3, 4), torch.randn(3, 2),
                                           torch.randn(3, 2), backend=b),
        lambda b: fusedlm.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend=b),
        lambda b: fusedlm.geglu(torch.randn(2, 4), torch.randn(2, 4), backend=b),
    ],
    ids=["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "attention",
         "rotary_embedding", "swiglu", "geglu"],
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
    c, s = torch.randn(9, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    x1, x2 = q[..., :8], q[..., 8:]
    rot = (fusedlm.rotary_embedding(q, c, s)
           - torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)).abs().max().item()
    swi = (fusedlm.swiglu(x, w.expand(6, 32)) - F.silu(x) * w).abs().max().item()
    geg = (fusedlm.geglu(x, w.expand(6, 32), approximate="tanh")
           - F.gelu(x, approximate="tanh") * w).abs().max().item()
    try:
        fusedlm.layer_norm(x, 32, backend="cpu")
        named = "no error"
    except fusedlm.BackendNotSupportedError as error:
        named = str(error)
    print(json.dumps({
        "cpu_available": report["cpu"].available, "cpu_reason": report["cpu"].reason,
        "torch_available": report["torch"].available, "errors": [ln, rms, att, rot, swi, geg],
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


@pytest.mark.parametrize("architecture, capability, runs", [
    ("80", (8, 0), True),            # machine code for the same GPU
    ("80", (8, 6), True),            # ... and later minors of its major
    ("80", (9, 0), True),            # PTX, compiled by the driver for a newer GPU
    ("80", (7, 5), False),
    ("80-real", (8, 9), True),
    ("80-real", (9, 0), False),      # machine code alone does not cross majors
    ("86-real", (8, 0), False),
    ("80-virtual", (8, 0), True),
    ("80-virtual", (12, 0), True),
    ("80-virtual", (7, 5), False),
    ("90a-real", (9, 0), True),
    ("90a-real", (10, 0), False),    # architecture-specific: exactly 9.0
    ("90a-real", (8, 0), False),
    ("90a", (10, 0), False),         # compute_90a PTX is architecture-specific too
    ("100f-real", (10, 3), True),    # family-specific: 10.x from 10.0
    ("100f-real", (12, 0), False),
    ("120", (12, 1), True),
    ("all", (9, 0), True),           # not a name it knows: assumed to run
])
def test_cuda_architecture_rule(architecture, capability, runs):
    from fusedlm.backends import cuda_architecture_runs_on

    assert cuda_architecture_runs_on(architecture, capability) is runs


class _StubExtension:
    def __init__(self, architectures):
        self._architectures = architectures

    def cuda_architectures(self):
        return self._architectures

    def cuda_ops(self):
        return sorted(ALL_OPS)


@pytest.mark.parametrize("architectures, capability, runs", [
    ("90a-real", (8, 0), False),     # built on an H100 node, run on an A100
    ("80-real,90a-real", (8, 0), True),
    ("80,90a-real", (12, 0), True),  # sm_80 PTX for a GPU newer than the build
    ("80-real,90a-real", (12, 0), False),
    ("", (8, 0), True),              # unknown (no record): not refused
])
def test_cuda_backend_steps_aside_on_a_gpu_the_build_has_no_code_for(
        monkeypatch, caplog, architectures, capability, runs):
    """On a GPU none of the build's architectures runs on, the "cuda" backend says why and
    "auto" takes the next one, instead of a launch failing with "no kernel image"."""
    from fusedlm import _ext

    backends = sys.modules["fusedlm.backends"]  # (fusedlm.backends is also a function)

    monkeypatch.setattr(_ext, "load", lambda: _StubExtension(architectures))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # As if the build and the machine had everything else the cuda backend needs.
    monkeypatch.setattr(backends, "_cached_backend_reason",
                        lambda name: None if name in ("cuda", "torch") else "not here")
    monkeypatch.setattr(OpDispatch, "_logged", set())
    backends._cuda_device_reason.cache_clear()
    try:
        dispatch = OpDispatch.registry["layer_norm_fwd"]
        device = torch.device("cuda", 1)
        reason = backends._cuda_device_reason(device)
        with caplog.at_level("INFO", logger="fusedlm"):
            chosen = dispatch.choose("auto", device)
        named = None
        try:
            dispatch.choose("cuda", device)
        except backends.BackendNotSupportedError as error:
            named = str(error)
    finally:
        backends._cuda_device_reason.cache_clear()
    if runs:
        assert reason is None and chosen == "cuda" and named is None
    else:
        major, minor = capability
        assert f"compute capability {major}.{minor}" in reason and architectures in reason
        assert f'TORCH_CUDA_ARCH_LIST="{major}.{minor}"' in reason
        assert chosen == "torch"
        assert "argument 'backend'" in named and "has no code for cuda:1" in named
        # a build for the wrong GPU is worth a warning, not the routine info of a skipped case
        assert any(r.levelname == "WARNING" and "has no code for cuda:1" in r.getMessage()
                   for r in caplog.records)


def test_info_reports_the_cuda_architectures(capsys):
    from fusedlm import _ext
    from fusedlm.cli import main

    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    module = _ext.load()
    expected = (module.cuda_architectures() or None) if module is not None else None
    assert facts["cuda_architectures"] == expected
    if module is not None and not module.built_with_cuda():
        assert module.cuda_architectures() == ""
