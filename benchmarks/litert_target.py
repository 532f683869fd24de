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
                                       [--precision float,int8] [--io-layout nhwc]
                                       [--onnx2tf PYTHON] [--fc-sweep]

The default is the example CNN and the zoo's MLP; the zoo's MobileNet- and ResNet-style
CNNs and all-MiniLM-L6-v2 (sequence 128) are exported with torch first (the ``dev``
extra). ``--precision int8`` lowers ``--quantize int8`` (full-integer: graphopt's QDQ on
LiteRT's int8 kernels; the example CNN is converted to opset 17 first, int8 needs 13)
and prints its latency and file size beside float's (and, after the table, the layers
kept float because LiteRT ran them no faster in int8 here); ``min cos`` is the
verification's minimum per-sample cosine against ONNX Runtime on the float original
(random probe data). ``--fc-sweep`` times two fully connected layers in LiteRT at several sizes:
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
def _digits(which: str):
    from tests.digits import digits_cnn, digits_mlp

    if which == "cnn":
        return digits_cnn(), {"input": [1, 1, 8, 8]}
    return digits_mlp(), {"input": [1, 64]}


MODELS = {
    "small_cnn": lambda: (onnx.load(EXAMPLE), {"input": [1, 3, 32, 32]}),
    "digits_cnn": lambda: _digits("cnn"),
    "digits_mlp": lambda: _digits("mlp"),
    "resnet50": lambda: (zoo.resnet50(), {"input": [1, 3, 224, 224]}),
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


def _rss_mb(field: str) -> float | None:
    """This process's resident set (``VmRSS:``) or its peak (``VmHWM:``), in MB (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Start a new peak-RSS measurement (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _written(proto, shapes: dict, out: Path, options: dict):
    """``optimize --target litert`` (with its verification in LiteRT): (result, seconds,
    peak MB above the resident set before it, with the model loaded)."""
    measured = _reset_peak()
    before = _rss_mb("VmRSS:")
    start = time.perf_counter()
    result = graphopt.optimize(proto, target="litert", output=out, input_shapes=shapes,
                               threads=1, **options)
    seconds = time.perf_counter() - start
    peak = _rss_mb("VmHWM:") if measured else None
    return result, seconds, None if peak is None or before is None else peak - before


def bench(name: str, rounds: int, runs: int, tmp: Path, precision: str = "float",
          onnx2tf_python: str | None = None, io_layout: str = "onnx") -> dict:
    proto, shapes = MODELS[name]()
    options = {}
    if precision == "int8":
        if proto.opset_import[0].version < 13:
            proto = version_converter.convert_version(proto, 17)
        options = {"quantize": "int8", **_calibration(name)}
    model_mb = proto.ByteSize() / 2**20
    out = tmp / f"{name}-{precision}"
    result, seconds, extra_mb = _written(proto, shapes, out, {
        **options, "target_options": {"io_layout": io_layout}})
    check = result.report["artifact"]
    # graphopt's ONNX output for ONNX Runtime (the ort target's pipeline), timed beside.
    ort_out = tmp / f"{name}-{precision}.onnx"
    graphopt.optimize(proto, target="ort", output=ort_out, input_shapes=shapes, threads=1,
                      **options)
    feeds = verify.probe_inputs(proto, seed=0, shapes=shapes)[0]
    session = verify.session(onnx.load(ort_out), optimize=True, threads=1)
    # Both .tflite files the same way: the interpreter's set_tensor, invoke, get_tensor
    # (as ORT's run takes feeds and gives outputs), not graphopt's run wrapper.
    runners = {"litert": _raw_runner(result.artifact.path, feeds),
               "ort": lambda: verify.run(session, feeds)}
    theirs = _onnx2tf(onnx2tf_python, proto, shapes, tmp / f"{name}-onnx2tf", precision,
                      options) if onnx2tf_python else None
    if isinstance(theirs, Path):
        runners["onnx2tf"] = _raw_runner(theirs, feeds)
    med = _timed(runners, rounds, runs)
    return {"model": name, "precision": precision, "litert_ms": med["litert"] * 1e3,
            "ort_ms": med["ort"] * 1e3, "ratio": med["ort"] / med["litert"],
            "check": f"{check['min_cosine']:.5f} cos" if "min_cosine" in check
            else f"{check['max_abs_diff']:.2g} diff",
            "tflite_kb": (out / "model.tflite").stat().st_size / 1024,
            "onnx_kb": ort_out.stat().st_size / 1024, "write_s": seconds,
            "extra_mb": extra_mb, "model_mb": model_mb,
            "onnx2tf_ms": med["onnx2tf"] * 1e3 if "onnx2tf" in med else None,
            "onnx2tf_kb": theirs.stat().st_size / 1024 if isinstance(theirs, Path) else None,
            "onnx2tf_note": theirs if isinstance(theirs, str) else None,
            "float_layers": _float_layers(result.report)}


def _float_layers(report: dict) -> list[str]:
    """The layers ``quantize-int8`` kept float because LiteRT ran them no faster in int8
    (its ``refused`` sites with measured times), as ``name (int8 us / float us)``."""
    for entry in report.get("trace", []):
        if entry.get("pass_name") == "quantize-int8":
            refused = entry.get("stats", {}).get("compression", {}).get("refused", {})
            return [f"{name} ({why.rsplit('alone: ', 1)[-1]})"
                    for name, why in refused.items() if "measured in" in why]
    return []


def _calibration(name: str) -> dict:
    """Real calibration images for the digits models; random probe inputs otherwise."""
    if not name.startswith("digits"):
        return {}
    from tests.digits import TRAINED_ON, digits_data

    x = digits_data()[0][:TRAINED_ON]
    return {"calibration": {"input": x.reshape(len(x), -1) if name == "digits_mlp" else x}}


def _onnx2tf(python: str, proto, shapes: dict, out: Path, precision: str,
             options: dict) -> Path | str:
    """onnx2tf's ``.tflite`` of ``proto`` (float32, or full-integer int8 calibrated on
    the same data), converted by ``benchmarks/onnx2tf_convert.py`` under ``python`` (an
    interpreter with TensorFlow and onnx2tf): its path, or why there is none."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    model = out / "model.onnx"
    onnx.save(proto, model)
    command = [python, str(Path(__file__).with_name("onnx2tf_convert.py")), str(model),
               str(out)]
    for name, dims in shapes.items():
        command += ["--input-shape", f"{name}={'x'.join(map(str, dims))}"]
    if precision == "int8":
        data = options.get("calibration") or verify.probe_inputs(proto, seed=1,
                                                                 shapes=shapes)[0]
        np.savez(out / "calibration.npz", **{k: np.asarray(v) for k, v in data.items()})
        command += ["--int8", str(out / "calibration.npz")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return f"onnx2tf failed: {done.stderr.strip().splitlines()[-1:]}"
    made = json.loads(done.stdout.strip().splitlines()[-1])
    path = made.get("int8" if precision == "int8" else "float32")
    print(f"  onnx2tf {made['onnx2tf']} (TensorFlow {made['tensorflow']}) converted "
          f"{out.name.removesuffix('-onnx2tf')} in {made['seconds']:.1f} s, peak "
          f"{made['peak_rss_mb']} MB")
    return Path(path) if path else f"onnx2tf wrote no {precision} file"


def _raw_runner(path: Path, feeds: dict):
    """A LiteRT interpreter (XNNPACK, 1 thread) on another converter's ``.tflite``: the
    feeds matched to its inputs by name (or order), NCHW images given as NHWC where the
    file takes them so."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    arrays, inputs = list(feeds.values()), []
    for i, d in enumerate(details):
        name = d["name"].split(":")[0].removeprefix("serving_default_")
        array = feeds.get(name, arrays[i] if i < len(arrays) else None)
        if array.ndim == 4 and list(array.shape) != list(d["shape"]):
            array = array.transpose(0, 2, 3, 1)
        if d["dtype"] == np.int8:  # int8 input: quantized with the file's parameters
            scale, zero = d["quantization"]
            array = np.clip(np.round(array / scale) + zero, -128, 127)
        inputs.append((d["index"], np.ascontiguousarray(array.astype(d["dtype"]))))
    outputs = [d["index"] for d in interpreter.get_output_details()]

    def run():
        for index, array in inputs:
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in outputs]
    return run


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


def _onnx2tf_python(given: str | None) -> tuple[str | None, str]:
    """The interpreter that converts with onnx2tf, or why there is none."""
    import subprocess

    python = given or sys.executable
    probe = subprocess.run([python, "-c", "import onnx2tf, tensorflow"], capture_output=True,
                           text=True)
    if probe.returncode == 0:
        return python, ""
    return None, (f"{python} has no onnx2tf/TensorFlow (pass --onnx2tf PYTHON: an "
                  f"interpreter with them, e.g. a virtualenv with `pip install tensorflow "
                  f"onnx2tf`)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT, help=f"of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--precision", default="float", help="float, int8 or both")
    parser.add_argument("--fc-sweep", action="store_true",
                        help="time two FC layers: float, dynamic and full-integer int8")
    parser.add_argument("--io-layout", default="onnx", choices=("onnx", "nhwc"),
                        help="the layout of graphopt's .tflite inputs (onnx2tf's files take "
                             "NHWC images: nhwc compares like for like)")
    parser.add_argument("--onnx2tf", metavar="PYTHON",
                        help="an interpreter with TensorFlow and onnx2tf installed (default: "
                             "this one, if it has them): adds onnx2tf's .tflite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.fc_sweep:
            fc_sweep(args.rounds, args.runs, Path(tmp))
            return
        python, why = _onnx2tf_python(args.onnx2tf)
        print(f"onnx2tf: {'converted under ' + python if python else 'skipped, ' + why}")
        print(f"{'model':<13} {'precision':<9} {'write s':>7} {'extra MB':>13} "
              f"{'LiteRT ms':>10} {'ORT ms':>9} {'ORT/LiteRT':>10} {'check':>13} "
              f"{'tflite KB':>9} {'onnx KB':>9} {'onnx2tf ms':>10} {'onnx2tf KB':>10}")
        notes = []
        for name in args.models.split(","):
            for precision in args.precision.split(","):
                r = bench(name, args.rounds, args.runs, Path(tmp), precision, python,
                          args.io_layout)
                extra = "-" if r["extra_mb"] is None else \
                    f"{r['extra_mb']:.0f} ({r['extra_mb'] / r['model_mb']:.1f}x)"
                theirs = ("-", "-") if r["onnx2tf_ms"] is None else \
                    (f"{r['onnx2tf_ms']:.4f}", f"{r['onnx2tf_kb']:.1f}")
                print(f"{r['model']:<13} {precision:<9} {r['write_s']:>7.1f} {extra:>13} "
                      f"{r['litert_ms']:>10.4f} {r['ort_ms']:>9.4f} {r['ratio']:>10.2f} "
                      f"{r['check']:>13} {r['tflite_kb']:>9.1f} {r['onnx_kb']:>9.1f} "
                      f"{theirs[0]:>10} {theirs[1]:>10}")
                if r["onnx2tf_note"]:
                    notes.append(f"{r['model']} {precision}: {r['onnx2tf_note']}")
                if r["float_layers"]:
                    notes.append(f"{r['model']} {precision}: kept float, measured no "
                                 f"faster in int8 in LiteRT here: "
                                 f"{'; '.join(r['float_layers'])}")
        for note in notes:
            print(note)


if __name__ == "__main__":
    main()
