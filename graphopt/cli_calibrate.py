"""``graphopt calibrate``: measure the target's device so the cost model predicts it."""

from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from graphopt import api

out = Console(highlight=False)


@click.command("calibrate")
@click.option("-t", "--target", default=api.DEFAULT_TARGET, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Threads the target runs with "
              "(default: the target's own; ORT: every core).")
@click.option("--quick", is_flag=True, help="Fewer probes: seconds instead of a minute.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def calibrate(target, threads, quick, as_json, quiet):
    """Time micro-benchmarks on the target's device and fit the cost model to them.

    The calibration is stored per device (CPU model, ISA flags, threads, runtime version)
    in graphopt's cache folder ($GRAPHOPT_CACHE_DIR, else ~/.cache/graphopt); optimize and
    inspect use it from then on, and their reports say so."""
    start = time.perf_counter()
    show = not (quiet or as_json) and sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), disable=not show,
                  transient=True) as bar:
        task = bar.add_task("calibrating", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"probe {name}")

        cal, path = api.calibrate(target, threads=threads, quick=quick, progress=progress)
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"path": str(path), "seconds": seconds, **cal.to_dict()},
                              indent=2))
        return
    out.print(f"calibrated [bold]{escape(cal.fingerprint.get('target', target))}[/] on "
              f"{escape(str(cal.fingerprint.get('cpu')))} in {seconds:.1f} s: "
              f"{len(cal.probes)} probes, per-inference {cal.base_s * 1e6:.1f} µs, "
              f"per-node {cal.node_overhead_s * 1e6:.2f} µs")
    table = Table(title="measured / roofline, by op class (smallest to largest probe)")
    for col in ("op class", "probes", "correction"):
        table.add_column(col)
    for key, points in sorted(cal.points.items()):
        table.add_row(key, str(len(points)), "  ".join(f"{f:.2f}" for _, f in points))
    out.print(table)
    out.print(f"stored in {escape(str(path))}")
