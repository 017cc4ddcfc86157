"""fusedlm.nn.CrossEntropyLoss against torch.nn.CrossEntropyLoss: same constructor, state_dict
and results (DESIGN.md's rule against float64), and the kernels run where they can; and
fusedlm.nn.LinearCrossEntropyLoss against torch's loss of the head's logits."""

from __future__ import annotations

import pytest
import torch

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import assert_close_rule, kernel_backends

KWARGS = [
    {},
    {"ignore_index": -1, "label_smoothing": 0.1},
    {"reduction": "sum"},
    {"reduction": "none", "ignore_index": 2},
]


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_matches_torchs_module(kwargs, backend):
    ours = fusedlm.nn.CrossEntropyLoss(**kwargs, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(**kwargs)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    logits = (3 * torch.randn(23, 37, dtype=torch.float64)).float()
    target = torch.randint(0, 37, (23,))
    target[::5] = kwargs.get("ignore_index", -100)
    OpDispatch.last_choice.pop("cross_entropy_fwd", None)
    x, xt = (logits.clone().requires_grad_() for _ in range(2))
    x64 = logits.double().requires_grad_()
    out, base, truth = ours(x, target), theirs(xt, target), theirs(x64, target)
    assert OpDispatch.last_choice["cross_entropy_fwd"] == backend
    assert_close_rule(out, base, truth, name="loss")
    for o in (out, base, truth):
        o.sum().backward()
    assert_close_rule(x.grad, xt.grad, x64.grad, name="dlogits")


def test_class_weights_run_torchs_function_and_keep_the_buffer():
    weight = torch.rand(6)
    ours = fusedlm.nn.CrossEntropyLoss(weight=weight)
    theirs = torch.nn.CrossEntropyLoss(weight=weight)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    logits, target = torch.randn(9, 6), torch.randint(0, 6, (9,))
    assert torch.equal(ours(logits, target), theirs(logits, target))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_linear_cross_entropy_loss_is_the_head_and_torchs_loss(kwargs, backend):
    """fusedlm.nn.LinearCrossEntropyLoss(**kwargs)(hidden, weight, target, bias) is
    torch.nn.CrossEntropyLoss(**kwargs)(F.linear(hidden, weight, bias), target), gradients
    included, with a head that lives in the model (a tied embedding here): the module holds no
    parameters of its own."""
    criterion = fusedlm.nn.LinearCrossEntropyLoss(**kwargs, chunk_size=5, backend=backend)
    assert dict(criterion.state_dict()) == {} and not list(criterion.parameters())
    assert "chunk_size=5" in repr(criterion)
    embedding = torch.nn.Embedding(37, 12, dtype=torch.float64)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 11, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 37, (2, 11))
    target[:, ::4] = kwargs.get("ignore_index", -100)
    loss = criterion(hidden, embedding.weight, target, bias)
    expected = torch.nn.CrossEntropyLoss(**kwargs)(
        torch.nn.functional.linear(hidden, embedding.weight, bias).transpose(1, 2), target)
    torch.testing.assert_close(loss, expected)
    grad = torch.randn_like(expected)
    leaves = (hidden, embedding.weight, bias)
    for ours, theirs in zip(torch.autograd.grad(loss, leaves, grad),
                            torch.autograd.grad(expected, leaves, grad), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_linear_cross_entropy_loss_softcap():
    """softcap=30 (Gemma 2): the loss of 30 * tanh(logits / 30), gradients included."""
    criterion = fusedlm.nn.LinearCrossEntropyLoss(chunk_size=4, softcap=30.0)
    assert "softcap=30.0" in repr(criterion)
    hidden = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(21, 8, dtype=torch.float64) * 10).requires_grad_(True)
    target = torch.randint(0, 21, (9,))
    loss = criterion(hidden, weight, target)
    logits = torch.nn.functional.linear(hidden, weight)
    expected = torch.nn.functional.cross_entropy(torch.tanh(logits / 30.0) * 30.0, target)
    torch.testing.assert_close(loss, expected)
    for ours, theirs in zip(torch.autograd.grad(loss, (hidden, weight)),
                            torch.autograd.grad(expected, (hidden, weight)), strict=True):
        torch.testing.assert_close(ours, theirs)
