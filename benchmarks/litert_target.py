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

The default is the example CNN and the zoo's MLP; the zoo's MobileNet- and ResNet-style
CNNs and all-MiniLM-L6-v2 (sequence 128) are exported with torch first (the ``dev``
extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

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


def bench(name: str, rounds: int, runs: int, tmp: Path) -> dict:
    proto, shapes = MODELS[name]()
    result = graphopt.optimize(proto, target="litert", output=tmp / name,
                               input_shapes=shapes, threads=1)
    check = result.report["artifact"]
    feeds = verify.probe_inputs(proto, seed=0, shapes=shapes)[0]
    target = LiteRtTarget(threads=1)
    session = verify.session(proto, optimize=True, threads=1)
    runners = {"litert": lambda: target.run(result.artifact, feeds),
               "ort": lambda: verify.run(session, feeds)}
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
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "litert_ms": med["litert"] * 1e3, "ort_ms": med["ort"] * 1e3,
            "ratio": med["ort"] / med["litert"], "max_abs_diff": check["max_abs_diff"],
            "tflite_kb": (tmp / name / "model.tflite").stat().st_size / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT, help=f"of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    print(f"{'model':<14} {'LiteRT ms':>10} {'ORT ms':>8} {'ORT/LiteRT':>10} "
          f"{'max diff':>9} {'tflite KB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            r = bench(name, args.rounds, args.runs, Path(tmp))
            print(f"{r['model']:<14} {r['litert_ms']:>10.4f} {r['ort_ms']:>8.4f} "
                  f"{r['ratio']:>10.2f} {r['max_abs_diff']:>9.2g} {r['tflite_kb']:>9.1f}")


if __name__ == "__main__":
    main()
