"""The ONNX graph run by PyTorch (``passes/recover/torch_graph.py``, what fine-tuning
trains): same outputs as ONNX Runtime on real-shaped models and on each op's edge
forms, gradients reach the trainable initializers, and the rest is refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch", reason="fine-tuning needs PyTorch (graphopt[train])")

from graphopt import verify  # noqa: E402
from graphopt.passes.recover.torch_graph import TorchGraph, Unsupported, to_torch  # noqa: E402
from tests import digits, zoo  # noqa: E402


def _compare(proto: onnx.ModelProto, feeds: dict, tol: float = 2e-5) -> float:
    outs = [o.name for o in proto.graph.output]
    with torch.no_grad():
        got = TorchGraph(proto)({k: to_torch(v) for k, v in feeds.items()}, outs)
    ref = verify.run(verify.session(proto), feeds)
    worst = 0.0
    for name in outs:
        want, have = np.asarray(ref[name]), got[name].numpy()
        assert have.shape == want.shape, (name, have.shape, want.shape)
        if want.dtype.kind in "biu":
            assert np.array_equal(have, want), name
            continue
        err = float(np.abs(have - want).max() / (np.abs(want).max() + 1e-12))
        assert err < tol, (name, err)
        worst = max(worst, err)
    return worst


def _random_feeds(proto: onnx.ModelProto, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        shape = [d.dim_value or 2 for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[inp.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("make", [digits.digits_cnn, digits.digits_mlp, zoo.resnet_cnn,
                                  zoo.mobilenet_cnn, zoo.bert_tiny],
                         ids=["digits-cnn", "digits-mlp", "resnet", "mobilenet", "bert"])
def test_real_models_match_onnx_runtime(make):
    proto = make()
    _compare(proto, _random_feeds(proto))


def test_minilm_on_sentences_matches_onnx_runtime():
    """The exported MiniLM: masks, shape arithmetic (Shape/Gather/Concat/Range/Where),
    erf GELU, LayerNormalization, the pooling and ReduceL2 normalisation."""
    _compare(zoo.bert_minilm(), zoo.minilm_tokenize())


def test_cleaned_up_minilm_matches_on_sentence_batches():
    """After graphopt's cleanup (where fine-tuning runs): 0-d initializers and scalar
    Gathers from folded shape arithmetic, on batches of different lengths."""
    import graphopt
    from graphopt.registry import pass_registry
    from graphopt.targets.ort import LOSSLESS_PIPELINE
    from tests.helpers import CALIBRATION_SENTENCES
    from tests.sentences import minilm_batches

    registry = pass_registry()
    cleanup = [n for n in LOSSLESS_PIPELINE if registry.get(n).family == "cleanup"]
    proto = graphopt.optimize(zoo.bert_minilm(), passes=cleanup).model.to_onnx()
    assert any(not t.dims for t in proto.graph.initializer)  # 0-d constants present
    for batch in minilm_batches(list(CALIBRATION_SENTENCES), 8)[:3]:
        _compare(proto, batch)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def test_edge_forms_of_ops_match_onnx_runtime():
    """Negative-step Slice, reflect/edge Pad, uneven Split, reductions without keepdims,
    Gemm with transA/alpha/beta, SAME padding with a stride, asymmetric MaxPool pads with
    ceil mode, AveragePool counting pads, negative Gather indices, GatherElements,
    Expand, Tile, Range, Where."""
    x = _vi("x", [2, 3, 7, 6])
    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
        helper.make_node("Pad", ["x", "pads"], ["pr"], mode="reflect"),
        helper.make_node("Pad", ["x", "pads"], ["pe"], mode="edge"),
        helper.make_node("Pad", ["x", "pads", "pv"], ["pc"]),
        helper.make_node("Split", ["x", "split"], ["sa", "sb"], axis=2),
        helper.make_node("ReduceMax", ["x"], ["rmax"], axes=[1, 3], keepdims=0),
        helper.make_node("ReduceProd", ["x"], ["rprod"], axes=[2], keepdims=0),
        helper.make_node("ReduceL2", ["x"], ["rl2"], axes=[-1]),
        helper.make_node("ReduceSum", ["x", "rax"], ["rsum"], keepdims=0),
        helper.make_node("Conv", ["x", "w"], ["same"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 2], strides=[2, 2],
                         pads=[0, 1, 1, 0], ceil_mode=1),
        helper.make_node("AveragePool", ["x"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("AveragePool", ["x"], ["ap0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["x", "gi"], ["g"], axis=2),
        helper.make_node("GatherElements", ["x", "ge"], ["ge_out"], axis=3),
        helper.make_node("Flatten", ["x"], ["flat"], axis=2),
        helper.make_node("Gemm", ["a", "b", "c"], ["gemm"], transA=1, transB=1, alpha=0.5,
                         beta=2.0),
        helper.make_node("Expand", ["c", "eshape"], ["ex"]),
        helper.make_node("Tile", ["c", "reps"], ["tile"]),
        helper.make_node("Range", ["r0", "r1", "r2"], ["rng"]),
        helper.make_node("Greater", ["x", "zero"], ["pos"]),
        helper.make_node("Where", ["pos", "x", "zero"], ["relu"]),
        helper.make_node("Softmax", ["x"], ["sm"], axis=1),
        helper.make_node("LeakyRelu", ["x"], ["lr"], alpha=0.1),
        helper.make_node("HardSigmoid", ["x"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("Clip", ["x", "lo", "hi"], ["clip"]),
    ]
    rng = np.random.default_rng(1)
    inits = [
        _i64("st", [-1, 5]), _i64("en", [-8, 1]), _i64("ax", [2, 3]), _i64("sp", [-2, -2]),
        _i64("pads", [0, 0, 2, 1, 0, 0, 1, 2]),
        numpy_helper.from_array(np.array(1.5, np.float32), "pv"),
        _i64("split", [3, 4]), _i64("rax", [0, 2]),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        _i64("gi", [[-1, 0], [2, -3]]),
        _i64("ge", rng.integers(-6, 6, (2, 3, 7, 2))),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "a"),
        numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((1, 3)).astype(np.float32), "c"),
        _i64("eshape", [2, 1, 3]), _i64("reps", [2, 2]),
        _i64("r0", 2), _i64("r1", 11), _i64("r2", 3),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
        numpy_helper.from_array(np.array(0.7, np.float32), "hi"),
    ]
    outs = ["s", "pr", "pe", "pc", "sa", "sb", "rmax", "rprod", "rl2", "rsum", "same", "mp",
            "ap", "ap0", "g", "ge_out", "flat", "gemm", "ex", "tile", "rng", "relu", "sm",
            "lr", "hs", "clip"]
    proto = _model(nodes, [x], [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    _compare(proto, {"x": rng.standard_normal((2, 3, 7, 6)).astype(np.float32)})


def test_older_opsets_attribute_forms():
    """Opset 11: Unsqueeze/Squeeze/ReduceSum axes and Split sizes as attributes, Softmax
    over the flattened trailing axes; opset 9: Slice bounds as attributes, Clip bounds."""
    x = _vi("x", [2, 3, 4])
    nodes11 = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, 3]),
        helper.make_node("Squeeze", ["u"], ["q"], axes=[0]),
        helper.make_node("Split", ["x"], ["s1", "s2"], axis=2, split=[1, 3]),
        helper.make_node("Softmax", ["x"], ["sm"], axis=1),
        helper.make_node("ReduceSum", ["x"], ["rs"], axes=[1]),
    ]
    outs = ["q", "s1", "s2", "sm", "rs"]
    proto = _model(nodes11, [x], [helper.make_empty_tensor_value_info(o) for o in outs],
                   opset=11)
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)}
    _compare(proto, feeds)
    nodes9 = [helper.make_node("Slice", ["x"], ["s"], starts=[1, -3], ends=[2, 100],
                               axes=[0, 2]),
              helper.make_node("Clip", ["x"], ["c"], min=-0.2, max=0.3)]
    proto = _model(nodes9, [x], [helper.make_empty_tensor_value_info(o) for o in ["s", "c"]],
                   opset=9)
    _compare(proto, feeds)


def test_gradients_reach_only_the_trainable_initializers():
    proto = digits.digits_mlp()
    names = [t.name for t in proto.graph.initializer]
    net = TorchGraph(proto, trainable=names[:2])
    x = torch.from_numpy(np.random.default_rng(0).random((4, 64), np.float32))
    out = net({"input": x}, ["logits"])["logits"]
    out.square().sum().backward()
    grads = {name: net.params[key].grad for name, key in net.keys.items()}
    assert set(grads) == set(names[:2])
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    assert set(net.values()) == set(names[:2])


def test_an_op_without_a_torch_form_is_named():
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="upsample")]
    proto = _model(nodes, [_vi("x", [1, 1, 2, 2])], [_vi("y", None)],
                   [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    with pytest.raises(Unsupported, match="Resize.*upsample"):
        TorchGraph(proto)


@pytest.mark.parametrize("spec", [
    "quantize-int8",  # QuantizeLinear/DequantizeLinear on activations, per-channel weights
    "quantize-int4-weight(format=qdq,symmetric=true,min_size=0)",  # negative scales
    "quantize-int4-weight(format=qdq,block_size=16,min_size=0)"])  # uint4, zero points
def test_quantized_graphs_match_onnx_runtime(spec):
    """QDQ graphs as graphopt's quantizers write them: the fake-quantized forward (round
    half to even, saturation, blocked scales) gives ONNX Runtime's numbers."""
    import graphopt

    make = digits.digits_cnn if spec == "quantize-int8" else digits.digits_mlp
    x = digits.digits_data()[0][:64]
    x = x if make is digits.digits_cnn else x.reshape(64, -1)
    proto = graphopt.optimize(make(), passes=["fold-constants", spec],
                              calibration={"input": x}, tolerance=0.5).model.to_onnx()
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    _compare(proto, {"input": x}, tol=1e-5)


def test_fake_quantized_weights_start_at_the_stored_codes():
    """A weight trained as a float shadow reproduces the stored codes and scale exactly
    before any step, and gives codes back in the stored type's range."""
    import graphopt

    x = digits.digits_data()[0][:64].reshape(64, -1)
    proto = graphopt.optimize(digits.digits_mlp(), passes=[
        "fold-constants", "quantize-int4-weight(format=qdq,symmetric=true,min_size=0)"],
        calibration={"input": x}, tolerance=0.5).model.to_onnx()
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    plain = TorchGraph(proto)
    fake = TorchGraph(proto, trainable=[n.input[1] for n in dqs],
                      fake_quant=[n.output[0] for n in dqs])
    feeds = {"input": to_torch(x)}
    with torch.no_grad():
        a = plain(feeds, ["logits"])["logits"]
        b = fake(feeds, ["logits"])["logits"]
    assert torch.equal(a, b)
    codes = fake.values()
    for n in dqs:
        assert np.array_equal(codes[n.input[0]], plain.consts[n.input[0]].numpy())
        assert codes[n.input[0]].min() >= -8 and codes[n.input[0]].max() <= 7
