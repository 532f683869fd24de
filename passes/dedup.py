"""Merging of initializers that hold the same data."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import replace_uses


class MergeDuplicateInitializers(Pass):
    """Make nodes share one initializer where several hold the same type, shape and bytes."""

    name = "merge-duplicate-initializers"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # Graph inputs (overridable defaults) and outputs keep their own tensor and name.
        pinned = {id(t) for g in model.all_graphs() for t in (*g.inputs, *g.outputs)}
        first: dict[tuple, gs.Constant] = {}
        merged = saved = 0
        for const in model.initializers():
            values = np.asarray(const.values)
            if id(const) in pinned or values.dtype == object:
                continue
            key = (values.dtype.str, values.shape,
                   hashlib.sha256(np.ascontiguousarray(values).tobytes()).digest())
            keep = first.setdefault(key, const)
            if keep is not const:
                replace_uses(const, keep)
                merged += 1
                saved += values.nbytes
        return PassResult(changed=merged > 0, stats={"merged": merged, "bytes_saved": saved})
