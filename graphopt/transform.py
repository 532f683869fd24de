"""The transform stage of ``optimize``: the pipeline built from the target's (or the
user's) passes and the lossy schemes asked, the context passes consult, and one run of
the pass manager on a working copy. ``optimize`` runs it once; the planner
(``graphopt.planner``) runs it once per candidate plan, on the same loaded inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import onnx

from graphopt import replay, verify
from graphopt.compression import CompressionPass
from graphopt.joint import join_compression
from graphopt.cost import CostModel
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.lossy import LossyData, lossy_passes, runs_early, with_schemes
from graphopt.manager import PassManager
from graphopt.metric import Metric
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.pipeline import build_passes
from graphopt.registry import pass_registry
from graphopt.target import Target


@dataclass
class Setup:
    """What every transform of one ``optimize`` call shares: the target, the original,
    the data and the options."""

    target: Target
    cost_model: CostModel
    original: onnx.ModelProto
    lossy_data: LossyData
    metric: Metric
    passes: Any = None  # the user's pipeline spec (None: the target's)
    skip: Sequence[str] = ()
    measure: bool = False
    recovery: str | None = None
    goal: str = "latency"
    seed: int = 0
    strict: bool = False
    max_iterations: int = 8
    tolerance: verify.Tolerance = field(default_factory=verify.Tolerance)
    instruments: Sequence = ()
    progress: Callable[[str, int, int], None] | None = None  # see PassContext.progress
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("graphopt"))
    data: list[verify.Feeds] | None = None  # the user's verification inputs
    input_shapes: dict[str, list[int]] | None = None
    replay: dict[str, dict[str, Any]] | None = None  # graphopt.replay: settings to apply

    @property
    def lossy_feeds(self) -> list[verify.Feeds] | None:
        """What a lossy result is checked on (the pass manager, the planner, the final
        verification): the user's inputs, else the validation (calibration) batches."""
        return self.data or self.lossy_data.check_feeds


DEFAULT_RECOVERY = "recover"  # the training-free re-fit: what compression recovers with


@dataclass
class Transformed:
    model: Model
    manager: PassManager
    pipeline: list[Pass]
    ctx: PassContext
    lossy: set[str]
    unsupported: dict[str, list[str]]
    feeds: list[verify.Feeds] | None


class Budgeted(Pass):
    """A lossy pass run under its own, tighter accuracy budget (the planner keeps part
    of the budget for the passes after it). Everything else is the inner pass's."""

    lossless = False

    def __init__(self, inner: Pass, budget: float):
        super().__init__()
        self.inner, self.budget = inner, budget
        self.name, self.family = inner.name, inner.family
        self.emits = inner.emits

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        saved, ctx.tolerance = ctx.tolerance, self.budget
        try:
            result = self.inner.run(model, ctx)
        finally:
            ctx.tolerance = saved
        result.stats = {**result.stats, "stage_budget": self.budget}
        return result

    def __repr__(self) -> str:
        return f"{self.inner!r}[budget={self.budget:g}]"


def transform(setup: Setup, working: Model, chosen: Mapping[str, Sequence[str] | str],
              early_budget: float | None = None, rank_by: str | None = None,
              options: Mapping[str, Mapping[str, Any]] | None = None,
              budgets: Mapping[str, float] | None = None) -> Transformed:
    """Run the pipeline with the lossy ``chosen`` schemes on ``working`` (edited in
    place). ``early_budget``: the accuracy budget of the structural passes, ``budgets``:
    pass name -> its own budget (e.g. the first of two quantizers); the rest keep the
    whole budget, measured against the original; ``rank_by``: what the
    compression search saves first (default: the setup's goal); ``options``: pass name
    -> {option: value} over the target's defaults (options a spec names win)."""
    tgt, registry = setup.target, pass_registry()
    spec = tgt.default_pipeline if setup.passes is None else setup.passes
    defaults = {name: dict(values) for name, values in tgt.pass_defaults.items()}
    for name, values in (options or {}).items():
        defaults.setdefault(name, {}).update(values)
    pipeline = build_passes(with_schemes(spec, chosen, registry, setup.measure), registry,
                            setup.skip, defaults=defaults)
    # A pass that can emit some op the target runs stays (it asks ctx.supports per op);
    # one whose every op is foreign is left out of the target's pipeline, and is an
    # error when the user named it (--passes, --quantize).
    named = {p.name for p in build_passes(setup.passes, registry)} \
        if setup.passes is not None else set()
    if chosen:
        named |= lossy_passes(pipeline)
    unsupported = {p.name: [f"{d or 'ai.onnx'}::{op}" for d, op in p.emits]
                   for p in pipeline
                   if p.emits and not any(tgt.supports(op, d) for d, op in p.emits)}
    for name, ops in unsupported.items():
        if name in named:
            raise UsageError(f"pass {name!r} emits {', '.join(ops)}, which target "
                             f"{tgt.name!r} does not run",
                             hint="choose another target or drop the pass")
    pipeline = join_compression([p for p in pipeline if p.name not in unsupported])
    if setup.replay is not None:
        replay.check_passes(setup.replay, {p.name for p in pipeline
                                           if isinstance(p, CompressionPass)})
    data = setup.lossy_data
    ctx = PassContext(target=tgt, cost_model=setup.cost_model, device=tgt.device,
                      seed=setup.seed, logger=setup.logger, metric=setup.metric,
                      reference=setup.original, goal=rank_by or setup.goal,
                      progress=setup.progress, replay=setup.replay)
    ctx.calibration, ctx.validation = data.calibration, data.validation
    ctx.tolerance = data.budget
    if setup.recovery and any(isinstance(p, CompressionPass) for p in pipeline):
        ctx.recovery = recovery_pass(setup.recovery)
    if early_budget is not None:
        pipeline = [Budgeted(p, early_budget) if runs_early(p) else p for p in pipeline]
    pipeline = [Budgeted(p, budgets[p.name])
                if p.name in (budgets or {}) and not isinstance(p, Budgeted) else p
                for p in pipeline]
    lossy = lossy_passes(pipeline)
    feeds = (setup.lossy_feeds if lossy else setup.data) or \
        probe_or_none(setup.original, setup.seed, setup.input_shapes)
    ctx.input_shapes = cost_shapes(feeds, setup.input_shapes)
    manager = PassManager(pipeline, ctx, strict=setup.strict,
                          max_iterations=setup.max_iterations, tolerance=setup.tolerance,
                          probe_feeds=feeds, instruments=setup.instruments)
    manager.run(working)
    return Transformed(working, manager, pipeline, ctx, lossy, unsupported, feeds)


def cost_shapes(feeds: list[verify.Feeds] | None,
                given: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
    """The input shapes costs are estimated (and the planner times) at: those the user
    gave (``--input-shape``: the deployment's), else those of the first batch checked."""
    shapes = {name: list(value.shape) for name, value in feeds[0].items()} if feeds else {}
    shapes.update(given or {})
    return shapes or None


def recovery_pass(spec: str) -> Pass:
    registry = pass_registry()
    recovery = build_passes([spec], registry)[0]
    if recovery.family != "recovery":
        raise UsageError(f"{recovery.name} is not a recovery pass (family "
                         f"{recovery.family})",
                         hint="recovery passes: " + ", ".join(
                             n for n, c in sorted(registry.load_all()[0].items())
                             if getattr(c, "family", None) == "recovery"))
    return recovery


def probe_or_none(proto, seed, shapes) -> list[verify.Feeds] | None:
    try:
        return verify.probe_inputs(proto, seed=seed, shapes=shapes)
    except verify.ProbeTooLarge:
        raise
    except UsageError:
        if shapes:
            raise
        return None  # e.g. a symbolic dimension without --input-shape: checked later
