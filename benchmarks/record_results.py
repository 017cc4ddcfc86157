"""Records a run in the repository: copies bench.json, the PNG plots and gpu_check.json (when
there) from a ``fusedlm bench --out`` or ``benchmarks/gpu_check`` folder into
benchmarks/results/<device>/, replacing that device's previous run (an op's plot the folder
lacks is drawn from bench.json), then re-renders the README's benchmark section.

    python benchmarks/record_results.py gpu_check_out
    python benchmarks/record_results.py bench-out --device-dir cpu-amd-epyc-2c
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _draw_missing_plots(results: dict, dest: Path) -> list[str]:
    """The plots of the ops that came without one (benchmarks/gpu_check brings back at most 5
    PNGs), drawn from bench.json; none without matplotlib."""
    from fusedlm.bench import report

    missing = [op for op in results["ops"] if not (dest / f"{op}.png").exists()]
    if not missing:
        return []
    try:
        import matplotlib  # noqa: F401 - the bench extra
    except ImportError:
        print(f"matplotlib is not installed: no plot for {', '.join(missing)}", file=sys.stderr)
        return []
    return [path.name for op in missing
            if (path := report.plot_op(results, op, dest / f"{op}.png")) is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding bench.json")
    parser.add_argument("--device-dir", default=None,
                        help="folder name under benchmarks/results "
                             "(default: the run's device slug)")
    parser.add_argument("--no-readme", action="store_true", help="do not re-render README.md")
    args = parser.parse_args(argv)

    from fusedlm.bench.schema import validate

    bench = args.source / "bench.json"
    results = json.loads(bench.read_text())
    problems = validate(results)
    if problems:
        print(f"{bench} does not match its schema:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    name = args.device_dir or results["environment"]["device_slug"]
    dest = ROOT / "benchmarks" / "results" / name
    if dest.exists():
        for old in list(dest.glob("*.json")) + list(dest.glob("*.png")):
            old.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in [bench, *sorted(args.source.glob("*.png")), args.source / "gpu_check.json"]:
        if path.exists():
            shutil.copyfile(path, dest / path.name)
            copied.append(path.name)
    drawn = _draw_missing_plots(results, dest)
    print(f"recorded {', '.join(copied)} in {dest.relative_to(ROOT)}"
          + (f"; drew {', '.join(drawn)} from bench.json" if drawn else ""))
    if not args.no_readme:
        import render_readme

        return render_readme.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
