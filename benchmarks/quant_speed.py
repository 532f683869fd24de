"""How long int8 quantization takes: graphopt against ONNX Runtime's own quantizer.

    python benchmarks/quant_speed.py [--model resnet50] [--images 8] [--batch 1]

Both quantize the same exported CNN (ResNet-50 by default: bottleneck blocks, random
weights with non-trivial BatchNorm statistics, dynamic batch) with the same calibration
images, static QDQ int8 with per-channel weights:

* **graphopt**: ``graphopt.optimize(model, quantize="int8", calibration=images)``, the
  whole command a user runs: the lossless pipeline, calibration, the accuracy budget
  (0.99 minimum per-sample cosine, checked on the calibration images), the per-layer
  cost check, and the final verification against ONNX Runtime on the original.
* **ONNX Runtime**: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, uint8
  activations, int8 weights, ``reduce_range`` on CPUs without VNNI, as its documentation
  advises), from a file to a file, as its API works. Its time does not include any
  accuracy check: it has none.

Printed: wall seconds of each and their ratio (one run each, same process), then the
result of each: the minimum per-image cosine against the float model on 16 held-out
images, and the latency at the given batch (1 ORT thread, median of interleaved runs).
The CPU flags it ran with come first: int8 speed depends on VNNI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.accuracy import median_latency, run_all, sample_cosines, session  # noqa: E402
from graphopt.target import cpu_flags  # noqa: E402
from tests import zoo  # noqa: E402

MODELS = {"resnet50": zoo.resnet50, "resnet18": zoo.resnet18}


def images(count: int, batch: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
            for _ in range(count)]


def ort_quantize(model: onnx.ModelProto, data: list[dict], folder: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(data)

        def get_next(self):
            return next(self.items, None)

    src, dst = folder / "float.onnx", folder / "ort_int8.onnx"
    onnx.save(model, src)
    vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=not vnni)
    return onnx.load(dst)


def min_cosine(reference: onnx.ModelProto, candidate: onnx.ModelProto, data) -> float:
    ref = run_all(session(reference, optimize=True), data)
    got = run_all(session(candidate, optimize=True), data)
    return min(min(sample_cosines(r, g, len(d["input"]))) for r, g, d in zip(ref, got, data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--images", type=int, default=8, help="calibration images")
    parser.add_argument("--batch", type=int, default=1, help="images per calibration batch")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"})
    print(f"cpu flags: {', '.join(flags)}")
    model = MODELS[args.model]()
    calibration = images(max(1, args.images // args.batch), args.batch, seed=0)
    held_out = images(16, 1, seed=1)

    start = time.perf_counter()
    result = graphopt.optimize(model, quantize="int8", calibration=calibration)
    graphopt_s = time.perf_counter() - start
    ours = result.model.to_onnx()
    section = result.report["compression"]["passes"].get("quantize-int8", {})
    quantized = sum(e["changed"] for e in (section.get("sites") or {}).values())
    in_pass = sum(e["seconds"] for e in result.report["trace"]
                  if e["pass_name"] == "quantize-int8")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        theirs = ort_quantize(model, calibration, Path(tmp))
        ort_s = time.perf_counter() - start

    print(f"{args.model}, {args.images} calibration images in batches of {args.batch}")
    print(f"{'':28} {'seconds':>8} {'min cosine':>11} {'latency ms':>11}")
    latency = median_latency([model, ours, theirs], images(1, args.batch, seed=2)[0],
                             repeats=args.repeats, threads=1)
    rows = [("float", None, 1.0, latency[0]),
            (f"graphopt ({quantized} layers int8)", graphopt_s,
             min_cosine(model, ours, held_out), latency[1]),
            ("onnxruntime quantize_static", ort_s, min_cosine(model, theirs, held_out),
             latency[2])]
    for label, seconds, cosine, lat in rows:
        sec = f"{seconds:8.1f}" if seconds is not None else f"{'':8}"
        print(f"{label:28} {sec} {cosine:11.4f} {lat * 1e3:11.2f}")
    print(f"graphopt / onnxruntime time: {graphopt_s / ort_s:.2f}x "
          f"(graphopt: {in_pass:.1f} s in quantize-int8, the rest in the lossless passes, "
          f"checks and verification)")


if __name__ == "__main__":
    main()
