"""Timing for the CPU comparison scripts in benchmarks/: interleaved rounds, best of each.

On a shared 2-core machine a case's time moves between runs; running every compared call once
per round, round after round, exposes them to the same noise, and the best of the rounds is the
least disturbed run of each (see NOTES.md)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def forward_and_backward(providers: dict[str, Callable[[], torch.Tensor]]) -> dict[str, Callable]:
    """For each ``name: fn`` (fn returns the output): "fwd     name", fn under no_grad, and
    "fwd+bwd name", fn().sum().backward()."""
    calls = {}
    for name, fn in providers.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def forward_backward(fn=fn):
            fn().sum().backward()

        calls[f"fwd     {name}"] = forward
        calls[f"fwd+bwd {name}"] = forward_backward
    return calls


def best_of(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Seconds: each call once to warm up, then ``reps`` rounds of every call in turn; the
    best round of each."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, math.inf)
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
