"""Token shards and the batches drawn from them.

Formats (read through memory maps, never loaded whole):

* llm.c: a header of 256 int32 (magic 20240520, version 1, token count, zeros), then the tokens
  as uint16;
* nanoGPT: headerless uint16 tokens (``.bin``).

``TokenBatches`` draws (x, y) windows of ``block_size + 1`` tokens, at random or in order, from
a list of shards, and has a ``state_dict`` so a resumed run continues with the very batches the
interrupted one would have drawn. Under data parallelism every rank draws the same *global*
batch and keeps its own slice of rows, so N ranks with batch b see exactly what one process with
batch N*b sees.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
import torch

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class DataError(ValueError):
    """A shard or a data directory that cannot be used; the message names the file."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int],
                fmt: str = "llmc") -> None:
    """Writes ``tokens`` (ints in [0, 65536)) as a shard in ``fmt`` ("llmc" or "nanogpt"),
    through a temporary file renamed into place."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: tokens must be in [0, 65536) to be stored as uint16")
    if fmt not in ("llmc", "nanogpt"):
        raise ValueError(f"argument 'fmt' must be 'llmc' or 'nanogpt', got {fmt!r}")
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        if fmt == "llmc":
            header = np.zeros(HEADER_INTS, dtype=np.int32)
            header[:3] = (LLMC_MAGIC, LLMC_VERSION, tokens.size)
            f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of one shard as a read-only uint16 memory map (format detected by the llm.c
    magic number)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such shard file")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=3) if size >= 12 else np.zeros(3, np.int32)
    if header[0] == LLMC_MAGIC:
        if header[1] != LLMC_VERSION:
            raise DataError(f"{path}: llm.c shard version {header[1]}, expected {LLMC_VERSION}")
        count = int(header[2])
        if size != HEADER_BYTES + 2 * count:
            raise DataError(
                f"{path}: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the "
                f"file has {size} bytes (truncated or corrupt)"
            )
        offset = HEADER_BYTES
    else:
        if size % 2:
            raise DataError(f"{path}: odd size {size}: not a uint16 token file")
        count, offset = size // 2, 0
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(count,))


def find_shards(data: str | os.PathLike, split: str) -> list[str]:
    """Shards of ``split`` ("train" or "val") under ``data``: a file (used for both splits), a
    glob pattern, or a directory holding ``*{split}*.bin`` files."""
    data = os.fspath(data)
    if os.path.isfile(data):
        return [data]
    if os.path.isdir(data):
        paths = sorted(glob.glob(os.path.join(data, f"*{split}*.bin")))
        if not paths:
            raise DataError(f"{data}: no '*{split}*.bin' shards in this directory "
                            "(make some with `fusedlm prepare`)")
        return paths
    paths = sorted(glob.glob(data))
    if not paths:
        raise DataError(f"{data}: no such file, directory or matching shards")
    return paths


class TokenBatches:
    """(x, y) batches of shape (batch_size, block_size), y = x shifted by one, from ``shards``.

    ``mode="random"``: every window starts at a uniformly random token of a shard chosen in
    proportion to its length (a seeded numpy generator, saved in ``state_dict``).
    ``mode="sequential"``: consecutive windows through the shards in order, wrapping around.
    ``rank``/``world_size``: this process keeps rows ``[rank*batch_size, (rank+1)*batch_size)``
    of the global batch of ``world_size*batch_size`` windows.
    """

    def __init__(self, shards: Sequence[str], batch_size: int, block_size: int, *,
                 mode: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None) -> None:
        if mode not in ("random", "sequential"):
            raise ValueError(f"argument 'mode' must be 'random' or 'sequential', got {mode!r}")
        if batch_size < 1 or block_size < 1:
            raise ValueError("arguments 'batch_size' and 'block_size' must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"argument 'rank' ({rank}) must be in [0, world_size={world_size})")
        self.paths = list(shards)
        self.tokens = [read_shard(p) for p in self.paths]
        window = block_size + 1
        for path, tokens in zip(self.paths, self.tokens, strict=True):
            if len(tokens) < window:
                raise DataError(
                    f"{path}: {len(tokens)} tokens, shorter than one window of block_size + 1 = "
                    f"{window} tokens"
                )
            if vocab_size is not None and len(tokens):
                top = int(tokens[: 1 << 20].max())
                if top >= vocab_size:
                    raise DataError(
                        f"{path}: token id {top} >= the model's vocab_size {vocab_size}"
                    )
        self.batch_size, self.block_size, self.mode = batch_size, block_size, mode
        self.rank, self.world_size, self.seed = rank, world_size, seed
        starts = np.array([len(t) - window + 1 for t in self.tokens], dtype=np.float64)
        self._shard_weights = starts / starts.sum()
        self._rng = np.random.default_rng(seed)
        self._shard, self._offset = 0, 0  # sequential position
        self.batches_drawn = 0

    def _global_windows(self) -> list[tuple[int, int]]:
        n = self.batch_size * self.world_size
        window = self.block_size + 1
        if self.mode == "random":
            shards = self._rng.choice(len(self.tokens), size=n, p=self._shard_weights)
            return [(int(s), int(self._rng.integers(0, len(self.tokens[s]) - window + 1)))
                    for s in shards]
        windows = []
        for _ in range(n):
            if self._offset + window > len(self.tokens[self._shard]):
                self._shard, self._offset = (self._shard + 1) % len(self.tokens), 0
            windows.append((self._shard, self._offset))
            self._offset += self.block_size
        return windows

    def next_batch(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64 on ``device``."""
        windows = self._global_windows()
        mine = windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([np.asarray(self.tokens[s][o:o + self.block_size + 1], dtype=np.int64)
                         for s, o in mine])
        self.batches_drawn += 1
        batch = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "batches_drawn": self.batches_drawn,
                "rng": self._rng.bit_generator.state, "shard": self._shard,
                "offset": self._offset, "paths": self.paths}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise DataError(f"data state was saved in mode {state['mode']!r}, not {self.mode!r}")
        self._rng.bit_generator.state = state["rng"]
        self._shard, self._offset = state["shard"], state["offset"]
        self.batches_drawn = state["batches_drawn"]
