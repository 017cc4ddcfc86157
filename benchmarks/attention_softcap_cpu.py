"""CPU attention with logit soft-capping: fusedlm.attention(backend="cpu") plain and with
``softcap=`` (Gemma 2's attn_logit_softcapping, 50.0), forward and forward+backward, beside
Gemma 2's eager attention in torch (scores, tanh cap, mask, softmax, p v) with the cap; one
thread, interleaved, best of --reps rounds.

    python benchmarks/attention_softcap_cpu.py [--reps 7] [--shape 1 8 1024 64]
"""

from __future__ import annotations

import argparse
import math

import torch

import fusedlm
from interleaved_timing import best_of, forward_and_backward  # (benchmarks/)

SOFTCAP = 50.0


def _eager(q, k, v, softcap):
    """Gemma 2's eager_attention_forward (causal, no GQA), softmax in float32."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = torch.tanh(scores / softcap) * softcap
    T = scores.shape[-1]
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _timings(shape, reps):
    B, H, T, D = shape
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    calls = forward_and_backward({
        "fusedlm plain": lambda: fusedlm.attention(q, k, v, causal=True, backend="cpu"),
        "fusedlm softcap": lambda: fusedlm.attention(q, k, v, causal=True, backend="cpu",
                                                     softcap=SOFTCAP),
        "eager softcap": lambda: _eager(q, k, v, SOFTCAP),
    })
    return best_of(calls, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 8, 1024, 64],
                        metavar=("B", "H", "T", "D"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"causal, float32, (B, H, T, D) = {tuple(args.shape)}, softcap {SOFTCAP}, 1 thread, "
          f"best of {args.reps}:")
    for name, seconds in _timings(args.shape, args.reps).items():
        print(f"  {name:24s} {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
