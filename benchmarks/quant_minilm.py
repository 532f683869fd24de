"""int8 quantization of the real all-MiniLM-L6-v2 sentence encoder: graphopt's static and
dynamic int8 (accuracy budget 0.99 min cosine) against ONNX Runtime's quantize_dynamic.

The float baseline is graphopt's lossless output for ORT (what you would ship in fp32);
every int8 model starts from it (ORT's quantize_dynamic too). graphopt calibrates on 16
sentences and checks its budget on them; accuracy is then measured on 24 other sentences
(each its own unpadded batch): the minimum cosine of the embedding to the fp32 one.
Latency: ONNX Runtime CPU, 1 thread, all graph optimizations, median of interleaved runs
per model, on a short (~15 tokens) and a long (~50 tokens) sentence. File size: against
the fp32 file.

    python benchmarks/quant_minilm.py [--repeats 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.accuracy import median_latency, run_all, session  # noqa: E402
from graphopt.lossy import schemes  # noqa: E402
from graphopt.registry import pass_registry  # noqa: E402
from tests import zoo  # noqa: E402

CALIBRATION = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply on Tuesday after the inflation report.",
    "I love hiking in the mountains during autumn.",
    "Please restart the server before deploying the new build.",
    "She played the violin at the concert last night.",
    "How do I reset my password?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Rain is expected throughout the weekend in the northern regions.",
    "Neural networks learn representations from large amounts of data.",
    "The museum is closed on Mondays and public holidays.",
    "He forgot his umbrella at the train station again.",
    "Our team won the championship after a tense final match.",
    "Can you recommend a good book on medieval history?",
    "The patient was discharged from the hospital after three days.",
    "Solar panels convert sunlight directly into electricity.",
]
VALIDATION = [
    "The weather is lovely today.",
    "Transformers changed natural language processing forever.",
    "My flight was delayed by three hours because of the storm.",
    "The children built a sandcastle on the beach.",
    "Interest rates are likely to rise again next year.",
    "I need to buy groceries after work.",
    "The new phone has an impressive camera but a weak battery.",
    "He apologized for being late to the meeting.",
    "Photosynthesis turns carbon dioxide and water into sugar.",
    "The orchestra tuned their instruments before the performance.",
    "Is there a pharmacy open near the central square?",
    "The software update fixed the memory leak in the parser.",
    "Volcanic eruptions can affect the global climate for years.",
    "My grandmother makes the best apple pie in town.",
    "The committee postponed its decision until further notice.",
    "Cats sleep for most of the day.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Wear comfortable shoes for the walking tour.",
    "The court ruled that the contract was invalid.",
    "Learning a second language improves memory.",
    "A dog is chasing a ball in the park.",
    "The bakery on the corner sells fresh bread every morning.",
    "Quantum computers use qubits instead of classical bits.",
    "Traffic was heavy on the highway this evening.",
]
# (label, passes before the quantization pass, --quantize scheme). smooth-quant (another
# pass of graphopt) migrates activation outliers into the weights first.
VARIANTS = [
    ("graphopt int8 static (QDQ)", [], "int8"),
    ("graphopt int8 dynamic", [], "int8-dynamic"),
    ("graphopt smooth-quant + int8 static", ["smooth-quant"], "int8"),
    ("graphopt smooth-quant + int8 dynamic", ["smooth-quant"], "int8-dynamic"),
]
SHORT = "The quick brown fox jumps over the lazy dog near the river bank."
LONG = ("After months of negotiations, the two companies finally agreed on the terms of the "
        "merger, which analysts expect to reshape the market for cloud storage, reduce costs "
        "for small businesses and trigger a wave of similar deals across the industry.")


def sentence_feeds(sentences) -> list[dict]:
    """One unpadded batch of 1 per sentence."""
    tokens = zoo.minilm_tokenize(sentences)
    lengths = tokens["attention_mask"].sum(1)
    return [{k: v[i:i + 1, :lengths[i]] for k, v in tokens.items()}
            for i in range(len(sentences))]


def min_cosine(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds) -> float:
    ref = run_all(session(reference, optimize=True), feeds)
    got = run_all(session(candidate, optimize=True), feeds)
    worst = 1.0
    for r, g in zip(ref, got):
        a, b = r["sentence_embedding"].ravel(), g["sentence_embedding"].ravel()
        worst = min(worst, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return worst


def file_size(proto: onnx.ModelProto, folder: Path, name: str) -> int:
    path = folder / f"{name}.onnx"
    onnx.save(proto, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--tolerance", type=float, default=0.99)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    calibration, validation = sentence_feeds(CALIBRATION), sentence_feeds(VALIDATION)
    rows, timings, notes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        fp32 = graphopt.optimize(zoo.bert_minilm()).model.to_onnx()
        timings["graphopt lossless pipeline"] = time.perf_counter() - start
        models = {"fp32 (graphopt lossless)": fp32}
        for label, passes, scheme in VARIANTS:
            start = time.perf_counter()
            result = graphopt.optimize(fp32, passes=passes, quantize=scheme,
                                       calibration=calibration, validation=calibration,
                                       tolerance=args.tolerance)
            timings[label] = time.perf_counter() - start
            section = result.report["compression"]["passes"]
            sites = section[schemes(pass_registry())["quantize"][scheme]].get("sites") or {}
            models[label] = result.model.to_onnx()
            notes[label] = {"float layers": [s for s, e in sites.items() if not e["changed"]],
                            "quantized": sum(e["changed"] for e in sites.values())}
        src, dst = folder / "src.onnx", folder / "dst.onnx"
        onnx.save(fp32, src)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        models["ORT quantize_dynamic"] = onnx.load(dst)
        fp32_size = file_size(fp32, folder, "fp32")
        protos = list(models.values())
        latency = {}
        for name, text in (("short", SHORT), ("long", LONG)):
            latency[name] = median_latency(protos, sentence_feeds([text])[0],
                                           repeats=args.repeats, threads=1)
        for i, (label, proto) in enumerate(models.items()):
            rows[label] = {
                "min cosine (24 held-out sentences)": min_cosine(fp32, proto, validation),
                "latency short (ms)": latency["short"][i] * 1e3,
                "latency ratio short": latency["short"][i] / latency["short"][0],
                "latency ratio long": latency["long"][i] / latency["long"][0],
                "file ratio": file_size(proto, folder, f"m{i}") / fp32_size,
            }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"all-MiniLM-L6-v2, ORT {__import__('onnxruntime').__version__}, 1 thread, "
          f"budget {args.tolerance} min cosine; fp32 file {fp32_size / 2**20:.1f} MiB; "
          f"{os.cpu_count()} CPUs, load average {load:.1f} (latency ratios are noisy when "
          f"other processes compete for the cores)")
    header = f"{'model':<46} {'min cos':>8} {'ms short':>9} {'lat short':>9} " \
             f"{'lat long':>9} {'file':>6}"
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        print(f"{label:<46} {row['min cosine (24 held-out sentences)']:>8.4f} "
              f"{row['latency short (ms)']:>9.2f} {row['latency ratio short']:>8.2f}x "
              f"{row['latency ratio long']:>8.2f}x {row['file ratio']:>5.2f}x")
    for label, note in notes.items():
        print(f"{label}: {note['quantized']} layers int8; kept float: "
              f"{', '.join(note['float layers']) or 'none'}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "notes": notes, "seconds": timings},
                                        indent=2))


if __name__ == "__main__":
    main()
