"""Convolution as a matrix product: the sliding patches a Conv node multiplies its
weight with (pads, auto_pad, strides, dilations, any number of spatial axes)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def conv_pads(node: gs.Node, spatial: tuple[int, ...]) -> list[int]:
    """The node's pads [begin..., end...] for an input of spatial shape ``spatial``."""
    kernel = list(node.inputs[1].shape[2:])
    dims = len(kernel)
    strides = list(node.attrs.get("strides", [1] * dims))
    dilations = list(node.attrs.get("dilations", [1] * dims))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(dims):
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                        - spatial[i], 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * 2 * dims
    return list(node.attrs.get("pads", [0] * 2 * dims))


def patches(x: np.ndarray, node: gs.Node) -> np.ndarray:
    """[rows, C, prod(kernel)] sliding patches of N C spatial... ``x`` for the Conv
    ``node``; rows run over (batch, output positions) in the order of the Conv's output
    with the channel axis moved last."""
    kernel = list(node.inputs[1].shape[2:])
    dims = len(kernel)
    strides = list(node.attrs.get("strides", [1] * dims))
    dilations = list(node.attrs.get("dilations", [1] * dims))
    pads = conv_pads(node, tuple(x.shape[2:]))
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)]
    xp = np.pad(np.asarray(x, dtype=np.float64), width)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + dims)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]  # [N, C, out..., k...]
    c = windows.shape[1]
    moved = np.moveaxis(windows, tuple(range(2, 2 + dims)), tuple(range(1, 1 + dims)))
    return moved.reshape(-1, c, int(np.prod(kernel)))  # [N·out..., C, k]


def im2col(x: np.ndarray, node: gs.Node) -> np.ndarray:
    """[rows, C·prod(kernel)] matrix whose columns follow ``W.reshape(Cout, -1)``, so
    ``im2col(x) @ W.reshape(Cout, -1).T`` is the Conv's output as [rows, Cout]."""
    p = patches(x, node)
    return p.reshape(len(p), -1)
