"""The command line on the bundled example: optimize, report, compare, targets. It runs
in-process (click's CliRunner); one test runs the real ``graphopt`` process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from graphopt import verify
from tests.helpers import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"




def cli_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def test_example_is_what_the_script_builds(tmp_path):
    script = EXAMPLE.with_name("make_example.py")
    subprocess.run([sys.executable, str(script), str(tmp_path / "rebuilt.onnx")], check=True,
                   capture_output=True)
    assert (tmp_path / "rebuilt.onnx").read_bytes() == EXAMPLE.read_bytes()


def test_optimize_example_writes_verified_model_and_report(tmp_path):
    before = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "out" / "m.onnx",
                 "--report", tmp_path / "out" / "r.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(EXAMPLE.read_bytes()).hexdigest() == before
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    for key in ("input", "output", "trace", "verification", "target", "output_path"):
        assert key in report
    assert report["target"] == "ort" and report["verification"]["ok"] is True
    assert report["output"]["nodes"] < report["input"]["nodes"]
    assert report["output"]["params"] <= report["input"]["params"]
    assert {e["status"] for e in report["trace"]} <= {"changed", "unchanged"}
    assert "verified" in result.stderr and "nodes" in result.stderr

    optimized = onnx.load(tmp_path / "out" / "m.onnx")
    onnx.checker.check_model(optimized, full_check=True)
    assert optimized.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = verify.run(onnx.load(EXAMPLE), {"input": x})["logits"]
    np.testing.assert_allclose(verify.run(optimized, {"input": x})["logits"], ref,
                               rtol=1e-4, atol=1e-5)


def test_skip_leaves_a_pass_out(tmp_path):
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
                 "--skip", "eliminate-identity", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert "eliminate-identity" not in {e["pass_name"] for e in report["trace"]}


def test_threads_reach_the_target(tmp_path, monkeypatch):
    """``--threads N``: the target the run checks and times with is the target's
    ``with_threads(N)``; a target without the setting is a usage error."""
    from graphopt.targets.ort import OrtTarget

    made = []
    real = OrtTarget.with_threads
    monkeypatch.setattr(OrtTarget, "with_threads",
                        lambda self, n: made.append(real(self, n)) or made[-1])
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "m.onnx", "--threads", "1",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [t.threads for t in made] == [1] and made[0].device.cores == 1
    bad = cli("optimize", EXAMPLE, "-o", tmp_path / "m.onnx", "--threads", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_compare_exit_codes(tmp_path):
    same = cli("compare", EXAMPLE, EXAMPLE, "--json", cwd=tmp_path)
    assert same.returncode == 0 and json.loads(same.stdout)["ok"] is True

    model = onnx.load(EXAMPLE)
    bias = next(t for t in model.graph.initializer if t.name == "head.bias")
    values = onnx.numpy_helper.to_array(bias) + 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values, "head.bias"))
    onnx.save(model, tmp_path / "changed.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, input=np.ones((2, 3, 32, 32), np.float32))
    diff = cli("compare", EXAMPLE, tmp_path / "changed.onnx", "--data", data, "--json",
               cwd=tmp_path)
    assert diff.returncode == 4
    assert abs(json.loads(diff.stdout)["max_abs_diff"] - 0.5) < 1e-6


def test_json_prints_the_report_and_quiet_prints_nothing(tmp_path):
    """For build systems: ``--json`` puts the report on stdout (what ``--report`` writes);
    ``--quiet`` leaves stdout and stderr empty on success, the exit code says it all."""
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "a.onnx", "--report", tmp_path / "a.json",
                 "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "a.json").read_text())
    assert printed["verification"]["ok"] is True and "nodes" not in result.stderr
    quiet = cli("optimize", EXAMPLE, "-o", tmp_path / "b.onnx", "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_progress_line_counts_and_estimates_the_time_left(monkeypatch):
    from graphopt import cli as cli_module

    shown = []
    status = type("Status", (), {"update": lambda self, text: shown.append(text)})()
    progress = cli_module._Progress(status)
    clock = iter([100.0, 130.0, 131.0])
    monkeypatch.setattr(cli_module.time, "monotonic", lambda: next(clock))
    progress.progress("prune-ffn: damage of each site alone", 0, 4)
    progress.progress("prune-ffn: damage of each site alone", 1, 4)  # 30 s for the first
    progress.progress("plan: searching", 3, 0)  # no total: a count only
    assert shown == ["prune-ffn: damage of each site alone: 0/4",
                     "prune-ffn: damage of each site alone: 1/4, about 90 s left",
                     "plan: searching: 3"]


def test_passes_and_targets_list_as_json(tmp_path):
    passes = json.loads(cli("passes", "--long", "--json", cwd=tmp_path).stdout)
    fold = next(p for p in passes if p["pass"] == "fold-constants")
    assert fold["lossless"] is True and fold["family"] and isinstance(fold["options"], dict)
    int8 = next(p for p in passes if p["pass"] == "quantize-int8")
    assert int8["lossless"] is False and int8["options"]["exclude"] == []
    targets = {t["target"]: t for t in json.loads(cli("targets", "--json", cwd=tmp_path).stdout)}
    assert targets["ort"]["lowers_here"] is None and targets["ort"]["runs_here"] is None


def test_targets_lists_ort(tmp_path):
    result = cli_process("targets", cwd=tmp_path)  # the real process, entry point and all
    assert result.returncode == 0 and "ort" in result.stdout and "yes" in result.stdout


def test_outputs_are_moved_in_together_and_replace_older_ones(tmp_path):
    """Everything is staged beside the output, then moved in: a second run replaces the
    first run's files and leaves no temporaries; a folder output (no suffix) works."""
    for _ in range(2):
        result = cli("optimize", EXAMPLE, "-o", "out/m.onnx", "--report", "out/r.json",
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "r.json"]
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    assert report["output_path"] == "out/m.onnx"
    assert report["artifact_files"] == ["out/m.onnx"]
    result = cli("optimize", EXAMPLE, "-o", "folder", "--report", "folder/r.json",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["model.onnx", "r.json"]
    assert json.loads((tmp_path / "folder" / "r.json").read_text())["output_path"] == \
        "folder/model.onnx"
    bad = cli("optimize", EXAMPLE, "-o", "folder2", "--report", "folder2/model.onnx",
              cwd=tmp_path)
    assert bad.returncode == 2 and "name the target writes" in bad.stderr
    assert not (tmp_path / "folder2").exists()


def test_ort_format_output_is_staged_too(tmp_path):
    result = cli("optimize", EXAMPLE, "-o", "m.ort", "--format", "ort", "--report", "r.json",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ort", "m.ort.session.json",
                                                          "r.json"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["artifact_files"] == ["m.ort", "m.ort.session.json"]
