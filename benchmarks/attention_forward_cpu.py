"""CPU attention forward: fusedlm.attention(backend="cpu") against torch's SDPA with the same
masking, under torch.no_grad(), one thread (or --threads N), best of 7 loops.

    python benchmarks/attention_forward_cpu.py [--shapes decode|train] [--threads N]

decode: a few query rows against many keys (KV-cache decoding, chunked prefill), causal
(bottom-right mask), MHA, GQA and MQA. train: training shapes (Tq = Tk), full and causal.
FUSEDLM_CPU_ISA=avx2 (or generic) times the kernels' lower instruction-set paths.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fusedlm

# (B, Hq, Hkv, Tq, Tk, D)
DECODE_SHAPES = [
    (1, 8, 8, 1, 1024, 64),
    (1, 32, 8, 1, 4096, 128),
    (4, 12, 12, 1, 512, 64),
    (1, 8, 8, 4, 1024, 64),
    (1, 8, 8, 8, 1024, 64),
    (1, 32, 4, 1, 4096, 128),
    (1, 8, 1, 1, 2048, 64),
    (2, 16, 2, 4, 2048, 64),
    (1, 32, 8, 16, 1024, 128),
    (1, 1, 1, 1, 32768, 128),
    (1, 4, 1, 1, 8192, 64),
    (1, 8, 1, 1, 8192, 128),
]
TRAIN_SHAPES = [
    (4, 8, 8, 1024, 1024, 64),
    (1, 8, 8, 4096, 4096, 64),
    (2, 16, 16, 512, 512, 128),
    (4, 12, 12, 256, 256, 64),
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


def _time(shape, causal: bool) -> tuple[float, float]:
    B, Hq, Hkv, Tq, Tk, D = shape
    q = torch.randn(B, Hq, Tq, D)
    k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    # torch's is_causal is top-left aligned: a bottom-right mask (slower) only where it differs.
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) if causal and Tq != Tk else None
    is_causal = causal and Tq == Tk
    calls = max(3, min(60, int(3e8 / (B * Hq * Tq * Tk * D))))  # ~10 ms or more per loop
    with torch.no_grad():
        ours = _best_ms(lambda: fusedlm.attention(q, k, v, causal=causal, backend="cpu"), calls)
        theirs = _best_ms(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hq != Hkv), calls)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("decode", "train"), default="decode")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = ([(s, True) for s in DECODE_SHAPES] if args.shapes == "decode"
             else [(s, c) for s in TRAIN_SHAPES for c in (False, True)])
    extension = fusedlm._ext.load()
    print(f"cpu kernels: {extension.cpu_isa() if extension else 'unavailable'}, "
          f"{args.threads} thread(s)")
    for shape, causal in cases:
        ours, theirs = _time(shape, causal)
        print(f"{shape} {'causal' if causal else 'full'} fusedlm {ours:.3f} ms  "
              f"torch {theirs:.3f} ms  ratio {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
