"""How well the cost model predicts ONNX Runtime's latency, before and after calibration.

    python benchmarks/cost_model.py [--quick] [--threads 1] [--passes 3]

Calibrates the ``ort`` target on this machine (``graphopt calibrate``: micro-benchmarks
only; none of the models below is measured by it), then, for each model (graphopt's
``ort`` output, static input shapes: the batch or sequence named in its row), compares
the measured latency (ONNX Runtime as the target runs it, ``--threads`` threads, the
lowest of three rounds' medians; the fastest of ``--passes`` passes over all the models,
as the calibration keeps each probe's fastest of as many passes) with the roofline's
prediction and the calibrated one, and prints the median absolute error of each. Then
the rank agreement (Kendall tau) of predicted and measured latency over candidates a
planner chooses among: the digits CNN with 0 to 75% of its channels pruned, float and
int8, at batch 256; MiniLM with 0 to 50% of its FFN neurons pruned. Prints the CPU flags
it ran with.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt import microbench  # noqa: E402
from graphopt.cost import AnalyticCostModel  # noqa: E402
from graphopt.cost_calibration import (CalibratedCostModel, errors, fit,  # noqa: E402
                                       with_input_shapes)
from graphopt.target import cpu_flags, cpu_model  # noqa: E402
from graphopt.targets.ort import LOSSLESS_PIPELINE, OrtTarget  # noqa: E402
from tests import digits, zoo  # noqa: E402
from tests.sentences import minilm_batches, sentences  # noqa: E402


def static(proto: onnx.ModelProto, feeds: dict) -> onnx.ModelProto:
    """``proto`` with its inputs fixed to the feeds' shapes."""
    return with_input_shapes(proto, {name: list(v.shape) for name, v in feeds.items()})


def images(proto: onnx.ModelProto, batch: int) -> dict:
    value = proto.graph.input[0]
    shape = [batch] + [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
    return {value.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def tokens(seq: int, vocab: int = 30522) -> dict:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1, vocab, (1, seq)).astype(np.int64),
            "attention_mask": np.ones((1, seq), np.int64)}


def optimized(proto, **kwargs) -> onnx.ModelProto:
    return graphopt.optimize(proto, target="ort", **kwargs).model.to_onnx()


def models() -> list[tuple[str, onnx.ModelProto, dict]]:
    xtr = digits.digits_data()[0]
    calib = {"input": xtr[:256]}
    cnn, mlp = digits.digits_cnn(), digits.digits_mlp()
    rows = [("digits CNN, batch 1", optimized(cnn), images(cnn, 1)),
            ("digits CNN, batch 256", optimized(cnn), images(cnn, 256)),
            ("digits CNN int8, batch 256", optimized(cnn, quantize="int8", calibration=calib),
             images(cnn, 256)),
            ("digits MLP, batch 256", optimized(mlp), images(mlp, 256)),
            ("MLP 64 wide, batch 64", optimized(zoo.mlp()), images(zoo.mlp(), 64))]
    for name, batch in (("resnet_cnn", 16), ("mobilenet_cnn", 16), ("resnet18", 1),
                        ("mobilenet_v2", 1), ("efficientnet_b0", 1)):
        proto = getattr(zoo, name)()
        rows.append((f"{name}, batch {batch}", optimized(proto), images(proto, batch)))
    rows.append(("bert_tiny, sequence 64", optimized(zoo.bert_tiny()),
                 tokens(64, zoo.BERT_TINY_VOCAB)))
    rows.append(("all-MiniLM-L6-v2, sequence 128", optimized(zoo.bert_minilm()), tokens(128)))
    return rows


def with_pass(spec: str) -> list[str]:
    """The ORT pipeline with ``spec`` where compression goes: after the cleanup, before
    the fusions hide the layers (as ``--prune`` places it)."""
    cut = LOSSLESS_PIPELINE.index("sink-transposes")
    return [*LOSSLESS_PIPELINE[:cut], spec, *LOSSLESS_PIPELINE[cut:]]


def candidates() -> dict[str, list[tuple[str, onnx.ModelProto, dict]]]:
    xtr = digits.digits_data()[0]
    calib = {"input": xtr[:256]}
    cnn = digits.digits_cnn()
    digit_rows = []
    for ratio in (0.0, 0.25, 0.5, 0.625, 0.75):
        passes = with_pass(f"prune-channels(ratio={ratio})") if ratio else None
        for quantize in (None, "int8"):
            proto = optimized(cnn, passes=passes, quantize=quantize, calibration=calib,
                              metric="mean-cosine", tolerance=0.5)
            digit_rows.append((f"{ratio:.3f} pruned {quantize or 'fp32'}", proto,
                               images(cnn, 256)))
    minilm = zoo.bert_minilm()
    texts = minilm_batches(sentences(64), batch=32)
    minilm_rows = []
    for ratio in (0.0, 0.25, 0.5):
        passes = with_pass(f"prune-ffn(ratio={ratio})") if ratio else None
        proto = optimized(minilm, passes=passes, calibration=texts, metric="mean-cosine",
                          tolerance=0.5)
        minilm_rows.append((f"FFN {ratio:.2f} pruned", proto, tokens(128)))
    return {"digits CNN (batch 256)": digit_rows, "MiniLM (sequence 128)": minilm_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick probe set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=3,
                        help="passes over the probes, then over the models (fastest kept)")
    args = parser.parse_args()
    target = OrtTarget(threads=args.threads)
    print(f"CPU: {cpu_model()}; flags: {' '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'amx_int8'}))}; "
          f"ONNX Runtime threads: {args.threads}")
    start = time.perf_counter()
    probes = microbench.suite(quick=args.quick, blocked_layout=target.device.blocked_layout)
    cal = fit(probes, target.time_model, target.device, target.fingerprint(),
              passes=args.passes)
    print(f"calibration: {len(cal.probes)} probes in {time.perf_counter() - start:.0f} s "
          f"(per run {cal.base_s * 1e6:.1f} us, per node {cal.node_overhead_s * 1e6:.2f} us)\n")
    roofline, calibrated = AnalyticCostModel(), CalibratedCostModel(cal)

    def fastest(rows) -> list[float]:
        """Each row's fastest time over ``--passes`` whole passes over all the rows (a
        slow spell of the machine then hits one pass, not one model)."""
        times = [math.inf] * len(rows)
        for _ in range(args.passes):
            times = [min(t, target.time_model(proto, feeds))
                     for t, (_, proto, feeds) in zip(times, rows)]
        return times

    rows = models()
    names = [name for name, _, _ in rows]
    samples = [(static(proto, feeds), seconds)
               for (_, proto, feeds), seconds in zip(rows, fastest(rows))]
    before = errors(roofline, target.device, samples)
    after = errors(calibrated, target.device, samples)
    print(f"{'model':34s} {'measured':>11s} {'roofline':>9s} {'calibrated':>11s}")
    for name, (_, measured), b, a in zip(names, samples, before, after):
        print(f"{name:34s} {measured * 1e3:8.3f} ms {b:+8.1%} {a:+10.1%}")
    print(f"{'median absolute error':34s} {'':11s} "
          f"{statistics.median(abs(e) for e in before):8.1%} "
          f"{statistics.median(abs(e) for e in after):10.1%}\n")

    for group, rows in candidates().items():
        measured = fastest(rows)
        protos = [static(proto, feeds) for _, proto, feeds in rows]
        predicted = {label: [(1 + e) * m for e, m in zip(
            errors(model, target.device, list(zip(protos, measured))), measured)]
            for label, model in (("roofline", roofline), ("calibrated", calibrated))}
        print(f"{group}: {len(rows)} candidates")
        for i, (name, *_) in enumerate(rows):
            print(f"  {name:28s} measured {measured[i] * 1e3:8.3f} ms   roofline "
                  f"{predicted['roofline'][i] * 1e3:8.3f} ms   calibrated "
                  f"{predicted['calibrated'][i] * 1e3:8.3f} ms")
        for label, values in predicted.items():
            tau = kendalltau(values, measured).statistic
            print(f"  Kendall tau, {label:10s} vs measured: {tau:+.3f}")
        print()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
