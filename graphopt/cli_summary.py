"""What ``graphopt optimize`` and ``graphopt verify`` print to the terminal: the summary
table of a report, the planner's candidates, and the artifact check."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt.lossy import summary_lines

err = Console(stderr=True)


def print_summary(report: dict) -> None:
    before, after = report["input"], report["output"]
    table = Table(title=f"graphopt → {report['target']} ({report['output_path']})")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    rows = [("nodes", "nodes", "{:,}"), ("parameters", "params", "{:,}"),
            ("weight bytes", "weight_bytes", "{:,}"), ("FLOPs", "flops", "{:,.0f}"),
            ("est. latency (µs)", "estimated_latency_s", None)]
    for label, key, fmt in rows:
        a, b = before[key], after[key]
        if fmt is None:
            sa, sb = f"{a * 1e6:,.1f}", f"{b * 1e6:,.1f}"
        else:
            sa, sb = fmt.format(a), fmt.format(b)
        change = f"{(b - a) / a * 100:+.1f}%" if a else "—"
        table.add_row(label, sa, sb, change)
    err.print(table)
    v = report["verification"]
    if v.get("ok") and "score" in v:  # lossy passes: checked against the budget
        err.print(f"verified: {escape(v['detail'])}", highlight=False)
    elif v.get("ok"):
        err.print(f"verified: outputs match (max abs diff {v['max_abs_diff']:.3g})")
    else:
        err.print(f"[yellow]not verified:[/] {escape(str(v.get('detail')))}", highlight=False)
    if report["rolled_back"]:
        err.print(f"[yellow]rolled back:[/] {', '.join(report['rolled_back'])}")
    declined = sorted({e["pass_name"] for e in report["trace"] if e["status"] == "declined"})
    if declined:
        err.print(f"declined (a choice of form, predicted or not measured faster here): "
                  f"{', '.join(declined)}", highlight=False)
    if report.get("cache", {}).get("hit"):
        err.print(f"from the cache ({escape(report['cache']['folder'])}): nothing was "
                  f"optimized again", highlight=False)
    if report.get("plan"):
        print_plan(report["plan"])
    for line in summary_lines(report):
        err.print(escape(line), highlight=False, soft_wrap=True)
    if "artifact" in report:
        for line in artifact_lines(report["artifact"]):
            err.print(escape(line), highlight=False, soft_wrap=True)


def print_plan(section: dict) -> None:
    """The planner's candidates as a table: score, size, predicted and measured latency,
    the Pareto frontier (*) and the one chosen (>)."""
    shapes = section.get("timed_at") or {}
    at = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
    table = Table(title=f"plan: goal {section['goal']}, budget {section['metric']} >= "
                        f"{section['budget']} on {section['data']}; latency at {at}")
    for column in ("", "candidate", section["metric"], "size", "predicted ms", "measured ms",
                   "note"):
        table.add_column(column, justify="left" if column in ("", "candidate", "note")
                         else "right")

    def ms(value):
        return "-" if value is None else f"{value * 1e3:.3g}"

    for cand in section["candidates"]:
        mark = (">" if cand["label"] == section["chosen"] else " ") + \
            ("*" if cand.get("pareto") else " ")
        score = "-" if cand["score"] is None else f"{cand['score']:.4f}"
        if cand.get("error"):
            score = "failed"
        elif not cand["meets_budget"]:
            score += " (over)"
        note = cand.get("error") or ("" if cand["changed"] or not cand["stages"] else
                                     "changed nothing: " + "; ".join(dict.fromkeys(
                                         s.get("reason", s["status"])
                                         for s in cand["stages"])))
        table.add_row(mark, escape(cand["label"]), score, f"{cand['size_bytes']:,}",
                      ms(cand["predicted_latency_s"]), ms(cand["measured_latency_s"]),
                      escape(note[:160]))
    err.print(table)
    err.print(f"plan: {escape(section['chosen'])}: {escape(section['why'])}", highlight=False)
    if section.get("prediction_tau") is not None:
        err.print(f"the cost model ranked the candidates with Kendall tau "
                  f"{section['prediction_tau']:+.2f} against their measured latency "
                  f"(timing noise {section['timing_noise']:.1%})", highlight=False)
    if section.get("slower_than_input"):
        err.print("[yellow]the result is slower than the input model here[/]")


def artifact_lines(check: dict) -> list[str]:
    """The artifact check (``graphopt.artifact``) in a few lines."""
    if check.get("ok") is None:
        return [f"artifact not run here: {check.get('detail')}"]
    where = f" in {check['ran_on']}" if check.get("ran_on") else ""
    lines = [f"artifact verified{where}: {check['detail']}" + (
        f" (max abs diff {check['max_abs_diff']:.3g})" if "max_abs_diff" in check else "")]
    lat = check.get("latency")
    if lat:
        ort_ms = lat["ort_s"] * 1e3
        if lat["artifact_s"] is None:
            lines.append(f"latency: {lat.get('note')}; ONNX Runtime on the original "
                         f"{ort_ms:.3f} ms here")
        else:
            lines.append(f"latency: artifact {lat['artifact_s'] * 1e3:.3f} ms, ONNX Runtime "
                         f"on the original {ort_ms:.3f} ms ({lat['ort_threads']} "
                         f"thread{'' if lat['ort_threads'] == 1 else 's'}): "
                         f"artifact is {lat['ort_vs_artifact']:.2f}x ORT's speed")
    return lines
