"""Containment of a broken CUDA context in the GPU test run (pytest hooks; tests/conftest.py
imports them).

Why: an out-of-bounds access or a trap in a kernel (ours or Triton's) leaves the process's CUDA
context broken, and every later CUDA call in that process raises the same sticky error. In a
``pytest -m gpu -n 8`` run, one bad kernel would then fail every later GPU test of its worker,
fast, so that worker takes an ever larger share of the queue: a run of thousands of failures
that hides the one culprit and the results of every working kernel.

What the hooks do, for tests marked ``gpu`` on a machine with CUDA:
* after each test, synchronize and run one tiny op. If that raises, the test broke the context
  (a kernel's error surfaces at the latest there): it is recorded, with its family (its test
  function and, where parametrized, its backend), in ``quarantine.jsonl`` under
  ``$FUSEDLM_TEST_QUARANTINE_DIR`` (the controller of an xdist run sets a temporary one for its
  workers; ``benchmarks/gpu_check`` puts it in its logs). Under pytest-xdist the worker then
  exits, and xdist reports that test as crashed and starts a fresh worker with a fresh
  context; in a plain run the test gets a teardown error and the process's later GPU tests are
  skipped, naming the culprit.
* a test whose process died while running it (a segfault, or a hung kernel ended by
  pytest-timeout's thread method, which exits the worker) is found by the next test that
  starts (each running test leaves a ``running-<pid>.json`` until its teardown) and recorded
  the same way.
* before each test, one whose family broke a context already is skipped as quarantined, naming
  the culprit: a kernel family that faults costs one crash, not one per case (a worker
  restart re-collects the suite: 10-20 s), and one that hangs costs one timeout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import pytest
import torch

QUARANTINE_ENV = "FUSEDLM_TEST_QUARANTINE_DIR"
_QUARANTINE_FILE = "quarantine.jsonl"
HANG_S = 60.0
# The error this process's CUDA context was broken by: (test id, error), or None.
_broken: tuple[str, str] | None = None


def context_error() -> str | None:
    """None if the CUDA context still runs work, else the error that says it does not (or
    that the work a test left queued has not finished in HANG_S: a hung kernel)."""
    try:
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + HANG_S
        while not done.query():
            if time.monotonic() > deadline:
                return f"the GPU work it queued has not finished in {HANG_S:.0f} s (a hung kernel)"
            time.sleep(0.001)
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as error:  # noqa: BLE001 - any failure here means the context is gone
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    return None


def watched(item: pytest.Item) -> bool:
    """Tests whose CUDA use the guard checks: those marked gpu, where CUDA is available."""
    return item.get_closest_marker("gpu") is not None and torch.cuda.is_available()


def family(item: pytest.Item) -> str:
    """The cases that share a kernel path: the test function, and its backend if it has one."""
    name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    return name if backend is None else f"{name}[backend={backend}]"


def _quarantine_path() -> str | None:
    directory = os.environ.get(QUARANTINE_ENV)
    return os.path.join(directory, _QUARANTINE_FILE) if directory else None


def quarantined() -> dict[str, dict]:
    """Family -> the first record of a test of it that broke a CUDA context."""
    path = _quarantine_path()
    records: dict[str, dict] = {}
    if path is None or not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line a dying worker left half-written
                continue
            records.setdefault(record.get("family"), record)
    return records


def _record(item: pytest.Item, error: str) -> None:
    _append({"test": item.nodeid, "family": family(item), "error": error,
             "worker": os.environ.get("PYTEST_XDIST_WORKER")})


def _append(record: dict) -> None:
    path = _quarantine_path()
    if path is None:
        return
    line = json.dumps(record) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one append: lines of concurrent workers do not interleave
    finally:
        os.close(fd)


def _running_path(pid: int) -> str | None:
    directory = os.environ.get(QUARANTINE_ENV)
    return os.path.join(directory, f"running-{pid}.json") if directory else None


def _alive(pid: int) -> bool:
    """Whether process pid still runs: a dead worker stays a zombie until xdist reaps it, and
    signal 0 reaches zombies, so Linux's /proc state decides where there is one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _collect_dead_runs() -> None:
    """Records the tests whose process died while running them (their running file stayed)."""
    directory = os.environ.get(QUARANTINE_ENV)
    if not directory or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if not (name.startswith("running-") and name.endswith(".json")):
            continue
        try:
            pid = int(name[len("running-"):-len(".json")])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                record = json.load(f)
            os.remove(path)  # whoever removes it records it (concurrent workers race here)
        except (OSError, ValueError):
            continue
        record["error"] = ("its process died while running it (a crash, or a hang ended by "
                           "pytest-timeout)")
        _append(record)


def pytest_configure(config: pytest.Config) -> None:
    # The controller (or a plain run) picks the directory its workers inherit.
    if (not hasattr(config, "workerinput") and not os.environ.get(QUARANTINE_ENV)
            and torch.cuda.is_available()):
        os.environ[QUARANTINE_ENV] = tempfile.mkdtemp(prefix="fusedlm-quarantine-")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not watched(item):
        return
    _collect_dead_runs()
    if _broken is not None:
        pytest.skip(f"the CUDA context of this process was broken by {_broken[0]} "
                    f"({_broken[1]}): no CUDA test can run in it")
    record = quarantined().get(family(item))
    if record is not None:
        pytest.skip(f"quarantined: {record['test']} broke the CUDA context ({record['error']}); "
                    f"the rest of {family(item)} is not run")
    path = _running_path(os.getpid())
    if path is not None:
        with open(path, "w") as f:
            json.dump({"test": item.nodeid, "family": family(item),
                       "worker": os.environ.get("PYTEST_XDIST_WORKER")}, f)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    global _broken
    if _broken is not None or not watched(item):
        return
    error = context_error()
    path = _running_path(os.getpid())
    if path is not None and os.path.exists(path):
        os.remove(path)
    if error is None:
        return
    _broken = (item.nodeid, error)
    _record(item, error)
    message = f"{item.nodeid} broke the CUDA context: {error}"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist reports this test as crashed and replaces the worker: a fresh context.
        print(f"\n{message}; this worker exits", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(86)
    raise RuntimeError(f"{message}; the later GPU tests of this process are skipped")
