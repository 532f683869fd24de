"""graphopt's static memory plan (``--target mcu``) next to TFLite Micro's arena for the
same float model, with the naive (no reuse) sum.

For each model: the ``mcu`` target's plan (arena for intermediates; inputs and outputs
are the caller's buffers, so the table also gives arena + I/O), and the same optimized
model written as a ``.tflite`` by the litert target (NHWC inputs and outputs, so no
boundary TRANSPOSE adds a tensor) run once in the ``tflite-micro`` wheel's interpreter:
its arena's head (the planned tensors, inputs and outputs included, plus kernel scratch)
and tail (persistent structures). Then the ``.tflite`` again carrying graphopt's plan of
its own tensors as TFLite Micro's offline memory plan (``graphopt.targets.tflm_plan``),
run in the same interpreter: its head, and its outputs against the online plan's.

The two schedules differ where the formats do: TFLite's convolutions pad SAME or VALID
only, so an ONNX Conv with other padding gets an explicit PAD (one more, larger tensor);
the ``mcu`` kernels pad inside the convolution. The "TFLM head" column is therefore
TFLite Micro on the ``.tflite``, not TFLite Micro on graphopt's schedule.

    python benchmarks/mcu_memory.py [--models small_cnn,resnet_cnn,mobilenet_cnn,conv_net]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.targets.litert import LiteRtTarget  # noqa: E402
from graphopt.targets.mcu import MCU  # noqa: E402
from graphopt.targets.tflm_plan import (mcu_plan_with_io, tflm_compatible,  # noqa: E402
                                         tflm_run, why_no_tflm, with_offline_plan)
from tests import zoo  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"


def _conv_net():
    from tests.test_target_mcu import conv_net
    return conv_net()


MODELS = {
    "small_cnn": ("example CNN", lambda: onnx.version_converter.convert_version(
        onnx.load(EXAMPLE), 17), {"input": [1, 3, 32, 32]}),
    "resnet_cnn": ("zoo ResNet-style CNN", zoo.resnet_cnn, {"input": [1, 3, 32, 32]}),
    "mobilenet_cnn": ("zoo MobileNetV3-style CNN", zoo.mobilenet_cnn,
                      {"input": [1, 3, 32, 32]}),
    "conv_net": ("4-layer 16-channel 32x32 conv net", _conv_net, {"x": [1, 3, 32, 32]}),
}


def measure(key: str, tmp: Path) -> dict:
    title, make, shapes = MODELS[key]
    model = make()
    mcu_out, lite_out = tmp / f"{key}_mcu", tmp / f"{key}_litert"
    graphopt.optimize(model, target=MCU.with_runner("host"), output=mcu_out,
                      input_shapes=shapes)
    memory = json.loads((mcu_out / "manifest.json").read_text())["memory"]
    graphopt.optimize(model, target=LiteRtTarget(io_layout="nhwc"), output=lite_out,
                      input_shapes=shapes)
    data, rewrites = tflm_compatible((lite_out / "model.tflite").read_bytes())
    tflite = tmp / f"{key}.tflite"
    tflite.write_bytes(data)
    (name, shape), = shapes.items()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    nhwc = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    online = tflm_run(tflite, [nhwc])
    planned_bytes, plan = with_offline_plan(data)
    offline_path = tmp / f"{key}_offline.tflite"
    offline_path.write_bytes(planned_bytes)
    offline = tflm_run(offline_path, [nhwc])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {name: x})[0]
    got = online["outputs"][0]
    got = got.transpose(0, 3, 1, 2) if got.ndim == 4 else got
    return {"model": title, "arena": memory["arena_bytes"], "io": memory["io_bytes"],
            "naive": memory["naive_bytes"], "largest": memory["largest_tensor_bytes"],
            "with_io": mcu_plan_with_io(onnx.load(mcu_out / "model.onnx")).arena_bytes,
            "tflm_head": online["head"], "tflm_tail": online["tail"],
            "tflm_offline_head": offline["head"], "offline_plan": plan.arena_bytes,
            "offline_same_outputs": bool(np.array_equal(online["outputs"][0],
                                                        offline["outputs"][0])),
            "tflm_vs_ort": float(np.abs(got - want).max()), "rewrites": rewrites}


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    missing = why_no_tflm()
    if missing:
        sys.exit(missing)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            rows.append(measure(key, Path(tmp)))
    head = ["model", "graphopt arena", "arena + I/O", "graphopt, I/O in the arena",
            "naive (no reuse)",
            "TFLM head (online)", "TFLM head (graphopt's offline plan)", "TFLM tail",
            "outputs offline = online", "TFLM vs ORT"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        print(f"| {r['model']} | {kib(r['arena'])} | {kib(r['arena'] + r['io'])} | "
              f"{kib(r['with_io'])} | "
              f"{kib(r['naive'])} | {kib(r['tflm_head'])} | {kib(r['tflm_offline_head'])} | "
              f"{kib(r['tflm_tail'])} | {'yes' if r['offline_same_outputs'] else 'NO'} | "
              f"{r['tflm_vs_ort']:.1e} |")
    print("\n(bytes)", json.dumps(rows))


if __name__ == "__main__":
    main()
