"""Transpose passes: folding 2-D Transposes into Gemm/MatMul, and sinking Transposes
through elementwise ops until they cancel, merge or meet.

Each positive case checks the Transpose count went down and the outputs match ONNX
Runtime on the original (rtol 1e-4, atol 1e-5) with symbolic dimensions at 1 and 3; each
near miss checks nothing changed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.passes.cleanup.transpose import FoldTransposeIntoGemm, SinkTransposes
from graphopt.targets.ort import LOSSLESS_PIPELINE
from helpers import apply_passes, assert_pass_unchanged, build_model, count_ops

FLOAT = TensorProto.FLOAT
rng = np.random.default_rng(0)
NCHW_TO_NHWC, NHWC_TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def vi(name, shape, dtype=FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def transpose(x, y, perm):
    return oh.make_node("Transpose", [x], [y], perm=perm)


def node_of(proto, op):
    return next(n for n in proto.graph.node if n.op_type == op)


def attrs_of(node):
    return {a.name: oh.get_attribute_value(a) for a in node.attribute}


# ====================================================================== fold-transpose-into-gemm
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_transposed_inputs_flip_the_attributes(trans_a, trans_b):
    a_shape = ["N", 6] if trans_a else [6, "N"]  # Transpose(a) must be [N, 6] for transA=0
    b_shape = [5, 6] if not trans_b else [6, 5]
    nodes = [transpose("a", "at", [1, 0]), transpose("b", "bt", [1, 0]),
             oh.make_node("Gemm", ["at", "bt", "c"], ["y"], transA=trans_a, transB=trans_b,
                          alpha=0.5)]
    proto = build_model(nodes, [vi("a", a_shape), vi("b", b_shape)], [vi("y", None)],
                        [f32("c", rand(5))])
    after, [result] = apply_passes(proto, FoldTransposeIntoGemm())
    assert result.stats["flipped"] == 2 and dict(count_ops(after)) == {"Gemm": 1}
    got = attrs_of(node_of(after, "Gemm"))
    assert got.get("transA", 0) == 1 - trans_a and got.get("transB", 0) == 1 - trans_b
    assert got["alpha"] == 0.5


def test_gemm_of_a_shared_transpose_keeps_it_for_the_other_reader():
    nodes = [transpose("a", "at", [1, 0]), oh.make_node("Gemm", ["at", "w"], ["y"]),
             oh.make_node("Relu", ["at"], ["r"])]
    proto = build_model(nodes, [vi("a", [6, "N"])], [vi("y", None), vi("r", None)],
                        [f32("w", rand(6, 5))])
    after, _ = apply_passes(proto, FoldTransposeIntoGemm())
    assert dict(count_ops(after)) == {"Gemm": 1, "Transpose": 1, "Relu": 1}
    assert node_of(after, "Gemm").input[0] == "a"


@pytest.mark.parametrize("constant_node", [False, True])
def test_matmul_of_a_transposed_constant_stores_it_transposed(constant_node):
    w = rand(5, 6)
    nodes = [transpose("w", "wt", [1, 0]), oh.make_node("MatMul", ["x", "wt"], ["y"])]
    inits = [f32("w", w)]
    if constant_node:
        nodes.insert(0, oh.make_node("Constant", [], ["w"], value=f32("w", w)))
        inits = []
    proto = build_model(nodes, [vi("x", ["N", 4, 6])], [vi("y", None)], inits)
    after, [result] = apply_passes(proto, FoldTransposeIntoGemm())
    assert result.stats["weights_transposed"] == 1
    assert dict(count_ops(after)) == {"MatMul": 1}
    stored = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    np.testing.assert_array_equal(stored[node_of(after, "MatMul").input[1]], w.T)


def test_transposed_constant_read_by_several_matmuls_is_stored_once():
    nodes = [transpose("w", "wt", [1, 0]), oh.make_node("MatMul", ["x", "wt"], ["m"]),
             oh.make_node("MatMul", ["m", "wt"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 6])], [vi("y", None)], [f32("w", rand(6, 6))])
    after, [result] = apply_passes(proto, FoldTransposeIntoGemm())
    assert result.stats["weights_transposed"] == 1 and dict(count_ops(after)) == {"MatMul": 2}
    assert len(after.graph.initializer) == 1


def test_weight_transposes_near_misses_are_left_alone():
    # the weight is read by another node too: transposing it would store it twice
    shared = build_model([transpose("w", "wt", [1, 0]), oh.make_node("MatMul", ["x", "wt"], ["y"]),
                          oh.make_node("MatMul", ["x", "w"], ["z"])],
                         [vi("x", ["N", 4, 6])], [vi("y", None), vi("z", None)],
                         [f32("w", rand(6, 6))])
    assert_pass_unchanged(shared, FoldTransposeIntoGemm())
    # the weight is an initializer a caller may override (also a graph input)
    overridable = build_model([transpose("w", "wt", [1, 0]),
                               oh.make_node("MatMul", ["x", "wt"], ["y"])],
                              [vi("x", ["N", 4, 6]), vi("w", [5, 6])], [vi("y", None)],
                              [f32("w", rand(5, 6))])
    assert_pass_unchanged(overridable, FoldTransposeIntoGemm())
    # the transposed weight is a graph output
    exposed = build_model([transpose("w", "wt", [1, 0]),
                           oh.make_node("MatMul", ["x", "wt"], ["y"])],
                          [vi("x", ["N", 4, 6])], [vi("y", None), vi("wt", [6, 5])],
                          [f32("w", rand(5, 6))])
    assert_pass_unchanged(exposed, FoldTransposeIntoGemm())


@pytest.mark.parametrize("side", ["a", "b", "both"])
def test_2d_matmul_with_a_transposed_operand_becomes_gemm(side):
    nodes, a, b = [], "a", "b"
    if side in ("a", "both"):
        nodes.append(transpose("a", "at", [1, 0]))
        a = "at"
    if side in ("b", "both"):
        nodes.append(transpose("b", "bt", [1, 0]))
        b = "bt"
    nodes.append(oh.make_node("MatMul", [a, b], ["y"]))
    a_shape = [6, "N"] if a == "at" else ["N", 6]
    b_shape = [5, 6] if b == "bt" else [6, 5]
    proto = build_model(nodes, [vi("a", a_shape), vi("b", b_shape)], [vi("y", None)])
    after, [result] = apply_passes(proto, FoldTransposeIntoGemm())
    assert result.stats["matmul_to_gemm"] == 1 and dict(count_ops(after)) == {"Gemm": 1}
    got = attrs_of(node_of(after, "Gemm"))
    assert got.get("transA", 0) == (side in ("a", "both"))
    assert got.get("transB", 0) == (side in ("b", "both"))


def test_batched_matmul_with_a_transposed_operand_is_left_alone():
    proto = build_model([transpose("k", "kt", [0, 2, 1]),
                         oh.make_node("MatMul", ["q", "kt"], ["y"])],
                        [vi("q", ["N", 4, 8]), vi("k", ["N", 4, 8])], [vi("y", None)])
    assert_pass_unchanged(proto, FoldTransposeIntoGemm())


def test_integer_matmul_is_left_alone():
    int64 = TensorProto.INT64
    proto = build_model([transpose("a", "at", [1, 0]), oh.make_node("MatMul", ["at", "b"], ["y"])],
                        [vi("a", [6, "N"], int64), vi("b", [6, 5], int64)], [vi("y", None, int64)])
    assert_pass_unchanged(proto, FoldTransposeIntoGemm())


# ====================================================================== sink-transposes
def sink_model(chain, inits=(), perm_in=NCHW_TO_NHWC, perm_out=NHWC_TO_NCHW,
               shape=("N", 4, 5, 6), extra_inputs=()):
    """x -> Transpose(perm_in) -> chain -> Transpose(perm_out) -> y. ``chain`` nodes read
    "t" and the last writes "u"."""
    nodes = [transpose("x", "t", perm_in), *chain, transpose("u", "y", perm_out)]
    return build_model(nodes, [vi("x", list(shape)), *extra_inputs], [vi("y", None)], inits)


def test_transpose_pair_around_a_unary_op_cancels():
    proto = sink_model([oh.make_node("Relu", ["t"], ["u"])])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["cancelled"] == 1 and dict(count_ops(after)) == {"Relu": 1}
    assert after.graph.node[0].output[0] == "y"


@pytest.mark.parametrize("const_shape", [(4,), (1, 6, 4), (1, 1, 1, 4), (6, 1), (2, 1, 1, 1),
                                         (), (1,)],
                         ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_transposes_cancel_through_a_chain_with_constants(const_shape):
    """Constants broadcasting against the NHWC [N, 5, 6, 4] side, of every rank, get
    permuted to the NCHW side."""
    chain = [oh.make_node("Add", ["t", "k"], ["a"]), oh.make_node("Sigmoid", ["a"], ["s"]),
             oh.make_node("Mul", ["k2", "s"], ["m"]), oh.make_node("Neg", ["m"], ["u"])]
    inits = [f32("k", rand(*const_shape)), f32("k2", rand(4))]
    shape = ("N", 4, 5, 6) if const_shape[:1] != (2,) else (2, 4, 5, 6)
    proto = sink_model(chain, inits, shape=shape)
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["cancelled"] == 1 and count_ops(after)["Transpose"] == 0
    assert result.stats["removed"] == 2 and result.stats["moved"] == 1


def test_sinking_through_cast_and_clip_with_runtime_bounds():
    chain = [oh.make_node("Clip", ["t", "lo", "hi"], ["c"]),
             oh.make_node("Cast", ["c"], ["u"], to=TensorProto.DOUBLE)]
    proto = build_model([transpose("x", "t", NCHW_TO_NHWC), *chain,
                         transpose("u", "y", NHWC_TO_NCHW)],
                        [vi("x", ["N", 4, 5, 6]), vi("lo", []), vi("hi", [])],
                        [vi("y", None, TensorProto.DOUBLE)])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert count_ops(after)["Transpose"] == 0 and result.stats["cancelled"] == 1


def test_transposes_that_do_not_cancel_merge_into_one():
    proto = sink_model([oh.make_node("Tanh", ["t"], ["u"])], perm_out=[0, 2, 1, 3])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["merged"] == 1 and dict(count_ops(after)) == {"Tanh": 1, "Transpose": 1}
    assert attrs_of(node_of(after, "Transpose"))["perm"] == [0, 3, 2, 1]


def test_two_transposes_by_one_perm_meet_at_a_binary_op():
    nodes = [transpose("a", "at", [0, 2, 1]), transpose("b", "bt", [0, 2, 1]),
             oh.make_node("Relu", ["at"], ["ar"]), oh.make_node("Exp", ["bt"], ["be"]),
             oh.make_node("Add", ["ar", "be"], ["y"])]
    proto = build_model(nodes, [vi("a", ["N", 4, 6]), vi("b", ["N", 1, 6])], [vi("y", None)])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["removed"] == 1 and count_ops(after)["Transpose"] == 1
    assert node_of(after, "Transpose").output[0] == "y"


def test_meeting_then_cancelling():
    """Add(T(a), T(b)) -> T(Add(a, b)), then the T cancels with the one after."""
    nodes = [transpose("a", "at", NCHW_TO_NHWC), transpose("b", "bt", NCHW_TO_NHWC),
             oh.make_node("Add", ["at", "bt"], ["s"]), oh.make_node("Relu", ["s"], ["r"]),
             transpose("r", "y", NHWC_TO_NCHW)]
    proto = build_model(nodes, [vi("a", ["N", 4, 5, 6]), vi("b", ["N", 4, 5, 6])],
                        [vi("y", None)])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert count_ops(after)["Transpose"] == 0 and dict(count_ops(after)) == {"Add": 1, "Relu": 1}


def test_sink_near_misses_are_left_alone():
    # the Transpose's output is a graph output
    exposed = sink_model([oh.make_node("Relu", ["t"], ["u"])])
    exposed.graph.output.append(vi("t", ["N", 5, 6, 4]))
    assert_pass_unchanged(exposed, SinkTransposes())
    # the Transpose's output is also read by an op that cannot move (Softmax)
    shared = build_model([transpose("x", "t", NCHW_TO_NHWC), oh.make_node("Relu", ["t"], ["u"]),
                          transpose("u", "y", NHWC_TO_NCHW),
                          oh.make_node("Softmax", ["t"], ["z"], axis=-1)],
                         [vi("x", ["N", 4, 5, 6])], [vi("y", None), vi("z", None)])
    assert_pass_unchanged(shared, SinkTransposes())
    # an intermediate of the chain is a graph output, so it would need a Transpose back,
    # and the Transposes at the end merge instead of cancelling: no gain
    mid = sink_model([oh.make_node("Relu", ["t"], ["r"]), oh.make_node("Neg", ["r"], ["u"])],
                     perm_out=[0, 2, 1, 3])
    mid.graph.output.append(vi("r", ["N", 5, 6, 4]))
    assert_pass_unchanged(mid, SinkTransposes())
    # the chain ends somewhere else than a Transpose (sinking would gain nothing)
    nowhere = build_model([transpose("x", "t", NCHW_TO_NHWC), oh.make_node("Relu", ["t"], ["y"])],
                          [vi("x", ["N", 4, 5, 6])], [vi("y", None)])
    assert_pass_unchanged(nowhere, SinkTransposes())
    # a binary op of two Transposes with different perms
    different = build_model([transpose("a", "at", [0, 2, 1]), transpose("b", "bt", [2, 1, 0]),
                             oh.make_node("Add", ["at", "bt"], ["y"])],
                            [vi("a", [4, 4, 4]), vi("b", [4, 4, 4])], [vi("y", None)])
    assert_pass_unchanged(different, SinkTransposes())
    # a binary op whose other operand is neither constant nor transposed
    mixed = sink_model([oh.make_node("Add", ["t", "z"], ["u"])],
                       extra_inputs=[vi("z", ["N", 5, 6, 4])])
    assert_pass_unchanged(mixed, SinkTransposes())
    # a constant of higher rank than the transposed tensor (widens the output)
    wide = sink_model([oh.make_node("Add", ["t", "k"], ["u"])], [f32("k", rand(2, 1, 5, 6, 4))],
                      perm_out=[0, 1, 4, 2, 3])
    assert_pass_unchanged(wide, SinkTransposes())
    # a non-elementwise op in the chain
    softmax = sink_model([oh.make_node("Softmax", ["t"], ["u"], axis=-1)])
    assert_pass_unchanged(softmax, SinkTransposes())


def test_a_graph_output_inside_the_chain_gets_a_transpose_back():
    proto = sink_model([oh.make_node("Relu", ["t"], ["r"]), oh.make_node("Neg", ["r"], ["u"])])
    proto.graph.output.append(vi("r", ["N", 5, 6, 4]))
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["removed"] == 1 and count_ops(after)["Transpose"] == 1
    assert node_of(after, "Transpose").output[0] == "r"


def test_every_reader_of_a_shared_transpose_moves():
    """t is read by Relu (-> inverse Transpose) and by Sigmoid (-> graph output z): both
    readers move; z gets the one Transpose left."""
    proto = build_model([transpose("x", "t", NCHW_TO_NHWC), oh.make_node("Relu", ["t"], ["u"]),
                         transpose("u", "y", NHWC_TO_NCHW), oh.make_node("Sigmoid", ["t"], ["z"])],
                        [vi("x", ["N", 4, 5, 6])], [vi("y", None), vi("z", None)])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["removed"] == 1 and count_ops(after)["Transpose"] == 1
    assert node_of(after, "Transpose").output[0] == "z"


def test_gelu_diamond_moves_as_one_region():
    """x * 0.5 * (1 + Erf(x / sqrt 2)) on the transposed tensor: the branches rejoin."""
    inits = [f32("sqrt2", np.sqrt(2)), f32("one", 1.0), f32("half", 0.5)]
    chain = [oh.make_node("Div", ["t", "sqrt2"], ["d"]), oh.make_node("Erf", ["d"], ["e"]),
             oh.make_node("Add", ["e", "one"], ["a"]), oh.make_node("Mul", ["t", "a"], ["m"]),
             oh.make_node("Mul", ["m", "half"], ["u"])]
    after, [result] = apply_passes(sink_model(chain, inits), SinkTransposes())
    assert result.stats["removed"] == 2 and count_ops(after)["Transpose"] == 0


def test_pair_whose_second_transpose_is_a_graph_output_keeps_the_name():
    """x is a graph input, so the cancelled pair leaves an Identity named y."""
    proto = build_model([transpose("x", "t", [1, 0]), transpose("t", "y", [1, 0])],
                        [vi("x", ["N", 3])], [vi("y", None)])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["cancelled"] == 1 and dict(count_ops(after)) == {"Identity": 1}


def test_sinking_in_a_subgraph():
    branch = oh.make_graph([transpose("x", "t", [1, 0]), oh.make_node("Relu", ["t"], ["r"]),
                            transpose("r", "b_out", [1, 0])], "then", [], [vi("b_out", None)])
    other = oh.make_graph([oh.make_node("Neg", ["x"], ["e_out"])], "else", [],
                          [vi("e_out", None)])
    proto = build_model([oh.make_node("If", ["cond"], ["y"], then_branch=branch,
                                      else_branch=other)],
                        [vi("x", ["N", 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)])
    after, [result] = apply_passes(proto, SinkTransposes())
    assert result.stats["cancelled"] == 1 and count_ops(after)["Transpose"] == 0


def test_through_the_manager_with_dynamic_batch():
    """An NHWC island between two Convs, as converters from TensorFlow write it: NCHW ->
    NHWC, bias Add and Relu in NHWC, back to NCHW; and a Gemm reading a Transpose."""
    c = 4
    inits = [f32("w1", rand(c, 3, 3, 3)), f32("bias", rand(c)), f32("w2", rand(c, c, 1, 1)),
             f32("fc", rand(5, c * 36))]
    nodes = [oh.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             transpose("c1", "h", NCHW_TO_NHWC), oh.make_node("Add", ["h", "bias"], ["hb"]),
             oh.make_node("Relu", ["hb"], ["hr"]), transpose("hr", "back", NHWC_TO_NCHW),
             oh.make_node("Conv", ["back", "w2"], ["c2"], kernel_shape=[1, 1]),
             oh.make_node("Flatten", ["c2"], ["f"]), transpose("fc", "fct", [1, 0]),
             oh.make_node("Gemm", ["f", "fct"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5])], inits)
    passes = ",".join(LOSSLESS_PIPELINE[:-1]) + \
        ",sink-transposes,fold-transpose-into-gemm,eliminate-dead-code"
    for size in (1, 3):
        feeds = verify.probe_inputs(proto, count=2, seed=size, symbolic_size=size)
        result = graphopt.optimize(proto, passes=passes, data=feeds)
        assert result.report["verification"]["ok"] is True
        assert result.report["rolled_back"] == []
        ops = count_ops(result.model.to_onnx())
        assert ops["Transpose"] == 0 and ops["Add"] == 0  # the bias went into the Conv
        # the ORT pipeline then fuses the Relu into the first Conv
        assert dict(ops) == {"Conv": 1, "FusedConv": 1, "Flatten": 1, "Gemm": 1}


def test_pytorch_permutes_around_elementwise_ops_cancel():
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.scale = torch.nn.Parameter(torch.rand(8) + 0.5)
            self.conv2 = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.conv(x).permute(0, 2, 3, 1)           # NHWC
            h = torch.nn.functional.gelu(h * self.scale)   # per-channel scale, last axis
            return self.conv2(h.permute(0, 3, 1, 2))       # back to NCHW

    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Block().eval(), (torch.randn(2, 3, 8, 8),), buffer, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}},
                          opset_version=17)
    proto = onnx.load_from_string(buffer.getvalue())
    assert count_ops(proto)["Transpose"] == 2
    passes = ",".join(LOSSLESS_PIPELINE[:-1]) + ",sink-transposes,eliminate-dead-code"
    result = graphopt.optimize(proto, passes=passes)
    assert result.report["verification"]["ok"] is True and result.report["rolled_back"] == []
    assert count_ops(result.model.to_onnx())["Transpose"] == 0


def random_layout_graph(seed: int) -> onnx.ModelProto:
    """A random DAG of Transposes (4 perms), unary ops, binary ops of equal-shaped tensors
    and binary ops with broadcasting constants, over two [N, 3, 4, 5] inputs."""
    gen = np.random.default_rng(seed)
    perms = [[0, 2, 3, 1], [0, 3, 1, 2], [1, 0, 2, 3], [0, 1, 3, 2]]
    shapes = {"x": ["N", 3, 4, 5], "w": ["N", 3, 4, 5]}
    nodes, inits = [], []
    for i in range(int(gen.integers(3, 12))):
        name, src = f"t{i}", str(gen.choice(list(shapes)))
        shape, kind = shapes[src], gen.choice(["T", "T", "unary", "binary", "constant"])
        if kind == "T":
            perm = perms[int(gen.integers(len(perms)))]
            nodes.append(transpose(src, name, perm))
            shape = [shape[p] for p in perm]
        elif kind == "unary":
            nodes.append(oh.make_node(str(gen.choice(["Relu", "Neg", "Sigmoid", "Abs"])),
                                      [src], [name]))
        elif kind == "binary":
            other = str(gen.choice([t for t in shapes if shapes[t] == shape]))
            nodes.append(oh.make_node(str(gen.choice(["Add", "Mul", "Sub"])), [src, other],
                                      [name]))
        else:
            rank = int(gen.integers(0, 5))
            dims = [d if gen.random() < 0.6 and d != "N" else 1 for d in shape[4 - rank:]]
            inits.append(f32(f"c{i}", rng.standard_normal(dims)))
            operands = [src, f"c{i}"] if gen.random() < 0.5 else [f"c{i}", src]
            nodes.append(oh.make_node(str(gen.choice(["Add", "Mul", "Sub"])), operands, [name]))
        shapes[name] = shape
    read = {i for n in nodes for i in n.input}
    outputs = {nodes[-1].output[0]} | {n.output[0] for n in nodes
                                       if n.output[0] not in read or gen.random() < 0.2}
    return build_model(nodes, [vi("x", ["N", 3, 4, 5]), vi("w", ["N", 3, 4, 5])],
                       [vi(o, None) for o in sorted(outputs)], inits)


@pytest.mark.parametrize("seed", range(40))
def test_random_layout_graphs(seed):
    """Outputs stay equal, names stay, and a change always removes Transposes."""
    proto = random_layout_graph(seed)
    after, [result] = apply_passes(proto, SinkTransposes(), batches=(2,))
    before, now = count_ops(proto)["Transpose"], count_ops(after)["Transpose"]
    assert now < before if result.changed else now == before
    assert result.stats["removed"] == before - now
