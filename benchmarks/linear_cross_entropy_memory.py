"""Peak memory and time of a language model's head + loss, forward and backward, on the CPU:
eager PyTorch (``F.cross_entropy(F.linear(x, w).float(), t)``), the logits fed to
``fusedlm.cross_entropy``, and ``fusedlm.linear_cross_entropy`` (row chunks, no logits).

Memory is the peak resident set of a fresh process during one forward+backward, less its
resident set just before (the inputs made and one warm-up call done): Linux's VmHWM, reset
through /proc/self/clear_refs. glibc returns large freed blocks to the system at once, so the
resident set follows the live tensors closely. Each provider runs in its own process.

    python benchmarks/linear_cross_entropy_memory.py                 # GPT-2 head, 4096 tokens
    python benchmarks/linear_cross_entropy_memory.py --tokens 2048 --vocab 128256 --hidden 1024
    python benchmarks/linear_cross_entropy_memory.py --chunk-size 1024   # rows per chunk
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROVIDERS = ("eager", "fusedlm.cross_entropy", "fusedlm.linear_cross_entropy")


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(provider: str, tokens: int, hidden: int, vocab: int, repeats: int,
            chunk_size: int) -> dict:
    """One provider in this process: peak resident-set growth (bytes) of one forward+backward,
    and the median time of ``repeats`` more."""
    import torch
    import torch.nn.functional as F

    import fusedlm

    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden ** 0.5).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,))

    def step():
        if provider == "eager":
            loss = F.cross_entropy(F.linear(x, w).float(), t)
        elif provider == "fusedlm.cross_entropy":
            loss = fusedlm.cross_entropy(F.linear(x, w), t)
        else:
            loss = fusedlm.linear_cross_entropy(x, w, t, chunk_size=chunk_size or None)
        loss.backward()
        x.grad = w.grad = None
        return loss

    peak_bytes, seconds, _ = peak_and_time(step, repeats)
    return {"provider": provider, "peak_bytes": peak_bytes, "seconds": seconds}


def peak_and_time(step, repeats: int) -> tuple[int, float, object]:
    """(peak resident-set growth in bytes during one ``step()`` after a warm-up one, the median
    seconds of ``repeats`` more, what the measured step returned)."""
    step()  # warm-up: one-time allocations (thread pools, the extension) are not the op's
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    before = _resident_kib("VmRSS")
    result = step()
    peak = _resident_kib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return (peak - before) * 1024, statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="linear_cross_entropy's rows per chunk (default: its own choice)")
    parser.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [str(args.tokens), str(args.hidden), str(args.vocab), str(args.repeats),
             str(args.chunk_size)]
    if args.provider:  # the child process
        print(json.dumps(measure(args.provider, *map(int, sizes))))
        return
    logits_mb = args.tokens * args.vocab * 4 / 1e6
    print(f"N={args.tokens} C={args.hidden} V={args.vocab} float32; one (N, V) float32 tensor "
          f"is {logits_mb:.0f} MB; linear_cross_entropy chunk_size "
          f"{args.chunk_size or 'default'}")
    print(f"{'provider':32} {'peak MB':>9} {'x logits':>9} {'fwd+bwd s':>10}")
    for provider in PROVIDERS:
        out = subprocess.run(
            [sys.executable, __file__, "--provider", provider, "--tokens", sizes[0], "--hidden",
             sizes[1], "--vocab", sizes[2], "--repeats", sizes[3], "--chunk-size", sizes[4]],
            check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        peak_mb = row["peak_bytes"] / 1e6
        print(f"{provider:32} {peak_mb:9.0f} {peak_mb / logits_mb:9.2f} {row['seconds']:10.2f}")


if __name__ == "__main__":
    main()
