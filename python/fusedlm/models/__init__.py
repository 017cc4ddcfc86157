"""Models built on fusedlm's kernels: ``GPT`` and ``GPTConfig``."""

from .gpt import GPT, PRESETS, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS"]
