"""Constant Reshape targets from inferred shapes.

Exporters compute Reshape targets at run time (``x.view(x.size(0), -1)`` becomes
Shape→Gather→Unsqueeze→Concat→Reshape) even when shape inference already knows the
result. When the output shape is known up to dimensions that either copy the input's
dimension at the same position (Reshape's ``0``) or are the single one left to infer
(``-1``), the computed target is replaced by a constant and the shape arithmetic dies.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import ModelError
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import constant_value, make_constant, tensor_names, walk


def constant_target(node: gs.Node) -> np.ndarray | None:
    """The constant shape equivalent to ``node``'s computed target, or ``None``."""
    data, out = node.inputs[0], node.outputs[0]
    if data.shape is None or out.shape is None:
        return None
    copy_allowed = not node.attrs.get("allowzero", 0)  # with allowzero, 0 means 0
    target = []
    for i, dim in enumerate(out.shape):
        if isinstance(dim, int) and dim > 0:
            target.append(dim)
        elif copy_allowed and isinstance(dim, str) and i < len(data.shape) \
                and data.shape[i] == dim:
            target.append(0)  # copy the input's dimension at the same position
        elif isinstance(dim, int) and dim == 0:
            return None  # an empty dimension: 0 would mean "copy", keep the original
        else:
            target.append(-1)
    if target.count(-1) > 1:
        return None
    return np.array(target, dtype=np.int64)


class FoldReshapeTargets(Pass):
    """Replace Reshape targets computed at run time by constants from inferred shapes."""

    name = "fold-reshape-targets"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        computed = [(graph, node) for graph, node in walk(model.all_graphs())
                    if node.op == "Reshape" and constant_value(node.inputs[1]) is None]
        if not computed:
            return PassResult(changed=False)
        taken = tensor_names(model.all_graphs())

        def fold(reshapes, settled) -> list:
            """Those of ``reshapes`` whose target ``settled`` does not accept."""
            left = []
            for graph, node in reshapes:
                target = constant_target(node)
                if target is None or not settled(node, target):
                    left.append((graph, node))
                    continue
                node.inputs[1] = make_constant(graph, f"{node.outputs[0].name}_shape",
                                               target, taken=taken)
            return left

        # The shapes the model has (ONNX's inference) settle most targets; symbolic
        # inference (tens of milliseconds even on a small model) runs only for the rest,
        # and for a -1 whose size it may know (the head count of a split of heads, which
        # head pruning rewrites). A -1 in place of a dimension the inputs name (a
        # dynamic batch that allowzero keeps from being copied as 0) stays one.
        named = {d for t in model.graph.inputs for d in (t.shape or ()) if isinstance(d, str)}
        left = fold(computed, lambda node, target: _dynamic_or_none(node, target, named))
        stats = {}
        if left:
            try:
                model.infer_shapes(symbolic=True)
                left = fold(left, lambda node, target: True)
            except ModelError as exc:
                stats["skipped"] = str(exc)
        folded = len(computed) - len(left)
        return PassResult(changed=folded > 0, stats={"targets_folded": folded, **stats})


def _dynamic_or_none(node: gs.Node, target: np.ndarray, named: set[str]) -> bool:
    """Whether ``target`` has no -1, or its -1 stands for a dimension of ``node``'s
    output that the model's inputs name (dynamic: no inference makes it a number)."""
    unknown = np.flatnonzero(target == -1)
    return not unknown.size or node.outputs[0].shape[unknown[0]] in named
