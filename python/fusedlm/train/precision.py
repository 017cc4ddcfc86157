"""A training run's numeric precision: the autocast dtype of the forward pass and, for float16,
the loss scaling that keeps its small gradients from flushing to zero.

- ``bf16``: autocast to bfloat16; no loss scaling (bfloat16 has float32's exponent range).
- ``fp16``: autocast to float16 and a dynamic loss scale (``torch.amp.GradScaler``; under FSDP2
  the sharded one, which agrees on overflow across ranks). A step whose unscaled gradients
  overflow is skipped by the scaler, which halves the scale: the usual float16 recipe.
- ``fp32``: no autocast.
- ``auto``: bf16 on a CUDA device that runs it natively (Ampere and later), fp16 on an older
  one, fp32 on a CPU.

Parameters, gradients and optimizer state stay float32 in every mode: autocast casts the
matmuls' inputs, not the weights.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(name: str, device: torch.device) -> str:
    """``name`` with ``auto`` replaced by what this device runs best (see the module doc)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    # (including_emulation=False: a pre-Ampere GPU "supports" bfloat16 only in slow emulation)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "fp16"


class Precision:
    """The autocast context and the loss scaling of one run (``name`` already resolved)."""

    def __init__(self, name: str, device: torch.device, sharded: bool = False,
                 initial_loss_scale: float = 2.0**16) -> None:
        if name not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)} once "
                             f"resolved, got {name!r}")
        self.name, self.device = name, device
        self.autocast_dtype = AUTOCAST_DTYPES[name]
        self.scaler = None
        if name == "fp16":
            if sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(device.type, init_scale=initial_loss_scale)
            else:
                self.scaler = torch.amp.GradScaler(device.type, init_scale=initial_loss_scale)

    @classmethod
    def for_run(cls, cfg, device: torch.device, log=print, sharded: bool = False) -> Precision:
        """The precision a run's config (a TrainConfig) asks for on ``device``: ``auto``
        resolved (what it chose is logged, and written back to ``cfg.precision``, so the
        checkpoint records what ran); ``sharded``: the run's gradients are FSDP2 shards."""
        asked = cfg.precision
        cfg.precision = resolve_precision(asked, device)
        precision = cls(cfg.precision, device, sharded=sharded,
                        initial_loss_scale=cfg.initial_loss_scale)
        scaling = "" if precision.scaler is None else (
            f" with dynamic loss scaling ({type(precision.scaler).__name__}, initial scale "
            f"{cfg.initial_loss_scale:g})")
        chosen = f" (auto on {device.type})" if asked == "auto" else ""
        if chosen or scaling:
            log(f"precision: {cfg.precision}{chosen}{scaling}")
        return precision

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the gradients by the loss scale (before they are clipped or measured)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
             grad_norm: torch.Tensor) -> tuple[torch.Tensor | bool, bool]:
        """Steps ``optimizer`` (its gradients unscaled and clipped) unless the step is bad.
        Returns (finite, overflow). finite: the loss (and, without loss scaling, the gradient
        norm) is finite; a step that is not is skipped and left to the run's NaN policy.
        overflow (fp16 only): the loss was finite but the scaled gradients overflowed, so the
        scaler skipped the step and lowered the scale, the scaler's own business, which the NaN
        policy does not count.

        Without loss scaling, an optimizer that takes GradScaler's ``found_inf`` in its kernels
        (``_step_supports_amp_scaling``: fusedlm's AdamW, torch's fused one) skips a bad step on
        the device, and ``finite`` is returned as a 0-dim bool tensor nobody has read: the step
        never waits for the GPU, so the host can queue the next one while this one runs. With
        any other optimizer, and under fp16 (whose scaler reads its scale on the host), the
        check is a host read."""
        if self.scaler is None:
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                # What GradScaler.step hands such an optimizer: nothing to unscale, and a flag
                # that makes the kernels leave every parameter and state as they were.
                optimizer.grad_scale, optimizer.found_inf = None, (~finite).to(torch.float32)
                try:
                    optimizer.step()
                finally:
                    del optimizer.grad_scale, optimizer.found_inf
                return finite, False
            if bool(finite):
                optimizer.step()
            return bool(finite), False
        loss_finite = bool(torch.isfinite(loss).item())
        scale = self.scaler.get_scale()
        if loss_finite:
            self.scaler.step(optimizer)  # (skips the update itself when it found an inf)
        self.scaler.update()
        # The scale drops (by the backoff factor) exactly when an overflow was found.
        return loss_finite, loss_finite and self.scaler.get_scale() < scale

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else self.scaler.get_scale()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """Restores a saved scale; a checkpoint of another precision carries none (or one
        this run has no use for), and the scaler then starts afresh."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
