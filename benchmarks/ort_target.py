"""ONNX Runtime CPU latency: graphopt's ``--target ort`` output vs the input model.

For each zoo model (tests/zoo.py, torchscript export, batch 1, BERT sequence 128) this
optimizes the model with graphopt for the ``ort`` target, writes it as ``.onnx`` and as
``.ort`` (``--format ort``), checks the outputs match the input model (1e-4), and times
all three in ONNX Runtime: one thread, ORT_ENABLE_ALL for every session (so ORT applies
its own fusions to the input model too; the .ort file with the options recorded beside
it), interleaved rounds, median per run of the CPU time of the calling thread (ORT runs a
one-thread session there; CPU time is what other jobs on a shared machine disturb least).
The ratio is input / graphopt (above 1: graphopt's output is faster).

    python benchmarks/ort_target.py [--models resnet18,mobilenet_v2,bert_minilm]
                                    [--rounds 20] [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt import verify  # noqa: E402
from graphopt.targets.ort import artifact_session  # noqa: E402
from tests import zoo  # noqa: E402


def feeds_for(name: str, proto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name.startswith("bert"):
        return {"input_ids": rng.integers(1, 30522, (1, 128)).astype(np.int64),
                "attention_mask": np.ones((1, 128), np.int64)}
    hw = proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    return {"input": rng.standard_normal((1, 3, hw, hw)).astype(np.float32)}


def median_times(sessions: dict, feeds: dict, rounds: int, runs: int) -> dict[str, float]:
    times = {key: [] for key in sessions}
    for key, sess in sessions.items():  # warm up
        for _ in range(3):
            verify.run(sess, feeds)
    for _ in range(rounds):
        for key, sess in sessions.items():
            for _ in range(runs):
                start = time.thread_time()
                verify.run(sess, feeds)
                times[key].append(time.thread_time() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def bench(name: str, rounds: int, runs: int, tmp: Path) -> dict:
    proto = getattr(zoo, name)("torchscript")
    feeds = feeds_for(name, proto)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    onnx_out = graphopt.optimize(proto, target="ort", output=tmp / f"{name}.onnx",
                                 input_shapes=shapes).artifact.path
    ort_out = graphopt.optimize(proto, target="ort", output=tmp / f"{name}.ort",
                                input_shapes=shapes, format="ort").artifact.path
    sessions = {"input": verify.session(proto, optimize=True, threads=1),
                "graphopt.onnx": verify.session(onnx_out, optimize=True, threads=1),
                # with the session options recorded beside it (OUT.session.json)
                "graphopt.ort": artifact_session(ort_out, threads=1)}
    ref = verify.run(sessions["input"], feeds)
    for key in ("graphopt.onnx", "graphopt.ort"):
        got = verify.run(sessions[key], feeds)
        for out, value in ref.items():
            np.testing.assert_allclose(got[out], value, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{name} {key} {out}")
    return median_times(sessions, feeds, rounds, runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,bert_minilm")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10, help="runs per session per round")
    args = parser.parse_args(argv)
    print(f"{'model':<14}{'input ms':>10}{'graphopt.onnx ms':>18}{'graphopt.ort ms':>17}"
          f"{'ratio onnx':>12}{'ratio ort':>11}")
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        for name in args.models.split(","):
            t = bench(name, args.rounds, args.runs, Path(tmp))
            print(f"{name:<14}{t['input'] * 1e3:>10.3f}{t['graphopt.onnx'] * 1e3:>18.3f}"
                  f"{t['graphopt.ort'] * 1e3:>17.3f}{t['input'] / t['graphopt.onnx']:>12.3f}"
                  f"{t['input'] / t['graphopt.ort']:>11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
