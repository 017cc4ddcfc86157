"""fusedlm.nn.MultiheadAttention against torch.nn.MultiheadAttention holding the same
parameters: outputs and gradients by DESIGN.md's rule (truth: torch's module in float64), and
the calls it hands back to torch's forward (need_weights, bias_k, unbatched), and attention
dropout in training, which runs in our kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import (
    assert_close_rule,
    attention_refusal,
    available_backends,
    device_of,
    needs_cpu_backend,
)
from tests.test_fuzz import fuzz  # noqa: F401, F811  (the fixture)

BACKENDS = available_backends()
E, HEADS = 24, 4


def _modules(backend, dtype, device, **kwargs):
    """(fusedlm module in dtype, torch module in dtype, torch module in float64)."""
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(E, HEADS, **kwargs)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = fusedlm.nn.MultiheadAttention.from_torch(copy.deepcopy(reference), backend)
    return (fused.to(device, dtype), copy.deepcopy(reference).to(device, dtype),
            copy.deepcopy(reference).to(device, torch.float64))


def _inputs(kind, batch_first, N, L, S, kdim=E, vdim=E):
    def shaped(T, width):
        x = torch.randn(N, T, width, dtype=torch.float64)
        return x if batch_first else x.transpose(0, 1)

    query = shaped(L, E)
    if kind == "self":
        return query, query, query
    return query, shaped(S, kdim), shaped(S, vdim)


def _masks(mask_kind, N, L, S, dtype):
    """(attn_mask, key_padding_mask, is_causal) for one mask case."""
    hidden_future = torch.ones(L, S, dtype=torch.bool).triu(1 + S - L)  # True: hidden
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[-1, :2] = True  # left padding of the last row
    if mask_kind == "none":
        return None, None, False
    if mask_kind == "causal_hint":
        return torch.ones(L, S, dtype=torch.bool).triu(1), None, True
    if mask_kind == "bool_attn":
        return hidden_future, None, False
    if mask_kind == "bool_padding":
        return None, padding, False
    if mask_kind == "both_bool":
        return hidden_future, padding, False
    if mask_kind == "float_padding":
        return None, torch.zeros(N, S).masked_fill(padding, float("-inf")).to(dtype), False
    if mask_kind == "float_bias":  # not a run of keys: the drop-in hands it to torch's SDPA
        return torch.randn(L, S, dtype=dtype), padding, False
    raise ValueError(mask_kind)


def _run(module, inputs, dtype, device, attn_mask, key_padding_mask, is_causal, **kwargs):
    params = next(module.parameters()).dtype
    xs = []
    for x in inputs:
        if xs and x is inputs[0]:
            xs.append(xs[0])  # self-attention: the same tensor object, as callers pass it
            continue
        xs.append(x.detach().to(device, params, copy=True).requires_grad_())
    masks = [None if m is None else m.to(device, params if m.is_floating_point() else m.dtype)
             for m in (attn_mask, key_padding_mask)]
    out, weights = module(*xs, key_padding_mask=masks[1], attn_mask=masks[0],
                          is_causal=is_causal, **kwargs)
    return out, weights, xs


def _check(fused, same, truth, inputs, dtype, device, mask_kind, N, L, S, need_weights=False):
    attn_mask, key_padding_mask, is_causal = _masks(mask_kind, N, L, S, dtype)
    results = [_run(m, inputs, dtype, device, attn_mask, key_padding_mask, is_causal,
                    need_weights=need_weights) for m in (fused, same, truth)]
    outs = [r[0] for r in results]
    assert_close_rule(outs[0], outs[1], outs[2], name=f"{mask_kind} output")
    grad = torch.randn(outs[2].shape, dtype=torch.float64, device=device)
    for out in outs:
        out.backward(grad.to(out.dtype))
    for i in range(len(inputs)):
        if i and inputs[i] is inputs[0]:
            continue
        assert_close_rule(*(r[2][i].grad for r in results), name=f"{mask_kind} input {i} grad")
    named = [dict(m.named_parameters()) for m in (fused, same, truth)]
    for name, p in named[0].items():
        assert_close_rule(p.grad, named[1][name].grad, named[2][name].grad,
                          name=f"{mask_kind} {name}.grad")
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "causal_hint", "bool_attn", "bool_padding",
                                       "both_bool", "float_padding", "float_bias"])
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_fused_path_matches_torch(batch_first, kind, mask_kind, dtype, backend):
    if attention_refusal(backend, dtype):
        pytest.skip(attention_refusal(backend, dtype))
    device = device_of(backend)
    N, L = 3, 9
    S = L if kind == "self" or mask_kind == "causal_hint" else 13
    fused, same, truth = _modules(backend, dtype, device, batch_first=batch_first)
    inputs = _inputs(kind, batch_first, N, L, S)
    OpDispatch.last_choice.clear()
    _check(fused, same, truth, inputs, dtype, device, mask_kind, N, L, S)
    if mask_kind != "float_bias":  # the rest are runs of keys: our kernels
        assert OpDispatch.last_choice["attention_fwd"] == backend


@needs_cpu_backend
@pytest.mark.parametrize("bias", [True, False])
def test_separate_projection_weights(bias):
    """kdim/vdim != embed_dim: q/k/v_proj_weight instead of one in_proj_weight."""
    fused, same, truth = _modules("cpu", torch.float32, "cpu", kdim=10, vdim=7, bias=bias,
                                  batch_first=True)
    assert not fused._qkv_same_embed_dim
    inputs = _inputs("cross", True, 2, 5, 11, kdim=10, vdim=7)
    OpDispatch.last_choice.clear()
    _check(fused, same, truth, inputs, torch.float32, "cpu", "bool_padding", 2, 5, 11)
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"


@pytest.mark.parametrize("case", ["need_weights", "bias_kv", "zero_attn", "unbatched",
                                  "per_head_mask"])
def test_calls_the_fused_path_cannot_take_run_torchs_forward(case):
    kwargs = {"batch_first": True}
    if case == "bias_kv":
        kwargs["add_bias_kv"] = True
    if case == "zero_attn":
        kwargs["add_zero_attn"] = True
    fused, same, _ = _modules("cpu", torch.float32, "cpu", **kwargs)
    x = torch.randn(2, 6, E)
    call = {"need_weights": case == "need_weights"}
    if case == "unbatched":
        x = x[0]
    if case == "per_head_mask":
        call["attn_mask"] = torch.rand(2 * HEADS, 6, 6) > 0.3
        call["attn_mask"][..., 0] = False  # every query sees key 0
    OpDispatch.last_choice.clear()
    torch.manual_seed(1)
    out, weights = fused(x, x, x, **call)
    torch.manual_seed(1)
    want, want_weights = same(x, x, x, **call)
    assert "attention_fwd" not in OpDispatch.last_choice
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    if case == "need_weights":
        torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


@needs_cpu_backend
@pytest.mark.parametrize("masks", ["none", "padding"])
def test_attention_dropout_in_training_runs_our_kernels(masks):
    """In train() with dropout > 0 (nn.TransformerEncoderLayer's default 0.1) the call stays on
    our kernels, dropping by the Philox mask: with the generator seeded alike, backend "cpu"
    gives the torch reference backend's output and gradients, eval() drops nothing, and
    successive training calls drop differently."""
    x = torch.randn(2, 6, E)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    call = {"need_weights": False,
            "key_padding_mask": padding if masks == "padding" else None}
    results = []
    for backend in ("cpu", "torch"):
        fused, _, _ = _modules(backend, torch.float32, "cpu", batch_first=True, dropout=0.3)
        fused.train()
        OpDispatch.last_choice.clear()
        torch.manual_seed(1)
        out = fused(x, x, x, **call)[0]
        assert OpDispatch.last_choice["attention_fwd"] == backend
        grads = torch.autograd.grad(out.square().sum(), list(fused.parameters()))
        results.append((out, grads, fused))
    (out, grads, fused), (out_ref, grads_ref, _) = results
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
    with torch.no_grad():
        again = fused(x, x, x, **call)[0]
        fused.eval()
        plain = fused(x, x, x, **call)[0]
    assert not torch.equal(again, out.detach())
    assert not torch.allclose(plain, out.detach())
    torch.testing.assert_close(plain, torch.nn.MultiheadAttention.forward(fused, x, x, x,
                                                                          **call)[0])


@needs_cpu_backend
def test_state_dict_and_module_api_are_torchs():
    torch_module = torch.nn.MultiheadAttention(E, HEADS, batch_first=True)
    fused = fusedlm.nn.MultiheadAttention(E, HEADS, batch_first=True, backend="cpu")
    assert isinstance(fused, torch.nn.MultiheadAttention)
    fused.load_state_dict(torch_module.state_dict())
    assert list(fused.state_dict()) == list(torch_module.state_dict())
    shared = fusedlm.nn.MultiheadAttention.from_torch(torch_module, "cpu")
    assert shared.in_proj_weight is torch_module.in_proj_weight
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        out, weights = shared(x, x, x, need_weights=False)
        want = torch_module(x, x, x, need_weights=False)[0]
    assert weights is None
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def _count_inspections(monkeypatch) -> list:
    import importlib

    attention_ops = importlib.import_module("fusedlm.ops.attention")  # the module, not the op
    inspections = []
    layout_of = attention_ops._layout_of
    monkeypatch.setattr(attention_ops, "_layout_of",
                        lambda *a: inspections.append(1) or layout_of(*a))
    return inspections


@needs_cpu_backend
def test_encoder_layers_share_one_mask_inspection(monkeypatch):
    """nn.TransformerEncoder converts the key padding mask once per forward and hands each
    layer that tensor: the merged mask is built and inspected on the host once per forward,
    not once per layer."""
    inspections = _count_inspections(monkeypatch)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    same = copy.deepcopy(encoder)
    report = fusedlm.patch(encoder, attention=True)
    assert sum("self_attn" in s.name for s in report.swapped) == 3, report
    x = torch.randn(2, 6, E)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    with torch.no_grad():
        for step in range(1, 3):
            OpDispatch.last_choice.clear()
            torch.testing.assert_close(encoder(x, src_key_padding_mask=padding),
                                       same(x, src_key_padding_mask=padding),
                                       rtol=1e-5, atol=1e-5)
            assert OpDispatch.last_choice["attention_fwd"] == "cpu"
            assert len(inspections) == step
    from fusedlm.nn import multihead_attention

    # The encoder's float copy of the mask is freed after each forward, and with it the merge.
    assert multihead_attention._merged_masks == []


@needs_cpu_backend
def test_a_modified_mask_is_merged_again(monkeypatch):
    inspections = _count_inspections(monkeypatch)
    fused, same, _ = _modules("cpu", torch.float32, "cpu", batch_first=True)
    x = torch.randn(2, 6, E)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True

    def check(mask):
        with torch.no_grad():
            torch.testing.assert_close(
                fused(x, x, x, key_padding_mask=mask, need_weights=False)[0],
                same(x, x, x, key_padding_mask=mask, need_weights=False)[0],
                rtol=1e-5, atol=1e-5)

    check(padding)
    check(padding)  # the same tensor, unmodified: no new inspection
    assert len(inspections) == 1
    padding[1, :2] = True  # modified in place (left padding of row 1): merged and inspected again
    check(padding)
    assert len(inspections) == 2
    padding = padding.clone()  # a new tensor with the same values
    check(padding)
    assert len(inspections) == 3
    from fusedlm.nn import multihead_attention

    del padding  # the cache holds no merged mask past its inputs
    assert multihead_attention._merged_masks == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_multihead_attention(backend, fuzz):  # noqa: F811
    """Drawn modules (heads, head dim, kdim/vdim, bias, batch_first) and calls (self or cross,
    lengths, need_weights, is_causal, boolean / float / random masks with fully hidden rows,
    key padding with gaps) against torch's module with the same parameters, in the call's
    dtype and in float64 (outputs and input gradients)."""
    device = device_of(backend)
    routes = {"fused": 0, "torch": 0}

    @fuzz(40 if backend in ("cpu", "torch") else 15)  # GPU: Triton compiles per shape
    @given(data=st.data())
    def run(data):
        dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.float16]))
        if attention_refusal(backend, dtype):
            dtype = torch.float16 if backend == "cuda" else torch.float32
        heads = data.draw(st.integers(1, 4))
        head_dim = data.draw(st.sampled_from([1, 3, 8, 16]))
        embed = heads * head_dim
        kdim, vdim = (data.draw(st.sampled_from([embed, 5])) for _ in range(2))
        kwargs = dict(bias=data.draw(st.booleans()), batch_first=data.draw(st.booleans()),
                      kdim=kdim, vdim=vdim)
        torch.manual_seed(data.draw(st.integers(0, 2**16)))
        reference = torch.nn.MultiheadAttention(embed, heads, **kwargs)
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        modules = (fusedlm.nn.MultiheadAttention.from_torch(copy.deepcopy(reference), backend),
                   copy.deepcopy(reference), copy.deepcopy(reference))
        modules = [m.to(device, d) for m, d in zip(modules, (dtype, dtype, torch.float64),
                                                   strict=True)]
        N = data.draw(st.integers(1, 3))
        self_attention = kdim == vdim == embed and data.draw(st.booleans())
        L = data.draw(st.sampled_from([1, 2, 5, 17]))
        S = L if self_attention else data.draw(st.sampled_from([1, 3, 5, 17]))
        call = {"need_weights": data.draw(st.booleans())}
        kind = data.draw(st.sampled_from(["none", "causal", "bool", "float", "hint"]))
        if kind == "hint":  # is_causal with the causal mask it stands for (L == S)
            S = L if self_attention else S
            if L == S:
                call["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
                call["is_causal"] = True
        elif kind == "causal":
            call["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1 + S - L)
        elif kind == "bool":
            call["attn_mask"] = torch.rand(L, S) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
        elif kind == "float":
            hidden = torch.rand(L, S) < data.draw(st.sampled_from([0.0, 0.3]))
            values = torch.randn(L, S) if data.draw(st.booleans()) else torch.zeros(L, S)
            call["attn_mask"] = values.masked_fill(hidden, float("-inf"))
        padding = data.draw(st.sampled_from(["none", "left", "right", "gaps", "float"]))
        if padding != "none":
            hide = torch.zeros(N, S, dtype=torch.bool)
            cut = data.draw(st.integers(0, S))
            if padding == "left":
                hide[-1, :cut] = True
            elif padding == "right":
                hide[-1, cut:] = True
            else:
                hide = torch.rand(N, S) < 0.3
            call["key_padding_mask"] = (hide if padding != "float" else
                                        torch.zeros(N, S).masked_fill(hide, float("-inf")))

        def shaped(T, width):
            x = torch.randn(N, T, width, dtype=torch.float64)
            return x if kwargs["batch_first"] else x.transpose(0, 1)

        query = shaped(L, embed)
        key, value = (query, query) if self_attention else (shaped(S, kdim), shaped(S, vdim))
        outs, grads = [], []
        OpDispatch.last_choice.clear()
        for module in modules:
            d = next(module.parameters()).dtype
            q = query.detach().to(device, d, copy=True).requires_grad_()
            k, v = ((q, q) if self_attention else
                    (key.to(device, d, copy=True), value.to(device, d, copy=True)))
            masks = {name: call[name].to(device, d if call[name].is_floating_point() else None)
                     for name in ("attn_mask", "key_padding_mask") if name in call}
            out = module(q, k, v, **{**call, **masks})[0]
            out.backward(torch.ones_like(out))
            outs.append(out)
            grads.append(q.grad)
        assert_close_rule(outs[0], outs[1], outs[2], name="output")
        assert_close_rule(grads[0], grads[1], grads[2], name="query grad")
        fused = OpDispatch.last_choice.get("attention_fwd") == backend
        routes["fused" if fused else "torch"] += 1

    run()
    assert routes["fused"] and routes["torch"], routes  # the draws reach both paths
