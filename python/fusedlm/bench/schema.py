"""The shape of ``bench.json`` (schema ``fusedlm.bench/1``) and a checker for it.

Top level: ``schema``, ``created_utc``, ``argv``, ``quick``, ``device`` ("cuda" | "cpu"),
``gpu_found``, ``note`` (why no GPU, or null), ``environment`` (device name and slug,
torch/triton/CUDA versions, fusedlm.backends()), ``code`` (commit, dirty flag, git tree hashes
of csrc/ and python/fusedlm/triton/), ``ceilings`` (``bandwidth`` in GB/s, ``matmul`` in
TFLOP/s, each with its method and timing), ``settings``, ``units`` (what every number means),
``ops`` (per op: metric, ceiling, x_name, baseline, formulas, providers with availability and
the reason when unavailable, notes, variants), ``rows`` and ``summary``.

A row is one (op, variant, size, provider): ``status`` is "ok" (measured), "error" (it raised;
``reason``), "unsupported" (this provider cannot do this case; ``reason``) or "skipped"
(budget or a broken CUDA context; ``reason``). A measured row has ``time_ms`` {median, p20,
p80}, ``value`` in the op's metric, ``pct_of_ceiling`` and ``ratio_to_eager`` (the torch-eager
row's median time for the same op, variant and size over this row's).

Optional row keys: ``causal`` (attention), ``tokens`` and ``tokens_per_s`` (gpt), and
``peak_memory_bytes`` (measured GPU rows of the ops that record it, linear_cross_entropy: the
most memory one call held beyond its inputs; absent on the CPU).
"""

from __future__ import annotations

import math

SCHEMA = "fusedlm.bench/1"
TOP_KEYS = ("schema", "created_utc", "argv", "quick", "device", "gpu_found", "note",
            "environment", "code", "ceilings", "settings", "units", "ops", "rows", "summary")
ROW_KEYS = ("op", "variant", "pass", "dtype", "size_label", "size", "x", "provider", "status",
            "reason", "time_ms", "reps", "input_sets", "clock", "flops", "bytes", "tflops",
            "gbps", "value", "pct_of_ceiling", "ratio_to_eager", "rel_err_vs_eager")
OP_KEYS = ("description", "metric", "ceiling", "x_name", "baseline", "flops_formula",
           "bytes_formula", "providers", "notes", "variants")
STATUSES = ("ok", "error", "unsupported", "skipped")
METRICS = {"TFLOP/s": "matmul", "GB/s": "bandwidth"}


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


def validate(results: dict) -> list[str]:
    """Every way ``results`` departs from the schema; an empty list when it conforms. Checks
    also that each derived number (throughput, percent of ceiling, ratio to eager) follows
    from the measured times."""
    problems: list[str] = []
    add = problems.append
    for key in TOP_KEYS:
        if key not in results:
            add(f"missing top-level key {key!r}")
    if problems:
        return problems
    if results["schema"] != SCHEMA:
        add(f"schema is {results['schema']!r}, expected {SCHEMA!r}")
    if results["device"] not in ("cpu", "cuda"):
        add(f"device is {results['device']!r}")
    if not results["gpu_found"] and not results["note"]:
        add("no GPU found but no note says so")
    env = results["environment"]
    for key in ("device_name", "device_slug", "torch", "triton", "cuda_runtime", "gpu_found"):
        if key not in env:
            add(f"environment lacks {key!r}")
    for key in ("commit", "dirty", "kernel_trees"):
        if key not in results["code"]:
            add(f"code stamp lacks {key!r}")
    ceilings = results["ceilings"]
    for name, unit in (("bandwidth", "GB/s"), ("matmul", "TFLOP/s")):
        c = ceilings.get(name)
        if not isinstance(c, dict) or not isinstance(c.get("value"), (int, float)) \
                or c["value"] <= 0:
            add(f"ceiling {name!r} missing or not positive")
        elif c.get("unit") != unit:
            add(f"ceiling {name!r} has unit {c.get('unit')!r}, expected {unit!r}")
    for op, info in results["ops"].items():
        for key in OP_KEYS:
            if key not in info:
                add(f"op {op!r} lacks {key!r}")
        if METRICS.get(info.get("metric")) != info.get("ceiling"):
            add(f"op {op!r}: metric {info.get('metric')!r} with ceiling {info.get('ceiling')!r}")
        for name, p in info.get("providers", {}).items():
            if not isinstance(p, dict) or "available" not in p or "reason" not in p:
                add(f"op {op!r} provider {name!r} lacks available/reason")
            elif not p["available"] and not p["reason"]:
                add(f"op {op!r} provider {name!r} is unavailable with no reason")
    eager: dict = {}
    for i, row in enumerate(results["rows"]):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            add(f"row {i} lacks {missing}")
            continue
        if row["op"] not in results["ops"]:
            add(f"row {i}: op {row['op']!r} is not described in 'ops'")
            continue
        if row["status"] not in STATUSES:
            add(f"row {i}: status {row['status']!r}")
        peak = row.get("peak_memory_bytes")
        if peak is not None and (row["status"] != "ok" or results["device"] != "cuda"
                                 or isinstance(peak, bool) or not isinstance(peak, int)
                                 or peak < 0):
            add(f"row {i}: peak_memory_bytes must be a count of bytes (>= 0) on a measured "
                f"GPU row, got {peak!r} on a {row['status']} {results['device']} row")
        if row["status"] != "ok":
            if not row["reason"]:
                add(f"row {i}: status {row['status']} without a reason")
            if row["ratio_to_eager"] is not None or row["value"] is not None:
                add(f"row {i}: not measured but has a value or ratio")
            continue
        t = row["time_ms"]
        if not isinstance(t, dict) or not all(isinstance(t.get(k), (int, float)) and t[k] > 0
                                              for k in ("median", "p20", "p80")):
            add(f"row {i}: time_ms must hold positive median, p20, p80")
            continue
        if not t["p20"] <= t["median"] <= t["p80"]:
            add(f"row {i}: p20 <= median <= p80 does not hold")
        seconds = t["median"] * 1e-3
        tflops = row["flops"] / seconds / 1e12 if row["flops"] is not None else None
        if tflops is not None and (row["tflops"] is None or not _close(row["tflops"], tflops)):
            add(f"row {i}: tflops is not flops / median time")
        if row["bytes"] is not None and (row["gbps"] is None
                                         or not _close(row["gbps"], row["bytes"] / seconds / 1e9)):
            add(f"row {i}: gbps is not bytes / median time")
        info = results["ops"][row["op"]]
        expected_value = row["tflops"] if info["metric"] == "TFLOP/s" else row["gbps"]
        if expected_value != row["value"]:
            add(f"row {i}: value is not the op's metric ({info['metric']})")
        ceiling = ceilings.get(info["ceiling"], {}).get("value")
        if row["value"] is not None and ceiling and (
                row["pct_of_ceiling"] is None
                or not _close(row["pct_of_ceiling"], 100 * row["value"] / ceiling)):
            add(f"row {i}: pct_of_ceiling is not value / ceiling")
        if row["provider"] == info["baseline"]:
            eager[(row["op"], row["variant"], row["size_label"])] = t["median"]
    for i, row in enumerate(results["rows"]):
        if row.get("status") != "ok" or not isinstance(row.get("time_ms"), dict):
            continue
        base = eager.get((row["op"], row["variant"], row["size_label"]))
        if base is None:
            if row.get("ratio_to_eager") is not None:
                add(f"row {i}: ratio_to_eager without a measured eager row")
        elif row.get("ratio_to_eager") is None or not _close(row["ratio_to_eager"],
                                                              base / row["time_ms"]["median"]):
            add(f"row {i}: ratio_to_eager is not eager median / this median")
    s = results["summary"]
    if s.get("rows") != len(results["rows"]):
        add("summary.rows does not count the rows")
    return problems
