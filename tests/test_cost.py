"""The analytic cost model and `graphopt inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.analysis import summarize
from graphopt.cost import AnalyticCostModel, Device
from graphopt.runtime_rules import layout_reorders
from graphopt.targets.ort import host_device

DEVICE = Device("test", peak_flops={"float32": 1e12}, bandwidth=1e10, node_overhead_s=0.0)


def conv_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "fc")]
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("GlobalAveragePool", ["r"], ["p"]),
             oh.make_node("Flatten", ["p"], ["f"]),
             oh.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_flops_and_params_match_hand_counts():
    summary = summarize(graphopt.load(conv_matmul_model()), DEVICE)
    conv = 2 * 16 * 32 * 32 * (3 * 3 * 3)
    relu = 16 * 32 * 32
    pool = 16 * 32 * 32
    matmul = 2 * 10 * 16
    flatten = 16
    assert summary.flops == conv + relu + pool + flatten + matmul
    assert summary.params == 16 * 3 * 3 * 3 + 16 * 10
    assert summary.weight_bytes == 4 * summary.params
    assert summary.ops == {"Conv": 1, "Flatten": 1, "GlobalAveragePool": 1, "MatMul": 1, "Relu": 1}
    latencies = [n.latency_s for n in summary.heaviest]
    assert latencies == sorted(latencies, reverse=True)


def test_peak_activation_memory_follows_liveness():
    # x -> Relu -> a -> Relu -> b -> Relu -> y, 1000 floats each: at most two live at once,
    # except that graph inputs live from the start.
    nodes = [oh.make_node("Relu", ["x"], ["a"]), oh.make_node("Relu", ["a"], ["b"]),
             oh.make_node("Relu", ["b"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1000])])
    model = graphopt.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    assert summarize(model, DEVICE).peak_activation_bytes == 2 * 4000


def test_roofline_latency_is_compute_or_memory_bound():
    cost = AnalyticCostModel().estimate(graphopt.load(conv_matmul_model()), DEVICE)
    conv, relu = cost.nodes[0], cost.nodes[1]
    # Conv: 1.77 MFLOP at 60% of 1 TFLOP/s = 2.9 µs; bytes 12 KiB+1.7 KiB+64 KiB at 10 GB/s = 8 µs
    assert conv.latency_s == pytest.approx(max(conv.flops / (1e12 * 0.6), conv.bytes / 1e10))
    assert relu.latency_s == pytest.approx(relu.bytes / 1e10)  # elementwise: memory bound
    assert relu.bytes == 2 * 16 * 32 * 32 * 4
    assert cost.latency_s == pytest.approx(sum(n.latency_s for n in cost.nodes))


def test_dynamic_dims_count_as_one():
    model = conv_matmul_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    fixed = summarize(graphopt.load(conv_matmul_model()), DEVICE)
    dynamic = summarize(graphopt.load(model), DEVICE)
    assert dynamic.flops == fixed.flops


def test_inspect_cli_json(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_matmul_model(), path)
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(path), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["params"] == 16 * 3 * 3 * 3 + 16 * 10
    # (where ONNX Runtime runs convolutions in its blocked layout, the pooled tensor is
    # reordered out of it for the Flatten: the estimate counts that too)
    reordered = {"ReorderOutput"} if host_device().blocked_layout else set()
    assert {n["op_type"] for n in data["heaviest_nodes"]} == {
        "Conv", "Relu", "GlobalAveragePool", "Flatten", "MatMul"} | reordered
    assert data["estimated_latency_s"] > 0 and data["peak_activation_bytes"] > 0
    text = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(path)],
                          capture_output=True, text=True)
    assert text.returncode == 0 and "GlobalAveragePool" in text.stdout


def test_sub_byte_weights_count_packed_bytes():
    """An int4 weight of 33 values is 17 bytes in the file, not 33."""
    w = oh.make_tensor("w", TensorProto.INT4, [33], [1, -2, 3] * 11)
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    graph = oh.make_graph([oh.make_node("DequantizeLinear", ["w", "s"], ["y"])], "g", [],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [33])], [w, s])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    summary = summarize(graphopt.load(model), DEVICE)
    assert summary.weight_bytes == 17 + 4


def test_an_embedding_lookup_reads_its_rows_not_the_table():
    """A Gather of 8 tokens from a 30,000 x 384 table moves the 8 rows it reads (and the
    indices and its output), not the table's 46 MB: ONNX Runtime ran MiniLM's embedding
    lookups in 0.06 ms where the whole table predicted 1.7 ms."""
    table = numpy_helper.from_array(np.zeros((30000, 384), np.float32), "table")
    graph = oh.make_graph([oh.make_node("Gather", ["table", "ids"], ["y"])], "g",
                          [oh.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 384])],
                          [table])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    node = AnalyticCostModel().estimate(graphopt.load(model), DEVICE).nodes[0]
    rows = 8 * 384 * 4
    assert node.bytes == rows + 8 * 8 + rows
    # a gather that reads more than its table (indices repeat) reads the table at most
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 100000
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 100000
    node = AnalyticCostModel().estimate(graphopt.load(model), DEVICE).nodes[0]
    assert node.bytes == 30000 * 384 * 4 + 100000 * 8 + 100000 * 384 * 4


@pytest.mark.parametrize("channels,block,fused", [(16, 16, True), (16, 8, True),
                                                  (12, 8, False), (24, 16, False)])
def test_a_residual_add_and_relu_after_a_conv_run_inside_it(channels, block, fused):
    """relu(conv(x) + skip): ONNX Runtime's NCHWc convolution adds the skip and applies
    the Relu itself (profiled on the ResNet-style CNN: no Add or Relu kernel ran), so
    they cost nothing, where the conv's channels fit the device's channel block; a
    conv NCHWc does not take leaves them their own cost."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3))
                                .astype(np.float32), "w")
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["c", "x"], ["a"]), oh.make_node("Relu", ["a"], ["y"])]
    shape = [4, channels, 16, 16]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    device = Device("test", peak_flops={"float32": 1e12}, bandwidth=1e10,
                    node_overhead_s=1e-6, channel_multiple=block)
    costs = {n.op_type: n.latency_s for n in
             AnalyticCostModel().estimate(graphopt.load(model), device).nodes}
    assert costs["Conv"] > 0
    if fused:
        assert costs["Add"] == costs["Relu"] == 0.0
    else:  # two reads and a write of [4, C, 16, 16] floats at 10 GB/s, plus the overhead
        assert costs["Add"] == pytest.approx(3 * 4 * channels * 256 * 4 / 1e10 + 1e-6)
        assert costs["Relu"] > 1e-6


@pytest.mark.parametrize("c_in,c_out,group,block,kind", [
    (16, 16, 1, 16, "spatial"),  # a pruned layer whose channels fit the block: blocked
    (8, 16, 1, 16, "spatial"),  # fewer input channels than the block: read as they are
    (8, 8, 1, 16, "narrow"), (12, 12, 1, 16, "narrow"), (24, 24, 1, 16, "narrow"),
    (8, 8, 1, 8, "spatial"), (24, 24, 1, 8, "spatial"), (12, 16, 1, 8, "narrow"),
    (3, 16, 1, 16, "stem"), (32, 32, 1, 16, "spatial"),
    (32, 32, 32, 16, "depthwise"), (16, 16, 1, None, "narrow"), (24, 24, 1, None, "spatial")])
def test_convolutions_a_blocked_kernel_cannot_take_are_their_own_class(c_in, c_out, group,
                                                                       block, kind):
    """The calibration's conv classes follow what the device's kernels do: ONNX Runtime
    pads channels that do not fit its channel block (NCHWc; 16 with AVX-512), and
    those layers run far slower (measured: 16-channel 3x3 layers at 0.43-0.50 of their
    roofline, 8- and 12-channel ones at 1.1-2.3). Without a device, at most 16 input
    channels is narrow."""
    from graphopt.cost import op_key

    weight = (c_out, c_in // group, 3, 3)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal(weight).astype(np.float32), "w")
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=group)], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 8, 8])], [w])
    node = graphopt.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    node = node.graph.nodes[0]
    device = None if block is None else Device(
        "test", peak_flops={"float32": 1e12}, bandwidth=1e10, channel_multiple=block)
    assert op_key(node, device) == ("conv", "float32", kind)


def test_an_attention_node_s_width_is_its_head_size():
    """Attention runs further from peak with small heads (BERT-tiny's 16: about 0.9 of
    its roofline, BERT's 64: 0.4), so the calibration interpolates by head size."""
    from graphopt.cost import op_width

    rng = np.random.default_rng(0)
    for hidden, heads, size in ((64, 4, 16), (384, 12, 32), (768, 12, 64)):
        w = numpy_helper.from_array(rng.standard_normal((hidden, 3 * hidden))
                                    .astype(np.float32), "w")
        b = numpy_helper.from_array(np.zeros(3 * hidden, np.float32), "b")
        graph = oh.make_graph(
            [oh.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft",
                          num_heads=heads)], "g",
            [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, hidden])],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, hidden])], [w, b])
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17),
                                                    oh.make_opsetid("com.microsoft", 1)])
        assert op_width(graphopt.load(model).graph.nodes[0]) == size


def _conv_between(middle, inits=(), channels=16, ms=False) -> onnx.ModelProto:
    """conv -> ``middle`` (nodes from ``a`` to ``b``) -> conv."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3))
                                       .astype(np.float32), name) for name in ("w1", "w2")]
    nodes = [oh.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4), *middle,
             oh.make_node("Conv", ["b", "w2"], ["y"], pads=[1] * 4)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, channels, 8, 8])], [oh.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, channels, 8, 8])], [*weights, *inits])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)] + (
        [oh.make_opsetid("com.microsoft", 1)] if ms else []))


def _layout_cases():
    rng = np.random.default_rng(1)
    scale = numpy_helper.from_array(rng.standard_normal((1, 16, 1, 1)).astype(np.float32), "s")
    squeeze = numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)).astype(np.float32),
                                      "ws")
    expand = numpy_helper.from_array(rng.standard_normal((16, 4, 1, 1)).astype(np.float32),
                                     "we")
    return {
        "relu": ([oh.make_node("Relu", ["a"], ["b"])], ()),
        "silu": ([oh.make_node("QuickGelu", ["a"], ["b"], domain="com.microsoft", alpha=1.0)],
                 (), True),
        "erf": ([oh.make_node("Erf", ["a"], ["b"])], ()),
        "square": ([oh.make_node("Mul", ["a", "a"], ["b"])], ()),
        "maxpool": ([oh.make_node("MaxPool", ["a"], ["b"], kernel_shape=[3, 3],
                                  pads=[1] * 4)], ()),
        "squeeze-excite": ([  # the SE block: a broadcasting Mul, a 4-channel 1x1 conv
            oh.make_node("GlobalAveragePool", ["a"], ["p"]),
            oh.make_node("Conv", ["p", "ws"], ["q"]), oh.make_node("Relu", ["q"], ["r"]),
            oh.make_node("Conv", ["r", "we"], ["e"]), oh.make_node("Sigmoid", ["e"], ["g"]),
            oh.make_node("Mul", ["a", "g"], ["b"])], (squeeze, expand)),
        "scale": ([oh.make_node("Mul", ["a", "s"], ["c"]), oh.make_node("Erf", ["c"], ["b"])],
                  (scale,)),
    }


@pytest.mark.parametrize("case", sorted(_layout_cases()))
def test_layout_reorders_are_those_onnx_runtime_inserts(case, tmp_path):
    """``layout_reorders`` against ONNX Runtime itself: the reorders in the session's
    optimized graph (ORT_ENABLE_ALL) of conv -> op -> conv, counted by kind."""
    import onnxruntime as ort

    device = host_device()
    if not device.blocked_layout:
        pytest.skip("this CPU has no AVX2: ONNX Runtime runs no blocked layout here")
    middle, inits, *ms = _layout_cases()[case]
    model = _conv_between(middle, inits, ms=bool(ms))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    runtime = sorted(n.op_type for n in optimized.graph.node
                     if n.op_type in ("ReorderInput", "ReorderOutput"))
    loaded = graphopt.load(model)
    loaded.infer_shapes()
    predicted = sorted(kind for kind, _ in layout_reorders(loaded.graph, device))
    assert predicted == runtime


def test_a_pool_between_dequantize_and_quantize_runs_on_the_quantized_values():
    """ONNX Runtime drops a DequantizeLinear -> MaxPool -> QuantizeLinear sandwich's pair
    and pools the uint8 values (NhwcMaxPool; profiled in the int8 digits CNN: 74 us
    where the float pool and the pair were predicted at 360 us): the pair costs nothing,
    the pool moves a byte per value, and no NCHWc reorder goes around it."""
    shape = [8, 16, 8, 8]
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [oh.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             oh.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             oh.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             oh.make_node("QuantizeLinear", ["p", "s", "z"], ["q2"]),
             oh.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                 shape)],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16, 4, 4])],
                          [scale, zero])
    model = graphopt.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    device = host_device()
    costs = AnalyticCostModel().estimate(model, device).nodes
    pool, = [n for n in costs if n.op_type == "MaxPool"]
    assert pool.bytes == 8 * 16 * 64 + 8 * 16 * 16  # uint8 in and out
    dropped = [n for n in costs if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               and n.latency_s == 0.0]
    assert len(dropped) == 2  # the pair around the pool; the first Q and last DQ stay
    assert not [n for n in costs if n.op_type.startswith("Reorder")]


@pytest.mark.parametrize("activation,params,pass_", [
    ("Relu", [], False), ("Clip", [0.0, 6.0], True), ("Sigmoid", [], True),
    ("HardSigmoid", [0.2, 0.5], True)])
def test_a_fused_activation_other_than_relu_is_a_pass_over_the_output(activation, params,
                                                                        pass_):
    """ONNX Runtime's convolutions apply a fused Relu as they write their output and any
    other activation (ReLU6's Clip in MobileNetV2) in a pass over it after (measured:
    1x1 layers 16 -> 96 -> 16 at 112 x 112, 516 us per pair with Relu, 700 with Clip):
    the estimate adds that pass, read and write of the output, at its op's correction."""
    from graphopt.cost_calibration import Calibration, CalibratedCostModel

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((96, 16, 1, 1)).astype(np.float32), "w")
    attrs = {"activation_params": params} if params else {}
    conv = oh.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft",
                        activation=activation, **attrs)
    graph = oh.make_graph([conv], "g", [oh.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 16, 112, 112])], [oh.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 96, 112, 112])], [w])
    model = graphopt.load(oh.make_model(graph, opset_imports=[
        oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)]))
    out_pass = 2 * 96 * 112 * 112 * 4 / DEVICE.bandwidth
    plain = max(2 * 96 * 16 * 112 * 112 / (1e12 * 0.6),
                (16 + 96) * 112 * 112 * 4 / DEVICE.bandwidth + 96 * 16 * 4 / DEVICE.bandwidth)
    node, = AnalyticCostModel().estimate(model, DEVICE).nodes
    assert node.latency_s == pytest.approx(plain + (out_pass if pass_ else 0.0))
    cal = Calibration(fingerprint={})
    cal.add(("conv", "float32", "pointwise"), plain, 0.5, width=16.0)
    cal.add(("elementwise", "float32", activation), out_pass, 0.25)
    node, = CalibratedCostModel(cal).estimate(model, DEVICE).nodes
    assert node.latency_s == pytest.approx(0.5 * plain + (0.25 * out_pass if pass_ else 0.0))
