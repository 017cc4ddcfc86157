"""The C++ autograd nodes (``fusedlm._C.<op>_autograd``) that eager calls of the extension's
backends take (``fusedlm.ops._common.extension_autograd``): the same gradients, bit for bit, as
the op's Python ``autograd.Function`` over the same kernels, for every optional argument, and
the same autograd behaviour (non-contiguous and retained graphs, inputs without grad)."""

from __future__ import annotations

import importlib

import pytest
import torch

import fusedlm
from tests.helpers import cpu_backend_available, cpu_unavailable_reason

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

EPS = 1e-5
# (fusedlm.ops re-exports the functions under the modules' names)
attention_ops = importlib.import_module("fusedlm.ops.attention")
glu_ops = importlib.import_module("fusedlm.ops.glu")
norm_ops = importlib.import_module("fusedlm.ops.norm")
rotary_ops = importlib.import_module("fusedlm.ops.rotary")


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _graph_names(t, depth=3):
    """Names of the autograd nodes within ``depth`` steps of t's grad_fn (a reshape adds one)."""
    names, frontier = [], [t.grad_fn]
    for _ in range(depth):
        frontier = [n for n in frontier if n is not None]
        names += [n.name() for n in frontier]
        frontier = [m for n in frontier for m, _ in n.next_functions]
    return " ".join(names)


def _grads(y, grad, leaves):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(y, present, grad)


# (x dtype, param dtype, affine)
NORM_CASES = [
    (torch.float32, torch.float32, "weight+bias"),
    (torch.float32, torch.float32, "weight"),
    (torch.float32, torch.float32, "bias"),
    (torch.float32, torch.float32, "none"),
    (torch.bfloat16, torch.float32, "weight+bias"),
    (torch.float16, torch.float16, "bias"),
    (torch.float64, torch.float64, "weight+bias"),
]
NORM_IDS = [f"{str(x).split('.')[1]}-{str(p).split('.')[1]}-{a}" for x, p, a in NORM_CASES]


def _norm_inputs(x_dtype, param_dtype, affine, shape=(3, 7, 37)):
    n = shape[-1]
    x = torch.randn(shape, dtype=torch.float64).to(x_dtype)
    weight = (1 + 0.3 * torch.randn(n)).to(param_dtype) if "weight" in affine else None
    bias = (0.3 * torch.randn(n)).to(param_dtype) if "bias" in affine else None
    return x, weight, bias


@pytest.mark.parametrize(("x_dtype", "param_dtype", "affine"), NORM_CASES, ids=NORM_IDS)
def test_layer_norm_node_matches_the_python_function(x_dtype, param_dtype, affine):
    x, weight, bias = _norm_inputs(x_dtype, param_dtype, affine)
    grad = torch.randn(x.shape, dtype=torch.float64).to(x_dtype)
    leaves = _leaves(x, weight, bias)
    y = fusedlm.layer_norm(leaves[0], (37,), leaves[1], leaves[2], EPS, backend="cpu")
    assert "LayerNormFunction" in _graph_names(y)
    got = _grads(y, grad, leaves)

    python = _leaves(x, weight, bias)
    y_python, _, _ = norm_ops._LayerNormEager.apply(python[0].reshape(-1, 37), python[1],
                                                    python[2], EPS, "cpu")
    want = _grads(y_python.view(x.shape), grad, python)
    assert torch.equal(y.detach(), y_python.detach().view(x.shape))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize(("x_dtype", "param_dtype", "affine"),
                         [c for c in NORM_CASES if "bias" not in c[2] or c[2] == "weight+bias"],
                         ids=[i for i, c in zip(NORM_IDS, NORM_CASES, strict=True)
                              if "bias" not in c[2] or c[2] == "weight+bias"])
def test_rms_norm_node_matches_the_python_function(x_dtype, param_dtype, affine):
    x, weight, _ = _norm_inputs(x_dtype, param_dtype, affine)
    grad = torch.randn(x.shape, dtype=torch.float64).to(x_dtype)
    leaves = _leaves(x, weight)
    y = fusedlm.rms_norm(leaves[0], (37,), leaves[1], EPS, backend="cpu")
    assert "RmsNormFunction" in _graph_names(y)
    got = _grads(y, grad, leaves)

    python = _leaves(x, weight)
    y_python, _ = norm_ops._RmsNormEager.apply(python[0].reshape(-1, 37), python[1], EPS, "cpu")
    want = _grads(y_python.view(x.shape), grad, python)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


# (x dtype, residual dtype, affine, the outputs the loss reads)
ADD_NORM_CASES = [
    (torch.float32, torch.float32, "weight+bias", "y+h"),
    (torch.float32, torch.float32, "none", "y+h"),
    (torch.bfloat16, torch.float32, "weight", "y+h"),  # a 16-bit branch beside a float32 stream
    (torch.float16, torch.float16, "bias", "y+h"),
    (torch.float64, torch.float64, "weight+bias", "y+h"),
    (torch.float32, torch.float32, "weight+bias", "y"),  # h thrown away (a model's last norm)
    (torch.float32, torch.float32, "weight+bias", "h"),  # only h read: the norm passes nothing
]
ADD_NORM_IDS = [f"{str(x).split('.')[1]}-{str(r).split('.')[1]}-{a}-{used}"
                for x, r, a, used in ADD_NORM_CASES]


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize(("x_dtype", "residual_dtype", "affine", "used"), ADD_NORM_CASES,
                         ids=ADD_NORM_IDS)
def test_add_norm_node_matches_the_python_function(kind, x_dtype, residual_dtype, affine, used):
    if kind == "rms_norm" and "bias" in affine:
        affine = affine.replace("+bias", "").replace("bias", "none")
    x, weight, bias = _norm_inputs(x_dtype, residual_dtype, affine)
    residual = torch.randn(x.shape, dtype=torch.float64).to(residual_dtype)
    grads = [torch.randn(x.shape, dtype=torch.float64).to(residual_dtype) for _ in range(2)]
    if kind == "rms_norm":
        bias = None

    def loss(y, h):
        return sum((out.float() * g.float()).sum()
                   for out, g, name in ((y, grads[0], "y"), (h, grads[1], "h")) if name in used)

    leaves = _leaves(x, residual, weight, bias)
    present = [t for t in leaves if t is not None]
    if kind == "layer_norm":
        y, h = fusedlm.add_layer_norm(leaves[0], leaves[1], (37,), leaves[2], leaves[3], EPS,
                                      backend="cpu")
    else:
        y, h = fusedlm.add_rms_norm(leaves[0], leaves[1], (37,), leaves[2], EPS, backend="cpu")
    node = "AddLayerNormFunction" if kind == "layer_norm" else "AddRmsNormFunction"
    assert node in _graph_names(y) and node in _graph_names(h)
    got = torch.autograd.grad(loss(y, h), present, allow_unused=True)

    python = _leaves(x, residual, weight, bias)
    rows = [python[0].reshape(-1, 37), python[1].reshape(-1, 37)]
    if kind == "layer_norm":
        y_p, h_p, _, _ = norm_ops._AddLayerNormEager.apply(*rows, python[2], python[3], EPS, "cpu")
    else:
        y_p, h_p, _ = norm_ops._AddRmsNormEager.apply(*rows, python[2], EPS, "cpu")
    assert torch.equal(y.detach(), y_p.detach().view(x.shape))
    assert torch.equal(h.detach(), h_p.detach().view(x.shape))
    want = torch.autograd.grad(loss(y_p.view(x.shape), h_p.view(x.shape)),
                               [t for t in python if t is not None], allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == w.dtype and torch.equal(g, w)
    if used == "h":  # the norm's parameters get no gradient
        assert all(g is None for g in got[2:])


# (B, Hq, Hkv, Tq, Tk, D, causal, window, key_range kind, softcap, dropout_p)
ATTENTION_CASES = [
    (2, 4, 2, 37, 37, 16, True, None, None, 0.0, 0.0),
    (1, 2, 1, 5, 41, 24, False, None, None, 0.0, 0.0),
    (2, 2, 2, 33, 33, 16, True, (7, 0), None, 0.0, 0.0),
    (2, 2, 1, 29, 29, 8, True, None, "batch", 0.0, 0.0),
    (2, 2, 2, 31, 31, 16, True, None, "query", 0.0, 0.0),
    (2, 4, 2, 37, 37, 16, True, None, None, 1.5, 0.0),
    (2, 4, 2, 37, 41, 16, True, None, None, 0.0, 0.3),
    (2, 2, 2, 31, 31, 16, True, (9, 0), "query", 1.5, 0.3),
]


@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=["gqa-causal", "mqa-cross", "window", "padded", "documents",
                              "softcap", "dropout", "documents-window-softcap-dropout"])
def test_attention_node_matches_the_python_function(case):
    B, Hq, Hkv, Tq, Tk, D, causal, window, kind, softcap, dropout_p = case
    q = torch.randn(B, Hq, Tq, D)
    k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    key_range = None
    if kind == "batch":
        key_range = torch.tensor([[3, Tk], [0, Tk - 5]], dtype=torch.int32)
    elif kind == "query":
        key_range = fusedlm.key_range_from_document_ids(
            torch.arange(Tq).div(9, rounding_mode="floor").repeat(B, 1))
    grad = torch.randn(B, Hq, Tq, D)
    leaves = _leaves(q, k, v)
    torch.manual_seed(0)  # (the dropout seed's draw)
    out = fusedlm.attention(*leaves, causal=causal, window=window, key_range=key_range,
                            softcap=softcap, dropout_p=dropout_p, backend="cpu")
    assert "AttentionFunction" in _graph_names(out)
    got = _grads(out, grad, leaves)

    python = _leaves(q, k, v)
    causal_k, offset, window_offset = attention_ops.attention_mask_bounds(Tq, Tk, causal, window)
    key_range_k = attention_ops._check_key_range(key_range, q, Tk)
    torch.manual_seed(0)
    out_python, _ = attention_ops._AttentionEager.apply(
        *python, D ** -0.5, causal_k, offset, "cpu", window_offset, key_range_k, softcap,
        dropout_p, attention_ops._dropout_seed(q.device) if dropout_p else None)
    want = _grads(out_python, grad, python)
    assert torch.equal(out.detach(), out_python.detach())
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_glu_node_matches_the_python_function(activation, dtype):
    """swiglu / geglu: a (2, 5, 33) gate and a transposed up (the node takes the op's (N, I)
    rows as the Python Function does), each gradient bit for bit."""
    gate = torch.randn(2, 5, 33, dtype=torch.float64).to(dtype)
    up = torch.randn(2, 33, 5, dtype=torch.float64).to(dtype).transpose(1, 2)
    grad = torch.randn(gate.shape, dtype=torch.float64).to(dtype)

    def call(g, u):
        if activation == "silu":
            return fusedlm.swiglu(g, u, backend="cpu")
        return fusedlm.geglu(g, u, "none" if activation == "gelu" else "tanh", backend="cpu")

    leaves = _leaves(gate, up)
    out = call(*leaves)
    assert "GluFunction" in _graph_names(out)
    got = _grads(out, grad, leaves)
    python = _leaves(gate, up)
    out_python = glu_ops._GluEager.apply(python[0].reshape(10, 33), python[1].reshape(10, 33),
                                         activation, "cpu")
    want = _grads(out_python.view(gate.shape), grad, python)
    assert torch.equal(out.detach(), out_python.detach().view(gate.shape))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype and torch.equal(g, w)
    only_up = fusedlm.swiglu(gate, leaves[1], backend="cpu")  # (the gate needs no gradient)
    (dup,) = torch.autograd.grad(only_up, leaves[1], grad)
    torch.testing.assert_close(dup, torch.nn.functional.silu(gate) * grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize(("interleaved", "table"), [(False, "shared"), (True, "per-row"),
                                                    (False, "partial")])
def test_rotary_node_matches_the_python_function(table, interleaved, dtype):
    """fusedlm.rotary_embedding: x as a (B, T, H, D) projection's transposed view, (T, R/2)
    tables, (B, T, R/2) ones and partial rotary (R < D): out and dx bit for bit; cos and sin
    that require grad still take the reference (their gradients are right)."""
    B, H, T, D = 2, 3, 5, 8
    x = torch.randn(B, T, H, D, dtype=torch.float64).to(dtype).transpose(1, 2)
    half = 2 if table == "partial" else D // 2
    angles = torch.randn((B, T, half) if table == "per-row" else (T, half), dtype=torch.float64)
    cos, sin = angles.cos().float(), angles.sin().float()
    grad = torch.randn(B, H, T, D, dtype=torch.float64).to(dtype)
    (leaf,) = _leaves(x)
    out = fusedlm.rotary_embedding(leaf, cos, sin, interleaved, backend="cpu")
    assert "RotaryEmbeddingFunction" in _graph_names(out)
    (got,) = _grads(out, grad, [leaf])
    (python,) = _leaves(x)
    out_python = rotary_ops._RotaryEmbeddingEager.apply(python, cos, sin, interleaved, False,
                                                        "cpu")
    (want,) = _grads(out_python, grad, [python])
    assert torch.equal(out.detach(), out_python.detach())
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)
    tables = [t.clone().requires_grad_(True) for t in (cos, sin)]
    out_ref = fusedlm.rotary_embedding(leaf, *tables, interleaved)
    assert "RotaryEmbeddingFunction" not in _graph_names(out_ref)
    assert all(g is not None for g in torch.autograd.grad(out_ref, [leaf, *tables], grad))


def test_node_takes_non_contiguous_gradients_and_retained_graphs():
    x, weight, bias = _leaves(torch.randn(6, 16), torch.randn(16), torch.randn(16))
    y = fusedlm.layer_norm(x, (16,), weight, bias, backend="cpu")
    grad = torch.randn(16, 6).t()  # a transposed view
    assert not grad.is_contiguous()
    first = torch.autograd.grad(y, (x, weight, bias), grad, retain_graph=True)
    again = torch.autograd.grad(y, (x, weight, bias), grad.contiguous())
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    expected = torch.autograd.grad(
        torch.nn.functional.layer_norm(x, (16,), weight, bias), (x, weight, bias), grad)
    for a, b in zip(first, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_node_with_only_some_inputs_requiring_grad():
    """Inputs without requires_grad get no gradient; the others are those of torch."""
    x = torch.randn(5, 12)
    weight = torch.randn(12, requires_grad=True)
    bias = torch.randn(12)
    y = fusedlm.layer_norm(x, (12,), weight, bias, backend="cpu")
    y.pow(2).sum().backward()
    weight_ref = weight.detach().clone().requires_grad_(True)
    torch.nn.functional.layer_norm(x, (12,), weight_ref, bias).pow(2).sum().backward()
    torch.testing.assert_close(weight.grad, weight_ref.grad)
    assert x.grad is None and bias.grad is None


def test_backend_torch_keeps_the_python_function():
    x = torch.randn(3, 8, requires_grad=True)
    names = _graph_names(fusedlm.layer_norm(x, (8,), backend="torch"))
    assert "_LayerNormEager" in names and "LayerNormFunction" not in names
