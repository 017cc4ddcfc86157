"""Showing results: a rich table per op (terminal), a PNG plot per op (matplotlib), and
Markdown tables (the README). Everything here reads the results dict, so recorded runs
(benchmarks/results/<device>/bench.json) render the same way as fresh ones."""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _short(x: float) -> str:
    for div, suffix, at_least in ((1e9, "G", 1e9), (1e6, "M", 1e6), (1e3, "K", 1e5)):
        if abs(x) >= at_least:
            return f"{x / div:.3g}{suffix}"
    return f"{x:g}"


def provider_order(results: dict, op: str) -> list[str]:
    """Providers in the op's order, those with at least one row."""
    present = {r["provider"] for r in results["rows"] if r["op"] == op}
    return [p for p in results["ops"][op]["providers"] if p in present]


def _cases(results: dict, op: str) -> OrderedDict:
    """(variant, size_label) -> {provider: row}, in run order."""
    out: OrderedDict = OrderedDict()
    for r in results["rows"]:
        if r["op"] == op:
            out.setdefault((r["variant"], r["size_label"]), {})[r["provider"]] = r
    return out


def ceiling_text(results: dict, op: str) -> str:
    info = results["ops"][op]
    c = results["ceilings"][info["ceiling"]]
    return f"{c['value']:.4g} {c['unit']}"


def print_tables(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        width = shutil.get_terminal_size((170, 40)).columns
        console = Console(width=max(150, width))
    env = results["environment"]
    if results.get("note"):
        console.print(f"[bold yellow]{results['note']}[/]")
    console.print(
        f"[bold]{env['device_name']}[/]  torch {env['torch']}  triton {env['triton']}  "
        f"CUDA {env['cuda_runtime']}  commit {str(results['code'].get('commit'))[:10]}"
        f"{' (dirty)' if results['code'].get('dirty') else ''}")
    if results["device"] == "cpu":
        load = env.get("load_average")
        console.print(f"CPU threads: {results.get('settings', {}).get('cpu_threads')}"
                      + (f", load average at the start: {load[0]:.2f}" if load else ""))
    ceil = results["ceilings"]
    console.print(f"ceilings: copy {ceil['bandwidth']['value']:.4g} GB/s, "
                  f"matmul {ceil['matmul']['value']:.4g} TFLOP/s ({ceil['matmul']['dtype']})")
    for op, info in results["ops"].items():
        gpt = op == "gpt"
        # GPU rows of an op that records it (linear_cross_entropy): its point is the memory
        peak = any(r.get("peak_memory_bytes") is not None for r in results["rows"]
                   if r["op"] == op)
        table = Table(
            title=f"{op}: {info['metric']}, % of the measured {info['ceiling']} ceiling "
                  f"({ceiling_text(results, op)}), x eager = torch-eager time / time",
            title_justify="left", show_lines=False)
        table.add_column("variant")
        table.add_column("size")
        table.add_column("provider")
        table.add_column("median ms", justify="right")
        table.add_column("p20-p80 ms", justify="right")
        if gpt:
            table.add_column("tokens/s", justify="right")
        if peak:
            table.add_column("peak GiB", justify="right")
        table.add_column(info["metric"], justify="right")
        table.add_column("% ceil", justify="right")
        table.add_column("x eager", justify="right")
        table.add_column("note")
        order = provider_order(results, op)
        cases = _cases(results, op)
        for n, ((variant, size), by_provider) in enumerate(cases.items()):
            for j, name in enumerate(p for p in order if p in by_provider):
                r = by_provider[name]
                if r["status"] == "ok":
                    t = r["time_ms"]
                    ratio = r["ratio_to_eager"]
                    style = ("green" if ratio and ratio > 1.05
                             else "red" if ratio and ratio < 0.95 else "")
                    cells = [_fmt(t["median"], 4), f"{_fmt(t['p20'])}-{_fmt(t['p80'])}"]
                    if gpt:
                        cells.append(_fmt(r.get("tokens_per_s")))
                    if peak:
                        peak_bytes = r.get("peak_memory_bytes")
                        cells.append(_fmt(peak_bytes / 2**30) if peak_bytes is not None else "-")
                    shown = f"{ratio:.2f}x" if ratio is not None else "-"
                    err = r.get("rel_err_vs_eager")
                    note = f"[red]rel err {err:.2g} vs eager[/]" if err is not None and err > 0.02 \
                        else ""
                    cells += [_fmt(r["value"]), _fmt(r["pct_of_ceiling"], 2),
                              f"[{style}]{shown}[/]" if style else shown, note]
                else:
                    reason = escape((r["reason"] or "")[:96])
                    cells = [f"[dim]{r['status']}[/]"] + [""] * (4 + gpt + peak) + \
                        [f"[dim]{reason}[/]"]
                table.add_row(variant if j == 0 else "", size if j == 0 else "", name, *cells,
                              end_section=j == len([p for p in order if p in by_provider]) - 1
                              and n < len(cases) - 1)
        console.print(table)
        unavailable = {k: v["reason"] for k, v in info["providers"].items() if not v["available"]}
        for name, reason in unavailable.items():
            console.print(f"  [dim]{name}: not run: {escape(reason)}[/]")
        for note in info.get("notes", []):
            console.print(f"  [yellow]{escape(note)}[/]")
    s = results["summary"]
    console.print(f"{s['ok']} measured, {s['error']} errors, {s['unsupported']} unsupported, "
                  f"{s['skipped']} skipped in {s['elapsed_s']:.1f} s")


def plot_op(results: dict, op: str, path: str | os.PathLike) -> Path | None:
    """One PNG for ``op``: a panel per variant, x = size, y = the op's metric, one line per
    provider, the measured ceiling dashed. None when the op has no measured row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = results["ops"][op]
    rows = [r for r in results["rows"] if r["op"] == op and r["status"] == "ok"]
    if not rows:
        return None
    variants = [v for v in info["variants"] if any(r["variant"] == v for r in rows)]
    ncols = min(2, len(variants))
    nrows = (len(variants) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows), squeeze=False)
    ceiling = results["ceilings"][info["ceiling"]]["value"]
    order = provider_order(results, op)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(order)}
    for ax, variant in zip(axes.flat, variants, strict=False):
        for name in order:
            pts = sorted((r["x"], r["value"]) for r in rows
                         if r["variant"] == variant and r["provider"] == name)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=name, color=colors[name],
                        linewidth=2.4 if name.startswith("fusedlm") else 1.4,
                        linestyle="-" if name != "torch-eager" else "--")
        ax.axhline(ceiling, color="black", linestyle=":", linewidth=1.2,
                   label=f"measured ceiling ({ceiling:.4g} {info['metric']})")
        xs = sorted({r["x"] for r in rows if r["variant"] == variant})
        if len(xs) > 1 and xs[-1] / max(xs[0], 1e-9) >= 4:
            ax.set_xscale("log")
        ax.set_xticks(xs, [_short(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(info["x_name"])
        ax.set_ylabel(info["metric"])
        ax.set_title(variant, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    env = results["environment"]
    fig.suptitle(f"fusedlm bench: {op} on {env['device_name']} (torch {env['torch']})",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    written = []
    for op in results["ops"]:
        p = plot_op(results, op, Path(out_dir) / f"{op}.png")
        if p is not None:
            written.append(p)
    return written


def markdown(results: dict, image_dir: str | None = None) -> str:
    """A Markdown section for one recorded run: a table per op (cells: metric value and
    ratio to eager PyTorch) and, with ``image_dir``, the op's plot."""
    env, code = results["environment"], results["code"]
    ceil = results["ceilings"]
    trees = ", ".join(f"`{k}` {str(v.get('worktree') or v.get('head'))[:10]}"
                      for k, v in code.get("kernel_trees", {}).items())
    lines = [
        f"### {env['device_name']}",
        "",
        f"Recorded {results['created_utc']}{' (--quick)' if results['quick'] else ''}: "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda_runtime']}, "
        f"commit `{str(code.get('commit'))[:10]}`{' (dirty)' if code.get('dirty') else ''}; "
        f"kernel trees {trees}. Measured ceilings: copy {ceil['bandwidth']['value']:.4g} GB/s, "
        f"matmul {ceil['matmul']['value']:.4g} TFLOP/s ({ceil['matmul']['dtype']}).",
        "",
    ]
    if results["device"] == "cpu":
        threads = results.get("settings", {}).get("cpu_threads", env.get("cpu_threads"))
        load = env.get("load_average")
        lines += [f"CPU run with {threads} thread(s)"
                  + (f"; load average {load[0]:.2f} at the start (other work on the machine "
                     "skews CPU timings)" if load else "") + ".", ""]
    if results.get("note"):
        lines += [f"_{results['note']}_", ""]
    # Added to a recorded run afterwards, when something about it was found wrong.
    for caveat in results.get("caveats", []):
        lines += [f"**Caveat:** {caveat}", ""]
    for op, info in results["ops"].items():
        order = [p for p in provider_order(results, op)
                 if any(r["provider"] == p and r["status"] == "ok" and r["op"] == op
                        for r in results["rows"])]
        cases = _cases(results, op)
        if not order:
            reason = "; ".join(info.get("notes", [])) or "no measured rows"
            lines += [f"**{op}**: {reason}", ""]
            continue
        lines += [f"**{op}** ({info['metric']}; in brackets: speed-up over torch-eager; "
                  f"ceiling {ceiling_text(results, op)})", ""]
        lines.append("| variant | size | " + " | ".join(order) + " |")
        lines.append("|---|---|" + "---:|" * len(order))
        for (variant, size), by_provider in cases.items():
            cells = []
            for name in order:
                r = by_provider.get(name)
                if r is None or r["status"] != "ok":
                    cells.append("-" if r is None else r["status"])
                else:
                    ratio = r["ratio_to_eager"]
                    cells.append(f"{_fmt(r['value'])} ({ratio:.2f}x)" if ratio is not None
                                 else _fmt(r["value"]))
            lines.append(f"| {variant} | {size} | " + " | ".join(cells) + " |")
        lines.append("")
        if image_dir is not None:
            lines += [f"![{op}]({image_dir}/{op}.png)", ""]
    return "\n".join(lines)
