"""Checkpoints: ``OUT/checkpoints/step_NNNNNNN/`` with

    model.safetensors   the full weights (tied tensors once), whatever the wrapping (FSDP2 too)
    optimizer.pt        the optimizer's full state dict keyed by parameter name (what
                        torch.distributed.checkpoint.state_dict's get_optimizer_state_dict
                        returns; older checkpoints: optimizer.state_dict(), keyed by index)
    trainer.pt          step, schedule, data position, RNG states, metrics
    config.json         the model and training configs
    manifest.json       size and sha256 of each file above, written last

A checkpoint is written under a temporary name and renamed into place, then ``latest`` (a file
holding the directory name) is replaced atomically: a crash at any moment leaves the previous
checkpoint as the latest. Loading verifies the manifest, so a truncated or corrupt file gives
an error naming it. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

FILES = ("model.safetensors", "optimizer.pt", "trainer.pt", "config.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupt; the message names the file."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def save_checkpoint(out_dir: str, step: int, model_weights: dict, optimizer_state: dict,
                    trainer_state: dict, config: dict, keep: int = 3) -> str:
    """Writes checkpoint ``step`` and returns its directory."""
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(model_weights, os.path.join(tmp, "model.safetensors"))
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)),
                    "sha256": _sha256(os.path.join(tmp, f))} for f in FILES}
    manifest["step"] = step
    _write_text_atomic(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=2))
    for f in os.listdir(tmp):
        fd = os.open(os.path.join(tmp, f), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if os.path.exists(final):  # re-saving a step (a resumed run): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_text_atomic(os.path.join(root, "latest"), name)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoint directories (with a manifest), oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root)
                   if n.startswith("step_")
                   and os.path.isfile(os.path.join(root, n, "manifest.json")))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(out_dir: str) -> str | None:
    root = checkpoint_root(out_dir)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isdir(path):
            return path
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint directory, else the latest one of the run in it."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    found = latest_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint here (expected a step_* directory with a "
                              "manifest.json, or a run directory with checkpoints/)")
    return found


def verify_checkpoint(path: str) -> dict:
    """The manifest, after checking every file's size and sha256 against it."""
    manifest_path = os.path.join(path, "manifest.json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest_path}: missing: {path} is not a complete checkpoint"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: corrupt ({e})") from e
    for name in FILES:
        file = os.path.join(path, name)
        expected = manifest.get(name)
        if expected is None:
            raise CheckpointError(f"{manifest_path}: corrupt (no entry for {name})")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing from the checkpoint")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: truncated or corrupt: {size} bytes, the manifest "
                                  f"says {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: corrupt: its sha256 differs from the manifest's")
    return manifest


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """{"model": weights, "optimizer": state_dict, "trainer": state, "config": dict, "path"}."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    verify_checkpoint(path)

    def read(name, loader):
        file = os.path.join(path, name)
        try:
            return loader(file)
        except Exception as e:  # the manifest matched, so the writer stored something unusable
            raise CheckpointError(f"{file}: cannot be loaded: {e}") from e

    def read_json(file):
        with open(file) as f:
            return json.load(f)

    return {
        "path": path,
        "model": read("model.safetensors", lambda f: load_file(f, device=str(map_location))),
        "optimizer": read("optimizer.pt", lambda f: torch.load(f, map_location=map_location,
                                                                weights_only=True)),
        "trainer": read("trainer.pt", lambda f: torch.load(f, map_location="cpu",
                                                            weights_only=True)),
        "config": read("config.json", read_json),
    }
