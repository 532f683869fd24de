"""Budgeted compression: the contract every lossy compression pass is a client of.

A compression pass (pruning, low-rank, sparsity, a plugin's own technique) says only two
things: which **sites** a model has (a channel group, a head group, a layer's rank) with
the **settings** each can take, and how to **apply** chosen settings to a model. The core
does the rest, the same way for every technique:

1. measures the damage of each (site, setting) alone with the one accuracy metric
   (``graphopt.metric``) on the validation (else calibration) data, and what it saves by
   the cost model (latency on the target's device, FLOPs, parameters);
2. searches the settings: each site takes its strongest setting whose damage per unit
   saved is below a threshold; the threshold is bisected so the combined model, after
   recovery, meets the budget (every model it returns was measured to meet it); then
   what is left of the budget is spent one site's next setting at a time, best deals
   first, each step measured on the whole model (sites interact);
3. recovers each candidate before measuring it (``PassContext.recovery``: a pass of the
   recovery family re-fits the changed layers to the original model's outputs);
4. reports, per site: technique, setting, size before/after, damage alone, FLOPs and
   parameters saved, predicted latency change; and the measured score of the result.

A pass that takes a fixed setting from its options (``fixed_choice``), or is given a
previous run's settings (``PassContext.replay``, ``graphopt.replay``), skips the search;
its result is still recovered, measured and reported.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import onnx

from graphopt import accuracy, replay, verify
from graphopt.accuracy import run_all, session
from graphopt.cost import tensor_bytes
from graphopt.ir import Model
from graphopt.metric import DEFAULT_BUDGET, get_metric
from graphopt.pass_infra import Pass, PassContext, PassResult

Kept = dict[str, tuple[int, np.ndarray]]
REFINE_STEPS = 12  # evaluations spent refining the threshold search's result, at most


@dataclass
class Site:
    """A place a compression pass can compress, and the settings it can take.

    ``settings[0]`` leaves the site unchanged; the rest go from mildest to strongest.
    A ``refused`` site is listed in the report with the reason and never applied."""

    name: str
    kind: str
    settings: tuple = ()
    nodes: tuple[str, ...] = ()
    size: int | None = None
    refused: str | None = None
    info: dict = field(default_factory=dict, repr=False)

    @property
    def searchable(self) -> bool:
        return self.refused is None and len(self.settings) > 1


@dataclass
class Applied:
    """What ``CompressionPass.apply`` did: stats for the report, and every tensor it
    narrowed: name -> (axis, indices kept, into that tensor as it was before the pass)."""

    stats: dict = field(default_factory=dict)
    kept: Kept = field(default_factory=dict)


class CompressionPass(Pass):
    """Base class of lossy compression passes (see the module docstring)."""

    lossless = False
    technique: ClassVar[str] = "compress"
    # Whether ``join_compression`` may search this pass's sites together with its
    # neighbours' (a pass that cannot apply on top of another's narrowing says no).
    joinable: ClassVar[bool] = True
    # Whether the recovery pass re-fits what this pass changed (a quantizer that rounds
    # with its own error compensation, GPTQ, is not re-fitted in float).
    recoverable: ClassVar[bool] = True

    def search_goal(self, ctx: PassContext) -> str:
        """What a site's setting is judged to save (``latency``, ``flops``, ``size``):
        the run's goal, unless the pass serves another (weight-only quantization saves
        bytes whatever the goal, unless told to be faster too)."""
        return ctx.goal

    @abstractmethod
    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        """Every site of ``model``, refused ones with their reason."""

    @abstractmethod
    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        """Give each site named in ``choice`` that setting, editing ``model`` in place."""

    def damages(self, model: Model, sites: list[Site], data: list,
                score: Callable[[list], float]) -> dict[tuple[str, Any], float] | None:
        """Optional: the score of every (site, setting) alone, measured faster than one
        model per pair (e.g. masks or switches in one ONNX Runtime session):
        ``score(outputs)`` turns the outputs of a run over ``data`` (one dict per batch)
        into the metric's score. ``None`` (default): the core builds and measures each
        pair. Pairs left out are built and measured by the core."""
        return None

    def not_sites(self) -> dict[str, int]:
        """Optional: places that are not sites at all, counted by why (e.g. a MatMul of
        two activations has no weight to quantize), after ``sites``; for the report."""
        return {}

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        """The settings the options fix (e.g. one ratio for every site), or ``None`` to let
        the core search them under the budget."""
        return None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return Driver(self, ctx).run(model)


def weight_bytes(model: Model) -> int:
    """Bytes the model's constants take as stored (4-bit types packed two a byte)."""
    return sum(tensor_bytes(t) for t in model.initializers())


def nearest_setting(site: Site, value: float) -> Any:
    """The setting of ``site`` closest to ``value`` (numeric settings)."""
    return min(site.settings, key=lambda s: (abs(float(s) - value), -float(s)))


def compose_kept(earlier: Kept, later: Kept) -> Kept:
    """Narrowings of two passes in a row as one map into the original tensors."""
    out = dict(earlier)
    for name, (axis, idx) in later.items():
        if name in earlier:
            first_axis, first = earlier[name]
            out[name] = (axis, np.asarray(first)[np.asarray(idx)])
        else:
            out[name] = (axis, np.asarray(idx))
    return out


# ============================================================================ driver
@dataclass
class _Option:
    """One (site, setting) measured alone."""

    site: str
    index: int
    setting: Any
    damage: float  # fall of the metric's score, measured alone
    error: float  # relative output error alone: a continuous damage to rank by
    saved_s: float
    saved_flops: float
    saved_params: int
    saved_bytes: int = 0  # of the weights as stored (a quantizer saves bytes, not params)

    def ratio(self, goal: str) -> float:
        """Damage per unit saved of ``goal`` (lower is a better deal). The metric may be
        coarse (top-1 on a few hundred samples moves in steps), so damage ranks by the
        metric first and the output error second."""
        gain = {"latency": self.saved_s, "flops": self.saved_flops,
                "size": float(self.saved_bytes)}.get(goal, self.saved_s)
        return (self.damage + 1e-3 * self.error) / gain if gain > 0 else float("inf")


@dataclass
class _Candidate:
    choice: dict[str, Any]
    model: Model
    kept: Kept
    stats: dict
    score: float
    recovery: dict | None
    error: float = float("nan")


class Driver:
    """Runs one compression pass under the budget (see the module docstring)."""

    def __init__(self, compression: CompressionPass, ctx: PassContext):
        self.cp = compression
        self.ctx = ctx
        self.metric = ctx.metric or get_metric(None)
        self.budget = DEFAULT_BUDGET if ctx.tolerance is None else ctx.tolerance
        self.evaluations = 0
        self.goal = compression.search_goal(ctx)
        self.recovery = ctx.recovery if compression.recoverable else None
        # Measure each site alone after recovery too: what recovery can undo differs
        # from site to site, and unrecovered damage would rank them wrongly.
        self.recover_alone = self.recovery is not None

    # ------------------------------------------------------------------ data
    def _data(self, model: Model) -> tuple[list, str]:
        data = self.ctx.validation or self.ctx.calibration
        if data:
            return list(data), "validation data" if self.ctx.validation else \
                "calibration data"
        self.ctx.logger.warning("%s: NO CALIBRATION DATA: damage measured on random probe "
                                "inputs, the accuracy of the result is UNMEASURED",
                                self.cp.name)
        return verify.probe_inputs(model.to_onnx(), count=4, seed=self.ctx.seed), \
            "unmeasured: random data"

    def measure(self, proto: onnx.ModelProto) -> tuple[float, float]:
        """(metric score, relative output error) of ``proto`` on the data."""
        self.evaluations += 1
        outputs = run_all(session(proto, optimize=False), self.data)
        return self._score_outputs(outputs), self._error(outputs)

    def _error(self, outputs: list) -> float:
        num = den = 0.0
        for ref, got in zip(self.reference_outputs, outputs):
            for name, r in ref.items():
                a = np.asarray(r, dtype=np.float64)
                b = np.asarray(got[name], dtype=np.float64)
                if a.shape != b.shape:
                    return float("inf")
                num += float(((a - b) ** 2).sum())
                den += float((a ** 2).sum())
        return float(np.sqrt(num / den)) if den else float(num > 0)

    def _score_outputs(self, outputs: list) -> float:
        return self.metric.score(self.reference_outputs, outputs, self.data)

    # ------------------------------------------------------------------ building
    def _cost(self, model: Model):
        """The cost model's estimate at the deployment's input shapes where known (a
        sequence of 128 tokens is not one of unknown length: int4 weights save time at
        one token and cost it at 128), else at the shapes the graph has."""
        if self.ctx.cost_model is None or self.ctx.device is None:
            return None
        if self.ctx.input_shapes:
            from graphopt.cost_calibration import static_model
            from graphopt.errors import GraphoptError

            try:
                shaped = static_model(model.to_onnx(references=True), self.ctx.input_shapes)
                return self.ctx.cost_model.estimate(shaped, self.ctx.device, infer=False)
            except GraphoptError:
                pass  # shapes as the graph has them
        return self.ctx.cost_model.estimate(model, self.ctx.device)

    def build(self, base: Model, choice: Mapping[str, Any], recover: bool | str,
              measure: bool = True) -> _Candidate:
        """``choice`` applied to a copy of ``base``, recovered (``recover="quick"``: by
        the recovery pass's cheaper ``quick()`` variant when it has one) and measured."""
        model = base.clone()
        applied = self.cp.apply(model, dict(choice), self.ctx)
        kept = compose_kept(self.ctx.kept or {}, applied.kept)
        recovery = None
        if recover and self.recovery is not None and choice:
            saved = self.ctx.kept
            self.ctx.kept = kept
            recoverer = self.recovery
            if recover == "quick" and hasattr(recoverer, "quick"):
                recoverer = self._quick = getattr(self, "_quick", None) or recoverer.quick()
            try:
                result = recoverer.run(model, self.ctx)
                recovery = dict(result.stats)
            finally:
                self.ctx.kept = saved
        score, error = self.measure(model.to_onnx()) if measure else (float("nan"),) * 2
        return _Candidate(dict(choice), model, kept, applied.stats, score, recovery, error)

    # ------------------------------------------------------------------ the run
    def run(self, model: Model) -> PassResult:
        start = time.perf_counter()
        ctx = self.ctx
        reference = ctx.reference if ctx.reference is not None else model.to_onnx()
        self.data, data_text = self._data(model)
        self.reference_outputs = accuracy.reference_outputs(reference, self.data)
        sites = self.cp.sites(model, ctx)
        active = [s for s in sites if s.searchable]
        stats: dict = {"technique": self.cp.technique, "metric": self.metric.name,
                       "budget": self.budget, "data": data_text,
                       "refused": {s.name: s.refused for s in sites if s.refused}}
        if self.cp.not_sites():
            stats["not_sites"] = self.cp.not_sites()
        if not active:
            stats["reason"] = "no site can be compressed"
            return PassResult(False, {"compression": stats})
        base_cost = self._cost(model)
        self.base_bytes = weight_bytes(model)
        self.base_score, _ = self.measure(model.to_onnx())
        replayed = (ctx.replay or {}).get(self.cp.name)
        if replayed is not None:  # a previous run's choice (graphopt.replay)
            fixed = replay.choice(self.cp.name, replayed, sites)
        else:
            fixed = self.cp.fixed_choice(active)
        if fixed is not None:
            fixed = {k: v for k, v in fixed.items()
                     if any(s.name == k and v != s.settings[0] for s in active)}
        # (replayed: the search's measurements are in the report replayed, not redone)
        options = {} if replayed is not None else \
            self._single_site_options(model, active, base_cost, fixed)
        if fixed is not None:
            best = self.build(model, fixed, recover=True) if fixed else None
            stats["mode"] = "fixed" if replayed is None else "replayed"
        else:
            best, stats["search"] = self._search(model, active, options)
            stats["mode"] = "searched"
        stats["evaluations"] = self.evaluations
        stats["seconds"] = round(time.perf_counter() - start, 3)
        if best is None or not best.choice:
            stats["reason"] = "the budget holds for no compressed setting" \
                if fixed is None else "the options fix no change"
            stats["sites"] = self._site_report(active, {}, options)
            return PassResult(False, {"compression": stats})
        model.graph = best.model.graph
        ctx.kept = best.kept
        after = self._cost(model)
        stats.update({
            "score": round(best.score, 6),
            "score_before": round(self.base_score, 6),
            "meets_budget": best.score >= self.budget,
            "sites": self._site_report(active, best.choice, options),
            "applied": best.stats,
            "recovery": best.recovery,
            "weight_bytes_before": self.base_bytes,
            "weight_bytes_after": weight_bytes(model),
        })
        if base_cost is not None and after is not None:
            stats["cost"] = {"flops_before": base_cost.flops, "flops_after": after.flops,
                             "params_before": base_cost.params, "params_after": after.params,
                             "latency_before_s": base_cost.latency_s,
                             "latency_after_s": after.latency_s}
        return PassResult(True, {"compression": stats})

    def _single_site_options(self, model: Model, active: list[Site], base_cost,
                             fixed: Mapping[str, Any] | None = None
                             ) -> dict[str, list[_Option]]:
        """Each site's settings measured alone (recovered by the recovery pass's quick
        variant, when there is recovery and ``recover_alone``), mildest first; a site
        stops at the first setting whose damage alone already breaks the budget by far.
        With ``fixed`` settings, only those (for the report)."""
        slack = max(self.base_score - self.budget, 1e-9)
        fast = self.cp.damages(model, active, self.data, self._score_outputs) or {}
        recover = "quick" if self.recover_alone else False
        out: dict[str, list[_Option]] = {}
        for done, site in enumerate(active):
            self.ctx.step(f"{self.cp.name}: damage of each site alone", done, len(active))
            out[site.name] = []
            for index, setting in enumerate(site.settings[1:], start=1):
                if fixed is not None and fixed.get(site.name) != setting:
                    continue
                known = fast.get((site.name, setting))
                cand = self.build(model, {site.name: setting},  # (costs need no recovery)
                                  recover=recover if known is None else False,
                                  measure=known is None)
                score = known if known is not None else cand.score
                error = 0.0 if known is not None else cand.error
                cost = self._cost(cand.model)
                saved = (base_cost.latency_s - cost.latency_s, base_cost.flops - cost.flops,
                         base_cost.params - cost.params) if cost and base_cost else (0, 0, 0)
                out[site.name].append(_Option(site.name, index, setting,
                                              max(self.base_score - score, 0.0), error,
                                              *saved,
                                              self.base_bytes - weight_bytes(cand.model)))
                damage = self.base_score - score
                if damage > 0.5 or damage > 4 * slack:
                    break  # stronger settings only hurt more
        return out

    def _choice_at(self, active: list[Site], options, threshold: float) -> dict[str, Any]:
        """Each site's strongest setting whose damage per unit saved, and that of every
        milder setting that saves anything, is within ``threshold``."""
        choice = {}
        for site in active:
            chosen = None
            for opt in options[site.name]:
                ratio = opt.ratio(self.goal)
                if not np.isfinite(ratio):
                    continue  # saves nothing (e.g. an added bias outweighs a small cut)
                if ratio > threshold:
                    break
                chosen = opt.setting
            if chosen is not None:
                choice[site.name] = chosen
        return choice

    def _search(self, model: Model, active: list[Site], options) -> tuple:
        thresholds = sorted({o.ratio(self.goal) for opts in options.values() for o in opts
                             if np.isfinite(o.ratio(self.goal))})
        tried: list[dict] = []
        cache: dict[int, _Candidate] = {}

        def attempt(i: int) -> _Candidate:
            if i not in cache:
                self.ctx.step(f"{self.cp.name}: searching the settings (models measured)",
                              len(tried))
                choice = self._choice_at(active, options, thresholds[i])
                cache[i] = self.build(model, choice, recover=True)
                tried.append({"threshold": float(f"{thresholds[i]:.4g}"),
                              "sites_changed": len(choice),
                              "score": round(cache[i].score, 6),
                              "ok": cache[i].score >= self.budget})
            return cache[i]

        if not thresholds:
            return None, tried
        lo, hi = -1, len(thresholds) - 1  # lo: known good (-1: nothing), hi: to test
        if attempt(hi).score >= self.budget:
            return cache[hi], tried
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if attempt(mid).score >= self.budget:
                lo = mid
            else:
                hi = mid
        return self._refine(model, active, options, cache[lo] if lo >= 0 else None, tried,
                            list(cache.values()))

    def _refine(self, model: Model, active: list[Site], options, best: _Candidate | None,
                tried: list[dict], measured: list[_Candidate]) -> tuple:
        """Spend what the threshold search left of the budget: one site at a time, its
        next stronger setting, best deals first; a step is kept when the whole model still
        meets the budget (damages alone do not add up exactly: sites interact), and a
        site that fails is not tried again. At most ``REFINE_STEPS`` evaluations."""
        choice = dict(best.choice) if best is not None else {}
        blocked: set[str] = set()
        for _ in range(REFINE_STEPS):
            steps = []
            for site in active:
                if site.name in blocked:
                    continue
                current = choice.get(site.name, site.settings[0])
                stronger = [o for o in options[site.name]
                            if o.index > site.settings.index(current)
                            and np.isfinite(o.ratio(self.goal))]
                if stronger:
                    steps.append((stronger[0].ratio(self.goal), site.name,
                                  stronger[0].setting))
            if not steps:
                break
            _, name, setting = min(steps, key=lambda t: (t[0], t[1]))
            step = {**choice, name: setting}
            self.ctx.step(f"{self.cp.name}: searching the settings (models measured)",
                          len(tried))
            cand = next((c for c in measured if c.choice == step), None) or \
                self.build(model, step, recover=True)
            ok = cand.score >= self.budget
            tried.append({"refine": name, "setting": _plain(setting),
                          "score": round(cand.score, 6), "ok": ok})
            if ok:
                best, choice = cand, dict(cand.choice)
            else:
                blocked.add(name)
        return best, tried

    def _site_report(self, active: list[Site], choice: Mapping[str, Any], options) -> dict:
        report = {}
        for site in active:
            setting = choice.get(site.name, site.settings[0])
            opt = next((o for o in options.get(site.name, []) if o.setting == setting), None)
            entry = {"kind": site.kind,
                     "technique": site.info.get("technique", self.cp.technique),
                     "setting": _plain(setting), "changed": site.name in choice,
                     "size": site.size,
                     "nodes": list(site.nodes)}
            if opt is not None:
                entry.update({"damage_alone": float(f"{opt.damage:.4g}"),
                              "output_error_alone": float(f"{opt.error:.4g}"),
                              "flops_saved": opt.saved_flops,
                              "params_saved": int(opt.saved_params),
                              "bytes_saved": int(opt.saved_bytes),
                              "predicted_latency_saved_s": float(f"{opt.saved_s:.4g}")})
            report[site.name] = entry
        return report


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
