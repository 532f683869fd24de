"""Plumbing of lossy optimization (``--quantize``) for the API and the CLI: which pass a
scheme runs, the calibration/validation data, the accuracy verification of the result
and the report's ``quantization`` section."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import onnx

from graphopt import verify
from graphopt.accuracy import batch_size, sample_cosines, session, run_all
from graphopt.calibration import count_samples, group, load_data
from graphopt.errors import UsageError
from graphopt.manager import DEFAULT_LOSSY_TOLERANCE
from graphopt.pipeline import parse_spec

# --quantize scheme -> the pass appended after the target's lossless pipeline
QUANTIZE_PASSES = {
    "int8": "quantize-int8",
    "int8-dynamic": "quantize-int8-dynamic",
    "int4-weight": "quantize-int4-weight",
    "fp16": "convert-fp16",
}
# Samples per batch when running calibration/validation data (fewer ORT calls).
DATA_BATCH = 32
CHECK_BATCHES = 8  # DATA_BATCH-sized batches per check batch


def with_quantization(spec: Any, quantize: str | None, measure: bool = False,
                      registry=None) -> Any:
    """``spec`` (a pipeline spec string or list) with the pass of ``quantize`` appended."""
    if quantize is None:
        if measure:
            raise UsageError("--measure needs --quantize")
        return spec
    if quantize not in QUANTIZE_PASSES:
        raise UsageError(f"unknown quantization scheme {quantize!r}",
                         hint=f"choose one of {', '.join(QUANTIZE_PASSES)}")
    item = QUANTIZE_PASSES[quantize]
    names = [n for n, _ in parse_spec(spec)] if isinstance(spec, str) else \
        [parse_spec(i)[0][0] if isinstance(i, str) else i.name for i in spec]
    if item in names:  # already in the pipeline (with its own options)
        return spec
    if measure:
        from graphopt.pass_infra import option_fields

        if registry is not None and "measure" not in option_fields(registry.get(item)):
            raise UsageError(f"--measure is not supported by --quantize {quantize}")
        item += "(measure=true)"
    if isinstance(spec, str):
        return f"{spec},{item}" if spec.strip() else item
    return [*spec, item]


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

    @property
    def check_feeds(self) -> list[verify.Feeds] | None:
        """What the manager checks passes on and the result is verified on: the
        validation (else calibration) samples in few large batches (one ORT session per
        batch and check)."""
        data = self.validation or self.calibration
        return group(data, CHECK_BATCHES) if data else None

    def describe(self) -> str:
        if self.validation:
            return f"validation data ({count_samples(self.validation)} samples)"
        if self.calibration:
            return f"calibration data ({count_samples(self.calibration)} samples)"
        return "unmeasured: random data"


def load_lossy_data(proto: onnx.ModelProto, calibration, validation,
                    budget: float | None) -> LossyData:
    cal = load_data(calibration, proto, what="calibration data")
    val = load_data(validation, proto, what="validation data")
    return LossyData(group(cal, DATA_BATCH) if cal else None,
                     group(val, DATA_BATCH) if val else None,
                     budget or DEFAULT_LOSSY_TOLERANCE)


def lossy_passes(pipeline: Sequence) -> set[str]:
    return {p.name for p in pipeline if not p.lossless}


def verify_lossy(original: onnx.ModelProto, result: onnx.ModelProto,
                 feeds: list[verify.Feeds] | None, budget: float) -> dict:
    """The final check of a lossily optimized model: minimum per-sample output cosine
    against the original on ``feeds`` within the budget."""
    if not feeds:
        return {"ok": None, "detail": "no inputs to verify on"}
    try:
        ref = run_all(session(original, optimize=False), feeds)
        got = run_all(session(result, optimize=False), feeds)
    except Exception as exc:
        return {"ok": False, "detail": f"ONNX Runtime failed on the result: {exc}"}
    worst = min(min(sample_cosines(r, g, batch_size(f)), default=1.0)
                for r, g, f in zip(ref, got, feeds))
    ok = worst >= budget
    return {"ok": ok, "min_cosine": worst, "budget": budget, "batches": len(feeds),
            "detail": f"min output cosine {worst:.6f} {'>=' if ok else '<'} budget {budget}"}


def quantization_report(trace, lossy: set[str], data: LossyData, scheme: str | None) -> dict:
    """The report's ``quantization`` section, from the lossy passes' trace entries."""
    entries = [e for e in trace if e.pass_name in lossy]
    section: dict = {"scheme": scheme, "passes": sorted(lossy), "budget": data.budget,
                     "data": data.describe(),
                     "measured": bool(data.check_feeds)}
    latest = {}
    for e in entries:  # the run that changed the model, else the last one
        if e.changed or latest.get(e.pass_name) is None or not latest[e.pass_name].changed:
            latest[e.pass_name] = e
    for e in latest.values():
        stats = e.stats or {}
        section[e.pass_name] = {
            "status": e.status, "reason": e.reason or stats.get("reason", ""),
            "accuracy": stats.get("accuracy"), "quantized": stats.get("quantized"),
            "float": stats.get("float"), "skipped": stats.get("skipped"),
            "timing": stats.get("timing"),
        }
    if not data.check_feeds:
        section["accuracy"] = "unmeasured: random data"
    return section


def summary_lines(report: dict) -> list[str]:
    """One-line-per-fact summary of the quantization section (for the CLI)."""
    section = report.get("quantization")
    if not section:
        return []
    lines = []
    for name in section.get("passes", []):
        info = section.get(name) or {}
        acc = info.get("accuracy") or {}
        value = acc.get("min_cosine")
        head = f"{name}: {info.get('status', 'not run')}"
        if value is not None:
            head += f", min cosine {value:.5f} (budget {section['budget']}) on {section['data']}"
        if info.get("reason"):
            head += f" ({info['reason']})"
        lines.append(head)
        for layer, why in (info.get("float") or {}).items():
            lines.append(f"  kept float: {layer} (sensitivity {why.get('sensitivity')})")
        skipped = info.get("skipped") or {}
        if skipped:
            lines.append(f"  skipped: {len(skipped)} node(s), e.g. "
                         f"{next(iter(skipped))}: {next(iter(skipped.values()))}")
    if not section.get("measured"):
        lines.append("accuracy UNMEASURED: no calibration/validation data, random inputs used")
    return lines


def warn_unmeasured(logger: logging.Logger, data: LossyData, lossy: set[str]) -> None:
    if lossy and not data.check_feeds:
        logger.warning("lossy passes (%s) run WITHOUT calibration data: the accuracy of "
                       "the result is UNMEASURED (random probe inputs)", ", ".join(sorted(lossy)))
