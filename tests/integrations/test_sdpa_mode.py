"""fusedlm.patch(model, attention=True) and FusedSDPAMode on plain PyTorch models that call
torch.nn.functional.scaled_dot_product_attention themselves (no transformers needed).

Truth is the unpatched model in float64, torch's own computation the unpatched float32 model;
the patched model must pass tests/helpers.assert_close_rule against them (DESIGN.md)."""

from __future__ import annotations

import copy
import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fusedlm
from fusedlm.backends import OpDispatch
from fusedlm.integrations import FusedSDPAMode, attention_calls
from fusedlm.integrations.sdpa_mode import ROUTING_KEY
from tests.helpers import (
    assert_close_rule,
    attention_refusal,
    available_backends,
    cpu_backend_available,
    cpu_unavailable_reason,
    device_of,
)

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

C, HEADS = 24, 3
BACKENDS = available_backends()


class SelfAttention(torch.nn.Module):
    """nanoGPT's attention, with ``kv_heads`` key/value heads (GQA/MQA through SDPA's
    ``enable_gqa``) and an optional mask passed through to SDPA."""

    def __init__(self, kv_heads: int = HEADS, checkpoint_core: str | None = None):
        super().__init__()
        self.kv_heads = kv_heads
        head_dim = C // HEADS
        self.qkv = torch.nn.Linear(C, C + 2 * kv_heads * head_dim)
        self.proj = torch.nn.Linear(C, C)
        # "non-reentrant" / "reentrant": the SDPA call checkpointed as a plain method (no
        # module of the model runs in its recomputation)
        self.checkpoint_core = checkpoint_core

    def forward(self, x, mask=None, causal=True):
        B, T, _ = x.shape
        head_dim = C // HEADS
        q, k, v = self.qkv(x).split([C, self.kv_heads * head_dim, self.kv_heads * head_dim], -1)
        q = q.view(B, T, HEADS, head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, head_dim).transpose(1, 2)
        if self.checkpoint_core and torch.is_grad_enabled():
            reentrant = self.checkpoint_core == "reentrant"
            y = checkpoint(self._core, q, k, v, mask, causal, use_reentrant=reentrant)
        else:
            y = self._core(q, k, v, mask, causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _core(self, q, k, v, mask, causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None,
                                              enable_gqa=self.kv_heads != HEADS)


class Block(torch.nn.Module):
    def __init__(self, kv_heads: int = HEADS, checkpoint_core: str | None = None):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(C), torch.nn.LayerNorm(C)
        self.attn = SelfAttention(kv_heads, checkpoint_core)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(C, 2 * C), torch.nn.GELU(),
                                       torch.nn.Linear(2 * C, C))

    def forward(self, x, mask=None, causal=True):
        x = x + self.attn(self.ln_1(x), mask, causal)
        return x + self.mlp(self.ln_2(x))


class TinyLM(torch.nn.Module):
    """Two blocks; ``checkpointing`` = None, "non-reentrant" or "reentrant"."""

    def __init__(self, kv_heads: int = HEADS, checkpointing: str | None = None,
                 checkpoint_core: str | None = None):
        super().__init__()
        self.embed = torch.nn.Linear(C, C)
        self.blocks = torch.nn.ModuleList([Block(kv_heads, checkpoint_core) for _ in range(2)])
        self.checkpointing = checkpointing

    def forward(self, x, mask=None, causal=True):
        x = self.embed(x)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                reentrant = self.checkpointing == "reentrant"
                x = checkpoint(block, x, mask, causal, use_reentrant=reentrant)
            else:
                x = block(x, mask, causal)
        return x


def _triple(model):
    """(patched float32, unpatched float32, unpatched float64) copies of ``model``."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fusedlm.patch(model, attention=True)
    return model, same, truth, report


def _forward_backward(models, x, **kwargs):
    outs, inputs = [], []
    grad = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    for model in models:
        xi = x.detach().to(next(model.parameters()).dtype, copy=True).requires_grad_()
        mask = kwargs.get("mask")
        call = dict(kwargs, mask=None if mask is None else _mask_like(mask, xi.dtype))
        out = model(xi, **call)
        out.backward(grad.to(out.dtype))
        outs.append(out)
        inputs.append(xi)
    return outs, inputs


def _mask_like(mask, dtype):
    return mask if mask.dtype == torch.bool else mask.to(dtype)


def _check_grads(models, outs, inputs, what):
    assert_close_rule(outs[0], outs[1], outs[2], name=f"{what} output")
    assert_close_rule(inputs[0].grad, inputs[1].grad, inputs[2].grad, name=f"{what} dx")
    named = [dict(m.named_parameters()) for m in models]
    for name, p in named[0].items():
        assert_close_rule(p.grad, named[1][name].grad, named[2][name].grad,
                          name=f"{what} {name}.grad")


def _padding_mask(B, T, kind):
    """A (B, 1, T, T) mask: causal with the first key of batch row 1 hidden (left padding)."""
    visible = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T).clone()
    visible[1, :, :, 0] = False
    visible[1, :, 0, 0] = True  # keep a key for query 0 (torch gives NaN for an empty row)
    if kind == "bool":
        return visible
    if kind == "float":
        return torch.zeros(B, 1, T, T).masked_fill(~visible, float("-inf"))
    bias = torch.randn(B, 1, T, T)  # an additive bias: not a run of keys, goes to torch
    return bias.masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("kv_heads", [HEADS, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "bias"])
def test_patched_model_matches_the_unpatched_one(kv_heads, mask_kind):
    model, same, truth, report = _triple(TinyLM(kv_heads))
    assert any("scaled_dot_product_attention" in note for note in report.notes), report
    B, T = 2, 11
    x = torch.randn(B, T, C, dtype=torch.float64)
    mask = None if mask_kind is None else _padding_mask(B, T, mask_kind)
    OpDispatch.last_choice.clear()
    outs, inputs = _forward_backward((model, same, truth), x, mask=mask)
    _check_grads((model, same, truth), outs, inputs, f"mask {mask_kind}")
    expected = {"torch": 2} if mask_kind == "bias" else {"fused": 2}
    assert attention_calls(model) == expected
    if mask_kind != "bias":
        assert OpDispatch.last_choice["attention_fwd"] == "cpu"
        assert OpDispatch.last_choice["attention_bwd"] == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_model_on_each_backend(dtype, backend):
    """patch(model, attention=True, backend=...) on the backend's device and a training dtype."""
    if attention_refusal(backend, dtype):
        pytest.skip(attention_refusal(backend, dtype))
    device = device_of(backend)
    torch.manual_seed(0)
    model = TinyLM(kv_heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    model, same, truth = model.to(device, dtype), same.to(device, dtype), truth.to(device)
    fusedlm.patch(model, attention=True, backend=backend)
    x = torch.randn(2, 70, C, dtype=torch.float64, device=device)
    for step in range(2):
        for m in (model, same, truth):
            m.zero_grad()
        OpDispatch.last_choice.clear()
        outs, inputs = _forward_backward((model, same, truth), x)
        _check_grads((model, same, truth), outs, inputs, f"{backend} {dtype} step {step}")
        assert OpDispatch.last_choice["attention_fwd"] == backend
        assert OpDispatch.last_choice["attention_bwd"] == backend
    assert attention_calls(model) == {"fused": 4}


def test_discovery_keeps_hooks_on_the_attention_modules_only():
    model, same, *_ = _triple(TinyLM())
    x = torch.randn(2, 5, C)
    routing = model.__dict__[ROUTING_KEY]
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    assert len(hooked) == len(list(model.modules()))  # discovering: every module
    with torch.no_grad():
        model(x)
        assert routing.targets is None  # moves at the start of the next call
        for _ in range(2):
            torch.testing.assert_close(model(x), same(x), rtol=1e-5, atol=1e-6)
    attention = [block.attn for block in model.blocks]
    assert routing.targets == attention
    hooked = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked == attention
    assert attention_calls(model) == {"fused": 6}
    assert torch._C._len_torch_function_stack() == 0



def test_a_submodule_called_first_does_not_end_discovery():
    """A block run alone before the model (an encoder run by itself, a probe, a unit test of one
    layer) routes its own call but does not end discovery: the model's first call still finds
    every attention module (before, only the first block's kept the routing)."""
    model, same, *_ = _triple(TinyLM())
    x = torch.randn(2, 5, C)
    routing = model.__dict__[ROUTING_KEY]
    with torch.no_grad():
        model.blocks[0](model.embed(x))
        assert attention_calls(model) == {"fused": 1}
        for _ in range(3):
            torch.testing.assert_close(model(x), same(x), rtol=1e-5, atol=1e-6)
    assert routing.targets == [block.attn for block in model.blocks]
    assert attention_calls(model) == {"fused": 7}

@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_on_the_same_route(checkpointing):
    """The blocks' recomputation in backward runs outside the root's call: the attention
    modules' own hooks must route it too (torch's non-reentrant checkpoint raises when the
    recomputation saves other tensors than the forward did)."""
    model, same, truth, _ = _triple(TinyLM(checkpointing=checkpointing))
    x = torch.randn(2, 9, C, dtype=torch.float64)
    for step in range(2):  # the first call discovers, the second runs on the targets' hooks
        for m in (model, same, truth):
            m.zero_grad()
        outs, inputs = _forward_backward((model, same, truth), x)
        _check_grads((model, same, truth), outs, inputs, f"{checkpointing} step {step}")
    assert attention_calls(model) == {"fused": 8}  # 2 calls x 2 blocks x (forward + recompute)


@pytest.mark.parametrize("blocks", [None, "non-reentrant"])
@pytest.mark.parametrize("core", ["non-reentrant", "reentrant"])
def test_checkpointed_plain_function_calling_sdpa(core, blocks):
    """A checkpointed plain function (no module of the model) that calls SDPA inside an
    attention module recomputes in backward with no hook of ours running, so on torch's SDPA.
    Its forward call must take torch's SDPA too, or torch's non-reentrant checkpoint raises
    ("a different number of tensors was saved"). A reentrant one keeps our kernels (no
    saved-tensor hooks; its forward runs without grad)."""
    model, same, truth, _ = _triple(TinyLM(checkpointing=blocks, checkpoint_core=core))
    x = torch.randn(2, 9, C, dtype=torch.float64)
    for step in range(2):
        for m in (model, same, truth):
            m.zero_grad()
        outs, inputs = _forward_backward((model, same, truth), x)
        _check_grads((model, same, truth), outs, inputs, f"{core}/{blocks} step {step}")
    # Counted: the calls made inside our hooks, 2 steps x 2 blocks, twice with the blocks
    # checkpointed (their recomputation runs the attention modules again). The core's own
    # recomputation runs outside them: torch's SDPA, not counted.
    counted = 4 if blocks is None else 8
    calls = Counter(attention_calls(model))
    assert calls == ({"torch": counted} if core == "non-reentrant" else {"fused": counted})
    # under no_grad (no checkpoint) the same model runs on our kernels
    with torch.no_grad():
        model(x.float())
    assert attention_calls(model) - calls == {"fused": 2}


def test_transformer_encoder_layer_gets_fusedlm_multihead_attention():
    """nn.MultiheadAttention dispatches F.multi_head_attention_forward as one function, so its
    inner SDPA call runs with modes off: patch swaps the module for fusedlm's instead."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(C, HEADS, 2 * C, dropout=0.0, batch_first=True,
                                             norm_first=True)
    model, same, truth, report = _triple(torch.nn.Sequential(layer))
    assert type(model[0].self_attn) is fusedlm.nn.MultiheadAttention
    assert "0.self_attn" in {s.name for s in report.swapped}, report
    x = torch.randn(2, 7, C, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True  # right padding of row 1
    for mode in ("train", "eval"):  # 3 heads: torch has no encoder-layer fast path in eval
        OpDispatch.last_choice.clear()
        outs = []
        for m in (model, same, truth):
            getattr(m, mode)()
            with torch.set_grad_enabled(mode == "train"):
                outs.append(m[0](x.to(next(m.parameters()).dtype), src_key_padding_mask=padding))
        assert OpDispatch.last_choice["attention_fwd"] == "cpu"
        assert_close_rule(outs[0], outs[1], outs[2], name=f"encoder layer output ({mode})")
    fusedlm.unpatch(model)
    assert type(model[0].self_attn) is torch.nn.MultiheadAttention


def test_encoder_decoder_transformer_with_every_mask():
    """nn.Transformer: encoder self-attention with source padding, decoder causal
    self-attention (a float -inf mask with the tgt_is_causal hint) and cross-attention with
    memory padding, all on fusedlm.nn.MultiheadAttention after patch."""
    torch.manual_seed(0)
    transformer = torch.nn.Transformer(C, HEADS, num_encoder_layers=2, num_decoder_layers=2,
                                       dim_feedforward=2 * C, dropout=0.0, batch_first=True)
    model, same, truth, report = _triple(torch.nn.Sequential(transformer))
    swapped = [s.name for s in report.swapped if s.name.endswith("attn")]
    assert len(swapped) == 6, report  # 2 encoder self, 2 decoder self, 2 decoder cross
    N, S, T = 2, 9, 6
    src, tgt = torch.randn(N, S, C, dtype=torch.float64), torch.randn(N, T, C, dtype=torch.float64)
    src_padding = torch.zeros(N, S, dtype=torch.bool)
    src_padding[1, 6:] = True
    tgt_padding = torch.zeros(N, T, dtype=torch.bool)
    tgt_padding[0, 5:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
    outs = []
    OpDispatch.last_choice.clear()
    for m in (model, same, truth):
        dtype = next(m.parameters()).dtype
        outs.append(m[0](src.to(dtype), tgt.to(dtype), tgt_mask=causal.to(dtype),
                         src_key_padding_mask=src_padding, tgt_key_padding_mask=tgt_padding,
                         memory_key_padding_mask=src_padding, tgt_is_causal=True))
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"
    assert_close_rule(outs[0], outs[1], outs[2], name="transformer output")


def test_unpatch_removes_the_routing():
    model, same, *_ = _triple(TinyLM())
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        model(x)
        model(x)
    assert attention_calls(model) == {"fused": 4}
    report = fusedlm.unpatch(model)
    assert any("torch's again" in note for note in report.notes), report
    assert ROUTING_KEY not in model.__dict__
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    OpDispatch.last_choice.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x), rtol=0, atol=0)
    assert "attention_fwd" not in OpDispatch.last_choice
    assert attention_calls(model) == {}


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_a_patched_model_routes_on_its_own(how):
    """EMA copies and whole-model saves: the copy's hooks and routing are its own."""
    import io

    model, same, *_ = _triple(TinyLM())
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        model(x)
        if how == "deepcopy":
            copied = copy.deepcopy(model)
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            copied = torch.load(buffer, weights_only=False)
        before = attention_calls(model).copy()
        for _ in range(2):
            torch.testing.assert_close(copied(x), same(x), rtol=1e-5, atol=1e-6)
    assert attention_calls(model) == before
    assert attention_calls(copied)["fused"] == before["fused"] + 4
    assert copied.__dict__[ROUTING_KEY].targets == [block.attn for block in copied.blocks]
    fusedlm.unpatch(copied)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in copied.modules())
    with torch.no_grad():
        model(x)  # the original still routes
    assert attention_calls(model)["fused"] == before["fused"] + 2


def test_patching_twice_keeps_one_routing():
    model = TinyLM()
    fusedlm.patch(model, attention=True)
    routing = model.__dict__[ROUTING_KEY]
    report = fusedlm.patch(model, attention=True)
    assert model.__dict__[ROUTING_KEY] is routing
    assert any("already routed" in note for note in report.notes), report
    with torch.no_grad():
        model(torch.randn(1, 4, C))
    assert attention_calls(model) == {"fused": 2}


def test_an_exception_in_forward_leaves_no_mode_behind():
    model, *_ = _triple(TinyLM())
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, C + 1))  # wrong width: the first Linear raises
    assert torch._C._len_torch_function_stack() == 0
    with torch.no_grad():
        model(torch.randn(2, 5, C))  # still routed
    assert attention_calls(model) == {"fused": 2}
    assert torch._C._len_torch_function_stack() == 0


def test_concurrent_threads_each_get_their_own_mode():
    model, same, *_ = _triple(TinyLM())
    x = torch.randn(2, 6, C)
    with torch.no_grad():
        want = same(x)
    errors = []

    def run():
        try:
            with torch.no_grad():
                for _ in range(3):
                    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
            assert torch._C._len_torch_function_stack() == 0
        except Exception as exc:  # reported below: a thread's assert does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert attention_calls(model)["fused"] >= 12  # some calls may have run during discovery


def test_mode_as_a_context_manager():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    mode = FusedSDPAMode()
    OpDispatch.last_choice.clear()
    with mode:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # ours too
        gaps = torch.ones(9, 9, dtype=torch.bool)
        gaps[4, 2] = False  # no run of keys: torch's
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=gaps)
        added = q + k  # any other call passes through
    assert mode.calls == {"fused": 2, "torch": 1}
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-5, atol=1e-6)
    assert dropped.shape == masked.shape == out.shape
    torch.testing.assert_close(added, q + k, rtol=0, atol=0)
    assert torch._C._len_torch_function_stack() == 0


def test_mode_sends_calls_with_unknown_arguments_to_torch(monkeypatch):
    """A keyword the route does not know (one a newer torch might add) goes to torch as is."""
    from fusedlm.integrations import sdpa_mode

    def must_not_run(*args, **kwargs):
        raise AssertionError("routed a call with an unknown argument")

    monkeypatch.setattr(sdpa_mode, "sdpa_with_route", must_not_run)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with FusedSDPAMode():
        with pytest.raises(TypeError, match="future_option"):  # torch's own complaint
            F.scaled_dot_product_attention(q, k, v, future_option=1)
        with pytest.raises(TypeError):  # nine positional arguments
            F.scaled_dot_product_attention(q, k, v, None, 0.0, False, None, False, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        FusedSDPAMode(backend="gpu")
    with pytest.raises(TypeError, match="attention"):
        fusedlm.patch(TinyLM(), attention="yes")


@pytest.mark.slow
def test_compiled_patched_model_holds_fusedlm_attention():
    model, same, *_ = _triple(TinyLM())
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), same(x), rtol=1e-5, atol=1e-6)
    assert targets.count("fusedlm.attention_fwd") == 2
    assert torch._C._len_torch_function_stack() == 0
