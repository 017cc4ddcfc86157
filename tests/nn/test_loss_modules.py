"""fusedlm.nn.CrossEntropyLoss against torch.nn.CrossEntropyLoss: same constructor, state_dict
and results (DESIGN.md's rule against float64), and the kernels run where they can."""

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
