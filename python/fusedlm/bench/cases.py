"""What is benchmarked: per op, the sizes (cases) and the providers (implementations).

A :class:`Case` is one op at one size, dtype and pass, with its FLOP and byte counts and a
function that draws one input set. A :class:`Provider` is one implementation; ``build(case,
ctx)`` returns ``fn(inputs)`` that runs the case once on one input set (forward, forward and
backward, or an optimizer / training step). ``torch-eager`` is every op's baseline.

attention_decode (one query row per sequence against a KV cache, GQA, forward) has
attention's providers. attention_sinks (gpt-oss's attention sinks: sinks (Hq,), one logit per
query head in every row's softmax, no value; causal, GQA, full and a 128-key sliding window,
forward and forward+backward, the sinks' gradient included) has torch-eager (gpt-oss's eager
attention), fusedlm-<name> (sinks=) and torch-compile, and no SDPA rows: SDPA takes no sinks.
attention_dropout (training-time attention with dropout_p = 0.1 after the softmax: causal
self-attention at attention's plain causal sizes, forward and forward+backward) has attention's
providers with dropout_p=0.1 (torch-eager with F.dropout on the probabilities, fusedlm-<name>,
sdpa-<backend>, torch-compile) but fusedlm-cuda-sm80; its outputs are not checked against
eager's: each provider draws its own random mask. attention_softcap (logit soft-capping, Gemma
2's attn_logit_softcapping = 50: each score s = scale q.k becomes 50 tanh(s / 50) before the
mask and the softmax; causal self-attention at attention's plain causal sizes, forward and
forward+backward) has torch-eager (Gemma 2's eager attention), fusedlm-<name> (softcap=50.0),
torch-compile and flex-attention, and no SDPA rows: SDPA has no soft-capping.
linear_cross_entropy (the LM head and its loss, forward and forward+backward) records each
provider's peak GPU memory too. rotary_embedding rotates one attention layer's q and k together
(Hugging Face Llama's layout: views of the (B, T, H, D) projections), so that Liger's one call
for both is timed against the same work.

Providers, each only where it can run (the output says why the others did not):
    torch-eager      eager PyTorch (attention written out: k, v repeated for GQA, q k^T, mask,
                     softmax in float32, p v; for attention_sinks gpt-oss's: a sink column
                     cat'ed to the scores per head before the softmax, dropped after it; for
                     attention_dropout F.dropout(p, 0.1, training=True) on the probabilities
                     in q's dtype, as Hugging Face's eager attention; for attention_softcap
                     Gemma 2's: the scores capped at 50 tanh(s / 50) before the mask;
                     F.layer_norm / F.rms_norm;
                     h = x + residual then F.rms_norm(h) for add_rms_norm;
                     F.cross_entropy(logits.float(), target), after F.linear for
                     linear_cross_entropy; Hugging Face Llama's apply_rotary_pos_emb
                     (q * cos + rotate_half(q) * sin, cos and sin (1, T, D)); F.silu(gate) * up;
                     F.gelu(gate, approximate="tanh") * up;
                     torch.optim.AdamW(foreach=False, fused=False); the GPT with
                     kernels="torch" and torch.optim.AdamW's default)
    torch-compile    torch.compile of the eager version
    sdpa-<backend>   F.scaled_dot_product_attention under sdpa_kernel(<backend>) for each of
                     flash, efficient, cudnn, math that runs on the device (enable_gqa=True
                     when k has fewer heads than q; a backend that refuses a case: unsupported);
                     attention, attention_decode and attention_dropout (dropout_p=0.1) only
                     (SDPA takes no sinks)
    torch-foreach, torch-fused   torch.optim.AdamW(foreach=True) / (fused=True)
    liger            Liger-Kernel's LayerNorm / RMSNorm functions, LigerFusedAddRMSNorm,
                     LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss,
                     liger_rotary_pos_emb (q and k in one call, in place),
                     LigerSiLUMulFunction, LigerGELUMulFunction (when installed, GPU)
    fusedlm-<name>   fusedlm with backend=<name> for cuda, triton, cpu (and torch, the
                     reference, on the CPU) (attention_sinks: fusedlm.attention(sinks=...);
                     attention_dropout: fusedlm.attention(dropout_p=0.1); attention_softcap:
                     fusedlm.attention(softcap=50.0));
                     for the GPT, the model with kernels="fused",
                     FUSEDLM_BACKEND=<name> and fusedlm.optim.AdamW(backend=<name>)
    fusedlm-patch    the GPT only: GPT(kernels="torch") after fusedlm.patch(model,
                     attention=True), torch.optim.AdamW (any model's drop-in path, host time
                     of the SDPA routing included)
    fusedlm-cuda-sm80  attention and attention_decode, on sm_90 GPUs: fusedlm-cuda with the
                     Hopper kernels off (FUSEDLM_ATTENTION_SM90=0), what the sm_90a kernels
                     gain over sm_80's
    fusedlm-cuda-no-decode-plan  attention_decode: fusedlm-cuda with its decoding plan off
                     (FUSEDLM_ATTENTION_DECODE=0: no packed query heads, no key split)
    flex-attention   attention_softcap: torch.compile'd FlexAttention with a soft-capping
                     score_mod and a causal block mask (where it compiles: torch's reason
                     otherwise; no backward on the CPU in torch 2.13: those rows unsupported)
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import counting

BASELINE = "torch-eager"
# The ops of ``fusedlm bench`` in run order (its CLI, runner and tests read this one list).
# The newest ops last (attention_sinks, attention_dropout, then attention_softcap): a run with
# --budget-s gives each op its share of what is left, so the last op absorbs the earlier ones'
# overruns (first calls, compiles); this way the new op is the one cut short, never an older
# op's rows.
OPS = ("attention", "attention_decode", "layer_norm", "rms_norm", "add_rms_norm", "cross_entropy",
       "linear_cross_entropy", "rotary_embedding", "swiglu", "geglu", "adamw", "gpt",
       "attention_sinks", "attention_dropout", "attention_softcap")
NORM_EPS = 1e-5
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
# attention_dropout's rate (GPT-2's attn_pdrop)
ATTENTION_DROPOUT_P = 0.1
# attention_softcap's cap (Gemma 2's attn_logit_softcapping)
ATTENTION_SOFTCAP = 50.0


class Unsupported(Exception):
    """This provider cannot run this case (the row says why); not a failure."""


@dataclass
class Context:
    device: torch.device
    quick: bool
    compile: bool = True
    compile_note: str | None = None
    backends: dict = field(default_factory=dict)  # fusedlm.backends()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    op: str
    variant: str  # pass, dtype and options: one plot panel, one line per provider
    pass_: str
    dtype: str
    size_label: str
    size: dict
    x: float
    flops: float | None
    bytes: float | None
    make_inputs: Callable[[], dict]
    causal: bool | None = None
    tokens: int | None = None  # tokens per call (gpt)
    check_output: bool = False  # compare the output with eager's (forward cases)
    extra: dict = field(default_factory=dict)  # not in the JSON (e.g. the GPT's config)


@dataclass
class Provider:
    name: str
    description: str
    why_not: Callable[[Context], str | None]
    build: Callable[[Case, Context], Callable[[dict], object]]
    compiles: bool = False  # pays a compile on first use (skipped when the budget is short)
    max_input_sets: int | None = None
    # Writes over its inputs (Liger's in-place kernels): the runner checks its forward output
    # on a copy of the first input set taken before the timed calls.
    mutates_inputs: bool = False


@dataclass
class OpSpec:
    name: str
    description: str
    metric: str  # "TFLOP/s" or "GB/s"
    ceiling: str  # "matmul" or "bandwidth"
    x_name: str
    cases: Callable[[Context], list[Case]]
    providers: list[Provider]
    flops_formula: str
    bytes_formula: str
    max_input_sets: int | None = None
    notes: list[str] = field(default_factory=list)
    # GPU rows also record peak_memory_bytes (one more untimed call each): for an op whose
    # point is the memory it does not allocate
    peak_memory: bool = False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _randn(*shape, ctx: Context, dtype, requires_grad=False):
    return torch.randn(*shape, device=ctx.device, dtype=dtype).requires_grad_(requires_grad)


# ---- shared provider helpers ----------------------------------------------------------------

def _always(ctx: Context) -> str | None:
    return None


def _compile_why_not(ctx: Context) -> str | None:
    if not ctx.compile:
        return ctx.compile_note or "torch.compile left out (--compile off)"
    return None


_compiled: dict = {}


def _raise_recompile_limits() -> None:
    """A sweep recompiles per size, causal flag and grad mode: more than dynamo's default 8."""
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def compiled(fn):
    """One torch.compile wrapper per function, reused across sizes (dynamic after the first
    recompile, so a sweep compiles a few graphs, not one per size)."""
    if fn not in _compiled:
        _raise_recompile_limits()
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _fusedlm_why_not(backend: str, kernels: tuple[str, ...]) -> Callable[[Context], str | None]:
    def why_not(ctx: Context) -> str | None:
        if backend in ("cuda", "triton") and not ctx.cuda:
            return ("no CUDA GPU in this run" if backend == "cuda" else
                    "Triton kernels need a CUDA GPU here (TRITON_INTERPRET is for tests only)")
        if backend == "cpu" and ctx.cuda:
            return "the cpu backend takes CPU tensors; this run is on the GPU (--device cpu)"
        if backend == "torch" and ctx.cuda:
            return "the pure-PyTorch reference; left out on the GPU (torch-eager covers it)"
        info = ctx.backends.get(backend)
        if info is None:
            return "fusedlm.backends() does not list it"
        if not info.available:
            return info.reason
        missing = [k for k in kernels if k not in info.ops]
        if missing:
            return f"no {', '.join(missing)} kernel in this backend yet"
        return None

    return why_not


def _needs(ctx: Context, backend: str, kernel: str) -> None:
    info = ctx.backends.get(backend)
    if info is not None and kernel not in info.ops:
        raise Unsupported(f"backend {backend!r} has no {kernel} kernel yet")


def _run_pass(case: Case, forward: Callable[[dict], torch.Tensor], leaves: tuple[str, ...]):
    """fn(inputs) for a forward (no autograd) or forward+backward case. A forward that returns
    a tuple of tensors (rotary_embedding's q and k) takes a tuple of gradients, inputs["grad"]."""
    if case.pass_ == "fwd":
        def fwd(inputs):
            with torch.no_grad():
                return forward(inputs)
        return fwd

    def fwd_bwd(inputs):
        for name in leaves:
            inputs[name].grad = None
        out = forward(inputs)
        if isinstance(out, tuple):
            torch.autograd.backward(out, inputs["grad"])
        else:
            out.backward(inputs["grad"])

    return fwd_bwd


# ---- attention ------------------------------------------------------------------------------

_masks: dict = {}


def _causal_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    key = (Tq, Tk, str(device))
    if key not in _masks:  # bottom-right aligned, as fusedlm.attention(causal=True)
        _masks[key] = torch.ones(Tq, Tk, dtype=torch.bool, device=device).triu(Tk - Tq + 1)
    return _masks[key]


def _window_mask(Tq: int, Tk: int, window: int, device) -> torch.Tensor:
    """Hidden entries (True) of a causal sliding window of ``window`` keys, bottom-right."""
    key = (Tq, Tk, window, str(device))
    if key not in _masks:
        ones = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
        _masks[key] = ones.triu(Tk - Tq + 1) | ones.tril(Tk - Tq - window)
    return _masks[key]


def _hidden_mask(Tq: int, Tk: int, causal: bool, window: int | None, device, packed=None):
    """Hidden entries (True): (Tq, Tk), or None if none; a padded batch's or packed
    documents' (B, 1, Tq, Tk) mask (their inputs carry it, built once) given ``packed``, the
    inputs' "packed" entry."""
    if packed is not None:
        return packed["hidden"]
    if window is not None:
        return _window_mask(Tq, Tk, window, device)
    return _causal_mask(Tq, Tk, device) if causal else None


def _visible_mask(Tq: int, Tk: int, causal: bool, window: int | None, device, packed=None):
    """The complement of ``_hidden_mask`` (SDPA's boolean attn_mask: True attends), made once
    per mask, outside the timed calls."""
    if packed is not None:
        return packed["visible"]
    key = ("visible", Tq, Tk, causal, window, str(device))
    if key not in _masks:
        _masks[key] = ~_hidden_mask(Tq, Tk, causal, window, device)
    return _masks[key]


def padded_lengths(B: int, T: int) -> list[int]:
    """The token counts of the padded-batch rows: from T down to about T / 2, evenly."""
    return [T - b * T // (2 * B) for b in range(B)]


def _padding_inputs(B: int, T: int, causal: bool, device) -> dict:
    """A left-padded batch (as for generation): row b's tokens are its last L_b positions.
    "key_range" (B, 2) for fusedlm, "hidden" (B, 1, T, T) for the masked providers (and
    "visible", its complement, for SDPA)."""
    starts = torch.tensor([T - n for n in padded_lengths(B, T)], device=device)
    key_range = torch.stack([starts, torch.full_like(starts, T)], dim=1)
    cols = torch.arange(T, device=device)
    hidden = (cols[None, :] < starts[:, None])[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        hidden = hidden | _causal_mask(T, T, device)
    hidden = hidden.expand(B, 1, T, T).contiguous()
    return {"key_range": key_range, "hidden": hidden, "visible": ~hidden}


def document_lengths(B: int, T: int) -> list[list[int]]:
    """The packed documents' token counts per row: uneven, about T / 4 tokens on average
    (lengths T/8, 3T/8, T/4, T/4 rotated by row; the last one takes what is left)."""
    shares = [1, 3, 2, 2]
    rows = []
    for b in range(B):
        order = shares[b % 4:] + shares[:b % 4]
        lengths = [T * share // 8 for share in order[:-1]]
        rows.append([n for n in lengths + [T - sum(lengths)] if n > 0])
    return rows


def _document_inputs(B: int, T: int, device) -> dict:
    """Packed documents (causal within each): "key_range" (B, T, 2) for fusedlm, "hidden"
    (B, 1, T, T) (block-diagonal causal) for the masked providers ("visible", its complement,
    for SDPA)."""
    from ..ops.attention import key_range_from_document_ids

    ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)]
                        for row in document_lengths(B, T)], device=device)
    same = ids[:, :, None] == ids[:, None, :]  # (B, T, T)
    hidden = ~same[:, None] | _causal_mask(T, T, device)
    hidden = hidden.contiguous()
    return {"key_range": key_range_from_document_ids(ids), "hidden": hidden, "visible": ~hidden}


def _eager_scores(q, k, v, mask: torch.Tensor | None, softcap: float = 0.0):
    """The eager baselines' first half: k and v repeated for GQA, the scores q k^T / sqrt(D)
    in float32 (with ``softcap``, capped at softcap * tanh(s / softcap) first, as Gemma 2's
    eager attention) with the hidden entries (``mask`` True) at -inf. Returns (scores, v)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s, v


def eager_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float = 0.0,
                    softcap: float = 0.0):
    """Attention written out in PyTorch ops: the eager baseline (scores in float32). With
    ``dropout_p``, F.dropout(p, dropout_p, training=True) on the probabilities after the softmax,
    cast to q's dtype first (Hugging Face's eager attention with attention dropout). With
    ``softcap``, the scores capped at softcap * tanh(s / softcap) before the mask (Gemma 2's
    eager attention with attn_logit_softcapping)."""
    s, v = _eager_scores(q, k, v, mask, softcap)
    p = torch.softmax(s, dim=-1)
    if mask is not None and mask.dim() == 4:  # padded batch: rows that see no key give 0
        p = p.nan_to_num(0.0)
    p = p.to(q.dtype)
    if dropout_p:
        p = F.dropout(p, dropout_p, training=True)
    return torch.matmul(p, v)


def eager_sink_attention(q, k, v, sinks, mask: torch.Tensor | None):
    """gpt-oss's eager attention with attention sinks, written out in PyTorch ops (Hugging
    Face's GptOssAttention eager path, softmax in float32): k and v repeated for GQA, scores
    q k^T / sqrt(D) with the mask, one sink logit per query head cat'ed as a last column of
    every row, the softmax, the sink column dropped, p v. The sinks' baseline."""
    s, v = _eager_scores(q, k, v, mask)
    B, _, Tq, _ = s.shape
    sink = sinks.to(s.dtype).reshape(1, -1, 1, 1).expand(B, -1, Tq, 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(p.to(q.dtype), v)


def _attention_sizes(ctx: Context) -> tuple[int, int, int, list[int], torch.dtype]:
    """attention's (H, D, tokens per call, sequence lengths T, dtype); B = tokens // T."""
    if ctx.cuda:
        H, D, tokens = 16, 128, 16384
        seqs = [1024, 4096] if ctx.quick else [512, 1024, 2048, 4096, 8192]
    else:
        H, D = (4, 64) if ctx.quick else (8, 64)
        tokens = 512 if ctx.quick else 2048
        seqs = [128, 256] if ctx.quick else [128, 256, 512, 1024]
    return H, D, tokens, seqs, torch.bfloat16 if ctx.cuda else torch.float32


def _attention_cases(ctx: Context) -> list[Case]:
    H, D, tokens, seqs, dtype = _attention_sizes(ctx)
    # Causal sliding windows (Mistral's) of `window` keys, on sequences at least twice as long;
    # causal padded batches (left padding, rows of T down to T / 2 tokens, Hugging Face style);
    # packed documents (about four per sequence, causal within each: pretraining on packed
    # sequences, Hugging Face's DataCollatorWithFlattening).
    window = 1024 if ctx.cuda else 64
    cases = []
    for pass_ in counting.PASSES:
        for causal, win, packing in ((False, None, None), (True, None, None),
                                     (True, window, None), (True, None, "padded"),
                                     (True, None, "documents")):
            for T in (seqs if win is None else [T for T in seqs if T >= 2 * win]):
                B = max(tokens // T, 1)
                if packing == "padded" and B < 2:
                    continue

                def make(B=B, T=T, pass_=pass_, causal=causal, packing=packing):
                    grad = pass_ == "fwd+bwd"
                    inputs = {n: _randn(B, H, T, D, ctx=ctx, dtype=dtype, requires_grad=grad)
                              for n in ("q", "k", "v")}
                    if grad:
                        inputs["grad"] = _randn(B, H, T, D, ctx=ctx, dtype=dtype)
                    if packing == "padded":
                        inputs["packed"] = _padding_inputs(B, T, causal, ctx.device)
                    elif packing == "documents":
                        inputs["packed"] = _document_inputs(B, T, ctx.device)
                    return inputs

                mask = ("full" if not causal else f"window {win}" if win is not None
                        else f"causal {packing}" if packing else "causal")
                size = dict(B=B, H=H, T=T, D=D)
                if win is not None:
                    size["window"] = win
                lengths = None
                if packing == "padded":
                    size["padded"] = "left"
                    lengths = padded_lengths(B, T)
                elif packing == "documents":
                    size["documents"] = sum(len(row) for row in document_lengths(B, T))
                    lengths = [n for row in document_lengths(B, T) for n in row]
                cases.append(Case(
                    op="attention",
                    variant=f"{pass_} {dtype_name(dtype)} {mask}",
                    pass_=pass_, dtype=dtype_name(dtype), causal=causal,
                    size_label=" ".join(f"{k}={v}" for k, v in size.items()), size=size,
                    x=T,
                    flops=counting.attention_flops(B, H, T, T, D, causal, pass_, window=win,
                                                   lengths=lengths),
                    bytes=counting.attention_bytes(B, H, T, T, D, dtype, pass_),
                    make_inputs=make, check_output=pass_ == "fwd",
                ))
    # Sliding windows, padded batches and documents last: a run out of time skips them first.
    return sorted(cases, key=lambda case: bool({"window", "padded", "documents"} & set(case.size)))


_QKV = ("q", "k", "v")
_QKV_SINKS = (*_QKV, "sinks")


def _attention_provider(name, description, forward, why_not=_always, compiles=False,
                        kernel_backend=None, sinks=False):
    """``forward(q, k, v, causal, ctx, window, packed)``; with ``sinks`` (attention_sinks)
    also ``sinks=inputs["sinks"]``, a leaf whose gradient the forward+backward pass computes."""
    def build(case: Case, ctx: Context):
        if kernel_backend is not None and case.pass_ == "fwd+bwd":
            _needs(ctx, kernel_backend, "attention_bwd")
        causal, window = case.causal, case.size.get("window")
        if sinks:
            return _run_pass(case, lambda i: forward(i["q"], i["k"], i["v"], causal, ctx, window,
                                                     i.get("packed"), sinks=i["sinks"]),
                             _QKV_SINKS)
        return _run_pass(
            case, lambda i: forward(i["q"], i["k"], i["v"], causal, ctx, window, i.get("packed")),
            _QKV)

    return Provider(name, description, why_not, build, compiles=compiles)


def _eager_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    return eager_attention(q, k, v, _hidden_mask(q.shape[2], k.shape[2], causal, window,
                                                 q.device, packed))


def _compiled_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    mask = _hidden_mask(q.shape[2], k.shape[2], causal, window, q.device, packed)
    return compiled(eager_attention)(q, k, v, mask)


def _eager_sink_attention_call(q, k, v, causal, ctx, window=None, packed=None, *, sinks):
    return eager_sink_attention(q, k, v, sinks, _hidden_mask(q.shape[2], k.shape[2], causal,
                                                             window, q.device, packed))


def _compiled_sink_attention_call(q, k, v, causal, ctx, window=None, packed=None, *, sinks):
    mask = _hidden_mask(q.shape[2], k.shape[2], causal, window, q.device, packed)
    return compiled(eager_sink_attention)(q, k, v, sinks, mask)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


_sdpa_probe: dict = {}


def _sdpa_why_not(name: str, dropout_p: float = 0.0) -> Callable[[Context], str | None]:
    """Why SDPA's ``name`` backend cannot run here: a small causal forward+backward in the
    bench dtype (with ``dropout_p``, as attention_dropout calls it; torch says why a backend
    takes no dropout only in warnings, which the reason then quotes)."""
    def why_not(ctx: Context) -> str | None:
        key = (name, str(ctx.device), dropout_p)
        if key not in _sdpa_probe:
            # (the plain probe as before: its warnings, if any, shown as they come)
            recorder = warnings.catch_warnings(record=True) if dropout_p else \
                contextlib.nullcontext([])
            with recorder as warned:
                if dropout_p:
                    warnings.simplefilter("always")
                try:
                    from torch.nn.attention import sdpa_kernel

                    dtype = torch.bfloat16 if ctx.cuda else torch.float32
                    q, k, v = (_randn(1, 2, 64, 64, ctx=ctx, dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    dropout = {"dropout_p": dropout_p} if dropout_p else {}
                    with sdpa_kernel([_sdpa_backend(name)]):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       **dropout).sum().backward()
                    _sdpa_probe[key] = None
                except Exception as error:  # noqa: BLE001 - any failure: "not on this device"
                    text = str(error).strip()
                    first = text.splitlines()[0] if text else repr(error)
                    reason = f"torch's SDPA {name} backend does not run here"
                    if dropout_p:
                        said = "; ".join(dict.fromkeys(
                            str(w.message).split(" (Triggered internally")[0].strip()
                            for w in warned if "dropout" in str(w.message)))
                        reason += f" with dropout_p={dropout_p}" + (f" ({said})" if said else "")
                    _sdpa_probe[key] = f"{reason}: {first[:200]}"
        return _sdpa_probe[key]

    return why_not


def _sdpa_call(name: str, dropout_p: float = 0.0):
    def call(q, k, v, causal, ctx, window=None, packed=None):
        from torch.nn.attention import sdpa_kernel

        # GQA / MQA (k and v with fewer heads than q, as in attention_decode): SDPA's own
        # grouping, no repeated copies of k and v
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        if window is not None or packed is not None:
            if name == "flash":
                raise Unsupported("torch's SDPA flash backend takes no mask (no sliding window, "
                                  "no padding, no packed documents)")
            visible = _visible_mask(q.shape[2], k.shape[2], causal, window, q.device, packed)
            mask = {"attn_mask": visible}
        else:  # is_causal is top-left aligned: right for attention's Tq == Tk cases (the
            # decoding cases, Tq = 1, are not causal)
            mask = {"is_causal": causal}
        dropout = {"dropout_p": dropout_p} if dropout_p else {}
        try:
            with sdpa_kernel([_sdpa_backend(name)]):
                return F.scaled_dot_product_attention(q, k, v, **mask, **gqa, **dropout)
        except RuntimeError as error:  # the one allowed backend refuses this mask or shape
            # (or dropout: the CPU's flash kernel has none)
            if "No available kernel" in str(error) or "No viable backend" in str(error):
                what = f" (dropout_p={dropout_p})" if dropout_p else ""
                raise Unsupported(f"torch's SDPA {name} backend refuses it{what}: "
                                  f"{str(error).strip().splitlines()[0][:200]}") from None
            raise

    return call


def _fusedlm_attention_call(backend: str, dropout_p: float = 0.0, softcap: float = 0.0):
    def call(q, k, v, causal, ctx, window=None, packed=None, sinks=None):
        import fusedlm

        try:
            return fusedlm.attention(q, k, v, causal=causal, backend=backend,
                                     window=None if window is None else (window - 1, 0),
                                     key_range=None if packed is None else packed["key_range"],
                                     sinks=sinks, dropout_p=dropout_p, softcap=softcap or None)
        except fusedlm.BackendNotSupportedError as why:  # e.g. triton: head dim over its maximum
            raise Unsupported(str(why).split(": ", 1)[-1]) from why

    return call


@contextlib.contextmanager
def _environment_setting(name: str, value: str):
    """Environment variable ``name`` = value for the duration, then the previous value back."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def attention_sm90_setting(value: str):
    """FUSEDLM_ATTENTION_SM90=value for the duration ("0": fusedlm's CUDA attention runs its
    sm_80 kernels, forward and backward, on an sm_90 GPU too; "require": the sm_90a ones or an
    error), then the previous value back (benchmarks/gpu_check sets "0" for every later step
    when the Hopper kernels fail its smoke test, and that must outlive each case)."""
    return _environment_setting("FUSEDLM_ATTENTION_SM90", value)


def _setting_provider(name: str, description: str, variable: str, value: str,
                      why_not: Callable[[Context], str | None]) -> Provider:
    """fusedlm-cuda under ``variable``=value, over the whole pass (the backward runs after the
    forward returns, so the setting wraps each run, not just the build)."""
    inner = _attention_provider(name, "", _fusedlm_attention_call("cuda"), kernel_backend="cuda")

    def build(case: Case, ctx: Context):
        with _environment_setting(variable, value):
            run = inner.build(case, ctx)

        def run_with_setting(inputs):
            with _environment_setting(variable, value):
                return run(inputs)

        return run_with_setting

    return Provider(name, description, why_not, build)


def _sm80_attention_provider() -> Provider:
    """fusedlm-cuda with the Hopper kernels off: what the sm_90a kernels gain over the sm_80
    ones on one GPU."""
    return _setting_provider("fusedlm-cuda-sm80",
                             "fusedlm.attention(backend='cuda') under FUSEDLM_ATTENTION_SM90=0",
                             "FUSEDLM_ATTENTION_SM90", "0", _sm80_on_sm90_why_not)


def _sm80_on_sm90_why_not(ctx: Context) -> str | None:
    why = _fusedlm_why_not("cuda", ("attention_fwd",))(ctx)
    if why is None and torch.cuda.get_device_capability(ctx.device) != (9, 0):
        why = "not an sm_90 GPU: fusedlm-cuda is the sm_80 kernel already"
    return why


def _decode_providers() -> list[Provider]:
    """attention's, and fusedlm-cuda without its decoding plan (no packed query heads, no key
    split): what the plan gains on one GPU."""
    return [*_attention_providers(), _setting_provider(
        "fusedlm-cuda-no-decode-plan",
        "fusedlm.attention(backend='cuda') under FUSEDLM_ATTENTION_DECODE=0",
        "FUSEDLM_ATTENTION_DECODE", "0", _fusedlm_why_not("cuda", ("attention_fwd",)))]


def _fusedlm_attention_providers(sinks: bool = False, dropout_p: float = 0.0,
                                 softcap: float = 0.0) -> list[Provider]:
    """fusedlm-<backend>: fusedlm.attention(backend=...) (with ``sinks``: sinks=inputs["sinks"];
    with ``dropout_p``: dropout_p=dropout_p; with ``softcap``: softcap=softcap) for cuda,
    triton, cpu and torch, each where it runs (a backend that refuses a call, e.g. cuda a
    float32 one, makes its rows unsupported, with fusedlm's reason)."""
    arguments = ("sinks=sinks, " if sinks else "") + \
        (f"dropout_p={dropout_p}, " if dropout_p else "") + \
        (f"softcap={softcap}, " if softcap else "")
    return [_attention_provider(
        f"fusedlm-{backend}", f"fusedlm.attention({arguments}backend={backend!r})",
        _fusedlm_attention_call(backend, dropout_p, softcap),
        _fusedlm_why_not(backend, ("attention_fwd",)),
        kernel_backend=backend, sinks=sinks) for backend in ("cuda", "triton", "cpu", "torch")]


def _attention_providers() -> list[Provider]:
    providers = [_attention_provider(
        BASELINE, "PyTorch ops: q k^T, mask, softmax (float32), p v", _eager_attention_call)]
    providers += _fusedlm_attention_providers()
    providers.append(_sm80_attention_provider())
    for name in SDPA_BACKENDS:
        providers.append(_attention_provider(
            f"sdpa-{name}", f"F.scaled_dot_product_attention under sdpa_kernel({name})",
            _sdpa_call(name), _sdpa_why_not(name)))
    providers.append(_attention_provider(
        "torch-compile", "torch.compile of the torch-eager attention", _compiled_attention_call,
        _compile_why_not, compiles=True))
    return providers


# ---- attention_decode -----------------------------------------------------------------------

def _attention_decode_cases(ctx: Context) -> list[Case]:
    """Decoding: one query row per sequence, q (B, Hq, 1, D), against a KV cache of Tk keys,
    k/v (B, Hkv, Tk, D), GQA (Llama's 4 query heads per KV head on a GPU). Not causal: the one
    query sits at the end of the sequence and sees every key (bottom-right causal is no mask;
    SDPA's is_causal, top-left, would show it key 0 only). Memory-bound: k and v are read once."""
    if ctx.cuda:
        Hq, Hkv, D, dtype = 32, 8, 128, torch.bfloat16
        batches = (1,) if ctx.quick else (1, 8)
        lengths = (4096, 16384) if ctx.quick else (1024, 4096, 16384, 65536)
    else:
        Hq, Hkv, D, dtype = 8, 2, 64, torch.float32
        batches = (1,)
        lengths = (512, 2048) if ctx.quick else (512, 2048, 8192)
    cases = []
    for B in batches:  # one variant (plot panel) per batch size, x = Tk
        for Tk in lengths:
            def make(B=B, Tk=Tk):
                return {"q": _randn(B, Hq, 1, D, ctx=ctx, dtype=dtype),
                        "k": _randn(B, Hkv, Tk, D, ctx=ctx, dtype=dtype),
                        "v": _randn(B, Hkv, Tk, D, ctx=ctx, dtype=dtype)}

            size = dict(B=B, Hq=Hq, Hkv=Hkv, Tk=Tk, D=D)
            cases.append(Case(
                op="attention_decode",
                variant=f"fwd {dtype_name(dtype)} decode gqa {Hq // Hkv}:1 B={B}",
                pass_="fwd", dtype=dtype_name(dtype), causal=False,
                size_label=" ".join(f"{k}={v}" for k, v in size.items()), size=size, x=Tk,
                flops=counting.attention_flops(B, Hq, 1, Tk, D, False, "fwd"),
                bytes=counting.attention_bytes(B, Hq, 1, Tk, D, dtype, "fwd", Hkv=Hkv),
                make_inputs=make, check_output=True,
            ))
    return cases


# ---- attention_sinks ------------------------------------------------------------------------

def _attention_sinks_cases(ctx: Context) -> list[Case]:
    """Attention with attention sinks as gpt-oss runs it: causal, GQA, sinks (Hq,) (one learned
    logit per query head in every row's softmax, no value; a leaf whose gradient the
    forward+backward pass computes), on the full causal layers and on gpt-oss's sliding-window
    layers (a causal window of 128 keys: fusedlm's window=(127, 0)). On a GPU, gpt-oss-120b's
    attention (Hq = 64, Hkv = 8, D = 64, bf16) at 8k tokens per call, T up to 4096: the eager
    baseline holds (B, 64, T, T) float32 scores (8.6 GB at B = 2, T = 4096; its backward a few
    of those, which at T = 8192 would not fit an 80 GB GPU); on the CPU, small."""
    if ctx.cuda:
        Hq, Hkv, D, dtype, tokens, window = 64, 8, 64, torch.bfloat16, 8192, 128
        seqs = (1024, 4096) if ctx.quick else (1024, 2048, 4096)
    else:
        Hq, Hkv, D, dtype, window = 8, 2, 64, torch.float32, 64
        tokens = 512 if ctx.quick else 2048
        seqs = (128, 256) if ctx.quick else (128, 256, 512)
    cases = []
    # The sliding-window cases last (as attention's): a run out of time skips them first.
    for win in (None, window):
        for pass_ in counting.PASSES:
            for T in seqs:
                B = max(tokens // T, 1)

                def make(B=B, T=T, pass_=pass_):
                    grad = pass_ == "fwd+bwd"
                    inputs = {"q": _randn(B, Hq, T, D, ctx=ctx, dtype=dtype, requires_grad=grad),
                              "k": _randn(B, Hkv, T, D, ctx=ctx, dtype=dtype, requires_grad=grad),
                              "v": _randn(B, Hkv, T, D, ctx=ctx, dtype=dtype, requires_grad=grad)}
                    # Logits near the rows' log-sum-exps (3 +- 2 against about log(keys seen)
                    # + 0.5): the sinks take a share of every row that the output check sees.
                    sinks = 3 + 2 * _randn(Hq, ctx=ctx, dtype=dtype)
                    inputs["sinks"] = sinks.requires_grad_(grad)
                    if grad:
                        inputs["grad"] = _randn(B, Hq, T, D, ctx=ctx, dtype=dtype)
                    return inputs

                size = dict(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D)
                if win is not None:
                    size["window"] = win
                mask = "causal" if win is None else f"window {win}"
                cases.append(Case(
                    op="attention_sinks",
                    variant=f"{pass_} {dtype_name(dtype)} {mask} sinks gqa {Hq // Hkv}:1",
                    pass_=pass_, dtype=dtype_name(dtype), causal=True,
                    size_label=" ".join(f"{k}={v}" for k, v in size.items()), size=size, x=T,
                    # (the sinks add O(B Hq T) work and Hq values read: not counted)
                    flops=counting.attention_flops(B, Hq, T, T, D, True, pass_, window=win),
                    bytes=counting.attention_bytes(B, Hq, T, T, D, dtype, pass_, Hkv=Hkv),
                    make_inputs=make, check_output=pass_ == "fwd",
                ))
    return cases


def _attention_sinks_providers() -> list[Provider]:
    """gpt-oss's eager attention (the baseline), fusedlm.attention(sinks=...) on each backend,
    torch.compile of the eager version. No SDPA rows: F.scaled_dot_product_attention takes no
    sinks (a sink column needs the scores, which SDPA never returns)."""
    return [
        _attention_provider(
            BASELINE, "gpt-oss's eager attention: k, v repeated for GQA, q k^T, mask, a sink "
            "column cat'ed per head, softmax (float32), the sink column dropped, p v",
            _eager_sink_attention_call, sinks=True),
        *_fusedlm_attention_providers(sinks=True),
        _attention_provider(
            "torch-compile", "torch.compile of the torch-eager (gpt-oss) attention with sinks",
            _compiled_sink_attention_call, _compile_why_not, compiles=True, sinks=True),
    ]


# ---- attention_dropout ----------------------------------------------------------------------

def _causal_attention_cases(ctx: Context, op: str, variant: str,
                            check_output: bool) -> list[Case]:
    """``op``'s cases: attention's plain causal sizes (bf16, H = 16, D = 128, 16k tokens on a
    GPU; small float32 on the CPU), forward and forward+backward, named "<pass> <dtype> causal
    <variant>", with attention's causal FLOP and byte counts; ``check_output``: the forward
    outputs are checked against eager's."""
    H, D, tokens, seqs, dtype = _attention_sizes(ctx)
    cases = []
    for pass_ in counting.PASSES:
        for T in seqs:
            B = max(tokens // T, 1)

            def make(B=B, T=T, pass_=pass_):
                grad = pass_ == "fwd+bwd"
                inputs = {n: _randn(B, H, T, D, ctx=ctx, dtype=dtype, requires_grad=grad)
                          for n in _QKV}
                if grad:
                    inputs["grad"] = _randn(B, H, T, D, ctx=ctx, dtype=dtype)
                return inputs

            size = dict(B=B, H=H, T=T, D=D)
            cases.append(Case(
                op=op, variant=f"{pass_} {dtype_name(dtype)} causal {variant}",
                pass_=pass_, dtype=dtype_name(dtype), causal=True,
                size_label=" ".join(f"{k}={v}" for k, v in size.items()), size=size, x=T,
                flops=counting.attention_flops(B, H, T, T, D, True, pass_),
                bytes=counting.attention_bytes(B, H, T, T, D, dtype, pass_),
                make_inputs=make, check_output=check_output and pass_ == "fwd",
            ))
    return cases


def _attention_dropout_cases(ctx: Context) -> list[Case]:
    """Training-time attention with attention dropout (ATTENTION_DROPOUT_P after the softmax):
    attention's plain causal cases. Attention's causal counts: dropout adds no matmul FLOPs
    (its O(B H T^2) mask and scaling are elementwise, not counted), and the fewest bytes hold no
    mask (fusedlm's kernels regenerate it from a seed; eager and SDPA's math store one, their
    cost). No output check: the masks are random and each provider draws its own (fusedlm's
    Philox stream is not torch's), so no two providers' outputs can be compared."""
    return _causal_attention_cases(ctx, "attention_dropout", f"dropout {ATTENTION_DROPOUT_P}",
                                   check_output=False)


def _eager_dropout_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    return eager_attention(q, k, v, _hidden_mask(q.shape[2], k.shape[2], causal, window,
                                                 q.device, packed),
                           dropout_p=ATTENTION_DROPOUT_P)


def _compiled_dropout_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    mask = _hidden_mask(q.shape[2], k.shape[2], causal, window, q.device, packed)
    return compiled(eager_attention)(q, k, v, mask, dropout_p=ATTENTION_DROPOUT_P)


def _attention_dropout_providers() -> list[Provider]:
    """attention's providers with dropout_p = ATTENTION_DROPOUT_P: the eager attention with
    F.dropout on the probabilities (the baseline), fusedlm.attention(dropout_p=...) on each
    backend, SDPA's backends with dropout_p (flash
    and efficient take it on a GPU; a backend whose probe with dropout fails is left out with
    torch's reason, one that refuses a case is unsupported), torch.compile of the eager
    version. No fusedlm-cuda-sm80 (attention's table has the sm_80 kernels' speed)."""
    p = ATTENTION_DROPOUT_P
    providers = [_attention_provider(
        BASELINE, f"PyTorch ops: q k^T, mask, softmax (float32), F.dropout(p, {p}), p v",
        _eager_dropout_attention_call)]
    providers += _fusedlm_attention_providers(dropout_p=p)
    for name in SDPA_BACKENDS:
        providers.append(_attention_provider(
            f"sdpa-{name}",
            f"F.scaled_dot_product_attention(dropout_p={p}) under sdpa_kernel({name})",
            _sdpa_call(name, dropout_p=p), _sdpa_why_not(name, dropout_p=p)))
    providers.append(_attention_provider(
        "torch-compile", "torch.compile of the torch-eager attention with dropout",
        _compiled_dropout_attention_call, _compile_why_not, compiles=True))
    return providers


# ---- attention_softcap ----------------------------------------------------------------------

def _attention_softcap_cases(ctx: Context) -> list[Case]:
    """Attention with logit soft-capping (Gemma 2's attn_logit_softcapping, ATTENTION_SOFTCAP:
    each score s = scale q.k becomes softcap * tanh(s / softcap) before the mask and the
    softmax): attention's plain causal cases and counts (the cap's tanh per score is
    elementwise, not counted, as the softmax's exp is not, and reads or writes nothing more).
    Capping is deterministic: the forward outputs are checked against eager's."""
    return _causal_attention_cases(ctx, "attention_softcap", f"softcap {ATTENTION_SOFTCAP:g}",
                                   check_output=True)


def _eager_softcap_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    return eager_attention(q, k, v, _hidden_mask(q.shape[2], k.shape[2], causal, window,
                                                 q.device, packed),
                           softcap=ATTENTION_SOFTCAP)


def _compiled_softcap_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    mask = _hidden_mask(q.shape[2], k.shape[2], causal, window, q.device, packed)
    return compiled(eager_attention)(q, k, v, mask, softcap=ATTENTION_SOFTCAP)


def _softcap_score_mod(score, b, h, q_idx, kv_idx):
    """FlexAttention's score_mod for soft-capping: each scaled score s to cap * tanh(s / cap)
    (applied before the block mask's hidden entries are dropped, as the cap comes before the
    mask)."""
    return ATTENTION_SOFTCAP * torch.tanh(score / ATTENTION_SOFTCAP)


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_block_masks: dict = {}


def _flex_causal_block_mask(T: int, device):
    """FlexAttention's causal BlockMask for (T, T) self-attention, made once per length,
    outside the timed calls (its first call)."""
    key = (T, str(device))
    if key not in _block_masks:
        from torch.nn.attention.flex_attention import create_block_mask

        _block_masks[key] = create_block_mask(_causal_mask_mod, None, None, T, T, device=device)
    return _block_masks[key]


def _flex_softcap_attention_call(q, k, v, causal, ctx, window=None, packed=None):
    """torch.compile(flex_attention) with the soft-capping score_mod and a causal block mask
    (the blocks above the diagonal skipped), as FlexAttention is meant to run: uncompiled it
    materialises the scores. torch's refusals (no backward on the CPU) are unsupported rows."""
    from torch.nn.attention.flex_attention import flex_attention

    # (self-attention only: with Tq == Tk, q_idx >= kv_idx is fusedlm's bottom-right causal)
    if window is not None or packed is not None or q.shape[2] != k.shape[2]:
        raise Unsupported("the flex-attention provider covers plain self-attention only")
    block_mask = _flex_causal_block_mask(q.shape[2], q.device) if causal else None
    try:
        return compiled(flex_attention)(q, k, v, score_mod=_softcap_score_mod,
                                        block_mask=block_mask)
    except NotImplementedError as why:  # "FlexAttention does not support backward on CPU. ..."
        raise Unsupported(str(why).strip().splitlines()[0][:200]) from None


_flex_probe: dict = {}


def _flex_why_not(ctx: Context) -> str | None:
    """Why FlexAttention cannot run here: torch.compile off, or a compiled forward at
    attention_softcap's first case (its shape, dtype and block mask, under no_grad as the
    forward pass runs: the first case then reuses this compile, none is wasted) fails (no
    FlexAttention in this torch, no C++ compiler for inductor on the CPU, no Triton on the
    GPU, ...; torch's first line quoted)."""
    why = _compile_why_not(ctx)
    if why is not None:
        return why
    H, D, tokens, seqs, dtype = _attention_sizes(ctx)
    B = max(tokens // seqs[0], 1)
    key = (str(ctx.device), B, H, seqs[0], D, dtype)
    if key not in _flex_probe:
        try:
            q, k, v = (_randn(B, H, seqs[0], D, ctx=ctx, dtype=dtype) for _ in range(3))
            with torch.no_grad():
                _flex_softcap_attention_call(q, k, v, True, ctx)
            _flex_probe[key] = None
        except Exception as error:  # noqa: BLE001 - any failure: "not on this device"
            text = str(error).strip()
            first = text.splitlines()[0] if text else repr(error)
            _flex_probe[key] = f"FlexAttention does not run here: {first[:200]}"
    return _flex_probe[key]


def _attention_softcap_providers() -> list[Provider]:
    """Gemma 2's eager attention with the cap (the baseline), fusedlm.attention(softcap=...)
    on each backend, torch.compile of the eager version, and FlexAttention with a soft-capping
    score_mod (compiled). No SDPA rows: F.scaled_dot_product_attention has no soft-capping
    (the cap needs the scores, which SDPA never returns), nor fusedlm-cuda-sm80 (attention's
    table has the sm_80 kernels' speed)."""
    cap = ATTENTION_SOFTCAP
    return [
        _attention_provider(
            BASELINE, f"Gemma 2's eager attention: q k^T, {cap:g} tanh(s / {cap:g}) (float32), "
            "mask, softmax (float32), p v", _eager_softcap_attention_call),
        *_fusedlm_attention_providers(softcap=cap),
        _attention_provider(
            "torch-compile", "torch.compile of the torch-eager (Gemma 2) attention with the cap",
            _compiled_softcap_attention_call, _compile_why_not, compiles=True),
        _attention_provider(
            "flex-attention", f"torch.compile(flex_attention) with score_mod {cap:g} "
            f"tanh(score / {cap:g}) and a causal create_block_mask", _flex_softcap_attention_call,
            _flex_why_not, compiles=True),
    ]


# ---- layer_norm / rms_norm ------------------------------------------------------------------

def _norm_cases(op: str) -> Callable[[Context], list[Case]]:
    def cases(ctx: Context) -> list[Case]:
        if ctx.cuda:
            M, widths = 16384, ([1024, 4096] if ctx.quick else [512, 1024, 2048, 4096, 8192, 16384])
            dtype = torch.bfloat16
        else:
            M, widths = (512, [256, 1024]) if ctx.quick else (4096, [256, 1024, 4096])
            dtype = torch.float32
        count = {"layer_norm": counting.layer_norm_bytes, "rms_norm": counting.rms_norm_bytes,
                 "add_rms_norm": counting.add_rms_norm_bytes}[op]
        leaves = _NORM_LEAVES[op]
        out = []
        for pass_ in counting.PASSES:
            for N in widths:
                def make(N=N, pass_=pass_):
                    grad = pass_ == "fwd+bwd"
                    weight = 1 + 0.1 * _randn(N, ctx=ctx, dtype=dtype)
                    inputs = {"x": _randn(M, N, ctx=ctx, dtype=dtype, requires_grad=grad),
                              "weight": weight.requires_grad_(grad)}
                    if "bias" in leaves:
                        bias = 0.1 * _randn(N, ctx=ctx, dtype=dtype)
                        inputs["bias"] = bias.requires_grad_(grad)
                    if "residual" in leaves:
                        inputs["residual"] = _randn(M, N, ctx=ctx, dtype=dtype,
                                                    requires_grad=grad)
                    if grad:
                        inputs["grad"] = _randn(M, N, ctx=ctx, dtype=dtype)
                        if "residual" in leaves:  # (y's and h's: both outputs are read on)
                            inputs["grad"] = (inputs["grad"], _randn(M, N, ctx=ctx, dtype=dtype))
                    return inputs

                out.append(Case(
                    op=op, variant=f"{pass_} {dtype_name(dtype)}", pass_=pass_,
                    dtype=dtype_name(dtype), size_label=f"M={M} N={N}", size=dict(M=M, N=N), x=N,
                    flops=None, bytes=count(M, N, dtype, pass_), make_inputs=make,
                    check_output=pass_ == "fwd",
                ))
        return out

    return cases


_NORM_LEAVES = {"layer_norm": ("x", "weight", "bias"), "rms_norm": ("x", "weight"),
                "add_rms_norm": ("x", "residual", "weight")}


# Each takes (x, weight, bias, residual): the norms ignore residual, add_rms_norm the bias.
def _eager_layer_norm(x, w, b, r=None):
    return F.layer_norm(x, (x.shape[-1],), w, b, NORM_EPS)


def _eager_rms_norm(x, w, b, r=None):
    return F.rms_norm(x, (x.shape[-1],), w, NORM_EPS)


def _eager_add_rms_norm(x, w, b, r):
    h = x + r  # a pre-norm block's residual add, then the next norm
    return F.rms_norm(h, (h.shape[-1],), w, NORM_EPS), h


_EAGER_NORMS = {"layer_norm": _eager_layer_norm, "rms_norm": _eager_rms_norm,
                "add_rms_norm": _eager_add_rms_norm}
_TORCH_NORMS = {"layer_norm": "F.layer_norm", "rms_norm": "F.rms_norm",
                "add_rms_norm": "h = x + residual; F.rms_norm(h)"}
_LIGER_NORMS = {"layer_norm": "LigerLayerNormFunction", "rms_norm": "LigerRMSNormFunction",
                "add_rms_norm": "LigerFusedAddRMSNorm"}


def _liger_why_not(ctx: Context) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if not ctx.cuda:
        return "Liger's kernels are Triton kernels and need a CUDA GPU"
    return None


def _liger_norm(op):
    def call(x, w, b, r=None):
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return LigerLayerNormFunction.apply(x, w, b, NORM_EPS)
        if op == "add_rms_norm":
            # (the module: its function's positional arguments changed across releases)
            from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm

            module = LigerFusedAddRMSNorm(x.shape[-1], eps=NORM_EPS)
            module.weight = torch.nn.Parameter(w, requires_grad=w.requires_grad)
            return module(x, r)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x, w, NORM_EPS)

    return call


def _fusedlm_norm(op, backend):
    def call(x, w, b, r=None):
        import fusedlm

        if op == "layer_norm":
            return fusedlm.layer_norm(x, (x.shape[-1],), w, b, NORM_EPS, backend=backend)
        if op == "add_rms_norm":
            return fusedlm.add_rms_norm(x, r, (x.shape[-1],), w, NORM_EPS, backend=backend)
        return fusedlm.rms_norm(x, (x.shape[-1],), w, NORM_EPS, backend=backend)

    return call


def _norm_providers(op: str) -> list[Provider]:
    leaves = _NORM_LEAVES[op]

    def provider(name, description, fn, why_not=_always, compiles=False, kernel_backend=None):
        def build(case: Case, ctx: Context):
            if kernel_backend is not None and case.pass_ == "fwd+bwd":
                _needs(ctx, kernel_backend, f"{op}_bwd")
            f = fn() if compiles else fn
            return _run_pass(
                case, lambda i: f(i["x"], i["weight"], i.get("bias"), i.get("residual")), leaves)

        return Provider(name, description, why_not, build, compiles=compiles)

    torch_fn = _TORCH_NORMS[op]
    providers = [provider(BASELINE, torch_fn, _EAGER_NORMS[op])]
    for backend in ("cuda", "triton", "cpu", "torch"):
        providers.append(provider(
            f"fusedlm-{backend}", f"fusedlm.{op}(backend={backend!r})", _fusedlm_norm(op, backend),
            _fusedlm_why_not(backend, (f"{op}_fwd",)), kernel_backend=backend))
    providers.append(provider("liger", f"Liger-Kernel {_LIGER_NORMS[op]}", _liger_norm(op),
                              _liger_why_not))
    providers.append(provider("torch-compile", f"torch.compile({torch_fn})",
                              lambda: compiled(_EAGER_NORMS[op]), _compile_why_not, compiles=True))
    return providers


# ---- cross_entropy --------------------------------------------------------------------------

def _cross_entropy_cases(ctx: Context) -> list[Case]:
    if ctx.cuda:  # GPT-2's padded vocabulary, Llama 2's and Llama 3's; 16k / 8k tokens
        shapes = [(16384, 50304)] if ctx.quick else [(16384, 32000), (16384, 50304),
                                                     (8192, 128256)]
        dtype = torch.bfloat16
    else:
        shapes = [(512, 256), (512, 4096)] if ctx.quick else [(2048, 256), (2048, 4096),
                                                              (256, 50304)]
        dtype = torch.float32
    out = []
    for pass_ in counting.PASSES:
        for N, V in shapes:
            def make(N=N, V=V, pass_=pass_):
                logits = 3 * _randn(N, V, ctx=ctx, dtype=dtype)
                inputs = {"logits": logits.requires_grad_(pass_ == "fwd+bwd"),
                          "target": torch.randint(0, V, (N,), device=ctx.device)}
                if pass_ == "fwd+bwd":
                    inputs["grad"] = torch.ones((), device=ctx.device)
                return inputs

            out.append(Case(
                op="cross_entropy", variant=f"{pass_} {dtype_name(dtype)}", pass_=pass_,
                dtype=dtype_name(dtype), size_label=f"N={N} V={V}", size=dict(N=N, V=V), x=V,
                flops=None, bytes=counting.cross_entropy_bytes(N, V, dtype, pass_),
                make_inputs=make, check_output=pass_ == "fwd",
            ))
    return out


def _eager_cross_entropy(logits, target):
    return F.cross_entropy(logits.float(), target)


_liger_loss: list = []


def _liger_cross_entropy(logits, target):
    if not _liger_loss:  # (its module is the API stable across Liger releases)
        from liger_kernel.transformers import LigerCrossEntropyLoss

        _liger_loss.append(LigerCrossEntropyLoss())
    return _liger_loss[0](logits, target)


def _fusedlm_cross_entropy(backend):
    def call(logits, target):
        import fusedlm

        return fusedlm.cross_entropy(logits, target, backend=backend).float()

    return call


def _loss_providers(function: str, eager: str, eager_note: str, eager_fn, fusedlm_fn,
                    liger: str, liger_fn, inputs: tuple[str, ...],
                    differentiable: tuple[str, ...]) -> list[Provider]:
    """The providers of a loss op (cross_entropy, linear_cross_entropy): ``eager_fn`` (the
    baseline: the code ``eager``), ``fusedlm.<function>`` on each backend
    (``fusedlm_fn(backend)``; its cross-entropy kernels decide what serves), Liger's ``liger``
    module (``liger_fn``) and torch.compile of the eager function. Each takes the case's
    ``inputs`` in order; forward+backward differentiates ``differentiable``."""
    def provider(name, description, fn, why_not=_always, compiles=False, kernel_backend=None):
        def build(case: Case, ctx: Context):
            if kernel_backend is not None and case.pass_ == "fwd+bwd":
                _needs(ctx, kernel_backend, "cross_entropy_bwd")
            f = fn() if compiles else fn
            return _run_pass(case, lambda i: f(*(i[key] for key in inputs)), differentiable)

        return Provider(name, description, why_not, build, compiles=compiles)

    providers = [provider(BASELINE, f"{eager}: {eager_note}", eager_fn)]
    # (the cuda backend has no cross-entropy kernel: it says so)
    for backend in ("cuda", "triton", "cpu", "torch"):
        providers.append(provider(
            f"fusedlm-{backend}", f"fusedlm.{function}(backend={backend!r})",
            fusedlm_fn(backend), _fusedlm_why_not(backend, ("cross_entropy_fwd",)),
            kernel_backend=backend))
    providers.append(provider("liger", f"Liger-Kernel {liger}", liger_fn, _liger_why_not))
    providers.append(provider("torch-compile", f"torch.compile({eager})",
                              lambda: compiled(eager_fn), _compile_why_not, compiles=True))
    return providers


def _cross_entropy_providers() -> list[Provider]:
    return _loss_providers(
        "cross_entropy", "F.cross_entropy(logits.float(), target)",
        "what autocast and HF's loss run", _eager_cross_entropy, _fusedlm_cross_entropy,
        "LigerCrossEntropyLoss (writes the gradient over the logits in the forward)",
        _liger_cross_entropy, ("logits", "target"), ("logits",))


# ---- linear_cross_entropy -------------------------------------------------------------------

def _linear_cross_entropy_cases(ctx: Context) -> list[Case]:
    """The LM head and its loss: hidden states (N, C), weight (V, C), target (N); x = V * C.
    On a GPU, 16k tokens at GPT-2 124M's width and padded vocabulary, a 2048-wide model on the
    same vocabulary (Pythia 1.4B's) and Llama 3 8B's width and vocabulary."""
    if ctx.cuda:
        shapes = [(16384, 768, 50304)] if ctx.quick else [(16384, 768, 50304),
                                                          (16384, 2048, 50304),
                                                          (16384, 4096, 128256)]
        dtype = torch.bfloat16
    else:
        shapes = [(256, 64, 2048), (256, 128, 8192)] if ctx.quick else [
            (512, 128, 4096), (512, 256, 8192), (512, 512, 16384)]
        dtype = torch.float32
    out = []
    for pass_ in counting.PASSES:
        for N, C, V in shapes:
            def make(N=N, C=C, V=V, pass_=pass_):
                grad = pass_ == "fwd+bwd"
                # weights at 1/sqrt(C): logits of order 1, as a trained head gives
                weight = _randn(V, C, ctx=ctx, dtype=dtype) / math.sqrt(C)
                inputs = {"hidden": _randn(N, C, ctx=ctx, dtype=dtype, requires_grad=grad),
                          "weight": weight.requires_grad_(grad),
                          "target": torch.randint(0, V, (N,), device=ctx.device)}
                if grad:
                    inputs["grad"] = torch.ones((), device=ctx.device)
                return inputs

            out.append(Case(
                op="linear_cross_entropy", variant=f"{pass_} {dtype_name(dtype)}", pass_=pass_,
                dtype=dtype_name(dtype), size_label=f"N={N} C={C} V={V}",
                size=dict(N=N, C=C, V=V), x=V * C,
                flops=counting.linear_cross_entropy_flops(N, C, V, pass_), bytes=None,
                make_inputs=make, check_output=pass_ == "fwd",
            ))
    # The Llama-sized rows (each call ~0.1 s on an H100, and the most memory) last: a run
    # short of time skips them first.
    return sorted(out, key=lambda case: case.size["V"] > 65536)


def _eager_linear_cross_entropy(hidden, weight, target):
    """What eager training code writes (nanoGPT under autocast, transformers' loss): the
    (N, V) logits in the hidden states' dtype, a float32 copy, F.cross_entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), target)


_liger_linear_loss: list = []


def _liger_linear_cross_entropy(hidden, weight, target):
    if not _liger_linear_loss:  # (its module is the API stable across Liger releases)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        _liger_linear_loss.append(LigerFusedLinearCrossEntropyLoss())
    return _liger_linear_loss[0](weight, hidden, target)  # (the weight first, Liger's order)


def _fusedlm_linear_cross_entropy(backend):
    def call(hidden, weight, target):
        import fusedlm

        return fusedlm.linear_cross_entropy(hidden, weight, target, backend=backend)

    return call


def _linear_cross_entropy_providers() -> list[Provider]:
    # (the matmuls are torch's in every fusedlm provider; the backend serves each chunk's
    # cross-entropy)
    return _loss_providers(
        "linear_cross_entropy", "F.cross_entropy(F.linear(hidden, weight).float(), target)",
        "the (N, V) logits and a float32 copy", _eager_linear_cross_entropy,
        _fusedlm_linear_cross_entropy,
        "LigerFusedLinearCrossEntropyLoss (chunked, the gradients in the forward)",
        _liger_linear_cross_entropy, ("hidden", "weight", "target"), ("hidden", "weight"))


# ---- rotary_embedding -----------------------------------------------------------------------

ROPE_THETA = 10000.0


def rope_tables(T: int, D: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, D/2) of Llama's angles (position t, pair i: t / theta^(2i / D)),
    computed in float32, in ``dtype``."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotary_cases(ctx: Context) -> list[Case]:
    """One attention layer's q (B, Hq, T, D) and k (B, Hkv, T, D) rotated together, each a
    view of its (B, T, H, D) projection (Hugging Face Llama's ``view(...).transpose(1, 2)``),
    full rotary (R = D), one angle table for the batch; x = T, B * T fixed. On a GPU, Llama 3
    8B's heads (32 query, 8 key, D = 128) in bf16 at 16k tokens."""
    if ctx.cuda:
        Hq, Hkv, D, tokens, dtype = 32, 8, 128, 16384, torch.bfloat16
        seqs = [1024, 4096] if ctx.quick else [1024, 2048, 4096, 8192, 16384]
    elif ctx.quick:
        Hq, Hkv, D, tokens, dtype = 8, 2, 64, 1024, torch.float32
        seqs = [128, 512]
    else:
        Hq, Hkv, D, tokens, dtype = 32, 8, 128, 2048, torch.float32
        seqs = [256, 512, 1024, 2048]
    out = []
    for pass_ in counting.PASSES:
        for T in seqs:
            B = max(tokens // T, 1)

            def make(B=B, T=T, pass_=pass_):
                grad = pass_ == "fwd+bwd"
                cos, sin = rope_tables(T, D, dtype, ctx.device)
                inputs = {
                    name: _randn(B, T, H, D, ctx=ctx, dtype=dtype).transpose(1, 2)
                    .requires_grad_(grad) for name, H in (("q", Hq), ("k", Hkv))}
                # fusedlm's (T, D/2) tables, and Hugging Face's (1, T, D) ones (each angle
                # twice, as LlamaRotaryEmbedding returns them), which eager code and Liger take
                inputs.update(cos=cos, sin=sin, cos_full=torch.cat((cos, cos), -1)[None],
                              sin_full=torch.cat((sin, sin), -1)[None])
                if grad:
                    inputs["grad"] = (_randn(B, Hq, T, D, ctx=ctx, dtype=dtype),
                                      _randn(B, Hkv, T, D, ctx=ctx, dtype=dtype))
                return inputs

            size = dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D)
            out.append(Case(
                op="rotary_embedding", variant=f"{pass_} {dtype_name(dtype)}", pass_=pass_,
                dtype=dtype_name(dtype), size_label=" ".join(f"{k}={v}" for k, v in size.items()),
                size=size, x=T, flops=None,
                bytes=counting.rotary_embedding_bytes(B, Hq + Hkv, T, D, dtype, pass_),
                make_inputs=make, check_output=pass_ == "fwd",
            ))
    return out


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rotary(q, k, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb: cos and sin (1 or B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _liger_rotary(q, k, cos, sin):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb(q, k, cos, sin)


def _fusedlm_rotary(backend):
    def call(q, k, cos, sin):
        import fusedlm

        try:
            return (fusedlm.rotary_embedding(q, cos, sin, backend=backend),
                    fusedlm.rotary_embedding(k, cos, sin, backend=backend))
        except fusedlm.BackendNotSupportedError as why:
            raise Unsupported(str(why).split(": ", 1)[-1]) from why

    return call


def _rotary_providers() -> list[Provider]:
    def provider(name, description, fn, tables, why_not=_always, compiles=False,
                 mutates_inputs=False):
        cos, sin = tables

        def build(case: Case, ctx: Context):
            f = fn() if compiles else fn
            return _run_pass(case, lambda i: f(i["q"], i["k"], i[cos], i[sin]), ("q", "k"))

        return Provider(name, description, why_not, build, compiles=compiles,
                        mutates_inputs=mutates_inputs)

    full, half = ("cos_full", "sin_full"), ("cos", "sin")
    eager = ("Hugging Face Llama's apply_rotary_pos_emb: q * cos + rotate_half(q) * sin (and k), "
             "cos and sin (1, T, D)")
    providers = [provider(BASELINE, eager, eager_rotary, full)]
    for backend in ("cuda", "triton", "cpu", "torch"):
        providers.append(provider(
            f"fusedlm-{backend}",
            f"fusedlm.rotary_embedding(x, cos, sin, backend={backend!r}) for q, then for k "
            "(cos and sin (T, D/2))", _fusedlm_rotary(backend), half,
            _fusedlm_why_not(backend, ("rotary_embedding",))))
    # (last of the first pass: it rotates the shared input sets' q and k in place)
    providers.append(provider(
        "liger", "Liger-Kernel liger_rotary_pos_emb(q, k, cos, sin): q and k in one call, "
        "rotated in place in their (B, T, H, D) storage (cos and sin (1, T, D))", _liger_rotary,
        full, _liger_why_not, mutates_inputs=True))
    providers.append(provider("torch-compile", "torch.compile of the torch-eager rotation",
                              lambda: compiled(eager_rotary), full, _compile_why_not,
                              compiles=True))
    return providers


# ---- swiglu / geglu -------------------------------------------------------------------------

# Per op: N on a GPU and on the CPU, then the intermediate sizes (quick, full) of each.
_GLU_SIZES = {
    # Llama's MLPs: up to Llama 2 7B's (11008) and Llama 3 8B's (14336)
    "swiglu": {"cuda": (16384, [4096, 14336], [2048, 4096, 8192, 11008, 14336]),
               "cpu": ((256, [512, 2048]), (1024, [1024, 4096, 11008]))},
    # Gemma's MLPs: Gemma 3 1B's (6912), Gemma 2 2B's (9216), Gemma 2B's (16384), Gemma 7B's
    # (24576)
    "geglu": {"cuda": (16384, [6912, 16384], [2048, 6912, 9216, 16384, 24576]),
              "cpu": ((256, [512, 2048]), (1024, [1024, 4096, 9216]))},
}


def _glu_cases(op: str) -> Callable[[Context], list[Case]]:
    """gate and up (N, I), the outputs of a gated MLP's gate_proj and up_proj (contiguous);
    x = I. On a GPU, 16k tokens at Llama's (swiglu) or Gemma's (geglu) intermediate sizes,
    bf16."""
    def cases(ctx: Context) -> list[Case]:
        if ctx.cuda:
            N, quick, full = _GLU_SIZES[op]["cuda"]
            widths, dtype = (quick if ctx.quick else full), torch.bfloat16
        else:
            quick, full = _GLU_SIZES[op]["cpu"]
            (N, widths), dtype = (quick if ctx.quick else full), torch.float32
        out = []
        for pass_ in counting.PASSES:
            for width in widths:
                def make(width=width, pass_=pass_):
                    grad = pass_ == "fwd+bwd"
                    inputs = {name: _randn(N, width, ctx=ctx, dtype=dtype, requires_grad=grad)
                              for name in ("gate", "up")}
                    if grad:
                        inputs["grad"] = _randn(N, width, ctx=ctx, dtype=dtype)
                    return inputs

                out.append(Case(
                    op=op, variant=f"{pass_} {dtype_name(dtype)}", pass_=pass_,
                    dtype=dtype_name(dtype), size_label=f"N={N} I={width}",
                    size=dict(N=N, I=width), x=width, flops=None,
                    bytes=counting.glu_bytes(N, width, dtype, pass_), make_inputs=make,
                    check_output=pass_ == "fwd",
                ))
        return out

    return cases


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _liger_swiglu(gate, up):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def _liger_geglu(gate, up):
    from liger_kernel.ops.geglu import LigerGELUMulFunction  # (tanh gelu, Gemma's)

    return LigerGELUMulFunction.apply(gate, up)


def _fusedlm_glu(op: str, backend: str):
    def call(gate, up):
        import fusedlm

        if op == "swiglu":
            return fusedlm.swiglu(gate, up, backend=backend)
        return fusedlm.geglu(gate, up, approximate="tanh", backend=backend)

    return call


# op: (eager function, its code, fusedlm's call, Liger's function and its name)
_GLU_PROVIDERS = {
    "swiglu": (eager_swiglu, "F.silu(gate) * up", "fusedlm.swiglu(gate, up, backend={!r})",
               _liger_swiglu, "LigerSiLUMulFunction"),
    "geglu": (eager_geglu, 'F.gelu(gate, approximate="tanh") * up',
              'fusedlm.geglu(gate, up, approximate="tanh", backend={!r})', _liger_geglu,
              "LigerGELUMulFunction"),
}


def _glu_providers(op: str) -> list[Provider]:
    eager, code, fused_call, liger, liger_name = _GLU_PROVIDERS[op]

    def provider(name, description, fn, why_not=_always, compiles=False, kernel_backend=None,
                 mutates_inputs=False):
        def build(case: Case, ctx: Context):
            if kernel_backend is not None and case.pass_ == "fwd+bwd":
                _needs(ctx, kernel_backend, "glu_bwd")
            f = fn() if compiles else fn
            return _run_pass(case, lambda i: f(i["gate"], i["up"]), ("gate", "up"))

        return Provider(name, description, why_not, build, compiles=compiles,
                        mutates_inputs=mutates_inputs)

    act = "silu(gate)" if op == "swiglu" else "gelu(gate)"
    providers = [provider(BASELINE, f"{code} (autograd keeps {act})", eager)]
    for backend in ("cuda", "triton", "cpu", "torch"):
        providers.append(provider(
            f"fusedlm-{backend}", fused_call.format(backend), _fusedlm_glu(op, backend),
            _fusedlm_why_not(backend, ("glu_fwd",)), kernel_backend=backend))
    # (last of the first pass: its backward writes over the shared input sets' gate and up)
    providers.append(provider(
        "liger", f"Liger-Kernel {liger_name}.apply(gate, up) (its backward writes dgate "
        "and dup over gate and up)", liger, _liger_why_not, mutates_inputs=True))
    providers.append(provider("torch-compile", f"torch.compile({code})",
                              lambda: compiled(eager), _compile_why_not, compiles=True))
    return providers


# ---- adamw ----------------------------------------------------------------------------------

def gpt2_param_shapes(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple]:
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
                   (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def _adamw_cases(ctx: Context) -> list[Case]:
    if ctx.cuda:
        configs = [("16 x 1M", [(1 << 20,)] * 16), ("gpt2-124m", gpt2_param_shapes(768, 12))]
        if not ctx.quick:
            configs = [("64 x 16K", [(1 << 14,)] * 64)] + configs + \
                      [("gpt2-350m", gpt2_param_shapes(1024, 24))]
    elif ctx.quick:
        configs = [("16 x 16K", [(1 << 14,)] * 16), ("4 x 256K", [(1 << 18,)] * 4)]
    else:
        configs = [("64 x 16K", [(1 << 14,)] * 64), ("16 x 1M", [(1 << 20,)] * 16),
                   ("gpt2-124m", gpt2_param_shapes(768, 12))]
    cases = []
    for label, shapes in configs:
        numel = sum(math.prod(s) for s in shapes)

        def make(shapes=shapes):
            params = [torch.nn.Parameter(torch.randn(s, device=ctx.device)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            return {"params": params}

        cases.append(Case(
            op="adamw", variant="step float32", pass_="step", dtype="float32",
            size_label=f"{label} ({len(shapes)} tensors, {numel / 1e6:.1f}M params)",
            size=dict(tensors=len(shapes), params=numel), x=numel,
            flops=counting.adamw_flops(numel), bytes=counting.adamw_bytes(numel), make_inputs=make,
        ))
    return cases


_torch_fused_probe: dict = {}


def _torch_fused_why_not(ctx: Context) -> str | None:
    key = str(ctx.device)
    if key not in _torch_fused_probe:
        try:
            p = torch.nn.Parameter(torch.ones(4, device=ctx.device))
            p.grad = torch.ones_like(p)
            torch.optim.AdamW([p], fused=True).step()
            _torch_fused_probe[key] = None
        except Exception as error:  # noqa: BLE001
            _torch_fused_probe[key] = f"torch.optim.AdamW(fused=True) does not run here: {error}"
    return _torch_fused_probe[key]


def _adamw_provider(name, description, make_opt, why_not=_always, compiles=False,
                    max_input_sets=None):
    def build(case: Case, ctx: Context):
        opts: dict[int, Callable] = {}

        def step(inputs):
            key = id(inputs["params"])
            if key not in opts:
                opt = make_opt(inputs["params"])
                opts[key] = compiled_step(opt) if compiles else opt.step
            opts[key]()

        return step

    return Provider(name, description, why_not, build, compiles=compiles,
                    max_input_sets=max_input_sets)


def compiled_step(opt):
    _raise_recompile_limits()

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    return step


def _adamw_providers() -> list[Provider]:
    lr = 1e-3
    providers = [_adamw_provider(
        BASELINE, "torch.optim.AdamW(foreach=False, fused=False): one tensor at a time",
        lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=False, fused=False))]
    for backend in ("cuda", "triton", "cpu", "torch"):
        def make(ps, backend=backend):
            import fusedlm

            return fusedlm.optim.AdamW(ps, lr=lr, backend=backend)

        providers.append(_adamw_provider(
            f"fusedlm-{backend}", f"fusedlm.optim.AdamW(backend={backend!r})", make,
            _fusedlm_why_not(backend, ("adamw_step",))))
    providers += [
        _adamw_provider("torch-foreach", "torch.optim.AdamW(foreach=True)",
                        lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True)),
        _adamw_provider("torch-fused", "torch.optim.AdamW(fused=True)",
                        lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True), _torch_fused_why_not),
        _adamw_provider("torch-compile", "torch.compile of torch.optim.AdamW(foreach=False).step",
                        lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=False, fused=False),
                        _compile_why_not, compiles=True, max_input_sets=1),
    ]
    return providers


# ---- gpt training step ----------------------------------------------------------------------

_GPT_IMPORT_ERROR: list[str] = []


def gpt_module():
    """fusedlm.models, or None (with the reason in gpt_unavailable()) while it does not exist."""
    try:
        from fusedlm import models

        models.GPT, models.GPTConfig  # noqa: B018 - both must exist
        return models
    except Exception as error:  # noqa: BLE001 - a missing or half-written module
        why = f"{type(error).__name__}: {error}"
        _GPT_IMPORT_ERROR[:] = [f"fusedlm.models is not available ({why})"]
        return None


def gpt_unavailable() -> str | None:
    return None if gpt_module() is not None else _GPT_IMPORT_ERROR[0]


def _gpt_cases(ctx: Context) -> list[Case]:
    models = gpt_module()
    if models is None:
        return []
    if ctx.cuda:
        configs = [("gpt2-124m", 8, 1024)] if ctx.quick else \
            [("small", 16, 512), ("gpt2-124m", 8, 1024), ("gpt2-350m", 4, 1024)]
    else:
        configs = [("tiny", 4, 64)] if ctx.quick else [("tiny", 8, 128), ("small", 2, 256)]
    cases = []
    for preset, B, T in configs:
        cfg = models.GPTConfig.preset(preset)
        with torch.device("meta"):
            meta = models.GPT(cfg, kernels="torch")
        n_params = meta.num_parameters() if hasattr(meta, "num_parameters") else \
            sum(p.numel() for p in meta.parameters())
        if hasattr(meta, "flops_per_token"):
            per_token = meta.flops_per_token(T)
        else:
            per_token = counting.gpt_flops_per_token(n_params, cfg.n_layer, T, cfg.n_embd)
        del meta

        def make(cfg=cfg, B=B, T=T):
            idx = torch.randint(0, cfg.vocab_size, (B, T), device=ctx.device)
            targets = torch.randint(0, cfg.vocab_size, (B, T), device=ctx.device)
            return {"idx": idx, "targets": targets}

        dtype = "bfloat16 autocast" if ctx.cuda else "float32"
        cases.append(Case(
            op="gpt", variant=f"train step {dtype}", pass_="train step", dtype=dtype,
            size_label=f"{preset} B={B} T={T} ({n_params / 1e6:.1f}M params)",
            size=dict(preset=preset, B=B, T=T, params=n_params), x=n_params,
            flops=counting.gpt_step_flops(per_token, B, T), bytes=None, make_inputs=make,
            tokens=B * T, extra={"config": cfg},
        ))
    return cases


@contextlib.contextmanager
def _backend_env(backend: str | None):
    if backend is None:
        yield
        return
    old = os.environ.get("FUSEDLM_BACKEND")
    os.environ["FUSEDLM_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FUSEDLM_BACKEND", None)
        else:
            os.environ["FUSEDLM_BACKEND"] = old


_GPT_KERNELS = ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "adamw_step")


def _gpt_provider(name, description, kernels, backend=None, compile_model=False, why_not=_always,
                  patch_model=False):
    def build(case: Case, ctx: Context):
        models = gpt_module()
        cfg = case.extra["config"]
        with _backend_env(backend), torch.device(ctx.device):
            model = models.GPT(cfg, kernels=kernels)
        if patch_model:
            import fusedlm

            fusedlm.patch(model, attention=True)
        if backend is not None:
            import fusedlm

            opt = fusedlm.optim.AdamW(model.parameters(), lr=1e-4, backend=backend)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if compile_model else model
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ctx.cuda else \
            contextlib.nullcontext

        def step(inputs):
            with _backend_env(backend):
                with autocast():
                    _, loss = forward(inputs["idx"], inputs["targets"])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    def available(ctx: Context) -> str | None:
        reason = gpt_unavailable() or why_not(ctx)
        return reason

    return Provider(name, description, available, build, compiles=compile_model, max_input_sets=1)


def _gpt_providers() -> list[Provider]:
    providers = [_gpt_provider(BASELINE, 'GPT(kernels="torch") + torch.optim.AdamW()', "torch")]
    for backend in ("cuda", "triton", "cpu"):
        providers.append(_gpt_provider(
            f"fusedlm-{backend}",
            f'GPT(kernels="fused"), FUSEDLM_BACKEND={backend}, fusedlm.optim.AdamW',
            "fused", backend=backend, why_not=_fusedlm_why_not(backend, _GPT_KERNELS)))
    providers.append(_gpt_provider(
        "fusedlm-patch", 'GPT(kernels="torch") after fusedlm.patch(model, attention=True) '
        "(the drop-in path for a model's own code), torch.optim.AdamW()", "torch",
        patch_model=True))
    providers.append(_gpt_provider(
        "torch-compile", 'torch.compile(GPT(kernels="torch")) + torch.optim.AdamW()', "torch",
        compile_model=True, why_not=_compile_why_not))
    return providers


# ---- the registry ---------------------------------------------------------------------------

def specs() -> dict[str, OpSpec]:
    attn_flops = "4*B*H*Tq*Tk*D forward, 2.5x that backward, half of each when causal"
    return {
        "attention": OpSpec(
            "attention", "softmax(q k^T / sqrt(D)) v, (B, H, T, D), forward and forward+backward",
            "TFLOP/s", "matmul", "sequence length T (B*T fixed)", _attention_cases,
            _attention_providers(), attn_flops,
            "fwd: q, k, v read, out written; fwd+bwd adds out, dout, logsumexp read, "
            "dq, dk, dv written"),
        "attention_decode": OpSpec(
            "attention_decode",
            "decoding: one query row per sequence, q (B, Hq, 1, D), against a KV cache "
            "k/v (B, Hkv, Tk, D), GQA, no mask; forward",
            "GB/s", "bandwidth", "cached keys Tk", _attention_decode_cases,
            _decode_providers(), "4*B*Hq*Tk*D (one query row)",
            "q read, k and v read once (Hkv heads, not once per query head), out written"),
        "attention_sinks": OpSpec(
            "attention_sinks",
            "attention with attention sinks (gpt-oss): causal, q (B, Hq, T, D), k/v (B, Hkv, T, "
            "D), GQA, sinks (Hq,) (one learned logit per query head in every row's softmax, no "
            "value; its gradient part of the backward), full causal and gpt-oss's 128-key "
            "sliding window; forward and forward+backward. No SDPA rows: "
            "F.scaled_dot_product_attention takes no sinks",
            "TFLOP/s", "matmul", "sequence length T (B*T fixed)", _attention_sinks_cases,
            _attention_sinks_providers(),
            attn_flops + " (the window's visible pairs counted exactly; the sinks' O(B*Hq*T) "
            "not counted)",
            "attention's with k and v of Hkv heads (the Hq sinks and their gradient not "
            "counted)"),
        "attention_dropout": OpSpec(
            "attention_dropout",
            f"training-time attention with attention dropout (dropout_p = {ATTENTION_DROPOUT_P} "
            "after the softmax): causal self-attention, (B, H, T, D), attention's causal sizes; "
            "forward and forward+backward. Outputs not checked against eager's: each provider "
            "draws its own random mask",
            "TFLOP/s", "matmul", "sequence length T (B*T fixed)", _attention_dropout_cases,
            _attention_dropout_providers(),
            attn_flops + " (causal; dropout adds no matmul FLOPs, its elementwise work not "
            "counted)",
            "attention's (no mask counted: fusedlm's kernels regenerate it from a seed)"),
        "attention_softcap": OpSpec(
            "attention_softcap",
            f"attention with logit soft-capping (Gemma 2's attn_logit_softcapping = "
            f"{ATTENTION_SOFTCAP:g}: each score s = scale q.k becomes {ATTENTION_SOFTCAP:g} "
            f"tanh(s / {ATTENTION_SOFTCAP:g}) before the mask and the softmax): causal "
            "self-attention, (B, H, T, D), attention's causal sizes; forward and "
            "forward+backward. No SDPA rows: F.scaled_dot_product_attention has no "
            "soft-capping",
            "TFLOP/s", "matmul", "sequence length T (B*T fixed)", _attention_softcap_cases,
            _attention_softcap_providers(),
            attn_flops + " (causal; the cap's tanh per score is elementwise, not counted)",
            "attention's (the cap reads and writes nothing more)"),
        "layer_norm": OpSpec(
            "layer_norm", "LayerNorm over the last dim of (M, N), weight and bias",
            "GB/s", "bandwidth", "hidden size N", _norm_cases("layer_norm"),
            _norm_providers("layer_norm"), "not counted (memory-bound)",
            "fwd: (2MN + 2N) elements; bwd: (3MN + 3N) elements"),
        "rms_norm": OpSpec(
            "rms_norm", "RMSNorm over the last dim of (M, N), weight",
            "GB/s", "bandwidth", "hidden size N", _norm_cases("rms_norm"),
            _norm_providers("rms_norm"), "not counted (memory-bound)",
            "fwd: (2MN + N) elements; bwd: (3MN + 2N) elements"),
        "add_rms_norm": OpSpec(
            "add_rms_norm", "a pre-norm block's residual add and the next RMSNorm: h = x + "
            "residual, y = RMSNorm(h), both returned; x, residual (M, N), weight",
            "GB/s", "bandwidth", "hidden size N", _norm_cases("add_rms_norm"),
            _norm_providers("add_rms_norm"), "not counted (memory-bound)",
            "fwd: (4MN + N) elements; bwd: (4MN + 2N) elements"),
        "cross_entropy": OpSpec(
            "cross_entropy", "mean cross-entropy of (N, V) logits against (N) int64 targets",
            "GB/s", "bandwidth", "vocabulary size V", _cross_entropy_cases,
            _cross_entropy_providers(), "not counted (memory-bound)",
            "fwd: logits and targets read (N V elements + 8 N bytes); bwd: logits read, "
            "dlogits written (2 N V elements + 8 N bytes)"),
        "linear_cross_entropy": OpSpec(
            "linear_cross_entropy",
            "the LM head and its mean cross-entropy: hidden states (N, C), weight (V, C), "
            "(N) int64 targets, no bias; forward and forward+backward (gradients of the hidden "
            "states and the weight)",
            "TFLOP/s", "matmul", "LM head size V x C", _linear_cross_entropy_cases,
            _linear_cross_entropy_providers(),
            "2*N*V*C forward, 6*N*V*C forward+backward (the three matmuls, unfused: a "
            "recomputing implementation gets no credit for its extra work)",
            "not counted (matmul-bound; the GPU rows' peak_memory_bytes is the point)",
            peak_memory=True),
        "rotary_embedding": OpSpec(
            "rotary_embedding",
            "rotary position embeddings (RoPE, rotate_half pairs, R = D) of one attention "
            "layer's q (B, Hq, T, D) and k (B, Hkv, T, D), views of the (B, T, H, D) "
            "projections, one (T, D/2) angle table for the batch; forward and "
            "forward+backward",
            "GB/s", "bandwidth", "sequence length T (B*T fixed)", _rotary_cases,
            _rotary_providers(), "not counted (memory-bound)",
            "fwd: q and k read, their outputs written (2 B (Hq + Hkv) T D elements), cos and sin "
            "read once (T D elements); fwd+bwd: twice that (dout read, dx written, the tables "
            "read again)",
            notes=["The providers rotate q and k together: fusedlm in two calls (one per "
                   "tensor), Liger in one (in place, returning views of q's and k's storage); "
                   "eager and torch.compile write new tensors."]),
        "swiglu": OpSpec(
            "swiglu", "silu(gate) * up, gate and up (N, I) (the Llama MLP's activation); "
            "forward and forward+backward",
            "GB/s", "bandwidth", "intermediate size I", _glu_cases("swiglu"),
            _glu_providers("swiglu"), "not counted (memory-bound)",
            "fwd: gate and up read, out written (3 N I elements); bwd: dout, gate, up read, "
            "dgate, dup written (5 N I elements)"),
        "geglu": OpSpec(
            "geglu", "gelu(gate, approximate='tanh') * up, gate and up (N, I) (the Gemma MLP's "
            "activation); forward and forward+backward",
            "GB/s", "bandwidth", "intermediate size I", _glu_cases("geglu"),
            _glu_providers("geglu"), "not counted (memory-bound)",
            "fwd: gate and up read, out written (3 N I elements); bwd: dout, gate, up read, "
            "dgate, dup written (5 N I elements)"),
        "adamw": OpSpec(
            "adamw", "one AdamW step over a list of float32 parameters (lr 1e-3, wd 1e-2)",
            "GB/s", "bandwidth", "parameters", _adamw_cases, _adamw_providers(),
            "about 16 per parameter (memory-bound)",
            "28 bytes per parameter: param, exp_avg, exp_avg_sq read and written, grad read"),
        "gpt": OpSpec(
            "gpt", "one GPT training step: forward, backward, AdamW step, zero_grad",
            "TFLOP/s", "matmul", "non-embedding parameters", _gpt_cases, _gpt_providers(),
            "model.flops_per_token(T) * B * T (6 N + 6 L T C per token)", "not counted",
            max_input_sets=1),
    }
