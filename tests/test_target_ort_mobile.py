"""The ``ort-mobile`` target: ``model.ort`` for an Arm phone's ONNX Runtime and the
operator list of the app's reduced build, checked in this machine's ONNX Runtime against
the original: the example CNN at two batch sizes, all-MiniLM-L6-v2 with its real weights,
the digits CNN quantized to int8 on its test images; a changed file found later; bad
output paths refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.ort_tools import ort_tool
from graphopt.targets.ort_mobile import OrtMobileTarget
from tests import zoo
from tests.helpers import cli
from tests.test_target_litert import EXAMPLE


def _ops_in(path) -> dict[str, set[str]]:
    """{domain: op types} of a ``.ort`` file, read by ONNX Runtime's own tooling."""
    used, _ = ort_tool("ort_format_model.utils")._extract_ops_and_types_from_ort_models(
        [path], False)
    return {domain: set().union(*by_opset.values()) for domain, by_opset in used.items()}


def _config_ops(path) -> dict[str, set[str]]:
    ops: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _, names = line.split(";", 2)
            ops.setdefault(domain, set()).update(names.split(","))
    return ops


def _run(folder, feeds):
    target = OrtMobileTarget(threads=1)
    return target.run(target.open(folder), feeds)


def test_example_cnn_through_the_cli(tmp_path, run_ort):
    """Files, the ORT-format identifier, the config listing exactly what the file uses
    (no x86 NCHWc ops: made for Arm), batch 1 and 5 within 1e-4 of ORT on the original
    (the batch stays dynamic), ``graphopt verify`` passing, then failing (exit 4) once a
    byte of model.ort changed."""
    shutil.copy(EXAMPLE, tmp_path / "m.onnx")
    done = cli("optimize", "m.onnx", "--target", "ort-mobile", "-o", "out", "--json",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["artifact"]["ok"] is True, report["artifact"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.ort",
                                                     "required_operators.config"]
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"
    used = _ops_in(out / "model.ort")
    assert _config_ops(out / "required_operators.config") == used
    assert "com.microsoft.nchwc" not in used and "FusedConv" in used["com.microsoft"], used
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["session"]["target_platform"] == "arm"
    assert "NchwcTransformer" in manifest["session"]["disabled_optimizers"]
    assert manifest["operators"]["com.microsoft:1"] == ["FusedConv"]
    assert str(tmp_path) not in (out / "required_operators.config").read_text()

    model = onnx.load(EXAMPLE)
    for batch in (1, 5):
        x = {"input": np.random.default_rng(batch).standard_normal((batch, 3, 32, 32))
             .astype(np.float32)}
        got, want = _run(out, x)["logits"], run_ort(model, x)["logits"]
        assert got.shape == (batch, 10)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    ok = cli("verify", "out", "-r", "m.onnx", "--no-timing", "--json", cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True, ok.stderr
    data = bytearray((out / "model.ort").read_bytes())
    data[-100] ^= 0xFF
    (out / "model.ort").write_bytes(bytes(data))
    bad = cli("verify", "out", "-r", "m.onnx", "--no-timing", cwd=tmp_path)
    assert bad.returncode == 4 and "model.ort (changed)" in bad.stderr, bad.stderr


def test_minilm_with_contrib_ops_within_1e4(tmp_path, run_ort):
    """all-MiniLM-L6-v2 (real weights): the ORT fusions graphopt chose (Attention, ...)
    are in the file and in the build's operator list; embeddings within 1e-4."""
    model, feeds = zoo.bert_minilm(), zoo.minilm_tokenize()
    out = tmp_path / "minilm"
    result = graphopt.optimize(model, target="ort-mobile", output=out, data=[feeds])
    assert result.report["artifact"]["ok"] is True, result.report["artifact"]
    contrib = _config_ops(out / "required_operators.config")["com.microsoft"]
    assert contrib & {"Attention", "MultiHeadAttention", "SkipLayerNormalization",
                      "FastGelu", "BiasGelu"}, contrib
    got = _run(out, feeds)["sentence_embedding"]
    want = run_ort(model, feeds)["sentence_embedding"]
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_digits_int8_keeps_the_int8_models_accuracy(tmp_path, run_ort):
    """--quantize int8 on the digits CNN (calibrated on its training images): model.ort
    runs its QDQ graph on ONNX Runtime's int8 kernels (QLinearConv, as an Arm build
    would) and loses at most a point of test accuracy against the float model."""
    from tests.digits import TRAINED_ON, digits_cnn, digits_data

    model, (xtr, _, xte, yte) = digits_cnn(), digits_data()
    out = tmp_path / "int8"
    result = graphopt.optimize(model, target="ort-mobile", output=out, quantize="int8",
                               calibration={"input": xtr[:TRAINED_ON]})
    assert result.report["compression"]["passes"]["quantize-int8"]["status"] == "changed"
    assert result.report["artifact"]["ok"] is True, result.report["artifact"]
    used = _ops_in(out / "model.ort")
    assert "QLinearConv" in used["ai.onnx"] or "QLinearConv" in used.get("com.microsoft", ()),\
        used
    got = _run(out, {"input": xte})["logits"]
    float_acc = float((run_ort(model, {"input": xte})["logits"].argmax(1) == yte).mean())
    assert float((got.argmax(1) == yte).mean()) >= float_acc - 0.01 and float_acc > 0.97


@pytest.mark.parametrize("output", ["out.ort", "m.onnx"])
def test_bad_output_paths_are_refused(tmp_path, output):
    shutil.copy(EXAMPLE, tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    done = cli("optimize", "m.onnx", "--target", "ort-mobile", "-o", output, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == before


def test_listed_as_available(tmp_path):
    done = cli("targets", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {t["target"]: t for t in json.loads(done.stdout)}
    row = rows["ort-mobile"]
    assert "model.ort" in row["produces"] and "required_operators.config" in row["produces"]
    # null: nothing missing here (else the reason, as for litert without ai-edge-litert)
    assert row["lowers_here"] is None and row["runs_here"] is None, row
