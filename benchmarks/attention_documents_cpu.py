"""CPU attention over packed documents: fusedlm.attention(backend="cpu") with per-query key
ranges against the same kernel's plain causal attention over the same windows (what training
on packed sequences costs without document masking) and against torch's SDPA (math) and eager
PyTorch with the dense block-diagonal causal mask. Median of --reps loops, forward (no_grad)
and forward+backward.

    python benchmarks/attention_documents_cpu.py [--reps 7]

Documents: the bench's ``document_lengths`` (T/8, 3T/8, T/4, T/4 tokens, rotated per row).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.bench.cases import _document_inputs, document_lengths, eager_attention

# (B, H, T, D)
SHAPES = [(4, 8, 512, 64), (2, 8, 1024, 64)]


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _time_shape(B: int, H: int, T: int, D: int, reps: int) -> None:
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D)
    packed = _document_inputs(B, T, "cpu")
    ranges, hidden = packed["key_range"], packed["hidden"]
    print(f"B={B} H={H} T={T} D={D}, documents per row {document_lengths(B, T)[0]} ...")
    providers = {
        "fusedlm-cpu documents": lambda: fusedlm.attention(q, k, v, causal=True,
                                                           key_range=ranges, backend="cpu"),
        "fusedlm-cpu causal (no documents)": lambda: fusedlm.attention(q, k, v, causal=True,
                                                                       backend="cpu"),
        "sdpa-math documents (dense mask)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=~hidden),
        "torch-eager documents (dense mask)": lambda: eager_attention(q, k, v, hidden),
    }
    for name, forward in providers.items():
        with torch.no_grad():
            fwd = _median_ms(forward, reps)

        def both(forward=forward):
            torch.autograd.grad(forward(), (q, k, v), grad)

        print(f"  {name:36s} fwd {fwd:8.2f} ms   fwd+bwd {_median_ms(both, reps):8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    for shape in SHAPES:
        _time_shape(*shape, args.reps)


if __name__ == "__main__":
    main()
