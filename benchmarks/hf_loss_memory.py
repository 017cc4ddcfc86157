"""Peak memory and time of a Hugging Face causal LM's training step (forward + backward of the
loss) on the CPU, by how the loss is computed:

- ``transformers``: ``model(**batch, labels=labels).loss``, transformers' own ``ForCausalLMLoss``
  (the (B, T, V) logits, then their float32 copy and its log-softmax);
- ``apply``: the same call after ``fused_hf.apply(model, attention=False, norms=False,
  mlp=False)``, whose ``causal_lm_loss`` reads the logits as they are (no float32 copy);
- ``linear_causal_lm_loss``: ``fused_hf.linear_causal_lm_loss(model, labels, **batch)``, the
  head fused into the loss (no (B, T, V) logits at all).

A random-init Llama (no download) whose head dominates memory: by default 2 layers of width
256 and Llama 3's vocabulary of 128256, 2 x 1024 tokens. Memory is the peak resident set of a
fresh process during one step, less its resident set just before (after one warm-up step), as
in ``linear_cross_entropy_memory.py``; each provider runs in its own process.

    python benchmarks/hf_loss_memory.py
    python benchmarks/hf_loss_memory.py --vocab 32000 --dtype bfloat16
    python benchmarks/hf_loss_memory.py --chunk-size 256   # linear_causal_lm_loss's rows/chunk
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from linear_cross_entropy_memory import peak_and_time

PROVIDERS = ("transformers", "apply", "linear_causal_lm_loss")


def measure(provider: str, batch: int, tokens: int, hidden: int, vocab: int, layers: int,
            dtype: str, repeats: int, chunk_size: int) -> dict:
    """One provider in this process: peak resident-set growth (bytes) of one training step,
    the median time of ``repeats`` more, and the loss."""
    import torch
    import transformers

    from fusedlm.integrations import transformers as fused_hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
        max_position_embeddings=tokens)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).train()
    if provider == "apply":
        fused_hf.apply(model, attention=False, norms=False, mlp=False)
    ids = torch.randint(0, vocab, (batch, tokens))

    def step():
        if provider == "linear_causal_lm_loss":
            loss = fused_hf.linear_causal_lm_loss(model, ids, input_ids=ids,
                                                  chunk_size=chunk_size or None)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    peak_bytes, seconds, loss = peak_and_time(step, repeats)
    return {"provider": provider, "peak_bytes": peak_bytes, "seconds": seconds, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="linear_causal_lm_loss's rows per chunk (default: its own choice)")
    parser.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = ["--batch", str(args.batch), "--tokens", str(args.tokens), "--hidden",
             str(args.hidden), "--vocab", str(args.vocab), "--layers", str(args.layers),
             "--dtype", args.dtype, "--repeats", str(args.repeats), "--chunk-size",
             str(args.chunk_size)]
    if args.provider:  # the child process
        print(json.dumps(measure(args.provider, args.batch, args.tokens, args.hidden,
                                 args.vocab, args.layers, args.dtype, args.repeats,
                                 args.chunk_size)))
        return
    logits_mb = args.batch * args.tokens * args.vocab * 4 / 1e6
    print(f"Llama, {args.layers} layers, C={args.hidden}, V={args.vocab}, {args.dtype}, "
          f"B={args.batch} x T={args.tokens}; one (B, T, V) float32 tensor is {logits_mb:.0f} MB; "
          f"chunk_size {args.chunk_size or 'default'}")
    print(f"{'loss':24} {'peak MB':>9} {'x logits':>9} {'step s':>8} {'loss':>10}")
    for provider in PROVIDERS:
        out = subprocess.run([sys.executable, __file__, "--provider", provider, *sizes],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        peak_mb = row["peak_bytes"] / 1e6
        print(f"{provider:24} {peak_mb:9.0f} {peak_mb / logits_mb:9.2f} {row['seconds']:8.2f} "
              f"{row['loss']:10.6f}")


if __name__ == "__main__":
    main()
