"""fusedlm.integrations.transformers.apply across many Hugging Face architectures, forward only.

test_transformers.py checks six models in depth (gradients, generation, state_dict). This module
checks breadth: for each architecture, a tiny random model gives the unpatched model's output
after ``apply`` (DESIGN.md's rule against the unpatched model in float64), with and without a
padding mask, and the report and the call counts say what ran. Architectures whose attention
SDPA cannot express (Gemma 2's soft-capping, DeBERTa's relative positions) must be left on their
own attention; gpt-oss's sinks are taken (fusedlm.attention's sinks). A class missing from the
installed transformers skips its case.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedlm.integrations import attention_calls  # noqa: E402
from fusedlm.integrations import transformers as fhf  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_close_rule,
    cpu_backend_available,
    cpu_unavailable_reason,
)

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

VOCAB = 100
NOT_ONE_RUN = ("an attention mask that is not one run of keys per query (padding with gaps, a "
               "custom pattern)")
# How a left-padded batch's attention runs where the model builds float masks itself (see
# builds_own_masks) that hide every key of a padding query with the dtype's min: OPT
# (AttentionInterface, fallback per call), Nemotron (F.sdpa calls routed: torch's), ModernBERT's
# local layers (torch's; the global ones fused).
OWN_FLOAT_MASK_CALLS = {"opt": {f"sdpa: {NOT_ONE_RUN}"}, "nemotron": {"torch"},
                        "modernbert_local": {"fused", "torch"}}


DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
T5GEMMA_STACK = dict(DECODER, num_key_value_heads=2, head_dim=16, sliding_window=8)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
               decoder_ffn_dim=96)

# name: (model class, config class, config kwargs, input kind)
ARCHITECTURES = {
    "mistral_window": ("MistralForCausalLM", "MistralConfig",
                       dict(DECODER, num_key_value_heads=2, sliding_window=6), "text"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              dict(DECODER, num_key_value_heads=2, head_dim=16), "text"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(DECODER, num_key_value_heads=2, head_dim=16, sliding_window=6), "text"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config",
             dict(DECODER, num_key_value_heads=2, pad_token_id=0), "text"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(DECODER, num_key_value_heads=2), "text"),
    # OLMo's LayerNorm has no parameters and no eps attribute (1e-5 in its code).
    "olmo": ("OlmoForCausalLM", "OlmoConfig", dict(DECODER, num_key_value_heads=2), "text"),
    # Nemotron's LayerNorm1P: a torch.nn.LayerNorm subclass computing with (1 + weight).
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", dict(DECODER, num_key_value_heads=2),
                 "text"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", DECODER, "text"),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
            "text"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(DECODER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                "text"),
    "starcoder2_window": ("Starcoder2ForCausalLM", "Starcoder2Config",
                          dict(DECODER, num_key_value_heads=2, sliding_window=6), "text"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(DECODER, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                         moe_intermediate_size=32, n_group=1, topk_group=1), "text"),
    "roberta": ("RobertaModel", "RobertaConfig",
                dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=66), "text"),
    "modernbert": ("ModernBertModel", "ModernBertConfig",
                   dict(DECODER, global_attn_every_n_layers=1, pad_token_id=0), "text"),
    # Local attention (every layer but the first) over +-2 tokens: a two-sided band mask.
    "modernbert_local": ("ModernBertModel", "ModernBertConfig",
                         dict(DECODER, global_attn_every_n_layers=2, local_attention=4,
                              pad_token_id=0), "text"),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             dict(SEQ2SEQ, max_position_embeddings=64), "seq2seq"),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),
           "seq2seq"),
    "vit": ("ViTModel", "ViTConfig",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=96, image_size=32, patch_size=8), "image"),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig",
                dict(DECODER, intermediate_size=64, num_key_value_heads=2, head_dim=16,
                     num_local_experts=4, num_experts_per_tok=2, sliding_window=8), "text"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(DECODER, num_key_value_heads=2, head_dim=16), "text"),
    "vaultgemma": ("VaultGemmaForCausalLM", "VaultGemmaConfig",
                   dict(DECODER, num_key_value_heads=2, head_dim=16, sliding_window=8), "text"),
    # (encoder, decoder and cross attention soft-capped; the cap made to matter in
    # test_transformers.py's Gemma 2 test)
    "t5gemma": ("T5GemmaForConditionalGeneration", "T5GemmaConfig",
                dict(vocab_size=VOCAB, encoder=T5GEMMA_STACK, decoder=T5GEMMA_STACK), "seq2seq"),
    "deberta": ("DebertaModel", "DebertaConfig",
                dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96), "text"),
}


def builds_own_masks(model) -> bool:
    """Whether ``model``'s modeling file builds its masks itself rather than through
    transformers' masking_utils (many 4.x models). A causal one's float mask then hides every
    key of a left-padded query with the dtype's min, where torch's softmax averages all values
    and our kernels would give 0: those calls must fall back to torch's SDPA."""
    names = vars(sys.modules[type(model).__module__])
    return "create_causal_mask" not in names and "create_bidirectional_mask" not in names


def _build(name):
    model_name, config_name, kwargs, kind = ARCHITECTURES[name]
    if not hasattr(transformers, model_name) or not hasattr(transformers, config_name):
        pytest.skip(f"this transformers has no {model_name}")
    torch.manual_seed(0)
    try:
        config = getattr(transformers, config_name)(**kwargs)
    except Exception as exc:  # 5.10: ModernBertConfig(global_attn_every_n_layers=1) (a bug there)
        pytest.skip(f"this transformers cannot build {config_name}(**{kwargs}): {exc}")
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # move every parameter off its init (norm weights of 1, zero biases)
        for p in model.parameters():
            if p.dim() > 0:
                p.add_(torch.randn_like(p) * 0.05)
    # apply switches the attention to fusedlm unless the class says it does not run on SDPA
    # or it soft-caps attention logits, except where fusedlm takes what SDPA lacks: gpt-oss's
    # attention sinks and Gemma 2's logit soft-capping (_supports_sdpa = False in both).
    switched = name in ("gpt_oss", "gemma2", "vaultgemma", "t5gemma") or (
        getattr(model, "_supports_sdpa", True) is not False
        and getattr(model.config, "attn_logit_softcapping", None) is None)
    return model.eval(), kind, switched


def _inputs(kind, padded):
    ids = torch.randint(3, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0  # left padding of the second row
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32)}, None
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 7))
        return inputs, None
    return inputs, mask.bool()


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_apply_gives_the_unpatched_output(name, padded):
    model, kind, switched = _build(name)
    if kind == "image" and padded:
        pytest.skip("images have no padding")
    same, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    previous = model.config._attn_implementation
    report = fhf.apply(model)
    assert report.swapped, str(report)  # every one of these has norms we take
    if name in ("olmo", "nemotron"):  # model-specific classes the probe must take
        assert not [left for left in report.left if "Norm" in left.cls], str(report)
    if switched and model.config._attn_implementation != "fusedlm":
        # transformers 4.x: attention classes of their own that call F.sdpa (BERT, RoBERTa,
        # ModernBERT, Nemotron): those calls are routed instead.
        notes = " ".join(report.notes)
        assert previous == "sdpa" and "go to fusedlm.scaled_dot_product_attention" in notes, notes
    elif switched:
        assert model.config._attn_implementation == "fusedlm", str(report)
    else:
        assert model.config._attn_implementation == previous
        reasons = " ".join(left.reason for left in report.left)
        assert "_supports_sdpa is False" in reasons or "attn_logit_softcapping is" in reasons, \
            str(report)
    inputs, real = _inputs(kind, padded)
    fhf.reset_attention_calls()
    with torch.no_grad():
        ours, theirs = _output(model(**inputs)), _output(same(**inputs))
        calls = fhf.attention_calls() + attention_calls(model)
        try:
            expected = _output(truth(**inputs))
        except RuntimeError:  # MoE grouped matmuls take no float64
            expected = None
    if real is not None:  # outputs at padded positions are not defined the same way
        ours, theirs = ours[real], theirs[real]
        expected = expected[real] if expected is not None else None
    if not switched:
        assert not calls
    elif name in ("qwen3", "phi3", "olmo2", "olmo", "nemotron", "gpt_neox", "opt", "mixtral",
                  "deepseek_v3", "roberta", "modernbert", "bart", "vit", "mistral_window",
                  "gemma3", "starcoder2_window", "modernbert_local", "gpt_oss", "gemma2",
                  "vaultgemma", "t5gemma"):
        # No mask our kernels cannot take (sliding windows and left padding included): all
        # fused, except in models that build their own float masks (builds_own_masks).
        if padded and name in OWN_FLOAT_MASK_CALLS and builds_own_masks(model):
            assert set(calls) == OWN_FLOAT_MASK_CALLS[name], calls
        else:
            assert set(calls) == {"fused"}, calls
    if expected is None or expected.isnan().any() and not theirs.isnan().any():
        # No float64 truth (MoE) or a broken one (Gemma 2's eager soft-capping under left
        # padding makes NaN in float64): the unpatched float32 model is the reference.
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    else:
        assert_close_rule(ours, theirs, expected, name=f"{name} output")
