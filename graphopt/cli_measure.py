"""Commands that measure on the target's device: ``graphopt calibrate`` (fit the cost
model to micro-benchmarks) and ``graphopt profile`` (time each kernel of a model)."""

from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pathlib import Path

from graphopt import api

out = Console(highlight=False)


@click.command("calibrate")
@click.option("-t", "--target", default=api.DEFAULT_TARGET, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Threads the target runs with "
              "(default: the target's own; ORT: every core).")
@click.option("--quick", is_flag=True, help="Fewer probes: seconds instead of a minute.")
@click.option("--passes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Time every probe in this many passes, its fastest kept: steadier on "
                   "a shared machine, whose speed drifts for tens of seconds at a time.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def calibrate(target, threads, quick, passes, as_json, quiet):
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

        cal, path = api.calibrate(target, threads=threads, quick=quick, progress=progress,
                                  passes=passes)
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"path": str(path), "seconds": seconds, **cal.to_dict()},
                              indent=2))
        return
    out.print(f"calibrated [bold]{escape(cal.fingerprint.get('target', target))}[/] on "
              f"{escape(str(cal.fingerprint.get('cpu')))} in {seconds:.1f} s: "
              f"{len(cal.probes)} probes, per-inference {cal.base_s * 1e6:.1f} µs, "
              f"per-node {cal.node_overhead_s * 1e6:.2f} µs")
    if cal.cold_s_per_byte:
        out.print(f"weights beyond {cal.cache_bytes / 2 ** 20:.1f} MiB leave the cache: "
                  f"matrix products then take {cal.cold_s_per_byte * 2 ** 20 * 1e6:.1f} µs "
                  "more per MiB of weights")
    table = Table(title="measured / roofline, by op class (smallest to largest probe)")
    for col in ("op class", "probes", "correction"):
        table.add_column(col)
    for key, points in sorted(cal.points.items()):
        table.add_row(key, str(len(points)), "  ".join(f"{p[1]:.2f}" for p in points))
    out.print(table)
    out.print(f"stored in {escape(str(path))}")


@click.command("profile")
@click.argument("model", type=click.Path(readable=False, path_type=Path))
@click.option("-t", "--target", default=api.DEFAULT_TARGET, show_default=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.npz, arrays named like the model inputs); the first batch runs.")
@click.option("--input-shape", multiple=True, help="NAME=1x3x224x224 for probe inputs.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads the target runs with.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Heaviest kernels shown.")
@click.option("--rpc", metavar="HOST:PORT[:KEY]", help="Profile on a remote device (TVM "
              "targets: an RPC server, or a tracker and device key).")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile(model, target, data, input_shape, threads, runs, top, rpc, as_json):
    """Measured time per kernel and per op type on the target, beside the cost model's
    estimate, with each heavy kernel's roofline position (compute- or memory-bound,
    fraction of the device's peak) and memory."""
    from graphopt.cli import _load_data, _parse_shapes

    result = api.profile(model, target, data=_load_data(data),
                         input_shapes=_parse_shapes(input_shape), threads=threads, runs=runs,
                         rpc=rpc)
    if as_json:
        click.echo(json.dumps(result.to_dict(top=top), indent=2, default=float))
        return
    estimate = "calibrated estimate" if result.cost_model.get("calibrated") else \
        "roofline estimate (uncalibrated: graphopt calibrate)"
    out.print(f"[bold]{escape(str(model))}[/] on {escape(result.device)} "
              f"({escape(result.target)}), inputs {result.input_shapes}: measured "
              f"{result.run_s * 1e3:,.3f} ms per run (median of {runs}), {estimate} "
              f"{result.estimated_s * 1e3:,.3f} ms")
    by_op = Table(title="per op type (as the runtime ran them)")
    for col in ("op", "kernels", "measured ms", "share", "estimated ms"):
        by_op.add_column(col, justify="left" if col == "op" else "right")
    for op, row in result.by_op().items():
        est = row["estimated_s"]
        by_op.add_row(escape(op), str(row["count"] or ""), f"{row['measured_s'] * 1e3:,.3f}",
                      f"{row['measured_s'] / result.run_s:.1%}" if result.run_s else "",
                      "" if est is None else f"{est * 1e3:,.3f}")
    out.print(by_op)
    heavy = Table(title=f"heaviest {top} kernels")
    for col in ("kernel", "op", "measured µs", "estimated µs", "bound", "of peak"):
        heavy.add_column(col, justify="left" if col in ("kernel", "op", "bound") else "right")
    for k in sorted(result.kernels, key=lambda k: -k.measured_s)[:top]:
        heavy.add_row(escape(k.name), escape(k.op), f"{k.measured_s * 1e6:,.1f}",
                      "" if k.estimated_s is None else f"{k.estimated_s * 1e6:,.1f}",
                      k.bound or "", "" if k.of_peak is None else f"{k.of_peak:.0%}")
    out.print(heavy)
    out.print(f"memory: weights {result.weight_bytes / 2**20:,.2f} MiB, peak activations "
              f"{result.peak_activation_bytes / 2**20:,.2f} MiB (estimated from tensor "
              f"lifetimes), this process's peak RSS {(result.peak_rss_bytes or 0) / 2**20:,.0f} MiB")
