"""``fusedlm train --task classify``: the data readers, the last-token head, a run that learns a
label written in the text, fine-tuning from an LM checkpoint, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from fusedlm.cli import main
from fusedlm.models.gpt import GPT, GPTConfig
from fusedlm.train import classify
from fusedlm.train.checkpoint import load_checkpoint
from fusedlm.train.config import make_config
from fusedlm.train.data import DataError
from fusedlm.train.prepare import ByteTokenizer
from fusedlm.train.trainer import read_step
from tests.helpers import refuse_host_reads
from tests.train.conftest import read_metrics, train_flags

MODEL = json.dumps({"n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 64})
POSITIVE, NEGATIVE = ("good", "great", "fine"), ("bad", "awful", "poor")
FILLER = "the movie film plot was and acting story really quite".split()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are too small to gain from more, and on a shared 2-core
    machine an oversubscribed thread pool makes them 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reviews(n: int, seed: int, labels=("neg", "pos")) -> list[dict]:
    """n short texts: filler words around one sentiment word that decides the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.sample(FILLER, rng.randint(0, 2))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"text": " ".join(words), "label": labels[positive]})
    return rows


def write_csv(path, rows: list[dict], columns=("text", "label")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def classify_flags(data: str, out, steps: int, *extra: str) -> list[str]:
    return ["train", "--task", "classify", "--data", data, "--out", str(out), "--model", MODEL,
            "--batch-size", "16", "--max-steps", str(steps), "--lr", "3e-3",
            "--warmup-steps", "3", "--seed", "5", *extra]


# ---- pieces ---------------------------------------------------------------------------------


def test_integer_labels_sort_by_value_and_match_across_files():
    classes = classify.class_labels(["10", "9", 2, "2"], "train.csv")
    assert classes == [2, 9, 10]
    ids = classify.label_ids([9, "10", "+2", 2], classes, "val.jsonl")
    assert ids.tolist() == [1, 2, 0, 0]
    assert classify.class_labels(["pos", "neg", "1"], "x.csv") == ["1", "neg", "pos"]


def test_encode_texts_keeps_the_end_of_long_texts():
    tokens = classify.encode_texts(ByteTokenizer(), ["abcdef", "xy"], block_size=3)
    assert [bytes(t.astype(np.uint8)).decode() for t in tokens] == ["def", "xy"]
    assert all(t.dtype == np.int64 for t in tokens)
    with pytest.raises(ValueError, match="block_size"):
        classify.encode_texts(ByteTokenizer(), ["a"], block_size=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_token_logits_do_not_depend_on_padding(arch):
    config = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32, arch=arch)
    model = classify.GPTClassifier(GPT(config), num_classes=3).eval()
    rows = [np.random.default_rng(i).integers(0, 256, size=n) for i, n in enumerate((5, 17, 1))]
    with torch.no_grad():
        batched = model(*classify.collate(rows, pad_id=7))
        alone = torch.cat([model(*classify.collate([r])) for r in rows])
        idx = torch.as_tensor(rows[1])[None]
        logits, _ = model.backbone(idx)
        assert torch.equal(logits, model.backbone.lm_head(model.backbone.hidden_states(idx)))
    assert batched.shape == (3, 3) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'last'"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"'last' must hold positions in \[0, 4\)"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 4]))


# ---- runs -----------------------------------------------------------------------------------


def test_learns_a_label_written_in_the_text(tmp_path, capsys):
    data = write_csv(tmp_path / "train.csv", reviews(240, seed=1))
    val_rows = reviews(60, seed=2)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    out = tmp_path / "run"
    assert main(classify_flags(data, out, 30, "--val-data", val, "--eval-every", "15")) == 0
    printed = capsys.readouterr().out
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(31))
    for r in records[1:]:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "accuracy"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    evaluated = [r["step"] for r in records if "val_accuracy" in r]
    assert evaluated == [0, 15, 30]
    final = records[-1]
    assert final["val_accuracy"] >= 0.85, final  # two balanced classes: chance is ~0.5
    assert final["val_loss"] < records[0]["val_loss"]
    assert f"val accuracy {final['val_accuracy']:.4f}" in printed

    model, labels, tokenizer = classify.load_classifier(out)
    assert labels == ["neg", "pos"]
    with open(out / "classifier.json") as f:
        meta = json.load(f)
    assert meta["format"] == "fusedlm-classifier" and meta["tokenizer"] == "byte"
    assert meta["val_examples"] == 60 and meta["val_accuracy"] == final["val_accuracy"]
    predicted = classify.predict(model, tokenizer, [r["text"] for r in val_rows])
    expected = np.array([labels.index(r["label"]) for r in val_rows])
    assert np.mean(predicted == expected) == pytest.approx(final["val_accuracy"])


def test_init_from_an_lm_checkpoint(tmp_path, data_dir):
    fast = tmp_path / "fast.toml"
    fast.write_text("sample_tokens = 1\n")
    lm_out = tmp_path / "lm"
    lm_flags = train_flags(data_dir, lm_out, steps=2, ckpt_every=2)
    assert main([lm_flags[0], str(fast), *lm_flags[1:]]) == 0
    lm = load_checkpoint(str(lm_out))

    data = write_jsonl(tmp_path / "train.jsonl", reviews(50, seed=3, labels=(0, 1)))
    out = tmp_path / "cls"
    # A negligible learning rate: the backbone must come out as the checkpoint went in.
    flags = ["train", "--task", "classify", "--data", data, "--out", str(out), "--init-from",
             str(lm_out), "--batch-size", "8", "--max-steps", "2", "--lr", "1e-9",
             "--eval-every", "0"]
    assert main(flags) == 0
    model, labels, _ = classify.load_classifier(out)
    assert labels == [0, 1]
    assert model.backbone.config.to_dict() == lm["config"]["model"]
    backbone = model.backbone.state_dict()
    for name, tensor in lm["model"].items():
        torch.testing.assert_close(backbone[name], tensor, rtol=0, atol=1e-6)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2] and "val_accuracy" in records[-1]
    with open(out / "classifier.json") as f:
        assert json.load(f)["val_examples"] == 5  # the default 10% split


def test_nan_policy_stop(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", reviews(20, seed=4))
    monkeypatch.setattr(classify.ClassifierTrainer, "loss_multiplier", float("nan"))
    out = tmp_path / "run"
    assert main(classify_flags(data, out, 3, "--nan-policy", "stop", "--eval-every", "0")) == 2
    assert "not finite" in capsys.readouterr().err
    records = read_metrics(out)
    assert len(records) == 1 and records[0]["skipped"] is True
    assert not os.path.exists(out / "classifier.safetensors")



def test_a_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch):
    """A classifier step (two micro-batches) queues its loss, accuracy and gradient norm as
    tensors, read once afterwards (read_step), never during the step."""
    data = write_jsonl(tmp_path / "train.jsonl", reviews(40, seed=4))
    cfg = make_config(task="classify", data=data, out=str(tmp_path / "run"),
                      model=json.loads(MODEL), batch_size=8, grad_accum=2, max_steps=2,
                      warmup_steps=0, seed=5)
    trainer = classify.ClassifierTrainer(cfg, log=lambda *a: None)
    with monkeypatch.context() as patch:
        refuse_host_reads(patch)
        results = [trainer.train_step(step) for step in range(2)]
    for result in map(read_step, results):
        assert result["finite"] is True and math.isfinite(result["loss"])
        assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy"] * 16 == round(
            result["accuracy"] * 16)
        assert result["tokens"] > 16


# ---- errors -------------------------------------------------------------------------------

BAD_FILES = {
    "missing column": ("data.csv", "text,target\nsome text,pos\nother text,neg\n",
                       "lacks column(s) 'label'"),
    "one class": ("data.csv", "text,label\na,pos\nb,pos\nc,pos\n", "at least 2 classes"),
    "empty": ("data.csv", "", "empty file: no examples"),
    "header only": ("data.csv", "text,label\n", "no examples"),
    "blank lines": ("data.jsonl", "\n\n", "no examples"),
    "missing key": ("data.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n',
                    "data.jsonl:2: missing key(s) 'label'"),
    "bad label": ("data.jsonl", '{"text": "a", "label": 1.5}\n', "data.jsonl:1: 'label' must"),
    "not json": ("data.jsonl", '{"text": "a", "label": 1}\n{oops\n', "data.jsonl:2: not valid"),
    "empty text": ("data.csv", "text,label\n,pos\nb,neg\n", "data.csv:2: empty 'text'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_is_one_line_naming_it(case, tmp_path, capsys):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    assert main(classify_flags(str(path), tmp_path / "run", 1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fusedlm train: error: ")
    assert str(path) in err and message in err


def test_val_labels_must_occur_in_training(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", reviews(10, seed=5))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "meh", "label": "neutral"}])
    assert main(classify_flags(data, tmp_path / "run", 1, "--val-data", val)) == 2
    err = capsys.readouterr().err
    assert f"{val}: label(s) ['neutral'] do not occur in the training data" in err


@pytest.mark.parametrize("flag", ["--fsdp", "--resume"])
def test_single_process_only(flag, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", reviews(10, seed=6))
    assert main(classify_flags(data, tmp_path / "run", 1, flag)) == 2
    assert f"'{flag[2:]}' is not supported with 'task = classify'" in capsys.readouterr().err


def test_missing_data_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.csv")
    assert main(classify_flags(missing, tmp_path / "run", 1)) == 2
    assert f"{missing}: no such data file" in capsys.readouterr().err


def test_read_examples_raises_data_error_for_short_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", [])
    with open(path, "a") as f:
        f.write("only-text-no-comma\n")
    with pytest.raises(DataError, match=r"d\.csv:2: the row has fewer fields"):
        classify.read_examples(path)
