"""The cases and providers of ``fusedlm bench`` as pytest-benchmark tests (benchmarks/test_*.py).

    params("attention")   -> pytest params (device, case index, provider), CUDA ones marked gpu
    run(benchmark, op, device, case_index, provider)

Sizes are the ``--quick`` ones; ``FUSEDLM_BENCH_FULL=1`` gives the full sweep. torch.compile
rows run on the GPU, and on the CPU only with ``FUSEDLM_BENCH_COMPILE=1`` (each compile takes
seconds there). A provider that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from . import cases as C


def _quick() -> bool:
    return os.environ.get("FUSEDLM_BENCH_FULL", "") in ("", "0")


def context(device: str, with_backends: bool = True) -> C.Context:
    import fusedlm

    dev = torch.device(device)
    compile_on = dev.type == "cuda" or os.environ.get("FUSEDLM_BENCH_COMPILE", "") not in ("", "0")
    return C.Context(device=dev, quick=_quick(), compile=compile_on,
                     compile_note=None if compile_on else
                     "torch.compile rows on the CPU need FUSEDLM_BENCH_COMPILE=1",
                     backends=dict(fusedlm.backends()) if with_backends else {})


def params(op: str, devices: tuple[str, ...] = ("cpu", "cuda")) -> list:
    out = []
    spec = C.specs()[op]
    for device in devices:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        cases = spec.cases(context(device, with_backends=False))
        for i, case in enumerate(cases):
            for p in spec.providers:
                ident = f"{device}-{case.variant}-{case.size_label}-{p.name}".replace(" ", "_")
                out.append(pytest.param(device, i, p.name, id=ident, marks=marks))
    return out


def run(benchmark, op: str, device: str, case_index: int, provider_name: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctx = context(device)
    spec = C.specs()[op]
    case = spec.cases(ctx)[case_index]
    provider = next(p for p in spec.providers if p.name == provider_name)
    reason = provider.why_not(ctx)
    if reason is not None:
        pytest.skip(reason)
    inputs = case.make_inputs()
    try:
        fn = provider.build(case, ctx)
        fn(inputs)  # compile, autotune, allocate
    except C.Unsupported as why:
        pytest.skip(str(why))
    cuda = ctx.cuda

    def call():
        fn(inputs)
        if cuda:
            torch.cuda.synchronize()

    call()
    benchmark.group = f"{op} {case.variant} {case.size_label}"
    benchmark.extra_info.update(flops=case.flops, bytes=case.bytes, tokens=case.tokens,
                                provider=provider_name, device=device)
    benchmark.pedantic(call, rounds=10 if op != "gpt" else 3, warmup_rounds=1)
