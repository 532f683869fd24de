"""FFN pruning of all-MiniLM-L6-v2 (real weights) with and without recovery.

    python benchmarks/prune_minilm.py [--calibration 800] [--ratios 0.25,0.5]

prune-channels finds the six FFN groups (intermediate neurons) and refuses the rest
(attention heads split by a Reshape, the residual stream tied to LayerNorm) with reasons.
For each uniform ratio: the encoder's linear-layer MACs relative to the original, the
mean and minimum cosine of the sentence embeddings to the original's on held-out natural
sentences (not from the calibration generator), for (a) Wanda importance alone, (b) +
the least-squares re-fit of the changed layers, and ONNX Runtime latency (1 thread,
median of interleaved runs) at batch 1 x 128 tokens and batch 8 x 32 tokens.
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
from graphopt.ir import Model  # noqa: E402
from graphopt.pass_infra import PassContext  # noqa: E402
from graphopt.passes.prune.channels import PruneChannels, materialize_weights  # noqa: E402
from graphopt.passes.recover.refit import refit  # noqa: E402
from graphopt.rewrite import constant_value  # noqa: E402
from graphopt.targets.ort import LOSSLESS_PIPELINE, OrtTarget, cpu_flags  # noqa: E402
from tests import zoo  # noqa: E402
from tests.helpers import CALIBRATION_SENTENCES  # noqa: E402
from tests.sentences import minilm_batches, sentences  # noqa: E402


def linear_macs(model: Model) -> int:
    """Multiply-accumulates per token of the MatMul/Gemm layers with constant weights."""
    total = 0
    for node in model.graph.nodes:
        if node.op in ("MatMul", "Gemm") and len(node.inputs) > 1:
            w = constant_value(node.inputs[1])
            if w is not None and w.ndim == 2:
                total += int(w.size)
    return total


def embeddings(proto, batches) -> np.ndarray:
    sess = verify.session(proto)
    return np.concatenate([verify.run(sess, b)["sentence_embedding"] for b in batches])


def cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.mean()), float(cos.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=800,
                        help="generated calibration sentences")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    print(f"CPU flags: {', '.join(flags)}")
    start = time.perf_counter()
    cleanup = [p for p in LOSSLESS_PIPELINE][:8]  # what runs before compression
    clean = graphopt.optimize(zoo.bert_minilm(), passes=cleanup).model
    materialize_weights(clean)
    reference = clean.to_onnx()
    calibration = minilm_batches(sentences(args.calibration))
    held_out = minilm_batches(list(zoo.MINILM_SENTENCES) + list(CALIBRATION_SENTENCES))
    tokens = sum(b["input_ids"].size for b in calibration)
    print(f"calibration: {args.calibration} generated sentences, {tokens} tokens; held out: "
          f"{sum(len(b['input_ids']) for b in held_out)} natural sentences")
    target = OrtTarget()
    ctx = PassContext(target=target, device=target.device, calibration=calibration)
    pruner = PruneChannels()
    sites = pruner.sites(clean, ctx)
    usable = [s for s in sites if s.refused is None]
    print(f"sites: {len(usable)} prunable ({', '.join(str(s.size) for s in usable)} "
          f"channels), {len(sites) - len(usable)} refused, e.g. "
          f"{next(s.refused for s in sites if s.refused)}")
    want = embeddings(reference, held_out)
    base_macs = linear_macs(clean)
    rows, protos = [], {"original": reference}
    for ratio in (float(r) for r in args.ratios.split(",")):
        model = clean.clone()
        choice = {s.name: min(s.settings, key=lambda v: abs(v - ratio)) for s in usable}
        applied = pruner.apply(model, choice, ctx)
        plain = model.to_onnx()
        t0 = time.perf_counter()
        refit(reference, model, applied.kept, calibration, scope="changed")
        seconds = time.perf_counter() - t0
        recovered = model.to_onnx()
        macs = linear_macs(model) / base_macs
        rows.append((f"FFN {ratio:.0%}, no recovery", macs, *cosines(want, embeddings(
            plain, held_out)), None))
        rows.append((f"FFN {ratio:.0%} + recover", macs, *cosines(want, embeddings(
            recovered, held_out)), seconds))
        protos[f"FFN {ratio:.0%}"] = recovered
    one = zoo.minilm_tokenize((" ".join(["word"] * 126),))
    eight = minilm_batches(sentences(2000)[1200:])[-1]
    eight = {k: np.repeat(v[:1], 8, axis=0) for k, v in eight.items()}
    lat1 = dict(zip(protos, median_latency(list(protos.values()), one, repeats=args.repeats)))
    lat8 = dict(zip(protos, median_latency(list(protos.values()), eight,
                                           repeats=args.repeats)))
    print(f"{'variant':26} {'linear MACs':>11} {'mean cos':>9} {'min cos':>8} {'refit s':>8}")
    for label, macs, mean, low, seconds in rows:
        print(f"{label:26} {macs:10.3f}x {mean:9.4f} {low:8.4f} "
              f"{'' if seconds is None else f'{seconds:8.1f}'}")
    print(f"latency (1 thread): batch 1 x {one['input_ids'].shape[1]} tokens / batch 8 x "
          f"{eight['input_ids'].shape[1]} tokens")
    for label in protos:
        print(f"  {label:12} {lat1[label] * 1e3:7.2f} ms ({lat1[label] / lat1['original']:.3f}x)"
              f"  {lat8[label] * 1e3:7.2f} ms ({lat8[label] / lat8['original']:.3f}x)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
