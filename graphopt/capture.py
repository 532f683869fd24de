"""Activation capture: tap any tensors of a model and stream statistics over data.

Compression passes and recovery need activations (importance scores, whitening, least-
squares re-fits) but never all of them at once: a tap exposes the named tensors as extra
outputs of a temporary model, runs it in one ONNX Runtime session over the data batch by
batch, and hands each batch's values to reducers that keep only what they need (means,
variances, Gram matrices: O(d²) memory per tensor, whatever the amount of data).

    for values in activations(proto, ["conv1_out", "fc1_in"], data):
        ...                                     # {name: float64 array} per batch

    stats = channel_stats(proto, {"conv1_out": 1, "fc1_in": -1}, data, gram=True)
    stats["fc1_in"].mean, stats["fc1_in"].gram  # per channel; XᵀX over every row
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from graphopt import verify

Feeds = dict[str, np.ndarray]


def tapped(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph outputs are exactly ``names`` (any tensors: graph
    inputs, initializers or node outputs), with only the nodes and initializers they
    need: ONNX Runtime runs every node of a graph whatever outputs are fetched, so a tap
    early in the model costs only the part of the model before it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    graph = probe.graph
    known = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    del graph.output[:]
    for name in names:
        info = known.get(name)
        graph.output.append(info if info is not None else
                            onnx.helper.make_empty_tensor_value_info(name))
    needed = needed_nodes(graph, names)
    if len(needed) < len(graph.node):
        kept = [n for i, n in enumerate(graph.node) if i in needed]
        del graph.node[:]
        graph.node.extend(kept)
        used = {t for n in kept for t in (*n.input, *outer_names(n))} | set(names)
        inits = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return probe


def outer_names(node: onnx.NodeProto) -> set[str]:
    """Tensors a node's subgraphs (If, Loop, Scan) read from the enclosing graph."""
    out: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
                list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []:
            inner = {t.name for t in [*sub.input, *sub.initializer]} | \
                {o for n in sub.node for o in n.output}
            for n in sub.node:
                out |= {t for t in (*n.input, *outer_names(n)) if t and t not in inner}
    return out


def needed_nodes(graph: onnx.GraphProto, names: Sequence[str],
                 given: Container[str] = ()) -> set[int]:
    """Indices of the nodes ``names`` depend on, stopping at the tensors ``given``."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    needed: set[int] = set()
    stack = [producer[n] for n in names if n in producer and n not in given]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        node = graph.node[i]
        stack.extend(producer[t] for t in (*node.input, *outer_names(node))
                     if t in producer and t not in given)
    return needed


def activations(proto: onnx.ModelProto, names: Sequence[str], data: Iterable[Feeds],
                dtype=np.float64, threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """``{name: value}`` of each batch of ``data``, from one ORT session (graph rewrites
    off: the values are those of the graph as written)."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    sess = verify.session(tapped(proto, names), threads=threads)
    accepted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    for feeds in data:
        values = sess.run(names, {k: v for k, v in feeds.items() if k in accepted})
        yield {n: np.asarray(v, dtype=dtype) if dtype is not None else np.asarray(v)
               for n, v in zip(names, values)}


@dataclass
class ChannelStats:
    """Streaming statistics of one tensor per channel (``axis``): every other axis counts
    as rows. ``gram`` keeps XᵀX (channels × channels) over the rows as well."""

    axis: int = 1
    gram_wanted: bool = False
    count: int = 0
    sum: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    gram: np.ndarray | None = None
    absmax: np.ndarray | None = None
    shape: tuple[int, ...] | None = field(default=None, repr=False)

    def update(self, x: np.ndarray) -> None:
        rows = as_rows(x, self.axis)
        self.shape = tuple(x.shape)
        if self.sum is None:
            c = rows.shape[1]
            self.sum, self.sumsq = np.zeros(c), np.zeros(c)
            self.absmax = np.zeros(c)
            if self.gram_wanted:
                self.gram = np.zeros((c, c))
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sumsq += (rows * rows).sum(0)
        self.absmax = np.maximum(self.absmax, np.abs(rows).max(0, initial=0.0))
        if self.gram_wanted:
            self.gram += rows.T @ rows

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sumsq / max(self.count, 1) - self.mean ** 2, 0.0)

    @property
    def norm(self) -> np.ndarray:
        """‖X_j‖₂ per channel over every row seen (Wanda's activation norm)."""
        return np.sqrt(self.sumsq)


def subset(data: Sequence, count: int) -> list:
    """At most ``count`` of the batches ``data``, spread evenly over it in its order (not
    its first ones: calibration sets are often sorted, e.g. sentences by length)."""
    data = list(data or [])
    if len(data) <= count:
        return data
    return [data[(i * len(data)) // count] for i in range(count)]


def as_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as a [rows, channels] float64 matrix, channels on ``axis``."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim if x.ndim else 0
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis] if x.ndim else 1)


def channel_stats(proto: onnx.ModelProto, axes: Mapping[str, int], data: Iterable[Feeds],
                  gram: bool = False) -> dict[str, ChannelStats]:
    """``ChannelStats`` of every tensor in ``axes`` ({name: channel axis}) over ``data``,
    in one pass of one session."""
    stats = {name: ChannelStats(axis=axis, gram_wanted=gram) for name, axis in axes.items()}
    for values in activations(proto, list(axes), data):
        for name, value in values.items():
            stats[name].update(value)
    return stats
