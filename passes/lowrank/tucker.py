"""Low-rank convolutions: Tucker-2 (Kim et al. 2016) and spatially separable k×1 + 1×k.

Tucker-2 of a Conv weight W [Cout, Cin, k...] over its two channel modes:

    W ≈ G ×₀ U_out ×₁ U_in      G [r2, r1, k...], U_out [Cout, r2], U_in [Cin, r1]

becomes three convolutions: 1×1 (Cin → r1, weight U_inᵀ), the k×k core (r1 → r2, weight
G, the original's strides, pads, dilations), 1×1 (r2 → Cout, weight U_out, the bias).
The factors are the leading singular vectors of the mode-0 and mode-1 unfoldings (HOSVD),
refined by a few HOOI sweeps (alternating: each factor the best for the other).

Data-aware variant: with the input's channel Gram XᵀX/n + λI = S·Sᵀ, the output error of
a change ΔW is Σ_taps ‖ΔW_tap·S‖²_F (inputs at different taps taken as uncorrelated), so
the decomposition runs on W̃ = W ×₁ Sᵀ and the first 1×1 becomes (S⁻ᵀ·U_in)ᵀ.

Spatially separable: W[o, c, i, j] ≈ Σ_ρ H[o, ρ, j]·V[ρ, c, i], the SVD of W rearranged
as a (Cin·kh) × (Cout·kw) matrix: a kh×1 conv (Cin → r, the vertical stride/pad/dilation)
then a 1×kw conv (r → Cout, the horizontal ones, the bias). Both are exact at full rank.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.rewrite import unique_name

HOOI_SWEEPS = 2


def _leading(m: np.ndarray, r: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(m, full_matrices=False)
    return u[:, :r]


def _unfold(t: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def tucker2(w: np.ndarray, r_in: int, r_out: int, s: np.ndarray | None = None,
            sweeps: int = HOOI_SWEEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first [r1, Cin, 1...], core [r2, r1, k...], last [Cout, r2, 1...]) float64 whose
    three convolutions approximate ``w`` [Cout, Cin, k...]; ``s`` (lower triangular
    Cin×Cin, ``svd.whitening`` of the input's channel Gram) makes it data-aware."""
    from scipy.linalg import solve_triangular  # here: scipy.linalg takes 0.2 s to import

    w = np.asarray(w, dtype=np.float64)
    cout, cin = w.shape[:2]
    r_in, r_out = int(min(max(r_in, 1), cin)), int(min(max(r_out, 1), cout))
    wt = w if s is None else np.einsum("oc...,cd->od...", w, s)  # W ×₁ Sᵀ
    u_out = _leading(_unfold(wt, 0), r_out)
    u_in = _leading(_unfold(wt, 1), r_in)
    for _ in range(sweeps if (r_in < cin or r_out < cout) else 0):
        u_out = _leading(_unfold(np.einsum("oc...,cr->or...", wt, u_in), 0), r_out)
        u_in = _leading(_unfold(np.einsum("oc...,or->rc...", wt, u_out), 1), r_in)
    core = np.einsum("oc...,or,cs->rs...", wt, u_out, u_in)
    first = u_in if s is None else solve_triangular(s, u_in, trans="T", lower=True)
    ones = (1,) * (w.ndim - 2)
    return (first.T.reshape(r_in, cin, *ones), core, u_out.reshape(cout, r_out, *ones))


def spatial(w: np.ndarray, rank: int, s: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(vertical [r, Cin, kh, 1], horizontal [Cout, r, 1, kw]) float64 approximating the
    2-D conv weight ``w`` [Cout, Cin, kh, kw] (whitened by ``s`` as in ``tucker2``)."""
    from scipy.linalg import solve_triangular  # here: scipy.linalg takes 0.2 s to import

    w = np.asarray(w, dtype=np.float64)
    cout, cin, kh, kw = w.shape
    wt = w if s is None else np.einsum("ocij,cd->odij", w, s)
    m = wt.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)
    u, sigma, vt = np.linalg.svd(m, full_matrices=False)
    r = int(min(max(rank, 1), len(sigma)))
    root = np.sqrt(sigma[:r])
    p = (u[:, :r] * root).reshape(cin, kh, r)  # [(c, i), ρ]
    if s is not None:  # back from the whitened input space: rows c by S⁻ᵀ
        p = solve_triangular(s, p.reshape(cin, kh * r), trans="T", lower=True
                             ).reshape(cin, kh, r)
    vertical = p.transpose(2, 0, 1)[..., None]
    horizontal = (root[:, None] * vt[:r]).reshape(r, cout, kw).transpose(1, 0, 2)[:, :, None]
    return vertical, horizontal


def spatial_full_rank(w_shape) -> int:
    cout, cin, kh, kw = w_shape
    return min(cin * kh, cout * kw)


def tucker_params(cin: int, cout: int, taps: int, r_in: int, r_out: int) -> int:
    return cin * r_in + r_in * r_out * taps + r_out * cout


def conv_refusal(node: gs.Node, shape: tuple[int, ...], mode: str) -> str | None:
    """Why Conv ``node`` with a constant weight of ``shape`` cannot be decomposed
    (``mode`` "tucker" or "spatial"), or None."""
    group = int(node.attrs.get("group", 1))
    if group != 1:
        kind = "depthwise" if shape[1] == 1 and group == shape[0] else "grouped"
        return f"{kind} Conv (group {group}): its channels are not mixed by one matrix"
    if len(shape) < 3 or all(k == 1 for k in shape[2:]):
        return "1x1 Conv: a plain matrix over channels, nothing spatial to factor"
    if mode == "spatial":
        if len(shape) != 4:
            return f"spatial separation needs a 2-D Conv, not {len(shape) - 2}-D"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return f"auto_pad {node.attrs['auto_pad']}: cannot split the padding"
        if 1 in shape[2:]:
            return "kernel already separable (k×1 or 1×k)"
    return None


def relative_error(w: np.ndarray, approx: np.ndarray, s: np.ndarray | None) -> float:
    """‖(W − W') ×₁ Sᵀ‖ / ‖W ×₁ Sᵀ‖: the relative output error the whitened objective
    measures (the weight's relative Frobenius error without ``s``)."""
    d = np.asarray(w, dtype=np.float64) - approx
    w = np.asarray(w, dtype=np.float64)
    if s is not None:
        d, w = np.einsum("oc...,cd->od...", d, s), np.einsum("oc...,cd->od...", w, s)
    den = float(np.linalg.norm(w))
    return float(np.linalg.norm(d) / den) if den else 0.0


def tucker_product(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The Conv weight the three convolutions of ``tucker2`` compute."""
    lead = first.shape[:2]
    return np.einsum("rs...,or,sc->oc...", core, last.reshape(last.shape[:2]),
                     first.reshape(lead))


def spatial_product(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The Conv weight the two convolutions of ``spatial`` compute."""
    return np.einsum("rci,orj->ocij", vertical[..., 0], horizontal[:, :, 0])


def _dtype(w: gs.Tensor):
    return np.asarray(w.values).dtype if isinstance(w, gs.Constant) else np.dtype(w.dtype)


def _node(graph, op, name, inputs, outputs, attrs):
    n = gs.Node(op, name=name, inputs=inputs, outputs=outputs, attrs=attrs)
    graph.nodes.append(n)
    return n


def _as_pointwise(node: gs.Node, dims: int) -> None:
    for key in ("pads", "strides", "dilations", "auto_pad"):
        node.attrs.pop(key, None)
    node.attrs["kernel_shape"] = [1] * dims
    node.attrs["group"] = 1


def _mid(taken, base: gs.Tensor, like: gs.Tensor, channels: int, dtype) -> gs.Variable:
    shape = None if like.shape is None else [like.shape[0], channels, *like.shape[2:]]
    return gs.Variable(unique_name(taken, f"{base.name}_lowrank"),
                       dtype=like.dtype if like.dtype is not None else dtype, shape=shape)


def decompose_tucker(graph: gs.Graph, node: gs.Node, first: np.ndarray, core: np.ndarray,
                     last: np.ndarray, taken: set[str], node_names: set[str]) -> list[gs.Node]:
    """Rewrite Conv ``node`` as 1×1 → core → 1×1; the last 1×1 is ``node`` itself (name,
    output tensor, bias kept). Returns the two new nodes."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    dtype = _dtype(w)
    dims = len(w.shape) - 2
    hint = w.name or node.name
    c_first = gs.Constant(unique_name(taken, f"{hint}_tucker_in"),
                          np.ascontiguousarray(first.astype(dtype)))
    c_core = gs.Constant(unique_name(taken, f"{hint}_tucker_core"),
                         np.ascontiguousarray(core.astype(dtype)))
    c_last = gs.Constant(unique_name(taken, f"{hint}_tucker_out"),
                         np.ascontiguousarray(last.astype(dtype)))
    m1 = _mid(taken, y, x, first.shape[0], dtype)
    m2 = _mid(taken, y, y, core.shape[0], dtype)
    base = node.name or "conv"
    n1 = _node(graph, "Conv", unique_name(node_names, f"{base}_tucker_in"), [x, c_first], [m1],
               {"kernel_shape": [1] * dims, "group": 1})
    core_attrs = {k: v for k, v in node.attrs.items()}
    core_attrs["kernel_shape"] = list(core.shape[2:])
    n2 = _node(graph, "Conv", unique_name(node_names, f"{base}_tucker_core"), [m1, c_core],
               [m2], core_attrs)
    _as_pointwise(node, dims)
    node.inputs[0] = m2
    node.inputs[1] = c_last
    return [n1, n2]


def decompose_spatial(graph: gs.Graph, node: gs.Node, vertical: np.ndarray,
                      horizontal: np.ndarray, taken: set[str], node_names: set[str]
                      ) -> list[gs.Node]:
    """Rewrite 2-D Conv ``node`` as kh×1 → 1×kw; the second is ``node`` itself (name,
    output, bias kept). Returns the new node."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    dtype = _dtype(w)
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    strides = list(node.attrs.get("strides", [1, 1]))
    dil = list(node.attrs.get("dilations", [1, 1]))
    hint = w.name or node.name
    cv = gs.Constant(unique_name(taken, f"{hint}_vertical"),
                     np.ascontiguousarray(vertical.astype(dtype)))
    ch = gs.Constant(unique_name(taken, f"{hint}_horizontal"),
                     np.ascontiguousarray(horizontal.astype(dtype)))
    shape = None  # rows already strided and padded, columns as the input's
    if y.shape is not None and x.shape is not None:
        shape = [x.shape[0], vertical.shape[0], y.shape[2], x.shape[3]]
    mid = gs.Variable(unique_name(taken, f"{y.name}_lowrank"),
                      dtype=x.dtype if x.dtype is not None else dtype, shape=shape)
    attrs = {"kernel_shape": [vertical.shape[2], 1], "group": 1, "strides": [strides[0], 1],
             "dilations": [dil[0], 1], "pads": [pads[0], 0, pads[2], 0]}
    first = _node(graph, "Conv", unique_name(node_names, f"{node.name or 'conv'}_vertical"),
                  [x, cv], [mid], attrs)
    node.attrs.update({"kernel_shape": [1, horizontal.shape[3]], "group": 1,
                       "strides": [1, strides[1]], "dilations": [1, dil[1]],
                       "pads": [0, pads[1], 0, pads[3]]})
    node.attrs.pop("auto_pad", None)
    node.inputs[0] = mid
    node.inputs[1] = ch
    return [first]
