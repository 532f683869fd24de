"""x86 latency: the TVM artifact (``--target x86``) vs ONNX Runtime on the same model.

For each model (tests/zoo.py, static shapes: batch 1, BERT sequence 64/128) this lowers
the model with graphopt for the ``x86`` target, loads ``model.so`` in a Relax VM, and
times it against an ONNX Runtime session on the original model (ORT_ENABLE_ALL, so ORT
applies its own fusions). Both use the same thread count (default 1; ``--threads 0`` is
every core) and are checked to give the same outputs.

    python benchmarks/tvm_vs_ort.py [--models mobilenet_cnn,resnet18] [--threads 1]
                                    [--tune 64] [--out DIR] [--json out.json]

``--tune N`` also MetaSchedule-tunes each model with N trials on this machine (slow:
minutes per model) and times the tuned library; the database is kept in
``DIR/<model>/tuning`` and applied again when the model is lowered into that folder.
Untuned TVM on CPU runs TVM's default (unscheduled) loops: expect it to lose to ORT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cnn(builder):
    def make():
        proto = builder()
        hw = proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        x = np.random.default_rng(0).standard_normal((1, 3, hw, hw)).astype(np.float32)
        return proto, {"input": list(x.shape)}, {"input": x}
    return make


def _bert(builder, vocab, seq):
    def make():
        proto = builder()
        ids = np.random.default_rng(0).integers(1, vocab, (1, seq)).astype(np.int64)
        mask = np.ones((1, seq), np.int64)
        return proto, {"input_ids": [1, seq], "attention_mask": [1, seq]}, \
            {"input_ids": ids, "attention_mask": mask}
    return make


def models():
    from tests import zoo

    return {
        "mobilenet_cnn": _cnn(zoo.mobilenet_cnn),
        "resnet_cnn": _cnn(zoo.resnet_cnn),
        "bert_tiny": _bert(zoo.bert_tiny, zoo.BERT_TINY_VOCAB, 64),
        "resnet18": _cnn(zoo.resnet18),
        "mobilenet_v2": _cnn(zoo.mobilenet_v2),
        "bert_minilm": _bert(zoo.bert_minilm, 30522, 128),
    }


def timeit(fn, seconds: float, min_runs: int = 10, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered) * 1e3,
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3, "runs": len(ordered)}


def ort_session(proto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def tvm_callable(library: Path, feeds: dict, input_order: list[str]):
    import tvm

    from graphopt.targets import tvm_runner

    vm = tvm_runner.load_vm(str(library))
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in input_order]
    main = vm["main"]

    def run():
        return main(*args)

    def outputs():
        return [t.numpy() for t in tvm_runner._flatten(run())]

    return run, outputs


def bench_model(name, make, args, out_root: Path) -> dict:
    import graphopt

    proto, shapes, feeds = make()
    row = {"model": name, "shapes": shapes}
    sess = ort_session(proto, args.threads)
    names = [o.name for o in sess.get_outputs()]
    reference = sess.run(names, feeds)
    row["ort"] = summary(timeit(lambda: sess.run(names, feeds), args.seconds))

    folder = out_root / name
    start = time.perf_counter()
    result = graphopt.optimize(proto, target="x86", output=folder, input_shapes=shapes)
    row["lower_s"] = time.perf_counter() - start
    order = [i.name for i in proto.graph.input
             if i.name not in {t.name for t in proto.graph.initializer}]
    variants = [("tvm", result.artifact.path)]
    if args.tune:
        target = graphopt.get_target("x86")
        start = time.perf_counter()
        tuned = target.lower(result.model, folder / "tuned", tune_trials=args.tune)
        row["tune_s"] = time.perf_counter() - start
        variants.append((f"tvm_tuned{args.tune}", tuned.path))
    for label, library in variants:
        run, outputs = tvm_callable(library, feeds, order)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs(), reference))
        row[label] = {**summary(timeit(run, args.seconds)), "max_abs_diff": diff}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mobilenet_cnn,resnet_cnn,bert_tiny,resnet18,"
                        "mobilenet_v2")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both runtimes (0: every core)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: no)")
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # Thread counts must be set before TVM's runtime starts its pool.
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    available = models()
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {', '.join(available)}")
    threads = f"{args.threads}" if args.threads else f"all ({os.cpu_count()})"
    print(f"x86 latency, batch 1, {threads} thread(s) for both runtimes "
          f"(TVM_NUM_THREADS / ORT intra_op_num_threads); ORT: ORT_ENABLE_ALL on the "
          f"original model; TVM: graphopt --target x86, "
          f"{'untuned and tuned' if args.tune else 'untuned'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_root = args.out or Path(tmp)
        for name in chosen:
            row = bench_model(name, available[name], args, out_root)
            rows.append(row)
            cols = [f"{name:<14}", f"ort {row['ort']['median_ms']:8.3f} ms"]
            for key in [k for k in row if k.startswith("tvm")]:
                r = row[key]
                cols.append(f"{key} {r['median_ms']:8.3f} ms "
                            f"({row['ort']['median_ms'] / r['median_ms']:.2f}x ort, "
                            f"diff {r['max_abs_diff']:.1e})")
            cols.append(f"lower {row['lower_s']:.1f} s")
            if "tune_s" in row:
                cols.append(f"tune {row['tune_s']:.0f} s")
            print("  ".join(cols), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
