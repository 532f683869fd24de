"""Merging of initializers that hold the same data."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.external_data import constant_digest
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import replace_uses

PREFIX_BYTES = 4096


class MergeDuplicateInitializers(Pass):
    """Make nodes share one initializer where several hold the same type, shape and bytes.

    Only constants that share a type and shape with another are hashed, and only those
    whose first bytes are equal too are hashed whole (a model's weights of one shape
    rarely share a prefix); weights still in their external-data file are hashed from
    the file (cached), never mapped."""

    name = "merge-duplicate-initializers"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # Graph inputs (overridable defaults) and outputs keep their own tensor and name.
        pinned = {id(t) for g in model.all_graphs() for t in (*g.inputs, *g.outputs)}
        groups: dict[tuple, list[gs.Constant]] = defaultdict(list)
        for const in model.initializers():
            if id(const) not in pinned and _dtype(const) != np.dtype(object):
                groups[(str(_dtype(const)), tuple(const.shape))].append(const)
        merged = saved = 0
        for (dtype, shape), consts in groups.items():
            for same_start in _split(consts, PREFIX_BYTES):
                first: dict[bytes, gs.Constant] = {}
                for const in same_start:
                    keep = first.setdefault(constant_digest(const), const)
                    if keep is not const:
                        replace_uses(const, keep)
                        merged += 1
                        saved += int(np.prod(shape, dtype=np.int64)) * _dtype(const).itemsize
        return PassResult(changed=merged > 0, stats={"merged": merged, "bytes_saved": saved})


def _split(consts: list[gs.Constant], prefix: int) -> list[list[gs.Constant]]:
    """``consts`` (of one type and shape) in groups of two or more whose first ``prefix``
    bytes are equal, in their order."""
    if len(consts) < 2:
        return []
    groups: dict[bytes, list[gs.Constant]] = defaultdict(list)
    for const in consts:
        groups[constant_digest(const, prefix)].append(const)
    return [group for group in groups.values() if len(group) > 1]


def _dtype(const: gs.Constant) -> np.dtype:
    """The constant's numpy type (as its values would load), without loading them."""
    try:
        return np.dtype(const.dtype)
    except TypeError:
        return np.asarray(const.values).dtype
