"""fusedlm.integrations.transformers.apply on small random-init Hugging Face models.

Truth is the unpatched model in float64, torch's own computation the unpatched float32 model,
and the patched float32 model must pass tests/helpers.assert_close_rule against them."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import fusedlm  # noqa: E402
from fusedlm.backends import OpDispatch  # noqa: E402
from fusedlm.integrations import attention_calls  # noqa: E402
from fusedlm.integrations import transformers as fhf  # noqa: E402
from fusedlm.integrations.sdpa_mode import ROUTING_KEY  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_close_rule,
    cpu_backend_available,
    cpu_unavailable_reason,
)
from tests.integrations.test_transformers_models import (  # noqa: E402
    NOT_ONE_RUN,
    builds_own_masks,
)
from tests.test_fuzz import fuzz, seed_torch  # noqa: E402, F401  (fuzz: the fixture)

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():  # GQA: 4 query heads, 2 key/value heads
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2))


def _qwen2():  # GQA with qkv biases
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, num_key_value_heads=2))


def _gemma():  # MQA and the (1 + weight) RMSNorm
    return transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16)
    )


def _cohere():  # its own LayerNorm class: mean removed, weight, no bias
    cfg = transformers.CohereConfig(**COMMON, num_key_value_heads=2)
    return transformers.CohereForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=False)


CAUSAL = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2, "gemma": _gemma, "cohere": _cohere}
ALL = {**CAUSAL, "bert": _bert}


def _randomize_norms(model):
    """Random-init norms have weight 1 (0 for Gemma) and bias 0; make them non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2].lower():
                p.add_(torch.randn_like(p) * 0.2)


def _build(name):
    model = ALL[name]()
    _randomize_norms(model)
    return model.eval()


def _triple(name, **apply_kwargs):
    """(patched float32, unpatched float32, unpatched float64) copies of one model."""
    model = _build(name)
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fhf.apply(model, **apply_kwargs)
    return model, same, truth, report


def _out(model, name, **inputs):
    out = model(**inputs)
    return out.last_hidden_state if name == "bert" else out.logits


def _padding_queries_hidden(model, name: str, side: str) -> bool:
    """Whether a causal model's mask hides every key of its left-padding queries with the
    dtype's min (builds_own_masks: GPT-2 in transformers 4.53), so those calls fall back."""
    return side == "left" and name != "bert" and builds_own_masks(model)


def _assert_on_our_attention(model):
    """Switched to our AttentionInterface function, or, for a model whose attention classes call
    F.sdpa themselves (transformers 4.x's BERT), its SDPA calls routed to ours."""
    if model.config._attn_implementation != "fusedlm":
        assert model.config._attn_implementation == "sdpa" and ROUTING_KEY in model.__dict__


def _calls(model):
    """The attention calls of ``model`` by route: our AttentionInterface function's, plus the
    routed F.sdpa calls' (transformers 4.x's BERT)."""
    return fhf.attention_calls() + attention_calls(model)


def _reset_calls(model):
    fhf.reset_attention_calls()
    if ROUTING_KEY in model.__dict__:
        model.__dict__[ROUTING_KEY].calls.clear()


@pytest.fixture(autouse=True)
def _fresh_counters():
    fhf.reset_attention_calls()
    OpDispatch.last_choice.clear()


@pytest.mark.parametrize("name", list(ALL))
def test_logits_and_grads_match(name):
    model, same, truth, report = _triple(name)
    _assert_on_our_attention(model)
    ids = torch.randint(0, VOCAB, (2, 13))
    outs = [_out(m, name, input_ids=ids) for m in (model, same, truth)]
    assert _calls(model) == {"fused": 2}  # two layers, no fallback
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"
    norm_op = "layer_norm_fwd" if name in ("gpt2", "bert", "cohere") else "rms_norm_fwd"
    assert OpDispatch.last_choice[norm_op] == "cpu"
    glu_mlps = name in ("llama", "qwen2", "gemma", "cohere")  # (Gemma's: GeGLU, tanh gelu)
    assert (OpDispatch.last_choice.get("glu_fwd") == "cpu") == glu_mlps
    assert_close_rule(outs[0], outs[1], outs[2], name=f"{name} output")

    weight = torch.randn_like(outs[0])
    for out in outs:
        (out * weight.to(out.dtype)).sum().backward()
    assert OpDispatch.last_choice["attention_bwd"] == "cpu"
    assert (OpDispatch.last_choice.get("glu_bwd") == "cpu") == glu_mlps
    assert len(assert_gradients_match(model, same, truth)) >= 10


def assert_gradients_match(model, same, truth, label: str = "") -> list[str]:
    """Every parameter of the patched ``model`` has a gradient exactly where the unpatched
    ``same`` has one, passing the rule against ``same``'s and the float64 ``truth``'s; returns
    the names checked."""
    same_params, truth_params = dict(same.named_parameters()), dict(truth.named_parameters())
    checked = []
    for pname, p in model.named_parameters():
        if p.grad is None:
            assert same_params[pname].grad is None, pname
            continue
        assert_close_rule(p.grad, same_params[pname].grad, truth_params[pname].grad,
                          name=f"{pname} ({label})" if label else pname)
        checked.append(pname)
    return checked


def _check_glu_model(model, same, truth, ids, name: str):
    """Logits of the (patched, unpatched, float64) models on ``ids`` pass the rule with our GLU
    forward having run, and after backward of sum(logits * weight) with our GLU backward, every
    parameter's gradient does; returns the logits and the parameter names checked."""
    OpDispatch.last_choice.clear()
    outs = [m(input_ids=ids).logits for m in (model, same, truth)]
    assert OpDispatch.last_choice["glu_fwd"] == "cpu"
    assert_close_rule(outs[0], outs[1], outs[2], name=f"{name} output")
    weight = torch.randn_like(outs[0])
    for out in outs:
        (out * weight.to(out.dtype)).sum().backward()
    assert OpDispatch.last_choice["glu_bwd"] == "cpu"
    return outs, assert_gradients_match(model, same, truth)


def _check_gradients(outs, weight, model, same, truth, label: str, fused: bool = True) -> None:
    """Backward of sum(out * weight) through the (patched, unpatched, float64) models' outputs
    ``outs``: our attention backward ran (if ``fused``), and every parameter's gradient passes
    the rule."""
    for out in outs:
        (out * weight.to(out.dtype)).sum().backward()
    assert OpDispatch.last_choice.get("attention_bwd") == ("cpu" if fused else None)
    same_params, truth_params = dict(same.named_parameters()), dict(truth.named_parameters())
    for pname, p in model.named_parameters():
        if p.grad is not None:
            assert_close_rule(p.grad, same_params[pname].grad, truth_params[pname].grad,
                              name=f"{pname} ({label})")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(ALL))
def test_padding_runs_fused_and_matches(name, side):
    """A tokenizer's padding mask, left or right: each row's keys are one run, which our kernels
    take as a key range (no fallback)."""
    model, same, truth, _ = _triple(name)
    lengths = [13, 8, 5]
    ids = torch.randint(1, VOCAB, (3, 13))
    mask = torch.zeros(3, 13, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, 13 - n:] = 1
        else:
            mask[row, :n] = 1
    outs = [_out(m, name, input_ids=ids, attention_mask=mask) for m in (model, same, truth)]
    fused = not _padding_queries_hidden(model, name, side)
    if not fused:
        assert _calls(model) == {f"sdpa: {NOT_ONE_RUN}": 2}
    else:
        assert _calls(model) == {"fused": 2}
        assert OpDispatch.last_choice["attention_fwd"] == "cpu"
    real = mask.bool()
    assert_close_rule(outs[0][real], outs[1][real], outs[2][real], name=f"{name} {side} padded")
    weight = torch.randn_like(outs[0]) * real[..., None]  # the loss of the real tokens only
    _check_gradients(outs, weight, model, same, truth, f"{side} padded", fused)
    for m in (model, same, truth):
        m.zero_grad(set_to_none=True)

    # A batch without padding still runs our kernels, with an all-ones mask passed.
    _reset_calls(model)
    full = torch.ones_like(mask)
    outs = [_out(m, name, input_ids=ids, attention_mask=full) for m in (model, same, truth)]
    assert _calls(model) == {"fused": 2}
    assert_close_rule(outs[0], outs[1], outs[2], name=f"{name} unpadded")


def _packed_position_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, T) position_ids that restart at 0 for each packed document (as transformers'
    DataCollatorWithFlattening makes them)."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in
                        lengths_per_row])


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "cohere"])
def test_packed_sequences_run_fused_and_match(name):
    """Packed documents (position_ids restarting, no attention_mask): transformers builds a
    block-diagonal causal mask, which our kernels take as per-query key ranges (no fallback);
    logits and gradients match the unpatched model, and each document's logits are those of
    the document run alone."""
    model, same, truth, _ = _triple(name)
    lengths = [[7, 13], [5, 1, 14]]
    position_ids = _packed_position_ids(lengths)
    ids = torch.randint(1, VOCAB, position_ids.shape)
    # (transformers packs only without a cache, as in training)
    outs = [_out(m, name, input_ids=ids, position_ids=position_ids, use_cache=False)
            for m in (model, same, truth)]
    assert fhf.attention_calls() == {"fused": 2}
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"
    assert_close_rule(outs[0], outs[1], outs[2], name=f"{name} packed")
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            alone = _out(truth, name, input_ids=ids[row:row + 1, start:start + n])
            torch.testing.assert_close(outs[2][row:row + 1, start:start + n], alone,
                                       rtol=1e-9, atol=1e-9)
            start += n
    _check_gradients(outs, torch.randn_like(outs[0]), model, same, truth, "packed")


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
@pytest.mark.parametrize("name", list(CAUSAL))
def test_generate_greedy_same_tokens(name, padded):
    model, same, _, _ = _triple(name)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        ids[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        theirs = same.generate(ids, **kwargs)
    assert ours.shape == (2, 15)
    assert torch.equal(ours, theirs), (ours, theirs)
    # prefill (causal, Tq = Tk) and 7 decode steps (Tq = 1 < Tk), all ours, left padding
    # (a key range per row) included
    if padded and _padding_queries_hidden(model, name, "left"):  # its prefill: torch's
        assert fhf.attention_calls() == {"fused": 2 * 7, f"sdpa: {NOT_ONE_RUN}": 2}
    else:
        assert fhf.attention_calls() == {"fused": 2 * 8}
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.compile's torch.jit ones)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_compiled_applied_model_runs_fused_and_matches(name):
    """torch.compile(fullgraph=True) of an applied model, loss from labels included: one graph,
    our attention, norm, GLU and cross-entropy ops opaque in it; the loss, the logits and every
    gradient match the same applied model run eagerly (and the float64 unpatched one by the
    rule). With a padding mask the graph records the run-time-masked attention op, which
    reads the mask when it runs and takes our kernels, forward and backward."""
    model, same, truth, _ = _triple(name)
    # A training forward: no KV cache. Transformers 4.54-4.55 build a DynamicCache by calling
    # inspect.signature, which breaks the graph of the unpatched model too.
    for m in (model, same, truth):
        m.config.use_cache = False
    eager = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 13))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    # Without padding transformers may still make the causal mask under compile (4.x; 5.x
    # under torch 2.11): the graph then holds the run-time-masked op, which finds the mask
    # causal and takes our kernels (checked on the run below).
    assert "fusedlm.attention_fwd" in code or "fusedlm.attention_masked_fwd" in code, code
    ops = ["cross_entropy_fwd",
           *(["rms_norm_fwd", "glu_fwd"] if name == "llama" else ["layer_norm_fwd"])]
    for op in ops:
        assert f"fusedlm.{op}" in code, f"fusedlm.{op} missing from the traced graph"
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    OpDispatch.last_choice.clear()
    results = [m(input_ids=ids, labels=ids) for m in (compiled, eager, truth)]
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"
    for result in results:
        result.loss.backward()
    torch.testing.assert_close(results[0].logits, results[1].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0].loss, results[1].loss, rtol=1e-6, atol=1e-6)
    assert_close_rule(results[0].logits, results[1].logits, results[2].logits, name=name)
    eager_params = dict(eager.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_params[pname].grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=pname: f"{n}: {m}")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert "fusedlm.attention_masked_fwd" in explanation.graphs[0].code
    OpDispatch.last_choice.clear()
    padded = compiled(input_ids=ids, attention_mask=mask).logits
    expected = same(input_ids=ids, attention_mask=mask).logits
    truth_padded = truth(input_ids=ids, attention_mask=mask).logits
    fused = not _padding_queries_hidden(model, name, "left")
    assert OpDispatch.last_choice.get("attention_fwd") == ("cpu" if fused else None)
    kept = mask.bool()  # (the padded positions' outputs are not compared)
    assert_close_rule(padded[kept], expected[kept], truth_padded[kept], name=f"{name} padded")
    for m in (model, same, truth):
        m.zero_grad()
    weight = torch.randn_like(padded) * kept[..., None]
    for out in (padded, expected, truth_padded):
        (out * weight.to(out.dtype)).sum().backward()
    assert OpDispatch.last_choice.get("attention_bwd") == ("cpu" if fused else None)
    assert_gradients_match(model, same, truth, "padded")


@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_loads_into_unpatched_model(name):
    model, same, _, _ = _triple(name)
    state = model.state_dict()
    assert list(state) == list(same.state_dict())
    fresh = ALL[name]().eval()
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = _out(same, name, input_ids=ids)
        torch.testing.assert_close(_out(fresh, name, input_ids=ids), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.compile's torch.jit ones)
def test_compiled_static_cache_generate_same_tokens():
    """Compiled generation with a static cache (transformers' fast-decoding setup: every step
    sees a (B, 1, Tq, max_cache_len) mask, the unfilled cache hidden): a left-padded batch
    gives the unpatched model's tokens, attention on our kernels."""
    model, same, _, _ = _triple("llama")
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        theirs = same.generate(ids, **kwargs)
    assert torch.equal(ours, theirs), (ours, theirs)
    assert OpDispatch.last_choice["attention_fwd"] == "cpu"


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_save_pretrained_reloads_as_the_plain_model(name, tmp_path):
    """save_pretrained of an applied model writes a checkpoint that nothing of fusedlm's
    leaks into (config without the "fusedlm" attention, the same tensor names): from_pretrained
    gives the plain transformers model, on transformers' own attention, with the same logits."""
    model, same, _, _ = _triple(name)
    assert [m for m in model.modules() if type(m).__module__.startswith("fusedlm")]
    model.save_pretrained(tmp_path)
    assert "fusedlm" not in (tmp_path / "config.json").read_text()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation != "fusedlm"
    assert not [m for m in loaded.modules() if type(m).__module__.startswith("fusedlm")]
    assert list(loaded.state_dict()) == list(same.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, same(input_ids=ids).logits)


def test_sliding_window_shorter_than_the_sequence_matches():
    """Mistral with a 6-token window over 13 tokens: transformers hands the attention function a
    banded mask (or, where the window covers everything, none); our kernels run it as a sliding
    window, never as a plain causal mask."""
    cfg = transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=6)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg)
    _randomize_norms(model)
    model.eval()
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    fhf.apply(model)
    assert model.config._attn_implementation == "fusedlm"
    ids = torch.randint(0, VOCAB, (2, 13))
    outs = [m(input_ids=ids).logits for m in (model, same, truth)]
    assert fhf.attention_calls() == {"fused": 2}
    assert_close_rule(outs[0], outs[1], outs[2], name="mistral sliding window")
    # Within the window the mask is plain causal, and our kernels run.
    fhf.reset_attention_calls()
    short = ids[:, :5]
    outs = [m(input_ids=short).logits for m in (model, same, truth)]
    assert fhf.attention_calls() == {"fused": 2}
    assert_close_rule(outs[0], outs[1], outs[2], name="mistral inside the window")


def test_attention_function_takes_absent_terms_as_none():
    """What models without sinks or soft-capping pass (s_aux=None, softcap=None): no effect."""
    model = _build("llama")
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 5, 16)
    plain, _ = fhf.fusedlm_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None)
    for argument in ("softcap", "s_aux"):
        out, _ = fhf.fusedlm_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None,
                                               **{argument: None})
        assert torch.equal(out, plain)


def _gemma2(sliding_window=None, softcap=50.0):
    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip("this transformers has no Gemma2ForCausalLM")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16,
                                       attn_logit_softcapping=softcap,
                                       sliding_window=sliding_window or 4096)
    model = transformers.Gemma2ForCausalLM(config)
    _randomize_norms(model)
    with torch.no_grad():  # scores that reach the cap: larger query and key projections
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_gemma2_soft_capped_attention_logits_and_grads(padded):
    """Gemma 2's logit soft-capping (softcap) runs on fusedlm.attention(softcap=...): its global
    and sliding-window layers all fused, the logits and every gradient those of its own eager
    attention in float64 (within the rule) and float32. (Left-padded, the float64 eager model
    makes NaN: its additive mask meets -inf there; the float32 one is then the reference.)"""
    model = _gemma2(sliding_window=4, softcap=2.0)
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    for m in (same, truth):
        m.config._attn_implementation = "eager"
    report = fhf.apply(model)
    assert model.config._attn_implementation == "fusedlm", str(report)
    ids = torch.randint(0, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    outs = [m(input_ids=ids, attention_mask=mask).logits for m in (model, same, truth)]
    assert _calls(model) == {"fused": 2}
    real = mask.bool()
    has_truth = not outs[2].isnan().any()

    def check(ours, theirs, truth, name):
        if has_truth:
            assert_close_rule(ours, theirs, truth, name=name)
        else:
            # (float32 against float32: the absolute term scales with the values, up to ~70)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, msg=name,
                                       atol=1e-5 * max(1.0, theirs.abs().max().item()))

    assert has_truth or padded
    check(outs[0][real], outs[1][real], outs[2][real], "gemma2 logits")
    capless = _gemma2(sliding_window=4, softcap=None)
    capless.load_state_dict(same.state_dict())
    capless.config._attn_implementation = "eager"
    uncapped = capless(input_ids=ids, attention_mask=mask).logits
    assert (uncapped[real] - outs[1][real]).abs().max() > 1e-2  # the cap matters here
    weight = torch.randn_like(outs[0]) * real[..., None]
    for out in outs[:3 if has_truth else 2]:
        (out * weight.to(out.dtype)).sum().backward()
    same_params, truth_params = dict(same.named_parameters()), dict(truth.named_parameters())
    checked = 0
    for pname, p in model.named_parameters():
        expected = same_params[pname].grad
        assert (p.grad is None) == (expected is None), pname
        if p.grad is not None:
            check(p.grad, expected, truth_params[pname].grad, pname)
            checked += "self_attn" in pname
    assert checked == 8  # q, k, v, o of both layers


def test_gemma2_calls_our_kernels_cannot_serve_run_its_math():
    """A mask with gaps (no band of keys per query): SDPA has no cap, so the call runs Gemma 2's
    own soft-capped math in torch, as its eager attention does. Dropout runs in our kernels."""
    model = _gemma2()
    from transformers.models.gemma2 import modeling_gemma2

    module = model.model.layers[0].self_attn
    q, k, v = (3 * torch.randn(2, h, 7, 16) for h in (4, 2, 2))
    causal = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    visible = causal.clone()
    visible[1, :, 5, 2] = False  # a gap
    for mask, expect in ((visible, "torch: an attention mask that is not one run of keys per "
                          "query (padding with gaps, a custom pattern)"),
                         (causal, "fused"), (None, "fused")):
        fhf.reset_attention_calls()
        ours, _ = fhf.fusedlm_attention_forward(module, q, k, v, mask, scaling=0.25,
                                                softcap=2.0)
        assert fhf.attention_calls() == {expect: 1}
        eager_mask = torch.zeros(2, 1, 7, 7).masked_fill(~(causal if mask is None else mask),
                                                          torch.finfo(torch.float32).min)
        theirs, _ = modeling_gemma2.eager_attention_forward(module, q, k, v, eager_mask,
                                                            scaling=0.25, softcap=2.0)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    fhf.reset_attention_calls()
    module.train()
    fhf.fusedlm_attention_forward(module, q, k, v, None, dropout=0.5, softcap=2.0)
    assert fhf.attention_calls() == {"fused": 1}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_attention_dropout_in_training_runs_fused(name):
    """A model training with attention dropout (GPT-2's attn_pdrop, BERT's
    attention_probs_dropout_prob) runs it inside our kernels, padded batches included: every
    call fused, and with the generator seeded alike the cpu kernels give the torch reference
    backend's loss and gradients (the same Philox mask); eval mode drops nothing."""
    def build():
        torch.manual_seed(0)
        if name == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                          n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.3)
            return transformers.GPT2LMHeadModel(cfg)
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=96,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3,
                                      max_position_embeddings=64)
        return transformers.BertModel(cfg, add_pooling_layer=False)

    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    results = []
    for backend in ("cpu", "torch"):
        model = build()
        fhf.apply(model, backend=backend)
        model.train()
        _reset_calls(model)
        torch.manual_seed(42)
        out = _out(model, name, input_ids=ids, attention_mask=mask)
        loss = out[mask.bool()].square().mean()
        loss.backward()
        assert set(_calls(model)) == {"fused"}, _calls(model)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, model))
    (loss, grads, model), (loss_ref, grads_ref, _) = results
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], msg=n)
    model.eval()
    with torch.no_grad():
        first, second = (_out(model, name, input_ids=ids, attention_mask=mask) for _ in range(2))
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        dropped = _out(model, name, input_ids=ids, attention_mask=mask)
    assert not torch.allclose(dropped, first)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), "50", True])
def test_bad_softcap_is_refused(softcap):
    model = _build("llama")
    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="'softcap'"):
        fhf.fusedlm_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None,
                                      softcap=softcap)


def _gpt_oss(sliding_window=None):
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip("this transformers has no GptOssForCausalLM")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**{**COMMON, "intermediate_size": 64},
                                       num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=sliding_window)
    model = transformers.GptOssForCausalLM(config)
    _randomize_norms(model)
    with torch.no_grad():  # sinks that matter: about as large as the scores
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks))
    return model.eval()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_gpt_oss_attention_sinks_logits_and_grads(padded):
    """gpt-oss's attention sinks (s_aux) run on fusedlm.attention(sinks=...): its full causal
    and sliding-window layers all fused, the logits and every gradient (the sinks' included)
    those of its own eager attention. (Its MoE takes no float64: the unpatched float32 model
    is the reference.)"""
    model = _gpt_oss(sliding_window=4)
    same = copy.deepcopy(model)
    report = fhf.apply(model)
    assert model.config._attn_implementation == "fusedlm", str(report)
    ids = torch.randint(0, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    outs = [m(input_ids=ids, attention_mask=mask).logits for m in (model, same)]
    assert _calls(model) == {"fused": 2}
    real = mask.bool()
    torch.testing.assert_close(outs[0][real], outs[1][real], rtol=1e-4, atol=1e-5)
    weight = torch.randn_like(outs[0]) * real[..., None]
    for out in outs:
        (out * weight).sum().backward()
    same_params = dict(same.named_parameters())
    sinks_checked = 0
    for pname, p in model.named_parameters():
        expected = same_params[pname].grad
        assert (p.grad is None) == (expected is None), pname
        if p.grad is not None:
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5, msg=pname)
            sinks_checked += pname.endswith("sinks")
    assert sinks_checked == 2


def test_gpt_oss_sinks_calls_our_kernels_cannot_serve_run_its_math():
    """A mask with gaps (no band of keys per query): the sinks cannot go to SDPA, so the call
    runs gpt-oss's own sink math in torch, as its eager attention_forward does. Dropout runs
    in our kernels."""
    model = _gpt_oss()
    from transformers.models.gpt_oss import modeling_gpt_oss

    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    causal = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    visible = causal.clone()
    visible[1, :, 5, 2] = False  # a gap
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    for mask, expect in ((visible, "torch: an attention mask that is not one run of keys per "
                          "query (padding with gaps, a custom pattern)"),
                         (causal, "fused"), (None, "fused")):
        fhf.reset_attention_calls()
        ours, _ = fhf.fusedlm_attention_forward(module, q, k, v, mask, scaling=0.25,
                                                s_aux=module.sinks)
        assert fhf.attention_calls() == {expect: 1}
        eager_mask = additive if mask is visible else (
            None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, -1e30))
        if eager_mask is None:  # gpt-oss's eager attention takes the causal mask explicitly
            eager_mask = torch.zeros(1, 1, 7, 7).masked_fill(
                ~torch.ones(7, 7, dtype=torch.bool).tril(), -1e30)
        theirs, _ = modeling_gpt_oss.eager_attention_forward(module, q, k, v, eager_mask,
                                                             scaling=0.25)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    fhf.reset_attention_calls()
    module.train()
    fhf.fusedlm_attention_forward(module, q, k, v, None, dropout=0.5, s_aux=module.sinks)
    assert fhf.attention_calls() == {"fused": 1}


def test_s_aux_of_the_wrong_shape_is_refused():
    model = _build("llama")
    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="'s_aux'.*shape"):
        fhf.fusedlm_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None,
                                      s_aux=torch.zeros(2))


def test_apply_keeps_parameters_and_reports():
    model = _build("gemma")
    params = dict(model.named_parameters())
    report = fhf.apply(model)
    for pname, p in model.named_parameters():
        assert p is params[pname], pname
    assert len(report.swapped) == 7 and not report.left
    norms = [s for s in report.swapped if s.name.endswith("norm")]
    assert len(norms) == 5 and all("Gemma-style" in s.note for s in norms)
    # Gemma's MLP is GeGLU (gelu_pytorch_tanh): its activation on fusedlm.geglu
    assert [(s.name, s.note) for s in report.swapped if s not in norms] == [
        (f"model.layers.{i}.mlp", "gelu(gate, approximate='tanh') * up on fusedlm.geglu")
        for i in range(2)]
    assert "GemmaRMSNorm" in str(report) and "sdpa_attention_forward" in str(report)

    gpt2 = _build("gpt2")
    report = fhf.apply(gpt2, attention=False)
    assert gpt2.config._attn_implementation == "sdpa"
    assert {s.name for s in report.swapped} == {"transformer.h.0.ln_1", "transformer.h.0.ln_2",
                                                "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                                                "transformer.ln_f"}
    assert all(type(m) is not torch.nn.LayerNorm for m in gpt2.modules())

    llama = _build("llama")
    report = fhf.apply(llama, norms=False, backend="cpu")
    assert llama.config._attn_implementation == "fusedlm_cpu"
    assert {s.name for s in report.swapped} == {"model.layers.0.mlp", "model.layers.1.mlp"}
    llama(torch.randint(0, VOCAB, (1, 5)))
    assert fhf.attention_calls() == {"fused": 2}

    restored = fusedlm.unpatch(model)
    assert len(restored.swapped) == 7
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m).__name__ not in ("ModelRMSNorm", "ModelGeGLUMLP")
               for m in model.modules())


class _OwnAttentionConfig(transformers.PretrainedConfig):
    model_type = "fusedlm_test_own_attention"

    def __init__(self, hidden_size=32, num_heads=4, vocab_size=VOCAB, **kwargs):
        self.hidden_size, self.num_heads, self.vocab_size = hidden_size, num_heads, vocab_size
        super().__init__(**kwargs)


class _OwnAttentionBlock(torch.nn.Module):
    """Pre-norm attention that calls F.scaled_dot_product_attention itself, as remote-code
    models and transformers 4.x's BERT do (no AttentionInterface)."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.num_heads
        self.norm = torch.nn.LayerNorm(config.hidden_size)
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.heads, C // self.heads).permute(
            2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               is_causal=mask is None)
        return x + out.transpose(1, 2).reshape(B, T, C)


class _OwnAttentionModel(transformers.PreTrainedModel):
    config_class = _OwnAttentionConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = torch.nn.ModuleList([_OwnAttentionBlock(config) for _ in range(2)])
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        mask = None
        if attention_mask is not None:  # causal and the padding, boolean (B, 1, T, T)
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return x


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right_padding"])
def test_model_calling_sdpa_itself_is_routed(padded):
    """A transformers model on "sdpa" whose attention calls F.sdpa itself, not through
    AttentionInterface: apply leaves its implementation, routes those calls to our kernels
    (outputs and gradients by the rule), and unpatch removes the routing."""
    torch.manual_seed(0)
    model = _OwnAttentionModel(_OwnAttentionConfig())
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fhf.apply(model)
    assert model.config._attn_implementation == "sdpa" and not report.left
    assert any("does not use transformers' AttentionInterface" in note
               and "go to fusedlm.scaled_dot_product_attention" in note
               for note in report.notes), str(report)
    assert [s.name for s in report.swapped] == ["blocks.0.norm", "blocks.1.norm"]
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask if padded else None}
    outs = [m(**inputs) for m in (model, same, truth)]
    assert attention_calls(model) == {"fused": 2}
    real = mask.bool()
    assert_close_rule(outs[0][real], outs[1][real], outs[2][real], name="own attention")
    weight = torch.randn_like(outs[0]) * real[..., None]
    for out in outs:
        (out * weight.to(out.dtype)).sum().backward()
    assert OpDispatch.last_choice["attention_bwd"] == "cpu"
    assert len(assert_gradients_match(model, same, truth)) == 9

    restored = fusedlm.unpatch(model)
    assert ROUTING_KEY not in model.__dict__ and len(restored.swapped) == 2
    model(**inputs)
    assert attention_calls(model) == {}


# ---- the loss -----------------------------------------------------------------------------------


def _labels(ids, ignored=3):
    labels = ids.clone()
    labels[0, :ignored] = -100  # a prompt not trained on
    return labels


@pytest.mark.parametrize("accumulating", [False, True], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("name", list(CAUSAL))
def test_loss_matches_and_runs_fusedlms_cross_entropy(name, accumulating):
    """A causal LM's loss (labels, -100 ignored; transformers' gradient-accumulation sum over
    num_items_in_batch) and every parameter's gradient, against the unpatched model by the
    rule. backend="torch" puts the loss on the op (on CPU "auto" gives transformers' own)."""
    model, same, truth, report = _triple(name, backend="torch")
    assert any(n.startswith("loss: loss_function ForCausalLMLoss -> fusedlm's causal_lm_loss")
               for n in report.notes), report
    ids = torch.randint(0, VOCAB, (2, 13))
    extra = {"num_items_in_batch": torch.tensor(30)} if accumulating else {}
    losses = [m(input_ids=ids, labels=_labels(ids), **extra).loss for m in (model, same, truth)]
    assert OpDispatch.last_choice["cross_entropy_fwd"] == "torch"
    _check_losses(losses, model, same, truth, f"{name} loss")


def _check_losses(losses, model, same, truth, label: str) -> None:
    """The (patched, unpatched, float64) models' losses, then every parameter's gradient, by
    the rule; the patched loss in float32, as transformers' own."""
    assert losses[0].dtype == torch.float32
    assert_close_rule(losses[0], losses[1], losses[2], name=label)
    for loss in losses:
        loss.backward()
    same_params, truth_params = dict(same.named_parameters()), dict(truth.named_parameters())
    for pname, p in model.named_parameters():
        if p.grad is not None:
            assert_close_rule(p.grad, same_params[pname].grad, truth_params[pname].grad,
                              name=pname)


def test_loss_functions_take_transformers_arguments():
    """shift_labels given (no shift), and the masked-LM loss (no shift), against transformers'
    own functions on the same float32 logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

    logits = torch.randn(2, 9, VOCAB, dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[1, 4:] = -100
    for ours, theirs, kwargs in [
        (fhf.causal_lm_loss, ForCausalLMLoss, {}),
        (fhf.causal_lm_loss, ForCausalLMLoss, {"shift_labels": labels}),
        (fhf.masked_lm_loss, ForMaskedLMLoss, {"num_items_in_batch": 11}),
    ]:
        args = (logits, labels, VOCAB)
        got = ours(*args, backend="torch", **kwargs)
        expected = theirs(*args, **kwargs)
        assert got.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_loss_swap_is_reported_undone_and_optional():
    llama = _build("llama")
    original = llama.loss_function
    fhf.apply(llama, loss=False)
    assert llama.loss_function is original
    report = fhf.apply(llama)
    assert llama.loss_function.func is fhf.causal_lm_loss
    assert "loss: already causal_lm_loss (backend 'torch')" in fhf.apply(llama,
                                                                     backend="torch").notes
    assert llama.loss_function.keywords == {"backend": "torch"}
    restored = fusedlm.unpatch(llama)
    assert "loss_function restored" in restored.notes and "_loss_function" not in llama.__dict__
    assert llama.loss_function is original
    assert report.notes[-1].startswith("loss:")

    classifier = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**COMMON, num_key_value_heads=2, num_labels=3))
    report = fhf.apply(classifier)
    assert [m.reason for m in report.left] == [
        "loss: ForSequenceClassificationLoss is not a cross-entropy over the vocabulary"]
    assert "_loss_function" not in classifier.__dict__


# ---- the MLPs ------------------------------------------------------------------------------------


def test_mlp_swap_is_reported_undone_and_optional():
    llama = _build("llama")
    mlps = [layer.mlp for layer in llama.model.layers]
    keys = list(llama.state_dict())
    fhf.apply(llama, mlp=False)
    assert all(type(m).__name__ == "LlamaMLP" for m in mlps)
    fusedlm.unpatch(llama)
    report = fhf.apply(llama, attention=False, norms=False, loss=False)
    assert [(s.name, s.original.rsplit(".", 1)[-1], s.replacement.rsplit(".", 1)[-1])
            for s in report.swapped] == [
        (f"model.layers.{i}.mlp", "LlamaMLP", "ModelSwiGLUMLP") for i in range(2)]
    assert all(s.note == "silu(gate) * up on fusedlm.swiglu" for s in report.swapped)
    assert [layer.mlp for layer in llama.model.layers] == mlps  # the same objects, in place
    assert all(isinstance(m, fusedlm.nn.SwiGLUMLP) for m in mlps)
    assert list(llama.state_dict()) == keys
    assert not fhf.apply(llama, attention=False, norms=False, loss=False).swapped  # once only
    restored = fusedlm.unpatch(llama)
    assert [s.name for s in restored.swapped] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(type(m).__name__ == "LlamaMLP" for m in mlps)
    assert not any("_fusedlm" in key for m in mlps for key in m.__dict__)


def test_phi3_fused_gate_up_projection_matches():
    """Phi-3's MLP computes gate and up with one ``gate_up_proj``: recognised, and its halves
    read in place."""
    config = transformers.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fhf.apply(model, attention=False, norms=False, loss=False)
    assert [s.note for s in report.swapped] == [
        "silu(gate) * up on fusedlm.swiglu (fused gate_up_proj)"] * 2
    ids = torch.randint(0, VOCAB, (2, 11))
    outs = [m(input_ids=ids).logits for m in (model, same, truth)]
    assert OpDispatch.last_choice["glu_fwd"] == "cpu"
    assert_close_rule(outs[0], outs[1], outs[2], name="phi3 output")
    weight = torch.randn_like(outs[0])
    for out in outs:
        (out * weight.to(out.dtype)).sum().backward()
    truth_params = dict(truth.named_parameters())
    same_params = dict(same.named_parameters())
    for pname in ("model.layers.0.mlp.gate_up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        p = dict(model.named_parameters())[pname]
        assert_close_rule(p.grad, same_params[pname].grad, truth_params[pname].grad, name=pname)


# Gemma 1, 2 and 3: GeGLU MLPs (hidden activation gelu_pytorch_tanh)
GEMMAS = {
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(num_key_value_heads=2, head_dim=16)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(num_key_value_heads=2, head_dim=16, sliding_window=6)),
}


@pytest.mark.parametrize("name", list(GEMMAS))
def test_gemma_geglu_mlps_are_swapped_and_match(name):
    """A tiny random Gemma (1, 2, 3; each where the installed transformers has it): after
    apply() every MLP runs on fusedlm.geglu with the tanh approximation (ModelGeGLUMLP, same
    objects and state_dict keys), and the logits and every parameter's gradient match the
    unpatched model by the rule; unpatch restores the GemmaMLP classes."""
    model_name, config_name, kwargs = GEMMAS[name]
    if not hasattr(transformers, model_name) or not hasattr(transformers, config_name):
        pytest.skip(f"this transformers has no {model_name}")
    config = getattr(transformers, config_name)(**COMMON, **kwargs)
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    assert act == "gelu_pytorch_tanh"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    _randomize_norms(model)
    model.eval()
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    mlps = [layer.mlp for layer in model.model.layers]
    mlp_class = type(mlps[0]).__name__
    keys = list(model.state_dict())
    report = fhf.apply(model)
    swapped = [s for s in report.swapped if s.name.endswith(".mlp")]
    assert [(s.name, s.original.rsplit(".", 1)[-1], s.replacement.rsplit(".", 1)[-1], s.note)
            for s in swapped] == [
        (f"model.layers.{i}.mlp", mlp_class, "ModelGeGLUMLP",
         "gelu(gate, approximate='tanh') * up on fusedlm.geglu") for i in range(2)]
    assert [layer.mlp for layer in model.model.layers] == mlps  # the same objects, in place
    assert all(isinstance(m, fusedlm.nn.GeGLUMLP) and m.approximate == "tanh" for m in mlps)
    assert not [m for m in report.left if "mlp" in m.name]
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, VOCAB, (2, 13))
    outs, checked = _check_glu_model(model, same, truth, ids, name)
    assert sum("mlp" in n for n in checked) == 6  # gate_proj, up_proj, down_proj of both layers
    fusedlm.unpatch(model)
    assert all(type(m).__name__ == mlp_class for m in mlps)
    assert not any("_fusedlm" in key or "approximate" in m.__dict__ for m in mlps
                   for key in m.__dict__)


# Mixtures of experts: the experts' gate on fusedlm.swiglu through transformers' _apply_gate
MOES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                "MixtralExperts"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32), "Qwen3MoeExperts"),
}


def _pickles(model: torch.nn.Module) -> bool:
    try:
        torch.save(model, io.BytesIO())
    except (AttributeError, TypeError, pickle.PicklingError):
        return False
    return True


@pytest.mark.parametrize("name", list(MOES))
def test_moe_experts_gate_is_swapped_and_matches(name):
    """A tiny random mixture of experts: after apply() each layer's experts module computes
    its gate on fusedlm.swiglu (transformers' grouped_mm implementation calls _apply_gate),
    and the logits and every parameter's gradient match the unpatched model (grouped_mm,
    float32) and the float64 one (eager experts) by the rule. The swapped model pickles, and
    unpatch restores the experts class."""
    model_name, config_name, kwargs, experts_class = MOES[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**COMMON,
                                                                                 **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("this transformers has no experts implementations")
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    truth.set_experts_implementation("eager")  # (grouped_mm takes no float64)
    experts = [layer.mlp.experts for layer in model.model.layers]
    keys = list(model.state_dict())
    report = fhf.apply(model)
    swapped = [s for s in report.swapped if s.name.endswith(".experts")]
    assert [(s.name, s.original.rsplit(".", 1)[-1], s.replacement.rsplit(".", 1)[-1])
            for s in swapped] == [
        (f"model.layers.{i}.mlp.experts", experts_class, f"ModelExpertsGate[{experts_class}]")
        for i in range(2)]
    assert all(s.note.startswith("experts' silu(gate) * up on fusedlm.swiglu") for s in swapped)
    assert [layer.mlp.experts for layer in model.model.layers] == experts  # in place
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, VOCAB, (2, 13))
    outs, checked = _check_glu_model(model, same, truth, ids, name)
    assert sum("experts" in n for n in checked) == 4  # gate_up_proj, down_proj of both layers
    if _pickles(same):  # (5.10's hub-kernel activations cannot be pickled, patched or not)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded.model.layers[0].mlp.experts) is type(experts[0])
        torch.testing.assert_close(loaded(input_ids=ids).logits, outs[0], rtol=0, atol=0)
    fusedlm.unpatch(model)
    assert all(type(e).__name__ == experts_class for e in experts)
    assert not any("_fusedlm" in key or "activation" in e.__dict__ for e in experts
                   for key in e.__dict__)


def test_interleaved_experts_are_left_alone():
    """gpt-oss keeps gate and up interleaved and clamps them in its own _apply_gate: reported,
    not swapped."""
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip("this transformers has no GptOssForCausalLM")
    config = transformers.GptOssConfig(**{**COMMON, "intermediate_size": 64},
                                       num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(config)
    if not hasattr(model.model.layers[0].mlp.experts, "_apply_gate"):
        pytest.skip("this transformers' gpt-oss experts have no _apply_gate (4.x)")
    report = fhf.apply(model, attention=False, norms=False, loss=False)
    assert not report.swapped
    # transformers < 5.3 has no is_concatenated flag: there the probe turns it away.
    reason = ("its gate and up projections are interleaved, not [gate, up]"
              if hasattr(model.model.layers[0].mlp.experts, "is_concatenated") else
              "its _apply_gate is not act(gate) * up over [gate, up]")
    left = [(m.name, m.reason) for m in report.left if m.name.endswith("experts")]
    assert [(name, why.split(" with act")[0]) for name, why in left] == [
        (f"model.layers.{i}.mlp.experts", reason) for i in range(2)], left


def _qkv(b, hq, hkv, tq, tk, d=16):
    return (torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d))


class _Module(torch.nn.Module):
    def __init__(self, is_causal=True, groups=1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


@pytest.mark.parametrize(
    ("case", "tq", "tk", "expect"),
    [
        ("no mask, prefill", 9, 9, "fused"),
        ("no mask, decode", 1, 9, "fused"),
        ("no mask, static-cache prefill (top-left)", 5, 9, "fused"),
        ("bool causal mask, Tq < Tk (bottom-right)", 4, 9, "fused"),
        ("float all-visible mask", 4, 9, "fused"),
        ("bool padding mask", 4, 9, "fused"),
        ("padding with a gap", 4, 9, "sdpa"),
        ("causal mask, left and right padding", 9, 9, "fused"),
        ("float sliding-window mask, right padding", 9, 9, "fused"),
        ("key-only padding mask (N, 1, 1, Tk)", 4, 9, "fused"),
        ("sliding-window mask", 9, 9, "fused"),
        ("float sliding-window mask, Tq < Tk", 4, 9, "fused"),
        ("two-sided local mask (ModernBERT)", 9, 9, "fused"),
        ("band with a hole", 9, 9, "sdpa"),
        ("strictly causal mask (no diagonal)", 9, 9, "fused"),
        ("keys strictly after the query", 9, 9, "fused"),
        ("causal mask, Tq > Tk (bottom-right)", 9, 4, "fused"),
        ("float bias mask", 4, 9, "sdpa"),
        # transformers 4.53's GPT-2: a column more than there are keys, cut to the keys (as
        # 4.x's sdpa_attention_forward does)
        ("float causal mask wider than the keys", 9, 9, "fused"),
    ],
)
def test_attention_function_matches_sdpa(case, tq, tk, expect):
    q, k, v = _qkv(2, 4, 2, tq, tk)
    mask = None
    rows = torch.arange(tq)[:, None] + (tk - tq)
    cols = torch.arange(tk)[None, :]
    if "bool causal" in case:
        mask = (cols <= rows).expand(2, 1, tq, tk)
    elif "float all-visible" in case:
        mask = torch.zeros(1, 1, tq, tk)
    elif "gap" in case:
        mask = torch.ones(2, 1, tq, tk, dtype=torch.bool)
        mask[1, :, :, 3:5] = False
    elif "left and right" in case:
        mask = (cols <= rows).expand(2, 1, tq, tk).clone()
        mask[0, :, :, :3] = False
        mask[1, :, :, 6:] = False
    elif "float sliding-window mask, right" in case:
        visible = ((cols <= rows) & (cols > rows - 3)).expand(2, 1, tq, tk).clone()
        visible[0, :, :, 7:] = False
        mask = torch.zeros(2, 1, tq, tk).masked_fill(~visible, torch.finfo(torch.float32).min)
    elif "key-only" in case:
        mask = torch.ones(2, 1, 1, tk, dtype=torch.bool)
        mask[0, :, :, :2] = False
    elif "padding" in case:
        mask = torch.ones(2, 1, tq, tk, dtype=torch.bool)
        mask[1, :, :, :3] = False
    elif "float sliding" in case:
        visible = (cols <= rows) & (cols > rows - 3)
        mask = torch.zeros(1, 1, tq, tk).masked_fill(~visible, torch.finfo(torch.float32).min)
    elif "sliding" in case:
        mask = ((cols <= rows) & (cols > rows - 3)).expand(2, 1, tq, tk)
    elif "two-sided" in case:
        mask = ((cols - rows).abs() <= 2).expand(2, 1, tq, tk)
    elif "hole" in case:
        mask = ((cols <= rows) & (cols > rows - 3)).expand(2, 1, tq, tk).clone()
        mask[:, :, 6, 5] = False
    elif "strictly causal" in case:
        mask = (cols < rows).expand(2, 1, tq, tk)
    elif "strictly after" in case:
        mask = (cols > rows).expand(2, 1, tq, tk)
    elif "Tq > Tk" in case:
        mask = (cols <= rows).expand(2, 1, tq, tk)
    elif "bias" in case:
        mask = torch.randn(2, 1, tq, tk)
    elif "wider" in case:
        visible = torch.cat([cols <= rows, torch.rand(tq, 1) < 0.5], dim=1)
        mask = torch.zeros(2, 1, tq, tk + 1).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = _Module(groups=2)
    ours, _ = fhf.fusedlm_attention_forward(module, q, k, v, mask, scaling=0.3)
    mask = mask[..., :tk] if mask is not None else None
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    truth, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask64,
                                      scaling=0.3)
    assert ours.shape == (2, tq, 4, 16)
    assert_close_rule(ours, theirs, truth)
    calls = fhf.attention_calls()
    assert (calls["fused"] == 1) == (expect == "fused"), calls


@pytest.mark.gpu
@pytest.mark.parametrize("inputs", ["plain", "padded", "packed"])
@pytest.mark.parametrize("name", list(ALL))
def test_bf16_on_gpu(name, inputs):
    """Each model in bfloat16 on the GPU, patched, against the unpatched bfloat16 model and
    the float64 one, by the rule, logits and every gradient: plain batches, a tokenizer's
    padding (left for the causal models, right for BERT: a key range per row, the cuda
    kernels) and packed documents (per-query key ranges, the cuda kernels too)."""
    if inputs == "packed" and name not in ("llama", "qwen2", "gemma", "cohere"):
        pytest.skip("transformers builds packed-document masks from position_ids for these")
    model = _build(name).cuda()
    same, truth = copy.deepcopy(model).bfloat16(), copy.deepcopy(model).double()
    model = model.bfloat16()
    fhf.apply(model)
    ids = torch.randint(1, VOCAB, (3, 33), device="cuda")
    kwargs, real = {}, torch.ones(3, 33, dtype=torch.bool, device="cuda")
    if inputs == "padded":
        mask = torch.ones(3, 33, dtype=torch.long, device="cuda")
        for row, n in enumerate((33, 20, 7)):
            pad = slice(0, 33 - n) if name != "bert" else slice(n, 33)
            mask[row, pad] = 0
        kwargs, real = {"attention_mask": mask}, mask.bool()
    elif inputs == "packed":
        kwargs = {"position_ids": _packed_position_ids([[33], [7, 26], [5, 1, 27]]).cuda(),
                  "use_cache": False}
    outs = [_out(m, name, input_ids=ids, **kwargs) for m in (model, same, truth)]
    assert fhf.attention_calls() == {"fused": 2}
    assert OpDispatch.last_choice["attention_fwd"] in ("cuda", "triton")
    assert_close_rule(outs[0][real], outs[1][real], outs[2][real], name=f"{name} bf16 output")
    weight = torch.randn_like(outs[2]) * real[..., None]
    for out in outs:
        (out * weight.to(out.dtype)).sum().backward()
    assert_gradients_match(model, same, truth)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CAUSAL))
def test_bf16_loss_on_gpu(name):
    """The loss of a bfloat16 causal LM on the GPU (the Triton cross-entropy, from the bf16
    logits) and every gradient, against the unpatched bf16 model (transformers' float32 copy)
    and the float64 one, by the rule."""
    model = _build(name).cuda()
    same, truth = copy.deepcopy(model).bfloat16(), copy.deepcopy(model).double()
    model = model.bfloat16()
    fhf.apply(model)
    ids = torch.randint(1, VOCAB, (3, 33), device="cuda")
    losses = [m(input_ids=ids, labels=_labels(ids)).loss for m in (model, same, truth)]
    assert OpDispatch.last_choice["cross_entropy_fwd"] == "triton"
    _check_losses(losses, model, same, truth, f"{name} bf16 loss")


# ---- drawn masks through whole models ----------------------------------------------------------

def _mistral_window():  # a 5-token sliding window: banded masks, cut by padding
    cfg = transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=5)
    return transformers.MistralForCausalLM(cfg)


FUZZ_MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "mistral_window": _mistral_window}
_fuzz_triples: dict = {}


def _fuzz_triple(name):
    """(patched, unpatched, unpatched float64) of FUZZ_MODELS[name], built once per session."""
    if name not in _fuzz_triples:
        torch.manual_seed(0)
        model = FUZZ_MODELS[name]()
        _randomize_norms(model)
        model.eval()
        same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
        fhf.apply(model)
        _fuzz_triples[name] = model, same, truth
    return _fuzz_triples[name]


def test_fuzz_attention_masks_match_the_unpatched_model(fuzz):  # noqa: F811
    """Drawn batches through patched and unpatched models: each row's tokenizer mask is all
    ones, left or right padding, or has gaps (which transformers' SDPA must then serve), or the
    row packs documents (position_ids restarting, no mask). The real tokens' outputs, and
    every parameter's gradient of a loss over them, pass the rule against the unpatched float32
    and float64 models (a padded query's output is not defined the same way by every
    attention); the draws must reach both our kernels and the fallback."""
    routes = []

    @fuzz(30)
    @given(data=st.data())
    def run(data):
        name = data.draw(st.sampled_from(sorted(FUZZ_MODELS)), label="model")
        model, same, truth = _fuzz_triple(name)
        B = data.draw(st.integers(1, 3), label="B")
        T = data.draw(st.integers(1, 20), label="T")
        seed_torch(data)
        ids = torch.randint(1, VOCAB, (B, T))
        inputs = {"input_ids": ids}
        real = torch.ones(B, T, dtype=torch.bool)
        if name != "bert" and data.draw(st.integers(0, 3), label="packed") == 0:
            lengths = []
            for _ in range(B):
                cuts = sorted(set(data.draw(st.lists(st.integers(1, max(T - 1, 1)),
                                                     max_size=3 if T > 1 else 0),
                                            label="document cuts")))
                edges = [0, *cuts, T]
                lengths.append([b - a for a, b in zip(edges, edges[1:], strict=False)])
            inputs.update(position_ids=_packed_position_ids(lengths), use_cache=False)
        else:
            mask = torch.ones(B, T, dtype=torch.long)
            for row in range(B):
                kind = data.draw(st.sampled_from(["full", "left", "right", "gaps"]),
                                 label="row mask")
                n = data.draw(st.integers(1, T), label="tokens")  # at least one real token
                if kind == "left":
                    mask[row, :T - n] = 0
                elif kind == "right":
                    mask[row, n:] = 0
                elif kind == "gaps":
                    bits = data.draw(st.lists(st.booleans(), min_size=T, max_size=T),
                                     label="bits")
                    mask[row] = torch.tensor(bits, dtype=torch.long)
                    mask[row, data.draw(st.integers(0, T - 1), label="one token")] = 1
            inputs["attention_mask"] = mask
            real = mask.bool()
        backward = data.draw(st.booleans(), label="backward")
        fhf.reset_attention_calls()
        with torch.set_grad_enabled(backward):
            outs = [_out(m, name, **inputs) for m in (model, same, truth)]
        routes.extend(fhf.attention_calls())
        assert_close_rule(outs[0][real], outs[1][real], outs[2][real],
                          name=f"{name} {sorted(inputs)}")
        if backward:  # every parameter's gradient of a loss over the real tokens
            for m in (model, same, truth):
                m.zero_grad(set_to_none=True)
            weight = torch.randn_like(outs[0]) * real[..., None]
            for out in outs:
                (out * weight.to(out.dtype)).sum().backward()
            same_params = dict(same.named_parameters())
            truth_params = dict(truth.named_parameters())
            for pname, p in model.named_parameters():
                if p.grad is not None:
                    assert_close_rule(p.grad, same_params[pname].grad, truth_params[pname].grad,
                                      name=f"{name} {pname}")

    run()
    assert "fused" in routes and any(r.startswith("sdpa") for r in routes), set(routes)
