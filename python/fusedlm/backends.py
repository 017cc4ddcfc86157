"""Backend registry: which implementation serves each call.

Backends: ``"cuda"`` (C++/CUDA kernels in ``fusedlm._C``), ``"triton"``, ``"cpu"`` (C++ CPU
kernels in ``fusedlm._C``), ``"torch"`` (``fusedlm.reference``, pure PyTorch, always there).
``"auto"`` tries, in order, ``cuda, triton, torch`` for CUDA tensors and ``cpu, torch`` for CPU
tensors, and takes the first that supports the call, so it never gives a wrong answer; each
skipped backend is logged once with the reason. ``FUSEDLM_BACKEND=<name>`` replaces ``"auto"``
everywhere and then behaves like naming that backend: a call it cannot serve raises
:class:`BackendNotSupportedError` saying why.

Each op module (``fusedlm/ops/*.py``) owns an :class:`OpDispatch` and registers one
implementation per backend, with a predicate for the cases it supports.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import _ext

logger = logging.getLogger("fusedlm")

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# Which device type each backend can run on; None means any.
_BACKEND_DEVICE = {"cuda": "cuda", "triton": "cuda", "cpu": "cpu", "torch": None}


_ENVIRONMENT_BYTES = getattr(os.environ, "_data", None)  # CPython's: the encoded copy
_encode_key = getattr(os.environ, "encodekey", None)


_ENCODED_NAMES: dict[str, bytes] = {}


def _encoded(name: str):
    # A plain dict rather than functools.cache: torch.compile traces the ops' Python wrappers,
    # which read FUSEDLM_BACKEND through here, and warns on every cache-wrapped call it meets.
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = _encode_key(name)
    return key


def environment(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)`` in ~0.1 us instead of ~0.7 us (the ops read
    FUSEDLM_BACKEND on every call): a direct lookup in os.environ's encoded mapping, which
    os.environ's own writes (monkeypatch.setenv included) keep current."""
    if _ENVIRONMENT_BYTES is None or _encode_key is None:
        return os.environ.get(name, default)
    value = _ENVIRONMENT_BYTES.get(_encoded(name))
    return default if value is None else os.environ.decodevalue(value)


def triton_interpreted() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through Triton's
    interpreter (slow; for tests without a GPU), so the ``triton`` backend accepts CPU tensors
    when named. ``"auto"`` still never picks it for CPU tensors."""
    return environment("TRITON_INTERPRET") == "1"


def _backend_device(name: str) -> str | None:
    if name == "triton" and triton_interpreted():
        return None
    return _BACKEND_DEVICE[name]


class BackendNotSupportedError(ValueError):
    """A backend named by the caller (argument ``backend`` or ``FUSEDLM_BACKEND``) cannot
    serve this call."""


def _backend_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run anything on this machine, or None if it can."""
    if name == "torch":
        return None
    if name in ("cpu", "cuda"):
        reason = _ext.why_unavailable()
        if reason is not None:
            return reason
        if name == "cuda":
            module = _ext.load()
            if not module.built_with_cuda():
                return ("fusedlm._C was built without CUDA (a CPU-only torch, or no nvcc of "
                        "torch's CUDA major version at build time)")
            if not torch.cuda.is_available():
                return "torch.cuda.is_available() is False"
            if not module.cuda_ops():
                return "this build has no CUDA kernels yet"
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available() and not triton_interpreted():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
        return None
    raise ValueError(f"unknown backend {name!r}")


def cuda_architecture_runs_on(architecture: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``architecture``, as CMake names it (``"80"``: machine code and
    PTX; ``"90a-real"``: machine code only; ``"86-virtual"``: PTX only), runs on a GPU of
    compute ``capability`` (major, minor). Machine code for sm_XY runs on major X with minor
    >= Y; PTX for compute_XY is compiled by the driver for any capability >= X.Y. An
    architecture-specific target (``90a``) runs on exactly X.Y, a family one (``100f``) on major
    X with minor >= Y. A name this does not know (``"all"``) counts as running."""
    name, _, kind = architecture.strip().partition("-")
    suffix = name[-1:] if name[-1:] in ("a", "f") else ""
    digits = name[:len(name) - len(suffix)]
    if not digits.isdigit() or len(digits) < 2 or kind not in ("", "real", "virtual"):
        return True
    built = (int(digits[:-1]), int(digits[-1]))
    if suffix == "a":
        return capability == built
    same_family = capability[0] == built[0] and capability[1] >= built[1]
    if suffix == "f":
        return same_family
    return (kind != "virtual" and same_family) or (kind != "real" and capability >= built)


@functools.cache
def _cuda_device_reason(device: torch.device) -> str | None:
    """Why the CUDA kernels of this build cannot run on ``device`` (an extension built for
    sm_90a alone, run on an A100), or None. The launch would fail with "no kernel image is
    available"; "auto" takes the next backend instead."""
    # (an extension built before it recorded its architectures has no such function)
    built = getattr(_ext.load(), "cuda_architectures", str)()
    if not built:
        return None
    capability = tuple(torch.cuda.get_device_capability(device))
    if any(cuda_architecture_runs_on(a, capability) for a in built.split(",")):
        return None
    major, minor = capability
    return (f"fusedlm._C has no code for {device} (compute capability {major}.{minor}; built "
            f"for CUDA architectures {built}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" pip install --no-build-isolation -e .")


@functools.cache
def _cached_backend_reason(name: str) -> str | None:
    return _backend_reason(name)


@dataclass(frozen=True)
class BackendInfo:
    available: bool
    reason: str  # why not, or what it is
    ops: tuple[str, ...] = ()


class BackendReport(dict):
    """``{backend name: BackendInfo}`` that prints as a table."""

    def __repr__(self) -> str:
        lines = []
        for name, info in self.items():
            status = "ok" if info.available else "unavailable"
            ops = f" [{', '.join(info.ops)}]" if info.available and info.ops else ""
            lines.append(f"{name:<7} {status:<12} {info.reason}{ops}")
        return "\n".join(lines)

    __str__ = __repr__


_DESCRIPTION = {
    "cuda": "C++/CUDA kernels in fusedlm._C",
    "triton": "Triton kernels",
    "cpu": "C++ CPU kernels in fusedlm._C",
    "torch": "pure-PyTorch reference (fusedlm.reference)",
}


def backends() -> BackendReport:
    """Which backends work here, for which ops, and why the others do not."""
    report = BackendReport()
    for name in BACKEND_NAMES:
        reason = _backend_reason(name)
        if name == "cuda" and reason is None:  # (per device in dispatch; here the current one)
            reason = _cuda_device_reason(torch.device("cuda", torch.cuda.current_device()))
        ops = tuple(sorted(op for op, d in OpDispatch.registry.items() if name in d.impls))
        if name == "cuda" and _ext.load() is not None:  # registered for every op; built for some
            ops = tuple(op for op in ops if op in _ext.load().cuda_ops())
        if reason is None and not ops:
            reason = "no kernels registered for any op yet"
        report[name] = BackendInfo(reason is None, reason or _DESCRIPTION[name], ops)
    return report


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or backend not in (*BACKEND_NAMES, "auto"):
        raise ValueError(
            "argument 'backend' must be one of "
            f"{', '.join(repr(n) for n in (*BACKEND_NAMES, 'auto'))}; "
            f"got {backend!r}"
        )


def requested_backend(backend: str) -> str:
    """The backend asked for once ``FUSEDLM_BACKEND`` has replaced ``"auto"``."""
    check_backend_name(backend)
    if backend == "auto":
        env = environment("FUSEDLM_BACKEND", "auto").strip() or "auto"
        if env not in (*BACKEND_NAMES, "auto"):
            raise ValueError(
                f"environment variable FUSEDLM_BACKEND must be one of {', '.join(BACKEND_NAMES)} "
                f"or auto; got {env!r}"
            )
        return env
    return backend


Supports = Callable[..., "str | None"]


class OpDispatch:
    """Implementations of one op, one per backend, each with an optional ``supports(*args)``
    predicate returning ``None`` when it can serve the call or the reason it cannot."""

    registry: ClassVar[dict[str, OpDispatch]] = {}  # op name -> dispatch, for backends()
    last_choice: ClassVar[dict[str, str]] = {}  # op name -> backend of its latest call
    _logged: ClassVar[set[tuple]] = set()

    def __init__(self, name: str) -> None:
        self.name = name
        self.impls: dict[str, tuple[Callable, Supports | None]] = {}
        OpDispatch.registry[name] = self

    def register(self, backend: str, supports: Supports | None = None):
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}")

        def decorator(fn: Callable) -> Callable:
            self.impls[backend] = (fn, supports)
            return fn

        return decorator

    def _why_not(self, backend: str, device: torch.device, args: tuple,
                 device_type: str | None = None) -> str | None:
        reason = _cached_backend_reason(backend)
        if reason is not None:
            return reason
        wanted_device = _backend_device(backend)
        if device_type is None:
            device_type = device.type
        if wanted_device is not None and device_type != wanted_device:
            return f"it runs on {wanted_device} tensors and the inputs are on {device}"
        if backend == "cuda" and (reason := _cuda_device_reason(device)) is not None:
            return reason
        if backend not in self.impls:
            return f"it has no {self.name} kernel"
        _, supports = self.impls[backend]
        return supports(*args) if supports is not None else None

    def select(self, backend: str, device: torch.device, *args) -> Callable:
        """The implementation that serves this call. ``args`` go to the support predicates."""
        return self.impls[self.choose(backend, device, *args)][0]

    def choose(self, backend: str, device: torch.device, *args) -> str:
        """The name of the backend that serves this call (what ``select`` runs)."""
        requested = requested_backend(backend)
        if requested != "auto":
            reason = self._why_not(requested, device, args)
            if reason is not None:
                source = "argument 'backend'" if backend != "auto" else "FUSEDLM_BACKEND"
                raise BackendNotSupportedError(
                    f"fusedlm.{self.name}: {source} asks for backend {requested!r}, which cannot "
                    f"serve this call: {reason}"
                )
            OpDispatch.last_choice[self.name] = requested
            return requested
        device_type = device.type  # (~0.2 us a read)
        for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
            reason = self._why_not(candidate, device, args, device_type)
            if reason is None:
                OpDispatch.last_choice[self.name] = candidate
                return candidate
            self._log_once(candidate, device, reason)
        raise AssertionError(f"{self.name}: the torch backend must serve every call")

    def serves_requested(self, backend: str, device: torch.device) -> bool:
        """Whether the backend asked for (``backend``, or ``FUSEDLM_BACKEND`` for "auto") can
        serve this op on ``device`` as far as that is known without a call's arguments:
        always under "auto"; a named backend when it is available there and has the kernel
        (``cuda`` has no C++ kernel for some ops: Triton serves their CUDA tensors)."""
        requested = requested_backend(backend)
        return requested == "auto" or self._why_not(requested, device, ()) is None

    def auto_choice(self, device: torch.device, *args) -> str:
        """The backend ``"auto"`` would pick for this call, without logging."""
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if self._why_not(candidate, device, args) is None:
                return candidate
        return "torch"

    def _log_once(self, backend: str, device: torch.device, reason: str) -> None:
        key = (self.name, backend, device.type, reason)
        if key not in OpDispatch._logged:
            OpDispatch._logged.add(key)
            # A kernel backend missing for the very device it serves is worth a warning; a
            # backend skipped for one unsupported case (or another device) is routine.
            missing = _BACKEND_DEVICE[backend] == device.type and (
                reason == _cached_backend_reason(backend)
                or (backend == "cuda" and reason == _cuda_device_reason(device)))
            logger.log(
                logging.WARNING if missing else logging.INFO,
                "fusedlm.%s on %s: skipping backend %r: %s", self.name, device, backend, reason,
            )
