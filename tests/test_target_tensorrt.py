"""The TensorRT target: TensorRT-ready ONNX (op table, default domain, shapes fixed or
covered by a profile, explicit int8 quantization in TensorRT's form), the artifact folder
and its manifest, the target's quantize-int8 defaults (``Target.pass_defaults``), and,
where TensorRT and a CUDA GPU are present, engines built and run against ONNX Runtime.

Everything but the engine tests runs without TensorRT or a GPU; those skip, naming what
is missing. Each model is optimized and lowered once per module (module-scoped cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import UsageError
from graphopt.lossy import with_schemes
from graphopt.pipeline import build_passes
from graphopt.registry import create_target, pass_registry, target_registry
from graphopt.targets import tensorrt as trt_target
from graphopt.targets.tensorrt import TensorRtTarget, tensorrt_ready, trtexec_command
from tests import zoo

ATOL = 1e-4
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
ENGINE_MISSING = TensorRtTarget().engine_availability(run=True)
needs_engine = pytest.mark.skipif(ENGINE_MISSING is not None,
                                  reason=f"no TensorRT engines here: {ENGINE_MISSING}")


# ---------------------------------------------------------------- models and helpers
def _cnn():
    return zoo.mobilenet_cnn(), None


def _bert():
    return zoo.bert_tiny(), {"input_ids": [2, 8], "attention_mask": [2, 8]}


def _bert_feeds():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, zoo.BERT_TINY_VOCAB, (2, 8)).astype(np.int64)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _calibration(n: int = 64, seed: int = 0):
    return [{"input": np.random.default_rng(seed).standard_normal(
        (n, *zoo.CNN_INPUT)).astype(np.float32)}]


def _passes(target: TensorRtTarget, quantize: str, **options) -> list:
    """The target's pipeline plus the pass of ``quantize``, built with the target's pass
    defaults (the hook under test) and ``options`` given as a user would; passes emitting
    only ops the target lacks are left out, as ``optimize`` does for a default pipeline.
    (``optimize(quantize=...)`` itself refuses a default pipeline with such passes.)"""
    spec = with_schemes(list(target.default_pipeline), {"quantize": quantize}, pass_registry())
    if options:
        spec[-1] += "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
    built = build_passes(spec, pass_registry(), defaults=target.pass_defaults)
    return [p for p in built if not p.emits or any(target.supports(op, d) for d, op in p.emits)]


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """``lowered(key) -> (OptimizeResult, original proto, folder)``, lowered once."""
    cache = {}

    def lower(key: str):
        if key not in cache:
            out = tmp_path_factory.mktemp(f"trt-{key}") / "artifact"
            if key == "int8":
                proto = zoo.mobilenet_cnn()
                result = graphopt.optimize(
                    proto, target="tensorrt", output=out, calibration=_calibration(),
                    passes=_passes(TensorRtTarget(), "int8", **{"require-speedup": "false"}),
                    tolerance=0.99)
            else:
                proto, shapes = {"cnn": _cnn, "bert": _bert}[key]()
                result = graphopt.optimize(proto, target="tensorrt", output=out,
                                           input_shapes=shapes)
            cache[key] = (result, proto, out)
        return cache[key]

    return lower


def _ort(model, feeds):
    from tests.conftest import ort_session

    sess = ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _check_tensorrt_ready(path: Path, target: TensorRtTarget) -> onnx.ModelProto:
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert {d for d, _ in ops} <= {"", "ai.onnx"}, ops
    assert all(target.supports(op, d) for d, op in ops), ops
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    return proto


# ---------------------------------------------------------------- registration, availability
def test_registered_and_listed_with_what_is_missing(tmp_path):
    target = create_target(target_registry(), "tensorrt")
    assert isinstance(target, TensorRtTarget) and target.name == "tensorrt"
    assert target.availability() is None  # lowering needs nothing beyond graphopt
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "targets"], cwd=tmp_path,
                            capture_output=True, text=True, env={"COLUMNS": "400",
                                                                 **_env()})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("│ tensorrt"))
    rows = [[c.strip() for c in lines[at].split("│")[1:-1]]]
    for line in lines[at + 1:]:  # a long cell wraps onto lines whose first cell is empty
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if not cells or cells[0]:
            break
        rows.append(cells)
    cells = [" ".join(filter(None, column)) for column in zip(*rows)]
    assert cells[0] == "tensorrt" and cells[3] == "yes"  # lowers here
    missing = target.run_availability()  # the install hint's brackets survive the table
    assert cells[4] == ("yes" if missing is None else f"no: {missing}")


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "COLUMNS"}


def test_engine_availability_says_precisely_what_is_missing(monkeypatch):
    target = TensorRtTarget()
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "tensorrt" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(trt_target, "cuda_devices", lambda: (1, None))
    assert target.engine_availability() == \
        "the tensorrt package is not installed (pip install 'graphopt[tensorrt]')"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt" else real(name, *a))
    monkeypatch.setattr(trt_target, "cuda_devices",
                        lambda: (0, "no CUDA driver (libcuda.so.1 not found)"))
    assert target.engine_availability() == "no CUDA driver (libcuda.so.1 not found)"
    monkeypatch.setattr(trt_target, "cuda_devices", lambda: (2, None))
    assert target.engine_availability() is None


def test_op_table_follows_the_tensorrt_version():
    base, newest = TensorRtTarget(tensorrt_version="10.0"), TensorRtTarget(tensorrt_version="10.15")
    for op in ("Conv", "LayerNormalization", "QuantizeLinear", "Gelu", "HardSwish"):
        assert base.supports(op) and newest.supports(op)
    for op in ("Attention", "RMSNormalization", "RotaryEmbedding"):
        assert not base.supports(op) and newest.supports(op)
    assert not TensorRtTarget(tensorrt_version="10.13").supports("Attention")
    for op in ("DynamicQuantizeLinear", "MatMulInteger", "QLinearConv", "Unique", "Det"):
        assert not newest.supports(op)
    assert not newest.supports("FusedConv", "com.microsoft")
    assert not newest.supports("Gelu", "com.microsoft")


# ---------------------------------------------------------------- TensorRT-ready ONNX
def test_cnn_is_tensorrt_ready_and_matches_ort(lowered):
    result, proto, folder = lowered("cnn")
    target = TensorRtTarget()
    ready = _check_tensorrt_ready(folder / "model.onnx", target)
    # com.microsoft fusions are left out (FusedConv); the standard ones stay in
    assert "fuse-conv-act" in result.report["left_out"]
    assert Counter(n.op_type for n in ready.graph.node)["HardSwish"] > 0
    assert "BatchNormalization" not in {n.op_type for n in ready.graph.node}
    manifest = json.loads((folder / "manifest.json").read_text())
    # the symbolic batch stays and gets a profile (batch 1/1/8)
    assert manifest["inputs"] == [{"name": "input", "shape": ["batch", 3, 32, 32],
                                   "dtype": "float32"}]
    assert manifest["optimization_profiles"] == [
        {"input": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [8, 3, 32, 32]}}]
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, *zoo.CNN_INPUT))
        feeds = {"input": x.astype(np.float32)}
        want, got = _ort(proto, feeds), _ort(ready, feeds)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)


def test_bert_is_tensorrt_ready_with_static_shapes(lowered):
    _, proto, folder = lowered("bert")
    target = TensorRtTarget()
    ready = _check_tensorrt_ready(folder / "model.onnx", target)
    ops = Counter(n.op_type for n in ready.graph.node)
    assert ops["LayerNormalization"] == 5  # standard ONNX form at opset 17, not contrib
    assert not ops.keys() & {"SkipLayerNormalization", "Attention", "FusedConv"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["optimization_profiles"] == []
    assert [i["shape"] for i in manifest["inputs"]] == [[2, 8], [2, 8]]
    assert manifest["outputs"][1] == {"name": "last_hidden_state", "shape": [2, 8, 64],
                                      "dtype": "float32"}
    inferred = onnx.shape_inference.infer_shapes(ready, strict_mode=True, data_prop=True)
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name
    feeds = _bert_feeds()
    want, got = _ort(proto, feeds), _ort(ready, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)


def test_manifest_describes_the_files(lowered):
    result, _, folder = lowered("cnn")
    names = sorted(p.name for p in folder.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest["engine"] is None:
        assert names == ["manifest.json", "model.onnx"]
        assert manifest["artifact"] == "model.onnx" and result.artifact.format == "tensorrt-onnx"
        assert ENGINE_MISSING.split(" (")[0] in manifest["engine_note"] or \
            "no engine built here" in manifest["engine_note"]
    else:
        assert names == ["manifest.json", "model.onnx", "model.plan"]
        assert manifest["artifact"] == "model.plan" and manifest["engine_note"] is None
    assert sorted(map(Path, result.report["artifact_files"])) == sorted(folder.iterdir())
    assert manifest["target"] == "tensorrt" and manifest["model"] == "model.onnx"
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert set(manifest["sha256"]) == set(names) - {"manifest.json"}
    assert manifest["model_content_hash"] == result.report["output_hash"]
    assert manifest["graphopt_version"] == result.report["graphopt_version"]
    assert manifest["toolchain"]["onnx"] == onnx.__version__
    assert manifest["builder"]["precision"] == {"float32": True, "float16": False,
                                                "int8": False}
    assert manifest["build_command"] == (
        "trtexec --onnx=model.onnx --saveEngine=model.plan --stronglyTyped --noTF32 "
        "--minShapes=input:1x3x32x32 --optShapes=input:1x3x32x32 --maxShapes=input:8x3x32x32")
    # a build system finds the main file through the manifest alone
    opened = TensorRtTarget().open(folder)
    assert opened.path == folder / manifest["artifact"]


def test_run_without_an_engine_says_what_is_missing(lowered):
    result, _, folder = lowered("cnn")
    if json.loads((folder / "manifest.json").read_text())["engine"]:
        pytest.skip("an engine was built here")
    with pytest.raises(UsageError, match="holds no TensorRT engine") as info:
        TensorRtTarget().run(result.artifact, {"input": np.zeros((1, 3, 32, 32), np.float32)})
    assert "trtexec --onnx=model.onnx" in info.value.hint
    # optimize's artifact check reports it as not run here (not as a failure)
    check = result.report.get("artifact")
    if check is not None:
        assert check["ok"] is None and "no TensorRT engine" in check["detail"]


# ---------------------------------------------------------------- int8: explicit quantization
def test_pass_defaults_hook_user_options_win():
    defaults = {"quantize-int8": {"symmetric-activations": True, "reduce_range": "false"}}
    registry = pass_registry()
    (quant,) = build_passes("quantize-int8", registry, defaults=defaults)
    assert quant.options.symmetric_activations is True and quant.options.reduce_range == "false"
    (quant,) = build_passes("quantize-int8(reduce-range=true,symmetric_activations=false)",
                            registry, defaults=defaults)
    assert quant.options.reduce_range == "true" and quant.options.symmetric_activations is False
    (plain,) = build_passes("quantize-int8", registry)  # no target defaults: the pass's own
    assert plain.options.symmetric_activations is False
    (other,) = build_passes(["fold-constants"], registry, defaults=defaults)
    assert other.name == "fold-constants"
    ready = build_passes("quantize-int8", registry)[0]
    assert build_passes([ready], registry, defaults=defaults)[0] is ready  # objects kept
    assert TensorRtTarget.pass_defaults["quantize-int8"]["symmetric-activations"] is True


def test_int8_is_symmetric_per_channel_and_within_budget(lowered):
    result, proto, folder = lowered("int8")
    ready = _check_tensorrt_ready(folder / "model.onnx", TensorRtTarget())
    section = result.report["compression"]["passes"]["quantize-int8"]
    assert section["status"] == "changed"
    assert sum(e["changed"] for e in section["sites"].values()) >= 20
    inits = {t.name: numpy_helper.to_array(t) for t in ready.graph.initializer}
    qdq = [n for n in ready.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero = ready.graph.initializer[[t.name for t in ready.graph.initializer]
                                       .index(node.input[2])]
        assert zero.data_type == TensorProto.INT8, node.name
        assert not np.any(inits[node.input[2]]), node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weight = inits[node.input[0]]  # weights: int8, per output channel, full range
            assert weight.dtype == np.int8, node.name
            axis = next(a.i for a in node.attribute if a.name == "axis")
            scale = inits[node.input[1]]
            assert scale.shape == (weight.shape[axis],), node.name
            peak = np.abs(weight.astype(np.int32)).max(
                axis=tuple(i for i in range(weight.ndim) if i != axis))
            assert np.all((peak == 127) | (peak == 0)), node.name  # not 7-bit (63)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["builder"]["precision"]["int8"] is True
    assert manifest["quantization"]["nodes"] == len(qdq)
    assert manifest["tensorrt_ready"]["uint8_zero_point_128_to_int8"] > 0
    assert manifest["tensorrt_ready"]["int32_bias_dequantize_folded"] > 0
    # accuracy: the TensorRT-ready model against the float original, on held-out data
    assert result.report["verification"]["ok"] is True
    x = _calibration(32, seed=7)[0]
    want, got = _ort(proto, x)["logits"], _ort(ready, x)["logits"]
    assert _cosine(want, got) >= 0.99
    # the conversion to TensorRT's form is exact: same outputs as the pipeline's model
    np.testing.assert_array_equal(_ort(result.model.to_onnx(), x)["logits"], got)


def test_quantize_int8_through_optimize_uses_the_targets_defaults(tmp_path):
    """``optimize`` builds its pipeline with the target's pass defaults (in
    ``graphopt.transform``), under the options the user names."""
    result = graphopt.optimize(zoo.mobilenet_cnn(), target="tensorrt", quantize="int8",
                               calibration=_calibration(), output=tmp_path / "q")
    quant = next(p for p in result.report["pipeline"] if p.startswith("quantize-int8"))
    assert "symmetric_activations=True" in quant and "reduce_range='false'" in quant
    assert "embeddings=False" in quant


def test_tensorrt_ready_conversion_is_exact_and_refuses_asymmetric(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])

    def model(zero: int, dtype=TensorProto.UINT8):
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq0"),
                 helper.make_node("DequantizeLinear", ["b", "bs"], ["bf"], name="bias_dq"),
                 helper.make_node("Add", ["d", "bf"], ["y"])]
        inits = [numpy_helper.from_array(np.float32(0.05), "s"),
                 helper.make_tensor("z", dtype, [], [zero]),
                 numpy_helper.from_array(np.array([3, -7, 100, 0], np.int32), "b"),
                 numpy_helper.from_array(np.float32(0.01), "bs")]
        graph = helper.make_graph(nodes, "g", [x], [y], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    feeds = {"x": np.random.default_rng(0).uniform(-8, 8, (2, 4)).astype(np.float32)}
    ready, converted = tensorrt_ready(model(128))
    assert converted == {"uint8_zero_point_128_to_int8": 1, "int32_bias_dequantize_folded": 1}
    assert [n.op_type for n in ready.graph.node] == ["QuantizeLinear", "DequantizeLinear", "Add"]
    np.testing.assert_array_equal(_ort(ready, feeds)["y"], _ort(model(128), feeds)["y"])
    # an asymmetric activation (zero point 3) has no exact int8 form: refused, nothing written
    with pytest.raises(UsageError, match=r"q0 \(QuantizeLinear, uint8 zero point 3\)"):
        TensorRtTarget().lower(graphopt.load(model(3)), tmp_path / "asym")
    assert not (tmp_path / "asym").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- refusals and writing
def _with_foreign_ops() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
             helper.make_node("Det", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_unsupported_ops_are_refused_naming_them(tmp_path):
    proto = _with_foreign_ops()
    assert TensorRtTarget().unsupported_ops(proto) == Counter({"com.microsoft::Gelu": 1,
                                                               "Det": 1})
    with pytest.raises(UsageError, match=r"Det \(1 node\), com\.microsoft::Gelu \(1 node\)") \
            as info:
        graphopt.optimize(proto, target="tensorrt", output=tmp_path / "out")
    assert "--target ort" in info.value.hint
    assert list(tmp_path.iterdir()) == []
    onnx.save(proto, tmp_path / "m.onnx")
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", "m.onnx",
                             "--target", "tensorrt", "-o", "out"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Det" in result.stderr and "--target ort" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_lowering_again_replaces_the_folder_and_drops_a_stale_engine(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "model.plan").write_bytes(b"an engine of an earlier model")
    artifact = TensorRtTarget().lower(graphopt.load(zoo.mlp()), out)
    if ENGINE_MISSING is not None:
        assert not (out / "model.plan").exists()
        assert artifact.path == out / "model.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging left behind
    with pytest.raises(UsageError, match="writes a directory"):
        TensorRtTarget().lower(graphopt.load(zoo.mlp()), tmp_path / "m.onnx")


def test_profiles_and_trtexec_command():
    target = TensorRtTarget(profiles={"seq": (4, 16, 64)}, batch_profile=(1, 2, 4))
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "seq"])
    m = helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", "seq"])
    graph = helper.make_graph([helper.make_node("Add", ["ids", "mask"], ["y"])], "g", [x, m], [y])
    profile = target.optimization_profile(helper.make_model(graph))
    assert profile == {name: {"min": [1, 4], "opt": [2, 16], "max": [4, 64]}
                       for name in ("ids", "mask")}
    assert trtexec_command(profile).endswith(
        "--minShapes=ids:1x4,mask:1x4 --optShapes=ids:2x16,mask:2x16 "
        "--maxShapes=ids:4x64,mask:4x64")
    with pytest.raises(UsageError, match="min, opt, max"):
        TensorRtTarget(batch_profile=(4, 2, 8))


def test_cli_optimize_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(EXAMPLE),
                             "--target", "tensorrt", "-o", "out", "--report", "r.json"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "tensorrt" and report["verification"]["ok"] is True
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert tmp_path / report["output_path"] == tmp_path / "out" / manifest["artifact"]
    if ENGINE_MISSING is not None:
        assert "no engine built here" in result.stderr and "trtexec" in result.stderr
    ready = _check_tensorrt_ready(tmp_path / "out" / "model.onnx", TensorRtTarget())
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want, got = _ort(onnx.load(EXAMPLE), {"input": x}), _ort(ready, {"input": x})
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=ATOL)


def test_fp16_precision_is_in_the_graph(tmp_path):
    result = graphopt.optimize(onnx.load(EXAMPLE), target="tensorrt",
                               passes=_passes(TensorRtTarget(), "fp16"),
                               output=tmp_path / "h", tolerance=0.99)
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["builder"]["precision"]["float16"] is True
    assert manifest["builder"]["flags"] == []  # strongly typed: no FP16 builder flag
    ready = onnx.load(tmp_path / "h" / "model.onnx")
    assert any(t.data_type == TensorProto.FLOAT16 for t in ready.graph.initializer)
    x = np.random.default_rng(4).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert _cosine(_ort(onnx.load(EXAMPLE), {"input": x})["logits"],
                   _ort(ready, {"input": x})["logits"]) >= 0.99
    assert result.report["verification"]["ok"] is True


# ---------------------------------------------------------------- engines (TensorRT + GPU)
@needs_engine
def test_engine_matches_ort(lowered):
    result, proto, folder = lowered("cnn")
    assert (folder / "model.plan").is_file() and result.artifact.format == "tensorrt-engine"
    target = TensorRtTarget()
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, *zoo.CNN_INPUT))
        feeds = {"input": x.astype(np.float32)}
        got, want = target.run(result.artifact, feeds), _ort(proto, feeds)
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-3, atol=1e-3)
    seconds = target.measure(result.artifact, feeds, repeat=5)
    assert seconds is not None and 0 < seconds < 1


@needs_engine
def test_bert_engine_matches_ort(lowered):
    result, proto, _ = lowered("bert")
    feeds = _bert_feeds()
    got, want = TensorRtTarget().run(result.artifact, feeds), _ort(proto, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3, err_msg=name)


@needs_engine
def test_int8_engine_within_budget(lowered):
    result, proto, _ = lowered("int8")
    x = _calibration(8, seed=7)[0]
    got = TensorRtTarget().run(result.artifact, x)["logits"]
    assert _cosine(_ort(proto, x)["logits"], got) >= 0.99
