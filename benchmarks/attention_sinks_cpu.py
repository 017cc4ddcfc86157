"""CPU attention with attention sinks and with a differentiable lse: fusedlm.attention
(backend="cpu") forward+backward plain, with ``return_lse=True`` (the loss reads lse too) and
with ``sinks=`` (gpt-oss's per-head sink logits), one thread, the three interleaved, best of
--reps rounds.

    python benchmarks/attention_sinks_cpu.py [--reps 7] [--shape 1 8 1024 64]

Also the accuracy of dq for scores of magnitude ~50 (q and k constant along D), the case that
showed the backward recomputing the scores differently from the forward (benchmarks/NOTES.md,
thirty-first session): the max relative dq error over --draws inputs against float64, torch's
naive float32 attention beside it.
"""

from __future__ import annotations

import argparse
import math

import torch

import fusedlm
from interleaved_timing import best_of  # (benchmarks/)


def _timings(shape, reps):
    B, H, T, D = shape
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    sinks = torch.randn(H, requires_grad=True)

    def plain():
        fusedlm.attention(q, k, v, causal=True, backend="cpu").sum().backward()

    def with_lse():
        out, lse = fusedlm.attention(q, k, v, causal=True, backend="cpu", return_lse=True)
        (out.sum() + lse.sum()).backward()

    def with_sinks():
        fusedlm.attention(q, k, v, causal=True, backend="cpu", sinks=sinks).sum().backward()

    return best_of({"plain": plain, "return_lse": with_lse, "sinks": with_sinks}, reps)


def _naive(q, k, v):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    Tq, Tk = scores.shape[-2:]
    visible = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _accuracy(draws):
    """Max relative dq error over ``draws`` inputs: [grad of out, grad of lse only]."""
    gen = torch.Generator().manual_seed(0)
    B, H, Tq, Tk, D = 2, 2, 33, 63, 72
    worst = {"torch naive float32": [0.0, 0.0], "fusedlm cpu": [0.0, 0.0]}
    for _ in range(draws):
        q, k = (torch.randn(B, H, T, 1, generator=gen, dtype=torch.float64).expand(B, H, T, D)
                .float().double() for T in (Tq, Tk))
        v = torch.randn(B, H, Tk, D, generator=gen, dtype=torch.float64)
        grad_out = torch.randn(B, H, Tq, D, generator=gen, dtype=torch.float64)
        grad_lse = torch.randn(B, H, Tq, generator=gen, dtype=torch.float64)
        for mode in (0, 1):
            dq = {}
            for name, dtype in (("truth", torch.float64), ("torch naive float32", torch.float32),
                                ("fusedlm cpu", torch.float32)):
                leaves = [t.to(dtype).contiguous().requires_grad_() for t in (q, k, v)]
                if name == "fusedlm cpu":
                    out, lse = fusedlm.attention(*leaves, causal=True, return_lse=True,
                                                 backend="cpu")
                else:
                    out, lse = _naive(*leaves)
                loss = ((out * grad_out.to(dtype)).sum() if mode == 0
                        else (lse * grad_lse.to(lse.dtype)).sum())
                dq[name] = torch.autograd.grad(loss, leaves[0])[0].double()
            for name in worst:
                error = (dq[name] - dq["truth"]).abs().max() / dq["truth"].abs().max()
                worst[name][mode] = max(worst[name][mode], error.item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 8, 1024, 64],
                        metavar=("B", "H", "T", "D"))
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"fwd+bwd, causal, float32, (B, H, T, D) = {tuple(args.shape)}, 1 thread, best of "
          f"{args.reps}:")
    for name, seconds in _timings(args.shape, args.reps).items():
        print(f"  {name:10s} {seconds * 1e3:8.2f} ms")
    print(f"max relative dq error over {args.draws} draws, scores ~50 "
          "[grad of out, grad of lse only]:")
    for name, (out_error, lse_error) in _accuracy(args.draws).items():
        print(f"  {name:20s} {out_error:.1e}  {lse_error:.1e}")


if __name__ == "__main__":
    main()
