"""fusedlm.nn.SwiGLUMLP and fusedlm.nn.GeGLUMLP: Llama's MLP
(down_proj(silu(gate_proj(x)) * up_proj(x))) and Gemma's (gelu, tanh-approximated by default) with
their activation on fusedlm.swiglu / fusedlm.geglu: same results as the eager module by
DESIGN.md's rule against float64, Hugging Face LlamaMLP's / GemmaMLP's state_dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import assert_close_rule, kernel_backends

# (class, constructor keywords, eager activation)
MLPS = {
    "swiglu": (fusedlm.nn.SwiGLUMLP, {}, F.silu),
    "geglu_tanh": (fusedlm.nn.GeGLUMLP, {}, lambda g: F.gelu(g, approximate="tanh")),
    "geglu_exact": (fusedlm.nn.GeGLUMLP, {"approximate": "none"}, F.gelu),
}


def _eager(mlp, x, act):
    return mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))


@pytest.mark.parametrize("backend", [*kernel_backends(), "torch"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (3, 17, 24)], ids=["one-row", "batch"])
@pytest.mark.parametrize("kind", list(MLPS))
def test_matches_the_eager_mlp(kind, shape, bias, backend):
    cls, kwargs, act = MLPS[kind]
    torch.manual_seed(0)
    ours = cls(24, 37, bias=bias, backend=backend, **kwargs)
    truth = copy.deepcopy(ours).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    OpDispatch.last_choice.clear()
    out, torch_out, truth_out = ours(x32), _eager(ours, x32, act), _eager(truth, x, act)
    assert OpDispatch.last_choice["glu_fwd"] == backend
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


def test_state_dict_and_default_activation_are_gemmas():
    """A Hugging Face GemmaMLP's state_dict loads as is, and the default approximate ("tanh")
    is Gemma's gelu_pytorch_tanh: the same outputs and gradients (an exact-gelu GeGLUMLP
    differs by more than the float32 rounding)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    config = transformers.GemmaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=8)
    assert config.hidden_act == "gelu_pytorch_tanh"
    theirs = GemmaMLP(config)
    ours = fusedlm.nn.GeGLUMLP(24, 40)
    assert ours.approximate == "tanh" and "approximate='tanh'" in repr(ours)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = 3 * torch.randn(2, 5, 24)
    out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), list(ours.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(theirs.parameters()))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    exact = fusedlm.nn.GeGLUMLP(24, 40, approximate="none")
    exact.load_state_dict(theirs.state_dict())
    assert (exact(x) - expected).abs().max() > 1e-4


def test_geglu_mlp_arguments():
    mlp = fusedlm.nn.GeGLUMLP(8, 12, True, "none", dtype=torch.float64)
    assert mlp.approximate == "none" and mlp.gate_proj.bias is not None
    assert mlp.down_proj.weight.dtype == torch.float64 and mlp.down_proj.weight.shape == (8, 12)
    assert isinstance(mlp, torch.nn.Module) and not isinstance(mlp, fusedlm.nn.SwiGLUMLP)


@pytest.mark.parametrize("cls", [fusedlm.nn.SwiGLUMLP, fusedlm.nn.GeGLUMLP])
def test_bad_backend(cls):
    with pytest.raises(ValueError, match="backend"):
        cls(4, 8, backend="gpu")
