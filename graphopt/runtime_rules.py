"""What ONNX Runtime runs in place of a graph's nodes, as the cost model must count it:
the QuantizeLinear/DequantizeLinear pairs it fuses into int8 kernels or drops around ops
that run on the quantized values, the residual Add and Relu its blocked convolutions
compute themselves, and the layout reorders (NCHWc) it inserts where a tensor enters or
leaves its blocked layout. Found by reading ORT's optimized graphs and profiles."""

from __future__ import annotations

import typing

import numpy as np
import onnx_graphsurgeon as gs

if typing.TYPE_CHECKING:
    from graphopt.cost import Device

# Quantized execution: a runtime fuses DequantizeLinear -> Conv/MatMul/Gemm into an int8
# kernel (ORT: QLinearConv, MatMulIntegerToFloat, QGemm) with prepacked int8 weights, so
# such a DequantizeLinear costs nothing and the op runs at the int8 peak on 1-byte data.
QDQ_FUSED = {"Conv", "MatMul", "Gemm"}


def from_dequantize(tensor: gs.Tensor) -> bool:
    return len(tensor.inputs) == 1 and tensor.inputs[0].op == "DequantizeLinear"


def fused_dequantize(node: gs.Node) -> bool:
    """A DequantizeLinear whose every reader is an op a runtime fuses it into, or a
    QuantizeLinear or DequantizeLinear a runtime drops around an op that runs on the
    quantized values (``qdq_dropped``)."""
    if node.op == "QuantizeLinear":
        return bool(node.inputs) and len(node.inputs[0].inputs) == 1 and \
            qdq_dropped(node.inputs[0].inputs[0])
    readers = node.outputs[0].outputs if node.op == "DequantizeLinear" and node.outputs else []
    return bool(readers) and (all(r.op in QDQ_FUSED for r in readers) or
                              all(qdq_dropped(r) for r in readers))


# Ops ONNX Runtime runs on the quantized values where a DequantizeLinear feeds them and
# only QuantizeLinear reads them: it drops the pair (its QDQ "drop" rules). A MaxPool then
# runs on uint8 (NhwcMaxPool; profiled in the int8 digits CNN: 74 us where the float
# pool and the pair around it were predicted at 360 us).
_DROPS_QDQ = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}


def qdq_dropped(node: gs.Node) -> bool:
    """An op between a DequantizeLinear and QuantizeLinear readers that runs on the
    quantized values themselves (``_DROPS_QDQ``)."""
    return node.op in _DROPS_QDQ and bool(node.inputs) and from_dequantize(node.inputs[0]) \
        and bool(node.outputs) and bool(node.outputs[0].outputs) and \
        all(r.op == "QuantizeLinear" for r in node.outputs[0].outputs)


def activation_pass(node: gs.Node) -> str | None:
    """The activation a fused convolution applies in a pass over its output of its own,
    or ``None``: ONNX Runtime's kernels apply Relu as they write the output, any other
    (Clip for ReLU6, Sigmoid, HardSigmoid, LeakyRelu, Tanh) after it (measured: 1x1
    convolutions alternating 24 -> 144 -> 24 channels at 56 x 56 ran 294 us per pair
    unfused, 309 with Relu, 373 with Clip; 16 -> 96 -> 16 at 112 x 112: 500, 516, 700)."""
    if node.op != "FusedConv":
        return None
    activation = node.attrs.get("activation")
    return None if activation in (None, "", "Relu") else str(activation)


def fused_into_conv(node: gs.Node, device: Device) -> bool:
    """A residual Add (or the Relu after it) that a runtime computes inside the
    convolution before it: ONNX Runtime's NCHWc convolutions add a second input into
    their output and apply the activation after it (ResNet's ``relu(conv(x) + skip)``
    runs as one kernel; profiled on the ResNet-style CNN, no Add or Relu kernel ran).
    The Conv must be one NCHWc takes (output channels a multiple of the device's
    channel block, input channels one too or fewer than it, no groups, no activation of
    its own), the Add its only reader, both of the Add's inputs the same shape."""
    if node.op == "Relu" and node.inputs and len(node.inputs[0].inputs) == 1:
        add = node.inputs[0].inputs[0]
        return len(add.outputs[0].outputs) == 1 and fused_into_conv(add, device)
    if node.op != "Add" or len(node.inputs) != 2 or any(
            t.shape is None or isinstance(t, gs.Constant) for t in node.inputs) or \
            node.inputs[0].shape != node.inputs[1].shape:
        return False
    for tensor in node.inputs:
        conv = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if conv is None or conv.op != "Conv" or len(tensor.outputs) != 1 or \
                conv.attrs.get("group", 1) != 1 or len(conv.inputs) < 2 or \
                conv.inputs[1].shape is None or len(conv.inputs[1].shape) != 4:
            continue
        if blocked(conv.inputs[1].shape, 1, device):
            return True
    return False


# Ops ONNX Runtime 1.32's NCHWc rewrite carries in the blocked layout when all their
# inputs are in it (found by building conv -> op -> conv and counting the reorders in the
# optimized graph: Erf, a broadcasting Mul and a Resize of the default mode are not);
# convolutions and pooling take any input, reordered into it first.
_FOLLOWS_LAYOUT = {"Add", "Sum", "Mul", "Concat", "Relu", "Sigmoid", "Tanh", "LeakyRelu",
                   "Clip", "HardSigmoid", "HardSwish", "QuickGelu", "Gelu",
                   "BatchNormalization", "GlobalAveragePool", "GlobalMaxPool"}
REORDERS = ("ReorderInput", "ReorderOutput")


def layout_reorders(graph: gs.Graph, device: Device) -> list[tuple[str, gs.Tensor]]:
    """The tensors of ``graph`` the runtime reorders into its blocked layout
    (``ReorderInput``) or out of it (``ReorderOutput``) on a device with one
    (``Device.blocked_layout``), in the runtime's rules: every float convolution with
    constant 4-D weights runs blocked, reading an input of fewer channels than the block
    as it is; a pooling op runs blocked where its channels are a multiple of the block;
    the ops in ``_FOLLOWS_LAYOUT`` stay blocked where all their inputs are (of one shape,
    for the elementwise ones). A blocked tensor that another op or the graph's output
    reads is reordered out once (EfficientNet-B0 here: 39 such reorders around its SiLUs
    and squeeze-excite products, a tenth of its time)."""
    if not device.blocked_layout:
        return []
    block = device.channel_multiple
    in_layout: set[str] = set()  # tensors in the blocked layout
    takers: set[int] = set()  # nodes that read their first input in it (ids)
    reorders: list[tuple[str, gs.Tensor]] = []
    into: set[str] = set()
    for node in graph.nodes:
        if not node.inputs or not node.outputs or not _float32(node.outputs[0]):
            continue
        x = node.inputs[0]
        channels = x.shape[1] if x.shape is not None and len(x.shape) == 4 else None
        if node.op in ("Conv", "FusedConv") and len(node.inputs) > 1 and \
                isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].shape) == 4:
            channels = node.inputs[1].shape[1] * node.attrs.get("group", 1)
            entering = channels >= block
        elif node.op in ("MaxPool", "AveragePool") and isinstance(channels, int) and (
                x.name in in_layout or channels % block == 0) and not from_dequantize(x):
            entering = True
        elif node.op in _FOLLOWS_LAYOUT and all(t.name in in_layout for t in node.inputs) and (
                node.op == "Concat" or len({tuple(t.shape or ()) for t in node.inputs}) == 1):
            entering = False
        else:
            continue
        if entering and x.name not in in_layout and x.name not in into:
            into.add(x.name)
            reorders.append(("ReorderInput", x))
        if entering or node.op not in ("Conv", "FusedConv"):  # (else: reads NCHW itself)
            takers.add(id(node))
        in_layout.add(node.outputs[0].name)
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.outputs and node.outputs[0].name in in_layout:
            tensor = node.outputs[0]
            if tensor.name in outputs or any(id(r) not in takers for r in tensor.outputs):
                reorders.append(("ReorderOutput", tensor))
    return reorders


def _float32(tensor: gs.Tensor) -> bool:
    """Float32, or of a type not inferred (a contrib op's output); not a type numpy does
    not know (bfloat16, an ONNX type number)."""
    if tensor.dtype is None:
        return True
    try:
        return np.dtype(tensor.dtype) == np.float32
    except TypeError:
        return False


def blocked(weight_shape, group: int, device: Device) -> bool:
    """Whether a convolution of ``weight_shape`` fits the device's channel block (the
    device's ``channel_multiple``; ONNX Runtime's NCHWc) as it is: output channels a
    multiple of the block and input channels one too or fewer than it; a depthwise one,
    its channels a multiple. ONNX Runtime 1.32 runs other convolutions blocked too, their
    channels padded to the block."""
    out_c, in_c = weight_shape[:2]
    block = device.channel_multiple
    if not isinstance(out_c, int) or not isinstance(in_c, int) or out_c % block:
        return False
    if group == 1:
        return in_c % block == 0 or in_c < block
    return in_c == 1 and group == out_c
