"""Forward+backward time of a compiled attention call with a padding mask on the CPU:
``fusedlm.scaled_dot_product_attention`` (the graph records ``fusedlm::attention_masked_fwd``,
which reads the mask at run time and runs our kernels) against ``F.scaled_dot_product_attention``
with the same mask (what a compiled call took before that op existed).

    python benchmarks/compiled_masked_attention.py --batch 4 --heads 8 --seq 512 --head-dim 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedlm


def padding_causal_mask(batch: int, seq: int) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, with row b left-padded by 16 * b tokens."""
    visible = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq).clone()
    for b in range(batch):
        visible[b, ..., :16 * b] = False
    return visible


def median_seconds(step, repeats: int) -> float:
    step()
    step()  # compile, then warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    mask = padding_causal_mask(args.batch, args.seq)
    grad = torch.randn(shape)
    for name, sdpa in (("torch SDPA", F.scaled_dot_product_attention),
                       ("fusedlm", fusedlm.scaled_dot_product_attention)):
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, k, v, sdpa=sdpa: sdpa(q, k, v, attn_mask=mask),
                                 backend=args.compile_backend, fullgraph=True)

        def step(compiled=compiled):
            q.grad = k.grad = v.grad = None
            compiled(q, k, v).backward(grad)

        seconds = median_seconds(step, args.repeats)
        print(f"{name:>10}: {seconds * 1e3:8.1f} ms forward+backward, shape {shape} float32, "
              f"padded causal mask, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
