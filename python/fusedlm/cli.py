"""The ``fusedlm`` command: ``info`` (what this install can run and why), ``train``,
``sample``, ``prepare`` (fusedlm.train.cli) and ``bench`` (fusedlm.bench.cli)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import fusedlm
    from fusedlm import _ext

    report = fusedlm.backends()
    extension = _ext.load()
    facts = {
        "fusedlm": fusedlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "extension": "loaded" if extension is not None else _ext.why_unavailable(),
        "cpu_kernel_isa": _cpu_kernel_isa(extension),
        "extension_cuda_kernels": list(extension.cuda_ops()) if extension is not None else [],
        # (None: no extension, a CPU build, or a build from before it recorded them)
        "cuda_architectures": getattr(extension, "cuda_architectures", str)() or None,
        "backends": {
            name: {"available": b.available, "reason": b.reason, "ops": list(b.ops)}
            for name, b in report.items()
        },
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for key, value in facts.items():
        if key != "backends":
            print(f"{key:<24}{value}")
    print("\nbackends:")
    print(report)
    return 0


def _cpu_kernel_isa(extension) -> str | None:
    """The instruction set the CPU kernels use, and the CPU's best when FUSEDLM_CPU_ISA caps it."""
    if extension is None:
        return None
    used, best = extension.cpu_isa(), extension.cpu_isa_detected()
    return used if used == best else f"{used} (capped by FUSEDLM_CPU_ISA; the CPU has {best})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fusedlm",
        description="fusedlm: fused attention, LayerNorm/RMSNorm and AdamW kernels, a GPT "
        "trainer and benchmarks. Each command has --help.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices and which backends work here")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)
    # Each package owns its subcommands: add_commands(subparsers) adds parsers whose ``run``
    # imports the heavy parts only when the command runs.
    for module in ("fusedlm.train.cli", "fusedlm.bench.cli"):
        importlib.import_module(module).add_commands(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
