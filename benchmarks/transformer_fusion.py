"""MiniLM on ONNX Runtime CPU: graphopt's output vs the original and vs ORT's own
transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`).

Latency is one thread, batch 3 of real tokenized sentences, median of interleaved runs
(each round runs every model once, so drift in machine load hits all alike). Every model
is run with ORT_ENABLE_ALL. Also prints node counts and output cosine vs the original.

    python benchmarks/transformer_fusion.py [--exporter torchscript|dynamo] [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from tests import zoo  # noqa: E402

SENTENCES = ["A man is eating food.", "The new movie is awesome and everybody loves it.",
             "Graph optimizers fold constants, fuse operators and remove dead code."]


def ort_transformer_optimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, path)
        optimized = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384,
                                   opt_level=0)
        return optimized.model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--skip", default="", help="graphopt passes to leave out, comma-separated")
    args = parser.parse_args()

    original = zoo.bert_minilm(exporter=args.exporter)
    feeds = zoo.minilm_tokenize(SENTENCES)
    start = time.perf_counter()
    skip = [p for p in args.skip.split(",") if p]
    ours = graphopt.optimize(original, target="ort", skip=skip).model.to_onnx()
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = ort_transformer_optimizer(original)
    theirs_s = time.perf_counter() - start
    models = {"original": original, "graphopt": ours, "ort-transformers": theirs}

    sessions = {name: session(m) for name, m in models.items()}
    inputs = {name: {i.name: feeds[i.name] for i in s.get_inputs()} for name, s in sessions.items()}
    outputs = {name: s.run(None, inputs[name])[0] for name, s in sessions.items()}
    for _ in range(10):  # warm up
        for name, s in sessions.items():
            s.run(None, inputs[name])
    times = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, inputs[name])
            times[name].append(time.perf_counter() - t)

    base = statistics.median(times["original"])
    ref = outputs["original"]
    print(f"all-MiniLM-L6-v2 ({args.exporter} export), batch {len(SENTENCES)}, "
          f"seq {feeds['input_ids'].shape[1]}, 1 thread, ORT_ENABLE_ALL, "
          f"median of {args.rounds} interleaved runs")
    print(f"{'model':18} {'nodes':>6} {'median ms':>10} {'vs original':>12} {'min cosine':>11}"
          f" {'tool s':>7}")
    for name, s in sessions.items():
        med = statistics.median(times[name])
        out = outputs[name]
        cos = min(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ref, out))
        tool = {"graphopt": f"{ours_s:7.1f}", "ort-transformers": f"{theirs_s:7.1f}"}.get(name, "")
        print(f"{name:18} {len(models[name].graph.node):>6} {med * 1e3:>10.2f} "
              f"{med / base:>11.3f}x {cos:>11.6f} {tool:>7}")
    print(f"graphopt / ort-transformers latency: "
          f"{statistics.median(times['graphopt']) / statistics.median(times['ort-transformers']):.3f}x")


if __name__ == "__main__":
    main()
