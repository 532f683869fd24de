"""Input-shape binding shared by compiled targets (``Target.prepare``): ``--input-shape``
fixes an input's shape, and every symbolic dimension it binds becomes that number
throughout the graph, so the pipeline folds the shape arithmetic."""

from __future__ import annotations

from graphopt.errors import UsageError
from graphopt.ir import Model


def bind_input_shapes(model: Model, input_shapes: dict[str, list[int]] | None) -> dict[str, int]:
    """Fix the shapes of the inputs named in ``input_shapes`` in ``model`` (in place) and
    substitute the symbolic dimensions they bind in every tensor of every graph. Returns
    the bindings ``{dim_param: size}``. Unknown input names are left to the probe-input
    code to report; a rank or a static size that disagrees with the model, or one
    symbolic dimension given two sizes, is a UsageError."""
    if not input_shapes:
        return {}
    bindings: dict[str, int] = {}
    inputs = {t.name: t for t in model.graph.inputs}
    for name, dims in input_shapes.items():
        tensor = inputs.get(name)
        if tensor is None:
            continue
        if tensor.shape is not None and len(tensor.shape) != len(dims):
            raise UsageError(f"--input-shape gives {name!r} {len(dims)} dimensions; the "
                             f"model has {len(tensor.shape)}: {list(tensor.shape)}")
        for old, new in zip(tensor.shape or [], dims):
            if isinstance(old, str) and old:
                if bindings.setdefault(old, int(new)) != int(new):
                    raise UsageError(f"--input-shape gives dimension {old!r} two sizes: "
                                     f"{bindings[old]} and {new}")
            elif isinstance(old, int) and old > 0 and old != new:
                raise UsageError(f"--input-shape gives {name!r} {list(dims)}; the model "
                                 f"fixes it to {list(tensor.shape)}")
        tensor.shape = [int(d) for d in dims]
    for graph in model.all_graphs():
        for tensor in graph.tensors().values():
            shape = getattr(tensor, "shape", None)
            if shape and any(isinstance(d, str) and d in bindings for d in shape):
                tensor.shape = [bindings.get(d, d) if isinstance(d, str) else d
                                for d in shape]
    return bindings
