"""What PaLM's z-loss costs on the CPU: fusedlm.cross_entropy(backend="cpu") without and with
``z_loss=1e-4``, forward and forward+backward, beside eager PyTorch's z-loss as training code
writes it (the float32 copy, F.cross_entropy, plus z * logsumexp**2 averaged); one thread,
interleaved, best of --reps rounds.

    python benchmarks/cross_entropy_z_loss_cpu.py [--reps 7] [--rows 512] [--vocab 50304]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedlm
from interleaved_timing import best_of, forward_and_backward  # (benchmarks/)

Z_LOSS = 1e-4


def _eager(logits, target, z_loss):
    x = logits.float()
    loss = F.cross_entropy(x, target)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, dim=-1).square().mean()
    return loss


def _providers(logits, target) -> dict:
    return {
        "fusedlm z=0": lambda: fusedlm.cross_entropy(logits, target, backend="cpu"),
        f"fusedlm z={Z_LOSS:g}": lambda: fusedlm.cross_entropy(logits, target, backend="cpu",
                                                              z_loss=Z_LOSS),
        "eager z=0": lambda: _eager(logits, target, 0.0),
        f"eager z={Z_LOSS:g}": lambda: _eager(logits, target, Z_LOSS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50304)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        logits = (3 * torch.randn(args.rows, args.vocab)).to(dtype).requires_grad_(True)
        target = torch.randint(0, args.vocab, (args.rows,))
        times = best_of(forward_and_backward(_providers(logits, target)), args.reps)
        print(f"({args.rows}, {args.vocab}) {dtype}, 1 thread, best of {args.reps}:")
        for name, seconds in times.items():
            print(f"  {name:28s} {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
