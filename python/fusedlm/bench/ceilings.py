"""The device's measured ceilings, once per run: memory bandwidth from a large device-to-device
copy (bytes read plus bytes written), and matrix throughput from a large matrix product
(bfloat16 on a GPU, float32 on the CPU: the dtype the compute-bound benchmarks use there).
Every result is also reported as a percentage of the matching ceiling. A ceiling is what the
device can do at its best, so it uses the fast end of the timings (the 20th percentile)."""

from __future__ import annotations

import torch

from .timing import measure


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the compute-bound benchmarks (attention, gpt) and of the matmul ceiling."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def measure_ceilings(device: torch.device, quick: bool = False,
                     rep_ms: float | None = None) -> dict:
    if device.type == "cuda":
        copy_bytes = (256 if quick else 1024) << 20
        n = 4096 if quick else 8192
        rep = 50.0 if rep_ms is None else max(rep_ms, 20.0)
    else:
        copy_bytes = (64 if quick else 256) << 20
        n = 768 if quick else 2048
        rep = 200.0 if rep_ms is None else max(rep_ms, 20.0)
    dtype = compute_dtype(device)

    def timed_copy():
        src = torch.randn(copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        timing = measure([lambda: dst.copy_(src)], device, warmup_ms=rep / 4, rep_ms=rep,
                         min_reps=3)
        return timing, 2 * src.numel() * src.element_size()

    def timed_matmul():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return measure([lambda: torch.mm(a, b)], device, warmup_ms=rep / 4, rep_ms=rep,
                       min_reps=3)

    copy, moved = timed_copy()
    mm = timed_matmul()
    flops = 2.0 * n**3
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "bandwidth": {
            "value": moved / (copy.p20_ms * 1e-3) / 1e9,
            "unit": "GB/s",
            "method": f"device-to-device copy of {copy_bytes >> 20} MiB (float32), "
                      "counting bytes read plus bytes written, at the 20th-percentile time",
            "bytes": moved,
            "timing": copy.as_dict(),
        },
        "matmul": {
            "value": flops / (mm.p20_ms * 1e-3) / 1e12,
            "unit": "TFLOP/s",
            "method": f"torch.mm of two {n}x{n} {str(dtype).removeprefix('torch.')} random "
                      "matrices, 2*n^3 FLOPs, at the 20th-percentile time",
            "dtype": str(dtype).removeprefix("torch."),
            "shape": [n, n, n],
            "timing": mm.as_dict(),
        },
    }
