"""``CausalSelfAttention``: GPT-style multi-head causal self-attention (with optional grouped
key/value heads) on ``fusedlm.attention``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops._common import check_positive_int
from ..ops.attention import attention


class CausalSelfAttention(torch.nn.Module):
    """x (B, T, C) -> (B, T, C). ``n_kv_head`` < ``n_head`` gives GQA (MQA at 1).
    ``sliding_window`` W: each position attends to at most the last W positions, itself
    included (Mistral's sliding window); None: every earlier position."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto",
                 sliding_window: int | None = None) -> None:
        super().__init__()
        n_embd = check_positive_int(n_embd, "n_embd")
        n_head = check_positive_int(n_head, "n_head")
        n_kv_head = check_positive_int(n_kv_head, "n_kv_head", optional=True)
        self.sliding_window = check_positive_int(sliding_window, "sliding_window", optional=True)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head != 0:
            raise ValueError(
                f"argument 'n_embd' ({n_embd}) must be divisible by 'n_head' ({n_head})"
            )
        if n_head % n_kv_head != 0:
            raise ValueError(
                f"argument 'n_head' ({n_head}) must be a multiple of 'n_kv_head' ({n_kv_head})"
            )
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.backend = backend
        qkv_out = (n_head + 2 * n_kv_head) * self.head_dim
        self.c_attn = torch.nn.Linear(n_embd, qkv_out, bias=bias, device=device, dtype=dtype)
        self.c_proj = torch.nn.Linear(n_embd, n_embd, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, key_range: Tensor | None = None) -> Tensor:
        """x (B, T, C); ``key_range`` as ``fusedlm.attention``'s: (B, 2) keys of each padded
        batch row, or (B, T, 2) each position's (packed documents:
        ``fusedlm.key_range_from_document_ids``)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
             self.n_kv_head * self.head_dim],
            dim=-1,
        )
        # (B, T, H, D) -> (B, H, T, D) views: the kernels take any strides, no copy needed.
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        y = attention(q, k, v, causal=True, backend=self.backend, window=window,
                      key_range=key_range)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
