"""Each layer's float and int8 kernels timed in LiteRT, for the static int8 quantizer's
``require-speedup`` on the litert target (``LiteRtTarget.int8_layer_costs``).

The host cost model prices ONNX Runtime's kernels; LiteRT's XNNPACK answers otherwise,
and not by a rule of thumb. On this machine (AVX-512 with VNNI, 1 thread) a 3 -> 16
channel 3x3 stem on a 32 x 32 image ran 3.6x slower in int8 than in float (35.4 against
9.9 us), while the layers after it ran 1.7-7x faster in int8 (16 -> 32 channels at
16 x 16: 9.8 against 16.9 us; 64 -> 64 at 4 x 4: 1.5 against 11.0). So each quantizable
layer is lowered alone, as graphopt lowers it (NHWC, its Relu/Clip fused), once in float
and once in ``quantize-int8``'s QDQ form (per-channel int8 weights, int32 bias, int8
input and output: between int8 layers no conversion runs; a layer reading a model input
pays the input's QUANTIZE and its output's DEQUANTIZE too), and both are timed in
LiteRT's interpreter (XNNPACK, the target's threads). A layer of the same op,
attributes and shapes is timed once per machine: the times are kept in graphopt's cache
folder (``litert-layers/``, one file per target fingerprint: CPU, threads, LiteRT's
version), so the choice, and the ``.tflite``, come out the same in every run here.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.cost_calibration import cache_dir
from graphopt.ir import Model
from graphopt.qdq import QdqWriter
from graphopt.rewrite import constant_value, consumers

ROUND_S = 2e-3  # the runs of one round last about this long
ROUNDS = 5
SCHEMA = 1  # of the stored times
_STORES: dict[Path, dict[str, list[float] | None]] = {}


def layer_costs(node: gs.Node, threads: int, fingerprint: dict
                ) -> tuple[float, float] | None:
    """``(float seconds, int8 seconds)`` of one run of layer ``node`` (Conv, Gemm or
    MatMul with a constant float weight, static shapes) in LiteRT on ``threads``, from
    the times stored for ``fingerprint`` (the target's) or measured now and stored;
    ``None`` where it cannot be built or lowered alone."""
    built = _layer(node)
    if built is None:
        return None
    signature, build, fed = built
    path = store_path(fingerprint)
    times = _STORES.get(path)
    if times is None:
        times = _STORES[path] = _read(path)
    key = json.dumps(signature)
    if key not in times:
        measured = _timed(build(), fed, threads)
        times[key] = None if measured is None else list(measured)
        _write(path, times)
    return None if times[key] is None else (times[key][0], times[key][1])


def store_path(fingerprint: dict) -> Path:
    digest = hashlib.sha256(json.dumps({"schema": SCHEMA, **fingerprint},
                                       sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "litert-layers" / f"{digest}.json"


def _read(path: Path) -> dict[str, list[float] | None]:
    try:
        data = json.loads(path.read_text())
        return dict(data["layers"]) if data.get("schema") == SCHEMA else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # none stored yet, or unreadable: measured again


def _write(path: Path, times: dict) -> None:
    """Stored atomically; a cache folder that cannot be written keeps them in memory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps({"schema": SCHEMA, "layers": times}, indent=0,
                                     sort_keys=True) + "\n")
        os.replace(staged, path)
    except OSError:
        pass


def _layer(node: gs.Node):
    """``(signature, build, fed)`` of ``node`` alone, or ``None``: ``build()`` makes the
    one-layer float model (only when the layer is timed: a stored time reads no weight),
    ``fed`` whether it reads a model input."""
    x, weight = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    shape = list(x.shape or [])
    if node.op not in ("Conv", "Gemm", "MatMul") or not shape or \
            not all(isinstance(d, int) and d > 0 for d in shape) or \
            not isinstance(weight, gs.Constant) or weight.dtype != np.float32 or \
            not isinstance(bias, (gs.Constant, type(None))):
        return None
    readers = consumers(node.outputs[0])
    act = readers[0] if len(readers) == 1 and readers[0].op in ("Relu", "Clip") else None
    bounds = () if act is None or act.op == "Relu" else tuple(
        None if constant_value(t) is None else float(constant_value(t))
        for t in act.inputs[1:3])
    if None in bounds:
        act = None
    fed = not x.inputs  # a model input: the int8 layer quantizes it itself
    signature = (node.op, repr(sorted(node.attrs.items())), [int(d) for d in shape],
                 [int(d) for d in weight.shape], bias is not None,
                 act and (act.op, bounds), fed)
    return signature, lambda: _float_model(
        node, shape, constant_value(weight), constant_value(bias), act, bounds), fed


def _float_model(node: gs.Node, shape: list[int], weight: np.ndarray,
                 bias: np.ndarray | None, act: gs.Node | None, bounds: tuple) -> Model:
    x = gs.Variable("x", np.float32, shape)
    inputs = [x, gs.Constant("w", weight)] + ([gs.Constant("b", bias)] if bias is not None
                                                else [])
    y = gs.Variable("y", np.float32)
    nodes = [gs.Node(node.op, "layer", dict(node.attrs), inputs, [y])]
    if act is not None:
        z = gs.Variable("z", np.float32)
        limits = [gs.Constant(f"c{i}", np.array(v, np.float32)) for i, v in enumerate(bounds)]
        nodes.append(gs.Node(act.op, "act", {}, [y] + limits, [z]))
        y = z
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)
    model = Model.from_proto(gs.export_onnx(graph))
    model.infer_shapes()
    return model


def _quantized(model: Model, bias: bool) -> Model:
    """``model`` (one layer) in ``quantize-int8``'s QDQ form: uint8 input and output,
    int8 weights per output channel, an int32 bias at input x weight scale."""
    model = model.clone()
    writer = QdqWriter(model)
    layer = next(n for n in model.graph.nodes if n.name == "layer")
    writer.activation(layer.inputs[0], np.float32(0.02), np.uint8(128))
    w = constant_value(layer.inputs[1])
    axis = 0 if layer.op == "Conv" or layer.attrs.get("transB", 0) else w.ndim - 1
    layer.inputs[1], scale = writer.weight("w", w, axis, False)
    if bias:
        b = constant_value(layer.inputs[2]).reshape(-1)
        layer.inputs[2] = writer.bias("b", b, np.float32(0.02) * scale)
    writer.activation(model.graph.outputs[0], np.float32(0.05), np.uint8(0))
    model.graph.cleanup().toposort()
    return model


def _timed(model: Model, fed: bool, threads: int) -> tuple[float, float] | None:
    from graphopt.errors import GraphoptError
    from graphopt.targets.tflite_lower import Unmappable, lower_graph

    bias = any(t.name == "b" for n in model.graph.nodes for t in n.inputs)
    try:
        floats = lower_graph(model.to_onnx(), nhwc_io=True).data
        int8 = lower_graph(_quantized(model, bias).to_onnx(), nhwc_io=True,
                           int8_io=not fed).data
        return _seconds(bytes(floats), threads), _seconds(bytes(int8), threads)
    except (GraphoptError, Unmappable, ValueError, RuntimeError):
        return None  # not lowered or run alone: the cost model's estimates decide


def _seconds(data: bytes, threads: int) -> float:
    """Median seconds of one invoke of the ``.tflite`` ``data`` (XNNPACK), over
    ``ROUNDS`` rounds of about ``ROUND_S`` each, after a warm-up."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in interpreter.get_input_details():
        value = rng.standard_normal(d["shape"]) if d["dtype"] == np.float32 else \
            rng.integers(-128, 128, d["shape"])
        interpreter.set_tensor(d["index"], value.astype(d["dtype"]))
    for _ in range(3):
        interpreter.invoke()
    start = time.perf_counter()
    interpreter.invoke()
    repeat = max(1, min(1000, int(ROUND_S / max(time.perf_counter() - start, 1e-7))))
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(repeat):
            interpreter.invoke()
        rounds.append((time.perf_counter() - start) / repeat)
    return statistics.median(rounds)

