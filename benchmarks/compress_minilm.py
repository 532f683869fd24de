"""Structured compression of all-MiniLM-L6-v2 (real weights) on natural sentences.

    python benchmarks/compress_minilm.py [--calibration 512] [--configs JSON]

Calibration, validation and test sentences are prose from the Python standard library's
docstrings (``tests/corpus.py``: disjoint sets, each from its own modules); a second
test set is the short everyday sentences of the test suite. Each configuration (a pass,
fixed options, with or without the least-squares recovery) runs through
``graphopt.optimize`` on the cleaned-up graph before the ORT fusions, as the CLI places
it, and prints: the encoder FLOPs per token relative to the lossless pipeline's result,
parameters, the mean and minimum cosine of the sentence embeddings to the original's on
both test sets, and the wall time.

``--configs`` is a JSON list of [pass, {options}, recover] or [pass, {options}, recover,
budget] (recover: true for the least-squares re-fit, false, or a recovery pass such as
"finetune(time=420)"): passes joined by ``+`` take a list of options, and a budget (the lowest mean
cosine on the validation sentences) lets the compression search choose the settings
the options leave open (``ratio`` null), saving FLOPs first. The default compares
prune-ffn, prune-heads and decompose-low-rank at one setting each, unrecovered, then
prune-ffn recovered.

Measured on a 2-core AVX2 machine (FLOPs relative to the lossless result; mean cosine
docstrings / everyday): prune-ffn 0.25 (OBS + least-squares re-fit): 0.833x, 0.977 /
0.886 in 168 s (Wanda + mean compensation: 0.953 / 0.848); prune-heads 0.25 (ablation
+ re-fit): 0.917x, 0.963 / 0.935 in 76 s (norm + mean compensation: 0.939 / 0.933); decompose-low-rank 0.5: 0.919x, 0.933 / 0.864;
prune-heads+prune-ffn searched under mean cosine >= 0.98 on the validation sentences:
0.847x, 0.981 / 0.901 in 234 s, recovered 0.847x, 0.981 / 0.905 in 894 s:

    python benchmarks/compress_minilm.py --configs \
        '[["prune-heads+prune-ffn", [{}, {}], true, 0.98]]'

With 4096 calibration sentences (``--calibration 4096``), prune-ffn 0.3125 with the
re-fit: 0.792x, 0.9827 / 0.7988 (validation 0.9816; everyday 0.8855 / 0.7338) in 1182 s;
prune-ffn 0.25: 0.834x, 0.9875 / 0.8337 (everyday 0.9080 / 0.7625) in 673 s.

``--replay R.json`` applies the settings a report (or ``{pass: {site: setting}}``) lists
instead of searching (``benchmarks/plans/minilm_heads_ffn_4096.json``: what the 4,096-
sentence heads + FFN search chose); ``--latency 1x128,8x128`` adds ONNX Runtime's latency
(1 thread) relative to the lossless result; ``--onnxsim 0.35`` adds onnxsim's structured
Wanda pruning of the FFN at that sparsity, alone and with its ridge re-fit; ``--save DIR``
keeps each configuration's report and model. Measured with all four (4,096 sentences):
graphopt 0.764x FLOPs, 0.9822 / 0.7976 held out, latency 0.792x / 0.791x; onnxsim 0.767x,
0.8600 / 0.6201 alone, 0.9707 / 0.7968 with its re-fit, latency 0.816x / 0.794x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
import graphopt.replay  # noqa: E402
from graphopt import verify  # noqa: E402
from graphopt.accuracy import median_latency  # noqa: E402
from graphopt.analysis import summarize  # noqa: E402
from graphopt.ir import Model  # noqa: E402
from graphopt.registry import pass_registry  # noqa: E402
from graphopt.targets.ort import LOSSLESS_PIPELINE, cpu_flags, host_device  # noqa: E402
from tests import corpus, zoo  # noqa: E402
from tests.helpers import CALIBRATION_SENTENCES  # noqa: E402
from tests.sentences import minilm_batches  # noqa: E402

DEFAULT = [["prune-ffn", {"ratio": 0.25}, False],
           ["prune-heads", {"ratio": 0.25, "importance": "norm"}, False],
           ["decompose-low-rank", {"rank_ratio": 0.5, "require_speedup": False}, False],
           ["prune-ffn", {"ratio": 0.25}, True]]


def embeddings(proto, batches) -> np.ndarray:
    sess = verify.session(proto)
    return np.concatenate([verify.run(sess, b)["sentence_embedding"] for b in batches])


def cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return round(float(cos.mean()), 4), round(float(cos.min()), 4)


def flops(proto) -> float:
    return summarize(Model.from_proto(proto), host_device()).flops


def latency_feeds(proto, tokens: int, batch: int) -> dict[str, np.ndarray]:
    """``batch`` sequences of ``tokens`` tokens (latency does not depend on the ids)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 29000, size=(batch, tokens)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)}
    return {i.name: feeds[i.name] for i in proto.graph.input}


def onnxsim_rows(lossless, sparsities, cal) -> dict:
    """onnxsim 0.8's calibrated structured pruning of the FFN blocks (Wanda: row norm of
    W2 times activation norm), alone and with its ridge re-fit of every MatMul. Its
    attention-head pruning matches no block of MiniLM (graphopt's fused Attention,
    onnxsim's simplified graph, ONNX Runtime's transformer optimizer: none changed), so
    the FFN takes the whole cut."""
    try:
        import onnxsim
    except ImportError as exc:
        return {f"onnxsim (not installed: {exc})": None}
    out = {}
    for s in sparsities:
        start = time.perf_counter()
        pruned = onnxsim.apply_structured_wanda_pruning(lossless, calibration_data=cal,
                                                        sparsity=s)
        out[f"onnxsim ffn wanda {s:g}"] = (pruned, time.perf_counter() - start)
        start = time.perf_counter()
        tuned = onnxsim.apply_pruning_finetune(lossless, pruned, calibration_data=cal)
        out[f"onnxsim ffn wanda {s:g} + ridge"] = (tuned, time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--configs", default=json.dumps(DEFAULT))
    parser.add_argument("--replay", help="JSON report (or {pass: {site: setting}}) whose "
                        "settings the configurations apply instead of searching them")
    parser.add_argument("--latency", default="",
                        help="BATCHxTOKENS[,...]: ONNX Runtime latency (1 thread, median "
                        "of interleaved runs) relative to the lossless result, e.g. 1x128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--onnxsim", default="", help="FFN sparsities of onnxsim's "
                        "structured Wanda pruning to print beside, e.g. 0.375")
    parser.add_argument("--save", help="folder for each configuration's report and model")
    args = parser.parse_args()
    print("cpu flags:", " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni",
                                                       "avx512vnni", "fma"})))
    registry = pass_registry()
    cleanup = [n for n in LOSSLESS_PIPELINE if registry.get(n).family == "cleanup"]
    rest = [n for n in LOSSLESS_PIPELINE if n not in cleanup]
    cal_s, val_s, test_s = corpus.split(args.calibration, 256, 512)
    cal, val = minilm_batches(cal_s, 32), minilm_batches(val_s, 32)
    tests = {"docstrings": minilm_batches(test_s, 32),
             "everyday": minilm_batches(list(CALIBRATION_SENTENCES) +
                                        list(zoo.MINILM_SENTENCES), 16)}
    proto = zoo.bert_minilm()
    refs = {k: embeddings(proto, b) for k, b in tests.items()}
    lossless_proto = graphopt.optimize(proto, target="ort").model.to_onnx()
    lossless = flops(lossless_proto)
    shapes = [tuple(int(v) for v in x.split("x")) for x in args.latency.split(",") if x]
    print(f"calibration {len(cal_s)} / validation {len(val_s)} / test {len(test_s)} "
          f"docstring sentences + {len(refs['everyday'])} everyday sentences")
    print(f"{'pass':<31} {'options':<33} {'rec':<4} {'FLOPs':>6} {'params':>10} "
          f"{'docstrings mean/min':>20} {'everyday mean/min':>18} {'s':>5}"
          + "".join(f" {'t %dx%d' % b:>9}" for b in shapes) + f" {'MB':>5}")

    def row(name, options, rec, out, seconds):
        cos = {k: cosines(embeddings(out, b), refs[k]) for k, b in tests.items()}
        times = "".join(
            " %9.3f" % (lambda t: t[1] / t[0])(median_latency(
                [lossless_proto, out], latency_feeds(out, tokens, batch), repeats=args.repeats))
            for batch, tokens in shapes)
        print(f"{name:<31} {options:<33} {rec:<4} {flops(out) / lossless:6.3f} "
              f"{sum(int(np.prod(i.dims)) for i in out.graph.initializer):>10,} "
              f"{'%.4f / %.4f' % cos['docstrings']:>20} {'%.4f / %.4f' % cos['everyday']:>18} "
              f"{seconds:5.0f}{times} {out.ByteSize() / 1e6:5.1f}", flush=True)

    if shapes:
        row("lossless", "", "", lossless_proto, 0)
    replay = None if args.replay is None else graphopt.replay.load(args.replay)
    for config in json.loads(args.configs):
        name, options, recover, *budget = config
        tolerance = budget[0] if budget else 0.01  # a fixed setting: any damage is kept
        start = time.perf_counter()
        lossy = [registry.get(n)(**o) for n, o in zip(name.split("+"), options)] \
            if "+" in name else [registry.get(name)(**options)]
        result = graphopt.optimize(proto, passes=[*cleanup, *lossy, *rest],
                                   calibration=cal, validation=val,
                                   recovery=recover if isinstance(recover, str)
                                   else "recover" if recover else None,
                                   tolerance=tolerance, metric="mean-cosine", goal="flops",
                                   replay={k: v for k, v in (replay or {}).items()
                                           if k == "+".join(p.name for p in lossy)} or None)
        out = result.model.to_onnx()
        rec = recover.partition("(")[0][:4] if isinstance(recover, str) else \
            "yes" if recover else "no"
        row(name, json.dumps(options), rec, out, time.perf_counter() - start)
        if args.save:
            folder = Path(args.save)
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{name}-{len(cal_s)}-{'rec' if recover else 'plain'}"
            (folder / f"{stem}.json").write_text(json.dumps(result.report, indent=1,
                                                            default=float))
            onnx.save(out, folder / f"{stem}.onnx")
        for pass_name, info in result.report.get("compression", {}).get("passes",
                                                                       {}).items():
            chosen = [f"{site['setting']}/{site['size']}"
                      for site in info.get("sites", {}).values()]
            print(f"    {pass_name}: kept per block {' '.join(chosen)}; validation "
                  f"{info.get('score')}", flush=True)
    sparsities = [float(x) for x in args.onnxsim.split(",") if x]
    for name, entry in onnxsim_rows(lossless_proto, sparsities, cal).items():
        if entry is None:
            print(name)
            continue
        row(name, "", "ridg" if "ridge" in name else "no", *entry)


if __name__ == "__main__":
    main()
