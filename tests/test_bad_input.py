"""Bad input: a clear one-line error, the documented exit code, nothing written, and the
input file untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.errors import ModelError


def small_model(opset: int = 17) -> onnx.ModelProto:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "W")
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [weight])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def save_external(model: onnx.ModelProto, folder: Path, location: str = "m.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location=location,
                    size_threshold=0)
    return path


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd,
                          capture_output=True, text=True)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _truncated(tmp: Path) -> Path:
    data = small_model().SerializeToString()
    path = tmp / "in" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_onnx(tmp: Path) -> Path:
    path = tmp / "in" / "m.onnx"
    path.parent.mkdir()
    path.write_text("this is a text file, not a model\n" * 20)
    return path


def _missing_external(tmp: Path) -> Path:
    path = save_external(small_model(), tmp / "in")
    (tmp / "in" / "m.data").unlink()
    return path


def _external_outside(tmp: Path) -> Path:
    outside = tmp / "secret.data"
    outside.write_bytes(b"\0" * 64 * 32 * 4)
    model = small_model()
    path = save_external(model, tmp / "in")
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.data"
    (tmp / "in" / "m.data").unlink()
    onnx.save(proto, path)
    return path


def _unknown_domain(tmp: Path) -> Path:
    model = small_model()
    model.graph.node[1].domain = "com.example.nowhere"
    path = tmp / "in" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    return path


def _missing_file(tmp: Path) -> Path:
    (tmp / "in").mkdir()
    return tmp / "in" / "does-not-exist.onnx"


BAD_INPUTS = {
    "truncated": (_truncated, "truncated"),
    "not-onnx": (_not_onnx, "not"),
    "missing-external-data": (_missing_external, "missing"),
    "external-data-outside-folder": (_external_outside, "outside the model's folder"),
    "unknown-op-domain": (_unknown_domain, "com.example.nowhere"),
    "missing-file": (_missing_file, "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_rejects_bad_input(case, tmp_path):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    before = digest(path.parent)
    result = cli("optimize", str(path), "-o", str(tmp_path / "out" / "o.onnx"),
                 "--report", str(tmp_path / "out" / "r.json"), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "error:" in result.stderr and expected in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written on failure"
    assert digest(path.parent) == before, "the input must not be modified"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_api_raises_model_error(case, tmp_path):
    make, _ = BAD_INPUTS[case]
    with pytest.raises(ModelError):
        graphopt.load(make(tmp_path))


def test_inspect_bad_input_exit_code(tmp_path):
    path = _not_onnx(tmp_path)
    assert cli("inspect", str(path), cwd=tmp_path).returncode == 3


def test_usage_errors_exit_2(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    cases = [
        ("optimize", str(path), "-o", "o.onnx", "--passes", "no-such-pass"),
        ("optimize", str(path), "-o", "o.onnx", "--passes", "fold-constants(bogus=1)"),
        ("optimize", str(path), "-o", "o.onnx", "--passes", "fold-constants(size-limit=big)"),
        ("optimize", str(path), "-o", "o.onnx", "--target", "no-such-target"),
        ("optimize", str(path), "-o", str(path)),
        ("optimize", str(path), "-o", "o.onnx", "--input-shape", "x=abc"),
        ("optimize", str(path)),  # -o missing: click's own usage error
    ]
    for args in cases:
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()
    unknown = cli("optimize", str(path), "-o", "o.onnx", "--passes", "no-such-pass",
                  cwd=tmp_path)
    assert "eliminate-dead-code" in unknown.stderr  # the valid names are listed
    option = cli("optimize", str(path), "-o", "o.onnx", "--passes", "fold-constants(bogus=1)",
                 cwd=tmp_path)
    assert "size-limit" in option.stderr


def test_debug_shows_traceback(tmp_path):
    path = _not_onnx(tmp_path)
    result = cli("--debug", "optimize", str(path), "-o", "o.onnx", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
