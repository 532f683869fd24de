"""The planner on the digits CNN against each technique alone, at the same budget.

    python benchmarks/plan_digits.py [--metric mean-cosine] [--tolerance 0.99]
        [--recover finetune] [--batch 256] [--repeats 30]

Each variant is optimized for ONNX Runtime on this machine (1 thread): the planner
(``goal=latency``, no scheme named, timed at a batch of ``--batch`` images) and every
lossy scheme alone through the same pipeline and budget (mean output cosine to the
original on 257 training-split images the network never saw; calibration on the first
1000 unlabeled training images). Printed per variant: ONNX Runtime latency at batch
``--batch`` and at batch 1 relative to the original fp32 model (median of interleaved
runs, one session each, measured in one run of this script), test accuracy on the 540
test images, file size, and the time the optimization took. Then the planner's own table
of candidates (predicted and measured). The cost model is the one stored for this
machine (``graphopt calibrate``), else the roofline.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.accuracy import median_latency  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.target import cpu_flags  # noqa: E402
from tests.digits import (TRAINED_ON, accuracy, digits_cnn, digits_data,  # noqa: E402
                          validation_split)

SINGLES = [("prune channels", {"prune": "channels"}), ("low-rank svd", {"low-rank": "svd"}),
           ("quantize int8", {"quantize": "int8"}), ("quantize int8-dynamic",
                                                      {"quantize": "int8-dynamic"})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.99)
    parser.add_argument("--metric", default="mean-cosine",
                        help="the budget's metric (top1: agreement with the original's "
                             "class on the unseen images)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--recover", default="recover",
                        help="the recovery pass of every variant (finetune: the planner "
                             "searches with the re-fit and fine-tunes its best structural "
                             "candidate; each technique alone searches with finetune)")
    args = parser.parse_args()
    xtr, _, xte, yte = digits_data()
    xval, _ = validation_split()
    common = dict(calibration={"input": xtr[:TRAINED_ON]}, validation={"input": xval},
                  metric=args.metric, tolerance=args.tolerance,
                  input_shapes={"input": [args.batch, 1, 8, 8]}, recovery=args.recover,
                  threads=1)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    print(f"CPU: {platform.processor() or platform.machine()}, flags {', '.join(flags)}")
    original = digits_cnn()
    variants = {"original (fp32)": (original, 0.0, None)}
    start = time.perf_counter()
    planned = graphopt.optimize(original, goal="latency", **common)
    variants["planner (--goal latency)"] = (planned.model.to_onnx(),
                                            time.perf_counter() - start, planned.report)
    for label, schemes in SINGLES:
        start = time.perf_counter()
        try:
            result = graphopt.optimize(original, schemes=schemes, **common)
        except GraphoptError as exc:
            print(f"{label}: failed: {exc}")
            continue
        variants[f"{label} alone"] = (result.model.to_onnx(), time.perf_counter() - start,
                                      result.report)
    protos = [v[0] for v in variants.values()]
    big = {"input": xte[:args.batch] if len(xte) >= args.batch else
           np.resize(xte, (args.batch, *xte.shape[1:]))}
    one = {"input": xte[:1]}
    at_batch = median_latency(protos, big, repeats=args.repeats, clock="cpu")
    at_one = median_latency(protos, one, repeats=args.repeats * 20, clock="cpu")
    base_acc = accuracy(original, xte, yte)
    print(f"budget: {args.metric} >= {args.tolerance} on {len(xval)} unseen images; "
          f"latency: ONNX Runtime, 1 thread, relative to the original")
    print(f"{'variant':34s} {'b' + str(args.batch):>7s} {'b1':>6s} {'test acc':>9s} "
          f"{'size KiB':>9s} {'seconds':>8s}")
    for (label, (proto, seconds, _)), t_big, t_one in zip(variants.items(), at_batch, at_one):
        acc = accuracy(proto, xte, yte)
        print(f"{label:34s} {t_big / at_batch[0]:6.3f}x {t_one / at_one[0]:5.3f}x "
              f"{acc:8.4f} ({(acc - base_acc) * 100:+.2f}) {proto.ByteSize() / 1024:8.1f} "
              f"{seconds:8.1f}")
    print(f"original: {at_batch[0] * 1e3:.3f} ms at batch {args.batch}, "
          f"{at_one[0] * 1e6:.1f} us at batch 1")
    plan = planned.report["plan"]
    print(f"\nplanner: chose {plan['chosen']} ({plan['why']}); timing noise "
          f"{plan['timing_noise']:.1%}; cost model: {planned.report['cost_model']['kind']}, "
          f"Kendall tau of predicted against measured latency over the candidates "
          f"{plan['prediction_tau']}")
    for c in plan["candidates"]:
        pred = c["predicted_latency_s"] * 1e3 if c["predicted_latency_s"] else float("nan")
        meas = c["measured_latency_s"] * 1e3 if c["measured_latency_s"] else float("nan")
        mark = ">" if c["label"] == plan["chosen"] else "*" if c["pareto"] else " "
        print(f" {mark} {c['label'][:78]:78s} score {c['score']:.4f} predicted {pred:7.3f} "
              f"ms measured {meas:7.3f} ms")


if __name__ == "__main__":
    main()
