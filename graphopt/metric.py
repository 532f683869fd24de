"""The one accuracy metric of lossy optimization.

Every judgement of a lossy result uses the same ``Metric``: the search of a compression
pass, the pass manager's check after a lossy pass, and the final verification. A metric
compares a candidate's outputs with the original model's on the same batches and returns
a score where higher is better; the budget (``--tolerance``) is the lowest score allowed.

Built in:

* ``cosine`` (default): the minimum, over samples and outputs, of the cosine similarity
  of the candidate's output row to the original's;
* ``mean-cosine``: the mean over samples of each sample's lowest output cosine (sentence
  embeddings are judged so);
* ``top1``: the fraction of samples whose argmax over the last axis agrees with the
  original's (classifiers);
* ``module:function`` (or ``path/to/file.py:function``): ``function(reference,
  candidate, feeds) -> float``, each a list of ``{name: array}`` dicts, one per batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from graphopt.errors import UsageError

Feeds = dict[str, np.ndarray]
Outputs = Sequence[Feeds]

DEFAULT_METRIC = "cosine"
DEFAULT_BUDGET = 0.99

_FUNCTION = re.compile(r"^(?P<module>[^:]+):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class Metric:
    name: str
    score_fn: Callable[[Outputs, Outputs, Outputs], float]
    description: str = ""

    def score(self, reference: Outputs, candidate: Outputs, feeds: Outputs) -> float:
        """The candidate's score (higher is better) against the reference outputs."""
        try:
            value = float(self.score_fn(reference, candidate, feeds))
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"metric {self.name!r} failed: {type(exc).__name__}: {exc}") \
                from exc
        if not np.isfinite(value):
            return float("-inf")
        return value


# ============================================================================ built-ins
def sample_cosines(reference: Feeds, candidate: Feeds, batch: int | None) -> np.ndarray:
    """[samples, outputs] cosine of each sample's row of each output (outputs whose first
    axis is not the batch count as one row shared by every sample)."""
    columns = []
    for name, ref in reference.items():
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(candidate[name], dtype=np.float64)
        rows = a.shape[0] if batch and a.ndim >= 1 and a.shape[0] == batch else 1
        if a.shape != b.shape:
            columns.append(np.zeros(batch or 1))
            continue
        x, y = a.reshape(rows, -1), b.reshape(rows, -1)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        dot = (x * y).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(nx * ny > 0, dot / (nx * ny),
                           np.all(x == y, axis=1).astype(np.float64))
        cos = np.nan_to_num(cos, nan=0.0)
        columns.append(np.broadcast_to(cos, (batch or 1,)) if rows == 1 else cos)
    if not columns:
        return np.ones((batch or 1, 1))
    return np.stack(columns, axis=1)


def batch_of(feeds: Feeds) -> int | None:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) else None


def _per_sample(reference: Outputs, candidate: Outputs, feeds: Outputs) -> np.ndarray:
    """Each sample's lowest output cosine, over every batch."""
    values = [sample_cosines(r, c, batch_of(f)).min(axis=1)
              for r, c, f in zip(reference, candidate, feeds)]
    return np.concatenate(values) if values else np.ones(1)


def min_cosine(reference: Outputs, candidate: Outputs, feeds: Outputs) -> float:
    return float(_per_sample(reference, candidate, feeds).min())


def mean_cosine(reference: Outputs, candidate: Outputs, feeds: Outputs) -> float:
    return float(_per_sample(reference, candidate, feeds).mean())


def top1(reference: Outputs, candidate: Outputs, feeds: Outputs) -> float:
    agree = total = 0
    for ref, got in zip(reference, candidate):
        for name, r in ref.items():
            a, b = np.asarray(r), np.asarray(got[name])
            if a.ndim >= 2 and a.shape[-1] > 1 and a.shape == b.shape and \
                    np.issubdtype(a.dtype, np.floating):
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += int(np.prod(a.shape[:-1]))
    if not total:
        raise UsageError("metric 'top1' needs an output of shape [..., classes]",
                         hint="use --metric cosine for this model")
    return agree / total


BUILTIN = {
    "cosine": Metric("cosine", min_cosine, "minimum per-sample output cosine"),
    "mean-cosine": Metric("mean-cosine", mean_cosine, "mean per-sample output cosine"),
    "top1": Metric("top1", top1, "top-1 agreement with the original"),
}


def get_metric(spec: "str | Metric | None") -> Metric:
    """The metric named by ``spec`` (a built-in name, ``module:function`` or a Metric)."""
    if spec is None:
        return BUILTIN[DEFAULT_METRIC]
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return Metric(getattr(spec, "__name__", "custom"), spec, "user metric")
    if spec in BUILTIN:
        return BUILTIN[spec]
    match = _FUNCTION.match(str(spec))
    if not match:
        raise UsageError(f"unknown metric {spec!r}",
                         hint=f"choose {', '.join(BUILTIN)} or give module:function")
    return Metric(str(spec), _load_function(match["module"], match["func"]), "user metric")


def _load_function(module_name: str, func_name: str) -> Callable:
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
        raise UsageError(f"metric: cannot import {module_name!r} ({type(exc).__name__}: "
                         f"{exc})") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"metric: {module_name!r} has no function {func_name!r}")
    return func
