"""What a benchmark ran on, and which code: device, versions, commit, kernel tree hashes.

The kernels live in ``csrc/`` and ``python/fusedlm/triton/``; each result is stamped with the
git tree hash of both. :func:`tree_hash` computes that hash from the files on disk, the way
``git write-tree`` would (so it needs no git and matches ``git rev-parse HEAD:csrc`` when the
working tree is clean); when git is there the HEAD hashes and a dirty flag are added.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path

KERNEL_DIRS = ("csrc", "python/fusedlm/triton")
# Never tracked (.gitignore): left out of the working-tree hash.
_IGNORED_NAMES = {"__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".so", ".o", ".egg-info")


def repo_root() -> Path | None:
    """The source checkout fusedlm was imported from (the directory holding csrc/), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "csrc").is_dir() and (parent / "python" / "fusedlm").is_dir():
            return parent
    return None


def _git_object_hash(kind: str, data: bytes) -> bytes:
    return hashlib.sha1(f"{kind} {len(data)}\0".encode() + data).digest()


def tree_hash(path: str | os.PathLike) -> str | None:
    """git's tree hash of directory ``path`` as it is on disk (ignored files left out);
    None when it does not exist or holds no files."""
    digest = _tree_digest(Path(path))
    return digest.hex() if digest is not None else None


def _tree_digest(path: Path) -> bytes | None:
    if not path.is_dir():
        return None
    entries = []
    for child in path.iterdir():
        name = child.name
        if name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES) or name == ".git":
            continue
        if child.is_symlink():
            entries.append((name, b"120000", _git_object_hash("blob", os.readlink(child).encode())))
        elif child.is_dir():
            sub = _tree_digest(child)
            if sub is not None:  # git has no empty directories
                entries.append((name + "/", b"40000", sub))
        elif child.is_file():
            mode = b"100755" if os.access(child, os.X_OK) else b"100644"
            entries.append((name, mode, _git_object_hash("blob", child.read_bytes())))
    if not entries:
        return None
    entries.sort(key=lambda e: e[0].encode())  # git sorts directories as "name/"
    body = b"".join(mode + b" " + name.rstrip("/").encode() + b"\0" + digest
                    for name, mode, digest in entries)
    return _git_object_hash("tree", body)


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_stamp(root: Path | None = None) -> dict:
    """commit, dirty flag, and the tree hash of each kernel directory (HEAD's and on disk)."""
    root = repo_root() if root is None else root
    stamp: dict = {"commit": None, "dirty": None, "kernel_trees": {}, "source": None}
    if root is None:
        stamp["source"] = "no source checkout (installed package)"
        return stamp
    stamp["source"] = str(root)
    commit = _git(root, "rev-parse", "HEAD")
    stamp["commit"] = commit
    if commit is not None:
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        stamp["dirty"] = bool(status) if status is not None else None
    for rel in KERNEL_DIRS:
        head = _git(root, "rev-parse", f"HEAD:{rel}") if commit is not None else None
        on_disk = tree_hash(root / rel)
        stamp["kernel_trees"][rel] = {
            "head": head,
            "worktree": on_disk,
            "matches_head": (head == on_disk) if head is not None else None,
        }
    if commit is None:
        stamp["note"] = "git or .git not available here: commit unknown; worktree hashes are " \
                        "git tree hashes computed from the files"
    return stamp


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def llc_bytes() -> int:
    """The CPU's largest cache (bytes), for input rotation; 32 MiB when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20,
                                                "G": 1 << 30}[m.group(2)])
    return best or 32 << 20


def _cpu_kernel_isa() -> str | None:
    from fusedlm import _ext

    extension = _ext.load()
    return extension.cpu_isa() if extension is not None else None


def environment(device) -> dict:
    """Versions and the device (``device``: a torch.device)."""
    import torch

    import fusedlm

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken
        triton_version = None
    env = {
        "fusedlm": fusedlm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_kernel_isa": _cpu_kernel_isa(),  # FUSEDLM_CPU_ISA can cap it: it changes timings
        "load_average": _load_average(),  # at the start: a busy machine skews CPU timings
        "gpu_found": torch.cuda.is_available(),
        "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_slug=slug(props.name),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
            driver=_nvidia_driver(),
        )
    else:
        env.update(device_name=f"CPU: {cpu_name()} ({os.cpu_count()} cores)",
                   device_slug="cpu-" + slug(cpu_name()) + f"-{os.cpu_count()}c",
                   last_level_cache_bytes=llc_bytes())
    try:
        report = fusedlm.backends()
        env["backends"] = {name: {"available": b.available, "reason": b.reason,
                                  "ops": list(b.ops)} for name, b in report.items()}
    except Exception as error:  # noqa: BLE001 - the report must never stop a benchmark
        env["backends"] = {"error": repr(error)}
    return env


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
