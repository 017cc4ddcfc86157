"""CPU attention dropout: fusedlm.attention(backend="cpu") plain and with ``dropout_p=0.1``
(the Philox mask inside the kernels), forward and forward+backward, beside torch's
``F.scaled_dot_product_attention`` with and without ``dropout_p=0.1`` (on the CPU torch runs
dropout through its math path); one thread, interleaved, best of --reps rounds.

    python benchmarks/attention_dropout_cpu.py [--reps 7] [--shape 1 8 1024 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedlm
from interleaved_timing import best_of, forward_and_backward  # (benchmarks/)

DROPOUT_P = 0.1


def _timings(shape, reps):
    B, H, T, D = shape
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    calls = forward_and_backward({
        "fusedlm plain": lambda: fusedlm.attention(q, k, v, causal=True, backend="cpu"),
        "fusedlm dropout": lambda: fusedlm.attention(q, k, v, causal=True, backend="cpu",
                                                     dropout_p=DROPOUT_P),
        "torch sdpa plain": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "torch sdpa dropout": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=DROPOUT_P),
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
    print(f"causal, float32, (B, H, T, D) = {tuple(args.shape)}, dropout_p {DROPOUT_P}, "
          f"1 thread, best of {args.reps}:")
    for name, seconds in _timings(args.shape, args.reps).items():
        print(f"  {name:26s} {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
