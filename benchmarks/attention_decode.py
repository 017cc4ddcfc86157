"""CPU attention forward with a few query rows against many keys (KV-cache decoding):
fusedlm.attention(causal=True, backend="cpu") against torch's SDPA with the same bottom-right
mask, under torch.no_grad(), one thread (or --threads N), best of 7 loops.

    python benchmarks/attention_decode.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fusedlm

# (B, Hq, Hkv, Tq, Tk, D)
SHAPES = [
    (1, 8, 8, 1, 1024, 64),
    (1, 32, 8, 1, 4096, 128),
    (4, 12, 12, 1, 512, 64),
    (1, 8, 8, 4, 1024, 64),
    (1, 8, 8, 8, 1024, 64),
    (1, 32, 4, 1, 4096, 128),
    (1, 8, 1, 1, 2048, 64),
    (2, 16, 2, 4, 2048, 64),
    (1, 32, 8, 16, 1024, 128),
]


def _best_ms(fn, calls: int, loops: int = 7) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    for B, Hq, Hkv, Tq, Tk, D in SHAPES:
        q = torch.randn(B, Hq, Tq, D)
        k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
        mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        calls = max(5, int(3e7 / (B * Hq * Tk * D)))
        with torch.no_grad():
            ours = _best_ms(
                lambda: fusedlm.attention(q, k, v, causal=True, backend="cpu"), calls)  # noqa: B023
            gqa = Hq != Hkv
            theirs = _best_ms(lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=gqa), calls)  # noqa: B023
        print(f"{(B, Hq, Hkv, Tq, Tk, D)} fusedlm {ours:.3f} ms  torch {theirs:.3f} ms  "
              f"ratio {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
