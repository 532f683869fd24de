"""Accuracy budgets of lossy passes: measure a candidate model against the float one,
rank layers by sensitivity and keep the most sensitive in float until the budget holds.

Metrics: the minimum output cosine similarity over every sample (each row of an output
whose first axis is the batch), and optionally the top-1 agreement of classifier-like
outputs ([batch, classes]). Candidates run in ONNX Runtime the way the target runs them
(graph optimizations on: fused int8 kernels, with their saturation) and as written
(optimizations off: what graphopt's verifier runs); the worse of the two counts.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from graphopt import verify

Feeds = dict[str, np.ndarray]


# ============================================================================ metrics
def sample_cosines(reference: Feeds, candidate: Feeds, batch: int | None) -> list[float]:
    """Cosine similarity per sample (rows of outputs whose first axis is ``batch``)."""
    values = []
    for name, ref in reference.items():
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(candidate[name], dtype=np.float64)
        if a.shape != b.shape:
            values.append(0.0)
            continue
        rows = a.shape[0] if batch and a.ndim >= 1 and a.shape[0] == batch else 1
        for x, y in zip(a.reshape(rows, -1), b.reshape(rows, -1)):
            denom = np.linalg.norm(x) * np.linalg.norm(y)
            if denom == 0:
                values.append(1.0 if np.array_equal(x, y) else 0.0)
            else:
                values.append(float(x @ y / denom))
    return values


def top1_agreement(reference: Feeds, candidate: Feeds) -> tuple[int, int]:
    """(agreeing rows, rows) of the argmax over the last axis of [batch, classes] outputs."""
    agree = total = 0
    for name, ref in reference.items():
        a, b = np.asarray(ref), np.asarray(candidate[name])
        if a.ndim == 2 and a.shape[1] > 1 and a.shape == b.shape and \
                np.issubdtype(a.dtype, np.floating):
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            total += a.shape[0]
    return agree, total


@dataclass
class Measurement:
    cosine: float  # the metric's score (the default metric: minimum per-sample cosine)
    top1: float | None = None  # agreement with the float model's argmax
    metric: str = "cosine"

    def to_dict(self) -> dict:
        out = {"score": round(self.cosine, 6), "metric": self.metric}
        if self.metric == "cosine":
            out["min_cosine"] = round(self.cosine, 6)
        if self.top1 is not None:
            out["top1_agreement"] = round(self.top1, 6)
        return out


# ============================================================================ running
def session(proto: onnx.ModelProto, optimize: bool, threads: int = 0) -> ort.InferenceSession:
    return verify.session(proto, optimize=optimize, threads=threads)


def run_all(sess: ort.InferenceSession, data: Sequence[Feeds]) -> list[Feeds]:
    names = [o.name for o in sess.get_outputs()]
    accepted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return [dict(zip(names, sess.run(names, {k: v for k, v in f.items() if k in accepted})))
            for f in data]


def batch_size(feeds: Feeds) -> int | None:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else None


# ============================================================================ references
# Within ``shared_references()`` (one optimize run), the original's outputs on a list of
# batches are computed once: the pass manager's lossy check, a quantizer's evaluator and
# the final verification all score against the original on the same batches.
_memo: list[tuple[onnx.ModelProto, list, list[Feeds]]] | None = None


@contextlib.contextmanager
def shared_references():
    """Remember reference outputs (``reference_outputs``) for the length of the block
    (or the decorated function); nothing outlives it."""
    global _memo
    before, _memo = _memo, []
    try:
        yield
    finally:
        _memo = before


def reference_outputs(proto: onnx.ModelProto, data: Sequence[Feeds]) -> list[Feeds]:
    """``proto``'s outputs on each batch of ``data``, in ONNX Runtime with its rewrites
    off (the graph as written); the same proto object on the same batch objects is run
    once inside ``shared_references()``."""
    data = list(data)
    if _memo is not None:
        for model, batches, outputs in _memo:
            if model is proto and len(batches) == len(data) and \
                    all(a is b for a, b in zip(batches, data)):
                return outputs
    outputs = run_all(session(proto, optimize=False), data)
    if _memo is not None:
        _memo.append((proto, data, outputs))
        del _memo[:-2]  # the original on the check batches and on the calibration ones
    return outputs


class Evaluator:
    """Measures candidate models against ``reference`` on ``data``."""

    def __init__(self, reference: onnx.ModelProto | list[Feeds], data: Sequence[Feeds],
                 budget: float, min_top1: float | None = None,
                 modes: Sequence[bool] = (True, False), metric=None):
        """``reference``: the model candidates are compared with, or its outputs on
        ``data`` when already known."""
        from graphopt.metric import get_metric

        self.data = list(data)
        self.budget = budget
        self.metric = get_metric(metric)
        self.min_top1 = min_top1
        self.modes = tuple(modes)
        self.reference = reference if isinstance(reference, list) else \
            reference_outputs(reference, self.data)
        self.evaluations = 0
        self._as_written: list[tuple[onnx.ModelProto, list[Feeds]]] = []

    def outputs_of(self, proto: onnx.ModelProto) -> list[Feeds] | None:
        """The outputs of ``proto`` (this very object) on the data with ORT's rewrites
        off, if it was among the last models measured."""
        return next((o for p, o in self._as_written if p is proto), None)

    def measure(self, proto: onnx.ModelProto) -> Measurement:
        self.evaluations += 1
        score, agree, total = float("inf"), 0, 0
        for optimize in self.modes:  # the worse of ORT's fused kernels and the graph
            outputs = run_all(session(proto, optimize=optimize), self.data)
            if not optimize:
                self._as_written = [*self._as_written[-3:], (proto, outputs)]
            score = min(score, self.metric.score(self.reference, outputs, self.data))
            if self.min_top1 is not None:
                for ref, got in zip(self.reference, outputs):
                    a, t = top1_agreement(ref, got)
                    agree, total = agree + a, total + t
        top1 = agree / total if total else None
        return Measurement(score, top1, self.metric.name)

    def ok(self, m: Measurement) -> bool:
        if m.cosine < self.budget:
            return False
        return self.min_top1 is None or m.top1 is None or m.top1 >= self.min_top1


# ============================================================================ search
@dataclass
class SearchResult:
    keep_float: list[str]  # sites left in float, most sensitive first
    proto: onnx.ModelProto | None  # None: the budget holds only with every site float
    measurement: Measurement | None
    tried: list[dict] = field(default_factory=list)


def fallback_search(sites: Sequence[str], rank: Callable[[], Sequence[str]],
                    build: Callable[[set[str]], onnx.ModelProto],
                    evaluator: Evaluator) -> SearchResult:
    """Keep the first k sites of ``rank()`` (``sites`` most sensitive first) in float,
    with the smallest k whose model meets the budget: k = 0, then 1, 2, 4, ... until the
    budget holds, then bisection (sensitivity is close enough to monotone for this; the
    model returned is always one that was measured to meet the budget). ``rank`` is only
    called when every site quantized misses the budget: measuring sensitivities runs the
    data once per site (41 of 49 s of quantizing a ResNet-50, whose int8 model met the
    budget at once)."""
    names = list(sites)
    tried: list[dict] = []
    cache: dict[int, tuple[bool, Measurement, onnx.ModelProto]] = {}

    def attempt(k: int):
        if k not in cache:
            proto = build(set(names[k:]))
            m = evaluator.measure(proto)
            cache[k] = (evaluator.ok(m), m, proto)
            tried.append({"float_layers": k, **m.to_dict(), "ok": cache[k][0]})
        return cache[k]

    n = len(names)
    if n == 0:
        return SearchResult([], None, None, tried)
    if attempt(0)[0]:
        return _result(names, 0, cache, tried)
    names = list(rank())
    bad, k = 0, 1
    while k < n and not attempt(k)[0]:
        bad, k = k, min(2 * k, n)
    if k >= n:
        return SearchResult(names, None, None, tried)
    good = k
    while good - bad > 1:
        mid = (good + bad) // 2
        if attempt(mid)[0]:
            good = mid
        else:
            bad = mid
    return _result(names, good, cache, tried)


def _result(names, k, cache, tried) -> SearchResult:
    _, m, proto = cache[k]
    return SearchResult(names[:k], proto, m, tried)


# ============================================================================ timing
def median_latency(protos: Sequence[onnx.ModelProto], feeds: Feeds, repeats: int = 20,
                   threads: int = 1, warmup: int = 3, clock: str = "wall") -> list[float]:
    """Median seconds per run of each model on ``feeds``, runs interleaved so that load
    changes on the machine hit every model alike. ``clock="cpu"`` counts the calling
    thread's CPU time instead (with ``threads=1`` ORT computes on the calling thread), which
    other processes competing for the cores do not inflate."""
    now = time.thread_time if clock == "cpu" else time.perf_counter
    sessions = [session(p, optimize=True, threads=threads) for p in protos]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for s, n in zip(sessions, names):
        for _ in range(warmup):
            s.run(n, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (s, n) in enumerate(zip(sessions, names)):
            start = now()
            s.run(n, feeds)
            times[i].append(now() - start)
    return [statistics.median(t) for t in times]


def default_threads() -> int:
    return os.cpu_count() or 1
