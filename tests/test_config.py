"""Options of ``graphopt optimize`` from graphopt.toml or pyproject.toml's [tool.graphopt]:
the same result as the same flags, flags win, paths relative to the file, unknown keys
and bad values are usage errors, and the output is byte-identical run to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.test_cli import EXAMPLE, cli


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder with the example model and calibration data under data/."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    shutil.copy(EXAMPLE, folder / "model.onnx")
    model = onnx.load(EXAMPLE)
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    np.savez(folder / "data" / "cal.npz",
             **{model.graph.input[0].name: rng.standard_normal([16, *dims[1:]]).astype(
                 np.float32)})
    return folder


def trace(report: Path) -> list[tuple[str, str]]:
    return [(e["pass_name"], e["status"]) for e in json.loads(report.read_text())["trace"]]


LOSSY = '''target = "ort"
skip = ["fuse-conv-add", "sink-transposes"]
quantize = "int8"
calibration-data = "data/cal.npz"
tolerance = 0.9
metric = "mean-cosine"
seed = 3
output = "out/model.onnx"
report = "out/report.json"
'''


def test_a_config_file_does_what_the_same_flags_do(project, tmp_path):
    (project / "graphopt.toml").write_text(LOSSY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = cli("optimize", project / "model.onnx", cwd=elsewhere)  # paths: the file's
    assert run.returncode == 0, run.stderr
    # the example is opset 11: the quantizer says why it left it alone
    assert "unchanged (opset 11 < 13" in run.stderr, run.stderr
    flags = tmp_path / "flags"
    flags.mkdir()
    shutil.copy(EXAMPLE, flags / "model.onnx")  # no graphopt.toml beside this one
    same = cli("optimize", flags / "model.onnx", "-t", "ort",
               "--skip", "fuse-conv-add,sink-transposes", "--quantize", "int8",
               "--calibration-data", project / "data" / "cal.npz", "--tolerance", "0.9",
               "--metric", "mean-cosine", "--seed", "3", "-o", flags / "model.opt.onnx",
               "--report", flags / "report.json", cwd=elsewhere)
    assert same.returncode == 0, same.stderr
    assert (project / "out" / "model.onnx").read_bytes() == \
        (flags / "model.opt.onnx").read_bytes()
    steps = trace(project / "out" / "report.json")
    assert steps == trace(flags / "report.json")
    names = [name for name, _ in steps]
    assert "quantize-int8" in names and "fuse-conv-add" not in names
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["verification"]["ok"] is True


def test_flags_win_over_the_file(project):
    (project / "graphopt.toml").write_text('skip = "fuse-conv-add"\noutput = "a.onnx"\n'
                                           'report = "a.json"\n')
    run = cli("optimize", project / "model.onnx", "--skip", "fuse-conv-bn",
              "--report", project / "b.json", cwd=project)
    assert run.returncode == 0, run.stderr
    names = [name for name, _ in trace(project / "b.json")]
    assert "fuse-conv-bn" not in names and "fuse-conv-add" in names
    assert (project / "a.onnx").is_file() and not (project / "a.json").exists()


def test_pyproject_table_in_the_current_folder(project, tmp_path):
    build = tmp_path / "build" / "sub"
    build.mkdir(parents=True)
    (tmp_path / "build" / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.graphopt]\nskip = ["fuse-conv-add"]\n')
    run = cli("optimize", project / "model.onnx", "-o", build / "m.onnx",
              "--report", build / "r.json", cwd=build)
    assert run.returncode == 0, run.stderr
    assert "fuse-conv-add" not in [name for name, _ in trace(build / "r.json")]
    (tmp_path / "build" / "pyproject.toml").write_text('[project]\nname = "x"\n')
    run = cli("optimize", project / "model.onnx", "-o", build / "m2.onnx",
              "--report", build / "r2.json", cwd=build)  # no table: no config
    assert run.returncode == 0, run.stderr
    assert "fuse-conv-add" in [name for name, _ in trace(build / "r2.json")]
    explicit = cli("optimize", project / "model.onnx", "-o", build / "m3.onnx",
                   "--config", tmp_path / "build" / "pyproject.toml", cwd=build)
    assert explicit.returncode == 2 and "no [tool.graphopt] table" in explicit.stderr


@pytest.mark.parametrize("text, message", [
    ('targett = "ort"\n', "unknown key 'targett'"),
    ('goal = "fast"\n', "goal"),
    ('strict = "yes please"\n', "strict must be true or false"),
    ('seed = -1\n', "seed"),
    ('skip = { a = 1 }\n', "skip must be a value"),
    ('output = "graphopt.toml"\n', "config file"),
    ('target = \n', "cannot be read"),
])
def test_bad_config_is_a_usage_error(project, text, message):
    (project / "graphopt.toml").write_text(text)
    run = cli("optimize", project / "model.onnx", "-o", project / "out.onnx", cwd=project) \
        if "output" not in text else cli("optimize", project / "model.onnx", cwd=project)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr, run.stderr
    assert "graphopt.toml" in run.stderr
    if "unknown key" in message:
        assert "valid keys:" in run.stderr and "calibration-data" in run.stderr
    assert not (project / "out.onnx").exists()
    assert (project / "graphopt.toml").read_text() == text  # never overwritten


def test_no_output_anywhere_is_a_usage_error(project):
    run = cli("optimize", project / "model.onnx", cwd=project)
    assert run.returncode == 2 and "no output" in run.stderr


def test_output_is_byte_identical_run_to_run(project):
    for name in ("a", "b"):
        run = cli("optimize", project / "model.onnx", "-o", project / f"{name}.onnx",
                  "--report", project / f"{name}.json", cwd=project)
        assert run.returncode == 0, run.stderr
    assert (project / "a.onnx").read_bytes() == (project / "b.onnx").read_bytes()
    a, b = (json.loads((project / f"{n}.json").read_text()) for n in "ab")
    assert a["output_hash"] == b["output_hash"]


@pytest.mark.parametrize("value, recovered", [("false", False), ('"recover"', True)])
def test_recover_key_takes_a_pass_or_false(project, value, recovered):
    """``recover = false`` turns recovery off as ``--no-recover`` does; a string names
    the recovery pass as ``--recover PASS`` does."""
    (project / "graphopt.toml").write_text(
        f'prune = "channels"\ncalibration-data = "data/cal.npz"\ntolerance = 0.5\n'
        f'recover = {value}\noutput = "out.onnx"\nreport = "r.json"\n')
    run = cli("optimize", project / "model.onnx", cwd=project)
    assert run.returncode == 0, run.stderr
    info = json.loads((project / "r.json").read_text())["compression"]["passes"]
    assert bool(info["prune-channels"].get("recovery")) is recovered
