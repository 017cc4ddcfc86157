"""torch.compile(fullgraph=True) traces fusedlm's modules and ops without a graph break and
gives eager's numbers, forward and backward."""

from __future__ import annotations

import pytest
import torch

import fusedlm
from fusedlm.backends import OpDispatch
from tests.helpers import (
    attention_refusal,
    available_backends,
    cpu_backend_available,
    device_of,
)

BACKENDS = available_backends()

# torch.compile's own imports warn about torch.jit deprecations.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class TinyLM(torch.nn.Module):
    def __init__(
        self, backend: str, vocab: int = 50, n_embd: int = 32, n_head: int = 4, n_kv_head: int = 2
    ):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, n_embd)
        self.ln = fusedlm.nn.LayerNorm(n_embd, backend=backend)
        self.attn = fusedlm.nn.CausalSelfAttention(n_embd, n_head, n_kv_head, backend=backend)
        self.norm = fusedlm.nn.RMSNorm(n_embd, eps=1e-6, backend=backend)
        self.head = torch.nn.Linear(n_embd, vocab)

    def forward(self, idx):
        x = self.wte(idx)
        x = x + self.attn(self.ln(x))
        return self.head(self.norm(x))


def _run(model, module, idx, targets):
    """Forward + backward of ``model`` (``module`` or its compiled wrapper)."""
    logits = model(idx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _check_compiled_matches_eager(backend, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    device = device_of(backend)
    eager = TinyLM(backend).to(device)
    compiled_model = TinyLM(backend).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 50, (2, 13), device=device)
    targets = torch.randint(0, 50, (2, 13), device=device)
    compiled = torch.compile(compiled_model, backend=compile_backend, fullgraph=True)
    logits_c, grads_c = _run(compiled, compiled_model, idx, targets)
    logits_e, grads_e = _run(eager, eager, idx, targets)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(
            grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    # a second call with another batch reuses the graph and still matches
    idx2 = torch.randint(0, 50, (2, 13), device=device)
    torch.testing.assert_close(compiled(idx2), eager(idx2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_aot_eager_fullgraph(backend):
    reason = attention_refusal(backend, torch.float32)  # the model is float32
    if reason is not None:
        pytest.skip(reason)
    _check_compiled_matches_eager(backend, "aot_eager")


def test_compile_inductor_fullgraph():
    """The default compiler (inductor) on the "auto" backend: the cpu kernels when built."""
    _check_compiled_matches_eager("auto", "inductor")


def test_compile_functional_ops_fullgraph():
    """The functional API compiles too; torch._dynamo.explain finds one graph, no breaks."""

    def fn(x, w, b, q, k, v):
        y = fusedlm.layer_norm(x, 16, w, b) + fusedlm.rms_norm(x, 16, w)
        return y.sum() + fusedlm.attention(q, k, v, causal=True).sum()

    args = (
        torch.randn(4, 16),
        torch.randn(16),
        torch.randn(16),
        *(torch.randn(1, 2, 5, 8) for _ in range(3)),
    )
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code  # our ops stay opaque custom ops in the graph
    for op in ("fusedlm.layer_norm_fwd", "fusedlm.rms_norm_fwd", "fusedlm.attention_fwd"):
        assert op in code, f"{op} missing from the traced graph:\n{code}"
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", (b,))[0]
                                     != "cuda"])  # (no CUDA C++ kernel: the Triton one serves)
@pytest.mark.parametrize("pair", [(torch.float32, torch.float32),
                                  (torch.bfloat16, torch.float32)], ids=["f32", "bf16-f32"])
@pytest.mark.parametrize("h_used", [True, False], ids=["h_used", "h_unused"])
def test_compile_add_norms_fullgraph(h_used, pair, backend):
    """The residual add fused into the norms: add_layer_norm and add_rms_norm (a bfloat16
    branch beside a float32 residual too) trace into one graph with no break, their custom ops
    opaque in it, and give eager's outputs and gradients (h's gradient given or not)."""
    device = device_of(backend)

    def block(x, residual, w, b):
        y, h = fusedlm.add_layer_norm(x, residual, 16, w, b, backend=backend)
        z, h2 = fusedlm.add_rms_norm(y.to(x.dtype), h, 16, w, eps=1e-6, backend=backend)
        out = z.pow(2).sum()
        return out + (h2 * h).sum() if h_used else out

    torch.manual_seed(0)
    args = [torch.randn(2, 5, 16, device=device).to(pair[0]),
            torch.randn(2, 5, 16, device=device).to(pair[1]),
            torch.randn(16, device=device), torch.randn(16, device=device)]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    for op in ("fusedlm.add_layer_norm_fwd", "fusedlm.add_rms_norm_fwd"):
        assert op in code, f"{op} missing from the traced graph:\n{code}"
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = [a.clone().requires_grad_(True) for a in args]
        out = fn(*leaves)
        results.append((out.detach(), torch.autograd.grad(out, leaves)))
    (out, grads), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    for g, g_c, a in zip(grads, grads_c, args, strict=True):
        assert g_c.dtype == g.dtype == a.dtype
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_keeps_the_custom_ops(strict):
    """torch.export (both tracers) records our ops as custom ops, not their decomposition or a
    kernel call baked in, and the exported program gives eager's logits."""
    torch.manual_seed(0)
    model = TinyLM("auto").eval()
    idx = torch.randint(0, 50, (2, 13))
    program = torch.export.export(model, (idx,), strict=strict)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    for op in ("fusedlm.layer_norm_fwd", "fusedlm.rms_norm_fwd", "fusedlm.attention_fwd"):
        assert any(op in t for t in targets), f"{op} missing from the exported graph: {targets}"
    torch.testing.assert_close(program.module()(idx), model(idx), rtol=1e-5, atol=1e-5)


def _check_compiled_loss_matches_eager(model, loss_of) -> None:
    """``loss_of(model)`` and ``loss_of(compiled model)`` (aot_eager, fullgraph): same loss and
    same gradient of every parameter."""
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    losses, grads = [], []
    for m in (model, compiled):
        model.zero_grad()
        loss = loss_of(m)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reset_positions", [False, True], ids=["window-positions", "reset"])
def test_compile_gpt_with_packed_documents_fullgraph(reset_positions):
    """The GPT model with document_ids (the key ranges built from the ids inside the graph,
    then per-query key ranges into the attention op; with reset_positions, the per-document
    rotary positions gathered from them) compiles without a graph break and gives eager's loss
    and gradients."""
    from fusedlm.models import GPT, GPTConfig
    from fusedlm.models.gpt import document_ids

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=50,
                       arch="llama", n_kv_head=2, bias=False)
    model = GPT(config, kernels="fused")
    idx = torch.randint(1, 50, (2, 24))
    idx[:, [7, 8, 15]] = 0
    documents = document_ids(idx, 0)

    def loss_of(m):
        return m(idx[:, :-1], idx[:, 1:], document_ids=documents[:, :-1],
                 reset_positions=reset_positions)[1]

    _check_compiled_loss_matches_eager(model, loss_of)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["plain", "z-loss"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_gpt_training_forward_records_every_fused_op(arch, z_loss):
    """The trainer's call, model(idx, targets, return_logits=False), compiled: one graph that
    records each of the model's fused ops, the head and loss as the chunked
    linear_cross_entropy op (a compiled run keeps the no-logits memory saving), and gives
    eager's loss and gradients; with ``--z-loss`` the trainer's call also returns the z part."""
    from fusedlm.models import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, arch=arch,
                       n_kv_head=2 if arch == "llama" else None, bias=arch == "gpt2")
    model = GPT(config, kernels="fused")
    idx = torch.randint(0, 50, (2, 16))

    z_args = {"z_loss": z_loss, "return_z_loss": True} if z_loss else {}

    def loss_of(m):
        return m(idx, idx.roll(-1, 1), return_logits=False, **z_args)[1]

    explanation = torch._dynamo.explain(loss_of)(model)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    ops = ["linear_cross_entropy_fwd", "attention_fwd",
           *(["add_rms_norm_fwd", "glu_fwd", "rotary_embedding"] if arch == "llama"
             else ["add_layer_norm_fwd"])]
    for op in ops:
        assert f"fusedlm.{op}" in code, f"fusedlm.{op} missing from the traced graph"
    _check_compiled_loss_matches_eager(model, loss_of)


@pytest.mark.parametrize("masks", ["causal-hint", "key-padding"])
def test_compile_multihead_attention_fullgraph(masks):
    """fusedlm.nn.MultiheadAttention's fused path traces to fusedlm's op, forward and backward:
    the causal hint to the plain attention op (no mask to inspect); a key padding mask to the
    op that reads its merged mask when the graph runs, and takes our kernels then."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = fusedlm.nn.MultiheadAttention(24, 4, batch_first=True)
    if masks == "causal-hint":
        kwargs = dict(attn_mask=torch.ones(7, 7, dtype=torch.bool).triu(1), is_causal=True)
        op = "fusedlm.attention_fwd"
    else:
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[0, 5:] = True
        kwargs = dict(key_padding_mask=padding)
        op = "fusedlm.attention_masked_fwd"
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    x = torch.randn(2, 7, 24, requires_grad=True)
    xc = x.detach().clone().requires_grad_()
    out = module(x, x, x, need_weights=False, **kwargs)[0]
    OpDispatch.last_choice.clear()
    out_c = compiled(xc, xc, xc, need_weights=False, **kwargs)[0]
    assert op in targets
    ours = cpu_backend_available()  # (else "auto" gives every call to torch's SDPA)
    assert (OpDispatch.last_choice.get("attention_fwd") == "cpu") == ours
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    out_c.sum().backward()
    assert (OpDispatch.last_choice.get("attention_bwd") == "cpu") == ours
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "cuda"])
def test_compile_rotary_and_swiglu_fullgraph(backend):
    """A Llama block's pieces: rotary embeddings on q and k (a (B, T, H, D) projection's
    transpose view, per-row positions) and the SwiGLU MLP on the halves of one fused
    projection, in one graph with no break, our ops opaque in it; forward and gradients match
    eager's. (No CUDA C++ kernel for either: CUDA tensors take the Triton ones.)"""
    device = device_of(backend)

    def block(q, k, cos, sin, h):
        q = fusedlm.rotary_embedding(q.transpose(1, 2), cos, sin, backend=backend)
        k = fusedlm.rotary_embedding(k.transpose(1, 2), cos, sin, interleaved=True,
                                     backend=backend)
        gate, up = h.chunk(2, dim=-1)
        return (q * k).sum(-1).mean() + fusedlm.swiglu(gate, up, backend=backend).pow(2).sum()

    torch.manual_seed(0)
    angles = torch.rand(2, 7, 4) * 7
    args = [torch.randn(2, 7, 3, 8, device=device), torch.randn(2, 7, 3, 8, device=device),
            angles.cos().to(device), angles.sin().to(device),
            torch.randn(2, 7, 2 * 24, device=device)]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    for op in ("fusedlm.rotary_embedding", "fusedlm.glu_fwd"):
        assert op in code, f"{op} missing from the traced graph:\n{code}"
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = [a.clone().requires_grad_(i in (0, 1, 4)) for i, a in enumerate(args)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad])
        results.append((out.detach(), grads))
    (out, grads), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    assert len(grads) == 3
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "cuda"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_compile_geglu_mlp_fullgraph(approximate, backend):
    """Gemma's MLP (fusedlm.nn.GeGLUMLP) and fusedlm.geglu on the halves of one fused
    projection, in one graph with no break, the GLU op opaque in it with its activation;
    forward and every gradient match eager's (which runs the same kernels)."""
    device = device_of(backend)
    torch.manual_seed(0)
    mlp = fusedlm.nn.GeGLUMLP(24, 40, approximate=approximate, backend=backend).to(device)

    def block(x, h):
        gate, up = h.chunk(2, dim=-1)
        return (mlp(x).square().sum()
                + fusedlm.geglu(gate, up, approximate=approximate, backend=backend).pow(2).sum())

    args = [torch.randn(2, 7, 24, device=device), 2 * torch.randn(2, 7, 2 * 40, device=device)]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    activation = "gelu" if approximate == "none" else "gelu_tanh"
    assert code.count("fusedlm.glu_fwd") == 2, code
    assert f"'{activation}'" in code, code
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        mlp.zero_grad(set_to_none=True)
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), [t.grad for t in leaves],
                        [p.grad.clone() for p in mlp.parameters()]))
    (out, grads, pgrads), (out_c, grads_c, pgrads_c) = results
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    for g, g_c in zip(grads + pgrads, grads_c + pgrads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-5)
