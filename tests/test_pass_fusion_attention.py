"""fuse-attention: scaled-dot-product self-attention → com.microsoft.Attention (ORT) or
ONNX Attention (opset 23, targets without com.microsoft), on handcrafted blocks (every
variant of scale, Kᵀ and mask, and the near misses that must stay) and on the zoo's BERTs
as both exporters write them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
import graphopt.registry
from graphopt import verify
from graphopt.cost import Device
from graphopt.ir import load
from graphopt.pass_infra import PassContext
from graphopt.passes.cleanup.dce import EliminateDeadCode
from graphopt.passes.fusion.attention import FuseAttention
from graphopt.target import Artifact, Capabilities, Target
from graphopt.targets.ort import OrtTarget
from helpers import count_ops
from tests import zoo

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
FINFO_MIN = float(np.finfo(np.float32).min)
SIZES = [(1, 5), (3, 5), (1, 17), (3, 17)]  # (batch, sequence)
ATOL, RTOL = 1e-5, 1e-4
SENTENCES = ("Hi.", "A man is eating food.",
             "The quick brown fox jumps over the lazy dog near the river bank.",
             "ONNX graphs can be optimized without changing what they compute, one fused "
             "attention block at a time, on every target.")


class _PlainOnnx(Target):
    """A target that runs standard ONNX only (no com.microsoft)."""

    name = "plain-onnx-attention-test"
    device = Device(name="test", peak_flops={"float32": 1e9}, bandwidth=1e9)
    capabilities = Capabilities(domains=frozenset({""}))

    def lower(self, model, out: Path) -> Artifact:  # pragma: no cover - never lowered
        raise NotImplementedError

    def run(self, artifact, feeds):  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------- the block
@dataclass(frozen=True)
class Spec:
    """One handcrafted attention block: x [B,S,E] → MatMul+Add ×3 → heads → scores →
    [mask] → Softmax → @V → merged heads (the graph output ``out``)."""

    hidden: int = 16
    heads: int = 2
    scale: str = "scores-mul"  # scores-mul | scores-div | qk-sqrt | custom | input
    scale_source: str = "initializer"  # initializer | constant
    key: str = "0231"  # 0231 | 0213-0132 | 3d
    mask: str = "none"  # none | classic | classic-finfo | where | where-inf | greater
    #                     | float-input | reversed | inverted | x-dependent
    mask_dtype: int = INT64
    nan_guard: bool = False
    softmax_axis: int = -1
    probs_output: bool = False  # the probabilities are also a graph output
    scores_read: bool = False  # the scores are also read outside the block
    cross: bool = False  # K and V from another input
    weight_input: bool = False  # the Q weight is a graph input
    opset: int = 17
    layers: int = 1  # stacked blocks sharing the mask
    batch: str | int = "B"
    seq: str | int = "S"
    identities: bool = False  # Identity nodes inside the block (and on x)

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


class _Builder:
    """Writes the model a ``Spec`` describes (deterministic weights)."""

    def __init__(self, spec: Spec, seed: int = 0):
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [oh.make_tensor_value_info("x", FLOAT, [spec.batch, spec.seq, spec.hidden])]
        self.outputs: list[onnx.ValueInfoProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def node(self, op, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(oh.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def const(self, hint: str, value, dtype=np.float32) -> str:
        """A constant as an initializer or a Constant node (``scale_source``)."""
        name = self.name(hint)
        if self.spec.scale_source == "constant":
            self.nodes.append(oh.make_node("Constant", [], [name], name=f"{name}_node",
                                           value=numpy_helper.from_array(
                                               np.asarray(value, dtype=dtype), name)))
        else:
            self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def init(self, hint: str, value, dtype=np.float32) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def projection(self, x: str, as_input: bool = False) -> str:
        e = self.spec.hidden
        if as_input:
            w = self.name("w")
            self.inputs.append(oh.make_tensor_value_info(w, FLOAT, [e, e]))
        else:
            w = self.init("w", self.rng.standard_normal((e, e)) / math.sqrt(e))
        b = self.init("b", self.rng.standard_normal(e) * 0.1)
        return self.node("Add", [self.node("MatMul", [x, w]), b])

    def split(self, t: str) -> str:
        s = self.spec
        return self.node("Reshape", [t, self.init("split", [0, 0, s.heads, s.head_size],
                                                  np.int64)])

    def key_transposed(self, k: str) -> str:
        split = self.split(k)
        if self.spec.key == "0231":
            return self.node("Transpose", [split], perm=[0, 2, 3, 1])
        k4 = self.node("Transpose", [split], perm=[0, 2, 1, 3])
        if self.spec.key == "0213-0132":
            return self.node("Transpose", [k4], perm=[0, 1, 3, 2])
        # dynamo: Reshape [-1, S, D] → Transpose(0,2,1) → Reshape [B, H, D, S]
        shape = self.node("Shape", [k4])
        tail = self.node("Slice", [shape, self.init("s", [2], np.int64),
                                   self.init("e", [4], np.int64)])
        flat = self.node("Reshape", [k4, self.node("Concat", [self.init("m1", [-1], np.int64),
                                                               tail], axis=0)])
        swapped = self.node("Transpose", [flat], perm=[0, 2, 1])
        lead = self.node("Slice", [shape, self.init("s", [0], np.int64),
                                   self.init("e", [2], np.int64)])
        d = self.node("Slice", [shape, self.init("s", [3], np.int64),
                                self.init("e", [4], np.int64)])
        s_ = self.node("Slice", [shape, self.init("s", [2], np.int64),
                                 self.init("e", [3], np.int64)])
        return self.node("Reshape", [swapped, self.node("Concat", [lead, d, s_], axis=0)])

    def scale_value(self) -> float:
        return 0.3 if self.spec.scale == "custom" else 1.0 / math.sqrt(self.spec.head_size)

    def mask_bias(self) -> str | None:
        """The additive mask (built once, shared by all layers)."""
        kind = self.spec.mask
        if kind == "none":
            return None
        if kind == "float-input":  # an arbitrary additive bias: not a padding mask
            self.inputs.append(oh.make_tensor_value_info("bias", FLOAT, ["B", 1, 1, "S"]))
            return "bias"
        self.inputs.append(oh.make_tensor_value_info("m", self.spec.mask_dtype,
                                                     [self.spec.batch, self.spec.seq]))
        m = "m"
        if kind == "reversed":  # m[:, ::-1]: depends on m only, but not its padding mask
            m = self.node("Slice", ["m", self.init("s", [-1], np.int64),
                                    self.init("e", [-(2 ** 62)], np.int64),
                                    self.init("a", [1], np.int64),
                                    self.init("st", [-1], np.int64)])
        if kind == "x-dependent":  # m and a test on x's values: not m's padding mask
            first = self.node("Gather", ["x", self.init("i", 0, np.int64)], axis=2)
            m = self.node("And", [self.node("Cast", [m], to=TensorProto.BOOL),
                                  self.node("Greater", [first, self.init("low", -1e30)])])
        ext = self.node("Unsqueeze", [m, self.init("axes", [1, 2], np.int64)])
        if kind in ("classic", "classic-finfo"):
            inverted = self.node("Sub", [self.init("one", 1.0),
                                         self.node("Cast", [ext], to=FLOAT)])
            neg = -10000.0 if kind == "classic" else FINFO_MIN
            return self.node("Mul", [inverted, self.init("neg", neg)])
        if kind == "greater":  # a boolean mask built otherwise: recognized by its value
            keep = self.node("Greater", [ext, self.init("zero", 0, np.int64)])
        else:
            keep = self.node("Cast", [ext], to=TensorProto.BOOL)
        fill = -math.inf if kind == "where-inf" else FINFO_MIN
        if kind == "inverted":  # masks the tokens, keeps the padding
            return self.node("Where", [keep, self.init("neg", [fill]), self.init("zero", [0.0])])
        return self.node("Where", [keep, self.init("zero", [0.0]), self.init("neg", [fill])])

    def block(self, x: str, bias: str | None, layer: int) -> str:
        s = self.spec
        if s.identities:
            x = self.node("Identity", [x])
        kv_source = "y" if s.cross else x
        q = self.projection(x, as_input=s.weight_input)
        k = self.projection(kv_source)
        v = self.projection(kv_source)
        q4 = self.node("Transpose", [self.split(q)], perm=[0, 2, 1, 3])
        if s.identities:
            q4 = self.node("Identity", [q4])
        kt = self.key_transposed(k)
        v4 = self.node("Transpose", [self.split(v)], perm=[0, 2, 1, 3])
        if s.scale == "qk-sqrt":  # √scale on Q and on Kᵀ, computed Sqrt → Cast
            root = self.node("Cast", [self.node("Sqrt", [self.const("c", self.scale_value(),
                                                                    np.float64)])], to=FLOAT)
            q4, kt = self.node("Mul", [q4, root]), self.node("Mul", [root, kt])
        scores = self.node("MatMul", [q4, kt])
        if s.scale in ("scores-mul", "custom"):
            scores = self.node("Mul", [scores, self.const("scale", self.scale_value())])
        elif s.scale == "scores-div":
            scores = self.node("Div", [scores, self.const("sqrt_d", math.sqrt(s.head_size))])
        elif s.scale == "input":
            scores = self.node("Mul", [scores, "scale_in"])
        if s.scores_read and layer == 0:
            self.outputs.append(oh.make_tensor_value_info(
                self.node("ReduceMax", [scores], keepdims=0), FLOAT, None))
        if bias is not None:
            scores = self.node("Add", [scores, bias])
        probs = self.node("Softmax", [scores], axis=s.softmax_axis)
        if s.identities:
            probs = self.node("Identity", [probs])
        if s.probs_output and layer == 0:
            self.outputs.append(oh.make_tensor_value_info(probs, FLOAT, None))
        if s.nan_guard:
            probs = self.node("Where", [self.node("IsNaN", [probs]), self.init("z", [0.0]), probs])
        context = self.node("Transpose", [self.node("MatMul", [probs, v4])], perm=[0, 2, 1, 3])
        return self.node("Reshape", [context, self.init("merge", [0, 0, s.hidden], np.int64)])

    def build(self) -> onnx.ModelProto:
        s = self.spec
        if s.cross:
            self.inputs.append(oh.make_tensor_value_info("y", FLOAT, [s.batch, s.seq, s.hidden]))
        if s.scale == "input":
            self.inputs.append(oh.make_tensor_value_info("scale_in", FLOAT, []))
        bias = self.mask_bias()
        x = "x"
        for layer in range(s.layers):
            out = self.block(x, bias, layer)
            x = self.node("Add", [out, x]) if layer + 1 < s.layers else out
        self.nodes.append(oh.make_node("Identity", [x], ["out"], name="out_node"))
        self.outputs.insert(0, oh.make_tensor_value_info("out", FLOAT,
                                                         [s.batch, s.seq, s.hidden]))
        graph = oh.make_graph(self.nodes, "attention", self.inputs, self.outputs, self.inits)
        proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", s.opset)])
        proto = onnx.shape_inference.infer_shapes(proto)  # types of the extra outputs
        onnx.checker.check_model(proto, full_check=True)
        return proto


def attention_model(**kwargs) -> onnx.ModelProto:
    return _Builder(Spec(**kwargs)).build()


def feeds_for(proto: onnx.ModelProto, batch: int, seq: int, seed: int = 0,
              fully_padded: bool = False) -> dict[str, np.ndarray]:
    """Inputs for ``proto``: random floats; masks padded on the right to different
    lengths (every row keeps a token unless ``fully_padded``, which pads the last row)."""
    rng = np.random.default_rng(seed + 10 * batch + seq)
    feeds = {}
    for name, dtype, shape in verify.input_specs(proto):
        dims = [{"B": batch, "S": seq}.get(d, d) for d in shape]
        if name == "m":
            mask = np.array([[1 if j < max(1, seq - 2 * i) else 0 for j in range(seq)]
                             for i in range(batch)])
            if fully_padded:
                mask[-1] = 0
            feeds[name] = mask.astype(dtype)
        elif name == "bias":
            feeds[name] = np.where(rng.random(dims) < 0.3, -1e4, 0).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(dims).astype(dtype)
    return feeds


# ---------------------------------------------------------------------- running the pass
def fuse(proto: onnx.ModelProto, ctx: PassContext | None = None, dce: bool = True):
    """Run fuse-attention (then dead-code elimination) as the manager would: loaded and
    shape-inferred. Returns the result proto and the pass's result."""
    model = load(proto)
    model.infer_shapes()
    result = FuseAttention().run(model, ctx or PassContext(target=OrtTarget()))
    if dce:
        EliminateDeadCode().run(model, PassContext())
    after = model.to_onnx()
    onnx.checker.check_model(after)
    onnx.shape_inference.infer_shapes(after, strict_mode=True)
    return after, result


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, sizes=SIZES,
                        atol: float = ATOL, **feed_kwargs) -> None:
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    for batch, seq in sizes:
        feeds = feeds_for(before, batch, seq, **feed_kwargs)
        expected, got = verify.run(before, feeds), verify.run(after, feeds)
        for name, value in expected.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=atol,
                                       err_msg=f"{name} at batch {batch}, sequence {seq}")


def assert_left_alone(proto: onnx.ModelProto, ctx: PassContext | None = None) -> None:
    model = load(proto)
    model.infer_shapes()
    before = count_ops(model.to_onnx())
    result = FuseAttention().run(model, ctx or PassContext(target=OrtTarget()))
    assert not result.changed and result.stats.get("fused", 0) == 0, result.stats
    assert count_ops(model.to_onnx()) == before


def attention_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == "Attention"]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: oh.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------- handcrafted blocks
def test_without_mask_mul_scale():
    """The plain block (scale Mul on the scores, no mask) becomes one com.microsoft
    Attention on x with packed Q|K|V weights and bias; nothing of the block is left."""
    proto = attention_model()
    after, result = fuse(proto)
    assert result.changed and result.stats["fused"] == 1
    ops = count_ops(after)
    assert ops["Attention"] == 1 and ops["Softmax"] == 0 and ops["MatMul"] == 0 \
        and ops["Transpose"] == 0 and ops["Reshape"] == 0
    (node,) = attention_nodes(after)
    assert node.domain == "com.microsoft" and list(node.input)[0] == "x"
    assert attrs(node) == {"num_heads": 2}  # the scale is 1/sqrt(d): no attribute
    weights = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert weights[node.input[1]].shape == (16, 48) and weights[node.input[2]].shape == (48,)
    assert {o.domain: o.version for o in after.opset_import}.get("com.microsoft") == 1
    assert_same_outputs(proto, after)


@pytest.mark.parametrize("mask", ["classic", "classic-finfo", "where"])
def test_with_padding_mask(mask):
    """A padding mask of the 2-D input m becomes mask_index: m cast to int32, the mask's
    fill value as mask_filter_value."""
    proto = attention_model(mask=mask)
    after, _ = fuse(proto)
    (node,) = attention_nodes(after)
    cast = next(n for n in after.graph.node if n.output[0] == node.input[3])
    assert cast.op_type == "Cast" and list(cast.input) == ["m"] \
        and attrs(cast)["to"] == TensorProto.INT32
    fill = -10000.0 if mask == "classic" else FINFO_MIN
    assert attrs(node)["mask_filter_value"] == pytest.approx(fill)
    ops = count_ops(after)
    assert ops["Softmax"] == ops["Sub"] == ops["Unsqueeze"] == ops["Where"] == 0
    assert_same_outputs(proto, after)


@pytest.mark.parametrize("spec", [
    dict(scale="scores-div"),
    dict(scale="qk-sqrt"),
    dict(scale="qk-sqrt", scale_source="constant"),
    dict(scale="scores-mul", scale_source="constant"),
    dict(key="0213-0132"),
    dict(key="3d", scale="qk-sqrt", mask="where", nan_guard=True),
    dict(key="3d", mask="classic", scale="scores-div"),
    dict(mask="where-inf", nan_guard=True),
    dict(mask="greater"),
    dict(mask="where", hidden=24, heads=3),
    dict(mask="classic", opset=13),
    dict(mask="where", identities=True),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_variants_fuse(spec):
    """Every scale placement, Kᵀ form, mask form and constant kind matches."""
    proto = attention_model(**spec)
    after, result = fuse(proto)
    assert result.stats["fused"] == 1 and count_ops(after)["Softmax"] == 0
    (node,) = attention_nodes(after)
    assert attrs(node)["num_heads"] == spec.get("heads", 2) and "scale" not in attrs(node)
    assert_same_outputs(proto, after)


def test_custom_scale_becomes_the_scale_attribute():
    proto = attention_model(scale="custom", mask="where")
    after, _ = fuse(proto)
    (node,) = attention_nodes(after)
    assert attrs(node)["scale"] == pytest.approx(0.3)
    assert_same_outputs(proto, after)


@pytest.mark.parametrize("mask", ["where-inf", "where", "classic-finfo"])
def test_fully_padded_rows_match_the_original(mask):
    """A sequence that is all padding: with -inf and the NaN guard the original gives
    zeros (the fused op gets the guard too); with finfo.min it averages V (the fused op
    fills with the same value)."""
    proto = attention_model(mask=mask, nan_guard=mask == "where-inf")
    after, _ = fuse(proto)
    if mask == "where-inf":
        assert count_ops(after)["IsNaN"] == 1
    assert_same_outputs(proto, after, fully_padded=True)
    feeds = feeds_for(proto, 3, 5, fully_padded=True)
    if mask == "where-inf":
        assert not verify.run(after, feeds)["out"][-1].any()


@pytest.mark.parametrize("dtype", [TensorProto.INT32, TensorProto.BOOL, TensorProto.FLOAT])
def test_mask_input_types(dtype):
    """An int32 mask goes in as it is; bool and float masks get a Cast."""
    proto = attention_model(mask="where", mask_dtype=dtype)
    after, _ = fuse(proto)
    (node,) = attention_nodes(after)
    assert (node.input[3] == "m") == (dtype == TensorProto.INT32)
    assert_same_outputs(proto, after)


def test_stacked_layers_share_one_mask_cast_and_the_mask_subgraph_dies():
    proto = attention_model(mask="classic", layers=3)
    after, result = fuse(proto)
    assert result.stats["fused"] == 3
    ops = count_ops(after)
    assert ops["Attention"] == 3 and ops["Cast"] == 1
    assert ops["Sub"] == ops["Unsqueeze"] == ops["Mul"] == 0
    assert_same_outputs(proto, after)


def test_dead_code_is_what_sweeps_the_mask_subgraph():
    """The pass removes the blocks; the mask computation they shared is left to
    eliminate-dead-code."""
    proto = attention_model(mask="classic", layers=2)
    before_ops = count_ops(proto)
    kept, _ = fuse(proto, dce=False)
    assert count_ops(kept)["Sub"] == before_ops["Sub"] == 1
    swept, _ = fuse(proto)
    assert count_ops(swept)["Sub"] == 0


@pytest.mark.parametrize("spec", [
    dict(probs_output=True),
    dict(probs_output=True, nan_guard=True, mask="where-inf"),
    dict(scores_read=True),
    dict(softmax_axis=2),
    dict(softmax_axis=1, opset=11),  # opset < 13: no axis means 1
    dict(scale="input"),
    dict(cross=True),
    dict(weight_input=True),
    dict(mask="float-input"),
    dict(mask="reversed"),
    dict(mask="inverted"),
    dict(mask="x-dependent"),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_near_misses_are_left_alone(spec):
    """Intermediates read elsewhere or returned, Softmax over another axis, a scale that
    is no constant, cross-attention, a weight that is no constant, and masks that are not
    the padding mask of a graph input: the block stays exactly as it was."""
    if spec.get("opset") == 11:
        proto = attention_model(**{k: v for k, v in spec.items() if k != "softmax_axis"})
        for node in proto.graph.node:
            if node.op_type == "Softmax":
                del node.attribute[:]
    else:
        proto = attention_model(**spec)
    assert_left_alone(proto)


def test_the_unmatched_block_of_two_is_left_as_it_was():
    """Of two blocks, the one whose probabilities are returned stays, the other fuses."""
    proto = attention_model(layers=2, probs_output=True, mask="where")
    after, result = fuse(proto)
    assert result.stats["fused"] == 1
    assert count_ops(after)["Softmax"] == 1 and count_ops(after)["Attention"] == 1
    assert_same_outputs(proto, after)


def test_dynamic_batch_and_sequence():
    """One fused model serves every batch and sequence length."""
    proto = attention_model(mask="where", key="3d", scale="qk-sqrt", nan_guard=True)
    after, _ = fuse(proto)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in after.graph.input]
    assert dims == [["B", "S", 16], ["B", "S"]]
    assert_same_outputs(proto, after, sizes=[(1, 5), (3, 5), (1, 17), (3, 17), (2, 1)])


@pytest.mark.parametrize("mask", ["where", "greater"])
def test_static_shapes(mask):
    """Fixed batch and sequence: the shape checks compare numbers, and a mask recognized
    by its value is evaluated at the fixed sizes."""
    proto = attention_model(mask=mask, batch=2, seq=7, key="3d")
    after, result = fuse(proto)
    assert result.stats["fused"] == 1
    assert_same_outputs(proto, after, sizes=[(2, 7)])


def test_through_the_manager():
    proto = attention_model(mask="where-inf", nan_guard=True, layers=2, key="3d")
    result = graphopt.optimize(proto, passes="fuse-attention,eliminate-dead-code")
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    assert count_ops(result.model.to_onnx())["Attention"] == 2


# ---------------------------------------------------------------------- per target
def test_standard_attention_for_a_target_without_contrib_ops():
    """No com.microsoft but opset 23: the standard ONNX Attention on the 3-D projections,
    the additive mask as attn_mask (expanded over the queries)."""
    proto = attention_model(mask="classic", opset=23, scale="custom")
    after, result = fuse(proto, PassContext(target=_PlainOnnx()))
    assert result.stats["fused"] == 1
    (node,) = attention_nodes(after)
    assert node.domain == "" and len(node.input) == 4
    assert attrs(node) == {"q_num_heads": 2, "kv_num_heads": 2, "scale": pytest.approx(0.3)}
    assert count_ops(after)["MatMul"] == 3 and count_ops(after)["Softmax"] == 0
    assert "com.microsoft" not in {o.domain for o in after.opset_import}
    assert_same_outputs(proto, after)


@pytest.mark.parametrize("spec", [dict(mask="where-inf", nan_guard=True, key="3d"),
                                  dict(mask="none", scale="qk-sqrt")])
def test_standard_attention_variants(spec):
    proto = attention_model(opset=23, **spec)
    after, _ = fuse(proto, PassContext(target=_PlainOnnx()))
    assert count_ops(after)["Attention"] == 1
    assert_same_outputs(proto, after, fully_padded=spec["mask"] != "none")


def test_target_without_attention_op_leaves_the_block():
    """No com.microsoft and opset < 23: nothing to emit."""
    assert_left_alone(attention_model(mask="where"), PassContext(target=_PlainOnnx()))


# ---------------------------------------------------------------------- exported BERTs
def bert_feeds(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + batch * 100 + seq)
    mask = np.ones((batch, seq), np.int64)
    for i in range(1, batch):
        mask[i, max(1, seq - 3 * i):] = 0
    return {"input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": mask}


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny(exporter):
    """Both blocks of the tiny BERT fuse; every output (the hidden states too) matches for
    batch 1 and 3, sequence 5 and 17, with padding."""
    proto = zoo.bert_tiny(exporter)
    after, result = fuse(proto)
    assert result.stats["fused"] == 2
    ops = count_ops(after)
    assert ops["Softmax"] == 0 and ops["Attention"] == 2
    for batch, seq in SIZES:
        feeds = bert_feeds(zoo.BERT_TINY_VOCAB, batch, seq)
        expected, got = verify.run(proto, feeds), verify.run(after, feeds)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_through_the_manager(exporter):
    """Verified on the manager's probe inputs (all-padding masks there), nothing rolled
    back, and the mask computation is gone after dead-code elimination."""
    proto = zoo.bert_tiny(exporter)
    result = graphopt.optimize(proto, passes="fuse-attention,eliminate-dead-code")
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    ops = count_ops(result.model.to_onnx())
    assert ops["Attention"] == 2 and ops["Softmax"] == 0
    assert ops["And"] == ops["GatherND"] == ops["Flatten"] == ops["Range"] == 0


CLEANUP = ("eliminate-identity,eliminate-noops,fold-shapes,fold-constants,fold-reshape-targets,"
           "merge-shape-chains,eliminate-common-subexpressions,merge-duplicate-initializers")
OTHER_FUSIONS = ("fuse-layer-norm", "fuse-skip-layer-norm", "fuse-gelu", "fuse-bias-gelu")


@pytest.mark.parametrize("order", ["cleanup-and-fusions-first", "attention-first"])
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_with_the_other_fusions(exporter, order):
    """Whether LayerNorm/GELU are fused (SkipLayerNormalization, BiasGelu: contrib ops the
    mask's shape arithmetic then reads) or not, and before or after the cleanups."""
    registered = graphopt.registry.pass_registry()
    others = ",".join(p for p in OTHER_FUSIONS if p in registered)
    passes = f"{CLEANUP},{others},fuse-attention" if order != "attention-first" else \
        f"fuse-attention,{CLEANUP},{others}"
    proto = zoo.bert_tiny(exporter)
    result = graphopt.optimize(proto, passes=passes + ",eliminate-dead-code")
    assert result.report["verification"]["ok"] is True and result.report["rolled_back"] == []
    after = result.model.to_onnx()
    assert count_ops(after)["Attention"] == 2 and count_ops(after)["Softmax"] == 0
    feeds = bert_feeds(zoo.BERT_TINY_VOCAB, 3, 17)
    expected, got = verify.run(proto, feeds), verify.run(after, feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_with_decomposed_layer_norms(exporter):
    """The BERT export with its LayerNorms written out (opset 14 TorchScript, dynamo)."""
    decomposed_bert = pytest.importorskip("tests.decomposed_bert")
    proto = decomposed_bert.bert_tiny(exporter)
    after, result = fuse(proto)
    assert result.stats["fused"] == 2 and count_ops(after)["Softmax"] == 0
    feeds = bert_feeds(zoo.BERT_TINY_VOCAB, 3, 17)
    expected, got = verify.run(proto, feeds), verify.run(after, feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_minilm_all_blocks_fused(exporter):
    """The real all-MiniLM-L6-v2: its 6 attention blocks fuse, and sentences of different
    lengths (padded) embed as before: cosine > 0.9999 each and allclose 1e-4."""
    proto = zoo.bert_minilm(exporter)
    result = graphopt.optimize(proto, passes="fuse-attention,eliminate-dead-code")
    assert result.report["verification"]["ok"] is True and result.report["rolled_back"] == []
    after = result.model.to_onnx()
    ops = count_ops(after)
    assert ops["Softmax"] == 0 and ops["Attention"] == 6
    assert all(n.domain == "com.microsoft" and attrs(n)["num_heads"] == 12
               for n in attention_nodes(after))
    feeds = zoo.minilm_tokenize(SENTENCES)
    assert len(set(feeds["attention_mask"].sum(1))) == len(SENTENCES)  # all padded differently
    ref = verify.run(proto, feeds)["sentence_embedding"].astype(np.float64)
    got = verify.run(after, feeds)["sentence_embedding"].astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.9999, cos
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
