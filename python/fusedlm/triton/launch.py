"""What every Triton launcher of this package needs around a launch."""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

# Options every launch passes. enable_fp_fusion: contract a * b + c into one FMA (one rounding,
# one instruction). It was Triton's default through 3.9, which warns that 3.10 turns it off; the
# kernels were written, and their tolerances set, with it, so it is asked for rather than left
# to the installed Triton.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def device_context(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def compute_type(dtype: torch.dtype):
    """The kernels' arithmetic type for inputs of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32
