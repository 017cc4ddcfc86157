"""``TrainConfig``: every knob of a training run, from defaults, a TOML file and flags (in that
order of precedence, flags last)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from ..ops._common import describe

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli (a dependency there)
    import tomli as tomllib

SCHEDULES = ("cosine", "wsd", "constant")
NAN_POLICIES = ("skip", "stop")
TASKS = ("lm", "classify")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # (train/precision.py says what each does)


class ConfigError(ValueError):
    """A bad setting; the message names it."""


@dataclass
class TrainConfig:
    out: str = "out"
    data: str | None = None  # shards (file, glob or directory); None: the embedded default
    val_data: str | None = None  # classify: a separate (text, label) file; default: 10% split
    preset: str | None = None  # None: "tiny" on CPU, "small" on GPU
    model: dict = field(default_factory=dict)  # GPTConfig overrides
    kernels: str = "fused"
    device: str = "auto"
    task: str = "lm"
    init_from: str | None = None  # a checkpoint (dir) or a local Hugging Face GPT-2 directory
    resume: bool = False
    seed: int = 1337
    # batch: batch_size rows of block_size tokens per micro-step and process
    batch_size: int | None = None
    grad_accum: int = 1
    max_steps: int | None = None
    data_mode: str = "random"
    # a token id that opens each packed document (GPT-2's <|endoftext|>: 50256): attention stays
    # within documents (causal within each); None: across the whole window
    document_separator: int | None = None
    # with document_separator: positions restart at 0 in each document (learned or rotary),
    # so a packed document trains exactly as it would alone (Megatron's reset-position-ids)
    reset_positions: bool = False
    # optimizer and schedule
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # PaLM's z-loss: adds z_loss * logsumexp(logits)**2 per token to the training loss (1e-4 is
    # usual), keeping the softmax normalizer near 1; 0: none. Validation loss never includes it.
    z_loss: float = 0.0
    # autocast dtype: bf16, fp16 (with dynamic loss scaling) or fp32 (none); auto: bf16 on a
    # CUDA device that runs it natively, fp16 on an older one, fp32 on a CPU
    precision: str = "auto"
    initial_loss_scale: float = 65536.0  # fp16: the dynamic loss scale's start (GradScaler's)
    # what runs around the step
    eval_every: int | None = None
    eval_batches: int = 20
    sample_every: int = 0
    sample_tokens: int = 200
    sample_prompt: str = "def "
    ckpt_every: int | None = None
    keep_checkpoints: int = 3
    log_every: int = 10
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    nan_policy: str = "skip"
    max_bad_steps: int = 5
    progress: bool | None = None  # None: when the terminal is a TTY

    def _check_types(self) -> None:
        """Each setting against its annotation (a TOML file can hold any type): str, int,
        float (an int is taken), bool, dict, each optionally None."""
        kinds = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                 "dict": (dict,)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, _, optional = f.type.partition(" | ")
            if value is None and optional == "None":
                continue
            if (not isinstance(value, kinds[kind])
                    or (isinstance(value, bool) and kind in ("int", "float"))):
                wanted = {"str": "a string", "int": "an integer", "float": "a number",
                          "bool": "true or false", "dict": "a table / JSON object"}[kind]
                raise ConfigError(f"'{f.name}' must be {wanted}"
                                  f"{' or unset' if optional else ''}, got {describe(value)}")

    def fit_warmup(self) -> str | None:
        """A warmup that would not end before ``max_steps`` (a short run with the default
        warmup, say) is cut to a tenth of the run. Returns the line that says so, None when
        the warmup fits."""
        if self.warmup_steps < self.max_steps:
            return None
        asked, self.warmup_steps = self.warmup_steps, max(0, self.max_steps // 10)
        return (f"warmup_steps={asked} is not below max_steps={self.max_steps}: warmup "
                f"shortened to {self.warmup_steps} step(s)")

    def validate(self) -> TrainConfig:
        self._check_types()
        ranges = {  # name: (lowest, highest (excluded), the rule in words); None passes
            "batch_size": (1, math.inf, "positive"),
            "max_steps": (1, math.inf, "positive"),
            "grad_accum": (1, math.inf, ">= 1"),
            "eval_every": (0, math.inf, ">= 0 (0: no evaluation)"),
            "ckpt_every": (0, math.inf, ">= 0 (0: no periodic checkpoints)"),
            "keep_checkpoints": (1, math.inf, ">= 1"),
            "lr": (math.ulp(0.0), math.inf, "a finite number > 0"),
            "min_lr_ratio": (0.0, math.nextafter(1.0, 2.0), "in [0, 1]"),
            "seed": (0, 2**63, "in [0, 2**63)"),
            "warmup_steps": (0, math.inf, ">= 0"),
            "sample_every": (0, math.inf, ">= 0 (0: no samples)"),
            "eval_batches": (1, math.inf, ">= 1"),
            "sample_tokens": (1, math.inf, ">= 1"),
            "log_every": (1, math.inf, ">= 1"),
            "max_bad_steps": (1, math.inf, ">= 1"),
            "decay_fraction": (0.0, math.nextafter(1.0, 2.0), "in [0, 1]"),
            "weight_decay": (0.0, math.inf, "a finite number >= 0"),
            "beta1": (0.0, 1.0, "in [0, 1)"),
            "beta2": (0.0, 1.0, "in [0, 1)"),
            "grad_clip": (0.0, math.inf, "a finite number >= 0 (0 disables it)"),
            "z_loss": (0.0, math.inf, "a finite number >= 0 (0: no z-loss)"),
            "initial_loss_scale": (1.0, math.inf, "a finite number >= 1"),
        }
        for name, (low, high, rule) in ranges.items():
            value = getattr(self, name)
            if value is not None and not low <= value < high:  # (NaN fails too)
                raise ConfigError(f"'{name}' must be {rule}, got {value}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ConfigError(f"'device' must be auto, cpu, cuda or cuda:N, got "
                                  f"{self.device!r}") from e
        choices = {"kernels": ("fused", "torch"), "schedule": SCHEDULES, "task": TASKS,
                   "nan_policy": NAN_POLICIES, "data_mode": ("random", "sequential"),
                   "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"'{name}' must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        separator = self.document_separator
        if separator is not None and (isinstance(separator, bool) or not isinstance(separator, int)
                                      or separator < 0):
            raise ConfigError(f"'document_separator' must be a token id >= 0, got {separator!r}")
        if self.reset_positions and separator is None:
            raise ConfigError("'reset_positions' needs 'document_separator' (where each packed "
                              "document starts)")
        if self.resume and self.init_from:
            raise ConfigError("'resume' and 'init_from' exclude each other: resume continues a "
                              "run in --out, init_from starts a new one from weights")
        if self.task == "classify" and self.z_loss:
            raise ConfigError("'z_loss' applies to language-model training (task = lm) only")
        if self.task == "classify" and not self.data:
            raise ConfigError("'task = classify' needs 'data': a CSV or JSONL of (text, label)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def make_config(toml_path: str | None = None, **flags) -> TrainConfig:
    """Defaults, then the TOML file, then the flags that are not None."""
    values = load_toml(toml_path) if toml_path else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        config = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from e
    return config.validate()
