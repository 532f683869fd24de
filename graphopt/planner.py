"""The planner (``--goal latency|size|balanced|flops`` with no scheme named, or ``plan=True``):
which lossy techniques run, in which order, and with how much of the accuracy budget
each, chosen by measuring whole candidates on the target.

Per site the techniques choose for themselves under the budget they are given: pruning
ratios and ranks by the compression search (``graphopt.compression``: damage per unit of
predicted saving), int8 per layer by the calibrated cost model and measured sensitivity.
What no single technique can decide is how to combine them: whether pruning should
leave part of the budget to int8, and whether a technique pays on this target at all
(int8 on an AVX2 CPU without VNNI, or on a layer pruned to a few channels, can be slower
than float). The planner:

1. lists the techniques: every installed pass that declares a scheme and emits ops the
   target runs (or those the user named), split into **structural** ones (pruning,
   low-rank: they run on the cleaned-up graph, before the target's fusions) and
   **quantizers** (int8, int4 weights, fp16: after the whole pipeline);
2. builds the lossless result, each quantizer alone (and each of its ``variants``, e.g.
   int8 after SmoothQuant; only a pass's best variant goes on) and the structural passes
   searched together (sites ranked by predicted latency saved and by FLOPs saved), each
   under the whole budget; then each structural pass alone (ranked as the better joint search
   was) and pairs of the quantizers that paid alone, the first under ``PAIR_SHARE`` of
   the budget (int4 weights, then int8 for the fused attention weights int4 leaves);
3. combines the best structural candidate under a share of the budget (``SHARES``, and
   one fitted to what the quantizer's damage alone was: the rest is left to the
   quantizer, measured against the original) with each quantizer that paid alone;
4. measures every candidate with the one metric on the same data, its file size, the
   cost model's prediction at the deployment's input shapes and its latency on the
   target (``Target.time_model``, interleaved rounds, here);
5. with a recovery the user named other than the re-fit (``--recover finetune``): every
   candidate above is searched and recovered by the re-fit (training in each of the
   search's evaluations would cost minutes per candidate), then the best structural one
   is built again with the named recovery, which may hold more compression under the
   budget; it is measured like the others and chosen only where it pays;
6. keeps the best candidate for the goal among those within the budget. Measured
   latencies closer than ``NOISE`` (or twice the noise measured by timing the input in
   two sessions) count as a tie, broken by the prediction and then by fewer stages, so
   the choice does not flip with timing noise. When no candidate gains that much over
   the lossless result, the lossless result is kept and the report says so.

Candidates are built on ``graphopt.workers`` (here, or on a Ray cluster: a build is a
pure function of its job and the seed) and timed here, one at a time. The report's
``plan`` section lists every candidate, marks the Pareto frontier (score against
measured latency) and the one chosen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from graphopt.candidates import Built, Job, build, job_setup
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.lossy import runs_early, schemes
from graphopt.registry import pass_registry
from graphopt import verify
from graphopt.transform import DEFAULT_RECOVERY, Setup, cost_shapes
from graphopt.workers import Workers

SHARES = (0.5, 0.8)  # shares of the budget the structural search gets before a quantizer
# ... and one more fitted to the quantizer's own damage alone (``_shares``): this many times
# that damage is left to it (a pruned model may take quantization harder), at most MAX_SHARE
QUANT_MARGIN = 2.0
MAX_SHARE = 0.95
PAIR_SHARE = 0.8  # share of the budget the first of two quantizers in a row gets
# what the structural search saves first, per goal (each tried, measured)
RANKINGS = {"latency": ("latency", "flops"), "balanced": ("latency", "flops"),
            "size": ("size",), "flops": ("flops",)}
TIMING_ROUNDS = 3
NOISE = 0.05  # measured latencies this close to the best are a tie
MIN_GAIN = {"latency": 0.05, "size": 0.01, "balanced": 0.03, "flops": 0.01}


@dataclass
class Technique:
    flag: str
    value: str
    pass_name: str
    structural: bool
    variant: str | None = None  # one of the pass's ``variants``: its options
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.flag} {self.value}" + (f" {self.variant}" if self.variant else "")


@dataclass
class Candidate(Built):
    """A plan to build (label, ``stages``, how) and, once built and timed, its figures."""

    label: str = ""
    rank_by: str | None = None  # what the compression search saved first
    early_budget: float | None = None  # the structural stages' budget
    measured_s: float | None = None
    frontier: bool = False
    recovery: str | None = None  # the recovery pass it was built with, when not the setup's

    def take(self, built: Built) -> None:
        """The figures of a ``candidates.build`` (its run, when it kept one)."""
        for f in dataclasses.fields(Built):
            if f.name != "run" or built.run is not None:
                setattr(self, f.name, getattr(built, f.name))

    def to_dict(self) -> dict:
        return {"label": self.label, "stages": self.stages, "rank_by": self.rank_by,
                "score": None if self.score is None else round(self.score, 6),
                "meets_budget": self.ok, "changed": self.changed,
                "size_bytes": self.size_bytes, "flops": self.flops,
                "predicted_latency_s": self.predicted_s,
                "measured_latency_s": self.measured_s,
                "seconds": round(self.seconds, 2), "pareto": self.frontier,
                **({"recovery": self.recovery} if self.recovery else {}),
                "model_hash": self.digest,
                **({"error": self.error} if self.error else {})}


def techniques(target, named: dict[str, list[str]] | None = None) -> list[Technique]:
    """The lossy techniques the planner may use on ``target``: those ``named``
    ({flag: values}) or, without names, every installed scheme whose pass emits ops the
    target runs (``--measure``-only or sampling variants are the passes' own options)."""
    registry = pass_registry()
    out = []
    for flag, table in sorted(schemes(registry).items()):
        for value, name in sorted(table.items()):
            if named is not None and value not in named.get(flag, ()) \
                    and "all" not in named.get(flag, ()):
                continue
            cls = registry.get(name)
            if cls.emits and not any(target.supports(op, d) for d, op in cls.emits):
                continue
            out.append(Technique(flag, value, name, runs_early(cls)))
            out += [Technique(flag, value, name, runs_early(cls), variant, dict(options))
                    for variant, options in sorted(getattr(cls, "variants", {}).items())]
    return out


def plan(setup: Setup, prepared: Model, goal: str,
         named: dict[str, list[str]] | None = None,
         workers: Workers | None = None) -> tuple[Candidate, dict]:
    """Candidates run on copies of ``prepared`` (the target-prepared working model),
    built on ``workers`` (default: here); the chosen one (its ``run`` holds the model and
    trace) and the report's ``plan`` section."""
    workers = workers or Workers()
    named_recovery = setup.recovery \
        if setup.recovery and setup.recovery.partition("(")[0] != DEFAULT_RECOVERY else None
    if named_recovery:  # the candidates are searched with the re-fit; the named one last
        setup = dataclasses.replace(setup, recovery=DEFAULT_RECOVERY)
    techs = techniques(setup.target, named)
    quantizers = [t for t in techs if not t.structural]
    structural = [t for t in techs if t.structural and not t.variant]  # (searched jointly)
    budget = setup.lossy_data.budget
    runner = _Runner(setup, prepared, workers, goal)
    baseline = Candidate(label="lossless")
    singles = [Candidate(label=t.label, stages=[_stage(t, budget)]) for t in quantizers]
    # The search ranks sites by damage per predicted saving; where the cost model is
    # unsure of a layer (few channels, int8), FLOPs can rank better: both are tried and
    # measured.
    searched = [Candidate(stages=[_stage(t, budget) for t in structural], rank_by=rank)
                for rank in (RANKINGS[goal] if structural else ())]
    runner.build([baseline, *singles, *searched])
    base = baseline.score if baseline.score is not None else 1.0
    if searched:  # only the passes that found something to compress go on
        found = set().union(*(c.with_sites for c in searched))
        structural = [t for t in structural if t.pass_name in found]
        for cand in searched:
            cand.label = _label(structural or techs, cand.rank_by)
    candidates = [baseline, *singles, *searched]
    runner.time(candidates)
    objective = _objective(goal, baseline)
    # (a quantizer that does not pay alone may on a pruned model, but the cost model
    # decides per layer inside it; the combinations tried are of those measured to pay)
    paid = sorted((c for c in singles if c.ok and c.changed
                   and objective(c) < objective(baseline) * (1 - MIN_GAIN[goal])),
                  key=objective)
    paid = [c for i, c in enumerate(paid)  # a pass's best variant only
            if all(o.stages[0]["pass"] != c.stages[0]["pass"] for o in paid[:i])]
    second: list[Candidate] = []
    if len(structural) > 1 and any(c.changed for c in searched):
        # each alone too, ranked as the better joint search was
        rank = min((c for c in searched if c.ok and c.changed), key=objective,
                   default=searched[0]).rank_by
        second += [Candidate(label=_label([t], rank), stages=[_stage(t, budget)],
                             rank_by=rank) for t in structural]
    # two quantizers in a row (int4 weights, then int8 for what int4 leaves: a fused
    # attention's weights), the better one alone first, under PAIR_SHARE of the budget
    # (the whole of it would leave the second nothing); of the best three that paid
    top = paid[:3]
    first_budget = base - PAIR_SHARE * (base - budget)
    second += [Candidate(label=f"{a.label} ({PAIR_SHARE:.0%} of the budget) + {b.label}",
                         stages=[{**_fresh(a.stages[0]), "budget": round(first_budget, 6)},
                                 _fresh(b.stages[0])])
               for i, a in enumerate(top) for b in top[i + 1:]]
    if second:
        runner.build(second)
        searched += [c for c in second if c.rank_by]
        candidates += second
        runner.time(candidates)
    valid_structural = [c for c in searched if c.ok and c.changed]
    if valid_structural:
        best = min(valid_structural, key=objective)
        techs_of_best = [t for t in structural
                         if any(s["pass"] == t.pass_name for s in best.stages)]
        combos = []
        for cand in paid:
            tech = next(t for t in quantizers if t.label == cand.label)
            for share in _shares(base, budget, cand.score):
                early = base - share * (base - budget)
                combos.append(Candidate(
                    label=_label(techs_of_best, best.rank_by, share) + f" + {tech.label}",
                    stages=[_stage(t, early) for t in techs_of_best] + [_stage(tech, budget)],
                    rank_by=best.rank_by, early_budget=early))
        if combos:
            runner.build(combos)
            candidates += combos
            runner.time(candidates)  # all again, interleaved: one comparable set of times
    recovered = _recovered(candidates, {t.pass_name for t in techs if t.structural},
                           objective, named_recovery)
    if recovered is not None:
        runner.build([recovered])
        candidates.append(recovered)
        runner.time(candidates)
    chosen, why = choose(candidates, goal, baseline, runner.noise)
    _mark_frontier(candidates)
    runner.keep_run(chosen)
    section = {
        "goal": goal, "budget": budget, "metric": setup.metric.name,
        "data": setup.lossy_data.describe(), "timed_at": runner.shapes,
        "timing": f"least of {TIMING_ROUNDS} interleaved rounds of the target's "
                  f"time_model per candidate",
        "built_on": workers.describe(),
        "techniques": [t.label for t in techs],
        "candidates": [c.to_dict() for c in candidates],
        "chosen": chosen.label, "why": why,
        "input_latency_s": runner.input_latency,
        "timing_noise": round(runner.noise, 4),
        "prediction_tau": _prediction_tau(candidates),
    }
    if chosen.measured_s is not None and runner.input_latency is not None \
            and chosen.measured_s > runner.input_latency * (1 + NOISE):
        section["slower_than_input"] = True
    return chosen, section


def _shares(base: float, budget: float, quantizer_score: float | None) -> tuple[float, ...]:
    """Shares of the budget the structural search gets before a quantizer: ``SHARES``, and
    the share that leaves the quantizer ``QUANT_MARGIN`` times the damage it did alone
    (int8 that costs a tenth of the budget need not be left half of it)."""
    allowed = base - budget
    if quantizer_score is None or allowed <= 0:
        return SHARES
    fitted = min(MAX_SHARE, 1.0 - QUANT_MARGIN * max(base - quantizer_score, 0.0) / allowed)
    return SHARES + (round(fitted, 2),) if fitted >= max(SHARES) + 0.05 else SHARES


def _recovered(candidates: Sequence[Candidate], structural: set[str], objective,
               recovery: str | None) -> Candidate | None:
    """The best candidate with a structural stage (within the budget, changed), planned
    again to be recovered by ``recovery``; ``None`` without one."""
    valid = [c for c in candidates if c.ok and c.changed and c.error is None
             and any(s["pass"] in structural for s in c.stages)]
    if recovery is None or not valid:
        return None
    best = min(valid, key=objective)
    return Candidate(label=f"{best.label}, recovered by {recovery}",
                     stages=[_fresh(s) for s in best.stages], rank_by=best.rank_by,
                     early_budget=best.early_budget, recovery=recovery)


def _prediction_tau(candidates: Sequence[Candidate]) -> float | None:
    """Kendall's tau of the cost model's predicted latency against the measured one over
    the distinct models built: how well the model ranked them here."""
    from scipy.stats import kendalltau

    pairs = {c.digest: (c.predicted_s, c.measured_s) for c in candidates
             if c.predicted_s is not None and c.measured_s is not None}
    if len(pairs) < 3:
        return None
    predicted, measured = zip(*pairs.values())
    tau = kendalltau(predicted, measured).statistic
    return None if math.isnan(tau) else round(float(tau), 3)


def _speed_gated() -> list[str]:
    """Installed lossy passes with a ``require-speedup`` option."""
    from graphopt.pass_infra import option_fields

    registry = pass_registry()
    return [name for table in schemes(registry).values() for name in table.values()
            if "require_speedup" in option_fields(registry.get(name))]


def _label(techs: Sequence[Technique], rank: str | None, share: float | None = None) -> str:
    how = [f"ranked by {rank}"] if rank else []
    how += [f"{share:.0%} of the budget"] if share is not None else []
    return " + ".join(t.label for t in techs) + (f" ({', '.join(how)})" if how else "")


def _fresh(stage: dict) -> dict:
    """A stage as planned (without what a build found)."""
    return {k: stage[k] for k in ("flag", "value", "pass", "budget", "options") if k in stage}


def _stage(tech: Technique, budget: float) -> dict:
    return {"flag": tech.flag, "value": tech.value, "pass": tech.pass_name,
            "budget": round(budget, 6), **({"options": tech.options} if tech.options else {})}


class _Runner:
    """Builds candidates (on the workers) and times them (here, one at a time)."""

    def __init__(self, setup: Setup, prepared: Model, workers: Workers, goal: str):
        self.setup, self.workers = setup, workers
        # For latency, a quantizer quantizes only what runs faster (by the cost model);
        # for size, what it may; otherwise each pass's own default.
        self.options = {name: {"require-speedup": goal == "latency"}
                        for name in _speed_gated()} if goal in ("latency", "size") else {}
        self.prepared = prepared.to_onnx().SerializeToString()
        feeds = setup.lossy_feeds
        self.shapes = cost_shapes(feeds, setup.input_shapes)
        self.timing = _timing_feeds(feeds, self.shapes) or \
            verify.probe_inputs(setup.original, seed=setup.seed, shapes=self.shapes)[0]
        self.input_latency: float | None = None
        self.noise = 0.0  # relative difference of one model timed in two sessions

    def _job(self, cand: Candidate, keep_run: bool) -> Job:
        setup = job_setup(self.setup)
        if cand.recovery:
            setup = dataclasses.replace(setup, recovery=cand.recovery)
        options = {name: dict(values) for name, values in self.options.items()}
        for stage in cand.stages:  # a variant's options
            options.setdefault(stage["pass"], {}).update(stage.get("options", {}))
        return Job(setup, self.prepared, cand.stages, self.shapes,
                   cand.early_budget, cand.rank_by, keep_run, options)

    def build(self, cands: Sequence[Candidate]) -> None:
        """Build and measure (score, size, prediction) each candidate, on the workers."""
        for cand in cands:
            self.setup.logger.info("plan: %s", cand.label)
        results = self.workers.map(build, [self._job(c, not self.workers.remote)
                                           for c in cands], done=self._progress("building"))
        for cand, built in zip(cands, results):
            cand.take(built)

    def keep_run(self, cand: Candidate) -> None:
        """The chosen candidate's full run (trace, pipeline) for the report: built on a
        worker, it is built again here, and must come out the same."""
        if cand.run is not None:
            return
        built = build(self._job(cand, True))
        if built.digest != cand.digest:
            raise GraphoptError(f"planner: candidate {cand.label!r} came out different "
                                f"here than on the workers", hint="report a bug")
        cand.take(built)

    def time(self, candidates: Sequence[Candidate]) -> None:
        """Time the input model and every built candidate on the target, in
        ``TIMING_ROUNDS`` interleaved rounds; each gets the least of its rounds (what the
        machine's other work disturbs only upwards: a round that a background job hit
        says nothing of the model). The input is timed twice, in two sessions: how far
        apart the same model's two figures land is the noise a gain must exceed
        (``self.noise``)."""
        built = [c for c in candidates if c.proto is not None]
        protos = [self.setup.original, self.setup.original] + \
            [onnx.load_from_string(c.proto) for c in built]
        rounds: list[list[float | None]] = [[] for _ in protos]
        tell = self._progress("timing")
        for r in range(TIMING_ROUNDS):  # each round starts elsewhere: no model is always
            for k in range(len(protos)):  # timed first (or right after the same one)
                tell(r * len(protos) + k, TIMING_ROUNDS * len(protos))
                i = (k + r * len(protos) // TIMING_ROUNDS) % len(protos)
                rounds[i].append(self._time(protos[i]))
        least = [None if None in r else min(r) for r in rounds]
        first, second = least[:2]
        if first is not None and second is not None:
            self.input_latency = min(first, second)
            self.noise = max(self.noise, abs(first - second) / min(first, second))
        for cand, value in zip(built, least[2:]):
            cand.measured_s = value

    def _progress(self, doing: str):
        """A ``(done, total)`` callback telling ``setup.progress`` about candidates."""
        report = self.setup.progress or (lambda what, done, total: None)
        return lambda done, total: report(f"plan: {doing} candidates", done, total)

    def _time(self, proto: onnx.ModelProto) -> float | None:
        try:
            return self.setup.target.time_model(proto, self.timing)
        except GraphoptError:
            return None


def _timing_feeds(feeds, shapes) -> dict[str, np.ndarray] | None:
    """The first batch of the real data at the shapes timed (the deployment's): each axis
    cropped, or tiled where the data is shorter. Random probe inputs time some models
    unlike real ones (a random 0/1 attention mask ran int8 MiniLM 1.4x slower than a
    real sentence's all-ones mask). ``None``: no data, or data of other inputs or ranks."""
    if not feeds or not shapes or set(feeds[0]) != set(shapes):
        return None
    out = {}
    for name, array in feeds[0].items():
        shape = shapes[name]
        if len(shape) != array.ndim or not all(isinstance(d, int) and d > 0 for d in shape):
            return None
        for axis, size in enumerate(shape):
            if array.shape[axis] != size:
                array = np.take(array, np.arange(size) % array.shape[axis], axis=axis)
        out[name] = np.ascontiguousarray(array)
    return out


def _objective(goal: str, baseline: Candidate):
    """Lower is better; latency measured where it could be, else predicted."""

    def latency(c: Candidate) -> float:
        value = c.measured_s if c.measured_s is not None else c.predicted_s
        return value if value is not None else math.inf

    if goal == "size":
        return lambda c: float(c.size_bytes)
    if goal == "flops":
        return lambda c: c.flops
    if goal == "balanced":
        lat0, size0 = latency(baseline), float(baseline.size_bytes) or 1.0
        return lambda c: math.sqrt(latency(c) / lat0 * c.size_bytes / size0)
    return latency


def choose(candidates: Sequence[Candidate], goal: str, baseline: Candidate,
           noise: float = 0.0) -> tuple[Candidate, str]:
    """The best candidate within the budget for ``goal`` (see the module docstring), and
    why it was chosen. A candidate whose lossy passes changed nothing is the lossless
    result again, whatever its timing says; measured latencies count as different only
    beyond ``NOISE`` and twice the ``noise`` the timing showed."""
    objective = _objective(goal, baseline)
    valid = [c for c in candidates if c.ok and c.error is None
             and (c.changed or c is baseline)]
    best_value = min(objective(c) for c in valid)
    noisy = goal in ("latency", "balanced")
    margin = max(NOISE, 2 * noise) if noisy else 0.0
    tied = [c for c in valid if objective(c) <= best_value * (1 + margin)]
    chosen = min(tied, key=lambda c: (c.predicted_s if c.predicted_s is not None
                                      else math.inf, len(c.stages), c.label))
    gain = 1.0 - objective(chosen) / objective(baseline) if objective(baseline) else 0.0
    needed = max(MIN_GAIN[goal], 2 * noise if noisy else 0.0)
    if chosen is not baseline and gain < needed:
        return baseline, (f"no lossy technique gains {needed:.0%} on {goal} within "
                          f"the budget (best: {chosen.label}, {gain:+.1%}): the model "
                          f"stays lossless")
    if chosen is baseline:
        return baseline, ("no lossy technique gains on " + goal + " within the budget: "
                          "the model stays lossless")
    return chosen, f"{goal} {1 - gain:.3f}x the lossless result's, within the budget"


def _mark_frontier(candidates: Sequence[Candidate]) -> None:
    """Pareto frontier of the candidates within the budget that are not the lossless
    result again: score (higher, as reported) against latency (measured, else predicted;
    lower)."""
    def lat(c: Candidate) -> float:
        v = c.measured_s if c.measured_s is not None else c.predicted_s
        return math.inf if v is None else v

    valid = [c for c in candidates if c.ok and c.score is not None
             and (c.changed or not c.stages)]
    for c in valid:
        score = round(c.score, 6)
        c.frontier = not any(o is not c and round(o.score, 6) >= score and lat(o) <= lat(c)
                             and (round(o.score, 6) > score or lat(o) < lat(c))
                             for o in valid)
