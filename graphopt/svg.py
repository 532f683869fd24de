"""Charts as inline SVG for the HTML report (``graphopt.html_report``): bar charts, a
timeline, a scatter plot with a frontier line, a score-against-budget scale.

Each function returns SVG text that depends only on its arguments (the same data gives
the same bytes), with every label escaped. Values are drawn as given; the caller passes
the report's numbers (already in the unit it labels the axis with).
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

WIDTH = 760
ROW = 18  # height of one bar row
FONT = 'font-family="system-ui, sans-serif" font-size="11"'
AXIS = "#888"
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948")
STATUS_COLOURS = {"changed": "#59a14f", "unchanged": "#bab0ac", "rolled-back": "#e15759",
                  "declined": "#edc948"}


def _n(value: float) -> str:
    """A coordinate, rounded so the output is short and stable."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _svg(height: float, body: list[str], label: str) -> str:
    return (f'<svg role="img" aria-label="{escape(label)}" '
            f'width="{WIDTH}" height="{_n(height)}" viewBox="0 0 {WIDTH} {_n(height)}" '
            f'{FONT}>' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}"{extra}>'
            f"{escape(text)}</text>")


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str) -> str:
    return (f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(max(w, 1.0))}" height="{_n(h)}" '
            f'fill="{fill}"><title>{escape(tip)}</title></rect>')


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str = AXIS,
          extra: str = "") -> str:
    return (f'<path d="M{_n(x1)} {_n(y1)}L{_n(x2)} {_n(y2)}" stroke="{stroke}" '
            f'fill="none"{extra}/>')


def short(value: float, digits: int = 4) -> str:
    """A tick or bar label: ``digits`` significant digits, thousands separated."""
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (at most about ``count`` + 1 of them)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if step * mult >= raw:
            step *= mult
            break
    first = math.ceil(lo / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def _legend(items: Sequence[tuple[str, str]], y: float) -> list[str]:
    out, x = [], 10.0
    for name, colour in items:
        out.append(f'<rect x="{_n(x)}" y="{_n(y - 9)}" width="10" height="10" fill="{colour}"/>')
        out.append(_text(x + 14, y, name))
        x += 26 + 6.2 * len(name)
    return out


def bars(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
         unit: str, title: str) -> str:
    """Horizontal bars: one group per label, one bar per series ((name, values), values
    aligned with ``labels``; ``None`` draws no bar). Negative values extend left of 0."""
    values = [v for _, vs in series for v in vs if v is not None]
    lo, hi = min([0.0, *values]), max([0.0, *values])
    hi = hi if hi > lo else lo + 1.0
    left, right = 230.0, WIDTH - 70.0
    scale = (right - left) / (hi - lo)
    zero = left + (0.0 - lo) * scale
    group = ROW * len(series) + 6
    top = 40.0
    body = [_text(10, 16, title, extra=' font-weight="bold"')]
    body += _legend([(name, PALETTE[i % len(PALETTE)]) for i, (name, _) in enumerate(series)],
                    32) if len(series) > 1 else []
    for row, label in enumerate(labels):
        y0 = top + row * group
        body.append(_text(left - 6, y0 + group / 2 + 2, _clip(label, 36), "end"))
        for s, (name, vs) in enumerate(series):
            value = vs[row]
            if value is None:
                continue
            y = y0 + s * ROW
            x, w = (zero, value * scale) if value >= 0 else (zero + value * scale, -value * scale)
            body.append(_rect(x, y, w, ROW - 3, PALETTE[s % len(PALETTE)],
                              f"{label} ({name}): {short(value)} {unit}"))
            body.append(_text(x + w + 3 if value >= 0 else x - 3, y + ROW - 6, short(value),
                              "start" if value >= 0 else "end"))
    bottom = top + len(labels) * group
    body += _x_axis(lo, hi, left, scale, bottom, unit)
    body.append(_line(zero, top - 4, zero, bottom))
    return _svg(bottom + 34, body, title)


def _x_axis(lo: float, hi: float, left: float, scale: float, y: float, unit: str) -> list[str]:
    out = [_line(left, y, left + (hi - lo) * scale, y)]
    for t in ticks(lo, hi):
        x = left + (t - lo) * scale
        out += [_line(x, y, x, y + 4), _text(x, y + 15, short(t), "middle")]
    out.append(_text(left + (hi - lo) * scale, y + 28, unit, "end"))
    return out


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def timeline(entries: Sequence[tuple[str, float, str, str]], unit: str, title: str) -> str:
    """A timeline of consecutive steps ((lane, duration, status, tooltip)): one lane per
    distinct lane name (first appearance first), each step a bar from where the previous
    step ended, coloured by status (``STATUS_COLOURS``)."""
    lanes = list(dict.fromkeys(lane for lane, _, _, _ in entries))
    total = sum(d for _, d, _, _ in entries) or 1.0
    left, right, top = 200.0, WIDTH - 20.0, 40.0
    scale = (right - left) / total
    statuses = list(dict.fromkeys(s for _, _, s, _ in entries))
    body = [_text(10, 16, title, extra=' font-weight="bold"')]
    body += _legend([(s, STATUS_COLOURS.get(s, PALETTE[0])) for s in statuses], 32)
    for i, lane in enumerate(lanes):
        y = top + i * ROW
        if i % 2:
            body.append(f'<rect x="{_n(left)}" y="{_n(y)}" width="{_n(right - left)}" '
                        f'height="{ROW}" fill="#f4f4f4"/>')
        body.append(_text(left - 6, y + ROW - 5, _clip(lane, 32), "end"))
    start = 0.0
    for lane, duration, status, tip in entries:
        y = top + lanes.index(lane) * ROW + 2
        x, w = left + start * scale, duration * scale
        body.append(_rect(x, y, w, ROW - 4, STATUS_COLOURS.get(status, PALETTE[0]), tip))
        if w > 60:  # room for its duration inside
            body.append(_text(x + w / 2, y + ROW - 8, f"{short(duration)} {unit}", "middle"))
        start += duration
    bottom = top + len(lanes) * ROW
    body += _x_axis(0.0, total, left, scale, bottom, unit)
    return _svg(bottom + 34, body, title)


def scatter(points: Sequence[dict], x_unit: str, y_label: str, title: str,
            budget: float | None = None) -> str:
    """Points ({"x", "y", "label", "name", "tip", "within": bool, "frontier": bool,
    "chosen": bool}): circles marked with their short ``label``, grey when not
    ``within`` the budget, the frontier points joined by a line in order of x, the
    chosen one ringed; ``budget`` a dashed horizontal line; below, a key of each
    label's ``name``."""
    xs = [p["x"] for p in points]
    ys = [p["y"] for p in points] + ([budget] if budget is not None else [])
    x_lo, x_hi = _padded(min(xs), max(xs))
    y_lo, y_hi = _padded(min(ys), max(ys))
    left, right, top, bottom = 70.0, WIDTH - 30.0, 40.0, 340.0

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    body = [_text(10, 16, title, extra=' font-weight="bold"')]
    body += _legend([("within budget", PALETTE[0]), ("over budget / failed", "#bab0ac"),
                     ("Pareto frontier", PALETTE[1]), ("chosen", PALETTE[3])], 32)
    body += [_line(left, bottom, right, bottom), _line(left, top, left, bottom)]
    for t in ticks(x_lo, x_hi):
        body += [_line(px(t), bottom, px(t), bottom + 4), _text(px(t), bottom + 15, short(t),
                                                                "middle")]
    for t in ticks(y_lo, y_hi):
        body += [_line(left - 4, py(t), left, py(t)), _text(left - 6, py(t) + 4, short(t),
                                                            "end")]
    body.append(_text((left + right) / 2, bottom + 30, x_unit, "middle"))
    body.append(_text(14, (top + bottom) / 2, y_label, "middle",
                      f' transform="rotate(-90 14 {_n((top + bottom) / 2)})"'))
    if budget is not None:
        body.append(_line(left, py(budget), right, py(budget), PALETTE[3],
                          ' stroke-dasharray="5 4"'))
        body.append(_text(right, py(budget) - 4, f"budget {short(budget)}", "end"))
    front = sorted((p for p in points if p["frontier"]), key=lambda p: (p["x"], -p["y"]))
    if len(front) > 1:
        joined = " ".join(f"{_n(px(p['x']))},{_n(py(p['y']))}" for p in front)
        body.append(f'<polyline points="{joined}" stroke="{PALETTE[1]}" stroke-width="2" '
                    f'fill="none"/>')
    for p in points:
        colour = PALETTE[1] if p["frontier"] else PALETTE[0] if p["within"] else "#bab0ac"
        x, y = px(p["x"]), py(p["y"])
        if p["chosen"]:
            body.append(f'<circle cx="{_n(x)}" cy="{_n(y)}" r="11" fill="none" '
                        f'stroke="{PALETTE[3]}" stroke-width="2.5"/>')
        body.append(f'<circle cx="{_n(x)}" cy="{_n(y)}" r="6" fill="{colour}">'
                    f'<title>{escape(p["tip"])}</title></circle>')
        body.append(_text(x + 9, y - 8, p["label"]))
    key_top = bottom + 56
    for i, p in enumerate(points):
        body.append(_text(left, key_top + i * 15, f"{p['label']}  {_clip(p['name'], 110)}",
                          extra=' font-weight="bold"' if p["chosen"] else ""))
    return _svg(key_top + len(points) * 15, body, title)


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened by 8% of its span (or of its value when the span is 0)."""
    span = hi - lo or abs(hi) or 1.0
    return lo - 0.08 * span, hi + 0.08 * span


def scale(score: float, budget: float, label: str, title: str) -> str:
    """A score against its budget on one axis: the region below the budget shaded, the
    budget a line, the score a marker."""
    lo, hi = _padded(min(score, budget), max(score, budget, 1.0))
    left, right, y = 30.0, WIDTH - 30.0, 60.0
    k = (right - left) / (hi - lo)
    body = [_text(10, 16, title, extra=' font-weight="bold"'),
            _rect(left, y - 14, (budget - lo) * k, 28, "#f6d5d5",
                  f"below the budget {short(budget, 6)}: refused"),
            _rect(left + (budget - lo) * k, y - 14, (hi - budget) * k, 28, "#dcefd9",
                  f"at or above the budget {short(budget, 6)}"),
            _line(left + (budget - lo) * k, y - 20, left + (budget - lo) * k, y + 20,
                  PALETTE[3], ' stroke-width="2"'),
            _text(left + (budget - lo) * k, y - 24, f"budget {short(budget, 6)}", "middle"),
            (f'<circle cx="{_n(left + (score - lo) * k)}" cy="{_n(y)}" r="7" '
             f'fill="{PALETTE[0]}"><title>{escape(label)} {short(score, 6)}</title></circle>'),
            _text(left + (score - lo) * k, y + 30, f"{label} {short(score, 6)}", "middle")]
    body += _x_axis(lo, hi, left, k, y + 44, "")
    return _svg(y + 80, body, title)
