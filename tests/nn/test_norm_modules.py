"""fusedlm.nn.LayerNorm / RMSNorm are drop-ins for torch.nn.LayerNorm / RMSNorm."""

from __future__ import annotations

import inspect

import pytest
import torch

import fusedlm
from tests.helpers import assert_close_rule, available_backends, device_of

BACKENDS = available_backends()

PAIRS = [(fusedlm.nn.LayerNorm, torch.nn.LayerNorm), (fusedlm.nn.RMSNorm, torch.nn.RMSNorm)]
PAIR_IDS = ["LayerNorm", "RMSNorm"]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=PAIR_IDS)
def test_constructor_arguments_are_torchs(ours, theirs):
    ours_params = inspect.signature(ours.__init__).parameters
    theirs_params = inspect.signature(theirs.__init__).parameters
    assert list(ours_params)[: len(theirs_params)] == list(theirs_params)
    assert list(ours_params)[len(theirs_params) :] == ["backend"]
    for name, param in theirs_params.items():
        assert ours_params[name].default == param.default, name


def _ctor_kwargs(theirs, affine, bias):
    kwargs = {"elementwise_affine": affine}
    if theirs is torch.nn.LayerNorm:
        kwargs["bias"] = bias
    return kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("ours_cls", "theirs_cls"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(
    ("affine", "bias"),
    [(True, True), (True, False), (False, False)],
    ids=["affine", "no_bias", "no_affine"],
)
@pytest.mark.parametrize("normalized_shape", [64, (4, 6)], ids=["n64", "n4x6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_matches_torch(dtype, normalized_shape, affine, bias, ours_cls, theirs_cls, backend):
    device = device_of(backend)
    kwargs = _ctor_kwargs(theirs_cls, affine, bias)
    theirs = theirs_cls(normalized_shape, eps=1e-5, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():  # non-trivial parameters
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = ours_cls(
        normalized_shape, eps=1e-5, device=device, dtype=dtype, backend=backend, **kwargs
    )
    assert isinstance(ours, theirs_cls)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    truth_module = theirs_cls(
        normalized_shape, eps=1e-5, device=device, dtype=torch.float64, **kwargs
    )
    truth_module.load_state_dict(theirs.state_dict(), strict=True)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}

    shape = (3, 5) + (
        (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    )
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    runs = []
    for module, cast in ((ours, dtype), (theirs, dtype), (truth_module, torch.float64)):
        xi = x.to(cast).requires_grad_(True)
        y = module(xi)
        params = list(module.parameters())
        grads = torch.autograd.grad(y, [xi, *params], grad.to(cast))
        runs.append((y, *grads))
    names = ["y", "dx"] + [f"d{n}" for n, _ in ours.named_parameters()]
    for name, out, out_torch, truth in zip(names, *runs, strict=True):
        assert out.dtype == out_torch.dtype
        assert_close_rule(out, out_torch, truth, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_module_default_eps(backend):
    """eps=None: torch.finfo(x.dtype).eps, like torch.nn.RMSNorm."""
    device = device_of(backend)
    ours = fusedlm.nn.RMSNorm(4, device=device, backend=backend)
    theirs = torch.nn.RMSNorm(4, device=device)
    assert ours.eps is None and theirs.eps is None
    x = torch.full((2, 4), 1e-4, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("ours_cls", "theirs_cls"), PAIRS, ids=PAIR_IDS)
def test_from_torch_shares_parameters(ours_cls, theirs_cls):
    theirs = theirs_cls(16)
    ours = ours_cls.from_torch(theirs, backend="torch")
    assert isinstance(ours, ours_cls) and ours.backend == "torch"
    assert ours.weight is theirs.weight
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    # the two modules share tensors, not containers: rebinding one leaves the other alone
    ours.weight = torch.nn.Parameter(torch.zeros(16))
    assert theirs.weight is not ours.weight and theirs.weight.abs().sum() > 0


@pytest.mark.parametrize(("ours_cls", "theirs_cls"), PAIRS, ids=PAIR_IDS)
def test_module_repr_and_extra_state_like_torch(ours_cls, theirs_cls):
    ours, theirs = ours_cls(8), theirs_cls(8)
    assert ours.extra_repr() == theirs.extra_repr()
    theirs.load_state_dict(ours.state_dict(), strict=True)
