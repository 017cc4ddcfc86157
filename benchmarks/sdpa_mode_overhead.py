"""Host time that ``fusedlm.patch(model, attention=True)`` adds to a model's step, on the CPU.

The model is fusedlm's GPT built with ``kernels="torch"`` (torch's LayerNorm and
``F.scaled_dot_product_attention``, as any nanoGPT-style model), small enough that the time is
mostly per-call host work. Contenders, interleaved, best of 5 rounds:

- ``plain``: the model as is;
- ``null mode``: the same inside a ``TorchFunctionMode`` that passes every call through (the
  price of any function mode: one Python handler per torch call);
- ``patch(attention=True)``: norms swapped and SDPA routed to fusedlm (hooks + mode);
- ``patch(attention=False)``: norms swapped only;
- ``kernels="fused"``: the model built on fusedlm's modules (no mode).

    python benchmarks/sdpa_mode_overhead.py [--layers 4] [--batch 2] [--seq 16]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.overrides import TorchFunctionMode

import fusedlm
from fusedlm.models.gpt import GPT, GPTConfig


class PassThroughMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", n_layer=args.layers)
    plain = GPT(config, kernels="torch")
    routed, norms_only = copy.deepcopy(plain), copy.deepcopy(plain)
    fusedlm.patch(routed, attention=True)
    fusedlm.patch(norms_only)
    fused = GPT(config, kernels="fused")
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    def forward(model, mode=None):
        def run():
            if mode is None:
                return _logits(model(idx))
            with mode():
                return _logits(model(idx))
        return run

    def step(model, mode=None):
        fwd = forward(model, mode)

        def run():
            fwd().sum().backward()
        return run

    contenders = {
        "plain": (plain, None),
        "null mode": (plain, PassThroughMode),
        "patch(attention=True)": (routed, None),
        "patch(attention=False)": (norms_only, None),
        'kernels="fused"': (fused, None),
    }
    for label, make, grad in (("forward, no grad", forward, False), ("fwd+bwd", step, True)):
        best = dict.fromkeys(contenders, float("inf"))
        for _ in range(5):
            for name, (model, mode) in contenders.items():
                run = make(model, mode)
                with torch.set_grad_enabled(grad):
                    run()  # warm-up
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        run()
                    best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
        print(f"{label} (GPT tiny, {args.layers} layers, B={args.batch}, T={args.seq}):")
        for name, seconds in best.items():
            print(f"  {name:24s} {seconds * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
