"""FLOPs and the fewest bytes each benchmarked op must move through memory.

FLOPs count multiply-adds as two. Bytes count every input read once and every output written
once (what a perfect fused kernel moves); anything a kernel saves for later (statistics,
logsumexp) is left out when the backward could recompute it, so these are lower bounds.

attention, q (B, H, Tq, D), k/v (B, Hkv, Tk, D):
    forward  4 * B * H * Tq * Tk * D           (q k^T and p v, 2 FLOPs per multiply-add)
    backward 2.5 * forward                      (dv, dp, ds->dq, ds->dk; the scores recomputed)
    causal   half of each (Tq == Tk)
    bytes    forward: q, k, v read, out written; backward: q, k, v, out, dout read,
             logsumexp (B, H, Tq) float32 read, dq, dk, dv written (forward+backward adds the
             forward's logsumexp write)
    attention_sinks (gpt-oss) is counted as attention (causal, its window's pairs exactly, k
    and v with Hkv heads): the sinks' O(B * H * Tq) work and H values read are left out
layer_norm, x (M, N), weight and bias (N):
    forward  read x, weight, bias; write y                      (2 M N + 2 N elements)
    backward read dy, x, weight; write dx, dweight, dbias        (3 M N + 3 N elements)
rms_norm, x (M, N), weight (N):
    forward  (2 M N + N) elements; backward (3 M N + 2 N) elements
add_rms_norm, x and residual (M, N), weight (N): h = x + residual, y = RMSNorm(h):
    forward  read x, residual, weight; write y, h                 (4 M N + N elements)
    backward read dy, dh, h, weight; write dx (= dresidual), dweight (4 M N + 2 N elements)
cross_entropy, logits (N, V), target (N) int64:
    forward  read logits and targets                      (N V elements + 8 N bytes)
    backward read logits and targets; write dlogits        (2 N V elements + 8 N bytes)
linear_cross_entropy, hidden states (N, C), the LM head's weight (V, C), target (N) int64:
    forward  2 N V C            (logits = hidden weight^T)
    forward+backward 6 N V C    (adds dhidden = dlogits weight, dweight = dlogits^T hidden)
    The unfused count: an implementation that recomputes the logits gets no credit for it.
    Bytes are not counted: the matmuls bound it (TFLOP/s), and its point is the memory it
    does not hold (the (N, V) logits), which the GPU rows report as peak_memory_bytes.
rotary_embedding, x (B, H, T, D) with its first R features rotated, cos and sin (T, R/2), or
    (B, T, R/2) with per-row positions:
    forward  read x, write out                                     (2 B H T D elements)
             and read the angle tables once                         (2 T R/2 elements of cos,
                                                                     times B per-row tables)
    backward the same again (dout rotated the other way: read dout and the tables, write dx)
    The benchmark rotates a layer's q and k together (H = Hq + Hkv heads, one read of the
    tables): what Liger's single call does; fusedlm's two calls read the tables twice.
swiglu and geglu (any gated activation act(gate) * up), gate and up (N, I):
    forward  read gate and up; write out                           (3 N I elements)
    backward read dout, gate and up; write dgate and dup             (5 N I elements)
adamw, per parameter element:
    read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
    (float32 everything: 28 bytes per element)
gpt training step: the model's ``flops_per_token(T)`` (6 N + 6 L T C) times the tokens of
    the step.
"""

from __future__ import annotations

import torch

PASSES = ("fwd", "fwd+bwd")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, causal: bool, pass_: str,
                    window: int | None = None, lengths: list[int] | None = None) -> float:
    """4*B*H*Tq*Tk*D forward, 2.5x that backward, half of each when causal. A causal sliding
    window of ``window`` keys (bottom-right): 4*B*H*D per visible (query, key) pair, counted
    exactly. Causal runs of tokens (``lengths``; Tq == Tk): a left-padded batch's rows (each
    row's token count, its last positions) or packed documents (every document of every
    row): L (L + 1) / 2 visible pairs per run of L tokens, counted exactly."""
    _check_pass(pass_)
    if lengths is not None:
        if (not causal or window is not None or Tq != Tk or sum(lengths) > B * Tq
                or min(lengths, default=0) < 0):
            raise ValueError("attention_flops: lengths are counted for causal self-attention "
                             "without a window, runs of at most B * T tokens in all")
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        fwd = 4.0 * H * D * pairs
        return fwd if pass_ == "fwd" else fwd * (1 + 2.5)
    if window is None:
        fwd = 4.0 * B * H * Tq * Tk * D
    else:
        if not causal:
            raise ValueError("attention_flops: a window is counted for causal attention only")
        # Query i sits at key position p = i + Tk - Tq and sees keys max(p - window + 1, 0)..p.
        pairs = sum(max(0, min(p, Tk - 1) - max(p - window + 1, 0) + 1)
                    for p in range(Tk - Tq, Tk))
        fwd = 4.0 * B * H * D * pairs
        causal = False  # counted exactly: no halving
    total = fwd if pass_ == "fwd" else fwd * (1 + 2.5)
    return total / 2 if causal else total


def attention_bytes(B: int, H: int, Tq: int, Tk: int, D: int, dtype: torch.dtype, pass_: str,
                    Hkv: int | None = None) -> float:
    _check_pass(pass_)
    Hkv = H if Hkv is None else Hkv
    e = itemsize(dtype)
    q = o = B * H * Tq * D * e
    kv = 2 * B * Hkv * Tk * D * e
    fwd = q + kv + o
    if pass_ == "fwd":
        return float(fwd)
    lse = B * H * Tq * 4
    # forward: q, k, v read, out + lse written; backward: q, k, v, out, dout, lse read,
    # dq, dk, dv written
    return float(fwd + lse + (q + kv + o + o + lse) + (q + kv))


def layer_norm_bytes(M: int, N: int, dtype: torch.dtype, pass_: str) -> float:
    _check_pass(pass_)
    e = itemsize(dtype)
    fwd = (2 * M * N + 2 * N) * e
    return float(fwd if pass_ == "fwd" else fwd + (3 * M * N + 3 * N) * e)


def rms_norm_bytes(M: int, N: int, dtype: torch.dtype, pass_: str) -> float:
    _check_pass(pass_)
    e = itemsize(dtype)
    fwd = (2 * M * N + N) * e
    return float(fwd if pass_ == "fwd" else fwd + (3 * M * N + 2 * N) * e)


def add_rms_norm_bytes(M: int, N: int, dtype: torch.dtype, pass_: str) -> float:
    _check_pass(pass_)
    e = itemsize(dtype)
    fwd = (4 * M * N + N) * e
    return float(fwd if pass_ == "fwd" else fwd + (4 * M * N + 2 * N) * e)


def cross_entropy_bytes(N: int, V: int, dtype: torch.dtype, pass_: str) -> float:
    """The logits read once per pass, dlogits written once, the int64 targets read once per
    pass; the per-row statistics and the loss are left out (8-12 bytes a row)."""
    _check_pass(pass_)
    e = itemsize(dtype)
    fwd = N * V * e + 8 * N
    return float(fwd if pass_ == "fwd" else fwd + 2 * N * V * e + 8 * N)


def rotary_embedding_bytes(B: int, H: int, T: int, D: int, dtype: torch.dtype, pass_: str,
                           rotary_dim: int | None = None, angle_dtype: torch.dtype | None = None,
                           per_row_angles: bool = False) -> float:
    """x (B, H, T, D) read and the output written once per pass; cos and sin (T, R/2) (B of
    them with ``per_row_angles``) read once per pass, in ``angle_dtype`` (x's by default). R is
    ``rotary_dim`` (D by default). H counts every head rotated with one read of the tables
    (q's and k's together: Hq + Hkv). The backward (dout rotated the other way into dx) moves
    the same again."""
    _check_pass(pass_)
    R = D if rotary_dim is None else rotary_dim
    if R % 2 or not 2 <= R <= D:
        raise ValueError(f"rotary_embedding_bytes: rotary_dim must be even and in [2, D], got {R}")
    e = itemsize(dtype)
    ea = e if angle_dtype is None else itemsize(angle_dtype)
    tables = (B if per_row_angles else 1) * 2 * T * (R // 2) * ea
    fwd = 2 * B * H * T * D * e + tables
    return float(fwd if pass_ == "fwd" else 2 * fwd)


def glu_bytes(N: int, width: int, dtype: torch.dtype, pass_: str) -> float:
    """A gated activation act(gate) * up (swiglu, geglu), gate and up (N, I), I = ``width``.
    Forward: gate and up read, out written (3 N I elements); backward: dout, gate and up read,
    dgate and dup written (5 N I elements). act(gate), which eager autograd keeps, is left
    out: the backward can recompute it."""
    _check_pass(pass_)
    elements = N * width * itemsize(dtype)
    return float(3 * elements if pass_ == "fwd" else 8 * elements)


swiglu_bytes = geglu_bytes = glu_bytes


def linear_cross_entropy_flops(N: int, C: int, V: int, pass_: str) -> float:
    """The LM head's matmuls, 2 N V C each: one forward (the logits), three forward+backward
    (and the gradients of the hidden states and the weight). The bias and the cross-entropy
    itself (O(N V), not O(N V C)) are left out. This is the unfused count: an implementation
    that recomputes each chunk's logits in its backward does that work uncredited."""
    _check_pass(pass_)
    matmul = 2.0 * N * V * C
    return matmul if pass_ == "fwd" else 3 * matmul


def adamw_bytes(numel: int, param_dtype: torch.dtype = torch.float32,
                state_dtype: torch.dtype = torch.float32) -> float:
    """param read+write, grad read (param dtype), exp_avg and exp_avg_sq read+write."""
    p, s = itemsize(param_dtype), itemsize(state_dtype)
    return float(numel * (3 * p + 4 * s))


def adamw_flops(numel: int) -> float:
    """About 16 FLOPs per element (moments, bias corrections, sqrt, division, decay, update);
    reported for completeness: the step is memory-bound and measured in GB/s."""
    return 16.0 * numel


def gpt_step_flops(flops_per_token: float, batch: int, seq_len: int) -> float:
    return float(flops_per_token) * batch * seq_len


def gpt_flops_per_token(n_params_non_embedding: int, n_layer: int, seq_len: int,
                        n_embd: int) -> float:
    """6 N + 6 L T C (the PaLM appendix formula with causal attention's half), used when the
    model has no ``flops_per_token``."""
    return 6.0 * n_params_non_embedding + 6.0 * n_layer * seq_len * n_embd
