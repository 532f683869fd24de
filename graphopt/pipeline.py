"""Pipeline specs: ``"fold-constants(size-limit=1048576),eliminate-dead-code"``.

A spec is a comma-separated list of pass names, each optionally followed by options in
parentheses. Names resolve through the pass registry; unknown names and options are
errors that list the valid ones.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from graphopt.errors import UsageError
from graphopt.pass_infra import Pass, make_options
from graphopt.registry import Registry

_NAME = re.compile(r"[A-Za-z0-9_.:-]+$")


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec into (name, {option: value}) pairs."""
    return [_parse_item(item, spec) for item in split_items(spec)]


def split_items(spec: str) -> list[str]:
    """The comma-separated items of a spec (commas inside parentheses kept)."""
    items, depth, current = [], 0, ""
    for char in spec:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced ')' in pass list {spec!r}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise UsageError(f"unbalanced '(' in pass list {spec!r}")
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _parse_item(item: str, spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = item.partition("(")
    name = name.strip()
    if not _NAME.match(name) or (rest and not rest.endswith(")")):
        raise UsageError(f"cannot parse {item!r} in pass list {spec!r}",
                         hint="write NAME or NAME(option=value,...)")
    options = {}
    for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
        key, eq, value = pair.partition("=")
        if not eq:
            raise UsageError(f"option {pair!r} of pass {name!r} needs a value (key=value)")
        options[key.strip()] = value.strip()
    return name, options


def build_passes(spec: str | Sequence[str | Pass], registry: Registry,
                 skip: Sequence[str] = (),
                 defaults: Mapping[str, Mapping[str, Any]] | None = None) -> list[Pass]:
    """Instantiate the passes named by ``spec`` (a spec string or a list of names, spec
    items or ready ``Pass`` objects), leaving out those named in ``skip``. ``defaults``
    (``Target.pass_defaults``: pass name -> {option: value}) are options the target
    wants; options given in ``spec`` win, ready ``Pass`` objects are kept as they are."""
    if isinstance(spec, str):
        items: list = parse_spec(spec)
    else:
        items = [parse_spec(s)[0] if isinstance(s, str) else s for s in spec]
    for name in skip:
        if name not in registry:
            registry.get(name)  # raises the "unknown pass" error listing the valid ones
    passes = []
    for item in items:
        if isinstance(item, Pass):
            if item.name not in skip:
                passes.append(item)
            continue
        name, raw = item
        if name in skip:
            continue
        cls = registry.get(name)
        options = {k.replace("-", "_"): v for k, v in (defaults or {}).get(name, {}).items()}
        options.update((k.replace("-", "_"), v) for k, v in raw.items())
        passes.append(cls(make_options(cls, options)))
    return passes
