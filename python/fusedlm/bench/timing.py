"""Timing: CUDA events on a GPU, a monotonic clock (``time.perf_counter``) on the CPU.

:func:`measure` takes one zero-argument callable per input set and calls them in rotation, so
that consecutive calls read different memory and a cache (the GPU's L2, the CPU's last level)
does not flatter small cases. Each call is timed on its own; the result holds the median and
the 20th and 80th percentiles of those times, in milliseconds.

The first call of each set is untimed (compilation, autotuning, lazy initialisation), a few
calls give an estimate of one call's time, then calls run for about ``warmup_ms`` untimed, then
for about ``rep_ms`` timed (at least ``min_reps`` and at most ``max_reps`` calls).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int  # timed calls
    input_sets: int  # callables rotated through
    clock: str  # "cuda-events" or "perf_counter"

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], input_sets: int, clock: str) -> Timing:
    return Timing(
        median_ms=quantile(times_ms, 0.5), p20_ms=quantile(times_ms, 0.2),
        p80_ms=quantile(times_ms, 0.8), reps=len(times_ms), input_sets=input_sets, clock=clock,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls_cpu(calls: Sequence[Callable[[], object]], n: int, start: int,
                   max_wall_ms: float, min_reps: int) -> list[float]:
    times = []
    began = time.perf_counter()
    for i in range(n):
        fn = calls[(start + i) % len(calls)]
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if i + 1 >= min_reps and (t1 - began) * 1e3 > max_wall_ms:
            break
    return times


def _time_calls_cuda(calls: Sequence[Callable[[], object]], n: int, start: int,
                     device: torch.device, max_wall_ms: float, min_reps: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    done = n
    for i in range(n):
        fn = calls[(start + i) % len(calls)]
        starts[i].record()
        fn()
        ends[i].record()
        # The host runs ahead of the GPU, so this only stops a run whose launches alone are
        # slow (a stalled host); the GPU time of the calls enqueued is still what is measured.
        if i + 1 >= min_reps and (time.perf_counter() - began) * 1e3 > max_wall_ms:
            done = i + 1
            break
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts[:done], ends[:done], strict=True)]


def measure(
    calls: Sequence[Callable[[], object]],
    device: torch.device | str,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> Timing:
    """Times ``calls`` (one per input set, called in rotation); see the module docstring.
    Each phase also stops on the wall clock (after ``min_reps`` calls) once it has run for
    three times its budget, so a machine that stalls the process cannot stretch a row."""
    if not calls:
        raise ValueError("measure() needs at least one callable")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def timer(n: int, start: int, budget_ms: float, at_least: int) -> list[float]:
        cap = 3 * budget_ms
        if device.type == "cuda":
            return _time_calls_cuda(calls, n, start, device, cap, at_least)
        return _time_calls_cpu(calls, n, start, cap, at_least)

    # Every set once, untimed: compilation and autotuning happen on the first, and a provider
    # may set up per set on its first call (an optimizer allocates and zero-fills its state on
    # its first step), which the timed calls must not include.
    for call in calls:
        call()
    _synchronize(device)
    n_est = min(len(calls), 2)
    estimate = timer(n_est, 0, math.inf, n_est)  # one call each of the first two sets
    per_call = max(sum(estimate) / len(estimate), 1e-4)
    n_warm = int(min(max(warmup_ms / per_call, 1), 10 * max_reps))
    timer(n_warm, len(estimate), warmup_ms, 1)
    n_rep = int(min(max(rep_ms / per_call, min_reps), max_reps))
    times = timer(n_rep, (len(estimate) + n_warm) % len(calls), rep_ms, min_reps)
    return summarize(times, len(calls), "cuda-events" if device.type == "cuda" else "perf_counter")


def input_sets_for(bytes_per_set: int, cache_bytes: int, memory_budget: int,
                   max_sets: int = 32) -> int:
    """How many input sets to rotate through so that together they are at least 3x the cache
    (each call then starts with its inputs out of cache), within ``memory_budget`` bytes."""
    if bytes_per_set <= 0:
        return 1
    wanted = math.ceil(3 * cache_bytes / bytes_per_set)
    affordable = max(memory_budget // bytes_per_set, 1)
    return int(max(1, min(wanted, affordable, max_sets)))
