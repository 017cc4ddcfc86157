"""``fusedlm bench``: times every op against eager PyTorch and its peers, prints a table per
op, writes DIR/bench.json and one PNG per op. See fusedlm.bench and benchmarks/README.md.

Only argparse and the op list (cases.OPS; cases.py imports torch, which ``import fusedlm``
has loaded already) are imported here: ``fusedlm --help`` stays fast; rich, matplotlib and the
runner load when the command runs."""

from __future__ import annotations

import argparse
import math

from .cases import OPS

DESCRIPTION = ("Times each op against eager PyTorch and its peers (torch.compile, SDPA backends, "
               "torch's AdamW, Liger) and fusedlm's backends; prints a table per op and writes "
               "DIR/bench.json and one PNG plot per op.")


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _ops(value: str) -> tuple[str, ...]:
    items = _csv(value)
    unknown = [v for v in items if v not in OPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(OPS)}")
    return items


def _number(kind, lowest, inclusive: bool):
    """An argparse type: a finite ``kind`` >= lowest (> lowest unless ``inclusive``)."""
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number) or not (number >= lowest if inclusive else number > lowest):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>=' if inclusive else '>'} {lowest}, got {value}")
        return number
    return parse


def _ceilings(path: str) -> dict:
    """The ceilings of an earlier bench.json."""
    import json

    try:
        with open(path) as f:
            ceilings = json.load(f)["ceilings"]
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise argparse.ArgumentTypeError(f"{path} is not a bench.json with 'ceilings'") from None
    if not isinstance(ceilings, dict):
        raise argparse.ArgumentTypeError(f"{path}: 'ceilings' is not an object")
    return ceilings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=_ops, default=OPS, metavar="LIST",
                        help=f"comma-separated ops to run (default: {','.join(OPS)})")
    parser.add_argument("--quick", action="store_true",
                        help="a few small sizes (under a minute); default: the full sweep")
    parser.add_argument("--out", default="bench-out", metavar="DIR",
                        help="where bench.json and the PNG plots go (default: ./bench-out)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when there is one, else the CPU")
    parser.add_argument("--providers", type=_csv, default=None, metavar="LIST",
                        help="run only these providers (torch-eager, the baseline, always runs)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile rows (auto: on, except --quick on a CPU)")
    parser.add_argument("--warmup-ms", type=_number(float, 0, True), default=None,
                        help="untimed calls per row, in ms (default 25 GPU / 10 CPU; "
                             "less with --quick)")
    parser.add_argument("--rep-ms", type=_number(float, 0, False), default=None,
                        help="timed calls per row, in ms (default 100 GPU / 150 CPU; "
                             "40 with --quick)")
    parser.add_argument("--threads", type=_number(int, 1, True), default=None,
                        help="torch.set_num_threads for the CPU (default: torch's, all cores)")
    parser.add_argument("--budget-s", type=_number(float, 0, False), default=None,
                        help="time budget for the whole run; rows past it are recorded as skipped")
    parser.add_argument("--ceilings-from", type=_ceilings, default=None, metavar="JSON",
                        help="reuse the ceilings of an earlier bench.json instead of measuring")
    parser.add_argument("--no-plots", action="store_true", help="write no PNGs")
    parser.add_argument("--json-only", action="store_true", help="print no tables")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 if any row failed with an error")


def add_commands(commands) -> None:
    """Adds ``bench`` to the ``fusedlm`` subparsers."""
    parser = commands.add_parser(
        "bench", help="benchmark the kernels against eager PyTorch and peers",
        description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import json
    import sys
    from pathlib import Path

    from . import report, runner, schema

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"

    def write_partial(results: dict) -> None:  # a killed run still leaves its rows
        tmp = out / "bench.json.tmp"
        tmp.write_text(json.dumps({**results, "partial": True}, indent=1, default=str) + "\n")
        tmp.replace(path)

    opts = runner.Options(
        ops=tuple(args.ops), quick=args.quick, device=args.device,
        providers=tuple(args.providers) if args.providers else None, compile=args.compile,
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, budget_s=args.budget_s, threads=args.threads,
        ceilings=args.ceilings_from, argv=list(sys.argv if argv is None else argv),
        progress=write_partial,
    )
    results = runner.run(opts)
    problems = schema.validate(results)
    if problems:  # a harness bug: still write what was measured, and say so
        results["schema_problems"] = problems
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    plots = [] if args.no_plots else report.write_plots(results, out)
    if not args.json_only:
        report.print_tables(results)
    print(f"wrote {path}" + (f" and {len(plots)} plot(s): " + ", ".join(p.name for p in plots)
                             if plots else ""))
    if problems:
        print("bench.json does not match its schema:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.strict and results["summary"]["error"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedlm bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(args, argv=["fusedlm", "bench", *(argv or [])])


if __name__ == "__main__":
    raise SystemExit(main())
