"""Measuring lossy results: per-sample output cosines and top-1 agreement (the metrics
``graphopt.metric`` builds on), running a model over batches in ONNX Runtime, the
original's outputs computed once a run (``shared_references``), and interleaved latency
timing. The budgeted search itself is ``graphopt.compression_driver``'s.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Sequence

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
