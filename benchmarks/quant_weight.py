"""Weight-only int4 and float16 on the real all-MiniLM-L6-v2 sentence encoder.

The float32 baseline is graphopt's lossless output for ORT (what you would ship in fp32)
without ``fuse-attention`` (its com.microsoft.Attention takes the packed Q/K/V weight as
a float input, which MatMulNBits cannot replace); every variant starts from it:

* int4 weight-only (``quantize-int4-weight``, com.microsoft.MatMulNBits, block 32,
  asymmetric unless noted; ``acc4``: ``accuracy_level=4``, int8 compute):
  round-to-nearest, GPTQ and AWQ, calibrated on 48 sentences (tests/helpers.py, one
  unpadded sentence per feed);
* float16 (``convert-fp16``), float32 interface.

For each: the bytes of the MatMul/Gemm weights (initializers read by MatMul, Gemm and
MatMulNBits: codes + scales + zero points) against float32, the file size, the cosine of
the sentence embedding to the float32 one on 24 other sentences (each its own batch:
mean and min), the time the pass took, and ONNX Runtime CPU latency (1 thread, all graph
optimizations, median of interleaved runs) on a short batch (the 3 sentences of
``zoo.MINILM_SENTENCES``, padded) and on one 128-token sequence.

    python benchmarks/quant_weight.py [--repeats 30] [--methods rtn,gptq,awq] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import graphopt  # noqa: E402
from graphopt.ir import load  # noqa: E402
from graphopt.pass_infra import PassContext  # noqa: E402
from graphopt.passes.quantize.fp16 import ConvertFloat16  # noqa: E402
from graphopt.passes.quantize.weight import QuantizeWeightInt4  # noqa: E402
from graphopt.targets.ort import OrtTarget  # noqa: E402
from helpers import minilm_calibration  # noqa: E402
from tests import zoo  # noqa: E402

VALIDATION = (
    "A woman is slicing an onion in the kitchen.",
    "The government announced new taxes on imported goods.",
    "Where can I find a cheap hotel near the airport?",
    "The patient was treated with antibiotics for two weeks.",
    "He spent the whole summer painting the house.",
    "Quantum computers may break current encryption schemes.",
    "The orchestra tuned their instruments before the show.",
    "My phone battery dies too quickly.",
    "The volcano erupted and covered the village in ash.",
    "Students protested against the rise in tuition fees.",
    "A small boat drifted slowly across the lake.",
    "The algorithm sorts the list in linear time.",
    "They celebrated their anniversary at an Italian restaurant.",
    "The parliament voted to approve the budget.",
    "Wolves hunt in packs during the winter.",
    "I need to renew my driving licence next month.",
    "The bakery sells bread made with ancient grains.",
    "GPU kernels are fused to reduce memory traffic.",
    "The referee showed him a red card in the final minute.",
    "Heavy snow closed the mountain pass overnight.",
    "She translated the novel from Japanese into Spanish.",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "ONNX graphs can be optimized without changing what they compute.",
)


def matmul_weight_bytes(proto: onnx.ModelProto) -> int:
    inits = {t.name: t for t in proto.graph.initializer}
    used = {name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "MatMulNBits")
            for name in n.input[1:4 if n.op_type == "MatMulNBits" else 2] if name in inits}
    return sum(onnx.numpy_helper.to_array(inits[n]).nbytes if inits[n].data_type not in
               (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else len(inits[n].raw_data)
               for n in used)


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def embeddings(sess: ort.InferenceSession, sentences) -> np.ndarray:
    return np.concatenate([sess.run(["sentence_embedding"], zoo.minilm_tokenize((s,)))[0]
                           for s in sentences])


def latencies(sessions: dict, feeds: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in sessions}
    for sess in sessions.values():  # warm up
        for _ in range(3):
            sess.run(None, feeds)
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def long_feeds(tokens: int = 128) -> dict:
    text = " ".join(VALIDATION)
    feeds = zoo.minilm_tokenize((text,))
    return {k: v[:, :tokens] for k, v in feeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    # fuse-attention would pack Q/K/V into com.microsoft.Attention, whose weight input
    # MatMulNBits cannot replace: int4 would then leave a quarter of the weights float.
    baseline = graphopt.optimize(zoo.bert_minilm("torchscript"),
                                 skip=("fuse-attention",)).model.to_onnx()
    calibration = minilm_calibration()
    variants: dict[str, tuple[onnx.ModelProto, float]] = {"fp32": (baseline, 0.0)}
    specs = [(f"int4 {m}", QuantizeWeightInt4, {"method": m}) for m in
             args.methods.split(",") if m]
    specs.append(("int4 rtn sym", QuantizeWeightInt4, {"method": "rtn", "symmetric": True}))
    specs.append(("int4 gptq sym", QuantizeWeightInt4, {"method": "gptq", "symmetric": True}))
    specs.append(("int4 rtn acc4", QuantizeWeightInt4, {"method": "rtn", "accuracy_level": 4}))
    specs.append(("fp16", ConvertFloat16, {}))
    for name, cls, options in specs:
        if cls is QuantizeWeightInt4:  # every MatMul weight at 4 bits: the methods compared
            options = {"per_layer": False, "embeddings": False, **options}
        model = load(baseline)
        model.infer_shapes()
        start = time.perf_counter()
        result = cls(**options).run(model, PassContext(target=OrtTarget(),
                                                       calibration=calibration))
        variants[name] = (model.to_onnx(), time.perf_counter() - start)
        print(f"{name}: {time.perf_counter() - start:.1f}s {result.stats}", file=sys.stderr)

    sessions = {name: session(proto) for name, (proto, _) in variants.items()}
    reference = embeddings(sessions["fp32"], VALIDATION)
    short = zoo.minilm_tokenize()
    lat_short = latencies(sessions, short, args.repeats)
    lat_long = latencies(sessions, long_feeds(), max(args.repeats // 3, 5))
    base_bytes = matmul_weight_bytes(baseline)
    base_size = baseline.ByteSize()
    rows = []
    for name, (proto, seconds) in variants.items():
        got = embeddings(sessions[name], VALIDATION)
        cos = np.sum(reference * got, axis=1) / np.linalg.norm(reference, axis=1) / \
            np.linalg.norm(got, axis=1)
        rows.append({"variant": name,
                     "matmul_weight_ratio": matmul_weight_bytes(proto) / base_bytes,
                     "file_mb": proto.ByteSize() / 1e6, "file_ratio": proto.ByteSize() / base_size,
                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "pass_s": seconds, "latency_short_ms": lat_short[name],
                     "latency_long_ms": lat_long[name]})
    header = (f"{'variant':16s} {'MatMul W':>9s} {'file MB':>8s} {'cos mean':>9s} "
              f"{'cos min':>8s} {'pass s':>7s} {'3x~16 ms':>9s} {'1x128 ms':>9s}")
    print(f"all-MiniLM-L6-v2, ONNX Runtime {ort.__version__} CPU, 1 thread")
    print(header)
    for r in rows:
        print(f"{r['variant']:16s} {r['matmul_weight_ratio']:9.3f} {r['file_mb']:8.1f} "
              f"{r['cos_mean']:9.5f} {r['cos_min']:8.5f} {r['pass_s']:7.1f} "
              f"{r['latency_short_ms']:9.2f} {r['latency_long_ms']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
