"""Text to token shards (``fusedlm prepare``), the tokenizers, and the embedded default corpus:
the source files of the running Python's standard library, present on every machine."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

from .data import DataError, write_shard

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h",
                 ".cpp", ".js", ".ts", ".tex", ".toml", ".yaml", ".yml")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no download, decodes anything it encoded."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, tokens: Iterable[int]) -> str:
        return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (via the ``tokenizers`` package)."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise DataError("a tokenizer.json needs the 'tokenizers' package "
                            "(pip install tokenizers)") from e
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such tokenizer file")
        self.name = os.path.abspath(path)
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers package raises a bare Exception
            raise DataError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self._tokenizer.get_vocab_size()
        if self.vocab_size > 2**16:
            raise DataError(f"{path}: vocab of {self.vocab_size} does not fit uint16 shards")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.uint16)

    def decode(self, tokens: Iterable[int]) -> str:
        return self._tokenizer.decode([int(t) for t in tokens])


def load_tokenizer(name: str):
    """``"byte"`` or the path of a ``tokenizer.json``."""
    return ByteTokenizer() if name in ("byte", None) else HFTokenizer(name)


def tokenizer_for_data(data_dir: str | None):
    """The tokenizer recorded in ``data_dir/meta.json`` by ``prepare``, else bytes."""
    meta = os.path.join(data_dir, "meta.json") if data_dir and os.path.isdir(data_dir) else None
    if meta and os.path.isfile(meta):
        with open(meta) as f:
            return load_tokenizer(json.load(f).get("tokenizer", "byte"))
    return ByteTokenizer()


def checkpoint_tokenizer(path: str) -> str:
    """The tokenizer a fusedlm checkpoint (or run directory) was trained with; for a Hugging
    Face GPT-2 directory its tokenizer.json when present; "byte" otherwise."""
    from ..models.hf import is_hf_gpt2_dir
    from .checkpoint import resolve_checkpoint

    if is_hf_gpt2_dir(path):
        tokenizer = os.path.join(path, "tokenizer.json")
        return tokenizer if os.path.isfile(tokenizer) else "byte"
    with open(os.path.join(resolve_checkpoint(path), "config.json")) as f:
        return json.load(f).get("tokenizer", "byte")


def text_files(inputs: Sequence[str]) -> list[str]:
    """Files named in ``inputs``, and the text files under the directories named there, sorted."""
    files = []
    for item in inputs:
        if os.path.isfile(item):
            files.append(item)
        elif os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                files.extend(os.path.join(root, n) for n in sorted(names)
                             if n.endswith(TEXT_SUFFIXES))
        else:
            raise DataError(f"{item}: no such file or directory")
    if not files:
        raise DataError(f"no text files in {', '.join(inputs)}")
    return files


def prepare(inputs: Sequence[str], out_dir: str, tokenizer: str = "byte",
            val_fraction: float = 0.05, shard_tokens: int = 100_000_000, fmt: str = "llmc",
            max_bytes: int | None = None, log=print) -> dict:
    """Tokenizes ``inputs`` (files or folders) into ``out_dir/{train,val}_NNN.bin`` shards plus
    ``meta.json``. Documents are joined by a blank line. The validation split is every
    ``round(1/val_fraction)``-th document when there are enough of them, else the last
    ``val_fraction`` of the tokens. Returns the meta dict."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"argument 'val_fraction' must be in (0, 1), got {val_fraction}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"argument 'shard_tokens' must be a positive integer, got "
                         f"{shard_tokens!r}")
    tok = load_tokenizer(tokenizer)
    files = text_files(inputs)
    pieces, total_bytes = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if max_bytes is not None and total_bytes + len(text) > max_bytes:
            break
        total_bytes += len(text)
        pieces.append(tok.encode(text + "\n\n"))
    if not pieces:
        raise DataError(f"the inputs ({len(files)} files) hold no text within max_bytes")
    every = round(1 / val_fraction)
    if len(pieces) >= 2 * every:
        # Every k-th document goes to val, so both splits sample the same mix of sources (the
        # last files of a sorted tree are often of one kind).
        splits = {
            "train": np.concatenate([p for i, p in enumerate(pieces) if i % every != every // 2]),
            "val": np.concatenate([p for i, p in enumerate(pieces) if i % every == every // 2]),
        }
    else:  # few documents: the last val_fraction of the tokens
        tokens = np.concatenate(pieces)
        n_val = max(1, int(len(tokens) * val_fraction))
        splits = {"train": tokens[:-n_val], "val": tokens[-n_val:]}
    os.makedirs(out_dir, exist_ok=True)
    for split, split_tokens in splits.items():
        for i, start in enumerate(range(0, len(split_tokens), shard_tokens)):
            write_shard(os.path.join(out_dir, f"{split}_{i:03d}.bin"),
                        split_tokens[start:start + shard_tokens], fmt)
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "format": fmt,
            "files": len(pieces), "train_tokens": int(len(splits["train"])),
            "val_tokens": int(len(splits["val"]))}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(f"prepared {out_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"from {meta['files']} files ({tok.name} tokenizer)")
    return meta


def stdlib_corpus_dir(max_bytes: int = 8_000_000, log=print) -> str:
    """The embedded default data set, prepared once and cached: byte-level shards of the
    running Python's standard-library sources (the first ``max_bytes`` in sorted path order)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(
        os.path.join(root, n)
        for root, dirs, names in os.walk(stdlib)
        if "site-packages" not in root and "test" not in os.path.relpath(root, stdlib).split(os.sep)
        for n in names if n.endswith(".py")
    )
    if not files:
        raise DataError(f"{stdlib}: no Python sources found for the embedded default corpus")
    key = hashlib.sha256(
        f"v2|{sys.version}|{stdlib}|{max_bytes}|{len(files)}".encode()
    ).hexdigest()[:12]
    cache = os.environ.get("FUSEDLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusedlm")
    out_dir = os.path.join(
        cache, f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{key}")
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        return out_dir
    log(f"preparing the embedded default corpus (Python standard library sources in {stdlib}) "
        f"once, cached in {out_dir}")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    prepare(files, tmp, "byte", val_fraction=0.05, max_bytes=max_bytes, log=log)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process prepared it first
        if not os.path.isfile(os.path.join(out_dir, "meta.json")):
            raise
    return out_dir
