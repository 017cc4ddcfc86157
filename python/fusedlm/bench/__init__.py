"""Benchmark harness behind ``fusedlm bench`` and benchmarks/."""
