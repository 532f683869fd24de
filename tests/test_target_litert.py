"""The ``litert`` target: ``.tflite`` files written by graphopt, run in LiteRT's
interpreter (``ai-edge-litert``) and compared with ONNX Runtime on the original model.

The models are built here with onnx.helper (only the decomposed BERT is a torch export,
skipped without transformers), so the module runs in about half a minute. Skips with the
reason where ai-edge-litert is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import UsageError
from graphopt.registry import target_registry
from graphopt.targets.litert import LiteRtTarget
from tests.helpers import cli
from tests.zoo import mlp

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
TOL = 1e-4  # max abs diff relative to the output's scale (float32 end to end)


@pytest.fixture(scope="module", autouse=True)
def litert():
    missing = LiteRtTarget().availability()
    if missing:
        pytest.skip(missing)


# ---------------------------------------------------------------------- model builders
def _w(rng, *shape, scale=None):
    scale = scale if scale is not None else 1.0 / np.sqrt(np.prod(shape[1:]) or 1)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def depthwise_cnn(seed: int = 0) -> onnx.ModelProto:
    """MobileNet-style: stem Conv+Clip(0,6), depthwise 3x3 (stride 2) + HardSwish, a
    squeeze-excite (GAP, 1x1 convs, HardSigmoid, Mul), pointwise Conv + residual-free
    projection, MaxPool, AveragePool, Concat of two branches, Pad, GAP, Flatten, Gemm,
    Softmax. Input [N, 3, 24, 24], N dynamic."""
    r = np.random.default_rng(seed)
    i = {"stem.w": _w(r, 16, 3, 3, 3), "stem.b": _w(r, 16, scale=0.1),
         "dw.w": _w(r, 16, 1, 3, 3), "dw.b": _w(r, 16, scale=0.1),
         "se1.w": _w(r, 4, 16, 1, 1), "se1.b": _w(r, 4, scale=0.1),
         "se2.w": _w(r, 16, 4, 1, 1), "se2.b": _w(r, 16, scale=0.1),
         "pw.w": _w(r, 24, 16, 1, 1), "pw.b": _w(r, 24, scale=0.1),
         "fc.w": _w(r, 10, 48), "fc.b": _w(r, 10, scale=0.1),
         "clip.lo": np.array(0, np.float32), "clip.hi": np.array(6, np.float32),
         "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "stem.w", "stem.b"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        n("Clip", ["c1", "clip.lo", "clip.hi"], ["a1"], name="stem_relu6"),
        n("Conv", ["a1", "dw.w", "dw.b"], ["c2"], name="dw", group=16, strides=[2, 2],
          pads=[1, 1, 1, 1]),
        n("HardSwish", ["c2"], ["a2"], name="dw_hswish"),
        n("GlobalAveragePool", ["a2"], ["s0"], name="se_pool"),
        n("Conv", ["s0", "se1.w", "se1.b"], ["s1"], name="se_fc1"),
        n("Relu", ["s1"], ["s2"], name="se_relu"),
        n("Conv", ["s2", "se2.w", "se2.b"], ["s3"], name="se_fc2"),
        n("HardSigmoid", ["s3"], ["s4"], name="se_gate", alpha=1 / 6, beta=0.5),
        n("Mul", ["a2", "s4"], ["se"], name="se_mul"),
        n("Conv", ["se", "pw.w", "pw.b"], ["p"], name="pw"),
        n("MaxPool", ["p"], ["mp"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1]),
        n("AveragePool", ["p"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        n("Concat", ["mp", "ap"], ["cat"], name="concat", axis=1),
        n("Pad", ["cat", "pads"], ["padded"], name="pad"),
        n("Sigmoid", ["padded"], ["sig"], name="sigmoid"),
        n("GlobalAveragePool", ["sig"], ["g"], name="gap"),
        n("Flatten", ["g"], ["f"], name="flatten"),
        n("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
        n("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["N", 3, 24, 24])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], i)


def flatten_cnn(seed: int = 0, mode: str = "nearest") -> onnx.ModelProto:
    """Digits-style: Conv+Relu, Resize x2 (``mode``), MaxPool, Conv+BN+Relu, then
    Flatten of a 4x4 map into Gemm+Relu and Gemm. Input [N, 1, 8, 8]."""
    r = np.random.default_rng(seed)
    i = {"c1.w": _w(r, 8, 1, 3, 3), "c1.b": _w(r, 8, scale=0.1),
         "c2.w": _w(r, 16, 8, 3, 3), "bn.g": 1 + _w(r, 16, scale=0.1),
         "bn.b": _w(r, 16, scale=0.1), "bn.m": _w(r, 16, scale=0.1),
         "bn.v": np.abs(_w(r, 16)) + 0.5, "fc1.w": _w(r, 32, 256), "fc1.b": _w(r, 32),
         "fc2.w": _w(r, 32, 10), "scales": np.array([1, 1, 2, 2], np.float32)}
    n = helper.make_node
    resize = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor") if mode == "nearest" else \
        dict(mode="linear", coordinate_transformation_mode="half_pixel")
    nodes = [n("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             n("Relu", ["c1"], ["a1"], name="relu1"),
             n("Resize", ["a1", "", "scales"], ["up"], name="upsample", **resize),
             n("MaxPool", ["up"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["p1", "c2.w"], ["c2"], name="conv2", pads=[0, 0, 0, 0],
               strides=[1, 1], dilations=[2, 2]),
             n("BatchNormalization", ["c2", "bn.g", "bn.b", "bn.m", "bn.v"], ["bn"],
               name="bn"),
             n("Relu", ["bn"], ["a2"], name="relu2"),
             n("Flatten", ["a2"], ["f"], name="flatten"),
             n("Gemm", ["f", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
             n("Relu", ["h"], ["ha"], name="relu3"),
             n("MatMul", ["ha", "fc2.w"], ["y"], name="fc2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["N", 1, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], i)


def transformer_block(seed: int = 0, seq: int = 8, hidden: int = 32,
                      heads: int = 4) -> onnx.ModelProto:
    """A BERT layer as exporters write it: Q/K/V MatMul+Add, Reshape/Transpose into heads,
    scaled Q·Kᵀ plus an additive mask from Gather'd ids, Softmax, context, output
    projection, residual, LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div, an erf
    GELU feed-forward, a second LayerNormalization. Inputs: ids [1, seq] (int64)."""
    r = np.random.default_rng(seed)
    d, hd, ffn = hidden, hidden // heads, hidden * 4
    i = {"emb": _w(r, 50, d, scale=1.0), "mask_table": np.array([0, -1e4], np.float32)}
    for k in "qkvo":
        i[f"{k}.w"], i[f"{k}.b"] = _w(r, d, d), _w(r, d, scale=0.1)
    i.update({"f1.w": _w(r, d, ffn), "f1.b": _w(r, ffn, scale=0.1), "f2.w": _w(r, ffn, d),
              "f2.b": _w(r, d, scale=0.1), "ln1.g": 1 + _w(r, d, scale=0.1),
              "ln1.b": _w(r, d, scale=0.1), "ln2.g": 1 + _w(r, d, scale=0.1),
              "ln2.b": _w(r, d, scale=0.1),
              "heads": np.array([1, seq, heads, hd], np.int64),
              "merged": np.array([1, seq, d], np.int64),
              "scale": np.array(1 / np.sqrt(hd), np.float32), "two": np.array(2, np.float32),
              "eps": np.array(1e-12, np.float32), "sqrt2": np.array(np.sqrt(2), np.float32),
              "one": np.array(1, np.float32), "half": np.array(0.5, np.float32),
              "axes_last": np.array([-1], np.int64)})
    n = helper.make_node
    nodes = [n("Gather", ["emb", "ids"], ["h0"], name="embed"),
             n("Gather", ["mask_table", "pad"], ["m0"], name="mask_lookup"),
             n("Unsqueeze", ["m0", "axes_mask"], ["mask"], name="mask_unsqueeze")]
    i["axes_mask"] = np.array([1, 2], np.int64)
    for k in "qkv":
        nodes += [n("MatMul", ["h0", f"{k}.w"], [f"{k}0"], name=f"{k}_matmul"),
                  n("Add", [f"{k}0", f"{k}.b"], [f"{k}1"], name=f"{k}_add"),
                  n("Reshape", [f"{k}1", "heads"], [f"{k}2"], name=f"{k}_split"),
                  n("Transpose", [f"{k}2"], [f"{k}3"], name=f"{k}_heads",
                    perm=[0, 2, 3, 1] if k == "k" else [0, 2, 1, 3])]
    nodes += [n("MatMul", ["q3", "k3"], ["att0"], name="qk"),
              n("Mul", ["att0", "scale"], ["att1"], name="att_scale"),
              n("Add", ["att1", "mask"], ["att2"], name="att_mask"),
              n("Softmax", ["att2"], ["att3"], name="att_softmax", axis=-1),
              n("MatMul", ["att3", "v3"], ["ctx0"], name="context"),
              n("Transpose", ["ctx0"], ["ctx1"], name="ctx_merge", perm=[0, 2, 1, 3]),
              n("Reshape", ["ctx1", "merged"], ["ctx2"], name="ctx_reshape"),
              n("MatMul", ["ctx2", "o.w"], ["o0"], name="o_matmul"),
              n("Add", ["o0", "o.b"], ["o1"], name="o_add"),
              n("Add", ["o1", "h0"], ["res1"], name="residual1"),
              # LayerNorm 1, decomposed as older exporters write it
              n("ReduceMean", ["res1"], ["mu"], name="ln1_mean", axes=[-1]),
              n("Sub", ["res1", "mu"], ["dev"], name="ln1_sub"),
              n("Pow", ["dev", "two"], ["sq"], name="ln1_pow"),
              n("ReduceMean", ["sq"], ["var"], name="ln1_var", axes=[-1]),
              n("Add", ["var", "eps"], ["var_eps"], name="ln1_eps"),
              n("Sqrt", ["var_eps"], ["std"], name="ln1_sqrt"),
              n("Div", ["dev", "std"], ["normed"], name="ln1_div"),
              n("Mul", ["normed", "ln1.g"], ["ln1s"], name="ln1_scale"),
              n("Add", ["ln1s", "ln1.b"], ["ln1"], name="ln1_bias"),
              # erf GELU feed-forward
              n("MatMul", ["ln1", "f1.w"], ["f0"], name="ffn1_matmul"),
              n("Add", ["f0", "f1.b"], ["f1"], name="ffn1_add"),
              n("Div", ["f1", "sqrt2"], ["g0"], name="gelu_div"),
              n("Erf", ["g0"], ["g1"], name="gelu_erf"),
              n("Add", ["g1", "one"], ["g2"], name="gelu_add"),
              n("Mul", ["f1", "g2"], ["g3"], name="gelu_mul"),
              n("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
              n("MatMul", ["g4", "f2.w"], ["f3"], name="ffn2_matmul"),
              n("Add", ["f3", "f2.b"], ["f4"], name="ffn2_add"),
              n("Add", ["f4", "ln1"], ["res2"], name="residual2"),
              n("LayerNormalization", ["res2", "ln2.g", "ln2.b"], ["y"], name="ln2",
                axis=-1, epsilon=1e-12)]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq]),
                          helper.make_tensor_value_info("pad", TensorProto.INT64, [1, seq])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])], i)


def with_op(op: str) -> onnx.ModelProto:
    """x -> Relu -> ``op`` -> y: a graph holding one op the writer has no mapping for."""
    n = helper.make_node
    return _model([n("Relu", ["x"], ["r"], name="relu"), n(op, ["r"], ["y"], name="odd_one")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], {})


# ---------------------------------------------------------------------- helpers
def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def _lower(model, tmp_path: Path, **kwargs):
    """optimize --target litert -o tmp/out: (result, the manifest)."""
    out = tmp_path / "out"
    result = graphopt.optimize(model, target="litert", output=out, **kwargs)
    return result, json.loads((out / "manifest.json").read_text())


def _check_against_ort(model: onnx.ModelProto, result, feeds: dict) -> float:
    """Run the written .tflite here and compare with ORT on the original ourselves (not
    only through optimize's own check); returns the worst relative difference."""
    target = LiteRtTarget()
    got = target.run(result.artifact, feeds)
    want = _ort(model, feeds)
    worst = 0.0
    for out, ref in zip(model.graph.output, want):
        assert got[out.name].shape == ref.shape
        diff = np.abs(got[out.name] - ref).max() / max(np.abs(ref).max(), 1e-6)
        worst = max(worst, float(diff))
    assert worst < TOL, worst
    return worst


# ---------------------------------------------------------------------- tests
def test_alias_registered():
    registry = target_registry()
    assert {"litert", "tflite", "android-arm64"} <= set(registry.names())
    assert registry.get("tflite").name == "tflite"
    assert registry.get("android-arm64").device.name == "1x Cortex-A76-class phone core @ 2.4 GHz"


def test_example_cnn_cli_no_transposes_inside(tmp_path):
    out = tmp_path / "cnn"
    run = cli("optimize", EXAMPLE, "--target", "litert", "-o", out,
              "--report", tmp_path / "r.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["transposes"]["inside"] == 0
    assert manifest["operators"].get("CONV_2D") == 3
    assert "TRANSPOSE" not in manifest["operators"] or \
        manifest["operators"]["TRANSPOSE"] == manifest["transposes"]["boundary"]
    artifact = json.loads((tmp_path / "r.json").read_text())["artifact"]
    assert artifact["ok"] is True and artifact["max_abs_diff"] < 1e-4
    # dynamic batch: lowered at 1 and resizable (-1 in the shape signature), so a batch of
    # 3 runs as one
    assert manifest["static_shapes"]["bound"] == {"batch": 1}
    assert manifest["static_shapes"]["resizable_batch"] is True
    assert manifest["inputs"][0]["shape_signature"] == [-1, 3, 32, 32]
    model = onnx.load(EXAMPLE)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = LiteRtTarget().run(LiteRtTarget().open(out), {"input": x})["logits"]
    np.testing.assert_allclose(got, _ort(model, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_mlp_fully_connected(tmp_path):
    model = mlp()
    result, manifest = _lower(model, tmp_path, input_shapes={"x": [4, 32]})
    assert manifest["operators"] == {"FULLY_CONNECTED": 3}  # bias and Relu fused
    assert manifest["inputs"][0]["shape"] == [4, 32]
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)}
    _check_against_ort(model, result, feeds)
    # the serving_default signature addresses tensors by the ONNX names
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(result.artifact.path)).get_signature_runner()
    np.testing.assert_allclose(runner(**feeds)["y"], _ort(model, feeds)[0], rtol=1e-4,
                               atol=1e-5)


def test_depthwise_cnn(tmp_path):
    model = depthwise_cnn()
    result, manifest = _lower(model, tmp_path)
    ops = manifest["operators"]
    assert ops["DEPTHWISE_CONV_2D"] == 1 and ops["HARD_SWISH"] == 1
    assert ops["MAX_POOL_2D"] == 1 and ops["AVERAGE_POOL_2D"] == 1
    assert manifest["transposes"]["inside"] == 0
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 24, 24)).astype(np.float32)}
    _check_against_ort(model, result, feeds)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_flatten_into_gemm_folds_the_transpose_into_weights(tmp_path, mode):
    model = flatten_cnn(mode=mode)
    result, manifest = _lower(model, tmp_path, input_shapes={"x": [2, 1, 8, 8]})
    ops = manifest["operators"]
    assert manifest["transposes"]["inside"] == 0
    assert ops["FULLY_CONNECTED"] == 2 and ops["CONV_2D"] == 2
    # one RESHAPE: the 1-channel input's, to NHWC; none before the FULLY_CONNECTED, which
    # flattens the NHWC map itself
    assert ops["RESHAPE"] == 1
    assert ops["RESIZE_NEAREST_NEIGHBOR" if mode == "nearest" else "RESIZE_BILINEAR"] == 1
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 1, 8, 8)).astype(np.float32)}
    _check_against_ort(model, result, feeds)


def test_float16_weights(tmp_path):
    """--quantize fp16: the graph's float16 weights become float16 constants that a
    DEQUANTIZE turns into float32 at load; compute stays float32."""
    model = onnx.load(EXAMPLE)
    shapes = {"input": [1, 3, 32, 32]}
    result, manifest = _lower(model, tmp_path, input_shapes=shapes, quantize="fp16")
    assert manifest["precision"]["weights"] == "float16"
    assert manifest["operators"]["DEQUANTIZE"] >= 4  # three convolutions and the head
    full = graphopt.optimize(model, target="litert", output=tmp_path / "fp32",
                             input_shapes=shapes)
    half_size = (tmp_path / "out" / "model.tflite").stat().st_size
    assert half_size < 0.6 * (tmp_path / "fp32" / "model.tflite").stat().st_size
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = LiteRtTarget().run(result.artifact, {"input": x})["logits"]
    want = _ort(model, {"input": x})[0]
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    assert not np.array_equal(got, LiteRtTarget().run(full.artifact, {"input": x})["logits"])


def test_dynamic_range_int8(tmp_path):
    """quantize-int8-dynamic's standard form (DynamicQuantizeLinear → MatMulInteger → Cast
    → Mul) becomes LiteRT's dynamic-range FULLY_CONNECTED: int8 weights in the file."""
    from ai_edge_litert.interpreter import Interpreter

    model = mlp()
    result, manifest = _lower(model, tmp_path, input_shapes={"x": [4, 32]},
                              passes="quantize-int8-dynamic(require-speedup=false)")
    assert manifest["precision"]["weights"] == "int8"
    assert manifest["operators"] == {"FULLY_CONNECTED": 3}
    interpreter = Interpreter(model_path=str(result.artifact.path))
    weights = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8]
    assert len(weights) == 3 and all(len(d["quantization_parameters"]["scales"]) > 1
                                     for d in weights)  # per output channel
    x = np.random.default_rng(8).standard_normal((4, 32)).astype(np.float32)
    got = LiteRtTarget().run(result.artifact, {"x": x})["y"]
    want = _ort(model, {"x": x})[0]
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.999 and np.abs(got - want).max() > 1e-6  # int8, not float


def test_depthwise_cnn_nhwc_io(tmp_path):
    model = depthwise_cnn()
    out = tmp_path / "nhwc"
    result = graphopt.optimize(model, target=LiteRtTarget(io_layout="nhwc"), output=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["layout"] == "NHWC"
    assert manifest["inputs"][0]["shape"] == [1, 24, 24, 3]
    assert sum(manifest["transposes"].values()) == 0
    assert result.report["artifact"]["ok"] is True


def test_transformer_block(tmp_path):
    model = transformer_block()
    result, manifest = _lower(model, tmp_path)
    ops = manifest["operators"]
    assert ops.get("GELU") == 1 and "Erf" not in json.dumps(ops)
    assert ops.get("BATCH_MATMUL") == 2 and ops.get("SOFTMAX") == 1
    assert ops.get("RSQRT") == 2  # two LayerNorms, decomposed
    rng = np.random.default_rng(4)
    feeds = {"ids": rng.integers(0, 50, (1, 8)).astype(np.int64),
             "pad": np.array([[0] * 6 + [1] * 2], np.int64)}
    _check_against_ort(model, result, feeds)


def test_decomposed_bert(tmp_path):
    """The tiny BERT as torch exports it (opset 14: LayerNorms and tanh GELUs written out
    in elementwise ops, SDPA's NaN guard, position-id buffers): dynamic batch and
    sequence, lowered at a sequence of 16 with a padded attention mask."""
    pytest.importorskip("transformers")
    from tests import decomposed_bert

    model = decomposed_bert.bert_tiny("torchscript")
    shapes = {"input_ids": [1, 16], "attention_mask": [1, 16]}
    result, manifest = _lower(model, tmp_path, input_shapes=shapes)
    ops = manifest["operators"]
    assert ops["GELU"] == 2 and ops["RSQRT"] == 5 and ops["FULLY_CONNECTED"] == 12
    rng = np.random.default_rng(6)
    feeds = {"input_ids": rng.integers(1, 100, (1, 16)).astype(np.int64),
             "attention_mask": np.array([[1] * 11 + [0] * 5], np.int64)}
    _check_against_ort(model, result, feeds)


def test_bare_erf_in_builtin_ops(tmp_path):
    """An Erf outside a GELU: no Flex op, builtin arithmetic within 1e-6 of ORT."""
    model = _model([helper.make_node("Erf", ["x"], ["y"], name="erf")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], {})
    result, manifest = _lower(model, tmp_path)
    assert "GELU" not in manifest["operators"] and manifest["operators"]["EXP"] == 1
    x = np.linspace(-4, 4, 8, dtype=np.float32)[None]
    got = LiteRtTarget().run(result.artifact, {"x": x})["y"]
    np.testing.assert_allclose(got, _ort(model, {"x": x})[0], atol=1e-6)


@pytest.mark.parametrize("include_pad", [0, 1])
def test_average_pool_padding(tmp_path, include_pad):
    """TFLite's SAME average excludes the padding: count_include_pad=1 pads explicitly."""
    n = helper.make_node
    model = _model([n("AveragePool", ["x"], ["y"], name="avg", kernel_shape=[3, 3],
                      pads=[1, 1, 1, 1], count_include_pad=include_pad)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], {})
    result, manifest = _lower(model, tmp_path)
    assert ("PAD" in manifest["operators"]) == bool(include_pad)
    x = np.random.default_rng(10).standard_normal((1, 4, 6, 6)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_square_and_root_powers(tmp_path):
    """Pow by 2 and by 0.5 (decomposed norms) become SQUARE and SQRT, which XNNPACK runs."""
    n = helper.make_node
    model = _model([n("Pow", ["x", "two"], ["p"]), n("Pow", ["p", "half"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                   {"two": np.array(2, np.float32), "half": np.array(0.5, np.float32)})
    result, manifest = _lower(model, tmp_path, passes="eliminate-identity")
    assert manifest["operators"] == {"SQUARE": 1, "SQRT": 1}
    x = np.random.default_rng(9).standard_normal((2, 8)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_grouped_conv_and_ceil_mode_max_pool(tmp_path):
    """A grouped convolution (not depthwise) as TFLite's native grouped CONV_2D, and a
    ceil_mode MaxPool whose last window hangs over the input (padded with -inf); a
    ceil_mode AveragePool that changes the output size is refused, naming the node."""
    r = np.random.default_rng(15)
    n = helper.make_node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])
    model = _model([n("Conv", ["x", "w", "b"], ["c"], name="gconv", group=2,
                      pads=[1, 1, 1, 1]),
                    n("Relu", ["c"], ["a"], name="relu"),
                    n("MaxPool", ["a"], ["y"], name="pool", kernel_shape=[3, 3],
                      strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)],  # 6, not 5
                   [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                       [1, 12, 6, 6])],
                   {"w": _w(r, 12, 4, 3, 3), "b": _w(r, 12, scale=0.1)})
    result, manifest = _lower(model, tmp_path)
    assert manifest["operators"] == {"CONV_2D": 1, "PADV2": 1, "MAX_POOL_2D": 1,
                                     "TRANSPOSE": 2}
    _check_against_ort(model, result, {"x": r.standard_normal((1, 8, 10, 10)).astype(
        np.float32)})
    average = _model([n("AveragePool", ["x"], ["y"], name="avg_ceil", kernel_shape=[3, 3],
                        strides=[2, 2], ceil_mode=1)],
                     [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         [1, 8, 5, 5])], {})
    with pytest.raises(UsageError, match="AveragePool.*avg_ceil.*ceil_mode"):
        _lower(average, tmp_path / "avg")


def test_unmapped_op_refused_before_writing(tmp_path):
    out = tmp_path / "never"
    path = tmp_path / "model.onnx"
    onnx.save(with_op("Hardmax"), path)
    run = cli("optimize", path, "--target", "litert", "-o", out, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Hardmax" in run.stderr and "odd_one" in run.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".go-")]


def _resident_kb(address: int) -> int:
    """This process's resident kB of the mapping holding ``address`` (Linux)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(v, 16) for v in head.split("-"))
            inside = low <= address < high
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps")
def test_weights_read_from_the_data_file_leave_memory_as_they_are_packed(tmp_path):
    import mmap

    from ai_edge_litert import schema_py_generated as s

    from graphopt.targets.tflite_writer import FlatbufferBuilder

    rng = np.random.default_rng(0)
    table = rng.standard_normal((2048, 512)).astype(np.float32)  # 4 MB, laid out in order
    weight = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MB, packed transposed
    (tmp_path / "w.bin").write_bytes(table.tobytes() + weight.tobytes())
    with open(tmp_path / "w.bin", "rb") as fh:
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    mapped_table = np.frombuffer(data, np.float32, table.size).reshape(table.shape)
    mapped_weight = np.frombuffer(data, np.float32, weight.size,
                                  table.nbytes).reshape(weight.shape)
    fb = FlatbufferBuilder()
    x = fb.tensor("x", (1, 512), np.float32)
    kept = fb.constant("table", mapped_table)
    transposed = fb.constant("w", mapped_weight.T)
    # A read-only view stays a view: no copy of the weight beside the map.
    assert np.shares_memory(fb.tensors[transposed].data, mapped_weight)
    fb.op("FULLY_CONNECTED", [x, transposed, -1], [fb.tensor("y", (1, 512), np.float32)])
    fb.inputs, fb.outputs = [x], [len(fb.tensors) - 1]
    address = np.frombuffer(data, np.uint8, 1).ctypes.data
    assert mapped_table.sum() + mapped_weight.sum()  # every page read in
    assert _resident_kb(address) >= (table.nbytes + weight.nbytes) // 1024
    packed = bytes(fb.finish(["x"], ["y"]))
    # Packed, the map's pages have left the process (a page each end may stay) ...
    assert _resident_kb(address) <= 2 * mmap.PAGESIZE // 1024
    # ... the map still reads the weights, and the flatbuffer holds them as laid out.
    assert np.array_equal(mapped_table, table) and np.array_equal(mapped_weight, weight)
    model = s.ModelT.InitFromPackedBuf(packed, 0)
    tensors = model.subgraphs[0].tensors

    def stored(index):
        return np.asarray(model.buffers[tensors[index].buffer].data, np.uint8).view(np.float32)

    assert np.array_equal(stored(kept), table.ravel())
    assert np.array_equal(stored(transposed), weight.T.ravel())


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_dynamic_batch_is_resizable(tmp_path, monkeypatch, quantize):
    """Lowered at batch 1 and 2, the tensors that follow the batch get -1 in their shape
    signature (RESHAPE targets too): LiteRT's own interpreter resizes the model to a batch
    of 5 and matches ONNX Runtime. The same file comes out when the comparison holds the
    second build's large constants by digest."""
    from ai_edge_litert.interpreter import Interpreter

    from graphopt.targets import tflite_dynamic

    model = flatten_cnn(mode="nearest")
    x = np.random.default_rng(6).standard_normal((5, 1, 8, 8)).astype(np.float32)
    lossy = {"schemes": {"quantize": quantize}, "calibration": {"x": x}} if quantize else {}
    result, manifest = _lower(model, tmp_path, **lossy)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is True and shapes["per_sample_batch"] is False, shapes
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert manifest["inputs"][0]["shape_signature"] == [-1, 1, 8, 8]
    interpreter = Interpreter(model_path=str(result.artifact.path))
    detail = interpreter.get_input_details()[0]
    assert list(detail["shape_signature"]) == [-1, 1, 8, 8]
    interpreter.resize_tensor_input(detail["index"], [5, 1, 8, 8])
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    want = _ort(model, {"x": x})[0]
    assert got.shape == want.shape == (5, 10)
    if quantize is None:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        _check_against_ort(model, result, {"x": x})
    else:  # int8: within the budget, checked by optimize; here the same predictions
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.8
    monkeypatch.setattr(tflite_dynamic, "SMALL_BYTES", 64)  # weights by digest
    again, _ = _lower(model, tmp_path / "again", **lossy)
    assert again.artifact.path.read_bytes() == result.artifact.path.read_bytes()


def test_a_batch_spelled_out_stays_static_with_the_reason(tmp_path):
    """A constant the graph builds at the batch's size (ConstantOfShape of the input's
    batch, concatenated) cannot be resized: the batch stays static, the manifest says
    why, and a batch of 3 runs one sample at a time."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], end=1),
             helper.make_node("Concat", ["s", "two"], ["shape"], axis=0),
             helper.make_node("ConstantOfShape", ["shape"], ["c"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Concat", ["x", "c"], ["y"], axis=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                   {"two": np.array([2], np.int64)})
    result, manifest = _lower(model, tmp_path)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is False and shapes["per_sample_batch"] is True
    assert "follows the batch" in shapes["batch_static_because"], shapes
    assert "shape_signature" not in manifest["inputs"][0]
    x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_a_symbolic_sequence_is_resizable(tmp_path):
    """A sequence dimension besides the batch: lowered at twice its size as well, every
    tensor following either symbol gets -1 in its shape signature (a RESHAPE flattening
    both into one entry too); ``run`` resizes LiteRT's interpreter to other (batch,
    sequence) pairs and matches ONNX Runtime."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Reshape", ["f", "back"], ["g"]),
             helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", "S", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
                   {"w": _w(rng, 8, 8), "b": _w(rng, 8), "flat": np.array([-1, 8], np.int64),
                    "back": np.array([0, -1, 8], np.int64)})
    result, manifest = _lower(model, tmp_path)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is True and shapes["resizable_sequence"] is True, shapes
    assert manifest["inputs"][0]["shape_signature"] == [-1, -1, 8]
    for batch, sequence in [(1, 7), (3, 19)]:
        x = rng.standard_normal((batch, sequence, 8)).astype(np.float32)
        _check_against_ort(model, result, {"x": x})


def test_a_sequence_spelled_out_stays_static_with_the_reason(tmp_path):
    """A position table read up to the sequence's length (folded at the bound size into
    a constant of distinct rows) follows the sequence: the sequence stays static, the
    manifest says why, and the batch stays resizable."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
             helper.make_node("Slice", ["table", "zero", "s", "zero"], ["rows"]),
             helper.make_node("Add", ["x", "rows"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", "S", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])],
                   {"table": _w(rng, 16, 4), "zero": np.array([0], np.int64)})
    result, manifest = _lower(model, tmp_path)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is True and shapes["resizable_sequence"] is False
    assert "follows the sequence" in shapes["sequence_static_because"], shapes
    assert manifest["inputs"][0]["shape_signature"] == [-1, 2, 4]
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_a_reshape_target_not_read_from_the_inputs_keeps_the_sequence_static(tmp_path):
    """A RESHAPE target with an entry following the batch and another the sequence, where
    neither entry is an input's own dimension (``[2N, 2S, 2]``): it cannot be gathered
    from the inputs' shapes at run time, nor have two ``-1`` entries, so the sequence
    stays static with the reason; the batch alone stays resizable."""
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Slice", ["sx", "zero", "two"], ["ns"]),
             helper.make_node("Mul", ["ns", "two"], ["ns2"]),
             helper.make_node("Concat", ["ns2", "two"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["r"]),
             helper.make_node("Relu", ["r"], ["q"]),
             helper.make_node("Reshape", ["q", "sx"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", "S", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
                   {"zero": np.array([0], np.int64), "two": np.array([2], np.int64)})
    result, manifest = _lower(model, tmp_path)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is True and shapes["resizable_sequence"] is False
    assert "not the inputs' own" in shapes["sequence_static_because"], shapes
    assert manifest["inputs"][0]["shape_signature"][::2] == [-1, 8]
    x = np.random.default_rng(11).standard_normal(
        (3, manifest["inputs"][0]["shape"][1], 8)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_two_sequences_at_one_size_are_not_taken_for_one_another(tmp_path):
    """Inputs with two symbols besides the batch (``b`` [N, T, 8] first, ``a`` [N, S, 8]),
    both lowered at the same size, and a RESHAPE of ``a`` to [N, S, 2, 4]: its S entry
    cannot be read from the inputs' shapes at run time (T has the same size here, and
    the file would reshape ``a`` by T's length), so the sequence stays static with the
    reason naming both; the batch stays resizable."""
    nodes = [helper.make_node("Shape", ["a"], ["sa"], end=2),
             helper.make_node("Concat", ["sa", "tail"], ["t"], axis=0),
             helper.make_node("Reshape", ["a", "t"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"]),
             helper.make_node("Mul", ["b", "two"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "T", 8]),
                           helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "S", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 2, 4]),
                    helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "T", 8])],
                   {"tail": np.array([2, 4], np.int64), "two": np.array(2.0, np.float32)})
    result, manifest = _lower(model, tmp_path)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is True and shapes["resizable_sequence"] is False
    assert "S, T" in shapes["sequence_static_because"], shapes
    bound = [i["shape"][1] for i in manifest["inputs"]]
    assert [i["shape_signature"] for i in manifest["inputs"]] == [[-1, n, 8] for n in bound]
    rng = np.random.default_rng(12)
    _check_against_ort(model, result, {name: rng.standard_normal((3, n, 8)).astype(np.float32)
                                       for name, n in zip("ba", bound)})


def test_a_static_batch_with_a_resizable_sequence_runs_sample_by_sample(tmp_path):
    """The batch spelled out (a constant built at its size) but the sequence resizable:
    ``run`` feeds a batch of 3 at another sequence one sample at a time, each resized."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], end=1),
             helper.make_node("Concat", ["s", "four"], ["shape"], axis=0),
             helper.make_node("ConstantOfShape", ["shape"], ["c"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Concat", ["m", "c"], ["y"], axis=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                   {"four": np.array([4], np.int64)})
    result, manifest = _lower(model, tmp_path)
    shapes = manifest["static_shapes"]
    assert shapes["resizable_batch"] is False and shapes["per_sample_batch"] is True
    assert shapes["resizable_sequence"] is True, shapes
    assert manifest["inputs"][0]["shape_signature"] == [1, -1]
    x = np.random.default_rng(10).standard_normal((3, 7)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_shape_mismatch_is_a_usage_error(tmp_path):
    model = mlp()
    result, _ = _lower(model, tmp_path, input_shapes={"x": [4, 32]})
    with pytest.raises(UsageError, match="lowered at x=4x32"):
        LiteRtTarget().run(result.artifact, {"x": np.zeros((5, 32), np.float32)})


def test_target_options_from_the_cli(tmp_path):
    """--target-option io_layout=nhwc: NHWC model inputs (camera frames), outputs the
    same as the default layout's for the same image; an option a target does not have,
    or a value it does not take, is a usage error (exit 2) that writes nothing; `graphopt
    targets --json` lists each target's options; the result cache keys on them."""
    from graphopt.result_cache import ResultCache

    run = cli("optimize", EXAMPLE, "--target", "litert", "--target-option", "io_layout=nhwc",
              "-o", tmp_path / "nhwc", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "nhwc" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert manifest["inputs"][0]["layout"] == "NHWC"
    assert manifest["transposes"] == {"inside": 0, "boundary": 0}
    from ai_edge_litert.interpreter import Interpreter

    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    interpreter = Interpreter(model_path=str(tmp_path / "nhwc" / "model.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, _ort(onnx.load(EXAMPLE), {"input": x})[0], rtol=1e-4,
                               atol=1e-5)

    for target, option, message in (("litert", "io_layot=nhwc", "has no option 'io_layot'"),
                                    ("litert", "io_layout=nchw", "unknown io layout"),
                                    ("ort", "io_layout=nhwc", "has no option"),
                                    ("litert", "io_layout", "cannot parse")):
        bad = cli("optimize", EXAMPLE, "--target", target, "--target-option", option,
                  "-o", tmp_path / "bad", cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, (option, bad.stderr)
        assert not (tmp_path / "bad").exists()

    listed = {row["target"]: row for row in json.loads(
        cli("targets", "--json", cwd=tmp_path).stdout)}
    assert set(listed["litert"]["options"]) == {"io_layout", "io_dtype", "allow_custom"}
    assert listed["ort"]["options"] == {}
    cache = ResultCache(tmp_path / "cache")
    keys = {cache.key(onnx.load(EXAMPLE), LiteRtTarget().with_options(**o), tmp_path / "o")
            for o in ({}, {"io_layout": "nhwc"}, {"io_dtype": "int8"})}
    assert len(keys) == 3


def test_gather_nd_with_negative_constant_indices(tmp_path):
    """ONNX GatherND (batch_dims 0) as GATHER_ND: negative constant indices are written
    as the positions they count back from; outputs equal ONNX Runtime's."""
    nodes = [helper.make_node("GatherND", ["x", "idx"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                   {"idx": np.array([[0, -1], [1, 0], [-2, 1]], np.int64)})
    result, manifest = _lower(model, tmp_path)
    assert manifest["operators"] == {"GATHER_ND": 1}
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    _check_against_ort(model, result, {"x": x})


def test_verification_keeps_litert_and_ort_apart(tmp_path, monkeypatch):
    """The artifact check and its timing hold LiteRT's interpreter and ONNX Runtime's
    sessions one at a time (each keeps its own copy of the weights: together they needed
    a large model's weights twice over), and no interpreter is kept after them."""
    import weakref

    import graphopt.artifact
    from graphopt import verify
    from graphopt.targets import litert_runtime

    alive = {"litert": weakref.WeakSet(), "ort": weakref.WeakSet()}
    overlaps, made = [], {"litert": 0, "ort": 0}

    def tracked(kind, other, obj):
        if any(True for _ in alive[other]):
            overlaps.append(kind)
        alive[kind].add(obj)
        made[kind] += 1
        return obj

    new_interpreter, session, check = litert_runtime.new_interpreter, verify.session, \
        graphopt.artifact.check
    checking = []

    def interpreter(path, threads):
        manifest, run = new_interpreter(path, threads)
        return manifest, tracked("litert", "ort", run) if checking else run

    def ort_session(*args, **kwargs):
        sess = session(*args, **kwargs)
        return tracked("ort", "litert", sess) if checking else sess

    def checked(*args, **kwargs):
        checking.append(True)  # the check, then the timing: both from here on
        return check(*args, **kwargs)

    monkeypatch.setattr(litert_runtime, "new_interpreter", interpreter)
    monkeypatch.setattr(verify, "session", ort_session)
    monkeypatch.setattr(graphopt.artifact, "check", checked)
    result, _ = _lower(mlp(), tmp_path, input_shapes={"x": [2, 32]})
    report = result.report["artifact"]
    assert report["ok"] is True and report["latency"]["artifact_s"] > 0
    assert "one runtime at a time" in report["latency"]["order"]
    assert made["litert"] >= 2 and made["ort"] >= 2  # checked and timed
    assert overlaps == []
    path = str(Path(result.artifact.path).resolve())
    assert not [k for k in litert_runtime.INTERPRETERS if k[0] == path]


def test_the_report_counts_before_and_after_at_the_inputs_it_binds(tmp_path):
    """A compiled target binds ``--input-shape``: the report's ``input`` summary is of
    the original at those shapes too, not at its symbolic ones (counted as 1), so
    before and after compare the same work."""
    flops = {}
    for batch in (1, 8):
        report = graphopt.optimize(mlp(), target="litert", input_shapes={"x": [batch, 32]},
                                   output=tmp_path / f"b{batch}").report
        assert report["input"]["flops"] == pytest.approx(report["output"]["flops"], rel=0.05)
        flops[batch] = report["input"]["flops"]
    assert flops[8] == pytest.approx(8 * flops[1], rel=0.05)


def _cumsum_cnn() -> onnx.ModelProto:
    """Conv -> Relu -> CumSum (no TFLite mapping) -> Relu, on a 6 x 10 image."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    n = helper.make_node
    nodes = [n("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             n("Relu", ["c"], ["r"], name="relu"),
             n("CumSum", ["r", "axis"], ["s"], name="cumsum", exclusive=1, reverse=0),
             n("Relu", ["s"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, "cumsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 10])],
        [w, numpy_helper.from_array(np.array(1, np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_op_without_a_mapping_is_refused_or_kept_as_a_custom_operator(tmp_path):
    """CumSum has no TFLite mapping: refused, named with its node, nothing written; with
    ``allow_custom=true`` it is a CUSTOM operator (custom code ``CumSum``, attributes as
    a FlexBuffer map, its input in the ONNX layout: the convolution's NHWC output
    transposed back), the manifest says stock LiteRT will not run the file, and the
    check says it did not run here (the file is kept, not taken for a failure)."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    with pytest.raises(UsageError, match=r"op CumSum \(node 'cumsum'\) has no TFLite mapping"):
        graphopt.optimize(_cumsum_cnn(), target="litert", output=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "custom"
    result = graphopt.optimize(_cumsum_cnn(), target="litert", output=out,
                               target_options={"allow_custom": "true"})
    check = result.report["artifact"]
    assert check["ok"] is None and "custom operators (CumSum)" in check["detail"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["custom_ops"] == ["CumSum"] and manifest["builtin_only"] is False
    model = schema.ModelT.InitFromPackedBuf((out / "model.tflite").read_bytes(), 0)
    graph = model.subgraphs[0]
    (op,) = [o for o in graph.operators
             if model.operatorCodes[o.opcodeIndex].builtinCode == schema.BuiltinOperator.CUSTOM]
    assert model.operatorCodes[op.opcodeIndex].customCode == b"CumSum"
    assert flexbuffers.Loads(bytes(op.customOptions)) == {"exclusive": 1, "reverse": 0}
    assert list(graph.tensors[op.inputs[0]].shape) == [1, 8, 6, 10]  # NCHW, as ONNX's
    assert manifest["operators"]["CONV_2D"] == 1 and manifest["transposes"]["inside"] == 1
