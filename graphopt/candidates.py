"""One planner candidate built and measured: a pure function of its ``Job`` (the shared
setup, the prepared model, the stages, their budget and ranking), so that it can run
here or on a worker (``graphopt.workers``) with the same result.

Building runs the whole pipeline with the candidate's lossy schemes on a copy of the
prepared model (``graphopt.transform``), then measures what needs no timing: the score
with the one metric on the checked data, the file size and the cost model's prediction
at the deployment's input shapes. Timing is the planner's, on one machine."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import onnx

from graphopt.cost_calibration import static_model
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.lossy import verify_lossy
from graphopt.transform import Setup, Transformed, transform


@dataclass
class Job:
    setup: Setup
    prepared: bytes  # the target-prepared model, serialized
    stages: list[dict]  # {"flag", "value", "pass", "budget"}
    shapes: dict[str, list[int]] | None  # what the cost model estimates at
    early_budget: float | None = None
    rank_by: str | None = None
    keep_run: bool = True  # keep the Transformed (here: the chosen one needs its trace)
    options: dict = field(default_factory=dict)  # pass name -> {option: value}


@dataclass(kw_only=True)
class Built:
    """What building a candidate found (``build``)."""

    proto: bytes | None = None
    stages: list[dict] = field(default_factory=list)
    changed: bool = False
    score: float | None = None
    ok: bool = False
    size_bytes: int = 0
    flops: float = 0.0
    predicted_s: float | None = None
    seconds: float = 0.0
    error: str | None = None
    with_sites: set[str] = field(default_factory=set)
    digest: str = ""
    run: Transformed | None = None


def job_setup(setup: Setup) -> Setup:
    """``setup`` without what cannot travel to a worker (instruments and progress: a
    terminal's display)."""
    return dataclasses.replace(setup, instruments=(), progress=None)


def build(job: Job) -> Built:
    setup, start = job.setup, time.perf_counter()
    stages = [dict(s) for s in job.stages]
    chosen: dict[str, list[str]] = {}
    for stage in stages:
        chosen.setdefault(stage["flag"], []).append(stage["value"])
    budgets = {s["pass"]: s["budget"] for s in stages
               if s["budget"] != setup.lossy_data.budget}  # (a stage with its own)
    try:
        run = transform(setup, Model.from_proto(onnx.load_from_string(job.prepared)), chosen,
                        job.early_budget, job.rank_by, job.options, budgets)
    except GraphoptError as exc:
        return Built(stages=stages, error=str(exc).splitlines()[0],
                     seconds=time.perf_counter() - start)
    out = Built(stages=stages, run=run if job.keep_run else None)
    out.changed = any(e.changed and e.pass_name in run.lossy for e in run.manager.trace)
    for stage in stages:
        stage_status(stage, run)
    out.with_sites = with_sites(run)
    proto = run.model.to_onnx()
    if out.changed:
        check = verify_lossy(setup.original, proto, setup.lossy_feeds,
                             setup.lossy_data.budget, setup.metric)
        out.score, out.ok = check.get("score"), check.get("ok") is True
    else:  # the lossless result: verified like any lossless result, by optimize
        out.score, out.ok = 1.0, True
    out.size_bytes = model_bytes(proto)
    cost = _cost(setup, proto, job.shapes)
    if cost is not None:
        out.predicted_s, out.flops = cost.latency_s, cost.flops
    out.proto = proto.SerializeToString()
    out.digest = run.model.content_hash()
    out.seconds = time.perf_counter() - start
    return out


def _cost(setup: Setup, proto: onnx.ModelProto, shapes):
    try:
        shaped = static_model(proto, shapes) if shapes else Model.from_proto(proto)
        return setup.cost_model.estimate(shaped, setup.target.device, infer=False)
    except Exception:  # noqa: BLE001 - a model the estimate cannot shape: no figure
        return None


def with_sites(run: Transformed) -> set[str]:
    """Names of the compression passes that had a site to search in ``run``."""
    out: set[str] = set()
    for entry in run.manager.trace:
        info = (entry.stats or {}).get("compression")
        if not info:
            continue
        parts = entry.pass_name.split("+")
        for site in info.get("sites") or {}:
            prefix, sep, _ = site.partition(":")
            out.add(prefix if sep and prefix in parts else parts[0])
    return out


def stage_status(stage: dict, run: Transformed) -> None:
    """What the stage's pass did in ``run``: its trace status (for one part of a joint
    search: changed if one of its sites did) and the reason it gave."""
    entry = next((e for e in reversed(run.manager.trace)
                  if stage["pass"] in e.pass_name.split("+")), None)
    stage["status"] = entry.status if entry else "not run"
    if entry is None:
        return
    stats = entry.stats or {}
    reason = entry.reason or stats.get("reason") or \
        (stats.get("compression") or {}).get("reason") or \
        (None if entry.changed else _skipped(stats.get("skipped")))
    if reason:
        stage["reason"] = reason
    if entry.changed and "+" in entry.pass_name:
        sites = (stats.get("compression") or {}).get("sites") or {}
        mine = [v for k, v in sites.items() if k.startswith(stage["pass"] + ":")]
        stage["status"] = "changed" if any(v.get("changed") for v in mine) else "unchanged"


def _skipped(skipped: str | dict | None) -> str | None:
    """A quantizer's ``skipped`` stats in one line: the whole pass's reason, or how many
    sites and the first one's."""
    if not skipped or isinstance(skipped, str):
        return skipped or None
    name, why = next(iter(skipped.items()))
    return f"{len(skipped)} site(s) skipped, e.g. {name}: {why}"


def model_bytes(proto: onnx.ModelProto) -> int:
    """The model file's size (initializers and graph), also past protobuf's 2 GB."""
    try:
        return proto.ByteSize()
    except (ValueError, OverflowError):
        return sum(t.ByteSize() for t in proto.graph.initializer)
