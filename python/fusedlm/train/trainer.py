"""The training loop behind ``fusedlm train``: language-model pretraining or continued training
of ``fusedlm.models.GPT`` on token shards.

Per step: ``grad_accum`` micro-batches (autocast by ``precision``, see train/precision.py: bf16
on GPU by default; under DDP the gradient all-reduce, under FSDP2 (``--fsdp``) the
reduce-scatter, runs on the last micro-step only), the NaN/Inf check, global-norm clipping, one
AdamW step (``fusedlm.optim.AdamW``; torch's with ``kernels="torch"``; weight decay on matrices and
embeddings only), the learning rate from warmup + cosine, WSD or constant. Every step is logged
to ``OUT/metrics.jsonl``; validation, samples and checkpoints come every
``eval_every``/``sample_every``/``ckpt_every`` steps.
With ``z_loss`` > 0 the training loss adds PaLM's z-loss (``z_loss * logsumexp**2`` a token);
the log's ``loss`` stays the cross-entropy alone, comparable with ``val_loss``, and ``z_loss``
is the term added.

NaN policy: a step whose loss or gradient norm is not finite is never applied. With
``nan_policy="skip"`` the step's gradients are dropped (logged with ``"skipped": true``) and the
run stops after ``max_bad_steps`` consecutive bad steps; with ``"stop"`` it stops at the first.
Under ``precision="fp16"`` a finite loss with overflowing gradients is the loss scaler's
business, not a bad step: the scaler skips it and lowers the scale (logged with ``"skipped"``
and ``"overflow": true``; every record holds the ``loss_scale`` its step used).

No step waits for the device: a bad step is skipped inside AdamW's kernels (``found_inf``), and
step n's numbers are read (``read_step``, one copy) after step n + 1 is queued; see ``train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

from ..backends import OpDispatch
from ..models.gpt import GPT, GPTConfig, document_ids
from ..optim import AdamW
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .data import TokenBatches, find_shards
from .distributed import (
    DistInfo,
    barrier,
    full_state_dicts,
    full_tensor,
    init_distributed,
    load_full_state_dicts,
    mean_across_ranks,
    shutdown_distributed,
    wrap_model,
)
from .hardware import peak_flops
from .precision import Precision
from .prepare import stdlib_corpus_dir, tokenizer_for_data


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite (see the NaN policy)."""


# What `fusedlm train` picks when a setting is not given: CPU-sized for the embedded default
# (under 5 minutes on 2 cores), bigger on a GPU.
DEVICE_DEFAULTS = {
    "cpu": dict(preset="tiny", batch_size=16, max_steps=600, lr=2e-3, warmup_steps=30,
                eval_every=100, ckpt_every=100),
    "cuda": dict(preset="small", batch_size=32, max_steps=2000, lr=1e-3, warmup_steps=100,
                 eval_every=250, ckpt_every=500),
}


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr of step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio * lr``, or WSD
    (constant, then linear decay over the last ``decay_fraction`` of the steps), or constant."""
    peak, total, warmup = cfg.lr, cfg.max_steps, cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    low = peak * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_start = total - int(cfg.decay_fraction * total)
        if step < decay_start:
            return peak
        return peak - (peak - low) * (step - decay_start + 1) / max(1, total - decay_start)
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def _rng_state(device: torch.device) -> dict:
    """This process's RNG states: the CPU generators and, on a GPU, its own device's only (a
    resume on a machine with fewer GPUs would fail on the others' states)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, key.tolist(), pos, has_gauss, gauss)}  # plain types: weights_only
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class NanPolicy:
    """The NaN policy of a run: a step whose loss or gradient norm is not finite is marked
    skipped; ``check`` raises TrainingDiverged at once with ``nan_policy="stop"``, or after
    ``max_bad_steps`` such steps in a row with ``"skip"``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.policy, self.max_bad_steps, self.bad_steps = cfg.nan_policy, cfg.max_bad_steps, 0

    def check(self, step: int, result: dict, record: dict, progress: Progress) -> None:
        if result["finite"]:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        record["skipped"] = True
        reason = (f"step {step}: loss {result['loss']} / grad norm {result['grad_norm']} "
                  "is not finite")
        if self.policy == "stop" or self.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{reason}; stopping (nan_policy={self.policy!r}, {self.bad_steps} bad step(s) "
                f"in a row, max_bad_steps={self.max_bad_steps})")
        progress.message(f"{reason}: step skipped (nan_policy='skip')")


def log_loss_scale(result: dict, record: dict, step: int, progress: Progress) -> None:
    """fp16: the loss scale the step used goes in its record, and a step the scaler skipped
    for an overflow is marked skipped (with ``overflow``) and said."""
    if result["loss_scale"] is None:
        return
    record["loss_scale"] = result["loss_scale"]
    if result["overflow"]:
        record.update(skipped=True, overflow=True)
        progress.message(f"step {step}: float16 gradients overflowed at loss scale "
                         f"{result['loss_scale']:g}: step skipped, scale lowered")


class Progress:
    """One terminal line redrawn in place (a TTY), or a log line every ``log_every`` steps;
    nothing at all when ``quiet`` (the ranks other than 0)."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int, stream=sys.stderr,
                 quiet: bool = False):
        self.total, self.start, self.enabled = total, start, enabled and not quiet
        self.log_every, self.stream, self.t0 = max(1, log_every), stream, time.perf_counter()
        self.quiet = quiet

    def update(self, step: int, text: str) -> None:
        done = step + 1
        if self.quiet:
            return
        if self.enabled:
            width = 24
            filled = int(width * done / self.total)
            elapsed = time.perf_counter() - self.t0
            rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - done) / rate if rate > 0 else 0.0
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {done}/{self.total} {text} eta {eta:4.0f}s ")
            self.stream.flush()
        elif done % self.log_every == 0 or done == self.total:
            print(f"step {done}/{self.total} {text}", flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.enabled:
            self.stream.write("\r\033[K")
        print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print) -> None:
        self.cfg, self.log = cfg, log
        self.device = self._pick_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        if not self.is_main:
            self.log = lambda *a, **k: None
        self._fill_device_defaults()
        torch.manual_seed(cfg.seed)
        self.data_dir = cfg.data
        if self.data_dir is None:
            if self.is_main:
                self.data_dir = stdlib_corpus_dir(log=self.log)
            barrier(self.dist)
            self.data_dir = stdlib_corpus_dir(log=self.log)
        self.tokenizer = tokenizer_for_data(self.data_dir)
        self.precision = Precision.for_run(cfg, self.device, self.log,
                                           sharded=cfg.fsdp and self.dist.enabled)

        resume_state = None
        if not cfg.resume and ckpt.latest_checkpoint(cfg.out) is not None:
            raise ConfigError(f"{cfg.out} already holds a run with checkpoints: pass --resume to "
                              "continue it, or choose another --out")
        if cfg.resume:
            found = ckpt.latest_checkpoint(cfg.out)
            if found is None:
                raise ckpt.CheckpointError(f"--resume: no checkpoint in {cfg.out}/checkpoints")
            resume_state = ckpt.load_checkpoint(found)
        self.model_config = self._model_config(resume_state)
        self.model = self._build_model(resume_state)
        self.raw_model = self.model
        self.step = 0
        self.train_batches = TokenBatches(
            find_shards(self.data_dir, "train"), cfg.batch_size, self.model_config.block_size,
            mode=cfg.data_mode, seed=cfg.seed, rank=self.dist.rank,
            world_size=self.dist.world_size, vocab_size=self.model_config.vocab_size,
        )
        self.val_shards = find_shards(self.data_dir, "val")
        self._val_batches()  # a val shard shorter than one window fails now, not at step N
        self.best_val_loss = None
        self.model = wrap_model(self.model, self.dist, self.device, cfg.fsdp)
        if cfg.fsdp and self.dist.enabled:
            from torch.distributed.tensor import DTensor

            params = list(self.raw_model.parameters())
            sharded = sum(isinstance(p, DTensor) for p in params)
            self.log(f"FSDP2: {sharded} of {len(params)} parameter tensors sharded over "
                     f"{self.dist.world_size} ranks")
        # After wrapping: FSDP2's fully_shard replaces the parameters with sharded ones, and an
        # optimizer holding the old ones would never update the model.
        self.optimizer = self._build_optimizer()
        if resume_state is not None:
            self._restore(resume_state)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.peak_flops, self.device_name = peak_flops(self.device)
        if self.peak_flops and self.precision.name == "fp32":
            self.peak_flops = None  # the table holds 16-bit tensor-core peaks only
            self.log("mfu: not reported for precision=fp32 (the peak table holds bf16/fp16 "
                     "tensor-core peaks)")
        self.flops_per_token = self.raw_model.flops_per_token()

    # ---- setup ----------------------------------------------------------------------------

    @staticmethod
    def _pick_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"'device' is {name!r} but torch.cuda.is_available() is False")
        return device

    def _fill_device_defaults(self) -> None:
        defaults = DEVICE_DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        chosen = []
        for key, value in defaults.items():
            if getattr(self.cfg, key) is None:
                setattr(self.cfg, key, value)
                chosen.append(f"{key}={value}")
        if chosen:
            self.log(f"defaults for {self.device.type}: {', '.join(chosen)}")
        shortened = self.cfg.fit_warmup()
        if shortened:
            self.log(shortened)

    def _model_config(self, resume_state) -> GPTConfig:
        if resume_state is not None:
            return GPTConfig.from_dict(resume_state["config"]["model"])
        if self.cfg.init_from:
            return None  # comes with the weights
        try:
            config = GPTConfig.preset(self.cfg.preset, **self.cfg.model)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model vocab_size {config.vocab_size} is smaller than the data's "
                              f"tokenizer vocab {self.tokenizer.vocab_size}")
        return config

    def _build_model(self, resume_state) -> GPT:
        cfg = self.cfg
        if cfg.init_from and resume_state is None:
            model = load_pretrained(cfg.init_from, cfg.kernels, cfg.model)
            self.model_config = model.config
            self.log(f"initialised from {cfg.init_from}")
        else:
            # A resumed run's weights are loaded in _restore, once the model is wrapped.
            model = GPT(self.model_config, kernels=cfg.kernels)
        model.activation_checkpointing = cfg.activation_checkpointing
        separator = cfg.document_separator
        if separator is not None and separator >= self.model_config.vocab_size:
            raise ConfigError(f"'document_separator' {separator} is not a token id of the model "
                              f"(vocab_size {self.model_config.vocab_size})")
        model.to(self.device)
        n = model.num_parameters()
        self.log(f"model: {n / 1e6:.2f}M parameters ({self.model_config.arch}, "
                 f"{self.model_config.n_layer} layers, width {self.model_config.n_embd}, "
                 f"block {self.model_config.block_size}), kernels={cfg.kernels}, "
                 f"device={self.device}, world size {self.dist.world_size}")
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        sharded_scaler = self.precision.scaler is not None and self.cfg.fsdp and \
            self.dist.enabled
        return make_optimizer(self.model, self.cfg, sharded_scaler=sharded_scaler)

    def _restore(self, state: dict) -> None:
        # Every rank holds the full state; under FSDP2 each keeps its shard.
        load_full_state_dicts(self.raw_model, self.optimizer,
                              _with_tied(state["model"], self.raw_model), state["optimizer"])
        trainer = state["trainer"]
        self.step = trainer["step"]
        self.train_batches.load_state_dict(trainer["data"])
        _set_rng_state(trainer["rng"][min(self.dist.rank, len(trainer["rng"]) - 1)],
                       self.device)
        self.best_val_loss = trainer.get("best_val_loss")
        self.precision.load_state_dict(trainer.get("loss_scaler"))
        self.log(f"resumed from {state['path']} at step {self.step}")
        if self.is_main:  # only rank 0 writes the file: two ranks rewriting it race
            _truncate_metrics(os.path.join(self.cfg.out, "metrics.jsonl"), self.step)

    # ---- the loop -------------------------------------------------------------------------

    def _autocast(self):
        return self.precision.autocast()

    def train_step(self, step: int) -> dict:
        """Queues step ``step`` (0-based): its micro-batches, the clipping and the optimizer
        step. Returns its numbers (loss, grad_norm, finite, ...) as tensors not read yet, so
        the host can queue the next step while the device runs this one; ``read_step`` reads
        them, all in one copy. (Under fp16 the loss scaler reads its scale on the host.)"""
        cfg = self.cfg
        lr = learning_rate(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss = torch.zeros((), device=self.device)
        total_z_loss = torch.zeros((), device=self.device)
        z_args = {"z_loss": cfg.z_loss, "return_z_loss": True} if cfg.z_loss else {}
        for micro in range(cfg.grad_accum):
            x, y = self.train_batches.next_batch(self.device)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()  # DDP
            if self.dist.enabled and hasattr(self.raw_model, "set_requires_gradient_sync"):
                # FSDP2: accumulate unsharded gradients, reduce-scatter on the last micro-step
                self.raw_model.set_requires_gradient_sync(last)
            with sync, self._autocast():
                _, loss, *z_part = self.model(x, y, return_logits=False, **self._packing(x),
                                              **z_args)
                loss = loss * (self.loss_multiplier / cfg.grad_accum)
            self.precision.backward(loss)
            total_loss += loss.detach()
            if z_part:
                total_z_loss += z_part[0] / cfg.grad_accum
        # (one all-reduce for both)
        loss_value, z_value = mean_across_ranks(torch.stack((total_loss, total_z_loss)),
                                                self.dist).unbind()
        self.precision.unscale(self.optimizer)  # (fp16) the norm and the clipping see true grads
        # max_norm=inf measures the norm without clipping.
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        loss_scale = self.precision.loss_scale  # (fp16) the scale this step's backward used
        finite, overflow = self.precision.step(self.optimizer, loss_value, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        result = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "finite": finite,
                  "overflow": overflow, "loss_scale": loss_scale}
        if cfg.z_loss:  # loss: the cross-entropy alone (as val_loss); z_loss: the term added
            result.update(loss=loss_value - z_value, z_loss=z_value)
        return result

    def _packing(self, x: torch.Tensor) -> dict:
        """The model's packing arguments for the windows x (B, T): their document ids when
        documents are kept apart (document_separator), and whether positions restart."""
        if self.cfg.document_separator is None:
            return {}
        return {"document_ids": document_ids(x, self.cfg.document_separator),
                "reset_positions": self.cfg.reset_positions}

    # A test hook: multiplies the loss before backward (e.g. by NaN to exercise the policy).
    loss_multiplier = 1.0

    def _val_batches(self) -> TokenBatches:
        return TokenBatches(self.val_shards, self.cfg.batch_size, self.model_config.block_size,
                            mode="sequential", rank=self.dist.rank,
                            world_size=self.dist.world_size)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first ``eval_batches`` sequential windows of the val shards
        (the same windows every time, and no RNG is touched)."""
        batches = self._val_batches()
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.eval_batches):
            x, y = batches.next_batch(self.device)
            with self._autocast():
                _, loss = self.model(x, y, return_logits=False, **self._packing(x))
            total += loss.float()
        self.model.train()
        return float(mean_across_ranks(total / self.cfg.eval_batches, self.dist))

    def sample(self, prompt: str | None = None, tokens: int | None = None) -> str:
        prompt = self.cfg.sample_prompt if prompt is None else prompt
        ids = torch.as_tensor(self.tokenizer.encode(prompt).astype(np.int64),
                              device=self.device)[None]
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        try:
            with self._autocast():
                out = self.raw_model.generate(ids, tokens or self.cfg.sample_tokens,
                                              temperature=0.8, top_k=40, generator=generator)
        except FloatingPointError as e:  # diverged weights (nan_policy "skip" kept training)
            return f"(no sample: {e})"
        return self.tokenizer.decode(out[0].tolist())

    def save(self) -> str | None:
        # A collective: every rank must take part (rank 0 alone would wait forever). The state
        # dicts are full ones (FSDP2's shards gathered), so a checkpoint does not depend on the
        # world size or the wrapping; rank 0 writes it.
        rng_states = self._all_rng_states()
        model_state, optimizer_state = full_state_dicts(self.raw_model, self.optimizer)
        if not self.is_main:
            return None
        from ..models.gpt import weights_for_saving

        trainer_state = {
            "step": self.step, "data": self.train_batches.state_dict(),
            "rng": rng_states, "best_val_loss": self.best_val_loss,
            "loss_scaler": self.precision.state_dict(),
        }
        config = {"model": self.model_config.to_dict(), "train": self.cfg.to_dict(),
                  "tokenizer": self.tokenizer.name}
        return ckpt.save_checkpoint(
            self.cfg.out, self.step, weights_for_saving(self.raw_model, model_state),
            optimizer_state, trainer_state, config, keep=self.cfg.keep_checkpoints,
        )

    def _all_rng_states(self) -> list[dict]:
        """Every rank's RNG state (gathered to rank 0), so each rank resumes its own."""
        state = _rng_state(self.device)
        if not self.dist.enabled:
            return [state]
        import torch.distributed as dist

        gathered = [None] * self.dist.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def train(self) -> dict:
        cfg, out = self.cfg, self.cfg.out
        os.makedirs(out, exist_ok=True)
        metrics_path = os.path.join(out, "metrics.jsonl")
        if self.step == 0 and self.is_main and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a new run (a resumed one was truncated in _restore)
        writer = _tensorboard(out) if self.is_main else None
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size * \
            self.model_config.block_size
        progress = Progress(cfg.max_steps, self.step, self._progress_enabled(), cfg.log_every,
                            quiet=not self.is_main)
        if self.step == 0 and cfg.eval_every:
            self.best_val_loss = self.evaluate()
            progress.message(f"step 0: val_loss {self.best_val_loss:.4f}")
            self._write(metrics_path, {"step": 0, "val_loss": self.best_val_loss}, writer)
        self.model.train()
        nan_guard, first_val = NanPolicy(cfg), self.best_val_loss
        summary = {}
        first_step = self.step + 1
        OpDispatch.last_choice.clear()  # what the first step runs, reported below
        last_read = None  # when the previous step's numbers were read (the device done with it)

        def finish(step: int, result: dict, queued: float) -> dict:
            """Reads step ``step``'s numbers (waiting for the device to finish it, not the
            steps queued after it), then logs it and runs what is due after it."""
            nonlocal last_read
            result = read_step(result)
            now = time.perf_counter()
            # The step's time: from when the device could start it (queued, and the step
            # before it done) until it was done, so queueing ahead is not counted twice.
            dt = now - (queued if last_read is None else max(queued, last_read))
            last_read = now
            tokens_per_s = tokens_per_step / dt
            record = {"step": step, "loss": result["loss"], "lr": result["lr"],
                      "grad_norm": result["grad_norm"], "tokens_per_s": tokens_per_s,
                      "mfu": (self.flops_per_token * tokens_per_s / self.dist.world_size /
                              self.peak_flops) if self.peak_flops else None}
            if "z_loss" in result:
                record["z_loss"] = result["z_loss"]
            log_loss_scale(result, record, step, progress)
            if "backends" in result:
                # Which backend served each fusedlm op ("auto" may pass a case to another
                # backend, or to the torch reference), on which device and peak: a tokens/s or
                # MFU figure is only read with these.
                record.update(backends=result["backends"], device=self.device_name,
                              peak_flops=self.peak_flops)
                ops = ", ".join(f"{k}={v}" for k, v in record["backends"].items())
                self.log(f"step {step} ran on {self.device_name}: {ops or 'no fusedlm op'}"
                         f"; peak {self.peak_flops or 'unknown'} FLOP/s")
            try:
                nan_guard.check(step, result, record, progress)
            except TrainingDiverged:
                self._write(metrics_path, record, writer)
                raise
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record["val_loss"] = self.evaluate()
                self.best_val_loss = min(record["val_loss"], self.best_val_loss or math.inf)
                progress.message(f"step {step}: val_loss {record['val_loss']:.4f}")
            self._write(metrics_path, record, writer)
            mfu = f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
            progress.update(step - 1, f"loss {result['loss']:.4f} "
                            f"{tokens_per_s / 1e3:.1f}k tok/s{mfu}")
            if (cfg.sample_every and step % cfg.sample_every == 0 and self.is_main
                    and not cfg.fsdp):  # FSDP would need every rank in the forward
                progress.message(f"sample at step {step}: {self.sample()!r}")
            if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
                self.save()
            return record

        # Step n's numbers are read after step n + 1 is queued, so the device never waits for
        # the host between steps (a read waits for the device). A step followed by validation,
        # a sample or a checkpoint, and the last one, are read at once: those must see the
        # weights of that step, not of the next. The NaN policy therefore stops a run one step
        # after the bad one (whose update the optimizer skipped on the device, see
        # Precision.step); that next step is not logged.
        pending = None  # (step, result, queued) of the step queued and not yet read
        try:
            while self.step < cfg.max_steps:
                queued = time.perf_counter()
                result = self.train_step(self.step)
                self.step += 1
                if self.step == first_step:
                    result["backends"] = dict(sorted(OpDispatch.last_choice.items()))
                if pending is not None:
                    summary = finish(*pending)
                pending = (self.step, result, queued)
                if not self._may_read_later(self.step):
                    summary, pending = finish(*pending), None
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        summary = dict(summary)
        summary["first_val_loss"] = first_val
        summary["best_val_loss"] = self.best_val_loss
        return summary

    def _may_read_later(self, step: int) -> bool:
        """Whether nothing after step ``step`` needs its weights before step + 1 is queued (the
        same answer on every rank: validation and checkpoints are collectives)."""
        cfg = self.cfg
        due = [cfg.eval_every, cfg.sample_every, cfg.ckpt_every]
        return step < cfg.max_steps and not any(every and step % every == 0 for every in due)

    def _progress_enabled(self) -> bool:
        if self.cfg.progress is not None:
            return self.cfg.progress and self.is_main
        return self.is_main and sys.stderr.isatty()

    def _write(self, path: str, record: dict, writer) -> None:
        if not self.is_main:
            return
        append_metrics(path, record)
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        # Drop the DDP wrapper before the process group: DDP's reducer holds the group, and a
        # gloo group freed there (with the GIL held) joins its worker threads, one of which may
        # need the GIL to free the tensors of a finished all_gather_object (save()) - a deadlock
        # at the end of a CPU run (torch 2.13). destroy_process_group frees it without the GIL.
        self.model = self.raw_model
        shutdown_distributed()


def read_step(result: dict) -> dict:
    """``result`` (a ``train_step``'s) with its tensors read to Python numbers (bool tensors to
    bools), all in one device-to-host copy: the one wait for the device a step has."""
    keys = [key for key, value in result.items() if isinstance(value, torch.Tensor)]
    if not keys:
        return dict(result)
    values = torch.stack([result[key].detach().reshape(()).to(torch.float64)
                          for key in keys]).tolist()
    read = dict(result)
    for key, value in zip(keys, values, strict=True):
        read[key] = bool(value) if result[key].dtype == torch.bool else value
    return read


def append_metrics(path: str, record: dict) -> None:
    """Appends ``record`` to the metrics file as one line of strict JSON: a non-finite number
    (the loss or gradient norm of a skipped step) is written as null, which every JSON reader
    takes (Python's default NaN/Infinity tokens stop jq, JavaScript and most others); the
    record's ``skipped`` / ``overflow`` flags say why it is missing."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   sharded_scaler: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm
    weights): fusedlm's with ``kernels="fused"``; with ``kernels="torch"`` torch's own
    (``fused=True`` where every parameter is on a CUDA device, else its default), so a "torch"
    run is plain PyTorch throughout and compares against a "fused" one step for step. Both
    keep the same state_dict format: a checkpoint resumes under either.

    ``sharded_scaler``: the run's loss scaler is FSDP2's ShardedGradScaler, whose ``found_inf``
    has shape (1,); torch's fused AdamW subtracts it from its 0-dim step counts and raises a
    broadcast error (seen on torch 2.13; tests/train/test_trainer.py shows it), so that run
    gets torch's default AdamW instead (the scaler then unscales and skips on its own)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    if cfg.kernels == "torch":
        on_cuda = all(p.device.type == "cuda" for group in groups for p in group["params"])
        fused = on_cuda and not sharded_scaler
        return torch.optim.AdamW(groups, **hyper, **({"fused": True} if fused else {}))
    # fused=True keeps the step counts on the parameters' device (torch's fused layout), so a
    # step skipped on the device (Precision.step's found_inf) is never read on the host.
    return AdamW(groups, **hyper, fused=True)


def _with_tied(weights: dict, model: GPT) -> dict:
    """Adds the tensors ``weights_for_saving`` left out because they are tied."""
    weights = dict(weights)
    if model.config.tie_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["wte.weight"]
    return weights


# GPTConfig fields that loaded weights fix, and those a fine-tuning run may still set.
_FREE_FIELDS = ("dropout", "norm_eps", "rope_theta")
_SHAPE_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - set(_FREE_FIELDS)


def load_pretrained(path: str, kernels: str = "fused", overrides: dict | None = None) -> GPT:
    """A GPT from a fusedlm checkpoint (a step directory or a run directory) or a local Hugging
    Face GPT-2 directory."""
    from ..models.hf import is_hf_gpt2_dir

    overrides = overrides or {}
    fixed = sorted(set(overrides) & _SHAPE_FIELDS)
    if fixed:
        raise ConfigError(f"'model' settings {', '.join(fixed)} would change the shape of the "
                          f"weights loaded from {path}; only {', '.join(_FREE_FIELDS)} may change")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or model directory")
    if is_hf_gpt2_dir(path):
        return GPT.from_hf(path, kernels=kernels, **overrides)
    state = ckpt.load_checkpoint(path)
    config = GPTConfig.from_dict({**state["config"]["model"], **overrides})
    model = GPT(config, kernels=kernels)
    model.load_state_dict(_with_tied(state["model"], model), strict=True)
    return model


def _truncate_metrics(path: str, step: int) -> None:
    """Drops the records a killed run wrote after the checkpoint it resumes from."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by the kill: everything after it is gone too
    with open(path, "w") as f:
        f.writelines(kept)


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))
