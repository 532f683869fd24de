"""How optimize time grows with the graph: 1k to 100k nodes.

    python benchmarks/scaling.py [--nodes 1000,10000,100000] [--target ort]

Each model is a chain of identical blocks shaped like what exporters write, so that
every cleanup pass has work at every size: a MatMul + bias Add + Relu, an Identity, a
Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain that only folds once shapes are
known, a duplicated bias initializer, and a repeated Relu for common-subexpression
elimination (16 nodes a block). ``graphopt.optimize`` runs the target's whole lossless
pipeline and verifies the result against ONNX Runtime on the input; printed per size:
nodes before and after, wall time, microseconds per input node and that figure relative
to the smallest model's (1.0 everywhere = linear growth); beside it, onnxslim's nodes
after and wall time on the same model (in process, as ``onnxslim.slim``; it does not
verify its result).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.target import cpu_flags  # noqa: E402

WIDTH = 16
NODES_PER_BLOCK = 16


def chain_model(blocks: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    shape_const = numpy_helper.from_array(np.array([-1], np.int64), "minus_one")
    index = numpy_helper.from_array(np.array(0, np.int64), "zero")
    inits += [shape_const, index]
    for i in range(blocks):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        b = (rng.standard_normal(WIDTH) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}"),
                  numpy_helper.from_array(b.copy(), f"b{i}_copy")]
        p = f"blk{i}_"
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [p + "mm"]),
            helper.make_node("Add", [p + "mm", f"b{i}"], [p + "add"]),
            helper.make_node("Relu", [p + "add"], [p + "relu"]),
            helper.make_node("Relu", [p + "add"], [p + "relu2"]),  # a common subexpression
            helper.make_node("Identity", [p + "relu"], [p + "id"]),
            helper.make_node("Shape", [p + "id"], [p + "shape"]),
            helper.make_node("Gather", [p + "shape", "zero"], [p + "batch"], axis=0),
            helper.make_node("Unsqueeze", [p + "batch", "zero_axes"], [p + "batch1"]),
            helper.make_node("Concat", [p + "batch1", "minus_one"], [p + "target"], axis=0),
            helper.make_node("Reshape", [p + "id", p + "target"], [p + "flat"]),
            helper.make_node("Add", [p + "relu2", f"b{i}_copy"], [p + "shifted"]),
            helper.make_node("Sub", [p + "shifted", f"b{i}_copy"], [p + "back"]),
            helper.make_node("Mul", [p + "flat", "one"], [p + "scaled"]),  # x * 1
            helper.make_node("Add", [p + "scaled", p + "back"], [p + "sum"]),
            helper.make_node("Mul", [p + "sum", "half"], [p + "mean"]),
            helper.make_node("Identity", [p + "mean"], [p + "out"]),
        ]
        x = p + "out"
    inits += [numpy_helper.from_array(np.array([0], np.int64), "zero_axes"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,10000,100000")
    parser.add_argument("--target", default="ort")
    parser.add_argument("--no-onnxslim", action="store_true",
                        help="graphopt only (onnxslim's weight tying is quadratic: hours at "
                             "100k nodes)")
    args = parser.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni"})
    print(f"cpu flags: {', '.join(flags)}")
    print(f"{'nodes':>8} {'after':>8} {'seconds':>9} {'us/node':>9} {'relative':>9} "
          f"{'onnxslim after':>15} {'onnxslim s':>11}")
    first = None
    for count in (int(n) for n in args.nodes.split(",")):
        model = chain_model(max(1, count // NODES_PER_BLOCK))
        start = time.perf_counter()
        result = graphopt.optimize(model, target=args.target)
        seconds = time.perf_counter() - start
        if result.report["verification"].get("ok") is not True:
            raise SystemExit(f"not verified at {count} nodes: {result.report['verification']}")
        per_node = seconds / len(model.graph.node) * 1e6
        first = first or per_node
        print(f"{len(model.graph.node):>8} {result.report['output']['nodes']:>8} "
              f"{seconds:>9.2f} {per_node:>9.1f} {per_node / first:>9.2f} ", end="",
              flush=True)
        slim, slim_s = ("-", "not run") if args.no_onnxslim else run_onnxslim(model)
        print(f"{slim:>15} {slim_s:>11}", flush=True)


def run_onnxslim(model: onnx.ModelProto) -> tuple[str, str]:
    """(nodes after, seconds) of onnxslim on ``model``, or ("-", why) without it."""
    try:
        import onnxslim
    except ImportError:
        return "-", "not installed"
    start = time.perf_counter()
    out = onnxslim.slim(model)
    return str(len(out.graph.node)), f"{time.perf_counter() - start:.2f}"


if __name__ == "__main__":
    main()
