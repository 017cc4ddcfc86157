"""``fusedlm train``, ``fusedlm sample`` and ``fusedlm prepare``. Errors a user can fix (a bad
flag, a missing file, a short shard, a corrupt checkpoint) print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

EPILOG_TRAIN = """\
With no --data, trains the 'tiny' preset on an embedded default corpus (the running Python's
standard-library sources, prepared once and cached) - a few minutes on a CPU - or a bigger
preset on a GPU. Settings: defaults < TOML config file < flags. Under torchrun every process
takes its slice of each global batch (DDP).
examples:
  fusedlm train
  fusedlm train --data shards/ --preset gpt2-124m --batch-size 16 --grad-accum 32 --out runs/124m
  fusedlm train --out runs/124m --resume
  torchrun --nproc_per_node 8 -m fusedlm.cli train config.toml
"""


def _user_errors():
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .trainer import TrainingDiverged

    return (ConfigError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError)


def _fail(command: str, error: Exception) -> int:
    print(f"fusedlm {command}: error: {error}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from ..backends import BackendNotSupportedError

    try:
        from .config import make_config

        flags = {k: getattr(args, k) for k in (
            "out", "data", "val_data", "preset", "kernels", "device", "task", "init_from",
            "seed", "batch_size", "grad_accum", "max_steps", "lr", "warmup_steps", "schedule",
            "eval_every", "ckpt_every", "sample_every", "compile", "activation_checkpointing",
            "fsdp", "nan_policy", "document_separator", "reset_positions", "z_loss",
            "precision")}
        flags["resume"] = args.resume or None
        if args.model:
            flags["model"] = json.loads(args.model)
        cfg = make_config(args.config, **flags)
        if cfg.task == "classify":
            from .classify import train_classifier

            train_classifier(cfg)
            return 0
        return _train_lm(cfg)
    except json.JSONDecodeError as e:
        return _fail("train", f"--model must be a JSON object of GPTConfig fields: {e}")
    except (*_user_errors(), BackendNotSupportedError) as e:
        return _fail("train", e)
    except KeyboardInterrupt:
        print("\nfusedlm train: interrupted (the last checkpoint is intact; --resume continues)",
              file=sys.stderr)
        return 130


def _train_lm(cfg) -> int:
    from .trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
        if trainer.is_main:
            first, last = summary.get("first_val_loss"), summary.get("val_loss")
            print(f"done: {trainer.step} steps, train loss {summary.get('loss', math.nan):.4f}"
                  + (f", val loss {first:.4f} -> {last:.4f}" if first and last else "")
                  + (f" (ln(vocab) = {math.log(trainer.tokenizer.vocab_size):.2f})"
                     if trainer.tokenizer.vocab_size else ""))
            print(f"metrics: {os.path.join(cfg.out, 'metrics.jsonl')}; checkpoints: "
                  f"{os.path.join(cfg.out, 'checkpoints')}")
            if not cfg.fsdp:
                print(f"sample:\n{trainer.sample()}")
    finally:
        trainer.close()
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .prepare import checkpoint_tokenizer, load_tokenizer
    from .trainer import load_pretrained

    try:
        device = torch.device(args.device if args.device != "auto"
                              else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return _fail("sample", ValueError(f"--device must be auto, cpu, cuda or cuda:N, got "
                                          f"{args.device!r}"))
    try:
        model = load_pretrained(args.checkpoint, args.kernels)
        tokenizer = load_tokenizer(args.tokenizer or checkpoint_tokenizer(args.checkpoint))
    except (*_user_errors(), ValueError) as e:
        return _fail("sample", e)
    model.to(device)
    ids = torch.as_tensor(tokenizer.encode(args.prompt).astype("int64"), device=device)[None]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for _ in range(args.num_samples):
        try:
            out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, generator=generator)
        except (ValueError, FloatingPointError) as e:  # bad temperature / top_k, NaN weights
            return _fail("sample", e)
        print(tokenizer.decode(out[0].tolist()))
        print("-" * 40)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    try:
        prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.shard_tokens,
                args.format)
    except (*_user_errors(), ValueError) as e:
        return _fail("prepare", e)
    return 0


def add_commands(commands) -> None:
    """Adds train, sample and prepare to the ``fusedlm`` subparsers."""
    train = commands.add_parser(
        "train", help="pretrain or fine-tune a GPT (embedded default data when no --data)",
        epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="TOML file of settings (flags override it)")
    train.add_argument("--out", help="run directory: metrics.jsonl, checkpoints/ (default: out)")
    train.add_argument("--data", help="token shards: a directory of *train*/*val* .bin, a file "
                       "or a glob (classify: a CSV/JSONL of text,label)")
    train.add_argument("--val-data", help="classify: validation CSV/JSONL (default: 10%% split)")
    train.add_argument("--preset", help="model shape: tiny, small, gpt2-124m, gpt2-350m, "
                       "gpt2-774m, gpt2-1.5b, llama-tiny")
    train.add_argument("--model", help='GPTConfig overrides as JSON, e.g. \'{"n_layer": 6}\'')
    train.add_argument("--kernels", choices=("fused", "torch"),
                       help="fused (default): fusedlm's attention, norms and AdamW; torch: "
                       "plain PyTorch layers and torch.optim.AdamW, to compare against")
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    train.add_argument("--task", choices=("lm", "classify"))
    train.add_argument("--init-from", help="fusedlm checkpoint or local Hugging Face GPT-2 dir")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--seed", type=int)
    train.add_argument("--batch-size", type=int, help="rows per micro-step and process")
    train.add_argument("--grad-accum", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--schedule", choices=("cosine", "wsd", "constant"))
    train.add_argument("--z-loss", type=float, metavar="WEIGHT",
                       help="PaLM's z-loss: add WEIGHT * logsumexp(logits)^2 per token to the "
                       "training loss (1e-4 is usual; default 0: none); logged apart as z_loss")
    train.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"),
                       help="autocast dtype: bf16; fp16 with dynamic loss scaling; fp32 (none); "
                       "auto (default): bf16 on GPUs that run it natively, fp16 on older ones, "
                       "fp32 on CPU")
    train.add_argument("--eval-every", type=int)
    train.add_argument("--ckpt-every", type=int)
    train.add_argument("--sample-every", type=int)
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile")
    train.add_argument("--activation-checkpointing", action="store_true", default=None)
    train.add_argument("--fsdp", action="store_true", default=None,
                       help="under torchrun: FSDP2 (torch's fully_shard, per transformer block "
                       "and the root) instead of DDP; checkpoints hold the full weights and "
                       "optimizer state; no samples during training")
    train.add_argument("--nan-policy", choices=("skip", "stop"))
    train.add_argument("--document-separator", type=int, metavar="TOKEN_ID",
                       help="the token that opens each packed document (50256 for GPT-2's "
                       "<|endoftext|>): attention stays within documents")
    train.add_argument("--reset-positions", action="store_true", default=None,
                       help="with --document-separator: positions restart at 0 in each "
                       "document, so each trains exactly as it would alone")
    train.set_defaults(run=_train)

    sample = commands.add_parser("sample", help="generate text from a checkpoint or HF GPT-2 dir")
    sample.add_argument("checkpoint", help="run dir, checkpoint dir or Hugging Face GPT-2 dir")
    sample.add_argument("--prompt", default="def ")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=40)
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--tokenizer", help="byte or a tokenizer.json (default: the run's)")
    sample.add_argument("--kernels", choices=("fused", "torch"), default="fused")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(run=_sample)

    prep = commands.add_parser("prepare", help="text files/folders -> token shards")
    prep.add_argument("inputs", nargs="+", help="text files or folders")
    prep.add_argument("--out", required=True, help="output directory for the shards")
    prep.add_argument("--tokenizer", default="byte", help="byte (default) or a tokenizer.json")
    prep.add_argument("--val-fraction", type=float, default=0.05)
    prep.add_argument("--shard-tokens", type=int, default=100_000_000)
    prep.add_argument("--format", choices=("llmc", "nanogpt"), default="llmc")
    prep.set_defaults(run=_prepare)
