"""End to end on the CPU: greedy generation with a randomly initialised Hugging Face Llama (GQA),
unpatched against patched by fusedlm.integrations.transformers.apply, same tokens checked.

    python benchmarks/hf_generate_cpu.py [--threads N] [--prompt 3000] [--new 64]

The model (hidden 1024, 4 layers, 16 query / 2 kv heads) is built from a config: no download.
Best of two timed runs each, after a short warm-up generation.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusedlm.integrations import transformers as fused_hf


def _generate_s(model, prompt: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        best, tokens = float("inf"), None
        for _ in range(2):
            start = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            best = min(best, time.perf_counter() - start)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=3000, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048,
                         num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2,
                         max_position_embeddings=args.prompt + args.new + 8)
    unpatched = LlamaForCausalLM(config).eval()
    patched = copy.deepcopy(unpatched)
    fused_hf.apply(patched)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt))
    fused_hf.reset_attention_calls()
    base_s, base_tokens = _generate_s(unpatched, prompt, args.new)
    ours_s, our_tokens = _generate_s(patched, prompt, args.new)
    print(f"{args.threads} thread(s), prompt {args.prompt}, {args.new} new tokens: "
          f"unpatched {base_s:.3f} s, patched {ours_s:.3f} s "
          f"({base_s / ours_s:.2f}x), same tokens: {torch.equal(base_tokens, our_tokens)}")
    print("attention calls:", dict(fused_hf.attention_calls()))


if __name__ == "__main__":
    main()
