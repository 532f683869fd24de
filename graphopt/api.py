"""The library entry points: ``optimize``, ``load``, ``save``, ``inspect``, ``compare``.

The CLI is a thin layer over these; a build system calls them directly and gets the same
model, the same report and the same errors (``graphopt.errors``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import onnx
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

from graphopt import artifact as artifact_check
from graphopt import replay as replayed_settings
from graphopt import background, verify
from graphopt.accuracy import shared_references
from graphopt.analysis import Summary, shapes_known, summarize
from graphopt import microbench, native_memory
from graphopt.cost import CostModel
from graphopt.cost_calibration import Calibration, cost_model_for
from graphopt.cost_calibration import calibrate as run_calibration
from graphopt.calibration import check_feeds
from graphopt.errors import GraphoptError, ModelError, UsageError, VerificationError
from graphopt.gc_policy import graph_work
from graphopt.ir import Model, ModelSource, load, proto_hash, save
from graphopt.lossy import (compression_report, load_lossy_data,
                            split_tolerance, verify_lossy, warn_unmeasured)
from graphopt.manager import DEFAULT_MAX_ITERATIONS, Instrument
from graphopt.metric import Metric, get_metric
from graphopt.pass_infra import Pass
from graphopt.profile import Profile
from graphopt.profile import profile as measure_profile
from graphopt.paths import check_outputs, input_files
from graphopt.result_cache import ResultCache
from graphopt import spill
from graphopt.spill import Spill
from graphopt.planner import plan as run_planner
from graphopt.transform import DEFAULT_RECOVERY, Setup, transform
from graphopt.workers import Workers
from graphopt.registry import create_target, target_registry
from graphopt.target import MANIFEST, Artifact, Target, read_manifest

__all__ = ["optimize", "load", "save", "inspect", "compare", "get_target", "OptimizeResult",
           "verify_artifact", "ArtifactCheck"]

DEFAULT_TARGET = "ort"
GOALS = ("latency", "flops", "size", "balanced")


@dataclass
class OptimizeResult:
    model: Model
    report: dict
    artifact: Artifact | None = None


def graphopt_version() -> str:
    try:
        return version("graphopt")
    except PackageNotFoundError:
        return "unknown"


def get_target(name: str | Target) -> Target:
    """A target object: ``name`` itself, or the registered plugin of that name (a Target
    subclass, instantiated, or a Target instance, e.g. a data-configured preset)."""
    if isinstance(name, Target):
        return name
    return create_target(target_registry(), name)


@graph_work()
@shared_references()
@spill.scope()
def optimize(model: ModelSource, *, target: str | Target = DEFAULT_TARGET,
             threads: int | None = None,
             passes: str | Sequence[str | Pass] | None = None, skip: Sequence[str] = (),
             output: str | os.PathLike | None = None, strict: bool = False,
             data: list[verify.Feeds] | None = None,
             input_shapes: dict[str, list[int]] | None = None,
             tolerance: verify.Tolerance | float = verify.Tolerance(),
             max_iterations: int = DEFAULT_MAX_ITERATIONS, seed: int = 0,
             instruments: Sequence[Instrument] = (), progress=None,
             logger: logging.Logger | None = None, quantize: str | None = None,
             calibration=None, validation=None, measure: bool = False,
             format: str | None = None, verify_artifact: bool | None = None,
             tune_trials: int = 0, rpc: str | None = None,
             schemes: dict[str, str | Sequence[str]] | None = None,
             metric: str | Metric | None = None, goal: str | None = None,
             plan: bool | None = None, workers: str | int | None = None,
             recovery: str | None = DEFAULT_RECOVERY,
             cache_dir: str | os.PathLike | None = None,
             target_options: dict[str, str] | None = None,
             replay: str | os.PathLike | dict | None = None) -> OptimizeResult:
    """Optimize ``model`` for ``target`` and, when ``output`` is given, lower it there.

    ``threads``: the threads the target runs with (``Target.with_threads``), for the
    checks, timings and the planner's measurements; default: the target's own.
    ``target_options``: settings of the artifact the target declares (``Target.options``,
    e.g. litert's ``{"io_layout": "nhwc"}``; ``--target-option KEY=VALUE``).
    ``passes`` defaults to the target's pipeline. The input is never modified. The result
    is verified against the original on ``data`` (or random probe inputs): on a mismatch a
    ``VerificationError`` is raised and nothing is written.

    ``schemes`` ({flag: value or values}, e.g. ``{"prune": "channels"}``) appends the
    lossy passes that declare those schemes (``graphopt lossy schemes``; ``quantize="int8"``
    is ``schemes={"quantize": "int8"}``); ``calibration``/``validation`` are their data (a
    path, a ``module:function`` or a list of feed dicts, see ``graphopt.calibration``); a
    float ``tolerance`` is the accuracy budget: the lowest score allowed on ``metric``
    (``graphopt.metric``: ``cosine`` by default, ``mean-cosine``, ``top1`` or
    ``module:function``; default budget 0.99). The pass manager, the compression search
    and the final verification all use that one metric. ``goal`` is what compression
    saves first: ``latency`` (the target's cost model; the default), ``flops``, ``size``
    or ``balanced`` (latency and size alike).

    ``plan`` runs the planner (``graphopt.planner``): candidate combinations of the lossy
    schemes (those in ``schemes``, else every installed one the target runs), each
    measured on the data and timed on the target; the best for ``goal`` within the budget
    is kept (report section ``plan``). ``None`` (default): planned when a ``goal`` is
    given and neither a scheme nor ``passes`` is. The planner needs calibration data. ``workers`` builds the
    candidates on Ray (``graphopt.workers``: N local workers or ``ray://HOST:PORT``);
    they are timed here.
    ``recovery`` names the pass that re-fits compressed candidates to the original
    (``None``: no recovery). ``replay`` (a JSON report's path, or the report) applies the
    compression settings that report lists instead of searching them
    (``graphopt.replay``): the same schemes must be asked; settings that no longer meet
    the budget raise ``VerificationError``.

    ``format`` picks one of the target's artifact formats (``Target.formats``; ``ort``:
    ``onnx`` or ``ort``); ``None`` is the target's default.

    ``progress(what, done, total)`` is told how long steps advance (each site's damage
    measured alone, the compression search's models, the planner's candidates; ``total``
    0 when not known ahead); ``instruments`` are told before and after each pass.

    ``cache_dir`` reuses a stored result of the same model and options
    (``graphopt.result_cache``; the report's ``cache`` says whether it was a hit) and
    stores new ones.

    ``verify_artifact`` runs the written artifact through its target on the same inputs,
    compares it with ONNX Runtime on the original and times both (report section
    ``artifact``); a mismatch raises ``VerificationError`` and removes the artifact's
    files. ``None`` (default): done for compiled targets (``Target.compiled``) where the
    artifact can run here, skipped with the reason where it cannot; ``True``: not being
    able to run it is an error. ``tune_trials`` is the tuning budget of tunable targets;
    ``rpc`` (``HOST:PORT[:KEY]``) runs (and tunes) on a remote device through the target.
    """
    if output is not None:  # before any work: no output may overwrite an input
        check_outputs(input_files(model, calibration=calibration, validation=validation,
                                  replay=replay), Path(output))
    settings = None if replay is None else replayed_settings.load(replay)
    verify.check_seed(seed)
    verify.check_shapes(input_shapes)
    budget, tolerance = split_tolerance(tolerance)
    chosen = dict(schemes or {})
    if quantize is not None:
        chosen["quantize"] = quantize
    if goal is not None and goal not in GOALS:
        raise UsageError(f"unknown goal {goal!r}", hint=f"choose one of {', '.join(GOALS)}")
    planned = plan if plan is not None else \
        (goal is not None and not chosen and passes is None)
    if planned and calibration is None:
        raise UsageError("the planner measures the accuracy of every candidate: give "
                         "calibration data (--calibration-data)",
                         hint="or name the lossy schemes yourself (--quantize, --prune)")
    if planned and settings is not None:
        raise UsageError("--replay applies a report's settings: the planner searches them",
                         hint="leave out --goal/--plan, and give the report's schemes")
    if planned and measure:
        raise UsageError("the planner times every candidate itself: leave out --measure")
    goal = goal or "latency"
    pool = Workers(workers)
    if pool.remote and not planned:
        raise UsageError("--workers runs the planner's candidates: give --goal or --plan")
    metric = get_metric(metric)
    tgt = _with_threads(target, threads)
    if target_options:
        tgt = tgt.with_options(**target_options)
    if rpc:
        tgt = tgt.connect(rpc)
    if tune_trials < 0 or (tune_trials and not tgt.tunable):
        raise UsageError(f"target {tgt.name!r} does not tune kernels" if tune_trials > 0
                         else f"tune_trials must be >= 0, got {tune_trials}")
    if tune_trials and output is None:
        raise UsageError("tuning happens while lowering: give an output folder (-o)")
    missing = tgt.availability()
    if missing and output is not None:
        raise UsageError(f"target {tgt.name!r} is not available here: {missing}")
    if format is not None and format not in tgt.formats:
        raise UsageError(f"target {tgt.name!r} does not write format {format!r}",
                         hint=f"formats: {', '.join(tgt.formats)}" if tgt.formats else
                         "leave --format out for this target")
    cost_model, cost_info = cost_model_for(tgt)
    cache = key = None
    if cache_dir is not None:
        cache = ResultCache(cache_dir)
        key = cache.key(
            model, tgt, output, graphopt=graphopt_version(),
            calibration_file=cost_info.get("calibration"),
            passes=None if passes is None else [repr(p) for p in (
                [passes] if isinstance(passes, str) else passes)],
            skip=list(skip), strict=strict, data=data, input_shapes=input_shapes,
            tolerance=(budget, tolerance), max_iterations=max_iterations, seed=seed,
            schemes=chosen, calibration=calibration, validation=validation,
            measure=measure, format=format, verify_artifact=verify_artifact,
            tune_trials=tune_trials, rpc=rpc, metric=metric.name, goal=goal,
            plan=planned, recovery=recovery, replay=settings)
        entry = cache.entry(key)
        if entry is not None:
            return OptimizeResult(*cache.restore(entry, key, tgt.name, output))
    weights = Spill(load(model))  # large weights: in a temporary file for the run
    weights.activate()  # and those the passes write, as they write them
    original = weights.model
    if not tgt.compiled:  # its artifact is the ONNX model itself, run by ONNX Runtime
        verify.check_runtime(original.meta)
    original_proto = original.to_onnx(references=True)  # spilled weights: not copied
    working = _prepared(original_proto, tgt, input_shapes)
    input_hash = background.submit(proto_hash, original_proto)  # reads every weight
    data = check_feeds(data, original_proto)
    # Lossy data is batched for the model the passes see: a target that binds
    # ``--input-shape`` (compiled targets) takes the batch it was given, not the
    # original's dynamic one.
    bound = working.to_onnx(references=True) if input_shapes and \
        (calibration is not None or validation is not None) else original_proto
    setup = Setup(target=tgt, cost_model=cost_model, original=original_proto,
                  lossy_data=load_lossy_data(bound, calibration, validation, budget),
                  metric=metric, passes=passes, skip=skip, measure=measure,
                  recovery=recovery, goal=goal, seed=seed, strict=strict,
                  max_iterations=max_iterations, tolerance=tolerance,
                  instruments=instruments, progress=progress,
                  logger=logger or logging.getLogger("graphopt"),
                  data=data, input_shapes=input_shapes, replay=settings)
    plan_section = None
    if planned:
        with pool:
            best, plan_section = run_planner(setup, working, goal, chosen or None, pool)
        run, working = best.run, best.run.model
        chosen = {}
        for stage in best.stages:
            chosen.setdefault(stage["flag"], []).append(stage["value"])
    else:
        run = transform(setup, working, chosen)
    manager, pipeline, ctx, lossy, feeds = run.manager, run.pipeline, run.ctx, run.lossy, \
        run.feeds
    unsupported, lossy_data = run.unsupported, setup.lossy_data
    if settings is not None:
        replayed_settings.check_applied(settings, manager.trace)
    working = weights.refresh(working)  # weights the passes wrote: not copied from here on
    warn_unmeasured(ctx.logger, lossy_data, lossy)
    if manager.numeric_check != "ok" and not tgt.compiled:  # ORT runs the result: why not?
        verify.check_runs(original_proto, feeds, data_given=bool(data), shapes=input_shapes)

    output_hash = background.submit(proto_hash, working.to_onnx(references=True))
    before = _as_prepared(original, original_proto, tgt, input_shapes)
    _adopt_initial_types(before, manager.initial_types)
    summaries = {  # meanwhile (the original, the run's own copy, gets its shapes in place)
        "input": summarize(before, tgt.device, cost_model, copy=False).to_dict(),
        "output": _summary(working, tgt, cost_model).to_dict()}
    output_hash = output_hash.result()
    if any(e.changed and e.pass_name in lossy for e in manager.trace):
        verification = verify_lossy(
            original_proto, working.to_onnx(), feeds, ctx.tolerance, metric,
            # (the manager ran the original on these batches first; a planned run's
            # may have started from another stage's result)
            reference=manager.original_outputs
            if plan_section is None and manager.probe_feeds is feeds else None)
    else:
        own = plan_section is None and manager.probe_feeds is feeds
        verification = _verify(original_proto, working, feeds, tolerance,
                               manager.numeric_check,
                               # (the original's outputs on these batches: run once a run;
                               # the result's, when the manager ran this very model last)
                               manager.original_outputs if own else None,
                               manager.checked_outputs(output_hash) if own else None)
    report = {
        "graphopt_version": graphopt_version(),
        "target": tgt.name,
        "device": tgt.device.name,
        "cost_model": cost_info,
        "pipeline": [repr(p) for p in pipeline],
        "left_out": {name: f"target does not run {', '.join(ops)}"
                     for name, ops in unsupported.items()},
        **summaries,
        "input_hash": input_hash.result(),
        "output_hash": output_hash,
        "trace": [e.to_dict() for e in manager.trace],
        "rolled_back": [e.pass_name for e in manager.trace if e.status == "rolled-back"],
        "verification": verification,
        "output_path": None,
    }
    if plan_section is not None:
        report["plan"] = plan_section
    if lossy:
        report["compression"] = compression_report(manager.trace, lossy, lossy_data, metric)
    if verification.get("ok") is False:
        raise VerificationError(
            f"the optimized model does not match the original: {verification['detail']}",
            hint="rerun with --passes to find the pass, or report a bug")
    artifact = None
    if output is not None:
        options = {**({"format": format} if format else {}),
                   **({"tune_trials": tune_trials} if tune_trials else {}),
                   **({"progress": progress} if tune_trials and progress else {})}
        # Runtimes made and freed one after another: what each frees leaves the process.
        with native_memory.returned():
            try:
                artifact = tgt.lower(working, Path(output), **options)
            except OSError as exc:
                raise UsageError(
                    f"cannot write {exc.filename or output}: {exc.strerror or exc}",
                    hint="choose an output path you can write to") from exc
            report["output_path"] = str(artifact.path)
            report["artifact_files"] = [str(f) for f in artifact.files]
            if verify_artifact or (verify_artifact is None and tgt.compiled):
                lossy_budget = ctx.tolerance if verification.get("score") is not None \
                    else None
                if lossy_budget is not None:
                    _record_budget(artifact, lossy_budget)
                try:
                    report["artifact"] = _check_artifact(tgt, artifact, original_proto, feeds,
                                                         tolerance, lossy_budget,
                                                         required=bool(verify_artifact),
                                                         progress=progress)
                except VerificationError:
                    for f in artifact.files:  # a wrong artifact is not left behind
                        Path(f).unlink(missing_ok=True)
                    raise
    if cache is not None:
        # (the model, not its export: weights in the run's data file are read in as
        # they are written, never all in memory at once)
        cache.put(key, working, report, None if output is None else Path(output), artifact)
        report["cache"] = {"hit": False, "key": key, "folder": str(cache_dir)}
    return OptimizeResult(model=weights.release(working), report=report, artifact=artifact)


@dataclass
class ArtifactCheck:
    """What ``verify_artifact`` found: ``report["ok"]`` is True (matches), False
    (differs or failed to run) or None (could not run here; ``detail`` says why)."""

    artifact: Artifact
    report: dict

    @property
    def ok(self) -> bool | None:
        return self.report.get("ok")


def verify_artifact(path: str | os.PathLike, reference: ModelSource | None = None, *,
                    target: str | Target | None = None,
                    data: list[verify.Feeds] | None = None,
                    input_shapes: dict[str, list[int]] | None = None,
                    tolerance: verify.Tolerance | float | None = None, seed: int = 0,
                    rpc: str | None = None, timing: bool = True) -> ArtifactCheck:
    """Run the artifact at ``path`` (a folder with ``manifest.json``, or a model file of
    ``target``, default ``ort``) and compare it with ONNX Runtime on ``reference`` (the
    original model; default: the ``model.onnx`` the artifact was compiled from, as the
    manifest names it). A float ``tolerance`` compares by minimum output cosine (for
    quantized artifacts). Inputs: ``data``, else probe inputs shaped as the manifest
    says (symbolic dimensions: ``input_shapes`` or 2). ``timing`` adds the latency of the
    artifact next to ONNX Runtime's on the reference. ``tolerance=None``: the accuracy
    budget a lossy artifact was checked with when written (its manifest's
    ``accuracy_budget``), else the float tolerance."""
    path = Path(path)
    manifest = read_manifest(path) if path.is_dir() else {}
    tgt = get_target(target or manifest.get("target") or DEFAULT_TARGET)
    if rpc:
        tgt = tgt.connect(rpc)
    art = tgt.open(path)
    if reference is None:
        if not manifest.get("model"):
            raise UsageError(f"{path} names no model it was compiled from",
                             hint="give the original model: --reference MODEL.onnx")
        reference = path / manifest["model"]
    ref_proto = load(reference).to_onnx()
    verify.check_runtime(ref_proto)
    shapes = {**_static_shapes(manifest), **(input_shapes or {})}
    feeds = check_feeds(data, ref_proto) or \
        verify.probe_inputs(ref_proto, seed=seed, shapes=shapes or None)
    if tolerance is None:
        tolerance = manifest.get(BUDGET_KEY) or verify.Tolerance()
    budget, rtol_atol = split_tolerance(tolerance)
    try:
        report = _check_artifact(tgt, art, ref_proto, feeds, rtol_atol, budget,
                                 required=True, timing=timing)
    except GraphoptError:
        raise
    except Exception as exc:  # the target's runtime cannot read the file
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelError(f"{path}: cannot run it as an artifact of target {tgt.name!r} "
                         f"({first})", hint="give a model file or an artifact folder "
                                            "graphopt wrote") from exc
    report["reference"] = str(reference)
    return ArtifactCheck(artifact=art, report=report)


BUDGET_KEY = "accuracy_budget"  # in a lossy artifact's manifest: min output cosine


def _record_budget(art: Artifact, budget: float) -> None:
    """Write the accuracy budget a lossy artifact is checked with into its manifest (a
    folder's ``manifest.json``, replaced atomically), so ``verify`` applies it later."""
    folder = Path(art.path) if Path(art.path).is_dir() else Path(art.path).parent
    path = folder / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    if manifest.get("target") != art.target:  # not this artifact's: leave it alone
        return
    manifest[BUDGET_KEY] = budget
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staged, path)


def _check_artifact(tgt: Target, art: Artifact, reference, feeds, tolerance, budget,
                    required: bool, timing: bool = True, progress=None) -> dict:
    if not feeds:
        if required:
            raise UsageError("no inputs to run the artifact on",
                             hint="give --data or --input-shape")
        return {"ok": None, "detail": "no inputs to run the artifact on"}
    result = artifact_check.check(tgt, art, reference, feeds, tolerance, budget, progress)
    if result["ok"] is None and required:
        raise UsageError(f"cannot run {art.path} here to verify it: {result['detail']}")
    if result["ok"] is False:
        raise VerificationError(f"the {tgt.name} artifact {art.path} does not match ONNX "
                                f"Runtime on the original: {result['detail']}",
                                hint="report a bug; rerun with --debug for details")
    if result["ok"] and timing:
        result["latency"] = artifact_check.latency(tgt, art, reference, feeds[0])
    return result


def _static_shapes(manifest: dict) -> dict[str, list[int]]:
    """Inputs the manifest gives fully static shapes (the artifact was compiled so)."""
    return {i["name"]: i["shape"] for i in manifest.get("inputs", [])
            if i.get("shape") and all(isinstance(d, int) and d > 0 for d in i["shape"])}


def _with_threads(target: str | Target, threads: int | None) -> Target:
    tgt = get_target(target)
    return tgt if threads is None else tgt.with_threads(threads)


def calibrate(target: str | Target = DEFAULT_TARGET, *, threads: int | None = None,
              quick: bool = False, progress=None, passes: int = 1) -> tuple[Calibration, Path]:
    """Calibrate ``target``'s cost model by timing micro-benchmarks on its device and
    store it for this device (``graphopt.cost_calibration``); ``optimize`` and
    ``inspect`` then use it. ``quick``: a smaller set of probes (seconds, not a minute).
    ``passes``: each probe timed in that many passes over all of them, its fastest kept
    (steadier on a shared machine). ``progress(done, total, probe_name)`` is called as
    probes run."""
    if passes < 1:
        raise UsageError(f"passes must be >= 1, got {passes}")
    tgt = _with_threads(target, threads)
    return run_calibration(tgt, microbench.suite(quick=quick,
                                                 blocked_layout=tgt.device.blocked_layout),
                           progress=progress, passes=passes)


def profile(model: ModelSource, target: str | Target = DEFAULT_TARGET, *,
            data: list[verify.Feeds] | None = None,
            input_shapes: dict[str, list[int]] | None = None, threads: int | None = None,
            runs: int = 20, seed: int = 0, rpc: str | None = None) -> Profile:
    """Measured time per kernel of ``model`` on ``target`` (its profiler; on the remote
    device at ``rpc``, ``HOST:PORT[:KEY]``, for a target that connects), beside the
    cost model's estimate at the same input shapes (``graphopt.profile``). Inputs: the
    first batch of ``data``, else random probe inputs (``input_shapes`` fixes dynamic
    dimensions)."""
    tgt = _with_threads(target, threads)
    if rpc:
        tgt = tgt.connect(rpc)
    verify.check_shapes(input_shapes)
    loaded = load(model)
    proto = loaded.to_onnx(references=True)
    feeds = check_feeds(data, proto) if data else None
    feeds = feeds[0] if feeds else verify.probe_inputs(proto, seed=seed,
                                                       shapes=input_shapes)[0]
    try:
        return measure_profile(proto, tgt, feeds, runs=runs)
    except GraphoptError:
        raise
    except Exception:
        # A runtime failing on the inputs (an index out of its table's range) says why
        # in a clear error, not a traceback; anything else goes on as it was.
        verify.check_runs(proto, [feeds], data_given=bool(data), shapes=input_shapes)
        raise


def inspect(model: ModelSource, target: str | Target = DEFAULT_TARGET) -> Summary:
    tgt = get_target(target)
    return _summary(load(model), tgt, cost_model_for(tgt)[0])


def compare(a: ModelSource, b: ModelSource, data: list[verify.Feeds] | None = None,
            tolerance: verify.Tolerance = verify.Tolerance(), seed: int = 0,
            input_shapes: dict[str, list[int]] | None = None) -> verify.Comparison:
    """Run both models in ONNX Runtime on ``data`` (default: probe inputs of ``a``)."""
    proto_a, proto_b = load(a).to_onnx(), load(b).to_onnx()
    for proto in (proto_a, proto_b):
        verify.check_runtime(proto)
    names_a, names_b = ([n for n, _, _ in verify.input_specs(p)] for p in (proto_a, proto_b))
    if sorted(names_a) != sorted(names_b):
        raise UsageError(f"the models take different inputs ({', '.join(names_a) or 'none'} "
                         f"vs {', '.join(names_b) or 'none'})",
                         hint="compare models with the same input names")
    feeds = check_feeds(data, proto_a) or \
        verify.probe_inputs(proto_a, seed=seed, shapes=input_shapes)
    result = verify.Comparison()
    for f in feeds:
        result.outputs += verify.compare(verify.run(proto_a, f), verify.run(proto_b, f),
                                         tolerance).outputs
    return result


def _prepared(proto: onnx.ModelProto, tgt: Target,
              input_shapes: dict[str, list[int]] | None) -> Model:
    """A copy of ``proto`` (it reads the proto, never writes it) as ``tgt`` prepares a
    run's model (``Target.prepare``: compiled targets bind ``input_shapes``)."""
    model = Model.from_proto(proto)
    tgt.prepare(model, input_shapes)
    return model


def _as_prepared(original: Model, proto: onnx.ModelProto, tgt: Target,
                 input_shapes: dict[str, list[int]] | None) -> Model:
    """The original for the report's ``input`` summary: as the target prepared it for
    the run where that bound ``input_shapes`` (a compiled target's static inputs), so
    both summaries count the same inputs (MiniLM at 1 x 128 tokens had 32 MFLOPs before
    and 2.9 GFLOPs after: its sequence counted as 1, then as 128); else ``original``."""
    if not input_shapes:
        return original
    prepared = _prepared(proto, tgt, input_shapes)
    same = [(t.name, t.shape) for t in prepared.graph.inputs] == \
        [(t.name, t.shape) for t in original.graph.inputs]
    return original if same else prepared


def _adopt_initial_types(original: Model, initial) -> None:
    """The types the pass manager inferred for the model it started from (``initial``, a
    ModelProto), taken by ``original`` when that model is ``original`` itself (the
    target's ``prepare`` changed nothing: the same inputs, the same nodes) and some of
    its shapes are unknown: its summary then needs no inference of its own."""
    if initial is None or shapes_known(original):
        return
    inputs = [(t.name, t.dtype, t.shape) for t in original.graph.inputs]
    if inputs != [(v.name, get_onnx_tensor_dtype(v), get_onnx_tensor_shape(v))
                  for v in initial.graph.input]:
        return
    ours = sorted((n.op, n.domain or "", tuple(t.name for t in n.inputs),
                   tuple(t.name for t in n.outputs)) for n in original.graph.nodes)
    theirs = sorted((n.op_type, n.domain, tuple(n.input), tuple(n.output))
                    for n in initial.graph.node)
    if ours == theirs:
        original.adopt_types(initial)


def _summary(model: Model, target: Target, cost_model: CostModel | None = None) -> Summary:
    return summarize(model, target.device, cost_model)


def _verify(original_proto, model: Model, feeds, tolerance, numeric_check: str,
            reference: list | None = None, result: list | None = None) -> dict:
    """Compare the final model with the original on every probe/data batch (one ORT
    session each; ``reference`` and ``result``: the original's and the final model's
    outputs on ``feeds`` when the pass manager ran them already)."""
    if feeds is None or numeric_check != "ok":
        return {"ok": None, "detail": numeric_check}
    try:
        if result is None:
            final = verify.session(model.to_onnx(references=True))  # weights in their file
            result = [verify.run(final, f) for f in feeds]
        if reference is None:
            original = verify.session(original_proto)
            reference = [verify.run(original, f) for f in feeds]
        comparison = verify.Comparison()
        for ref, got in zip(reference, result):
            comparison.outputs += verify.compare(ref, got, tolerance).outputs
    except GraphoptError:
        raise
    except Exception as exc:
        return {"ok": False, "detail": f"ONNX Runtime failed on the result: {exc}"}
    worst = comparison.worst()
    detail = "outputs match" if worst is None else \
        f"output {worst.name!r}: max abs diff {worst.max_abs:.3g} {worst.note}".strip()
    return {**comparison.summary(), "detail": detail, "batches": len(feeds),
            "rtol": tolerance.rtol, "atol": tolerance.atol}
