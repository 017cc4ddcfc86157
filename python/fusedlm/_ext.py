"""Loads the compiled extension ``fusedlm._C`` on first use, never at import.

If the extension is missing, fails to load, or was built against another torch (loading
it then could crash the interpreter), :func:`load` returns ``None`` and :func:`why_unavailable`
says why; ``fusedlm.backends()`` reports it and ``"auto"`` falls back to other backends.
Set ``FUSEDLM_DISABLE_EXTENSION=1`` to act as if it were absent. ``FUSEDLM_CPU_ISA=generic``,
``avx2`` or ``avx512`` caps the instruction set the CPU kernels use (default: the best the CPU
has), so their portable and AVX2 paths can be tested and compared on any machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

import torch

_NOT_LOADED = object()
_module: object = _NOT_LOADED
_reason: str | None = None

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e ."


def load() -> ModuleType | None:
    """Return ``fusedlm._C``, or ``None`` when it cannot be used here (see
    :func:`why_unavailable`)."""
    global _module, _reason
    if _module is _NOT_LOADED:
        _module, _reason = _try_load()
    return _module  # type: ignore[return-value]


def why_unavailable() -> str | None:
    """``None`` when ``fusedlm._C`` loads, else the reason it does not."""
    load()
    return _reason


def _try_load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("FUSEDLM_DISABLE_EXTENSION", "") not in ("", "0"):
        return None, "disabled by FUSEDLM_DISABLE_EXTENSION"
    if _extension_file() is None:
        return None, f"fusedlm._C is not built; {REBUILD_HINT}"
    built_for = _built_for_torch()
    if built_for is not None and built_for != torch.__version__:
        return None, (
            f"fusedlm._C was built for torch {built_for} but torch {torch.__version__} "
            f"is running; {REBUILD_HINT}"
        )
    try:
        module = importlib.import_module("fusedlm._C")
    except (ImportError, OSError) as error:
        return None, f"fusedlm._C failed to load ({error}); {REBUILD_HINT}"
    if module.torch_version() != torch.__version__:
        return None, (
            f"fusedlm._C was built for torch {module.torch_version()} but torch "
            f"{torch.__version__} is running; {REBUILD_HINT}"
        )
    _apply_cpu_isa(module)
    return module, None


def _apply_cpu_isa(module: ModuleType) -> None:
    requested = os.environ.get("FUSEDLM_CPU_ISA", "")
    if not requested:
        return
    try:
        module.set_cpu_isa(requested)
    except ValueError as error:
        # A typo here would otherwise silently test or time another code path.
        raise ValueError(f"FUSEDLM_CPU_ISA={requested!r}: {error}") from None


def _extension_file() -> Path | None:
    spec = importlib.util.find_spec("fusedlm._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _built_for_torch() -> str | None:
    """The torch version stamped into the extension's bytes (csrc/bindings.cpp), read without
    loading it."""
    path = _extension_file()
    try:
        data = path.read_bytes() if path is not None else b""
    except OSError:
        return None
    match = re.search(rb"FUSEDLM_BUILT_FOR_TORCH=([^\x00]+)\x00", data)
    return match.group(1).decode() if match else None
