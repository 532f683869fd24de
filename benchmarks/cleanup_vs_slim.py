"""Node counts and wall time: graphopt's lossless pipeline vs onnxslim and onnxsim.

Exports standard architectures from PyTorch (tests/zoo.py), runs each tool on the same
file, checks each result against ONNX Runtime on the original, and prints one table.

    python benchmarks/cleanup_vs_slim.py [--models resnet18,bert_minilm] [--repeat 3]
        [--json out.json]

Each tool runs ``--repeat`` times on each model (tools taking turns); the median time is
printed (one run moves by up to 2x on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt import verify  # noqa: E402
from tests import zoo  # noqa: E402

MODELS = {
    "resnet18 (torchscript)": lambda: zoo.resnet18(exporter="torchscript"),
    "resnet18 (dynamo)": lambda: zoo.resnet18(exporter="dynamo"),
    "resnet50 (torchscript)": lambda: zoo.resnet50(exporter="torchscript"),
    "mobilenet_v2 (torchscript)": lambda: zoo.mobilenet_v2(exporter="torchscript"),
    "efficientnet_b0 (torchscript)": lambda: zoo.efficientnet_b0(exporter="torchscript"),
    "ViT-B/16 (torchscript)": lambda: zoo.vit_b16(exporter="torchscript"),
    "ViT-B/16 (dynamo)": lambda: zoo.vit_b16(exporter="dynamo"),
    "all-MiniLM-L6-v2 (torchscript)": lambda: zoo.bert_minilm(exporter="torchscript"),
    "all-MiniLM-L6-v2 (dynamo)": lambda: zoo.bert_minilm(exporter="dynamo"),
}


def run_graphopt(model: onnx.ModelProto) -> onnx.ModelProto:
    return graphopt.optimize(model, target="ort").model.to_onnx()


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return simplified


TOOLS = {"graphopt": run_graphopt, "onnxslim": run_onnxslim, "onnxsim": run_onnxsim}


def measure(name: str, model: onnx.ModelProto, repeat: int = 3) -> dict:
    feeds = verify.probe_inputs(model, seed=1)
    reference = verify.run(model, feeds[0])
    row = {"model": name, "original": len(model.graph.node)}
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for _ in range(repeat):
        for tool, fn in TOOLS.items():
            if "error" in row.get(tool, {}):
                continue
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = fn(copy)
            except Exception as exc:  # a baseline tool failing is a result, not a crash
                row[tool] = {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
                continue
            times[tool].append(time.perf_counter() - start)
            if tool in row:
                continue
            outputs = verify.run(result, feeds[0])
            diff = max(float(np.max(np.abs(outputs[k].astype(np.float64) - v)))
                       for k, v in reference.items())
            row[tool] = {"nodes": len(result.graph.node), "max_abs_diff": diff}
    for tool, seconds in times.items():
        if seconds and "error" not in row[tool]:
            row[tool].update(seconds=statistics.median(seconds), runs=seconds)
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'model':34} {'original':>8}" + "".join(
        f" {t + ' nodes':>15} {'time s':>7} {'max|diff|':>9}" for t in TOOLS)
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['model']:34} {row['original']:>8}"
        for tool in TOOLS:
            r = row[tool]
            if "error" in r:
                line += f" {'failed':>15} {'':>7} {'':>9}"
            else:
                line += f" {r['nodes']:>15} {r['seconds']:>7.2f} {r['max_abs_diff']:>9.1e}"
        print(line)
    for row in rows:
        for tool in TOOLS:
            if "error" in row[tool]:
                print(f"  {row['model']}: {tool} failed: {row[tool]['error']}")
    ratios = sorted(row["graphopt"]["seconds"] / row["onnxslim"]["seconds"] for row in rows
                    if "seconds" in row["graphopt"] and "seconds" in row["onnxslim"])
    if ratios:
        print(f"graphopt's median time / onnxslim's, median over the models: "
              f"{statistics.median(ratios):.2f}x "
              f"(graphopt's includes verifying its result against ONNX Runtime)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool per model")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",")] if args.models else list(MODELS)
    rows = []
    for name in names:
        matches = [m for m in MODELS if m == name or m.startswith(name)]
        for match in matches:
            rows.append(measure(match, MODELS[match](), args.repeat))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
