"""The original model's side of a re-fit: its tensors per batch of calibration data.

The original never changes while candidates are compressed and recovered, so its values
are computed once per tensor and kept in memory (float32 as ONNX Runtime gives them, up
to ``BUDGET`` bytes, the tensors wanted soonest first) for every later wave of a re-fit
and every later candidate. What does not fit is recomputed, a run of the original for
the wave that needs it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import onnx

from graphopt import verify
from graphopt.capture import needed_nodes, outer_names, tapped
from graphopt.passes.recover.layers import Reference

BUDGET = 1 << 30  # bytes of original activations kept


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


class Student:
    """The compressed model's side of a re-fit: the inputs of each wave's layers, each
    wave computed from where the last one stopped.

    A wave's run computes only what its taps depend on, and none of that depends on a
    layer still to be fitted (a wave is every pending layer with no pending layer
    upstream), so every value computed stays valid for the rest of the re-fit. The
    tensors a run computed that nodes outside it read (the cut) are kept, up to
    ``budget`` bytes, and the next wave runs the model from them instead of from the
    graph inputs: a re-fit costs about one run of the model instead of one per wave."""

    def __init__(self, data: Sequence[dict], budget: int = BUDGET):
        self.data = list(data)
        self.budget = budget
        self.store: dict[str, list[np.ndarray]] = {}
        self.nbytes = 0
        self.computed: set[str] = set()  # tensors some run computed (their nodes ran)
        self.nodes_run = 0  # nodes executed over all waves (for tests and reports)

    def batches(self, proto: onnx.ModelProto, names: Sequence[str]
                ) -> Iterator[dict[str, np.ndarray]]:
        names = list(dict.fromkeys(names))
        graph_inputs = {i.name for i in proto.graph.input}
        given_names = [n for n in names if n in self.store or n in graph_inputs]
        names_run = [n for n in names if n not in given_names]

        def known(i: int) -> dict[str, np.ndarray]:
            return {n: self.store[n][i] if n in self.store else self.data[i][n]
                    for n in given_names}

        if not names_run:
            for i in range(len(self.data)):
                yield known(i)
            return
        part, made, live = _from_store(proto, names_run, self.store, self.computed)
        self.nodes_run += len(part.graph.node)
        self.computed |= made
        # what the nodes still to run read: kept; stored tensors nothing reads any more
        # are dropped after this run (which may read them)
        keep = [n for n in dict.fromkeys([*names_run, *sorted(made & live)])
                if n not in self.store]
        stale = [n for n in self.store if n not in live]
        freed = sum(v.nbytes for n in stale for v in self.store[n])
        fresh: dict[str, list[np.ndarray]] | None = {n: [] for n in keep}
        size = 0
        sess = verify.session(part, optimize=True, threads=0)
        accepted = {i.name for i in [*sess.get_inputs(),
                                     *sess.get_overridable_initializers()]}
        fetch = list(dict.fromkeys([*names_run, *keep]))
        last = len(self.data) - 1
        for i, feeds in enumerate(self.data):
            given = {k: v for k, v in feeds.items() if k in accepted}
            given.update({k: v[i] for k, v in self.store.items() if k in accepted})
            values = dict(zip(fetch, sess.run(fetch, given)))
            if fresh is not None:
                size += sum(values[n].nbytes for n in keep)
                if self.nbytes - freed + size > self.budget:
                    fresh = None
                else:
                    for n in keep:
                        fresh[n].append(values[n])
            if i == last:
                for n in stale:
                    del self.store[n]
                self.nbytes -= freed
                if fresh is not None:
                    self.store.update(fresh)
                    self.nbytes += size
            yield {**known(i), **{n: values[n] for n in names_run}}


def _from_store(proto: onnx.ModelProto, names: Sequence[str],
                store: dict[str, list[np.ndarray]], computed: set[str]
                ) -> tuple[onnx.ModelProto, set[str], set[str]]:
    """(the part of ``proto`` that computes ``names`` from the graph inputs and the
    stored tensors, which become its inputs; the tensors it computes; the tensors read
    by the nodes neither in it nor run before (``computed``), and the graph outputs)."""
    graph = proto.graph
    needed = needed_nodes(graph, names, given=store)
    nodes = [n for i, n in enumerate(graph.node) if i in needed]
    made = {o for n in nodes for o in n.output if o}
    read = {t for n in nodes for t in (*n.input, *outer_names(n)) if t}
    live = {t for i, n in enumerate(graph.node) if i not in needed
            and not all(o in computed for o in n.output if o)
            for t in (*n.input, *outer_names(n))} | {o.name for o in graph.output}
    cut = sorted(made & live)
    part = onnx.ModelProto()
    part.CopyFrom(proto)
    g = part.graph
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in read]
    for name in sorted(read & set(store)):
        inputs.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(store[name][0].dtype), None))
    del g.input[:]
    g.input.extend(inputs)
    known = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output]}
    del g.output[:]
    for name in dict.fromkeys([*names, *cut]):
        g.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return part, made, live


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
        self.runs = 0  # runs of the original (for tests and reports)

    def serves(self, proto: onnx.ModelProto, data: Sequence[dict]) -> bool:
        """Whether this teacher is for that very model and those very batches."""
        return proto is self.proto and len(data) == len(self.data) and \
            all(a is b for a, b in zip(data, self.data))

    def batches(self, names: Sequence[str], prefetch: Sequence[str] = ()
                ) -> Iterator[dict[str, np.ndarray]]:
        """{name: value} for each batch. Names not yet known are computed in one run of
        the original, together with ``prefetch`` (tensors later waves will want, soonest
        first); what fits in the budget is kept, the soonest wanted first."""
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self.store]
        if not missing:
            for i in range(len(self.data)):
                yield {n: self.store[n][i] for n in names}
            return
        fetch = list(dict.fromkeys(missing + [n for n in prefetch if n not in self.store]))
        kept = list(fetch)  # priority order: the last is dropped first
        fresh: dict[str, list[np.ndarray]] = {n: [] for n in fetch}
        sizes = dict.fromkeys(fetch, 0)
        total = 0
        self.runs += 1
        last = len(self.data) - 1
        for i, values in enumerate(tap(self.proto, fetch, self.data)):
            for n in kept:
                fresh[n].append(values[n])
                sizes[n] += values[n].nbytes
                total += values[n].nbytes
            while kept and self.nbytes + total > self.budget:
                dropped = kept.pop()
                total -= sizes[dropped]
                del fresh[dropped]
            if i == last:  # before the last yield: a consumer may stop iterating there
                self.store.update({n: fresh[n] for n in kept})
                self.nbytes += total
            yield {n: values[n] if n in values else self.store[n][i] for n in names}
