"""fusedlm.integrations.transformers.linear_causal_lm_loss: a causal LM's loss without its logits.

For each model the loss and every parameter's gradient must pass DESIGN.md's rule: ours (float32)
against the model's own ``model(**inputs, labels=labels).loss`` (float32, torch's computation),
truth being the same loss computed in float64 from the float64 model's logits. Models whose
logits are the head's times a constant (Cohere, Granite) run fused on scaled hidden states,
Gemma 2 with its final soft-capping in the fused loss; a head with anything else on it must
take the logits route and say so once."""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fusedlm.integrations import transformers as fhf  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_close_rule,
    cpu_backend_available,
    cpu_unavailable_reason,
)
from tests.integrations.test_transformers import CAUSAL, assert_gradients_match  # noqa: E402
from tests.integrations.test_transformers_models import ARCHITECTURES, DECODER  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_backend_available(), reason=cpu_unavailable_reason())

VOCAB = 100
# The head's logits scaled by a constant (Cohere's logit_scale 0.0625, Granite's 1 /
# logits_scaling) or soft-capped (Gemma 2's final_logit_softcapping, 30).
HEADS = {"cohere": (0.0625, None), "granite": (0.25, None), "gemma2": (1.0, 30.0)}
FUSED = ["gpt2", "llama", "qwen2", "gemma", "mistral_window", "qwen3", "gemma3", "phi3", "olmo2",
         "nemotron", "gpt_neox", "opt", "starcoder2_window", "mixtral", "deepseek_v3", *HEADS]
MORE = {"granite": ("GraniteForCausalLM", "GraniteConfig",
                    dict(DECODER, num_key_value_heads=2, logits_scaling=4.0), "text")}


def _build(name: str):
    """(float32 model, float64 copy), eval mode, parameters moved off their init."""
    if name in CAUSAL:
        model = CAUSAL[name]()
    else:
        model_name, config_name, kwargs, _ = {**ARCHITECTURES, **MORE}[name]
        if not hasattr(transformers, model_name):
            pytest.skip(f"this transformers has no {model_name}")
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0:
                p.add_(torch.randn_like(p) * 0.05)
    truth = copy.deepcopy(model)
    if hasattr(truth, "set_experts_implementation"):  # grouped_mm takes no float64
        truth.set_experts_implementation("eager")
    return model.eval(), truth.double().eval()


def _batch(B: int = 2, T: int = 13, seed: int = 0):
    """Right-padded ids, their mask, and labels ignoring the padding and the first tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, T - 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return ids, mask, labels


def _truth_loss(model, ignore_index=-100, num_items_in_batch=None, shift_labels=None,
                labels=None, **inputs):
    """ForCausalLMLoss in the model's own dtype (transformers casts the logits to float32)."""
    outputs = model(**inputs)
    logits = outputs.logits
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    if getattr(outputs, "aux_loss", None) is not None:
        loss = loss + model.router_aux_loss_coef * outputs.aux_loss
    return loss


def _truth_loss_or_skip(model, **kwargs):
    """_truth_loss, or a skip where this transformers' float64 forward raises (4.57's
    DeepSeek-V3 MoE adds float32 routing weights into a float64 buffer)."""
    try:
        return _truth_loss(model, **kwargs)
    except RuntimeError as error:
        if "same scalar type" not in str(error):
            raise
        pytest.skip(f"this transformers' float64 {type(model).__name__} fails: {error}")


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _logged(caplog) -> str:
    """What fusedlm logged (transformers' own warnings, once per process, are not ours)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "fusedlm")


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times fusedlm.linear_cross_entropy ran (the fused route)."""
    calls = []
    original = fhf.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(fhf, "linear_cross_entropy", counted)
    return calls


@pytest.mark.parametrize("name", FUSED)
def test_loss_and_gradients_match_the_models_own(name, fused_calls, caplog):
    model, truth = _build(name)
    same = copy.deepcopy(model)
    ids, mask, labels = _batch()
    extra = {"output_router_logits": True} if name == "mixtral" else {}
    with caplog.at_level(logging.WARNING, logger="fusedlm"):
        loss, outputs = fhf.linear_causal_lm_loss(
            model, labels, input_ids=ids, attention_mask=mask, return_outputs=True, **extra)
    own = same(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
    true = _truth_loss_or_skip(truth, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    assert loss.dtype == torch.float32
    assert_close_rule(loss, own, true, name=f"{name} loss")
    if not _takes_logits_to_keep(model):  # transformers 4.x's OPT: the logits route, said once
        assert fused_calls == []
        assert "takes no logits_to_keep" in _logged(caplog)
        return
    assert fused_calls == [torch.Size([2 * 13, model.config.get_text_config().hidden_size])]
    assert outputs.logits.shape == (2, 1, VOCAB)  # the head made one position's logits
    assert _logged(caplog) == ""
    assert tuple(fhf._LINEAR_LOSS_VERDICTS[model]) == HEADS.get(name, (1.0, None))
    for value in (loss, own, true):
        value.backward()
    assert len(assert_gradients_match(model, same, truth)) >= 8

    caplog.clear()  # later calls: the same route, nothing logged again
    with caplog.at_level(logging.WARNING, logger="fusedlm"):
        again = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask,
                                          **extra)
    assert _logged(caplog) == ""
    assert len(fused_calls) == 2
    torch.testing.assert_close(again, loss, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("applied", [False, True], ids=["plain", "applied"])
@pytest.mark.parametrize("case", ["num_items_in_batch", "shift_labels", "ignore_index",
                                  "chunked", "all_ignored"])
def test_loss_arguments(name, applied, case, fused_calls):
    """ForCausalLMLoss's arguments, against the float64 model; also after apply()."""
    model, truth = _build(name)
    if applied:
        fhf.apply(model)
    ids, mask, labels = _batch(B=3, T=11, seed=1)
    kwargs, true_kwargs = {}, {}
    if case == "num_items_in_batch":  # gradient accumulation's count over several batches
        kwargs["num_items_in_batch"] = true_kwargs["num_items_in_batch"] = torch.tensor(40)
    elif case == "shift_labels":  # given already shifted (sequence parallelism); no labels
        shifted = torch.randint(0, VOCAB, ids.shape)
        shifted[1, ::3] = -100
        kwargs["shift_labels"] = true_kwargs["shift_labels"] = shifted
        labels = None
    elif case == "ignore_index":
        labels = ids.masked_fill(ids < 20, 7)
        kwargs["ignore_index"] = true_kwargs["ignore_index"] = 7
    elif case == "chunked":
        kwargs["chunk_size"] = 5  # 33 rows: 7 chunks, the last one short
    else:
        labels = torch.full_like(ids, -100)
    loss = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask, **kwargs)
    true = _truth_loss(truth, input_ids=ids, attention_mask=mask, labels=labels, **true_kwargs)
    assert len(fused_calls) == 1
    if case == "all_ignored":  # 0 / 0, as torch's mean over no targets
        assert loss.isnan() and true.isnan()
        return
    torch.testing.assert_close(loss.double(), true, rtol=2e-6, atol=1e-7)
    loss.backward()
    true.backward()
    truth_params = dict(truth.named_parameters())
    for pname, p in model.named_parameters():
        assert (p.grad is None) == (truth_params[pname].grad is None), pname
        if p.grad is not None:
            torch.testing.assert_close(p.grad.double(), truth_params[pname].grad,
                                       rtol=1e-4, atol=1e-6, msg=pname)


def test_under_autocast_and_no_grad(fused_calls):
    """bfloat16 autocast: the head's matmul in bfloat16 both ways, so the route stays fused;
    under no_grad (evaluation) too."""
    model, truth = _build("llama")
    same = copy.deepcopy(model)
    ids, mask, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
        own = same(input_ids=ids, attention_mask=mask, labels=labels).loss
    true = _truth_loss(truth, input_ids=ids, attention_mask=mask, labels=labels)
    assert len(fused_calls) == 1
    assert loss.dtype == torch.float32
    assert_close_rule(loss, own, true, name="autocast loss")
    with torch.no_grad():
        evaluated = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
    assert not evaluated.requires_grad and len(fused_calls) == 2
    torch.testing.assert_close(evaluated, _truth_loss(same, input_ids=ids, attention_mask=mask,
                                                      labels=labels).detach())


@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_through_distributed_data_parallel(tmp_path, fused_calls):
    """A DDP-wrapped model: the wrapper's forward runs (its gradient hooks with it), the head
    found inside; one process, so the gradients are the unwrapped model's."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model, _ = _build("llama")
        same = copy.deepcopy(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        ids, mask, labels = _batch()
        loss = fhf.linear_causal_lm_loss(wrapped, labels, input_ids=ids, attention_mask=mask)
        loss.backward()
        own = fhf.linear_causal_lm_loss(same, labels, input_ids=ids, attention_mask=mask)
        own.backward()
        assert len(fused_calls) == 2
        torch.testing.assert_close(loss, own, rtol=0, atol=0)
        for (pname, p), q in zip(model.named_parameters(), same.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=pname)
    finally:
        dist.destroy_process_group()


def test_an_adapter_on_the_head_takes_the_logits_route(fused_calls, caplog):
    """A head whose output is not F.linear(hidden, weight) (here a forward hook scaling it, as
    an adapter or a logit scale would) is found on the first call: that call and the next
    take the model's logits."""
    model, truth = _build("llama")
    model.lm_head.register_forward_hook(lambda module, args, out: out * 1.5)
    truth.lm_head.register_forward_hook(lambda module, args, out: out * 1.5)
    ids, mask, labels = _batch()
    with caplog.at_level(logging.WARNING, logger="fusedlm"):
        for _ in range(2):
            loss = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
            true = _truth_loss(truth, input_ids=ids, attention_mask=mask, labels=labels)
            torch.testing.assert_close(loss.double(), true, rtol=2e-6, atol=1e-7)
    assert fused_calls == []
    assert _logged(caplog).count("its logits are not F.linear") == 1


def test_bad_arguments():
    model, _ = _build("llama")
    ids, mask, labels = _batch()
    with pytest.raises(TypeError, match="argument 'model' must be a torch.nn.Module"):
        fhf.linear_causal_lm_loss("llama", labels, input_ids=ids)
    with pytest.raises(ValueError, match="argument 'labels' is required"):
        fhf.linear_causal_lm_loss(model, input_ids=ids)
    with pytest.raises(ValueError, match="argument 'labels' must be a \\(B, T\\) integer"):
        fhf.linear_causal_lm_loss(model, labels.float(), input_ids=ids)
    with pytest.raises(ValueError, match="argument 'shift_labels' must be a \\(B, T\\) integer"):
        fhf.linear_causal_lm_loss(model, shift_labels=labels[0], input_ids=ids)
    with pytest.raises(ValueError, match="argument 'labels' must be \\(B, T\\) = \\(2, 13\\)"):
        fhf.linear_causal_lm_loss(model, labels[:, :5], input_ids=ids)
    with pytest.raises(ValueError, match="argument 'logits_to_keep' is set here"):
        fhf.linear_causal_lm_loss(model, labels, input_ids=ids, logits_to_keep=0)
    with pytest.raises(ValueError, match="argument 'backend'"):
        fhf.linear_causal_lm_loss(model, labels, input_ids=ids, backend="nope")
    with pytest.raises(TypeError, match="got Linear"):
        fhf.linear_causal_lm_loss(torch.nn.Linear(4, 4), labels, input=ids)
    seq2seq, _ = _build("bart")
    with pytest.raises(TypeError, match="BartForConditionalGeneration \\(an encoder-decoder\\)"):
        fhf.linear_causal_lm_loss(seq2seq, labels, input_ids=ids, decoder_input_ids=ids)
    masked = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48))
    with pytest.raises(TypeError, match="loss_function is ForMaskedLMLoss"):
        fhf.linear_causal_lm_loss(masked, labels, input_ids=ids)


def test_in_a_trainer_as_the_readme_shows(tmp_path):
    """README's Trainer subclass: the same logged losses and weights as transformers' Trainer,
    over 4 optimizer steps of 2 accumulated, right-padded batches of different lengths (so
    num_items_in_batch matters)."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

    class FusedLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            loss, outputs = fhf.linear_causal_lm_loss(
                model, inputs.pop("labels"), num_items_in_batch=num_items_in_batch,
                return_outputs=True, **inputs)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            return (loss, outputs) if return_outputs else loss

    def collate(rows):
        T = max(len(row) for row in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0,
                                                                                    -100)}

    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(3, VOCAB, (8 + i % 5,), generator=generator) for i in range(16)]
    base, _ = _build("llama")
    runs = {}
    for trainer_class in (transformers.Trainer, FusedLossTrainer):
        model = copy.deepcopy(base).train()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=4, logging_steps=1, report_to=[],
            use_cpu=True, save_strategy="no", learning_rate=1e-3, seed=0)
        trainer = trainer_class(model=model, args=args, train_dataset=data,
                                data_collator=collate)
        trainer.train()
        runs[trainer_class] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                               model)
    (losses, model), (fused_losses, fused_model) = runs.values()
    assert len(losses) == 4
    torch.testing.assert_close(fused_losses, losses, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3", "mixtral", "cohere", "gemma2"])
def test_bf16_on_gpu(name, fused_calls):
    """A bfloat16 model on the GPU after apply (the Triton cross-entropy under the chunks): the
    fused route is taken (cuBLAS gives the head's logits bit for bit again) and the loss and
    every gradient pass the rule against the model's own bf16 loss and the float64 model."""
    model, truth = _build(name)
    same = copy.deepcopy(model).cuda().bfloat16()
    model = model.cuda().bfloat16()
    truth = truth.cuda()
    fhf.apply(model)
    ids, mask, labels = (t.cuda() for t in _batch(B=3, T=33))
    extra = {"output_router_logits": True} if name == "mixtral" else {}
    loss = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask, **extra)
    own = same(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
    true = _truth_loss(truth, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    assert len(fused_calls) == 1
    assert_close_rule(loss, own, true, name=f"{name} bf16 loss")
    for value in (loss, own, true):
        value.backward()
    assert len(assert_gradients_match(model, same, truth)) >= 8


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "lm_head")],
                         ids=["attention", "head"])
def test_through_peft_lora(targets, fused_calls, caplog):
    """A PEFT model: looked through to its transformers model. LoRA on the attention keeps the
    fused route; LoRA on the head (no longer a torch.nn.Linear) takes the logits route."""
    peft = pytest.importorskip("peft")
    model, _ = _build("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(targets),
                                                       init_lora_weights=False))
    same = copy.deepcopy(model)
    ids, mask, labels = _batch()
    with caplog.at_level(logging.WARNING, logger="fusedlm"):
        loss = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
    own = same(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)
    assert len(fused_calls) == (1 if "lm_head" not in targets else 0)
    assert ("peft.tuners.lora" in _logged(caplog)) == ("lm_head" in targets)
    loss.backward()
    own.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) >= 6
    for (name, p), q in zip(trained, (q for q in same.parameters() if q.requires_grad),
                            strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_logits_upcast_by_the_model_stay_fused(fused_calls):
    """A bfloat16 model whose head's output is upcast to float32 (as transformers' causal LMs
    did before 4.45): an exact upcast of the head's logits, so the route stays fused and the
    loss is the model's own to bfloat16 accuracy."""
    model, _ = _build("llama")
    model = model.bfloat16()
    model.lm_head.register_forward_hook(lambda module, args, out: out.float())
    ids, mask, labels = _batch()
    loss = fhf.linear_causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert len(fused_calls) == 1
    assert tuple(fhf._LINEAR_LOSS_VERDICTS[model]) == (1.0, None)
    torch.testing.assert_close(loss, own, rtol=2e-3, atol=2e-3)
