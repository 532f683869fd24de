"""Build examples/small_cnn.onnx: a small CNN shaped like a typical TorchScript export.

It has what real exports carry and graphopt's cleanup removes: BatchNorm after each
Conv, a Shape->Gather->Unsqueeze->Concat->Reshape flatten, Identity and Dropout nodes,
Constant nodes, a Cast to the same type, duplicated weights and a dynamic batch.

    python examples/make_example.py            # writes examples/small_cnn.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto, numpy_helper

rng = np.random.default_rng(2024)


def weight(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def batchnorm(prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), f"{prefix}.gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), f"{prefix}.beta"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), f"{prefix}.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), f"{prefix}.var"),
    ]


def build() -> onnx.ModelProto:
    nodes, inits = [], []
    x, channels = "input", 3
    for i, out_ch in enumerate((16, 32, 32)):
        p = f"block{i}"
        inits += [weight(f"{p}.conv.weight", out_ch, channels, 3, 3), *batchnorm(f"{p}.bn", out_ch)]
        nodes += [
            oh.make_node("Conv", [x, f"{p}.conv.weight"], [f"{p}.conv"], pads=[1, 1, 1, 1],
                         strides=[2, 2] if i else [1, 1], name=f"{p}/Conv"),
            oh.make_node("BatchNormalization", [f"{p}.conv", f"{p}.bn.gamma", f"{p}.bn.beta",
                                                f"{p}.bn.mean", f"{p}.bn.var"], [f"{p}.bn"],
                         epsilon=1e-5, name=f"{p}/BatchNormalization"),
            oh.make_node("Relu", [f"{p}.bn"], [f"{p}.relu"], name=f"{p}/Relu"),
            oh.make_node("Identity", [f"{p}.relu"], [f"{p}.out"], name=f"{p}/Identity"),
        ]
        x, channels = f"{p}.out", out_ch
    # Global average pool, then the flatten TorchScript writes: x.view(x.size(0), -1).
    nodes += [
        oh.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
        oh.make_node("Shape", ["pooled"], ["pooled.shape"], name="flatten/Shape"),
        oh.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64)),
                     name="flatten/Constant"),
        oh.make_node("Gather", ["pooled.shape", "zero"], ["batch"], axis=0, name="flatten/Gather"),
        oh.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0], name="flatten/Unsqueeze"),
        oh.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(np.array([-1], np.int64)),
                     name="flatten/Constant_1"),
        oh.make_node("Concat", ["batch1", "minus1"], ["flat.shape"], axis=0, name="flatten/Concat"),
        oh.make_node("Reshape", ["pooled", "flat.shape"], ["flat"], name="flatten/Reshape"),
        oh.make_node("Cast", ["flat"], ["flat.f32"], to=TensorProto.FLOAT, name="flatten/Cast"),
        oh.make_node("Dropout", ["flat.f32"], ["dropped"], ratio=0.1, name="head/Dropout"),
    ]
    # Two heads whose scale vectors are identical copies (as exporters often duplicate).
    scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    inits += [numpy_helper.from_array(scale, "head.scale_a"),
              numpy_helper.from_array(scale.copy(), "head.scale_b"),
              weight("head.weight", 10, channels), weight("head.bias", 10, scale=0.05)]
    nodes += [
        oh.make_node("Mul", ["dropped", "head.scale_a"], ["scaled_a"], name="head/Mul"),
        oh.make_node("Mul", ["dropped", "head.scale_b"], ["scaled_b"], name="head/Mul_1"),
        oh.make_node("Add", ["scaled_a", "scaled_b"], ["scaled"], name="head/Add"),
        oh.make_node("Gemm", ["scaled", "head.weight", "head.bias"], ["logits"], transB=1,
                     name="head/Gemm"),
    ]
    graph = oh.make_graph(
        nodes, "small_cnn",
        [oh.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 11)],
                          producer_name="graphopt-example")
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("small_cnn.onnx")
    onnx.save(build(), out)
    print(f"wrote {out}")
