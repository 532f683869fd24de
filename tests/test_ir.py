"""The IR keeps everything a model carries and saves it safely."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import ir, verify


def add_relu_model(opset: int) -> onnx.ModelProto:
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "b"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [bias])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    if opset < 8:  # IR version 3: initializers must also be listed as graph inputs
        model.ir_version = 3
        model.graph.input.append(oh.make_tensor_value_info("b", TensorProto.FLOAT, [4]))
    return model


def function_model() -> onnx.ModelProto:
    """A model-local function in a custom domain, metadata and a doc string."""
    square_plus = oh.make_function(
        "local.fn", "SquarePlus", ["a", "b"], ["c"],
        [oh.make_node("Mul", ["a", "a"], ["sq"]), oh.make_node("Add", ["sq", "b"], ["c"])],
        [oh.make_opsetid("", 17)])
    graph = oh.make_graph(
        [oh.make_node("SquarePlus", ["x", "x"], ["y"], domain="local.fn")], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = oh.make_model(graph, functions=[square_plus],
                          opset_imports=[oh.make_opsetid("", 17),
                                         oh.make_opsetid("local.fn", 1)])
    model.doc_string = "a documented model"
    model.model_version = 7
    model.domain = "org.example"
    oh.set_model_props(model, {"author": "graphopt tests", "license": "MIT"})
    return model


@pytest.mark.parametrize("opset", range(7, onnx.defs.onnx_opset_version() + 1))
def test_every_opset_loads_and_saves(opset, tmp_path):
    original = add_relu_model(opset)
    onnx.checker.check_model(original)
    model = graphopt.load(original)
    assert model.opset == opset
    path = graphopt.save(model, tmp_path / "m.onnx")
    reloaded = onnx.load(path)
    onnx.checker.check_model(reloaded)
    assert {o.domain: o.version for o in reloaded.opset_import} == {"": opset}
    assert [n.op_type for n in reloaded.graph.node] == ["Add", "Relu"]
    np.testing.assert_array_equal(numpy_helper.to_array(reloaded.graph.initializer[0]),
                                  np.arange(4, dtype=np.float32))


def test_functions_metadata_and_domains_survive(tmp_path):
    model = graphopt.load(function_model())
    path = graphopt.save(model, tmp_path / "m.onnx")
    back = onnx.load(path)
    onnx.checker.check_model(back)
    assert [f.name for f in back.functions] == ["SquarePlus"]
    assert {o.domain: o.version for o in back.opset_import}["local.fn"] == 1
    assert {p.key: p.value for p in back.metadata_props} == {"author": "graphopt tests",
                                                             "license": "MIT"}
    assert (back.doc_string, back.model_version, back.domain) == \
        ("a documented model", 7, "org.example")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(verify.run(back, {"x": x})["y"], x * x + x, rtol=1e-6)


def test_external_data_load_and_save(tmp_path):
    weight = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
                          [numpy_helper.from_array(weight, "W")])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]),
                    src / "m.onnx", save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    model = graphopt.load(src / "m.onnx")
    np.testing.assert_array_equal(model.graph.tensors()["W"].values, weight)

    out = graphopt.save(model, tmp_path / "dst" / "m.onnx", external_data=True)
    assert (out.parent / "m.onnx.data").stat().st_size == weight.nbytes
    assert out.stat().st_size < 10_000
    np.testing.assert_array_equal(
        numpy_helper.to_array(onnx.load(out).graph.initializer[0]), weight)
    inline = graphopt.save(model, tmp_path / "inline.onnx")  # small: no external data
    assert inline.stat().st_size > weight.nbytes
    assert not (tmp_path / "inline.onnx.data").exists()


def test_external_data_chosen_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 1000)  # pretend 1 kB is 2 GB
    path = graphopt.save(graphopt.load(add_relu_model(17)), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists()  # 16 bytes of weights stay inline
    big = function_model()
    big.graph.initializer.append(numpy_helper.from_array(np.ones(4096, np.float32), "big"))
    path = graphopt.save(graphopt.load(big), tmp_path / "big.onnx")
    # "big" is unused, so it is dropped on export; the model stays small and inline.
    assert not (tmp_path / "big.onnx.data").exists()
    weight = numpy_helper.from_array(np.ones((4, 300), np.float32), "b")
    model = add_relu_model(17)
    model.graph.initializer[0].CopyFrom(weight)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 300
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 300
    path = graphopt.save(graphopt.load(model), tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").stat().st_size == 4 * 300 * 4
    assert path.stat().st_size < 4 * 300 * 4


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    model = graphopt.load(add_relu_model(17))
    graphopt.save(model, tmp_path / "m.onnx")
    graphopt.save(model, tmp_path / "m.onnx")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_content_hash_is_deterministic_and_sensitive():
    a = graphopt.load(add_relu_model(17))
    b = graphopt.load(add_relu_model(17))
    assert a.content_hash() == b.content_hash() == a.clone().content_hash()
    b.graph.tensors()["b"].values = np.arange(4, dtype=np.float32) + 1
    assert a.content_hash() != b.content_hash()


def test_clone_is_independent():
    a = graphopt.load(add_relu_model(17))
    b = a.clone()
    b.graph.nodes.pop()
    assert a.num_nodes() == 2 and b.num_nodes() == 1


def test_load_accepts_path_bytes_and_proto(tmp_path):
    proto = add_relu_model(13)
    onnx.save(proto, tmp_path / "m.onnx")
    for source in (proto, proto.SerializeToString(), tmp_path / "m.onnx",
                   str(tmp_path / "m.onnx")):
        assert graphopt.load(source).num_nodes() == 2


def test_initializers_listed_as_inputs_stay_overridable(tmp_path):
    """IR >= 4: an initializer that is also a graph input is a default the caller may
    override; it must stay an input (and never be treated as a constant)."""
    model = add_relu_model(13)
    model.graph.input.append(oh.make_tensor_value_info("b", TensorProto.FLOAT, [4]))
    unused = numpy_helper.from_array(np.ones(2, np.float32), "unused_default")
    model.graph.initializer.append(unused)
    model.graph.input.append(oh.make_tensor_value_info("unused_default", TensorProto.FLOAT, [2]))
    loaded = graphopt.load(model)
    assert "b" in [t.name for t in loaded.graph.inputs]
    result = graphopt.optimize(model)
    back = result.model.to_onnx()
    assert [v.name for v in back.graph.input] == ["x", "b", "unused_default"]
    assert {t.name for t in back.graph.initializer} == {"b", "unused_default"}
    x = np.zeros((1, 4), np.float32)
    override = {"x": x, "b": np.full(4, -5.0, np.float32)}
    np.testing.assert_array_equal(verify.run(back, override)["y"], np.zeros((1, 4)))
    np.testing.assert_array_equal(verify.run(back, {"x": x})["y"], [np.arange(4)])


def test_ir3_initializers_are_listed_as_inputs_again():
    back = graphopt.load(add_relu_model(7)).to_onnx()
    onnx.checker.check_model(back)
    assert [v.name for v in back.graph.input] == ["x", "b"]


def test_constant_shared_by_subgraphs_is_stored_once():
    """Both If branches read one weight: export stores it once, round trips are stable."""
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")

    def branch(name, op):
        return oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["m"]),
                              oh.make_node(op, ["m"], [f"{name}_out"])], name, [],
                             [oh.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 64])])

    graph = oh.make_graph(
        [oh.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"),
                      else_branch=branch("else", "Neg"))], "g",
        [oh.make_tensor_value_info("c", TensorProto.BOOL, []),
         oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [weight])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    once = graphopt.load(proto).to_onnx()
    twice = graphopt.load(once).to_onnx()
    for exported in (once, twice):
        assert [t.name for t in exported.graph.initializer] == ["W"]
        assert all(not a.g.initializer for a in exported.graph.node[0].attribute)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": x}
        np.testing.assert_allclose(verify.run(twice, feeds)["y"], verify.run(proto, feeds)["y"],
                                   rtol=1e-6)


def test_shapes_pass_contrib_ops_by_stand_ins():
    """DynamicQuantizeMatMul (int8 weight), BiasGelu and an Attention with pruned heads:
    ONNX's inference follows none of them; the shapes after them stay known (the
    attention's narrower output too), the model keeps its ops."""
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.ir import infer_shapes

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-8, 8, (64, 32)).astype(np.int8), "w")
    scale = numpy_helper.from_array(np.array([0.1], np.float32), "s")
    bias = numpy_helper.from_array(np.zeros(32, np.float32), "b")
    # an Attention whose heads were pruned: 32 wide in, 3 x 16 wide QKV, 16 wide out
    qkv = numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "qkv")
    qkv_b = numpy_helper.from_array(np.zeros(48, np.float32), "qkv_b")
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "", "b"], ["y"],
                              domain="com.microsoft"),
             helper.make_node("BiasGelu", ["y", "b"], ["g"], domain="com.microsoft"),
             helper.make_node("Attention", ["g", "qkv", "qkv_b"], ["a"], num_heads=2,
                              domain="com.microsoft"),
             helper.make_node("Relu", ["a"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 7, 64])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)], [w, scale, bias, qkv, qkv_b])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    infer_shapes(proto)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in proto.graph.value_info}
    assert shapes["y"] == ["batch", 7, 32] and shapes["g"] == ["batch", 7, 32]
    assert shapes["a"] == ["batch", 7, 16]
    assert [n.op_type for n in proto.graph.node] == ["DynamicQuantizeMatMul", "BiasGelu",
                                                     "Attention", "Relu"]
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim][1:] == \
        [7, 16]
    assert [i.name for i in proto.graph.input] == ["x"]  # stand-in weights stay outside


@pytest.mark.parametrize("make", ["bert_tiny", "resnet_cnn", "if_model"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_toposort_gives_onnx_graphsurgeons_order(make, seed):
    """``ir.toposort`` (linear time) orders any shuffle of a graph's nodes exactly as
    onnx-graphsurgeon's own sort does (graphs with subgraphs go to it)."""
    import random

    from tests import zoo

    proto = getattr(zoo, make)() if make != "if_model" else zoo.if_model()
    ours, theirs = ir.load(proto), ir.load(proto)
    order = list(range(len(ours.graph.nodes)))
    random.Random(seed).shuffle(order)
    ours.graph.nodes = [ours.graph.nodes[i] for i in order]
    theirs.graph.nodes = [theirs.graph.nodes[i] for i in order]
    ir.toposort(ours.graph)
    theirs.graph.toposort()
    assert [n.name for n in ours.graph.nodes] == [n.name for n in theirs.graph.nodes]
    assert ours.to_onnx().SerializeToString() == theirs.to_onnx().SerializeToString()


def test_toposort_refuses_a_cycle():
    from onnx_graphsurgeon.util.exception import OnnxGraphSurgeonException

    model = ir.load(add_relu_model(17))
    first, last = model.graph.nodes[0], model.graph.nodes[-1]
    first.inputs[0] = last.outputs[0]  # the first node now reads the last one's output
    with pytest.raises(OnnxGraphSurgeonException, match="Cycle"):
        ir.toposort(model.graph)
