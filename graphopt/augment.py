"""More fitting data from a few calibration batches, for recovery against a teacher.

Recovery (the least-squares re-fit, distillation) fits the compressed model to the
original's values on the calibration data; the original can be asked about any input,
so the inputs need not be real samples, only near the data the model will see. With a
few hundred sentences the re-fit of a transformer's FFN overfits (a 1,536-wide layer
and a few thousand tokens); fed variants of the same sentences, with the original's
values on them as the targets, it sees more of the input space ("function matching":
Beyer et al., *Knowledge distillation: a good teacher is patient and consistent*, 2022;
TinyBERT's augmentation by word replacement, Jiao et al. 2020).

Variants, for each batch, of the inputs that index a vocabulary (an integer graph input
read, directly or through shape-only ops, as the indices of a Gather of a constant table
of at least ``VOCABULARY`` rows: token ids):

* **replacement**: each ordinary token (see below) is replaced, with probability
  ``rate``, by a token drawn from the calibration data's own token frequencies;
* **splicing**: samples of a batch (equal length) exchange their tails after a random
  position, so a sentence's start meets another's end.

Tokens the data uses as structure are never replaced and never drawn: those present in
at least ``SPECIAL_SHARE`` of the samples ([CLS], [SEP]) or first or last in at least
``EDGE_SHARE`` of them (padding). Every other input (attention masks, token types) is
copied unchanged, so every variant is a valid input of the same shapes. Models without
token inputs get no variants (``token_inputs`` is empty): an image model's inputs are
not changed here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

VOCABULARY = 64  # rows of an embedding table, at least
SPECIAL_SHARE = 0.9  # a token in this share of the samples is structure
EDGE_SHARE = 0.25  # so is a token first or last in this share of them
PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def token_inputs(proto: onnx.ModelProto) -> list[str]:
    """The integer graph inputs that index an embedding table (see the module
    docstring), in graph order."""
    graph = proto.graph
    tables = {t.name: (t.dims[0] if t.dims else 0) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.dims:
                    tables[node.output[0]] = attr.t.dims[0]
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = set(tables)
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
               onnx.TensorProto.UINT16, onnx.TensorProto.UINT32}
    out = []
    for value in graph.input:
        if value.name in inits or value.type.tensor_type.elem_type not in integer:
            continue
        frontier, seen, found = [value.name], set(), False
        while frontier and not found:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in readers.get(name, ()):
                if node.op_type == "Gather" and len(node.input) > 1 and \
                        node.input[1] == name and tables.get(node.input[0], 0) >= VOCABULARY:
                    found = True
                elif node.op_type in PASS_THROUGH and node.input[0] == name:
                    frontier.extend(node.output)
        if found:
            out.append(value.name)
    return out


def variants(data: Sequence[dict], inputs: Sequence[str], copies: int, seed: int = 0,
             rate: float = 0.15, splice: bool = True) -> list[dict]:
    """``copies`` variants of each batch of ``data`` (batch by batch: copy 1 of every
    batch, then copy 2, ...), the token ``inputs`` changed as the module docstring says;
    [] when there is nothing to vary. Deterministic for ``seed``."""
    inputs = [name for name in inputs if data and all(name in b for b in data)]
    if not inputs or copies < 1:
        return []
    rng = np.random.default_rng(seed)
    out = []
    tables = {name: _frequencies([b[name] for b in data]) for name in inputs}
    for _ in range(copies):
        for batch in data:
            new = dict(batch)
            rows = np.shape(batch[inputs[0]])[0] if np.ndim(batch[inputs[0]]) == 2 else 0
            order = None
            if splice and rows > 1:  # tails exchanged between samples after a cut
                length = np.shape(batch[inputs[0]])[1]
                partner = rng.permutation(rows)
                cut = rng.integers(1, max(2, length - 1), size=rows)
                order = (partner, cut)
            for name in inputs:
                ids = np.array(batch[name], copy=True)
                if ids.ndim != 2:
                    continue
                if order is not None:
                    partner, cut = order
                    tail = np.arange(ids.shape[1])[None, :] >= cut[:, None]
                    ids = np.where(tail, ids[partner], ids)
                tokens, probs, special = tables[name]
                if len(tokens):
                    ordinary = ~np.isin(ids, special)
                    hit = ordinary & (rng.random(ids.shape) < rate)
                    ids[hit] = rng.choice(tokens, size=int(hit.sum()), p=probs)
                new[name] = ids.astype(np.asarray(batch[name]).dtype)
            if order is not None:  # the other per-token inputs follow the splice
                partner, cut = order
                for name, value in batch.items():
                    value = np.asarray(value)
                    if name in inputs or value.shape[:2] != (rows, length):
                        continue
                    tail = (np.arange(length)[None, :] >= cut[:, None]).reshape(
                        (rows, length) + (1,) * (value.ndim - 2))
                    new[name] = np.where(tail, value[partner], value)
            out.append(new)
    return out


def _frequencies(batches: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ordinary token ids, their frequencies in the data, the structural ids)."""
    samples = [row for b in batches if np.ndim(b) == 2 for row in np.asarray(b)]
    if not samples:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    present: dict[int, int] = {}
    edges: dict[int, int] = {}
    for row in samples:
        for t in np.unique(row):
            present[int(t)] = present.get(int(t), 0) + 1
        for t in {int(row[0]), int(row[-1])}:
            edges[t] = edges.get(t, 0) + 1
    n = len(samples)
    special = {t for t, c in present.items() if c >= SPECIAL_SHARE * n} | \
        {t for t, c in edges.items() if c >= EDGE_SHARE * n}
    ids, counts = np.unique(np.concatenate(samples), return_counts=True)
    keep = ~np.isin(ids, list(special))
    ids, counts = ids[keep], counts[keep]
    probs = counts / counts.sum() if counts.sum() else counts.astype(float)
    return ids.astype(np.int64), probs, np.asarray(sorted(special), np.int64)
