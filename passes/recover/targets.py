"""The original model's side of a re-fit: its tensors per batch of calibration data.

The original never changes while candidates are compressed and recovered, so its values
are computed once per tensor and kept in memory (float32 as ONNX Runtime gives them, up
to ``BUDGET`` bytes) for every later wave of a re-fit and every later candidate. Beyond
the budget they are recomputed, a run of the original per wave.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import onnx

from graphopt import verify
from graphopt.capture import tapped
from graphopt.passes.recover.layers import Reference

BUDGET = 1 << 28  # bytes of original activations kept


def tap(proto: onnx.ModelProto, names: Sequence[str], data: Sequence[dict]
        ) -> Iterator[dict[str, np.ndarray]]:
    """{name: value} of each batch of ``data`` (as ONNX Runtime gives them), from one
    session with ORT's graph optimizations on: the values feed least squares, where
    float rounding of fused kernels (~1e-6) does not matter, and the session is about
    twice as fast on convolutions (``graphopt.capture.activations`` checks numbers and
    runs the graph as written)."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    sess = verify.session(tapped(proto, names), optimize=True, threads=0)
    accepted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    for feeds in data:
        values = sess.run(names, {k: v for k, v in feeds.items() if k in accepted})
        yield dict(zip(names, values))


class Teacher:
    """The original model (``Reference``: names and constants) and, per tensor name,
    its values on each batch of ``data``."""

    def __init__(self, proto: onnx.ModelProto, data: Sequence[dict], budget: int = BUDGET):
        self.ref = Reference(proto)
        self.proto = proto
        self.data = list(data)
        self.budget = budget
        self.store: dict[str, list[np.ndarray]] = {}
        self.nbytes = 0
        self.full = False  # the budget was exceeded once: nothing more is kept
        self.runs = 0  # runs of the original (for tests and reports)

    def serves(self, proto: onnx.ModelProto, data: Sequence[dict]) -> bool:
        """Whether this teacher is for that very model and those very batches."""
        return proto is self.proto and len(data) == len(self.data) and \
            all(a is b for a, b in zip(data, self.data))

    def batches(self, names: Sequence[str], prefetch: Sequence[str] = ()
                ) -> Iterator[dict[str, np.ndarray]]:
        """{name: value} for each batch. Names not yet known are computed in one run of
        the original, together with ``prefetch`` (tensors later waves will want)."""
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self.store]
        if not missing:
            for i in range(len(self.data)):
                yield {n: self.store[n][i] for n in names}
            return
        fetch = missing if self.full else list(dict.fromkeys(
            missing + [n for n in prefetch if n not in self.store]))
        fresh: dict[str, list[np.ndarray]] | None = None if self.full else \
            {n: [] for n in fetch}
        size = 0
        self.runs += 1
        last = len(self.data) - 1
        for i, values in enumerate(tap(self.proto, fetch, self.data)):
            if fresh is not None:
                size += sum(v.nbytes for v in values.values())
                if self.nbytes + size > self.budget:
                    fresh, self.full = None, True
                else:
                    for n in fetch:
                        fresh[n].append(values[n])
            if i == last and fresh is not None:  # before the last yield: a consumer
                self.store.update(fresh)  # may stop iterating there
                self.nbytes += size
            yield {n: values[n] if n in values else self.store[n][i] for n in names}
