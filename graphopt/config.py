"""Options of ``graphopt optimize`` from a file, for builds.

A config file holds the same options as the command line, named as its flags without
the dashes (``target``, ``skip``, ``calibration-data``, ``tolerance``, ``prune``...;
underscores work too). It is, in this order:

1. the file given by ``--config``: a ``graphopt.toml``, or a ``pyproject.toml`` whose
   ``[tool.graphopt]`` table is used;
2. ``graphopt.toml`` beside the model;
3. the ``[tool.graphopt]`` table of the nearest ``pyproject.toml`` in the current
   directory or a parent of it.

A flag given on the command line wins over the file. Lists may be TOML arrays where the
flag takes a comma-separated list (``skip = ["fuse-gelu", "fuse-layer-norm"]``) or is
repeated (``input-shape``). Relative paths in the file are relative to the file's
folder. An unknown key, or a value the flag would not accept, is a usage error naming
the key (and listing the valid keys).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from graphopt.errors import UsageError

FILE = "graphopt.toml"
PATH_KEYS = ("output", "report", "data", "calibration-data", "validation-data", "cache-dir")
NOT_IN_FILE = ("model", "config")  # the model names the file; the file cannot name one


@dataclass
class Config:
    path: Path
    values: dict[str, Any]  # key (flag name) -> value as written


def find(model: Path, explicit: Path | None = None, cwd: Path | None = None
         ) -> Config | None:
    """The config that applies to ``model`` (see the module docstring), or None."""
    if explicit is not None:
        return _read(Path(explicit), required=True)
    beside = Path(model).resolve().parent / FILE
    if beside.is_file():
        return _read(beside, required=True)
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            config = _read(candidate, required=False)
            if config is not None:
                return config
    return None


def _read(path: Path, required: bool) -> Config | None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path} cannot be read: {exc}") from None
    if path.name == "pyproject.toml":
        table = data.get("tool", {}).get("graphopt")
        if table is None:
            if required:
                raise UsageError(f"{path} has no [tool.graphopt] table")
            return None
        data = table
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: [tool.graphopt] must be a table")
    return Config(path, data)


def merge(ctx: click.Context, config: Config | None) -> dict[str, Any]:
    """The command's parameters (``ctx.params``) with every one the command line left at
    its default taken from ``config``, converted and checked as the flag would be."""
    values = dict(ctx.params)
    if config is None:
        return values
    by_key = {_key(p): p for p in ctx.command.params
              if isinstance(p, click.Option) and _key(p) not in NOT_IN_FILE}
    where = f"config file {config.path}"
    for raw, value in config.values.items():
        key = str(raw).replace("_", "-")
        param = by_key.get(key)
        if param is None:
            raise UsageError(f"{where}: unknown key {raw!r}",
                             hint="valid keys: " + ", ".join(sorted(by_key)))
        if ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT,
                                                         ParameterSource.DEFAULT_MAP):
            continue  # the command line wins
        values[param.name] = _convert(ctx, param, key, value, config.path.parent, where)
    return values


def _key(param: click.Option) -> str:
    """The flag's name without dashes: --calibration-data -> calibration-data."""
    longest = max((o for o in param.opts if o.startswith("--")), key=len, default=None)
    return longest[2:] if longest else param.name.replace("_", "-")


def _convert(ctx: click.Context, param: click.Option, key: str, value: Any, base: Path,
             where: str) -> Any:
    if isinstance(value, dict):
        raise UsageError(f"{where}: {key} must be a value, not a table")
    if isinstance(value, list):
        if not param.multiple:  # a comma-separated flag
            if not all(isinstance(v, (str, int, float)) for v in value):
                raise UsageError(f"{where}: {key} must be a list of names")
            value = ",".join(str(v) for v in value)
    elif param.multiple:
        value = [value]
    if key in PATH_KEYS and isinstance(value, str) and ":" not in value.replace("\\", "/")[2:]:
        value = str((base / value).resolve()) if not Path(value).is_absolute() else value
    if key == "recover" and isinstance(value, bool):  # recover = false: no recovery
        value = param.flag_value if value else ""
    if param.is_flag and not param.secondary_opts and not isinstance(value, bool):
        raise UsageError(f"{where}: {key} must be true or false, not {value!r}")
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise UsageError(f"{where}: {key}: {exc.format_message()}") from None
