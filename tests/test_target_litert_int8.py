"""Int8 ``.tflite`` files from the ``litert`` target: full-integer int8 from graphopt's
QDQ graphs (``--quantize int8``) and dynamic-range int8 (``--quantize int8-dynamic``),
run in LiteRT's interpreter and compared with ONNX Runtime: on the float original within
the accuracy budget (minimum per-sample cosine), and layer by layer with ONNX Runtime's
evaluation of the same QDQ graph, within one quantization step.

Split from ``test_target_litert`` (the float lowering) to keep each module readable; it
reuses that module's model builders. Skips with the reason where ai-edge-litert is
missing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, version_converter

import graphopt
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.metric import DEFAULT_BUDGET
from graphopt.targets.litert import LiteRtTarget, static_model
from graphopt.targets.tflite_lower import lower_graph
from tests.test_target_litert import EXAMPLE, _model, _ort, depthwise_cnn
from tests.zoo import mlp


@pytest.fixture(scope="module", autouse=True)
def litert():
    missing = LiteRtTarget().availability()
    if missing:
        pytest.skip(missing)


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def _int8_tensors(path) -> dict[str, dict]:
    """The .tflite's int8 tensors by name, with their quantization parameters."""
    return {d["name"]: d for d in _interpreter(path).get_tensor_details()
            if d["dtype"] == np.int8}


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def _qdq_reference(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """ONNX Runtime's evaluation of a QDQ graph as written (DequantizeLinear, float op,
    QuantizeLinear), without its QDQ fusions: the graph's own arithmetic."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ---------------------------------------------------------------------- full-integer
def test_example_cnn_full_integer(tmp_path, monkeypatch):
    """The example CNN at opset 17, --quantize int8: int8 CONV_2D with per-channel
    weights (quantized_dimension 0) and int8 activations between them, the average
    and the head on int8 too (full-integer), float32 I/O; within the budget of ONNX
    Runtime on the float original, close to the QDQ graph. Every layer is taken as
    faster in int8 in LiteRT (which layers are is this machine's: see
    ``test_int8_layers_are_chosen_by_their_times_in_litert``)."""
    from graphopt.targets import litert_layers

    monkeypatch.setattr(litert_layers, "layer_costs", lambda node, *_: (2e-5, 1e-5))
    model = version_converter.convert_version(onnx.load(EXAMPLE), 17)
    out = tmp_path / "int8"
    result = graphopt.optimize(model, target="litert", output=out, quantize="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == {"weights": "int8", "compute": "int8"}
    ops = manifest["operators"]
    assert ops["CONV_2D"] == 3 and manifest["transposes"]["inside"] == 0
    # float only at the input's QUANTIZE and the output's DEQUANTIZE
    assert ops["QUANTIZE"] == 1 and ops["DEQUANTIZE"] == 1 and ops["FULLY_CONNECTED"] == 1
    assert manifest["inputs"][0]["dtype"] == "float32"
    assert result.report["artifact"]["ok"] and \
        result.report["artifact"]["min_cosine"] >= DEFAULT_BUDGET
    tensors = _int8_tensors(out / "model.tflite")
    weights = [d for d in tensors.values() if len(d["shape"]) == 4 and
               len(d["quantization_parameters"]["scales"]) > 1]
    assert len(weights) == 3
    for d in weights:  # OHWI, one scale per output channel, zero points 0
        q = d["quantization_parameters"]
        assert q["quantized_dimension"] == 0 and len(q["scales"]) == d["shape"][0]
        assert not q["zero_points"].any()
    activations = [d for d in tensors.values() if len(d["quantization_parameters"]
                                                        ["scales"]) == 1]
    assert len(activations) >= 4  # the quantized input and the three convolutions' outputs
    x = np.random.default_rng(11).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = LiteRtTarget().run(result.artifact, {"input": x})["logits"]
    assert _cosines(got, _ort(model, {"input": x})[0]).min() >= DEFAULT_BUDGET
    qdq = _qdq_reference(result.model.to_onnx(), {"input": x})
    assert np.abs(got - qdq).max() < 1e-2 * np.abs(qdq).max()
    graphopt.optimize(model, target="litert", output=tmp_path / "float")
    sizes = [(tmp_path / f / "model.tflite").stat().st_size for f in ("int8", "float")]
    assert sizes[0] < 0.5 * sizes[1]


@pytest.mark.parametrize("which", ["depthwise", "mlp"])
def test_full_integer_depthwise_cnn_and_mlp(tmp_path, which):
    """MobileNet-style (depthwise weights quantized along 1HWC's channel axis 3; MaxPool,
    AveragePool, Concat, squeeze-excite between: some float between them) and the MLP
    (int8 FULLY_CONNECTED in and out, the head too: full-integer)."""
    model, shape = (depthwise_cnn(), [4, 3, 24, 24]) if which == "depthwise" \
        else (mlp(), [4, 32])
    out = tmp_path / which
    result = graphopt.optimize(model, target="litert", output=out,
                               input_shapes=None if which == "depthwise" else {"x": shape},
                               passes="quantize-int8(require-speedup=false)")
    manifest = json.loads((out / "manifest.json").read_text())
    ops = manifest["operators"]
    assert manifest["precision"]["compute"] == \
        ("int8 + float32" if which == "depthwise" else "int8")
    tensors = _int8_tensors(out / "model.tflite")
    if which == "depthwise":
        assert ops["DEPTHWISE_CONV_2D"] == 1 and manifest["transposes"]["inside"] == 0
        dw = [d for d in tensors.values() if d["shape"][0] == 1 and len(d["shape"]) == 4
              and len(d["quantization_parameters"]["scales"]) > 1]
        assert len(dw) == 1 and dw[0]["quantization_parameters"]["quantized_dimension"] == 3
    else:
        assert ops == {"QUANTIZE": 1, "FULLY_CONNECTED": 3, "DEQUANTIZE": 1}
        assert len([d for d in tensors.values() if len(d["shape"]) == 2 and
                    len(d["quantization_parameters"]["scales"]) > 1]) == 3
    x = np.random.default_rng(12).standard_normal(shape).astype(np.float32)
    got = LiteRtTarget().run(result.artifact, {"x": x})["y"]
    want = _ort(model, {"x": x})[0]
    assert _cosines(got, want).min() >= DEFAULT_BUDGET and np.abs(got - want).max() > 1e-6


def qdq_conv(group: int, channels: int = 16, size: int = 12,
             seed: int = 0) -> tuple[onnx.ModelProto, float]:
    """Q → DQ → Conv(DQ int8 weights per channel, full range; DQ int32 bias) → Relu → Q
    → DQ, as graphopt's quantize-int8 writes a layer (uint8 activations): (model, the
    output scale). ``group``: 1, ``channels`` (depthwise) or between (grouped)."""
    r = np.random.default_rng(seed)
    w = r.standard_normal((channels, channels // group, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(channels, -1).max(1) / 127).astype(np.float32)
    x_scale = np.float32(4 / 255)
    y_scale = np.float32(0.1 if group == channels else 0.3 / np.sqrt(group))
    bias = r.standard_normal(channels).astype(np.float32)
    inits = {"xs": np.array(x_scale), "xz": np.array(128, np.uint8),
             "wq": np.round(w / w_scale[:, None, None, None]).astype(np.int8),
             "ws": w_scale, "wz": np.zeros(channels, np.int8),
             "bq": np.round(bias / (x_scale * w_scale)).astype(np.int32),
             "bs": (x_scale * w_scale).astype(np.float32),
             "ys": np.array(y_scale), "yz": np.array(0, np.uint8)}
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_in"),
             n("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_in"),
             n("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=0),
             n("DequantizeLinear", ["bq", "bs"], ["bd"], name="dq_b", axis=0),
             n("Conv", ["xd", "wd", "bd"], ["c"], name="conv", pads=[1, 1, 1, 1],
               group=group),
             n("Relu", ["c"], ["r"], name="relu"),
             n("QuantizeLinear", ["r", "ys", "yz"], ["yq"], name="q_out"),
             n("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dq_out")]
    shape = [1, channels, size, size]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                  inits), float(y_scale)


@pytest.mark.parametrize("group", [1, 4, 16])
def test_int8_conv_layer_within_one_step(tmp_path, group):
    """One int8 convolution (plain, grouped: TFLite's native grouped CONV_2D, depthwise)
    in LiteRT against ONNX Runtime's evaluation of the same QDQ graph: within one output
    quantization step on >= 99% of the outputs. (ORT's fused QLinearConv is not the
    reference: on x86 without VNNI it saturates int16 pair sums with full-range weights,
    which is why graphopt writes 7-bit weights for it there.)"""
    model, step = qdq_conv(group)
    lowered = lower_graph(static_model(Model.from_proto(model))[0])
    code = "DEPTHWISE_CONV_2D" if group == 16 else "CONV_2D"
    assert lowered.operators == {"QUANTIZE": 1, code: 1, "DEQUANTIZE": 1, "TRANSPOSE": 2}
    path = tmp_path / "conv.tflite"
    path.write_bytes(lowered.data)
    interpreter = _interpreter(path)
    x = np.random.default_rng(13).uniform(-4, 4, (1, 16, 12, 12)).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    want = _qdq_reference(model, {"x": x})
    steps = np.abs(got - want) / step
    assert (steps <= 1.0 + 1e-3).mean() >= 0.99 and np.count_nonzero(want) > want.size / 4


def test_int8_layers_are_chosen_by_their_times_in_litert(tmp_path, monkeypatch):
    """require-speedup on the litert target asks LiteRT, not the host's cost model: each
    layer alone is lowered and timed there in float and in int8 (a layer reading the
    model input with its QUANTIZE), and one measured slower in int8 stays float, with
    the figures in the report. Timed for real first (the choice is this machine's: only
    that every layer was timed, and the times kept for the next run, is checked), then
    with the stem's int8 made slower."""
    from graphopt.targets import litert_layers

    model = version_converter.convert_version(onnx.load(EXAMPLE), 17)
    shape = {"input": [1, 3, 32, 32]}
    timed = {}
    real = litert_layers.layer_costs

    def recording(node, threads, fingerprint):
        timed[node.name] = real(node, threads, fingerprint)
        return timed[node.name]

    monkeypatch.setattr(litert_layers, "layer_costs", recording)
    graphopt.optimize(model, target="litert", input_shapes=shape, quantize="int8")
    assert sorted(timed) == ["block0/Conv", "block1/Conv", "block2/Conv", "head/Gemm"]
    assert all(len(t) == 2 and 0 < t[0] < 0.01 and 0 < t[1] < 0.01 for t in timed.values())
    # kept for this machine: a later run times nothing and decides alike
    stored = json.loads(litert_layers.store_path(LiteRtTarget().fingerprint()).read_text())
    assert set(timed.values()) <= {tuple(t) for t in stored["layers"].values() if t}
    first, timed = dict(timed), {}
    litert_layers._STORES.clear()
    monkeypatch.setattr(litert_layers, "_timed", None)  # would fail if called
    graphopt.optimize(model, target="litert", input_shapes=shape, quantize="int8")
    assert timed == first

    def stem_slower(node, *_):  # the 3-channel stem slower in int8, the rest faster
        return (1e-5, 3e-5) if node.inputs[0].shape[1] == 3 else (2e-5, 1e-5)

    monkeypatch.setattr(litert_layers, "layer_costs", stem_slower)
    out = tmp_path / "mixed"
    result = graphopt.optimize(model, target="litert", output=out, input_shapes=shape,
                               quantize="int8")
    section = next(e for e in result.report["trace"]
                   if e["pass_name"] == "quantize-int8")["stats"]["compression"]
    assert section["refused"] == {"block0/Conv": (
        "int8 does not pay off on host-cpu at inputs {'input': [1, 3, 32, 32]}: measured "
        "in litert here, the layer alone: 30.00 us int8 vs 10.00 us float")}
    assert {n for n, e in section["sites"].items() if e["changed"]} == \
        {"block1/Conv", "block2/Conv", "head/Gemm"}
    convs = [op for op in _ops(out / "model.tflite") if op[0] == "CONV_2D"]
    assert [dtype for _, dtype in convs] == ["FLOAT32", "INT8", "INT8"]
    assert result.report["artifact"]["min_cosine"] >= DEFAULT_BUDGET


def test_a_phone_s_file_is_chosen_by_its_cost_model_and_not_timed_here(tmp_path,
                                                                     monkeypatch):
    """``--target android-arm64``: the same lowering, verified here in LiteRT, but the
    int8 layers are chosen by the phone's cost model (nothing is timed on this CPU, which
    is not the phone's: NEON with dotprod prices the convolutions int8), and the report
    has no device latency, with the reason."""
    from graphopt.targets import litert_layers

    def not_here(*_):
        raise AssertionError("a phone's layers were timed on this machine")

    monkeypatch.setattr(litert_layers, "layer_costs", not_here)
    model = version_converter.convert_version(onnx.load(EXAMPLE), 17)
    out = tmp_path / "phone"
    result = graphopt.optimize(model, target="android-arm64", output=out,
                               input_shapes={"input": [1, 3, 32, 32]}, quantize="int8")
    assert result.report["device"] == "1x Cortex-A76-class phone core @ 2.4 GHz"
    check = result.report["artifact"]
    assert check["ok"] and check["min_cosine"] >= DEFAULT_BUDGET
    assert check["latency"]["artifact_s"] is None and check["latency"]["ort_s"] > 0
    assert "not on the android-arm64 device" in check["latency"]["note"]
    assert [t for op, t in _ops(out / "model.tflite") if op == "CONV_2D"] == ["INT8"] * 3


def _ops(path) -> list[tuple[str, str]]:
    """(builtin operator, its output's type) of each operator of a ``.tflite``."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    return [(names[max(model.operatorCodes[op.opcodeIndex].builtinCode,
                       model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)],
             types[graph.tensors[op.outputs[0]].type]) for op in graph.operators]


def test_int8_model_io(tmp_path):
    """LiteRtTarget(io_dtype="int8"): the input read only by a QuantizeLinear is an int8
    tensor (no QUANTIZE), the dequantized output the int8 tensor (no DEQUANTIZE), their
    scale and zero point in the manifest; ``run`` still takes and gives float32, equal
    to the float-I/O file's outputs."""
    model, step = qdq_conv(1)
    x = np.random.default_rng(16).uniform(-4, 4, (1, 16, 12, 12)).astype(np.float32)
    got = {}
    for io in ("float32", "int8"):
        result = graphopt.optimize(model, target=LiteRtTarget(io_layout="nhwc", io_dtype=io),
                                   output=tmp_path / io, passes="")
        manifest = json.loads((tmp_path / io / "manifest.json").read_text())
        got[io] = LiteRtTarget().run(result.artifact, {"x": x})["y"]
    assert manifest["operators"] == {"CONV_2D": 1}
    for spec in (manifest["inputs"][0], manifest["outputs"][0]):
        assert spec["dtype"] == "int8" and spec["layout"] == "NHWC"
    assert manifest["inputs"][0]["quantization"] == {"scale": float(np.float32(4 / 255)),
                                                     "zero_point": 0}
    assert manifest["outputs"][0]["quantization"]["zero_point"] == -128
    assert np.abs(got["int8"] - got["float32"]).max() <= step * (1 + 1e-3)
    details = _interpreter(tmp_path / "int8" / "model.tflite").get_input_details()[0]
    assert details["dtype"] == np.int8


def test_quantized_graph_output_refused():
    """A QuantizeLinear writing a graph output (a uint8 model output) is refused, naming
    the op and node; the .tflite's outputs are float32."""
    n = helper.make_node
    model = _model([n("Relu", ["x"], ["r"], name="relu"),
                    n("QuantizeLinear", ["r", "s", "z"], ["y"], name="q_out")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 8])],
                   {"s": np.array(0.1, np.float32), "z": np.array(0, np.uint8)})
    with pytest.raises(UsageError, match="QuantizeLinear.*q_out"):
        lower_graph(static_model(Model.from_proto(model))[0])


# ---------------------------------------------------------------------- dynamic range
def test_dynamic_int8_mlp_at_batch_2_without_options(tmp_path):
    """--quantize int8-dynamic on the MLP at batch 2, no pass options: the host cost
    model (ONNX Runtime's kernels) keeps these layers float, the litert target's
    pass_defaults (LiteRT's dynamic-range kernel measured faster) quantize them."""
    model = mlp()
    out = tmp_path / "dyn"
    result = graphopt.optimize(model, target="litert", output=out,
                               input_shapes={"x": [2, 32]}, quantize="int8-dynamic")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"]["weights"] == "int8"
    assert manifest["operators"] == {"FULLY_CONNECTED": 3}
    x = np.random.default_rng(14).standard_normal((2, 32)).astype(np.float32)
    got = LiteRtTarget().run(result.artifact, {"x": x})["y"]
    want = _ort(model, {"x": x})[0]
    assert _cosines(got, want).min() >= DEFAULT_BUDGET and np.abs(got - want).max() > 1e-6
    assert 0 < len(_int8_tensors(out / "model.tflite")) <= 3  # weights only
