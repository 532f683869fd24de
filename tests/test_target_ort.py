"""The ``ort`` target's ``--format ort``: ONNX Runtime's .ort file from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt import verify
from graphopt.errors import UsageError
from tests.test_cli import EXAMPLE, cli


def test_format_ort_writes_a_runnable_matching_ort_file(tmp_path):
    out = tmp_path / "out" / "m.ort"
    result = cli("optimize", EXAMPLE, "-o", out, "--format", "ort",
                 "--report", tmp_path / "r.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier, not ONNX protobuf
    session_info = json.loads(out.with_name("m.ort.session.json").read_text())
    assert session_info["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert session_info["onnxruntime"] == ort.__version__
    # ORT's own fusion into a form graphopt chooses by measurement stays off: declared by
    # the alternative pass (Pass.runtime_rewrites), not listed by hand in the target.
    from graphopt.registry import pass_registry

    skip_ln = pass_registry().get("fuse-skip-layer-norm")
    assert skip_ln.alternative and skip_ln.runtime_rewrites["ort"] == ("SkipLayerNormFusion",)
    assert session_info["disabled_optimizers"] == ["SkipLayerNormFusion"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_path"] == str(out) and report["verification"]["ok"] is True
    assert sorted(Path(f).name for f in report["artifact_files"]) == ["m.ort",
                                                                     "m.ort.session.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.ort", "m.ort.session.json"]

    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = verify.run(onnx.load(EXAMPLE), {"input": x})["logits"]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_unknown_format_is_a_usage_error_and_writes_nothing(tmp_path):
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "out" / "m.ort", "--format", "tflite",
                 cwd=tmp_path)
    assert result.returncode == 2
    assert "tflite" in result.stderr
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_api_rejects_a_format_the_target_does_not_write(tmp_path):
    with pytest.raises(UsageError, match="format"):
        graphopt.optimize(EXAMPLE, target="ort", output=tmp_path / "m.x", format="tflite")
    assert list(tmp_path.iterdir()) == []


def test_default_format_is_still_onnx(tmp_path):
    result = graphopt.optimize(EXAMPLE, output=tmp_path / "m.onnx")
    assert result.artifact.format == "onnx"
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"))


@pytest.mark.parametrize("length, ok", [(241, True), (243, False)])
def test_format_ort_with_a_name_near_the_file_name_limit(tmp_path, length, ok):
    """241 characters: `.session.json` still fits in 255 bytes, and the temporary files
    (once named after the output, 8 random characters longer) must too; 243: the
    session file cannot exist, a usage error (2) says so and nothing is written."""
    out = tmp_path / "out" / ("m" * (length - 4) + ".ort")
    result = cli("optimize", EXAMPLE, "-o", out, "--format", "ort", cwd=tmp_path)
    if ok:
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name,
                                                               out.name + ".session.json"]
    else:
        assert result.returncode == 2, result.stderr
        assert "too long" in result.stderr
        assert not out.parent.exists() or not any(out.parent.iterdir())
