"""Plumbing of lossy optimization for the API and the CLI: the schemes passes declare
(``--quantize int8``, ``--prune channels``, ...), the calibration/validation data, the
one accuracy metric, the verification of the result and the report's ``compression``
section. It names no pass: schemes come from the passes'
``scheme`` attribute."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import onnx

from graphopt import verify
from graphopt.accuracy import reference_outputs, run_all, session
from graphopt.calibration import count_samples, group, load_data
from graphopt.errors import UsageError
from graphopt.metric import DEFAULT_BUDGET, Metric
from graphopt.pipeline import parse_spec

# Samples per batch when running calibration/validation data (fewer ORT calls).
DATA_BATCH = 32
CHECK_BATCHES = 8  # DATA_BATCH-sized batches per check batch
SUMMARY_SITES = 8  # changed sites listed one a line; more are counted by setting
# Without validation data, every HOLD_OUT-th calibration sample is held out to measure
# accuracy on (when there are at least MIN_HOLD_OUT samples): passes fit to the
# calibration data (recovery re-fits layers by least squares, importance is measured on
# it), so the data they fitted to would flatter them.
HOLD_OUT = 5
MIN_HOLD_OUT = 10


def schemes(registry) -> dict[str, dict[str, str]]:
    """{flag: {value: pass name}} of every installed pass that declares a scheme (passes
    that fail to import are left out: the registry reports them elsewhere)."""
    loaded, _ = registry.load_all()
    out: dict[str, dict[str, str]] = {}
    for name, cls in sorted(loaded.items()):
        declared = getattr(cls, "scheme", None)
        if declared:
            flag, value = declared
            out.setdefault(flag, {})[value] = name
    return out


def with_schemes(spec: Any, chosen: Mapping[str, Sequence[str] | str | None],
                 registry, measure: bool = False) -> Any:
    """``spec`` (a pipeline spec string or list) with the passes of the ``chosen``
    schemes ({flag: value or values}) appended, lower ``scheme_order`` first. A value
    ``all`` takes every pass of that flag."""
    chosen = {flag: ([values] if isinstance(values, str) else list(values))
              for flag, values in chosen.items() if values}
    if not chosen:
        if measure:
            raise UsageError("--measure needs --quantize")
        return spec
    declared = schemes(registry)
    wanted: list[str] = []
    for flag, values in chosen.items():
        table = declared.get(flag)
        if not table:
            raise UsageError(f"no installed pass declares --{flag}",
                             hint=f"schemes: {', '.join(sorted(declared)) or 'none'}")
        for value in values:
            if value == "all":
                wanted += list(table.values())
            elif value in table:
                wanted.append(table[value])
            else:
                raise UsageError(f"unknown --{flag} scheme {value!r}",
                                 hint=f"choose one of {', '.join(table)}, or all")
    wanted = sorted(dict.fromkeys(wanted), key=lambda n: registry.get(n).scheme_order)
    entries = parse_items(spec)
    names = [name for name, _ in entries]
    early, late = [], []
    for name in wanted:
        if name in names:  # already in the pipeline (with its own options)
            continue
        if measure and "quantize" in chosen and name in declared["quantize"].values():
            from graphopt.pass_infra import option_fields

            if "measure" not in option_fields(registry.get(name)):
                raise UsageError(f"--measure is not supported by {name}")
            name += "(measure=true)"
        (early if runs_early(registry.get(name.partition("(")[0]))
         else late).append(name)
    if measure and "quantize" not in chosen:
        raise UsageError("--measure needs --quantize")
    # Structural compression (pruning, low-rank) works on the cleaned-up graph, before
    # the target's fusions hide its layers (Conv+Relu -> FusedConv) and rename their
    # outputs (recovery matches layers to the original by output name); the fusions then
    # run on the compressed graph. Quantizers come after the whole pipeline.
    cut = 0
    while cut < len(entries) and _family(entries[cut], registry) == "cleanup":
        cut += 1
    items = [item for _, item in entries]
    result = [*items[:cut], *early, *items[cut:], *late]
    if isinstance(spec, str):
        return ",".join(i if isinstance(i, str) else i.name for i in result)
    return result


# Schemes whose passes' ``scheme_order`` is below this run before the target's fusions.
EARLY_BELOW = 50


def runs_early(p) -> bool:
    """Whether the lossy scheme pass ``p`` (class or instance) is structural: it runs on
    the cleaned-up graph, before the target's fusions (pruning, low-rank; a joint
    search of such passes too), not after the whole pipeline (quantizers)."""
    parts = getattr(p, "parts", None) or [p]
    return all(not q.lossless and getattr(q, "scheme", None) is not None
               and q.scheme_order < EARLY_BELOW for q in parts)


def parse_items(spec: Any) -> list[tuple[str, Any]]:
    """(pass name, the spec item as given) for a spec string or list."""
    if isinstance(spec, str):
        from graphopt.pipeline import split_items

        return [(parse_spec(item)[0][0], item) for item in split_items(spec)]
    return [(parse_spec(i)[0][0] if isinstance(i, str) else i.name, i) for i in spec]


def _family(entry: tuple[str, Any], registry) -> str | None:
    name, item = entry
    if not isinstance(item, str):
        return getattr(item, "family", None)
    try:
        return registry.get(name).family
    except Exception:
        return None  # an unknown name is reported when the pipeline is built


def split_tolerance(tolerance) -> tuple[float | None, verify.Tolerance]:
    """``tolerance`` of ``optimize``: a ``verify.Tolerance`` (rtol/atol of lossless
    verification) or a float, the accuracy budget of lossy passes (min cosine)."""
    if isinstance(tolerance, verify.Tolerance):
        return None, tolerance
    if isinstance(tolerance, tuple) and len(tolerance) == 2 \
            and isinstance(tolerance[1], verify.Tolerance):  # (budget, rtol/atol)
        return split_tolerance(tolerance[0])[0], tolerance[1]
    try:
        budget = float(tolerance)
    except (TypeError, ValueError):
        raise UsageError(f"tolerance must be a number (minimum output cosine) or a "
                         f"verify.Tolerance, got {tolerance!r}") from None
    if not 0.0 < budget <= 1.0:
        raise UsageError(f"tolerance {budget} is not a cosine similarity in (0, 1]",
                         hint="e.g. --tolerance 0.99")
    return budget, verify.Tolerance()


@dataclass
class LossyData:
    calibration: list[verify.Feeds] | None
    validation: list[verify.Feeds] | None
    budget: float
    batchable: bool = True  # False: an input has a static batch, samples go one by one
    held_out: bool = False  # validation = samples held out of the calibration data

    @functools.cached_property
    def check_feeds(self) -> list[verify.Feeds] | None:
        """What the manager checks passes on and the result is verified on: the
        validation (else calibration) samples in few large batches (one ORT session per
        batch and check). The same batch objects every time: the original's outputs on
        them are computed once a run (``accuracy.reference_outputs``)."""
        data = self.validation or self.calibration
        return group(data, CHECK_BATCHES if self.batchable else 1) if data else None

    def describe(self) -> str:
        if self.validation:
            held = " held out of the calibration data" if self.held_out else ""
            return f"validation data ({count_samples(self.validation)} samples{held})"
        if self.calibration:
            return f"calibration data ({count_samples(self.calibration)} samples)"
        return "unmeasured: random data"


def load_lossy_data(proto: onnx.ModelProto, calibration, validation,
                    budget: float | None) -> LossyData:
    cal = load_data(calibration, proto, what="calibration data")
    val = load_data(validation, proto, what="validation data")
    batchable = batch_axis_free(proto)
    size = DATA_BATCH if batchable else 1
    held_out = val is None and cal is not None and len(cal) >= MIN_HOLD_OUT
    if held_out:
        cal, val = hold_out(cal)
    return LossyData(group(cal, size) if cal else None, group(val, size) if val else None,
                     DEFAULT_BUDGET if budget is None else budget, batchable, held_out)


def hold_out(samples: list[verify.Feeds]) -> tuple[list[verify.Feeds], list[verify.Feeds]]:
    """(calibration, validation): every ``HOLD_OUT``-th sample (from the middle of each
    run of ``HOLD_OUT``) validates, the rest calibrate; deterministic."""
    pick = HOLD_OUT // 2
    return ([s for i, s in enumerate(samples) if i % HOLD_OUT != pick],
            [s for i, s in enumerate(samples) if i % HOLD_OUT == pick])


def batch_axis_free(proto: onnx.ModelProto) -> bool:
    """Whether samples may be stacked into larger batches: no input has a fixed first
    dimension (a model exported with a static batch of 1 takes one sample per run)."""
    for _, _, shape in verify.input_specs(proto):
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return False
    return True


def lossy_passes(pipeline: Sequence) -> set[str]:
    return {p.name for p in pipeline if not p.lossless}


def verify_lossy(original: onnx.ModelProto, result: onnx.ModelProto,
                 feeds: list[verify.Feeds] | None, budget: float, metric: Metric,
                 reference: list[verify.Feeds] | None = None) -> dict:
    """The final check of a lossily optimized model: its score on ``metric`` against the
    original on ``feeds`` (the same metric and data the pass manager checked with).
    ``reference``: the original's outputs on ``feeds`` when already computed (the pass
    manager ran the original on them before its first pass)."""
    if not feeds:
        return {"ok": None, "detail": "no inputs to verify on"}
    try:
        ref = reference if reference is not None else reference_outputs(original, feeds)
        got = run_all(session(result, optimize=False), feeds)
    except Exception as exc:
        return {"ok": False, "detail": f"ONNX Runtime failed on the result: {exc}"}
    score = metric.score(ref, got, feeds)
    ok = score >= budget
    out = {"ok": ok, "metric": metric.name, "score": score, "budget": budget,
           "batches": len(feeds),
           "detail": f"{metric.name} {score:.6f} {'>=' if ok else '<'} budget {budget}"}
    if metric.name == "cosine":
        out["min_cosine"] = score
    return out


def compression_report(trace, lossy: set[str], data: "LossyData", metric: Metric) -> dict:
    """The report's ``compression`` section, per lossy pass that ran: a client of
    ``graphopt.compression`` gives its sites, the settings chosen, the damage and the
    savings (its stats' ``compression`` entry); any other lossy pass (e.g. ``convert-fp16``)
    its status and its own stats. A pass that ran more than once is reported by the run
    that changed the model, else the last."""
    section: dict = {"metric": metric.name, "budget": data.budget, "data": data.describe(),
                     "measured": bool(data.check_feeds), "passes": {}}
    latest: dict = {}
    for e in trace:
        if e.pass_name in lossy or (e.stats or {}).get("compression") is not None:
            if e.changed or e.pass_name not in latest or not latest[e.pass_name].changed:
                latest[e.pass_name] = e
    for name, e in latest.items():
        stats = e.stats or {}
        info = stats.get("compression")
        if info is None:
            info = {"reason": e.reason or stats.get("reason", ""), "stats": stats}
        elif e.status == "rolled-back":
            info = {**info, "rolled_back": e.reason}
        section["passes"][name] = {"status": e.status, **info}
    return section


def summary_lines(report: dict) -> list[str]:
    """One-line-per-fact summary of the compression section (CLI)."""
    section = report.get("compression")
    if not section:
        return []
    lines = []
    for name, info in section.get("passes", {}).items():
        head = f"{name}: {info.get('status')}"
        if info.get("score") is not None:
            head += (f", {section['metric']} {info['score']:.5f} (budget "
                     f"{section['budget']}) on {section['data']}")
        cost = info.get("cost")
        if cost and cost.get("flops_before"):
            head += (f"; FLOPs {cost['flops_after'] / cost['flops_before']:.3f}x, params "
                     f"{cost['params_after'] / max(cost['params_before'], 1):.3f}x")
        if info.get("reason") or info.get("rolled_back"):
            head += f" ({info.get('rolled_back') or info.get('reason')})"
        lines.append(head)
        sites = info.get("sites") or {}
        changed = {k: v for k, v in sites.items() if v.get("changed")}
        if len(changed) > SUMMARY_SITES:
            settings = Counter(str(v["setting"]) for v in changed.values())
            lines.append(f"  {len(changed)} of {len(sites)} sites changed: " + ", ".join(
                f"{n} {setting}" for setting, n in settings.most_common()))
        else:
            for site, entry in changed.items():
                lines.append(f"  {site}: {entry['kind']} {entry['setting']}"
                             + (f" (damage alone {entry['damage_alone']})"
                                if "damage_alone" in entry else ""))
        kept = [k for k, v in sites.items() if not v.get("changed")]
        if changed and kept:
            lines.append(f"  kept unchanged within the budget: {len(kept)} site(s), e.g. "
                         f"{kept[0]}")
        refused = info.get("refused") or {}
        if refused:
            first = next(iter(refused))
            lines.append(f"  refused: {len(refused)} site(s), e.g. {first}: {refused[first]}")
    if not section.get("measured"):
        lines.append("accuracy UNMEASURED: no calibration/validation data, random inputs used")
    return lines


def warn_unmeasured(logger: logging.Logger, data: LossyData, lossy: set[str]) -> None:
    if lossy and not data.check_feeds:
        logger.warning("lossy passes (%s) run WITHOUT calibration data: the accuracy of "
                       "the result is UNMEASURED (random probe inputs)", ", ".join(sorted(lossy)))
