"""Runs the benchmark: ceilings, then every case of every op for every provider that can run
here; returns the results as one JSON-ready dict (see fusedlm.bench.schema)."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import cases as C
from .ceilings import measure_ceilings
from .env import _load_average, code_stamp, environment, llc_bytes
from .timing import input_sets_for, measure

SCHEMA = "fusedlm.bench/1"
UNITS = {
    "time_ms": "milliseconds per call (median, p20, p80 of the timed calls)",
    "tflops": "1e12 floating-point operations per second (counted FLOPs / median time)",
    "gbps": "1e9 bytes per second (the fewest bytes the op must move / median time)",
    "value": "the op's metric (its 'metric' field: TFLOP/s or GB/s) at the median time",
    "pct_of_ceiling": "value as a percent of the measured ceiling named by the op's 'ceiling'",
    "ratio_to_eager": "median time of the torch-eager row of the same op, variant and size "
                      "divided by this row's median time (>1: faster than eager PyTorch)",
    "tokens_per_s": "training tokens per second (gpt)",
    "rel_err_vs_eager": "||out - eager|| / ||eager|| of the forward output on one input set "
                        "(several outputs, e.g. rotary_embedding's q and k, taken together)",
    "x": "the op's x_name (plot abscissa)",
    "peak_memory_bytes": "bytes: the most GPU memory one call held at once beyond what was "
                         "allocated before it (the inputs), torch.cuda.max_memory_allocated; "
                         "GPU rows of the ops that record it (linear_cross_entropy)",
}
STATUSES = ("ok", "error", "unsupported", "skipped")


@dataclass
class Options:
    ops: tuple[str, ...] = C.OPS
    quick: bool = False
    device: str = "auto"  # auto | cpu | cuda
    providers: tuple[str, ...] | None = None  # only these (the baseline always runs)
    compile: str = "auto"  # auto | on | off
    warmup_ms: float | None = None
    rep_ms: float | None = None
    budget_s: float | None = None  # whole run; rows past it are recorded as skipped
    threads: int | None = None  # torch.set_num_threads (CPU); None: torch's default
    ceilings: dict | None = None  # reuse these instead of measuring
    argv: list[str] = field(default_factory=list)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    # Called with the results so far after every case (e.g. to write a partial bench.json, so
    # a run killed by a hang still leaves what it measured).
    progress: Callable[[dict], None] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedlm bench: --device cuda, but no CUDA GPU was found "
                         "(torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"fusedlm bench: --device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _timing_defaults(device: torch.device, quick: bool) -> tuple[float, float]:
    if device.type == "cuda":
        return (10.0, 40.0) if quick else (25.0, 100.0)
    return (5.0, 40.0) if quick else (10.0, 150.0)


def _tensor_bytes(inputs: dict) -> int:
    total = 0
    for value in inputs.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for t in items:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                if t.grad is not None:
                    total += t.grad.numel() * t.grad.element_size()
    return total


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}"[:limit]


def _context_broken(error: BaseException) -> bool:
    text = str(error)
    # (torch's "CUDA error: ..." and Triton's "Triton Error [CUDA]: ..." wordings alike)
    return any(s in text for s in ("illegal memory access", "device-side assert",
                                   "unspecified launch failure", "misaligned address",
                                   "an illegal instruction"))


def _free(device: torch.device) -> None:
    """Returns a finished case's memory (after each case, and after a failed row). The
    collection only walks what was made since ``run`` froze the objects that existed before
    it (``gc.freeze``): a full walk of torch's, matplotlib's and the models' objects took
    0.2 s per case on CI's CPU, a quarter of a quick run."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a broken CUDA context is reported by the rows
            pass


def _peak_memory_bytes(call: Callable[[], object], inputs: dict, device: torch.device) -> int:
    """The most GPU memory one ``call()`` on ``inputs`` holds at once beyond what was allocated
    before it (the input sets): its intermediates, output and gradients. The gradients the
    timed calls left on ``inputs`` are dropped first, so that the call's own are counted (a
    forward+backward pass drops them itself before it makes new ones)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _rel_err(out, ref) -> float | None:
    """||out - ref|| / ||ref||; a tuple of outputs (rotary_embedding's q and k) as one vector."""
    if isinstance(out, tuple) and isinstance(ref, tuple) and len(out) == len(ref) and all(
            isinstance(t, torch.Tensor) and isinstance(r, torch.Tensor) and t.shape == r.shape
            for t, r in zip(out, ref, strict=True)):
        out = torch.cat([t.detach().reshape(-1).double() for t in out])
        ref = torch.cat([r.detach().reshape(-1).double() for r in ref])
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return None
    ref64 = ref.detach().double()
    denom = ref64.norm().item()
    diff = (out.detach().double() - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def _copy_inputs(inputs: dict) -> dict:
    """A copy of an input set's tensors (strides and requires_grad kept), for a provider that
    writes over its inputs; anything else (nested dicts, tuples of gradients) is shared."""
    return {name: value.detach().clone().requires_grad_(value.requires_grad)
            if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_eager of every measured row: the torch-eager row's median time for the same
    (op, variant, size_label) over this row's median time; None without a measured eager row."""
    eager = {(r["op"], r["variant"], r["size_label"]): r["time_ms"]["median"]
             for r in rows if r["provider"] == C.BASELINE and r["status"] == "ok"}
    for r in rows:
        base = eager.get((r["op"], r["variant"], r["size_label"]))
        r["ratio_to_eager"] = (base / r["time_ms"]["median"]
                               if r["status"] == "ok" and base is not None else None)


def _row(case: C.Case, provider: str, status: str, reason: str | None = None) -> dict:
    row = {
        "op": case.op, "variant": case.variant, "pass": case.pass_, "dtype": case.dtype,
        "size_label": case.size_label, "size": case.size, "x": case.x,
        "provider": provider, "status": status, "reason": reason,
        "time_ms": None, "reps": None, "input_sets": None, "clock": None,
        "flops": case.flops, "bytes": case.bytes, "tflops": None, "gbps": None,
        "value": None, "pct_of_ceiling": None, "ratio_to_eager": None,
        "rel_err_vs_eager": None,
    }
    if case.causal is not None:
        row["causal"] = case.causal
    if case.tokens is not None:
        row["tokens"] = case.tokens
        row["tokens_per_s"] = None
    return row


def _fill_measurement(row: dict, timing, spec: C.OpSpec, ceilings: dict) -> None:
    seconds = timing.median_ms * 1e-3
    row.update(status="ok", time_ms={"median": timing.median_ms, "p20": timing.p20_ms,
                                     "p80": timing.p80_ms},
               reps=timing.reps, input_sets=timing.input_sets, clock=timing.clock)
    if row["flops"] is not None:
        row["tflops"] = row["flops"] / seconds / 1e12
    if row["bytes"] is not None:
        row["gbps"] = row["bytes"] / seconds / 1e9
    row["value"] = row["tflops"] if spec.metric == "TFLOP/s" else row["gbps"]
    ceiling = ceilings.get(spec.ceiling, {}).get("value")
    if row["value"] is not None and ceiling:
        row["pct_of_ceiling"] = 100.0 * row["value"] / ceiling
    if "tokens" in row:
        row["tokens_per_s"] = row["tokens"] / seconds


def run(opts: Options) -> dict:
    """Every asked-for case of every asked-for op, measured per provider: the results dict
    of ``schema`` (rows, ratios, ceilings, environment)."""
    gc.freeze()  # (see _free)
    try:
        return _run(opts)
    finally:
        gc.unfreeze()


def _run(opts: Options) -> dict:
    started = time.monotonic()
    deadline = started + opts.budget_s if opts.budget_s else None
    log = opts.log
    device = resolve_device(opts.device)
    if opts.threads is not None:
        torch.set_num_threads(max(1, opts.threads))
    if device.type == "cuda":
        # (TF32 stays at torch's defaults: what an eager user gets, e.g. sdpa-math's float32
        # matmuls in full float32)
        torch.cuda.set_device(device.index or 0)
    gpu_note = None
    if not torch.cuda.is_available():
        gpu_note = ("No CUDA GPU found (torch.cuda.is_available() is False): benchmarking the "
                    "CPU backends against eager PyTorch.")
        log(gpu_note)
    elif device.type == "cpu":
        gpu_note = "A CUDA GPU is present but --device cpu was asked for."
        log(gpu_note)

    warmup_default, rep_default = _timing_defaults(device, opts.quick)
    warmup_ms = warmup_default if opts.warmup_ms is None else opts.warmup_ms
    rep_ms = rep_default if opts.rep_ms is None else opts.rep_ms
    min_reps = 3 if opts.quick else 5

    compile_on = {"on": True, "off": False}.get(opts.compile,
                                                not (opts.quick and device.type == "cpu"))
    compile_note = None
    if not compile_on:
        compile_note = ("torch.compile left out: --quick on a CPU (each compile takes seconds "
                        "on a CPU; pass --compile on to include it)" if opts.compile == "auto"
                        else "torch.compile left out (--compile off)")
        log(compile_note)

    import fusedlm

    ctx = C.Context(device=device, quick=opts.quick, compile=compile_on,
                    compile_note=compile_note, backends=dict(fusedlm.backends()))
    env = environment(device)
    load, cores = env.get("load_average"), os.cpu_count() or 1
    if device.type == "cpu" and load and torch.get_num_threads() > 1 and load[0] >= 0.75 * cores:
        log(f"warning: the machine is busy (load average {load[0]:.1f} on {cores} cores): "
            "multi-threaded CPU kernels stall on descheduled threads; --threads 1 gives "
            "steadier numbers")
    log(f"device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda_runtime']}")

    if opts.ceilings is not None:
        ceilings = opts.ceilings
        log("ceilings: reused from an earlier run")
    else:
        log("measuring the device's ceilings (copy bandwidth, matmul throughput) ...")
        ceilings = measure_ceilings(device, quick=opts.quick)
    log(f"ceilings: {ceilings['bandwidth']['value']:.1f} GB/s copy, "
        f"{ceilings['matmul']['value']:.2f} TFLOP/s {ceilings['matmul']['dtype']} matmul")

    max_sets = 32 if device.type == "cuda" else 8
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cache_bytes = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
        memory_budget = int(torch.cuda.mem_get_info(device)[0] * 0.25)
    else:
        cache_bytes, memory_budget = llc_bytes(), 1 << 30

    all_specs = C.specs()
    unknown = [op for op in opts.ops if op not in all_specs]
    if unknown:
        raise SystemExit(f"fusedlm bench: unknown op(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(all_specs)}")
    known = {p.name for op in opts.ops for p in all_specs[op].providers}
    unknown = sorted(set(opts.providers or ()) - known)
    if unknown:  # (a typo would otherwise leave only the baseline, silently)
        raise SystemExit(f"fusedlm bench: unknown provider(s) {', '.join(unknown)} for "
                         f"{', '.join(opts.ops)}; choose from {', '.join(sorted(known))}")

    rows: list[dict] = []
    ops_out: dict = {}
    broken: str | None = None  # set when a CUDA error left the context unusable
    compile_reserve_s = 40.0 if device.type == "cuda" else 20.0

    stamp = code_stamp()
    settings = {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "min_reps": min_reps,
                "budget_s": opts.budget_s, "compile": compile_on, "compile_note": compile_note,
                "providers": list(opts.providers) if opts.providers else None,
                "cpu_threads": torch.get_num_threads(), "cache_bytes_rotated_past": cache_bytes}

    def snapshot() -> dict:
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        return {
            "schema": SCHEMA,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(opts.argv),
            "quick": opts.quick,
            "device": device.type,
            "gpu_found": torch.cuda.is_available(),
            "note": gpu_note,
            "environment": env,
            "code": stamp,
            "ceilings": ceilings,
            "settings": settings,
            "units": UNITS,
            "ops": dict(ops_out),
            "rows": list(rows),
            "summary": {"rows": len(rows), **counts, "elapsed_s": time.monotonic() - started,
                        "load_average_end": _load_average()},
        }

    def op_entry(op_started: float) -> dict:
        return {
            "description": spec.description, "metric": spec.metric, "ceiling": spec.ceiling,
            "x_name": spec.x_name, "baseline": C.BASELINE, "flops_formula": spec.flops_formula,
            "bytes_formula": spec.bytes_formula, "providers": providers_out, "notes": notes,
            "variants": list(dict.fromkeys(c.variant for c in case_list)),
            "elapsed_s": time.monotonic() - op_started,
        }

    def skip_reason(p: C.Provider, broken: str | None, op_deadline: float | None) -> str | None:
        now = time.monotonic()
        if broken is not None:
            return broken
        if op_deadline is not None and now > op_deadline:
            return "time budget (--budget-s) used up"
        if p.compiles and op_deadline is not None and op_deadline - now < compile_reserve_s:
            return (f"time budget: under {compile_reserve_s:.0f} s left for this op, not "
                    "enough to compile")
        return None

    def report_progress(op_started: float) -> None:
        if opts.progress is None:
            return
        ops_out[op] = op_entry(op_started)
        add_ratios(rows)
        opts.progress(snapshot())

    for op_index, op in enumerate(opts.ops):
        spec = all_specs[op]
        op_started = time.monotonic()
        op_deadline = None
        if deadline is not None:
            op_deadline = op_started + max(deadline - op_started, 0) / (len(opts.ops) - op_index)
        providers_out = {}
        runnable: list[C.Provider] = []
        for p in spec.providers:
            reason = p.why_not(ctx)
            if reason is None and opts.providers is not None and p.name != C.BASELINE \
                    and p.name not in opts.providers:
                reason = "not selected (--providers)"
            providers_out[p.name] = {"description": p.description, "available": reason is None,
                                     "reason": reason}
            if reason is None:
                runnable.append(p)
        notes = list(spec.notes)
        if op == "gpt" and C.gpt_unavailable() is not None:
            notes.append(f"gpt skipped: {C.gpt_unavailable()}")
            log(f"[gpt] skipped: {C.gpt_unavailable()}")
        case_list = spec.cases(ctx)
        log(f"[{op}] {len(case_list)} case(s) x {len(runnable)} provider(s): "
            f"{', '.join(p.name for p in runnable)}")

        # Two passes over the cases: every provider that needs no compiling first, then the
        # torch.compile ones with what is left of the budget (a short budget then costs
        # compile rows, not whole variants).
        eager_outs: dict[int, object] = {}
        passes = [[p for p in runnable if not p.compiles], [p for p in runnable if p.compiles]]
        work = [(i, case, group) for group in passes if group for i, case in enumerate(case_list)]
        keep_eager = bool(passes[1])

        for case_index, case, group in work:
            sets: list[dict] = []
            eager_out = eager_outs.get(case_index)
            reasons = [skip_reason(p, broken, op_deadline) for p in group]
            if all(r is not None for r in reasons):  # no inputs needed
                rows.extend(_row(case, p.name, "skipped", r) for p, r in zip(group, reasons,
                                                                              strict=True))
                continue
            try:
                if broken is None:
                    torch.manual_seed(1000 + case_index)  # the same first set in both passes
                    first = case.make_inputs()
                    limit = min(x for x in (spec.max_input_sets, max_sets) if x is not None)
                    n_sets = min(input_sets_for(_tensor_bytes(first), cache_bytes, memory_budget),
                                 limit)
                    sets = [first] + [case.make_inputs() for _ in range(n_sets - 1)]
            except Exception as error:  # noqa: BLE001 - e.g. out of memory for the inputs
                for p in group:
                    rows.append(_row(case, p.name, "error", f"inputs: {_first_line(error)}"))
                if device.type == "cuda" and _context_broken(error):  # sticky, from a kernel
                    broken = (f"not run: the CUDA context broke making the inputs of {op} "
                              f"{case.size_label}: {_first_line(error)}")
                _free(device)
                continue
            for p in group:
                row = _row(case, p.name, "skipped", skip_reason(p, broken, op_deadline))
                rows.append(row)
                if row["reason"] is not None:
                    continue
                fn = calls = check_set = None
                try:
                    # (taken before the timed calls change the first set)
                    check_set = _copy_inputs(sets[0]) if case.check_output and \
                        p.mutates_inputs else sets[0]
                    fn = p.build(case, ctx)
                    use = sets[:p.max_input_sets] if p.max_input_sets else sets
                    calls = [(lambda s=s, f=fn: f(s)) for s in use]
                    timing = measure(calls, device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                     min_reps=min_reps)
                    peak = None
                    if spec.peak_memory and device.type == "cuda":  # warm: one untimed call
                        peak = _peak_memory_bytes(calls[0], sets[0], device)
                    if case.check_output:  # before the row counts as measured
                        out = fn(check_set)
                        if p.name == C.BASELINE:
                            eager_out = out
                            if keep_eager:
                                eager_outs[case_index] = out
                        elif eager_out is not None:
                            row["rel_err_vs_eager"] = _rel_err(out, eager_out)
                        del out
                    _fill_measurement(row, timing, spec, ceilings)
                    if peak is not None:
                        row["peak_memory_bytes"] = peak
                except C.Unsupported as why:
                    row.update(status="unsupported", reason=str(why))
                except Exception as error:  # noqa: BLE001 - a failing provider is a result
                    row.update(status="error", reason=_first_line(error))
                    if isinstance(error, torch.cuda.OutOfMemoryError):
                        row["reason"] = "out of memory: " + row["reason"]
                    if device.type == "cuda" and _context_broken(error):
                        broken = (f"not run: the CUDA context broke at {op} {case.size_label} "
                                  f"{p.name}: {row['reason']}")
                finally:
                    fn = calls = check_set = None
                    if row["status"] == "error":
                        _free(device)
                status = row["status"]
                shown = (f"{row['time_ms']['median']:.4g} ms" if status == "ok"
                         else f"{status}: {row['reason']}")
                log(f"  {op} {case.variant} {case.size_label} {p.name}: {shown}")
            del sets, eager_out
            _free(device)
            report_progress(op_started)
        del eager_outs

        ops_out[op] = op_entry(op_started)

    add_ratios(rows)
    return snapshot()


def merge(results: list[dict]) -> dict:
    """One result from several runs on one device (e.g. one process per op): the first run's
    header, every run's ops and rows (ratios recomputed)."""
    if not results:
        raise ValueError("nothing to merge")
    merged = dict(results[0])
    merged.pop("partial", None)
    partial = [op for r in results if r.get("partial") for op in r["ops"]]
    if partial:
        merged["partial_ops"] = partial  # from runs cut short: their last cases are missing
    merged["ops"] = {}
    merged["rows"] = []
    for r in results:
        merged["ops"].update(r["ops"])
        merged["rows"].extend(r["rows"])
    add_ratios(merged["rows"])
    merged["summary"] = {"rows": len(merged["rows"]),
                         **{s: sum(x["status"] == s for x in merged["rows"]) for s in STATUSES},
                         "elapsed_s": sum(r["summary"]["elapsed_s"] for r in results)}
    return merged
