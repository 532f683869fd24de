"""Bad input: a clear one-line error, the documented exit code, nothing written, and the
input file untouched. The command line runs in-process (click's CliRunner) except where a
real process matters (--debug)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.errors import ModelError, UsageError
from tests.helpers import cli


def small_model(opset: int = 17, width: int = 64) -> onnx.ModelProto:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((width, 32)).astype(np.float32), "W")
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [weight])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def save_external(model: onnx.ModelProto, folder: Path, location: str = "m.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location=location,
                    size_threshold=0)
    return path




def cli_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def tree(folder: Path) -> list[str]:
    """Every file and folder below ``folder`` (hidden temporaries included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_line_error(result, code: int, *expected: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and all(l.startswith(("error: ", "hint: ")) for l in lines), lines
    for text in expected:
        assert text.lower() in result.stderr.lower(), (text, result.stderr)


# ---------------------------------------------------------------- unreadable / invalid (3)
def _write(tmp: Path, model: onnx.ModelProto) -> Path:
    path = tmp / "in" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


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


def _external_entry(key: str, value: str):
    def make(tmp: Path) -> Path:
        path = save_external(small_model(), tmp / "in")
        proto = onnx.load(path, load_external_data=False)
        entries = {e.key: e for e in proto.graph.initializer[0].external_data}
        if key in entries:
            entries[key].value = value
        else:
            proto.graph.initializer[0].external_data.add(key=key, value=value)
        path.write_bytes(proto.SerializeToString())
        return path
    return make


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
    return _write(tmp, model)


def _missing_file(tmp: Path) -> Path:
    (tmp / "in").mkdir()
    return tmp / "in" / "does-not-exist.onnx"


def _data_type(data_type: int, width: int = 64):
    def make(tmp: Path) -> Path:
        model = small_model(width=width)
        model.graph.initializer[0].data_type = data_type  # float32 bytes stay
        return _write(tmp, model)
    return make


def _input_elem_type_0(tmp: Path) -> Path:
    model = small_model()
    model.graph.input[0].type.tensor_type.elem_type = 0
    return _write(tmp, model)


def _folder(tmp: Path) -> Path:
    (tmp / "in" / "model.onnx").mkdir(parents=True)
    return tmp / "in" / "model.onnx"


def _opset_99(tmp: Path) -> Path:
    return _write(tmp, small_model(opset=99))


BAD_INPUTS = {
    "truncated": (_truncated, "truncated"),
    "not-onnx": (_not_onnx, "not"),
    "missing-external-data": (_missing_external, "missing"),
    "external-data-outside-folder": (_external_outside, "outside the model's folder"),
    "external-data-offset-not-a-number": (_external_entry("offset", "12abc"), "offset"),
    "external-data-negative-length": (_external_entry("length", "-8192"), "length"),
    "external-data-nul-in-location": (_external_entry("location", "m\0.data"), "location"),
    "unknown-op-domain": (_unknown_domain, "com.example.nowhere"),
    "missing-file": (_missing_file, "no such file"),
    "float16-on-float32-bytes": (_data_type(TensorProto.FLOAT16), "FLOAT16"),
    # (128 KB: its bytes are read out of the protobuf at load, apart from the checks)
    "large-float16-on-float32-bytes": (_data_type(TensorProto.FLOAT16, 1024), "FLOAT16"),
    "large-int64-on-float32-bytes": (_data_type(TensorProto.INT64, 1024), "INT64"),
    "bfloat16-on-float32-bytes": (_data_type(TensorProto.BFLOAT16), "BFLOAT16"),
    "data-type-0": (_data_type(0), "no valid data type"),
    "input-elem-type-0": (_input_elem_type_0, "graph input 'x'"),
    "folder-as-model": (_folder, "not a file"),
    "opset-newer-than-onnxruntime": (_opset_99, "opset 99"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_rejects_bad_input(case, tmp_path):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    before = digest(path.parent)
    result = cli("optimize", path, "-o", tmp_path / "out" / "o.onnx",
                 "--report", tmp_path / "out" / "r.json", cwd=tmp_path)
    assert_one_line_error(result, 3, expected)
    assert not (tmp_path / "out").exists(), "nothing may be written on failure"
    assert digest(path.parent) == before, "the input must not be modified"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporaries"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_api_raises_model_error(case, tmp_path):
    make, _ = BAD_INPUTS[case]
    with pytest.raises(ModelError):
        graphopt.optimize(make(tmp_path), output=tmp_path / "out" / "o.onnx")
    assert not (tmp_path / "out").exists()


def test_a_model_given_in_memory_is_read_not_changed():
    """A ModelProto handed to the API: its large weights are read out of it (not copied
    with it), a corrupt one is refused by name, and the caller's proto stays as it was."""
    model = small_model(width=1024)
    before = model.SerializeToString()
    result = graphopt.optimize(model)
    assert model.SerializeToString() == before
    x = {"x": np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)}
    np.testing.assert_allclose(verify.run(result.model.to_onnx(), x)["y"],
                               verify.run(model, x)["y"], rtol=1e-5, atol=1e-5)
    loaded = graphopt.load(model)
    np.testing.assert_array_equal(
        np.asarray(loaded.initializers()[0].values),
        numpy_helper.to_array(model.graph.initializer[0]))
    assert loaded.to_onnx().graph.initializer[0].raw_data == \
        model.graph.initializer[0].raw_data
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ModelError, match="tensor 'W' holds 131068 bytes"):
        graphopt.load(model)


def test_opset_newer_than_onnxruntime_is_checked_at_load_by_the_checker_too():
    """graphopt.load alone accepts it (ONNX itself does); the refusal is ONNX Runtime's."""
    graphopt.load(small_model(opset=99))
    with pytest.raises(ModelError, match="newer than the opset"):
        verify.check_runtime(small_model(opset=99))
    verify.check_runtime(small_model())


def test_unreadable_model_is_exit_3(tmp_path):
    if os.geteuid() != 0:
        path = tmp_path / "m.onnx"
        onnx.save(small_model(), path)
        path.chmod(0)
    elif Path("/proc/self/mem").is_file():  # root reads every file; this one fails (EIO)
        path = Path("/proc/self/mem")
    else:
        pytest.skip("no file this user cannot read")
    result = cli("optimize", path, "-o", tmp_path / "out" / "o.onnx", cwd=tmp_path)
    assert_one_line_error(result, 3, "cannot read")
    assert not (tmp_path / "out").exists()
    assert cli("inspect", path, cwd=tmp_path).returncode == 3


def test_inspect_and_compare_bad_input_exit_code(tmp_path):
    path = _not_onnx(tmp_path)
    assert_one_line_error(cli("inspect", path, cwd=tmp_path), 3)
    assert_one_line_error(cli("inspect", tmp_path, cwd=tmp_path), 3, "not a file")
    good = tmp_path / "good.onnx"
    onnx.save(small_model(), good)
    assert_one_line_error(cli("compare", good, path, cwd=tmp_path), 3)
    op99 = tmp_path / "op99.onnx"
    onnx.save(small_model(opset=99), op99)
    assert_one_line_error(cli("compare", op99, op99, cwd=tmp_path), 3, "opset 99")


def test_verify_of_a_file_that_is_not_onnx_is_exit_3(tmp_path):
    reference = tmp_path / "m.onnx"
    onnx.save(small_model(), reference)
    for name in ("junk.onnx", "junk.txt"):
        (tmp_path / name).write_text("not a model\n")
        assert_one_line_error(cli("verify", tmp_path / name, "--reference", reference,
                                  cwd=tmp_path), 3, name)
    bad_reference = _not_onnx(tmp_path)
    optimized = tmp_path / "o.onnx"
    onnx.save(small_model(), optimized)
    assert_one_line_error(cli("verify", optimized, "--reference", bad_reference,
                              cwd=tmp_path), 3)


def _cast_input(tmp: Path, elem_type: int) -> Path:
    model = small_model()
    model.graph.input[0].type.tensor_type.elem_type = elem_type  # MatMul(int64, float)
    return _write(tmp, model)


def test_model_onnx_runtime_cannot_load_is_invalid(tmp_path):
    """Valid to the ONNX checker, but ops of ONNX Runtime's own domains with types that do
    not fit: the ort target cannot run it (it used to 'succeed' unverified)."""
    path = _cast_input(tmp_path, TensorProto.INT64)
    result = cli("optimize", path, "-o", tmp_path / "out" / "o.onnx", cwd=tmp_path)
    assert_one_line_error(result, 3, "ONNX Runtime cannot load the model")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- usage errors (2)
def test_usage_errors_exit_2(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    np.save(tmp_path / "d.npy", np.zeros((2, 64), np.float32))
    np.savez(tmp_path / "foo.npz", foo=np.zeros((2, 64), np.float32))
    cases = [
        (("--passes", "no-such-pass"), "no-such-pass"),
        (("--passes", "fold-constants(bogus=1)"), "bogus"),
        (("--passes", "fold-constants(size-limit=big)"), "big"),
        (("--target", "no-such-target"), "no-such-target"),
        (("--input-shape", "x=abc"), "--input-shape"),
        (("--input-shape", "x=1x-3"), "positive"),
        (("--input-shape", "x=1000000000000x16"), "input 'x'"),
        (("--data", "d.npy"), ".npz file is expected"),
        (("--data", "foo.npz"), "'foo' names no model input"),
    ]
    for args, expected in cases:
        result = cli("optimize", path, "-o", "o.onnx", *args, cwd=tmp_path)
        assert_one_line_error(result, 2, expected)
    for args in [("optimize", path, "-o", path),
                 ("optimize", path, "-o", "o.onnx", "--seed", "-1"),
                 ("optimize", path)]:  # -o missing: click's own usage error
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()
    unknown = cli("optimize", path, "-o", "o.onnx", "--passes", "no-such-pass", cwd=tmp_path)
    assert "eliminate-dead-code" in unknown.stderr  # the valid names are listed
    option = cli("optimize", path, "-o", "o.onnx", "--passes", "fold-constants(bogus=1)",
                 cwd=tmp_path)
    assert "size-limit" in option.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "foo.npz", "m.onnx"]


def test_huge_static_input_dimension_is_a_usage_error_naming_it(tmp_path):
    model = small_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 1, 2**40
    path = _write(tmp_path, model)
    result = cli("optimize", path, "-o", tmp_path / "out" / "o.onnx", cwd=tmp_path)
    assert_one_line_error(result, 2, "input 'x'", "--input-shape")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="input 'x'"):
        graphopt.optimize(path)
    with pytest.raises(UsageError, match="seed"):
        graphopt.optimize(small_model(), seed=-1)
    with pytest.raises(UsageError, match="positive"):
        graphopt.optimize(small_model(), input_shapes={"x": [1, -3]})


def test_compare_usage_errors(tmp_path):
    a = tmp_path / "a.onnx"
    onnx.save(small_model(), a)
    renamed = small_model()
    renamed.graph.input[0].name = "z"
    renamed.graph.node[0].input[0] = "z"
    b = tmp_path / "b.onnx"
    onnx.save(renamed, b)
    assert_one_line_error(cli("compare", a, b, cwd=tmp_path), 2, "different inputs", "z")
    np.savez(tmp_path / "foo.npz", foo=np.zeros((2, 64), np.float32))
    assert_one_line_error(cli("compare", a, a, "--data", tmp_path / "foo.npz", cwd=tmp_path),
                          2, "'foo' names no model input")
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 64), np.float64))  # widths are converted
    assert cli("compare", a, a, "--data", tmp_path / "x.npz", cwd=tmp_path).returncode == 0


# ---------------------------------------------------------------- outputs that destroy inputs
def _inputs(tmp: Path) -> Path:
    """An input model with external data, --data and calibration files, in tmp/in."""
    path = save_external(small_model(), tmp / "in")
    np.savez(tmp / "in" / "d.npz", x=np.ones((2, 64), np.float32))
    np.savez(tmp / "in" / "cal.npz", x=np.ones((4, 64), np.float32))
    return path


CLOBBERS = {
    "report-is-the-input": (("-o", "out/o.onnx", "--report", "in/m.onnx"), "input model"),
    "output-is-the-external-data": (("-o", "in/m.data"), "external data"),
    "report-is-the-external-data": (("-o", "out/o.onnx", "--report", "in/m.data"),
                                    "external data"),
    "report-is-the-output": (("-o", "out/o.onnx", "--report", "out/o.onnx"),
                             "overwrite the output"),
    "report-is-the-output-data": (("-o", "out/o.onnx", "--report", "out/o.onnx.data"),
                                  "beside it"),
    "output-is-data": (("-o", "in/d.npz", "--data", "in/d.npz"), "--data"),
    "report-is-calibration-data": (("-o", "out/o.onnx", "--report", "in/cal.npz",
                                    "--calibration-data", "in/cal.npz",
                                    "--quantize", "int8-dynamic"), "--calibration-data"),
    "output-folder-holds-the-input": (("-o", "in"), "lies inside it"),
    "output-via-symlink": (("-o", "link.onnx"), "input model"),
    "output-via-hard-link": (("-o", "hard.onnx"), "input model"),
    "output-data-via-symlinked-folder": (("-o", "alias/m.data"), "external data"),
}


@pytest.mark.parametrize("case", sorted(CLOBBERS))
def test_outputs_never_overwrite_inputs(case, tmp_path):
    path = _inputs(tmp_path)
    (tmp_path / "link.onnx").symlink_to(path)
    os.link(path, tmp_path / "hard.onnx")
    (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
    before, layout = digest(tmp_path / "in"), tree(tmp_path)
    args, expected = CLOBBERS[case]
    result = cli("optimize", "in/m.onnx", *args, cwd=tmp_path)
    assert_one_line_error(result, 2, expected)
    assert digest(tmp_path / "in") == before, "the inputs must not be modified"
    assert tree(tmp_path) == layout, "nothing may be written"


def test_api_refuses_output_over_its_input(tmp_path):
    path = _inputs(tmp_path)
    before = digest(tmp_path / "in")
    for output in (path, tmp_path / "in" / "m.data", tmp_path / "in"):
        with pytest.raises(UsageError, match="overwrite|inside"):
            graphopt.optimize(path, output=output)
    assert digest(tmp_path / "in") == before


# ---------------------------------------------------------------- outputs that cannot be written
def test_output_whose_parent_is_a_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    (tmp_path / "afile").write_text("x")
    layout = tree(tmp_path)
    for args in (("-o", "afile/o.onnx"), ("-o", "afile/sub/o.onnx"),
                 ("-o", "out/o.onnx", "--report", "afile/r.json")):
        result = cli("optimize", path, *args, cwd=tmp_path)
        assert_one_line_error(result, 2, "is a file, not a folder")
        assert tree(tmp_path) == layout


def test_read_only_output_folder(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: use a read-only file system
            if not (os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK)):
                pytest.skip("this user can write everywhere")
            locked = Path("/proc/sys")
        layout = tree(tmp_path)
        for args in (("-o", locked / "o.onnx"), ("-o", locked / "sub" / "o.onnx"),
                     ("-o", "o.onnx", "--report", locked / "r.json")):
            result = cli("optimize", path, *args, cwd=tmp_path)
            assert_one_line_error(result, 2, "cannot write into")
            assert tree(tmp_path) == layout
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_long_output_names(tmp_path):
    """A 250-character name works (temporary names are short); one over the file
    system's limit is a usage error; nothing is left behind either way."""
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    name = "a" * 245 + ".onnx"
    result = cli("optimize", path, "-o", name, "--report", "r" * 250 + ".json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(onnx.load(tmp_path / name))
    assert json.loads((tmp_path / ("r" * 250 + ".json")).read_text())["verification"]["ok"]
    layout = tree(tmp_path)
    result = cli("optimize", path, "-o", "b" * 252 + ".onnx", cwd=tmp_path)
    assert_one_line_error(result, 2, "bytes long")
    assert tree(tmp_path) == layout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failing_report_write_leaves_no_model(tmp_path, monkeypatch):
    """The report is written after the model is made: when that fails (disk full), the
    model is not written either, nor the folders made for them."""
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    real = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.parent.name == "reports":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    layout = tree(tmp_path)
    result = cli("optimize", path, "-o", "out/o.onnx", "--report", "reports/r.json",
                 cwd=tmp_path)
    assert_one_line_error(result, 2, "No space left on device")
    assert tree(tmp_path) == layout, "neither the model nor the report may be written"
    # the same command without the failure writes both
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    result = cli("optimize", path, "-o", "out/o.onnx", "--report", "reports/r.json",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "reports" / "r.json").read_text())
    assert report["output_path"] == "out/o.onnx" and (tmp_path / "out" / "o.onnx").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "o.onnx"]


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    """Exit 4 (the result differs): no model, no report, no folder made for them."""
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    from graphopt import api

    def differs(*args, **kwargs):
        return {"ok": False, "detail": "output 'y': max abs diff 1"}

    monkeypatch.setattr(api, "_verify", differs)
    layout = tree(tmp_path)
    result = cli("optimize", path, "-o", "out/o.onnx", "--report", "out/r.json",
                 cwd=tmp_path)
    assert_one_line_error(result, 4, "does not match")
    assert tree(tmp_path) == layout


# ---------------------------------------------------------------- --debug
def test_debug_shows_traceback_and_keeps_the_exit_code(tmp_path):
    path = _not_onnx(tmp_path)
    result = cli_process("--debug", "optimize", path, "-o", "o.onnx", cwd=tmp_path)
    assert result.returncode == 3 and "Traceback" in result.stderr
    assert "ModelError" in result.stderr and "error: " in result.stderr
    in_process = cli("--debug", "optimize", "m.onnx", "-o", "o.onnx", "--seed", "0",
                     "--input-shape", "x=1x-3", cwd=path.parent)
    assert in_process.returncode == 2 and "Traceback" in in_process.stderr
    assert not (tmp_path / "o.onnx").exists() and not (path.parent / "o.onnx").exists()


# ---------------------------------------------------------------- unusual valid input
def sparse_model() -> onnx.ModelProto:
    """A MatMul weight stored as a sparse_initializer (raw_data values, [NNZ] indices),
    a dense copy of it (merge-duplicate-initializers) and a product of it with itself
    (fold-constants), read by float32 ops."""
    dense = np.zeros((8, 4), np.float32)
    dense[[0, 3, 5, 7], [1, 2, 0, 3]] = [1.5, -2.0, 0.25, 3.0]
    flat = np.flatnonzero(dense).astype(np.int64)
    sparse = oh.make_sparse_tensor(numpy_helper.from_array(dense.ravel()[flat], "S"),
                                   numpy_helper.from_array(flat, "S_idx"), [8, 4])
    coords = np.argwhere(dense).astype(np.int64)  # [NNZ, rank] indices
    sparse2 = oh.make_sparse_tensor(numpy_helper.from_array(dense[dense != 0], "S2"),
                                    numpy_helper.from_array(coords, "S2_idx"), [8, 4])
    nodes = [oh.make_node("MatMul", ["x", "S"], ["a"]),
             oh.make_node("MatMul", ["x", "W"], ["b"]),
             oh.make_node("Mul", ["S", "S2"], ["ss"]),
             oh.make_node("MatMul", ["x", "ss"], ["c"]),
             oh.make_node("MatMul", ["x", "S2"], ["d"]),
             oh.make_node("Sum", ["a", "b", "c", "d"], ["y"])]
    graph = oh.make_graph(nodes, "sparse", [oh.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      ["N", 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(dense.copy(), "W")],
                          sparse_initializer=[sparse, sparse2])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_sparse_initializer_is_optimized_and_verified(tmp_path):
    model = sparse_model()
    path = tmp_path / "sparse.onnx"
    onnx.save(model, path)
    result = cli("optimize", path, "-o", "o.onnx", "--report", "r.json", "--strict",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["ok"] is True and report["rolled_back"] == []
    changed = {e["pass_name"] for e in report["trace"] if e["status"] == "changed"}
    assert "fold-constants" in changed, report["trace"]
    assert changed & {"merge-duplicate-initializers", "eliminate-common-subexpressions"}
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    want = verify.run(model, {"x": x})["y"]
    got = verify.run(onnx.load(tmp_path / "o.onnx"), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert report["output"]["nodes"] < report["input"]["nodes"]
    # the sparse values are read in their own dtype
    loaded = graphopt.load(model)
    sparse = {t.name: t for t in loaded.initializers()}["S"]
    assert sparse.values.dtype == np.float32
    np.testing.assert_array_equal(sparse.values, numpy_helper.to_array(model.graph.initializer[0]))


def _with_weight(tensor: onnx.TensorProto) -> onnx.ModelProto:
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [2000])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [2000])
    graph = oh.make_graph([oh.make_node("Add", ["x", tensor.name], ["y"])], "g", [x], [y],
                          [tensor])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t.float_data.extend([1.0] * 2000), "float_data and raw_data"),
    (lambda t: (t.ClearField("raw_data"), t.int64_data.extend([1] * 2000)),
     "belong in float_data, not int64_data"),
    (lambda t: t.ClearField("raw_data"), "holds its values in no field"),
])
def test_large_weights_are_checked_as_the_onnx_checker_would(corrupt, message):
    """The ONNX checker is given large weights as typed inputs (not their bytes): their
    value fields are checked by graphopt with the checker's rules, as a usage of the
    checker on the whole model would."""
    weight = numpy_helper.from_array(np.ones(2000, np.float32), "w")
    graphopt.optimize(_with_weight(weight))  # the valid model passes
    corrupt(weight)
    model = _with_weight(weight)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)  # what the checker says of it whole
    with pytest.raises(ModelError, match=message):
        graphopt.optimize(model)
