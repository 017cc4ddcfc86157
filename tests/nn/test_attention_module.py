"""fusedlm.nn.CausalSelfAttention against the same computation written with torch
(F.linear + F.scaled_dot_product_attention(is_causal=True))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from tests.helpers import assert_close_rule, attention_refusal, available_backends, device_of

BACKENDS = available_backends()


def _torch_attention_block(module, x):
    B, T, C = x.shape
    H, Hkv, D = module.n_head, module.n_kv_head, module.head_dim
    w, b = module.c_attn.weight.to(x.dtype), module.c_attn.bias
    qkv = F.linear(x, w, None if b is None else b.to(x.dtype))
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    if module.sliding_window is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
    else:  # position t sees t - W + 1 .. t
        visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        visible = visible.triu(1 - module.sliding_window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=Hkv != H)
    wp, bp = module.c_proj.weight.to(x.dtype), module.c_proj.bias
    return F.linear(y.transpose(1, 2).reshape(B, T, C), wp, None if bp is None else bp.to(x.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("n_embd", "n_head", "n_kv_head", "bias"),
    [(64, 4, None, True), (96, 6, 2, False), (48, 4, 1, True), (40, 1, None, True)],
    ids=["mha", "gqa", "mqa", "one_head"],
)
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("T", [1, 17, 70])
def test_causal_self_attention_matches_torch(T, window, n_embd, n_head, n_kv_head, bias, dtype,
                                             backend):
    reason = attention_refusal(backend, dtype)
    if reason is not None:
        pytest.skip(reason)
    device = device_of(backend)
    module = fusedlm.nn.CausalSelfAttention(
        n_embd, n_head, n_kv_head, bias=bias, device=device, dtype=dtype, backend=backend,
        sliding_window=window,
    )
    x = torch.randn(2, T, n_embd, device=device, dtype=dtype, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape and y.dtype == dtype
    grad = torch.randn_like(y)
    params = list(module.parameters())
    ours = torch.autograd.grad(y, [x, *params], grad)

    y_torch = _torch_attention_block(module, x)
    theirs = torch.autograd.grad(y_torch, [x, *params], grad)
    x64 = x.detach().double().requires_grad_(True)
    module64 = fusedlm.nn.CausalSelfAttention(
        n_embd, n_head, n_kv_head, bias=bias, device=device, dtype=torch.float64,
        sliding_window=window,
    )
    module64.load_state_dict(module.state_dict())
    params64 = list(module64.parameters())
    y_truth = _torch_attention_block(module64, x64)
    truth = torch.autograd.grad(y_truth, [x64, *params64], grad.double())

    assert_close_rule(y, y_torch, y_truth, name="y")
    names = ["dx"] + [f"d{n}" for n, _ in module.named_parameters()]
    for name, g, gt, g64 in zip(names, ours, theirs, truth, strict=True):
        assert_close_rule(g, gt, g64, name=name)


def test_causal_self_attention_is_causal():
    """Changing a later token does not change earlier outputs."""
    module = fusedlm.nn.CausalSelfAttention(32, 4)
    x = torch.randn(1, 10, 32)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 32)
    y, y2 = module(x), module(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6], rtol=0, atol=0)
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_causal_self_attention_keeps_packed_documents_apart():
    """key_range from document ids: a document's outputs depend on its own tokens only."""
    module = fusedlm.nn.CausalSelfAttention(32, 4, 2)
    x = torch.randn(2, 12, 32)
    ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    ranges = fusedlm.key_range_from_document_ids(ids)
    x2 = x.clone()
    x2[0, :5] = torch.randn(5, 32)  # the first document of row 0 rewritten
    y, y2 = module(x, ranges), module(x2, ranges)
    torch.testing.assert_close(y[0, 5:], y2[0, 5:], rtol=0, atol=0)
    torch.testing.assert_close(y[1], y2[1], rtol=0, atol=0)
    torch.testing.assert_close(y[0, 5:], module(x[:1, 5:])[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(module(x)[0, 5:], y[0, 5:])


@pytest.mark.parametrize(
    ("args", "match"), [((30, 4), "n_embd"), ((32, 4, 3), "n_kv_head"), ((32, 4, 0), "n_kv_head")]
)
def test_causal_self_attention_bad_config(args, match):
    with pytest.raises(ValueError, match=match):
        fusedlm.nn.CausalSelfAttention(*args)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_causal_self_attention_bad_sliding_window(window):
    with pytest.raises(ValueError, match="'sliding_window'"):
        fusedlm.nn.CausalSelfAttention(32, 4, sliding_window=window)
