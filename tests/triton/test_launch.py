"""python/fusedlm/triton/launch.py: every Triton kernel of the package is launched with
LAUNCH_OPTIONS (FMA contraction asked for, not left to the installed Triton, whose default
changes in 3.10).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), where each launch
goes through ``InterpretedFunction.run`` with the options as keyword arguments: the test runs
every op forward and backward with backend="triton" and records them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.backends import triton_interpreted  # noqa: E402

if not fusedlm.backends()["triton"].available:
    pytest.skip(f"triton backend: {fusedlm.backends()['triton'].reason}", allow_module_level=True)
if not triton_interpreted():
    pytest.skip("records launches through Triton's interpreter", allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fusedlm.triton.adamw  # noqa: E402
import fusedlm.triton.attention  # noqa: E402
import fusedlm.triton.cross_entropy  # noqa: E402
import fusedlm.triton.glu  # noqa: E402
import fusedlm.triton.norm  # noqa: E402
import fusedlm.triton.rotary  # noqa: E402
from fusedlm.triton.launch import LAUNCH_OPTIONS  # noqa: E402

MODULES = [fusedlm.triton.adamw, fusedlm.triton.attention, fusedlm.triton.cross_entropy,
           fusedlm.triton.glu, fusedlm.triton.norm, fusedlm.triton.rotary]


def _package_kernels() -> set[str]:
    """The names of the kernels the launchers start (helpers called inside kernels excluded)."""
    return {
        name for module in MODULES for name, value in vars(module).items()
        if isinstance(value, InterpretedFunction) and name.endswith("_kernel")
    }


def _run_every_op() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, requires_grad=True)
    residual = torch.randn(3, 40)
    weight = torch.randn(40, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    fusedlm.layer_norm(x, 40, weight, bias, backend="triton").sum().backward()
    out, _ = fusedlm.add_rms_norm(x, residual, 40, weight, backend="triton")
    out.sum().backward()

    q = torch.randn(1, 2, 17, 16, requires_grad=True)
    k = torch.randn(1, 1, 19, 16, requires_grad=True)
    v = torch.randn(1, 1, 19, 16, requires_grad=True)
    fusedlm.attention(q, k, v, causal=True, backend="triton").sum().backward()

    logits = torch.randn(5, 33, requires_grad=True)
    target = torch.randint(0, 33, (5,))
    fusedlm.cross_entropy(logits, target, backend="triton").backward()

    gate = torch.randn(4, 24, requires_grad=True)
    up = torch.randn(4, 24, requires_grad=True)
    fusedlm.swiglu(gate, up, backend="triton").sum().backward()

    xr = torch.randn(1, 2, 5, 8, requires_grad=True)
    angles = torch.randn(5, 4)
    fusedlm.rotary_embedding(xr, angles.cos(), angles.sin(), backend="triton").sum().backward()

    param = torch.nn.Parameter(torch.randn(10))
    param.grad = torch.randn(10)
    fusedlm.optim.AdamW([param], backend="triton").step()


def test_every_kernel_is_launched_with_the_launch_options(monkeypatch):
    launches: list[tuple[str, dict]] = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _run_every_op()

    assert {name for name, _ in launches} == _package_kernels()
    missing = sorted({name for name, kwargs in launches
                      if any(kwargs.get(k) != v for k, v in LAUNCH_OPTIONS.items())})
    assert not missing, f"launched without {LAUNCH_OPTIONS}: {missing}"
