"""Build Triton kernels for sm_90 (H100) without a GPU, for the ``test_kernels_build_for_sm90``
tests of tests/triton.

The interpreter (TRITON_INTERPRET=1) runs the kernels as Python, not through Triton's compiler:
these tests compile them for sm_90 (MLIR, PTX, ptxas; no GPU needed) to catch what only the
compiler rejects, and check shared memory against the H100's and (when the ptxas shipped with
triton is there) register spills.

A build is described by a *launch*: the kernel ("module:name") and the arguments a launcher
passes it, as JSON (tensors become their dtype and whether their address is 16-byte aligned;
``tl.dtype`` constexprs their name). :func:`record_launches` captures a launcher's real calls;
:func:`build_for_sm90` compiles launches in one subprocess (TRITON_INTERPRET unset), giving each
the signature, constexprs and divisibility attributes Triton's JIT would: ints equal to 1 become
constexprs, ints and aligned pointers that are multiples of 16 get ``tt.divisibility``, floats
take their annotation (else fp32).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import triton.language as tl

# Shared memory per block on an H100 (sm_90), the limit Triton checks at load time.
H100_SHARED = 232448

_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
    torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64",
}


def _as_json(value):
    if isinstance(value, torch.Tensor):
        return {"ptr": _TYPES[value.dtype], "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    return value


def require_nvidia_backend() -> None:
    """Skip the calling test where this triton has no CUDA backend to compile with."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no nvidia backend here")


def launch(kernel: str, *args, **kwargs) -> dict:
    """The launch ``kernel[grid](*args, **kwargs)`` of kernel ``"module:name"``, as JSON."""
    return {
        "kernel": kernel,
        "args": [_as_json(a) for a in args],
        "kwargs": {k: _as_json(v) for k, v in kwargs.items()},
    }


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch instead of running."""

    def __init__(self, kernel: str, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(launch(self.kernel, *args, **kwargs))


def record_launches(monkeypatch, module, *names: str) -> list[dict]:
    """Replace kernels ``names`` of ``module`` by recorders; returns the list their launches go
    to, in call order."""
    launches: list[dict] = []
    for name in names:
        monkeypatch.setattr(module, name, _Recorder(f"{module.__name__}:{name}", launches))
    return launches


_BUILD_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile, time
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:  # the ptxas triton itself runs for sm_90: bin/ptxas-blackwell (CUDA 13) from triton 3.9 on
    from triton.backends.nvidia.compiler import get_ptxas
    PTXAS = get_ptxas(90).path
except (ImportError, AttributeError, RuntimeError):
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
DIVISIBLE = [["tt.divisibility", 16]]

def build(spec):
    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    values = dict(zip(fn.arg_names, spec["args"]))
    options = {}
    for key, value in spec["kwargs"].items():
        (values if key in fn.arg_names else options)[key] = value
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        v = values[param.name]
        if isinstance(v, dict) and "tl" in v:
            v = tl.dtype(v["tl"])
        if param.is_constexpr or v is None or (type(v) is int and v == 1):
            signature[param.name], constexprs[param.name] = "constexpr", v
        elif isinstance(v, dict):
            signature[param.name] = "*" + v["ptr"]
            if v["aligned"]:
                attrs[(i,)] = DIVISIBLE
        elif type(v) is int:
            signature[param.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = DIVISIBLE
        elif type(v) is float:
            signature[param.name] = param.annotation_type or "fp32"
        else:
            raise TypeError(f"{name}: argument {param.name} = {v!r}")
    start = time.time()
    try:
        source = ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[-3000:]}
    ptx_text = compiled.asm["ptx"]
    result = {"shared": compiled.metadata.shared,
              "wgmma": ptx_text.count("wgmma.mma_async"), "mma_sync": ptx_text.count("mma.sync")}
    if os.path.exists(PTXAS):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            run = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                                 capture_output=True, text=True)
        if run.returncode != 0:
            return {"error": f"ptxas exit {run.returncode}: {run.stderr}"[-3000:]}
        log = run.stderr
        result["registers"] = max(int(r) for r in re.findall(r"Used (\d+) registers", log))
        for kind in ("stores", "loads"):
            found = re.findall(rf"(\d+) bytes spill {kind}", log)
            result["spill_" + kind] = sum(int(n) for n in found)
    result["seconds"] = round(time.time() - start, 2)
    return result

print(json.dumps([build(spec) for spec in json.loads(sys.stdin.read())]))
"""


def build_for_sm90(launches: list[dict], timeout: float = 600) -> list[dict]:
    """Compile each launch for sm_90 in one subprocess. Per launch: ``{"error": text}`` when it
    does not compile, else ``{"shared": bytes, "seconds": ...}``, the counts of Hopper
    (``"wgmma"``) and Ampere (``"mma_sync"``) tensor-core instructions in its PTX, and, when
    ptxas is found,
    ``"registers"``, ``"spill_stores"`` and ``"spill_loads"`` (bytes) from ``ptxas -v``."""
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT], input=json.dumps(launches),
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def problems(
    launches: list[dict], results: list[dict], max_spill_bytes: int | None = 0
) -> list[str]:
    """What is wrong with each build, as lines naming the launch: a compile error, shared
    memory over the H100's, more than ``max_spill_bytes`` of spill stores (None: not checked;
    a few bytes at a register-capped config cost nothing measurable, hundreds mean the tile
    does not fit the register file)."""
    out = []
    for spec, r in zip(launches, results, strict=True):
        what = None
        if "error" in r:
            what = r["error"]
        elif not 0 <= r["shared"] <= H100_SHARED:
            what = f"{r['shared']} bytes of shared memory > {H100_SHARED}"
        elif max_spill_bytes is not None and r.get("spill_stores", 0) > max_spill_bytes:
            what = f"{r['spill_stores']} bytes of spill stores ({r['registers']} registers)"
        if what:
            out.append(f"{spec['kernel']} {json.dumps(spec['kwargs'])}: {what}")
    return out
