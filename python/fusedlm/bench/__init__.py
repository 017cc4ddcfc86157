"""Benchmark harness behind ``fusedlm bench`` and benchmarks/ (see benchmarks/README.md).

    cli.py       the ``fusedlm bench`` command (argparse only at import)
    runner.py    runs ceilings + every case x provider, returns the results dict
    cases.py     per op: sizes (quick / full, CPU / GPU) and providers (eager PyTorch, its peers,
                 fusedlm's backends), each with why it cannot run where it cannot
    counting.py  FLOPs and the fewest bytes each op must move
    timing.py    CUDA events / perf_counter, rotated input sets, median p20 p80
    ceilings.py  measured copy bandwidth and matmul throughput
    env.py       device, versions, commit and git tree hashes of the kernel directories
    schema.py    the bench.json schema and its checker
    report.py    rich tables, PNG plots, Markdown for the README
    pytest_suite.py  the same cases as pytest-benchmark tests (benchmarks/test_*.py)

Nothing heavy is imported here: torch, rich and matplotlib load when a benchmark runs.
"""
