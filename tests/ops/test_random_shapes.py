"""Property tests: random shapes, strides and dtypes drawn by hypothesis, every available
backend against the float64 truth (DESIGN.md's rule). Derandomized and bounded so CI is
repeatable and fast; `HYPOTHESIS_PROFILE=long` draws many more examples."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedlm
from tests.helpers import assert_close_rule, available_backends, naive_attention

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = available_backends()
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])


def _maybe_transposed(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The same values in a non-contiguous layout when ``transposed``."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if transposed and t.dim() >= 2 else t


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    rows=st.integers(1, 40), hidden=st.integers(1, 700), dtype=DTYPES,
    affine=st.booleans(), transposed=st.booleans(), rms=st.booleans(),
)
def test_norm_random_shapes(backend, rows, hidden, dtype, affine, transposed, rms):
    x = _maybe_transposed(torch.randn(rows, hidden, dtype=dtype), transposed).requires_grad_()
    weight = torch.randn(hidden, dtype=dtype, requires_grad=True) if affine else None
    bias = torch.randn(hidden, dtype=dtype, requires_grad=True) if affine and not rms else None
    grad = torch.randn(rows, hidden, dtype=dtype)
    leaves = [t for t in (x, weight, bias) if t is not None]

    def run(fn, cast):
        args = [cast(t).detach().requires_grad_() for t in leaves]
        xs, ws = args[0], args[1] if affine else None
        bs = args[2] if bias is not None else None
        if rms:
            out = fn["rms"](xs, (hidden,), ws, 1e-6)
        else:
            out = fn["ln"](xs, (hidden,), ws, bs, 1e-5)
        out.backward(cast(grad))
        return [out] + [a.grad for a in args]

    ours = run({"rms": lambda *a: fusedlm.rms_norm(*a, backend=backend),
                "ln": lambda *a: fusedlm.layer_norm(*a, backend=backend)}, lambda t: t)
    torch_fns = {"rms": F.rms_norm, "ln": F.layer_norm}
    truth = run(torch_fns, lambda t: t.double())
    same = run(torch_fns, lambda t: t)
    for name, o, s, t in zip(["y", "dx", "dweight", "dbias"], ours, same, truth):
        assert_close_rule(o, s, t, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 3), group=st.integers(1, 3),
    Tq=st.integers(1, 80), Tk=st.integers(1, 80), D=st.integers(1, 72),
    causal=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
    transposed=st.booleans(),
)
def test_attention_random_shapes(backend, B, Hkv, group, Tq, Tk, D, causal, dtype, transposed):
    Hq = Hkv * group

    def make(H, T):
        t = torch.randn(B, T, H, D, dtype=dtype)  # (B, T, H, D) storage viewed as (B, H, T, D)
        return t.transpose(1, 2) if transposed else t.transpose(1, 2).contiguous()

    q, k, v = make(Hq, Tq), make(Hkv, Tk), make(Hkv, Tk)
    grad = torch.randn(B, Hq, Tq, D, dtype=dtype)

    def run(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(cast(grad))
        return [out] + [t.grad for t in leaves]

    ours = run(lambda *a: fusedlm.attention(*a, causal=causal, backend=backend), lambda t: t)
    truth = run(lambda *a: naive_attention(*a, causal=causal), lambda t: t.double())
    same = run(lambda *a: naive_attention(*a, causal=causal), lambda t: t)
    for name, o, s, t in zip(["out", "dq", "dk", "dv"], ours, same, truth):
        assert_close_rule(o, s, t, name=name)
