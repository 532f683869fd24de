"""Building blocks of the HTML report's page (``graphopt.html_report``): table cells
that show one of the report's numbers with the JSON pointer it came from, tables,
notes. Every text is escaped."""

from __future__ import annotations

import json
from html import escape
from typing import Any, Callable, Iterable

OPEN_ROWS = 20  # longer listings start folded

# Units a number is shown in: (scale applied to the JSON value, formatter).
UNITS: dict[str, tuple[float, Callable[[float], str]]] = {
    "int": (1.0, lambda v: f"{v:,.0f}"),
    "ms": (1e3, lambda v: f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"),
    "score": (1.0, lambda v: f"{v:.6g}"),
    "value": (1.0, lambda v: f"{v:.4g}"),
}


def pointer(*parts: Any) -> str:
    """The RFC 6901 JSON pointer of ``parts`` (keys and list indices)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def num(value: Any, src: str, unit: str = "value") -> str:
    """A table cell with the report's number ``value`` (from JSON pointer ``src``) shown
    in ``unit`` (``UNITS``); missing values show as a dash."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return '<td class="num none">–</td>'
    factor, fmt = UNITS[unit]
    return (f'<td class="num" data-src="{escape(src)}" data-value="{escape(json.dumps(value))}"'
            f' data-unit="{unit}">{escape(fmt(value * factor))}</td>')


def text(value: Any, cls: str = "") -> str:
    """A table cell with ``value`` as escaped text (lists joined by commas)."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    shown = "–" if value is None or value == "" else str(value)
    return f'<td class="{cls}">{escape(shown)}</td>' if cls else f"<td>{escape(shown)}</td>"


def lines(values: Iterable[Any]) -> str:
    """A table cell with one escaped line per value."""
    shown = [escape(str(v)) for v in values]
    return f'<td class="long">{"<br>".join(shown) or "–"}</td>'


def flag(value: Any) -> str:
    """A yes/no/unknown cell for a boolean."""
    if value is None:
        return '<td class="none">unknown</td>'
    return '<td class="ok">yes</td>' if value else '<td class="bad">no</td>'


def table(head: Iterable[str], rows: Iterable[Iterable[str]], table_id: str,
          keys: Iterable[str] | None = None) -> str:
    """A table of pre-rendered cells; ``keys`` label the rows (``data-key``)."""
    rows = list(rows)
    keys = list(keys) if keys is not None else [None] * len(rows)
    body = "".join((f'<tr data-key="{escape(str(k))}">' if k is not None else "<tr>")
                   + "".join(r) + "</tr>" for k, r in zip(keys, rows))
    head = list(head)
    header = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>" \
        if any(head) else ""
    return f'<table id="{escape(table_id)}">{header}{body}</table>'


def para(message: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{escape(message)}</p>'


def seconds_ms(value: Any) -> float | None:
    return value * 1e3 if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def status(ok: Any) -> str:
    if ok is None:
        return '<span class="none">not checked</span>'
    return '<span class="ok">passed</span>' if ok else '<span class="bad">FAILED</span>'
