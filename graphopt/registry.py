"""Plugin discovery through entry points.

Passes live in the entry-point group ``graphopt.passes`` and targets in
``graphopt.targets``; graphopt's own built-ins register there through its
``pyproject.toml`` exactly as a third-party distribution would. A ``Registry`` lists
names without importing anything, imports a plugin the first time it is used, and checks
it is what the group promises. A plugin that fails is reported with its distribution and
entry point and does not stop the others from working.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Generic, TypeVar

from graphopt.errors import PluginError, UsageError

PASS_GROUP = "graphopt.passes"
TARGET_GROUP = "graphopt.targets"

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    value: str  # "module:attribute"


class Registry(Generic[T]):
    """The plugins of one entry-point group that are subclasses of ``base`` (or, with
    ``instances=True``, also ready-made instances of it: one class configured by data,
    e.g. ``arm = graphopt.targets.presets:ARM``)."""

    def __init__(self, group: str, base: type[T], kind: str, instances: bool = False):
        self.group = group
        self.base = base
        self.kind = kind
        self.instances = instances
        self._entry_points: dict[str, EntryPoint] = {}
        self._duplicates: dict[str, list[EntryPoint]] = {}
        for ep in sorted(_group(group), key=lambda e: (e.name, _dist_name(e))):
            if ep.name in self._entry_points:
                self._duplicates.setdefault(ep.name, [self._entry_points[ep.name]]).append(ep)
            else:
                self._entry_points[ep.name] = ep
        self._loaded: dict[str, type[T] | T] = {}

    def names(self) -> list[str]:
        return sorted(self._entry_points)

    def info(self, name: str) -> PluginInfo:
        ep = self._entry_point(name)
        return PluginInfo(name=ep.name, distribution=_dist_name(ep), value=ep.value)

    def __contains__(self, name: str) -> bool:
        return name in self._entry_points

    def get(self, name: str) -> type[T] | T:
        """Import and validate the plugin ``name`` (once); raise ``PluginError`` if broken.

        Returns the class, or the instance when the entry point names one (``instances``)."""
        if name in self._loaded:
            return self._loaded[name]
        ep = self._entry_point(name)
        where = f"{self.kind} {name!r} (entry point '{ep.name} = {ep.value}' of distribution " \
                f"{_dist_name(ep)!r})"
        if name in self._duplicates:
            dists = ", ".join(repr(_dist_name(e)) for e in self._duplicates[name])
            raise PluginError(f"{self.kind} name {name!r} is registered by several "
                              f"distributions: {dists}", hint="uninstall one of them")
        try:
            obj = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginError(f"{where} failed to import: {type(exc).__name__}: {exc}") from exc
        is_class = isinstance(obj, type) and issubclass(obj, self.base)
        if not (is_class or (self.instances and isinstance(obj, self.base))):
            what = " or instance" if self.instances else ""
            raise PluginError(f"{where} is not a {self.base.__name__} subclass{what} "
                              f"(got {obj!r})")
        declared = getattr(obj, "name", None)
        if declared != name:
            raise PluginError(f"{where} declares name {declared!r}; it must match the "
                              f"entry-point name")
        self._loaded[name] = obj
        return obj

    def load_all(self) -> tuple[dict[str, type[T] | T], dict[str, PluginError]]:
        """Every plugin that loads, and the error of every one that does not."""
        loaded, errors = {}, {}
        for name in self.names():
            try:
                loaded[name] = self.get(name)
            except PluginError as exc:
                errors[name] = exc
        return loaded, errors

    def _entry_point(self, name: str) -> EntryPoint:
        try:
            return self._entry_points[name]
        except KeyError:
            valid = ", ".join(self.names()) or "none installed"
            raise UsageError(f"unknown {self.kind} {name!r}", hint=f"valid: {valid}") from None


_GROUPS: dict[str, tuple[tuple, tuple[EntryPoint, ...]]] = {}


def _group(group: str) -> tuple[EntryPoint, ...]:
    """The entry points of ``group``, read again only when the places distributions are
    found in change: ``sys.path`` itself or the modification time of one of its folders
    (installing or removing a distribution adds or removes a folder there). Scanning
    every installed distribution's metadata is most of what building a registry costs,
    twice per optimize run."""
    key = (tuple(sys.path), tuple(_mtime(p) for p in sys.path))
    cached = _GROUPS.get(group)
    if cached is None or cached[0] != key:
        cached = _GROUPS[group] = (key, tuple(entry_points(group=group)))
    return cached[1]


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return None


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown>"
    path = getattr(dist, "_path", None)  # a distribution on disk: read its metadata once
    return _metadata_name(str(path)) if path is not None else dist.metadata["Name"]


@functools.lru_cache(maxsize=None)
def _metadata_name(path: str) -> str:
    """The ``Name`` of the distribution whose metadata folder is ``path`` (parsing its
    METADATA is most of what looking a plugin up costs, every pipeline built)."""
    from importlib.metadata import PathDistribution

    return PathDistribution(Path(path)).metadata["Name"]


def pass_registry() -> "Registry":
    from graphopt.pass_infra import Pass

    return Registry(PASS_GROUP, Pass, "pass")


def target_registry() -> "Registry":
    from graphopt.target import Target

    return Registry(TARGET_GROUP, Target, "target", instances=True)


def create_target(registry: "Registry", name: str):
    """The target ``name`` as an object: its class instantiated, or the instance the
    entry point names. Errors name the distribution and entry point."""
    plugin = registry.get(name)
    if not isinstance(plugin, type):
        return plugin
    ep = registry.info(name)
    try:
        return plugin()
    except Exception as exc:  # a third-party constructor failing
        raise PluginError(f"target {name!r} (entry point '{ep.name} = {ep.value}' of "
                          f"distribution {ep.distribution!r}) failed to construct: "
                          f"{type(exc).__name__}: {exc}") from exc
