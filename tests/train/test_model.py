"""fusedlm.models.GPT: fused vs torch kernels, presets, KV-cache generation, HF GPT-2 loading."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch

import fusedlm
from fusedlm.models import GPT, PRESETS, GPTConfig, KVCache
from fusedlm.models.gpt import ARCHS
from tests.test_fuzz import fuzz  # noqa: F401  (the fixture)

SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=97)


def _pair(arch: str, **overrides):
    config = GPTConfig(**{**SMALL, "arch": arch, **overrides})
    torch.manual_seed(0)
    fused = GPT(config, kernels="fused")
    torch.manual_seed(0)
    reference = GPT(config, kernels="torch")
    return config, fused, reference


@pytest.mark.parametrize("arch, overrides", [
    ("gpt2", {}),
    ("gpt2", {"bias": False}),
    ("llama", {"n_kv_head": 2, "bias": False}),
    ("llama", {"n_kv_head": 1, "bias": False, "tie_embeddings": False}),
    ("llama", {"n_kv_head": 2, "bias": False, "sliding_window": 8}),
    ("gpt2", {"attn_softcap": 0.05, "logit_softcap": 0.3}),
    ("llama", {"n_kv_head": 2, "bias": False, "attn_softcap": 0.05, "logit_softcap": 0.3}),
    ("gpt2", {"qk_norm": True}),
    ("llama", {"n_kv_head": 2, "bias": False, "qk_norm": True}),
])
def test_fused_and_torch_kernels_train_to_matching_losses(arch, overrides):
    """20 AdamW steps: the fused model's losses track plain PyTorch's step for step."""
    config, fused, reference = _pair(arch, **overrides)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    opts = [fusedlm.optim.AdamW(m.parameters(), lr=3e-3) for m in (fused, reference)]
    losses = {0: [], 1: []}
    batches = torch.randint(0, config.vocab_size, (4, 3, 41))  # revisited: the loss must fall
    for step in range(20):
        idx = batches[step % 4]
        for i, (model, opt) in enumerate(zip((fused, reference), opts, strict=True)):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[i].append(loss.item())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_fused_kernels_run_the_fused_ops_and_torch_kernels_none(arch, kernels):
    """kernels="fused" routes every layer through fusedlm's custom ops (the llama variant's
    rotary positions and SwiGLU included, forward and backward); kernels="torch" through
    none of them."""
    from fusedlm.backends import OpDispatch

    config = GPTConfig(**{**SMALL, "arch": arch})
    model = GPT(config, kernels=kernels)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    OpDispatch.last_choice.clear()  # (each op's dispatch records the backend it chose)
    model(idx, idx)[1].backward()
    ours = set(OpDispatch.last_choice)
    expected = {"gpt2": {"layer_norm_fwd", "layer_norm_bwd", "add_layer_norm_fwd",
                         "add_layer_norm_bwd", "attention_fwd", "attention_bwd"},
                "llama": {"rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_fwd", "add_rms_norm_bwd",
                          "attention_fwd", "attention_bwd", "rotary_embedding", "glu_fwd",
                          "glu_bwd"}}[arch]
    if kernels == "fused":
        assert expected <= ours, ours
    else:
        assert not ours, ours


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_model_runs_each_residual_add_fused_into_the_next_norm(arch, monkeypatch):
    """Every residual add runs fused into the norm after it: with L layers, the first block's
    first norm is a plain one (no residual yet), the other 2 L norms (each block's second, the
    next block's first, the final one) are add_layer_norm (gpt2) / add_rms_norm (llama), forward
    and backward, on the cpu kernels where built."""
    from fusedlm.backends import OpDispatch

    config = GPTConfig(**{**SMALL, "arch": arch, "n_layer": 3})
    model = GPT(config, kernels="fused")
    norm = "layer_norm" if arch == "gpt2" else "rms_norm"
    calls = {f"{norm}_fwd": 0, f"add_{norm}_fwd": 0}
    for name in calls:  # count the forwards' backend choices
        dispatch = OpDispatch.registry[name]

        def choose(*args, name=name, original=dispatch.choose):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(dispatch, "choose", choose)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    OpDispatch.last_choice.clear()
    model(idx, idx)[1].backward()
    assert calls == {f"{norm}_fwd": 1, f"add_{norm}_fwd": 2 * config.n_layer}, calls
    backend = "cpu" if fusedlm.backends()["cpu"].available else "torch"
    for op in (f"add_{norm}_fwd", f"add_{norm}_bwd", f"{norm}_fwd", f"{norm}_bwd"):
        assert OpDispatch.last_choice.get(op) == backend, (op, OpDispatch.last_choice)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forced_backend_without_a_kernel_takes_the_torch_path_for_that_op(arch, monkeypatch):
    """With FUSEDLM_BACKEND naming a backend that has no kernel for the residual-add norms,
    rotary embeddings or SwiGLU (``cuda``: Triton serves those on CUDA tensors), the model runs
    its torch code for those ops instead of raising, and still the forced backend for the rest;
    the loss is the torch-kernels model's. Simulated on the CPU by making the cpu backend
    refuse those ops."""
    from fusedlm.backends import OpDispatch

    if not fusedlm.backends()["cpu"].available:
        pytest.skip("needs the C++ extension")
    norm = "layer_norm" if arch == "gpt2" else "rms_norm"
    refused = [f"add_{norm}_fwd"] + (["rotary_embedding", "glu_fwd"] if arch == "llama" else [])
    for name in refused:
        impls = OpDispatch.registry[name].impls
        monkeypatch.setitem(impls, "cpu", (impls["cpu"][0], lambda *args: "refused (test)"))
    monkeypatch.setenv("FUSEDLM_BACKEND", "cpu")
    config, fused, reference_model = _pair(arch)
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 16))
    for name in refused:  # a direct call still raises: only the model steps aside
        with pytest.raises(fusedlm.BackendNotSupportedError, match="refused"):
            OpDispatch.registry[name].choose("auto", idx.device)
    OpDispatch.last_choice.clear()
    loss = fused(idx, targets)[1]
    loss.backward()
    assert not set(refused) & set(OpDispatch.last_choice), OpDispatch.last_choice
    assert {f"{norm}_fwd", f"{norm}_bwd", "attention_fwd"} <= set(OpDispatch.last_choice)
    assert set(OpDispatch.last_choice.values()) == {"cpu"}, OpDispatch.last_choice
    monkeypatch.delenv("FUSEDLM_BACKEND")
    expected = reference_model(idx, targets)[1]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_attention_dropout_runs_in_the_attention_kernels(arch, monkeypatch):
    """With ``dropout`` > 0 in training the fused model drops attention probabilities inside
    fusedlm.attention (its Philox mask, the same on every backend): the cpu kernels and the
    torch reference backend give one loss and gradients for one generator seed; a second
    step drops differently; eval() drops nothing (the fused and torch models agree)."""
    if not fusedlm.backends()["cpu"].available:
        pytest.skip("needs the C++ extension")
    config, fused, reference_model = _pair(arch, dropout=0.2)
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 16))
    results = []
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("FUSEDLM_BACKEND", backend)
        fused.zero_grad()
        torch.manual_seed(3)
        loss = fused(idx, targets)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in fused.parameters()]))
    monkeypatch.delenv("FUSEDLM_BACKEND")
    (loss, grads), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    calls = []
    attention = fusedlm.models.gpt.fused_attention
    monkeypatch.setattr(fusedlm.models.gpt, "fused_attention",
                        lambda *a, **kw: calls.append(kw["dropout_p"]) or attention(*a, **kw))
    with torch.no_grad():
        assert fused(idx, targets)[1] != loss
    assert calls == [0.2] * config.n_layer
    fused.eval()
    reference_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(idx, targets)[1], reference_model(idx, targets)[1],
                                   rtol=1e-5, atol=1e-5)
    assert calls[config.n_layer:] == [0.0] * config.n_layer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_checkpointing_with_fused_add_norms(arch):
    """Activation checkpointing recomputes each block (the residual stream and the branch
    output handed from block to block, the fused add-norms in between): the same loss and
    gradients as without it, bit for bit, and the fused add-norm ran in the recomputation."""
    from fusedlm.backends import OpDispatch

    overrides = {"n_kv_head": 2, "bias": False} if arch == "llama" else {}
    config, model, _ = _pair(arch, n_layer=3, **overrides)
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 16))
    norm = "layer_norm" if arch == "gpt2" else "rms_norm"
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        OpDispatch.last_choice.clear()
        loss = model(idx, targets)[1]
        loss.backward()
        assert {f"add_{norm}_fwd", f"add_{norm}_bwd"} <= set(OpDispatch.last_choice)
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    names = ["loss"] + [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, *results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_loss_is_cross_entropy_and_ignores_minus_one():
    config, model, _ = _pair("gpt2")
    idx = torch.randint(0, config.vocab_size, (2, 9))
    targets = idx.clone()
    targets[:, :3] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 9, config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, config.vocab_size),
                                                 idx[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None


@pytest.mark.parametrize("arch", ARCHS)
def test_z_loss_adds_the_logsumexp_term_and_the_kernels_agree(arch):
    """z_loss adds z * logsumexp(logits)**2 averaged over the targets not ignored; the fused
    model (its cross-entropy kernels, with and without the logits made) and the torch one
    agree on loss, z part and every gradient; the logit soft-cap applies before it."""
    shape = {"n_kv_head": 2, "bias": False} if arch == "llama" else {}
    config, fused, reference = _pair(arch, **shape, logit_softcap=4.0)
    with torch.no_grad():  # logits of several units: logsumexp well away from log(V)
        fused.lm_head.weight.mul_(20)
        reference.lm_head.weight.mul_(20)
    idx = torch.randint(0, config.vocab_size, (2, 21))
    targets = torch.randint(0, config.vocab_size, (2, 21))
    targets[1, :4] = -1
    logits, plain = reference(idx, targets)
    valid = targets.reshape(-1) != -1
    lse = torch.logsumexp(logits.reshape(-1, config.vocab_size).double(), dim=-1)[valid]
    term = 0.05 * lse.square().mean()
    results = []
    for model, return_logits in ((reference, True), (fused, True), (fused, False)):
        model.zero_grad()
        out_logits, loss, part = model(idx, targets, return_logits=return_logits, z_loss=0.05,
                                       return_z_loss=True)
        assert (out_logits is not None) == return_logits and not part.requires_grad
        loss.backward()
        torch.testing.assert_close(part.double(), term, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.double(), plain.detach().double() + term, rtol=1e-5,
                                   atol=1e-5)
        results.append([p.grad.clone() for p in model.parameters()])
    for grads in results[1:]:
        for a, b in zip(grads, results[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    fused.zero_grad()
    fused(idx, targets)[1].backward()  # (the z-loss moves the gradients)
    assert max((p.grad - g).abs().max() for p, g in zip(fused.parameters(), results[1],
                                                        strict=True)) > 1e-3
    assert fused(idx, targets, z_loss=0.05)[1].shape == ()
    assert fused(idx, z_loss=0.05, return_z_loss=True)[1:] == (None, None)
    assert fused(idx, return_logits=False) == (None, None)  # (no targets, no logits asked)
    with pytest.raises(ValueError, match="argument 'z_loss'"):
        fused(idx, targets, z_loss=-1.0)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_return_logits_false_gives_the_same_loss_and_gradients(kernels, arch, autocast,
                                                                monkeypatch):
    """The trainer's call: no logits back, and with kernels="fused" the head and loss run in
    row chunks (fusedlm.linear_cross_entropy; the chunk budget lowered here so 66 rows take
    17 chunks). Loss and every parameter's gradient match the call that makes the logits."""
    monkeypatch.setattr(importlib.import_module("fusedlm.ops.linear_cross_entropy"),
                        "DEFAULT_CHUNK_ELEMENTS", 4 * 97)
    overrides = {"n_kv_head": 2, "bias": False} if arch == "llama" else {}
    config, fused, reference = _pair(arch, **overrides)
    model = fused if kernels == "fused" else reference
    idx = torch.randint(0, config.vocab_size, (2, 34))
    targets = idx[:, 1:].clone()
    targets[0, :5] = -1
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx[:, :-1], targets, return_logits=return_logits)
        loss.backward()
        assert (logits is not None) == return_logits and loss.dtype == torch.float32
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    tolerance = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("arch", ARCHS)
def test_soft_caps_bound_scores_and_logits_and_the_kernels_agree(arch):
    """attn_softcap and logit_softcap with weights scaled so that both caps bite (scores and
    logits well past them): the logits stay within logit_softcap, each cap changes the output,
    and the fused model (the attention kernels' cap, the chunked head's) passes DESIGN.md's
    rule against the same model on torch kernels (baseline) and in float64 (truth): logits,
    loss and every parameter's gradient, with and without the logits made."""
    from tests.helpers import assert_close_rule

    shape = {"n_kv_head": 2, "bias": False} if arch == "llama" else {}
    caps = {"attn_softcap": 2.0, "logit_softcap": 1.5}
    config, fused, _ = _pair(arch, **shape, **caps)
    with torch.no_grad():  # scores of ~10 and logits of ~5 standard deviations
        for name, p in fused.named_parameters():
            if "c_attn" in name or name == "wte.weight":
                p.mul_(25)
    models = {"fused": fused}
    for name, kernels, overrides in (("baseline", "torch", caps), ("truth", "torch", caps),
                                     ("no attention cap", "torch", {"logit_softcap": 1.5}),
                                     ("no caps", "torch", {})):
        models[name] = GPT(GPTConfig(**{**SMALL, "arch": arch, **shape, **overrides}),
                           kernels=kernels)
        models[name].load_state_dict(fused.state_dict())
    models["truth"].double()
    idx = torch.randint(0, config.vocab_size, (2, 33))
    targets = torch.randint(0, config.vocab_size, (2, 33))
    outs = {name: model(idx, targets) for name, model in models.items()}
    logits = outs["fused"][0]
    assert logits.abs().max() <= 1.5 and logits.abs().max() > 1.4
    assert outs["no caps"][0].abs().max() > 3.0
    assert (outs["no attention cap"][0] - outs["baseline"][0]).abs().max() > 0.1
    assert_close_rule(logits, outs["baseline"][0], outs["truth"][0], name="logits")
    for return_logits in (True, False):
        losses = [models[name](idx, targets, return_logits=return_logits)[1]
                  for name in ("fused", "baseline", "truth")]
        assert_close_rule(*losses, name=f"loss (return_logits={return_logits})")
        for model, loss in zip((models["fused"], models["baseline"], models["truth"]), losses,
                               strict=True):
            model.zero_grad()
            loss.backward()
        theirs = dict(models["baseline"].named_parameters())
        truths = dict(models["truth"].named_parameters())
        for name, p in fused.named_parameters():
            assert_close_rule(p.grad, theirs[name].grad, truths[name].grad, name=name)


@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(arch, kernels):
    """With qk_norm each head's queries and keys are RMS-normalized (weights attn.q_norm,
    attn.k_norm of the head dim): scaling the query and key rows of c_attn (no bias) by 10 and
    3 leaves the logits as they were, which without qk_norm it does not."""
    shape = {"n_kv_head": 2} if arch == "llama" else {}
    outputs = {}
    for qk_norm in (True, False):
        config = GPTConfig(**{**SMALL, "arch": arch, "bias": False, "qk_norm": qk_norm,
                              "norm_eps": 0.0, **shape})
        torch.manual_seed(0)
        model = GPT(config, kernels=kernels)
        names = [name for name, _ in model.named_parameters() if "_norm" in name]
        assert names == ([f"h.{i}.attn.{w}_norm.weight" for i in range(2) for w in "qk"]
                         if qk_norm else [])
        idx = torch.randint(0, config.vocab_size, (2, 21))
        before = model(idx)[0]
        q_rows = config.n_head * (config.n_embd // config.n_head)
        with torch.no_grad():
            for block in model.h:
                weight = block.attn.c_attn.weight  # (q, k, v rows, n_embd)
                weight[:q_rows] *= 10.0
                weight[q_rows:q_rows + (weight.shape[0] - q_rows) // 2] *= 3.0
        outputs[qk_norm] = (before, model(idx)[0])
    torch.testing.assert_close(outputs[True][1], outputs[True][0], rtol=1e-4, atol=1e-5)
    assert (outputs[False][1] - outputs[False][0]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("caps", [{}, {"attn_softcap": 0.02, "logit_softcap": 0.2}],
                         ids=["uncapped", "capped"])
def test_generate_with_kv_cache_matches_full_recompute(arch, kernels, window, caps):
    config = GPTConfig(**{**SMALL, "arch": arch, "block_size": 24, "sliding_window": window,
                          **caps})
    model = GPT(config, kernels=kernels).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 5))
    out = model.generate(prompt, 30, temperature=0)  # passes block_size: the cache restarts
    assert out.shape == (2, 35)
    assert torch.equal(out[:, :5], prompt)
    # Greedy without cache for the first tokens that fit in one block.
    x = prompt
    with torch.no_grad():
        for _ in range(config.block_size - 5):
            logits, _ = model(x)
            x = torch.cat((x, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out[:, :config.block_size], x)


@pytest.mark.parametrize("capacity", [None, 40], ids=["growing", "capacity40"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_kv_cache_chunks_match_one_forward(arch, kernels, capacity):
    """Prefilling in chunks of odd sizes (one token, a growth past the buffers) gives each
    chunk the logits of one forward over everything; the cache's views share its buffers."""
    overrides = {"n_kv_head": 2, "bias": False} if arch == "llama" else {}
    config = GPTConfig(**{**SMALL, "arch": arch, **overrides})
    model = GPT(config, kernels=kernels).eval()
    idx = torch.randint(0, config.vocab_size, (2, 40))
    cache = KVCache(config.n_layer, capacity)
    with torch.no_grad():
        full, _ = model(idx)
        start = 0
        for size in (5, 1, 11, 1, 1, 17, 4):
            logits, _ = model(idx[:, start:start + size], cache=cache)
            torch.testing.assert_close(logits, full[:, start:start + size])
            start += size
            assert cache.length == start
            if capacity is not None:
                assert cache.keys[0].shape[2] == capacity  # allocated once
            else:
                assert start <= cache.keys[0].shape[2] <= max(2 * start, 16)
        k, _ = cache.append(0, *(torch.zeros(2, config.kv_heads, 0, 16) for _ in range(2)))
        assert k.shape[2] == 40 and k.data_ptr() == cache.keys[0].data_ptr()  # a view


def test_kv_cache_rejects_overflow_and_mismatched_inputs():
    cache = KVCache(2, capacity=8)
    k = torch.randn(1, 2, 5, 4)
    cache.append(0, k, k)
    with pytest.raises(ValueError, match="capacity 8 exceeded"):
        cache.append(0, k, k)
    with pytest.raises(ValueError, match="holds keys"):
        cache.append(0, torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    with pytest.raises(ValueError, match="holds keys"):
        cache.append(0, k[:, :, :1].double(), k[:, :, :1].double())
    with pytest.raises(ValueError, match="capacity"):
        KVCache(2, capacity=0)
    cache.clear()
    assert cache.length == 0 and cache.append(0, k, k)[0].shape[2] == 5


def test_kv_cache_is_differentiable_under_grad_mode():
    """With grad mode on, the cached keys keep their graph (no writes in place): the gradients of
    a second chunk's logits equal those of the same logits from one forward."""
    config, model, _ = _pair("llama", n_kv_head=2, bias=False)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    cache = KVCache(config.n_layer, capacity=16)
    model(idx[:, :7], cache=cache)
    logits, _ = model(idx[:, 7:], cache=cache)
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    full, _ = model(idx)
    expected = torch.autograd.grad(full[:, 7:].square().sum(), list(model.parameters()))
    torch.testing.assert_close(grads, expected)


def test_generate_sampling_is_seeded_and_respects_top_k():
    config, model, _ = _pair("gpt2")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 12, temperature=1.0, top_k=3,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 12, temperature=1.0, top_k=3,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_refuses_non_finite_logits(temperature):
    """Diverged weights: a clear error, not multinomial's (on a GPU, a device-side assert
    that ends the CUDA context); the model's training mode is restored."""
    config, model, _ = _pair("gpt2")
    model.train()
    with torch.no_grad():
        model.lm_head.weight[3].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 4, temperature=temperature)
    assert model.training


def test_sequence_longer_than_block_size_raises():
    config, model, _ = _pair("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("name, millions", [("gpt2-124m", 124.4), ("gpt2-350m", 354.8),
                                            ("gpt2-774m", 773.9), ("gpt2-1.5b", 1557.6)])
def test_gpt2_presets_have_the_published_sizes(name, millions):
    with torch.device("meta"):
        model = GPT(GPTConfig.preset(name, vocab_size=50257))
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert total / 1e6 == pytest.approx(millions, rel=2e-3)


def test_every_preset_builds_and_bad_configs_raise():
    for name in PRESETS:
        with torch.device("meta"):
            GPT(GPTConfig.preset(name))
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="arch"):
        GPTConfig(arch="mamba")
    with pytest.raises(ValueError, match="sliding_window"):
        GPTConfig(sliding_window=0)
    for name in ("attn_softcap", "logit_softcap"):
        for bad in (0.0, -1.0, math.inf, math.nan, True, "30"):
            with pytest.raises(ValueError, match=name):
                GPTConfig(**{name: bad})
    for name in ("qk_norm", "bias", "tie_embeddings"):
        for bad in (1, "false", None):
            with pytest.raises(ValueError, match=name):
                GPTConfig(**{name: bad})
    with pytest.raises(ValueError, match="kernels"):
        GPT(GPTConfig(**SMALL), kernels="cuda")
    with pytest.raises(ValueError, match="no field"):
        GPTConfig.from_dict({"n_layers": 3})
    # numpy sizes are taken and stored as ints, so the config still saves as JSON
    config = GPTConfig(n_layer=np.int64(2), n_kv_head=np.int32(4), logit_softcap=np.float32(30))
    assert json.loads(json.dumps(config.to_dict()))["n_layer"] == 2
    assert type(config.n_kv_head) is int and type(config.logit_softcap) is float


def test_flops_per_token_formula():
    model = GPT(GPTConfig(**SMALL))
    c = model.config
    assert model.flops_per_token() == (6 * model.num_parameters()
                                       + 6 * c.n_layer * c.block_size * c.n_embd)
    assert model.num_parameters() == (sum(p.numel() for p in model.parameters())
                                      - c.block_size * c.n_embd)
    # Untied, the token table is a lookup (no FLOPs) and the output head (counted, as the tied
    # table is) does the work: the same count.
    untied = GPT(GPTConfig(**SMALL, tie_embeddings=False))
    assert sum(p.numel() for p in untied.parameters()) == (sum(p.numel() for p in
                                                                model.parameters())
                                                            + c.vocab_size * c.n_embd)
    assert untied.num_parameters() == model.num_parameters()


def test_save_pretrained_round_trip(tmp_path):
    config, model, _ = _pair("llama", n_kv_head=2)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied: stored once
    other = GPT(config)
    other.load_state_dict({**weights, "lm_head.weight": weights["wte.weight"]})
    idx = torch.randint(0, config.vocab_size, (1, 7))
    torch.testing.assert_close(other(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_from_hf_gives_the_same_logits_as_transformers(tmp_path, kernels):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=2,
                                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)  # safetensors, as a downloaded checkpoint is
    model = GPT.from_hf(tmp_path, kernels=kernels).eval()
    assert model.config.block_size == 40 and model.config.vocab_size == 101
    idx = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        expected = hf_model(idx).logits
        got, _ = model(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    greedy_hf = hf_model.generate(idx[:1, :5], max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(model.generate(idx[:1, :5], 8, temperature=0), greedy_hf)


def test_from_hf_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_hf(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GPT-2 config"):
        GPT.from_hf(tmp_path)


def test_initial_loss_is_near_log_vocab():
    config, model, _ = _pair("gpt2")
    idx, targets = torch.randint(0, config.vocab_size, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.3


def test_activation_checkpointing_gives_the_same_gradients():
    config, model, _ = _pair("gpt2")
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 16))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(idx, targets)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sliding_window_limits_what_a_position_sees():
    """With sliding_window W, the logits at position t do not depend on tokens before t - W + 1
    (one layer: no receptive-field growth through depth), and do on the ones inside."""
    config = GPTConfig(**{**SMALL, "n_layer": 1, "arch": "llama", "sliding_window": 4})
    model = GPT(config, kernels="fused").eval()
    idx = torch.randint(0, config.vocab_size, (1, 12))
    changed_outside, changed_inside = idx.clone(), idx.clone()
    changed_outside[0, 7] = (idx[0, 7] + 1) % config.vocab_size  # 11 - 4 = 7: just outside
    changed_inside[0, 8] = (idx[0, 8] + 1) % config.vocab_size
    with torch.no_grad():
        base, outside, inside = (model(x)[0][0, 11] for x in (idx, changed_outside, changed_inside))
    torch.testing.assert_close(outside, base, rtol=0, atol=0)
    assert not torch.allclose(inside, base)


@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_document_ids_keep_packed_documents_apart(arch, kernels):
    """With document_ids, a position's logits depend on its own document only (changing every
    token of the other documents changes nothing), through every layer."""
    from fusedlm.models.gpt import document_ids

    config = GPTConfig(**{**SMALL, "arch": arch})
    model = GPT(config, kernels=kernels).eval()
    separator = 0
    idx = torch.randint(1, config.vocab_size, (2, 30))
    idx[0, [0, 9, 10, 22]] = separator  # documents 0..8, 9, 10..21, 22..29; row 1: one
    documents = document_ids(idx, separator)
    assert documents[0].tolist() == [1] * 9 + [2] + [3] * 12 + [4] * 8
    others = idx.clone()
    others[0, :10] = torch.randint(1, config.vocab_size, (10,))  # documents 1 and 2 ..
    others[0, 22:] = torch.randint(1, config.vocab_size, (8,))   # .. and 4 rewritten
    others[0, 22] = separator
    with torch.no_grad():
        base = model(idx, document_ids=documents)[0]
        changed = model(others, document_ids=document_ids(others, separator))[0]
        mixed = model(others)[0]  # without document ids, attention crosses documents
    torch.testing.assert_close(changed[0, 10:22], base[0, 10:22], rtol=0, atol=0)
    assert not torch.allclose(mixed[0, 10:22], base[0, 10:22])
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=0)


@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reset_positions_computes_each_packed_document_as_if_alone(arch, kernels):
    """With reset_positions, positions restart at each document (learned or rotary), so each
    packed document's logits are those of the document run alone from position 0. Without
    it, a document later in the window sees shifted positions: learned ones change its
    logits; rotary ones encode only relative positions, so they match up to rounding."""
    from fusedlm.models.gpt import document_ids

    config = GPTConfig(**{**SMALL, "arch": arch})
    torch.manual_seed(0)
    model = GPT(config, kernels=kernels).eval()
    separator = 0
    idx = torch.randint(1, config.vocab_size, (2, 37))
    idx[0, [0, 9, 10, 23]] = separator  # documents 0..8, 9, 10..22, 23..36
    idx[1, 13] = separator  # 0..12 (no separator first: a document all the same), 13..36
    documents = document_ids(idx, separator)
    with torch.no_grad():
        packed = model(idx, document_ids=documents, reset_positions=True)[0]
        shifted = model(idx, document_ids=documents)[0]
        for row, bounds in ((0, [0, 9, 10, 23, 37]), (1, [0, 13, 37])):
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                alone = model(idx[row:row + 1, start:end])[0][0]
                torch.testing.assert_close(packed[row, start:end], alone, msg=f"{row} {start}")
                if start > 0 and arch == "gpt2":
                    assert not torch.allclose(shifted[row, start:end], alone)
                elif start > 0:
                    torch.testing.assert_close(shifted[row, start:end], alone, rtol=0,
                                               atol=1e-5)
    with pytest.raises(ValueError, match="'reset_positions' needs 'document_ids'"):
        model(idx, reset_positions=True)


@pytest.mark.parametrize("reset_positions", [False, True], ids=["window-positions", "reset"])
def test_document_ids_fused_and_torch_kernels_agree(reset_positions):
    """Packed documents: the fused model's logits and gradients match plain PyTorch's
    (SDPA with the block-diagonal causal mask)."""
    from fusedlm.models.gpt import document_ids

    config, fused, reference = _pair("llama", n_kv_head=2, bias=False)
    idx = torch.randint(1, config.vocab_size, (3, 41))
    idx[:, [5, 17, 18]] = 0
    documents = document_ids(idx, 0)
    losses = [model(idx[:, :-1], idx[:, 1:], document_ids=documents[:, :-1],
                    reset_positions=reset_positions)[1]
              for model in (fused, reference)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="document_ids"):
        fused(idx, document_ids=documents[:, :5])


def test_fuzz_fused_and_torch_models_agree(fuzz):  # noqa: F811
    """Drawn model shapes (either arch, 1-2 layers, head dims 2..16, GQA/MQA, biases, tied or
    not, sliding windows shorter and longer than the batch) and batches (one token, packed
    documents with and without position resets, ignored targets), a z-loss or none: the fused
    model's logits, loss and every parameter gradient pass DESIGN.md's rule against the same
    model on plain PyTorch kernels (baseline) and in float64 (truth); and a prefill in drawn
    chunks through a KV cache gives the one-forward logits."""
    from hypothesis import given
    from hypothesis import strategies as st

    from fusedlm.models.gpt import document_ids
    from tests.helpers import assert_close_rule

    @fuzz(25)
    @given(data=st.data())
    def run(data):
        arch = data.draw(st.sampled_from(ARCHS), label="arch")
        n_kv_head = data.draw(st.integers(1, 3), label="n_kv_head")
        n_head = n_kv_head * data.draw(st.integers(1, 3), label="group")
        head_dim = data.draw(st.sampled_from([2, 4, 8, 16]), label="head dim")
        block_size = data.draw(st.integers(4, 40), label="block size")
        config = GPTConfig(
            arch=arch, n_layer=data.draw(st.integers(1, 2), label="n_layer"), n_head=n_head,
            n_kv_head=n_kv_head if arch == "llama" else None, n_embd=n_head * head_dim,
            block_size=block_size, vocab_size=data.draw(st.integers(2, 60), label="vocab"),
            bias=data.draw(st.booleans(), label="bias"),
            tie_embeddings=data.draw(st.booleans(), label="tied"),
            sliding_window=data.draw(st.one_of(st.none(), st.integers(1, block_size + 2)),
                                     label="window"),
            # (caps near the initial scores' and logits' sizes, where they bite)
            attn_softcap=data.draw(st.one_of(st.none(), st.floats(0.005, 1.0)),
                                   label="attn_softcap"),
            logit_softcap=data.draw(st.one_of(st.none(), st.floats(0.02, 2.0)),
                                    label="logit_softcap"),
            qk_norm=data.draw(st.booleans(), label="qk_norm"))
        torch.manual_seed(data.draw(st.integers(0, 100), label="init seed"))
        fused = GPT(config, kernels="fused")
        reference = GPT(config, kernels="torch")
        reference.load_state_dict(fused.state_dict())
        truth = GPT(config, kernels="torch").double()
        truth.load_state_dict(fused.state_dict())
        B = data.draw(st.integers(1, 3), label="B")
        T = data.draw(st.integers(1, block_size), label="T")
        idx = torch.randint(0, config.vocab_size, (B, T))
        targets = torch.randint(0, config.vocab_size, (B, T))
        targets[torch.rand(B, T) < 0.2] = -1
        targets[0, 0] = 0  # at least one counted target
        kwargs = {}
        if data.draw(st.booleans(), label="packed documents"):
            idx[torch.rand(B, T) < 0.25] = 0  # separators
            kwargs = {"document_ids": document_ids(idx, 0),
                      "reset_positions": data.draw(st.booleans(), label="reset positions")}
        z_loss = data.draw(st.sampled_from([0.0, 0.0, 1e-4, 0.3]), label="z_loss")
        outs = [m(idx, targets, **kwargs, z_loss=z_loss) for m in (fused, reference, truth)]
        assert_close_rule(outs[0][0], outs[1][0], outs[2][0], name="logits")
        assert_close_rule(outs[0][1], outs[1][1], outs[2][1], name="loss")
        for _, loss in outs:
            loss.backward()
        theirs, truths = dict(reference.named_parameters()), dict(truth.named_parameters())
        for name, p in fused.named_parameters():
            assert_close_rule(p.grad, theirs[name].grad, truths[name].grad, name=name)
        if kwargs:
            return  # (the cache serves generation, which packs no documents)
        fused.eval()
        cache = KVCache(config.n_layer, data.draw(st.one_of(st.none(), st.just(T)),
                                                  label="cache capacity"))
        with torch.no_grad():
            full, _ = fused(idx)
            start = 0
            while start < T:
                size = data.draw(st.integers(1, T - start), label="chunk")
                logits, _ = fused(idx[:, start:start + size], cache=cache)
                torch.testing.assert_close(logits, full[:, start:start + size],
                                           rtol=1e-5, atol=1e-5)
                start += size

    run()
