"""Data parallelism with torch.distributed (DDP, or FSDP2's ``fully_shard`` as an option) when
the process was started by ``torchrun``; a no-op otherwise. Full (unsharded) state dicts for
checkpoints come from ``torch.distributed.checkpoint.state_dict``, whatever the wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

# FSDP2 over gloo before torch 2.10 trains on wrong gradients without a word. 2.8: its
# reduce-scatter asks gloo for an average and gets a sum (pytorch/pytorch#162338, fixed in 2.9),
# so every gradient is world_size times too large. 2.9: tests/train/test_distributed.py still
# measures a gradient norm unlike one process's (2.17 against 2.80; cause not found), where 2.10
# matches it. NCCL (CUDA) averages.
FSDP_GLOO_GRADIENTS_WRONG = torch.torch_version.TorchVersion(torch.__version__) < "2.10"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs,
    gloo on CPUs."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl"
                        else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            value /= info.world_size
    return value


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a plain tensor: a DTensor (under FSDP2 the gradient norm is one, partial
    over the ranks) reduced to the full value every rank holds (a collective, not a host
    read); any other tensor as it is."""
    if not dist.is_available():
        return value
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool):
    """DDP (gradients all-reduced during backward) or FSDP2 (torch's ``fully_shard``: each
    transformer block, then the root for the rest - embeddings, final norm, head - so their
    parameters become DTensors sharded over the ranks on dim 0; the model object stays the
    same)."""
    if not info.enabled:
        return model
    if fsdp:
        if FSDP_GLOO_GRADIENTS_WRONG and dist.get_backend() == "gloo":
            raise ConfigError(
                f"'fsdp': torch {torch.__version__}'s FSDP2 over gloo (CPU) does not average the "
                "ranks' gradients right (pytorch/pytorch#162338, and a mismatch on 2.9); use "
                "torch >= 2.10, DDP (drop --fsdp), or CUDA devices (NCCL)")
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[info.local_rank] if device.type == "cuda" else None
    )


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), full (FSDP2's shards gathered) and on the CPU,
    the optimizer's keyed by parameter name: ``get_model_state_dict`` /
    ``get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)``. A collective under
    torch.distributed: every rank must call it; rank 0 gets the dicts (the others may get empty
    ones). ``model`` is the module itself, not a DDP or torch.compile wrapper."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          model_state: dict, optimizer_state: dict) -> None:
    """Loads what :func:`full_state_dicts` returned (every rank holds the full dicts) with
    ``set_model_state_dict`` / ``set_optimizer_state_dict``: each rank keeps its shard under
    FSDP2. An optimizer state keyed by parameter index (``optimizer.state_dict()``'s format, the
    checkpoints written before) is converted to names first."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, _keyed_by_name(optimizer_state, optimizer, model),
                             options=options)


def _keyed_by_name(state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """``state`` with parameter names instead of the indices of ``optimizer.state_dict()``
    (the optimizer's parameters, in order, are those the indices count)."""
    saved_groups = state.get("param_groups", [])
    if not any(isinstance(i, int) for group in saved_groups for i in group["params"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    index_to_name = {}
    for saved, live in zip(saved_groups, optimizer.param_groups, strict=True):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(f"the saved optimizer state has a group of {len(saved['params'])} "
                             f"parameters where the optimizer has {len(live['params'])}")
        for index, param in zip(saved["params"], live["params"], strict=True):
            index_to_name[index] = names[id(param)]
    return {
        "state": {index_to_name[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]}
                         for g in saved_groups],
    }
