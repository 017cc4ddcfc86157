"""fusedlm.nn.SwiGLUMLP: Llama's MLP (down_proj(silu(gate_proj(x)) * up_proj(x))) with its
activation on fusedlm.swiglu: same results as the eager module by DESIGN.md's rule against
float64, Hugging Face LlamaMLP's state_dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import assert_close_rule, kernel_backends


def _eager(mlp, x):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (3, 17, 24)], ids=["one-row", "batch"])
def test_matches_the_eager_mlp(shape, bias, backend):
    torch.manual_seed(0)
    ours = fusedlm.nn.SwiGLUMLP(24, 37, bias=bias, backend=backend)
    truth = copy.deepcopy(ours).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    OpDispatch.last_choice.clear()
    out, torch_out, truth_out = ours(x32), _eager(ours, x32), _eager(truth, x)
    assert OpDispatch.last_choice["swiglu_fwd"] == backend
    assert_close_rule(out, torch_out, truth_out, name="output")
    grad = torch.randn(shape, dtype=torch.float64)
    ours_grads = torch.autograd.grad(out, [x32, *ours.parameters()], grad.float())
    torch_grads = torch.autograd.grad(torch_out, [x32, *ours.parameters()], grad.float())
    truth_grads = torch.autograd.grad(truth_out, [x, *truth.parameters()], grad)
    for name, a, b, t in zip(["x", *dict(ours.named_parameters())], ours_grads, torch_grads,
                             truth_grads, strict=True):
        assert_close_rule(a, b, t, name=name)


def test_state_dict_is_llamas():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4,
                                      num_key_value_heads=4, mlp_bias=False)
    from transformers.models.llama.modeling_llama import LlamaMLP

    theirs = LlamaMLP(config)
    ours = fusedlm.nn.SwiGLUMLP(24, 40)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        fusedlm.nn.SwiGLUMLP(4, 8, backend="gpu")
