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


# ---- forward(x, residual): the residual add fused in front ----------------------------------

# No CUDA C++ kernel for the fused add: on CUDA tensors the Triton one serves.
ADD_BACKENDS = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "cuda"]


@pytest.mark.parametrize("backend", ADD_BACKENDS)
@pytest.mark.parametrize(("ours_cls", "theirs_cls"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(
    ("affine", "bias"),
    [(True, True), (True, False), (False, False)],
    ids=["affine", "no_bias", "no_affine"],
)
@pytest.mark.parametrize("normalized_shape", [64, (4, 6)], ids=["n64", "n4x6"])
@pytest.mark.parametrize(("x_dtype", "dtype"),
                         [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.bfloat16, torch.bfloat16)], ids=["f32", "bf16-f32", "bf16"])
def test_module_with_residual_returns_y_and_h(dtype, x_dtype, normalized_shape, affine, bias,
                                              ours_cls, theirs_cls, backend):
    """module(x, residual) is (torch_module(x + residual), x + residual): h bit for bit, y and
    every gradient (x, residual, parameters; random gradients of y and h) by the rule. dtype:
    the residual's and the parameters' (a bfloat16 branch beside a float32 stream too)."""
    device = device_of(backend)
    kwargs = _ctor_kwargs(theirs_cls, affine, bias)
    theirs = theirs_cls(normalized_shape, eps=1e-5, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = ours_cls(normalized_shape, eps=1e-5, device=device, dtype=dtype, backend=backend,
                    **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    truth_module = theirs_cls(normalized_shape, eps=1e-5, device=device, dtype=torch.float64,
                              **kwargs)
    truth_module.load_state_dict(theirs.state_dict(), strict=True)
    shape = (3, 5) + ((normalized_shape,) if isinstance(normalized_shape, int)
                      else normalized_shape)
    x = torch.randn(shape, device=device).to(x_dtype)
    residual = torch.randn(shape, device=device, dtype=dtype)
    grads = [torch.randn(shape, device=device, dtype=dtype) for _ in range(2)]
    runs = []
    for module, cast in ((ours, None), (theirs, None), (truth_module, torch.float64)):
        xi = x.to(cast or x.dtype).requires_grad_(True)
        ri = residual.to(cast or residual.dtype).requires_grad_(True)
        if module is ours:
            y, h = module(xi, ri)
        else:
            h = xi + ri
            y = module(h)
        params = list(module.parameters())
        g = torch.autograd.grad((y, h), [xi, ri, *params], [t.to(y.dtype) for t in grads])
        runs.append((y, h, *g))
    (y, h, *_), (y_torch, h_torch, *_) = runs[:2]
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == shape
    assert torch.equal(h, h_torch)
    names = ["y", "h", "dx", "dresidual"] + [f"d{n}" for n, _ in ours.named_parameters()]
    for name, out, out_torch, truth in zip(names, *runs, strict=True):
        assert out.dtype == out_torch.dtype, name
        assert_close_rule(out, out_torch, truth, name=name)


@pytest.mark.parametrize("backend", ADD_BACKENDS)
@pytest.mark.parametrize(("ours_cls", "theirs_cls"), PAIRS, ids=PAIR_IDS)
def test_module_without_residual_is_unchanged(ours_cls, theirs_cls, backend):
    """forward(x) and forward(x, None) return the norm of x alone, a tensor, as before."""
    device = device_of(backend)
    ours = ours_cls(16, device=device, backend=backend)
    theirs = theirs_cls(16, device=device)
    x = torch.randn(4, 16, device=device)
    for y in (ours(x), ours(x, None), ours(x, residual=None)):
        assert isinstance(y, torch.Tensor)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-6)
    y, h = ours(x, torch.zeros_like(x))
    assert torch.equal(h, x)
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("ours_cls", "theirs_cls"), PAIRS, ids=PAIR_IDS)
def test_module_with_residual_runs_the_fused_op(ours_cls, theirs_cls):
    from fusedlm.backends import OpDispatch

    op = "add_layer_norm" if ours_cls is fusedlm.nn.LayerNorm else "add_rms_norm"
    ours = ours_cls(16, backend="torch")
    OpDispatch.last_choice.clear()
    x = torch.randn(4, 16, requires_grad=True)
    y, h = ours(x, torch.randn(4, 16))
    (y.sum() + h.sum()).backward()
    assert OpDispatch.last_choice == {f"{op}_fwd": "torch", f"{op}_bwd": "torch"}
