"""The HTML report's sections on lossy optimization (``graphopt.html_report``): the
compression passes per site (quantizers included), the planner's candidates with their Pareto
frontier, and the accuracy of the result against the budget."""

from __future__ import annotations

from html import escape
from typing import Any

from graphopt import svg
from graphopt.html_parts import flag, lines, num, para, pointer, status, table, text


def compression(r: dict) -> str:
    """Per compression pass: score against budget, cost before/after, per site."""
    section = r.get("compression")
    if not section:
        return para("No compression pass ran (no --quantize, --prune, --low-rank or other "
                    "lossy scheme).")
    parts = [(f"<p>Metric <b>{escape(str(section.get('metric')))}</b>, budget "
              f"{escape(str(section.get('budget')))}, on "
              f"{escape(str(section.get('data')))}.</p>")]
    if not section.get("passes"):
        parts.append(para("No compression pass ran."))
    for name, info in (section.get("passes") or {}).items():
        parts.append(_compression_pass(name, info, pointer("compression", "passes", name)))
    return "".join(parts)


def _compression_pass(name: str, info: dict, at: str) -> str:
    cost = info.get("cost") or {}
    head = [("status", text(info.get("status"))), ("mode", text(info.get("mode"))),
            ("score", num(info.get("score"), at + "/score", "score")),
            ("score before", num(info.get("score_before"), at + "/score_before", "score")),
            ("budget", num(info.get("budget"), at + "/budget", "score")),
            ("meets budget", flag(info.get("meets_budget"))),
            ("evaluations", num(info.get("evaluations"), at + "/evaluations", "int")),
            ("search seconds", num(info.get("seconds"), at + "/seconds"))]
    parts = [f"<h3>{escape(name)}</h3>",
             table(["", ""], ([f"<th>{escape(k)}</th>", v] for k, v in head),
                   f"compression-{name}")]
    if info.get("rolled_back") or info.get("reason"):
        parts.append(para(f"{'Rolled back' if info.get('rolled_back') else 'Note'}: "
                          f"{info.get('rolled_back') or info.get('reason')}"))
    figures = [("FLOPs", cost, at + "/cost", ("flops_before", "flops_after"), "int"),
               ("parameters", cost, at + "/cost", ("params_before", "params_after"), "int"),
               ("est. latency (ms)", cost, at + "/cost",
                ("latency_before_s", "latency_after_s"), "ms"),
               ("weight bytes", info, at, ("weight_bytes_before", "weight_bytes_after"),
                "int")]
    shown = [f for f in figures if f[3][0] in f[1]]
    if shown:
        parts.append(table(["", "before", "after"], (
            [f"<th>{escape(label)}</th>"] + [num(src.get(key), f"{base}/{key}", unit)
                                             for key in keys]
            for label, src, base, keys, unit in shown), f"compression-{name}-cost"))
    sites = info.get("sites") or {}
    if sites:
        parts.append(_sites(name, sites, at + "/sites"))
    elif "stats" not in info:  # (a lossy pass outside the contract has no sites)
        parts.append(para("No site to compress."))
    timing = (info.get("timing") or {}).get("ms") or {}
    if timing:
        parts.append(table(["variant timed", "ms"], (
            [text(label), num(ms, f"{at}/timing/ms{pointer(label)}")]
            for label, ms in timing.items()), f"timing-{name}", timing))
        parts.append(para(f"kept: {info['timing'].get('kept')}"))
    for site, why in (info.get("refused") or {}).items():
        parts.append(para(f"refused: {site}: {why}"))
    return "".join(parts)


SITE_FIELDS = (("damage alone", "damage_alone", "value"), ("FLOPs saved", "flops_saved", "int"),
               ("params saved", "params_saved", "int"), ("bytes saved", "bytes_saved", "int"),
               ("pred. ms saved", "predicted_latency_saved_s", "ms"))


def _sites(name: str, sites: dict, at: str) -> str:
    rows = ([text(site, "long"), text(e.get("kind")), text(e.get("setting"), "num"),
             text(e.get("size"), "num"), flag(e.get("changed"))]
            + [num(e.get(key), at + pointer(site, key), unit)
               for _, key, unit in SITE_FIELDS] for site, e in sites.items())
    parts = [table(["site", "kind", "setting", "size", "changed"]
                   + [label for label, _, _ in SITE_FIELDS], rows, f"sites-{name}", sites)]
    changed = [s for s, e in sites.items() if e.get("changed") and
               isinstance(e.get("damage_alone"), (int, float))]
    if changed:
        parts.append(svg.bars(changed, [("damage alone", [sites[s]["damage_alone"]
                                                          for s in changed])],
                              "damage (1 - score, each site alone)",
                              f"{name}: damage alone per changed site"))
    else:
        parts.append(para("No site was changed, or none has a measured damage."))
    return "".join(parts)


def plan(r: dict) -> str:
    """The planner's candidates: a table and score against latency with the frontier."""
    p = r.get("plan")
    if not p:
        return para("The planner did not run (it runs with --goal and no scheme named, or "
                    "--plan).")
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in (p.get("timed_at") or {})
                       .items())
    facts = [("goal", text(p.get("goal"))), ("metric", text(p.get("metric"))),
             ("budget", num(p.get("budget"), "/plan/budget", "score")),
             ("data", text(p.get("data"))), ("timed at", text(shapes)),
             ("timing", text(p.get("timing"), "long")), ("built on", text(p.get("built_on"))),
             ("techniques", text(p.get("techniques"), "long")),
             ("input latency (ms)", num(p.get("input_latency_s"), "/plan/input_latency_s",
                                        "ms")),
             ("timing noise", num(p.get("timing_noise"), "/plan/timing_noise")),
             ("Kendall tau, predicted vs measured", num(p.get("prediction_tau"),
                                                        "/plan/prediction_tau")),
             ("chosen", text(p.get("chosen"), "long")), ("why", text(p.get("why"), "long"))]
    parts = [table(["", ""], ([f"<th>{escape(k)}</th>", v] for k, v in facts), "plan-facts")]
    if p.get("slower_than_input"):
        parts.append(para("The result is slower than the input model here.", "bad"))
    cands = p.get("candidates") or []
    parts.append(table(
        ["#", "", "candidate", "stages", "score", "meets budget", "size bytes", "FLOPs",
         "predicted ms", "measured ms", "build s", "note"],
        (_candidate_row(i, c, p.get("chosen")) for i, c in enumerate(cands)), "candidates",
        (c.get("label") for c in cands)))
    parts.append(para("> chosen, * on the Pareto frontier (score against measured latency, "
                      "else predicted, among the candidates within the budget)."))
    points = [_point(i, c, p.get("chosen")) for i, c in enumerate(cands)]
    points = [pt for pt in points if pt is not None]
    if points:
        measured = all(c.get("measured_latency_s") is not None for c in cands
                       if c.get("score") is not None)
        parts.append(svg.scatter(points, "latency, ms (" + ("measured" if measured else
                                                            "measured, else predicted") + ")",
                                 str(p.get("metric")), "Candidates: score against latency",
                                 p.get("budget")))
    else:
        parts.append(para("No candidate has both a score and a latency to plot."))
    return "".join(parts)


def _candidate_row(i: int, c: dict, chosen: Any) -> list[str]:
    at = pointer("plan", "candidates", i)
    mark = (">" if c.get("label") == chosen else "") + ("*" if c.get("pareto") else "")
    stages = [f"{s.get('flag')} {s.get('value')}: {s.get('status', 'not run')}"
              f"{' (' + s['reason'] + ')' if s.get('reason') else ''}, budget {s.get('budget')}"
              for s in c.get("stages") or []]
    note = c.get("error") or ("" if c.get("changed") or not c.get("stages") else
                              "changed nothing: " + "; ".join(dict.fromkeys(
                                  str(s.get("reason", s.get("status")))
                                  for s in c["stages"])))
    return [text(i + 1, "num"), text(mark), text(c.get("label"), "long"), lines(stages),
            num(c.get("score"), at + "/score", "score"), flag(c.get("meets_budget")),
            num(c.get("size_bytes"), at + "/size_bytes", "int"),
            num(c.get("flops"), at + "/flops", "int"),
            num(c.get("predicted_latency_s"), at + "/predicted_latency_s", "ms"),
            num(c.get("measured_latency_s"), at + "/measured_latency_s", "ms"),
            num(c.get("seconds"), at + "/seconds"), text(note, "long")]


def _point(i: int, c: dict, chosen: Any) -> dict | None:
    latency = c.get("measured_latency_s")
    latency = c.get("predicted_latency_s") if latency is None else latency
    if c.get("score") is None or latency is None:
        return None
    return {"x": latency * 1e3, "y": c["score"], "label": str(i + 1),
            "name": str(c.get("label")) + (" (chosen)" if c.get("label") == chosen else ""),
            "within": bool(c.get("meets_budget")) and not c.get("error"),
            "frontier": bool(c.get("pareto")), "chosen": c.get("label") == chosen,
            "tip": f"{i + 1}. {c.get('label')}: score {c['score']}, "
                   f"{svg.short(latency * 1e3)} ms"}


def accuracy(r: dict) -> str:
    """The final verification's score against the budget, and what it was measured on."""
    v = r.get("verification") or {}
    if v.get("score") is None:
        return para("No accuracy budget: the optimization was lossless, and the outputs "
                    "were compared within rtol/atol (see Summary).")
    data = next((s.get("data") for s in (r.get(k) or {} for k in
                                         ("plan", "compression"))
                 if s.get("data")), None)
    facts = [("metric", text(v.get("metric"))),
             ("score", num(v.get("score"), "/verification/score", "score")),
             ("budget", num(v.get("budget"), "/verification/budget", "score")),
             ("result", f"<td>{status(v.get('ok'))}</td>"), ("data", text(data)),
             ("batches", num(v.get("batches"), "/verification/batches", "int"))]
    parts = [table(["", ""], ([f"<th>{escape(k)}</th>", c] for k, c in facts),
                   "accuracy-table")]
    if isinstance(v.get("budget"), (int, float)):
        parts.append(svg.scale(v["score"], v["budget"], str(v.get("metric")),
                               "Accuracy of the result against the budget"))
    return "".join(parts)
