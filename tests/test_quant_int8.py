"""Int8 quantization under an accuracy budget (quantize-int8, quantize-int8-dynamic), the
calibration data loader and the --quantize wiring of the API and CLI."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.calibration import load_data
from graphopt.errors import UsageError
from graphopt.targets.ort import (INT8_DOT_FLAGS, LOSSLESS_PIPELINE, OrtTarget, cpu_flags,
                                  host_device)


# ============================================================================ models
@pytest.fixture(scope="module")
def digits():
    """A small CNN trained here on scikit-learn's 8x8 digits (a few seconds), exported to
    ONNX: (model, x_train, y_train, x_test, y_test)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead
    try:
        data = load_digits()
        x = (data.images / 16.0).astype(np.float32)[:, None]
        xtr, xte, ytr, yte = train_test_split(x, data.target.astype(np.int64), test_size=0.3,
                                              random_state=0, stratify=data.target)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        xs, ys = torch.from_numpy(xtr), torch.from_numpy(ytr)
        for _ in range(10):
            perm = torch.randperm(len(xs))
            for i in range(0, len(xs), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
                opt.step()
        net.eval()
        buf = io.BytesIO()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, xs[:2], buf, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        torch.set_num_threads(threads)
    return onnx.load_from_string(buf.getvalue()), xtr, ytr, xte, yte


def accuracy(model, x, y) -> float:
    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto)
                                else str(model), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())


def ort_optimized_ops(path: Path, tmp_path: Path) -> Counter:
    """The op histogram of the graph ONNX Runtime actually runs (after its fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


OUTLIER_CHANNEL, OUTLIER_SCALE = 5, 400.0


def outlier_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 64] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> y[N, 10]. Channel 5 of fc1's output
    is scaled by 400 and fc2's matching weights by 1/400: the function is a plain MLP, but
    fc2's input has one huge channel, so quantizing it per tensor wipes out the others:
    fc2 is the layer int8 cannot take."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 512)).astype(np.float32) / 8
    w2 = rng.standard_normal((512, 512)).astype(np.float32) / 22
    w3 = rng.standard_normal((512, 10)).astype(np.float32) / 22
    w1[:, OUTLIER_CHANNEL] *= OUTLIER_SCALE
    w2[OUTLIER_CHANNEL, :] /= OUTLIER_SCALE
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": w1, "b1": np.full(512, 0.1, np.float32), "w2": w2,
              "b2": np.zeros(512, np.float32), "w3": w3}.items()]
    nodes = [oh.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
             oh.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             oh.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
             oh.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             oh.make_node("MatMul", ["a2", "w3"], ["y"], name="fc3")]
    graph = oh.make_graph(nodes, "outlier_mlp",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def mlp_inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 64)).astype(np.float32)


def quant_section(result, name="quantize-int8") -> dict:
    """The pass's entry in the report's compression section."""
    return result.report["compression"]["passes"][name]


def quantized(info: dict) -> list[str]:
    return [site for site, e in info["sites"].items() if e["changed"]]


def kept_float(info: dict) -> list[str]:
    return [site for site, e in info["sites"].items() if not e["changed"]]


# ============================================================================ static int8
def test_static_int8_digits_keeps_accuracy_shrinks_file_and_fuses_in_ort(digits, tmp_path):
    model, xtr, _, xte, yte = digits
    float_out, int8_out = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    graphopt.optimize(model, output=float_out)
    # The digits net is too small for int8 to be faster on a CPU (the cost model skips
    # it by default, see below): quantize regardless, for size.
    result = graphopt.optimize(
        model, output=int8_out, passes=[*LOSSLESS_PIPELINE, "quantize-int8(require-speedup=false)"],
        quantize="int8", calibration={"input": xtr[:256]}, validation={"input": xte},
        tolerance=0.99)
    section = quant_section(result)
    assert section["status"] == "changed" and len(quantized(section)) == 4
    assert section["score"] >= 0.99 and section["meets_budget"]
    assert result.report["compression"]["data"] == f"validation data ({len(xte)} samples)"
    assert all(e["setting"] == "int8" and e["bytes_saved"] > 0
               for e in section["sites"].values()), section["sites"]
    assert result.report["verification"]["ok"]
    onnx.checker.check_model(str(int8_out), full_check=True)
    size_ratio = int8_out.stat().st_size / float_out.stat().st_size
    assert size_ratio <= 0.3, size_ratio
    float_acc, int8_acc = accuracy(float_out, xte, yte), accuracy(int8_out, xte, yte)
    assert float_acc > 0.9
    assert int8_acc >= float_acc - 0.005, (float_acc, int8_acc)
    # the placement is what ORT's QDQ fusion matches: every Conv and Gemm runs in int8
    ops = ort_optimized_ops(int8_out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2, ops
    assert ops["Conv"] == ops["FusedConv"] == ops["Gemm"] == ops["DequantizeLinear"] == 0, ops


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_calibration_methods(digits, method):
    model, xtr, _, xte, yte = digits
    result = graphopt.optimize(
        model, passes=f"quantize-int8(method={method},require-speedup=false)",
        calibration={"input": xtr[:128]}, validation={"input": xte[:200]}, tolerance=0.98)
    section = quant_section(result)
    assert section["status"] == "changed" and section["score"] >= 0.98
    assert accuracy(result.model.to_onnx(), xte, yte) >= accuracy(model, xte, yte) - 0.02


@pytest.mark.parametrize("options", ["symmetric-activations=true", "per-channel=false",
                                     "exclude=/0/*;/9/Gemm", "ops=Gemm", "min-top1=0.995"])
def test_options(digits, options):
    model, xtr, _, xte, yte = digits
    result = graphopt.optimize(
        model, passes=[*LOSSLESS_PIPELINE, f"quantize-int8({options},require-speedup=false)"],
        calibration={"input": xtr[:128]}, validation={"input": xte[:270]}, tolerance=0.99)
    section = quant_section(result)
    assert section["status"] == "changed" and section["score"] >= 0.99
    chosen = set(quantized(section))
    if options.startswith("exclude"):
        assert chosen == {"/3/Conv", "/7/Gemm"}
        assert section["refused"] == {"/0/Conv": "excluded", "/9/Gemm": "excluded"}
    if options.startswith("ops"):
        assert chosen == {"/7/Gemm", "/9/Gemm"}
    if options.startswith("min-top1"):
        assert section["top1_agreement"] >= 0.995 and section["min_top1"] == 0.995
    assert accuracy(result.model.to_onnx(), xte, yte) >= accuracy(model, xte, yte) - 0.01


def test_cost_model_skips_layers_int8_does_not_speed_up(digits):
    """On the host CPU at batch 1, the digits convs are too small for int8 to pay
    (quantizing the input costs more than int8 saves); the 128x512 linear layer is heavy
    enough. At the batch of 64 the data has, the convs pay too: layers are costed at the
    shapes the model runs at."""
    model, xtr, _, xte, _ = digits
    result = graphopt.optimize(model, quantize="int8", calibration={"input": xtr[:64]},
                               validation={"input": xte[:64]}, data=[{"input": xte[:1]}])
    section = quant_section(result)
    assert quantized(section) == ["/7/Gemm"]
    assert "/0/Conv" in section["refused"]
    assert "does not pay off on host-cpu at inputs {'input': [1, 1, 8, 8]}" in \
        section["refused"]["/0/Conv"]
    result = graphopt.optimize(model, quantize="int8", calibration={"input": xtr[:64]},
                               validation={"input": xte[:64]}, data=[{"input": xte[:64]}])
    assert {"/0/Conv", "/7/Gemm"} <= set(quantized(quant_section(result)))


def test_budget_keeps_the_sensitive_layer_float_and_the_report_names_it(tmp_path):
    """int8 cannot meet --tolerance 0.999 on the outlier MLP; keeping fc2 in float can."""
    path = tmp_path / "mlp.onnx"
    onnx.save(outlier_mlp(), path)
    np.savez(tmp_path / "cal.npz", x=mlp_inputs(64, 1))
    np.savez(tmp_path / "val.npz", x=mlp_inputs(64, 2))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(path), "-o",
                           str(tmp_path / "out.onnx"), "--quantize", "int8",
                           "--calibration-data", str(tmp_path / "cal.npz"),
                           "--validation-data", str(tmp_path / "val.npz"),
                           "--tolerance", "0.999", "--report", str(report)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kept unchanged within the budget: 1 site(s), e.g. fc2" in proc.stderr
    data = json.loads(report.read_text())
    info = data["compression"]["passes"]["quantize-int8"]
    assert info["search"][0]["all_sites"] == 2 and info["search"][0]["score"] < 0.9
    assert kept_float(info) == ["fc2"]  # the damage alone of fc2 is what breaks the budget
    assert info["sites"]["fc2"]["declined"]["damage_alone"] > 0.1 > \
        info["sites"]["fc1"]["damage_alone"]
    assert "fc1" in quantized(info) and info["score"] >= 0.999
    out = onnx.load(tmp_path / "out.onnx")
    fc2 = next(n for n in out.graph.node if n.name == "fc2")
    assert fc2.input[1] == "w2"  # float weight, untouched
    x = mlp_inputs(16, 3)
    ref = verify.run(outlier_mlp(), {"x": x})["y"]
    got = verify.run(out, {"x": x})["y"]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.999


def test_only_onnx_runtime_gets_7_bit_weights_on_a_cpu_without_dot_products():
    """ORT's int8 kernels saturate 16-bit sums on x86 without VNNI, so weights take 7 bits
    there (the ort target, and ort-mobile's .ort file, run there by its check); a compiled
    target's own kernels (TFLite, C, TVM) do not, and get 8."""
    from graphopt.targets.ort import OrtTarget, host_device
    from graphopt.targets.ort_mobile import OrtMobileTarget

    class Compiled(OrtTarget):
        compiled = True
        onnxruntime_kernels = False

    for target, seven_bits in ((OrtTarget(), True), (OrtMobileTarget(), True),
                               (Compiled(), False)):
        target.device = host_device(flags=frozenset({"avx2", "fma"}))  # no VNNI
        result = graphopt.optimize(outlier_mlp(), target=target, quantize="int8",
                                   calibration={"x": mlp_inputs(64, 1)}, tolerance=0.9)
        info = quant_section(result)
        assert info["reduce_range"] is seven_bits
        assert quantized(info)


def test_progress_counts_each_layer_whose_sensitivity_is_measured():
    """``progress`` hears of the long step: one call per layer measured, counting up to
    the number of layers (what the CLI turns into a count with the time left)."""
    seen = []
    graphopt.optimize(outlier_mlp(), quantize="int8", calibration={"x": mlp_inputs(64, 1)},
                      tolerance=0.999, progress=lambda *call: seen.append(call))
    steps = [(done, total) for what, done, total in seen if "sensitivity" in what]
    assert len(steps) >= 2
    assert [done for done, _ in steps] == list(range(len(steps)))
    assert {total for _, total in steps} == {len(steps)}


@pytest.mark.parametrize("scheme", ["quantize-int8", "quantize-int8-dynamic"])
def test_both_quantizers_find_the_sensitive_layer(scheme):
    result = graphopt.optimize(outlier_mlp(), passes=scheme,
                               calibration={"x": mlp_inputs(32, 1)},
                               validation={"x": mlp_inputs(32, 2)}, tolerance=0.999)
    section = quant_section(result, scheme)
    assert kept_float(section) == ["fc2"] and section["score"] >= 0.999
    assert section["mode"] == "searched" and len(section["search"]) >= 3


def test_measure_times_variants_and_keeps_one_that_meets_the_budget():
    result = graphopt.optimize(outlier_mlp(), quantize="int8", measure=True,
                               calibration={"x": mlp_inputs(32, 1)},
                               validation={"x": mlp_inputs(32, 2)}, tolerance=0.999)
    timing = quant_section(result)["timing"]
    assert set(timing["ms"]) >= {"float", "all"} and timing["kept"]
    assert result.report["verification"]["ok"]


def test_without_data_random_probe_inputs_are_used_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        result = graphopt.optimize(outlier_mlp(), quantize="int8", tolerance=0.9)
    section = result.report["compression"]
    assert section["data"] == "unmeasured: random data" and section["measured"] is False
    assert section["passes"]["quantize-int8"]["data"] == "unmeasured: random data"
    assert "UNMEASURED" in caplog.text


def test_quantization_runs_once_after_the_lossless_fixpoint():
    result = graphopt.optimize(outlier_mlp(), passes="eliminate-identity,quantize-int8",
                               calibration={"x": mlp_inputs(16, 1)}, tolerance=0.9)
    trace = [(e["pass_name"], e["iteration"]) for e in result.report["trace"]]
    assert trace == [("eliminate-identity", 1), ("quantize-int8", 2)]


def test_bad_quantize_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="not a cosine similarity"):
        graphopt.optimize(outlier_mlp(), quantize="int8", tolerance=1.5)
    with pytest.raises(UsageError, match="unknown --quantize scheme"):
        graphopt.optimize(outlier_mlp(), quantize="int3")
    with pytest.raises(UsageError, match="--measure needs --quantize"):
        graphopt.optimize(outlier_mlp(), measure=True)


def test_int8_fast_flag_follows_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert "avx512_vnni" in cpu_flags(str(info))
    fast, slow = host_device(cpu_flags(str(info)), 4), host_device(frozenset({"avx2"}), 4)
    assert fast.int8_fast and slow.int8_fast is False
    assert fast.peak("int8") == 4 * fast.peak("float32")
    assert slow.peak("int8") < fast.peak("int8")
    assert host_device(frozenset(), 4).int8_fast is None  # unknown (no /proc/cpuinfo)
    flags = cpu_flags()
    assert OrtTarget.device.int8_fast == (bool(flags & INT8_DOT_FLAGS) if flags else None)


# ============================================================================ dynamic int8
def test_dynamic_int8_quantizes_weight_matmuls():
    result = graphopt.optimize(outlier_mlp(), passes="quantize-int8-dynamic",
                               calibration={"x": mlp_inputs(32, 1)}, tolerance=0.99)
    section = quant_section(result, "quantize-int8-dynamic")
    assert section["status"] == "changed"
    ops = Counter(n.op for n in result.model.graph.nodes)
    assert ops["DynamicQuantizeMatMul"] == len(quantized(section)) > 0
    assert ops["Add"] == 0  # Gemm biases went into the int8 op


def test_dynamic_int8_plain_onnx_form_runs_everywhere():
    model = outlier_mlp()
    result = graphopt.optimize(model, passes="quantize-int8-dynamic(form=onnx)",
                               calibration={"x": mlp_inputs(32, 1)}, tolerance=0.9)
    ops = Counter(n.op for n in result.model.graph.nodes)
    assert ops["MatMulInteger"] >= 1 and ops["DynamicQuantizeLinear"] >= 1
    assert not any(n.domain == "com.microsoft" for n in result.model.graph.nodes)


def attention_model(hidden: int = 256, heads: int = 8, seed: int = 0) -> onnx.ModelProto:
    """com.microsoft Attention (what fuse-attention makes of a BERT block) -> MatMul."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, 3 * hidden)) /
                                      np.sqrt(hidden)).astype(np.float32), "qkv_w"),
             numpy_helper.from_array((rng.standard_normal(3 * hidden) / 10).astype(np.float32),
                                     "qkv_b"),
             numpy_helper.from_array((rng.standard_normal((hidden, hidden)) /
                                      np.sqrt(hidden)).astype(np.float32), "out_w")]
    nodes = [oh.make_node("Attention", ["x", "qkv_w", "qkv_b", "mask"], ["a"], name="attn",
                          domain="com.microsoft", num_heads=heads),
             oh.make_node("MatMul", ["a", "out_w"], ["y"], name="out")]
    graph = oh.make_graph(nodes, "attention",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", hidden]),
                           oh.make_tensor_value_info("mask", TensorProto.INT32, ["B", "S"])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", hidden])],
                          inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17),
                                               oh.make_opsetid("com.microsoft", 1)])


def test_dynamic_int8_turns_attention_into_qattention():
    rng = np.random.default_rng(1)
    mask = np.ones((4, 24), np.int32)
    mask[1, 16:] = 0
    data = {"x": rng.standard_normal((4, 24, 256)).astype(np.float32), "mask": mask}
    result = graphopt.optimize(attention_model(), passes="quantize-int8-dynamic",
                               calibration=[data], tolerance=0.99)
    section = quant_section(result, "quantize-int8-dynamic")
    assert "attn" in quantized(section) and section["score"] >= 0.99
    ops = Counter(n.op for n in result.model.graph.nodes)
    assert ops["QAttention"] == 1 and ops["Attention"] == 0 and ops["DynamicQuantizeLinear"] == 1


@pytest.mark.slow
def test_dynamic_int8_minilm_meets_the_budget_and_shrinks_the_file(tmp_path):
    from tests import zoo

    calibration = zoo.minilm_tokenize([
        "A man is eating food.", "Stock markets fell sharply after the inflation report.",
        "I love hiking in the mountains during autumn.", "How do I reset my password?",
        "Please restart the server before deploying the new build.",
        "The recipe calls for two cups of flour and a pinch of salt.",
        "Neural networks learn representations from data.", "The museum is closed on Mondays."])
    validation = zoo.minilm_tokenize([
        "The weather is lovely today.", "Transformers changed natural language processing.",
        "My flight was delayed by three hours.", "The children built a sandcastle."])
    model = zoo.bert_minilm(fold_in_export=True)
    src, out = tmp_path / "minilm.onnx", tmp_path / "minilm_int8.onnx"
    onnx.save(model, src)
    result = graphopt.optimize(src, output=out, passes="quantize-int8-dynamic",
                               calibration=[calibration], validation=[validation],
                               tolerance=0.99)
    section = quant_section(result, "quantize-int8-dynamic")
    assert section["status"] == "changed" and section["score"] >= 0.99
    assert len(quantized(section)) >= 30  # 36 weight MatMuls + 2 embedding tables
    assert out.stat().st_size <= 0.3 * src.stat().st_size
    ref = verify.run(model, validation)["sentence_embedding"]
    got = verify.run(onnx.load(out), validation)["sentence_embedding"]
    assert ((ref * got).sum(1)).min() >= 0.99  # unit-norm embeddings


# ============================================================================ calibration data
@pytest.fixture
def mlp_proto():
    return outlier_mlp()


def test_npz_samples_are_split_and_grouped(tmp_path, mlp_proto):
    np.savez(tmp_path / "d.npz", x=mlp_inputs(10, 0).astype(np.float64))  # cast to float32
    samples = load_data(tmp_path / "d.npz", mlp_proto)
    assert len(samples) == 10 and samples[0]["x"].shape == (1, 64)
    assert samples[0]["x"].dtype == np.float32
    batches = load_data(tmp_path / "d.npz", mlp_proto, batch_size=4)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    np.savez(tmp_path / "b.npz", x=mlp_inputs(12, 0).reshape(3, 4, 64))  # ready batches
    assert [b["x"].shape for b in load_data(tmp_path / "b.npz", mlp_proto)] == [(4, 64)] * 3


def test_folder_of_npy_and_module_function(tmp_path, mlp_proto, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"s{i}.npy", mlp_inputs(2, i))
    assert len(load_data(folder, mlp_proto)) == 6
    (tmp_path / "calib_source.py").write_text(textwrap.dedent("""
        import numpy as np
        def batches():
            return [{"x": np.ones((2, 64), np.float32)} for _ in range(3)]
        def broken():
            raise RuntimeError("no data today")
    """))
    monkeypatch.chdir(tmp_path)
    assert len(load_data("calib_source:batches", mlp_proto)) == 3
    assert len(load_data(f"{tmp_path}/calib_source.py:batches", mlp_proto)) == 3
    with pytest.raises(UsageError, match="no data today"):
        load_data("calib_source:broken", mlp_proto)
    with pytest.raises(UsageError, match="has no function 'missing'"):
        load_data("calib_source:missing", mlp_proto)
    with pytest.raises(UsageError, match="cannot import 'no_such_module_xyz'"):
        load_data("no_such_module_xyz:batches", mlp_proto)


@pytest.mark.parametrize("arrays, message", [
    ({"input": np.zeros((4, 64), np.float32)}, "no array for model input 'x'"),
    ({"x": np.zeros((4, 64), np.int64)}, "is int64, input 'x' is float32"),
    ({"x": np.zeros((4, 3, 2, 64), np.float32)}, "has rank 2"),
    ({"x": np.zeros((4, 63), np.float32)}, "needs 64 on axis 1"),
    ({"x": np.zeros((0, 64), np.float32)}, "no samples"),
], ids=["missing-input", "dtype", "rank", "static-dim", "empty"])
def test_bad_npz_is_a_usage_error_naming_the_problem(tmp_path, mlp_proto, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        load_data(tmp_path / "d.npz", mlp_proto)


def test_bad_folders_are_usage_errors(tmp_path, mlp_proto):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not data")
    with pytest.raises(UsageError, match="holds no .npz or .npy files"):
        load_data(empty, mlp_proto)
    with pytest.raises(UsageError, match="does not exist"):
        load_data(tmp_path / "nowhere.npz", mlp_proto)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.npz").write_bytes(b"not a zip file")
    with pytest.raises(UsageError, match="cannot read"):
        load_data(corrupt, mlp_proto)


def test_cli_reports_calibration_errors_with_exit_code_2(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(outlier_mlp(), path)
    np.savez(tmp_path / "wrong.npz", input=mlp_inputs(4, 0))
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(path), "-o",
                           str(tmp_path / "out.onnx"), "--quantize", "int8",
                           "--calibration-data", str(tmp_path / "wrong.npz")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no array for model input 'x'" in proc.stderr and "arrays given: input" in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv, + the block's input, Relu, global average, Gemm: a ResNet's
    last block and head."""
    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w1", r.standard_normal((8, 8, 3, 3)) * 0.2), ("b1", r.standard_normal(8) * 0.1),
        ("w2", r.standard_normal((8, 8, 3, 3)) * 0.2), ("b2", r.standard_normal(8) * 0.1),
        ("wf", r.standard_normal((4, 8))), ("bf", r.standard_normal(4)))]
    n = oh.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             n("Relu", ["c1"], ["r1"], name="relu1"),
             n("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             n("Add", ["c2", "x"], ["s"], name="add"),
             n("Relu", ["s"], ["r2"], name="relu2"),
             n("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             n("Flatten", ["p"], ["f"], name="flatten"),
             n("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    graph = oh.make_graph(nodes, "residual", [oh.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 8, 8, 8])], [oh.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["batch", 4])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize("full", [False, True])
def test_full_integer_quantizes_the_adds_averages_and_head_that_read_int8(tmp_path, full):
    """``full-integer``: the residual Add (with its Relu), the global average and the Gemm
    head write quantized values too, so ONNX Runtime runs them as QLinearAdd and
    QLinearGlobalAveragePool; without it they stay float. Within the budget either
    way."""
    model = residual_cnn()
    x = np.random.default_rng(1).random((64, 8, 8, 8)).astype(np.float32) - 0.3
    out = tmp_path / "int8.onnx"
    result = graphopt.optimize(
        model, output=out, passes=f"quantize-int8(require-speedup=false,full-integer={full})",
        calibration={"x": x[:48]}, validation={"x": x[48:]}, tolerance=0.99)
    section = quant_section(result)
    assert sorted(quantized(section)) == ["conv1", "conv2", "fc"]
    assert section["score"] >= 0.99
    # measured after the layers were chosen, kept as the budget holds with them
    assert section.get("full_integer") == ({"outputs": 3, "kept": True,
                                            "score": section["score"]} if full else None)
    q = onnx.load(out)
    read_by_q = {i for node in q.graph.node if node.op_type == "QuantizeLinear"
                 for i in node.input[:1]}
    assert ({"r2", "p", "y_float"} <= read_by_q) is full, read_by_q
    ops = ort_optimized_ops(out, tmp_path)
    assert (ops["QLinearAdd"], ops["QLinearGlobalAveragePool"]) == ((1, 1) if full else (0, 0))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[48:]})[0]
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x[48:]})[0]
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99, cos.min()
