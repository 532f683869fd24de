"""A transformer-like model over 2 GB: graphopt against onnxslim, wall time and peak RSS.

The model (opset 18): 12 blocks of decomposed LayerNorm, four d×d MatMul+bias (the first
and third followed by an erf GELU) and a residual Add; d=4096 makes 3.2 GB of float32
weights. The weights are drawn (seeded) and written straight into the external-data file,
one tensor at a time: no protobuf ever holds them.

Each tool runs in its own subprocess; its peak RSS is that child's ``ru_maxrss``
(``os.wait4``). graphopt's output is then checked: written with external data, verified
by graphopt itself (the report), and compared with ONNX Runtime on the input (also in a
subprocess, weights memory-mapped by ORT). graphopt runs with
GRAPHOPT_EXTERNAL_DATA_THRESHOLD=0 so that small variants take the full model's path
(output written with external data); over 2 GB that is what it does anyway.

Measured here (2 cores, 24 GB): 3.2 GB model, graphopt 19.4 s at a peak RSS of 3.13 GiB
(1.04x the weights), verified; onnxslim 53-72 s at 9.25 GiB.

    python benchmarks/large_model.py                 # 3.2 GB (d=4096)
    python benchmarks/large_model.py --size 0.3      # ~0.3 GB variant for a quick run
    python benchmarks/large_model.py --size 0.3 --tools graphopt --keep out/large
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx.helper as oh
from onnx import TensorProto

BLOCKS = 12
FULL_HIDDEN = 4096
ALIGN = 4096


def hidden_for(size_gb: float, blocks: int = BLOCKS) -> int:
    """The hidden size (a multiple of 64) whose weights come closest to ``size_gb``."""
    d = math.sqrt(size_gb * 1e9 / (blocks * 4 * 4))
    return max(64, int(round(d / 64)) * 64)


class _Weights:
    """Appends tensors to the external-data file and returns their stub TensorProtos."""

    def __init__(self, path: Path, rng: np.random.Generator):
        self.file = open(path, "wb")
        self.location = path.name
        self.rng = rng
        self.initializers: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        offset = self.file.tell()
        pad = -offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        self.file.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def normal(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        return self.add(name, self.rng.standard_normal(shape, dtype=np.float32) * scale)


def make_model(folder: Path, hidden: int = FULL_HIDDEN, blocks: int = BLOCKS,
               seed: int = 0, name: str = "model.onnx") -> Path:
    """Write ``folder/name`` and ``folder/name.data``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    weights = _Weights(folder / (name + ".data"), np.random.default_rng(seed))
    small: list[TensorProto] = []

    def scalar(value: float, tag: str) -> str:
        small.append(oh.make_tensor(tag, TensorProto.FLOAT, [], [value]))
        return tag

    axes = oh.make_tensor("axes", TensorProto.INT64, [1], [-1])
    small.append(axes)
    two, eps = scalar(2.0, "two"), scalar(1e-5, "eps")
    sqrt2, one, half = scalar(math.sqrt(2.0), "sqrt2"), scalar(1.0, "one"), scalar(0.5, "half")
    nodes = []
    x = "x"
    scale = 1.0 / math.sqrt(hidden)
    for b in range(blocks):
        p = f"b{b}_"

        def node(op, inputs, tag, **attrs):
            nodes.append(oh.make_node(op, inputs, [p + tag], name=p + tag, **attrs))
            return p + tag

        # LayerNorm, decomposed as exporters write it.
        mean = node("ReduceMean", [x, "axes"], "mean", keepdims=1)
        centered = node("Sub", [x, mean], "centered")
        var = node("ReduceMean", [node("Pow", [centered, two], "sq"), "axes"], "var",
                   keepdims=1)
        std = node("Sqrt", [node("Add", [var, eps], "var_eps")], "std")
        normed = node("Div", [centered, std], "normed")
        gamma = weights.add(p + "gamma", 1.0 + 0.1 * weights.rng.standard_normal(hidden))
        beta = weights.add(p + "beta", 0.1 * weights.rng.standard_normal(hidden))
        h = node("Add", [node("Mul", [normed, gamma], "scaled"), beta], "ln")
        for i in range(4):
            w = weights.normal(f"{p}w{i}", (hidden, hidden), scale)
            bias = weights.normal(f"{p}bias{i}", (hidden,), 0.02)
            h = node("Add", [node("MatMul", [h, w], f"mm{i}"), bias], f"lin{i}")
            if i % 2 == 0:  # erf GELU: x * 0.5 * (1 + erf(x / sqrt 2))
                erf = node("Erf", [node("Div", [h, sqrt2], f"div{i}")], f"erf{i}")
                h = node("Mul", [node("Mul", [h, node("Add", [erf, one], f"erf1_{i}")],
                                      f"gelu_a{i}"), half], f"gelu{i}")
        x = node("Add", [x, h], "residual")
    nodes.append(oh.make_node("Identity", [x], ["y"], name="output"))
    weights.file.close()
    graph = oh.make_graph(
        nodes, "large_transformer",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        small + weights.initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)],
                          producer_name="graphopt-benchmark")
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())  # the weights are not in it
    return path


# Runs the command and writes its peak RSS (KiB) to the file named first. The command is
# started from this small process: a child forked from a large one (pytest after many
# tests) counts the parent's pages in its peak RSS until it execs.
_PEAK = r"""
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time, peak RSS (of that command alone) and exit code."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _PEAK, peak.name, *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out_r, err_r = [], []  # both pipes drained while waiting (a full one blocks)
        threads = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()))
                   for s, b in ((proc.stdout, out_r), (proc.stderr, err_r))]
        for t in threads:
            t.start()
        proc.wait()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        kib = int(Path(peak.name).read_text() or 0)
    return {"seconds": seconds, "peak_rss_gb": kib / 2**20, "exit": proc.returncode,
            "stdout": out_r[0].decode(errors="replace"),
            "stderr": err_r[0].decode(errors="replace")}


_CHECK = r"""
import json, sys, numpy as np, onnxruntime as ort
ref, out, hidden = sys.argv[1], sys.argv[2], int(sys.argv[3])
o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
o.add_session_config_entry("session.disable_prepacking", "1")
x = np.random.default_rng(7).standard_normal((1, 3, hidden)).astype(np.float32)
ys = []
for path in (ref, out):
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    ys.append(s.run(None, {"x": x})[0]); del s
diff = float(np.abs(ys[0] - ys[1]).max())
ok = bool(np.allclose(ys[1], ys[0], rtol=1e-4, atol=1e-4))
print(json.dumps({"max_abs_diff": diff, "ok": ok}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=None,
                        help="weights in GB (default: the full model, d=4096, 3.2 GB)")
    parser.add_argument("--tools", default="graphopt,onnxslim")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    hidden = FULL_HIDDEN if args.size is None else hidden_for(args.size)
    work = args.keep or Path(tempfile.mkdtemp(prefix="graphopt-large-"))
    try:
        run(work, hidden, args.tools.split(","), args.seed, args.json)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, hidden: int, tools: list[str], seed: int, json_out: Path | None) -> None:
    start = time.perf_counter()
    model = make_model(work / "in", hidden=hidden, seed=seed)
    data = Path(str(model) + ".data")
    weights_gb = data.stat().st_size / 1e9
    print(f"model: {BLOCKS} blocks, d={hidden}, weights {weights_gb:.2f} GB "
          f"({data.stat().st_size / 2**30:.2f} GiB) in {model.name}.data, "
          f"made in {time.perf_counter() - start:.1f} s")
    figures = {"hidden": hidden, "weights_gb": weights_gb}
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model.parent.iterdir()}
    for tool in tools:
        out = work / tool / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        if tool == "graphopt":
            cmd = [sys.executable, "-m", "graphopt.cli", "optimize", str(model), "-o", str(out),
                   "--report", str(work / tool / "report.json")]
        elif tool == "onnxslim":
            if shutil.which("onnxslim") is None:
                print("onnxslim: not installed, skipped")
                continue
            cmd = ["onnxslim", str(model), str(out)]
        else:
            raise SystemExit(f"unknown tool {tool!r}")
        # Small variants take the same path as the full model: external data throughout.
        env = {**os.environ, "GRAPHOPT_EXTERNAL_DATA_THRESHOLD": "0"} \
            if tool == "graphopt" else None
        result = measure(cmd, env)
        row = {k: result[k] for k in ("seconds", "peak_rss_gb", "exit")}
        row["rss_over_weights"] = result["peak_rss_gb"] * 2**30 / 1e9 / weights_gb
        if result["exit"] == 0 and out.exists():
            files = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("model"))
            row["files"] = files
            row["external_data"] = any(f.endswith(".data") for f in files)
            if tool == "graphopt":
                report = json.loads((work / tool / "report.json").read_text())
                row["verified"] = report["verification"].get("ok")
                row["rolled_back"] = report["rolled_back"]
                row["nodes"] = (report["input"].get("nodes"), report["output"].get("nodes"))
            check = measure([sys.executable, "-c", _CHECK, str(model), str(out), str(hidden)])
            row["ort_check"] = json.loads(check["stdout"]) if check["exit"] == 0 else \
                check["stderr"].strip().splitlines()[-1:]
        else:
            row["error"] = (result["stderr"].strip().splitlines() or ["?"])[-1]
        figures[tool] = row
        print(f"{tool}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GiB "
              f"({row['rss_over_weights']:.2f}x the weights), exit {row['exit']}")
        for key in ("verified", "rolled_back", "nodes", "files", "ort_check", "error"):
            if key in row:
                print(f"    {key}: {row[key]}")
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model.parent.iterdir()}
    print("input untouched:", before == after)
    figures["input_untouched"] = before == after
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
