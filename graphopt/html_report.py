"""The optimize report as one self-contained HTML page: ``render(report) -> str``.

``graphopt optimize --report out.html`` writes it (a ``.json`` name keeps the JSON);
``graphopt report R.json -o R.html`` renders a JSON report written earlier. The page
has inline CSS and inline SVG charts (``graphopt.svg``), no script and no link to
anything outside it, and the same report always gives the same bytes.

Sections, each drawn only when the report holds its data (and saying so otherwise):
summary, op types before/after, the pass trace as a timeline, compression (per site,
quantizers included), the planner's candidates with their Pareto frontier, accuracy, and the
compiled artifact's verification. Every number in a table is the report's own number,
formatted: its cell carries the JSON pointer it came from (``data-src``) and the value
as JSON (``data-value``), so the page can be checked against the report.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any, Callable

from graphopt import svg
from graphopt.errors import UsageError
from graphopt.html_lossy import accuracy, compression, plan
from graphopt.html_parts import (OPEN_ROWS, flag, num, para, pointer, seconds_ms, status,
                                 table, text)

HTML_SUFFIXES = (".html", ".htm")
REQUIRED_KEYS = ("input", "output", "trace", "verification")  # what every report holds

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:0 auto;max-width:1000px;padding:1em 2em}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:2px solid #4e79a7;padding-bottom:.15em;margin-top:1.8em}
h3{margin-bottom:.3em}table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ddd;padding:2px 7px;vertical-align:top}th{background:#f0f3f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.long{max-width:28em;overflow-wrap:anywhere}
.ok{color:#2a7a2a;font-weight:bold}.bad{color:#b02020;font-weight:bold}.none{color:#777;font-style:italic}
.note{color:#555}svg{display:block;max-width:100%;height:auto;margin:.5em 0 1em}
nav a{margin-right:.8em}code{background:#f4f4f4;padding:0 3px}
"""


# ---------------------------------------------------------------------- sections
def summary(r: dict) -> str:
    """Target, pipeline, before/after figures and the verification result."""
    cost = r.get("cost_model") or {}
    meta = [("graphopt", r.get("graphopt_version")), ("target", r.get("target")),
            ("device", r.get("device")),
            ("cost model", cost.get("kind")), ("output", r.get("output_path")),
            ("pipeline", r.get("pipeline")), ("input hash", r.get("input_hash")),
            ("output hash", r.get("output_hash"))]
    parts = [table(["", ""], ([f"<th>{escape(k)}</th>", text(v, "long")] for k, v in meta
                              if v is not None), "meta")]
    before, after = r.get("input"), r.get("output")
    if before and after:
        rows = [("nodes", "nodes", "int"), ("parameters", "params", "int"),
                ("weight bytes", "weight_bytes", "int"), ("FLOPs", "flops", "int"),
                ("est. latency (ms)", "estimated_latency_s", "ms"),
                ("peak activation bytes", "peak_activation_bytes", "int")]
        parts.append(table(["", "before", "after", "change"], (
            [f"<th>{escape(label)}</th>", num(before.get(key), pointer("input", key), unit),
             num(after.get(key), pointer("output", key), unit),
             text(_change(before.get(key), after.get(key)), "num")]
            for label, key, unit in rows), "before-after", [k for _, k, _ in rows]))
    v = r.get("verification") or {}
    parts.append(f"<p>Verification: {status(v.get('ok'))} {escape(str(v.get('detail', '')))}"
                 "</p>")
    if v.get("outputs"):
        parts.append(table(["output", "max abs diff", "max rel diff", "match", "note"], (
            [text(o.get("name")), num(o.get("max_abs"), pointer("verification", "outputs", i,
                                                              "max_abs")),
             num(o.get("max_rel"), pointer("verification", "outputs", i, "max_rel")),
             flag(o.get("ok")), text(o.get("note"))]
            for i, o in enumerate(v["outputs"])), "verification-outputs"))
    for key, label in (("rolled_back", "Rolled back"), ("left_out", "Left out")):
        if r.get(key):
            items = r[key].items() if isinstance(r[key], dict) else ((p, "") for p in r[key])
            parts.append(para(f"{label}: " + "; ".join(f"{p} {why}".strip()
                                                       for p, why in items)))
    if (r.get("cache") or {}).get("hit"):
        parts.append(para(f"From the result cache ({r['cache'].get('folder')}): nothing "
                          f"was optimized again."))
    return "".join(parts)


def _change(a: Any, b: Any) -> str:
    """The relative change from ``a`` to ``b`` as a percentage (a derived figure)."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not a:
        return "–"
    return f"{(b - a) / a * 100:+.1f}%"


def op_types(r: dict) -> str:
    """Count, FLOPs and estimated time per op type, before and after."""
    before, after = r.get("input") or {}, r.get("output") or {}
    if "ops" not in before or "ops" not in after:
        return para("This report has no op histograms.")
    ops = list(dict.fromkeys([*before["ops"], *after["ops"]]))
    costs = "op_costs" in before and "op_costs" in after
    sides = (("input", before), ("output", after))
    head = ["op type", "count before", "count after"]
    head += ["FLOPs before", "FLOPs after", "est. ms before", "est. ms after"] if costs else []

    def row(op: str) -> list[str]:
        cells = [text(op)] + [num(s["ops"].get(op), pointer(side, "ops", op), "int")
                              for side, s in sides]
        for field, unit in (("flops", "int"), ("estimated_latency_s", "ms")) if costs else ():
            cells += [num((s["op_costs"].get(op) or {}).get(field),
                          pointer(side, "op_costs", op, field), unit) for side, s in sides]
        return cells

    parts = [table(head, (row(op) for op in ops), "op-table", ops),
             svg.bars(ops, [("before", [before["ops"].get(op) for op in ops]),
                            ("after", [after["ops"].get(op) for op in ops])],
                      "nodes", "Nodes per op type")]
    if costs:
        heavy = [op for op in ops if any((s["op_costs"].get(op) or {}).get("flops")
                                         for s in (before, after))]
        if heavy:
            parts.append(svg.bars(heavy, [(side, [(s["op_costs"].get(op) or {}).get("flops")
                                                  for op in heavy])
                                          for side, s in (("before", before),
                                                          ("after", after))],
                                  "FLOPs", "FLOPs per op type"))
        parts.append(svg.bars(ops, [(side, [seconds_ms((s["op_costs"].get(op) or {})
                                                        .get("estimated_latency_s"))
                                            for op in ops])
                                    for side, s in (("before", before), ("after", after))],
                              "ms (cost model)", "Estimated time per op type"))
    else:
        parts.append(para("This report has no FLOPs or estimated time per op type (it was "
                          "written by an older graphopt)."))
    parts.append(para("Measured time per op type is not part of this report: `graphopt "
                      "profile MODEL` measures it on the target, beside the estimate."))
    return "".join(parts)


def trace(r: dict) -> str:
    """The passes as they ran: a timeline and a table."""
    entries = r.get("trace") or []
    if not entries:
        return para("No pass ran.")
    total = sum(float(e.get("seconds") or 0.0) for e in entries)
    unit, factor = ("s", 1.0) if total > 10 else ("ms", 1e3)  # axis unit: ticks stay short
    steps = [(e.get("pass_name", "?"), float(e.get("seconds") or 0.0) * factor,
              e.get("status", "?"),
              (f"{e.get('pass_name')} (iteration {e.get('iteration')}): {e.get('status')}, "
               f"nodes {e.get('nodes_before')} → {e.get('nodes_after')}, "
               f"{svg.short(float(e.get('seconds') or 0.0) * 1e3)} ms"))
             for e in entries]
    rows = ([text(i + 1, "num"), text(e.get("pass_name")), text(e.get("iteration"), "num"),
             text(e.get("status")),
             num(e.get("nodes_before"), pointer("trace", i, "nodes_before"), "int"),
             num(e.get("nodes_after"), pointer("trace", i, "nodes_after"), "int"),
             num(e.get("cost_before_s"), pointer("trace", i, "cost_before_s"), "ms"),
             num(e.get("cost_after_s"), pointer("trace", i, "cost_after_s"), "ms"),
             num(e.get("seconds"), pointer("trace", i, "seconds"), "ms"),
             text(e.get("reason"), "long")] for i, e in enumerate(entries))
    listing = table(["#", "pass", "iteration", "status", "nodes before", "nodes after",
                     "est. ms before", "est. ms after", "ms", "reason"], rows, "trace-table",
                    range(len(entries)))
    return (svg.timeline(steps, unit, "Pass trace (wall time)")
            + f"<details{' open' if len(entries) <= OPEN_ROWS else ''}><summary>"
            f"{len(entries)} trace entries</summary>{listing}</details>")


def artifact(r: dict) -> str:
    """The compiled artifact run against ONNX Runtime on the original, and its latency."""
    a = r.get("artifact")
    if not a:
        return para("No compiled artifact was checked: target "
                    f"{r.get('target')!s} writes the ONNX model ONNX Runtime runs (verified "
                    "above), or the check was turned off (--no-verify).")
    facts = [("result", f"<td>{status(a.get('ok'))}</td>"),
             ("detail", text(a.get("detail"), "long"))]
    facts += [("ran on", text(a["ran_on"], "long"))] if a.get("ran_on") else []
    facts += [(label, num(a[key], f"/artifact/{key}", unit))
              for label, key, unit in (("max abs diff", "max_abs_diff", "value"),
                                       ("min cosine", "min_cosine", "score"),
                                       ("batches", "batches", "int")) if key in a]
    parts = [table(["", ""], ([f"<th>{escape(k)}</th>", c] for k, c in facts),
                   "artifact-check")]
    lat = a.get("latency")
    if not lat:
        parts.append(para("Not timed."))
        return "".join(parts)
    parts.append(table(["", ""], [
        ["<th>artifact ms</th>", num(lat.get("artifact_s"), "/artifact/latency/artifact_s",
                                     "ms")],
        ["<th>ONNX Runtime ms (original)</th>", num(lat.get("ort_s"),
                                                     "/artifact/latency/ort_s", "ms")],
        ["<th>ORT time / artifact time</th>", num(lat.get("ort_vs_artifact"),
                                                   "/artifact/latency/ort_vs_artifact")],
        ["<th>ORT threads</th>", num(lat.get("ort_threads"), "/artifact/latency/ort_threads",
                                     "int")]], "artifact-latency"))
    if lat.get("artifact_s") is None:
        parts.append(para(f"No artifact timing: {lat.get('note')}"))
    else:
        parts.append(svg.bars(["artifact", "ONNX Runtime (original)"],
                              [("median", [lat["artifact_s"] * 1e3, lat["ort_s"] * 1e3])],
                              "ms", "Latency: artifact and ONNX Runtime"))
    return "".join(parts)


SECTIONS: tuple[tuple[str, str, Callable[[dict], str], Callable[[dict], bool]], ...] = (
    ("summary", "Summary", summary, lambda r: bool(r.get("input"))),
    ("op-types", "Op types before and after", op_types,
     lambda r: "ops" in (r.get("input") or {})),
    ("trace", "Pass trace", trace, lambda r: bool(r.get("trace"))),
    ("compression", "Compression", compression,
     lambda r: bool((r.get("compression") or {}).get("passes"))),
    ("plan", "Planner", plan, lambda r: bool(r.get("plan"))),
    ("accuracy", "Accuracy", accuracy,
     lambda r: (r.get("verification") or {}).get("score") is not None),
    ("artifact", "Compiled artifact", artifact, lambda r: bool(r.get("artifact"))),
)


def sections(report: dict) -> dict[str, bool]:
    """{section id: whether the report holds its data}."""
    return {key: has(report) for key, _, _, has in SECTIONS}


def is_html(path: Any) -> bool:
    """Whether a report path names an HTML page (by its suffix)."""
    return str(path).lower().endswith(HTML_SUFFIXES)


def read(path: str | Path) -> dict:
    """The JSON report at ``path``; a ``UsageError`` when it is missing, unreadable, not
    JSON or not a graphopt report (lacks ``REQUIRED_KEYS``)."""
    hint = "give a JSON report written by `graphopt optimize ... --report R.json`"
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file", hint=hint) from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a JSON report", hint=hint) from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})",
                         hint=hint) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise UsageError(f"{path} is not a graphopt report (no {', '.join(missing)})",
                         hint=hint)
    return report


def render(report: dict) -> str:
    """The report as a self-contained HTML page (see the module docstring)."""
    title = f"graphopt report: {report.get('target', '?')} → {report.get('output_path') or '-'}"
    nav = "".join(f'<a href="#{key}">{escape(name)}</a>' for key, name, _, _ in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{escape(name)}</h2>{draw(report)}</section>'
                   for key, name, draw, _ in SECTIONS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1><nav>{nav}</nav>{body}</body></html>\n")
