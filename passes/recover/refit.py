"""Least-squares re-fitting of a compressed model's linear layers to the original's
outputs: training-free recovery, with the original model as the teacher.

For each linear layer of the compressed model (Conv with group 1 or depthwise, Gemm, a
MatMul with a constant weight and an optional constant bias Add after it) whose output
also exists in the original model, from the first changed layer on, in topological order:

* its input X̃ is captured from the **compressed** model, after the layers before it were
  re-fitted (so errors do not pile up), and its target Y from the **original** model
  (restricted to the channels kept, when compression narrowed that output);
* X̃ᵀX̃ and X̃ᵀY are accumulated batch by batch (im2col for convolutions), so memory is
  O(d²) per layer whatever the amount of data;
* W, b = argmin ‖Y − X̃W − b‖² + λ‖W‖², λ = ridge · mean(diag(X̃ᵀX̃)), solved by Cholesky
  in float64; with fewer than 4 rows per column only the bias is corrected
  (b += E[Y − X̃W − b]);
* the numbers are written into the layer's initializers: the graph's structure does not
  change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.capture import activations, as_rows
from graphopt.ir import Model
from graphopt.rewrite import constant_value

MIN_ROWS_PER_COLUMN = 4


@dataclass
class Layer:
    node: gs.Node
    kind: str  # "conv", "depthwise", "gemm", "matmul"
    x: gs.Tensor
    y: gs.Tensor  # the fitted output (a MatMul's bias Add output when it has one)
    weight: gs.Constant
    bias: gs.Constant | None
    bias_node: gs.Node | None = None  # the Add holding a MatMul's bias


def refit(reference: onnx.ModelProto, model: Model, kept: dict, data: list[dict], *,
          ridge: float = 1e-2, layers: set[str] | None = None,
          bias_only: bool = False, scope: str = "downstream") -> dict:
    """Re-fit ``model``'s linear layers (see the module docstring) on ``data``: with
    ``scope="downstream"`` every layer from the first changed one on, with
    ``scope="changed"`` only the layers compression changed (narrowed input or output, a
    new weight shape or input); returns {layer: {rows, columns, error_before,
    error_after, mode}} and the layers skipped with the reason."""
    if scope not in ("downstream", "changed"):
        raise ValueError("scope must be downstream or changed")
    ref_names = {n for node in reference.graph.node for n in node.output} | \
        {o.name for o in reference.graph.output} | {i.name for i in reference.graph.input}
    ref_weights = {t.name: tuple(t.dims) for t in reference.graph.initializer}
    found, skipped = find_layers(model, ref_names)
    report: dict = {}
    started = False
    for layer in found:
        name = layer.node.name or layer.y.name
        if layers is not None and name not in layers:
            continue
        changed = _changed(layer, kept, ref_names, ref_weights)
        if not changed and (not started or scope == "changed"):
            continue  # upstream of every change (already the original's), or not asked
        started = True
        report[name] = _fit(reference, model, layer, kept, data, ridge, bias_only)
    for name, why in skipped.items():
        report.setdefault(name, {"skipped": why})
    return report


def _changed(layer: Layer, kept, ref_names, ref_weights) -> bool:
    w = layer.weight
    return (layer.x.name in kept or layer.y.name in kept or layer.x.name not in ref_names
            or ref_weights.get(w.name) != tuple(w.shape))


def find_layers(model: Model, ref_names: set[str]) -> tuple[list[Layer], dict[str, str]]:
    graph = model.graph
    graph.toposort()
    out, skipped = [], {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            continue
        name = node.name or node.outputs[0].name
        if len(w.outputs) > 1:
            skipped[name] = "weight shared with another node"
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None and (not isinstance(bias, gs.Constant) or len(bias.outputs) > 1):
            skipped[name] = "bias is not a constant of its own"
            continue
        y, bias_node = node.outputs[0], None
        if node.op == "Conv":
            group = int(node.attrs.get("group", 1))
            if group == 1:
                kind = "conv"
            elif w.shape[1] == 1 and group == w.shape[0]:
                kind = "depthwise"
            else:
                skipped[name] = f"grouped Conv (group {group})"
                continue
        elif node.op == "Gemm":
            if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or \
                    node.attrs.get("beta", 1.0) != 1.0 or len(w.shape) != 2:
                skipped[name] = "Gemm with transA, alpha or beta"
                continue
            kind = "gemm"
        else:
            if len(w.shape) != 2:
                skipped[name] = f"MatMul weight of rank {len(w.shape)}"
                continue
            kind = "matmul"
            readers = y.outputs
            if len(readers) == 1 and readers[0].op == "Add" and y not in graph.outputs:
                add = readers[0]
                other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
                if isinstance(other, gs.Constant) and len(other.outputs) == 1 and \
                        other.values.size == w.shape[1] and add.outputs[0].name in ref_names:
                    bias, y, bias_node = other, add.outputs[0], add
        if y.name not in ref_names:
            skipped[name] = "output not in the original model"
            continue
        out.append(Layer(node, kind, node.inputs[0], y, w, bias, bias_node))
    return out, skipped


# ============================================================================ fitting
def _fit(reference, model: Model, layer: Layer, kept, data, ridge, bias_only) -> dict:
    w = np.asarray(layer.weight.values, dtype=np.float64)
    b = np.zeros(_outputs(layer, w)) if layer.bias is None else \
        np.asarray(layer.bias.values, dtype=np.float64).reshape(-1)
    if layer.kind == "depthwise":
        return _fit_depthwise(reference, model, layer, kept, data, ridge, w, b)
    wmat = _as_matrix(layer, w)  # [inputs, outputs]
    with_bias = layer.bias is not None or layer.kind in ("conv", "gemm")
    cols = wmat.shape[0] + int(with_bias)
    gram = np.zeros((cols, cols))
    cross = np.zeros((cols, wmat.shape[1]))
    yy = 0.0
    rows = 0
    for x, y in _pairs(reference, model, layer, kept, data):
        xr = _im2col(x, layer.node) if layer.kind == "conv" else as_rows(x, -1)
        yr = as_rows(y, 1 if layer.kind == "conv" else -1)
        if with_bias:
            xr = np.hstack([xr, np.ones((len(xr), 1))])
        gram += xr.T @ xr
        cross += xr.T @ yr
        yy += float((yr * yr).sum())
        rows += len(xr)
    old = np.vstack([wmat, b[None, :]]) if with_bias else wmat
    before = _error(old, gram, cross, yy)
    mode = "least squares"
    if with_bias and (bias_only or rows < MIN_ROWS_PER_COLUMN * cols):
        mean_x = gram[-1, :] / rows  # [E x, 1]
        residual = cross[-1, :] / rows - mean_x @ old  # E[y] - E[x W + b]
        new = old.copy()
        new[-1, :] += residual
        mode = "bias correction"
    else:
        new = _solve(gram, cross, ridge, with_bias)
    after = _error(new, gram, cross, yy)
    if after > before:  # never make a layer worse on the data it was fitted on
        new, after, mode = old, before, "kept (no improvement)"
    if with_bias:
        _write(layer, new[:-1], new[-1], w.shape)
    else:
        _write(layer, new, None, w.shape)
    return {"rows": rows, "columns": cols, "error_before": round(before, 6),
            "error_after": round(after, 6), "mode": mode}


def _fit_depthwise(reference, model, layer, kept, data, ridge, w, b) -> dict:
    """Per channel: its k×k filter and bias from that channel's patches alone."""
    channels, k = w.shape[0], int(np.prod(w.shape[2:]))
    gram = np.zeros((channels, k + 1, k + 1))
    cross = np.zeros((channels, k + 1))
    yy = np.zeros(channels)
    rows = 0
    for x, y in _pairs(reference, model, layer, kept, data):
        patches = _patches(x, layer.node)  # [rows, C, k]
        patches = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=2)
        yr = as_rows(y, 1)  # [rows, C]
        gram += np.einsum("rci,rcj->cij", patches, patches)
        cross += np.einsum("rci,rc->ci", patches, yr)
        yy += (yr * yr).sum(0)
        rows += len(yr)
    old = np.concatenate([w.reshape(channels, k), b[:, None]], axis=1)
    lam = ridge * np.einsum("cii->c", gram)[:, None, None] / (k + 1)
    new = np.linalg.solve(gram + lam * np.eye(k + 1)[None], cross[..., None])[..., 0]

    def err(p):
        num = yy - 2 * (p * cross).sum(1) + np.einsum("ci,cij,cj->c", p, gram, p)
        return float(np.sqrt(max(num.sum(), 0.0) / max(yy.sum(), 1e-30)))

    before, after = err(old), err(new)
    if after > before:
        new, after = old, before
    layer.weight.values = new[:, :k].reshape(w.shape).astype(np.float32)
    if layer.bias is not None:
        layer.bias.values = new[:, k].reshape(layer.bias.values.shape).astype(np.float32)
    return {"rows": rows, "columns": k + 1, "error_before": round(before, 6),
            "error_after": round(after, 6), "mode": "least squares per channel"}


def _solve(gram: np.ndarray, cross: np.ndarray, ridge: float, with_bias: bool) -> np.ndarray:
    n = gram.shape[0]
    weights = n - int(with_bias)
    lam = ridge * float(np.mean(np.diag(gram)[:weights])) if weights else 0.0
    reg = gram + lam * np.diag(np.r_[np.ones(weights), np.zeros(n - weights)])  # no bias shrink
    try:
        chol = np.linalg.cholesky(reg)
        return np.linalg.solve(chol.T, np.linalg.solve(chol, cross))
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(reg, cross, rcond=None)[0]


def _error(p: np.ndarray, gram: np.ndarray, cross: np.ndarray, yy: float) -> float:
    """‖Y − [X̃ 1]·p‖ / ‖Y‖ from the accumulated statistics."""
    num = yy - 2.0 * float((p * cross).sum()) + float(np.einsum("ij,ik,kj->", p, gram, p))
    return float(np.sqrt(max(num, 0.0) / max(yy, 1e-30)))


# ============================================================================ data
def _pairs(reference, model: Model, layer: Layer, kept, data):
    """(X̃ from the compressed model, Y from the reference) per batch of ``data``."""
    compressed = model.to_onnx()
    targets = activations(reference, [layer.y.name], data)
    inputs = activations(compressed, [layer.x.name], data)
    for got, want in zip(inputs, targets):
        y = want[layer.y.name]
        if layer.y.name in kept:
            axis, idx = kept[layer.y.name]
            y = np.take(y, np.asarray(idx), axis=axis)
        yield got[layer.x.name], y


def _outputs(layer: Layer, w: np.ndarray) -> int:
    if layer.kind in ("conv", "depthwise"):
        return w.shape[0]
    if layer.kind == "gemm" and layer.node.attrs.get("transB", 0):
        return w.shape[0]
    return w.shape[1]


def _as_matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as [inputs, outputs] (im2col column order for convolutions)."""
    if layer.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if layer.kind == "gemm" and layer.node.attrs.get("transB", 0):
        return w.T
    return w


def _write(layer: Layer, wmat: np.ndarray, bias: np.ndarray | None, shape) -> None:
    if layer.kind == "conv":
        value = wmat.T.reshape(shape)
    elif layer.kind == "gemm" and layer.node.attrs.get("transB", 0):
        value = wmat.T
    else:
        value = wmat
    layer.weight.values = np.ascontiguousarray(value, dtype=np.float32)
    if bias is None:
        return
    if layer.bias is not None:
        layer.bias.values = bias.reshape(layer.bias.values.shape).astype(np.float32)
    elif np.any(bias != 0):  # a Conv or Gemm without a bias input gets one
        const = gs.Constant(f"{layer.weight.name}_recovered_bias", bias.astype(np.float32))
        while len(layer.node.inputs) < 3:
            layer.node.inputs.append(gs.Variable.empty())
        layer.node.inputs[2] = const


def _patches(x: np.ndarray, node: gs.Node) -> np.ndarray:
    """[rows, C, kh·kw] sliding patches of NCHW ``x`` for ``node``'s kernel."""
    kernel = list(node.inputs[1].shape[2:])
    dims = len(kernel)
    strides = list(node.attrs.get("strides", [1] * dims))
    dilations = list(node.attrs.get("dilations", [1] * dims))
    pads = list(node.attrs.get("pads", [0] * 2 * dims))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(dims):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        pads = [p[0] for p in pads] + [p[1] for p in pads]
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)]
    xp = np.pad(np.asarray(x, dtype=np.float64), width)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + dims)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]  # [N, C, out..., k...]
    n, c = windows.shape[:2]
    out_axes = tuple(range(2, 2 + dims))
    moved = np.moveaxis(windows, out_axes, tuple(range(1, 1 + dims)))  # [N, out..., C, k...]
    return moved.reshape(-1, c, int(np.prod(kernel)))


def _im2col(x: np.ndarray, node: gs.Node) -> np.ndarray:
    """[rows, C·kh·kw] im2col matrix, columns in the order of W.reshape(Cout, -1)."""
    patches = _patches(x, node)
    return patches.reshape(len(patches), -1)
