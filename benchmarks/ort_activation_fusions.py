"""ONNX Runtime latency behind the choices in passes/fusion/act.py and passes/cleanup/transpose.py.

1. Single-op cases (one thread, minimum over interleaved runs): Sigmoid*Mul vs QuickGelu
   vs Swish; the HardSwish forms vs HardSwish; Conv+Relu vs FusedConv; Conv+Add+Relu vs
   FusedConv with Z, the residual from a Conv or from an elementwise op; Transpose+MatMul
   vs FusedMatMul. Each at ORT_DISABLE_ALL and ORT_ENABLE_ALL.
2. Zoo CNNs: the lossless pipeline vs the same plus fuse-silu, fuse-hard-swish and
   fuse-conv-act (optionally residual=true), at both levels, and whether ORT's own
   optimized graphs (ENABLE_ALL) come out the same.

    python benchmarks/ort_activation_fusions.py [--models resnet_cnn,mobilenet_v2] [--skip-ops]

The minimum is reported because the machine may be shared: it is the figure least
disturbed by other processes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.targets.ort import LOSSLESS_PIPELINE  # noqa: E402
from tests import zoo  # noqa: E402

LEVELS = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
rng = np.random.default_rng(0)


def session(model: onnx.ModelProto, level: str, save_to: str | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if save_to:
        options.optimized_model_filepath = save_to
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def minimum_times(sessions: dict, feeds: dict, runs: int, rounds: int = 10) -> dict:
    times = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            sess.run(None, feeds)
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[key].append(time.perf_counter() - start)
    return {key: min(values) for key, values in times.items()}


def model(nodes, inputs, inits=(), opset=17):
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", 1, None)],
                          list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset),
                                               oh.make_opsetid("com.microsoft", 1)])


def vi(name, shape):
    return oh.make_tensor_value_info(name, 1, shape)


def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def single_op_cases():
    x = [vi("x", [1, 32, 112, 112])]
    feeds = {"x": rng.standard_normal((1, 32, 112, 112)).astype(np.float32)}
    consts = [f32("three", 3.0), f32("zero", 0.0), f32("six", 6.0)]
    yield "SiLU [1,32,112,112]", feeds, {
        "Sigmoid*Mul": model([oh.make_node("Sigmoid", ["x"], ["s"]),
                              oh.make_node("Mul", ["x", "s"], ["y"])], x, opset=24),
        "QuickGelu(alpha=1)": model([oh.make_node("QuickGelu", ["x"], ["y"], alpha=1.0,
                                                  domain="com.microsoft")], x, opset=24),
        "Swish (opset 24)": model([oh.make_node("Swish", ["x"], ["y"], alpha=1.0)], x,
                                  opset=24)}
    yield "HardSwish [1,32,112,112]", feeds, {
        "x*HardSigmoid(x)": model([oh.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6),
                                   oh.make_node("Mul", ["x", "h"], ["y"])], x),
        "x*Clip(x+3,0,6)/6": model([oh.make_node("Add", ["x", "three"], ["a"]),
                                    oh.make_node("Clip", ["a", "zero", "six"], ["c"]),
                                    oh.make_node("Mul", ["x", "c"], ["m"]),
                                    oh.make_node("Div", ["m", "six"], ["y"])], x, consts),
        "HardSwish": model([oh.make_node("HardSwish", ["x"], ["y"])], x)}
    c, hw = 32, 56
    xc = [vi("x", [1, c, hw, hw])]
    conv_feeds = {"x": rng.standard_normal((1, c, hw, hw)).astype(np.float32)}
    w = [f32("w", rng.standard_normal((c, c, 3, 3)) * 0.1), f32("b", rng.standard_normal(c)),
         f32("w1", rng.standard_normal((c, c, 1, 1)) * 0.1)]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    yield f"Conv {c}->{c} 3x3 @{hw}x{hw} + Relu", conv_feeds, {
        "Conv+Relu": model([oh.make_node("Conv", ["x", "w", "b"], ["c"], **conv),
                            oh.make_node("Relu", ["c"], ["y"])], xc, w),
        "FusedConv": model([oh.make_node("FusedConv", ["x", "w", "b"], ["y"], activation="Relu",
                                         domain="com.microsoft", **conv)], xc, w)}
    for source, residual in (("Conv1x1", oh.make_node("Conv", ["x", "w1"], ["z"])),
                             ("Sigmoid", oh.make_node("Sigmoid", ["x"], ["z"]))):
        yield f"Conv + Add(z = {source}(x)) + Relu", conv_feeds, {
            "Conv+Add+Relu": model([residual, oh.make_node("Conv", ["x", "w", "b"], ["c"], **conv),
                                    oh.make_node("Add", ["c", "z"], ["a"]),
                                    oh.make_node("Relu", ["a"], ["y"])], xc, w),
            "FusedConv(Z)": model([residual, oh.make_node("FusedConv", ["x", "w", "b", "z"], ["y"],
                                                          activation="Relu",
                                                          domain="com.microsoft", **conv)], xc, w)}
    qk = [vi("q", [1, 12, 128, 64]), vi("k", [1, 12, 128, 64])]
    qk_feeds = {n: rng.standard_normal((1, 12, 128, 64)).astype(np.float32) for n in "qk"}
    yield "q @ k^T [1,12,128,64]", qk_feeds, {
        "Transpose+MatMul": model([oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                                   oh.make_node("MatMul", ["q", "kt"], ["y"])], qk),
        "FusedMatMul(transB)": model([oh.make_node("FusedMatMul", ["q", "k"], ["y"], transB=1,
                                                   domain="com.microsoft")], qk)}


def run_single_ops(runs: int) -> None:
    print("## single ops (us, min; ratio to the first row at the same level)")
    for title, feeds, variants in single_op_cases():
        sessions = {(name, level): session(m, level) for name, m in variants.items()
                    for level in LEVELS}
        times = minimum_times(sessions, feeds, runs)
        print(title)
        for level in LEVELS:
            base = times[(next(iter(variants)), level)]
            for name in variants:
                t = times[(name, level)]
                print(f"  {level:4s} {name:22s} {t * 1e6:9.1f}  x{t / base:.3f}")


def ort_histogram(m: onnx.ModelProto) -> Counter:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "opt.onnx")
        session(m, "all", save_to=path)
        graph = onnx.load(path).graph
    counts = Counter()
    for node in graph.node:
        act = next((a.s.decode() for a in node.attribute if a.name == "activation"), "")
        counts[f"{node.domain}::{node.op_type}[{act}]"] += 1
    return counts


def run_zoo(names: list[str], exporter: str, runs: int) -> None:
    base = ",".join(LOSSLESS_PIPELINE)
    fused = ",".join(LOSSLESS_PIPELINE[:-1]) + ",fuse-silu,fuse-hard-swish,fuse-conv-act," \
        "eliminate-dead-code"
    variants = {"lossless": base, "+act": fused,
                "+act(residual)": fused.replace("fuse-conv-act", "fuse-conv-act(residual=true)")}
    print(f"\n## zoo CNNs, {exporter}, batch 1 (ms, min; ratio to lossless at the same level)")
    for name in names:
        proto = getattr(zoo, name)(exporter)
        hw = 32 if name in ("resnet_cnn", "mobilenet_cnn") else 224
        feeds = {"input": rng.standard_normal((1, 3, hw, hw)).astype(np.float32)}
        models = {v: graphopt.optimize(proto, passes=spec).model.to_onnx()
                  for v, spec in variants.items()}
        same = {v: ort_histogram(m) == ort_histogram(models["lossless"]) for v, m in models.items()}
        sessions = {(v, level): session(m, level) for v, m in models.items() for level in LEVELS}
        times = minimum_times(sessions, feeds, runs if hw == 32 else max(10, runs // 10))
        for level in LEVELS:
            for v, m in models.items():
                t, ref = times[(v, level)], times[("lossless", level)]
                note = "  (ORT's ENABLE_ALL graph: same as lossless)" if same[v] and \
                    v != "lossless" and level == "all" else ""
                print(f"{name:16s} {level:4s} {v:15s} nodes {len(m.graph.node):4d} "
                      f"{t * 1e3:9.3f}  x{t / ref:.3f}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet_cnn,mobilenet_cnn,mobilenet_v2,efficientnet_b0")
    parser.add_argument("--exporter", default="torchscript")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--skip-ops", action="store_true")
    args = parser.parse_args()
    if not args.skip_ops:
        run_single_ops(args.runs)
    run_zoo([m for m in args.models.split(",") if m], args.exporter, args.runs)


if __name__ == "__main__":
    main()
