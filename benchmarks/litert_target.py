"""LiteRT latency of graphopt's ``.tflite`` beside ONNX Runtime's, one thread each.

For each model this runs ``graphopt.optimize(..., target="litert")`` at batch 1 (the
``.tflite`` is verified against ONNX Runtime on the original as part of it), then times,
in this one process and in interleaved rounds: the ``.tflite`` in LiteRT's interpreter
(XNNPACK, 1 thread) and the original ``.onnx`` in ONNX Runtime (ORT_ENABLE_ALL, 1 intra-op
thread). Each figure is the median CPU time of the calling thread per run (both runtimes
compute on the calling thread with one thread; CPU time is what other jobs on a shared
machine disturb least). The ratio is ORT / LiteRT (above 1: LiteRT is faster).

    python benchmarks/litert_target.py [--models small_cnn,mlp,mobilenet_cnn,resnet_cnn,
                                        bert_minilm] [--rounds 10] [--runs 50]
                                       [--precision float,int8] [--fc-sweep]

The default is the example CNN and the zoo's MLP; the zoo's MobileNet- and ResNet-style
CNNs and all-MiniLM-L6-v2 (sequence 128) are exported with torch first (the ``dev``
extra). ``--precision int8`` lowers ``--quantize int8`` (full-integer: graphopt's QDQ on
LiteRT's int8 kernels; the example CNN is converted to opset 17 first, int8 needs 13)
and prints its latency and file size beside float's; ``min cos`` is the verification's
minimum per-sample cosine against ONNX Runtime on the float original (random probe
data). ``--fc-sweep`` times two fully connected layers in LiteRT at several sizes:
float32, dynamic-range int8 (``quantize-int8-dynamic``) and full-integer int8
(``quantize-int8``): what the litert target's ``pass_defaults`` rest on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt import verify  # noqa: E402
from graphopt.targets.litert import LiteRtTarget  # noqa: E402
from tests import zoo  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
MODELS = {
    "small_cnn": lambda: (onnx.load(EXAMPLE), {"input": [1, 3, 32, 32]}),
    "mlp": lambda: (zoo.mlp(), {"x": [1, 32]}),
    "mobilenet_cnn": lambda: (zoo.mobilenet_cnn(), {"input": [1, 3, 32, 32]}),
    "resnet_cnn": lambda: (zoo.resnet_cnn(), {"input": [1, 3, 32, 32]}),
    "bert_minilm": lambda: (zoo.bert_minilm(), {"input_ids": [1, 128],
                                                "attention_mask": [1, 128]}),
}
DEFAULT = "small_cnn,mlp"


def _timed(runners: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median CPU seconds of the calling thread per run, runners interleaved by round."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm up
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for key, fn in runners.items():
            for _ in range(runs):
                start = time.thread_time()
                fn()
                times[key].append(time.thread_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, rounds: int, runs: int, tmp: Path, precision: str = "float") -> dict:
    proto, shapes = MODELS[name]()
    options = {}
    if precision == "int8":
        if proto.opset_import[0].version < 13:
            proto = version_converter.convert_version(proto, 17)
        options = {"quantize": "int8"}
    out = tmp / f"{name}-{precision}"
    result = graphopt.optimize(proto, target="litert", output=out, input_shapes=shapes,
                               threads=1, **options)
    check = result.report["artifact"]
    feeds = verify.probe_inputs(proto, seed=0, shapes=shapes)[0]
    target = LiteRtTarget(threads=1)
    session = verify.session(proto, optimize=True, threads=1)
    med = _timed({"litert": lambda: target.run(result.artifact, feeds),
                  "ort": lambda: verify.run(session, feeds)}, rounds, runs)
    return {"model": name, "precision": precision, "litert_ms": med["litert"] * 1e3,
            "ort_ms": med["ort"] * 1e3, "ratio": med["ort"] / med["litert"],
            "check": f"{check['min_cosine']:.5f} cos" if "min_cosine" in check
            else f"{check['max_abs_diff']:.2g} diff",
            "tflite_kb": (out / "model.tflite").stat().st_size / 1024}


FC_SIZES = ((1, 64, 64), (2, 64, 64), (1, 256, 256), (1, 1024, 1024), (8, 512, 512),
            (128, 384, 1536))
FC_PRECISIONS = (("float", None),
                 ("dynamic", "quantize-int8-dynamic(require-speedup=false)"),
                 ("int8", "quantize-int8(require-speedup=false)"))


def fc_block(batch: int, k: int, n: int) -> tuple[onnx.ModelProto, dict]:
    """x [batch, k] · W1 [k, n] + b1 → Relu → · W2 [n, n] + b2: two fully connected
    layers (the second's input is what full-integer int8 keeps in int8)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((k, n)) / np.sqrt(k), "b1": rng.standard_normal(n) * 0.1,
             "w2": rng.standard_normal((n, n)) / np.sqrt(n), "b2": rng.standard_normal(n) * 0.1}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [numpy_helper.from_array(v.astype(np.float32), name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": [batch, k]}


def fc_sweep(rounds: int, runs: int, tmp: Path) -> None:
    """Two FC layers in LiteRT (1 thread): float32, dynamic-range int8 and full-integer
    int8 (QDQ from quantize-int8, calibrated on random probe inputs)."""
    print(f"{'batch x K x N':<14} {'float ms':>9} {'dynamic ms':>10} {'int8 ms':>9} "
          f"{'float/dyn':>9} {'float/int8':>10} {'KB float/dyn/int8':>18}")
    target = LiteRtTarget(threads=1)
    for batch, k, n in FC_SIZES:
        proto, shapes = fc_block(batch, k, n)
        feeds = verify.probe_inputs(proto, seed=0, shapes=shapes)[0]
        artifacts, sizes = {}, {}
        for label, passes in FC_PRECISIONS:
            out = tmp / f"fc{batch}x{k}x{n}-{label}"
            result = graphopt.optimize(proto, target="litert", output=out,
                                       input_shapes=shapes, threads=1,
                                       **({"passes": passes} if passes else {}))
            assert result.report["artifact"]["ok"], result.report["artifact"]
            if passes:  # every layer quantized, or the comparison says nothing
                assert json.loads((out / "manifest.json").read_text())[
                    "precision"]["weights"] == "int8", label
            artifacts[label] = result.artifact
            sizes[label] = (out / "model.tflite").stat().st_size / 1024
        med = _timed({label: (lambda a=a, f=feeds: target.run(a, f))
                      for label, a in artifacts.items()}, rounds, runs)
        kb = "/".join(f"{sizes[label]:.0f}" for label, _ in FC_PRECISIONS)
        print(f"{f'{batch}x{k}x{n}':<14} {med['float'] * 1e3:>9.4f} "
              f"{med['dynamic'] * 1e3:>10.4f} {med['int8'] * 1e3:>9.4f} "
              f"{med['float'] / med['dynamic']:>9.2f} {med['float'] / med['int8']:>10.2f} "
              f"{kb:>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT, help=f"of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--precision", default="float", help="float, int8 or both")
    parser.add_argument("--fc-sweep", action="store_true",
                        help="time two FC layers: float, dynamic and full-integer int8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.fc_sweep:
            fc_sweep(args.rounds, args.runs, Path(tmp))
            return
        print(f"{'model':<14} {'precision':<9} {'LiteRT ms':>10} {'ORT ms':>8} "
              f"{'ORT/LiteRT':>10} {'check':>13} {'tflite KB':>9}")
        for name in args.models.split(","):
            for precision in args.precision.split(","):
                r = bench(name, args.rounds, args.runs, Path(tmp), precision)
                print(f"{r['model']:<14} {precision:<9} {r['litert_ms']:>10.4f} "
                      f"{r['ort_ms']:>8.4f} {r['ratio']:>10.2f} {r['check']:>13} "
                      f"{r['tflite_kb']:>9.1f}")


if __name__ == "__main__":
    main()
