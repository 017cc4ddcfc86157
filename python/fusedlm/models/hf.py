"""Loading Hugging Face GPT-2 checkpoints from a local directory into ``fusedlm.models.GPT``
(no download, and ``transformers`` itself is not needed: config.json and the weights file are
read directly)."""

from __future__ import annotations

import json
import os

import torch

# HF GPT-2 stores its projections as Conv1D, weight (in, out): these are transposed for Linear.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                    "mlp.c_proj.weight")
# Buffers older HF checkpoints carry that are not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def is_hf_gpt2_dir(path: str | os.PathLike) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") == "gpt2"


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(path, "model.safetensors")
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not "
        "supported)"
    )


def load_hf_gpt2(cls, path, kernels: str = "fused", **overrides):
    from .gpt import GPTConfig

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (GPT.from_hf reads a local directory)")
    if not is_hf_gpt2_dir(path):
        raise ValueError(f"{path}/config.json is missing or not a GPT-2 config (model_type gpt2)")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{path}: activation {hf['activation_function']!r} is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError(f"{path}: scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn "
                         "are not supported")
    config = GPTConfig(**{
        "vocab_size": hf["vocab_size"], "block_size": hf.get("n_positions", 1024),
        "n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"], "bias": True,
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5), **overrides,
    })
    model = cls(config, kernels=kernels)
    weights = {}
    for name, tensor in _read_weights(path).items():
        name = name.removeprefix("transformer.")
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        weights[name] = tensor
    weights.setdefault("lm_head.weight", weights["wte.weight"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match GPT-2 (missing {missing}, "
                         f"unexpected {unexpected})")
    return model
