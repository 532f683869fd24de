"""Calibration and validation data for lossy passes (quantization).

A source is one of:

* an ``.npz`` file whose arrays are named like the model inputs; the first axis of every
  array counts samples (an array of the input's rank is split into samples of batch 1; an
  array of one more dimension holds ready batches, one per entry);
* a folder of ``.npz`` files (read as above, in name order) or of ``.npy`` files (a
  one-input model: any names; several inputs: ``<input name>.npy``);
* ``module:function`` (``module`` importable, or a ``.py`` file path): the function takes
  no arguments and returns an iterable of ``{input name: array}`` dicts, each one batch;
* (API) a list or iterable of such dicts.

Every sample is checked against the model: each input present, the dtype of the right
kind (floats for float inputs, integers for integer inputs; widths are converted), the
rank and every static dimension. Problems are ``UsageError``s that name the input, the
file and what was expected.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt import verify
from graphopt.errors import UsageError

Feeds = dict[str, np.ndarray]

_FUNCTION = re.compile(r"^(?P<module>[^:]+):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")


def load_data(source: Any, proto: onnx.ModelProto, *, what: str = "calibration data",
              batch_size: int = 1) -> list[Feeds] | None:
    """The samples of ``source`` as a list of feed dicts (``None`` when there is none),
    checked against ``proto``'s inputs and grouped in batches of ``batch_size``."""
    if source is None:
        return None
    specs = {name: (np.dtype(dtype), shape) for name, dtype, shape in verify.input_specs(proto)}
    if not specs:
        raise UsageError(f"{what}: the model has no inputs to feed")
    if isinstance(source, (str, os.PathLike)):
        samples = _from_path(source, specs, what)
    elif isinstance(source, dict):
        samples = _split({k: np.asarray(v) for k, v in source.items()}, specs, what)
    else:
        samples = _from_dicts(source, specs, what, origin="the data given")
    if not samples:
        raise UsageError(f"{what}: no samples in {_describe(source)}",
                         hint="give at least one sample per model input")
    return group(samples, batch_size)


def check_feeds(batches: list[Feeds] | None, proto: onnx.ModelProto, *,
                what: str = "--data") -> list[Feeds] | None:
    """Ready batches (``--data``, ``data=``) checked against ``proto``'s inputs as
    samples are: every input present, dtype of the right kind (widths converted), rank
    and static dimensions; an array naming no input is a ``UsageError`` too. Initializers
    listed as inputs (overridable defaults) may be given and are passed through."""
    if batches is None:
        return None
    specs = {name: (np.dtype(dtype), shape) for name, dtype, shape in verify.input_specs(proto)}
    overridable = {t.name for t in proto.graph.initializer} & {v.name for v in proto.graph.input}
    checked = []
    for i, batch in enumerate(batches):
        origin = what if len(batches) == 1 else f"{what} (batch {i})"
        if not isinstance(batch, dict):
            raise UsageError(f"{origin} is a {type(batch).__name__}, not an "
                             "{input name: array} dict")
        unknown = sorted(k for k in batch if k not in specs and k not in overridable)
        if unknown:
            raise UsageError(f"{origin}: array {unknown[0]!r} names no model input",
                             hint=f"model inputs: {', '.join(specs) or 'none'}")
        feeds = _check({k: np.asarray(v) for k, v in batch.items() if k in specs}, specs,
                       origin, batched=True)
        feeds.update({k: np.asarray(v) for k, v in batch.items() if k in overridable})
        checked.append(feeds)
    return checked


def group(samples: list[Feeds], batch_size: int) -> list[Feeds]:
    """Concatenate consecutive samples whose arrays have the same shapes into batches of
    at most ``batch_size`` (along axis 0)."""
    if batch_size <= 1:
        return list(samples)
    batches: list[list[Feeds]] = []
    for sample in samples:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and _same_shapes(last[0], sample):
            last.append(sample)
        else:
            batches.append([sample])
    return [b[0] if len(b) == 1 else {k: np.concatenate([s[k] for s in b]) for k in b[0]}
            for b in batches]


def count_samples(batches: list[Feeds] | None) -> int:
    """Samples in ``batches`` (the first axis of each batch's first array)."""
    total = 0
    for feeds in batches or ():
        first = next(iter(feeds.values()), None)
        total += int(first.shape[0]) if first is not None and first.ndim else 1
    return total


# ----------------------------------------------------------------------------- sources
def _from_path(source, specs, what) -> list[Feeds]:
    text = os.fspath(source)
    path = Path(text)
    match = _FUNCTION.match(text)
    if not path.exists() and match and not text.endswith((".npz", ".npy")):
        return _from_function(match["module"], match["func"], specs, what)
    if not path.exists():
        raise UsageError(f"{what}: {text} does not exist",
                         hint="give an .npz file, a folder of .npy/.npz files or "
                              "module:function")
    if path.is_dir():
        return _from_folder(path, specs, what)
    if path.suffix == ".npy":
        if len(specs) != 1:
            raise UsageError(f"{what}: {path} is a single .npy array but the model has "
                             f"{len(specs)} inputs ({', '.join(specs)})",
                             hint="give an .npz with one array per input")
        return _split({next(iter(specs)): _load_npy(path, what)}, specs, f"{what} {path}")
    return _split(_load_npz(path, what), specs, f"{what} {path}")


def _from_folder(folder: Path, specs, what) -> list[Feeds]:
    npz = sorted(folder.glob("*.npz"))
    npy = sorted(folder.glob("*.npy"))
    if not npz and not npy:
        raise UsageError(f"{what}: folder {folder} holds no .npz or .npy files",
                         hint="put one .npz per sample (arrays named like the inputs), or "
                              ".npy files, in the folder")
    samples = []
    for path in npz:
        samples += _split(_load_npz(path, what), specs, f"{what} {path}")
    if npy and len(specs) == 1:
        name = next(iter(specs))
        for path in npy:
            samples += _split({name: _load_npy(path, what)}, specs, f"{what} {path}")
    elif npy:
        arrays = {p.stem: _load_npy(p, what) for p in npy}
        unknown = sorted(set(arrays) - set(specs))
        if unknown:
            raise UsageError(f"{what}: {folder}/{unknown[0]}.npy names no model input",
                             hint=f"with several inputs, name the files after them: "
                                  f"{', '.join(f'{n}.npy' for n in specs)}")
        samples += _split(arrays, specs, f"{what} {folder}")
    return samples


def _from_function(module_name: str, func_name: str, specs, what) -> list[Feeds]:
    where = f"{module_name}:{func_name}"
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"{what}: cannot import {module_name!r} ({type(exc).__name__}: "
                         f"{exc})", hint="give module:function with the module importable "
                                         "from here, or path/to/file.py:function") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"{what}: {module_name!r} has no function {func_name!r}")
    try:
        result = func()
    except Exception as exc:
        raise UsageError(f"{what}: {where}() raised {type(exc).__name__}: {exc}") from exc
    return _from_dicts(result, specs, what, origin=f"{where}()")


def _from_dicts(items, specs, what, origin: str) -> list[Feeds]:
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise UsageError(f"{what}: {origin} returned {type(items).__name__}, not an "
                         "iterable of {input name: array} dicts")
    samples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"{what}: item {i} of {origin} is a {type(item).__name__}, "
                             "not an {input name: array} dict")
        samples.append(_check({k: np.asarray(v) for k, v in item.items()}, specs,
                              f"{what} (item {i} of {origin})", batched=True))
    return samples


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what}: cannot read {path} ({exc})",
                         hint="give an .npz with one array per model input") from exc


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what}: cannot read {path} ({exc})") from exc


# ----------------------------------------------------------------------------- checks
def _split(arrays: dict[str, np.ndarray], specs, origin: str) -> list[Feeds]:
    """Samples from arrays whose first axis counts them (see the module docstring)."""
    _require_inputs(arrays, specs, origin)
    counts = {}
    extra_axis = {}
    for name, (dtype, shape) in specs.items():
        array = arrays[name]
        rank = len(shape) if shape is not None else array.ndim
        if array.ndim not in (rank, rank + 1) or array.ndim == 0:
            raise UsageError(f"{origin}: array {name!r} has shape {array.shape}; input "
                             f"{name!r} has rank {rank} ({_shape_text(shape)})",
                             hint="the first axis counts samples: give rank "
                                  f"{rank} (samples of batch 1) or {rank + 1} (batches)")
        extra_axis[name] = array.ndim == rank + 1
        counts[name] = array.shape[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise UsageError(f"{origin}: the arrays hold different numbers of samples ({listed})")
    samples = []
    for i in range(next(iter(counts.values()))):
        sample = {name: (arrays[name][i] if extra_axis[name] else arrays[name][i:i + 1])
                  for name in specs}
        samples.append(_check(sample, specs, f"{origin} (sample {i})", batched=True))
    return samples


def _require_inputs(arrays: dict, specs, origin: str) -> None:
    missing = [name for name in specs if name not in arrays]
    if missing:
        present = ", ".join(sorted(arrays)) or "none"
        raise UsageError(f"{origin}: no array for model input {missing[0]!r}",
                         hint=f"model inputs: {', '.join(specs)}; arrays given: {present}")


def _check(sample: Feeds, specs, origin: str, batched: bool) -> Feeds:
    _require_inputs(sample, specs, origin)
    out = {}
    for name, (dtype, shape) in specs.items():
        array = np.asarray(sample[name])
        if not _same_kind(array.dtype, dtype):
            raise UsageError(f"{origin}: array {name!r} is {array.dtype}, input {name!r} "
                             f"is {dtype}", hint="give arrays of the input's type")
        if shape is not None:
            if array.ndim != len(shape):
                raise UsageError(f"{origin}: array {name!r} has shape {array.shape}; input "
                                 f"{name!r} has rank {len(shape)} ({_shape_text(shape)})")
            for axis, (want, got) in enumerate(zip(shape, array.shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise UsageError(f"{origin}: array {name!r} has shape {array.shape}; "
                                     f"input {name!r} needs {want} on axis {axis} "
                                     f"({_shape_text(shape)})")
        out[name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    return out


def _same_kind(got: np.dtype, want: np.dtype) -> bool:
    if want == np.bool_:
        return got == np.bool_
    if np.issubdtype(want, np.floating):
        return np.issubdtype(got, np.floating)
    if np.issubdtype(want, np.integer):
        return np.issubdtype(got, np.integer) or got == np.bool_
    return got == want


def _same_shapes(a: Feeds, b: Feeds) -> bool:
    return a.keys() == b.keys() and all(a[k].shape[1:] == b[k].shape[1:] and a[k].ndim
                                        for k in a)


def _shape_text(shape) -> str:
    if shape is None:
        return "shape unknown"
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _describe(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the data given"
