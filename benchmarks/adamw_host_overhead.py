"""Host time of one optimizer step: fusedlm.optim.AdamW against torch.optim.AdamW, on the CPU,
one thread, best of 5 x 50 steps, the optimizers interleaved so machine noise hits all alike.

The first case is GPT-2 124M's parameter list (148 tensors) with every tensor shrunk to one
element: the kernel work is nil, so the time is what the Python and dispatcher code costs per
parameter. On a GPU that host time is spent before the kernels can run; the whole update of the
real 124M list takes about 1 ms on an H100 (28 B/param at ~3 TB/s), so a step whose host time
is above that is host-bound however fast the kernel.

    python benchmarks/adamw_host_overhead.py
"""

from __future__ import annotations

import time

import torch

import fusedlm

CASES = {
    "148 x (1,)": [(1,)] * 148,
    "16 x 16K": [(16384,)] * 16,
    "4 x 256K": [(262144,)] * 4,
}
OPTIMIZERS = {
    "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "torch foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "fusedlm cpu": lambda ps: fusedlm.optim.AdamW(ps, backend="cpu"),
    "fusedlm cpu fused=True": lambda ps: fusedlm.optim.AdamW(ps, backend="cpu", fused=True),
}


def _params(shapes):
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main(steps: int = 50, rounds: int = 5) -> None:
    torch.set_num_threads(1)
    for name, shapes in CASES.items():
        optimizers = {label: make(_params(shapes)) for label, make in OPTIMIZERS.items()}
        best = dict.fromkeys(optimizers, float("inf"))
        for opt in optimizers.values():  # warm-up: state allocation, first-call costs
            for _ in range(5):
                opt.step()
        for _ in range(rounds):
            for label, opt in optimizers.items():
                start = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                best[label] = min(best[label], (time.perf_counter() - start) / steps * 1e3)
        print(f"{name:11s} " + "  ".join(f"{label} {ms:6.3f} ms" for label, ms in best.items()))


if __name__ == "__main__":
    main()
