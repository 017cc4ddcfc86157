"""Peak memory and time of one compiled ``fusedlm.linear_cross_entropy`` step (forward and
backward) on the CPU, for a torch.compile backend: a compiled head-and-loss must keep the op's
no-logits peak (the graph records the chunked custom op, not the reference's logits).

    python benchmarks/linear_cross_entropy_compiled.py --compile-backend inductor

Peak = resident-set growth during one step after a warm-up one (``peak_and_time``), also given
as a multiple of the (N, V) float32 logits it avoids.
"""

from __future__ import annotations

import argparse

import torch

import fusedlm
from linear_cross_entropy_memory import peak_and_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-backend", default="inductor",
                        choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    N, C, V = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(N, C, requires_grad=True)
    weight = (torch.randn(V, C) * 0.02).requires_grad_()
    target = torch.randint(0, V, (N,))
    loss_fn = torch.compile(lambda x, w, t: fusedlm.linear_cross_entropy(x, w, t),
                            backend=args.compile_backend, fullgraph=True)

    def step() -> float:
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, target)
        loss.backward()
        return loss.item()

    peak, seconds, loss = peak_and_time(step, args.repeats)
    print(f"{args.compile_backend}: N={N} C={C} V={V} float32: peak {peak / 2**20:.0f} MiB "
          f"= {peak / (N * V * 4):.2f}x the (N, V) float32 logits, {seconds:.2f} s a step, "
          f"loss {loss:.4f}")


if __name__ == "__main__":
    main()
