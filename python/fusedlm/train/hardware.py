"""Peak dense bf16 tensor-core throughput of known GPUs, looked up by the device's name, for MFU.
An unknown device gives None (MFU is then not reported), never a guessed constant."""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 FLOP/s from the vendor's datasheet).
# Order matters: the first match wins, so specific names come before general ones.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0e12),
    ("H200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, device name) for ``device``; None when the name is not in the table."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return peak_flops_of(name), name


def peak_flops_of(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the device called ``name`` (as get_device_name gives it)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
