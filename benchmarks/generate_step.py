"""Time of one KV-cache decoding step of ``fusedlm.models.GPT`` at a given cache length, on the
CPU (or a GPU with --device cuda): prefill ``--context`` tokens, then time ``--steps`` steps of
one token each (median per step). What a step costs beyond the model's matmuls is the cache:
how it stores the past and what attention reads.

    python benchmarks/generate_step.py --preset gpt2-124m --context 1000 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusedlm.models import GPT, GPTConfig, KVCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kernels", default="fused", choices=("fused", "torch"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig.preset(args.preset)
    if args.context + args.steps > config.block_size:
        raise SystemExit(f"--context + --steps must fit block_size {config.block_size}")
    torch.manual_seed(0)
    model = GPT(config, kernels=args.kernels).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.context), device=args.device)
    times = []
    with torch.no_grad():
        cache = KVCache(config.n_layer, capacity=config.block_size)
        model(prompt, cache=cache)
        token = prompt[:, -1:]
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            model(token, cache=cache)
            sync()
            times.append(time.perf_counter() - start)
    print(f"{args.preset} B={args.batch} context={args.context} kernels={args.kernels} "
          f"device={args.device}: {statistics.median(times) * 1e3:.2f} ms per step "
          f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f}, {args.steps} steps)")


if __name__ == "__main__":
    main()
