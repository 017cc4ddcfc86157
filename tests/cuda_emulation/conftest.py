"""The CPU emulation of csrc/cuda (warp_emulation.h): the shared library every test here calls,
built once per source hash, and NaN-guarded buffers."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCES = [
    HERE / "warp_emulation.h",
    HERE / "sm90_emulation.h",
    HERE / "kernels_emulated.cpp",
    *sorted((REPO / "csrc" / "cuda").glob("*.cuh")),
    REPO / "csrc" / "cuda" / "launchers.h",
    REPO / "csrc" / "philox4x32.h",
    *sorted((REPO / "csrc" / "cuda").glob("*.cu")),
]
# The Hopper primitives' test kernels (test_sm90_primitives_emulated.py).
SM90_SOURCES = [
    HERE / "warp_emulation.h",
    HERE / "sm90_emulation.h",
    HERE / "sm90_primitives_emulated.cpp",
    *sorted((REPO / "csrc" / "cuda").glob("*.cuh")),
    REPO / "csrc" / "cuda" / "launchers.h",
    REPO / "csrc" / "philox4x32.h",
]
# The kernels' layouts against CUTLASS's CuTe (test_layouts_cute.py).
LAYOUT_SOURCES = [
    HERE / "warp_emulation.h",
    HERE / "sm90_emulation.h",
    HERE / "layouts_cute.cpp",
    *sorted((REPO / "csrc" / "cuda").glob("*.cuh")),
    REPO / "csrc" / "cuda" / "launchers.h",
    REPO / "csrc" / "philox4x32.h",
]
GUARD = 64  # elements of NaN before and after every tensor
# Opt-in shared memory per block the emulated device reports (the launchers pick tiles by it).
H100_SHARED_BYTES = 232448
SM86_SHARED_BYTES = 101376  # sm_86 / sm_89: 99 KiB


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


def _build(source: Path, sources: list[Path], stem: str,
           extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`source` compiled for the emulation into a cached shared library, keyed by the hash of
    `sources` and the flags."""
    include = _cuda_include()
    compiler = shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_fp16.h) to build the emulation")
    # -Bsymbolic: the library's calls to the CUDA runtime API (cudaFuncSetAttribute, ...) bind
    # to its own emulated definitions even when a CUDA build of torch has loaded the real
    # libcudart into the process first (without it they reach the real runtime, which fails
    # with cudaErrorInsufficientDriver where there is no GPU and is worse where there is one).
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-Wl,-Bsymbolic", *extra_flags]
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in sources) + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FUSEDLM_EMULATION_CACHE", Path.home() / ".cache" / "fusedlm"))
    target = cache / f"{stem}_{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [compiler, *flags, f"-I{HERE}",
             f"-I{REPO / 'csrc'}", f"-I{include}", str(source), "-o", str(partial)],
            check=True,
        )
        partial.rename(target)
    return ctypes.CDLL(str(target))


@pytest.fixture(scope="session")
def library():
    """csrc/cuda's launchers compiled for the emulation, as a ctypes library (about 40 s to build
    once per source hash, cached in ~/.cache/fusedlm or $FUSEDLM_EMULATION_CACHE)."""
    lib = _build(HERE / "kernels_emulated.cpp", SOURCES, "kernels_emulated")
    for name in ("emulated_attention_fwd", "emulated_attention_bwd", "emulated_norm_fwd",
                 "emulated_norm_bwd", "emulated_adamw_step"):
        getattr(lib, name).restype = ctypes.c_int
    lib.emulated_fault.restype = ctypes.c_char_p
    lib.emulated_set_score_mods.argtypes = [ctypes.c_double, ctypes.c_double, ctypes.c_int64]
    lib.emulated_configure(1, 1, H100_SHARED_BYTES)  # copies at the wait, warps drifting apart
    return lib


def cute_include() -> Path | None:
    """CUTLASS's headers (cute/, cutlass/) from the nvidia-cutlass package, or $CUTLASS_INCLUDE."""
    candidates = [Path(os.environ["CUTLASS_INCLUDE"])] if os.environ.get("CUTLASS_INCLUDE") else []
    spec = importlib.util.find_spec("cutlass_library")  # locates, does not import
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates.append(Path(location) / "source" / "include")
    return next((c for c in candidates if (c / "cute" / "tensor.hpp").exists()), None)


@pytest.fixture(scope="session")
def sm90_library():
    """The small test kernels over the emulated Hopper primitives (sm90_primitives_emulated.cpp),
    built and cached like `library`."""
    lib = _build(HERE / "sm90_primitives_emulated.cpp", SM90_SOURCES, "sm90_primitives_emulated")
    lib.sm90_fault.restype = ctypes.c_char_p
    return lib


@pytest.fixture(scope="session")
def cute_layouts_library():
    """layouts_cute.cpp (the emulation's and the kernels' layouts against CuTe's),
    built and cached like `library`; skipped without CUTLASS's headers unless
    FUSEDLM_REQUIRE_CUTE=1 (CI), where their absence fails."""
    cute = cute_include()
    cuda = _cuda_include()
    if cute is None:
        message = ("needs CUTLASS's CuTe headers: pip install --no-deps nvidia-cutlass==4.2.0.0 "
                   "(or set CUTLASS_INCLUDE)")
        if os.environ.get("FUSEDLM_REQUIRE_CUTE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    # CUDA 13 keeps libcu++ (cuda/std/...) under include/cccl; CUDA 12 in include itself.
    cccl = [f"-I{cuda / 'cccl'}"] if cuda is not None and (cuda / "cccl").is_dir() else []
    # (CUTLASS's version header in the hash: another CUTLASS at the same path rebuilds.)
    lib = _build(HERE / "layouts_cute.cpp", [*LAYOUT_SOURCES, cute / "cutlass" / "version.h"],
                 "layouts_cute", (f"-I{cute}", *cccl, "-Wno-deprecated-declarations"))
    lib.cute_first_mismatch.restype = ctypes.c_char_p
    return lib


def guarded_output(shape, dtype, misalign: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous (shape) tensor inside a NaN guard buffer, its body NaN too (so an element the
    kernel never writes shows), 16-byte aligned, or `misalign` elements past that (for the
    kernels' unaligned paths). Returns (view, buffer)."""
    numel = math.prod(shape)
    buffer = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype)
    assert buffer.data_ptr() % 16 == 0
    start = GUARD + misalign
    return buffer[start:start + numel].view(shape), buffer


def guarded_copy(values: torch.Tensor, misalign: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    view, buffer = guarded_output(values.shape, values.dtype, misalign)
    view.copy_(values)
    return view, buffer


def check_guard(buffer: torch.Tensor, numel: int, name: str, misalign: int = 0) -> None:
    head, tail = buffer[:GUARD + misalign], buffer[GUARD + misalign + numel:]
    assert torch.isnan(head).all() and torch.isnan(tail).all(), f"{name}: written outside"
