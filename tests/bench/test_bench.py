"""The benchmark harness (fusedlm.bench): FLOP and byte counts, timing statistics, the JSON
schema, ratios computed from measured rows, `fusedlm bench --quick` end to end on the CPU, and
the README section rendered from recorded runs."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusedlm.bench import cases as C
from fusedlm.bench import counting, runner, schema, timing
from fusedlm.bench.env import tree_hash

ROOT = Path(__file__).resolve().parents[2]
OPS = ("attention", "attention_decode", "layer_norm", "rms_norm", "add_rms_norm", "cross_entropy",
       "linear_cross_entropy", "rotary_embedding", "swiglu", "geglu", "adamw", "gpt",
       "attention_sinks", "attention_dropout", "attention_softcap")


# ---- counting -------------------------------------------------------------------------------

def test_attention_flops_follow_the_issue_formula():
    B, H, T, D = 2, 3, 5, 7
    fwd = 4 * B * H * T * T * D
    assert counting.attention_flops(B, H, T, T, D, False, "fwd") == fwd
    assert counting.attention_flops(B, H, T, T, D, False, "fwd+bwd") == fwd + 2.5 * fwd
    assert counting.attention_flops(B, H, T, T, D, True, "fwd") == fwd / 2
    assert counting.attention_flops(B, H, T, T, D, True, "fwd+bwd") == 3.5 * fwd / 2
    with pytest.raises(ValueError, match="pass"):
        counting.attention_flops(B, H, T, T, D, False, "bwd")


@pytest.mark.parametrize(("Tq", "Tk", "window"), [(64, 64, 16), (40, 100, 30), (100, 40, 30),
                                                   (50, 50, 80), (1, 300, 64)])
def test_attention_flops_of_a_sliding_window_count_visible_pairs(Tq, Tk, window):
    """4 * B * H * D per (query, key) pair the causal sliding window shows, bottom-right."""
    B, H, D = 2, 3, 16
    p = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    pairs = int(((j <= p) & (j > p - window)).sum())
    fwd = 4.0 * B * H * D * pairs
    assert counting.attention_flops(B, H, Tq, Tk, D, True, "fwd", window=window) == fwd
    assert counting.attention_flops(B, H, Tq, Tk, D, True, "fwd+bwd", window=window) == 3.5 * fwd


def test_bytes_are_each_input_read_once_and_each_output_written_once():
    B, H, T, D, e = 2, 3, 5, 8, 2  # bfloat16
    qkvo = 4 * B * H * T * D * e
    assert counting.attention_bytes(B, H, T, T, D, torch.bfloat16, "fwd") == qkvo
    lse = B * H * T * 4
    # fwd (q k v read, o lse written) + bwd (q k v o do lse read, dq dk dv written)
    assert counting.attention_bytes(B, H, T, T, D, torch.bfloat16, "fwd+bwd") == \
        qkvo + lse + (5 * B * H * T * D * e + lse) + 3 * B * H * T * D * e
    # GQA: k and v have Hkv heads
    assert counting.attention_bytes(B, 4, T, T, D, torch.float32, "fwd", Hkv=1) == \
        (2 * B * 4 * T * D + 2 * B * 1 * T * D) * 4
    M, N = 6, 10
    assert counting.layer_norm_bytes(M, N, torch.float32, "fwd") == (2 * M * N + 2 * N) * 4
    assert counting.layer_norm_bytes(M, N, torch.float32, "fwd+bwd") == \
        (2 * M * N + 2 * N + 3 * M * N + 3 * N) * 4
    assert counting.rms_norm_bytes(M, N, torch.float16, "fwd") == (2 * M * N + N) * 2
    assert counting.rms_norm_bytes(M, N, torch.float16, "fwd+bwd") == \
        (2 * M * N + N + 3 * M * N + 2 * N) * 2
    # cross-entropy: the logits once forward; once more, and dlogits written, backward
    assert counting.cross_entropy_bytes(M, N, torch.bfloat16, "fwd") == M * N * 2 + 8 * M
    assert counting.cross_entropy_bytes(M, N, torch.bfloat16, "fwd+bwd") == \
        3 * M * N * 2 + 16 * M
    assert counting.adamw_bytes(1000) == 28 * 1000
    assert counting.adamw_bytes(1000, torch.bfloat16) == (3 * 2 + 4 * 4) * 1000


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
def test_attention_decode_cases_are_one_query_row_against_a_gqa_cache(device, quick):
    """q (B, Hq, 1, D), k/v (B, Hkv, Tk, D), not causal, forward only, x = Tk; FLOPs and bytes
    counted for one query row with k and v read once (Hkv heads)."""
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    cases = C.specs()["attention_decode"].cases(ctx)
    expected = {("cpu", True): (8, 2, 64, torch.float32, [1], [512, 2048]),
                ("cpu", False): (8, 2, 64, torch.float32, [1], [512, 2048, 8192]),
                ("cuda", True): (32, 8, 128, torch.bfloat16, [1], [4096, 16384]),
                ("cuda", False): (32, 8, 128, torch.bfloat16, [1, 8],
                                  [1024, 4096, 16384, 65536])}[(device, quick)]
    Hq, Hkv, D, dtype, batches, lengths = expected
    assert [(c.size["B"], c.size["Tk"]) for c in cases] == \
        [(B, Tk) for B in batches for Tk in lengths]
    for case in cases:
        B, Tk = case.size["B"], case.size["Tk"]
        assert case.size == dict(B=B, Hq=Hq, Hkv=Hkv, Tk=Tk, D=D)
        assert case.variant == f"fwd {C.dtype_name(dtype)} decode gqa {Hq // Hkv}:1 B={B}"
        assert (case.pass_, case.causal, case.check_output, case.x) == ("fwd", False, True, Tk)
        assert case.flops == 4 * B * Hq * Tk * D
        assert case.bytes == (2 * B * Hq * D + 2 * B * Hkv * Tk * D) * dtype.itemsize
    if device == "cpu":
        inputs = cases[0].make_inputs()
        B, Tk = cases[0].size["B"], cases[0].size["Tk"]
        assert [tuple(inputs[n].shape) for n in ("q", "k", "v")] == \
            [(B, Hq, 1, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)]
        assert all(t.dtype == dtype and not t.requires_grad for t in inputs.values())


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
def test_attention_sinks_cases_are_gpt_oss_attention(device, quick):
    """Causal GQA attention with sinks: gpt-oss-120b's heads (64:8, D = 64, bf16) at 8k tokens,
    T up to 4096, on a GPU, small float32 on the CPU; forward and forward+backward, full causal
    then the sliding window (128 keys on a GPU, 64 on the CPU: last, as attention's windows)
    at the same T; attention's FLOPs (the window's pairs exactly) and GQA bytes; x = T."""
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    spec = C.specs()["attention_sinks"]
    assert (spec.metric, spec.ceiling) == ("TFLOP/s", "matmul")
    cases = spec.cases(ctx)
    Hq, Hkv, D, dtype, tokens, window, seqs = {
        ("cpu", True): (8, 2, 64, torch.float32, 512, 64, [128, 256]),
        ("cpu", False): (8, 2, 64, torch.float32, 2048, 64, [128, 256, 512]),
        ("cuda", True): (64, 8, 64, torch.bfloat16, 8192, 128, [1024, 4096]),
        ("cuda", False): (64, 8, 64, torch.bfloat16, 8192, 128, [1024, 2048, 4096]),
    }[(device, quick)]
    assert [(c.size.get("window"), c.pass_, c.size["T"]) for c in cases] == \
        [(win, pass_, T) for win in (None, window) for pass_ in counting.PASSES for T in seqs]
    for case in cases:
        B, T, win = case.size["B"], case.size["T"], case.size.get("window")
        assert B * T == tokens
        assert case.size == dict(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, **({} if win is None else
                                                                    {"window": win}))
        mask = "causal" if win is None else f"window {win}"
        assert case.variant == f"{case.pass_} {C.dtype_name(dtype)} {mask} sinks gqa {Hq // Hkv}:1"
        assert (case.causal, case.x, case.check_output) == (True, T, case.pass_ == "fwd")
        assert case.flops == counting.attention_flops(B, Hq, T, T, D, True, case.pass_,
                                                      window=win)
        assert case.bytes == counting.attention_bytes(B, Hq, T, T, D, dtype, case.pass_, Hkv=Hkv)
    if device == "cpu":
        for case in (cases[0], cases[-1]):  # forward causal; forward+backward windowed
            inputs = case.make_inputs()
            B, T, grad = case.size["B"], case.size["T"], case.pass_ == "fwd+bwd"
            assert [tuple(inputs[n].shape) for n in ("q", "k", "v", "sinks")] == \
                [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (Hq,)]
            # sinks: a leaf of the backward, as q, k and v
            assert all(inputs[n].dtype == dtype and inputs[n].is_leaf
                       and inputs[n].requires_grad == grad for n in ("q", "k", "v", "sinks"))
            assert ("grad" in inputs) == grad


def test_ops_run_in_order_the_newest_last():
    """fusedlm bench's ops in run order, attention_sinks, attention_dropout and then
    attention_softcap (the newest) last: with --budget-s each op gets its share of what is
    left, so the last one absorbs the others' overruns and is the one cut short, never an older
    op's rows."""
    assert C.OPS == OPS and C.OPS[-3:] == ("attention_sinks", "attention_dropout",
                                           "attention_softcap")
    assert set(C.specs()) == set(OPS)  # one spec per op


def test_eager_sink_attention_is_attention_scaled_by_the_sinks_share():
    """gpt-oss's cat'ed sink column against the closed form: softmax over the keys and the sink
    scales attention without sinks by sigmoid(lse_h - sinks[h]) per row (float64, GQA, causal
    window). The bench's sinks change its outputs (a provider ignoring them fails its check)."""
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, window = 2, 6, 2, 40, 16, 9
    q = torch.randn(B, Hq, T, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, T, D, dtype=torch.float64) for _ in range(2))
    sinks = 3 + 2 * torch.randn(Hq, dtype=torch.float64)
    mask = C._window_mask(T, T, window, "cpu")
    scores, _ = C._eager_scores(q, k, v, mask)
    share = torch.sigmoid(torch.logsumexp(scores, -1) - sinks[None, :, None])
    plain = C.eager_attention(q, k, v, mask)
    got = C.eager_sink_attention(q, k, v, sinks, mask)
    torch.testing.assert_close(got, plain * share[..., None])
    assert (got - plain).norm() > 0.05 * plain.norm()  # the sinks' share is not negligible
    # (bench inputs: the same draw, on every quick CPU case)
    ctx = C.Context(device=torch.device("cpu"), quick=True, backends={})
    case = C.specs()["attention_sinks"].cases(ctx)[-1]
    inputs = case.make_inputs()
    mask = C._window_mask(case.size["T"], case.size["T"], case.size["window"], "cpu")
    with torch.no_grad():
        plain = C.eager_attention(inputs["q"], inputs["k"], inputs["v"], mask)
        got = C.eager_sink_attention(inputs["q"], inputs["k"], inputs["v"], inputs["sinks"], mask)
    assert (got - plain).norm() > 0.05 * plain.norm()


def test_attention_sinks_providers_compute_the_eager_outputs_and_gradients(monkeypatch):
    """Every attention_sinks provider that runs on the CPU gives gpt-oss eager's output and
    the gradients of q, k, v and the sinks (the forward+backward pass computes the sinks'),
    causal and windowed; torch-compile's wiring too, compiled() stubbed out (compiling takes
    many seconds here). No SDPA provider: SDPA takes no sinks."""
    spec = C.specs()["attention_sinks"]
    names = [p.name for p in spec.providers]
    assert names == ["torch-eager", "fusedlm-cuda", "fusedlm-triton", "fusedlm-cpu",
                     "fusedlm-torch", "torch-compile"]
    assert "No SDPA rows" in spec.description
    ctx, runnable, _, _, _ = _cpu_providers_and_cases("attention_sinks")
    monkeypatch.setattr(C, "compiled", lambda fn: fn)
    compile_provider = next(p for p in spec.providers if p.name == "torch-compile")
    assert compile_provider.compiles
    runnable.append(compile_provider)
    leaves = ("q", "k", "v", "sinks")
    for mask in ("causal", "window"):
        fwd, fwd_bwd = (next(c for c in spec.cases(ctx) if c.pass_ == pass_
                             and ("window" in c.size) == (mask == "window"))
                        for pass_ in counting.PASSES)
        torch.manual_seed(0)
        inputs = fwd_bwd.make_inputs()
        results = {}
        for provider in runnable:
            out = provider.build(fwd, ctx)(inputs)
            assert not out.requires_grad and out.shape == inputs["q"].shape
            provider.build(fwd_bwd, ctx)(inputs)
            assert inputs["sinks"].grad is not None and inputs["sinks"].grad.abs().sum() > 0
            # (copies: a gradient left to accumulate would change in place)
            results[provider.name] = (out, *(inputs[name].grad.clone() for name in leaves))
        eager = results.pop("torch-eager")
        assert set(results) >= {"fusedlm-torch", "torch-compile"}
        for name, got in results.items():
            for a, b in zip(got, eager, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} {mask}")


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
def test_attention_dropout_cases_are_attentions_causal_cases(device, quick):
    """attention_dropout: attention's plain causal cases (sizes, dtype, passes, FLOPs, bytes,
    x = T: dropout adds no matmul FLOPs), with dropout 0.1 in the variant, and no output
    check (random masks: no two providers' outputs compare)."""
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    spec = C.specs()["attention_dropout"]
    assert (spec.metric, spec.ceiling) == ("TFLOP/s", "matmul")
    assert C.ATTENTION_DROPOUT_P == 0.1
    causal = [c for c in C.specs()["attention"].cases(ctx) if c.variant.endswith(" causal")]
    cases = spec.cases(ctx)
    assert [(c.pass_, c.dtype, c.size, c.x, c.flops, c.bytes) for c in cases] == \
        [(c.pass_, c.dtype, c.size, c.x, c.flops, c.bytes) for c in causal]
    assert {c.size["T"] for c in cases} == ({1024, 4096} if (device, quick) == ("cuda", True)
                                            else {c.size["T"] for c in causal})
    for case in cases:
        assert case.variant == f"{case.pass_} {case.dtype} causal dropout 0.1"
        assert case.causal is True and case.check_output is False
    if device == "cpu":
        for case in (cases[0], cases[-1]):
            inputs = case.make_inputs()
            grad = case.pass_ == "fwd+bwd"
            shape = tuple(case.size[n] for n in ("B", "H", "T", "D"))
            assert all(inputs[n].shape == shape and inputs[n].requires_grad == grad
                       for n in ("q", "k", "v"))
            assert ("grad" in inputs) == grad


def test_attention_dropout_providers_drop_probabilities(monkeypatch):
    """Every attention_dropout provider that runs on the CPU drops attention probabilities
    (its output is not plain attention's, and a second call with another mask differs from the
    first), runs forward+backward, and fusedlm's passes dropout_p=0.1 (the same seed repeats
    fusedlm-cpu's mask). Providers that cannot take dropout say why: fusedlm-cuda refuses
    (unsupported, never an error); an SDPA backend that runs plain attention here but no
    dropout (the CPU's flash) is left out with torch's reason. torch-compile's wiring with
    compiled() stubbed out (compiling takes many seconds here)."""
    import fusedlm

    spec = C.specs()["attention_dropout"]
    assert [p.name for p in spec.providers] == [
        "torch-eager", "fusedlm-cuda", "fusedlm-triton", "fusedlm-cpu", "fusedlm-torch",
        "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "torch-compile"]
    ctx, runnable, fwd, fwd_bwd, inputs = _cpu_providers_and_cases("attention_dropout")
    assert "sdpa-math" in {p.name for p in runnable}
    names = {p.name for p in runnable}
    plain_sdpa = {p.name for p in C.specs()["attention"].providers
                  if p.name.startswith("sdpa-") and p.why_not(ctx) is None}
    for p in spec.providers:
        assert p.name in names or p.why_not(ctx), p.name
        if p.name in plain_sdpa - names:  # (sdpa-flash on the CPU: torch's says why)
            assert "with dropout_p=0.1" in p.why_not(ctx), p.name
    monkeypatch.setattr(C, "compiled", lambda fn: fn)
    runnable.append(next(p for p in spec.providers if p.name == "torch-compile"))
    with torch.no_grad():
        plain = C.eager_attention(inputs["q"], inputs["k"], inputs["v"],
                                  C._causal_mask(fwd.size["T"], fwd.size["T"], "cpu"))
    calls = []
    real_attention = fusedlm.attention

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(fusedlm, "attention", recorded)
    for provider in runnable:
        run = provider.build(fwd, ctx)
        first, second = run(inputs), run(inputs)
        assert first.shape == plain.shape and not first.requires_grad
        assert not torch.allclose(first, plain), provider.name
        assert not torch.equal(first, second), provider.name
        provider.build(fwd_bwd, ctx)(inputs)
        assert all(inputs[n].grad is not None and inputs[n].grad.isfinite().all()
                   for n in ("q", "k", "v")), provider.name
    assert calls and all(c["dropout_p"] == 0.1 for c in calls)
    fusedlm_cpu = next(p for p in runnable if p.name == "fusedlm-cpu")
    run = fusedlm_cpu.build(fwd, ctx)
    torch.manual_seed(5)
    first = run(inputs)
    torch.manual_seed(5)
    torch.testing.assert_close(run(inputs), first, rtol=0, atol=0)
    # fusedlm-cuda on a CPU tensor: fusedlm's refusal becomes an unsupported row, with its
    # reason
    cuda = next(p for p in spec.providers if p.name == "fusedlm-cuda")
    with pytest.raises(C.Unsupported, match="backend 'cuda'"):
        cuda.build(fwd, ctx)(inputs)


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
def test_attention_softcap_cases_are_attentions_causal_cases(device, quick):
    """attention_softcap: attention's plain causal cases (sizes, dtype, passes, FLOPs, bytes,
    x = T: the cap's tanh is elementwise), with softcap 50 (Gemma 2's) in the variant, and the
    forward outputs checked against eager's (capping is deterministic)."""
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    spec = C.specs()["attention_softcap"]
    assert (spec.metric, spec.ceiling) == ("TFLOP/s", "matmul")
    assert C.ATTENTION_SOFTCAP == 50.0
    causal = [c for c in C.specs()["attention"].cases(ctx) if c.variant.endswith(" causal")]
    cases = spec.cases(ctx)
    assert [(c.pass_, c.dtype, c.size, c.x, c.flops, c.bytes) for c in cases] == \
        [(c.pass_, c.dtype, c.size, c.x, c.flops, c.bytes) for c in causal]
    for case in cases:
        assert case.variant == f"{case.pass_} {case.dtype} causal softcap 50"
        assert case.causal is True and case.check_output == (case.pass_ == "fwd")
    if device == "cpu":
        for case in (cases[0], cases[-1]):
            inputs = case.make_inputs()
            grad = case.pass_ == "fwd+bwd"
            shape = tuple(case.size[n] for n in ("B", "H", "T", "D"))
            assert all(inputs[n].shape == shape and inputs[n].requires_grad == grad
                       for n in ("q", "k", "v"))
            assert ("grad" in inputs) == grad


def test_eager_softcap_attention_is_gemma2s():
    """The baseline against Gemma 2's eager attention written out (float64): scores q k^T *
    scale, then tanh(scores / cap) * cap, the causal mask, softmax, p v (the baseline's scores
    are float32: float32's tolerance); scores beyond the cap change the output (a provider
    ignoring the cap fails its check)."""
    torch.manual_seed(0)
    B, H, T, D, cap = 2, 3, 24, 16, C.ATTENTION_SOFTCAP
    q, k = (8 * torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, D, dtype=torch.float64)
    mask = C._causal_mask(T, T, "cpu")
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    assert scores.abs().max() > 2 * cap
    capped = (torch.tanh(scores / cap) * cap).masked_fill(mask, float("-inf"))
    expected = torch.softmax(capped, dim=-1) @ v
    got = C.eager_attention(q, k, v, mask, softcap=cap)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    plain = C.eager_attention(q, k, v, mask)
    assert (got - plain).norm() > 0.05 * plain.norm()


def test_attention_softcap_providers_cap_the_scores(monkeypatch):
    """Every attention_softcap provider that runs on the CPU gives Gemma 2 eager's capped
    output, and forward+backward its gradients, on inputs whose scores go well past the cap
    (uncapped attention differs; float32 scores up to ~150 round at ~1e-5, hence the absolute
    tolerance); fusedlm's pass softcap=50.0. torch-compile's and
    flex-attention's wiring with compiled() stubbed out (compiling takes many seconds here;
    uncompiled FlexAttention runs its unfused forward): FlexAttention has no backward on the
    CPU, so its forward+backward rows are unsupported with torch's reason. No SDPA rows."""
    import fusedlm

    spec = C.specs()["attention_softcap"]
    assert [p.name for p in spec.providers] == [
        "torch-eager", "fusedlm-cuda", "fusedlm-triton", "fusedlm-cpu", "fusedlm-torch",
        "torch-compile", "flex-attention"]
    assert "No SDPA rows" in spec.description
    ctx, runnable, fwd, fwd_bwd, inputs = _cpu_providers_and_cases("attention_softcap")
    for name in ("torch-compile", "flex-attention"):  # compile=False: left out, saying why
        provider = next(p for p in spec.providers if p.name == name)
        assert provider.compiles and "torch.compile" in provider.why_not(ctx)
        runnable.append(provider)
    monkeypatch.setattr(C, "compiled", lambda fn: fn)
    with torch.no_grad():  # scores up to ~6x the cap: capping changes every row's weights
        for name, factor in (("q", 6), ("k", 6), ("v", 1)):
            inputs[name].mul_(factor)
    T = fwd.size["T"]
    with torch.no_grad():
        q, k, v = (inputs[n] for n in ("q", "k", "v"))
        assert (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).abs().max() > 3 * 50
        plain = C.eager_attention(q, k, v, C._causal_mask(T, T, "cpu"))
    # (FlexAttention on the CPU refuses inputs that require grad, even under no_grad)
    detached = {n: inputs[n].detach() for n in ("q", "k", "v")}
    calls = []
    real_attention = fusedlm.attention

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(fusedlm, "attention", recorded)
    results = {}
    for provider in runnable:
        out = provider.build(fwd, ctx)(detached)
        assert out.shape == plain.shape and not out.requires_grad, provider.name
        assert not torch.allclose(out, plain, rtol=1e-2, atol=1e-2), provider.name
        if provider.name == "flex-attention":
            with pytest.raises(C.Unsupported, match="backward on CPU"):
                provider.build(fwd_bwd, ctx)(inputs)
            results[provider.name] = (out,)
            continue
        provider.build(fwd_bwd, ctx)(inputs)
        # (copies: a gradient left to accumulate would change in place)
        results[provider.name] = (out, *(inputs[n].grad.clone() for n in ("q", "k", "v")))
    assert calls and all(c["softcap"] == 50.0 for c in calls)
    eager = results.pop("torch-eager")
    assert set(results) >= {"fusedlm-torch", "torch-compile", "flex-attention"}
    for name, got in results.items():
        for a, b in zip(got, eager[:len(got)], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_flex_attention_says_why_it_cannot_run(monkeypatch):
    """flex-attention's why_not: torch.compile's note when compiling is off; else a probe (a
    compiled forward at the first case's shape, here with a FlexAttention that fails as one
    without a C++ compiler would) whose failure is the reason, torch's first line quoted, and
    asked once per device and shape."""
    import torch.nn.attention.flex_attention as flex

    provider = next(p for p in C.specs()["attention_softcap"].providers
                    if p.name == "flex-attention")
    off = C.Context(device=torch.device("cpu"), quick=True, compile=False, compile_note="off!")
    assert provider.why_not(off) == "off!"
    tried = []

    def failing(*args, **kwargs):
        tried.append(args[0].shape)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(C, "_flex_probe", {})
    monkeypatch.setattr(C, "compiled", lambda fn: fn)
    monkeypatch.setattr(flex, "flex_attention", failing)
    on = C.Context(device=torch.device("cpu"), quick=True, compile=True)
    for _ in range(2):
        assert provider.why_not(on) == ("FlexAttention does not run here: InvalidCxxCompiler: "
                                        "No working C++ compiler found")
    first = C.specs()["attention_softcap"].cases(on)[0]
    assert tried == [tuple(first.size[n] for n in ("B", "H", "T", "D"))]


@pytest.mark.slow
def test_flex_attention_compiles_its_forward_on_this_cpu(monkeypatch):
    """FlexAttention for real (torch.compile, inductor's C++ on the CPU): the probe passes, its
    forward gives eager's capped output, and forward+backward is unsupported (torch 2.13 has
    no FlexAttention backward on the CPU)."""
    import fusedlm

    monkeypatch.setattr(C, "_flex_probe", {})
    ctx = C.Context(device=torch.device("cpu"), quick=True, compile=True,
                    backends=dict(fusedlm.backends()))
    spec = C.specs()["attention_softcap"]
    provider = next(p for p in spec.providers if p.name == "flex-attention")
    assert provider.why_not(ctx) is None
    fwd, fwd_bwd = (next(c for c in spec.cases(ctx) if c.pass_ == pass_)
                    for pass_ in counting.PASSES)
    torch.manual_seed(0)
    inputs = fwd.make_inputs()
    eager = next(p for p in spec.providers if p.name == "torch-eager").build(fwd, ctx)(inputs)
    torch.testing.assert_close(provider.build(fwd, ctx)(inputs), eager, rtol=1e-4, atol=1e-5)
    with pytest.raises(C.Unsupported, match="backward on CPU"):
        provider.build(fwd_bwd, ctx)(fwd_bwd.make_inputs())


def test_sdpa_providers_take_gqa_and_call_a_refusal_unsupported(monkeypatch):
    """GQA through SDPA's enable_gqa, equal to the eager baseline (which repeats k and v); a
    backend that refuses an unmasked case ("No available kernel") raises Unsupported, any
    other error stays an error."""
    ctx = C.Context(device=torch.device("cpu"), quick=True, backends={})
    q = torch.randn(2, 8, 1, 32, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 32, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(C._sdpa_call("math")(q, k, v, False, ctx),
                               C.eager_attention(q, k, v, None))

    def refuse(message):
        def sdpa(*args, **kwargs):
            raise RuntimeError(message)
        return sdpa

    monkeypatch.setattr(C.F, "scaled_dot_product_attention",
                        refuse("No available kernel. Aborting execution."))
    with pytest.raises(C.Unsupported, match="SDPA flash backend refuses it: No available kernel"):
        C._sdpa_call("flash")(q, k, v, False, ctx)
    monkeypatch.setattr(C.F, "scaled_dot_product_attention", refuse("something else broke"))
    with pytest.raises(RuntimeError, match="something else broke"):
        C._sdpa_call("flash")(q, k, v, False, ctx)


def test_linear_cross_entropy_flops_are_the_unfused_matmuls():
    """2 N V C forward (the logits), 3x that forward+backward (dhidden, dweight): the unfused
    count, whatever an implementation recomputes."""
    N, C, V = 6, 10, 14
    assert counting.linear_cross_entropy_flops(N, C, V, "fwd") == 2 * N * V * C
    assert counting.linear_cross_entropy_flops(N, C, V, "fwd+bwd") == 6 * N * V * C
    with pytest.raises(ValueError, match="pass"):
        counting.linear_cross_entropy_flops(N, C, V, "bwd")


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
def test_linear_cross_entropy_cases_are_lm_heads(device, quick):
    """hidden (N, C), weight (V, C), target (N): bf16 at 16k tokens on a GPU (GPT-2's and a
    2048-wide head on GPT-2's padded vocabulary, Llama 3's last), float32 on the CPU; TFLOP/s
    from the unfused matmul FLOPs, no bytes; x = V * C."""
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    spec = C.specs()["linear_cross_entropy"]
    assert (spec.metric, spec.ceiling, spec.peak_memory) == ("TFLOP/s", "matmul", True)
    cases = spec.cases(ctx)
    shapes = {("cpu", True): [(256, 64, 2048), (256, 128, 8192)],
              ("cpu", False): [(512, 128, 4096), (512, 256, 8192), (512, 512, 16384)],
              ("cuda", True): [(16384, 768, 50304)],
              ("cuda", False): [(16384, 768, 50304), (16384, 2048, 50304)]}[(device, quick)]
    expected = [(pass_, shape) for pass_ in counting.PASSES for shape in shapes]
    if (device, quick) == ("cuda", False):  # the Llama-sized rows last
        expected += [(pass_, (16384, 4096, 128256)) for pass_ in counting.PASSES]
    assert [(c.pass_, (c.size["N"], c.size["C"], c.size["V"])) for c in cases] == expected
    dtype = "bfloat16" if device == "cuda" else "float32"
    for case in cases:
        N, C_, V = case.size["N"], case.size["C"], case.size["V"]
        assert case.variant == f"{case.pass_} {dtype}" and case.dtype == dtype
        assert case.x == V * C_ and case.bytes is None
        assert case.flops == counting.linear_cross_entropy_flops(N, C_, V, case.pass_)
        assert case.check_output == (case.pass_ == "fwd")
    if device == "cpu":
        for case in cases[:1] + cases[-1:]:
            inputs = case.make_inputs()
            N, C_, V = case.size["N"], case.size["C"], case.size["V"]
            grad = case.pass_ == "fwd+bwd"
            assert inputs["hidden"].shape == (N, C_) and inputs["weight"].shape == (V, C_)
            assert inputs["hidden"].requires_grad == inputs["weight"].requires_grad == grad
            assert inputs["weight"].is_leaf and inputs["target"].dtype == torch.int64
            assert ("grad" in inputs) == grad


def _cpu_providers_and_cases(op: str):
    """(context, the providers that run on this CPU, the quick forward case, the quick
    forward+backward case, one seeded input set of the latter) of ``op``; eager and the torch
    reference must be among the providers. (torch.compile left out: slow to compile here.)"""
    import fusedlm

    ctx = C.Context(device=torch.device("cpu"), quick=True, compile=False,
                    backends=dict(fusedlm.backends()))
    spec = C.specs()[op]
    runnable = [p for p in spec.providers if p.why_not(ctx) is None]
    assert {p.name for p in runnable} >= {"torch-eager", "fusedlm-torch"}
    fwd, fwd_bwd = (next(c for c in spec.cases(ctx) if c.pass_ == pass_)
                    for pass_ in counting.PASSES)
    torch.manual_seed(0)
    return ctx, runnable, fwd, fwd_bwd, fwd_bwd.make_inputs()


def test_linear_cross_entropy_providers_compute_the_eager_loss_and_gradients():
    """Every provider that runs on the CPU gives eager's loss, and forward+backward the
    gradients of the hidden states and the weight. (torch.compile left out: compiling takes
    20 s on a cold 2-core CPU; its provider is compiled() of the eager function, as every
    op's.)"""
    ctx, runnable, fwd, fwd_bwd, inputs = _cpu_providers_and_cases("linear_cross_entropy")
    results = {}
    for provider in runnable:
        loss = provider.build(fwd, ctx)(inputs)
        assert loss.dtype == torch.float32 and not loss.requires_grad
        provider.build(fwd_bwd, ctx)(inputs)
        results[provider.name] = (loss, inputs["hidden"].grad, inputs["weight"].grad)
    eager = results.pop("torch-eager")
    for name, got in results.items():
        for a, b in zip(got, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_rotary_and_swiglu_bytes_are_each_operand_once_per_pass():
    """rotary_embedding: x read and out written (2 B H T D), cos and sin read once (T R/2
    each, B times with per-row tables), in their own dtype; the backward the same again.
    swiglu and geglu (glu_bytes): 3 N I forward, 5 N I more backward."""
    B, H, T, D = 2, 3, 5, 8
    fwd = (2 * B * H * T * D + 2 * T * D // 2) * 2
    assert counting.rotary_embedding_bytes(B, H, T, D, torch.bfloat16, "fwd") == fwd
    assert counting.rotary_embedding_bytes(B, H, T, D, torch.bfloat16, "fwd+bwd") == 2 * fwd
    assert counting.rotary_embedding_bytes(B, H, T, D, torch.bfloat16, "fwd", rotary_dim=4,
                                           angle_dtype=torch.float32, per_row_angles=True) == \
        2 * B * H * T * D * 2 + B * 2 * T * 2 * 4
    with pytest.raises(ValueError, match="rotary_dim"):
        counting.rotary_embedding_bytes(B, H, T, D, torch.float32, "fwd", rotary_dim=3)
    with pytest.raises(ValueError, match="pass"):
        counting.rotary_embedding_bytes(B, H, T, D, torch.float32, "bwd")
    N, width = 6, 10
    for count in (counting.glu_bytes, counting.swiglu_bytes, counting.geglu_bytes):
        assert count(N, width, torch.bfloat16, "fwd") == 3 * N * width * 2
        assert count(N, width, torch.float32, "fwd+bwd") == (3 + 5) * N * width * 4
    with pytest.raises(ValueError, match="pass"):
        counting.glu_bytes(N, width, torch.float32, "bwd")


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
def test_rotary_cases_are_a_layers_q_and_k_in_hugging_face_layout(device, quick):
    """q (B, Hq, T, D) and k (B, Hkv, T, D) as views of (B, T, H, D) projections, B * T fixed,
    x = T: Llama 3 8B's heads in bf16 at 16k tokens on a GPU; fusedlm's (T, D/2) tables and
    Hugging Face's (1, T, D) ones; GB/s of both tensors and one read of the tables."""
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    spec = C.specs()["rotary_embedding"]
    assert (spec.metric, spec.ceiling) == ("GB/s", "bandwidth")
    cases = spec.cases(ctx)
    Hq, Hkv, D, tokens, seqs = {
        ("cpu", True): (8, 2, 64, 1024, [128, 512]),
        ("cpu", False): (32, 8, 128, 2048, [256, 512, 1024, 2048]),
        ("cuda", True): (32, 8, 128, 16384, [1024, 4096]),
        ("cuda", False): (32, 8, 128, 16384, [1024, 2048, 4096, 8192, 16384])}[(device, quick)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    assert [(c.pass_, c.size["T"]) for c in cases] == \
        [(pass_, T) for pass_ in counting.PASSES for T in seqs]
    for case in cases:
        T = case.size["T"]
        assert case.size == dict(B=tokens // T, T=T, Hq=Hq, Hkv=Hkv, D=D)
        assert case.variant == f"{case.pass_} {C.dtype_name(dtype)}" and case.x == T
        assert case.bytes == counting.rotary_embedding_bytes(tokens // T, Hq + Hkv, T, D, dtype,
                                                             case.pass_)
        assert case.flops is None and case.check_output == (case.pass_ == "fwd")
    if device == "cpu":
        for case in cases[:1] + cases[-1:]:
            inputs = case.make_inputs()
            B, T = case.size["B"], case.size["T"]
            grad = case.pass_ == "fwd+bwd"
            for name, H in (("q", Hq), ("k", Hkv)):
                x = inputs[name]
                assert x.shape == (B, H, T, D) and x.transpose(1, 2).is_contiguous()
                assert x.requires_grad == grad and x.is_leaf and x.dtype == dtype
            assert inputs["cos"].shape == inputs["sin"].shape == (T, D // 2)
            assert inputs["cos_full"].shape == (1, T, D)
            torch.testing.assert_close(inputs["cos_full"][0, :, D // 2:], inputs["cos"])
            torch.testing.assert_close(inputs["cos"] ** 2 + inputs["sin"] ** 2,
                                       torch.ones(T, D // 2))
            if grad:
                assert [g.shape for g in inputs["grad"]] == [(B, Hq, T, D), (B, Hkv, T, D)]
            else:
                assert "grad" not in inputs


# op -> {(device, quick): (N, intermediate sizes)}: Llama's MLP widths for swiglu, Gemma's
# (Gemma 3 1B 6912, Gemma 2 2B 9216, Gemma 2B 16384, Gemma 7B 24576) for geglu
GLU_SIZES = {
    "swiglu": {("cpu", True): (256, [512, 2048]), ("cpu", False): (1024, [1024, 4096, 11008]),
               ("cuda", True): (16384, [4096, 14336]),
               ("cuda", False): (16384, [2048, 4096, 8192, 11008, 14336])},
    "geglu": {("cpu", True): (256, [512, 2048]), ("cpu", False): (1024, [1024, 4096, 9216]),
              ("cuda", True): (16384, [6912, 16384]),
              ("cuda", False): (16384, [2048, 6912, 9216, 16384, 24576])},
}


@pytest.mark.parametrize(("device", "quick"), [("cpu", True), ("cpu", False), ("cuda", True),
                                             ("cuda", False)])
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_glu_cases_are_llama_and_gemma_mlp_widths(op, device, quick):
    ctx = C.Context(device=torch.device(device), quick=quick, backends={})
    spec = C.specs()[op]
    assert (spec.metric, spec.ceiling) == ("GB/s", "bandwidth")
    cases = spec.cases(ctx)
    N, widths = GLU_SIZES[op][(device, quick)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    assert [(c.op, c.pass_, c.size["N"], c.size["I"]) for c in cases] == \
        [(op, pass_, N, width) for pass_ in counting.PASSES for width in widths]
    for case in cases:
        assert case.x == case.size["I"] and case.variant == f"{case.pass_} {C.dtype_name(dtype)}"
        assert case.bytes == counting.glu_bytes(N, case.size["I"], dtype, case.pass_)
    if device == "cpu":
        inputs = cases[-1].make_inputs()
        assert inputs["gate"].shape == inputs["up"].shape == inputs["grad"].shape == (N, widths[-1])
        assert inputs["gate"].requires_grad and inputs["up"].is_contiguous()


@pytest.mark.parametrize(("op", "leaves"), [("rotary_embedding", ("q", "k")),
                                            ("swiglu", ("gate", "up")), ("geglu", ("gate", "up"))])
def test_rotary_and_glu_providers_compute_the_eager_outputs_and_gradients(op, leaves):
    """Every provider that runs on the CPU (torch.compile left out: slow to compile here) gives
    eager's outputs (rotary: q's and k's, fusedlm's contiguous) and gradients."""
    ctx, runnable, fwd, fwd_bwd, inputs = _cpu_providers_and_cases(op)
    results = {}
    for provider in runnable:
        out = provider.build(fwd, ctx)(inputs)
        outs = out if isinstance(out, tuple) else (out,)
        assert len(outs) == len(leaves) if op == "rotary_embedding" else len(outs) == 1
        assert not any(o.requires_grad for o in outs)
        provider.build(fwd_bwd, ctx)(inputs)
        results[provider.name] = (*outs, *(inputs[name].grad for name in leaves))
    eager = results.pop("torch-eager")
    for name, got in results.items():
        for a, b in zip(got, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def _fake_liger(monkeypatch, calls: list) -> None:
    """liger_kernel's rope, swiglu and geglu entry points as the bench calls them, in PyTorch,
    with Liger's side effects: the rotation is written over q's and k's storage (views
    returned), the SwiGLU and GeGLU backwards over gate and up."""
    import types

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls.append(("rope", q.shape, k.shape, cos.shape, sin.shape))
        assert not torch.is_grad_enabled()  # (the fake does the forward only)
        for x in (q, k):
            x.copy_(C.eager_rotary(x, x, cos, sin)[0])
        return q, k

    class LigerSiLUMulFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            calls.append(("swiglu", a.shape))
            ctx.save_for_backward(a, b)
            return torch.nn.functional.silu(a) * b

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            sig = torch.sigmoid(a)
            da = dc * b * sig * (1 + a * (1 - sig))
            db = dc * a * sig
            a.copy_(da)
            b.copy_(db)
            return a, b

    class LigerGELUMulFunction(torch.autograd.Function):  # (tanh gelu, as Liger's)
        @staticmethod
        def forward(ctx, a, b):
            calls.append(("geglu", a.shape))
            ctx.save_for_backward(a, b)
            return torch.nn.functional.gelu(a, approximate="tanh") * b

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            with torch.enable_grad():
                x = a.detach().requires_grad_()
                act = torch.nn.functional.gelu(x, approximate="tanh")
                (slope,) = torch.autograd.grad(act.sum(), x)
            db = dc * act.detach()
            a.copy_(dc * b * slope)
            b.copy_(db)
            return a, b

    modules = {"liger_kernel": types.ModuleType("liger_kernel")}
    for name in ("liger_kernel.transformers", "liger_kernel.transformers.rope",
                 "liger_kernel.ops", "liger_kernel.ops.swiglu", "liger_kernel.ops.geglu"):
        modules[name] = types.ModuleType(name)
    modules["liger_kernel.transformers.rope"].liger_rotary_pos_emb = liger_rotary_pos_emb
    modules["liger_kernel.ops.swiglu"].LigerSiLUMulFunction = LigerSiLUMulFunction
    modules["liger_kernel.ops.geglu"].LigerGELUMulFunction = LigerGELUMulFunction
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_liger_providers_call_liger_as_documented(monkeypatch):
    """The liger rows (GPU only) call liger_rotary_pos_emb(q, k, cos, sin) with Hugging Face's
    (1, T, D) tables, LigerSiLUMulFunction.apply(gate, up) and LigerGELUMulFunction.apply(gate,
    up): a stand-in with Liger's side effects gives eager's results through the providers; all
    declare that they write over their inputs."""
    calls = []
    _fake_liger(monkeypatch, calls)
    ctx = C.Context(device=torch.device("cpu"), quick=True, compile=False, backends={})
    for op in ("rotary_embedding", "swiglu", "geglu"):
        spec = C.specs()[op]
        liger = next(p for p in spec.providers if p.name == "liger")
        assert liger.mutates_inputs
        eager = spec.providers[0]
        fwd = next(c for c in spec.cases(ctx) if c.pass_ == "fwd")
        torch.manual_seed(0)
        inputs = fwd.make_inputs()
        expected = eager.build(fwd, ctx)(inputs)
        got = liger.build(fwd, ctx)(inputs)
        torch.testing.assert_close(got, expected)
    size = C.specs()["rotary_embedding"].cases(ctx)[0].size
    B, T, Hq, Hkv, D = (size[k] for k in ("B", "T", "Hq", "Hkv", "D"))
    assert calls[0] == ("rope", (B, Hq, T, D), (B, Hkv, T, D), (1, T, D), (1, T, D))
    assert [c[0] for c in calls[1:]] == ["swiglu", "geglu"]
    for op in ("swiglu", "geglu"):
        spec = C.specs()[op]
        fwd_bwd = next(c for c in spec.cases(ctx) if c.pass_ == "fwd+bwd")
        inputs = fwd_bwd.make_inputs()
        gate, up = inputs["gate"].detach().clone(), inputs["up"].detach().clone()
        spec.providers[0].build(fwd_bwd, ctx)(inputs)
        expected = inputs["gate"].grad, inputs["up"].grad
        next(p for p in spec.providers if p.name == "liger").build(fwd_bwd, ctx)(
            {"gate": gate.requires_grad_(), "up": up.requires_grad_(), "grad": inputs["grad"]})
        torch.testing.assert_close((gate.grad, up.grad), expected)


def test_gpt_flops():
    assert counting.gpt_flops_per_token(100, 2, 8, 4) == 6 * 100 + 6 * 2 * 8 * 4
    assert counting.gpt_step_flops(10.0, 3, 4) == 120.0


def test_every_case_counts_what_its_metric_needs():
    ctx = C.Context(device=torch.device("cpu"), quick=True, backends={})
    for op, spec in C.specs().items():
        for case in spec.cases(ctx):
            needed = case.flops if spec.metric == "TFLOP/s" else case.bytes
            assert needed is not None and needed > 0, (op, case.size_label)


# ---- timing ---------------------------------------------------------------------------------

def test_quantile_interpolates_like_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert timing.quantile(values, 0.5) == 3.0
    assert timing.quantile(values, 0.2) == pytest.approx(1.8)
    assert timing.quantile(values, 0.8) == pytest.approx(4.2)
    assert timing.quantile([7.0], 0.2) == 7.0


def test_measure_rotates_input_sets_and_reports_percentiles():
    seen = []
    calls = [lambda i=i: (seen.append(i), time.sleep(0.001)) for i in range(3)]
    t = timing.measure(calls, "cpu", warmup_ms=2, rep_ms=10, min_reps=4)
    assert t.reps >= 4 and t.input_sets == 3 and t.clock == "perf_counter"
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.median_ms >= 0.9  # each call sleeps 1 ms
    assert set(seen) == {0, 1, 2}


def test_measure_leaves_each_sets_first_call_untimed():
    """A provider that sets up on a set's first call (fusedlm.bench's AdamW providers make an
    optimizer per set, whose first step allocates its state) is timed on the later calls only:
    with 8 sets whose first call takes 30 ms and the others 1 ms, every timed call is ~1 ms."""
    called = set()

    def call(i):
        time.sleep(0.001 if i in called else 0.03)
        called.add(i)

    calls = [lambda i=i: call(i) for i in range(8)]
    t = timing.measure(calls, "cpu", warmup_ms=0, rep_ms=5, min_reps=5)
    assert called == set(range(8))
    assert t.p80_ms < 20, t


def test_input_sets_cover_three_caches_within_the_memory_budget():
    assert timing.input_sets_for(10 << 20, 50 << 20, 1 << 40) == 15
    assert timing.input_sets_for(1 << 30, 50 << 20, 1 << 40) == 1
    assert timing.input_sets_for(1 << 10, 50 << 20, 1 << 40) == 32  # max_sets
    assert timing.input_sets_for(10 << 20, 50 << 20, 30 << 20) == 3  # the budget


# ---- ratios and schema ----------------------------------------------------------------------

def _fake_row(provider, median, variant="fwd", size="s1", status="ok"):
    return {"op": "layer_norm", "variant": variant, "size_label": size, "provider": provider,
            "status": status, "time_ms": {"median": median} if status == "ok" else None}


def test_add_ratios_uses_the_eager_row_of_the_same_case():
    rows = [_fake_row("torch-eager", 2.0), _fake_row("fusedlm-cpu", 0.5),
            _fake_row("torch-eager", 8.0, size="s2"), _fake_row("fusedlm-cpu", 4.0, size="s2"),
            _fake_row("fusedlm-cpu", 1.0, variant="fwd+bwd"),  # no eager row for this case
            _fake_row("liger", None, status="error")]
    runner.add_ratios(rows)
    assert [r["ratio_to_eager"] for r in rows] == [1.0, 4.0, 1.0, 2.0, None, None]


# ---- end to end: fusedlm bench --quick on the CPU -------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("matplotlib")  # the test extra installs both
    pytest.importorskip("rich")
    from fusedlm import cli

    out = tmp_path_factory.mktemp("benchq")
    # CPU time, not wall time: under pytest-xdist another worker shares the 2 cores, which
    # stretches the wall time of the same work (111 s against 88 s alone, on CI's machine).
    t0 = time.process_time()
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on a busy 2-core machine stall on their OpenMP barriers
        rc = cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--rep-ms", "1",
                       "--warmup-ms", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    elapsed = time.process_time() - t0
    results = json.loads((out / "bench.json").read_text())
    return rc, out, results, elapsed


def test_quick_run_writes_json_and_a_plot_per_op(quick_run):
    rc, out, results, _ = quick_run
    assert rc == 0
    assert set(results["ops"]) == set(OPS)
    for op in OPS:
        if any(r["op"] == op and r["status"] == "ok" for r in results["rows"]):
            png = out / f"{op}.png"
            assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", op


def test_quick_run_matches_the_schema(quick_run):
    _, _, results, _ = quick_run
    assert schema.validate(results) == []
    assert results["schema"] == schema.SCHEMA
    env = results["environment"]
    for key in ("device_name", "torch", "triton", "cuda_runtime"):
        assert key in env
    assert results["code"]["kernel_trees"].keys() == {"csrc", "python/fusedlm/triton"}
    assert results["ceilings"]["bandwidth"]["unit"] == "GB/s"
    assert results["ceilings"]["matmul"]["unit"] == "TFLOP/s"
    assert results["units"]["ratio_to_eager"]
    if not torch.cuda.is_available():
        assert results["gpu_found"] is False and "No CUDA GPU found" in results["note"]


def test_quick_run_ratios_come_from_measured_rows(quick_run):
    _, _, results, _ = quick_run
    rows = results["rows"]
    eager = {(r["op"], r["variant"], r["size_label"]): r["time_ms"]["median"]
             for r in rows if r["provider"] == "torch-eager" and r["status"] == "ok"}
    checked = 0
    for r in rows:
        key = (r["op"], r["variant"], r["size_label"])
        if r["status"] != "ok":
            assert r["ratio_to_eager"] is None and r["reason"]
            continue
        assert r["ratio_to_eager"] == pytest.approx(eager[key] / r["time_ms"]["median"], rel=1e-12)
        if r["provider"] == "torch-eager":
            assert r["ratio_to_eager"] == 1.0
        checked += 1
    assert checked >= 20
    # CPU competitors: eager PyTorch and fusedlm's cpu backend measured for every op
    for op in ("attention", "attention_decode", "layer_norm", "rms_norm", "add_rms_norm",
               "cross_entropy", "linear_cross_entropy", "rotary_embedding", "swiglu", "geglu",
               "adamw", "attention_sinks", "attention_dropout", "attention_softcap"):
        measured = {r["provider"] for r in rows if r["op"] == op and r["status"] == "ok"}
        assert "torch-eager" in measured
        if results["environment"]["backends"]["cpu"]["available"]:
            assert "fusedlm-cpu" in measured, op
    # every unavailable provider says why
    for op, info in results["ops"].items():
        for name, p in info["providers"].items():
            assert p["available"] or p["reason"], (op, name)


def test_quick_run_measures_decoding_against_sdpa(quick_run):
    """attention_decode's rows: every quick CPU case measured by eager PyTorch and the fusedlm
    and SDPA providers that run here, outputs matching eager's; SDPA takes the GQA heads
    (enable_gqa) or says it refuses them, never an error."""
    _, _, results, _ = quick_run
    rows = [r for r in results["rows"] if r["op"] == "attention_decode"]
    info = results["ops"]["attention_decode"]
    assert (info["metric"], info["ceiling"]) == ("GB/s", "bandwidth")
    ctx = C.Context(device=torch.device("cpu"), quick=True, backends={})
    labels = [c.size_label for c in C.specs()["attention_decode"].cases(ctx)]
    assert sorted({r["size_label"] for r in rows}) == sorted(labels)
    assert {r["pass"] for r in rows} == {"fwd"} and {r["causal"] for r in rows} == {False}
    for r in rows:
        assert r["status"] != "error", r
        if r["status"] == "ok":
            assert r["value"] == r["gbps"] > 0 and r["ratio_to_eager"] > 0
            if r["provider"] != "torch-eager":
                assert r["rel_err_vs_eager"] < 1e-4, r
    sdpa = [p for p, v in info["providers"].items() if p.startswith("sdpa-") and v["available"]]
    for label in labels:
        ok = {r["provider"] for r in rows if r["size_label"] == label and r["status"] == "ok"}
        assert "torch-eager" in ok and "sdpa-math" in ok and set(sdpa) <= {
            r["provider"] for r in rows if r["size_label"] == label
            and r["status"] in ("ok", "unsupported")}


def _check_causal_attention_rows(results, rows, op):
    """``op``'s quick CPU rows: one per case of its spec, all causal, measured by eager, the
    torch reference and (where it runs) the cpu backend, no errors, forward outputs matching
    eager's."""
    ctx = C.Context(device=torch.device("cpu"), quick=True, backends={})
    cases = C.specs()[op].cases(ctx)
    assert sorted({(r["variant"], r["size_label"]) for r in rows}) == \
        sorted((c.variant, c.size_label) for c in cases)
    assert {r["causal"] for r in rows} == {True}
    expected = {"torch-eager", "fusedlm-torch"}
    if results["environment"]["backends"]["cpu"]["available"]:
        expected.add("fusedlm-cpu")
    for case in cases:
        here = [r for r in rows if (r["variant"], r["size_label"]) == (case.variant,
                                                                        case.size_label)]
        assert {r["provider"] for r in here if r["status"] == "ok"} >= expected, case.size_label
        for r in here:
            assert r["status"] != "error", r
            if r["status"] == "ok":
                assert r["value"] == r["tflops"] > 0 and r["ratio_to_eager"] > 0
                if r["pass"] == "fwd" and r["provider"] != "torch-eager":
                    assert r["rel_err_vs_eager"] < 1e-4, r


def test_quick_run_measures_attention_sinks(quick_run):
    """attention_sinks' rows: every quick CPU case measured by eager PyTorch (gpt-oss's eager
    attention) and the fusedlm backends that run here, forward outputs matching eager's; no
    SDPA provider (SDPA takes no sinks), no errors."""
    _, _, results, _ = quick_run
    rows = [r for r in results["rows"] if r["op"] == "attention_sinks"]
    info = results["ops"]["attention_sinks"]
    assert (info["metric"], info["ceiling"]) == ("TFLOP/s", "matmul")
    assert not [p for p in info["providers"] if p.startswith("sdpa-")]
    _check_causal_attention_rows(results, rows, "attention_sinks")


def test_quick_run_measures_attention_dropout(quick_run):
    """attention_dropout's rows: every quick CPU case measured by eager PyTorch (F.dropout),
    fusedlm's backends that run here and sdpa-math, none compared with eager's output (random
    masks), ratios taken as everywhere; the providers that cannot run say why (as rows, or up
    front); no errors."""
    _, _, results, _ = quick_run
    rows = [r for r in results["rows"] if r["op"] == "attention_dropout"]
    info = results["ops"]["attention_dropout"]
    assert (info["metric"], info["ceiling"]) == ("TFLOP/s", "matmul")
    ctx = C.Context(device=torch.device("cpu"), quick=True, backends={})
    cases = C.specs()["attention_dropout"].cases(ctx)
    assert sorted({(r["variant"], r["size_label"]) for r in rows}) == \
        sorted((c.variant, c.size_label) for c in cases)
    assert {r["causal"] for r in rows} == {True}
    expected = {"torch-eager", "fusedlm-torch", "sdpa-math"}
    if results["environment"]["backends"]["cpu"]["available"]:
        expected.add("fusedlm-cpu")
    assert not info["providers"]["fusedlm-cuda"]["available"]
    assert info["providers"]["fusedlm-cuda"]["reason"]
    for case in cases:
        here = [r for r in rows if (r["variant"], r["size_label"]) == (case.variant,
                                                                        case.size_label)]
        assert {r["provider"] for r in here if r["status"] == "ok"} >= expected, case.size_label
        for r in here:
            assert r["status"] in ("ok", "unsupported"), r
            assert r["rel_err_vs_eager"] is None, r
            if r["status"] == "ok":
                assert r["value"] == r["tflops"] > 0 and r["ratio_to_eager"] > 0
            else:
                assert r["reason"] and r["ratio_to_eager"] is None


def test_quick_run_measures_attention_softcap(quick_run):
    """attention_softcap's rows: every quick CPU case measured by eager PyTorch (Gemma 2's
    eager attention with the cap) and the fusedlm backends that run here, forward outputs
    matching eager's; torch-compile and flex-attention left out with the reason (no compiling
    in a quick CPU run); no SDPA provider (SDPA has no soft-capping), no errors."""
    _, _, results, _ = quick_run
    rows = [r for r in results["rows"] if r["op"] == "attention_softcap"]
    info = results["ops"]["attention_softcap"]
    assert (info["metric"], info["ceiling"]) == ("TFLOP/s", "matmul")
    assert not [p for p in info["providers"] if p.startswith("sdpa-")]
    for name in ("torch-compile", "flex-attention"):
        assert not info["providers"][name]["available"]
        assert "torch.compile left out" in info["providers"][name]["reason"]
    _check_causal_attention_rows(results, rows, "attention_softcap")


def test_schema_catches_a_ratio_not_computed_from_the_rows(quick_run):
    _, _, results, _ = quick_run
    bad = copy.deepcopy(results)
    row = next(r for r in bad["rows"] if r["status"] == "ok" and r["provider"] != "torch-eager")
    row["ratio_to_eager"] *= 1.5
    assert any("ratio_to_eager" in p for p in schema.validate(bad))
    bad = copy.deepcopy(results)
    row = next(r for r in bad["rows"] if r["status"] == "ok")
    row["value"] = (row["value"] or 1.0) * 2
    assert schema.validate(bad)
    bad = copy.deepcopy(results)
    del bad["ceilings"]
    assert schema.validate(bad) == ["missing top-level key 'ceilings'"]


def _as_gpu_run(results: dict, peak_memory_bytes) -> dict:
    """A copy of a CPU run dressed as a GPU run whose measured linear_cross_entropy rows carry
    ``peak_memory_bytes`` (the CPU cannot measure it)."""
    gpu = copy.deepcopy(results)
    gpu["device"] = "cuda"
    for r in gpu["rows"]:
        if r["op"] == "linear_cross_entropy" and r["status"] == "ok":
            r["peak_memory_bytes"] = peak_memory_bytes
    return gpu


def test_peak_memory_is_recorded_on_gpu_rows_only(quick_run):
    """A CPU run has no peak_memory_bytes; the schema takes a byte count on a measured GPU
    row and refuses one on a CPU run, a negative or fractional one and one on a row that did
    not run."""
    _, _, results, _ = quick_run
    assert not any("peak_memory_bytes" in r for r in results["rows"])
    assert results["units"]["peak_memory_bytes"]
    assert schema.validate(_as_gpu_run(results, 3 << 20)) == []
    cpu = _as_gpu_run(results, 3 << 20)
    cpu["device"] = "cpu"
    for bad in (cpu, _as_gpu_run(results, -1), _as_gpu_run(results, 1.5),
                _as_gpu_run(results, True)):
        assert any("peak_memory_bytes" in p for p in schema.validate(bad))
    skipped = _as_gpu_run(results, None)
    row = next(r for r in skipped["rows"] if r["op"] == "linear_cross_entropy")
    row.update(status="skipped", reason="time budget", time_ms=None, value=None,
               tflops=None, pct_of_ceiling=None, ratio_to_eager=None, peak_memory_bytes=0)
    runner.add_ratios(skipped["rows"])
    assert any("peak_memory_bytes" in p for p in schema.validate(skipped))


def test_peak_memory_counts_what_one_call_adds(monkeypatch):
    """runner._peak_memory_bytes: the call's peak over what was allocated before it, with the
    inputs' old gradients dropped first (torch.cuda's counters faked: no GPU here)."""
    allocated, peak = [1000], [0]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: peak.__setitem__(0, allocated[0]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[0])
    hidden = torch.zeros(3, requires_grad=True)
    hidden.grad = torch.ones(3)

    def call():
        assert hidden.grad is None  # dropped before the count starts
        peak[0] = max(peak[0], allocated[0] + 64)  # 64 bytes of intermediates at the peak
        allocated[0] += 16  # a gradient kept

    inputs = {"hidden": hidden, "target": torch.zeros(3, dtype=torch.int64)}
    assert runner._peak_memory_bytes(call, inputs, torch.device("cuda")) == 64


def test_table_shows_peak_memory_where_rows_have_it(quick_run):
    """The printed table of an op whose rows carry peak_memory_bytes has a "peak GiB" column
    (GiB of each row); the other ops' tables, and every table of a CPU run, have none."""
    pytest.importorskip("rich")
    from rich.console import Console

    from fusedlm.bench import report

    _, _, results, _ = quick_run

    def printed(res, op):
        only = copy.deepcopy(res)
        only["ops"] = {op: res["ops"][op]}
        only["rows"] = [r for r in res["rows"] if r["op"] == op]
        console = Console(record=True, width=250)
        report.print_tables(only, console=console)
        return console.export_text()

    gpu = _as_gpu_run(results, 3 << 29)  # 1.5 GiB
    assert "peak GiB" not in printed(results, "linear_cross_entropy")
    assert "peak GiB" not in printed(gpu, "cross_entropy")
    table = printed(gpu, "linear_cross_entropy")
    assert "peak GiB" in table
    measured = sum(r["op"] == "linear_cross_entropy" and r["status"] == "ok"
                   for r in gpu["rows"])
    assert table.count(" 1.5 ") == measured > 0


def test_quick_run_is_quick(quick_run):
    *_, elapsed = quick_run
    # 61 s of CPU time alone on CI's 2-core machine; beside another xdist worker the same run
    # took 1.4x the CPU time (the two vCPUs share a core), so 120 s flags a doubling.
    assert elapsed < 120, f"fusedlm bench --quick took {elapsed:.0f} s of CPU time"


def test_merge_recomputes_ratios(quick_run):
    _, _, results, _ = quick_run
    parts = []
    for op in ("attention", "adamw"):
        part = copy.deepcopy(results)
        part["ops"] = {op: results["ops"][op]}
        part["rows"] = [r for r in part["rows"] if r["op"] == op]
        parts.append(part)
    merged = runner.merge(parts)
    assert set(merged["ops"]) == {"attention", "adamw"}
    assert schema.validate(merged) == []


def test_gpt_is_skipped_with_a_reason_without_fusedlm_models(monkeypatch, quick_run):
    import fusedlm

    _, _, results, _ = quick_run
    monkeypatch.setitem(sys.modules, "fusedlm.models", None)
    monkeypatch.delattr(fusedlm, "models", raising=False)
    out = runner.run(runner.Options(ops=("gpt",), quick=True, device="cpu",
                                    ceilings=results["ceilings"], log=lambda msg: None))
    assert out["rows"] == []
    assert any("fusedlm.models is not available" in n for n in out["ops"]["gpt"]["notes"])
    assert schema.validate(out) == []


# ---- stamps, CLI import cost, README --------------------------------------------------------

@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_tree_hash_equals_gits(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.cu").write_text("kernel\n")
    (tmp_path / "d" / "sub" / "b.h").write_text("header\n")
    (tmp_path / "d" / "sub" / "run").write_text("#!/bin/sh\n")
    (tmp_path / "d" / "sub" / "run").chmod(0o755)
    (tmp_path / "d" / "a-b.txt").write_text("sorts before a.cu's directory twin\n")
    (tmp_path / "d" / "__pycache__").mkdir()
    (tmp_path / "d" / "__pycache__" / "x.pyc").write_bytes(b"ignored")

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    git("add", "d", ".gitignore")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "t")
    assert tree_hash(tmp_path / "d") == git("rev-parse", "HEAD:d")


@pytest.mark.parametrize(("args", "message"), [
    (["--warmup-ms", "-1"], "argument --warmup-ms: must be a finite number >= 0, got -1"),
    (["--rep-ms", "nan"], "argument --rep-ms: must be a finite number > 0, got nan"),
    (["--threads", "0"], "argument --threads: must be a finite number >= 1, got 0"),
    (["--budget-s", "x"], "argument --budget-s: expected a number, got 'x'"),
    (["--ceilings-from", "/nonexistent/bench.json"], "cannot read /nonexistent/bench.json"),
    (["--ceilings-from", __file__], "is not a bench.json with 'ceilings'"),
])
def test_cli_bad_arguments_are_one_line_errors(args, message, capsys, tmp_path):
    """Each was accepted (a negative warm-up, zero threads) or a traceback (the ceilings
    file); argparse now names the flag."""
    from fusedlm.bench.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--quick", "--ops", "layer_norm", "--out", str(tmp_path), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_unknown_provider_is_refused(tmp_path):
    """A mistyped provider left only the baseline running, silently."""
    options = runner.Options(ops=("layer_norm",), quick=True, providers=("fusedlm-cpuu",))
    with pytest.raises(SystemExit, match="unknown provider.*fusedlm-cpuu.*choose from"):
        runner.run(options)


def test_cli_help_does_not_import_the_heavy_parts():
    code = ("import sys, fusedlm; before = set(sys.modules); "
            "import fusedlm.bench, fusedlm.bench.cli, fusedlm.cli; "
            "print(sorted(m for m in ('matplotlib', 'rich', 'triton') "
            "if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _load_render_readme():
    spec = importlib.util.spec_from_file_location("render_readme",
                                                  ROOT / "benchmarks" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_section_is_rendered_from_recorded_results(tmp_path, quick_run):
    render_readme = _load_render_readme()
    _, out, results, _ = quick_run
    (tmp_path / "README.md").write_text(
        f"# x\n\n{render_readme.BEGIN}\nstale, typed by hand\n{render_readme.END}\n\nafter\n")
    folder = tmp_path / "benchmarks" / "results" / "some-device"
    folder.mkdir(parents=True)
    shutil.copy(out / "bench.json", folder / "bench.json")
    shutil.copy(out / "attention.png", folder / "attention.png")
    assert render_readme.main(["--root", str(tmp_path), "--check"]) == 1
    assert render_readme.main(["--root", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "stale" not in text and text.endswith("after\n")
    assert "![attention](benchmarks/results/some-device/attention.png)" in text
    assert "![adamw]" not in text  # not recorded, not linked
    assert "| variant | size | torch-eager |" in text
    assert render_readme.main(["--root", str(tmp_path), "--check"]) == 0
    # A caveat added to a recorded run afterwards is shown with it.
    recorded = json.loads((folder / "bench.json").read_text())
    (folder / "bench.json").write_text(json.dumps({**recorded, "caveats": ["rows X are off"]}))
    assert render_readme.main(["--root", str(tmp_path)]) == 0
    assert "**Caveat:** rows X are off" in (tmp_path / "README.md").read_text()


def test_recording_draws_the_plots_a_run_did_not_bring(tmp_path, quick_run):
    """benchmarks/gpu_check brings back 5 PNGs at most: record_results.py draws the others
    from bench.json (and keeps those that came)."""
    spec = importlib.util.spec_from_file_location("record_results",
                                                  ROOT / "benchmarks" / "record_results.py")
    record_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record_results)
    _, out, results, _ = quick_run
    shutil.copy(out / "attention.png", tmp_path / "attention.png")
    before = (tmp_path / "attention.png").read_bytes()
    drawn = record_results._draw_missing_plots(results, tmp_path)
    measured = {r["op"] for r in results["rows"] if r["status"] == "ok"}
    assert "attention_decode.png" in drawn and "attention.png" not in drawn
    assert sorted(drawn) == sorted(f"{op}.png" for op in measured - {"attention"})
    assert (tmp_path / "attention.png").read_bytes() == before
    assert (tmp_path / "attention_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repository_readme_is_up_to_date_with_benchmarks_results():
    render_readme = _load_render_readme()
    assert render_readme.main(["--check"]) == 0, "run python benchmarks/render_readme.py"


def test_failing_and_unsupported_providers_are_rows_with_reasons(monkeypatch, quick_run):
    _, _, results, _ = quick_run
    real_specs = C.specs

    def boom(case, ctx):
        raise RuntimeError("kernel exploded")

    def unsupported(case, ctx):
        raise C.Unsupported("no such kernel")

    def specs():
        spec = real_specs()["rms_norm"]
        spec.providers = [spec.providers[0],
                          C.Provider("broken", "raises", C._always, boom),
                          C.Provider("partial", "unsupported", C._always, unsupported)]
        return {"rms_norm": spec}

    monkeypatch.setattr(C, "specs", specs)
    snapshots = []
    out = runner.run(runner.Options(ops=("rms_norm",), quick=True, device="cpu", rep_ms=1,
                                    warmup_ms=0, ceilings=results["ceilings"],
                                    log=lambda msg: None, progress=snapshots.append))
    assert schema.validate(out) == []
    by_provider = {}
    for r in out["rows"]:
        by_provider.setdefault(r["provider"], set()).add((r["status"], r["reason"]))
    assert {s for s, _ in by_provider["torch-eager"]} == {"ok"}
    assert by_provider["broken"] == {("error", "RuntimeError: kernel exploded")}
    assert by_provider["partial"] == {("unsupported", "no such kernel")}
    assert len(snapshots) == len(out["rows"]) // 3  # one per case
    assert [schema.validate(s) for s in snapshots] == [[]] * len(snapshots)


def test_a_provider_that_writes_over_its_inputs_is_checked_on_a_copy(monkeypatch, quick_run):
    """rel_err_vs_eager of a provider marked mutates_inputs (Liger's in-place kernels) is
    taken on a copy of the first input set made before its timed calls; one that scribbles on
    its inputs unmarked shows the damage. Several outputs (rotary's q and k) count together."""
    _, _, results, _ = quick_run
    real_specs = C.specs

    def scribbling(case, ctx):
        def fn(inputs):
            out = C.eager_swiglu(inputs["gate"], inputs["up"])
            inputs["gate"].mul_(-1.5)  # as an in-place kernel leaves its input
            return out
        return fn

    def specs():
        spec = real_specs()["swiglu"]
        spec.providers = [spec.providers[0],
                          C.Provider("marked", "", C._always, scribbling, mutates_inputs=True),
                          C.Provider("unmarked", "", C._always, scribbling)]
        return {"swiglu": spec}

    monkeypatch.setattr(C, "specs", specs)
    out = runner.run(runner.Options(ops=("swiglu",), quick=True, device="cpu", rep_ms=1,
                                    warmup_ms=0, ceilings=results["ceilings"],
                                    log=lambda msg: None))
    assert schema.validate(out) == []
    checked = [r for r in out["rows"] if r["pass"] == "fwd" and r["provider"] != "torch-eager"]
    assert checked and all(r["status"] == "ok" for r in checked)
    for r in checked:
        if r["provider"] == "marked":
            assert r["rel_err_vs_eager"] == 0.0, r
        else:
            assert r["rel_err_vs_eager"] > 0.1, r
    ref = (torch.ones(3), torch.full((2, 2), 2.0))
    assert runner._rel_err(ref, ref) == 0.0
    off = (torch.ones(3), torch.full((2, 2), 2.0) + torch.tensor([[1.0, 0], [0, 0]]))
    assert runner._rel_err(off, ref) == pytest.approx(1 / (3 + 16) ** 0.5)
    assert runner._rel_err(ref[:1], ref) is None


def test_a_spent_budget_skips_rows_and_says_why(quick_run):
    _, _, results, _ = quick_run
    out = runner.run(runner.Options(ops=("layer_norm", "adamw"), quick=True, device="cpu",
                                    budget_s=1e-6, ceilings=results["ceilings"],
                                    log=lambda msg: None))
    assert out["rows"] and all(r["status"] == "skipped" for r in out["rows"])
    assert all("budget" in r["reason"] for r in out["rows"])
    assert schema.validate(out) == []


@pytest.mark.parametrize(("B", "T"), [(2, 64), (5, 37), (8, 128)])
def test_attention_flops_of_a_padded_batch_count_visible_pairs(B, T):
    """Causal, left-padded rows of padded_lengths(B, T) tokens: 4 * H * D per visible pair."""
    from fusedlm.bench.cases import padded_lengths

    H, D = 3, 16
    lengths = padded_lengths(B, T)
    assert lengths[0] == T and min(lengths) >= T // 2
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    pairs = sum(int(((j <= i) & (j >= T - n)).sum()) for n in lengths)
    fwd = 4.0 * H * D * pairs
    assert counting.attention_flops(B, H, T, T, D, True, "fwd", lengths=lengths) == fwd
    assert counting.attention_flops(B, H, T, T, D, True, "fwd+bwd", lengths=lengths) == 3.5 * fwd
    with pytest.raises(ValueError, match="lengths"):
        counting.attention_flops(B, H, T, T, D, False, "fwd", lengths=lengths)


@pytest.mark.parametrize(("B", "T"), [(1, 64), (3, 37), (5, 128)])
def test_attention_flops_of_packed_documents_count_visible_pairs(B, T):
    """Packed documents of document_lengths(B, T) tokens, causal within each: the visible
    pairs of the block-diagonal causal mask the bench's masked providers get, 4 * H * D each;
    fusedlm's key ranges for them give the same mask."""
    import fusedlm
    from fusedlm.bench.cases import _document_inputs, document_lengths

    H, D = 3, 16
    rows = document_lengths(B, T)
    assert all(sum(row) == T and min(row) > 0 for row in rows) and len(rows[0]) >= 2
    packed = _document_inputs(B, T, "cpu")
    pairs = int((~packed["hidden"]).sum())
    lengths = [n for row in rows for n in row]
    fwd = 4.0 * H * D * pairs
    assert counting.attention_flops(B, H, T, T, D, True, "fwd", lengths=lengths) == fwd
    assert counting.attention_flops(B, H, T, T, D, True, "fwd+bwd", lengths=lengths) == 3.5 * fwd
    visible = fusedlm.reference._visible(T, T, True, 0, None, "cpu", packed["key_range"])
    assert torch.equal(visible, ~packed["hidden"])
    with pytest.raises(ValueError, match="lengths"):
        counting.attention_flops(B, H, T, T, D, True, "fwd", lengths=lengths + [1])
