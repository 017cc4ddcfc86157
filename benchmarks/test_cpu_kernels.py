"""CPU kernels vs eager PyTorch, forward + backward (pytest-benchmark).

    python -m pytest benchmarks/test_cpu_kernels.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Each group holds one case; compare the `fusedlm-cpu` row with the `torch-*` rows.
Results and their reading go in benchmarks/NOTES.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedlm

pytestmark = pytest.mark.skipif(
    not fusedlm.backends()["cpu"].available, reason=fusedlm.backends()["cpu"].reason
)

NORM_SHAPES = [(4096, 1024), (1024, 4096), (64, 65536), (8192, 127)]
ATTENTION_SHAPES = [(4, 8, 1024, 64), (1, 8, 4096, 64)]  # (B, H, T, D)


def _fwd_bwd(fn, inputs, grad):
    for t in inputs:
        t.grad = None
    fn().backward(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["fusedlm-cpu", "torch-eager"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm(benchmark, op, provider, shape, dtype):
    torch.manual_seed(0)
    M, N = shape
    x = torch.randn(M, N, dtype=dtype, requires_grad=True)
    w = torch.randn(N, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True)
    grad = torch.randn(M, N, dtype=dtype)
    if op == "layer_norm":
        inputs = (x, w, b)
        fn = (lambda: fusedlm.layer_norm(x, (N,), w, b, backend="cpu")) \
            if provider == "fusedlm-cpu" else (lambda: F.layer_norm(x, (N,), w, b))
    else:
        inputs = (x, w)
        fn = (lambda: fusedlm.rms_norm(x, (N,), w, backend="cpu")) if provider == "fusedlm-cpu" \
            else (lambda: F.rms_norm(x, (N,), w))
    benchmark.group = f"{op} {M}x{N} {dtype} fwd+bwd"
    benchmark(_fwd_bwd, fn, inputs, grad)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["fusedlm-cpu", "torch-sdpa"])
def test_attention(benchmark, provider, shape, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    fn = (lambda: fusedlm.attention(q, k, v, causal=causal, backend="cpu")) \
        if provider == "fusedlm-cpu" \
        else (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    benchmark.group = (f"attention {'x'.join(map(str, shape))} "
                       f"{'causal' if causal else 'full'} fwd+bwd")
    benchmark.pedantic(_fwd_bwd, args=(fn, (q, k, v), grad), rounds=5, warmup_rounds=1)


def _gpt2_124m_shapes():
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
                   (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


@pytest.mark.parametrize("provider", ["fusedlm-cpu", "torch-foreach", "torch-fused"])
def test_adamw_gpt2_124m(benchmark, provider):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in _gpt2_124m_shapes()]
    for p in params:
        p.grad = torch.randn_like(p)
    if provider == "fusedlm-cpu":
        opt = fusedlm.optim.AdamW(params, lr=1e-3, backend="cpu")
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=provider == "torch-foreach",
                                fused=provider == "torch-fused" or None)
    opt.step()  # allocate the state outside the timing
    benchmark.group = "adamw gpt2-124m fp32 step"
    benchmark.pedantic(opt.step, rounds=5, warmup_rounds=1)
