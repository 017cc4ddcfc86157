"""The CPU norm kernels straight from ``fusedlm._C`` (no Python checks, no autograd) against
torch's own ATen kernels, forward and backward, float32: best of 7 rounds of ``--calls``
calls, the contenders in the same round so machine noise hits all alike.

    python benchmarks/norm_kernels_cpu.py [--threads 1] [--calls 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from fusedlm import _ext

SHAPES = [(4096, 128), (4096, 256), (256, 256), (4096, 512), (1024, 1024), (256, 4096)]


def best_us(fn, calls: int, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _calls(ext, M: int, N: int) -> dict:
    """The contenders on one (M, N) float32 input, each a no-argument call."""
    x, grad = torch.randn(M, N), torch.randn(M, N)
    weight, bias = torch.randn(N), torch.randn(N)
    _, mean, rstd = ext.layer_norm_fwd(x, weight, bias, 1e-5)
    _, rms_rstd = ext.rms_norm_fwd(x, weight, 1e-5)
    return {
        "LN fwd torch": lambda: torch.native_layer_norm(x, (N,), weight, bias, 1e-5),
        "LN fwd ours": lambda: ext.layer_norm_fwd(x, weight, bias, 1e-5),
        "RMS fwd ours": lambda: ext.rms_norm_fwd(x, weight, 1e-5),
        "LN bwd torch": lambda: torch.ops.aten.native_layer_norm_backward(
            grad, x, (N,), mean.unsqueeze(1), rstd.unsqueeze(1), weight, bias,
            [True, True, True]),
        "LN bwd ours": lambda: ext.layer_norm_bwd(grad, x, mean, rstd, weight, True),
        "RMS bwd ours": lambda: ext.rms_norm_bwd(grad, x, rms_rstd, weight),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = _ext.load()
    if ext is None:
        raise SystemExit(f"fusedlm._C is not available: {_ext.why_unavailable()}")
    torch.manual_seed(0)
    print(f"{args.threads} thread(s), microseconds per call")
    for M, N in SHAPES:
        with torch.no_grad():
            times = {name: best_us(fn, args.calls) for name, fn in _calls(ext, M, N).items()}
        print(f"M={M:5d} N={N:5d}  " + "  ".join(f"{k} {v:7.1f}" for k, v in times.items()))

if __name__ == "__main__":
    main()
