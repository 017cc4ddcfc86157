"""Fine-tuning a GPT for text classification: ``fusedlm train --task classify --data FILE``.

Data: a CSV file whose header has the columns ``text`` and ``label`` (other columns are
ignored), or a JSONL file of objects with the keys ``"text"`` and ``"label"`` (``.jsonl`` /
``.ndjson``; a file with another suffix is read as JSONL when its first character is ``{``).
Labels are strings or integers; the sorted distinct labels (numerically when every label is an
integer, as ``"7"`` in a CSV is) become class ids 0..K-1. Validation: ``--val-data`` (its labels
must all occur in the training file), else a deterministic 10% of the examples (a fixed
permutation, independent of ``--seed``).

Model: ``GPTClassifier``, a ``GPT`` backbone (``--init-from`` a fusedlm checkpoint or a local
Hugging Face GPT-2 directory, else the preset as in the LM trainer) and a linear head on the
final-norm hidden state of the *last real token* of each text. Texts are tokenized with the
checkpoint's tokenizer (bytes by default), truncated to ``block_size`` keeping the end, and
right-padded; causal attention keeps the padding from affecting the last real token.

Training: cross-entropy, ``fusedlm.optim.AdamW`` with the LM trainer's parameter groups, its
learning-rate schedule (``trainer.learning_rate``), gradient clipping and NaN policy. Every step
is logged to ``OUT/metrics.jsonl``, a new file each run (step, loss, accuracy of the batch, lr,
grad_norm, tokens_per_s of real tokens; ``val_loss`` and ``val_accuracy`` at step 0 and every
``eval_every`` steps when it is set, and at the last step always). One process only (no
torchrun, no ``--fsdp``, no ``--resume``).

Output, written when training ends (``load_classifier`` reads it back)::

    OUT/classifier.safetensors  the GPTClassifier state_dict: "backbone.<GPT weight name>" (a
                                tied lm_head stored once, as in GPT.save_pretrained) and
                                "head.weight" (K, n_embd), "head.bias" (K,)
    OUT/classifier.json         {"format": "fusedlm-classifier", "version": 1,
                                 "labels": [label of class 0, label of class 1, ...],
                                 "model": GPTConfig fields, "tokenizer": "byte" or a path,
                                 "pooling": "last_token", "step", "val_loss", "val_accuracy",
                                 "val_examples", "train": the TrainConfig}
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.gpt import GPT, GPTConfig, weights_for_saving
from .config import ConfigError, TrainConfig
from .data import DataError
from .precision import Precision
from .prepare import ByteTokenizer, load_tokenizer
from .trainer import (
    NanPolicy,
    Progress,
    Trainer,
    TrainingDiverged,
    append_metrics,
    learning_rate,
    load_pretrained,
    log_loss_scale,
    make_optimizer,
    read_step,
)

FORMAT, VERSION = "fusedlm-classifier", 1
WEIGHTS_FILE, CONFIG_FILE = "classifier.safetensors", "classifier.json"
VAL_FRACTION = 0.1
SPLIT_SEED = 0  # the permutation of the default validation split; not --seed

# Settings not given on the command line or in the TOML file.
CLASSIFY_DEFAULTS = {
    "cpu": dict(preset="tiny", batch_size=16, max_steps=300, lr=1e-3, warmup_steps=20,
                eval_every=50),
    "cuda": dict(preset="small", batch_size=32, max_steps=1000, lr=3e-4, warmup_steps=50,
                 eval_every=100),
}

_INTEGER = re.compile(r"[+-]?\d+")


# ---- data ---------------------------------------------------------------------------------


def _is_jsonl(path: str) -> bool:
    if path.lower().endswith((".jsonl", ".ndjson")):
        return True
    if path.lower().endswith((".csv", ".tsv")):
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return f.read(4096).lstrip().startswith("{")


def _check_label(value, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: 'label' must be a string or an integer, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: empty 'label'")
    return value.strip() if isinstance(value, str) else value


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: empty 'text' (a text needs at least one token)")
    return value


def read_examples(path: str | os.PathLike) -> tuple[list[str], list[str | int]]:
    """The (texts, labels) of a CSV or JSONL file, in file order. Raises ``DataError`` naming
    the file (and line) for a missing file or column, a bad value or an empty file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file (expected a CSV or JSONL of text,label)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file: no examples")
    texts, labels = [], []
    if _is_jsonl(path):
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object with 'text' and 'label'")
                missing = [k for k in ("text", "label") if k not in row]
                if missing:
                    raise DataError(f"{where}: missing key(s) {', '.join(map(repr, missing))}; "
                                    "every line needs 'text' and 'label'")
                texts.append(_check_text(row["text"], where))
                labels.append(_check_label(row["label"], where))
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            dialect = "excel-tab" if path.lower().endswith(".tsv") else "excel"
            reader = csv.DictReader(f, dialect=dialect)
            columns = reader.fieldnames or []
            missing = [k for k in ("text", "label") if k not in columns]
            if missing:
                raise DataError(f"{path}: the CSV header lacks column(s) "
                                f"{', '.join(map(repr, missing))} (found {columns}); it needs "
                                "'text' and 'label'")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if row["text"] is None or row["label"] is None:
                    raise DataError(f"{where}: the row has fewer fields than the header")
                texts.append(_check_text(row["text"], where))
                labels.append(_check_label(row["label"], where))
    if not texts:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    return texts, labels


def _canonical(label: str | int) -> str:
    """The key a label is compared by: integers (and integer strings) by value."""
    return str(int(label)) if isinstance(label, int) or _INTEGER.fullmatch(label) else label


def class_labels(labels: Sequence[str | int], path: str) -> list[str | int]:
    """The sorted distinct labels (all ints when every label is an integer); class i is
    ``result[i]``. Raises ``DataError`` naming ``path`` when there are fewer than 2."""
    keys = sorted({_canonical(label) for label in labels})
    if all(_INTEGER.fullmatch(k) for k in keys):
        classes: list[str | int] = sorted(int(k) for k in keys)
    else:
        classes = keys
    if len(classes) < 2:
        raise DataError(f"{path}: {len(classes)} distinct label(s) {classes}; classification "
                        "needs at least 2 classes")
    return classes


def label_ids(labels: Sequence[str | int], classes: Sequence[str | int], path: str) -> np.ndarray:
    """(N,) int64 class ids of ``labels``; ``DataError`` naming ``path`` for an unknown label."""
    index = {_canonical(c): i for i, c in enumerate(classes)}
    unknown = sorted({_canonical(label) for label in labels} - set(index))
    if unknown:
        raise DataError(f"{path}: label(s) {unknown[:10]} do not occur in the training data "
                        f"(classes {list(classes)[:10]})")
    return np.array([index[_canonical(label)] for label in labels], dtype=np.int64)


def encode_texts(tokenizer, texts: Sequence[str], block_size: int) -> list[np.ndarray]:
    """Each text as int64 token ids (n_i,), 1 <= n_i <= block_size: the last ``block_size``
    tokens when it is longer."""
    if block_size < 1:
        raise ValueError(f"argument 'block_size' must be >= 1, got {block_size}")
    encoded = []
    for i, text in enumerate(texts):
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)[-block_size:]
        if ids.size == 0:
            raise DataError(f"text {i} ({text[:40]!r}) encodes to no tokens")
        encoded.append(ids)
    return encoded


def collate(rows: Sequence[np.ndarray], device: torch.device | str = "cpu",
            pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """idx (B, T) int64, right-padded with ``pad_id`` to the longest row, and last (B,) int64,
    the position of each row's last real token."""
    if not rows:
        raise ValueError("argument 'rows' must hold at least one sequence")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    idx = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = r
    return (torch.from_numpy(idx).to(device), torch.from_numpy(lengths - 1).to(device))


@dataclass
class Split:
    """Tokenized examples: ``tokens[i]`` (n_i,) int64 with class id ``labels[i]``."""

    tokens: list[np.ndarray]
    labels: np.ndarray  # (N,) int64
    texts: list[str]

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, indices: np.ndarray) -> Split:
        return Split([self.tokens[i] for i in indices], self.labels[indices],
                     [self.texts[i] for i in indices])


# ---- model --------------------------------------------------------------------------------


class GPTClassifier(nn.Module):
    """A GPT backbone and a linear head on the final-norm hidden state of the last real token.

    ``forward(idx, last)``: idx (B, T) int64 token ids, right-padded; last (B,) int64 positions
    of the last real tokens -> logits (B, num_classes) float32. ``check_last=False`` skips
    the range check of ``last`` (a host read: on a GPU, a wait for the device), for callers
    whose positions are valid by construction (``collate``'s)."""

    def __init__(self, backbone: GPT, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"argument 'num_classes' must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: Tensor, last: Tensor, check_last: bool = True) -> Tensor:
        if last.shape != idx.shape[:1]:
            raise ValueError(f"argument 'last' must have shape ({idx.shape[0]},), got "
                             f"{list(last.shape)}")
        if (check_last and last.numel()
                and not 0 <= int(last.min()) <= int(last.max()) < idx.shape[1]):
            raise ValueError(f"argument 'last' must hold positions in [0, {idx.shape[1]}), got "
                             f"values in [{int(last.min())}, {int(last.max())}]")
        hidden = self.backbone.hidden_states(idx)  # (B, T, C)
        pooled = hidden[torch.arange(idx.shape[0], device=idx.device), last]  # (B, C)
        return self.head(pooled).float()


def _state_with_tied(weights: dict, model: GPTClassifier) -> dict:
    weights = dict(weights)
    if model.backbone.config.tie_embeddings and "backbone.lm_head.weight" not in weights:
        weights["backbone.lm_head.weight"] = weights["backbone.wte.weight"]
    return weights


def load_classifier(out_dir: str | os.PathLike, kernels: str = "fused"):
    """(GPTClassifier in eval mode on the CPU, labels: list, tokenizer) from the output of a
    ``--task classify`` run."""
    from safetensors.torch import load_file

    out_dir = os.fspath(out_dir)
    config_path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no such file (not a --task classify output)")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise DataError(f"{config_path}: not a {FORMAT} file")
    model = GPTClassifier(GPT(GPTConfig.from_dict(meta["model"]), kernels=kernels),
                          len(meta["labels"]))
    weights = load_file(os.path.join(out_dir, WEIGHTS_FILE))
    model.load_state_dict(_state_with_tied(weights, model), strict=True)
    return model.eval(), meta["labels"], load_tokenizer(meta["tokenizer"])


@torch.no_grad()
def predict(model: GPTClassifier, tokenizer, texts: Sequence[str],
            batch_size: int = 64) -> np.ndarray:
    """(N,) int64 class ids of ``texts`` (tokenized and truncated as in training)."""
    device = next(model.parameters()).device
    tokens = encode_texts(tokenizer, texts, model.backbone.config.block_size)
    out = [model(*collate(tokens[i:i + batch_size], device)).argmax(-1).cpu()
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out).numpy()


# ---- training -----------------------------------------------------------------------------


def _checkpoint_tokenizer(path: str) -> str:
    from .prepare import checkpoint_tokenizer

    return checkpoint_tokenizer(path)


class ClassifierTrainer:
    """The ``--task classify`` run described in the module docstring."""

    # A test hook, as in Trainer: multiplies the loss before backward (NaN exercises the policy).
    loss_multiplier = 1.0

    def __init__(self, cfg: TrainConfig, log=print) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("'task = classify' runs in one process; start it without torchrun")
        for name in ("fsdp", "resume"):
            if getattr(cfg, name):
                raise ConfigError(f"'{name}' is not supported with 'task = classify'")
        self.cfg, self.log = cfg, log
        self.device = Trainer._pick_device(cfg.device)
        self._fill_defaults()
        # The files first: a bad one fails before any model is built.
        texts, raw = read_examples(cfg.data)
        self.labels = class_labels(raw, cfg.data)
        ids = label_ids(raw, self.labels, cfg.data)
        val = None
        if cfg.val_data:
            val_texts, val_raw = read_examples(cfg.val_data)
            val = (val_texts, label_ids(val_raw, self.labels, cfg.val_data))
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            backbone = load_pretrained(cfg.init_from, cfg.kernels, cfg.model)
            self.tokenizer = load_tokenizer(_checkpoint_tokenizer(cfg.init_from))
            self.log(f"initialised from {cfg.init_from}")
        else:
            try:
                config = GPTConfig.preset(cfg.preset, **cfg.model)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"'preset'/'model': {e}") from e
            backbone = GPT(config, kernels=cfg.kernels)
            self.tokenizer = ByteTokenizer()
        if backbone.config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model vocab_size {backbone.config.vocab_size} is smaller than "
                              f"the tokenizer's vocab {self.tokenizer.vocab_size}")
        self.block_size = backbone.config.block_size
        self.train_split, self.val_split = self._split(texts, ids, val)
        backbone.activation_checkpointing = cfg.activation_checkpointing
        self.raw_model = GPTClassifier(backbone, len(self.labels)).to(self.device)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.optimizer = make_optimizer(self.raw_model, cfg)
        self.precision = Precision.for_run(cfg, self.device, self.log)
        self._rng = np.random.default_rng(cfg.seed)
        self._order, self._cursor = np.zeros(0, dtype=np.int64), 0
        self.step = 0
        self.log(f"classifier: {len(self.labels)} classes {self.labels[:10]}, "
                 f"{len(self.train_split)} train / {len(self.val_split)} val examples; backbone "
                 f"{backbone.num_parameters() / 1e6:.2f}M parameters ({backbone.config.n_layer} "
                 f"layers, width {backbone.config.n_embd}, block {self.block_size}), "
                 f"kernels={cfg.kernels}, device={self.device}")

    def _fill_defaults(self) -> None:
        defaults = CLASSIFY_DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        chosen = []
        for key, value in defaults.items():
            if key == "preset" and self.cfg.init_from:
                continue  # the shape comes with the weights
            if getattr(self.cfg, key) is None:
                setattr(self.cfg, key, value)
                chosen.append(f"{key}={value}")
        if chosen:
            self.log(f"defaults for classify on {self.device.type}: {', '.join(chosen)}")
        shortened = self.cfg.fit_warmup()
        if shortened:
            self.log(shortened)

    def _split(self, texts: list[str], ids: np.ndarray,
               val: tuple[list[str], np.ndarray] | None) -> tuple[Split, Split]:
        """Tokenized (train, val): ``val`` as given, else a fixed 10% of the examples."""
        full = Split(encode_texts(self.tokenizer, texts, self.block_size), ids, texts)
        if val is not None:
            return full, Split(encode_texts(self.tokenizer, val[0], self.block_size), val[1],
                               val[0])
        order = np.random.default_rng(SPLIT_SEED).permutation(len(full))
        n_val = max(1, int(round(VAL_FRACTION * len(full))))
        return full.subset(np.sort(order[n_val:])), full.subset(np.sort(order[:n_val]))

    def _autocast(self):
        return self.precision.autocast()

    def _next_indices(self) -> np.ndarray:
        """batch_size example indices: epochs of seeded permutations of the training set."""
        picked = []
        while len(picked) < self.cfg.batch_size:
            if self._cursor >= len(self._order):
                self._order, self._cursor = self._rng.permutation(len(self.train_split)), 0
            take = self._order[self._cursor:self._cursor + self.cfg.batch_size - len(picked)]
            picked.extend(take.tolist())
            self._cursor += len(take)
        return np.array(picked, dtype=np.int64)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = learning_rate(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Counted on the device (and the tokens on the host): nothing here waits for the GPU.
        total_loss, tokens = torch.zeros((), device=self.device), 0
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for _ in range(cfg.grad_accum):
            batch = self._next_indices()
            rows = [self.train_split.tokens[i] for i in batch]
            idx, last = collate(rows, self.device)
            target = torch.from_numpy(self.train_split.labels[batch]).to(self.device)
            with self._autocast():
                logits = self.model(idx, last, check_last=False)  # (collate's positions)
            loss = F.cross_entropy(logits, target) * (self.loss_multiplier / cfg.grad_accum)
            self.precision.backward(loss)
            total_loss += loss.detach()
            correct += (logits.argmax(-1) == target).sum()
            tokens += sum(len(row) for row in rows)
        self.precision.unscale(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        loss_scale = self.precision.loss_scale
        finite, overflow = self.precision.step(self.optimizer, total_loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        # Tensors not read yet: the loop reads them all in one copy (read_step).
        return {"loss": total_loss, "lr": lr, "grad_norm": grad_norm,
                "accuracy": correct / (cfg.batch_size * cfg.grad_accum), "tokens": tokens,
                "finite": finite, "overflow": overflow, "loss_scale": loss_scale}

    @torch.no_grad()
    def evaluate(self, split: Split | None = None) -> dict:
        """{"val_loss", "val_accuracy"} over the whole validation split (or ``split``)."""
        split = self.val_split if split is None else split
        self.model.eval()
        total, correct, size = 0.0, 0, 2 * self.cfg.batch_size
        for start in range(0, len(split), size):
            idx, last = collate(split.tokens[start:start + size], self.device)
            target = torch.from_numpy(split.labels[start:start + size]).to(self.device)
            with self._autocast():
                logits = self.model(idx, last)
            total += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
        self.model.train()
        return {"val_loss": total / len(split), "val_accuracy": correct / len(split)}

    def train(self) -> dict:
        """Runs ``max_steps`` steps, evaluates, saves; returns the last metrics record plus
        ``majority_accuracy`` (the validation accuracy of always predicting the most frequent
        training class) and the ``path`` of the saved classifier."""
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if os.path.exists(metrics_path):
            os.remove(metrics_path)  # a new run: no --resume for classify
        enabled = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        progress = Progress(cfg.max_steps, 0, enabled, cfg.log_every)
        if cfg.eval_every:
            first = self.evaluate()
            progress.message(f"step 0: val_loss {first['val_loss']:.4f} "
                             f"val_accuracy {first['val_accuracy']:.3f}")
            append_metrics(metrics_path, {"step": 0, **first})
        self.model.train()
        nan_guard, record = NanPolicy(cfg), {}
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                result = read_step(self.train_step(self.step))  # (waits for the step)
                dt = time.perf_counter() - t0
                self.step += 1
                record = {"step": self.step, "loss": result["loss"],
                          "accuracy": result["accuracy"], "lr": result["lr"],
                          "grad_norm": result["grad_norm"], "tokens_per_s": result["tokens"] / dt}
                log_loss_scale(result, record, self.step, progress)
                try:
                    nan_guard.check(self.step, result, record, progress)
                except TrainingDiverged:
                    append_metrics(metrics_path, record)
                    raise
                if self.step == cfg.max_steps or (cfg.eval_every and
                                                  self.step % cfg.eval_every == 0):
                    record.update(self.evaluate())
                    progress.message(f"step {self.step}: val_loss {record['val_loss']:.4f} "
                                     f"val_accuracy {record['val_accuracy']:.3f}")
                append_metrics(metrics_path, record)
                progress.update(self.step - 1, f"loss {result['loss']:.4f} "
                                f"acc {result['accuracy']:.2f}")
        finally:
            progress.close()
        counts = np.bincount(self.train_split.labels, minlength=len(self.labels))
        record["majority_accuracy"] = float(np.mean(self.val_split.labels == counts.argmax()))
        record["path"] = self.save(record)
        return record

    def save(self, record: dict) -> str:
        """Writes ``OUT/classifier.safetensors`` and ``OUT/classifier.json`` (each through a
        temporary file renamed into place); returns the weights' path."""
        from safetensors.torch import save_file

        out = self.cfg.out
        os.makedirs(out, exist_ok=True)
        weights_path = os.path.join(out, WEIGHTS_FILE)
        tmp = f"{weights_path}.tmp-{os.getpid()}"
        save_file(weights_for_saving(self.raw_model), tmp)
        os.replace(tmp, weights_path)
        meta = {"format": FORMAT, "version": VERSION, "labels": list(self.labels),
                "model": self.raw_model.backbone.config.to_dict(),
                "tokenizer": self.tokenizer.name, "pooling": "last_token", "step": self.step,
                "val_loss": record.get("val_loss"), "val_accuracy": record.get("val_accuracy"),
                "val_examples": len(self.val_split), "train": self.cfg.to_dict()}
        config_path = os.path.join(out, CONFIG_FILE)
        with open(f"{config_path}.tmp-{os.getpid()}", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(f"{config_path}.tmp-{os.getpid()}", config_path)
        return weights_path


def train_classifier(cfg: TrainConfig, log=print) -> dict:
    """``fusedlm train --task classify``: trains, saves, prints the final validation accuracy;
    returns the last metrics record (see ``ClassifierTrainer.train``)."""
    if cfg.task != "classify":
        raise ConfigError(f"train_classifier needs 'task = classify', got {cfg.task!r}")
    trainer = ClassifierTrainer(cfg, log=log)
    summary = trainer.train()
    log(f"done: {trainer.step} steps, train loss {summary.get('loss', math.nan):.4f}, "
        f"val accuracy {summary['val_accuracy']:.4f} on {len(trainer.val_split)} examples "
        f"(majority class {summary['majority_accuracy']:.4f}), val loss "
        f"{summary['val_loss']:.4f}")
    log(f"classifier: {summary['path']} + {os.path.join(cfg.out, CONFIG_FILE)}; metrics: "
        f"{os.path.join(cfg.out, 'metrics.jsonl')}")
    return summary
