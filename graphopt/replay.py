"""Compression settings a previous run chose, applied again without the search.

A budgeted search measures many candidate models (hours, for a transformer with thousands
of calibration sentences); its report lists the setting it chose for every site
(``compression.passes.<pass>.sites.<site>.setting``). ``optimize(replay=...)`` (the CLI's
``--replay REPORT.json``) applies exactly those settings: each compression pass skips its
search, builds the one model, recovers it and measures it once. The result is checked
like any other: if the settings no longer meet the budget on the data given, the run
fails instead of writing a model that was not asked for.

A site the report names that the model does not have, or a setting the site cannot take,
is a usage error: the report belongs to another model or other pass options.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from graphopt.errors import UsageError, VerificationError

Settings = dict[str, dict[str, Any]]  # pass name -> {site name: setting}


def load(source: Any) -> Settings:
    """The settings of every compression pass that changed the model in the report
    ``source`` (a path to a JSON report, or the report as a dict), or ``source`` itself
    when it already maps pass names to ``{site: setting}``."""
    where = "the replayed report"
    if isinstance(source, (str, os.PathLike)):
        where = f"replayed report {os.fspath(source)}"
        try:
            source = json.loads(Path(source).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{where} is not JSON: {exc}",
                             hint="give the JSON report of graphopt optimize --report R.json"
                             ) from exc
    if not isinstance(source, Mapping):
        raise UsageError(f"{where} is not a JSON object")
    if "compression" not in source and all(isinstance(v, Mapping) for v in source.values()):
        return {str(k): dict(v) for k, v in source.items()}
    passes = (source.get("compression") or {}).get("passes") \
        if isinstance(source.get("compression"), Mapping) else None
    if not isinstance(passes, Mapping) or not passes:
        raise UsageError(f"{where} lists no compression settings (no 'compression' section)",
                         hint="replay the report of a run with a compression scheme "
                         "(--prune, --low-rank, ...)")
    out: Settings = {}
    for name, info in passes.items():
        if not isinstance(info, Mapping) or info.get("status") != "changed":
            continue  # rolled back or unchanged there: searched (or left) as usual
        sites = info.get("sites")
        if not isinstance(sites, Mapping):
            raise UsageError(f"{where}: pass {name!r} has no 'sites'")
        out[str(name)] = {str(site): entry["setting"] for site, entry in sites.items()
                          if isinstance(entry, Mapping) and entry.get("changed")
                          and "setting" in entry}
    if not any(out.values()):
        raise UsageError(f"{where}: no compression pass changed the model there")
    return out


def check_passes(settings: Settings, names: set[str]) -> None:
    """A usage error when the settings name a compression pass the pipeline lacks."""
    missing = sorted(set(settings) - names)
    if missing:
        raise UsageError(
            f"the replayed report has settings for {', '.join(missing)}, which this run "
            "does not have" + (f" (its compression passes: {', '.join(sorted(names))})"
                               if names else ""),
            hint="give the same lossy schemes (--prune, --low-rank, ...) as the run that "
            "wrote the report")


def choice(pass_name: str, wanted: Mapping[str, Any], sites: list) -> dict[str, Any]:
    """``wanted`` ({site: setting as the report wrote it}) as a choice over ``sites``
    (``graphopt.compression.Site``): each setting matched to the site's own value."""
    by_name = {s.name: s for s in sites}
    out = {}
    for name, value in wanted.items():
        site = by_name.get(name)
        if site is None:
            raise UsageError(f"{pass_name}: the replayed report names site {name!r}, which "
                             "this model does not have" + _known(by_name),
                             hint="replay a report written for this model and these "
                             "pass options")
        if site.refused is not None:
            raise UsageError(f"{pass_name}: site {name!r} of the replayed report cannot be "
                             f"compressed here: {site.refused}")
        match = [s for s in site.settings if _as_json(s) == _as_json(value)]
        if not match:
            raise UsageError(f"{pass_name}: site {name!r} cannot take the replayed setting "
                             f"{value!r}", hint="its settings: " + ", ".join(
                                 json.dumps(_as_json(s)) for s in site.settings))
        out[name] = match[0]
    return out


def check_applied(settings: Settings, trace) -> None:
    """An error when a pass with replayed settings did not keep them (the pass manager
    rolled it back, e.g. under the budget): the user asked for exactly that model."""
    status = {e.pass_name: e for e in trace}
    for name, wanted in settings.items():
        entry = status.get(name)
        if wanted and (entry is None or entry.status != "changed"):
            why = entry.reason if entry is not None and entry.reason else \
                "it did not run" if entry is None else entry.status
            raise ReplayError(f"the replayed settings of {name} were not kept: {why}",
                              hint="loosen --tolerance, or give the data the report's "
                              "run measured on")


class ReplayError(VerificationError):
    """Replayed settings that do not hold on this run (exit 4, as a failed check)."""


def _known(by_name: Mapping) -> str:
    names = sorted(by_name)
    return f" (it has {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" \
        if names else ""


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"setting of type {type(value).__name__} is not JSON")
