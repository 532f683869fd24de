"""The ``graphopt`` command line: a thin layer over ``graphopt.api``.

Exit codes: 0 success; 2 usage error; 3 unreadable or invalid model; 4 verification
failed. Errors are one line plus a hint; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt import api, config, html_report, paths, verify
from graphopt.cli_measure import calibrate, profile
from graphopt.cli_summary import artifact_lines, print_summary
from graphopt.errors import GraphoptError, UsageError
from graphopt.lossy import schemes
from graphopt.manager import TraceEntry
from graphopt.pass_infra import Pass, option_fields
from graphopt.registry import create_target, pass_registry, target_registry

err = Console(stderr=True)
out = Console()


class _App(click.Group):
    """Maps graphopt errors to exit codes and one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GraphoptError as exc:
            if ctx.obj and ctx.obj.get("debug"):  # the traceback, and still the exit code
                traceback.print_exc()
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            if exc.hint:
                err.print(f"hint: {escape(exc.hint)}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_App)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(api.graphopt_version(), prog_name="graphopt")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """graphopt: optimize ONNX models for a target, verified against the original."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]] | None:
    shapes = {}
    for value in values:
        name, eq, dims = value.rpartition("=")
        try:
            if not eq or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise UsageError(f"cannot parse --input-shape {value!r}: dimensions are positive "
                             f"integers", hint="write NAME=1x3x224x224") from None
    verify.check_shapes(shapes)
    return shapes or None


def _parse_target_options(values) -> dict[str, str] | None:
    options = {}
    for value in values:
        key, eq, setting = str(value).partition("=")
        if not eq or not key.strip() or not setting.strip():
            raise UsageError(f"cannot parse --target-option {value!r}",
                             hint="write KEY=VALUE, e.g. io_layout=nhwc")
        options[key.strip().replace("-", "_")] = setting.strip()
    return options or None


def _load_data(path: str | None) -> list[verify.Feeds] | None:
    return verify.load_feeds(path) if path else None


class _Progress:
    """Instrument that shows which pass is running and how far a long step is, with the
    time left (a status line on stderr: shown only on a terminal)."""

    def __init__(self, status):
        self.status = status
        self.started: dict[str, float] = {}

    def before_pass(self, p: Pass, iteration: int) -> None:
        self.status.update(f"iteration {iteration}: {p.name}")

    def progress(self, what: str, done: int, total: int) -> None:
        """``api.optimize``'s ``progress``: e.g. "prune-ffn: damage of each site alone:
        12/48, about 3 min left" (counts only when the total is not known ahead)."""
        now = time.monotonic()
        if done == 0 or what not in self.started:
            self.started[what] = now
        text = f"{what}: {done}/{total}" if total else f"{what}: {done}"
        if total and 0 < done < total:
            text += f", about {_duration((now - self.started[what]) / done * (total - done))}" \
                    " left"
        self.status.update(escape(text))

    def after_pass(self, p: Pass, entry: TraceEntry) -> None:
        if entry.status == "rolled-back":
            err.print(f"[yellow]rolled back[/] {p.name}: {escape(entry.reason)}", highlight=False)


class _Silent:
    """A status line that shows nothing (``--quiet``)."""

    def update(self, text: str) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.0f} min"


# MODEL arguments are checked by graphopt.ir.load (a folder or unreadable file: exit 3).
@main.command()
@click.argument("model", type=click.Path(readable=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Where to write the result (an .onnx file for --target ort).")
@click.option("-t", "--target", default=api.DEFAULT_TARGET, show_default=True,
              help="Target to optimize for (see `graphopt targets`).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads the target runs "
              "with (checks, timings, the planner; default: the target's own, ORT: every "
              "core).")
@click.option("--target-option", "target_option", multiple=True, metavar="KEY=VALUE",
              help="A setting of the target's artifact, e.g. --target-option io_layout=nhwc "
              "for litert (`graphopt targets --long` lists each target's); repeatable.")
@click.option("-p", "--passes", help="Pipeline instead of the target's, e.g. "
              "'fold-constants,eliminate-dead-code'.")
@click.option("--skip", help="Comma-separated passes to leave out.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report here: an HTML page when the name ends in .html or "
              ".htm, else JSON.")
@click.option("--strict", is_flag=True, help="Fail if any pass is rolled back.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.npz) to verify on instead of random probe inputs.")
@click.option("--input-shape", multiple=True, help="NAME=1x3x224x224 for probe inputs.")
@click.option("--rtol", type=float, default=1e-4, show_default=True)
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--calibration-data", help="Calibration inputs: an .npz (first axis = "
              "samples), a folder of .npy/.npz files, or module:function.")
@click.option("--validation-data", help="Inputs the accuracy is measured on (same forms; "
              "default: the calibration data).")
@click.option("--tolerance", type=float, help="Accuracy budget of lossy passes: the "
              "lowest --metric score allowed (default 0.99).")
@click.option("--metric", help="Accuracy metric of lossy passes: cosine (minimum per-sample "
              "output cosine, default), mean-cosine, top1, or module:function.")
@click.option("--goal", type=click.Choice(list(api.GOALS)),
              help="What compression saves first: latency (the target's cost model; the "
              "default), flops, size or balanced. Given without a lossy scheme, the "
              "planner chooses the schemes (see --plan).")
@click.option("--plan", "plan", is_flag=True, default=None,
              help="Choose among the lossy schemes (those named, else every installed one "
              "the target runs) by measuring candidate combinations on the data and the "
              "target; the best for --goal within the budget is written. Needs "
              "--calibration-data.")
@click.option("--workers", metavar="N|ray://HOST:PORT",
              help="Build the planner's candidates on Ray: N local worker processes, or an "
              "existing cluster (needs graphopt[ray]); they are timed here.")
@click.option("--recover", "recover", metavar="PASS", is_flag=False, flag_value="recover",
              default="recover", show_default=True,
              help="The recovery pass each compressed candidate gets: recover (least-squares "
              "re-fit to the original's outputs on the calibration data), finetune "
              "(re-fit, then distillation; needs graphopt[train]), or a plugin's, with "
              "options: 'finetune(steps=2000)'.")
@click.option("--no-recover", is_flag=True, help="No recovery of compressed candidates.")
@click.option("--replay", type=click.Path(dir_okay=False, path_type=Path),
              metavar="REPORT.json", help="Apply the compression settings this report "
              "(--report R.json of an earlier run) lists instead of searching them: the "
              "same schemes and data options, one model built and checked.")
@click.option("--finetune-steps", type=click.IntRange(min=1),
              help="Step budget of --recover finetune (default 1000).")
@click.option("--finetune-time", type=click.FloatRange(min=0, min_open=True),
              help="Time budget of --recover finetune, in seconds per candidate.")
@click.option("--measure", is_flag=True, help="Time quantized variants in ONNX Runtime "
              "and keep the fastest that meets the budget.")
@click.option("--format", "format_", type=click.Choice(["onnx", "ort"]),
              help="Artifact format of --target ort: onnx (default) or ort (ONNX Runtime's "
              ".ort file, plus OUT.session.json with the session options it expects).")
@click.option("--verify/--no-verify", "verify_", default=None,
              help="Run the written artifact, compare it with ONNX Runtime on the original "
              "and time both. Default: on for compiled targets where the artifact runs here.")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0,
              help="Kernel tuning budget (measured trials) of tunable targets (TVM); the "
              "database is kept beside the artifact and reused.")
@click.option("--rpc", metavar="HOST:PORT[:KEY]", help="Run (and tune) on a remote device "
              "through the target's RPC: an RPC server, or a tracker with KEY.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary (errors "
              "still go to stderr; the exit code says how it went).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout "
              "instead of the summary.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Reuse a stored result of the same model and options (and store new "
                   "ones) in this folder.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Options from this file (graphopt.toml, or pyproject.toml's "
              "[tool.graphopt]); default: graphopt.toml beside MODEL, else the nearest "
              "pyproject.toml with [tool.graphopt]. Flags given here win.")
@click.pass_context
def optimize(ctx, model, config_path, **_):
    """Optimize MODEL for a target and write the verified result to OUTPUT.

    Lossy schemes (--quantize, --prune, ...) are declared by the installed passes; each
    takes a comma-separated list of values (see `graphopt passes --long`). Every option
    can come from a config file instead (see --config)."""
    found = config.find(model, config_path)
    options = config.merge(ctx, found)
    options["config_path"] = found.path if found else None
    if options.get("output") is None:
        raise UsageError("no output: give -o/--output (or output in the config file)")
    _optimize(**options)


def _optimize(model, output, target, threads, passes, skip, report_path, strict, data, input_shape,
              rtol, atol, seed, calibration_data, validation_data, tolerance, metric, goal,
              plan, workers, recover, no_recover, finetune_steps, finetune_time, measure, format_,
              verify_, tune_trials, rpc, config_path, cache_dir, quiet=False, as_json=False,
              target_option=(), replay=None, **scheme_values):
    # Before any work: no output may overwrite an input or another output, and each can
    # be written; then everything is staged and moved into place at the end, or nothing.
    inputs = paths.input_files(model, data=data, calibration=calibration_data,
                               validation=validation_data, replay=replay)
    if config_path is not None:
        inputs.append(("the config file", Path(config_path)))
    paths.check_outputs(inputs, output, report_path)
    feeds, shapes = _load_data(data), _parse_shapes(input_shape)
    recovery = None if no_recover or not recover else \
        _recovery(recover, finetune_steps, finetune_time)
    with paths.Staging(output, report_path) as staging, \
            (_Silent() if quiet else err.status("loading", spinner="dots")) as status:
        shown = _Progress(status)
        result = api.optimize(
            model, target=target, threads=threads, passes=passes,
            output=staging.staged_output, strict=strict,
            skip=[s.strip() for s in skip.split(",") if s.strip()] if skip else (),
            data=feeds, input_shapes=shapes,
            tolerance=(tolerance, verify.Tolerance(rtol=rtol, atol=atol))
            if tolerance is not None else verify.Tolerance(rtol=rtol, atol=atol), seed=seed,
            instruments=[shown], progress=shown.progress, calibration=calibration_data,
            validation=validation_data, measure=measure, format=format_,
            verify_artifact=verify_, tune_trials=tune_trials, rpc=rpc,
            schemes={_SCHEME_FLAGS[k]: [v.strip() for v in value.split(",") if v.strip()]
                     for k, value in scheme_values.items() if value},
            metric=metric, goal=goal, plan=plan, workers=workers, recovery=recovery,
            cache_dir=cache_dir, target_options=_parse_target_options(target_option),
            replay=replay)
        report = staging.final_paths(result.report)
        staging.commit(_report_text(report, report_path) if report_path else None)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))
    elif not quiet:
        print_summary(report)


def _report_text(report: dict, path: Path) -> str:
    """The report as written to ``path``: an HTML page for a .html/.htm name (rendered
    from the JSON text, so its numbers are the JSON's), else the JSON."""
    text = json.dumps(report, indent=2, default=float)
    return html_report.render(json.loads(text)) if html_report.is_html(path) else text


def _recovery(spec: str, steps: int | None, seconds: float | None) -> str:
    """The recovery pass spec with the --finetune-* budgets added to its options."""
    if steps is None and seconds is None:
        return spec
    name, _, rest = spec.partition("(")
    if name.strip() != "finetune":
        raise UsageError("--finetune-steps and --finetune-time need --recover finetune")
    given = {"steps": steps, "time": seconds}
    options = [o for o in rest.rstrip(")").split(",") if o.strip() and
               given.get(o.partition("=")[0].strip().replace("-", "_")) is None]  # flags win
    options += [f"steps={steps}"] if steps is not None else []
    options += [f"time={seconds}"] if seconds is not None else []
    return f"finetune({','.join(options)})"


def _add_scheme_options(command: click.Command) -> dict[str, str]:
    """One option per scheme flag the installed passes declare (``--quantize``,
    ``--prune``, ...); returns {click parameter name: flag}."""
    flags = {}
    for flag, table in sorted(schemes(pass_registry()).items()):
        param = flag.replace("-", "_")
        flags[param] = flag
        command.params.insert(-12, click.Option(
            [f"--{flag}"], help=f"Append lossy passes: {', '.join(table)} (comma-separated, "
                                f"or all) -> {', '.join(table.values())}."))
    return flags


_SCHEME_FLAGS = _add_scheme_options(optimize)


@main.command("verify")
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("-r", "--reference", type=click.Path(readable=False, path_type=Path),
              help="The original model (default: the model.onnx the artifact was built from).")
@click.option("-t", "--target", help="Target of a single-file artifact (default: the "
              "manifest's, else ort).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.npz) to run instead of random probe inputs.")
@click.option("--input-shape", multiple=True, help="NAME=1x3x224x224 for probe inputs.")
@click.option("--rtol", type=float, default=1e-4, show_default=True)
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--tolerance", type=float, help="Compare by minimum output cosine instead "
              "(quantized artifacts).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--rpc", metavar="HOST:PORT[:KEY]", help="Run on a remote device.")
@click.option("--no-timing", is_flag=True, help="Do not time the artifact and ORT.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(artifact, reference, target, data, input_shape, rtol, atol, tolerance, seed,
               rpc, no_timing, as_json):
    """Run ARTIFACT (a folder written by optimize, or a model file) and compare it with
    ONNX Runtime on the original model (exit 4 when they differ)."""
    given = click.get_current_context().get_parameter_source
    float_tol = any(given(n) is not click.core.ParameterSource.DEFAULT for n in ("rtol", "atol"))
    tol = tolerance if tolerance is not None else \
        verify.Tolerance(rtol=rtol, atol=atol) if float_tol else None  # None: the manifest's
    with err.status("running the artifact", spinner="dots"):
        result = api.verify_artifact(artifact, reference, target=target,
                                     data=_load_data(data),
                                     input_shapes=_parse_shapes(input_shape), tolerance=tol,
                                     seed=seed, rpc=rpc, timing=not no_timing)
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=float))
    else:
        for line in artifact_lines(result.report):
            err.print(escape(line), highlight=False, soft_wrap=True)


@main.command("report")
@click.argument("report_json", metavar="REPORT.json", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML page to write (.html or .htm).")
@click.option("--json", "as_json", is_flag=True,
              help="Print what was written (path, bytes, sections with data) as JSON.")
def report_cmd(report_json, output, as_json):
    """Render REPORT.json, written by `graphopt optimize --report R.json`, as a
    self-contained HTML page (inline CSS and SVG charts, no script, no network)."""
    if not html_report.is_html(output):
        raise UsageError(f"-o {output}: the page is HTML, its name must end in .html or .htm",
                         hint=f"e.g. -o {Path(output).with_suffix('.html').name}")
    if paths.same_file(report_json, output):
        raise UsageError(f"-o {output} would overwrite the input report {report_json}",
                         hint="choose another output path; graphopt never modifies its input")
    report = html_report.read(report_json)
    page = html_report.render(report)
    paths.write_text(output, page, "-o")
    if as_json:
        click.echo(json.dumps({"report": str(report_json), "output": str(output),
                               "bytes": len(page.encode()),
                               "sections": html_report.sections(report)}, indent=2))
    else:
        drawn = [k for k, has in html_report.sections(report).items() if has]
        err.print(f"wrote {escape(str(output))} (sections with data: {', '.join(drawn)})",
                  highlight=False, soft_wrap=True)


@main.command("passes")
@click.option("-l", "--long", "long_", is_flag=True,
              help="Import each pass to show family, losslessness and options.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_passes(long_: bool, as_json: bool) -> None:
    """List the passes installed (from every distribution's entry points)."""
    registry = pass_registry()
    rows = []
    for name in registry.names():
        row = {"pass": name, "distribution": registry.info(name).distribution}
        if long_:
            try:
                cls = registry.get(name)
                row.update(family=cls.family, lossless=cls.lossless, about=cls.describe(),
                           options={k.replace("_", "-"): f.default
                                    for k, f in option_fields(cls).items()})
            except GraphoptError as exc:
                row["broken"] = str(exc)
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=repr))
        return
    table = Table()
    for col in ("pass", "distribution") + (("family", "lossless", "options", "about")
                                            if long_ else ()):
        table.add_column(col)
    for row in rows:
        cells = [row["pass"], row["distribution"]]
        if "broken" in row:
            cells += ["[red]broken[/]", "", "", escape(row["broken"])]
        elif long_:
            cells += [row["family"], "yes" if row["lossless"] else "no",
                      ", ".join(f"{k}={v!r}" for k, v in row["options"].items()),
                      row["about"]]
        table.add_row(*cells)
    out.print(table)


@main.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--long", "long_", is_flag=True, help="Also each target's --target-option "
              "settings.")
def list_targets(as_json: bool, long_: bool) -> None:
    """List the targets installed, what each produces and whether it works here."""
    registry = target_registry()
    rows = []
    for name in registry.names():
        row = {"target": name, "distribution": registry.info(name).distribution}
        try:
            target = create_target(registry, name)
            row.update(produces=target.produces, lowers_here=target.availability(),
                       runs_here=target.run_availability(), options=dict(target.options))
        except GraphoptError as exc:
            row["broken"] = str(exc)
        rows.append(row)
    if as_json:  # lowers_here/runs_here: null where it does, else why not
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for col in ("target", "distribution", "produces", "lowers here", "runs here") + \
            (("options",) if long_ else ()):
        table.add_column(col)
    for row in rows:
        if "broken" in row:
            table.add_row(row["target"], row["distribution"], "",
                          f"[red]broken:[/] {escape(row['broken'])}", "",
                          *([""] if long_ else []))
            continue
        lowers, runs = row["lowers_here"], row["runs_here"]
        table.add_row(row["target"], row["distribution"], escape(row["produces"]),
                      "yes" if lowers is None else escape(f"no: {lowers}"),
                      "yes" if runs is None else escape(f"no: {runs}"),
                      *([escape("\n".join(f"{k}: {v}" for k, v in row["options"].items()))]
                        if long_ else []))
    out.print(table)


@main.command()
@click.argument("model", type=click.Path(readable=False, path_type=Path))
@click.option("-t", "--target", default=api.DEFAULT_TARGET, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--top", type=int, default=10, show_default=True, help="Heaviest nodes shown.")
def inspect(model, target, as_json, top):
    """Op histogram, parameters, size, FLOPs, activation memory, estimated latency."""
    summary = api.inspect(model, target=target)
    if as_json:
        click.echo(json.dumps(summary.to_dict(top=top), indent=2, default=float))
        return
    out.print(f"[bold]{model}[/] on {summary.device}")
    out.print(f"nodes {summary.nodes:,}   parameters {summary.params:,}   "
              f"weights {summary.weight_bytes / 2**20:,.2f} MiB   "
              f"FLOPs {summary.flops / 1e9:,.3f} G   "
              f"peak activations {summary.peak_activation_bytes / 2**20:,.2f} MiB   "
              f"est. latency {summary.latency_s * 1e3:,.3f} ms", highlight=False)
    if not summary.shapes_known:
        out.print("[yellow]shape inference failed: figures count unknown sizes as 1[/]")
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in summary.ops.items():
        ops.add_row(op, str(count))
    out.print(ops)
    heavy = Table(title=f"heaviest {top} nodes")
    for col in ("node", "op", "MFLOPs", "KiB moved", "est. µs"):
        heavy.add_column(col, justify="right" if col not in ("node", "op") else "left")
    for n in summary.heaviest[:top]:
        heavy.add_row(n.name, n.op_type, f"{n.flops / 1e6:,.2f}", f"{n.bytes / 1024:,.1f}",
                      f"{n.latency_s * 1e6:,.2f}")
    out.print(heavy)


@main.command("compare")
@click.argument("model_a", type=click.Path(readable=False, path_type=Path))
@click.argument("model_b", type=click.Path(readable=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Inputs (.npz) to run; default: random probe inputs.")
@click.option("--input-shape", multiple=True, help="NAME=1x3x224x224 for probe inputs.")
@click.option("--rtol", type=float, default=1e-4, show_default=True)
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def compare_cmd(model_a, model_b, data, input_shape, rtol, atol, as_json):
    """Numeric diff of two models' outputs (exit 4 when they differ)."""
    result = api.compare(model_a, model_b, data=_load_data(data),
                         tolerance=verify.Tolerance(rtol=rtol, atol=atol),
                         input_shapes=_parse_shapes(input_shape))
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2, default=float))
    else:
        table = Table()
        for col in ("output", "max abs diff", "max rel diff", "match"):
            table.add_column(col)
        for o in result.outputs:
            table.add_row(o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                          "yes" if o.ok else f"[red]no[/] {o.note}")
        out.print(table)
    if not result.ok:
        sys.exit(4)


main.add_command(calibrate)
main.add_command(profile)

if __name__ == "__main__":
    main()
