"""The planner on all-MiniLM-L6-v2 (real weights), for latency and for size.

    python benchmarks/plan_minilm.py [--goal latency|size|balanced] [--tolerance 0.99]
        [--schemes quantize=all,prune=ffn] [--no-recover] [--workers N]

Calibration, validation and test sentences are disjoint sets of prose from the Python
standard library's docstrings (``tests/corpus.py``). The budget is the lowest per-sentence
cosine of the embeddings to the original's on the validation sentences (``cosine``).
``--schemes`` limits what the planner may combine (default: every installed scheme;
the structural searches on MiniLM take minutes each). Printed: the planner's candidates
(score, size, predicted and measured latency on this machine, 1 thread), the choice,
and for it the embeddings' mean and minimum cosine on the held-out test sentences, the
latency (ONNX Runtime, 1 thread, median of interleaved runs, one text of
``--sequence`` tokens: held-out sentences run together; the planner times its
candidates at that shape too, on its first calibration batch tiled to it) and the file size relative
to the original fp32 model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt import verify  # noqa: E402
from graphopt.accuracy import median_latency  # noqa: E402
from graphopt.target import cpu_flags  # noqa: E402
from tests import corpus, zoo  # noqa: E402
from tests.sentences import minilm_batches  # noqa: E402


def embeddings(proto, batches) -> np.ndarray:
    sess = verify.session(proto)
    return np.concatenate([verify.run(sess, b)["sentence_embedding"] for b in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", default="latency")
    parser.add_argument("--tolerance", type=float, default=0.99)
    parser.add_argument("--schemes", default=None,
                        help="flag=value[+value],...: what the planner may use")
    parser.add_argument("--no-recover", action="store_true")
    parser.add_argument("--workers", default=None)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--sequence", type=int, default=128,
                        help="the deployment's sequence length the planner times at "
                             "(batch 1)")
    args = parser.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    print(f"cpu flags: {', '.join(flags)}")
    cal_s, val_s, test_s = corpus.split(args.calibration, 128, 256)
    cal, val, test = (minilm_batches(s, 32) for s in (cal_s, val_s, test_s))
    schemes = None
    if args.schemes:
        schemes = {}
        for item in args.schemes.split(","):
            flag, _, values = item.partition("=")
            schemes[flag] = values.split("+")
    proto = zoo.bert_minilm()
    start = time.perf_counter()
    result = graphopt.optimize(proto, goal=args.goal, plan=True, schemes=schemes,
                               calibration=cal, validation=val, metric="cosine",
                               tolerance=args.tolerance, workers=args.workers,
                               input_shapes={"input_ids": [1, args.sequence],
                                             "attention_mask": [1, args.sequence]},
                               recovery=None if args.no_recover else "recover", threads=1)
    seconds = time.perf_counter() - start
    plan = result.report["plan"]
    print(f"planner: {seconds:.0f} s, {len(plan['candidates'])} candidates, timed at "
          f"{plan['timed_at']}, timing noise {plan['timing_noise']:.1%}")
    for c in plan["candidates"]:
        mark = ">" if c["label"] == plan["chosen"] else "*" if c["pareto"] else " "
        pred = (c["predicted_latency_s"] or float("nan")) * 1e3
        meas = (c["measured_latency_s"] or float("nan")) * 1e3
        score = "failed" if c.get("error") else f"{c['score']:.4f}"
        print(f" {mark} {c['label'][:70]:70s} {score:>7s} {c['size_bytes'] / 2**20:6.1f} MiB "
              f"pred {pred:7.2f} ms meas {meas:7.2f} ms {c['seconds']:6.0f} s")
    print(f"chosen: {plan['chosen']}: {plan['why']}")
    out = result.model.to_onnx()
    ref, got = embeddings(proto, test), embeddings(out, test)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    # one real text of --sequence tokens (held-out sentences run together, cut there)
    feeds = zoo.minilm_tokenize((" ".join(test_s),))
    feeds = {k: v[:, :args.sequence] for k, v in feeds.items()}
    t0, t1 = median_latency([proto, out], feeds, repeats=30, clock="cpu")
    size0, size1 = proto.ByteSize(), out.ByteSize()
    print(f"held-out test ({len(test_s)} sentences): mean cosine {cos.mean():.4f}, min "
          f"{cos.min():.4f}; latency {t1 / t0:.3f}x the fp32 original ({t0 * 1e3:.2f} ms "
          f"-> {t1 * 1e3:.2f} ms at 1 x {args.sequence} tokens); file "
          f"{size1 / size0:.3f}x ({size0 / 2**20:.1f} -> {size1 / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
