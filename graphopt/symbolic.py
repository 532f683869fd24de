"""ONNX Runtime's symbolic shape inference, for graphs ONNX's own inference leaves
partly unknown (contrib ops such as Attention, symbolic dimensions to merge)."""

from __future__ import annotations

from functools import cache

import onnx

from graphopt.errors import ModelError
from graphopt.external_data import all_graphs as _all_graphs
from graphopt.ort_tools import ort_tool


@cache
def _engine_class():
    """``SymbolicShapeInference`` from ``onnxruntime/tools/symbolic_shape_infer.py``
    (without the torch import of that package's ``__init__``: ``graphopt.ort_tools``)."""
    return ort_tool("symbolic_shape_infer").SymbolicShapeInference


def shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference (merges equal symbolic dimensions).

    Runs the engine's loop directly rather than ``SymbolicShapeInference.infer_shapes``:
    that entry point raises on a partial result and, before raising, writes the model
    into the current directory. A partial result is still useful here.
    """
    engine = _engine_class()(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False,
                             verbose=0)
    try:
        engine._preprocess(_constants_as_tensors(proto))
        while engine.run_:
            engine._infer_impl()
        engine._update_output_from_vi()
    except Exception as exc:  # it raises bare Exceptions on ops it cannot follow
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelError(f"symbolic shape inference failed: {first}") from exc
    return engine.out_mp_


def _constants_as_tensors(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose Constant nodes hold ``value`` tensors: ORT's symbolic inference does
    not read ``value_int``/``value_float``/``value_ints``/``value_floats`` (dynamo exports
    use them)."""
    forms = {"value_int": (onnx.TensorProto.INT64, False),
             "value_ints": (onnx.TensorProto.INT64, True),
             "value_float": (onnx.TensorProto.FLOAT, False),
             "value_floats": (onnx.TensorProto.FLOAT, True)}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for graph in _all_graphs(copy.graph):
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in list(node.attribute):
                if attr.name in forms:
                    dtype, is_list = forms[attr.name]
                    value = onnx.helper.get_attribute_value(attr)
                    tensor = onnx.helper.make_tensor(
                        "value", dtype, [len(value)] if is_list else [],
                        value if is_list else [value])
                    node.attribute.remove(attr)
                    node.attribute.append(onnx.helper.make_attribute("value", tensor))
    return copy
