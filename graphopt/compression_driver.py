"""The search behind ``graphopt.compression``: one compression pass run under the budget.

See ``graphopt.compression`` for the contract; this module measures each (site, setting)
alone, searches the settings that meet the budget (a threshold on damage per unit saved,
bisected, then refined one site at a time), recovers every candidate and reports per
site. Every model it returns was measured to meet the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx

from graphopt import accuracy, replay, verify
from graphopt.accuracy import run_all, session, top1_agreement
from graphopt.compression import (CompressionPass, Kept, Quota, Saving, Site,
                                  compose_kept, weight_bytes)
from graphopt.ir import Model
from graphopt.metric import DEFAULT_BUDGET, get_metric
from graphopt.pass_infra import PassContext, PassResult

REFINE_STEPS = 12  # evaluations spent refining the threshold search's result, at most
# Seconds a byte of weights saved is worth, under the latency goal, to a setting that
# moves no predicted time (an int8 embedding table, whose rows are dequantized after the
# gather; any setting without a cost model): the bytes read once from memory at 10 GB/s.
SECONDS_PER_BYTE = 1e-10


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
    measured: bool = True  # False: the damage alone was not measured (it is not needed)

    def ratio(self, goal: str) -> float:
        """Damage per unit saved of ``goal`` (lower is a better deal). The metric may be
        coarse (top-1 on a few hundred samples moves in steps), so damage ranks by the
        metric first and the output error second."""
        gain = _gain(goal, Saving(self.saved_s, self.saved_flops, self.saved_params,
                                  self.saved_bytes))
        return (self.damage + 1e-3 * self.error) / gain if gain > 0 else float("inf")


def _gain(goal: str, saving: Saving) -> float:
    """What ``saving`` is worth to ``goal`` (``latency``, ``flops`` or ``size``)."""
    if goal == "flops":
        return saving.flops
    if goal == "size":
        return float(saving.bytes)
    if saving.seconds == 0 and saving.bytes > 0:
        return SECONDS_PER_BYTE * saving.bytes  # size where time does not move
    return saving.seconds


@dataclass
class _Candidate:
    choice: dict[str, Any]
    model: Model
    kept: Kept
    stats: dict
    score: float
    recovery: dict | None
    error: float = float("nan")
    top1: float | None = None
    outputs: list | None = None  # on the manager's check batches, as written


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
        self.modes = compression.evaluation_modes(ctx)
        self.top1_floor = compression.min_top1(ctx)
        self.hand_over = False  # measured on the manager's check batches
        self.known: list[_Candidate] = []  # measured before the search (optimistic)

    def ok(self, cand: "_Candidate") -> bool:
        """Whether a measured candidate meets the budget (and the top-1 floor)."""
        if not cand.score >= self.budget:
            return False
        return self.top1_floor is None or cand.top1 is None or cand.top1 >= self.top1_floor

    def meets_budget(self, proto: onnx.ModelProto) -> bool:
        """Measure ``proto`` (not a candidate of the search) against the budget."""
        return self.judge(proto)[0]

    def judge(self, proto: onnx.ModelProto) -> tuple[bool, float, float | None]:
        """``meets_budget``, with the score and the top-1 agreement (``None``: no floor)
        it measured."""
        score, _, top1, _ = self.measure(proto)
        return self.ok(_Candidate({}, None, {}, {}, score, None, top1=top1)), score, top1

    # ------------------------------------------------------------------ data
    def _data(self, model: Model) -> tuple[list, str]:
        data = self.ctx.validation or self.ctx.calibration
        if data and self.cp.measures_check_feeds and self.ctx.check_feeds and \
                self.ctx.check_reference is not None:
            self.hand_over = True
            return list(self.ctx.check_feeds), "validation data" if self.ctx.validation \
                else "calibration data"
        if data:
            return list(data), "validation data" if self.ctx.validation else \
                "calibration data"
        self.ctx.logger.warning("%s: NO CALIBRATION DATA: damage measured on random probe "
                                "inputs, the accuracy of the result is UNMEASURED",
                                self.cp.name)
        return verify.probe_inputs(model.to_onnx(), count=4, seed=self.ctx.seed), \
            "unmeasured: random data"

    def measure(self, proto: onnx.ModelProto) -> tuple[float, float, float | None, list | None]:
        """(metric score, relative output error, top-1 agreement when there is a floor,
        outputs as written when handed over) of ``proto`` on the data: the worse of the
        pass's evaluation modes."""
        self.evaluations += 1
        score, error, agree, total, kept = float("inf"), 0.0, 0, 0, None
        for optimize in self.modes:
            outputs = run_all(session(proto, optimize=optimize), self.data)
            score = min(score, self._score_outputs(outputs))
            error = max(error, self._error(outputs))
            if self.top1_floor is not None:
                for ref, got in zip(self.reference_outputs, outputs):
                    a, t = top1_agreement(ref, got)
                    agree, total = agree + a, total + t
            if not optimize and self.hand_over:
                kept = outputs
        return score, error, (agree / total if total else None), kept

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
        score, error, top1, outputs = self.measure(model.to_onnx()) if measure else \
            (float("nan"), float("nan"), None, None)
        return _Candidate(dict(choice), model, kept, applied.stats, score, recovery, error,
                          top1, outputs)

    # ------------------------------------------------------------------ the run
    def run(self, model: Model) -> PassResult:
        start = time.perf_counter()
        ctx = self.ctx
        reference = ctx.reference if ctx.reference is not None else model.to_onnx()
        self.data, data_text = self._data(model)
        self.reference_outputs = self.ctx.check_reference if self.hand_over else \
            accuracy.reference_outputs(reference, self.data)
        sites = self.cp.sites(model, ctx)
        active = [s for s in sites if s.searchable]
        stats: dict = {"technique": self.cp.technique, "metric": self.metric.name,
                       "budget": self.budget, "data": data_text,
                       "refused": {s.name: s.refused for s in sites if s.refused}}
        if self.cp.not_sites():
            stats["not_sites"] = self.cp.not_sites()
        if not active:
            stats["reason"] = "no site can be compressed"
            if stats["refused"]:
                first = next(iter(stats["refused"]))
                stats["reason"] += (f": {len(stats['refused'])} refused, e.g. {first}: "
                                    f"{stats['refused'][first]}")
            return PassResult(False, {"compression": stats})
        base_cost = self._cost(model)
        self.base_bytes = weight_bytes(model)
        if self.hand_over and ctx.check_current is not None:  # known: no run
            self.base_score = self._score_outputs(ctx.check_current)
        else:
            self.base_score = self.measure(model.to_onnx())[0]
        self.savings = self.cp.savings(model, active, ctx) or {}
        replayed = (ctx.replay or {}).get(self.cp.name)
        if replayed is not None:  # a previous run's choice (graphopt.replay)
            fixed = replay.choice(self.cp.name, replayed, sites)
        else:
            fixed = self.cp.fixed_choice(active)
        if fixed is not None:
            fixed = {k: v for k, v in fixed.items()
                     if any(s.name == k and v != s.settings[0] for s in active)}
        quota = self.cp.quota(active) if fixed is None and replayed is None else None
        first = self._optimistic(model, active) if fixed is None and quota is None \
            else None
        if first is not None and self.ok(first[0]):
            # every site at once met the budget: no site needs measuring alone
            best, stats["search"], stats["mode"] = first[0], [first[1]], "searched"
            options = self._single_site_options(model, active, base_cost, best.choice,
                                                measure=False)
        else:
            # (replayed: the search's measurements are in the report replayed, not redone)
            options = {} if replayed is not None else \
                self._single_site_options(model, active, base_cost, fixed,
                                          every=quota is not None)
            if fixed is not None:
                best = self.build(model, fixed, recover=True) if fixed else None
                stats["mode"] = "fixed" if replayed is None else "replayed"
            elif quota is not None:
                best, stats["allocation"] = self._allocate(model, active, options, quota)
                stats["mode"] = "allocated"
            else:
                best, stats["search"] = self._search(model, active, options)
                stats["search"][:0] = [first[1]] if first is not None else []
                stats["mode"] = "searched"
        stats["evaluations"] = self.evaluations
        stats["seconds"] = round(time.perf_counter() - start, 3)
        if best is None or not best.choice:
            stats["reason"] = "the budget holds for no compressed setting" \
                if fixed is None and quota is None else "the options fix no change"
            stats["sites"] = self._site_report(active, {}, options)
            return PassResult(False, {"compression": stats})
        model.graph = best.model.graph
        ctx.kept = best.kept
        after = self._cost(model)
        stats.update({
            "score": round(best.score, 6),
            "score_before": round(self.base_score, 6),
            **({"top1_agreement": round(best.top1, 6), "min_top1": self.top1_floor}
               if best.top1 is not None else {}),
            "meets_budget": self.ok(best),
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
        return PassResult(True, {"compression": stats}, outputs=best.outputs)

    def _optimistic(self, model: Model, active: list[Site]) -> tuple | None:
        """With an ``optimistic`` pass: every site at its strongest setting that saves
        (by ``savings``; every setting when unknown), built and measured as one model."""
        if not self.cp.optimistic:
            return None
        choice = {}
        for site in active:
            for setting in reversed(site.settings[1:]):
                known = self.savings.get((site.name, setting))
                if known is None or _gain(self.goal, known) > 0:
                    choice[site.name] = setting
                    break
        if not choice:
            return None
        self.ctx.step(f"{self.cp.name}: every site at once", 0, 1)
        cand = self.build(model, choice, recover=True)
        self.known.append(cand)
        return cand, {"all_sites": len(choice), "score": round(cand.score, 6),
                      "ok": self.ok(cand)}


    def _single_site_options(self, model: Model, active: list[Site], base_cost,
                             fixed: Mapping[str, Any] | None = None, measure: bool = True,
                             every: bool = False) -> dict[str, list[_Option]]:
        """Each site's settings measured alone (recovered by the recovery pass's quick
        variant, when there is recovery and ``recover_alone``), mildest first; a site
        stops at the first setting whose damage alone already breaks the budget by far
        (``every``: it does not). With ``fixed`` settings, only those (for the report);
        ``measure=False``: only what they save, their damage alone unmeasured."""
        slack = max(self.base_score - self.budget, 1e-9)
        fast = (self.cp.damages(model, active, self.data, self._score_outputs) or {}) \
            if measure else {}
        recover = "quick" if self.recover_alone else False
        out: dict[str, list[_Option]] = {}
        for done, site in enumerate(active):
            if measure:
                self.ctx.step(f"{self.cp.name}: damage of each site alone", done, len(active))
            out[site.name] = []
            for index, setting in enumerate(site.settings[1:], start=1):
                if fixed is not None and fixed.get(site.name) != setting:
                    continue
                known = fast.get((site.name, setting))
                saving = self.savings.get((site.name, setting))
                build = measure and known is None
                cand = self.build(model, {site.name: setting},  # (costs need no recovery)
                                  recover=recover if build else False, measure=build) \
                    if build or saving is None else None
                if saving is None:
                    cost = self._cost(cand.model)
                    saving = Saving(base_cost.latency_s - cost.latency_s,
                                    base_cost.flops - cost.flops,
                                    base_cost.params - cost.params,
                                    self.base_bytes - weight_bytes(cand.model)) \
                        if cost and base_cost else \
                        Saving(bytes=self.base_bytes - weight_bytes(cand.model))
                score = known if known is not None else cand.score if build else None
                damage = max(self.base_score - score, 0.0) if score is not None else 0.0
                out[site.name].append(_Option(
                    site.name, index, setting, damage, cand.error if build else 0.0,
                    saving.seconds, saving.flops, saving.params, saving.bytes,
                    measured=score is not None))
                if not every and score is not None and (self.base_score - score > 0.5
                                          or self.base_score - score > 4 * slack):
                    break  # stronger settings only hurt more
        return out

    def _allocate(self, model: Model, active: list[Site], options, quota: Quota
                  ) -> tuple[_Candidate | None, dict]:
        """The settings that remove ``quota.total`` units at the least summed damage
        alone (``least_damage``; damage ranked as ``_Option.ratio`` does: the metric,
        then the output error), built, recovered and measured."""
        moves = {site.name: [(int(round(quota.removed(site, o.setting))),
                              o.damage + 1e-3 * o.error, o.setting)
                             for o in options[site.name] if o.measured]
                 for site in active}
        choice, removed, damage = least_damage(moves, quota.total)
        info = {"quota": quota.total, "removed": removed,
                "reached": removed >= quota.total - 1e-9,
                "summed_damage_alone": float(f"{damage:.4g}")}
        if not info["reached"]:
            self.ctx.logger.warning("%s: the quota of %g is out of reach of the measured "
                                    "settings; removing %d", self.cp.name, quota.total,
                                    removed)
        self.ctx.step(f"{self.cp.name}: the allocation, recovered and measured", 0, 1)
        return (self.build(model, choice, recover=True) if choice else None), info

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
                cache[i] = next((c for c in self.known if c.choice == choice), None) or \
                    self.build(model, choice, recover=True)
                tried.append({"threshold": float(f"{thresholds[i]:.4g}"),
                              "sites_changed": len(choice),
                              "score": round(cache[i].score, 6),
                              "ok": self.ok(cache[i])})
            return cache[i]

        if not thresholds:
            return None, tried
        lo, hi = -1, len(thresholds) - 1  # lo: known good (-1: nothing), hi: to test
        if self.ok(attempt(hi)):
            return cache[hi], tried
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.ok(attempt(mid)):
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
            ok = self.ok(cand)
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
            if opt is None and site.name not in choice:
                # kept unchanged: what its mildest measured setting would have cost
                tried = next((o for o in options.get(site.name, []) if o.measured), None)
                if tried is not None:
                    entry["declined"] = {"setting": _plain(tried.setting),
                                         "damage_alone": float(f"{tried.damage:.4g}"),
                                         "predicted_latency_saved_s":
                                             float(f"{tried.saved_s:.4g}")}
            if opt is not None:
                if opt.measured:
                    entry.update({"damage_alone": float(f"{opt.damage:.4g}"),
                                  "output_error_alone": float(f"{opt.error:.4g}")})
                entry.update({"flops_saved": opt.saved_flops,
                              "params_saved": int(opt.saved_params),
                              "bytes_saved": int(opt.saved_bytes),
                              "predicted_latency_saved_s": float(f"{opt.saved_s:.4g}")})
            report[site.name] = entry
        return report


def least_damage(moves: Mapping[str, list[tuple[int, float, Any]]], total: float
                 ) -> tuple[dict[str, Any], int, float]:
    """(choice, units removed, summed damage): one move per site, ``(units removed,
    damage, setting)``, or the site unchanged (0, 0), removing at least ``total`` units at
    the least summed damage; ties go to the fewest units. Dynamic programming over the
    units removed (a multiple-choice knapsack, exact); the most that can be removed when
    ``total`` is out of reach."""
    layers = []  # per site: units removed so far -> (damage, units before, setting)
    states: dict[int, float] = {0: 0.0}
    for site_moves in moves.values():
        layer: dict[int, tuple[float, int, Any]] = {}
        for done, cost in states.items():
            for units, damage, setting in [(0, 0.0, None), *site_moves]:
                key = done + units
                if key not in layer or cost + damage < layer[key][0] - 1e-15:
                    layer[key] = (cost + damage, done, setting)
        layers.append(layer)
        states = {k: v[0] for k, v in layer.items()}
    reached = [k for k in states if k >= total - 1e-9]
    key = min(reached, key=lambda k: (states[k], k)) if reached else max(states)
    units, damage = key, states[key]
    picked = {}
    for name, layer in zip(reversed(list(moves)), reversed(layers)):
        _, key, setting = layer[key]
        if setting is not None:
            picked[name] = setting
    return {n: picked[n] for n in moves if n in picked}, units, damage


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
