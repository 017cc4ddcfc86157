"""Time and saved-activation size of one mixture-of-experts experts module, forward + backward,
on the CPU: transformers' own (``grouped_mm``, its gate ``F.silu(gate) * up``) against the same
module after ``fusedlm.patch(model, mlp=True)`` (its gate on ``fusedlm.swiglu``).

A Qwen3-MoE experts module from a random config (no download): by default 8 experts of
intermediate size 768, top-2 routing, hidden size 512, 2048 tokens (S = 4096 routed rows).
"Saved" is the bytes autograd keeps for the backward (``saved_tensors_hooks``), the memory
a training step holds per layer until its backward.

    python benchmarks/moe_experts_cpu.py
    python benchmarks/moe_experts_cpu.py --tokens 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import fusedlm


def run(experts, hidden, index, weights, repeats: int) -> tuple[float, int]:
    """(median seconds of forward + backward, bytes saved for the backward)."""
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()  # distinct saved tensors, by identity
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts(hidden, index, weights).sum().backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        experts(hidden, index, weights).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
        num_experts=args.experts, num_experts_per_tok=args.top_k, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4)
    model = transformers.Qwen3MoeForCausalLM(config).to(getattr(torch, args.dtype))
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, args.hidden ** -0.5)
    hidden = torch.randn(args.tokens, args.hidden, dtype=experts.gate_up_proj.dtype,
                         requires_grad=True)
    index = torch.stack([torch.randperm(args.experts)[:args.top_k] for _ in range(args.tokens)])
    weights = torch.softmax(torch.randn(args.tokens, args.top_k), -1).to(hidden.dtype)
    print(f"Qwen3-MoE experts: {args.experts} x ({args.hidden} -> 2 x {args.intermediate} -> "
          f"{args.hidden}), top-{args.top_k}, {args.tokens} tokens, {args.dtype}, "
          f"{config._experts_implementation}")
    print(f"{'gate':26} {'fwd+bwd ms':>11} {'saved MB':>9}")
    for label in ("transformers (F.silu * up)", "fusedlm.swiglu"):
        if label == "fusedlm.swiglu":
            report = fusedlm.patch(model, mlp=True)
            assert any(s.name.endswith("experts") for s in report.swapped), report
        seconds, saved = run(experts, hidden, index, weights, args.repeats)
        print(f"{label:26} {seconds * 1e3:11.1f} {saved / 1e6:9.1f}")


if __name__ == "__main__":
    main()
