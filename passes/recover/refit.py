"""Least-squares re-fitting of a compressed model's linear layers to the original's
outputs: training-free recovery, with the original model as the teacher.

For each linear layer of the compressed model (``passes.recover.layers``: Conv with group
1 or depthwise, Gemm, a MatMul with a constant weight and an optional constant bias Add
after it) whose output also exists in the original model, in topological order:

* layers whose input and weights are the original's (at most narrowed along their
  outputs) compute the original's values: they are reported ``unchanged`` and not
  tapped at all;
* the others (``scope="downstream"``: changed by compression or fed by a changed layer;
  ``"changed"``: changed themselves) are fitted in **waves**: a wave is every pending
  layer with no pending layer upstream of it, tapped in one run of the compressed model
  (one ONNX Runtime session over all batches), so each layer's input X̃ is captured after
  the layers before it were re-fitted (propagation: errors do not pile up), while its
  target Y comes from the **original** model (``targets.Teacher``: computed once, then
  kept), narrowed to the channels kept when compression narrowed that output;
* per layer (``fit.Fit``): X̃ᵀX̃ and X̃ᵀY streamed over the batches (im2col for
  convolutions, per channel for depthwise ones), W, b = argmin ‖Y − X̃W − b‖² + λ‖W‖²,
  λ = ridge · mean(diag(X̃ᵀX̃)) (‖W − W₀‖² by default: shrunk towards the compressed
  weights W₀ rather than towards zero), by Cholesky in float64; with fewer than 4 rows per
  unknown, or ``bias_only``, only the bias: b += E[Y − Ŷ]; a fit that would not lower
  the layer's error on the data is not applied; an error already ~0 is ``unchanged``;
* the numbers are written into the layer's own initializers in place: nodes, initializer
  names and shapes stay as they were.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.ir import Model
from graphopt.passes.recover.fit import Fit
from graphopt.passes.recover.layers import Layer, dirty_nodes, find_layers, upstream_nodes
from graphopt.passes.recover.targets import Student, Teacher


def refit(reference: onnx.ModelProto, model: Model, kept: dict, data: list[dict], *,
          ridge: float = 1e-2, layers=None, bias_only: bool = False,
          scope: str = "downstream", prior: str = "current",
          teacher: Teacher | None = None, choose_ridge: bool = False,
          origins: list[int] | None = None) -> dict:
    """Re-fit ``model``'s linear layers in place (see the module docstring) on ``data``
    (feed dicts, one per batch) to ``reference``, the original model.

    ``kept``: tensor name -> (axis, indices into the original tensor) for every tensor
    compression narrowed. ``layers``: only these (node names or output tensor names).
    ``prior``: the ridge shrinks the weights towards the layer's current (compressed)
    ones, "current", or towards zero, "zero" (W = YX̃ᵀ(X̃X̃ᵀ + λI)⁻¹ exactly); with few
    rows per unknown the first stays near what compression left instead of shrinking.
    ``teacher``: the original's activations kept from an earlier call (same reference
    and data; see ``targets.Teacher``). ``choose_ridge``: each layer's ridge strength is
    the one of ``fit.RIDGE_GRID`` whose fit on the other batches predicts one batch in
    ``HOLD_OUT`` best (then all batches are fitted with it); ``ridge`` when there are
    fewer than ``2 * HOLD_OUT`` batches. ``origins``: for each batch of ``data``, the
    index of the real batch it is (its own) or is a variant of (``graphopt.augment``):
    only real batches score the ridge strengths, and variants of a scoring batch are
    left out of the fits scored.

    Returns, in topological order, {layer: {rows, columns, error_before, error_after,
    mode}} (errors: ‖Y − Ŷ‖/‖Y‖ on ``data``; mode "unchanged" for layers that compute
    the original's values, without rows when known without measuring), and
    {layer: {skipped: reason}} for layers that cannot be re-fitted."""
    if scope not in ("downstream", "changed"):
        raise ValueError("scope must be downstream or changed")
    if ridge < 0:
        raise ValueError("ridge must be >= 0")
    if prior not in ("current", "zero"):
        raise ValueError("prior must be current or zero")
    data = list(data)
    if teacher is None or not teacher.serves(reference, data):
        teacher = Teacher(reference, data)
    found, skipped = find_layers(model.graph, teacher.ref.names)
    wanted = None if layers is None else set(layers)
    dirty, changed = dirty_nodes(model.graph, found, kept, teacher.ref)
    report: dict = {}
    pending: list[Layer] = []
    for layer in found:
        if wanted is not None and not {layer.name, layer.y.name} & wanted:
            continue
        if id(layer.node) not in dirty:
            report[layer.name] = {"columns": layer.columns, "error_before": 0.0,
                                  "error_after": 0.0, "mode": "unchanged"}
        elif scope == "downstream" or id(layer.node) in changed:
            report[layer.name] = None  # keeps the topological order of the report
            pending.append(layer)
    for layer in pending:
        layer.upstream = upstream_nodes(layer.x)
    student = Student(teacher.data)
    while pending:
        wave = _wave(pending)
        later = [layer.y.name for layer in pending if layer not in wave]
        for fit in _tap(teacher, student, model, wave, kept, later, choose_ridge, origins):
            report[fit.layer.name] = fit.finish(ridge, bias_only, prior, choose_ridge)
        pending = [layer for layer in pending if layer not in wave]
    for name, why in skipped.items():
        if wanted is None or name in wanted:
            report.setdefault(name, {"skipped": why})
    return report


HOLD_OUT = 5  # one batch in this many scores the ridge strengths (choose_ridge)


def _wave(pending: list[Layer]) -> list[Layer]:
    """The pending layers with no other pending layer upstream of them."""
    ids = {id(n) for layer in pending for n in layer.nodes}
    return [layer for layer in pending
            if not (layer.upstream & ids) - {id(n) for n in layer.nodes}]


def _tap(teacher: Teacher, student: Student, model: Model, wave: list[Layer], kept: dict,
         later: list[str], hold_out: bool = False, origins: list[int] | None = None
         ) -> list[Fit]:
    """One run of the compressed model (inputs) beside the original's values (targets)
    over every batch; ``later``: targets the next waves will want."""
    fits = [Fit(layer) for layer in wave]
    inputs = student.batches(model.to_onnx(), [f.layer.x.name for f in fits])
    targets = teacher.batches([f.layer.y.name for f in fits], prefetch=later)
    origins = list(range(len(teacher.data))) if origins is None else origins
    real = sum(1 for i, o in enumerate(origins) if i == o)
    hold_out = hold_out and real >= 2 * HOLD_OUT
    for i, (want, got) in enumerate(zip(targets, inputs)):
        scores = hold_out and origins[i] % HOLD_OUT == HOLD_OUT // 2
        for fit in fits:
            fit.add(got[fit.layer.x.name], _narrowed(fit.layer, want[fit.layer.y.name], kept),
                    held=scores and origins[i] == i, aside=scores and origins[i] != i)
    return fits


def _narrowed(layer: Layer, y: np.ndarray, kept) -> np.ndarray:
    narrowing = layer.narrowing(kept)
    if narrowing is None:
        return y
    axis, idx = narrowing
    return np.take(y, np.asarray(idx), axis=axis)
