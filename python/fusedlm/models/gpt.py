"""A thin GPT: GPT-2 (learned positions, pre-norm LayerNorm, GELU MLP, tied embeddings) and a
Llama-style variant (RMSNorm, rotary positions, SwiGLU, grouped kv heads), built on
``fusedlm.nn``, ``fusedlm.attention``, ``fusedlm.rotary_embedding``, ``fusedlm.swiglu`` and
``fusedlm.linear_cross_entropy`` with ``kernels="fused"``, or on plain PyTorch with
``kernels="torch"`` so the two can be compared step for step.

    model = GPT(GPTConfig.preset("gpt2-124m"), kernels="fused")
    logits, loss = model(idx, targets)      # idx, targets: (B, T) int64 -> logits (B, T, V)
    _, loss = model(idx, targets, return_logits=False)  # training: the head never makes logits
    tokens = model.generate(idx, 100, temperature=0.8, top_k=40)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as fused_nn
from ..backends import OpDispatch
from ..ops._common import check_positive_int, describe
from ..ops.attention import attention as fused_attention
from ..ops.attention import key_range_from_document_ids
from ..ops.cross_entropy import check_z_loss, language_model_loss, torch_z_loss
from ..ops.glu import swiglu as fused_swiglu
from ..ops.linear_cross_entropy import language_model_head_loss
from ..ops.rotary import rotary_embedding as fused_rotary_embedding

KERNELS = ("fused", "torch")
ARCHS = ("gpt2", "llama")


@dataclass
class GPTConfig:
    """Model shape. ``arch="gpt2"``: LayerNorm, learned positions, GELU (tanh) MLP of width
    ``4 * n_embd``; ``arch="llama"``: RMSNorm, rotary positions, SwiGLU MLP of width
    ``intermediate_size`` (default ~8/3 n_embd rounded up to 64), ``n_kv_head`` kv heads.
    ``sliding_window`` W (either arch): each position attends to at most the last W positions,
    itself included (Mistral's sliding window); None: every earlier position. ``dropout`` (in
    training) applies, as nanoGPT's, to the embeddings, each residual branch and the attention
    probabilities (the latter inside the attention kernels with ``kernels="fused"``, by their
    Philox mask, torch's SDPA's own with ``kernels="torch"``: the two then drop differently).
    ``attn_softcap`` c (Gemma 2's ``attn_logit_softcapping``): each attention score s becomes
    c * tanh(s / c) before the mask and the softmax (inside the attention kernels with
    ``kernels="fused"``); ``logit_softcap`` c (Gemma 2's ``final_logit_softcapping``, the
    modded-nanoGPT speedruns' logit cap): the output logits z become c * tanh(z / c) (inside
    the chunked head-and-loss op when the logits are not returned); None: no cap.
    ``qk_norm`` (Qwen3's, OLMo 2's and Gemma 3's QK-norm): each head's queries and keys are
    RMS-normalized over the head dim, with a learned (head dim) weight shared by the heads
    (``attn.q_norm`` / ``attn.k_norm``), before the rotary positions."""

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: n_head (no GQA)
    bias: bool = True
    dropout: float = 0.0
    arch: str = "gpt2"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    intermediate_size: int | None = None
    tie_embeddings: bool = True
    sliding_window: int | None = None
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"GPTConfig 'arch' must be one of {ARCHS}, got {self.arch!r}")
        # Stored back as Python ints (a numpy int would not survive json.dumps of the config).
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            setattr(self, name, check_positive_int(getattr(self, name), name, "GPTConfig"))
        for name in ("n_kv_head", "intermediate_size", "sliding_window"):
            setattr(self, name, check_positive_int(getattr(self, name), name, "GPTConfig",
                                                   optional=True))
        for name, within, bounds in (
                ("dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
                ("norm_eps", lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
                ("rope_theta", lambda v: 0.0 < v < math.inf, "a positive finite number")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not within(value):
                raise ValueError(f"GPTConfig '{name}' must be {bounds}, got {describe(value)}")
        for name in ("tie_embeddings", "bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig '{name}' must be a bool, got "
                                 f"{describe(getattr(self, name))}")
        for name in ("attn_softcap", "logit_softcap"):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0.0 < value < math.inf):
                raise ValueError(f"GPTConfig '{name}' must be None (no cap) or a positive "
                                 f"finite number, got {describe(value)}")
            setattr(self, name, float(value))  # (a numpy float would not survive json.dumps)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig 'n_embd' ({self.n_embd}) must be divisible by 'n_head' ({self.n_head})"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig 'n_head' ({self.n_head}) must be a multiple of 'n_kv_head' "
                f"({self.n_kv_head})"
            )
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError("GPTConfig: rotary positions need an even head dim (n_embd / n_head)")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        if self.arch == "gpt2":
            return 4 * self.n_embd
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named shape (see ``PRESETS``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GPTConfig has no field(s) {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, dict] = {
    # Byte-level, CPU-sized: the embedded default of `fusedlm train`.
    "tiny": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # Byte-level, one GPU for a few minutes (the GPU default of `fusedlm train`).
    "small": dict(vocab_size=256, block_size=512, n_layer=8, n_head=8, n_embd=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600),
    "llama-tiny": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=128, arch="llama", bias=False, norm_eps=1e-6),
}


def _check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"argument 'kernels' must be one of {KERNELS}, got {kernels!r}")
    return kernels


def _norm(config: GPTConfig, kernels: str, width: int | None = None) -> nn.Module:
    """The block's norm over ``width`` features (default n_embd); RMSNorm for the llama arch
    and for a head's queries and keys (``width`` = the head dim, QK-norm)."""
    if config.arch == "llama" or width is not None:
        cls = fused_nn.RMSNorm if kernels == "fused" else nn.RMSNorm
        return cls(config.n_embd if width is None else width, eps=config.norm_eps)
    cls = fused_nn.LayerNorm if kernels == "fused" else nn.LayerNorm
    return cls(config.n_embd, eps=config.norm_eps, bias=config.bias)


def _fused_op_serves(op: str, device: torch.device) -> bool:
    """Whether fusedlm's ``op`` serves the model's calls on ``device``: always under
    ``backend="auto"``; with a backend forced by FUSEDLM_BACKEND that has no kernel for it
    (``cuda``: the residual-add norms, rotary embeddings and SwiGLU have no CUDA C++ kernel,
    Triton serves their CUDA tensors) the model takes its torch path for that op instead of
    raising, so a run with FUSEDLM_BACKEND=cuda still trains (as the loss does)."""
    return (torch.compiler.is_compiling()  # (the graph records the op; no lookups traced)
            or OpDispatch.registry[op].serves_requested("auto", device))


def _add_norm(norm: nn.Module, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """(norm(h), h) with h = x + residual (h = x when residual is None): a pre-norm block's
    residual add and its next norm, one fused pass on fusedlm's norms."""
    if residual is None:
        return norm(x), x
    # A tuple, not `A | B`: torch 2.8's dynamo cannot trace isinstance of a types.UnionType.
    if isinstance(norm, (fused_nn.LayerNorm, fused_nn.RMSNorm)) and _fused_op_serves(
            "add_rms_norm_fwd" if isinstance(norm, fused_nn.RMSNorm) else "add_layer_norm_fwd",
            x.device):
        return norm(x, residual)
    h = x + residual
    return norm(h), h


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated by position: pairs (x[:D/2], x[D/2:]) as in Llama's HF layout;
    cos, sin (T, D/2) or (B, T, D/2) per row. (The eager version of fusedlm.rotary_embedding.)"""
    if cos.dim() == 3:  # (B, 1, T, D/2) against the heads
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def document_ids(idx: Tensor, separator: int) -> Tensor:
    """(B, T) document ids of the token windows ``idx`` (B, T): a document starts at each
    ``separator`` token (GPT-2's ``<|endoftext|>``, 50256, as llm.c's shards put it before
    every document), so the separator belongs to the document it opens."""
    return (idx == separator).cumsum(dim=1)


def _soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping), or x when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, sliding_window: int | None,
                     documents: Tensor | None = None, dropout_p: float = 0.0,
                     softcap: float | None = None) -> Tensor:
    """Causal attention, bottom-right aligned (so a query block at the end of a kv cache sees
    every earlier key), within the last ``sliding_window`` keys if set and within each
    query's document (``documents`` (B, T) ids, Tq = Tk) if given, with attention dropout
    ``dropout_p``, on torch's SDPA; with ``softcap`` (which SDPA cannot do), written out as
    Gemma 2's eager attention is: scores in q's dtype, capped, softmax in float32."""
    Tq, Tk = q.shape[2], k.shape[2]
    if q.shape[1] != k.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if (Tq == Tk and (sliding_window is None or sliding_window >= Tk) and documents is None
            and softcap is None):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if sliding_window is not None:
        visible = visible.triu(Tk - Tq - sliding_window + 1)
    if documents is not None:  # (B, 1, T, T)
        visible = visible & (documents[:, None, :, None] == documents[:, None, None, :])
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
    scores = _soft_cap(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, softcap)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1,
                          dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, dropout_p) if dropout_p else probs, v)


class KVCache:
    """Keys and values of the positions seen so far, per layer.

    Each layer's keys and values live in buffers (B, Hkv, capacity, D) allocated at its first
    ``append``; a step writes its new positions into them in place and attention reads the
    (B, Hkv, length, D) view of the filled part (the kernels take any strides). So a decoding
    step moves only its own keys, not the whole past as a concatenation would (at T = 1000 in
    GPT-2 small, ~74 MB per token). ``capacity=None`` grows the buffers by doubling (amortized
    O(1) per position); ``generate`` passes the model's ``block_size``, so they never grow."""

    def __init__(self, n_layer: int, capacity: int | None = None) -> None:
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 1):
            raise ValueError(f"argument 'capacity' must be None or a positive int, got "
                             f"{capacity!r}")
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * n_layer  # (B, Hkv, capacity, D) buffers
        self.values: list[Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer  # positions written per layer

    def clear(self) -> None:
        """Forget every position; the buffers stay for the next ones."""
        self.lengths = [0] * len(self.lengths)

    @property
    def length(self) -> int:
        """Positions every layer holds (the last layer appends last in a forward)."""
        return self.lengths[-1]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) after the layer's cached positions; returns views of all
        of them, (B, Hkv, length + T, D)."""
        start, T = self.lengths[layer], k.shape[2]
        end = start + T
        keys = self.keys[layer]
        if keys is not None and (keys.shape[:2] != k.shape[:2] or keys.shape[3] != k.shape[3]
                                 or keys.dtype != k.dtype or keys.device != k.device):
            raise ValueError(
                f"KVCache layer {layer} holds keys {tuple(keys.shape[:2])} x {keys.shape[3]} "
                f"{keys.dtype} on {keys.device}; got {tuple(k.shape)} {k.dtype} on {k.device}")
        if self.capacity is not None and end > self.capacity:
            raise ValueError(f"KVCache capacity {self.capacity} exceeded: layer {layer} would "
                             f"hold {end} positions")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Differentiable use (rare): new tensors per step, as writing in place would change
            # what autograd saved for the earlier steps' backward.
            if keys is not None:
                k = torch.cat((keys[:, :, :start], k), dim=2)
                v = torch.cat((self.values[layer][:, :, :start], v), dim=2)
            self.keys[layer], self.values[layer], self.lengths[layer] = k, v, end
            return k, v
        if keys is None or end > keys.shape[2]:
            size = self.capacity if self.capacity is not None else max(end, 2 * start, 16)
            buffers = []
            for old, new in ((keys, k), (self.values[layer], v)):
                buffer = new.new_empty((*new.shape[:2], size, new.shape[3]))
                if old is not None:
                    buffer[:, :, :start] = old[:, :, :start]
                buffers.append(buffer)
            self.keys[layer], self.values[layer] = buffers
        # (narrow + copy_: ~15% less host time than slice assignment, for host-bound steps)
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, start, T).copy_(k)
        values.narrow(2, start, T).copy_(v)
        self.lengths[layer] = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, kernels: str, layer: int) -> None:
        super().__init__()
        self.config, self.kernels, self.layer = config, kernels, layer
        self.head_dim = config.n_embd // config.n_head
        qkv = (config.n_head + 2 * config.kv_heads) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = _norm(config, kernels, self.head_dim)
            self.k_norm = _norm(config, kernels, self.head_dim)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None,
                cache: KVCache | None, documents: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """documents: (document ids (B, T), their key ranges (B, T, 2)) to keep each query
        to its own document, or None."""
        B, T, C = x.shape
        H, Hkv, D = self.config.n_head, self.config.kv_heads, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.config.qk_norm:  # (each (token, head) row over D)
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, T, H, D) -> (B, H, T, D) views: fusedlm.attention takes any strides.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rotary is not None:
            fused = self.kernels == "fused" and _fused_op_serves("rotary_embedding", x.device)
            rotate = fused_rotary_embedding if fused else _rotary
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        window = self.config.sliding_window
        dropout_p = self.config.dropout if self.training else 0.0
        if self.kernels == "fused":
            y = fused_attention(q, k, v, causal=True,
                                window=None if window is None else (window - 1, 0),
                                key_range=None if documents is None else documents[1],
                                dropout_p=dropout_p, softcap=self.config.attn_softcap or 0.0)
        else:
            y = _torch_attention(q, k, v, window, None if documents is None else documents[0],
                                 dropout_p, self.config.attn_softcap)
        return self.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, kernels: str = "torch") -> None:
        super().__init__()
        self.arch, self.kernels = config.arch, kernels
        width = config.mlp_width
        if config.arch == "llama":
            self.gate_proj = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.arch == "llama":
            gate, up = self.gate_proj(x), self.c_fc(x)
            fused = self.kernels == "fused" and _fused_op_serves("glu_fwd", x.device)
            h = fused_swiglu(gate, up) if fused else F.silu(gate) * up
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, kernels: str, layer: int) -> None:
        super().__init__()
        self.ln_1 = _norm(config, kernels)
        self.attn = Attention(config, kernels, layer)
        self.ln_2 = _norm(config, kernels)
        self.mlp = MLP(config, kernels)

    def forward(self, x: Tensor, residual: Tensor | None, rotary=None,
                cache: KVCache | None = None, documents=None) -> tuple[Tensor, Tensor]:
        """x: the previous block's MLP output (the embeddings for the first block, with
        residual None), residual: the stream it has not been added to yet. Returns this
        block's MLP output and the stream before it, for the next norm to add: each residual
        add runs fused into the norm after it."""
        y, residual = _add_norm(self.ln_1, x, residual)
        y, residual = _add_norm(self.ln_2, self.attn(y, rotary, cache, documents), residual)
        return self.mlp(y), residual


class GPT(nn.Module):
    """GPT language model. ``kernels="fused"`` runs fusedlm's norms and attention (whichever
    backend ``auto`` picks for the device), ``"torch"`` plain PyTorch; parameter names and
    state_dicts are the same for both."""

    def __init__(self, config: GPTConfig, kernels: str = "fused") -> None:
        super().__init__()
        self.config, self.kernels = config, _check_kernels(kernels)
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.arch == "gpt2":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, kernels, i) for i in range(config.n_layer))
        self.ln_f = _norm(config, kernels)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.arch == "llama":
            head_dim = config.n_embd // config.n_head
            inv_freq = config.rope_theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)
            angles = torch.outer(torch.arange(config.block_size).double(), inv_freq)  # (T, D/2)
            self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
            self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position table (and the token
        table only when it is not tied to the output head, which does real work)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.arch == "gpt2":
            n -= self.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:  # a lookup: no FLOPs
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward: ``6 N + 6 L T C`` with N the
        non-embedding parameters, L layers, T the sequence length and C the width (the
        attention scores and weighted sum, 12 L T C halved because causal attention computes
        half the score matrix; the PaLM appendix formula with the causal half)."""
        T = self.config.block_size if seq_len is None else seq_len
        return 6 * self.num_parameters() + 6 * self.config.n_layer * T * self.config.n_embd

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None,
                      document_ids: Tensor | None = None,
                      reset_positions: bool = False) -> Tensor:
        """idx (B, T) int64 token ids -> the final-norm hidden states (B, T, n_embd), in the
        parameters' dtype (or autocast's): what ``lm_head`` maps to logits, and what a task
        head (``fusedlm.train.classify``) reads. Position t depends on positions <= t only
        (and with ``document_ids`` (B, T) integers, only on those of its own document: a run
        of equal ids, see :func:`document_ids`). Positions count from the window's start, or
        with ``reset_positions`` from each document's start (Megatron's reset-position-ids),
        so that every packed document is computed exactly as it would be alone. With
        ``cache``, idx continues the cached positions."""
        if idx.dim() != 2:
            raise ValueError(f"argument 'idx' must be (B, T) token ids, got {list(idx.shape)}")
        B, T = idx.shape
        documents = None
        if document_ids is not None:
            if cache is not None:
                raise ValueError("argument 'document_ids' cannot be combined with a KV cache")
            if document_ids.shape != idx.shape:
                raise ValueError(f"argument 'document_ids' must have the shape of 'idx' "
                                 f"{list(idx.shape)}, got {list(document_ids.shape)}")
            documents = (document_ids, key_range_from_document_ids(document_ids))
        elif reset_positions:
            raise ValueError("argument 'reset_positions' needs 'document_ids' (where each "
                             "document starts)")
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size "
                f"{self.config.block_size}"
            )
        if reset_positions:
            # A document's keys start where its first query's visible keys start: (B, T).
            positions = torch.arange(T, device=idx.device) - documents[1][..., 0]
        else:
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.wte(idx)
        rotary = None
        if self.config.arch == "gpt2":
            x = x + self.wpe(positions)
        else:
            cos, sin = self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)
            rotary = (cos, sin)  # (T, D/2), or (B, T, D/2) per row
        x, residual = self.drop(x), None
        for block in self.h:
            if self.activation_checkpointing and self.training and cache is None:
                x, residual = torch.utils.checkpoint.checkpoint(
                    block, x, residual, rotary, None, documents, use_reentrant=False)
            else:
                x, residual = block(x, residual, rotary, cache, documents)
        return _add_norm(self.ln_f, x, residual)[0]

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None,
                document_ids: Tensor | None = None,
                reset_positions: bool = False,
                return_logits: bool = True, z_loss: float = 0.0,
                return_z_loss: bool = False) -> tuple[Tensor | None, ...]:
        """idx (B, T) int64 token ids -> logits (B, T, vocab_size) and the mean cross-entropy
        against ``targets`` (B, T) (ignoring -1), float32, or None without targets. With
        ``cache`` (``generate``), idx continues the cached positions; with ``document_ids``
        (B, T), packed documents attend only within themselves, and with ``reset_positions``
        each one's positions start at 0 (see ``hidden_states``).

        ``return_logits=False`` (what the trainer passes) returns None for the logits; with
        targets and ``kernels="fused"`` the head and loss then run as one chunked op
        (``fusedlm.linear_cross_entropy``), so the (B, T, V) logits and their gradient never
        exist: 3.3 GB less at 16k tokens and GPT-2's vocabulary in bfloat16.

        ``z_loss``: the loss adds ``z_loss * logsumexp**2`` of each position's logits, averaged
        like the cross-entropy (PaLM's z-loss; 1e-4 is usual), inside the fused kernels.
        ``return_z_loss=True`` returns ``(logits, loss, z_part)``, z_part being that term,
        detached (None without targets), so a trainer can log the cross-entropy alone."""
        z_loss = check_z_loss(z_loss, return_z_loss)
        hidden = self.hidden_states(idx, cache, document_ids, reset_positions)
        cap = self.config.logit_softcap
        if targets is None:
            logits = _soft_cap(self.lm_head(hidden), cap) if return_logits else None
            return (logits, None, None) if return_z_loss else (logits, None)
        targets = targets.reshape(-1)
        z_args = {"z_loss": z_loss, "return_z_loss": return_z_loss}
        logits = None
        if not return_logits and self.kernels == "fused":
            loss = language_model_head_loss(hidden.reshape(-1, hidden.shape[-1]),
                                            self.lm_head.weight, targets, ignore_index=-1,
                                            softcap=cap, **z_args)
        else:
            logits = _soft_cap(self.lm_head(hidden), cap)
            flat = logits.view(-1, logits.shape[-1])
            if self.kernels == "fused":  # in float32 from the logits, without a float32 copy
                loss = language_model_loss(flat, targets, ignore_index=-1, **z_args)
            else:
                flat = flat.float()
                loss = F.cross_entropy(flat, targets, ignore_index=-1)
                if z_loss or return_z_loss:
                    part = torch_z_loss(flat, targets, -1, z_loss, "mean")
                    loss = (loss + part, part.detach()) if return_z_loss else loss + part
        # (with return_z_loss, loss is the pair (loss, z_part))
        logits = logits if return_logits else None
        return (logits, *loss) if return_z_loss else (logits, loss)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Samples ``max_new_tokens`` tokens after idx (B, T) with a KV cache; temperature 0
        is greedy. Returns (B, T + max_new_tokens). Past ``block_size`` the cache restarts
        from the last ``block_size // 2`` tokens."""
        if temperature < 0:
            raise ValueError(f"argument 'temperature' must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"argument 'top_k' must be >= 1, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            block_size = self.config.block_size
            cache, pending = KVCache(self.config.n_layer, block_size), idx[:, -block_size:]
            # On a GPU, multinomial over NaN probabilities is a device-side assert, which ends
            # the process's CUDA context: rows with non-finite logits sample from zeros
            # instead, and the run raises at the end (one host sync, not one per token).
            any_not_finite = torch.zeros((), dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                if cache.length + pending.shape[1] > block_size:
                    cache.clear()
                    pending = idx[:, -(block_size // 2):]
                logits, _ = self(pending, cache=cache)
                logits = logits[:, -1, :].float()
                finite = torch.isfinite(logits).all(dim=-1, keepdim=True)  # (B, 1)
                any_not_finite |= ~finite.all()
                logits = torch.where(finite, logits, 0.0)
                if temperature == 0:
                    next_token = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_token = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat((idx, next_token), dim=1)
                pending = next_token
            if bool(any_not_finite):
                raise FloatingPointError("GPT.generate: the model's logits are not finite "
                                         "(NaN or Inf weights?)")
        finally:
            self.train(was_training)
        return idx

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + model.safetensors (the tied output head is stored once)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"fusedlm_gpt": self.config.to_dict()}, f, indent=2)
        save_file(weights_for_saving(self), os.path.join(directory, "model.safetensors"))

    @classmethod
    def from_hf(cls, path: str | os.PathLike, kernels: str = "fused", **overrides) -> GPT:
        """A GPT with the weights of a Hugging Face GPT-2 checkpoint saved in the local
        directory ``path`` (config.json + model.safetensors or pytorch_model.bin; nothing is
        downloaded)."""
        from .hf import load_hf_gpt2

        return load_hf_gpt2(cls, path, kernels, **overrides)


def weights_for_saving(model: nn.Module, state_dict: dict[str, Tensor] | None = None
                       ) -> dict[str, Tensor]:
    """The model's state_dict with tied tensors stored once (safetensors refuses shared
    storage) and every tensor contiguous. ``state_dict``: one of the model's taken another way
    (e.g. the full one gathered from FSDP2's shards, where tied tensors no longer share
    storage): the names of parameters tied to an earlier one are left out."""
    if state_dict is not None:
        first: dict[int, str] = {}
        tied = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first:
                tied.add(name)
            else:
                first[id(param)] = name
        return {name: t.detach().contiguous() for name, t in state_dict.items()
                if name not in tied}
    seen: set[int] = set()
    weights = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        weights[name] = tensor.detach().contiguous()
    return weights
